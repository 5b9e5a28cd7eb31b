"""Lossless verification of a drafted block (rejection sampling).

Leviathan et al. 2023 / Chen et al. 2023, as used by the DSpark paper (§2, §3.2):
draft token d_k is accepted with probability min(1, p_target(d_k) / p_draft(d_k));
at the first rejection the recovered token is drawn from
norm(max(p_target - p_draft, 0)); when all l scheduled drafts survive, a bonus
token is drawn from p_target at position l + 1. The emitted tokens are then
distributed exactly as the target alone would produce them. Greedy requests use
point-mass distributions (see `sampling_probs`), which reduces the same rule to
"accept while the draft equals the target argmax, then emit the argmax".
"""
from dataclasses import dataclass

import torch

from .sampling import sample_from_probs

# Output slots after the emitted tokens hold this id.
PLACEHOLDER_TOKEN_ID = -1
# Below this residual mass the recovered token is drawn from p_target instead
# (the residual is ~0 only when draft and target agree, where both are equal).
RESIDUAL_EPS = 1e-12


@dataclass
class VerifyResult:
    output_tokens: torch.Tensor  # [R, gamma + 1] accepted drafts, then the recovered/bonus token, then PLACEHOLDER
    num_accepted: torch.Tensor   # [R] accepted draft tokens, 0 <= a <= verify_len
    num_emitted: torch.Tensor    # [R] = num_accepted + 1


def verify(
    draft_tokens: torch.Tensor,     # [R, gamma] long
    draft_probs: torch.Tensor,      # [R, gamma, V] the distributions the drafts were sampled from
    target_probs: torch.Tensor,     # [R, gamma + 1, V] target distributions after [anchor, d_1 .. d_gamma]
    verify_lens: torch.Tensor,      # [R] long, 0 <= l <= gamma; positions >= l are ignored
    accept_uniforms: torch.Tensor,  # [R, gamma] in [0, 1)
    sample_uniforms: torch.Tensor,  # [R] in [0, 1)
) -> VerifyResult:
    num_rows, gamma = draft_tokens.shape
    vocab = target_probs.shape[-1]
    assert draft_probs.shape == (num_rows, gamma, vocab), f"draft_probs {tuple(draft_probs.shape)}"
    assert target_probs.shape == (num_rows, gamma + 1, vocab), f"target_probs {tuple(target_probs.shape)}"
    assert verify_lens.shape == (num_rows,) and accept_uniforms.shape == (num_rows, gamma)
    assert sample_uniforms.shape == (num_rows,)
    draft_probs = draft_probs.float()
    target_probs = target_probs.float()

    index = draft_tokens.clamp(min=0).unsqueeze(-1)
    target_p = target_probs[:, :gamma].gather(-1, index).squeeze(-1)  # [R, gamma]
    draft_p = draft_probs.gather(-1, index).squeeze(-1)                # [R, gamma]
    # u < p_t / p_d, written without the division; u in [0, 1) so p_t >= p_d always accepts.
    accepted = accept_uniforms * draft_p < target_p
    scheduled = torch.arange(gamma, device=draft_tokens.device) < verify_lens.unsqueeze(-1)
    num_accepted = (accepted & scheduled).long().cumprod(dim=-1).sum(dim=-1)  # [R]

    # The distribution of the final token: the residual at a rejection, p_target for a bonus.
    rows = torch.arange(num_rows, device=draft_tokens.device)
    padded_draft = torch.cat([draft_probs, draft_probs.new_zeros(num_rows, 1, vocab)], dim=1)
    target_at = target_probs[rows, num_accepted]                    # [R, V]
    residual = (target_at - padded_draft[rows, num_accepted]).clamp(min=0)
    rejected = num_accepted < verify_lens
    use_residual = rejected & (residual.sum(dim=-1) > RESIDUAL_EPS)
    final_dist = torch.where(use_residual.unsqueeze(-1), residual, target_at)
    final_token = sample_from_probs(final_dist, sample_uniforms)    # [R]
    return _result(draft_tokens, num_accepted, final_token)


def _result(draft_tokens: torch.Tensor, num_accepted: torch.Tensor, final_token: torch.Tensor) -> VerifyResult:
    """[R, gamma + 1] output rows: the accepted drafts, the final (recovered or bonus) token, then
    PLACEHOLDER."""
    num_rows, gamma = draft_tokens.shape
    positions = torch.arange(gamma + 1, device=draft_tokens.device)
    padded_tokens = torch.cat([draft_tokens, draft_tokens.new_full((num_rows, 1), PLACEHOLDER_TOKEN_ID)], dim=1)
    output = torch.where(positions < num_accepted.unsqueeze(-1), padded_tokens,
                         torch.full_like(padded_tokens, PLACEHOLDER_TOKEN_ID))
    output[torch.arange(num_rows, device=draft_tokens.device), num_accepted] = final_token
    return VerifyResult(output_tokens=output, num_accepted=num_accepted, num_emitted=num_accepted + 1)


def verify_greedy(
    draft_tokens: torch.Tensor,   # [R, gamma] long
    target_logits: torch.Tensor,  # [R, gamma + 1, V] target logits after [anchor, d_1 .. d_gamma]
    verify_lens: torch.Tensor,    # [R] long, 0 <= l <= gamma; positions >= l are ignored
) -> VerifyResult:
    """`verify` for a batch whose every request is greedy, without building distributions.

    With greedy sampling the target's distribution at each position is the point mass at its
    argmax a_k (`sampling_probs`), so in `verify` p_target(d_k) is 1 when d_k = a_k and 0 otherwise:
    the draft is accepted exactly when it equals the argmax, whatever the draft's own probabilities
    and uniforms were (u * p_draft < 1 always holds, u * p_draft < 0 never does). At the first
    rejection the residual max(onehot(a_k) - p_draft, 0) has all its mass on a_k (or none, when the
    draft put all of its mass there, and then `verify` draws from p_target = onehot(a_k)), and the
    bonus token is a_k too. So the result is `verify`'s, token for token, from argmaxes alone: no
    [R, gamma + 1, V] one-hot tensors, no residual and no inverse CDF over the vocabulary.
    """
    num_rows, gamma = draft_tokens.shape
    assert target_logits.shape[:2] == (num_rows, gamma + 1), f"target_logits {tuple(target_logits.shape)}"
    assert verify_lens.shape == (num_rows,)
    argmax = target_logits.argmax(dim=-1)                                     # [R, gamma + 1]
    scheduled = torch.arange(gamma, device=draft_tokens.device) < verify_lens.unsqueeze(-1)
    num_accepted = ((draft_tokens == argmax[:, :gamma]) & scheduled).long().cumprod(dim=-1).sum(dim=-1)
    return _result(draft_tokens, num_accepted, argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1))


def truncate_at_stop(
    tokens: torch.Tensor,       # [R, T] emitted tokens, PLACEHOLDER after num_emitted
    num_emitted: torch.Tensor,  # [R]
    stop_token_ids: torch.Tensor,  # [R, S] long, padded with PLACEHOLDER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row after its first stop token (the stop token itself is kept).

    Returns (num_kept [R], stopped [R] bool). A stop token inside the accepted
    prefix ends the request there: the tokens after it are never emitted.
    """
    valid = torch.arange(tokens.shape[1], device=tokens.device) < num_emitted.unsqueeze(-1)
    stops = stop_token_ids.unsqueeze(1)                                          # [R, 1, S]
    is_stop = ((tokens.unsqueeze(-1) == stops) & (stops >= 0)).any(dim=-1) & valid  # [R, T]
    stopped = is_stop.any(dim=-1)
    first_stop = torch.where(stopped, is_stop.long().argmax(dim=-1), num_emitted - 1)
    return first_stop + 1, stopped
