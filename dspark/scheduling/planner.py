"""The prefix scheduler as the engine uses it: the one place that decides, per round and mode,
whether to draft and how many drafted tokens each request verifies.

`RoundPlanner` holds an engine's scheduling state: the mode, the cost model and its cached SPS
tables, and for the load-aware modes the confidence history their decisions come from, up to
`lag` drafted rounds behind the current one (2 in the production pipeline: while round t runs on
the device, the host plans round t + 1 from round t - 1's confidences, the newest already on the
host). Anything from a finished round keeps the schedule lossless; only the current block's
confidences must not decide K. `verify_lengths` is the mode dispatch; `schedule_prefix` is a thin
wrapper around it for one-off use.

    mode       before the draft (host, history)      after the draft (device, this block)     syncs
    fixed      -                                     min(verify_len, cap)                      1
    threshold  -                                     survival >= threshold                     2
    causal     draft or not (where Alg. 1 stops)      Algorithm 1 with its early break          2
    budget     draft or not, and the budget K        the top-K current survivals               1

The cost model may be learning (an OnlineCostModel): its `version` changes when it refits, and
the cached SPS tables are rebuilt then. Its times come from finished rounds only. Confidences
come from a DSpark draft's head or, for drafts without one, from a MarginEstimator; while that
estimator is still warming up, drafted rounds verify whole blocks (`RoundPlan.full`), so its
first fits learn from labels its own choices did not censor; at high load only a quarter of the
requests (at least a refit's worth of rows, at most the rows the next refit still waits for)
draft those blocks, and a warm-up round counts as fresh evidence at its load (probes wait their
interval after it).

Never lock in: when history says drafting does not pay, the planner still drafts one probe
round after `probe_every` skipped rounds, then after twice as many, up to `max_probe_every`
(probes cost time when no speculation is right); a load change (the request count moving to
another power-of-two bucket) or a round where drafting pays again resets the interval, and the
first probe after a load change comes within two rounds. In a probe only R / 4 requests draft
(those with the oldest history) and it verifies at most R / 4 drafted tokens (its best budget,
capped): enough to refresh the confidence history and to time the draft and a bigger verify, so
a wrong "no speculation" is corrected by measurement, and cheap when no speculation is right.
The mirror case: with a learning cost model, a round at a load and context whose plain step was
never timed decodes plainly (twice), so drafting is never chosen against an extrapolated plain
cost.

What the rounds it chose delivered: the plan's expected tokens are biased where it drafts,
because it drafts exactly where an estimate looks good (the winner's curse). On SmolLM2 at 4
requests on 2 cores, the drafted rounds emitted 0.56-0.88x the tokens they were planned for, so
a planned gain of 1.16-1.7 over plain decoding was 0.74-1.09 in fact. So the engine reports every
round it ran (`observe_round`: tokens emitted, seconds), and per load (power-of-two bucket of the
request count) the planner keeps decayed sums of the tokens its drafted rounds (probes included)
emitted and of the tokens their plans expected. Their ratio, shrunk towards 1 while its evidence
(counted in request-rounds) is thin, scales the drafted side of the comparison. Seconds are not
judged: the cost model learns them from the same rounds, and judging them here too counted the
machine's slow stretches twice. The sums fade with every round at that load, so evidence that
drafting lost ages out and the model's own word returns: a load where drafting lost is re-tried
after a while, never locked out. Rounds planned from the neutral start (every confidence 0.5)
before any block was seen are not judged. Lossless: only finished rounds feed it.

What the budget is planned from: a request's confidences `lag` drafted rounds back, shrunk
towards the running mean by the slope a block's confidences have on that history (learned
online, `shrink`): history two rounds old predicts little, and planning from it raw drafted
whenever a past block had looked lucky. A history older than `lag` + 1 rounds gives way to the
running mean, which starts neutral (`START_CONFIDENCE`) until the first block is recorded.

What a request's own verified rounds add: the head's confidences are calibrated on the population,
but one request's text can sit far from it (on SmolLM2, a prose answer accepted 1 of 33 drafted
pairs the head rated at about 0.3). So each request keeps a decayed count of its accepted drafts
and of the confidences that predicted them, over the positions its rounds verified, and the
planner scales the request's planning confidences by (accepted + k) / (predicted + k), k =
`OUTCOME_PRIOR` expected accepts: a new request plans from the head alone, and a request whose
drafts keep failing stops drafting after some rounds (probes keep testing it). Lossless: the
counts come from finished rounds only.
"""
from collections import deque
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .. import ops
from ..errors import ConfigError
from .cost_model import CostModel, ModelSpec, analytic_cost_model, device_spec


@dataclass
class RoundPlan:
    """What the host decided before a round: whether to draft, the budget K (budget mode), and
    whether every request verifies its whole block (an estimator warming up)."""
    draft: bool
    budget: Optional[int] = None
    full: bool = False
    probe: bool = False
    rows: Optional[list] = None      # the requests (batch indices) that draft; None = all of them
    # What the planner expected of the round it chose (load-aware modes): tokens emitted, seconds
    # it costs, and the seconds of a plain round instead (None where it did not price the round)
    tokens: Optional[float] = None
    seconds: Optional[float] = None
    plain_seconds: Optional[float] = None


def verify_lengths(mode: str, backend, confidence: Optional[torch.Tensor], caps: torch.Tensor, *,
                   verify_len: Optional[int] = None, threshold: float = 0.5, sps: Optional[torch.Tensor] = None,
                   budget: Optional[int] = None) -> tuple[torch.Tensor, Optional[int]]:
    """Verify lengths [R] on the device for one round, and the number of drafted tokens verified
    in total when the host knows it without looking (fixed, budget), else None (one more sync).
    caps [R]: the most drafts each request may verify (gamma, the backend's limit, its room)."""
    caps = caps.clamp(min=0)
    if mode == "fixed":
        return (caps if verify_len is None else caps.clamp(max=verify_len)), None
    if confidence is None:
        raise ConfigError(f"the {mode!r} schedule needs confidences (a DSpark draft's confidence head)")
    if mode == "threshold":
        return torch.minimum(backend.schedule_threshold(confidence, threshold), caps), None
    if mode == "causal":
        if sps is None:
            raise ConfigError("the 'causal' schedule needs an SPS table (a cost model)")
        return backend.schedule_causal(confidence, sps, caps), None
    if mode == "budget":
        if budget is None:
            raise ConfigError("the 'budget' schedule needs a token budget K (planned from earlier rounds)")
        return backend.schedule_topk(confidence, budget, caps), None
    raise ConfigError(f"unknown schedule mode {mode!r}; valid: {', '.join(ops.SCHEDULE_MODES)}")


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
    backend=None,
) -> torch.Tensor:                            # [R] long verify lengths, 0 allowed
    """Verify lengths for one block of confidences under a schedule mode, outside an engine."""
    from ..backends import Backend

    if confidence.dim() != 2:
        raise ConfigError(f"confidence must be [R, gamma], got shape {tuple(confidence.shape)}")
    num_requests, gamma = confidence.shape
    if isinstance(cost, CostModel):
        sps = cost.sps_table(num_requests * (gamma + 1), num_requests, context_len)
        if max_verify_len is None and cost.max_query_tokens_per_request:
            max_verify_len = cost.max_query_tokens_per_request - 1
    else:
        sps = torch.as_tensor(cost, dtype=torch.float64)
        if sps.dim() != 1:
            raise ConfigError("an SPS table must be 1-D: sps[B] = steps per second for B verify tokens")
    limit = gamma if max_verify_len is None else min(gamma, max_verify_len)
    caps = torch.full((num_requests,), limit, dtype=torch.long, device=confidence.device) if caps is None \
        else torch.clamp(caps.to(confidence.device), max=limit)
    if mode == "budget" and budget is None:
        if earlier_confidence is None:
            raise ConfigError("mode='budget' needs a token budget or the confidences of an earlier round")
        budget = ops.plan_budget(earlier_confidence, sps, caps=caps) or 0
    lens, _ = verify_lengths(mode, backend or Backend(), confidence, caps, verify_len=length, threshold=threshold,
                             sps=sps.to(confidence.device), budget=budget)
    return lens


def cost_model_for(backend, target_cfg, draft_cfg=None, profile: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None) -> CostModel:
    """A measured profile when given, else the backend's analytic prior for this model, priced
    in the dtype the engine actually runs (float32 moves twice the bytes of bfloat16)."""
    if profile is not None:
        return CostModel.from_yaml(profile)
    dtype = dtype or backend.default_dtype
    bytes_per_value = float(torch.tensor([], dtype=dtype).element_size())
    return analytic_cost_model(device_spec(backend.device_prior()),
                               ModelSpec.from_configs(target_cfg, draft_cfg, bytes_per_value))


def _load_bucket(num_requests: int) -> int:
    """The power-of-two bucket of a request count: loads the planner keeps apart."""
    return max(num_requests, 1).bit_length()


def _expected_tokens(earlier: np.ndarray, caps: np.ndarray, budget: int, num_requests: int) -> float:
    """Tokens a round is expected to emit when the `budget` best survivals of `earlier` verify."""
    survival_values = np.cumprod(earlier, axis=1)
    valid = np.arange(earlier.shape[1])[None, :] < np.minimum(caps, earlier.shape[1])[:, None]
    return num_requests + float(np.sort(survival_values[valid])[::-1][:budget].sum())


class RoundPlanner:
    """Scheduling state of one engine: the mode, SPS tables, confidence history and probing.

    Before each round of a load-aware mode, `before_round` decides from history alone whether
    drafting pays and, for budget mode, the token budget K. When it does not pay, the round
    decodes plainly, except for probe rounds (see the module docstring); a round count and the
    request count decide when to probe, never a token: lossless.
    """

    DRAFT_MARGIN = 0.05
    SHRINK_DECAY = 0.95                # per recorded round: the slope follows the last ~20 rounds
    PLAIN_SAMPLES = 2                  # plain rounds timed at a load and context before drafting there
    # A request's own evidence is weighed against OUTCOME_PRIOR expected accepts and fades by
    # OUTCOME_DECAY per drafted round of it (~10 rounds speak). In simulation (a CPU-like cost,
    # 1 request, dspark.bench.simulator.miscalibrated_run) a prior of 1 with decay 0.8 stopped drafting on
    # unlucky streaks and lost 18 % where the head was right; 5 and 0.9 lose nothing there and
    # gain 35 % where the head is 10x overconfident.
    OUTCOME_PRIOR = 5.0
    OUTCOME_DECAY = 0.9
    # What delivered rounds say about the plan's own predictions (see the module docstring): the
    # evidence of a load fades by REALIZED_DECAY per round run at it (~30 rounds speak) and is
    # weighed against REALIZED_PRIOR request-rounds at the plan's word. Counted in requests, not
    # rounds: a round's emitted tokens are a sum over its requests, and at 1 request (1 to 8
    # tokens a round) a prior of 3 rounds let an unlucky streak of a DFlash draft stop drafting
    # that paid 1.15x; at 4 requests it is 3 rounds, at 16 and more one round outweighs it.
    REALIZED_DECAY = 0.97
    REALIZED_PRIOR = 12.0
    START_CONFIDENCE = 0.5

    def __init__(self, mode: str, cost, gamma: int, device, lag: int = 2, probe_every: int = 16,
                 max_probe_every: int = 128, verify_len: Optional[int] = None, threshold: float = 0.5,
                 estimator=None):
        self.mode, self.cost, self.gamma, self.device, self.lag = mode, cost, gamma, device, lag
        self.verify_len, self.threshold, self.estimator = verify_len, threshold, estimator
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self._skipped, self._interval, self._load = 0, probe_every, None
        self._tables: dict = {}
        self._history: dict = {}                       # request key -> deque of [gamma] confidences
        self._seen: dict = {}                          # request key -> the round its history was last added to
        self._outcomes: dict = {}                      # request key -> [accepted, predicted] (decayed sums)
        self._rounds = 0
        # Before a request has history, the population's running mean stands in. It starts
        # neutral (START_CONFIDENCE), and the first recorded block replaces it. An optimistic
        # start (1.0) drafted every request's whole block in the first round at every load: on
        # SmolLM2 at 8 requests on 2 cores, 2.5 plain rounds spent where plain decoding is right.
        # From 0.5, a load where drafting cannot pay at that acceptance begins with plain rounds
        # and a probe (a quarter of the requests), and one where it pays still drafts.
        self._mean = np.full(gamma, self.START_CONFIDENCE)
        self._recorded = False
        # How much a request's history says about its next block beyond the running mean: the
        # regression slope of a block's confidences on the history row that planned it (both
        # centred on the mean), over recent rounds. On SmolLM2, blocks two rounds apart correlate
        # at 0.46, and planning from the raw history drafted whenever a request's past block
        # looked lucky (the winner's curse): 15 % of the rounds at 8 requests, each a loss.
        self.shrink, self._sxy, self._sxx = 1.0, 0.0, 0.0
        # Per load bucket, decayed sums over delivered rounds: drafted [count, tokens, planned
        # tokens, seconds, planned seconds], then plain [count, seconds, planned seconds].
        self._realized: dict = {}
        self._last: Optional[tuple] = None             # (the plan of the round in flight, its load bucket, R)

    @property
    def load_aware(self) -> bool:
        return self.mode in ("causal", "budget")

    def use_cost_model(self, cost) -> None:
        """Price rounds with another cost model from now on (the cached tables are dropped)."""
        self.cost = cost
        self._tables.clear()

    def sps(self, num_requests: int, context_len: int, with_draft: bool = True, on_device: bool = True):
        """The SPS table for this batch size and context bucket (cached until the cost model
        refits): a device tensor for the schedule op, or a NumPy array for the host planner."""
        bucket = self.cost.context_index(context_len)
        key, version = (num_requests, bucket, with_draft, on_device), getattr(self.cost, "version", 0)
        cached = self._tables.get(key)
        if cached is None or cached[0] != version:
            table = self.cost.sps_table(num_requests * (self.gamma + 1), num_requests, self.cost.context_lens[bucket],
                                        with_draft)
            cached = self._tables[key] = (version, table.to(self.device) if on_device else table.numpy())
        return cached[1]

    def before_round(self, keys: list, caps: list, context_len: int) -> RoundPlan:
        """Whether this round drafts, and its budget: from history only, before the draft runs."""
        judged = self._recorded       # the neutral start (no block seen yet) is a placeholder, not a plan
        plan = self._plan(keys, caps, context_len)
        self._last = (plan, _load_bucket(len(keys)), len(keys)) if judged else None
        return plan

    def observe_round(self, tokens: float, seconds: float) -> None:
        """What the round planned last delivered: tokens emitted (every request's accepted drafts
        plus one) and its measured seconds. Only drafted rounds the plan priced teach (fixed and
        threshold modes, an estimator's whole blocks do not); their seconds are the cost model's
        to learn (`_learn_costs`), so only the tokens are judged here."""
        plan, load, requests = self._last or (None, None, 0)
        self._last = None
        if plan is None or plan.seconds is None or plan.full:
            return
        sums = self._realized.setdefault(load, np.zeros(3))
        sums *= self.REALIZED_DECAY
        if plan.draft:
            sums += (requests, tokens, plan.tokens)

    def realized_ratio(self, num_requests: int) -> float:
        """How many tokens drafted rounds at this load emitted over how many their plans expected,
        shrunk towards 1 by n / (n + REALIZED_PRIOR) for n request-rounds of evidence; 1.0 without."""
        sums = self._realized.get(_load_bucket(num_requests))
        if sums is None or sums[0] <= 0:
            return 1.0
        count, tokens, planned = sums
        return float((tokens / planned) ** (count / (count + self.REALIZED_PRIOR)))

    def _plan(self, keys: list, caps: list, context_len: int) -> RoundPlan:
        if self.mode != "fixed" and self.estimator is not None and self.estimator.needs_full_blocks:
            # Whole blocks of a quarter of the requests (at least min_rows, a refit's worth), and no
            # more than the next refit still waits for: the estimator needs labels, not every
            # request's. At 64 requests on SmolLM2 a whole-block round of every request cost 5 plain
            # rounds; at 16 the second warm-up round (one row wanted) drafted all 16 requests'
            # blocks where one request's does (3.3 plain rounds against 1.4).
            size = min(max(self.estimator.min_rows, len(keys) // 4), self.estimator.rows_wanted)
            rows = self._oldest_rows(keys, size)
            # Fresh evidence at this load, as a probe's would be: the next probe waits its interval.
            self._load, self._skipped = _load_bucket(len(keys)), 0
            budget = sum(max(caps[i], 0) for i in (rows if rows is not None else range(len(keys))))
            return RoundPlan(draft=True, budget=budget, full=True, rows=rows)
        if not self.load_aware:
            return RoundPlan(draft=True)
        # A request's oldest kept confidences: `lag` drafted rounds back when it has them, else
        # its newest. Either way they come from finished rounds, never from the current block.
        # A history more than `lag` + 1 rounds old (the request's last rounds did not draft) gives
        # way to the running mean: one bad block must not stop a request from drafting until the
        # next probe (at 1 request, the planner drafted a third of the rounds where drafting paid).
        self._rounds += 1
        earlier = np.stack([self._mean + self.shrink * (self._history[key][0] - self._mean)
                            if self._history.get(key) and self._rounds - self._seen[key] <= self.lag + 1
                            else self._mean for key in keys])
        earlier = np.clip(earlier * self.outcome_ratios(keys)[:, None], 0.0, 1.0)
        num, caps_array = len(keys), np.asarray(caps)
        # Scaled by what drafted rounds here delivered against their plan (one factor along the
        # whole table: it moves the draft-or-not decision, never the budget's choice of K).
        priced = self.sps(num, context_len, on_device=False)
        with_draft = priced * self.realized_ratio(num)
        # Drafting must beat plain decoding by DRAFT_MARGIN: the best of many noisy estimates is
        # biased up, and where the true gain is a few percent (SmolLM2 at 4-8 requests on 2 cores)
        # drafting on an estimated 3 % gain lost 5 % in practice. Where drafting pays, it pays by more.
        plain_sps = self.sps(num, context_len, with_draft=False, on_device=False)
        plain = plain_sps * (1.0 + self.DRAFT_MARGIN)
        budget, tokens = ops.plan_budget_and_tokens(earlier, with_draft, plain, caps_array,
                                                    early_break=self.mode == "causal")
        plain_s = 1.0 / plain_sps[num]              # the table spans 0 .. R (gamma + 1) tokens
        if budget is not None:
            if self._plain_unmeasured(num, context_len):
                return RoundPlan(draft=False, tokens=num, seconds=plain_s, plain_seconds=plain_s)
            self._skipped, self._interval = 0, self.probe_every
            return RoundPlan(draft=True, budget=budget, tokens=tokens, seconds=1.0 / priced[num + budget],
                             plain_seconds=plain_s)
        if not self._probe_due(num):
            return RoundPlan(draft=False, tokens=num, seconds=plain_s, plain_seconds=plain_s)
        best = ops.plan_budget(earlier, with_draft, None, caps_array)
        # Only R / 4 requests draft, those whose history is oldest: a probe's draft then costs a
        # quarter of a full one (at 32 requests on the CPU, probes were 2 % of the run).
        size = max(1, num // 4)
        rows, budget = self._oldest_rows(keys, size), min(best, size)
        picked = list(range(num)) if rows is None else rows
        context = self.cost.context_lens[self.cost.context_index(context_len)]
        seconds = self.cost.verify_time(num + budget, context, num) + self.cost.draft_time(len(picked))
        return RoundPlan(draft=True, budget=budget, probe=True, rows=rows, plain_seconds=plain_s, seconds=seconds,
                         tokens=num - len(picked) + _expected_tokens(earlier[picked], caps_array[picked], budget,
                                                                     len(picked)))

    def _oldest_rows(self, keys: list, size: int) -> Optional[list]:
        """The batch indices of the `size` requests whose history is oldest (never drafted first),
        in batch order; None when that is every request."""
        if size >= len(keys):
            return None
        return sorted(sorted(range(len(keys)), key=lambda i: self._seen.get(keys[i], -1))[:size])

    def _plain_unmeasured(self, num_requests: int, context_len: int) -> bool:
        """Whether a learning cost model has yet to time a plain round at this load and context:
        then drafting is compared against an extrapolation, and a model that only ever saw drafted
        rounds priced plain ones at 82-90 ms where they took 73 (4 requests on SmolLM2) and kept
        drafting at a loss. So the comparison's other side gets measured too: the mirror of a probe."""
        observed = getattr(self.cost, "observed", None)
        return observed is not None and observed(num_requests, num_requests, context_len) < self.PLAIN_SAMPLES

    def _probe_due(self, num_requests: int) -> bool:
        """Count a skipped round; True when this one should draft anyway (a probe)."""
        load = _load_bucket(num_requests)
        if load != self._load:
            self._load, self._interval = load, self.probe_every
            self._skipped = max(self._skipped, self.probe_every - 2)
        self._skipped += 1
        if self._skipped < self._interval:
            return False
        self._skipped, self._interval = 0, min(2 * self._interval, self.max_probe_every)
        return True

    def verify_lengths(self, backend, plan: RoundPlan, confidence: Optional[torch.Tensor], caps: list,
                       context_len: int) -> tuple[torch.Tensor, Optional[int]]:
        """This round's verify lengths [R] (device) and, when known without a sync, their sum."""
        caps = [max(0, min(cap, self.gamma)) for cap in caps]
        lens = None
        if self.mode == "fixed" or plan.full:        # known on the host: no device work at all
            length = self.gamma if self.verify_len is None or plan.full else self.verify_len
            lens = [min(length, cap) for cap in caps]
        elif self.mode == "budget" and confidence is not None and plan.budget is not None:
            # Known on the host as well: one request's K best survivals are its first K positions
            # (survival never rises along a row; ties go to the earlier position), and a budget
            # that covers every admissible position admits them all. At 1 request the top-K ops
            # were a sixth of the scheduler's share of round time.
            if len(caps) == 1:
                lens = [min(plan.budget, caps[0])]
            elif plan.budget >= sum(caps):
                lens = caps
        if lens is not None:
            return torch.tensor(lens, dtype=torch.long, device=self.device), sum(lens)
        caps_tensor = torch.tensor(caps, dtype=torch.long, device=self.device)
        sps = self.sps(len(caps), context_len) if self.mode == "causal" else None
        lens, _ = verify_lengths(self.mode, backend, confidence, caps_tensor, threshold=self.threshold, sps=sps,
                                 budget=plan.budget)
        known = min(plan.budget, int(caps_tensor.sum())) if self.mode == "budget" else None
        return lens, known

    def outcome_ratios(self, keys: list) -> np.ndarray:
        """Per request, (accepted + k) / (predicted + k) over its verified drafts (1 without any)."""
        prior = self.OUTCOME_PRIOR
        return np.array([(self._outcomes[key][0] + prior) / (self._outcomes[key][1] + prior)
                         if key in self._outcomes else 1.0 for key in keys])

    def record(self, keys: list, confidence: torch.Tensor, verify_lens: Optional[torch.Tensor] = None,
               accepted: Optional[torch.Tensor] = None) -> None:
        """Confidences of a finished round (host tensor [R, gamma]) and, when given, what its
        verification found (host [R]: verified drafts, accepted drafts)."""
        confidence = confidence.double().numpy()
        if verify_lens is not None and accepted is not None:
            self._record_outcomes(keys, confidence, np.asarray(verify_lens), np.asarray(accepted))
        if self._recorded:
            planned = [(self._history[key][0], row) for key, row in zip(keys, confidence) if self._history.get(key)]
            if planned:
                x = np.stack([h for h, _ in planned]) - self._mean
                y = np.stack([r for _, r in planned]) - self._mean
                self._sxy = self.SHRINK_DECAY * self._sxy + float((x * y).sum())
                self._sxx = self.SHRINK_DECAY * self._sxx + float((x * x).sum())
                if self._sxx > 1e-9:
                    self.shrink = min(max(self._sxy / self._sxx, 0.0), 1.0)
        for key, row in zip(keys, confidence):
            self._history.setdefault(key, deque(maxlen=self.lag)).append(row)
            self._seen[key] = self._rounds
        self._mean = (0.8 * self._mean + 0.2 * confidence.mean(axis=0)) if self._recorded else confidence.mean(axis=0)
        self._recorded = True

    def _record_outcomes(self, keys: list, confidence: np.ndarray, verify_lens: np.ndarray,
                         accepted: np.ndarray) -> None:
        """Position k of a row was tested when it was verified and every draft before it was
        accepted; its conditional confidence c_k predicted that test."""
        positions = np.arange(1, confidence.shape[1] + 1)
        for key, conf, length, hits in zip(keys, confidence, verify_lens, accepted):
            if length <= 0:
                continue
            tested = (positions <= length) & (positions <= hits + 1)
            counts = self._outcomes.setdefault(key, [0.0, 0.0])
            counts[0] = self.OUTCOME_DECAY * counts[0] + float(min(hits, length))
            counts[1] = self.OUTCOME_DECAY * counts[1] + float(conf[tested].sum())

    def forget(self, key) -> None:
        self._history.pop(key, None)
        self._seen.pop(key, None)
        self._outcomes.pop(key, None)


__all__ = ["RoundPlan", "RoundPlanner", "cost_model_for", "schedule_prefix", "verify_lengths"]
