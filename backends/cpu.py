"""The CPU reference backend: eager PyTorch, float32, the reference ops unchanged.

One kernel choice is the CPU's own: frozen linear layers (the target, and the draft at inference)
run either through MKL (F.linear on the plain weight) or through oneDNN with the weight packed
once into its blocked layout. Which is faster for a step of few rows depends on the CPU, so it is
measured, not assumed. Over all of SmolLM2-135M's linear layers (425 MB of float32 weights
without the embedding, so memory-bound), in ms per forward on 2 cores:

    rows                                1     2     3     4     8    16    32    64
    Intel (AVX-512, AMX)  F.linear   21.9  25.0  27.7  40.3  54.2  55.3  64.8 100.0
                          oneDNN     29.4  32.4  34.0  31.6  44.1  51.9  64.8  95.8
    AMD EPYC (AVX2)       F.linear   35.6  55.3  69.0  56.2  53.2  62.7 113.2 133.0
                          oneDNN     30.5  28.8  29.3  32.3  40.4  51.4  77.2 125.3

On the Intel CPU, MKL's matrix-vector path wins for 1-3 rows; on the AMD one oneDNN wins at
every size, by 2x at 2-3 rows (the verify widths of a cautious schedule at batch 1). From 4 rows
the packed layout won on both. So for 1-3 rows the backend times both kernels once per machine
on a SmolLM2-shaped weight set larger than the CPU's caches (about half a second), keeps the
faster per row count, and caches the choice under the dspark cache directory keyed by CPU model,
torch version and thread count. `DSPARK_CPU_LINEAR=mkl|onednn` fixes the choice instead. Both
kernels compute the same product (within float32 rounding). Training never uses either.

Linears that read the same input (q/k/v, gate/up: a module's `linear_groups`) are packed as one
weight, so a decoder layer makes four calls instead of seven. Over SmolLM2's 30 layers on the AMD
CPU (min of 15 passes, oneDNN, ms): 28.8 -> 20.4 at 1 row, 39.7 -> 27.2 at 8 rows. End to end the
gain is smaller, 1.05-1.06x for plain decoding and for whole-block rounds (`tools/ab_fused_linears.py`,
docs/BENCHMARKS.md): the LM head and the non-matmul ops of a step do not change.
Rows that MKL serves still run one F.linear per weight, so no unpacked copy of the group is kept.
"""
import ctypes
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from ..files import cache_root, write_text_atomic
from .base import Backend

log = logging.getLogger(__name__)

LINEAR_ENV = "DSPARK_CPU_LINEAR"        # auto (measure once per machine, the default) | mkl | onednn
MEASURED_ROWS = (1, 2, 3)               # from 4 rows the packed layout won on every CPU measured (docstring)
TUNING_FILE = "cpu_linear.json"


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


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """'AMD EPYC, AVX2' or 'Intel(R) Xeon(R) ..., AVX-512, AMX' from Linux's cpuinfo; None elsewhere."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get("model name")
    if not name:
        return None
    flags = set(fields.get("flags", "").split())
    isa = [label for label, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    return ", ".join([" ".join(name.split())] + isa)


def time_linear_kernels(rows=MEASURED_ROWS, megabytes: float = 96.0, repeats: int = 3, weights=None,
                        statistic=min) -> dict:
    """{rows: (F.linear ms, oneDNN ms)} per forward over a list of float32 weights: by default a set
    shaped like SmolLM2's MLPs (1536 x 576 and 576 x 1536, alternating) of about `megabytes`, more
    than a CPU's caches hold, so the timing sees the memory-bound regime decoding runs in.
    `statistic` (default: the best) over `repeats` timed passes after one untimed warm-up pass,
    kernels interleaved."""
    gen = torch.Generator().manual_seed(0)
    if weights is None:
        count = max(2, int(megabytes * 2 ** 20 / (1536 * 576 * 4)))
        weights = [torch.empty(shape).uniform_(-0.05, 0.05, generator=gen)
                   for shape in ((1536, 576), (576, 1536)) * (count // 2)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    widths = sorted({w.shape[1] for w in weights})
    inputs = {n: {k: torch.empty(n, k).uniform_(-1, 1, generator=gen) for k in widths} for n in rows}
    kernels = {"mkl": lambda x, w, p: torch.nn.functional.linear(x, w),
               "onednn": lambda x, w, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")}
    times = {(n, name): [] for n in rows for name in kernels}
    with torch.no_grad():
        for attempt in range(repeats + 1):           # the first pass warms both kernels up, untimed
            for n in rows:
                for name, kernel in kernels.items():
                    started = time.perf_counter()
                    for w, p in zip(weights, packed):
                        kernel(inputs[n][w.shape[1]], w, p)
                    if attempt:
                        times[n, name].append((time.perf_counter() - started) * 1e3)
    return {n: (statistic(times[n, "mkl"]), statistic(times[n, "onednn"])) for n in rows}


def linear_choice() -> str:
    """DSPARK_CPU_LINEAR: auto (the default), mkl or onednn; anything else is a ConfigError."""
    choice = os.environ.get(LINEAR_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "mkl", "onednn"):
        raise ConfigError(f"{LINEAR_ENV}={os.environ[LINEAR_ENV]!r} is not a CPU linear kernel choice; "
                          f"use auto (measure once per machine), mkl or onednn")
    return choice


@functools.lru_cache(maxsize=None)
def mkl_rows() -> frozenset:
    """The row counts whose frozen linears run through F.linear (MKL); every other count runs
    through oneDNN's packed weight. From DSPARK_CPU_LINEAR, else from the per-machine cache, else
    measured now (module docstring)."""
    choice = linear_choice()
    if choice == "mkl":
        return frozenset(MEASURED_ROWS)
    if choice == "onednn":
        return frozenset()
    key = f"{cpu_model() or 'unknown CPU'} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_root() / TUNING_FILE
    entries = _read_tuning(path)
    cached = entries.get(key)
    if isinstance(cached, dict) and isinstance(cached.get("mkl_rows"), list) \
            and all(isinstance(n, int) for n in cached["mkl_rows"]):
        return frozenset(cached["mkl_rows"])
    log.info("timing the CPU's linear kernels for 1-3 rows once for this machine (cached in %s)", path)
    times = time_linear_kernels()
    chosen = sorted(n for n, (mkl, onednn) in times.items() if mkl < onednn)
    entries[key] = {"mkl_rows": chosen, "ms": {str(n): [round(t, 2) for t in pair] for n, pair in times.items()}}
    try:
        write_text_atomic(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError as exc:                                  # a read-only cache: measure again next process
        log.info("could not cache the CPU linear kernel choice in %s: %s", path, exc)
    return frozenset(chosen)


def _read_tuning(path: Path) -> dict:
    """The cached kernel choices by machine key; {} when the file is missing or corrupt (then the
    choice is measured again and the file rewritten)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    default_dtype = torch.float32

    def __init__(self, device_index: int = 0):
        super().__init__(device_index)
        linear_choice()                  # a bad DSPARK_CPU_LINEAR fails here, not at the first model load
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

    def inference_linear(self, weights, biases):
        if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights) or not _onednn_linear_works():
            return None
        weights = [w.detach() for w in weights]
        fused = weights[0] if len(weights) == 1 else torch.cat(weights)
        packed = torch.ops.mkldnn._reorder_linear_weight(fused)         # its own copy: `fused` is not kept
        biases = [None if b is None else b.detach() for b in biases]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b for w, b in zip(weights, biases)])
        plain_rows = mkl_rows()

        def linear(x: torch.Tensor) -> torch.Tensor:            # [M, in] -> [M, sum of out]
            if x.shape[0] in plain_rows:                        # MKL on the unfused weights: no second copy
                outs = [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)]
                return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return linear
