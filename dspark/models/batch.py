"""The description of one flattened, variable-length forward, and the static KV cache.

A step packs the tokens of R requests into one flat sequence of N tokens:
request r contributes query_lens[r] consecutive positions starting at
start_positions[r] (its current cache length). Prefill (a whole prompt),
plain decode (1 token) and verification (anchor + l drafts) are the same
shape of work, so one forward serves them all, with no loop over requests.

Example: requests with cache lengths [5, 9] verifying 3 and 1 tokens:
    input_ids     = [a0 a1 a2 | b0]        (N = 4)
    positions     = [5  6  7  | 9]
    token_rows    = [0  0  0  | 1]
    token_offsets = [0  1  2  | 0]
    cu_query_lens = [0, 3, 4]
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class StepBatch:
    input_ids: torch.Tensor      # [N] long
    positions: torch.Tensor      # [N] long, absolute position of each token
    token_rows: torch.Tensor     # [N] long, request row (0..R-1) of each token
    token_offsets: torch.Tensor  # [N] long, index of the token inside its request's query
    token_slots: torch.Tensor    # [N] long, KV-cache slot of each token
    slots: torch.Tensor          # [R] long, KV-cache slot of each request
    start_positions: torch.Tensor  # [R] long, cache length before this step
    query_lens: torch.Tensor     # [R] long
    cu_query_lens: torch.Tensor  # [R + 1] long, offsets of each request in the flat batch
    max_query_len: int
    max_kv_len: int              # max over requests of start + query_len (an upper bound is fine)
    # (first, stop) when the requests occupy consecutive cache slots in order: the cache can
    # then hand out a view instead of gathering (known on the host when the batch is built).
    slot_range: Optional[tuple] = None
    # Host-side, one int per request row: an upper bound on the keys the row attends
    # (start + max_query_len), so an attention kernel may skip the rest of the cache
    # (Backend.attention's kv_lens). In a captured graph's static buffers this list is a host
    # buffer: the engine overwrites it in place before each replay, like the device buffers.
    kv_lens: Optional[list] = None
    # (first, stop) of a slot span that holds every request's slot (distinct slots, few gaps):
    # attention then reads the span as one view and places request r at row kv_rows[r] of it,
    # instead of gathering the requests' keys (a copy of every layer's cache each step). Rows
    # of the span that belong to no request compute throw-away outputs.
    kv_span: Optional[tuple] = None
    kv_rows: Optional[torch.Tensor] = None   # [R] long, row of each request inside kv_span

    @property
    def num_requests(self) -> int:
        return self.slots.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def last_token_indices(self) -> torch.Tensor:
        """[R] flat index of each request's last token (where prefill reads its logits)."""
        return self.cu_query_lens[1:] - 1

    @classmethod
    def build(cls, token_lists: Sequence[Sequence[int]], start_positions: Sequence[int],
              slots: Sequence[int], device: torch.device) -> "StepBatch":
        assert len(token_lists) == len(start_positions) == len(slots)
        query_lens = [len(tokens) for tokens in token_lists]
        assert all(n > 0 for n in query_lens), "every request in a step needs at least one token"
        flat, positions, rows, offsets, token_slots = [], [], [], [], []
        for row, (tokens, start, slot) in enumerate(zip(token_lists, start_positions, slots)):
            flat.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            rows.extend([row] * len(tokens))
            offsets.extend(range(len(tokens)))
            token_slots.extend([slot] * len(tokens))
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            input_ids=tensor(flat), positions=tensor(positions), token_rows=tensor(rows),
            token_offsets=tensor(offsets), token_slots=tensor(token_slots), slots=tensor(list(slots)),
            start_positions=tensor(list(start_positions)), query_lens=tensor(query_lens), cu_query_lens=tensor(cu),
            max_query_len=max(query_lens),
            max_kv_len=max(s + n for s, n in zip(start_positions, query_lens)),
            slot_range=consecutive_range(slots),
            kv_lens=[s + n for s, n in zip(start_positions, query_lens)],
            **slot_span(slots, device),
        )

    @classmethod
    def from_lengths(cls, query_lens: torch.Tensor, start_positions: Sequence[int], slots: Sequence[int],
                     num_tokens: int, max_query_len: int) -> "StepBatch":
        """Lay out a step from per-request query lengths that live on the device.

        Only the total `num_tokens` and an upper bound on one request's query length must
        be known on the host, so the layout needs no device -> host copy: this is how a
        round whose verify lengths were chosen on the device (budget mode) is built.
        input_ids is left for the caller to fill (it is [num_tokens], zeros).
        """
        device = query_lens.device
        num_requests = query_lens.shape[0]
        starts = torch.tensor(list(start_positions), dtype=torch.long, device=device)
        slot_tensor = torch.tensor(list(slots), dtype=torch.long, device=device)
        cu = torch.cat([query_lens.new_zeros(1), query_lens.cumsum(0)])
        rows = torch.repeat_interleave(torch.arange(num_requests, device=device), query_lens, output_size=num_tokens)
        offsets = torch.arange(num_tokens, device=device) - cu[rows]
        return cls(
            input_ids=torch.zeros(num_tokens, dtype=torch.long, device=device), positions=starts[rows] + offsets,
            token_rows=rows, token_offsets=offsets, token_slots=slot_tensor[rows], slots=slot_tensor,
            start_positions=starts, query_lens=query_lens, cu_query_lens=cu, max_query_len=max_query_len,
            max_kv_len=max(start_positions) + max_query_len, slot_range=consecutive_range(slots),
            kv_lens=[s + max_query_len for s in start_positions], **slot_span(slots, device),
        )

    @classmethod
    def static(cls, query_lens: torch.Tensor, start_positions: Sequence[int], slots: Sequence[int],
               num_tokens: int, bucket: int, num_rows: int, scratch_slot: int, kv_len: int,
               max_query_len: Optional[int] = None) -> "StepBatch":
        """The fixed-shape form of a step, as a captured graph replays it: `bucket` tokens (the real
        `num_tokens` first, then filler), `num_rows` request rows (the real ones, then empty rows,
        then the rows that own the filler), every query padded to `max_query_len` (default and at
        most `bucket`), keys read over `kv_len` positions. Filler tokens are spread over the last
        rows, at most `max_query_len` each (so a backend's per-request query limit also holds for
        them); they write only into `scratch_slot` and attend only there, so real requests compute
        exactly what they compute unpadded. `static_rows` gives a `num_rows` that always fits."""
        real = query_lens.shape[0]
        width = min(bucket, max_query_len or bucket)
        filler = bucket - num_tokens
        fill = [width] * (filler // width) + ([filler % width] if filler % width else [])
        assert bucket >= num_tokens and num_rows >= real + len(fill), (num_rows, real, bucket, num_tokens, width)
        filler_lens = query_lens.new_full((len(fill),), width)        # device fills, no host -> device copy
        if filler % width:
            filler_lens[-1:].fill_(filler % width)
        lens = torch.cat([query_lens, query_lens.new_zeros(num_rows - real - len(fill)), filler_lens])
        starts = list(start_positions) + [0] * (num_rows - real)
        slot_list = list(slots) + [scratch_slot] * (num_rows - real)
        batch = cls.from_lengths(lens, starts, slot_list, bucket, width)
        batch.max_kv_len, batch.slot_range, batch.kv_span, batch.kv_rows = kv_len, None, None, None
        batch.kv_lens = [min(n, kv_len) for n in batch.kv_lens]
        return batch

    @staticmethod
    def static_rows(bucket: int, max_requests: int, max_query_len: int) -> int:
        """Rows of the fixed-shape step for `bucket` tokens: enough for any `max_requests` real
        requests (each at least one token) plus the filler rows, at most `max_query_len` per row."""
        real = min(max_requests, bucket)
        return real + -(-(bucket - real) // max_query_len)

    @classmethod
    def make_dummy(cls, num_requests: int, query_len: int, start: int, device: torch.device) -> "StepBatch":
        """A batch of R requests with `query_len` zero tokens each at `start` (warm-up, tests)."""
        return cls.build([[0] * query_len] * num_requests, [start] * num_requests, list(range(num_requests)), device)


def consecutive_range(slots: Sequence[int]) -> Optional[tuple]:
    slots = list(slots)
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slots[0], slots[0] + len(slots)
    return None


def slot_span(slots: Sequence[int], device) -> dict:
    """kv_span / kv_rows for distinct slots whose span is at most twice their number (plus 8):
    reading the span as a view beats gathering. Example: slots [4, 2, 3] -> span (2, 5),
    rows [2, 0, 1]. Empty dict (gather) otherwise."""
    slots = list(slots)
    if not slots or len(set(slots)) != len(slots):
        return {}
    first, stop = min(slots), max(slots) + 1
    if stop - first > 2 * len(slots) + 8:
        return {}
    return {"kv_span": (first, stop),
            "kv_rows": torch.tensor([s - first for s in slots], dtype=torch.long, device=device)}


class KVCache:
    """Preallocated keys and values for `num_slots` requests of up to `max_len` positions.

    The cache stores no lengths of its own: a request's length is a number the
    engine keeps. Rolling back rejected tokens means not advancing that number;
    the stale entries past it are overwritten by the next step and are never
    attended to, because a query at position p only sees keys at positions <= p.

    Storage is head-major, [layer, slot, KV head, position, head dim]: attention reads each
    head's keys as one contiguous run ([R, KVH, L, D] after the models' transpose). On the CPU
    that took a quarter off decode attention at 64 requests, with bitwise the same output
    (docs/BENCHMARKS.md); Ascend's fused kernel takes it as BNSD.
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.num_slots = num_slots

    def write(self, layer: int, token_slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, KVH, D] written at (token_slots[i], positions[i])."""
        self.k[layer, token_slots, :, positions] = k.to(self.k.dtype)
        self.v[layer, token_slots, :, positions] = v.to(self.v.dtype)

    def read(self, layer: int, slots: torch.Tensor, length: int,
             slot_range: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) for each slot: 2 x [R, length, KVH, D]
        (transposed views of the head-major store). With `slot_range` (consecutive slots) they
        are views of the cache; otherwise only the needed positions are gathered (slice first,
        then select slots)."""
        if slot_range is not None:
            first, stop = slot_range
            keys, values = self.k[layer, first:stop, :, :length], self.v[layer, first:stop, :, :length]
        else:
            keys = self.k[layer, :, :, :length].index_select(0, slots)
            values = self.v[layer, :, :, :length].index_select(0, slots)
        return keys.transpose(1, 2), values.transpose(1, 2)
