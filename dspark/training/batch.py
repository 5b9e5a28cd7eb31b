"""What one training step sees: token sequences, their loss mask and the frozen target's features."""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor       # [B, T] long, right-padded with 0
    loss_mask: torch.Tensor       # [B, T] bool: True on response tokens the draft learns to predict
    lengths: torch.Tensor         # [B] long, real length of each sequence
    target_hidden: torch.Tensor   # [B, T, m * d] the target's selected layers (draft.config.target_layer_ids), concatenated
    target_last: torch.Tensor     # [B, T, d] the target's final hidden state after its final norm; the frozen LM
                                  # head turns it into target logits, only where a loss needs them
    target_lse: Optional[torch.Tensor] = None   # [B, T] log-sum-exp of the target's full logits: normalises
                                                # them over a reduced draft vocabulary (None: not needed)

    def __post_init__(self):
        batch, length = self.input_ids.shape
        for name, shape in (("loss_mask", (batch, length)), ("lengths", (batch,))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"TrainBatch.{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        for name in ("target_hidden", "target_last"):
            if tuple(getattr(self, name).shape[:2]) != (batch, length):
                raise ValueError(f"TrainBatch.{name} must start with ({batch}, {length}), "
                                 f"got {tuple(getattr(self, name).shape)}")
        self.loss_mask = self.loss_mask.bool()

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] bool: positions inside each sequence (not padding)."""
        return torch.arange(self.input_ids.shape[1], device=self.input_ids.device) < self.lengths.unsqueeze(1)
