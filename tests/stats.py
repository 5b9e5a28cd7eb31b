"""A chi-square goodness-of-fit test without scipy."""
import torch


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of observed counts against expected probabilities; cells with a small
    expectation are pooled into one so the chi-square approximation holds."""
    observed = observed.double().flatten()
    expected = expected_probs.double().flatten() * observed.sum()
    small = expected < min_expected
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    assert not (observed[~keep] > 0).any(), "a sample fell on a zero-probability outcome"
    observed, expected = observed[keep], expected[keep]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))
