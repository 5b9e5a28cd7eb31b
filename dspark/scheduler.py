"""The hardware-aware prefix scheduler as the engine uses it.

`schedule_prefix` is the public entry point over `dspark.ops.schedule`: it turns a
CostModel (or a ready SPS tensor) into the SPS table for this batch and applies the
chosen mode. `RoundPlanner` is the engine's per-run scheduling state: the cost model,
cached SPS tables, and for `budget` mode the confidence history that the token budget
K is computed from, up to `lag` drafted rounds behind the current one (2 in the production
pipeline: while round t runs on the device, the host plans round t + 1 from round t - 1's
confidences, the newest ones already on the host). Anything from a finished round keeps
the schedule lossless; only the current block's confidences must not decide K.
"""
from collections import deque
from typing import Optional, Union

import numpy as np
import torch

from . import ops
from .cost_model import CostModel, ModelSpec, analytic_cost_model, device_spec


def schedule_prefix(
    confidence: torch.Tensor,                 # [R, gamma] conditional confidences c_{r,j}
    cost: Union[CostModel, torch.Tensor],     # a CostModel, or sps[B] (steps/s for B verify tokens)
    mode: str = "causal",
    *,
    context_len: int = 0,
    budget: Optional[int] = None,
    earlier_confidence: Optional[torch.Tensor] = None,  # [R, gamma] history for mode="budget"
    length: Optional[int] = None,
    threshold: float = 0.5,
    caps: Optional[torch.Tensor] = None,      # [R] per-request limits
    max_verify_len: Optional[int] = None,
) -> torch.Tensor:                            # [R] long verify lengths, 0 allowed
    if confidence.dim() != 2:
        raise ValueError(f"confidence must be [R, gamma], got shape {tuple(confidence.shape)}")
    num_requests, gamma = confidence.shape
    if isinstance(cost, CostModel):
        sps = cost.sps_table(num_requests * (gamma + 1), num_requests, context_len)
        if max_verify_len is None and cost.max_query_tokens_per_request:
            max_verify_len = cost.max_query_tokens_per_request - 1
    else:
        sps = torch.as_tensor(cost, dtype=torch.float64)
        if sps.dim() != 1:
            raise ValueError("an SPS table must be 1-D: sps[B] = steps per second for B verify tokens")
    if mode == "budget" and budget is None:
        if earlier_confidence is None:
            raise ValueError("mode='budget' needs a token budget or the confidences of an earlier round")
        budget = ops.best_budget(earlier_confidence, sps, caps)
    return ops.schedule(mode, gamma, confidence, num_requests, length=length, threshold=threshold, sps=sps.to(
        confidence.device), budget=budget, caps=caps, max_verify_len=max_verify_len, device=confidence.device)


def cost_model_for(backend, target_cfg, draft_cfg=None, profile: Optional[str] = None) -> CostModel:
    """A measured profile when given, else the backend's analytic prior for this model."""
    if profile is not None:
        return CostModel.from_yaml(profile)
    bytes_per_value = 4.0 if backend.default_dtype == torch.float32 else 2.0
    return analytic_cost_model(device_spec(backend.device_prior()),
                               ModelSpec.from_configs(target_cfg, draft_cfg, bytes_per_value))


def plan_budget_host(earlier: np.ndarray, sps_with_draft: np.ndarray, sps_without_draft: np.ndarray,
                     caps: np.ndarray, early_break: bool = False) -> Optional[int]:
    """`ops.plan_budget` for the host planner, in NumPy: the same search (same ranking and
    tie-break, same first maximum), without the per-op overhead of small torch tensors.
    The planner runs on the host every round, so this is its hot path; the test suite
    checks that both give the same answer."""
    num_requests, gamma = earlier.shape
    survival = np.cumprod(earlier.astype(np.float64), axis=1)
    valid = np.arange(gamma)[None, :] < np.minimum(caps, gamma)[:, None]
    values = np.sort(survival[valid])[::-1]                          # admissible survivals, descending
    tau = num_requests + np.concatenate([[0.0], np.cumsum(np.clip(values, 0, None))])
    batch = num_requests + np.arange(values.size + 1)
    rate = np.where(batch < sps_with_draft.size, sps_with_draft[np.minimum(batch, sps_with_draft.size - 1)], 0.0)
    theta = tau * rate
    if early_break:
        improves = np.append(theta[1:] > theta[:-1], False)
        budget = int(np.cumprod(improves).sum())
    else:
        budget = int(np.argmax(theta))
    plain = num_requests * sps_without_draft[num_requests] if num_requests < sps_without_draft.size else 0.0
    return budget if theta[budget] > plain else None


class RoundPlanner:
    """Scheduling state of one engine: SPS tables and confidence history.

    Before each round of a load-aware mode, `plan` decides from history alone whether
    drafting pays and, for budget mode, the token budget K. When it does not pay, the
    round decodes plainly; every `probe_every` skipped rounds one round drafts anyway,
    so that the history cannot go stale (a round count, not a token, decides: lossless).
    """

    def __init__(self, cost: CostModel, gamma: int, device, lag: int = 2, context_bucket: int = 256,
                 probe_every: int = 8):
        self.cost, self.gamma, self.device, self.lag = cost, gamma, device, lag
        self.context_bucket, self.probe_every = context_bucket, probe_every
        self._skipped = 0
        self._tables: dict = {}
        self._history: dict = {}                       # request key -> deque of [gamma] confidences
        # Before a request has history, the population's running mean stands in. It starts
        # optimistic (1.0): the first rounds draft, and their confidences correct it.
        self._mean = np.ones(gamma)

    def sps(self, num_requests: int, context_len: int, with_draft: bool = True, on_device: bool = True):
        """The SPS table for this batch size and context bucket (cached): a device tensor for
        the schedule op, or a NumPy array for the host planner."""
        bucket = (context_len // self.context_bucket + 1) * self.context_bucket
        key = (num_requests, bucket, with_draft, on_device)
        if key not in self._tables:
            table = self.cost.sps_table(num_requests * (self.gamma + 1), num_requests, bucket, with_draft)
            self._tables[key] = table.to(self.device) if on_device else table.numpy()
        return self._tables[key]

    def plan(self, keys: list, caps: list, context_len: int, early_break: bool = False) -> Optional[int]:
        """The token budget K for this round, or None to skip the draft (both from history only).
        early_break: judge by where Algorithm 1 would stop (the causal mode), not the global best."""
        # A request's oldest kept confidences: `lag` drafted rounds back when it has them, else
        # its newest. Either way they come from finished rounds, never from the current block.
        rows = []
        for key in keys:
            history = self._history.get(key)
            rows.append(history[0] if history else self._mean)
        earlier, caps_array = np.stack(rows), np.asarray(caps)
        num = len(keys)
        with_draft = self.sps(num, context_len, on_device=False)
        budget = plan_budget_host(earlier, with_draft, self.sps(num, context_len, with_draft=False, on_device=False),
                                  caps_array, early_break)
        if budget is None:
            self._skipped += 1
            if self._skipped < self.probe_every:
                return None
            budget = plan_budget_host(earlier, with_draft, np.zeros(1), caps_array)   # probe: best K anyway
        self._skipped = 0
        return budget

    def record(self, keys: list, confidence: torch.Tensor) -> None:
        """Confidences of a finished round (host tensor [R, gamma])."""
        confidence = confidence.double().numpy()
        for key, row in zip(keys, confidence):
            self._history.setdefault(key, deque(maxlen=self.lag)).append(row)
        self._mean = 0.9 * self._mean + 0.1 * confidence.mean(axis=0)

    def forget(self, key) -> None:
        self._history.pop(key, None)
