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

`sps` is a 1-D tensor: sps[B] = engine steps per second for a verify forward of B tokens
(B counts every request's anchor); entries past its end count as 0 (not affordable).
"""
from typing import Optional

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


def best_budget(
    confidence: torch.Tensor,      # [R, gamma] confidences of an earlier round (history, not the current draft)
    sps: torch.Tensor,
    caps: Optional[torch.Tensor] = None,
) -> int:
    """The token budget K maximising Theta over the whole survival path (global search, no
    break: graph buckets make SPS jagged). Safe only on confidences that do not depend on
    the tokens being verified now."""
    num_requests, gamma = confidence.shape
    values, _, num_valid = ranked_candidates(survival(confidence), _caps(num_requests, gamma, caps,
                                                                         confidence.device))
    theta = throughput_path(values[:int(num_valid)], num_requests, sps)
    return int(theta.argmax())                               # first maximum: the smallest such K


def plan_budget(
    earlier_confidence: torch.Tensor,  # [R, gamma] history (confidences `lag` rounds old)
    sps_with_draft: torch.Tensor,      # sps[B] when the round also runs the draft
    sps_without_draft: torch.Tensor,   # sps[B] of plain decoding (no draft round)
    caps: Optional[torch.Tensor] = None,
    early_break: bool = False,
) -> Optional[int]:
    """The budget K for this round, or None when drafting does not pay at all.

    Running the draft costs time even if nothing is verified, so at high load the best
    plan can be to skip the draft and decode plainly: compare the best Theta with a draft
    against R * SPS_plain(R). Both use history only, so the choice is lossless. With
    `early_break` the best point is the one Algorithm 1 would stop at (for the causal mode,
    which cannot reach a better point behind a cliff of the cost curve)."""
    num_requests, gamma = earlier_confidence.shape
    values, _, num_valid = ranked_candidates(survival(earlier_confidence),
                                             _caps(num_requests, gamma, caps, earlier_confidence.device))
    theta = throughput_path(values[:int(num_valid)], num_requests, sps_with_draft)
    plain = num_requests * float(sps_without_draft[num_requests]) if num_requests < len(sps_without_draft) else 0.0
    if early_break:
        improves = torch.cat([theta[1:] > theta[:-1], theta.new_zeros(1, dtype=torch.bool)])
        budget = int(improves.long().cumprod(0).sum())
    else:
        budget = int(theta.argmax())
    return budget if float(theta[budget]) > plain else None


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


def schedule(
    mode: str,
    gamma: int,
    confidence: Optional[torch.Tensor],  # [R, gamma] per-position conditional confidences, or None
    num_requests: int,
    *,
    length: Optional[int] = None,
    threshold: float = 0.5,
    sps: Optional[torch.Tensor] = None,
    budget: Optional[int] = None,
    caps: Optional[torch.Tensor] = None,
    max_verify_len: Optional[int] = None,
    device=None,
) -> torch.Tensor:  # [R] long verify lengths in [0, gamma]
    """Dispatch to a scheduler by name; the result respects caps and the backend's limit."""
    if mode not in SCHEDULE_MODES:
        raise ValueError(f"unknown schedule mode {mode!r}; valid modes: {', '.join(SCHEDULE_MODES)}")
    if mode != "fixed" and confidence is None:
        raise ValueError(f"the {mode!r} schedule needs a draft with a confidence head (DSpark); "
                         "use schedule='fixed' for drafts without one")
    if max_verify_len is not None:
        limit = torch.full((num_requests,), max_verify_len, dtype=torch.long,
                           device=device if confidence is None else confidence.device)
        caps = limit if caps is None else torch.minimum(caps, limit)
    if mode == "fixed":
        lens = schedule_fixed(num_requests, gamma, gamma if length is None else length, device)
    elif mode == "threshold":
        lens = schedule_threshold(confidence, threshold)
    elif mode == "causal":
        if sps is None:
            raise ValueError("the 'causal' schedule needs an SPS table (a cost model)")
        return schedule_causal(confidence, sps, caps)
    else:
        if budget is None:
            raise ValueError("the 'budget' schedule needs a token budget K (from best_budget on earlier confidences)")
        return schedule_topk(confidence, budget, caps)
    return lens if caps is None else torch.minimum(lens, caps.to(lens.device))
