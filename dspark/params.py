"""Typed public configuration and results: SamplingParams, EngineConfig, GenerationOutput."""
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch

from .errors import ConfigError
from .ops import SCHEDULE_MODES

ACCEPTANCE_SOURCES = ("auto", "head", "margin", "both")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


@dataclass
class SamplingParams:
    """How one request samples. temperature 0 = greedy; top_k 0 = off; top_p 1 = off.

    A fixed `seed` makes a request's output reproducible and independent of the
    other requests in its batch (each request owns its own random generator).
    Generation stops at `max_new_tokens`, at any of `stop_token_ids`, or at the
    model's end-of-sequence tokens unless `ignore_eos` is set.
    """
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[list] = None
    ignore_eos: bool = False
    # Stop strings: generation ends when the text contains one; the text returned stops before
    # it (the token ids end with the token that completed it).
    stop: Optional[list] = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2 ** 63 <= self.seed < 2 ** 64):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not all(isinstance(s, str) and s for s in self.stop):
                raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
                raise ConfigError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class EngineConfig:
    """Engine settings (`Engine.from_pretrained(..., **config)`).

    dtype: "auto" (the backend's default), "float32", "bfloat16", "float16", "float64".
    max_batch_size: requests decoded together (KV-cache slots); more prompts queue.
    max_model_len: positions per request (prompt + output); None = min(model limit, 4096).
    schedule: how many drafted tokens each request verifies:
        "fixed"     verify_len drafts (default: the whole block);
        "threshold" while prefix survival >= threshold;
        "causal"    paper Algorithm 1 against the device cost model (needs current confidences:
                    one extra device->host copy per round);
        "budget"    the zero-overhead production variant: a token budget from confidences
                    `budget_lag` rounds old, then the top-K current survivals (one copy per round).
        All but "fixed" need confidences: a DSpark draft's confidence head, or for any other
        draft the margin estimator (see `acceptance`).
    cost_profile: a YAML profile from `dspark calibrate`; None = the backend's analytic prior.
    online_costs: refit the cost model from the engine's own measured rounds while serving,
        starting from cost_profile or the prior (engine.cost_model.to_yaml exports it);
        False keeps the starting model frozen.
    acceptance: where the load-aware schedules' confidences come from: "head" (the draft's
        confidence head), "margin" (a logistic model of the draft's top-2 margin, fitted online
        from verified rounds), "both" (that model over the margin and the head's logit), or
        "auto" (the head when the draft has one, else the margin).
    calibration: how a confidence head's logits become the confidences the non-fixed schedules
        use: "online" (default: the stored STS temperatures, then a per-position logistic map
        refitted from verified rounds while serving, see dspark.scheduling.calibration) or
        "offline" (the stored STS temperatures alone).
    static_shapes: pad each round to the backend's token buckets, all request rows and the full
        context (the code path graph capture uses); outputs are unchanged.
    graphs: capture each bucket's verify step once and replay it (implies static_shapes);
        None = the backend's default (on for cuda / ascend, off for the CPU reference).
    """
    dtype: str = "auto"
    max_batch_size: int = 8
    max_model_len: Optional[int] = None
    schedule: str = "fixed"
    verify_len: Optional[int] = None
    threshold: float = 0.5
    cost_profile: Optional[str] = None
    online_costs: bool = True
    acceptance: str = "auto"
    budget_lag: int = 2
    calibration: str = "online"
    # Run every round through the fixed-shape (padded, bucketed) step that graph capture
    # replays; on the CPU this tests that path. Backends with graphs turn it on themselves.
    static_shapes: bool = False
    # Capture each fixed-shape verify step once per token bucket and replay it (implies
    # static_shapes). Default: what the backend supports (CUDA yes; the CPU reference no).
    graphs: Optional[bool] = None

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.schedule not in SCHEDULE_MODES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULE_MODES)}")
        if _not_int(self.max_batch_size) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if self.max_model_len is not None and (_not_int(self.max_model_len) or self.max_model_len < 2):
            raise ConfigError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.verify_len is not None and (_not_int(self.verify_len) or self.verify_len < 0):
            raise ConfigError(f"verify_len must be an integer >= 0, got {self.verify_len!r}")
        if _not_int(self.budget_lag) or self.budget_lag < 1:
            raise ConfigError(f"budget_lag must be an integer >= 1, got {self.budget_lag!r}")
        if not isinstance(self.online_costs, bool):
            raise ConfigError(f"online_costs must be True or False, got {self.online_costs!r}")
        if self.acceptance not in ACCEPTANCE_SOURCES:
            raise ConfigError(f"acceptance must be one of {', '.join(ACCEPTANCE_SOURCES)}, got {self.acceptance!r}")
        if self.calibration not in ("offline", "online"):
            raise ConfigError(f"calibration must be 'offline' or 'online', got {self.calibration!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(f"unknown engine option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationOutput:
    """The result of one request.

    stats: rounds (speculative rounds after prefill), accepted (accepted draft tokens per
    round), verify_lens (drafted tokens verified per round), tau (mean tokens emitted per
    round, bonus/recovered token included), acceptance_by_position (for each draft position
    k, the fraction of rounds reaching k in which draft k was accepted; None if never reached).
    """
    index: int
    prompt_token_ids: list
    token_ids: list
    text: Optional[str] = None
    finish_reason: str = "length"      # "stop" | "length" | "error" (then `error` says why)
    stats: dict = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class StreamEvent:
    """Tokens of one request accepted in one step (`Engine.stream`)."""
    index: int
    token_ids: list
    text: Optional[str] = None
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    stats: Optional[dict] = None       # on the request's last event: GenerationOutput.stats
