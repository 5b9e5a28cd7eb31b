"""One request's state inside the engine, and the channel its events travel back on.

A `Request` is owned by the engine loop from admission to retirement: its cache slot, how many
of its tokens are in the target cache, its anchor (the last emitted token, not yet through the
target), its output and per-round statistics. A `Call` is one `generate` / `stream` call: it
submitted some requests and receives their events, in the order the rounds produced them, on a
queue guarded by the engine's lock (whose condition wakes the call's caller). Nothing here runs a
model.
"""
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..params import SamplingParams


@dataclass
class Event:
    """What the loop tells a call: new tokens of one request, and whether it finished."""
    request: "Request"
    token_ids: list
    finished: bool = False
    error: Optional[BaseException] = None     # the loop itself failed (a bug): the call re-raises it


class Call:
    """The requests of one generate / stream call and the queue their events arrive on.
    `condition` is the engine's: every put wakes the threads waiting on it."""

    def __init__(self, condition: threading.Condition) -> None:
        self.condition = condition
        self.events: deque = deque()
        self.requests: list = []
        self.closed = False                      # the caller went away: abort what is left

    def put(self, event, force: bool = False) -> None:
        """Queue an event (dropped once the call is closed, unless forced) and wake the waiters."""
        with self.condition:
            if force or not self.closed:
                self.events.append(event)
                self.condition.notify_all()

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.requests)


@dataclass
class Request:
    index: int                   # position in its call's prompt list
    prompt_ids: list
    params: SamplingParams
    stop_ids: list
    generator: torch.Generator
    call: Call
    slot: int = -1
    num_cached: int = 0          # tokens whose K/V are in the target cache (= position of the anchor)
    anchor: int = -1             # last emitted token; not yet through the target
    output_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None  # why the request failed (finish_reason "error"), e.g. NaN logits
    text: Optional[str] = None   # set when a stop string ended the request: the output up to it
    accepted: list = field(default_factory=list)
    verify_lens: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def abandoned(self) -> bool:
        return self.call.closed and not self.finished

    def room(self, max_model_len: int) -> int:
        """Tokens this request may still emit: prompt + output never exceed the context."""
        return min(self.params.max_new_tokens, max_model_len - len(self.prompt_ids)) - len(self.output_ids)

    def fail(self, reason: str) -> None:
        self.finish_reason, self.error = "error", reason

    def stats(self, gamma: int) -> dict:
        rounds = len(self.accepted)
        by_position = []
        for k in range(1, gamma + 1):
            reached = sum(1 for a, l in zip(self.accepted, self.verify_lens) if l >= k and a >= k - 1)
            hits = sum(1 for a in self.accepted if a >= k)
            by_position.append(hits / reached if reached else None)
        return {
            "rounds": rounds,
            "accepted": list(self.accepted),
            "verify_lens": list(self.verify_lens),
            "tau": (sum(self.accepted) + rounds) / rounds if rounds else None,
            "acceptance_by_position": by_position,
        }


__all__ = ["Call", "Event", "Request"]
