"""Gemma 3 / Gemma 4 text targets: parity with transformers, losslessness, drafts, training.

The tiny targets switch on every Gemma feature the runner implements: sliding-window
layers (window 4, so every prompt here is longer than it) between global ones, local vs
global RoPE (linear scaling on Gemma 3, proportional partial RoPE on Gemma 4),
query_pre_attn_scalar, final-logit soft-capping, and on Gemma 4 a larger global head
dim with its own KV-head count, K = V, KV sharing, double-wide MLPs, per-layer input
embeddings and (a second model) mixture-of-experts blocks. Every norm weight and the
Gemma 4 layer scalars are randomised, so a (1 + w) / w mix-up or a skipped scalar shows.
"""
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, Gemma4ForCausalLM, Gemma4TextConfig

import dspark
from dspark import ops
from dspark.backends import get_backend
from dspark.errors import CheckpointError
from dspark.models import StepBatch, init_draft, load_draft, load_target, save_draft
from dspark.models.checkpoint import target_config
from dspark.models.gemma import GemmaConfig
from stats import chi_square_pvalue
from test_engine_sampling import eager_verify, empirical_counts

CPU = get_backend("cpu")
S, F = "sliding_attention", "full_attention"
VOCAB, WINDOW = 64, 4
GREEDY = dspark.SamplingParams(max_new_tokens=24, ignore_eos=True)

GEMMA3 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=WINDOW,
              layer_types=[S, F, S, F], final_logit_softcapping=3.0, max_position_embeddings=256,
              rope_parameters={F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 50_000.0},
                               S: {"rope_type": "default", "rope_theta": 10_000.0}})
GEMMA4 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
              attention_k_eq_v=True, num_kv_shared_layers=2, use_double_wide_mlp=True,
              hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, sliding_window=WINDOW,
              layer_types=[S, S, F, S, S, F], final_logit_softcapping=3.0, max_position_embeddings=256,
              rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                               F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}})
GEMMA4_MOE = dict(GEMMA4, num_hidden_layers=4, layer_types=[S, F, S, F], num_kv_shared_layers=0,
                  use_double_wide_mlp=False, hidden_size_per_layer_input=0, attention_k_eq_v=False,
                  enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16)
VARIANTS = {"gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, GEMMA3),
            "gemma4": (Gemma4TextConfig, Gemma4ForCausalLM, GEMMA4),
            "gemma4_moe": (Gemma4TextConfig, Gemma4ForCausalLM, GEMMA4_MOE)}


def make_gemma(path, variant, seed=0, context_scale=1.0, logit_scale=1.0, tied=True, **overrides) -> str:
    """Save a tiny random Gemma with transformers. context_scale scales what attention adds to
    the residual stream (through the post-attention norm, since Gemma normalises the attention
    output): below 1 the next token depends mostly on the current one. logit_scale scales the
    LM head (with tied embeddings, the embedding too)."""
    config_cls, model_cls, settings = VARIANTS[variant]
    config = config_cls(**{**settings, **overrides}, initializer_range=0.2, pad_token_id=0, bos_token_id=None,
                        eos_token_id=None, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    zero_centred = variant == "gemma3"             # Gemma 3 norms scale by (1 + w), Gemma 4 by w
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if name.endswith("norm.weight") or name.endswith("layer_scalar") or "router.scale" in name \
                    or "per_expert_scale" in name:
                tensor.copy_(torch.rand_like(tensor) * 0.6 - 0.3 + (0.0 if zero_centred and "norm" in name else 1.0))
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.mul_(context_scale)
            if zero_centred:    # (1 + w) -> context_scale * (1 + w)
                layer.post_attention_layernorm.weight.add_(context_scale - 1)
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(str(path))
    return str(path)


def load_hf(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def make_agreeing_draft(target_dir, out_dir, block_size=4) -> str:
    """`dspark.conformance.testing.make_agreeing_draft` for Gemma: a DSpark draft whose Markov head holds the
    target's (soft-capped) logits for a lone token, its backbone output zeroed."""
    target = load_hf(target_dir)
    vocab = target.config.vocab_size
    with torch.no_grad():
        bigram = target(torch.arange(vocab).unsqueeze(1)).logits[:, 0]        # [V, V]: row = current token
    init_draft(target_dir, out_dir, block_size=block_size, num_layers=1, markov_rank=vocab)
    draft = load_draft(out_dir, None)
    with torch.no_grad():
        draft.norm.weight.zero_()                  # logits = softcap(lm_head(0)) = 0: the Markov head decides
        draft.markov_head.markov_w1.weight.copy_(torch.eye(vocab))
        draft.markov_head.markov_w2.weight.copy_(bigram.t())
        peak = bigram.softmax(-1).max(-1).values.clamp(1e-4, 1 - 1e-4)
        draft.confidence_head.proj.weight.zero_()
        draft.confidence_head.proj.weight[0, draft.config.hidden_size:] = torch.log(peak / (1 - peak))
        draft.confidence_head.proj.bias.zero_()
    save_draft(draft, out_dir, json.loads((Path(out_dir) / "config.json").read_text()))
    return str(out_dir)


def ragged_prompts(count, seed, low=WINDOW + 1, high=16, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=generator).tolist()
            for n in torch.randint(low, high, (count,), generator=generator)]


def hf_greedy(path, prompts, max_new_tokens):
    model = load_hf(path, torch.float64)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return {variant: make_gemma(tmp_path_factory.mktemp(variant), variant, seed=i)
            for i, variant in enumerate(VARIANTS)}


@pytest.fixture(scope="module", params=["gemma3", "gemma4"])
def agreeing_pair(request, tmp_path_factory):
    """(variant, target, draft): a mostly-bigram target and a draft that knows its bigram table.
    Untied: with a tied head each token's own embedding tends to win, and greedy output repeats."""
    variant = request.param
    target = make_gemma(tmp_path_factory.mktemp(f"{variant}_bigram"), variant, seed=5, context_scale=0.1,
                        logit_scale=2.0, tied=False)
    return variant, target, make_agreeing_draft(target, tmp_path_factory.mktemp(f"{variant}_bigram_draft"))


# ------------------------------------------------------------------------------ parity with transformers
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_hidden_states_match_transformers(targets, variant):
    path = targets[variant]
    hf = load_hf(path)
    model, tokenizer = load_target(path, CPU.device, torch.float32)
    assert tokenizer is None and model.config.model_type == hf.config.model_type
    layers = model.config.num_layers
    prompts = ragged_prompts(4, seed=1, low=1, high=18)
    cache = model.make_cache(4, 64, torch.float32, CPU.device)
    batch = StepBatch.build(prompts, [0] * 4, [3, 0, 2, 1], CPU.device)
    layer_ids = [-1, 0, layers - 2]                 # HF's last hidden_states entry is post-norm: not compared
    out = model(batch, cache, CPU, hidden_layer_ids=layer_ids, final_hidden=True)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf(ids, output_hidden_states=True)
            final = hf.model(ids).last_hidden_state[0]
        start, end = batch.cu_query_lens[row], batch.cu_query_lens[row + 1]
        torch.testing.assert_close(out.logits[start:end], ref.logits[0], atol=1e-4, rtol=1e-4)
        expected = torch.cat([ref.hidden_states[i + 1][0] for i in layer_ids], dim=-1)
        torch.testing.assert_close(out.hidden[start:end], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.last_hidden[start:end], final, atol=1e-4, rtol=1e-4)
    # The soft-cap is really active: some logits sit close to it.
    assert out.logits.abs().max() > 0.8 * model.config.final_logit_softcapping


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ragged_verify_steps_with_rollback_match_transformers(targets, variant):
    """Several requests verify different numbers of tokens in one forward, across the sliding
    window; rejected positions are rolled back by not advancing the length."""
    path = targets[variant]
    hf = load_hf(path)
    model, _ = load_target(path, CPU.device, torch.float32)
    cache = model.make_cache(3, 64, torch.float32, CPU.device)
    generator = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (4, 7, 2)]
    model(StepBatch.build(sequences, [0, 0, 0], [0, 1, 2], CPU.device), cache, CPU)
    lengths = [len(s) for s in sequences]
    for step in range(5):
        proposals = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (3, 1, 5)]
        batch = StepBatch.build(proposals, lengths, [0, 1, 2], CPU.device)
        out = model(batch, cache, CPU)
        for row, proposal in enumerate(proposals):
            with torch.no_grad():
                ref = hf(torch.tensor([sequences[row] + proposal])).logits[0, -len(proposal):]
            start, end = batch.cu_query_lens[row], batch.cu_query_lens[row + 1]
            torch.testing.assert_close(out.logits[start:end], ref, atol=1e-4, rtol=1e-4)
            keep = (step + row) % len(proposal) + 1   # accept a varying prefix, drop the rest
            sequences[row] += proposal[:keep]
            lengths[row] += keep
    assert min(lengths) > 2 * WINDOW


def test_hub_style_config_keys_parse_like_the_saved_ones(targets):
    """Released configs spell things the older way: Gemma 3 `rope_theta` / `rope_local_base_freq` /
    `rope_scaling` / `sliding_window_pattern` without layer_types; Gemma 4 `global_head_dim` /
    `num_global_key_value_heads` instead of a resolved per_layer_config."""
    saved = json.loads((Path(targets["gemma3"]) / "config.json").read_text())
    hub = {k: v for k, v in saved.items() if k not in ("layer_types", "rope_parameters")}
    hub.update(rope_theta=50_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=2,
               rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert GemmaConfig.from_hf(hub) == GemmaConfig.from_hf(saved)

    saved = json.loads((Path(targets["gemma4"]) / "config.json").read_text())
    hub = {k: v for k, v in saved.items() if k != "per_layer_config"}
    hub.update(global_head_dim=16, num_global_key_value_heads=1)
    parsed = GemmaConfig.from_hf(hub)
    assert parsed == GemmaConfig.from_hf(saved)
    assert [(s.head_dim, s.num_kv_heads, s.kv_source, s.k_eq_v, s.intermediate_size) for s in parsed.layers] == [
        (8, 2, 0, False, 48), (8, 2, 1, False, 48), (16, 1, 2, True, 48), (8, 2, 3, False, 48),
        (8, 2, 3, False, 96), (16, 1, 2, True, 96)]


def test_multimodal_wrapper_loads_its_text_model(tmp_path):
    """A Gemma 3 / Gemma 4 image-text checkpoint: the runner takes the text model out of it."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma4Config, Gemma4ForConditionalGeneration

    try:
        from transformers import SiglipVisionConfig

        vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        wrappers = {
            "gemma3": (Gemma3ForConditionalGeneration, Gemma3Config(
                # transformers' image-text Gemma 3 never soft-caps its logits (the runner refuses a cap there)
                text_config=Gemma3TextConfig(**{**GEMMA3, "final_logit_softcapping": None}, initializer_range=0.2,
                                             eos_token_id=None).to_dict(),
                vision_config=vision.to_dict(), mm_tokens_per_image=4, eos_token_id=[1, 7])),
            "gemma4": (Gemma4ForConditionalGeneration, Gemma4Config(
                text_config=Gemma4TextConfig(**GEMMA4, initializer_range=0.2, eos_token_id=None).to_dict(),
                vision_config=None, audio_config=None)),
        }
        models = {}
        for name, (model_cls, config) in wrappers.items():
            torch.manual_seed(0)
            models[name] = model_cls(config).eval()
            models[name].save_pretrained(str(tmp_path / name))
    except Exception as exc:     # transformers versions differ in what a tiny wrapper accepts offline
        pytest.skip(f"transformers cannot build a tiny multimodal Gemma offline here: {exc}")
    prompt = torch.tensor([ragged_prompts(1, seed=3)[0]])
    for name, hf in models.items():
        model, _ = load_target(tmp_path / name, CPU.device, torch.float32)
        cache = model.make_cache(1, 32, torch.float32, CPU.device)
        out = model(StepBatch.build(prompt.tolist(), [0], [0], CPU.device), cache, CPU)
        with torch.no_grad():
            expected = hf(input_ids=prompt).logits[0]
        torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4)
    assert load_target(tmp_path / "gemma3", CPU.device, torch.float32)[0].config.eos_token_ids == (1, 7)


@pytest.mark.parametrize("model_type,change,message", [
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma4_text", dict(use_bidirectional_attention="all"), "use_bidirectional_attention"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attention logit soft-capping"),
    ("gemma3", dict(text_config={"final_logit_softcapping": 30.0}), "final logit soft-capping"),
    ("gemma3_text", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE type 'yarn'"),
    ("gemma4_text", dict(hidden_activation="silu"), "hidden_activation 'silu'"),
    ("gemma3_text", dict(layer_types=[S, "chunked_attention", S, F]), "layer type"),
    ("gemma4_text", dict(per_layer_config={"2": {"intermediate_size": 64}}), "per-layer override"),
    ("gemma4_text", dict(num_kv_shared_layers=3, layer_types=[F, S, S, F]), "no earlier layer"),
])
def test_unsupported_features_are_refused_by_name(model_type, change, message):
    config = {"model_type": model_type, "num_hidden_layers": 4, **change}
    with pytest.raises(CheckpointError, match=message):
        target_config(config, "config.json")


# ------------------------------------------------------------------------------ drafts and the engine
def test_draft_embedding_and_lm_head_are_on_the_target_scale(targets, tmp_path):
    """init_draft copies the embedding and LM head and applies them as the target does:
    x sqrt(d) on the embedding, soft-capping on the logits (so training's target
    distributions, computed through the draft's head, are the target's)."""
    path = targets["gemma4"]
    config = json.loads(Path(init_draft(path, tmp_path / "d", num_layers=1, markov_rank=8)).joinpath(
        "config.json").read_text())
    assert config["embed_scale"] == pytest.approx(32 ** 0.5) and config["final_logit_softcapping"] == 3.0
    draft = load_draft(tmp_path / "d", None).double()
    target, _ = load_target(path, CPU.device, torch.float64)
    ids = ragged_prompts(1, seed=4)[0]
    out = target(StepBatch.build([ids], [0], [0], CPU.device), target.make_cache(1, 32, torch.float64, CPU.device),
                 CPU, hidden_layer_ids=[-1], final_hidden=True)
    torch.testing.assert_close(draft.embed_tokens(torch.tensor(ids)), out.hidden, rtol=0, atol=0)
    torch.testing.assert_close(draft.lm_head(out.last_hidden), out.logits, rtol=1e-12, atol=1e-12)


def test_qwen3_draft_configs_keep_deepspec_fields(qwen3_target, tmp_path):
    config = json.loads((Path(init_draft(qwen3_target, tmp_path / "d", num_layers=1)) / "config.json").read_text())
    assert "embed_scale" not in config and "final_logit_softcapping" not in config
    draft = load_draft(tmp_path / "d", None)
    assert draft.config.embed_scale == 1.0 and draft.config.final_logit_softcapping is None


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_greedy_speculation_matches_plain_decoding_and_transformers(agreeing_pair, batch_size):
    variant, target, draft = agreeing_pair
    prompts = ragged_prompts(4, seed=6)
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, GREEDY)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", max_batch_size=batch_size)
    spec = engine.generate(prompts, GREEDY)
    reference = hf_greedy(target, prompts, GREEDY.max_new_tokens)
    for p, s, ref in zip(plain, spec, reference):
        assert s.token_ids == p.token_ids == ref
    accepted = [a for s in spec for a in s.stats["accepted"]]
    assert sum(s.stats["tau"] for s in spec) / len(spec) > 1.5
    assert any(0 < a < engine.gamma for a in accepted) and any(a == 0 for a in accepted)


@pytest.mark.parametrize("mode", [dict(static_shapes=True), dict(graphs=True)])
def test_fixed_shape_and_graph_steps_match_plain_decoding(agreeing_pair, mode):
    """The padded fixed-shape step (empty request rows, filler in the scratch slot) and its
    captured-graph replay give the same tokens."""
    _, target, draft = agreeing_pair
    prompts = ragged_prompts(4, seed=8)
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, GREEDY)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", max_batch_size=3, **mode)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == [p.token_ids for p in plain]


# ------------------------------------------------------------------------------ exact sampling
PROMPT, SMALL_VOCAB, LENGTH = [1, 2, 3], 6, 4


def exact_distribution(target, temperature, top_k, top_p):
    """P(x_1..x_4 | PROMPT) under the filtered float64 transformers model, by enumeration."""
    model = load_hf(target, torch.float64)
    prefixes = torch.tensor(list(itertools.product(range(SMALL_VOCAB), repeat=LENGTH - 1)))      # [V^3, 3]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, len(PROMPT) - 1:]                                          # [V^3, 4, V]
    n = logits.shape[0] * LENGTH
    probs = ops.sampling_probs(logits.reshape(n, SMALL_VOCAB), torch.full((n,), temperature),
                               torch.full((n,), top_k), torch.full((n,), top_p)).double()
    probs = probs.view(-1, LENGTH, SMALL_VOCAB)
    joint = torch.ones(SMALL_VOCAB ** LENGTH, dtype=torch.float64)
    for index, sequence in enumerate(itertools.product(range(SMALL_VOCAB), repeat=LENGTH)):
        row = sum(t * SMALL_VOCAB ** (LENGTH - 2 - i) for i, t in enumerate(sequence[:-1]))
        joint[index] = torch.prod(probs[row, torch.arange(LENGTH), torch.tensor(sequence)])
    return joint


def test_sampling_follows_the_exact_gemma_distribution(tmp_path):
    """tests/test_engine_sampling.py's exact-probability test on a Gemma 4 target whose window
    (2) is shorter than the prompt plus the continuation."""
    target = make_gemma(tmp_path / "t", "gemma4", seed=21, vocab_size=SMALL_VOCAB,
                        vocab_size_per_layer_input=SMALL_VOCAB, sliding_window=2)
    draft = make_agreeing_draft(target, tmp_path / "d", block_size=3)
    exact = exact_distribution(target, 0.8, 4, 0.9)
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=512)
    counts, outputs = empirical_counts(engine, 0.8, 4, 0.9)
    assert chi_square_pvalue(counts, exact) > 1e-3
    accepted = [a for o in outputs for a in o.stats["accepted"]]
    assert 0.2 < sum(1 for a in accepted if a > 0) / len(accepted) < 0.98
    engine.backend.verify = eager_verify            # the broken verifier must be caught
    broken, _ = empirical_counts(engine, 0.8, 4, 0.9)
    assert chi_square_pvalue(broken, exact) < 1e-6


# ------------------------------------------------------------------------------ training
def test_training_on_a_gemma_target_gives_a_lossless_draft(agreeing_pair, tmp_path):
    from dspark.training import TrainConfig, train
    from dspark.training.data import regenerate

    variant, target, _ = agreeing_pair
    prompts = [{"id": i, "prompt_ids": p} for i, p in enumerate(ragged_prompts(20, seed=7, high=9))]
    regenerate(dspark.Engine.from_pretrained(target, max_batch_size=16), prompts[:16], tmp_path / "train.jsonl",
               max_new_tokens=24, temperature=1.0)
    out = train(TrainConfig(target=target, data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "draft"), steps=30,
                            global_batch=8, micro_batch=4, lr=1e-2, num_anchors=16, log_every=1,
                            checkpoint_every=1000, draft_options={"num_layers": 1, "block_size": 4, "markov_rank": 16}),
                progress=lambda message: None)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < sum(losses[:5])
    held_out = [p["prompt_ids"] for p in prompts[16:]]
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(held_out, GREEDY)
    spec = dspark.Engine.from_pretrained(target, draft=out, dtype="float64").generate(held_out, GREEDY)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert load_draft(out, None).config.final_logit_softcapping == 3.0
