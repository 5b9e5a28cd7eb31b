"""Verify-length schedulers: how many drafted tokens each request sends to the target.

Modes:
    fixed      every request verifies min(length, gamma) drafts.
    threshold  verify while prefix survival a_j stays >= a static threshold.
    causal     the hardware-aware prefix scheduler, paper Algorithm 1: admit candidates
               (r, j) in order of survival a_{r,j} while the expected throughput
               Theta = tau * SPS(B) improves, and stop at the first non-improvement.
    budget     the production / zero-overhead variant (paper §5.2): a token budget K is
               chosen by a global search over survivals of an *earlier* round, then the
               current round admits the global top-K by current survival.

Why these are lossless (paper §3.2.2, Appendix A): c_k depends on x_0..x_{k-1} but never
on x_k, so a decision to verify position j must use nothing that depends on x_j. Sorting
puts (r, j) after (r, j - 1) (survival never increases along a block; ties break by
position), so in `causal` the walk up to (r, j) sees only entries that rank above it,
and in `budget` the rank of (r, j) depends only on other requests and r's earlier
positions, while K comes from history. A retrospective global search over *current*
survivals would look at a_{r,j+1}, which depends on x_{r,j}: that leaks the token into
its own admission and biases the output (the test suite reproduces the paper's example).

Which mode runs is decided in one place, dspark.scheduling.planner; these are its primitives.
`sps` is a 1-D tensor: sps[B] = engine steps per second for a verify forward of B tokens
(B counts every request's anchor); entries past its end count as 0 (not affordable).
"""
from typing import Optional

import numpy as np
import torch

SCHEDULE_MODES = ("fixed", "threshold", "causal", "budget")


def survival(confidence: torch.Tensor) -> torch.Tensor:
    """a_{r,j} = prod_{i <= j} c_{r,i}: probability the prefix up to j survives. [R, gamma] -> [R, gamma]."""
    return confidence.float().cumprod(dim=-1)


def _caps(num_requests: int, gamma: int, caps: Optional[torch.Tensor], device) -> torch.Tensor:
    if caps is None:
        return torch.full((num_requests,), gamma, dtype=torch.long, device=device)
    return caps.clamp(0, gamma)


def schedule_fixed(num_requests: int, gamma: int, length: int, device=None) -> torch.Tensor:
    """Every request verifies min(length, gamma) drafted tokens. -> [R] long."""
    if length < 0:
        raise ValueError(f"fixed verify length must be >= 0, got {length}")
    return torch.full((num_requests,), min(length, gamma), dtype=torch.long, device=device)


def schedule_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Verify the longest prefix whose survival a_j stays >= threshold. [R, gamma] -> [R] long."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"confidence threshold must be in [0, 1], got {threshold}")
    keep = survival(confidence) >= threshold
    return keep.long().cumprod(dim=-1).sum(dim=-1)


def ranked_candidates(survival_values: torch.Tensor, caps: torch.Tensor):
    """All admissible (r, j) sorted by survival, descending; ties by (r, j) (value-independent).

    Returns (values [M], rows [M], num_valid) where entries past num_valid are not
    admissible (j beyond the request's cap). Survival never increases along a row, so
    each request's admitted entries always form a prefix."""
    num_requests, gamma = survival_values.shape
    positions = torch.arange(gamma, device=survival_values.device)
    valid = positions.unsqueeze(0) < caps.unsqueeze(1)                            # [R, gamma]
    keyed = torch.where(valid, survival_values, torch.full_like(survival_values, -1.0)).flatten()
    values, order = keyed.sort(descending=True, stable=True)                     # row-major ties -> (r, j)
    return values, order // gamma, valid.sum()


def throughput_path(values: torch.Tensor, num_requests: int, sps: torch.Tensor) -> torch.Tensor:
    """Theta_m = (R + sum of the first m survivals) * SPS(R + m), for m = 0..M. -> [M + 1]."""
    tau = num_requests + torch.cat([values.new_zeros(1), values.clamp(min=0).cumsum(0)])
    batch = num_requests + torch.arange(values.numel() + 1, device=values.device)
    padded = torch.cat([sps.float(), sps.new_zeros(1).float()])
    rate = padded[batch.clamp(max=padded.numel() - 1)]
    return tau * rate


def _lengths_from_admitted(rows: torch.Tensor, admitted: torch.Tensor, num_requests: int) -> torch.Tensor:
    return torch.zeros(num_requests, dtype=torch.long, device=rows.device).scatter_add_(0, rows, admitted.long())


def schedule_causal(
    confidence: torch.Tensor,      # [R, gamma] conditional confidences c_{r,j}
    sps: torch.Tensor,             # [B_max + 1] steps per second by verify tokens
    caps: Optional[torch.Tensor] = None,  # [R] most drafts each request may verify
) -> torch.Tensor:                 # [R] long
    """Paper Algorithm 1 with its early break: admit in survival order while Theta strictly improves."""
    num_requests, gamma = confidence.shape
    values, rows, num_valid = ranked_candidates(survival(confidence), _caps(num_requests, gamma, caps,
                                                                            confidence.device))
    theta = throughput_path(values, num_requests, sps)
    positive = torch.arange(values.numel(), device=values.device) < num_valid
    positive &= values > 0                                   # Algorithm 1 line 4: only a_{r,j} > 0
    improves = (theta[1:] > theta[:-1]) & positive
    admitted = improves.long().cumprod(0).bool()             # stop at the first non-improvement
    return _lengths_from_admitted(rows, admitted, num_requests)


def plan_budget(
    earlier_confidence,                # [R, gamma] history (confidences `lag` rounds old), array or tensor
    sps_with_draft,                    # sps[B] when the round also runs the draft
    sps_without_draft=None,            # sps[B] of plain decoding (no draft round); None = never compare
    caps=None,                         # [R] most drafts each request may verify
    early_break: bool = False,
) -> Optional[int]:
    """The token budget K for a round, or None when drafting does not pay at all; see
    `plan_budget_and_tokens`, which also says how many tokens the round is expected to emit."""
    return plan_budget_and_tokens(earlier_confidence, sps_with_draft, sps_without_draft, caps, early_break)[0]


def plan_budget_and_tokens(
    earlier_confidence,
    sps_with_draft,
    sps_without_draft=None,
    caps=None,
    early_break: bool = False,
) -> tuple:                            # (K or None, expected tokens R + the K best survivals)
    """The token budget K for a round, or None when drafting does not pay at all (paper §5.2).

    A global search over the whole survival path of *earlier* confidences (no break: graph buckets
    and tile sizes make SPS jagged); safe because nothing in it depends on the tokens verified now.
    Running the draft costs time even if nothing is verified, so at high load the best plan can be
    to skip the draft: compare the best Theta with a draft against R * SPS_plain(R). With
    `early_break` the best point is where Algorithm 1 would stop (the causal mode, which cannot
    reach a better point behind a cliff of the cost curve). Ties: the first maximum, the smallest K.

    It runs on the host before every round, so it is written in NumPy: the same ranking as the
    device ops, without the per-op overhead of small torch tensors."""
    earlier = np.asarray(_host(earlier_confidence), dtype=np.float64)
    num_requests, gamma = earlier.shape
    with_draft = np.asarray(_host(sps_with_draft), dtype=np.float64)
    caps = np.full(num_requests, gamma) if caps is None else np.asarray(_host(caps))
    survival_values = np.cumprod(earlier, axis=1)
    valid = np.arange(gamma)[None, :] < np.minimum(caps, gamma)[:, None]
    values = np.sort(survival_values[valid])[::-1]                  # admissible survivals, descending
    tau = num_requests + np.concatenate([[0.0], np.cumsum(np.clip(values, 0, None))])
    batch = num_requests + np.arange(values.size + 1)
    rate = np.where(batch < with_draft.size, with_draft[np.minimum(batch, with_draft.size - 1)], 0.0)
    theta = tau * rate
    if early_break:
        improves = np.append(theta[1:] > theta[:-1], False)
        budget = int(np.cumprod(improves).sum())
    else:
        budget = int(np.argmax(theta))
    plain = 0.0
    if sps_without_draft is not None:
        without = np.asarray(_host(sps_without_draft), dtype=np.float64)
        plain = num_requests * without[num_requests] if num_requests < without.size else 0.0
    return (budget if theta[budget] > plain else None), float(tau[budget])


def _host(values):
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values


def schedule_topk(
    confidence: torch.Tensor,      # [R, gamma] current confidences
    budget: int,                   # K extra verify tokens (decided on the host beforehand)
    caps: Optional[torch.Tensor] = None,
) -> torch.Tensor:                 # [R] long, sum == min(K, sum(caps))
    """Admit the global top-K candidates by current survival, ties by (request, position)."""
    num_requests, gamma = confidence.shape
    values, rows, num_valid = ranked_candidates(survival(confidence), _caps(num_requests, gamma, caps,
                                                                            confidence.device))
    admitted = torch.arange(values.numel(), device=values.device) < torch.clamp(num_valid, max=budget)
    return _lengths_from_admitted(rows, admitted, num_requests)
