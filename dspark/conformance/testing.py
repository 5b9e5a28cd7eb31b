"""Synthetic checkpoints for tests and the quick start, written with transformers so that our
loader reads real Hugging Face folders. Nothing here is imported by the library itself.

`make_target(..., context_scale < 1)` shrinks every layer's output projection,
so the target's next-token distribution depends mostly on the current token
(almost a bigram model) but still a little on the context. `make_agreeing_draft`
then builds a DSpark draft whose Markov head holds that bigram table exactly:
it agrees with the target often but not always, which exercises partial acceptance.
"""
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ..models import init_draft, load_draft, save_draft

FAMILIES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def make_target(path, family="qwen3", vocab=64, layers=4, hidden=32, seed=0, context_scale=1.0,
                logit_scale=1.0, max_positions=256, eos_token_id=None, intermediate=None) -> str:
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=hidden // 4, max_position_embeddings=max_positions, eos_token_id=eos_token_id,
                        bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(context_scale)
            layer.mlp.down_proj.weight.mul_(context_scale)
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(str(path))
    return str(path)


def load_hf(path, dtype=torch.float32):
    config = json.loads((Path(path) / "config.json").read_text())
    return FAMILIES[config["model_type"]][1].from_pretrained(str(path), dtype=dtype).eval()


def make_agreeing_draft(target_dir, out_dir, block_size=4, num_layers=1) -> str:
    """A DSpark draft whose proposal p_k = softmax(L[x_{k-1}]), L = the target's logits for a
    lone token: backbone output zeroed (final norm weight 0), Markov W1 = I, W2 = L^T. Its
    confidence head reads only W1[x_{k-1}] and reports the peakedness of that row,
    c_k = max_v softmax(L[x_{k-1}])_v: uncalibrated, but ordered like the real acceptance
    (`dspark sts` then fits its temperatures)."""
    target = load_hf(target_dir)
    vocab = target.config.vocab_size
    with torch.no_grad():
        bigram = target(torch.arange(vocab).unsqueeze(1)).logits[:, 0]   # [V, V]: row = current token
    init_draft(target_dir, out_dir, block_size=block_size, num_layers=num_layers, markov_rank=vocab)
    draft = load_draft(out_dir, None)
    with torch.no_grad():
        draft.norm.weight.zero_()
        draft.markov_head.markov_w1.weight.copy_(torch.eye(vocab))
        draft.markov_head.markov_w2.weight.copy_(bigram.t())
        peak = bigram.softmax(-1).max(-1).values.clamp(1e-4, 1 - 1e-4)
        hidden = draft.config.hidden_size
        draft.confidence_head.proj.weight.zero_()
        draft.confidence_head.proj.weight[0, hidden:] = torch.log(peak / (1 - peak))
        draft.confidence_head.proj.bias.zero_()
    base = json.loads((Path(out_dir) / "config.json").read_text())
    save_draft(draft, out_dir, base)
    return str(out_dir)


def synthetic_pair(workdir) -> tuple:
    """The quick start's and the CPU benchmarks' models, built once into `workdir`:
    a Qwen3-architecture target (hidden 512, 8 layers, vocabulary 2048) whose next token
    depends mostly on the current one, and a 1-layer DSpark draft (block 6) whose Markov
    head holds the target's bigram table. Returns (target_dir, draft_dir)."""
    workdir = Path(workdir)
    target, draft = workdir / "target", workdir / "draft"
    if not (target / "config.json").is_file():
        make_target(target, "qwen3", vocab=2048, layers=8, hidden=512, intermediate=1536, seed=0,
                    context_scale=0.003, logit_scale=12.0, max_positions=1024)
    if not (draft / "config.json").is_file():
        make_agreeing_draft(target, draft, block_size=6, num_layers=1)
        calibrate_draft(target, draft)
    return str(target), str(draft)


def calibrate_draft(target, draft, num_prompts: int = 32, max_new_tokens: int = 48) -> list:
    """Give the closed-form draft a usable confidence head, then STS, from replayed rounds.

    1. The head's bias: logistic regression of "draft k accepted, given k was reached" on
       the head's logit plus one shared bias (what BCE training of the bias would learn; the
       closed-form head is ordered right but centred wrong, and no temperature can shift it).
    2. STS temperatures on top, exactly as `dspark sts --write` does.
    """
    from ..engine import Engine
    from ..params import SamplingParams
    from ..bench.sts import fit_from_engine

    engine = Engine.from_pretrained(target, draft=draft, max_batch_size=16)
    generator = torch.Generator().manual_seed(1234)
    vocab = engine.target.config.vocab_size
    prompts = [torch.randint(0, vocab, (int(n),), generator=generator).tolist()
               for n in torch.randint(2, 32, (num_prompts,), generator=generator)]
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)

    engine.generate(prompts, params)
    records = [r for r in engine.round_log if "confidence_logits" in r]
    logits = torch.cat([r["confidence_logits"] for r in records]).double()          # [N, gamma]
    lens = torch.cat([r["verify_lens"] for r in records]).unsqueeze(1)
    accepted = torch.cat([r["accepted"] for r in records]).unsqueeze(1)
    k = torch.arange(1, logits.shape[1] + 1).unsqueeze(0)
    reached = (k <= lens) & (accepted >= k - 1)
    z, y = logits[reached], (accepted >= k).expand_as(reached)[reached].double()
    bias = torch.zeros((), dtype=torch.float64)
    for _ in range(25):                                   # Newton steps on the 1-D logistic loss
        p = torch.sigmoid(z + bias)
        bias = bias - (p - y).sum() / (p * (1 - p)).sum().clamp(min=1e-9)
    with torch.no_grad():
        engine.draft.confidence_head.proj.bias.fill_(float(bias))
    temperatures = fit_from_engine(engine, prompts, params, holdout=False)["temperatures"]

    from ..models import save_draft

    config_path = Path(draft) / "config.json"
    config = json.loads(config_path.read_text())
    engine.draft.config.confidence_temperatures = temperatures
    save_draft(engine.draft, draft, config)
    return temperatures
