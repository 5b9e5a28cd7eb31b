"""The FastAPI application: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

One request's life:

    1. validate      the JSON body (`protocol.parse_request`) and the model name: 400
    2. admit         draining: 503; more requests in flight than max_batch_size + max_waiting: 429
    3. tokenize      in a worker thread (chat template for chats); longer than the context: 400
    4. submit        an EngineStream joins the engine's continuous batch, whose rounds one
                     thread runs for the server's lifetime (`Engine.start_driver`)
    5. respond       the whole answer, or OpenAI chunks as server-sent events; a client that
                     disconnects has its request cancelled
    6. account       metrics per delivery and at the end; the request leaves the in-flight count

Failures that are the server's (a bug, a request whose logits went NaN) are logged here with the
request id and answered 500 with no traceback; the other requests carry on.
"""
import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DSparkError
from ..params import SamplingParams
from ..prompts import chat_ids
from .bridge import Delta, EngineStream
from .config import ServeConfig
from .metrics import ServeMetrics, spec_decode_metrics
from .protocol import (CHAT, COMPLETION, APIError, GenerationRequest, chunk, invalid, new_id, parse_request,
                       response, usage, usage_chunk)

log = logging.getLogger("dspark.serve")
# Sampling defaults a generation_config.json may set (else OpenAI's defaults apply).
GENERATION_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


class ServerState:
    """What the handlers share: the engine, the settings, the metrics and the admission count."""

    def __init__(self, engine, config: ServeConfig, model_name: str):
        self.engine, self.config, self.model_name = engine, config, model_name
        self.max_batch_size = engine.config.max_batch_size
        self.capacity = self.max_batch_size + config.max_waiting_requests
        self.in_flight = 0            # requests admitted and not yet answered (event-loop thread only)
        self.draining = False         # set on SIGTERM: new requests get 503
        self.metrics = ServeMetrics(model_name, engine.gamma, self.running, self.waiting)
        generation = engine.generation_defaults
        self.defaults = engine.default_sampling_params() if any(k in generation for k in GENERATION_SAMPLING_KEYS) \
            else SamplingParams()

    def running(self) -> int:
        return min(self.engine.pending_requests(), self.max_batch_size)

    def waiting(self) -> int:
        return max(0, self.engine.pending_requests() - self.max_batch_size)

    def admit(self) -> None:
        """Count a request in, or refuse it: 503 while draining, 429 when the queue is full."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry later or on another replica",
                           "service_unavailable", code="server_shutting_down", headers={"Retry-After": "5"})
        if self.in_flight >= self.capacity:
            raise APIError(429, f"the server is at capacity ({self.max_batch_size} running + "
                                f"{self.config.max_waiting_requests} waiting); retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def tokenize(self, request: GenerationRequest) -> list:
        """The prompt's token ids, exactly as `Engine.generate` would make them (a worker thread)."""
        tokenizer, param = self.engine.tokenizer, "messages" if request.kind == CHAT else "prompt"
        try:
            if request.kind == CHAT:
                ids = chat_ids(request.prompt, tokenizer)
            elif isinstance(request.prompt, str):
                if tokenizer is None:
                    raise invalid("this model has no tokenizer: send the prompt as a list of token ids", param)
                ids = list(tokenizer.encode(request.prompt))
            else:
                ids = list(request.prompt)
        except DSparkError as exc:
            raise invalid(str(exc), param) from None
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise invalid(f"this model's context holds {limit} tokens (prompt + output) and the prompt has "
                          f"{len(ids)}; shorten it", param, "context_length_exceeded")
        return ids


class RequestTracker:
    """One request's answer as it fills up, and the metrics it feeds."""

    def __init__(self, state: ServerState, request: GenerationRequest, request_id: str, prompt_ids: list,
                 arrived: float):
        self.state, self.request, self.request_id, self.arrived = state, request, request_id, arrived
        self.prompt_ids = prompt_ids
        self.created = int(time.time())
        self.text, self.token_ids = "", []
        self.finish_reason: Optional[str] = None
        self.stats: dict = {}
        self._first_at: Optional[float] = None
        self._previous_at: Optional[float] = None
        state.metrics.admitted(len(prompt_ids))

    def add(self, delta: Delta) -> None:
        metrics = self.state.metrics
        self.text += delta.text
        self.token_ids += delta.token_ids
        metrics.tokens(len(delta.token_ids), delta.at, self._first_at, self._previous_at or delta.at, self.arrived)
        if delta.token_ids:
            self._first_at = self._first_at or delta.at
            self._previous_at = delta.at
        if delta.finished:
            self.finish_reason, self.stats = delta.finish_reason, delta.stats or {}
            metrics.finished(delta.finish_reason, self.arrived, delta.at, delta.stats)
            if delta.finish_reason == "error":
                log.error("request %s failed in the engine: %s", self.request_id, delta.error)

    def abort_if_unfinished(self) -> None:
        """The client went away or the engine failed: count the request as aborted."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self.state.metrics.finished("abort", self.arrived, time.perf_counter(), None)

    def usage(self) -> dict:
        return usage(len(self.prompt_ids), len(self.token_ids))

    def spec_metrics(self) -> dict:
        return spec_decode_metrics([self.stats], self.state.engine.gamma)


def internal_error(request_id: str) -> APIError:
    return APIError(500, f"the server failed while generating (request {request_id}); the server log has the "
                         "details", "internal_server_error", code="internal_error")


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


def _sse(document: dict) -> str:
    return f"data: {json.dumps(document, separators=(',', ':'))}\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events with a cleanup that runs as soon as the response ends, however it ends
    (finished, client gone, server shutting down), even if no event was ever produced."""

    def __init__(self, content, cleanup):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.cleanup()


# ----------------------------------------------------------------------------- the app
def create_app(engine, config: Optional[ServeConfig] = None, model_name: Optional[str] = None) -> FastAPI:
    """The ASGI app over `engine`. Clients must send `model` = config.served_model_name, else
    `model_name`, else "dspark"."""
    config = config or ServeConfig()
    state = ServerState(engine, config, config.served_model_name or model_name or "dspark")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One thread runs every round: each request waits in a thread of its own (bridge.py), and
        # on the CPU a round is fastest when a single thread does all the torch work.
        driver = engine.start_driver()
        task = asyncio.create_task(_log_periodically(state)) if config.log_interval > 0 else None
        try:
            yield
        finally:
            await asyncio.to_thread(driver.stop)
        if task is not None:
            task.cancel()
            line = state.metrics.log_line()
            if line:
                log.info(line)

    app = FastAPI(title="dspark", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible serving with lossless DSpark speculative decoding")
    app.state.dspark = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Unknown paths (404) and wrong methods (405) in OpenAI's error shape too."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}; the endpoints are /v1/models, " \
                  "/v1/completions, /v1/chat/completions, /health and /metrics"
        return _error_response(APIError(exc.status_code, message, kind, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        request_id = new_id(COMPLETION)
        log.error("request %s failed", request_id, exc_info=exc)
        return _error_response(internal_error(request_id))

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/") and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {config.api_key}".encode()):
            return _error_response(APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                            "authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "dspark", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(state, request, COMPLETION)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(state, request, CHAT)

    return app


async def _log_periodically(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.config.log_interval)
        line = state.metrics.log_line()
        if line:
            log.info(line)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----------------------------------------------------------------------------- one request
async def _generate(state: ServerState, http: Request, kind: str):
    """Steps 1-6 of the module docstring, for either endpoint."""
    arrived = time.perf_counter()
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    request = parse_request(body, kind)
    if request.model is not None and request.model != state.model_name:
        raise APIError(400, f"unknown model {request.model!r}; this server serves {state.model_name!r} "
                            "(see /v1/models)", "invalid_request_error", "model", "model_not_found")
    state.admit()
    request_id = new_id(kind)
    handed_over = False
    try:
        prompt_ids = await asyncio.to_thread(state.tokenize, request)
        params = request.sampling_params(len(prompt_ids), state.engine.max_model_len, state.defaults)
        stream = EngineStream(state.engine, [prompt_ids], params)
        try:
            await stream.start()
        except DSparkError as exc:              # the engine refused the input (e.g. ids outside the vocabulary)
            raise invalid(str(exc), "messages" if kind == CHAT else "prompt") from None
        except Exception:
            log.exception("request %s could not be submitted", request_id)
            raise internal_error(request_id) from None
        tracker = RequestTracker(state, request, request_id, prompt_ids, arrived)
        if request.stream:
            def cleanup():
                stream.cancel()
                tracker.abort_if_unfinished()
                state.release()

            handed_over = True                  # the event stream's cleanup releases the request
            return EventStreamResponse(_events(state, stream, tracker), cleanup)
        return await _collect(state, http, stream, tracker)
    finally:
        if not handed_over:
            state.release()


async def _collect(state: ServerState, http: Request, stream: EngineStream, tracker: RequestTracker):
    """A non-streamed response: read every delta, unless the client disconnects first."""
    async def read_all():
        async for delta in stream:
            tracker.add(delta)

    reader = asyncio.create_task(read_all())
    watcher = asyncio.create_task(_until_disconnected(http))
    try:
        done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if reader not in done:                  # the client went away: nobody reads the answer
            return Response(status_code=499)
        try:
            reader.result()
        except Exception:
            log.exception("request %s failed in the engine", tracker.request_id)
            raise internal_error(tracker.request_id) from None
        if tracker.finish_reason == "error":
            raise internal_error(tracker.request_id)
        request = tracker.request
        return JSONResponse(response(
            request.kind, tracker.request_id, state.model_name, tracker.text, tracker.finish_reason, tracker.usage(),
            tracker.spec_metrics(), token_ids=tracker.token_ids if request.return_token_ids else None,
            prompt_token_ids=tracker.prompt_ids if request.return_token_ids else None))
    finally:
        stream.cancel()
        for task in (reader, watcher):
            task.cancel()
        tracker.abort_if_unfinished()


async def _events(state: ServerState, stream: EngineStream, tracker: RequestTracker):
    """A streamed response: OpenAI chunks as server-sent events, then `data: [DONE]`.

    The last text chunk carries finish_reason. The request's metrics.speculative_decoding
    arrives once, in the closing usage chunk (choices: []) that OpenAI sends when the client
    asked for stream_options.include_usage; without it, on the chunk that carries finish_reason.
    An engine failure after the status line went out arrives as an {"error": ...} event.
    """
    request, rid, model, created = tracker.request, tracker.request_id, state.model_name, tracker.created
    kind, include_usage, with_ids = request.kind, request.include_usage, request.return_token_ids
    if kind == CHAT:                            # OpenAI opens a chat stream with the role
        yield _sse(chunk(kind, rid, model, created, role=True, include_usage=include_usage))
    try:
        async for delta in stream:
            tracker.add(delta)
            if delta.finished and delta.finish_reason == "error":
                raise internal_error(rid)
            if not (delta.text or delta.finished or (with_ids and delta.token_ids)):
                continue                        # text held back (a partial character or stop string)
            body = chunk(kind, rid, model, created, delta.text, delta.finish_reason if delta.finished else None,
                         token_ids=delta.token_ids if with_ids else None, include_usage=include_usage)
            if delta.finished and not include_usage:
                body["metrics"] = {"speculative_decoding": tracker.spec_metrics()}
            yield _sse(body)
    except APIError as exc:
        yield _sse(exc.body())
        yield "data: [DONE]\n\n"
        return
    except Exception:
        log.exception("request %s failed in the engine", rid)
        yield _sse(internal_error(rid).body())
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        yield _sse(usage_chunk(kind, rid, model, created, tracker.usage(), tracker.spec_metrics()))
    yield "data: [DONE]\n\n"


__all__ = ["ServerState", "create_app"]
