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
