"""EAGLE-3 draft: layer choice, checkpoints, lossless generation, cache = recompute, the TTT loss."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dspark
from dspark import ops
from dspark.backends import get_backend
from dspark.models import load_draft, save_draft
from dspark.models.drafts.eagle3 import Eagle3Draft, eagle3_target_layer_ids
from dspark.conformance.testing import load_hf, make_target
from dspark.training.batch import TrainBatch
from dspark.training.eagle3_loss import eagle3_loss, ttt_attention_mask, ttt_hidden_states

CPU = get_backend("cpu")
VOCAB, PROMPT_LEN, SEQ_LEN = 64, 6, 32


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A 4-layer Qwen3 target with peaked next-token distributions (something to learn)."""
    return make_target(tmp_path_factory.mktemp("eagle3_target"), "qwen3", vocab=VOCAB, layers=4, hidden=32,
                       seed=5, logit_scale=8.0)


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory, target):
    return dspark.init_draft(target, tmp_path_factory.mktemp("eagle3_draft"), algorithm="eagle3", block_size=4)


def randomised(draft: Eagle3Draft) -> Eagle3Draft:
    """Large random trainable weights in float64, so every part of the layer matters."""
    draft = draft.double()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return draft


@pytest.fixture(scope="module")
def train_batch(target, eagle_dir):
    """Eight target-sampled sequences of different lengths, features from transformers:
    target_hidden = outputs of the draft's layers (hidden_states[i + 1]), target_last = the
    final normed hidden (HF's last entry)."""
    hf = load_hf(target)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (8, PROMPT_LEN), generator=generator)
    with torch.no_grad():
        while ids.shape[1] < SEQ_LEN:
            probs = hf(ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        states = hf(ids, output_hidden_states=True).hidden_states
    lengths = torch.tensor([32, 29, 25, 32, 31, 22, 32, 27])
    ids = ids.masked_fill(torch.arange(SEQ_LEN) >= lengths.unsqueeze(1), 0)
    loss_mask = (torch.arange(SEQ_LEN) >= PROMPT_LEN) & (torch.arange(SEQ_LEN) < lengths.unsqueeze(1))
    layer_ids = load_draft(eagle_dir, None).config.target_layer_ids
    return TrainBatch(ids, loss_mask, lengths, torch.cat([states[i + 1] for i in layer_ids], dim=-1),
                      states[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, eagle_dir, train_batch):
    """30 AdamW steps on the fixed batch; returns (saved draft dir, first metrics, last metrics)."""
    draft = load_draft(eagle_dir, None)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(30):
        loss, metrics = eagle3_loss(draft, train_batch, ttt_steps=4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics)
    out = tmp_path_factory.mktemp("eagle3_trained")
    save_draft(draft, out, json.loads((Path(eagle_dir) / "config.json").read_text()))
    return str(out), history[0], history[-1]


# --- configuration and checkpoints ------------------------------------------------------

def test_default_target_layer_ids():
    assert eagle3_target_layer_ids(36) == [1, 17, 32]     # Qwen3-8B: outputs of layers 1, L/2 - 1, L - 4
    assert eagle3_target_layer_ids(28) == [1, 13, 24]
    assert eagle3_target_layer_ids(7) == [1, 2, 3]
    assert eagle3_target_layer_ids(6) == [0, 2, 4]         # the rule collides: spread over [0, L - 2]
    assert eagle3_target_layer_ids(4) == [0, 1, 2]
    assert eagle3_target_layer_ids(2) == [0, 0, 0]
    for layers in range(4, 80):
        ids = eagle3_target_layer_ids(layers)
        assert ids == sorted(set(ids)) and len(ids) == 3 and 0 <= ids[0] and ids[-1] <= layers - 2


def test_init_save_load_round_trip(tmp_path, target, eagle_dir):
    config = json.loads((Path(eagle_dir) / "config.json").read_text())
    assert config["dspark_algorithm"] == "eagle3" and config["num_hidden_layers"] == 1
    assert config["block_size"] == 4 and config["target_layer_ids"] == [0, 1, 2]   # 4-layer target
    assert not config["enable_confidence_head"] and config["markov_rank"] == 0
    weights = load_file(str(Path(eagle_dir) / "model.safetensors"))
    assert weights["fc.weight"].shape == (32, 96) and weights["midlayer.self_attn.q_proj.weight"].shape == (32, 64)
    assert {"midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "norm.weight", "embed_tokens.weight",
            "lm_head.weight"} <= set(weights)

    target_model, _ = dspark.models.load_target(target, CPU.device, torch.float32)
    draft = load_draft(eagle_dir, target_model.config)
    assert isinstance(draft, Eagle3Draft) and draft.gamma == 4 and not draft.has_confidence
    torch.testing.assert_close(draft.embed_tokens.weight, target_model.model.embed_tokens.weight)
    torch.testing.assert_close(draft.lm_head.weight, target_model.lm_head.weight)
    assert not draft.embed_tokens.weight.requires_grad and not draft.lm_head.weight.requires_grad

    save_draft(draft, tmp_path / "again", config)
    again = load_draft(tmp_path / "again", target_model.config)
    assert again.config == draft.config
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_explicit_layers_and_invalid_options(tmp_path, target):
    out = dspark.init_draft(target, tmp_path / "explicit", algorithm="eagle3", target_layer_ids=[0, 2, 3])
    assert load_draft(out, None).config.target_layer_ids == [0, 2, 3]
    with pytest.raises(ValueError, match="exactly 3 target layers"):
        dspark.init_draft(target, tmp_path / "four", algorithm="eagle3", target_layer_ids=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="exactly one layer"):
        dspark.init_draft(target, tmp_path / "deep", algorithm="eagle3", num_layers=2)
    with pytest.raises(ValueError, match="no Markov or confidence head"):
        dspark.init_draft(target, tmp_path / "markov", algorithm="eagle3", markov_rank=8)


# --- inference ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_greedy_generation_is_identical_to_the_target_alone(request, target, which):
    draft = request.getfixturevalue("eagle_dir") if which == "untrained" else request.getfixturevalue("trained")[0]
    params = dspark.SamplingParams(max_new_tokens=20, ignore_eos=True)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
               for n in torch.randint(1, 18, (5,), generator=generator)]
    # Greedy plain decoding of a prompt does not depend on its batch-mates: one reference run.
    expected = [o.token_ids for o in dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, params)]
    spec = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64")
    accepted = 0
    for count in range(1, 6):
        outputs = spec.generate(prompts[:count], params)
        assert [o.token_ids for o in outputs] == expected[:count]
        accepted += sum(sum(o.stats["accepted"]) for o in outputs)
    # Two slots (requests queue, slots are reused) and a context that ends mid-chain.
    short = dict(dtype="float64", max_batch_size=2, max_model_len=24)
    expected = [o.token_ids for o in dspark.Engine.from_pretrained(target, **short).generate(prompts, params)]
    outputs = dspark.Engine.from_pretrained(target, draft=draft, **short).generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected
    if which == "trained":
        assert accepted > 0, "the trained draft should get some drafts accepted"


def test_sampled_output_does_not_depend_on_batch_mates(target, trained):
    """Sampling through the chain (temperature, top-k, top-p) with per-request seeds: a
    request's tokens are the same alone and in a ragged batch."""
    params = [dspark.SamplingParams(max_new_tokens=16, temperature=0.8, top_k=12, top_p=0.95, seed=s, ignore_eos=True)
              for s in (21, 22, 23)]
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7, 9]]
    engine = dspark.Engine.from_pretrained(target, draft=trained[0], dtype="float64")
    together = engine.generate(prompts, params)
    alone = engine.generate([prompts[1]], [params[1]])
    assert together[1].token_ids == alone[0].token_ids
    assert all(len(o.token_ids) == 16 and all(0 <= t < VOCAB for t in o.token_ids) for o in together)


def test_cached_chain_matches_uncached_recompute(eagle_dir):
    """Ragged requests on scattered slots, context appended in two parts with a speculative
    chain in between (its K/V must be overwritten or stay invisible): every chain step's
    distribution equals a causal recompute of the same pairs without a cache."""
    draft = randomised(load_draft(eagle_dir, None))
    d, gamma = draft.config.hidden_size, draft.gamma
    generator = torch.Generator().manual_seed(11)
    lengths, slots = [5, 9, 3], [2, 0, 3]                    # verified positions before the anchor
    tokens = [torch.randint(0, VOCAB, (n + 1,), generator=generator) for n in lengths]   # x_0 .. x_n
    hidden = [torch.randn(n, 3 * d, generator=generator, dtype=torch.float64) for n in lengths]
    cache = draft.make_cache(4, 32, torch.float64, CPU.device)

    def append(ranges):
        rows = [(r, p) for r, (lo, hi) in enumerate(ranges) for p in range(lo, hi)]
        draft.append_context(cache, torch.tensor([slots[r] for r, _ in rows]), torch.tensor([p for _, p in rows]),
                             torch.stack([hidden[r][p] for r, p in rows]), torch.stack([tokens[r][p] for r, p in rows]))

    num = len(lengths)
    temperature = torch.ones(num)
    top_k, top_p = torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 0.9])
    uniforms = torch.rand(num, gamma, generator=generator)

    def propose(anchors, starts):
        return draft.propose(torch.tensor(anchors), torch.tensor(starts), torch.tensor(slots), cache, CPU, uniforms,
                             temperature, top_k, top_p, all_greedy=False, filtered=True)

    split = [max(1, n - 2) for n in lengths]
    append([(0, s) for s in split])
    propose([int(t[s]) for t, s in zip(tokens, split)], split)          # speculative writes at split..
    append(list(zip(split, lengths)))
    proposal = propose([int(t[n]) for t, n in zip(tokens, lengths)], lengths)
    assert proposal.tokens.shape == (num, gamma) and proposal.probs.shape == (num, gamma, VOCAB)
    assert proposal.confidence_logits is None

    for r, n in enumerate(lengths):
        ids = tokens[r]                                                          # [n + 1]
        features = torch.cat([torch.zeros(1, d, dtype=torch.float64), draft.fuse(hidden[r])])   # [0, g_0..g_{n-1}]
        for k in range(gamma):
            with torch.no_grad():
                h = draft(ids.unsqueeze(0), features.unsqueeze(0))[0]            # [n + 1 + k, d]
                expected = ops.sampling_probs(draft.logits(h[-1:]), temperature[r:r + 1], top_k[r:r + 1],
                                              top_p[r:r + 1])[0]
            torch.testing.assert_close(proposal.probs[r, k], expected, atol=1e-9, rtol=1e-7)
            assert int(proposal.tokens[r, k]) == int(ops.sample_from_probs(expected, uniforms[r, k]))
            ids = torch.cat([ids, proposal.tokens[r, k:k + 1]])
            features = torch.cat([features, h[-1:]])


# --- training -----------------------------------------------------------------------------

def test_ttt_attention_mask_worked_example():
    """T = 4, step 2: columns are (step-0 keys 0..3 | step-1 keys 0..3 | step-2 keys 0..3)."""
    mask = ttt_attention_mask(4, 2)
    visible = {(p, c // 4, c % 4) for p, c in mask.nonzero().tolist()}    # (query, key step, key position)
    assert visible == {(3, 0, 1), (3, 1, 2), (3, 2, 3),   # chain start 1: context up to 1, then its own steps
                       (2, 1, 1), (2, 2, 2),              # start 0 / -1: junk rows, never supervised
                       (1, 2, 1)}
    step0 = ttt_attention_mask(4, 0)
    assert torch.equal(step0, torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]).bool())


def test_ttt_steps_match_the_chain_recomputed_without_cache(eagle_dir):
    """Step i at position p of the training-time test is step i of the inference chain that
    starts at p - i (true tokens, own features)."""
    draft = randomised(load_draft(eagle_dir, None))
    generator = torch.Generator().manual_seed(12)
    batch, length, steps, d = 2, 9, 4, draft.config.hidden_size
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    fused = torch.randn(batch, length, d, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        hiddens = ttt_hidden_states(draft, ids, fused, steps)
        for b in range(batch):
            for start in range(1, length):
                features = torch.cat([torch.zeros(1, d, dtype=torch.float64), fused[b, :start]])   # [start + 1, d]
                for step in range(min(steps, length - start)):
                    p = start + step
                    h = draft(ids[b:b + 1, :p + 1], features.unsqueeze(0))[0]
                    torch.testing.assert_close(hiddens[step][b, p], h[p], atol=1e-10, rtol=1e-8)
                    features = torch.cat([features, h[p:p + 1]])


def test_loss_is_finite_and_only_trainable_weights_get_gradients(eagle_dir, train_batch):
    draft = load_draft(eagle_dir, None)
    draft.embed_tokens.weight.requires_grad_(True)     # even if a trainer unfreezes them by mistake
    draft.lm_head.weight.requires_grad_(True)
    loss, metrics = eagle3_loss(draft, train_batch, ttt_steps=3)
    loss.backward()
    assert torch.isfinite(loss) and loss.dim() == 0
    assert {"loss", "loss_step0", "acc_step2", "supervised_step2"} <= set(metrics)
    assert metrics["supervised_step0"] >= metrics["supervised_step2"] > 0
    assert draft.embed_tokens.weight.grad is None and draft.lm_head.weight.grad is None
    for name, param in draft.named_parameters():
        if name not in ("embed_tokens.weight", "lm_head.weight"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_training_lowers_the_loss_and_raises_accuracy(trained):
    _, first, last = trained
    assert last["loss"] < 0.5 * first["loss"]          # forward KL to the target: measured 0.70 -> 0.25
    assert last["acc_step0"] > first["acc_step0"] + 0.2
    assert last["acc_step3"] > first["acc_step3"]
