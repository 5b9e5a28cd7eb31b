"""Building blocks shared by the target runner and the drafts: Linear, RMSNorm, RoPE, SwiGLU MLP."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import RopeConfig


class Linear(nn.Linear):
    """nn.Linear whose matmul a backend may replace at inference (`prepare_for_inference`).

    The replacement (e.g. oneDNN with prepacked weights on the CPU) is used only while it is
    valid: no gradient is wanted, and the weight is the same tensor, unmodified, that it was
    prepared from. Anything else (training, a reload, `.to(dtype)`) falls back to F.linear.
    """
    kernel = None           # (callable [M, in] -> [M, out], the weight's identity when prepared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not _wants_grad(x, (self,)):
            fn, identity = self.kernel
            if identity == _identity(self.weight):
                return fn(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
            self.kernel = None
        return F.linear(x, self.weight, self.bias)


def linear_group(module: nn.Module, names: tuple, x: torch.Tensor) -> list:
    """The outputs of `module`'s Linears `names` (a group it lists in `linear_groups`), all on the
    same input x: at inference one matmul over their concatenated weights, split afterwards, when
    `prepare_for_inference` gave the group a kernel and every weight is still the one it was
    prepared from; otherwise (training, no kernel, a changed weight) each Linear on its own.

    On the CPU one fused product instead of three (q, k, v) or two (gate, up) saved about 30 % of
    SmolLM2's linear time at 1 and at 8 rows (backends/cpu.py): fewer, wider calls."""
    members = [getattr(module, name) for name in names]
    kernel = (module.__dict__.get("group_kernels") or {}).get(names)
    if kernel is not None and not _wants_grad(x, members):
        fn, identity, sizes = kernel
        if identity == tuple(_identity(m.weight) for m in members):
            out = fn(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], sum(sizes))
            return list(out.split(sizes, dim=-1))
        del module.group_kernels[names]
    return [m(x) for m in members]


def _wants_grad(x: torch.Tensor, linears) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(m.weight.requires_grad for m in linears))


def _identity(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, weight.dtype, weight.device


def prepare_for_inference(model: nn.Module, backend) -> nn.Module:
    """Give the Linears of a frozen model the backend's inference kernel, if it has one: one
    kernel per group a module lists in `linear_groups` (Linears that read the same input, run by
    `linear_group`), one per remaining Linear."""
    grouped = set()
    for module in model.modules():
        groups = {}
        for names in getattr(module, "linear_groups", ()):
            members = [getattr(module, name) for name in names]
            fn = backend.inference_linear([m.weight for m in members], [m.bias for m in members])
            if fn is not None:
                groups[names] = (fn, tuple(_identity(m.weight) for m in members),
                                 [m.out_features for m in members])
                grouped.update(id(m) for m in members)
        if groups:
            module.group_kernels = groups
    for module in model.modules():
        if isinstance(module, Linear):
            fn = None if id(module) in grouped else backend.inference_linear([module.weight], [module.bias])
            module.kernel = None if fn is None else (fn, _identity(module.weight))
    return model


def drop_inference_kernels(model: nn.Module) -> None:
    """Forget every kernel `prepare_for_inference` installed (each holds a copy of its weights):
    the model's Linears go back to F.linear."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.kernel = None
        if "group_kernels" in module.__dict__:
            del module.group_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementations, then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    linear_groups = (("gate_proj", "up_proj"),)

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_group(self, ("gate_proj", "up_proj"), x)
        return self.down_proj(nn.functional.silu(gate) * up)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] for the configured RoPE variant."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept,
        # the band between interpolated smoothly.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(middle, (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq, scaled)
    return inv_freq.float()


class Rotary(nn.Module):
    """cos / sin tables indexed by absolute position (half-rotation layout, as in HF)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        # Kept out of the module's buffers so that `.to(bfloat16)` cannot round it.
        self._inv_freq = {torch.device("cpu"): rope_inv_freq(rope, head_dim)}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq[positions.device] = self._inv_freq[torch.device("cpu")].to(positions.device)
        angles = positions.float().unsqueeze(-1) * inv_freq         # [..., D/2]
        angles = torch.cat([angles, angles], dim=-1)                # [..., D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, D]; cos/sin: [..., D] broadcast over heads."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
