"""Gemma 3 / Gemma 4 text configs: parsing a config.json (also a multimodal wrapper's
text_config) into a typed `GemmaConfig`, with every feature the runner does not implement
refused by name. The modules that run these configs are in `gemma.py`."""
import copy
from dataclasses import dataclass, field
from typing import Optional

from ..errors import CheckpointError
from .config import RopeConfig

GEMMA_TEXT_TYPES = ("gemma3_text", "gemma4_text")
# Multimodal wrappers whose `text_config` holds one of the text models above.
GEMMA_WRAPPERS = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
SLIDING, FULL = "sliding_attention", "full_attention"
# Activation names (transformers' spelling) the runner implements; gemma.py maps them to functions.
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
GEMMA_ROPE_TYPES = {"gemma3_text": ("default", "linear"), "gemma4_text": ("default", "proportional")}
# Per-layer overrides (transformers' `per_layer_config`) this runner knows how to apply.
PER_LAYER_FIELDS = ("head_dim", "num_key_value_heads")

# transformers' defaults for fields a config.json may leave out. Multimodal checkpoints
# on the Hub rely on them: gemma-3-4b-it's text_config has no vocab_size, head_dim, ...
_DEFAULTS = {
    "gemma3_text": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                        sliding_window=4096, eos_token_id=1, query_pre_attn_scalar=256),
    "gemma4_text": dict(vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                        sliding_window=512, eos_token_id=1, vocab_size_per_layer_input=262_144,
                        hidden_size_per_layer_input=256, global_head_dim=512),
}


# ----------------------------------------------------------------------------- config
@dataclass
class GemmaRope:
    theta: float
    type: str = "default"                 # default | linear | proportional
    factor: float = 1.0
    partial_rotary_factor: float = 1.0    # proportional only: the rotated fraction of each head


@dataclass
class GemmaLayerSpec:
    """What differs between layers."""
    layer_type: str        # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    intermediate_size: int
    kv_source: int         # the layer whose cache this layer attends to: itself unless KV-shared
    k_eq_v: bool = False   # values are the key projection (before k_norm and RoPE)


@dataclass
class GemmaConfig:
    model_type: str                       # gemma3_text | gemma4_text
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int                     # of the sliding (local) layers; global ones may differ (`layers`)
    head_dim: int                         # idem
    rms_norm_eps: float
    max_position_embeddings: int
    layers: list                          # [GemmaLayerSpec] per layer
    sliding_window: Optional[int]
    ropes: dict                           # layer type -> GemmaRope
    attention_scale: float                # multiplies q.k
    activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    final_logit_softcapping: Optional[float] = None
    tie_word_embeddings: bool = True
    eos_token_ids: tuple = ()
    hidden_size_per_layer_input: int = 0  # Gemma 4 per-layer input embeddings (0 = off)
    vocab_size_per_layer_input: int = 0
    num_experts: int = 0                  # Gemma 4 mixture-of-experts blocks (0 = off)
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    rope: RopeConfig = field(default_factory=RopeConfig)   # what a draft for this target uses (local RoPE)

    @property
    def gemma4(self) -> bool:
        return self.model_type == "gemma4_text"

    @property
    def embed_scale(self) -> float:
        """Embeddings are multiplied by sqrt(hidden_size) (rounded to the model dtype at use)."""
        return self.hidden_size ** 0.5

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "GemmaConfig":
        """Parse a gemma3_text / gemma4_text config, or a multimodal wrapper holding one."""
        text = gemma_text_config(hf)
        if text is None:
            raise CheckpointError(f"{source}: not a Gemma 3 / Gemma 4 text config (model_type "
                                  f"{hf.get('model_type')!r})")
        model_type = text["model_type"]
        get = _getter(text, model_type)
        gemma4 = model_type == "gemma4_text"
        _refuse_unsupported(text, model_type, source, wrapped=text is not hf)

        num_layers, heads = int(get("num_hidden_layers")), int(get("num_attention_heads"))
        layer_types = _layer_types(text, num_layers, gemma4, source)
        head_dim, kv_heads = int(get("head_dim")), int(get("num_key_value_heads") or heads)
        overrides = _per_layer_overrides(text, layer_types, gemma4, source)
        sources = _kv_sources(layer_types, int(text.get("num_kv_shared_layers") or 0) if gemma4 else 0, source)
        intermediate = int(get("intermediate_size"))
        double_wide = gemma4 and bool(text.get("use_double_wide_mlp"))
        k_eq_v = gemma4 and bool(text.get("attention_k_eq_v"))
        layers = [GemmaLayerSpec(layer_type=kind,
                                 head_dim=int(overrides.get(i, {}).get("head_dim", head_dim)),
                                 num_kv_heads=int(overrides.get(i, {}).get("num_key_value_heads", kv_heads)),
                                 intermediate_size=intermediate * (2 if double_wide and sources[i] != i else 1),
                                 kv_source=sources[i], k_eq_v=k_eq_v and kind == FULL)
                  for i, kind in enumerate(layer_types)]
        for kind in set(layer_types):
            dims = {layer.head_dim for layer in layers if layer.layer_type == kind}
            if len(dims) > 1:   # one RoPE table per layer type, as in transformers
                raise CheckpointError(f"{source}: {kind} layers with different head_dim {sorted(dims)} "
                                      "are not supported")
        ropes = _ropes(text, model_type, source)
        local = ropes.get(SLIDING) or ropes[FULL]
        window = get("sliding_window")
        # A multimodal wrapper states the chat's stop tokens at its top level.
        eos = hf["eos_token_id"] if hf is not text and hf.get("eos_token_id") is not None else get("eos_token_id")
        softcap = text.get("final_logit_softcapping")
        moe = gemma4 and bool(text.get("enable_moe_block"))
        return cls(
            model_type=model_type,
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=intermediate,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(get("max_position_embeddings")),
            layers=layers,
            sliding_window=None if window is None else int(window),
            ropes=ropes,
            # Gemma 4 leaves the query scale to q_norm (scaling = 1.0 in transformers).
            attention_scale=1.0 if gemma4 else float(get("query_pre_attn_scalar")) ** -0.5,
            activation=text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh",
            attention_bias=bool(text.get("attention_bias", False)),
            final_logit_softcapping=None if softcap is None else float(softcap),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
            eos_token_ids=tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos])),
            hidden_size_per_layer_input=int(get("hidden_size_per_layer_input") or 0) if gemma4 else 0,
            vocab_size_per_layer_input=int(get("vocab_size_per_layer_input") or 0) if gemma4 else 0,
            num_experts=int(text["num_experts"]) if moe else 0,
            top_k_experts=int(text["top_k_experts"]) if moe else 0,
            moe_intermediate_size=int(text["moe_intermediate_size"]) if moe else 0,
            # A draft attends to everything with one RoPE; the local one (plain RoPE) suits it.
            rope=RopeConfig(theta=local.theta),
        )


def gemma_text_config(hf: dict) -> Optional[dict]:
    """The Gemma text config inside `hf` (itself, or a multimodal wrapper's text_config), else None."""
    if hf.get("model_type") in GEMMA_TEXT_TYPES:
        return hf
    text = hf.get("text_config")
    if hf.get("model_type") in GEMMA_WRAPPERS:
        text = dict(text or {})
        text.setdefault("model_type", GEMMA_WRAPPERS[hf["model_type"]])   # transformers' sub-config default
        return text
    if isinstance(text, dict) and text.get("model_type") in GEMMA_TEXT_TYPES:
        return text
    return None


def _getter(text: dict, model_type: str):
    defaults = _DEFAULTS[model_type]

    def get(name):
        return text[name] if name in text else defaults[name]
    return get


def _refuse_unsupported(text: dict, model_type: str, source: str, wrapped: bool) -> None:
    """Features a config may switch on that this runner does not implement: refuse, by name."""
    activation = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_activation {activation!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
    bidirectional = text.get("use_bidirectional_attention")
    if (model_type == "gemma3_text" and bidirectional) or (model_type == "gemma4_text" and bidirectional == "all"):
        raise CheckpointError(f"{source}: use_bidirectional_attention={bidirectional!r} (an encoder, not a "
                              "causal generator) is not supported")
    if model_type == "gemma3_text" and text.get("attn_logit_softcapping") is not None:
        # transformers' Gemma 3 stores this value but never applies it, while Gemma 2-style
        # runtimes do: which one a checkpoint was trained with cannot be told from the file.
        raise CheckpointError(f"{source}: attention logit soft-capping (attn_logit_softcapping="
                              f"{text['attn_logit_softcapping']}) is not supported: transformers' Gemma 3 ignores "
                              "it, so its meaning for this checkpoint is ambiguous; set it to null to run as "
                              "transformers does")
    if model_type == "gemma3_text" and wrapped and text.get("final_logit_softcapping") is not None:
        # Gemma3ForConditionalGeneration never soft-caps, Gemma3ForCausalLM does: ambiguous again.
        raise CheckpointError(f"{source}: final logit soft-capping (final_logit_softcapping="
                              f"{text['final_logit_softcapping']}) in a Gemma 3 multimodal checkpoint is not "
                              "supported: transformers applies it to the text model alone but not to the image-text "
                              "model; set it to null to run as Gemma3ForConditionalGeneration does")
    if model_type == "gemma4_text" and text.get("enable_moe_block"):
        missing = [k for k in ("num_experts", "top_k_experts", "moe_intermediate_size") if not text.get(k)]
        if missing:
            raise CheckpointError(f"{source}: enable_moe_block needs {', '.join(missing)}")


def _layer_types(text: dict, num_layers: int, gemma4: bool, source: str) -> list:
    layer_types = text.get("layer_types")
    if layer_types is None:   # older configs: one full layer every `sliding_window_pattern`
        pattern = int(text.get("sliding_window_pattern", 6))
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    layer_types = list(layer_types)
    if len(layer_types) != num_layers:
        raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise CheckpointError(f"{source}: layer type(s) {', '.join(map(repr, unknown))} are not supported "
                              f"(supported: {SLIDING!r}, {FULL!r})")
    if gemma4:
        layer_types[-1] = FULL    # transformers forces Gemma 4's last layer to global attention
    return layer_types


def _per_layer_overrides(text: dict, layer_types: list, gemma4: bool, source: str) -> dict:
    """Layer index -> {head_dim, num_key_value_heads} that differ from the global config.

    Gemma 4 checkpoints on the Hub state them as `global_head_dim` / `num_global_key_value_heads`
    (the latter only counts with `attention_k_eq_v`); configs saved by newer transformers
    write the resolved `per_layer_config` instead."""
    if not gemma4:
        return {}
    if "per_layer_config" in text and text["per_layer_config"] is not None:
        overrides = {int(i): dict(v) for i, v in text["per_layer_config"].items()}
        for i, values in overrides.items():
            extra = sorted(set(values) - set(PER_LAYER_FIELDS))
            if extra:
                raise CheckpointError(f"{source}: per-layer override(s) {', '.join(extra)} (layer {i}) are not "
                                      f"supported (supported: {', '.join(PER_LAYER_FIELDS)})")
        return overrides
    values = {"head_dim": text.get("global_head_dim", _DEFAULTS["gemma4_text"]["global_head_dim"])}
    if text.get("attention_k_eq_v") and text.get("num_global_key_value_heads") is not None:
        values["num_key_value_heads"] = text["num_global_key_value_heads"]
    return {i: dict(values) for i, kind in enumerate(layer_types) if kind == FULL}


def _kv_sources(layer_types: list, num_shared: int, source: str) -> list:
    """Layer i's cache owner: itself, or for the last `num_shared` layers the last earlier
    (non-shared) layer of the same type (transformers' `kv_sharing_modes`)."""
    first_shared = len(layer_types) - num_shared
    sources = list(range(len(layer_types)))
    for i in range(first_shared, len(layer_types)):
        owners = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
        if not owners:
            raise CheckpointError(f"{source}: KV-shared layer {i} ({layer_types[i]}) has no earlier layer of its "
                                  "type to share keys and values with")
        sources[i] = owners[-1]
    return sources


def _ropes(text: dict, model_type: str, source: str) -> dict:
    """RoPE per layer type, with transformers' defaults and its reading of older key names."""
    params = copy.deepcopy(text.get("rope_parameters"))
    if model_type == "gemma3_text":
        params = params if params else {SLIDING: {"rope_type": "default"}, FULL: {"rope_type": "default"}}
        if text.get("rope_scaling"):
            params.setdefault(FULL, {"rope_type": "default"}).update(text["rope_scaling"])
        params.setdefault(FULL, {"rope_type": "default"}).setdefault("rope_theta", text.get("rope_theta", 1_000_000.0))
        params.setdefault(SLIDING, {"rope_type": "default"}).setdefault(
            "rope_theta", text.get("rope_local_base_freq", 10_000.0))
    elif not params:
        params = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                  FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    ropes = {}
    for kind in (SLIDING, FULL):
        entry = params.get(kind)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{source}: rope_parameters has no {kind!r} entry")
        rope_type = entry.get("rope_type", entry.get("type", "default")) or "default"
        if rope_type not in GEMMA_ROPE_TYPES[model_type]:
            raise CheckpointError(f"{source}: RoPE type {rope_type!r} ({kind}) is not supported for {model_type} "
                                  f"(supported: {', '.join(GEMMA_ROPE_TYPES[model_type])})")
        ropes[kind] = GemmaRope(theta=float(entry.get("rope_theta", 10_000.0)), type=rope_type,
                                factor=float(entry.get("factor", 1.0)),
                                partial_rotary_factor=float(entry.get("partial_rotary_factor", 1.0)))
    return ropes


# ----------------------------------------------------------------------------- building blocks
