"""Training objectives of the parallel drafts (paper §3.3, DeepSpec's recipe).

For each sequence, random anchors inside the response each start a block; block
prediction k (0-based) is supervised with the token at anchor + 1 + k, and only over
a contiguous valid prefix (the predicted tokens must all be response tokens inside the
sequence). Position weights w_k = exp(-k / decay) emphasise early positions (they count
most for the accepted length). DSpark:

    L = 0.1 * CE(p_draft, x*) + 0.9 * ||p_draft - p_target||_1 + 1.0 * BCE(c_k, c*_k),
    c*_k = 1 - 1/2 ||p_draft,k - p_target,k||_1     (the analytic acceptance rate, Eq. 8)

with p_draft the Markov-corrected distribution (teacher-forced on the true previous
token) and p_target recomputed from the target's final hidden state through the frozen
LM head, at the supervised positions only. DFlash: the same backbone, CE only.

Every loss returns one value per sequence (its weighted mean), so a trainer can average
over the global batch exactly, however the batch is split across processes.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .batch import TrainBatch


@dataclass
class LossWeights:
    ce: float = 0.1
    l1: float = 0.9
    confidence: float = 1.0
    decay: float = 4.0          # w_k = exp(-k / decay), k = 0 .. gamma - 1


def sample_anchors(loss_mask: torch.Tensor, lengths: torch.Tensor, num_anchors: int,
                   generators: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Random anchors p with x_p and x_{p+1} in the response; at most `num_anchors` per sequence.
    One generator per sequence, so the draw does not depend on how a batch is split.
    Returns (anchors [B, A] sorted, keep [B, A] bool); A = the largest count kept."""
    batch, length = loss_mask.shape
    positions = torch.arange(length - 1, device=loss_mask.device)
    valid = loss_mask[:, :-1] & loss_mask[:, 1:] & (positions.unsqueeze(0) + 1 < lengths.unsqueeze(1))
    chosen = []
    for row in range(batch):
        candidates = positions[valid[row]]
        order = torch.randperm(candidates.numel(), generator=generators[row])[:num_anchors]
        chosen.append(candidates[order.to(candidates.device)].sort().values)
    width = max(1, max(c.numel() for c in chosen))
    anchors = torch.zeros(batch, width, dtype=torch.long, device=loss_mask.device)
    keep = torch.zeros(batch, width, dtype=torch.bool, device=loss_mask.device)
    for row, c in enumerate(chosen):
        anchors[row, :c.numel()] = c
        keep[row, :c.numel()] = True
    return anchors, keep


def block_targets(batch: TrainBatch, anchors: torch.Tensor, keep: torch.Tensor, gamma: int):
    """labels [B, A, gamma] (token at anchor + 1 + k), valid [B, A, gamma] (contiguous prefix),
    target_positions [B, A, gamma] (anchor + k: where the target predicts that token)."""
    length = batch.input_ids.shape[1]
    offsets = torch.arange(gamma, device=anchors.device)
    label_pos = anchors.unsqueeze(-1) + 1 + offsets                                   # [B, A, gamma]
    inside = label_pos < batch.lengths.view(-1, 1, 1)
    safe = label_pos.clamp(max=length - 1)
    flat = safe.view(safe.shape[0], -1)
    labels = batch.input_ids.gather(1, flat).view_as(safe)
    in_response = batch.loss_mask.gather(1, flat).view_as(safe)
    valid = (inside & in_response & keep.unsqueeze(-1)).long().cumprod(dim=-1).bool()
    return labels, valid, (label_pos - 1).clamp(max=length - 1)


def position_weights(gamma: int, decay: float, device=None) -> torch.Tensor:
    return torch.exp(-torch.arange(gamma, dtype=torch.float32, device=device) / decay)


def _per_sequence(terms: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over each sequence's valid (anchor, position) pairs: [B, A, gamma] -> [B]."""
    w = weights.view(1, 1, -1) * valid
    return (terms * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp(min=1e-9)


def parallel_draft_loss(draft, batch: TrainBatch, backend, generators: list, num_anchors: int = 512,
                        weights: Optional[LossWeights] = None, use_l1: bool = True, use_confidence: bool = True):
    """Per-sequence losses [B] and metrics for DSpark (all terms) or DFlash (CE only)."""
    weights = weights or LossWeights()
    gamma = draft.config.block_size
    anchors, keep = sample_anchors(batch.loss_mask, batch.lengths, num_anchors, generators)
    labels, valid, target_pos = block_targets(batch, anchors, keep, gamma)
    hidden = draft.train_blocks(batch.input_ids, batch.target_hidden, anchors, keep, backend)   # [B, A, g, d]
    logits = draft.lm_head(hidden).float()                                                      # [B, A, g, V]
    prev_ids = torch.cat([batch.input_ids.gather(1, anchors).unsqueeze(-1), labels[..., :-1]], dim=-1)
    if draft.markov_head is not None:
        logits = logits + draft.markov_head.block_bias(hidden, prev_ids).float()
    log_probs = logits.log_softmax(dim=-1)
    w = position_weights(gamma, weights.decay, logits.device)

    ce = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)                               # [B, A, g]
    ce_weight = weights.ce if (use_l1 or use_confidence) else 1.0      # CE alone (DFlash) is the whole loss
    per_sequence = ce_weight * _per_sequence(ce, valid, w)
    metrics = {"ce": float(_per_sequence(ce.detach(), valid, w).mean())}
    if use_l1 or use_confidence:
        with torch.no_grad():
            target_last = batch.target_last.gather(
                1, target_pos.view(target_pos.shape[0], -1, 1).expand(-1, -1, batch.target_last.shape[-1]))
            target_probs = draft.lm_head(target_last.to(draft.lm_head.weight.dtype)).float().softmax(-1)
            target_probs = target_probs.view_as(logits)                                         # [B, A, g, V]
        tv = (log_probs.exp() - target_probs).abs().sum(dim=-1)                                # [B, A, g]
        if use_l1:
            per_sequence = per_sequence + weights.l1 * _per_sequence(tv, valid, w)
            metrics["l1"] = float(_per_sequence(tv.detach(), valid, w).mean())
        if use_confidence and draft.confidence_head is not None:
            confidence_logits = draft.confidence_logits(hidden, prev_ids)                       # [B, A, g]
            soft_label = (1 - 0.5 * tv).detach().clamp(0, 1)
            bce = F.binary_cross_entropy_with_logits(confidence_logits, soft_label, reduction="none")
            per_sequence = per_sequence + weights.confidence * _per_sequence(bce, valid, w)
            metrics["bce"] = float(_per_sequence(bce.detach(), valid, w).mean())
    with torch.no_grad():
        hits = (logits.argmax(-1) == labels) & valid
        metrics["acc_first"] = float(hits[..., 0].sum() / valid[..., 0].sum().clamp(min=1))
        metrics["supervised"] = int(valid.sum())
    return per_sequence, metrics
