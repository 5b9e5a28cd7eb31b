"""The sequential stage of the DSpark draft: sampling a block left to right.

DSpark paper §3.1, Eq. 4-5. The parallel backbone gives base logits U_k for all
gamma positions in one pass; the sequential stage adds a transition bias that
depends on the token sampled just before, p_k(v) = softmax(U_k(v) + B(x_{k-1}, v)),
and samples x_k from it before moving to k + 1. The corrected p_k -- after the
request's temperature / top-k / top-p -- is *the* draft distribution that
verification must use. Without a transition (DFlash) every position is
independent and the whole block is sampled at once.

With a reduced draft vocabulary the sampler works over the draft's own columns
(`token_ids` maps each column to its target token id): the distributions are the
same as over the full vocabulary with zero mass outside, at a fraction of the
width, and the caller expands them once at the end.
"""
from typing import Callable, Optional

import torch

from .sampling import sample_from_probs, sampling_probs

# transition(k, prev_ids [R], state) -> (bias [R, V], new state); k is 0-based.
Transition = Callable[[int, torch.Tensor, object], tuple[torch.Tensor, object]]


def markov_bias(
    prev_ids: torch.Tensor,  # [...] long
    w1: torch.Tensor,        # [V, r] transition embedding (markov_w1)
    w2: torch.Tensor,        # [V, r] transition projection (markov_w2, used as r -> V)
) -> torch.Tensor:           # [..., V]
    """Low-rank first-order transition B(x_{k-1}, .) = W1[x_{k-1}] W2 (Eq. 5)."""
    return w1[prev_ids] @ w2.t()


def sample_draft_block(
    base_logits: torch.Tensor,  # [R, gamma, V] backbone logits U_k
    anchor_ids: torch.Tensor,   # [R] long, x_0
    uniforms: torch.Tensor,     # [R, gamma] in [0, 1)
    temperature: torch.Tensor,  # [R]
    top_k: torch.Tensor,        # [R]
    top_p: torch.Tensor,        # [R]
    transition: Optional[Transition] = None,
    token_ids: Optional[torch.Tensor] = None,  # [V] long: the token id of each column (None: the column)
    **hints,  # all_greedy / filtered, passed to `sampling_probs`
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a draft block. Returns (draft_tokens [R, gamma], draft_probs [R, gamma, V],
    prev_ids [R, gamma]) where prev_ids[:, k] = x_{k-1} (the anchor for k = 0). Tokens and
    prev_ids are token ids (`token_ids` applied); probs stay in column order. The transition
    receives token ids and returns biases over the V columns."""
    num_rows, gamma, _ = base_logits.shape
    assert anchor_ids.shape == (num_rows,) and uniforms.shape == (num_rows, gamma)
    # Greedy rows get one-hot distributions, which inverse-CDF sampling maps to their argmax for
    # any uniform: with every row greedy, take the argmax directly (the same tokens, less work).
    draw = (lambda probs, _: probs.argmax(dim=-1)) if hints.get("all_greedy") else sample_from_probs

    def sample(probs, u):
        column = draw(probs, u)
        return column if token_ids is None else token_ids[column]

    if transition is None:
        probs = sampling_probs(base_logits, temperature, top_k, top_p, **hints)
        tokens = sample(probs, uniforms)
        prev_ids = torch.cat([anchor_ids.unsqueeze(1), tokens[:, :-1]], dim=1)
        return tokens, probs, prev_ids

    tokens, probs, prevs = [], [], []
    prev, state = anchor_ids, None
    for k in range(gamma):
        bias, state = transition(k, prev, state)
        step_probs = sampling_probs(base_logits[:, k] + bias.to(base_logits.dtype), temperature, top_k, top_p, **hints)
        token = sample(step_probs, uniforms[:, k])
        prevs.append(prev)
        tokens.append(token)
        probs.append(step_probs)
        prev = token
    return torch.stack(tokens, dim=1), torch.stack(probs, dim=1), torch.stack(prevs, dim=1)
