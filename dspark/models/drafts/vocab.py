"""The draft's view of the target's vocabulary: the frozen embedding and LM head it shares with
the target (with the target's embedding scale and logit soft-capping), and a reduced draft
vocabulary (EAGLE-3's d2t / t2d maps)."""
from typing import Optional

import torch
from torch import nn

from ...errors import CheckpointError
from ..layers import Linear


class DraftVocab:
    """A reduced draft vocabulary, in EAGLE-3's convention: the draft's LM head has one row per
    draft token, `d2t` [Vd] int64 holds offsets (target id = draft id + d2t[draft id]) and `t2d`
    [V] bool marks the target tokens the draft can propose. The draft distribution is expanded
    to the full vocabulary with zero mass outside, so verification is unchanged and stays exact:
    a target token the draft cannot propose is simply never accepted as a draft.

    Worked example: V = 6, draft tokens = target ids [0, 2, 5] -> d2t = [0, 1, 3],
    t2d = [T, F, T, F, F, T], to_draft([5, 1]) = [2, -1]."""

    @staticmethod
    def register(module: nn.Module, vocab_size: int, draft_vocab_size: int) -> None:
        """Add the d2t / t2d buffers (names as in EAGLE-3's release) to a draft module."""
        module.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        module.register_buffer("t2d", torch.zeros(vocab_size, dtype=torch.bool))

    @staticmethod
    def set_tokens(module: nn.Module, target_ids) -> None:
        """Fill d2t / t2d from the (sorted, distinct) target ids of the draft tokens."""
        ids = torch.as_tensor(sorted(set(int(i) for i in target_ids)), dtype=torch.long)
        if ids.numel() != module.d2t.numel():
            raise ValueError(f"expected {module.d2t.numel()} distinct draft tokens, got {ids.numel()}")
        if ids.min() < 0 or ids.max() >= module.t2d.numel():
            raise ValueError("draft token ids must lie inside the target vocabulary")
        module.d2t.copy_(ids - torch.arange(ids.numel()))
        module.t2d.zero_()
        module.t2d[ids] = True

    @staticmethod
    def target_ids(module: nn.Module) -> torch.Tensor:
        """[Vd] the target id of each draft token."""
        return torch.arange(module.d2t.numel(), device=module.d2t.device) + module.d2t

    @staticmethod
    def check(module: nn.Module, source: str) -> None:
        """The maps loaded from a checkpoint must describe the same token set."""
        ids = DraftVocab.target_ids(module)
        ok = bool((ids >= 0).all() and (ids < module.t2d.numel()).all())
        ok = ok and bool((ids[1:] > ids[:-1]).all()) and int(module.t2d.sum()) == ids.numel() \
            and bool(module.t2d[ids].all())
        if not ok:
            raise CheckpointError(f"{source}: d2t and t2d do not describe the same set of draft tokens")

    @staticmethod
    def expand(module: nn.Module, values: torch.Tensor, fill: float) -> torch.Tensor:
        """[..., Vd] in draft order -> [..., V] with `fill` at tokens outside the draft vocabulary."""
        out = values.new_full(values.shape[:-1] + (module.t2d.numel(),), fill)
        out[..., DraftVocab.target_ids(module)] = values
        return out

    @staticmethod
    def to_draft(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft ids, -1 where the draft cannot propose the token."""
        index = torch.cumsum(module.t2d.long(), 0) - 1
        return torch.where(module.t2d[ids], index[ids], torch.full_like(ids, -1))


class ScaledEmbedding(nn.Embedding):
    """Token embedding times `scale`, the scale rounded to the weight dtype first, exactly as
    Gemma targets embed (scale sqrt(d)); scale 1 is a plain embedding."""

    def __init__(self, num_embeddings: int, dim: int, scale: float = 1.0):
        super().__init__(num_embeddings, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        return x if self.scale == 1.0 else x * torch.tensor(self.scale, dtype=x.dtype, device=x.device)


class LMHead(Linear):
    """The (frozen, target-copied) LM head, with the target's final-logit soft-capping
    cap * tanh(logits / cap) when it has one. Training computes the target's distribution
    through this same module, so both sides of every loss are on the target's scale."""

    def __init__(self, dim: int, vocab_size: int, softcap: Optional[float] = None):
        super().__init__(dim, vocab_size, bias=False)
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap



__all__ = ["DraftVocab", "LMHead", "ScaledEmbedding"]
