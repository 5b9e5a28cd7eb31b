"""Prompts: the one reader of prompt files, and prompts -> token ids through the chat template.

A prompt file is JSON lines, each in one of the shapes under ../shared/data/:
    {"turns": [str, ...]}               (eval sets; the first turn is the prompt)
    {"question": str, ...}              (GSM8K-style)
    {"prompt": str, ...}                (instruction data)
    {"messages": [{"role", "content"}, ...]}   (a chat)
    {"prompt_ids": [int, ...]}          (token ids: targets without a tokenizer)
Errors name the file and the line.
"""
import json
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import DataError

Messages = Sequence[dict]


def read_prompts(path, limit: Optional[int] = None) -> list:
    """-> [{"id", "where", "prompt"} | {... "prompt_ids"} | {... "messages"}], in file order
    ("where" is "file:line", for later errors about that prompt); `limit` keeps the first N (N >= 1)."""
    path = Path(path).expanduser()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive number of prompts, got {limit!r}")
    if path.exists() and not path.is_file():
        raise DataError(f"prompt file {str(path)!r} is not a regular file; give a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompt file {str(path)!r}: {exc}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        where = f"{path}:{number}"
        prompts.append({"id": len(prompts), "where": where, **_prompt_of(record, where)})
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def _prompt_of(record, where: str) -> dict:
    if isinstance(record, dict):
        if "prompt_ids" in record:
            ids = record["prompt_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in ids):
                raise DataError(f"{where}: prompt_ids must be a non-empty list of integers")
            return {"prompt_ids": list(ids)}
        if "messages" in record:
            return {"messages": check_messages(record["messages"], where)}
        turns = record.get("turns")
        text = turns[0] if isinstance(turns, list) and turns else record.get("question", record.get("prompt"))
        if isinstance(text, str) and text.strip():
            return {"prompt": text}
    raise DataError(f'{where}: expected an object with "turns", "question", "prompt", "messages" or "prompt_ids"')


def check_messages(messages, where: str = "messages") -> list:
    """A chat: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f'{where}: a chat must be a non-empty list of {{"role": str, "content": str}}')
    return [dict(m) for m in messages]


def is_chat(prompt) -> bool:
    """Whether a prompt is a chat (a list of role / content messages) rather than text or ids."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def chat_ids(messages: Messages, tokenizer) -> list:
    """Token ids of a chat through the tokenizer's chat template, ready for the assistant's turn."""
    if tokenizer is None:
        raise DataError("chat messages need a tokenizer in the target directory")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat messages need a tokenizer with a chat template; this target's tokenizer has none")
    text = tokenizer.apply_chat_template(check_messages(messages), add_generation_prompt=True, tokenize=False)
    # The template already holds any special tokens; don't let encode() add a second BOS.
    return list(tokenizer.encode(text, add_special_tokens=False))


def prompt_ids(record: Union[dict, str], tokenizer) -> list:
    """Token ids of a prompt record (or a text): text goes through the chat template when the
    tokenizer has one, as a single user turn."""
    if isinstance(record, str):
        record = {"prompt": record}
    if "prompt_ids" in record:
        return list(record["prompt_ids"])
    if "messages" in record:
        return chat_ids(record["messages"], tokenizer)
    if tokenizer is None:
        raise DataError("text prompts need a tokenizer in the target directory; use {\"prompt_ids\": [...]}")
    if getattr(tokenizer, "chat_template", None):
        return chat_ids([{"role": "user", "content": record["prompt"]}], tokenizer)
    return list(tokenizer.encode(record["prompt"]))


__all__ = ["chat_ids", "check_messages", "is_chat", "prompt_ids", "read_prompts"]
