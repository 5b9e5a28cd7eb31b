"""Cost models: how long a verify forward and a draft round take on a device.

The prefix scheduler needs SPS(B), the engine's steps per second when one verify
forward carries B tokens (paper §3.2.2). A `CostModel` is a small table:

    verify_seconds[c][i]  time of a target forward over verify_tokens[i] tokens at
                          context bucket context_lens[c]
    request_seconds       what each request of the batch adds to a round beyond its tokens
                          (host bookkeeping, reading its own KV cache); 0 in the analytic priors
    draft_seconds[j]      time of a draft round for draft_requests[j] requests

Lookups are monotone in B. Inside the captured graph buckets they are step-shaped
(B runs padded to the next bucket, so it costs what the bucket costs); beyond the
largest bucket and between eager grid points they are interpolated linearly, and
extrapolated from the last two points. Tables come from two sources:

    measured   `dspark calibrate` times the real engine on this device (see profile())
    analytic   a roofline prior from a DeviceSpec (peak FLOP/s, bandwidth, per-step
               overhead, graph buckets, matmul tile, per-request query limit) and the
               model's size, for devices we cannot run on (A100/H100/H200, Ascend 910B/C)

The backend supplies the device facts (its DeviceSpec, dspark.backends.devices); nothing here names a device in code paths
the scheduler takes. A serving engine does not keep either table as it is: it refits it from
its own rounds (dspark.scheduling.online_cost), and exports what it learned in this format.
"""
import bisect
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from ..backends.devices import DEVICE_SPECS, DeviceSpec, device_spec  # noqa: F401  (DEVICE_SPECS, device_spec: re-exported)
from ..errors import ConfigError
from ..files import write_text_atomic
from ..yaml_config import read_config_yaml


@dataclass
class ModelSpec:
    """What a roofline needs to know about a target and its draft."""
    target_params: int                # weights read per forward (embedding lookups excluded)
    target_layers: int
    hidden_size: int
    kv_bytes_per_token: float         # K + V over all layers, at the serving dtype
    draft_params: int = 0
    draft_block: int = 0              # gamma
    markov_flops_per_request: float = 0.0

    @classmethod
    def from_configs(cls, target_cfg, draft_cfg=None, bytes_per_value: float = 2.0) -> "ModelSpec":
        t = target_cfg
        attn = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
        layer = attn + 3 * t.hidden_size * t.intermediate_size
        spec = cls(target_params=t.num_layers * layer + t.hidden_size * t.vocab_size,
                   target_layers=t.num_layers, hidden_size=t.hidden_size,
                   kv_bytes_per_token=2 * t.num_layers * t.num_kv_heads * t.head_dim * bytes_per_value)
        if draft_cfg is not None:
            d = draft_cfg
            d_attn = d.hidden_size * d.head_dim * (2 * d.num_heads + 2 * d.num_kv_heads)
            spec.draft_params = (d.num_layers * (d_attn + 3 * d.hidden_size * d.intermediate_size)
                                 + d.hidden_size * d.vocab_size
                                 + len(d.target_layer_ids) * d.hidden_size * d.hidden_size)
            spec.draft_block = d.block_size
            spec.markov_flops_per_request = 2.0 * d.block_size * d.vocab_size * max(d.markov_rank, 0)
        return spec


@dataclass
class CostModel:
    device: str
    source: str                       # "measured" or "analytic"
    verify_tokens: list               # ascending B grid
    context_lens: list                # ascending context buckets
    verify_seconds: list              # [len(context_lens)][len(verify_tokens)]
    draft_requests: list = field(default_factory=lambda: [1])
    draft_seconds: list = field(default_factory=lambda: [0.0])
    graph_buckets: list = field(default_factory=list)
    max_query_tokens_per_request: Optional[int] = None
    request_seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.verify_tokens or sorted(self.verify_tokens) != list(self.verify_tokens):
            raise ConfigError("verify_tokens must be a non-empty ascending list")
        if len(self.verify_seconds) != len(self.context_lens) or \
                any(len(row) != len(self.verify_tokens) for row in self.verify_seconds):
            raise ConfigError("verify_seconds must have one row per context bucket and one column per verify_tokens")
        if len(self.draft_seconds) != len(self.draft_requests):
            raise ConfigError("draft_seconds must have one entry per draft_requests")
        # Monotone by construction: a bigger batch never costs less. Isotonic regression, not a
        # running max, so one noisy spike in a measurement cannot flatten the rest of the curve.
        self.verify_seconds = [_isotonic(row) for row in self.verify_seconds]
        self.draft_seconds = _isotonic(self.draft_seconds)

    # ------------------------------------------------------------------ lookups
    def verify_time(self, tokens: int, context_len: int = 0, requests: int = 0) -> float:
        """Seconds of a round's verify part over `tokens` tokens from `requests` requests."""
        row = self.verify_seconds[self.context_index(context_len)]
        if self.graph_buckets and tokens <= self.graph_buckets[-1]:
            tokens = next(b for b in self.graph_buckets if b >= tokens)
        return _interpolate(self.verify_tokens, row, tokens) + self.request_seconds * requests

    def verify_times(self, tokens: np.ndarray, context_len: int = 0, requests: int = 0) -> np.ndarray:
        """`verify_time` for many token counts at once (the planner builds whole tables)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        if self.graph_buckets:
            buckets = np.asarray(self.graph_buckets, dtype=np.float64)
            inside = tokens <= buckets[-1]
            padded = buckets[np.minimum(np.searchsorted(buckets, tokens), len(buckets) - 1)]
            tokens = np.where(inside, padded, tokens)
        row = self.verify_seconds[self.context_index(context_len)]
        return _interpolate_many(self.verify_tokens, row, tokens) + self.request_seconds * requests

    def draft_time(self, num_requests: int) -> float:
        if num_requests <= 0:
            return 0.0
        return _interpolate(self.draft_requests, self.draft_seconds, num_requests)

    def sps_table(self, max_tokens: int, num_requests: int, context_len: int = 0,
                  with_draft: bool = True) -> torch.Tensor:
        """sps[B] for B = 0..max_tokens: 1 / (verify(B) + draft(R)); sps[0] = 0."""
        draft = self.draft_time(num_requests) if with_draft else 0.0
        times = self.verify_times(np.arange(1, max_tokens + 1), context_len, num_requests) + draft
        return torch.tensor(np.concatenate([[0.0], 1.0 / times]), dtype=torch.float64)

    def context_index(self, context_len: int) -> int:
        """Which context bucket a context length falls in: the first bucket >= it, else the last."""
        return min(bisect.bisect_left(self.context_lens, context_len), len(self.context_lens) - 1)

    # ------------------------------------------------------------------ YAML
    def to_yaml(self, path) -> Path:
        """Write the profile atomically: a crash leaves the old profile or the new one."""
        return write_text_atomic(path, yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def from_yaml(cls, path) -> "CostModel":
        data = read_config_yaml(cls, path, "cost profile", " (create one with `dspark calibrate`)")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cost profile {path}: {exc}") from None


def _isotonic(values: Sequence[float]) -> list:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks = []                                   # [mean, count]
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [mean for mean, count in blocks for _ in range(count)]


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through the grid; linear extrapolation beyond the ends (never below ys[0])."""
    if len(xs) == 1:
        return float(ys[0]) * max(x, 1) / max(xs[0], 1) if x > xs[0] else float(ys[0])
    if x <= xs[0]:
        return float(ys[0])
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    x0, x1, y0, y1 = xs[-2], xs[-1], ys[-2], ys[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def _interpolate_many(xs: Sequence[int], ys: Sequence[float], x: np.ndarray) -> np.ndarray:
    """`_interpolate` over an array of points (same rule: linear inside, extrapolated beyond)."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(xs) == 1:
        return np.where(x > xs[0], ys[0] * np.maximum(x, 1) / max(xs[0], 1), ys[0])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), np.interp(x, xs, ys))


# ---------------------------------------------------------------------- analytic priors

def analytic_cost_model(spec: DeviceSpec, model: ModelSpec, context_lens: Sequence[int] = (512, 2048, 8192),
                        max_tokens: int = 4096, max_requests: int = 512, typical_query_len: int = 4) -> CostModel:
    """A roofline prior: each forward costs overhead + max(compute, memory) time.

    Verify over B tokens at context c: the token count is padded to the matmul tile and,
    inside the captured range, to its graph bucket; compute = 2 * params * B_padded +
    attention 4 * layers * hidden * B * c; memory = the weights once + the KV cache of
    about B / typical_query_len requests. The draft round: one backbone pass over
    R * gamma tokens plus gamma sequential Markov steps (each a small launch).
    """
    grid = sorted(set(spec.graph_buckets) | {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, max_tokens})
    grid = [b for b in grid if b <= max_tokens]
    flops_rate = spec.peak_flops * spec.compute_efficiency
    bytes_rate = spec.memory_bandwidth * spec.bandwidth_efficiency

    def forward_time(tokens, params, context, requests_reading_kv, layers, hidden):
        padded = math.ceil(tokens / spec.tile) * spec.tile
        compute = (2.0 * params * padded + 4.0 * layers * hidden * tokens * context) / flops_rate
        memory = (params * spec.bytes_per_param + requests_reading_kv * context * model.kv_bytes_per_token) / bytes_rate
        return spec.step_overhead_s + max(compute, memory)

    verify = [[forward_time(b, model.target_params, c, math.ceil(b / typical_query_len), model.target_layers,
                            model.hidden_size) for b in grid] for c in context_lens]
    requests = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if r <= max_requests]
    draft = []
    for r in requests:
        if model.draft_params == 0:
            draft.append(0.0)
            continue
        backbone = forward_time(r * model.draft_block, model.draft_params, 0, 0, 1, model.hidden_size)
        markov = model.draft_block * spec.step_overhead_s * 0.25 + r * model.markov_flops_per_request / flops_rate
        draft.append(backbone + markov)
    return CostModel(device=spec.name, source="analytic", verify_tokens=grid, context_lens=list(context_lens),
                     verify_seconds=verify, draft_requests=requests, draft_seconds=draft,
                     graph_buckets=list(spec.graph_buckets),
                     max_query_tokens_per_request=spec.max_query_tokens_per_request,
                     meta={"device_spec": asdict(spec), "model": asdict(model),
                           "typical_query_len": typical_query_len})
