"""Calibration metrics against hand-computed values; STS fixes a known miscalibration."""
import numpy as np
import pytest
import torch

from dspark.scheduling.acceptance import MarginEstimator
from dspark.scheduling.calibration import (OnlineCalibration, StsTemperatures, auroc, brier, calibration_report,
                                           cumulative_survival, expected_calibration_error, fit_sts, survival_labels)


def test_all_greedy_confidence_equals_the_per_row_choice():
    """The host's all-greedy hint skips the sampled map; the result must be what the per-row
    choice gives, for the online maps (refitted apart) and for plain STS."""
    gamma = 4
    calibration = OnlineCalibration(StsTemperatures(gamma, sampled=[1.5, 1.2, 1.0, 0.8], greedy=[0.7, 0.9, 1.1, 1.3]))
    calibration.models[True].weights[:] = 0.6
    calibration.models[True].bias[:] = -0.4
    logits = torch.randn(5, gamma)
    greedy = torch.ones(5, dtype=torch.bool)
    assert torch.equal(calibration.confidence(logits, greedy, all_greedy=True), calibration.confidence(logits, greedy))
    sts = calibration.sts
    assert torch.equal(sts.confidence(logits, greedy, all_greedy=True), sts.confidence(logits, greedy))
    mixed = torch.tensor([True, False, True, False, False])
    expected = torch.sigmoid(logits / torch.where(mixed[:, None], torch.tensor(sts.greedy), torch.tensor(sts.sampled)))
    assert torch.allclose(sts.confidence(logits, mixed), expected)
    sts.greedy = [2.0] * gamma                           # a replaced set is picked up, not the cached table
    assert torch.allclose(sts.confidence(logits, greedy), torch.sigmoid(logits / 2.0))


def test_a_refit_waits_for_enough_new_rows_after_the_early_ones():
    """One row a round (1 request): after the early refits, refit_rows = 32 spaces refits 32
    rounds apart where refit_every = 8 alone would refit every 8; 16 rows a round refit every 8."""
    def refit_rounds(rows_per_round, refit_rows):
        estimator = MarginEstimator(4, refit_every=8, min_rows=1, refit_rows=refit_rows)
        rng = np.random.default_rng(0)
        rounds = []
        for round_index in range(100):
            features = rng.normal(size=(rows_per_round, 4, 1))
            if estimator.observe(features, np.full(rows_per_round, 4), rng.integers(0, 5, rows_per_round)):
                rounds.append(round_index)
        return rounds

    early = MarginEstimator.EARLY_REFITS
    assert np.all(np.diff(refit_rounds(1, 0)[early:]) == 8)
    assert np.all(np.diff(refit_rounds(1, 32)[early:]) == 32)
    assert np.all(np.diff(refit_rounds(16, 32)[early:]) == 8)
    assert refit_rounds(1, 32)[:early] == list(range(early))


def test_metrics_hand_computed():
    probs = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auroc(probs, labels) == pytest.approx(0.75)       # 3 of 4 positive/negative pairs ordered right
    assert brier(probs, labels) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # Two bins: [0, .5) holds 0.1, 0.4, 0.35 (mean .2833, accuracy 1/3), [.5, 1] holds 0.8 (accuracy 1).
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(
        (3 * abs(0.85 / 3 - 1 / 3) + abs(0.8 - 1.0)) / 4)
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == pytest.approx(0.5)   # ties


def test_survival_labels():
    labels, known = survival_labels(torch.tensor([3, 3, 1, 0]), torch.tensor([3, 1, 0, 0]), gamma=4)
    assert labels.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert known.tolist() == [[True, True, True, False], [True, True, True, True],
                              [True, True, True, True], [False, False, False, False]]


def synthetic_rounds(n, gamma, seed, overconfidence=3.0):
    """True conditional acceptance p_k; the head reports logits `overconfidence` times too sharp."""
    generator = torch.Generator().manual_seed(seed)
    true_logit = torch.randn(n, gamma, generator=generator) + 0.8
    accepted_each = torch.rand(n, gamma, generator=generator) < torch.sigmoid(true_logit)
    accepted = accepted_each.long().cumprod(-1).sum(-1)
    lens = torch.full((n,), gamma)
    labels, known = survival_labels(lens, accepted, gamma)
    return true_logit * overconfidence, labels, known, lens, accepted


def test_sts_recovers_calibration_on_held_out_data():
    logits, labels, known, _, _ = synthetic_rounds(6000, 4, seed=0)
    temperatures = fit_sts(logits, labels, known)
    assert all(2.0 < t < 4.5 for t in temperatures[:2])                  # close to the true 3.0
    test_logits, test_labels, test_known, _, _ = synthetic_rounds(6000, 4, seed=1)
    before = calibration_report(test_logits, test_labels, test_known)
    after = calibration_report(test_logits, test_labels, test_known, temperatures)
    for b, a in zip(before, after):
        assert a["ece"] < 0.5 * b["ece"]
        # Each c_k keeps its order; the cumulative product of differently tempered terms may shift a little.
        assert a["auroc"] == pytest.approx(b["auroc"], abs=0.03)
    assert after[0]["auroc"] == pytest.approx(before[0]["auroc"])
    assert cumulative_survival(test_logits, temperatures).shape == (6000, 4)


@pytest.mark.parametrize("censored", [False, True])
def test_online_calibration_learns_a_shifted_head_while_serving(censored):
    """The head is 3x too sharp and its base rate is off (logit z = 3 * (true logit) + 2): a
    temperature alone cannot fix that. Starting from the identity (the stored STS, here T = 1), the
    online map recovers a = 1/3, b = -2/3 at the first positions, also when the rounds verify only
    what the head rated well (the choice depends on the feature alone, so the fit stays unbiased),
    and only for the row kind it saw."""
    gamma = 4
    calibration = OnlineCalibration(StsTemperatures(gamma), refit_every=4)
    greedy = torch.ones(64, dtype=torch.bool)
    for seed in range(40):
        true_logits, _, _, lens, accepted = synthetic_rounds(64, gamma, seed=100 + seed, overconfidence=1.0)
        head = 3.0 * true_logits + 2.0
        if censored:                   # verify while the head's survival says >= 0.5 (a threshold schedule)
            lens = (torch.sigmoid(head).cumprod(-1) >= 0.5).long().cumprod(-1).sum(-1)
            accepted = torch.minimum(accepted, lens)
        calibration.observe(head, greedy, lens, accepted)
    for a, b in calibration.maps(greedy=True)[:2]:
        assert a == pytest.approx(1 / 3, abs=0.08) and b == pytest.approx(-2 / 3, abs=0.25)
    assert calibration.maps(greedy=False) == [(1.0, 0.0)] * gamma          # no sampled rows seen
    true_logits, labels, known, _, _ = synthetic_rounds(4000, gamma, seed=7, overconfidence=1.0)
    head = 3.0 * true_logits + 2.0
    recalibrated = torch.logit(calibration.confidence(head, torch.ones(4000, dtype=torch.bool)).double())
    before, after = calibration_report(head, labels, known), calibration_report(recalibrated, labels, known)
    for b, a in list(zip(before, after))[:2]:
        assert a["ece"] < 0.3 * b["ece"]
