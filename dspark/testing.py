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

from .models import init_draft, load_draft, save_draft

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
    lone token: backbone output zeroed (final norm weight 0), Markov W1 = I, W2 = L^T."""
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
    base = json.loads((Path(out_dir) / "config.json").read_text())
    save_draft(draft, out_dir, base)
    return str(out_dir)
