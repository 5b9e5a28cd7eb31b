"""The prefix schedulers: the paper's Appendix A counterexample, brute-force optimality, top-K."""
import itertools

import pytest
import torch

from dspark import ops
from stats import chi_square_pvalue

# Paper Appendix A: one request, gamma = 2, vocabulary {A = 0, B = 1}.
TARGET = torch.tensor([0.7, 0.3])
DRAFT = torch.tensor([0.5, 0.5])
SPS = torch.tensor([0.0, 1.0, 0.5, 0.45])          # SPS(1), SPS(2), SPS(3)


def appendix_confidence(first_draft_token: int) -> torch.Tensor:
    """a_1 = 0.8 always; c_2 = 0.9 if x_1 = A else 0."""
    return torch.tensor([[0.8, 0.9 if first_draft_token == 0 else 0.0]])


def retrospective_global(confidence, sps, caps=None):
    """The lossy scheduler the paper warns about: global argmax over the *current* survivals."""
    budget = ops.plan_budget(confidence, sps, caps=caps) or 0
    return ops.schedule_topk(confidence, budget, caps)


def first_token_frequencies(scheduler, trials=20_000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draft_first = ops.sample_from_probs(DRAFT.expand(trials, -1), torch.rand(trials, generator=generator))
    draft_second = ops.sample_from_probs(DRAFT.expand(trials, -1), torch.rand(trials, generator=generator))
    lens = torch.stack([scheduler(appendix_confidence(int(d)), trials_index)
                        for trials_index, d in enumerate(draft_first.tolist())]).flatten()
    result = ops.verify(torch.stack([draft_first, draft_second], 1), DRAFT.expand(trials, 2, -1),
                        torch.stack([TARGET.expand(trials, -1), TARGET.expand(trials, -1),
                                     TARGET.expand(trials, -1)], 1),
                        lens, torch.rand(trials, 2, generator=generator), torch.rand(trials, generator=generator))
    return torch.bincount(result.output_tokens[:, 0], minlength=2), lens


def test_appendix_a_global_search_is_biased_and_causal_and_budget_are_exact():
    # The retrospective global search verifies x_1 only when x_1 = A: P(A) = 0.5 + 0.5 * 0.7 = 0.85.
    counts, _ = first_token_frequencies(lambda c, i: retrospective_global(c, SPS))
    frequencies = counts.float() / counts.sum()
    assert abs(frequencies[0] - 0.85) < 0.01
    assert chi_square_pvalue(counts, TARGET) < 1e-9
    assert chi_square_pvalue(counts, torch.tensor([0.85, 0.15])) > 1e-3

    # Algorithm 1 breaks at the first non-improvement (Theta 1 -> 0.9), so it never peeks at a_2.
    counts, lens = first_token_frequencies(lambda c, i: ops.schedule_causal(c, SPS))
    assert chi_square_pvalue(counts, TARGET) > 1e-3 and chi_square_pvalue(counts, torch.tensor([0.85, 0.15])) < 1e-9

    # Budget: K from an *earlier* round's confidences (an independent draft of the same kind),
    # then top-K by current survival. K varies from trial to trial and the output stays exact.
    history = torch.Generator().manual_seed(99)

    def budget(confidence, index):
        earlier = appendix_confidence(int(torch.rand(1, generator=history) < 0.5))
        return ops.schedule_topk(confidence, ops.plan_budget(earlier, SPS) or 0)

    counts, lens = first_token_frequencies(budget)
    assert set(lens.tolist()) == {0, 2}        # both budgets occurred
    assert chi_square_pvalue(counts, TARGET) > 1e-3 and chi_square_pvalue(counts, torch.tensor([0.85, 0.15])) < 1e-9


def brute_force_theta(confidence, sps, caps):
    num_requests, gamma = confidence.shape
    a = ops.survival(confidence)
    best = 0.0
    for lens in itertools.product(*[range(int(c) + 1) for c in caps]):
        batch = num_requests + sum(lens)
        tau = num_requests + sum(a[r, :l].sum().item() for r, l in enumerate(lens))
        best = max(best, tau * (sps[batch].item() if batch < len(sps) else 0.0))
    return best


def theta_of(lens, confidence, sps):
    a = ops.survival(confidence)
    batch = len(lens) + int(lens.sum())
    return (len(lens) + sum(a[r, :l].sum().item() for r, l in enumerate(lens.tolist()))) * sps[batch].item()


@pytest.mark.parametrize("seed", range(40))
def test_causal_equals_brute_force_when_theta_is_unimodal(seed):
    generator = torch.Generator().manual_seed(seed)
    num_requests = int(torch.randint(1, 4, (1,), generator=generator))
    gamma = int(torch.randint(1, 5, (1,), generator=generator))
    confidence = torch.rand(num_requests, gamma, generator=generator) ** 0.3
    caps = torch.randint(0, gamma + 1, (num_requests,), generator=generator)
    # A smooth cost curve: launch overhead plus a per-token cost -> Theta is unimodal along the path.
    overhead, per_token = 1.0, float(torch.rand(1, generator=generator)) * 0.5 + 0.01
    sps = 1.0 / (overhead + per_token * torch.arange(num_requests * (gamma + 1) + 1).double())
    lens = ops.schedule_causal(confidence, sps, caps)
    assert (lens <= caps).all()
    assert theta_of(lens, confidence, sps) == pytest.approx(brute_force_theta(confidence, sps, caps), rel=1e-9)


def test_causal_stops_short_of_the_global_optimum_on_a_jagged_curve():
    """The price of losslessness: with a cliff in SPS, the early break can stop before a better point."""
    confidence = torch.tensor([[0.95, 0.95, 0.95, 0.95]])
    sps = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.5, 0.5])   # one cliff, then flat (a graph bucket)
    assert ops.schedule_causal(confidence, sps).tolist() == [0]
    assert ops.plan_budget(confidence, sps) == 4


def test_budget_admits_exactly_the_top_k_survivals():
    generator = torch.Generator().manual_seed(7)
    for _ in range(30):
        confidence = torch.rand(5, 6, generator=generator)
        caps = torch.randint(0, 7, (5,), generator=generator)
        budget = int(torch.randint(0, 20, (1,), generator=generator))
        lens = ops.schedule_topk(confidence, budget, caps)
        a = ops.survival(confidence)
        admissible = [(a[r, j].item(), r, j) for r in range(5) for j in range(int(caps[r]))]
        chosen = sorted(admissible, key=lambda t: (-t[0], t[1], t[2]))[:budget]
        expected = torch.zeros(5, dtype=torch.long)
        for _, r, _ in chosen:
            expected[r] += 1
        assert lens.tolist() == expected.tolist()
        assert int(lens.sum()) == min(budget, int(caps.sum()))


def test_ties_break_by_position_so_prefixes_stay_contiguous():
    confidence = torch.ones(3, 4)          # every survival is 1: only the tie-break decides
    assert ops.schedule_topk(confidence, 6).tolist() == [4, 2, 0]
    assert ops.schedule_topk(confidence, 6, caps=torch.tensor([1, 4, 4])).tolist() == [1, 4, 1]


def test_dispatcher_respects_the_backend_limit():
    from dspark import schedule_prefix

    confidence = torch.full((2, 8), 0.99)
    sps = 1.0 / (1.0 + 0.01 * torch.arange(40).double())
    for mode, options in (("fixed", {}), ("threshold", {"threshold": 0.1}), ("causal", {}), ("budget", {"budget": 16})):
        lens = schedule_prefix(confidence, sps, mode, max_verify_len=5, **options)
        assert lens.max() <= 5, mode


def test_budget_planner_matches_a_brute_force_search():
    """plan_budget against the definition: K maximising (R + sum of the K best admissible earlier
    survivals) * SPS(R + K), first maximum; None when plain decoding's R * SPS_plain(R) is no worse;
    with early_break, the first K after which Theta stops improving. plan_budget_and_tokens also
    gives the tokens expected at that K (the planner's prediction the realized ratio is judged by)."""
    generator = torch.Generator().manual_seed(11)
    for _ in range(200):
        num_requests = int(torch.randint(1, 6, (1,), generator=generator))
        gamma = int(torch.randint(1, 8, (1,), generator=generator))
        earlier = torch.rand(num_requests, gamma, generator=generator, dtype=torch.float64)
        caps = torch.randint(0, gamma + 1, (num_requests,), generator=generator)
        size = num_requests * (gamma + 1) + 1
        with_draft = 1.0 / (0.5 + torch.rand(1, generator=generator).item() +
                            0.05 * torch.arange(size, dtype=torch.float64))
        with_draft[0] = 0
        without = with_draft * (1 + torch.rand(1, generator=generator).item())
        survival = earlier.cumprod(dim=1)
        values = sorted((float(survival[r, j]) for r in range(num_requests) for j in range(int(caps[r]))),
                        reverse=True)
        theta = [(num_requests + sum(values[:k])) * (float(with_draft[num_requests + k])
                                                     if num_requests + k < size else 0.0)
                 for k in range(len(values) + 1)]
        plain = num_requests * float(without[num_requests])
        best = max(range(len(theta)), key=lambda k: (theta[k], -k))
        first_stop = next((k for k in range(len(theta) - 1) if not theta[k + 1] > theta[k]), len(theta) - 1)
        for early_break, k in ((False, best), (True, first_stop)):
            expected = k if theta[k] > plain else None
            assert ops.plan_budget(earlier, with_draft, without, caps, early_break) == expected
            assert ops.plan_budget(earlier.numpy(), with_draft.numpy(), without.numpy(), caps.numpy(),
                                   early_break) == expected      # NumPy arrays as well as tensors
            budget, tokens = ops.plan_budget_and_tokens(earlier, with_draft, without, caps, early_break)
            assert budget == expected and tokens == pytest.approx(num_requests + sum(values[:k]))


def test_plan_with_early_break_skips_drafting_behind_a_cliff():
    earlier = torch.tensor([[0.95, 0.95, 0.95, 0.95]])
    with_draft = torch.tensor([0.0, 0.9, 0.45, 0.45, 0.45, 0.45])     # drafting costs a little; one cliff
    without = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    assert ops.plan_budget(earlier, with_draft, without) == 4           # budget mode: worth it past the cliff
    assert ops.plan_budget(earlier, with_draft, without, early_break=True) is None   # causal would stop at 0
