"""Gemma 3 and Gemma 4 text targets over flattened variable-length batches.

`GemmaTargetModel` has `TargetModel`'s interface (the same forward, `make_cache`
and output), so the engine, the drafts and the trainer use it unchanged. The
arithmetic follows transformers' `modeling_gemma3.py` / `modeling_gemma4.py`
step for step, including where it rounds: that is what makes greedy output
token-identical to transformers. What Gemma adds over the Qwen3 runner:

- interleaved sliding-window and global layers (`layer_types`). A sliding layer's
  query at position p sees keys at positions (p - sliding_window, p]. The cache is
  a full-length static cache for every layer with that window applied as a mask
  (no ring buffer): memory is that of a full-attention model, and rolling back
  rejected tokens stays "do not advance the length";
- local and global RoPE with their own theta / scaling (Gemma 3: default and
  `linear`; Gemma 4: default and `proportional`, which rotates only a fraction of
  each head and leaves the rest unrotated);
- embeddings times sqrt(hidden_size), the scale first rounded to the model dtype;
- pre/post attention and feed-forward RMSNorms and q/k norms, computed in float32.
  Gemma 3 scales by (1 + weight) (zero-centred weights), Gemma 4 by weight, and
  Gemma 4 also normalises values (without a weight);
- the GELU-tanh gated MLP; the query scale 1/sqrt(query_pre_attn_scalar) (Gemma 3)
  or 1 (Gemma 4: its q_norm sets the scale);
- Gemma 4: per-layer head dims and KV-head counts (global layers), K = V on global
  layers (`attention_k_eq_v`), KV sharing (the last `num_kv_shared_layers` layers
  attend to the cache of the last earlier layer of their type), double-wide MLPs
  on those layers, per-layer input embeddings (PLE), mixture-of-experts blocks
  and the per-layer output scalar;
- final logit soft-capping, logits = cap * tanh(logits / cap).

A config that turns on something not listed here is refused with a
`CheckpointError` naming the feature (see `GemmaConfig.from_hf`).
"""
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch import KVCache, StepBatch
from .gemma_config import FULL, SLIDING, GemmaConfig, GemmaLayerSpec, GemmaRope
from .layers import Linear, apply_rope, linear_group
from .target import TargetOutput, padded_queries

ACTIVATIONS = {"gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}


class GemmaRMSNorm(nn.Module):
    """RMSNorm in float32 whatever the model dtype, rounded back once at the end (as transformers).

    zero_centred (Gemma 3): x_hat * (1 + weight), weights stored around 0, rsqrt.
    Otherwise (Gemma 4): x_hat * weight, or x_hat alone without a weight (value norm); transformers
    writes the root as pow(mean, -0.5) there, and so does this, to round the same way."""

    def __init__(self, dim: int, eps: float, zero_centred: bool, with_weight: bool = True):
        super().__init__()
        self.eps, self.zero_centred = eps, zero_centred
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True) + self.eps
        if self.zero_centred:
            return (x32 * torch.rsqrt(mean_square) * (1.0 + self.weight.float())).type_as(x)
        normed = x32 * torch.pow(mean_square, -0.5)
        return (normed * self.weight.float() if self.weight is not None else normed).type_as(x)


def gemma_inv_freq(rope: GemmaRope, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], computed in float32 exactly as transformers does.

    proportional (Gemma 4 global layers): only the first int(partial * head_dim / 2)
    frequencies rotate (with exponents over the full head_dim); the rest are 0, i.e.
    cos = 1, sin = 0: those dimensions are left unrotated."""
    if rope.type == "proportional":
        rotated = int(rope.partial_rotary_factor * head_dim // 2)
        exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim
        inv_freq = torch.cat([1.0 / (rope.theta ** exponents), torch.zeros(head_dim // 2 - rotated)])
        return inv_freq / rope.factor
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq / rope.factor if rope.type == "linear" else inv_freq


class GemmaRotary(nn.Module):
    """cos / sin per layer type (local and global RoPE differ), half-rotation layout."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        head_dims = {layer.layer_type: layer.head_dim for layer in cfg.layers}
        # Kept out of the module's buffers so that `.to(bfloat16)` cannot round them.
        self._inv_freq = {(kind, torch.device("cpu")): gemma_inv_freq(cfg.ropes[kind], dim)
                          for kind, dim in head_dims.items()}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, layer_type: str):
        key = (layer_type, positions.device)
        if key not in self._inv_freq:
            self._inv_freq[key] = self._inv_freq[(layer_type, torch.device("cpu"))].to(positions.device)
        angles = positions.float().unsqueeze(-1) * self._inv_freq[key]    # [N, D/2] float32
        angles = torch.cat([angles, angles], dim=-1)                       # [N, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


class GemmaKVCache:
    """Static caches for layers of different shapes behind `KVCache`'s write / read interface.

    Gemma 4's global layers have their own head size and KV-head count, so layers are
    grouped by shape, one `KVCache` per group. KV-shared layers own no entries: they read
    their source layer's. Sliding layers keep every position (the window is a mask)."""

    def __init__(self, cfg: GemmaConfig, num_slots: int, max_len: int, dtype: torch.dtype, device):
        groups: dict = {}
        for i, layer in enumerate(cfg.layers):
            if layer.kv_source == i:
                groups.setdefault((layer.num_kv_heads, layer.head_dim), []).append(i)
        self._where = {}
        for (kv_heads, head_dim), members in groups.items():
            cache = KVCache(len(members), num_slots, max_len, kv_heads, head_dim, dtype, device)
            self._where.update({layer: (cache, index) for index, layer in enumerate(members)})
        self.max_len, self.num_slots = max_len, num_slots

    def write(self, layer: int, token_slots, positions, k, v) -> None:
        cache, index = self._where[layer]
        cache.write(index, token_slots, positions, k, v)

    def read(self, layer: int, slots, length: int, slot_range=None):
        cache, index = self._where[layer]
        return cache.read(index, slots, length, slot_range)


# ----------------------------------------------------------------------------- layers
class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        spec = cfg.layers[layer_idx]
        self.layer_idx, self.kv_source, self.layer_type = layer_idx, spec.kv_source, spec.layer_type
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = cfg.attention_scale
        d, bias, zero_centred = cfg.hidden_size, cfg.attention_bias, not cfg.gemma4
        self.q_proj = Linear(d, cfg.num_heads * spec.head_dim, bias=bias)
        self.q_norm = GemmaRMSNorm(spec.head_dim, cfg.rms_norm_eps, zero_centred)
        self.k_proj = self.v_proj = self.k_norm = self.v_norm = None
        if spec.kv_source == layer_idx:   # a KV-shared layer has no key/value weights at all
            self.k_proj = Linear(d, spec.num_kv_heads * spec.head_dim, bias=bias)
            if not spec.k_eq_v:
                self.v_proj = Linear(d, spec.num_kv_heads * spec.head_dim, bias=bias)
            self.k_norm = GemmaRMSNorm(spec.head_dim, cfg.rms_norm_eps, zero_centred)
            if cfg.gemma4:
                self.v_norm = GemmaRMSNorm(spec.head_dim, cfg.rms_norm_eps, zero_centred, with_weight=False)
        self.o_proj = Linear(cfg.num_heads * spec.head_dim, d, bias=bias)
        self.linear_groups = (tuple(name for name in ("q_proj", "k_proj", "v_proj") if getattr(self, name) is not None),)

    def forward(self, x, cos, sin, mask, batch: StepBatch, cache: GemmaKVCache, backend) -> torch.Tensor:
        """x: [N, d]; cos/sin: [N, D] of this layer type; mask: [R, 1, Qmax, L] bool."""
        n = x.shape[0]
        q, *kv = linear_group(self, self.linear_groups[0], x)
        q = apply_rope(self.q_norm(q.view(n, self.num_heads, self.head_dim)), cos, sin)              # [N, H, D]
        if self.k_proj is not None:
            k = kv[0].view(n, self.num_kv_heads, self.head_dim)                                     # [N, KVH, D]
            # K = V (Gemma 4 global layers): the values are the raw key projection.
            v = kv[1].view(n, self.num_kv_heads, self.head_dim) if self.v_proj is not None else k
            k = apply_rope(self.k_norm(k), cos, sin)
            if self.v_norm is not None:
                v = self.v_norm(v)
            cache.write(self.layer_idx, batch.token_slots, batch.positions, k, v)
        keys, values = cache.read(self.kv_source, batch.slots, mask.shape[-1], batch.slot_range)    # [R, L, KVH, D]
        query = padded_queries(q, batch)                                                           # [R, Qmax, H, D]
        out = backend.attention(query.transpose(1, 2), keys.transpose(1, 2).to(q.dtype),
                                values.transpose(1, 2).to(q.dtype), mask, self.scale,
                                kv_lens=batch.kv_lens)                                              # [R, H, Qmax, D]
        out = out.transpose(1, 2)[batch.token_rows, batch.token_offsets]                          # [N, H, D]
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class GemmaMLP(nn.Module):
    """down(act(gate(x)) * up(x)), act = GELU with the tanh approximation."""
    linear_groups = (("gate_proj", "up_proj"),)

    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        gate, up = linear_group(self, ("gate_proj", "up_proj"), x)
        return self.down_proj(self.act(gate) * up)


class GemmaRouter(nn.Module):
    """Gemma 4 MoE router: top-k of softmax(proj(norm(x) * scale / sqrt(d))), renormalised,
    times a learned per-expert scale."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.top_k, self.root_scale = cfg.top_k_experts, cfg.hidden_size ** -0.5
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centred=False, with_weight=False)
        self.proj = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x):
        """x: [N, d] -> (weights [N, k] float32, experts [N, k] long)."""
        scores = self.proj(self.norm(x) * self.scale * self.root_scale)                     # [N, E]
        weights, experts = torch.topk(F.softmax(scores, dim=-1, dtype=torch.float32), k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class GemmaExperts(nn.Module):
    """Gemma 4 MoE experts, stored fused: gate_up_proj [E, 2I, d], down_proj [E, d, I]."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.zeros(e, d, i))
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x, weights, experts):
        """x: [N, d]; weights, experts: [N, k]. Tokens are grouped by expert; the group sizes
        are read on the host once per call (a device sync, accepted in this reference path)."""
        flat_experts = experts.reshape(-1)                                                # [N * k]
        order = torch.argsort(flat_experts, stable=True)
        tokens = order // experts.shape[1]
        counts = torch.bincount(flat_experts, minlength=self.gate_up_proj.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = tokens[start:start + count]
                gate, up = F.linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
                y = F.linear(self.act(gate) * up, self.down_proj[expert])                 # [count, d]
                out.index_add_(0, rows, (y * weights.reshape(-1)[order[start:start + count], None]).to(out.dtype))
            start += count
        return out


class GemmaDecoderLayer(nn.Module):
    """One decoder layer:
        x = x + post_attn_norm(attn(input_norm(x)))
        x = x + post_ff_norm(mlp(pre_ff_norm(x)) [+ MoE branch])
        x = x + post_ple_norm(ple_proj(act(ple_gate(x)) * per_layer_input))   (Gemma 4 with PLE)
        x = x * layer_scalar                                                   (Gemma 4)"""

    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        spec, eps, zero_centred = cfg.layers[layer_idx], cfg.rms_norm_eps, not cfg.gemma4
        d = cfg.hidden_size
        self.layer_type = spec.layer_type
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.mlp = GemmaMLP(d, spec.intermediate_size, cfg.activation)
        self.input_layernorm = GemmaRMSNorm(d, eps, zero_centred)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps, zero_centred)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps, zero_centred)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps, zero_centred)
        self.moe = cfg.num_experts > 0
        if self.moe:
            self.router = GemmaRouter(cfg)
            self.experts = GemmaExperts(cfg)
            self.post_feedforward_layernorm_1 = GemmaRMSNorm(d, eps, zero_centred)
            self.post_feedforward_layernorm_2 = GemmaRMSNorm(d, eps, zero_centred)
            self.pre_feedforward_layernorm_2 = GemmaRMSNorm(d, eps, zero_centred)
        self.per_layer_input = cfg.hidden_size_per_layer_input > 0
        if self.per_layer_input:
            self.act = ACTIVATIONS[cfg.activation]
            self.per_layer_input_gate = Linear(d, cfg.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = Linear(cfg.hidden_size_per_layer_input, d, bias=False)
            self.post_per_layer_input_norm = GemmaRMSNorm(d, eps, zero_centred)
        # Gemma 4 scales each layer's output by a stored scalar (a checkpoint buffer).
        self.register_buffer("layer_scalar", torch.ones(1) if cfg.gemma4 else None)

    def forward(self, x, per_layer_input, cos, sin, mask, batch, cache, backend):
        """x: [N, d]; per_layer_input: [N, p] or None."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, batch, cache, backend)
        x = x + self.post_attention_layernorm(attended)
        residual = x
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            weights, experts = self.router(residual)
            routed = self.experts(self.pre_feedforward_layernorm_2(residual), weights, experts)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = residual + self.post_feedforward_layernorm(h)
        if self.per_layer_input:
            gated = self.act(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x


class _GemmaDecoder(nn.Module):
    """Holds the parameters under HF's `model.` prefix."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        d, zero_centred = cfg.hidden_size, not cfg.gemma4
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(d, cfg.rms_norm_eps, zero_centred)
        if cfg.hidden_size_per_layer_input:
            width = cfg.num_layers * cfg.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, width)
            self.per_layer_model_projection = Linear(d, width, bias=False)
            self.per_layer_projection_norm = GemmaRMSNorm(cfg.hidden_size_per_layer_input, cfg.rms_norm_eps,
                                                          zero_centred)


def scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x * scale with the scale rounded to x's dtype first, as transformers' scaled embeddings
    do (in bfloat16, sqrt(3072) = 55.43 becomes 55.5)."""
    return x * torch.tensor(scale, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------- the runner
class GemmaTargetModel(nn.Module):
    """Gemma 3 / Gemma 4 text decoder with `TargetModel`'s interface."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.model = _GemmaDecoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight   # one tensor, as in the checkpoint
        self.rotary = GemmaRotary(cfg)

    @property
    def supports_graphs(self) -> bool:
        """False with MoE blocks: grouping tokens by expert reads the group sizes on the host,
        which a device graph cannot capture (the engine must run such a target eagerly)."""
        return self.config.num_experts == 0

    def make_cache(self, num_slots: int, max_len: int, dtype: torch.dtype, device) -> GemmaKVCache:
        return GemmaKVCache(self.config, num_slots, max_len, dtype, device)

    def optional_weights(self) -> tuple:
        """Checkpoint tensors that may be absent: transformers then initialises them to ones."""
        return tuple(name for name in self.state_dict() if name.endswith(".layer_scalar"))

    def attention_masks(self, batch: StepBatch, kv_len: int, device) -> dict:
        """Layer type -> [R, 1, Qmax, kv_len] bool. Causal; a sliding layer's query at p also needs
        key position > p - sliding_window. Padding rows (past a request's query) copy its last
        real row, so no row is empty (an empty row would make the attention NaN). Built on the
        device from the batch's tensors: no host sync, so a captured graph can replay it."""
        offsets = torch.arange(batch.max_query_len, device=device)
        last = (batch.query_lens - 1).clamp(min=0)          # empty rows (fixed-shape steps) act as offset 0
        offsets = torch.minimum(offsets.unsqueeze(0), last.unsqueeze(1))                          # [R, Qmax]
        query_pos = (batch.start_positions.unsqueeze(1) + offsets).unsqueeze(-1)                   # [R, Qmax, 1]
        key_pos = torch.arange(kv_len, device=device).view(1, 1, -1)                               # [1, 1, L]
        causal = key_pos <= query_pos
        masks = {FULL: causal.unsqueeze(1)}
        window = self.config.sliding_window
        masks[SLIDING] = (causal & (key_pos > query_pos - window)).unsqueeze(1) if window else masks[FULL]
        return masks

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4 PLE: [N, L, p] = (RMSNorm(W x / sqrt(d)) + E_ple[id] * sqrt(p)) / sqrt(2)."""
        cfg, decoder = self.config, self.model
        n, width = input_ids.shape[0], cfg.hidden_size_per_layer_input
        token_part = scaled(decoder.embed_tokens_per_layer(input_ids), width ** 0.5).view(n, cfg.num_layers, width)
        context = decoder.per_layer_model_projection(x) * cfg.hidden_size ** -0.5
        context = decoder.per_layer_projection_norm(context.view(n, cfg.num_layers, width))
        return (context + token_part) * 2.0 ** -0.5

    @torch.no_grad()
    def forward(
        self,
        batch: StepBatch,
        cache: GemmaKVCache,
        backend,
        logits_indices: Optional[torch.Tensor] = None,  # [M] flat token indices; None = all N
        hidden_layer_ids: Sequence[int] = (),           # -1 = embedding output (scaled), i = output of layer i
        final_hidden: bool = False,                     # also return the normed final hidden state [N, d]
    ) -> TargetOutput:
        cfg = self.config
        x = scaled(self.model.embed_tokens(batch.input_ids), cfg.embed_scale)       # [N, d]
        per_layer = self.per_layer_inputs(batch.input_ids, x) if cfg.hidden_size_per_layer_input else None
        rope = {kind: self.rotary(batch.positions, x.dtype, kind) for kind in {s.layer_type for s in cfg.layers}}
        masks = self.attention_masks(batch, min(batch.max_kv_len, cache.max_len), x.device)
        wanted = {layer_id: None for layer_id in hidden_layer_ids}
        if -1 in wanted:
            wanted[-1] = x
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope[layer.layer_type]
            x = layer(x, None if per_layer is None else per_layer[:, i], cos, sin, masks[layer.layer_type],
                      batch, cache, backend)
            if i in wanted:
                wanted[i] = x
        hidden = torch.cat([wanted[i] for i in hidden_layer_ids], dim=-1) if hidden_layer_ids else None
        normed = self.model.norm(x)
        last_hidden = normed if final_hidden else None
        if logits_indices is not None:
            normed = normed[logits_indices]
        logits = self.lm_head(normed)
        cap = cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return TargetOutput(logits=logits, hidden=hidden, last_hidden=last_hidden)


def gemma_text_weights(weights: dict, model: GemmaTargetModel) -> dict:
    """A checkpoint's tensors under the runner's names.

    Multimodal checkpoints keep the text model under `model.language_model.` (transformers 5)
    or `language_model.model.` (4.x, with the head at `language_model.lm_head`); their vision
    and audio towers are dropped. Key/value weights that a KV-shared layer's checkpoint may
    still carry are dropped, as transformers does. A tied or absent LM head is the embedding."""
    for body, head in (("model.language_model.", "lm_head."), ("language_model.model.", "language_model.lm_head.")):
        if any(name.startswith(body) for name in weights):
            text = {"model." + k[len(body):]: v for k, v in weights.items() if k.startswith(body)}
            text.update({"lm_head." + k[len(head):]: v for k, v in weights.items() if k.startswith(head)})
            weights = text
            break
    for i, spec in enumerate(model.config.layers):
        if spec.kv_source != i:
            for name in ("k_proj", "v_proj", "k_norm", "v_norm"):
                for suffix in (".weight", ".bias"):
                    weights.pop(f"model.layers.{i}.self_attn.{name}{suffix}", None)
    if model.config.tie_word_embeddings or "lm_head.weight" not in weights:
        if "model.embed_tokens.weight" in weights:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


__all__ = ["GEMMA_TEXT_TYPES", "GEMMA_WRAPPERS", "GemmaConfig", "GemmaKVCache", "GemmaTargetModel",
           "gemma_text_config", "gemma_text_weights"]
