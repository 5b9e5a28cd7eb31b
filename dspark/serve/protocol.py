"""The OpenAI wire format: request validation, error bodies, responses and stream chunks.

Nothing here runs a model or touches the network: a request body (already decoded JSON) goes
in, a typed `GenerationRequest` comes out, or an `APIError` that the app turns into

    HTTP 400  {"error": {"message": "top_p must be in (0, 1] ...", "type": "invalid_request_error",
                         "param": "top_p", "code": null}}

Validation is written by hand rather than through pydantic models so that every message names
the parameter and says how to fix it, in OpenAI's error shape (FastAPI's default is a 422 with
a list of pydantic locations, which OpenAI clients do not understand).

Accepted parameters: model, prompt / messages, max_tokens (chat: also max_completion_tokens),
temperature, top_p, top_k, seed, stop, stream, stream_options.include_usage, n (= 1), and the
vLLM extensions ignore_eos and return_token_ids. Refused with a 400 rather than silently
ignored: n > 1, logprobs / top_logprobs, echo, best_of > 1, suffix, non-zero presence /
frequency penalties, logit_bias, tools and non-text response formats. Unknown keys (user,
metadata, ...) are ignored, as OpenAI clients send some by default.
"""
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Union

from ..params import SamplingParams

# OpenAI's default completion length for /v1/completions; chat defaults to the rest of the context.
DEFAULT_COMPLETION_TOKENS = 16
COMPLETION, CHAT = "completion", "chat"


class APIError(Exception):
    """An error the client gets back as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, what: str) -> APIError:
    return invalid(f"{what} is not supported by this server", param, "unsupported_parameter")


@dataclass
class GenerationRequest:
    """One validated /v1/completions or /v1/chat/completions request.

    `prompt` is a text or a token-id list (completions) or a list of {"role", "content"}
    messages (chat). `max_tokens` None means the endpoint's default, resolved once the prompt
    length is known (`sampling_params`)."""
    kind: str
    model: Optional[str]
    prompt: Union[str, list]
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False

    def sampling_params(self, prompt_len: int, max_model_len: int, defaults: SamplingParams) -> SamplingParams:
        """SamplingParams for the engine. Omitted sampling values take the model's generation
        defaults (`defaults`, from generation_config.json) and otherwise OpenAI's (temperature 1,
        top_p 1); omitted max_tokens is 16 for completions and the rest of the context for chat."""
        room = max_model_len - prompt_len
        if self.max_tokens is not None:
            max_new = self.max_tokens
        else:
            max_new = DEFAULT_COMPLETION_TOKENS if self.kind == COMPLETION else room
        temperature = self.temperature
        if temperature is None:
            temperature = defaults.temperature if not defaults.greedy else 1.0
        return SamplingParams(
            max_new_tokens=max(1, min(max_new, room)),
            temperature=float(temperature),
            top_k=self.top_k if self.top_k is not None else defaults.top_k,
            top_p=float(self.top_p if self.top_p is not None else defaults.top_p),
            seed=self.seed, stop=list(self.stop) or None, ignore_eos=self.ignore_eos)


# ----------------------------------------------------------------------------- field readers
def _integer(body: dict, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {value!r}", name)
    if minimum is not None and value < minimum:
        raise invalid(f"{name} must be >= {minimum}, got {value}", name)
    if maximum is not None and value > maximum:
        raise invalid(f"{name} must be <= {maximum}, got {value}", name)
    return value


def _number(body: dict, name: str) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {value!r}", name)
    return value


def _stops(body: dict) -> list:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"stop must be a string or a list of strings, got {value!r}", "stop")
    return [s for s in stops if s]          # OpenAI ignores empty stop strings


def _refuse_unsupported(body: dict, kind: str) -> None:
    """A 400 for features this server does not implement, instead of silently ignoring them."""
    n = _integer(body, "n", minimum=1)
    if n is not None and n != 1:
        raise unsupported("n", f"n={n} (several choices per request); send n=1 and repeat the request")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False) or body.get("top_logprobs") is not None:
        raise unsupported("logprobs", "logprobs")
    if kind == COMPLETION:
        if body.get("echo"):
            raise unsupported("echo", "echo")
        best_of = body.get("best_of")
        if best_of not in (None, 1):
            raise unsupported("best_of", f"best_of={best_of!r}")
        if body.get("suffix"):
            raise unsupported("suffix", "suffix")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value:
            raise unsupported(name, f"{name}={value}")
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "logit_bias")
    if body.get("tools") or body.get("functions"):
        raise unsupported("tools", "tool calling")
    response_format = body.get("response_format")
    if response_format is not None and not (isinstance(response_format, dict)
                                            and response_format.get("type") == "text"):
        raise unsupported("response_format", "a response_format other than {\"type\": \"text\"}")


def _completion_prompt(body: dict) -> Union[str, list]:
    prompt = body.get("prompt")
    # A one-element batch ([text] or [[ids]]) is the same as the element itself.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt is empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise unsupported("prompt", "a batch of several prompts in one request; send one request per prompt")
    raise invalid("prompt must be a non-empty string or a non-empty list of token ids", "prompt")


def _message_text(content, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}].content: only text parts ({{\"type\": \"text\", \"text\": str}}) "
                              "are supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _chat_messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of {\"role\": str, \"content\": str}", "messages")
    chat = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{index}] must be an object with a string \"role\"", "messages")
        chat.append({"role": message["role"], "content": _message_text(message.get("content"), index)})
    return chat


def parse_request(body, kind: str) -> GenerationRequest:
    """Validate a decoded JSON body for `kind` (COMPLETION or CHAT). Raises APIError (400)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _refuse_unsupported(body, kind)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"model must be a string, got {model!r}", "model")
    prompt = _completion_prompt(body) if kind == COMPLETION else _chat_messages(body)
    max_tokens = _integer(body, "max_tokens", minimum=1)
    if kind == CHAT and max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", minimum=1)
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise invalid(f"temperature must be >= 0 (0 = greedy), got {temperature}", "temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise invalid(f"top_p must be in (0, 1] (1 = off), got {top_p}", "top_p")
    top_k = _integer(body, "top_k", minimum=-1)
    seed = _integer(body, "seed", minimum=-2 ** 63, maximum=2 ** 64 - 1)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict):
            raise invalid("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    include_usage = _boolean(options or {}, "include_usage")
    return GenerationRequest(
        kind=kind, model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        top_k=0 if top_k == -1 else top_k,          # vLLM spells "off" as -1, the engine as 0
        seed=seed, stop=_stops(body), stream=stream, include_usage=include_usage,
        ignore_eos=_boolean(body, "ignore_eos"), return_token_ids=_boolean(body, "return_token_ids"))


# ----------------------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, text: str, finish_reason: Optional[str], token_ids: Optional[list]) -> dict:
    if kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def response(kind: str, request_id: str, model: str, text: str, finish_reason: str, usage_: dict,
             spec_metrics: dict, token_ids: Optional[list] = None, prompt_token_ids: Optional[list] = None) -> dict:
    """The whole (non-streamed) response. `metrics.speculative_decoding` is the per-request
    acceptance record (dspark.serve.metrics.spec_decode_metrics)."""
    body = {"id": request_id, "object": "chat.completion" if kind == CHAT else "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [_choice(kind, text, finish_reason, token_ids)],
            "usage": usage_, "metrics": {"speculative_decoding": spec_metrics}}
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return body


def chunk(kind: str, request_id: str, model: str, created: int, text: Optional[str] = None,
          finish_reason: Optional[str] = None, role: bool = False, token_ids: Optional[list] = None,
          include_usage: bool = False) -> dict:
    """One server-sent chunk carrying a text delta (and the finish reason on the last one).
    With include_usage every chunk has "usage": null except the final usage chunk (OpenAI)."""
    if kind == CHAT:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {"id": request_id, "object": "chat.completion.chunk" if kind == CHAT else "text_completion",
            "created": created, "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(kind: str, request_id: str, model: str, created: int, usage_: dict, spec_metrics: dict) -> dict:
    """The stream's last data chunk when stream_options.include_usage is set: no choices, the usage
    and the request's speculative-decoding metrics."""
    return {"id": request_id, "object": "chat.completion.chunk" if kind == CHAT else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage_,
            "metrics": {"speculative_decoding": spec_metrics}}


__all__ = ["APIError", "CHAT", "COMPLETION", "DEFAULT_COMPLETION_TOKENS", "GenerationRequest", "chunk", "error_body",
           "invalid", "new_id", "parse_request", "response", "usage", "usage_chunk"]
