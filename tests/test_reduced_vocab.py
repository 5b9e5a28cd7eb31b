"""Drafts with a reduced vocabulary (EAGLE-3's d2t / t2d maps) stay lossless.

The draft proposes only its Vd tokens; its distribution is expanded to the target vocabulary
with zero mass elsewhere, so a target token outside the draft vocabulary is simply never
accepted as a draft. Greedy output must equal plain decoding, and sampled output must follow
the target distribution exactly (the exact-probability test of test_engine_sampling).
"""
import pytest
import torch

import dspark
from dspark.models import load_draft
from dspark.models.drafts import DraftVocab
from stats import chi_square_pvalue
from test_engine_sampling import LENGTH, PROMPT, VOCAB, empirical_counts, filtered_exact_distribution

from dspark.conformance.testing import make_target

DRAFT_TOKENS = [0, 2, 3, 5]          # token 1 and 4 of the 6-token vocabulary cannot be proposed


def reduced_draft(target, out, algorithm, seed):
    options = dict(block_size=3, draft_vocab_size=len(DRAFT_TOKENS), seed=seed)
    if algorithm != "eagle3":
        options.update(num_layers=1)
    if algorithm == "dspark":
        options.update(markov_rank=4)
    path = dspark.init_draft(target, out, algorithm=algorithm, draft_vocab_ids=DRAFT_TOKENS, **options)
    draft = load_draft(path, None)
    assert draft.config.reduced_vocab and DraftVocab.target_ids(draft).tolist() == DRAFT_TOKENS
    assert draft.lm_head.weight.shape[0] == len(DRAFT_TOKENS)
    return path


@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("v6_reduced"), "qwen3", vocab=VOCAB, seed=23, logit_scale=2.0)


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_reduced_vocabulary_drafts_are_greedy_identical(small_target, tmp_path, algorithm):
    draft = reduced_draft(small_target, tmp_path / algorithm, algorithm, seed=1)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist() for n in (3, 7, 1, 12)]
    greedy = dspark.SamplingParams(max_new_tokens=16, ignore_eos=True)
    plain = dspark.Engine.from_pretrained(small_target).generate(prompts, greedy)
    spec = dspark.Engine.from_pretrained(small_target, draft=draft).generate(prompts, greedy)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    # Drafts were accepted, and never a token outside the draft vocabulary: every accepted token
    # run contains only draft tokens, so the outputs' other tokens all came from the target itself.
    assert sum(a for s in spec for a in s.stats["accepted"]) > 0


@pytest.mark.parametrize("algorithm", ["dspark", "eagle3"])
def test_reduced_vocabulary_sampling_follows_the_target_exactly(small_target, tmp_path, algorithm):
    draft = reduced_draft(small_target, tmp_path / algorithm, algorithm, seed=2)
    exact = filtered_exact_distribution(small_target, 1.0, 0, 1.0)
    engine = dspark.Engine.from_pretrained(small_target, draft=draft, max_batch_size=512)
    counts, outputs = empirical_counts(engine, 1.0, 0, 1.0)
    assert chi_square_pvalue(counts, exact) > 1e-3
    accepted = [a for o in outputs for a in o.stats["accepted"]]
    assert sum(1 for a in accepted if a > 0) / len(accepted) > 0.05          # the draft did get used
    # Tokens outside the draft vocabulary still appear (from the target's own samples) ...
    assert counts.view(*[VOCAB] * LENGTH)[1].sum() > 0 and len(PROMPT) == 3


def test_draft_vocabulary_maps_round_trip_and_are_checked(small_target, tmp_path):
    path = reduced_draft(small_target, tmp_path / "d", "dspark", seed=3)
    draft = load_draft(path, None)
    ids = torch.tensor([5, 1, 0, 3, 4, 2])
    assert DraftVocab.to_draft(draft, ids).tolist() == [3, -1, 0, 2, -1, 1]
    expanded = DraftVocab.expand(draft, torch.tensor([1.0, 2.0, 3.0, 4.0]), float("-inf"))
    assert expanded.tolist() == [1.0, float("-inf"), 2.0, 3.0, float("-inf"), 4.0]
    # A checkpoint whose d2t and t2d disagree is refused by name.
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "d" / "model.safetensors"))
    weights["t2d"][4] = True
    save_file(weights, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(dspark.CheckpointError, match="d2t and t2d do not describe the same set"):
        load_draft(path, None)


@pytest.mark.parametrize("mode", ["greedy", "temperature", "filtered"])
def test_sampling_over_the_draft_columns_equals_sampling_over_the_full_vocabulary(mode):
    """`ops.sample_draft_block` with `token_ids` (the DSpark draft's path with a reduced vocabulary)
    against the same block over the full vocabulary with -inf logits and zero biases outside the
    draft's tokens (the path it replaced): the same tokens and prev_ids, the same distributions
    once spread over the full vocabulary. Fresh random logits and Markov weights."""
    from ops import markov_bias, sample_draft_block

    g = torch.Generator().manual_seed(11)
    rows, gamma, vocab, rank = 16, 4, 40, 5
    ids = torch.randperm(vocab, generator=g)[:17].sort().values                     # the draft's tokens
    base = torch.randn(rows, gamma, ids.numel(), generator=g, dtype=torch.float64) * 2
    w1 = torch.randn(vocab, rank, generator=g, dtype=torch.float64)                 # by previous token id
    w2 = torch.randn(ids.numel(), rank, generator=g, dtype=torch.float64)          # to the draft columns
    anchors = torch.randint(0, vocab, (rows,), generator=g)
    uniforms = torch.rand(rows, gamma, generator=g, dtype=torch.float64)
    temperature = torch.zeros(rows) if mode == "greedy" else torch.rand(rows, generator=g) + 0.3
    top_k = torch.randint(0, 8, (rows,), generator=g) if mode == "filtered" else torch.zeros(rows, dtype=torch.long)
    top_p = torch.rand(rows, generator=g) * 0.5 + 0.5 if mode == "filtered" else torch.ones(rows)
    hints = {"all_greedy": mode == "greedy", "filtered": mode == "filtered"}

    def spread(values, fill):
        out = values.new_full(values.shape[:-1] + (vocab,), fill)
        out[..., ids] = values
        return out

    full = sample_draft_block(spread(base, float("-inf")), anchors, uniforms, temperature, top_k, top_p,
                              lambda k, prev, state: (spread(markov_bias(prev, w1, w2), 0.0), None), **hints)
    narrow = sample_draft_block(base, anchors, uniforms, temperature, top_k, top_p,
                                lambda k, prev, state: (markov_bias(prev, w1, w2), None), ids, **hints)
    assert torch.equal(narrow[0], full[0]) and torch.equal(narrow[2], full[2])
    assert bool(torch.isin(narrow[0], ids).all())
    # sampling_probs works in float32: a softmax over 17 columns and one over 40 (23 of them zero)
    # round their sums differently in the last bits.
    torch.testing.assert_close(spread(narrow[1], 0.0), full[1], rtol=1e-6, atol=1e-7)
    if mode != "greedy":
        assert len(set(narrow[0].flatten().tolist())) > 3          # the uniforms drew varied tokens


@pytest.mark.parametrize("mode", ["greedy", "temperature", "filtered"])
def test_eagle3_chain_samples_over_the_draft_columns_as_over_the_full_vocabulary(small_target, tmp_path, mode):
    """EAGLE-3's chain filters and samples each step over its own columns. Every step, recorded
    while the engine serves, must give the token and the distribution that the full-vocabulary
    path it replaced gives from the same logits and uniform: the step's logits spread over the
    target vocabulary with -inf outside the draft's tokens, filtered and sampled there."""
    from dspark import ops

    engine = dspark.Engine.from_pretrained(small_target, draft=reduced_draft(small_target, tmp_path / "e3", "eagle3",
                                                                             seed=3))
    steps, propose = [], engine.draft.propose

    def recording(anchor_ids, start_positions, slots, cache, backend, uniforms, temperature, top_k, top_p, *a, **kw):
        proposal = propose(anchor_ids, start_positions, slots, cache, backend, uniforms, temperature, top_k, top_p,
                           *a, **kw)
        steps.append((proposal, uniforms, (temperature, top_k, top_p)))
        return proposal

    engine.draft.propose = recording
    sampled = {"greedy": {}, "temperature": dict(temperature=0.9),
               "filtered": dict(temperature=1.1, top_k=3, top_p=0.8)}
    params = [dspark.SamplingParams(max_new_tokens=12, ignore_eos=True, seed=s, **sampled[mode]) for s in range(6)]
    engine.generate([PROMPT] * 6, params)
    assert steps
    tokens_seen = set()
    for proposal, uniforms, sampling in steps:
        for k in range(proposal.tokens.shape[1]):
            full = ops.sampling_probs(DraftVocab.expand(engine.draft, proposal.logits[:, k].float(), float("-inf")),
                                      *sampling)
            assert torch.equal(proposal.tokens[:, k], ops.sample_from_probs(full, uniforms[:, k]))
            torch.testing.assert_close(proposal.probs[:, k], full, rtol=1e-6, atol=1e-7)
            tokens_seen.update(proposal.tokens[:, k].tolist())
    assert tokens_seen <= set(DRAFT_TOKENS)
    if mode != "greedy":
        assert len(tokens_seen) > 1
