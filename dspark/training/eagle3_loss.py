"""Training objective of the EAGLE-3 draft: soft cross-entropy under a training-time test (TTT).

EAGLE-3 §3 (Li et al., 2025). At inference the chain feeds the draft's own output hidden
forward as the next step's feature; training only on the target's features (step 0) would
never show the draft its own features. The training-time test unrolls the chain inside one
training step, for every chain start at once:

    step 0       input (x_p, g_{p-1})           causal over the sequence (the verified context)
    step i >= 1  input (x_p, h^{i-1}_{p-1})     the chain that started at s = p - i, i steps in

Tokens are the true ones (a chain only matters while its drafts were accepted, i.e. equal
the true continuation); features are the draft's own. A step-i query sees what the chain
sees at inference: step-0 keys at 1..s (the verified context, up to and including the
chain's first pair) and the chain's own step-j keys at s + j, j = 1..i (the diagonal mask,
`ttt_attention_mask`). Step i at position p predicts x_{p+1}; its target is the target's
next-token distribution at p, softmax(lm_head(target_last[p])), and

    L = sum_i w_i * KL_i / sum_i w_i,   w_i = step_decay ** i,
    KL_i = mean over supervised p of sum_v p_target(v | p) (log p_target(v | p) - log p_draft,i(v | p))

The forward KL is EAGLE-3's soft cross-entropy minus the target's entropy: the same
gradient, but 0 at a perfect match, so its value says how far the draft still is (the
soft cross-entropy of a near-uniform target barely moves however well the draft learns).
Supervised: the predicted token x_{p+1} is a response token inside the sequence, and the
chain start p - i >= 1 (position 0 holds no pair). The attention keeps one T x T block for the context
plus i diagonal scores per query, so a step costs O(T^2 + i T), not O(i T^2).
"""
import torch
import torch.nn.functional as F

from .batch import TrainBatch


def _shift_right(x: torch.Tensor, steps: int, dim: int) -> torch.Tensor:
    """x moved `steps` places towards higher indices along `dim`, zeros in front:
    out[p] = x[p - steps]."""
    if steps == 0:
        return x
    length = x.shape[dim]
    zeros = x.new_zeros(x.shape[:dim] + (min(steps, length),) + x.shape[dim + 1:])
    return torch.cat([zeros, x.narrow(dim, 0, length - min(steps, length))], dim=dim)


def ttt_visibility(seq_len: int, step: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a query of TTT step `step` sees, compactly: (context [T, T], chain [T, step]) bool.
    Query p sees the step-0 key at t where context[p, t] (1 <= t <= p - step), and the
    step-j key at position p - step + j where chain[p, j - 1] (that position is >= 1).
    Queries whose chain would start before position 1 see only junk from their own chain;
    they are never supervised and nothing supervised reads them."""
    positions = torch.arange(seq_len, device=device)
    start = positions - step                                                     # [T] chain start per query
    context = (positions.unsqueeze(0) >= 1) & (positions.unsqueeze(0) <= start.unsqueeze(1))   # [T, T]
    chain = (start.unsqueeze(1) + torch.arange(1, step + 1, device=device)) >= 1   # [T, step]
    return context, chain


def ttt_attention_mask(seq_len: int, step: int, device=None) -> torch.Tensor:
    """The dense form of `ttt_visibility`: [T, (step + 1) * T] bool, columns = keys of step 0
    at positions 0..T-1, then step 1's, ..., then step `step`'s.
    Worked example, T = 4, step 2 (query p, key (step, position)):
        p = 3 (chain start 1): (0, 1), (1, 2), (2, 3)
        p = 2 (start 0, junk): (1, 1), (2, 2)
        p = 1 (start -1, junk): (2, 1)
        p = 0: nothing."""
    context, chain = ttt_visibility(seq_len, step, device)
    mask = torch.zeros(seq_len, (step + 1) * seq_len, dtype=torch.bool, device=device)
    mask[:, :seq_len] = context
    rows = torch.arange(seq_len, device=device)
    for j in range(1, step + 1):
        key_pos = rows - step + j
        keep = chain[:, j - 1]
        mask[rows[keep], j * seq_len + key_pos[keep]] = True
    return mask


def ttt_attention(
    query: torch.Tensor,          # [B, H, T, D] queries of step i = len(keys) - 1
    keys: list[torch.Tensor],     # i + 1 tensors [B, KVH, T, D]: keys of steps 0..i (rotated)
    values: list[torch.Tensor],   # i + 1 tensors [B, KVH, T, D]
    scale: float,
) -> torch.Tensor:                # [B, H, T, D]
    """Attention of TTT step i under `ttt_visibility`: one softmax over the T context scores
    and the i diagonal chain scores, computed in at least float32."""
    step = len(keys) - 1
    _, heads, length, _ = query.shape
    groups = heads // keys[0].shape[1]
    compute = torch.promote_types(query.dtype, torch.float32)

    def expand(x: torch.Tensor) -> torch.Tensor:
        """Grouped-query heads: [B, KVH, T, D] -> [B, H, T, D] in the compute dtype."""
        return x.repeat_interleave(groups, dim=1).to(compute)

    q = query.to(compute)
    context_visible, chain_visible = ttt_visibility(length, step, query.device)
    scores = [(q @ expand(keys[0]).transpose(-1, -2)) * scale]                    # [B, H, T, T]
    chain_values = []
    for j in range(1, step + 1):
        # The step-j key this query sees sits at p - (step - j): shift it onto row p.
        key_j = _shift_right(expand(keys[j]), step - j, dim=2)                    # [B, H, T, D]
        chain_values.append(_shift_right(expand(values[j]), step - j, dim=2))
        scores.append(((q * key_j).sum(dim=-1) * scale).unsqueeze(-1))          # [B, H, T, 1]
    scores = torch.cat(scores, dim=-1)                                           # [B, H, T, T + step]
    visible = torch.cat([context_visible, chain_visible], dim=-1)                # [T, T + step]
    # A finite fill keeps fully hidden rows (position 0) finite: uniform junk, never NaN.
    weights = scores.masked_fill(~visible, torch.finfo(compute).min).softmax(dim=-1)
    out = weights[..., :length] @ expand(values[0])                              # [B, H, T, D]
    for j, value_j in enumerate(chain_values):
        out = out + weights[..., length + j].unsqueeze(-1) * value_j
    return out.to(query.dtype)


def ttt_hidden_states(draft, input_ids: torch.Tensor, fused: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Unroll the chain from every start at once. input_ids [B, T]; fused [B, T, d] (g_p)
    -> `steps` tensors [B, T, d]: entry i at p is h^i_p, the output of chain step i at
    position p for the chain that started at p - i (before the final norm)."""
    layer = draft.midlayer
    batch, length, _ = fused.shape
    assert input_ids.shape == (batch, length) and input_ids.dtype == torch.long, \
        f"input_ids must be [B, T] long matching fused {tuple(fused.shape)}, got {tuple(input_ids.shape)}"
    positions = torch.arange(length, device=input_ids.device)
    cos, sin = draft.rotary(positions, fused.dtype)                              # [T, D]
    with torch.no_grad():
        embeds = draft.embed_tokens(input_ids)                                   # [B, T, d], frozen
    features = _shift_right(fused, 1, dim=1)                                     # [B, T, d]: g_{p-1} at p
    keys, values, hiddens = [], [], []
    for _ in range(steps):
        q, k, v = layer.project(embeds, features, cos, sin)                      # [B, T, H|KVH, D]
        keys.append(k.transpose(1, 2))
        values.append(v.transpose(1, 2))
        attended = ttt_attention(q.transpose(1, 2), keys, values, draft.config.head_dim ** -0.5)   # [B, H, T, D]
        hidden = layer.finish(features, attended.transpose(1, 2).reshape(batch, length, -1))      # [B, T, d]
        hiddens.append(hidden)
        features = _shift_right(hidden, 1, dim=1)    # step i + 1 at p continues from step i at p - 1
    return hiddens


def eagle3_loss(draft, batch: TrainBatch, ttt_steps: int = 7, step_decay: float = 0.8) -> tuple[torch.Tensor, dict]:
    """The TTT loss (a scalar, token-level mean per step) and metrics: `loss`, and per step i
    `loss_step{i}` (forward KL), `acc_step{i}` (draft argmax == target argmax) and
    `supervised_step{i}` (positions counted). The embedding and LM head get no gradient
    whatever their requires_grad (they are used detached); `Eagle3Draft` also freezes them."""
    assert ttt_steps >= 1, f"ttt_steps must be >= 1, got {ttt_steps}"
    num_seq, length = batch.input_ids.shape
    d = draft.config.hidden_size
    assert batch.target_hidden.shape == (num_seq, length, 3 * d), \
        f"target_hidden must be [B, T, 3d] = [{num_seq}, {length}, {3 * d}], got {tuple(batch.target_hidden.shape)}"
    dtype = draft.fc.weight.dtype
    # [Vd, d] frozen. With a reduced draft vocabulary the target's distribution is taken over the
    # draft tokens and renormalised there (EAGLE-3's convention): a KL towards mass the draft
    # cannot represent would be infinite.
    head = draft.lm_head.weight.detach()
    hiddens = ttt_hidden_states(draft, batch.input_ids, draft.fuse(batch.target_hidden), ttt_steps)

    # Step 0's supervised positions contain every later step's: select them once, so the
    # [*, V] tensors are only ever built there.
    positions = torch.arange(length, device=batch.input_ids.device)
    next_in_response = F.pad(batch.loss_mask[:, 1:], (0, 1), value=False)        # [B, T]: x_{p+1} in the response
    inside = positions.unsqueeze(0) + 1 < batch.lengths.unsqueeze(1)            # [B, T]: x_{p+1} exists
    selected = next_in_response & inside & (positions >= 1).unsqueeze(0)         # [B, T]
    selected_pos = positions.expand(num_seq, length)[selected]                   # [M]
    with torch.no_grad():
        target_logits = F.linear(batch.target_last[selected].to(dtype), head).float()   # [M, V]
        target_log_probs = target_logits.log_softmax(dim=-1)
        target_probs = target_log_probs.exp()
        target_top = target_logits.argmax(dim=-1)                                # [M]

    total, weight_sum, metrics = 0.0, 0.0, {}
    for step, hidden in enumerate(hiddens):
        valid = (selected_pos >= step + 1).float()                               # [M]: chain start >= 1
        count = valid.sum().clamp(min=1)
        logits = F.linear(draft.norm(hidden[selected]), head).float()            # [M, V]
        kl = (target_probs * (target_log_probs - logits.log_softmax(dim=-1))).sum(dim=-1)   # [M]
        step_loss = (kl * valid).sum() / count
        weight = step_decay ** step
        total, weight_sum = total + weight * step_loss, weight_sum + weight
        with torch.no_grad():
            hits = (logits.argmax(dim=-1) == target_top).float() * valid
            metrics[f"loss_step{step}"] = float(step_loss)
            metrics[f"acc_step{step}"] = float(hits.sum() / count)
            metrics[f"supervised_step{step}"] = int(valid.sum())
    loss = total / weight_sum
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def eagle3_training_loss(draft, batch: TrainBatch, backend, generators: list, cfg):
    """The registry's loss for "eagle3": EAGLE-3's loss is a batch mean, so it is taken one
    sequence at a time, which keeps every batch split exact (per-sequence losses [B], metrics)."""
    losses, metrics = [], {}
    for row in range(batch.input_ids.shape[0]):
        one = TrainBatch(*(t[row:row + 1] for t in (batch.input_ids, batch.loss_mask, batch.lengths,
                                                      batch.target_hidden, batch.target_last)),
                         target_lse=None if batch.target_lse is None else batch.target_lse[row:row + 1])
        loss, metrics = eagle3_loss(draft, one, cfg.ttt_steps, cfg.ttt_decay)
        losses.append(loss)
    return torch.stack(losses), metrics


__all__ = ["eagle3_loss", "eagle3_training_loss", "ttt_attention", "ttt_attention_mask", "ttt_hidden_states",
           "ttt_visibility"]
