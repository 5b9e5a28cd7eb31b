"""Sampled speculative decoding follows the target distribution exactly.

The exact-probability test: with a 6-token vocabulary, enumerate every
4-token continuation of a prompt, compute its probability under the target
(float64, transformers), draw many seeded continuations through the engine
with a DSpark draft, and compare the frequencies with a chi-square test. The
same test run with a deliberately broken verifier must fail.
"""
import itertools

import pytest
import torch

import dspark
from dspark import ops
from dspark.scheduling.cost_model import CostModel
from stats import chi_square_pvalue
from dspark.conformance.testing import load_hf, make_agreeing_draft, make_target

PROMPT = [1, 2, 3]
VOCAB, LENGTH, SAMPLES = 6, 4, 12_000


@pytest.fixture(scope="module")
def small_vocab_pair(tmp_path_factory):
    target = make_target(tmp_path_factory.mktemp("v6"), "qwen3", vocab=VOCAB, seed=21, context_scale=1.0,
                         logit_scale=3.0)
    return target, make_agreeing_draft(target, tmp_path_factory.mktemp("v6_draft"), block_size=3)


def filtered_exact_distribution(target, temperature, top_k, top_p):
    """P(x_1..x_4 | PROMPT) under the filtered target, by enumeration: [V ** 4]."""
    model = load_hf(target, torch.float64)
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH - 1)))      # [V^3, 3]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, len(PROMPT) - 1:]                                     # [V^3, 4, V]
    n = logits.shape[0] * LENGTH
    probs = ops.sampling_probs(logits.reshape(n, VOCAB), torch.full((n,), temperature),
                               torch.full((n,), top_k), torch.full((n,), top_p)).double().view(-1, LENGTH, VOCAB)
    joint = torch.ones(VOCAB ** LENGTH, dtype=torch.float64)
    for index, sequence in enumerate(itertools.product(range(VOCAB), repeat=LENGTH)):
        row = sum(t * VOCAB ** (LENGTH - 2 - i) for i, t in enumerate(sequence[:-1]))
        joint[index] = torch.prod(probs[row, torch.arange(LENGTH), torch.tensor(sequence)])
    return joint


def empirical_counts(engine, temperature, top_k, top_p):
    params = [dspark.SamplingParams(max_new_tokens=LENGTH, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, ignore_eos=True) for seed in range(SAMPLES)]
    outputs = engine.generate([PROMPT] * SAMPLES, params)
    codes = torch.tensor([sum(t * VOCAB ** (LENGTH - 1 - i) for i, t in enumerate(o.token_ids)) for o in outputs])
    return torch.bincount(codes, minlength=VOCAB ** LENGTH), outputs


def eager_verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms, sample_uniforms):
    """The broken verifier: accepts with probability min(1, 2 p_t / p_d)."""
    return ops.verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms * 0.5, sample_uniforms)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 4, 0.9)])
def test_engine_samples_the_exact_target_distribution(small_vocab_pair, temperature, top_k, top_p):
    target, draft = small_vocab_pair
    exact = filtered_exact_distribution(target, temperature, top_k, top_p)
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=512)
    counts, outputs = empirical_counts(engine, temperature, top_k, top_p)
    assert chi_square_pvalue(counts, exact) > 1e-3
    # The draft was really used: some rounds accepted drafted tokens, some rejected them.
    accepted = [a for o in outputs for a in o.stats["accepted"]]
    assert 0.2 < sum(1 for a in accepted if a > 0) / len(accepted) < 0.98

    engine.backend.verify = eager_verify
    broken_counts, _ = empirical_counts(engine, temperature, top_k, top_p)
    assert chi_square_pvalue(broken_counts, exact) < 1e-6


def test_seeded_output_does_not_depend_on_batch_mates(bigram_qwen3):
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=4)
    mine = dspark.SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    [alone] = engine.generate([[5, 9, 2]], mine)
    others = [dspark.SamplingParams(max_new_tokens=n, temperature=t, seed=s, ignore_eos=True)
              for n, t, s in [(7, 0.0, 1), (40, 1.3, 2), (3, 0.7, 3), (25, 1.0, None), (12, 0.0, None)]]
    prompts = [[8] * 11, [1, 2], [3, 3, 3, 3, 3, 3], [60], [7, 1, 7, 1]]
    for position in (0, 3, 5):
        batch_prompts = prompts[:position] + [[5, 9, 2]] + prompts[position:]
        batch_params = others[:position] + [mine] + others[position:]
        outputs = engine.generate(batch_prompts, batch_params)
        assert outputs[position].token_ids == alone.token_ids
    assert alone.stats["tau"] > 1.5


def test_greedy_requests_decode_the_same_in_all_greedy_and_mixed_rounds(bigram_qwen3, monkeypatch):
    """Rounds whose requests are all greedy verify from argmaxes (`verify_greedy`); a greedy
    request that shares its rounds with sampled ones goes through distributions and `verify`.
    Both must give it the same tokens, with the draft and without."""
    target, draft = bigram_qwen3
    greedy = dspark.SamplingParams(max_new_tokens=24, ignore_eos=True)
    sampled = dspark.SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
    prompts = [[5, 9, 2], [8] * 11, [3, 1, 4, 1, 5]]
    for engine in (dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=4),
                   dspark.Engine.from_pretrained(target, max_batch_size=4)):
        calls = {"verify_greedy": 0, "verify": 0}
        for name in calls:
            def counted(*args, _name=name, _inner=getattr(engine.backend, name)):
                calls[_name] += 1
                return _inner(*args)
            monkeypatch.setattr(engine.backend, name, counted)
        alone = engine.generate(prompts, greedy)
        assert calls["verify_greedy"] > 0 and calls["verify"] == 0
        mixed = engine.generate(prompts + [[2, 7]], [greedy] * 3 + [sampled])
        assert calls["verify"] > 0
        assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
        monkeypatch.undo()


def test_same_seed_reproduces_and_different_seeds_differ(bigram_qwen3):
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft)
    params = [dspark.SamplingParams(max_new_tokens=20, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 1, 2)]
    first, again, other = engine.generate([[4, 4]] * 3, params)
    assert first.token_ids == again.token_ids and first.token_ids != other.token_ids


@pytest.mark.parametrize("schedule", ["threshold", "causal", "budget"])
def test_confidence_schedules_sample_the_exact_target_distribution(small_vocab_pair, schedule, tmp_path):
    target, draft = small_vocab_pair
    exact = filtered_exact_distribution(target, 1.0, 0, 1.0)
    # A device where verifying extra tokens is cheap, so both schedulers do verify drafts.
    profile = CostModel(device="test", source="measured", verify_tokens=[1, 8192], context_lens=[0],
                        verify_seconds=[[1.0, 1.2]], draft_requests=[1], draft_seconds=[0.05])
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=512, schedule=schedule,
                                           threshold=0.25, cost_profile=str(profile.to_yaml(tmp_path / "cheap.yaml")))
    counts, outputs = empirical_counts(engine, 1.0, 0, 1.0)
    assert chi_square_pvalue(counts, exact) > 1e-3
    lens = [l for o in outputs for l in o.stats["verify_lens"]]
    assert 0 < sum(lens) / len(lens) < 2     # drafts verified, but not always the whole block


def test_online_calibration_adapts_while_staying_lossless(bigram_qwen3):
    from dspark.scheduling.acceptance import acceptance_labels

    target, draft = bigram_qwen3
    prompts = [[i, (3 * i) % 64, 7] for i in range(40)]
    greedy = dspark.SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, greedy)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", schedule="threshold",
                                           threshold=0.3, max_batch_size=8)      # calibration="online": the default
    model = engine.calibration.models[True]        # these rounds are greedy
    model.bias[:] = 6.0                            # a start far too optimistic: every confidence ~1
    model._device_params = None
    stored = list(engine.draft.config.confidence_temperatures or [])
    outputs = engine.generate(prompts, greedy)
    assert [o.token_ids for o in outputs] == [p.token_ids for p in plain]
    records = [r for r in engine.round_log if "confidence_logits" in r]
    logits = torch.cat([r["confidence_logits"] for r in records])
    reached, label = acceptance_labels(torch.cat([r["verify_lens"] for r in records]).numpy(),
                                       torch.cat([r["accepted"] for r in records]).numpy(), engine.gamma)
    rate = label[reached[:, 0], 0].mean()                            # how often a first draft survived
    confidence = engine.calibration.confidence(logits, torch.ones(len(logits), dtype=torch.bool))[:, 0]
    assert model.refits > 0 and rate < 0.8                           # the start said ~1.0 ...
    assert abs(float(confidence[torch.from_numpy(reached[:, 0])].mean()) - rate) < 0.05   # ... now it matches
    assert engine.calibration.models[False].refits == 0              # sampled rows: none seen
    assert list(engine.draft.config.confidence_temperatures or []) == stored     # the draft is never rewritten
    offline = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", schedule="threshold",
                                            calibration="offline")
    assert offline.calibration is None
