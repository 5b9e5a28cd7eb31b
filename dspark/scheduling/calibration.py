"""Confidence calibration: metrics, Sequential Temperature Scaling (STS), and the online recalibration.

The scheduler multiplies confidences into survivals a_k = prod_{i<=k} c_i and weighs them
against the device's cost, so it needs their absolute values to be right, not only their
order (paper §3.2.1). STS fixes that after training: on held-out rounds, for k = 1..gamma
in order, pick the temperature T_k on the confidence logit that minimises the ECE of the
cumulative product, keeping T_1..T_{k-1} fixed. Temperatures never reorder confidences.

Labels come from served or replayed rounds: with verify length l and a accepted drafts,
"the prefix up to k survived" is 1 for k <= a, 0 for a < k <= l, also 0 for every k > l
when a < l (the prefix is already broken), and unknown for k > l when a == l.
"""
from typing import Optional, Sequence

import torch

DEFAULT_GRID = torch.logspace(-1.0, 1.0, 81).tolist()   # temperatures 0.1 .. 10


def survival_labels(verify_lens: torch.Tensor, accepted: torch.Tensor, gamma: int):
    """-> (labels [N, gamma] float, known [N, gamma] bool); see the module docstring."""
    k = torch.arange(1, gamma + 1).unsqueeze(0)
    lens, acc = verify_lens.unsqueeze(1), accepted.unsqueeze(1)
    labels = (k <= acc).float()
    known = (k <= lens) | (acc < lens)
    return labels, known


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Equal-width-bin ECE: sum over bins of |mean confidence - accuracy| weighted by bin mass."""
    probs, labels = probs.double().flatten(), labels.double().flatten()
    if probs.numel() == 0:
        return float("nan")
    index = (probs * bins).long().clamp(max=bins - 1)
    total = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(probs))
    conf = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, probs)
    hits = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, labels)
    used = total > 0
    return float(((conf[used] - hits[used]).abs()).sum() / probs.numel())


def auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic, ties averaged."""
    probs, labels = probs.double().flatten(), labels.flatten().bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = probs.argsort()
    ranks = torch.empty_like(probs)
    ranks[order] = torch.arange(1, probs.numel() + 1, dtype=torch.float64)
    for value in probs.unique():                      # average ranks over ties
        tied = probs == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((probs.double() - labels.double()) ** 2).mean()) if probs.numel() else float("nan")


def cumulative_survival(logits: torch.Tensor, temperatures: Optional[Sequence[float]] = None) -> torch.Tensor:
    """a_k = prod_{i<=k} sigmoid(z_i / T_i). logits: [N, gamma]."""
    if temperatures is not None:
        logits = logits / torch.tensor(list(temperatures), dtype=logits.dtype)
    return torch.sigmoid(logits.double()).cumprod(dim=-1)


def fit_sts(logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor,
            grid: Sequence[float] = DEFAULT_GRID, bins: int = 15) -> list:
    """Per-position temperatures, fitted left to right to minimise the ECE of the cumulative product."""
    gamma = logits.shape[1]
    temperatures: list = []
    prefix = torch.ones(logits.shape[0], dtype=torch.float64)
    for k in range(gamma):
        rows = known[:, k]
        best_t, best_ece = 1.0, float("inf")
        if rows.any():
            for t in grid:
                survival = prefix[rows] * torch.sigmoid(logits[rows, k].double() / t)
                ece = expected_calibration_error(survival, labels[rows, k], bins)
                if ece < best_ece - 1e-12:
                    best_t, best_ece = float(t), ece
        temperatures.append(best_t)
        prefix = prefix * torch.sigmoid(logits[:, k].double() / best_t)
    return temperatures


def calibration_report(logits, labels, known, temperatures=None, bins: int = 15) -> list:
    """Per position: ECE, AUROC and Brier of the cumulative survival, and how many rows were known."""
    survival = cumulative_survival(logits, temperatures)
    report = []
    for k in range(logits.shape[1]):
        rows = known[:, k]
        p, y = survival[rows, k], labels[rows, k]
        report.append({"position": k + 1, "count": int(rows.sum()), "ece": expected_calibration_error(p, y, bins),
                       "auroc": auroc(p, y), "brier": brier(p, y), "mean_confidence": float(p.mean()) if len(p) else
                       float("nan"), "survival_rate": float(y.mean()) if len(y) else float("nan")})
    return report


class OnlineCalibration:
    """The confidence head recalibrated while serving (the engine's default, calibration="online").

    STS temperatures are fitted once, on held-out rounds of the training distribution. What a
    head's confidence is worth moves with the workload: on SmolLM2 at 8 requests of 128 forced
    tokens, the head rated the first draft 0.46 on average where 0.22 survived, and the budget
    planner drafted where drafting lost 10 %. A temperature cannot fix that (it rescales the
    logit around 0.5; the base rate is what moved). So per position, and separately for greedy
    and sampled rows (different acceptance events), a logistic map over the STS-scaled logit,

        c_k = sigmoid(a_k * z_k / T_k + b_k),     starting at a = 1, b = 0 (the stored STS),

    is refitted every `refit_every` rounds that brought 4 x `refit_every` rows, from verified
    rounds (dspark.scheduling.acceptance's estimator with the one feature z_k / T_k). It starts
    calibrated, so it needs no rounds of whole blocks: the planner's choice of which positions
    to verify depends on the feature alone, which leaves the fit of P(accept | feature)
    unbiased. Lossless: the maps change only from finished rounds; the engine never rewrites the
    draft's stored temperatures.
    """

    def __init__(self, sts: "StsTemperatures", refit_every: int = 8, window: int = 4096):
        from .acceptance import MarginEstimator

        self.sts = sts
        # Pulled towards the identity (as if by 8 rows that agree with it), a fit needs few rows:
        # a round at 4 requests gives 4.
        self.models = {greedy: MarginEstimator(sts.gamma, num_features=1, window=window, refit_every=refit_every,
                                               warmup_refits=0, min_rows=4, ridge=8.0, initial_weight=1.0,
                                               refit_rows=4 * refit_every)
                       for greedy in (False, True)}

    def features(self, logits: torch.Tensor, greedy_rows: torch.Tensor) -> torch.Tensor:
        """[R, gamma] raw head logits -> [R, gamma, 1] STS-scaled logits."""
        return (logits.float() / self.sts.temperatures(greedy_rows)).unsqueeze(-1)

    def confidence(self, logits: torch.Tensor, greedy_rows: torch.Tensor, all_greedy: bool = False) -> torch.Tensor:
        """[R, gamma] raw head logits -> c_k [R, gamma] (on the logits' device). `all_greedy`, when
        the host knows every row is greedy, skips the sampled map (no device check of the rows)."""
        features = self.features(logits, greedy_rows)
        if all_greedy:
            return self.models[True].confidence(features)
        greedy, sampled = (self.models[kind].confidence(features) for kind in (True, False))
        return torch.where(greedy_rows.unsqueeze(1), greedy, sampled)

    def observe(self, logits: torch.Tensor, greedy_rows: torch.Tensor, verify_lens: torch.Tensor,
                accepted: torch.Tensor) -> None:
        """One finished round (host tensors: raw logits [R, gamma], greedy_rows / verify_lens /
        accepted [R])."""
        features = self.features(logits, greedy_rows).double().numpy()
        for kind in (True, False):
            rows = (greedy_rows == kind).numpy()
            if rows.any():
                self.models[kind].observe(features[rows], verify_lens.numpy()[rows], accepted.numpy()[rows])

    def maps(self, greedy: bool) -> list:
        """(a_k, b_k) per position for greedy or sampled rows."""
        model = self.models[greedy]
        return [(float(w[0]), float(b)) for w, b in zip(model.weights, model.bias)]


class StsTemperatures:
    """The STS temperatures an engine applies to its draft's confidence logits: one set fitted on
    sampled rounds and one on greedy rounds (acceptance under greedy verification is a different
    event; without a greedy set, greedy rows use the sampled one). c_k = sigmoid(z_k / T_k).
    The engine owns this state; the draft's config only seeds it (OnlineCalibration maps its output further)."""

    def __init__(self, gamma: int, sampled: Optional[Sequence[float]] = None,
                 greedy: Optional[Sequence[float]] = None):
        self.gamma = gamma
        self.sampled = list(sampled) if sampled else None
        self.greedy = list(greedy) if greedy else None
        self._table: Optional[tuple] = None        # (what it was built from, [2, gamma] on a device)

    def temperatures(self, greedy_rows: torch.Tensor) -> torch.Tensor:
        """[R, gamma] temperature of each entry; greedy_rows [R] bool."""
        # Built once per device (and again if a set is replaced): twice a round, two small host
        # tensors were a measurable part of the scheduler's share at 1 request.
        key = (greedy_rows.device, tuple(self.sampled or ()), tuple(self.greedy or ()))
        if self._table is None or self._table[0] != key:
            sampled = self.sampled or [1.0] * self.gamma
            self._table = (key, torch.tensor([sampled, self.greedy or sampled], device=greedy_rows.device))
        return self._table[1][greedy_rows.long()]

    def confidence(self, logits: torch.Tensor, greedy_rows: torch.Tensor, all_greedy: bool = False) -> torch.Tensor:
        """logits [R, gamma] raw confidence logits -> c_k [R, gamma] in (0, 1) (`all_greedy`: as
        OnlineCalibration.confidence's; the temperature table already picks per row)."""
        return torch.sigmoid(logits.float() / self.temperatures(greedy_rows))
