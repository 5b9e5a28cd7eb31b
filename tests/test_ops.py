"""The reference ops against hand-computed cases and float64 brute force."""
import itertools

import pytest
import torch

from dspark import ops
from stats import chi_square_pvalue


def rows(n, value, dtype=torch.float32):
    return torch.full((n,), value, dtype=dtype)


def reference_filter(logits, temperature, top_k, top_p):
    """One row at a time, by the textbook definition, in float64."""
    if temperature == 0:
        out = torch.zeros_like(logits, dtype=torch.float64)
        out[logits.argmax()] = 1
        return out
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    if top_k:  # top-k first, then top-p on the renormalised top-k distribution (as HF and vLLM do)
        probs = probs * torch.isin(torch.arange(len(probs)), torch.tensor(order[:top_k]))
        probs = probs / probs.sum()
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for index in order:
        if mass >= top_p or probs[index] == 0:
            break
        keep[index] = True
        mass += probs[index].item()
    kept = probs * keep
    return kept / kept.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6),
                                                     (0.0, 0, 1.0), (2.0, 1, 1.0)])
def test_sampling_probs_matches_textbook_filter(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 2
    got = ops.sampling_probs(logits, rows(6, temperature), rows(6, top_k, torch.long), rows(6, top_p))
    for r in range(6):
        torch.testing.assert_close(got[r].double(), reference_filter(logits[r], temperature, top_k, top_p),
                                   atol=1e-6, rtol=1e-5)


def test_sampling_probs_per_row_parameters_and_extra_dims():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 11)
    temperature, top_k, top_p = torch.tensor([0.0, 1.0, 0.5]), torch.tensor([0, 3, 0]), torch.tensor([1.0, 1.0, 0.7])
    got = ops.sampling_probs(logits, temperature, top_k, top_p)
    for r, k in itertools.product(range(3), range(4)):
        expected = reference_filter(logits[r, k], temperature[r].item(), top_k[r].item(), top_p[r].item())
        torch.testing.assert_close(got[r, k].double(), expected, atol=1e-6, rtol=1e-5)


def test_sample_from_probs_never_picks_zero_mass_and_follows_probs():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    uniforms = torch.rand(50_000, generator=generator)
    tokens = ops.sample_from_probs(probs.expand(50_000, -1), uniforms)
    counts = torch.bincount(tokens, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert chi_square_pvalue(counts, probs) > 1e-3
    # edge uniforms
    assert ops.sample_from_probs(probs.expand(2, -1), torch.tensor([0.0, 0.9999999])).tolist() == [1, 4]


def test_verify_greedy_hand_computed():
    # gamma = 3, vocab = 5. Target argmaxes after [anchor, d1, d2, d3]: 2, 4, 1, 3.
    target_argmax = torch.tensor([[2, 4, 1, 3]] * 3)
    target_probs = torch.nn.functional.one_hot(target_argmax, 5).float()
    draft_tokens = torch.tensor([[2, 4, 1], [2, 0, 1], [2, 4, 1]])
    draft_probs = torch.nn.functional.one_hot(draft_tokens, 5).float()
    verify_lens = torch.tensor([3, 3, 1])
    result = ops.verify(draft_tokens, draft_probs, target_probs, verify_lens, torch.rand(3, 3), torch.rand(3))
    P = ops.PLACEHOLDER_TOKEN_ID
    assert result.num_accepted.tolist() == [3, 1, 1]
    assert result.output_tokens.tolist() == [[2, 4, 1, 3], [2, 4, P, P], [2, 4, P, P]]
    assert result.num_emitted.tolist() == [4, 2, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verify_greedy_from_logits_equals_verify_on_one_hot_distributions(seed):
    """The engine's all-greedy path (argmaxes only) against the distribution path it replaces, on
    fresh random logits with ties (logits rounded to a few values), drafts that match the argmax
    for a random prefix, draft distributions that are not one-hot, random uniforms and lengths."""
    g = torch.Generator().manual_seed(seed)
    rows, gamma, vocab = 64, 5, 12
    logits = (torch.randn(rows, gamma + 1, vocab, generator=g) * 2).round()      # many ties
    argmax = logits.argmax(-1)
    matched = torch.arange(gamma) < torch.randint(0, gamma + 1, (rows, 1), generator=g)
    draft_tokens = torch.where(matched, argmax[:, :gamma], torch.randint(0, vocab, (rows, gamma), generator=g))
    draft_probs = torch.rand(rows, gamma, vocab, generator=g).pow(3).softmax(-1)
    draft_probs[:rows // 2] = torch.nn.functional.one_hot(draft_tokens[:rows // 2], vocab).float()
    lens = torch.randint(0, gamma + 1, (rows,), generator=g)
    greedy = (torch.zeros(rows), torch.zeros(rows, dtype=torch.long), torch.ones(rows))
    reference = ops.verify(draft_tokens, draft_probs, ops.sampling_probs(logits, *greedy), lens,
                           torch.rand(rows, gamma, generator=g), torch.rand(rows, generator=g))
    fast = ops.verify_greedy(draft_tokens, logits, lens)
    assert torch.equal(fast.output_tokens, reference.output_tokens)
    assert torch.equal(fast.num_accepted, reference.num_accepted)
    assert torch.equal(fast.num_emitted, reference.num_emitted)
    assert 0 < int(reference.num_accepted.sum()) < int(lens.sum())            # both outcomes occur


def test_verify_zero_length_is_plain_sampling():
    target_probs = torch.tensor([[[0.1, 0.6, 0.3]]])
    result = ops.verify(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 3), target_probs,
                        torch.tensor([0]), torch.zeros(1, 0), torch.tensor([0.75]))
    assert result.output_tokens.tolist() == [[2]] and result.num_accepted.tolist() == [0]


def exact_two_token_distribution(draft_first, draft_second, target_first, target_second):
    """P(first two emitted tokens) of the target alone: target_first[x1] * target_second[x1][x2]."""
    return target_first.unsqueeze(1) * target_second


def run_verify_many(verify_fn, n, draft_first, draft_second, target_first, target_second, verify_len, seed=0):
    """Simulate one round with gamma = 2 for n independent rows and return the first two
    emitted tokens; when fewer than 2 are emitted, the second comes from the target's
    next step (as the engine would do), sampled from target_second[x1]."""
    generator = torch.Generator().manual_seed(seed)
    vocab = target_first.shape[0]
    d1 = ops.sample_from_probs(draft_first.expand(n, -1), torch.rand(n, generator=generator))
    d2 = ops.sample_from_probs(draft_second[d1], torch.rand(n, generator=generator))
    draft_tokens = torch.stack([d1, d2], 1)
    draft_probs = torch.stack([draft_first.expand(n, -1), draft_second[d1]], 1)
    # Target distributions after anchor, after d1, after d2 (the third is not needed: use uniform).
    target_probs = torch.stack([target_first.expand(n, -1), target_second[d1], torch.full((n, vocab), 1 / vocab)], 1)
    result = verify_fn(draft_tokens, draft_probs, target_probs, torch.full((n,), verify_len),
                       torch.rand(n, 2, generator=generator), torch.rand(n, generator=generator))
    first = result.output_tokens[:, 0]
    follow_up = ops.sample_from_probs(target_second[first], torch.rand(n, generator=generator))
    second = torch.where(result.num_emitted >= 2, result.output_tokens[:, 1], follow_up)
    return first * vocab + second


def broken_verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms, sample_uniforms):
    """A plausible-looking bug: drafts are accepted with probability min(1, 2 p_t / p_d)."""
    return ops.verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms * 0.5, sample_uniforms)


@pytest.mark.parametrize("verify_len", [1, 2])
def test_verify_sampled_is_exact_and_a_broken_verifier_is_caught(verify_len):
    torch.manual_seed(5)
    vocab, n = 5, 200_000
    target_first = torch.softmax(torch.randn(vocab), -1)
    target_second = torch.softmax(torch.randn(vocab, vocab) * 1.5, -1)
    draft_first = torch.softmax(torch.randn(vocab), -1)
    draft_second = torch.softmax(torch.randn(vocab, vocab), -1)
    exact = exact_two_token_distribution(draft_first, draft_second, target_first, target_second).flatten()
    pairs = run_verify_many(ops.verify, n, draft_first, draft_second, target_first, target_second, verify_len)
    assert chi_square_pvalue(torch.bincount(pairs, minlength=vocab * vocab), exact) > 1e-3
    # Accepting too eagerly (u scaled by 0.5) must be detected by the same test.
    pairs = run_verify_many(broken_verify, n, draft_first, draft_second, target_first, target_second, verify_len)
    assert chi_square_pvalue(torch.bincount(pairs, minlength=vocab * vocab), exact) < 1e-6


def test_schedule_modes():
    from dspark.backends import Backend
    from dspark.scheduling.planner import verify_lengths

    confidence = torch.tensor([[0.9, 0.9, 0.5, 0.9], [0.4, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    caps, reference = torch.tensor([4, 4, 4]), Backend()
    assert verify_lengths("fixed", reference, confidence, caps, verify_len=2)[0].tolist() == [2, 2, 2]
    assert verify_lengths("fixed", reference, None, caps, verify_len=9)[0].tolist() == [4, 4, 4]
    # survival: [0.9, 0.81, 0.405, ...], [0.4, ...], [1, 1, 1, 1]
    assert verify_lengths("threshold", reference, confidence, caps, threshold=0.5)[0].tolist() == [2, 0, 4]
    assert verify_lengths("threshold", reference, confidence, torch.tensor([3, 3, 3]),
                          threshold=0.5)[0].tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="valid: fixed, threshold, causal, budget"):
        verify_lengths("psychic", reference, confidence, caps)
    with pytest.raises(ValueError, match="confidence head"):
        verify_lengths("threshold", reference, None, caps)


def test_truncate_at_stop_keeps_the_stop_token_and_ignores_padding():
    P = ops.PLACEHOLDER_TOKEN_ID
    tokens = torch.tensor([[5, 7, 9, P], [7, 5, P, P], [1, 2, 3, 4], [P, P, P, P]])
    kept, stopped = ops.truncate_at_stop(tokens, torch.tensor([3, 2, 4, 0]),
                                         torch.tensor([[7, P], [9, P], [P, P], [P, 5]]))
    assert kept.tolist() == [2, 2, 4, 0] and stopped.tolist() == [True, False, False, False]


def test_sampling_hints_select_a_shorter_path_to_the_same_result():
    torch.manual_seed(3)
    logits = torch.randn(4, 3, 30)
    cases = [(torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.ones(4)),
             (torch.tensor([0.0, 1.0, 0.5, 2.0]), torch.zeros(4, dtype=torch.long), torch.ones(4)),
             (torch.tensor([0.0, 1.0, 0.5, 2.0]), torch.tensor([0, 5, 0, 30]), torch.tensor([1.0, 1.0, 0.7, 1.0]))]
    for temperature, top_k, top_p in cases:
        derived = ops.sampling_probs(logits, temperature, top_k, top_p)
        hinted = ops.sampling_probs(logits, temperature, top_k, top_p, all_greedy=bool((temperature == 0).all()),
                                    filtered=bool((top_k > 0).any() or (top_p < 1).any()))
        full = ops.sampling_probs(logits, temperature, top_k, top_p, all_greedy=False, filtered=True)
        torch.testing.assert_close(derived, full)
        torch.testing.assert_close(hinted, full)
