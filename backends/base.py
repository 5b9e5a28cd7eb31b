"""The Backend interface: every device fact and device choice in one class.

Generic code (models, engine, scheduler) never names a device. It asks the
backend: which torch device, which default dtype, whether graphs are
supported, how many query tokens one request may verify in a forward, how to
synchronise, and which implementation of the draft / verify / schedule
operations to run. The base class implements the operations with the pure
reference functions in `dspark.ops`; a device backend overrides what it can
do faster and the conformance suite checks it against these.
"""
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import BackendUnavailableError, ConfigError
from .devices import query_limit


class Backend:
    # --- device facts (class attributes, overridden per device) ---
    name: str = "base"
    device_type: str = "cpu"
    default_dtype: torch.dtype = torch.float32
    supports_graphs: bool = False
    # The DeviceSpecs (backends/devices.py) this backend runs as; `device_prior` picks one.
    device_specs: tuple = ("cpu",)
    # Query tokens one request may carry in a single verify forward (anchor included), from the
    # device specs; None = unlimited.
    max_query_tokens_per_request: Optional[int] = query_limit(*device_specs)
    # torch.distributed backend for multi-process training on this device.
    collective_backend: str = "gloo"

    def __init__(self, device_index: int = 0):
        self.device = torch.device(self.device_type, device_index) if self.device_type != "cpu" \
            else torch.device("cpu")
        # Device -> host copies made through `to_host` (the engine reports them per round).
        self.host_syncs = 0

    # --- detection (must not initialise a device) ---
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None when this backend can run here, else what is missing and how to fix it."""
        return None

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    # --- synchronisation and transfers ---
    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def to_host(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The one device -> host copy of a round: all tensors the host needs, together."""
        self.host_syncs += 1
        return tuple(t.to("cpu") for t in tensors)

    def step_timer(self) -> "HostTimer":
        """A fresh timer for one engine round: `mark(name)` at points of the round, later
        `seconds(start, end)`. The reference takes host timestamps, exact where every op runs
        synchronously (the CPU); device backends record events on their stream instead, read
        only once they have completed, so timing adds no synchronisation."""
        return HostTimer()

    def device_prior(self) -> str:
        """Which of `device_specs` this device is (the analytic cost-model prior's name)."""
        return "cpu"

    def token_buckets(self, max_tokens: int) -> list:
        """Verify-token counts a fixed-shape step is padded to (graph capture sizes)."""
        buckets, size = [], 1
        while size < max_tokens:
            buckets.append(size)
            size *= 2
        return buckets + [max_tokens]

    def max_verify_len(self, gamma: int) -> int:
        """Largest number of drafted tokens a request may verify (the anchor takes one query slot)."""
        if self.max_query_tokens_per_request is None:
            return gamma
        return min(gamma, self.max_query_tokens_per_request - 1)

    # --- graphs: capture a fixed-shape step once, replay it with new buffer contents ---
    def graph_capture(self, fn):
        """Run `fn` (which reads only preallocated input buffers) as a capturable step and return
        (handle, outputs). Replaying the handle recomputes into the *same* output tensors.
        The reference implementation records the step and reruns it eagerly on replay, which
        keeps graph semantics (static buffers in, the same tensors out) testable on any machine;
        device backends override it with their graph API."""
        fn()                                     # warm-up, as device graphs need
        outputs = fn()
        return _RecordedGraph(fn, outputs), outputs

    def graph_replay(self, handle) -> None:
        """Replay a captured step. A captured step reads its inputs where it was captured: device
        tensors by address, and host-side arguments (a StepBatch's `kv_lens` list) by reference,
        so a backend whose graphs bake host values into kernels (Ascend's fused attention) re-reads
        those lists here and pushes them into the graph before replaying."""
        handle.replay()

    def memory_limit(self) -> Optional[int]:
        """Bytes a new allocation can count on (free device memory; the CPU's available RAM), or
        None when unknown. The engine checks its caches against it before allocating them."""
        return None

    def release_host_threads(self) -> bool:
        """Give back the host worker threads this thread keeps for torch ops (its OpenMP team), when
        it is about to leave all torch work to another thread (a server's main thread, once the
        model is loaded). Returns whether anything was released. Nothing to do by default."""
        return False

    # --- kernels used by the models ---
    def inference_linear(self, weights: list, biases: list):
        """A faster kernel for frozen linears that read the same input, or None (use F.linear):
        y = x @ cat(weights).T + cat(biases), a bias None counting as zeros. Returned as a callable
        over 2-D inputs [M, in] -> [M, sum of out]; one weight is a plain linear. Models install
        it with `dspark.models.layers.prepare_for_inference` (a group of weights for the Linears a
        module lists in `linear_groups`) and drop it whenever a weight changes."""
        return None

    def attention(
        self,
        query: torch.Tensor,  # [R, H, Q, D]
        key: torch.Tensor,    # [R, KVH, K, D]
        value: torch.Tensor,  # [R, KVH, K, D]
        mask: torch.Tensor,   # [R, 1, Q, K] bool, True = may attend
        scale: float,
        kv_lens: Optional[list] = None,
    ) -> torch.Tensor:        # [R, H, Q, D]
        """Attention of R padded query blocks over their keys. The mask is authoritative.
        `kv_lens` (optional, host-side ints, one per row) promises that row r attends no key at
        index >= kv_lens[r] (values past K are clamped), so a kernel may skip those keys. Pass
        the step's own list (StepBatch.kv_lens), not a copy: a captured graph re-reads it at
        each replay. The reference ignores it."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                              enable_gqa=query.shape[1] != key.shape[1])

    # --- the operator interface (reference implementations) ---
    def sampling_probs(self, logits, temperature, top_k, top_p, **hints):
        return ops.sampling_probs(logits, temperature, top_k, top_p, **hints)

    def sample(self, probs, uniforms):
        return ops.sample_from_probs(probs, uniforms)

    def draft(self, base_logits, anchor_ids, uniforms, temperature, top_k, top_p, transition=None, token_ids=None,
              **hints):
        return ops.sample_draft_block(base_logits, anchor_ids, uniforms, temperature, top_k, top_p, transition,
                                      token_ids, **hints)

    def verify(self, draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms, sample_uniforms):
        return ops.verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms, sample_uniforms)

    def verify_greedy(self, draft_tokens, target_logits, verify_lens):
        """`verify` when every request is greedy, from the target's logits (argmaxes only)."""
        return ops.verify_greedy(draft_tokens, target_logits, verify_lens)

    # Verify-length schedulers (the planner in dspark.scheduling decides which one a round runs).
    def schedule_threshold(self, confidence, threshold: float):
        return ops.schedule_threshold(confidence, threshold)

    def schedule_causal(self, confidence, sps, caps=None):
        return ops.schedule_causal(confidence, sps, caps)

    def schedule_topk(self, confidence, budget: int, caps=None):
        return ops.schedule_topk(confidence, budget, caps)

    # --- reporting ---
    def describe(self) -> dict:
        return {
            "name": self.name,
            "device": str(self.device),
            "default_dtype": str(self.default_dtype).replace("torch.", ""),
            "supports_graphs": self.supports_graphs,
            "max_query_tokens_per_request": self.max_query_tokens_per_request,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


class HostTimer:
    """Host timestamps at named marks."""

    def __init__(self) -> None:
        self._marks: dict = {}

    def mark(self, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def seconds(self, start: str, end: str) -> Optional[float]:
        """Seconds from mark `start` to mark `end`; None if either was never marked."""
        if start not in self._marks or end not in self._marks:
            return None
        return self._marks[end] - self._marks[start]


class EventTimer(HostTimer):
    """Device events at named marks (`make_event()` returns an event created with timing on).
    `seconds` returns None until the end event has completed: callers retry after a later
    synchronisation that happens anyway (the round's device -> host copy) instead of waiting."""

    def __init__(self, make_event: Callable) -> None:
        super().__init__()
        self._make_event = make_event

    def mark(self, name: str) -> None:
        event = self._make_event()
        event.record()
        self._marks[name] = event

    def seconds(self, start: str, end: str) -> Optional[float]:
        first, last = self._marks.get(start), self._marks.get(end)
        if first is None or last is None or not last.query():
            return None
        return first.elapsed_time(last) / 1000.0          # events measure milliseconds


class _RecordedGraph:
    """Replay = run the step again and write its results into the outputs captured first."""

    def __init__(self, fn, outputs):
        self.fn, self.outputs = fn, outputs

    def replay(self) -> None:
        fresh = self.fn()
        for name in ("logits", "hidden", "last_hidden"):
            target, value = getattr(self.outputs, name, None), getattr(fresh, name, None)
            if target is not None and value is not None:
                target.copy_(value)
