"""Measuring a device's cost model: `dspark calibrate`.

Times the real target forward over flattened verify batches of B tokens at a few
context lengths, and the draft round for R requests, on the engine's backend
(median of repeats after a warm-up), and returns a measured `CostModel`.
"""
import statistics
import time
from datetime import date
from typing import Callable, Optional, Sequence

import torch

from ..models import StepBatch
from ..scheduling.cost_model import CostModel


def _median_time(backend, fn, repeats: int) -> float:
    fn()                                   # warm-up (allocations, lazy init)
    backend.synchronize()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        backend.synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _token_grid(max_tokens: int) -> list:
    grid, b = [], 1
    while b < max_tokens:
        grid.append(b)
        b *= 2
    return grid + [max_tokens]


def profile_engine(engine, context_lens: Sequence[int] = (64, 256), max_tokens: Optional[int] = None,
                   repeats: int = 5, progress: Callable[[str], None] = lambda message: None) -> CostModel:
    backend, target, draft = engine.backend, engine.target, engine.draft
    slots = engine.config.max_batch_size
    gamma = max(engine.gamma, 1)
    max_tokens = max_tokens or slots * (gamma + 1)
    context_lens = [c for c in context_lens if c + max_tokens // slots + gamma + 1 < engine.max_model_len] \
        or [max(1, engine.max_model_len // 4)]
    grid = _token_grid(max_tokens)
    vocab = target.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    steps = len(context_lens) * len(grid) + (len(_token_grid(slots)) if draft is not None else 0)
    done = 0

    verify_seconds = []
    for context in context_lens:
        row = []
        for tokens in grid:
            requests = min(slots, tokens)
            lens = [tokens // requests + (1 if i < tokens % requests else 0) for i in range(requests)]
            ids = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lens]
            batch = StepBatch.build(ids, [context] * requests, list(range(requests)), backend.device)
            seconds = _median_time(backend, lambda: target(batch, engine.target_cache, backend,
                                                           hidden_layer_ids=engine.hidden_layer_ids), repeats)
            row.append(seconds)
            done += 1
            progress(f"[{done}/{steps}] verify B={tokens:<4d} context={context:<5d} {seconds * 1e3:8.2f} ms")
        verify_seconds.append(row)

    draft_requests, draft_seconds = [1], [0.0]
    if draft is not None:
        draft_requests, draft_seconds = _token_grid(slots), []
        for requests in draft_requests:
            anchors = torch.randint(0, vocab, (requests,), generator=generator).to(backend.device)
            starts = torch.full((requests,), context_lens[0], dtype=torch.long, device=backend.device)
            slot_ids = torch.arange(requests, device=backend.device)
            zeros = torch.zeros(requests, device=backend.device)
            uniforms = torch.rand(requests, engine.gamma, generator=generator).to(backend.device)
            seconds = _median_time(backend, lambda: draft.propose(
                anchors, starts, slot_ids, engine.draft_cache, backend, uniforms, zeros,
                torch.zeros(requests, dtype=torch.long, device=backend.device), torch.ones(requests,
                                                                                           device=backend.device),
                all_greedy=True, filtered=False), repeats)
            draft_seconds.append(seconds)
            done += 1
            progress(f"[{done}/{steps}] draft  R={requests:<4d} {seconds * 1e3:8.2f} ms")

    return CostModel(device=backend.device_prior(), source="measured", verify_tokens=grid,
                     context_lens=list(context_lens), verify_seconds=verify_seconds, draft_requests=draft_requests,
                     draft_seconds=draft_seconds,
                     max_query_tokens_per_request=backend.max_query_tokens_per_request,
                     meta={"backend": backend.name, "dtype": str(engine.dtype).replace("torch.", ""),
                           "gamma": engine.gamma, "max_batch_size": slots, "repeats": repeats,
                           "date": date.today().isoformat(), "torch": str(torch.__version__)})
