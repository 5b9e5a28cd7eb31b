"""The online cost model: the engine learns its device's step times while it serves.

A prior (the backend's analytic roofline, or a profile from `dspark calibrate`) is only a guess:
measured on the CPU, the analytic prior made the load-aware schedules 20 % slower than plain
decoding (issue 13). So the engine times every round it runs and refits what the scheduler
reads, SPS(B) = 1 / (verify(R, B, c) + draft(R)), from those times.

Two layers, each robust on its own:

    cells        every (requests R, verify-token key B, context bucket c) the engine has run
                 keeps the median of its last `window` verify times (and every R its draft
                 times); a time more than `outlier_factor` away from its cell's median is
                 rejected (a GC pause, the machine's other work), so one spike moves nothing;
                 three rejected times in a row that agree restart the cell (a real change of
                 speed, or a cell whose first times were spikes, is never locked out)
    correction   an affine map of the prior fitted to the cell medians by ridge regression in
                 relative error:  verify = a + s * prior(R, B, c) + h * R + j * [B > R],
                                  draft  = a' + s' * prior_draft(R)
                 j is what the verify side of a round that verifies drafts costs beyond a plain
                 step (sampling and acceptance over R x (l + 1) vocabulary rows, not R): a jump at
                 B = R + 1 no affine map of the prior has. Without it, the plain cell (few times:
                 the planner drafts where drafting pays) was priced from the drafted ones, 20 %
                 too dear on SmolLM2 at 2 requests, and drafting looked cheaper than it was
                 it carries what a few cells say to the cells never run (a prior whose step
                 overhead is 2x off is exactly an error in a); the ridge pulls (a, s, h) towards
                 (0, 1, 0) where the cells cannot tell the parameters apart

A lookup is the correction plus the cells' own residual, interpolated along B within the
nearest observed R (along R for the draft), shrunk by n / (n + 1) for a cell seen n times; a
table over B is then made non-decreasing (isotonic regression), so a bigger verify never looks
cheaper. Convergence is bounded: after `window` rounds in a cell its median holds only new
times, and the correction is refitted every `refit_every` observations. `version` changes at
each refit, so the planner knows when its cached SPS tables are stale.

Lossless: the model changes only after a round has finished, from measured times; a round's
plan reads what finished rounds taught it, never the tokens it is about to verify.
`to_cost_model()` / `to_yaml()` write what was learned in the format `dspark calibrate` writes
(`dspark calibrate` is an offline run of this same estimator, see dspark.bench.profiling).
"""
import bisect
import statistics
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .cost_model import CostModel, _isotonic


class OnlineCostModel:
    """A CostModel-compatible view (verify_time / draft_time / sps_table) that learns from rounds.

    prior          the CostModel it starts from
    token_buckets  the verify-token counts the engine's steps are padded to (its graph or static
                   buckets), None for exact-size steps: rounds of the same padded size share a cell
    context_lens   context buckets of the cells (default: the prior's)
    """

    def __init__(self, prior: CostModel, token_buckets: Optional[Sequence[int]] = None,
                 context_lens: Optional[Sequence[int]] = None, window: int = 15, refit_every: int = 4,
                 outlier_factor: float = 4.0, ridge: float = 0.3):
        self.prior = prior
        self.token_buckets = sorted(token_buckets) if token_buckets else None
        self.context_lens = sorted(context_lens or prior.context_lens)
        self.window, self.refit_every = window, refit_every
        self.outlier_factor, self.ridge = outlier_factor, ridge
        self.max_query_tokens_per_request = prior.max_query_tokens_per_request
        self.device = prior.device
        self._verify_cells: dict = {}      # (R, context index) -> {B key: _Cell}, one slice per (R, c)
        self._draft_cells: dict = {}       # R -> _Cell
        self.verify_params = np.array([0.0, 1.0, 0.0, 0.0])  # a, s, h, j
        self.draft_params = np.array([0.0, 1.0])            # a', s'
        self.version = 0
        self.observations = self.rejected = 0
        self._tables: dict = {}            # (R, context index, max tokens) -> verify seconds, this version

    # ------------------------------------------------------------------ learning
    def observe(self, requests: int, verify_tokens: int, context_len: int, verify_s: float,
                draft_s: Optional[float] = None, draft_requests: Optional[int] = None) -> None:
        """One finished round: R requests, B verify tokens, its context, the seconds its verify
        part took (everything but the draft) and, when it drafted, the draft's seconds and how
        many requests drafted (default R; fewer in a probe)."""
        token_key, index = self.token_key(verify_tokens), self.context_index(context_len)
        cells = self._verify_cells.setdefault((requests, index), {})
        if token_key not in cells:
            cells[token_key] = _Cell(self.window, self._prior_verify(requests, token_key, index))
        self.rejected += not cells[token_key].add(verify_s, self.outlier_factor)
        if draft_s is not None:
            drafting = draft_requests or requests
            if drafting not in self._draft_cells:
                self._draft_cells[drafting] = _Cell(self.window, self.prior.draft_time(drafting))
            self.rejected += not self._draft_cells[drafting].add(draft_s, self.outlier_factor)
        self.observations += 1
        # Every `refit_every` rounds while learning, then 4x less often: each refit makes the
        # planner rebuild its tables, and a settled model needs no more than that.
        every = self.refit_every if self.observations <= 16 * self.refit_every else 4 * self.refit_every
        if self.observations % every == 0:
            self.refit()

    def refit(self) -> None:
        """Refit both corrections to the current cell medians; tables built before are stale."""
        verify = [((r, c), b, cell) for (r, c), cells in self._verify_cells.items() for b, cell in cells.items()]
        if verify:
            features = np.array([[1.0, cell.prior, r, float(b > r)] for (r, _), b, cell in verify])
            self.verify_params = _ridge_fit(features, [cell for _, _, cell in verify], np.array([0.0, 1.0, 0.0, 0.0]),
                                            self.ridge)
        if self._draft_cells:
            features = np.array([[1.0, cell.prior] for cell in self._draft_cells.values()])
            self.draft_params = _ridge_fit(features, list(self._draft_cells.values()), np.array([0.0, 1.0]),
                                           self.ridge)
        self.version += 1
        self._tables.clear()

    def observed(self, requests: int, verify_tokens: int, context_len: int) -> int:
        """How many kept times the cell of this round size holds (0: its time is extrapolated)."""
        cells = self._verify_cells.get((requests, self.context_index(context_len)), {})
        cell = cells.get(self.token_key(verify_tokens))
        return len(cell.times) if cell is not None else 0

    # ------------------------------------------------------------------ lookups (CostModel's interface)
    def token_key(self, tokens: int) -> int:
        """The cell a verify of `tokens` tokens falls in: its padded bucket, or itself."""
        if self.token_buckets and tokens <= self.token_buckets[-1]:
            return self.token_buckets[bisect.bisect_left(self.token_buckets, tokens)]
        return int(tokens)

    def context_index(self, context_len: int) -> int:
        return min(bisect.bisect_left(self.context_lens, context_len), len(self.context_lens) - 1)

    def verify_times(self, tokens: np.ndarray, context_len: int = 0, requests: int = 1) -> np.ndarray:
        """Estimated verify seconds of R = `requests` requests for each count in `tokens`,
        non-decreasing along `tokens` when it is sorted."""
        tokens = np.asarray(tokens)
        keys = np.array([self.token_key(int(b)) for b in tokens]) if self.token_buckets else tokens
        index = self.context_index(context_len)
        context = self.context_lens[index]
        prior = self.prior.verify_times(keys, context, requests)
        a, s, h, j = self.verify_params
        times = a + s * prior + h * requests + j * (keys > requests) + \
            self._verify_residual(requests, index, keys, context)
        times = np.maximum(times, 1e-7)
        if np.all(np.diff(tokens) >= 0) and np.any(np.diff(times) < 0):
            times = np.asarray(_isotonic(times))
        return times

    def verify_time(self, tokens: int, context_len: int = 0, requests: int = 1) -> float:
        return float(self.verify_times(np.array([tokens]), context_len, requests)[0])

    def draft_time(self, num_requests: int) -> float:
        if num_requests <= 0:
            return 0.0
        a, s = self.draft_params
        fitted = a + s * self.prior.draft_time(num_requests)
        cells = sorted(self._draft_cells.items())
        if cells:
            xs = np.array([r for r, _ in cells], dtype=np.float64)
            residual = np.array([cell.weight * (cell.median - (a + s * cell.prior)) for _, cell in cells])
            fitted += float(np.interp(num_requests, xs, residual))
        return max(fitted, 0.0)

    def sps_table(self, max_tokens: int, num_requests: int, context_len: int = 0,
                  with_draft: bool = True) -> torch.Tensor:
        """sps[B] for B = 0..max_tokens at this R and context; sps[0] = 0 (as CostModel.sps_table)."""
        key = (num_requests, self.context_index(context_len), max_tokens)
        if key not in self._tables:                  # with and without the draft share one table
            self._tables[key] = self.verify_times(np.arange(1, max_tokens + 1), context_len, num_requests)
        draft = self.draft_time(num_requests) if with_draft else 0.0
        return torch.tensor(np.concatenate([[0.0], 1.0 / (self._tables[key] + draft)]), dtype=torch.float64)

    # ------------------------------------------------------------------ export
    def to_cost_model(self, verify_tokens: Optional[Sequence[int]] = None,
                      draft_requests: Optional[Sequence[int]] = None) -> CostModel:
        """What was learned, as a CostModel table (the format `dspark calibrate` writes): per
        context bucket and verify-token count, the correction plus the cells' residuals averaged
        over request counts; the per-request term becomes `request_seconds`, and the jump of a
        round that verifies drafts (j), paid exactly when a round drafts, joins the draft's time."""
        grid = sorted(verify_tokens or self.prior.verify_tokens)
        requests = sorted(draft_requests or self.prior.draft_requests)
        a, s, h, j = self.verify_params
        rows = []
        for index, context in enumerate(self.context_lens):
            base = a + s * self.prior.verify_times(np.array(grid), context, 0)
            rows.append(np.maximum(base + self._mean_residual(index, context, grid), 1e-7).tolist())
        return CostModel(device=self.device, source="measured", verify_tokens=grid, context_lens=list(self.context_lens),
                         verify_seconds=rows, draft_requests=requests,
                         draft_seconds=[self.draft_time(r) + max(j, 0.0) for r in requests],
                         graph_buckets=list(self.token_buckets or self.prior.graph_buckets),
                         max_query_tokens_per_request=self.max_query_tokens_per_request,
                         request_seconds=float(s * self.prior.request_seconds + h),
                         meta={"estimator": "online", "prior_source": self.prior.source,
                               "observations": self.observations, "rejected": self.rejected,
                               "verify_cells": sum(len(cells) for cells in self._verify_cells.values()),
                               "draft_cells": len(self._draft_cells),
                               "verify_correction": [float(x) for x in self.verify_params],
                               "draft_correction": [float(x) for x in self.draft_params]})

    def to_yaml(self, path) -> Path:
        return self.to_cost_model().to_yaml(path)

    # ------------------------------------------------------------------ internals
    def _prior_verify(self, requests: int, token_key: int, context_index: int) -> float:
        return float(self.prior.verify_times(np.array([token_key]), self.context_lens[context_index], requests)[0])

    def _residual(self, requests: int, token_key: int, cell: "_Cell") -> float:
        """How far a cell's median sits above the fitted correction, shrunk by its weight."""
        a, s, h, j = self.verify_params
        return cell.weight * (cell.median - (a + s * cell.prior + h * requests + j * (token_key > requests)))

    def _verify_residual(self, requests: int, context_index: int, keys: np.ndarray, context: int) -> np.ndarray:
        """The cells' residual over the fitted correction, along B, from the observed request
        count nearest to R (within 25 %; none: no residual, the correction alone)."""
        observed = [r for r, c in self._verify_cells if c == context_index]
        if not observed:
            return np.zeros(len(keys))
        nearest = min(observed, key=lambda r: (abs(r - requests), r))
        if abs(nearest - requests) > 0.25 * requests:
            return np.zeros(len(keys))
        cells = sorted(self._verify_cells[(nearest, context_index)].items())
        xs = np.array([b for b, _ in cells], dtype=np.float64)
        residual = np.array([self._residual(nearest, b, cell) for b, cell in cells])
        return np.interp(keys.astype(np.float64), xs, residual)

    def _mean_residual(self, context_index: int, context: int, grid: Sequence[int]) -> np.ndarray:
        points: dict = {}
        for (r, c), cells in self._verify_cells.items():
            if c == context_index:
                for b, cell in cells.items():
                    points.setdefault(b, []).append(self._residual(r, b, cell))
        if not points:
            return np.zeros(len(grid))
        xs = sorted(points)
        return np.interp(np.asarray(grid, dtype=np.float64), xs, [float(np.mean(points[x])) for x in xs])


class _Cell:
    """The last `window` accepted times of one cell, their median, and the prior's time for it.

    A time more than `outlier_factor` from the median of >= 3 kept times is rejected. Rejection
    must not lock a cell in: if its first times were spikes, or the device really changed speed,
    every true time would be rejected forever. So `RESTART` rejected times in a row that agree
    with one another (within the factor of their own median) restart the cell from them."""

    RESTART = 3

    def __init__(self, window: int, prior: float):
        self.times: deque = deque(maxlen=window)
        self.rejected: list = []               # consecutive rejected times, oldest first
        self.median, self.prior = 0.0, prior

    def add(self, seconds: float, outlier_factor: float) -> bool:
        """Keep a time unless it is an outlier; True if kept (a restart keeps it too)."""
        seconds = float(seconds)
        if len(self.times) >= 3 and not self.median / outlier_factor <= seconds <= self.median * outlier_factor:
            self.rejected.append(seconds)
            recent = self.rejected[-self.RESTART:]
            centre = statistics.median(recent)
            if len(recent) < self.RESTART or not all(centre / outlier_factor <= t <= centre * outlier_factor
                                                     for t in recent):
                return False
            self.times.clear()
            self.times.extend(recent)
            self.median, self.rejected = centre, []
            return True
        self.rejected = []
        self.times.append(seconds)
        self.median = statistics.median(self.times)
        return True

    @property
    def weight(self) -> float:
        """How far a cell's own median overrides the correction: n / (n + 1)."""
        return len(self.times) / (len(self.times) + 1.0)


def _ridge_fit(features: np.ndarray, cells: list, prior_mean: np.ndarray, ridge: float) -> np.ndarray:
    """Parameters theta minimising the cells' squared *relative* errors (theta . x / median - 1)^2,
    weighted by n / (n + 1), plus ridge * ||(theta - prior_mean) / scale||^2. The scale puts the
    parameters in comparable units (seconds for the offset and the jump, 1 for the scale, seconds
    per request for the per-request term), so the ridge is one number."""
    medians = np.array([max(cell.median, 1e-9) for cell in cells])
    weights = np.array([cell.weight for cell in cells])
    typical = statistics.median(medians.tolist())
    per_request = [typical / max(float(features[:, 2].max()), 1.0)] if features.shape[1] >= 3 else []
    jump = [typical] if features.shape[1] == 4 else []
    scale = np.array([typical, 1.0] + per_request + jump)
    design = features * scale / medians[:, None]                  # rows in relative error, scaled params
    gram = design.T @ (weights[:, None] * design) + ridge * np.eye(len(scale))
    rhs = design.T @ weights + ridge * prior_mean / scale
    theta = np.linalg.solve(gram, rhs) * scale
    theta[1] = max(theta[1], 1e-3)          # the prior's shape is kept: a bigger step never costs less
    if len(theta) == 4:
        theta[3] = max(theta[3], 0.0)       # nor does verifying drafts cost less than a plain step
    return theta


__all__ = ["OnlineCostModel"]
