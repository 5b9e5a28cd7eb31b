"""Device facts: one `DeviceSpec` per device class the cost model has a prior for.

What lives here: the facts a roofline needs (peak FLOP/s, bandwidth, per-step launch or graph
cost, graph buckets, matmul tile) and the device limits the backends enforce (the query tokens
one request may verify in a forward). Each backend class names the specs it runs as
(`Backend.device_specs`) and takes its limits from them, so every device fact is written once.

Who may import it: the backends and everything above them (dspark.scheduling builds its
analytic priors from these specs). It imports only `dspark.errors`.
"""
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError


@dataclass
class DeviceSpec:
    """Facts a roofline needs. Peak numbers are public datasheet figures, rounded."""
    name: str
    peak_flops: float                 # dense matmul FLOP/s at the serving dtype
    memory_bandwidth: float           # bytes/s
    step_overhead_s: float            # launch / graph replay (+ update) cost of one forward
    graph_buckets: list = field(default_factory=list)  # captured verify-token counts; [] = eager
    tile: int = 1                     # matmul M tile: token counts round up to a multiple of it
    max_query_tokens_per_request: Optional[int] = None
    bytes_per_param: float = 2.0
    compute_efficiency: float = 0.6   # achievable fraction of peak in these small-M matmuls
    bandwidth_efficiency: float = 0.8


def _vllm_style_buckets(largest: int = 512) -> list:
    return [1, 2, 4] + list(range(8, largest + 1, 8))


DEVICE_SPECS = {
    # This development machine's class (2 x86 cores, fp32, eager PyTorch with Python overhead).
    "cpu": DeviceSpec("cpu", peak_flops=1.0e11, memory_bandwidth=1.5e10, step_overhead_s=2e-3, tile=1,
                      bytes_per_param=4.0, compute_efficiency=0.5, bandwidth_efficiency=0.6),
    "a100": DeviceSpec("a100", peak_flops=312e12, memory_bandwidth=2.0e12, step_overhead_s=25e-6,
                       graph_buckets=_vllm_style_buckets(), tile=64),
    "h100": DeviceSpec("h100", peak_flops=989e12, memory_bandwidth=3.35e12, step_overhead_s=20e-6,
                       graph_buckets=_vllm_style_buckets(), tile=64),
    "h200": DeviceSpec("h200", peak_flops=989e12, memory_bandwidth=4.8e12, step_overhead_s=20e-6,
                       graph_buckets=_vllm_style_buckets(), tile=64),
    # Ascend: ACL graphs need sequence lengths updated before each replay (higher per-step cost),
    # the cube unit tiles by 16, and fused attention takes <= 16 query tokens per request.
    "ascend-910b": DeviceSpec("ascend-910b", peak_flops=313e12, memory_bandwidth=1.6e12, step_overhead_s=60e-6,
                              graph_buckets=_vllm_style_buckets(), tile=16, max_query_tokens_per_request=16),
    "ascend-910c": DeviceSpec("ascend-910c", peak_flops=752e12, memory_bandwidth=3.2e12, step_overhead_s=60e-6,
                              graph_buckets=_vllm_style_buckets(), tile=16, max_query_tokens_per_request=16),
}


def device_spec(name: str) -> DeviceSpec:
    key = name.lower()
    if key not in DEVICE_SPECS:
        raise ConfigError(f"no device prior named {name!r}; known: {', '.join(DEVICE_SPECS)}")
    return DEVICE_SPECS[key]


def query_limit(*names: str) -> Optional[int]:
    """The query tokens per request a backend running as any of these devices may verify in one
    forward (None: unlimited); the devices of one backend must agree."""
    limits = {DEVICE_SPECS[name].max_query_tokens_per_request for name in names}
    if len(limits) != 1:
        raise ValueError(f"device specs {names} disagree on max_query_tokens_per_request: {sorted(limits, key=str)}")
    return limits.pop()


__all__ = ["DEVICE_SPECS", "DeviceSpec", "device_spec", "query_limit"]
