"""Target features for training: online (the frozen target runs inside the step) or cached.

Online is the default: no hidden states ever touch the disk. `target_features` runs the
frozen target over a padded batch once and returns the selected layers' hidden states and
the final normed hidden state; target *distributions* are never materialised here (the
losses push the final hidden state through the frozen LM head at supervised positions only).
"""
import torch

from ..models import StepBatch


@torch.no_grad()
def target_features(target, backend, input_ids: torch.Tensor, lengths: torch.Tensor, layer_ids) -> tuple:
    """input_ids [B, T] (padded), lengths [B] -> (target_hidden [B, T, m * d], target_last [B, T, d])."""
    batch, length = input_ids.shape
    rows = [input_ids[b, :int(lengths[b])].tolist() for b in range(batch)]
    dtype = next(target.parameters()).dtype
    cache = target.make_cache(batch, length, dtype, backend.device)
    step = StepBatch.build(rows, [0] * batch, list(range(batch)), backend.device)
    out = target(step, cache, backend, logits_indices=step.input_ids.new_zeros(0), hidden_layer_ids=list(layer_ids),
                 final_hidden=True)
    hidden = out.hidden.new_zeros(batch, length, out.hidden.shape[-1])
    last = out.last_hidden.new_zeros(batch, length, out.last_hidden.shape[-1])
    hidden[step.token_rows, step.token_offsets] = out.hidden
    last[step.token_rows, step.token_offsets] = out.last_hidden
    return hidden, last
