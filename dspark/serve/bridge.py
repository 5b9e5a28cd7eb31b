"""From the engine's blocking, thread-safe iterators to asyncio.

`Engine.stream` blocks its caller until the next round delivers tokens. The server runs one
asyncio event loop, so each HTTP request gets an `EngineStream`: a small thread that submits the
request, reads its events and posts them to an `asyncio.Queue` on the loop. Many such threads
feed the same engine at once; the engine's loop thread batches all their requests together
(continuous batching). Cancelling (a client that went away) sets a flag that the pump checks
after every event; it then closes the engine iterator, which drops the request at the next
round boundary and frees its slot. A request still waiting for a slot is dropped once it is
admitted (after its prefill), because the engine's iterator cannot be closed from another
thread while it is blocked.

The pump also turns token ids into text (`TextAssembler`), off the event loop, so the loop only
serialises JSON.
"""
import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..params import SamplingParams


@dataclass
class Delta:
    """What one engine event adds to one choice."""
    index: int
    token_ids: list
    text: str
    finished: bool
    finish_reason: Optional[str]
    error: Optional[str]
    stats: Optional[dict]
    at: float = field(default_factory=time.perf_counter)    # when the pump received it


class TextAssembler:
    """Incremental text of one choice, streamed so that the concatenated pieces equal the final text.

    Two things are held back until more tokens arrive: a trailing partial UTF-8 character
    (decoded as U+FFFD), and a tail that could be the start of a stop string, because the final
    text ends *before* a stop string and text already sent cannot be taken back. Example with
    stop ["\\n\\n"]: after "Hi\\n" only "Hi" is sent; if the next token is "\\n", the request stops
    and nothing more is sent; if it is "there", "\\nthere" is sent.
    """

    def __init__(self, tokenizer, stop: Optional[list]):
        self.tokenizer, self.stop = tokenizer, list(stop or [])
        self.ids: list = []
        self.sent = ""

    def add(self, token_ids: list, finished: bool, finish_reason: Optional[str]) -> str:
        self.ids += token_ids
        if self.tokenizer is None:              # an id-only model: the text is empty, ids are reported
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if finished:
            safe = self._cut_at_stop(text) if finish_reason == "stop" else text
        else:
            safe = text.rstrip("\ufffd")
            safe = safe[:len(safe) - self._stop_prefix_length(safe)]
        # Decoding is prefix-stable apart from the held-back cases, so `safe` extends what was
        # sent; if a decoder ever revises earlier text, only characters beyond it are sent.
        piece = safe[len(self.sent):]
        self.sent += piece
        return piece

    @property
    def text(self) -> str:
        return self.sent

    def _cut_at_stop(self, text: str) -> str:
        """The text before the earliest stop string (the engine ends the request right after it)."""
        hits = [text.find(s) for s in self.stop if s in text]
        return text[:min(hits)] if hits else text

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


_END = object()


class EngineStream:
    """One HTTP request's prompts in the engine, read from asyncio.

        stream = EngineStream(engine, prompt_ids, params)
        await stream.start()                 # raises what submission raised (bad input)
        async for delta in stream: ...       # Delta per choice per round; raises a loop failure
        stream.cancel()                      # the client went away
    """

    def __init__(self, engine, prompts: list, params: SamplingParams):
        self.engine, self.prompts, self.params = engine, prompts, params
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._events = None                      # the engine's Stream, once submitted
        self._thread = threading.Thread(target=self._pump, name="dspark-serve-stream", daemon=True)

    async def start(self) -> None:
        """Submit the prompts; raise the submission error (a DSparkError for bad input)."""
        self._thread.start()
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item

    def cancel(self) -> None:
        """The client went away: its requests leave the engine now, a waiting one before its prefill."""
        self._cancelled.set()
        events = self._events
        if events is not None:
            events.abort()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    # ------------------------------------------------------------------ the pump thread
    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:                     # the event loop is gone (server shut down)
            self._cancelled.set()

    def _pump(self) -> None:
        try:
            events = self._events = self.engine.stream(self.prompts, self.params)
        except BaseException as exc:             # bad input, or a bug: the handler decides which
            self._post(exc)
            return
        if self._cancelled.is_set():             # cancelled while submitting
            events.abort()
        self._post(None)
        assemblers = {i: TextAssembler(self.engine.tokenizer, self.params.stop) for i in range(len(self.prompts))}
        try:
            for event in events:
                if self._cancelled.is_set():
                    break
                text = assemblers[event.index].add(event.token_ids, event.finished, event.finish_reason)
                self._post(Delta(event.index, list(event.token_ids), text, event.finished, event.finish_reason,
                                 event.error, event.stats))
            self._post(_END)
        except BaseException as exc:             # the engine loop failed (a bug): fail this request
            self._post(exc)
        finally:
            events.close()                       # frees the slots of anything unfinished


__all__ = ["Delta", "EngineStream", "TextAssembler"]
