"""The verify step: one target forward over the flattened [anchor, d_1 .. d_l] of every request.

Three ways to run the same step, chosen once per engine:
    eager   the step exactly as large as this round (StepBatch.from_lengths)
    static  padded to a token bucket, every request row and the whole context (filler tokens go to
            a scratch cache slot), the shape a captured graph replays; on the CPU it equals eager
    graph   the static step captured once per bucket and replayed from its static buffers
The host only needs the round's total token count to lay the step out; where each request's
tokens sit is computed on the device (see `StepBatch.from_lengths`).
"""
from dataclasses import fields
from typing import Optional

import torch

from ..models import StepBatch


class VerifyStep:
    def __init__(self, target, backend, cache, hidden_layer_ids: list, max_batch_size: int, gamma: int,
                 max_model_len: int, static: bool, graphs: bool):
        self.target, self.backend, self.cache = target, backend, cache
        self.hidden_layer_ids, self.max_batch_size = hidden_layer_ids, max_batch_size
        self.max_model_len, self.static, self.graphs = max_model_len, static or graphs, graphs
        # Query tokens one request carries (anchor + drafts), within the backend's per-request limit.
        self.query_width = backend.max_verify_len(gamma) + 1
        self.buckets = backend.token_buckets(max_batch_size * (gamma + 1))
        self.scratch_slot = max_batch_size      # a fixed-shape step parks its filler tokens here
        self._captured: dict = {}               # bucket -> (static StepBatch buffers, handle, outputs)

    def run(self, block: torch.Tensor, query_lens: torch.Tensor, starts: list, slots: list, num_tokens: int):
        """block [R, W + 1] (anchor, then the drafts); query_lens [R] (1 + verify length, on the
        device); num_tokens = sum(query_lens), known on the host.
        Returns (logits [R, W + 1, V] (rows past a request's length are zero), hidden [num_tokens, m * d]
        of the real tokens, batch) where batch.token_rows / token_offsets cover the real tokens."""
        num = block.shape[0]
        if self.static:
            bucket = next(b for b in self.buckets if b >= num_tokens)
            batch = self.static_batch(query_lens, starts, slots, num_tokens, bucket)
        else:
            # The longest query is known on the host without a sync: never wider than the block, nor
            # than 1 + every verified draft of the round (1 in a round that did not draft). Padding
            # every query to the full width made each non-drafting round's attention 8x too wide.
            width = min(self.query_width, block.shape[1], 1 + num_tokens - num)
            bucket, batch = None, StepBatch.from_lengths(query_lens, starts, slots, num_tokens, width)
        padded = torch.cat([block, block.new_zeros(batch.num_requests - num, block.shape[1])])
        batch.input_ids = padded[batch.token_rows, batch.token_offsets.clamp(max=block.shape[1] - 1)]
        out = self.replay(batch, bucket) if self.graphs else \
            self.target(batch, self.cache, self.backend, hidden_layer_ids=self.hidden_layer_ids)
        logits, hidden = out.logits[:num_tokens], out.hidden       # the real tokens come first; drop the filler
        hidden = hidden[:num_tokens] if hidden is not None else None
        batch.token_rows, batch.token_offsets = batch.token_rows[:num_tokens], batch.token_offsets[:num_tokens]
        per_request = logits.new_zeros(num, block.shape[1], logits.shape[-1])
        per_request[batch.token_rows, batch.token_offsets] = logits                 # [R, W + 1, V]
        return per_request, hidden, batch

    def static_batch(self, query_lens, starts, slots, num_tokens: int, bucket: int) -> StepBatch:
        """The fixed-shape step of `bucket` tokens (the layout every graph of that bucket has)."""
        rows = StepBatch.static_rows(bucket, self.max_batch_size, self.query_width)
        return StepBatch.static(query_lens, starts, slots, num_tokens, bucket, rows, self.scratch_slot,
                                self.max_model_len, self.query_width)

    def replay(self, batch: StepBatch, bucket: int):
        """Capture this bucket's step once (with a step whose tokens all go to the scratch slot, so
        capturing touches no request), then copy the round's batch into its buffers and replay.
        Returns copies of the outputs."""
        if bucket not in self._captured:
            empty = torch.zeros(0, dtype=torch.long, device=self.backend.device)
            buffers = self.static_batch(empty, [], [], 0, bucket)
            handle, outputs = self.backend.graph_capture(lambda: self.target(
                buffers, self.cache, self.backend, hidden_layer_ids=self.hidden_layer_ids))
            self._captured[bucket] = (buffers, handle, outputs)
        buffers, handle, outputs = self._captured[bucket]
        copy_step_tensors(buffers, batch)
        buffers.kv_lens[:] = batch.kv_lens           # the host-side buffer, in place: the graph reads this list
        self.backend.graph_replay(handle)
        return type(outputs)(logits=outputs.logits.clone(),
                             hidden=None if outputs.hidden is None else outputs.hidden.clone())

    @property
    def captured(self) -> dict:
        """bucket -> (buffers, handle, outputs) of the graphs captured so far."""
        return self._captured


def copy_step_tensors(into: StepBatch, source: StepBatch) -> None:
    """Copy every tensor field of a step into a captured step's buffers of the same shape."""
    for item in fields(StepBatch):
        value: Optional[torch.Tensor] = getattr(source, item.name)
        if isinstance(value, torch.Tensor) and isinstance(getattr(into, item.name), torch.Tensor):
            getattr(into, item.name).copy_(value)


__all__ = ["VerifyStep", "copy_step_tensors"]
