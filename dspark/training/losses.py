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
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..models.drafts.vocab import DraftVocab
from .batch import TrainBatch


@dataclass
class LossWeights:
    ce: float = 0.1
    l1: float = 0.9
    confidence: float = 1.0
    decay: float = 4.0          # w_k = exp(-k / decay), k = 0 .. gamma - 1


def sample_anchors(loss_mask: torch.Tensor, lengths: torch.Tensor, num_anchors: int,
                   generators: list, density: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random anchors p with x_p and x_{p+1} in the response; at most `num_anchors` per sequence,
    and with `density`, at most that fraction of the candidate positions (rounded up). Blocks of
    neighbouring anchors overlap in all but one position, so past a certain density more anchors
    add compute faster than they add information; a density keeps short and long sequences
    equally covered. One generator per sequence, so the draw does not depend on how a batch is
    split. Returns (anchors [B, A] sorted, keep [B, A] bool); A = the largest count kept."""
    batch, length = loss_mask.shape
    positions = torch.arange(length - 1, device=loss_mask.device)
    valid = loss_mask[:, :-1] & loss_mask[:, 1:] & (positions.unsqueeze(0) + 1 < lengths.unsqueeze(1))
    chosen = []
    for row in range(batch):
        candidates = positions[valid[row]]
        count = num_anchors if density is None else min(num_anchors, math.ceil(density * candidates.numel()))
        order = torch.randperm(candidates.numel(), generator=generators[row])[:count]
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


class _TokenLosses(torch.autograd.Function):
    """Per-row cross-entropy and total variation of draft logits, fused and chunked.

    Written out with tensor ops, CE + ||softmax(z) - q||_1 over [M, V] costs a dozen passes
    over V-wide tensors forward and back (log_softmax, exp, sub, abs, sum; sgn, mul, ...), each
    of which streams [M, V] through memory. Here forward and backward each walk the rows in
    chunks that stay in cache, and the gradient is written in closed form:
        d CE / d z = p - onehot(label)
        d TV / d z = p * (s - <s, p>),   s = sign(p - q)
    (the derivative of sum_v |p_v - q_v| through the softmax; s = 0 where p = q, as autograd's
    abs). Rows with label -1 get no CE; with no target (`q` None) TV is zero.
    """
    CHUNK = 64

    @staticmethod
    def forward(ctx, logits, target_probs, target_rows, labels, outside):
        # logits [M, V] float32; target_probs [P, V] or None; target_rows [M] (row of target_probs);
        # labels [M] long (-1: none); outside [M] (target mass outside the V columns)
        rows, width = logits.shape
        ce, tv = logits.new_zeros(rows), logits.new_zeros(rows)
        # Two scratch blocks reused by every chunk: fresh multi-megabyte tensors per chunk would
        # each pay their page faults again.
        chunk = min(_TokenLosses.CHUNK, rows)
        p, q = logits.new_empty(chunk, width), logits.new_empty(chunk, width)
        for start in range(0, rows, chunk):
            z, label = logits[start:start + chunk], labels[start:start + chunk]
            n = z.shape[0]
            torch.log_softmax(z, dim=1, out=p[:n])
            picked = p[:n].gather(1, label.clamp(min=0).unsqueeze(1)).squeeze(1)
            ce[start:start + n] = torch.where(label >= 0, -picked, torch.zeros_like(picked))
            if target_probs is not None:
                torch.index_select(target_probs, 0, target_rows[start:start + n], out=q[:n])
                tv[start:start + n] = p[:n].exp_().sub_(q[:n]).abs_().sum(dim=1) + outside[start:start + n]
        ctx.save_for_backward(logits, target_probs, target_rows, labels)
        return ce, tv

    @staticmethod
    def backward(ctx, grad_ce, grad_tv):
        logits, target_probs, target_rows, labels = ctx.saved_tensors
        rows, width = logits.shape
        grad = torch.empty_like(logits)
        chunk = min(_TokenLosses.CHUNK, rows)
        p, s = logits.new_empty(chunk, width), logits.new_empty(chunk, width)
        for start in range(0, rows, chunk):
            z, label = logits[start:start + chunk], labels[start:start + chunk]
            n = z.shape[0]
            torch.softmax(z, dim=1, out=p[:n])                                    # [C, V]
            g_ce = torch.where(label >= 0, grad_ce[start:start + n], torch.zeros_like(grad_ce[start:start + n]))
            out = torch.mul(p[:n], g_ce.unsqueeze(1), out=grad[start:start + n])
            out.scatter_add_(1, label.clamp(min=0).unsqueeze(1), -g_ce.unsqueeze(1))
            if target_probs is not None:
                sign = torch.index_select(target_probs, 0, target_rows[start:start + n], out=s[:n])
                torch.sub(p[:n], sign, out=sign).sign_()
                dot = (sign * p[:n]).sum(dim=1, keepdim=True)
                sign.sub_(dot).mul_(p[:n]).mul_(grad_tv[start:start + n].unsqueeze(1))
                out.add_(sign)
        return grad, None, None, None, None


def token_losses(logits: torch.Tensor, labels: torch.Tensor, target_probs: Optional[torch.Tensor] = None,
                 target_rows: Optional[torch.Tensor] = None, outside: Optional[torch.Tensor] = None):
    """(CE [...], TV [...]) per position. logits [..., V]; labels [...] (-1: no CE there);
    target_probs [P, V] with target_rows [...] picking each position's row (None: TV = 0);
    outside [...]: target mass outside the V columns, added to TV."""
    shape = labels.shape
    flat = logits.reshape(-1, logits.shape[-1]).float()
    rows = target_rows.reshape(-1) if target_rows is not None else labels.new_zeros(labels.numel())
    extra = outside.reshape(-1).float() if outside is not None else flat.new_zeros(labels.numel())
    target_probs = None if target_probs is None else target_probs.float()
    ce, tv = _TokenLosses.apply(flat, target_probs, rows, labels.reshape(-1), extra)
    return ce.view(shape), tv.view(shape)


def position_weights(gamma: int, decay: float, device=None) -> torch.Tensor:
    return torch.exp(-torch.arange(gamma, dtype=torch.float32, device=device) / decay)


def _per_sequence(terms: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over each sequence's valid (anchor, position) pairs: [B, A, gamma] -> [B]."""
    w = weights.view(1, 1, -1) * valid
    return (terms * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp(min=1e-9)


def target_distributions(draft, batch: TrainBatch, positions: torch.Tensor, needed: torch.Tensor):
    """The target's next-token distribution at `positions` [B, A, g], over the draft vocabulary:
    (probs [P, Vd] for the P distinct positions read, rows [B, A, g] each (anchor, k)'s row in
    probs, outside [B, A, g] the target mass outside the draft vocabulary).

    Blocks overlap (anchor a + k is anchor a + 1's k - 1), so the distribution is computed once
    per sequence position that some `needed` (anchor, k) reads, through the frozen LM head (the
    draft's rows are the target's). With a reduced draft vocabulary the normaliser is the
    target's full log-sum-exp, `batch.target_lse`; otherwise a softmax over the head is exact."""
    num_seq, length = batch.input_ids.shape
    used = torch.zeros(num_seq, length, dtype=torch.bool, device=positions.device)
    used[torch.arange(num_seq, device=positions.device).view(-1, 1, 1).expand_as(positions)[needed],
         positions[needed]] = True                                                   # [B, T]
    slot = torch.cumsum(used.flatten(), 0).view(num_seq, length) - 1                 # [B, T] row in the compact set
    head = draft.lm_head
    logits = head(batch.target_last[used].to(head.weight.dtype)).float()             # [P, Vd]
    if draft.config.reduced_vocab:
        if batch.target_lse is None:
            raise ValueError("a draft with a reduced vocabulary needs the target's log-sum-exp (TrainBatch.target_lse)")
        probs = (logits - batch.target_lse[used].float().unsqueeze(-1)).exp()
    else:
        probs = logits.softmax(dim=-1)
    rows = slot.gather(1, positions.view(num_seq, -1)).clamp(min=0).view_as(positions)   # [B, A, g]
    outside = (1 - probs.sum(dim=-1)).clamp(min=0)[rows]                                 # [B, A, g]
    return probs, rows, outside


def parallel_draft_loss(draft, batch: TrainBatch, backend, generators: list, num_anchors: int = 512,
                        weights: Optional[LossWeights] = None, use_l1: bool = True, use_confidence: bool = True,
                        anchor_density: Optional[float] = None):
    """Per-sequence losses [B] and metrics for DSpark (all terms) or DFlash (CE only).

    With a reduced draft vocabulary the draft predicts only its Vd tokens: CE skips labels
    outside it (the draft can never propose them), and the total variation counts the target's
    mass outside as mismatch, so the confidence label is still the exact acceptance rate."""
    weights = weights or LossWeights()
    gamma = draft.config.block_size
    anchors, keep = sample_anchors(batch.loss_mask, batch.lengths, num_anchors, generators, anchor_density)
    labels, valid, target_pos = block_targets(batch, anchors, keep, gamma)
    hidden = draft.train_blocks(batch.input_ids, batch.target_hidden, anchors, keep, backend)   # [B, A, g, d]
    logits = draft.lm_head(hidden).float()                                                      # [B, A, g, Vd]
    prev_ids = torch.cat([batch.input_ids.gather(1, anchors).unsqueeze(-1), labels[..., :-1]], dim=-1)
    if draft.markov_head is not None:
        logits = logits + draft.markov_head.block_bias(hidden, prev_ids).float()
    w = position_weights(gamma, weights.decay, logits.device)
    draft_labels = DraftVocab.to_draft(draft, labels) if draft.config.reduced_vocab else labels   # -1: outside
    in_vocab = valid & (draft_labels >= 0)

    needs_target = use_l1 or (use_confidence and draft.confidence_head is not None)
    target = (None, None, None)
    if needs_target:
        with torch.no_grad():
            target = target_distributions(draft, batch, target_pos, valid)
    ce, tv = token_losses(logits, torch.where(in_vocab, draft_labels, -1), *target)             # [B, A, g] each
    ce_weight = weights.ce if needs_target else 1.0      # CE alone (DFlash) is the whole loss
    per_sequence = ce_weight * _per_sequence(ce, in_vocab, w)
    metrics = {"ce": float(_per_sequence(ce.detach(), in_vocab, w).mean())}
    if use_l1:
        per_sequence = per_sequence + weights.l1 * _per_sequence(tv, valid, w)
        metrics["l1"] = float(_per_sequence(tv.detach(), valid, w).mean())
    if use_confidence and draft.confidence_head is not None:
        confidence_logits = draft.confidence_logits(hidden, prev_ids)                           # [B, A, g]
        soft_label = (1 - 0.5 * tv).detach().clamp(0, 1)
        bce = F.binary_cross_entropy_with_logits(confidence_logits, soft_label, reduction="none")
        per_sequence = per_sequence + weights.confidence * _per_sequence(bce, valid, w)
        metrics["bce"] = float(_per_sequence(bce.detach(), valid, w).mean())
    with torch.no_grad():
        hits = (logits.argmax(-1) == draft_labels) & valid
        metrics["acc_first"] = float(hits[..., 0].sum() / valid[..., 0].sum().clamp(min=1))
        metrics["supervised"] = int(valid.sum())
    return per_sequence, metrics


def dspark_loss(draft, batch: TrainBatch, backend, generators: list, cfg):
    """The DSpark objective with a TrainConfig's weights (the registry's loss for "dspark")."""
    return parallel_draft_loss(draft, batch, backend, generators, cfg.num_anchors,
                               LossWeights(cfg.ce_weight, cfg.l1_weight, cfg.confidence_weight, cfg.loss_decay),
                               anchor_density=cfg.anchor_density)


def dflash_loss(draft, batch: TrainBatch, backend, generators: list, cfg):
    """DFlash: the parallel backbone's CE alone (the registry's loss for "dflash")."""
    return parallel_draft_loss(draft, batch, backend, generators, cfg.num_anchors,
                               LossWeights(decay=cfg.loss_decay), use_l1=False, use_confidence=False,
                               anchor_density=cfg.anchor_density)
