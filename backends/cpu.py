"""The CPU reference backend: eager PyTorch, float32, the reference ops unchanged.

One kernel choice is the CPU's own: frozen linear layers (the target, and the draft at inference)
run through oneDNN with weights packed once into its blocked layout. On small batches (a decode
step of 1-16 tokens) this is about twice as fast as MKL's gemm on the plain row-major weight,
whose small-M path re-reads the weight in an unfriendly order. Training never uses it.
"""
import ctypes
import functools
import os
from typing import Optional

import torch

from .base import Backend


@functools.lru_cache(maxsize=None)
def _onednn_linear_works() -> bool:
    """Whether this torch build has oneDNN's packed linear and it agrees with F.linear."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight, x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.ones(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out, torch.nn.functional.linear(x, weight), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def tune_host_allocator() -> bool:
    """Keep freed memory in the process (glibc malloc) instead of returning it to the system.

    Every decode or training step allocates tensors of several megabytes (logits, attention
    scores, activations). By default glibc serves such blocks with mmap and unmaps them when
    freed, so each step pays the page faults of fresh memory again; measured here, that made a
    draft training step 1.6x slower. This is what a device caching allocator does for GPU
    memory. Once per process; DSPARK_CPU_MALLOC_TUNING=0 turns it off. Returns whether it applied."""
    if os.environ.get("DSPARK_CPU_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 28)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):        # not glibc (macOS, musl): nothing to tune
        return False


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    default_dtype = torch.float32

    def __init__(self, device_index: int = 0):
        super().__init__(device_index)
        tune_host_allocator()

    def memory_limit(self) -> Optional[int]:
        """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def inference_linear(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not _onednn_linear_works():
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        bias = None if bias is None else bias.detach()

        def linear(x: torch.Tensor) -> torch.Tensor:            # [M, in] -> [M, out]
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return linear
