"""The target model runner: a compact Qwen3 / Qwen2 / Llama decoder over flattened batches.

Module and parameter names follow Hugging Face's checkpoints
(`model.layers.{i}.self_attn.q_proj.weight`, ...), so a checkpoint's
state dict loads as is. One forward takes a `StepBatch` (any mix of
prefill, decode and verification tokens), writes their keys and values into
the static `KVCache`, and returns logits only at the flat positions asked for,
plus the residual stream after the requested layers for the draft.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .batch import KVCache, StepBatch
from .config import TargetConfig
from .layers import MLP, Linear, RMSNorm, Rotary, apply_rope, linear_group


def padded_queries(x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """Scatter flat rows [N, ...] into a per-request padded tensor [R, Qmax, ...]."""
    out = x.new_zeros((batch.num_requests, batch.max_query_len) + tuple(x.shape[1:]))
    out[batch.token_rows, batch.token_offsets] = x
    return out


@dataclass
class AttentionLayout:
    """Where each token's query sits in the attention of one step, computed once per forward.
    Keys are read either as one view of a slot span (`StepBatch.kv_span`) or gathered per
    request; `rows` [N] is each token's row in the key tensor (the request's row in the span, or
    the request index), `mask` [rows, 1, Qmax, L] the causal visibility, `kv_lens` the per-row
    key bound for the backend's attention."""
    rows: torch.Tensor
    num_rows: int
    mask: torch.Tensor
    kv_lens: Optional[list]

    @classmethod
    def of(cls, batch: StepBatch, length: int) -> "AttentionLayout":
        device = batch.input_ids.device
        if batch.kv_span is not None:
            num_rows = batch.kv_span[1] - batch.kv_span[0]
            starts = batch.start_positions.new_zeros(num_rows)
            starts[batch.kv_rows] = batch.start_positions
            rows = batch.kv_rows[batch.token_rows]
            kv_lens = [1] * num_rows
            for row, bound in zip(batch.kv_rows.tolist(), batch.kv_lens or []):
                kv_lens[row] = bound
        else:
            num_rows, starts, rows, kv_lens = batch.num_requests, batch.start_positions, batch.token_rows, batch.kv_lens
        query_pos = starts.unsqueeze(1) + torch.arange(batch.max_query_len, device=device)   # [rows, Qmax]
        mask = torch.arange(length, device=device).view(1, 1, -1) <= query_pos.unsqueeze(-1)  # [rows, Qmax, L]
        return cls(rows, num_rows, mask.unsqueeze(1), kv_lens)


class TargetAttention(nn.Module):
    linear_groups = (("q_proj", "k_proj", "v_proj"),)

    def __init__(self, cfg: TargetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, batch: StepBatch, layout: AttentionLayout, cache: KVCache,
                backend) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = linear_group(self, ("q_proj", "k_proj", "v_proj"), x)
        q = q.view(n, self.num_heads, self.head_dim)                   # [N, H, D]
        k = k.view(n, self.num_kv_heads, self.head_dim)                # [N, KVH, D]
        v = v.view(n, self.num_kv_heads, self.head_dim)                # [N, KVH, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(self.layer_idx, batch.token_slots, batch.positions, k, v)

        length = layout.mask.shape[-1]
        keys, values = cache.read(self.layer_idx, batch.slots, length, batch.kv_span or batch.slot_range)
        query = q.new_zeros(layout.num_rows, batch.max_query_len, self.num_heads, self.head_dim)
        query[layout.rows, batch.token_offsets] = q                              # [rows, Qmax, H, D]
        out = backend.attention(query.transpose(1, 2), keys.transpose(1, 2).to(q.dtype),
                                values.transpose(1, 2).to(q.dtype), layout.mask, self.head_dim ** -0.5,
                                kv_lens=layout.kv_lens)                          # [rows, H, Qmax, D]
        out = out.transpose(1, 2)[layout.rows, batch.token_offsets]              # [N, H, D]
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class TargetLayer(nn.Module):
    def __init__(self, cfg: TargetConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TargetAttention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch, layout, cache, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, layout, cache, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(nn.Module):
    """Holds the parameters under HF's `model.` prefix."""

    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TargetLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class TargetOutput:
    logits: torch.Tensor            # [M, V] at the requested flat positions
    hidden: Optional[torch.Tensor]  # [N, m * d] residual stream after each requested layer, concatenated
    last_hidden: Optional[torch.Tensor] = None  # [N, d] after the final norm (training: target logits on demand)


class TargetModel(nn.Module):
    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.config = cfg
        self.model = _Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim)

    def make_cache(self, num_slots: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim, dtype, device)

    @torch.no_grad()
    def forward(
        self,
        batch: StepBatch,
        cache: KVCache,
        backend,
        logits_indices: Optional[torch.Tensor] = None,  # [M] flat token indices; None = all N
        hidden_layer_ids: Sequence[int] = (),           # -1 = embedding output, i = output of layer i
        final_hidden: bool = False,                     # also return the normed final hidden state [N, d]
    ) -> TargetOutput:
        x = self.model.embed_tokens(batch.input_ids)     # [N, d]
        cos, sin = self.rotary(batch.positions, x.dtype)  # [N, D]
        wanted = {layer_id: None for layer_id in hidden_layer_ids}
        if -1 in wanted:
            wanted[-1] = x
        # max_kv_len, capped by the cache size
        layout = AttentionLayout.of(batch, min(batch.max_kv_len, cache.max_len))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, batch, layout, cache, backend)
            if i in wanted:
                wanted[i] = x
        hidden = torch.cat([wanted[i] for i in hidden_layer_ids], dim=-1) if hidden_layer_ids else None
        normed = self.model.norm(x)
        last_hidden = normed if final_hidden else None
        if logits_indices is not None:
            normed = normed[logits_indices]
        return TargetOutput(logits=self.lm_head(normed), hidden=hidden, last_hidden=last_hidden)
