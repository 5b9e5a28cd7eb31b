"""Measuring a device's cost model: `dspark calibrate`, the offline run of the online estimator.

A serving engine learns its step times from the rounds it runs (dspark.scheduling.online_cost).
Calibrating is the same estimator fed on purpose: the engine decodes random prompts at a grid
of request counts R, verify lengths l (a fixed schedule, so B = R (l + 1) verify tokens) and
context lengths, `repeats` rounds or more per point, and its own OnlineCostModel times every
round exactly as it does while serving (the draft's share from the backend's step timer, the
rest of the round from its wall time). What it learned is returned as a measured `CostModel`
for `--cost-profile`; an engine started from it keeps refining it online.

Unlike timing the target's forward alone, this prices what a round really costs: sampling,
verification, the draft's context update and the host's bookkeeping, per request and per token.
"""
from contextlib import contextmanager
from datetime import date
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError
from ..params import SamplingParams
from ..scheduling.cost_model import CostModel
from ..scheduling.online_cost import OnlineCostModel


def _token_grid(max_tokens: int) -> list:
    grid, b = [], 1
    while b < max_tokens:
        grid.append(b)
        b *= 2
    return grid + [max_tokens]


def _verify_lengths(gamma: int) -> list:
    """0 (plain decoding's step), 1, about half the block and the whole block."""
    return sorted({0, min(1, gamma), gamma // 2, gamma})


@contextmanager
def _driven(engine, model: OnlineCostModel):
    """The engine runs a fixed schedule and learns into `model` for the duration."""
    planner = engine.planner
    saved = engine.cost_model, planner.mode, planner.verify_len
    engine.cost_model = model
    planner.use_cost_model(model)
    planner.mode = "fixed"
    try:
        yield planner
    finally:
        engine.cost_model, planner.mode, planner.verify_len = saved
        planner.use_cost_model(saved[0])


DEFAULT_CONTEXT_LENS = (64, 256)


def profile_engine(engine, context_lens: Optional[Sequence[int]] = None, max_tokens: Optional[int] = None,
                   repeats: int = 5, progress: Callable[[str], None] = lambda message: None,
                   requests: Optional[Sequence[int]] = None, verify_lens: Optional[Sequence[int]] = None) -> CostModel:
    """Drive `engine` over the grid and return what its online cost model learned.

    context_lens  context buckets (prompts are sized to land in each); they become the profile's
                  (default: those of 64 and 256 that fit the engine's context, else half of it;
                  given ones that do not fit are refused)
    requests      request counts R (default: powers of two up to max_batch_size)
    verify_lens   drafted tokens verified per request (default: 0, 1, gamma / 2, gamma)
    repeats       rounds per grid point, at least (a round emitting fewer tokens adds rounds)
    max_tokens    largest verify-token count in the exported table (default: R_max (gamma + 1))
    """
    slots, gamma = engine.config.max_batch_size, engine.gamma
    requests = sorted(requests or _token_grid(slots))
    if requests[-1] > slots:
        raise ConfigError(f"cannot calibrate {requests[-1]} requests on an engine with max_batch_size {slots}")
    lengths = sorted(verify_lens or _verify_lengths(gamma)) if engine.draft is not None else [0]
    budget = max(1, repeats) * (lengths[-1] + 1) + 1           # new tokens per request at the longest l
    largest = engine.max_model_len - budget - 2                # a context that still leaves room to decode
    if context_lens is None:
        context_lens = [c for c in DEFAULT_CONTEXT_LENS if c <= largest] or [max(2, largest // 2)]
    too_long = sorted(c for c in context_lens if c > largest)
    if too_long:
        raise ConfigError(f"context length(s) {', '.join(map(str, too_long))} do not fit: with max_model_len "
                          f"{engine.max_model_len} and {budget} tokens decoded per grid point, the largest context "
                          f"that can be profiled is {largest}; pass smaller --context-lens or a larger --max-model-len")
    context_lens = sorted(set(context_lens))
    prior = engine.planner.cost.prior if isinstance(engine.planner.cost, OnlineCostModel) else engine.planner.cost
    model = OnlineCostModel(prior, token_buckets=engine.verify_step.buckets if engine.static else None,
                            context_lens=context_lens)
    generator, vocab = torch.Generator().manual_seed(0), engine.target.config.vocab_size
    points = [(c, r, l) for c in context_lens for r in requests for l in lengths]
    with _driven(engine, model) as planner:
        for done, (context, count, length) in enumerate(points, 1):
            new_tokens = max(1, repeats) * (length + 1) + 1
            lower = next((b for b in reversed(context_lens) if b < context), 0)
            prompt_len = min(max(1, context - new_tokens, lower + 1), engine.max_model_len - new_tokens - 1)
            prompts = [torch.randint(0, vocab, (prompt_len,), generator=generator).tolist() for _ in range(count)]
            planner.verify_len = length
            engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            tokens = count * (length + 1)
            progress(f"[{done}/{len(points)}] verify B={tokens:<4d} (R={count}, l={length}) context={context:<5d} "
                     f"{model.verify_time(tokens, context, count) * 1e3:8.2f} ms" +
                     (f"   draft {model.draft_time(count) * 1e3:7.2f} ms" if engine.draft is not None else ""))
    profile = model.to_cost_model(verify_tokens=_token_grid(max_tokens or requests[-1] * (gamma + 1)),
                                  draft_requests=requests if engine.draft is not None else [1])
    if engine.draft is None:
        profile.draft_seconds = [0.0]
    profile.device = engine.backend.device_prior()
    profile.meta.update(backend=engine.backend.name, dtype=str(engine.dtype).replace("torch.", ""), gamma=gamma,
                        max_batch_size=slots, repeats=repeats, date=date.today().isoformat(),
                        torch=str(torch.__version__), requests=list(requests), verify_lens=list(lengths))
    return profile


__all__ = ["profile_engine"]
