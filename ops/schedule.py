"""Verify-length schedulers: how many drafted tokens each request sends to the target.

Every scheduler here is non-anticipating: the decision to verify position k
uses only confidences c_1..c_k, and c_k depends on x_0..x_{k-1} but never on
x_k itself (DSpark §3.2.1), so scheduling cannot bias the output distribution.
Modes in this module: "fixed" (verify min(length, gamma) tokens) and
"threshold" (verify while prefix survival stays >= a static threshold). The
load-aware prefix scheduler (paper Algorithm 1) plugs in behind `schedule`.
"""
from typing import Optional

import torch

SCHEDULE_MODES = ("fixed", "threshold")


def survival(confidence: torch.Tensor) -> torch.Tensor:
    """a_{r,j} = prod_{i <= j} c_{r,i}: probability the prefix up to j survives. [R, gamma] -> [R, gamma]."""
    return confidence.float().cumprod(dim=-1)


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


def schedule(
    mode: str,
    gamma: int,
    confidence: Optional[torch.Tensor],  # [R, gamma] per-position conditional confidences, or None
    num_requests: int,
    *,
    length: Optional[int] = None,
    threshold: float = 0.5,
    max_verify_len: Optional[int] = None,
    device=None,
) -> torch.Tensor:  # [R] long verify lengths in [0, gamma]
    """Dispatch to a scheduler by name, then cap at the backend's per-request limit."""
    if mode == "fixed":
        verify_lens = schedule_fixed(num_requests, gamma, gamma if length is None else length, device)
    elif mode == "threshold":
        if confidence is None:
            raise ValueError("the 'threshold' schedule needs a draft with a confidence head "
                             "(DSpark); use schedule='fixed' for drafts without one")
        verify_lens = schedule_threshold(confidence, threshold)
    else:
        raise ValueError(f"unknown schedule mode {mode!r}; valid modes: {', '.join(SCHEDULE_MODES)}")
    if max_verify_len is not None:
        verify_lens = verify_lens.clamp(max=max_verify_len)
    return verify_lens
