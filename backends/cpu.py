"""The CPU reference backend: eager PyTorch, float32, the reference ops unchanged."""
import torch

from .base import Backend


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    default_dtype = torch.float32
