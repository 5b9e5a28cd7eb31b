"""Typed model configs parsed from Hugging Face `config.json` files.

`TargetConfig` covers the families the target runner implements (Qwen3,
Qwen2, Llama/Mistral-style decoders). Both the transformers 4.x spelling
(`rope_theta`, `rope_scaling`) and the 5.x spelling (`rope_parameters`) are read.
"""
from dataclasses import dataclass, field

from ..errors import CheckpointError

# model_type -> whether the attention has per-head RMSNorm on q and k (Qwen3) and
# whether q/k/v projections have a bias by default (Qwen2).
FAMILIES = {
    "qwen3": dict(qk_norm=True, qkv_bias=False),
    "qwen2": dict(qk_norm=False, qkv_bias=True),
    "llama": dict(qk_norm=False, qkv_bias=False),
    "mistral": dict(qk_norm=False, qkv_bias=False),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, hf: dict) -> "RopeConfig":
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(f"RoPE type {rope_type!r} is not supported yet "
                                  f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        return cls(
            theta=float(theta),
            type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass
class TargetConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple = ()

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "TargetConfig":
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise CheckpointError(f"{source}: model_type {model_type!r} is not supported by the target runner "
                                  f"(supported: {', '.join(FAMILIES)})")
        activation = hf.get("hidden_act", "silu")
        if activation != "silu":
            raise CheckpointError(f"{source}: hidden_act {activation!r} is not supported (expected 'silu')")
        if hf.get("use_sliding_window"):
            raise CheckpointError(f"{source}: sliding-window attention is not supported for {model_type} yet")
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            family = FAMILIES[model_type]
            attention_bias = bool(hf.get("attention_bias", family["qkv_bias"]))
            eos = hf.get("eos_token_id")
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                rope=RopeConfig.from_hf(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qk_norm=family["qk_norm"],
                qkv_bias=attention_bias or family["qkv_bias"],
                o_bias=attention_bias and model_type != "qwen2",
                mlp_bias=bool(hf.get("mlp_bias", False)),
                eos_token_ids=tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos])),
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: required field {exc.args[0]!r} is missing") from None
