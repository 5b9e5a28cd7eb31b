"""Acceptance estimates for drafts without a confidence head (DFlash, EAGLE-3), learned while serving.

The load-aware schedules need c_k, the probability that draft k survives given drafts 1..k-1
did (paper §3.2.1). A DSpark draft predicts it with its confidence head; any other draft still
says how sure it was: the top-2 margin of the distribution it sampled draft k from,

    m_k = log p_k(first) - log p_k(second)        (the top-2 logit margin; large = peaked)

read on the device from the draft's own untempered logits (`DraftProposal.logits`) where the
draft exposes them, else from the proposal's `probs`. A per-position logistic
model turns it into a confidence, c_k = sigmoid(w_k . f_k + b_k), with features f_k = [m_k]
(or [m_k, z_k] with a confidence head's raw logit z_k: "both"). It is fitted online from
verified rounds by Newton's method on the log loss over a sliding window of rows, each row a
(position k reached, features, accepted?) triple: k is reached when the round verified >= k
drafts and accepted >= k - 1 (the conditional event c_k models).

Censoring: once the schedule uses the estimate, a position is only verified when the estimate
rated it well, and the model would learn from a biased sample of its own choices. So the first
`warmup_refits` fits see whole blocks verified (`needs_full_blocks`, which the planner obeys).

Greedy rows sample from one-hot distributions (ops.sampling_probs), so a margin read from
`probs` is the same large constant for every greedy row and the model reduces to a per-position
acceptance rate. The logits keep the draft's certainty at every temperature: on SmolLM2 at T = 0
the probs margin ranked nothing (AUROC 0.50), so the engine reads the logits wherever it can.

Lossless: the margin of p_k is a function of the distribution x_k is drawn from, so of
x_0..x_{k-1} and never of x_k itself (what a confidence head reads too); the parameters change
only from finished rounds.
"""
from collections import deque
from typing import Optional

import numpy as np
import torch

MARGIN_EPS = 1e-6
MAX_MARGIN = float(-np.log(MARGIN_EPS))              # the margin of a one-hot row (about 13.8)


def top2_margin(
    probs: torch.Tensor,        # [R, gamma, V] the distributions the drafts were sampled from
) -> torch.Tensor:              # [R, gamma] float32, in [0, log(1 / MARGIN_EPS)]
    """The top-2 logit margin log p(first) - log p(second) of each draft distribution."""
    assert probs.dim() == 3, f"probs must be [R, gamma, V], got {tuple(probs.shape)}"
    top = probs.float().topk(2, dim=-1).values.clamp(min=MARGIN_EPS)
    return top[..., 0].log() - top[..., 1].log()


def logit_margin(
    logits: torch.Tensor,       # [R, gamma, V] the draft's untempered logits
) -> torch.Tensor:              # [R, gamma] float32, in [0, MAX_MARGIN]
    """The same margin from logits: l(first) - l(second), which is log p(first) - log p(second)
    of the softmax at temperature 1; capped like `top2_margin` (a masked-out second is -inf)."""
    assert logits.dim() == 3, f"logits must be [R, gamma, V], got {tuple(logits.shape)}"
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).nan_to_num(MAX_MARGIN, MAX_MARGIN).clamp(0.0, MAX_MARGIN)


def acceptance_labels(verify_lens: np.ndarray, accepted: np.ndarray, gamma: int):
    """-> (reached [R, gamma] bool, label [R, gamma] bool): position k (1-based) is reached when
    verify_len >= k and accepted >= k - 1; its label is accepted >= k."""
    k = np.arange(1, gamma + 1)[None, :]
    lens, acc = np.asarray(verify_lens)[:, None], np.asarray(accepted)[:, None]
    return (lens >= k) & (acc >= k - 1), acc >= k


class MarginEstimator:
    """Per-position logistic acceptance model over draft features, refitted from finished rounds.

    gamma          block size
    num_features   1 (margin) or 2 (margin and the confidence head's raw logit)
    window         rows kept per position (sliding: old rows leave as new ones arrive)
    refit_every    rounds between refits (after the first EARLY_REFITS, which come a round apart)
    refit_rows     ... and, after those, rows reached at the first position since the last refit
                   (0: rounds alone decide); at 1 request a round brings one row, and a refit
                   every 8 rows cost more than the fit could gain
    warmup_refits  refits whose rows come from whole-block verification
    initial        the acceptance rate before the first fit (weights 0) ...
    initial_weight ... or, with a nonzero weight, the map to start from: sigmoid(w * f + 0), e.g.
                   1 for a feature that is already a calibrated logit (the head's, after STS); the
                   fit is then pulled towards that map with `ridge` counted in rows of evidence
    """

    EARLY_REFITS = 4

    def __init__(self, gamma: int, num_features: int = 1, window: int = 4096, refit_every: int = 8,
                 warmup_refits: int = 2, min_rows: int = 16, ridge: float = 1e-2, initial: float = 0.5,
                 initial_weight: float = 0.0, refit_rows: int = 0):
        self.gamma, self.num_features = gamma, num_features
        self.window, self.refit_every, self.warmup_refits = window, refit_every, warmup_refits
        self.refit_rows, self._new_rows = refit_rows, 0
        self.min_rows, self.ridge = min_rows, ridge
        self.weights = np.full((gamma, num_features), float(initial_weight))
        self.bias = np.full(gamma, 0.0 if initial_weight else float(np.log(initial / (1 - initial))))
        # A model that starts from a meaningful map (initial_weight) is pulled towards it, bias
        # included, so its first fits from a few rows stay near the start instead of jumping.
        self._centre = (float(initial_weight), 0.0) if initial_weight else None
        self._rows = [deque() for _ in range(gamma)]        # per position: (features [n, F], labels [n])
        self._counts = [0] * gamma
        self.rounds = self.refits = self._last_refit = 0
        self._device_params: Optional[tuple] = None

    @property
    def needs_full_blocks(self) -> bool:
        """Whether rounds should verify whole blocks (uncensored labels for the first refits)."""
        return self.refits < self.warmup_refits

    @property
    def rows_wanted(self) -> int:
        """Rows at the first position the next refit still waits for (at least 1)."""
        return max(self.min_rows - self._counts[0], 1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [R, gamma, F] -> acceptance logits [R, gamma] (on the features' device)."""
        if self._device_params is None or self._device_params[0].device != features.device:
            self._device_params = (torch.tensor(self.weights, dtype=torch.float32, device=features.device),
                                   torch.tensor(self.bias, dtype=torch.float32, device=features.device))
        weights, bias = self._device_params
        return (features.float() * weights).sum(dim=-1) + bias

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """features [R, gamma, F] -> c_k [R, gamma] in (0, 1)."""
        return torch.sigmoid(self.logits(features))

    def observe(self, features, verify_lens, accepted) -> bool:
        """One finished round (host arrays: features [R, gamma, F], verify_lens [R], accepted [R]);
        returns True when it refitted."""
        features = np.asarray(features, dtype=np.float64).reshape(-1, self.gamma, self.num_features)
        reached, label = acceptance_labels(np.asarray(verify_lens), np.asarray(accepted), self.gamma)
        for k in range(self.gamma):
            rows = reached[:, k]
            if rows.any():
                self._rows[k].append((features[rows, k], label[rows, k].astype(np.float64)))
                self._counts[k] += int(rows.sum())
                while self._counts[k] - len(self._rows[k][0][1]) >= self.window:
                    self._counts[k] -= len(self._rows[k].popleft()[1])
        self.rounds += 1
        self._new_rows += int(reached[:, 0].sum())
        # The first EARLY_REFITS fits come as soon as there are rows enough (a round each), so a
        # wrong start is corrected within a few rounds; then every `refit_every` rounds (and
        # `refit_rows` new rows).
        early = self.refits < self.EARLY_REFITS
        due = self.rounds - self._last_refit >= self.refit_every and self._new_rows >= self.refit_rows
        if self._counts[0] < self.min_rows or not (early or due):
            return False
        self.refit()
        self._last_refit, self._new_rows = self.rounds, 0
        return True

    def refit(self) -> None:
        for k in range(self.gamma):
            if self._counts[k] >= self.min_rows:
                x = np.concatenate([f for f, _ in self._rows[k]])
                y = np.concatenate([labels for _, labels in self._rows[k]])
                # Towards a centre, the ridge counts as that many rows of evidence: it washes out.
                ridge = self.ridge if self._centre is None else self.ridge / len(y)
                self.weights[k], self.bias[k] = _logistic_fit(x, y, self.weights[k], self.bias[k], ridge,
                                                              centre=self._centre)
            elif k > 0:                      # too few rows this deep: no more confident than k - 1
                self.weights[k], self.bias[k] = self.weights[k - 1], min(self.bias[k], self.bias[k - 1])
        self.refits += 1
        self._device_params = None


def heldout_report(
    features: torch.Tensor,        # [N, gamma, F] margin features of N request-rounds, in serving order
    verify_lens: torch.Tensor,     # [N]
    accepted: torch.Tensor,        # [N]
) -> list:
    """The margin estimator judged as the confidence head is (calibration_report: per position, the
    ECE / AUROC / Brier of the cumulative survival): fitted on the first half of the rounds, scored
    on the second. Rounds should verify whole blocks (labels not censored)."""
    from .calibration import calibration_report, survival_labels

    assert features.dim() == 3, f"features must be [N, gamma, F], got {tuple(features.shape)}"
    count, gamma, num_features = features.shape
    half = count // 2
    if half < 2:
        return []
    estimator = MarginEstimator(gamma, num_features=num_features, window=max(half, 1), refit_every=1, min_rows=1)
    estimator.observe(features[:half].numpy(), verify_lens[:half].numpy(), accepted[:half].numpy())
    labels, known = survival_labels(verify_lens[half:].long(), accepted[half:].long(), gamma)
    return calibration_report(estimator.logits(features[half:]).double(), labels, known)


def _logistic_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray, bias: float, ridge: float,
                  steps: int = 25, centre: Optional[tuple] = None) -> tuple:
    """Newton's method on the mean log loss of sigmoid(x . w + b), with ridge on w only (a
    constant feature, as greedy rows give, then leaves w ~ 0 and b = the log-odds of the rate),
    or, given a centre (w0, b0), ridge on both towards it (a recalibration that starts at a map).
    Warm-started from the current parameters; a step that would not lower the loss is halved."""
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)          # [n, F + 1]
    penalty = np.full(design.shape[1], ridge)
    if centre is None:
        penalty[-1] = 1e-6
        target = np.zeros(design.shape[1])
    else:
        target = np.append(np.full(design.shape[1] - 1, centre[0]), centre[1])
    theta = np.append(weights, bias)

    def loss(t):
        z = design @ t
        return float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * np.sum(penalty * (t - target) ** 2))

    current = loss(theta)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - y) / len(y) + penalty * (theta - target)
        hessian = (design.T * (p * (1 - p))) @ design / len(y) + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        while size > 1e-4 and loss(theta - size * step) > current:
            size /= 2
        if size <= 1e-4:
            break
        theta = theta - size * step
        previous, current = current, loss(theta)
        if previous - current < 1e-10:
            break
    return theta[:-1], float(theta[-1])


__all__ = ["MAX_MARGIN", "MarginEstimator", "acceptance_labels", "heldout_report", "logit_margin", "top2_margin"]
