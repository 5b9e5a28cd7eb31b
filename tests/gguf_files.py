"""Tiny GGUF files for tests, written with the `gguf` package the way llama.cpp's converter
writes a Llama checkpoint (GGUF tensor names, q / k rows permuted for its RoPE layout), so that
transformers' own GGUF loader reads them back as the original Hugging Face model."""
from pathlib import Path

import numpy as np
import torch


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q / k row order (transformers' GGUF loader undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_llama_gguf(hf_dir, path, quantize=("ffn_up",), architecture: str = "llama") -> Path:
    """Write the Llama checkpoint in `hf_dir` (no tokenizer) as a GGUF file. Tensors whose GGUF
    name contains one of `quantize` are stored as Q8_0, the rest as F32."""
    import gguf

    from dspark.conformance.testing import load_hf

    model = load_hf(hf_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                              else float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)

    def put(name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().float().numpy()
        if any(part in name for part in quantize) and data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)

    state = model.state_dict()
    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    put("output.weight", state["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", state[prefix + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"])
        q = _permute(state[prefix + "self_attn.q_proj.weight"].numpy(), cfg.num_attention_heads)
        k = _permute(state[prefix + "self_attn.k_proj.weight"].numpy(), cfg.num_key_value_heads)
        put(f"blk.{i}.attn_q.weight", torch.from_numpy(np.ascontiguousarray(q)))
        put(f"blk.{i}.attn_k.weight", torch.from_numpy(np.ascontiguousarray(k)))
        put(f"blk.{i}.attn_v.weight", state[prefix + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", state[prefix + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", state[prefix + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", state[prefix + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
