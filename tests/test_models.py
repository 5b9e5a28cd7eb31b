"""Target runner parity with transformers; draft layout, save/load and DeepSpec compatibility."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dspark
from dspark.backends import get_backend
from dspark.models import StepBatch, load_draft, load_target
from dspark.models.drafts.config import default_target_layer_ids
from dspark.conformance.testing import load_hf, make_target

CPU = get_backend("cpu")


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_target_logits_and_hidden_states_match_transformers(tmp_path, family):
    path = make_target(tmp_path, family, vocab=97, layers=3, seed=11)
    hf = load_hf(path)
    model, tokenizer = load_target(path, CPU.device, torch.float32)
    assert tokenizer is None
    torch.manual_seed(0)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 9, 1, 13)]
    cache = model.make_cache(4, 64, torch.float32, CPU.device)
    batch = StepBatch.build(prompts, [0] * 4, [3, 0, 2, 1], CPU.device)
    out = model(batch, cache, CPU, hidden_layer_ids=[-1, 0, 1])  # HF's last entry is post-norm
    for row, prompt in enumerate(prompts):
        ref = hf(torch.tensor([prompt]), output_hidden_states=True)
        start, end = batch.cu_query_lens[row], batch.cu_query_lens[row + 1]
        torch.testing.assert_close(out.logits[start:end], ref.logits[0], atol=1e-5, rtol=1e-5)
        expected_hidden = torch.cat([ref.hidden_states[0][0], ref.hidden_states[1][0], ref.hidden_states[2][0]], -1)
        torch.testing.assert_close(out.hidden[start:end], expected_hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_ragged_verify_steps_with_rollback_match_transformers(tmp_path, family):
    """Requests verify different numbers of tokens in one forward; rejected positions are
    rolled back by not advancing the length, then overwritten by the next step."""
    path = make_target(tmp_path, family, vocab=50, layers=2, seed=12)
    hf = load_hf(path)
    model, _ = load_target(path, CPU.device, torch.float32)
    cache = model.make_cache(3, 64, torch.float32, CPU.device)
    torch.manual_seed(1)
    sequences = [torch.randint(0, 50, (n,)).tolist() for n in (4, 7, 2)]
    model(StepBatch.build(sequences, [0, 0, 0], [0, 1, 2], CPU.device), cache, CPU)
    lengths = [len(s) for s in sequences]
    for step in range(4):
        proposals = [torch.randint(0, 50, (n,)).tolist() for n in (3, 1, 5)]
        batch = StepBatch.build(proposals, lengths, [0, 1, 2], CPU.device)
        out = model(batch, cache, CPU)
        for row, proposal in enumerate(proposals):
            ref = hf(torch.tensor([sequences[row] + proposal])).logits[0, -len(proposal):]
            start, end = batch.cu_query_lens[row], batch.cu_query_lens[row + 1]
            torch.testing.assert_close(out.logits[start:end], ref, atol=1e-5, rtol=1e-5)
            keep = (step + row) % len(proposal) + 1   # accept a varying prefix, drop the rest
            sequences[row] += proposal[:keep]
            lengths[row] += keep


def test_default_target_layer_ids():
    assert default_target_layer_ids(36) == [1, 9, 17, 25, 33]   # Qwen3-4B, as in the DSpark release
    assert default_target_layer_ids(4) == [1, 2]   # never the last layer
    assert default_target_layer_ids(2) == [0]
    ids = default_target_layer_ids(28)
    assert len(ids) == 5 and ids[0] == 1 and ids[-1] == 25


def test_init_draft_writes_deepspec_layout_and_copies_embedding(tmp_path, qwen3_target):
    out = dspark.init_draft(qwen3_target, tmp_path / "draft", num_layers=2, block_size=6, markov_rank=8)
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"]
    for key in ("block_size", "target_layer_ids", "mask_token_id", "num_anchors", "num_target_layers", "markov_rank",
                "markov_head_type", "enable_confidence_head", "confidence_head_with_markov"):
        assert key in config
    assert config["num_hidden_layers"] == 2 and config["block_size"] == 6 and config["num_target_layers"] == 4
    weights = load_file(str(tmp_path / "draft" / "model.safetensors"))
    for name in ("embed_tokens.weight", "fc.weight", "hidden_norm.weight", "norm.weight", "lm_head.weight",
                 "layers.1.self_attn.q_norm.weight", "layers.0.mlp.gate_proj.weight",
                 "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
                 "confidence_head.proj.weight", "confidence_head.proj.bias"):
        assert name in weights, name
    assert weights["markov_head.markov_w1.weight"].shape == (64, 8)
    assert weights["confidence_head.proj.weight"].shape == (1, 32 + 8)
    target = load_hf(qwen3_target).state_dict()
    assert torch.equal(weights["embed_tokens.weight"], target["model.embed_tokens.weight"])
    assert torch.equal(weights["lm_head.weight"], target["lm_head.weight"])
    assert str(out) == str(tmp_path / "draft")


@pytest.mark.parametrize("algorithm", ["dspark", "eagle3"])
def test_init_draft_from_target_starts_at_the_targets_last_layer(tmp_path, algorithm):
    qwen3_target = make_target(tmp_path / "target", "qwen3", seed=5)
    weights_file = str(tmp_path / "target" / "model.safetensors")
    weights = load_file(weights_file)
    for name in weights:                     # norms away from their all-ones initialisation
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.1 * torch.randn_like(weights[name])
    save_file(weights, weights_file)
    cold = load_file(str(dspark.init_draft(qwen3_target, tmp_path / "cold", algorithm=algorithm) + "/model.safetensors"))
    warm_dir = dspark.init_draft(qwen3_target, tmp_path / "warm", algorithm=algorithm, from_target=True)
    warm = load_file(str(warm_dir) + "/model.safetensors")
    config = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert "from_target" not in config                        # how the weights began, not a setting
    target = load_hf(qwen3_target).state_dict()
    last = f"model.layers.{config['num_target_layers'] - 1}."
    prefix = "layers.0." if algorithm == "dspark" else "midlayer."
    assert torch.equal(warm["norm.weight"], target["model.norm.weight"])
    assert not torch.equal(cold["norm.weight"], target["model.norm.weight"])
    for name in ("mlp.gate_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
        assert torch.equal(warm[prefix + name], target[last + name]), name
    if algorithm == "dspark":                     # q/k/v read d-wide inputs as the target's do
        assert torch.equal(warm[prefix + "self_attn.q_proj.weight"], target[last + "self_attn.q_proj.weight"])
    else:                                         # EAGLE-3's q/k/v read [embedding; features]: 2d wide
        assert warm[prefix + "self_attn.q_proj.weight"].shape != target[last + "self_attn.q_proj.weight"].shape
    d = config["hidden_size"]
    deepest = config["target_layer_ids"].index(max(config["target_layer_ids"]))
    expected = torch.zeros_like(warm["fc.weight"])
    expected[:, deepest * d:(deepest + 1) * d] = torch.eye(d)
    assert torch.equal(warm["fc.weight"], expected)
    draft = load_draft(warm_dir, None)                        # loads like any other draft
    assert torch.equal(draft.norm.weight, target["model.norm.weight"])
    if algorithm == "dspark":
        assert propose(draft, qwen3_target, [3, 5, 7, 11]).tokens.shape == (1, draft.gamma)


def propose(draft, target_path, prompt, gamma_uniforms_seed=0):
    """Run a draft on one prompt: target prefill -> draft context -> one proposal (greedy)."""
    target, _ = load_target(target_path, CPU.device, torch.float32)
    tcache = target.make_cache(1, 64, torch.float32, CPU.device)
    dcache = draft.make_cache(1, 64, torch.float32, CPU.device)
    batch = StepBatch.build([prompt[:-1]], [0], [0], CPU.device)
    out = target(batch, tcache, CPU, hidden_layer_ids=draft.config.target_layer_ids)
    draft.append_context(dcache, batch.token_slots, batch.positions, out.hidden)
    zeros = torch.zeros(1)
    uniforms = torch.rand(1, draft.gamma, generator=torch.Generator().manual_seed(gamma_uniforms_seed))
    return draft.propose(torch.tensor([prompt[-1]]), torch.tensor([len(prompt) - 1]), torch.tensor([0]), dcache, CPU,
                         uniforms, zeros, torch.zeros(1, dtype=torch.long), torch.ones(1))


@pytest.mark.parametrize("algorithm,options", [("dspark", dict(markov_head_type="vanilla")),
                                               ("dspark", dict(markov_head_type="gated")),
                                               ("dspark", dict(markov_head_type="rnn")),
                                               ("dflash", {})])
def test_draft_save_load_round_trip_and_proposal_shapes(tmp_path, qwen3_target, algorithm, options):
    path = dspark.init_draft(qwen3_target, tmp_path / "d", algorithm=algorithm, num_layers=1, markov_rank=8,
                             block_size=5, **options)
    draft = load_draft(path, None)
    # Randomise every parameter so the round trip is checked on non-trivial values.
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_()
    dspark.models.save_draft(draft, tmp_path / "d2", json.loads((tmp_path / "d" / "config.json").read_text()))
    again = load_draft(tmp_path / "d2", None)
    prompt = [3, 9, 27, 4, 11, 5]
    first, second = propose(draft, qwen3_target, prompt), propose(again, qwen3_target, prompt)
    assert first.tokens.shape == (1, 5) and first.probs.shape == (1, 5, 64)
    assert torch.equal(first.tokens, second.tokens)
    torch.testing.assert_close(first.probs, second.probs)
    if algorithm == "dspark":
        assert first.confidence_logits.shape == (1, 5) and torch.isfinite(first.confidence_logits).all()
        torch.testing.assert_close(first.confidence_logits, second.confidence_logits)
    else:
        assert first.confidence_logits is None and again.config.anchor_as_first is False


def test_markov_head_changes_the_next_position_given_the_previous_token(tmp_path, qwen3_target):
    """Eq. 4-5: p_k depends on x_{k-1} through W1[x_{k-1}] W2."""
    draft = load_draft(dspark.init_draft(qwen3_target, tmp_path / "d", num_layers=1, markov_rank=64), None)
    with torch.no_grad():
        draft.markov_head.markov_w1.weight.copy_(torch.eye(64) * 50)
        draft.markov_head.markov_w2.weight.copy_(torch.roll(torch.eye(64), 1, dims=0))  # prev v -> next v + 1
    proposal = propose(draft, qwen3_target, [1, 2, 3, 4, 5, 6])
    tokens = [6] + proposal.tokens[0].tolist()
    assert all(b == (a + 1) % 64 for a, b in zip(tokens, tokens[1:]))


def test_a_deepspec_released_directory_loads(tmp_path, qwen3_target):
    """A directory in DeepSpec's own layout: their field set only, shared tensors prefixed
    with `model.` as some exporters do, and no fields of ours (dspark_algorithm, anchor_as_first)."""
    ours = tmp_path / "ours"
    dspark.init_draft(qwen3_target, ours, num_layers=2, markov_rank=16, block_size=7)
    config = json.loads((ours / "config.json").read_text())
    for key in ("dspark_algorithm", "anchor_as_first", "confidence_temperatures", "rope_parameters"):
        config.pop(key)
    config["rope_theta"] = 10000.0
    theirs = tmp_path / "deepspec"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps(config))
    weights = load_file(str(ours / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in weights.items()}, str(theirs / "model.safetensors"))
    draft = load_draft(theirs, None)
    assert draft.config.algorithm == "dspark" and draft.config.anchor_as_first and draft.gamma == 7
    reference = load_draft(ours, None)
    prompt = [5, 6, 7, 8, 9]
    assert torch.equal(propose(draft, qwen3_target, prompt).tokens, propose(reference, qwen3_target, prompt).tokens)


def test_anchor_context_is_not_visible_to_its_own_block(tmp_path, qwen3_target):
    """Changing the target features at the anchor's position must not change the proposal;
    changing an earlier position must."""
    draft = load_draft(dspark.init_draft(qwen3_target, tmp_path / "d", num_layers=1, markov_rank=8), None)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_()
    dims = len(draft.config.target_layer_ids) * 32
    features = torch.randn(6, dims)
    results = []
    for change in (None, 5, 3):
        cache = draft.make_cache(1, 16, torch.float32, CPU.device)
        f = features.clone()
        if change is not None:
            f[change] = torch.randn(dims)
        draft.append_context(cache, torch.zeros(6, dtype=torch.long), torch.arange(6), f)
        hidden, logits = draft.backbone(torch.tensor([7]), torch.tensor([5]), torch.tensor([0]), cache, CPU)
        results.append(logits)
    torch.testing.assert_close(results[0], results[1])          # position 5 = the anchor: invisible
    assert not torch.allclose(results[0], results[2])           # position 3: context
