"""Sampling filters and inverse-CDF sampling with explicit uniforms.

The same filter is applied to the target's and the draft's logits before
verification: rejection sampling is lossless with respect to the *filtered*
target distribution, which is what the user asked to sample from.
"""
from typing import Optional

import torch


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a [R] tensor so it broadcasts over every dim of `like` after the first."""
    return values.view((-1,) + (1,) * (like.dim() - 1))


def sampling_probs(
    logits: torch.Tensor,       # [R, ..., V] raw logits
    temperature: torch.Tensor,  # [R] float; <= 0 means greedy
    top_k: torch.Tensor,        # [R] long; <= 0 means no top-k
    top_p: torch.Tensor,        # [R] float in (0, 1]; 1 means no top-p
    *,
    all_greedy: Optional[bool] = None,  # host-known hints that skip work; None = derive them
    filtered: Optional[bool] = None,    # (which costs a device sync on accelerators)
) -> torch.Tensor:              # [R, ..., V] float32 probabilities
    """Turn logits into the distribution a request samples from.

    Greedy rows become one-hot at the argmax, so greedy decoding is the special
    case of sampling whose distributions are point masses: the verifier needs no
    separate greedy branch, and any uniforms give the argmax.
    Ties at the top-k / top-p cut-off are all kept (identically for target and
    draft), which keeps the filter a pure function of the logits. The hints only
    select a shorter path to the same result: `all_greedy` = every row has
    temperature 0; `filtered` = some row uses top-k or top-p.
    """
    assert logits.dim() >= 2, f"logits must be [R, ..., V], got {tuple(logits.shape)}"
    num_rows, vocab = logits.shape[0], logits.shape[-1]
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        assert t.shape == (num_rows,), f"{name} must be [{num_rows}], got {tuple(t.shape)}"
    logits = logits.float()
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if all_greedy is None:
        all_greedy = bool((temperature <= 0).all())
    if all_greedy:
        return one_hot
    if filtered is None:
        filtered = bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1).any())
    greedy = _per_row(temperature <= 0, logits)
    safe_temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    scaled = logits / _per_row(safe_temperature, logits)
    if not filtered:
        return torch.where(greedy, one_hot, scaled.softmax(dim=-1))

    sorted_logits, _ = scaled.sort(dim=-1, descending=True)                      # [R, ..., V]
    # top-k: keep every logit >= the k-th largest.
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth_index = _per_row(k - 1, sorted_logits).expand(*sorted_logits.shape[:-1], 1)
    kth_value = sorted_logits.gather(-1, kth_index)                              # [R, ..., 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p
    # (a token is dropped when the mass strictly before it already reaches p).
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = mass_before >= _per_row(top_p.float(), sorted_probs)
    drop[..., 0] = False
    kept_sorted = sorted_logits.masked_fill(drop, float("-inf"))
    # The smallest kept logit is the threshold in the original order.
    threshold = kept_sorted.masked_fill(kept_sorted == float("-inf"), float("inf")).amin(dim=-1, keepdim=True)
    return torch.where(greedy, one_hot, scaled.masked_fill(scaled < threshold, float("-inf")).softmax(dim=-1))


def sample_from_probs(
    probs: torch.Tensor,     # [..., V] non-negative, need not be normalised
    uniforms: torch.Tensor,  # [...] in [0, 1)
) -> torch.Tensor:           # [...] long
    """Inverse-CDF sampling: the first token whose cumulative mass exceeds u * total.

    A token with zero mass can never be chosen (its CDF step is flat), and a
    point mass returns its token for every u.
    """
    assert probs.shape[:-1] == uniforms.shape, f"{tuple(probs.shape)} vs {tuple(uniforms.shape)}"
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms.double().unsqueeze(-1) * cdf[..., -1:]
    index = (cdf <= target).sum(dim=-1)
    return index.clamp(max=probs.shape[-1] - 1)
