"""The CPU reference backend: eager PyTorch, float32, the reference ops unchanged.

One kernel choice is the CPU's own: frozen linear layers (the target, and the draft at inference)
run through oneDNN with weights packed once into its blocked layout when a step has 4 or more
rows, and through MKL (F.linear on the plain weight) below that. Measured on 2 cores over all of
SmolLM2-135M's linear layers (541 MB of float32 weights, so memory-bound), in ms per forward:

    rows          1     2     3     4     8    16    32    64
    F.linear   21.9  25.0  27.7  40.3  54.2  55.3  64.8 100.0
    oneDNN     29.4  32.4  34.0  31.6  44.1  51.9  64.8  95.8

MKL's matrix-vector path wins for 1-3 rows; from 4 rows it switches to a gemm that re-reads the
row-major weight in an unfriendly order, where the packed layout wins. Training never uses either.
"""
import ctypes
import functools
import os
from typing import Optional

import torch

from .base import Backend

ONEDNN_MIN_ROWS = 4         # fewer rows: MKL's matrix-vector path on the plain weight is faster (module docstring)


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


def _loaded_libgomp():
    """The GNU OpenMP runtime torch runs on, if this process has it loaded (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and line.strip().endswith(".so.1")}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


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

    def release_host_threads(self) -> bool:
        """Free this thread's OpenMP team (OpenMP 5's omp_pause_resource_all, soft pause).

        Each thread that runs torch ops keeps a team of worker threads. With two teams alive on
        2 cores, libgomp has more team threads than cores and stops spinning between parallel
        regions, and the thread doing the work ran SmolLM2's linears 1.7x slower (README, "Calling
        one engine from many threads"). The team is rebuilt if this thread runs torch ops again."""
        libgomp = _loaded_libgomp()
        pause = getattr(libgomp, "omp_pause_resource_all", None) if libgomp is not None else None
        return pause is not None and pause(1) == 0          # 1 = omp_pause_soft

    def inference_linear(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not _onednn_linear_works():
            return None
        weight = weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        bias = None if bias is None else bias.detach()

        def linear(x: torch.Tensor) -> torch.Tensor:            # [M, in] -> [M, out]
            if x.shape[0] < ONEDNN_MIN_ROWS:
                return torch.nn.functional.linear(x, weight, bias)
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return linear
