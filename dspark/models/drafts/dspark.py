"""DSpark-family drafts: the parallel backbone with KV injection, plus optional heads.

Paper §2 (Eq. 2-3) and §3.1. Target features from m layers are fused per
position, ctx = RMSNorm(W_c [H_l1; ...; H_lm]) (`fc`, `hidden_norm`); every draft
layer takes queries from the block only and keys/values from [ctx; block],
bidirectional inside the block. Context keys/values are cached per request
(appended as positions are verified); the block is recomputed each round.
Block layouts: anchor-as-first (DSpark: [x0, MASK x (gamma-1)] -> gamma
predictions) or anchor + gamma masks (DFlash: predictions at the mask slots).
The anchor's own context features are never visible to its block: the anchor
has not been through the target yet, so the context ends just before it.
"""
from typing import Optional

import torch
from torch import nn

from ..batch import KVCache
from ..layers import MLP, Linear, RMSNorm, Rotary, apply_rope, linear_group
from .base import DraftAlgorithm, DraftProposal, register_draft_algorithm
from .config import DSPARK_ARCHITECTURE, DraftConfig, default_target_layer_ids
from .heads import MARKOV_HEADS, ConfidenceHead
from .vocab import DraftVocab, LMHead, ScaledEmbedding


class DraftAttention(nn.Module):
    linear_groups = (("k_proj", "v_proj"),)         # q reads only the block; k and v the context too

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def keys_values(self, x, cos, sin):
        """K (normed, rotated) and V of x: [..., d] -> 2 x [..., KVH, D]."""
        shape = x.shape[:-1] + (self.num_kv_heads, self.head_dim)
        k, v = linear_group(self, ("k_proj", "v_proj"), x)
        return apply_rope(self.k_norm(k.view(shape)), cos, sin), v.view(shape)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask, backend):
        """x: [R, T, d] block tokens; ctx_k/ctx_v: [R, L, KVH, D] injected context;
        mask: [R, T, L + T] bool, which context and block keys each block query may see."""
        r, t, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(r, t, self.num_heads, self.head_dim)), cos, sin)
        k_blk, v_blk = self.keys_values(x, cos, sin)
        keys = torch.cat([ctx_k.to(x.dtype), k_blk], dim=1)       # [R, L + T, KVH, D]
        values = torch.cat([ctx_v.to(x.dtype), v_blk], dim=1)
        out = backend.attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                mask.unsqueeze(1), self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(r, t, self.num_heads * self.head_dim))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class DSparkDraft(nn.Module):
    """Parallel backbone + optional Markov head + optional confidence head."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.hidden_size
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, d, cfg.embed_scale)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.fc = Linear(len(cfg.target_layer_ids) * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.lm_head = LMHead(d, cfg.output_size, cfg.final_logit_softcapping)
        self.rotary = Rotary(cfg.rope, cfg.head_dim)
        # W1 is indexed by the previous token (any target token, e.g. the anchor); W2 maps to
        # the draft vocabulary.
        self.markov_head = (MARKOV_HEADS[cfg.markov_head_type](cfg.vocab_size, cfg.markov_rank, d, cfg.output_size)
                            if cfg.markov_rank > 0 else None)
        if cfg.reduced_vocab:
            DraftVocab.register(self, cfg.vocab_size, cfg.draft_vocab_size)
        self.confidence_head = None
        if cfg.enable_confidence_head:
            self.confidence_head = ConfidenceHead(d + (cfg.markov_rank if cfg.confidence_head_with_markov else 0))

    @property
    def gamma(self) -> int:
        return self.config.block_size

    def make_cache(self, num_slots: int, max_len: int, dtype, device) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim, dtype, device)

    @torch.no_grad()
    def append_context(self, cache: KVCache, token_slots, positions, target_hidden, token_ids=None) -> None:
        """Cache the context keys/values of verified positions. target_hidden: [N, m * d].
        token_ids [N] (the verified tokens) are part of the draft interface; this backbone
        only needs the target features."""
        ctx = self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))  # [N, d]
        cos, sin = self.rotary(positions, ctx.dtype)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(ctx, cos, sin)
            cache.write(i, token_slots, positions, k, v)

    # The backbone can run with fixed shapes (rows and context length given by the caller).
    supports_static = True

    @property
    def has_confidence(self) -> bool:
        return self.confidence_head is not None

    def backbone(self, anchor_ids, start_positions, slots, cache: KVCache, backend, slot_range=None,
                 ctx_len: Optional[int] = None):
        """One parallel pass over the block. Returns (hidden [R, gamma, d] after the final norm,
        base logits U [R, gamma, V'] over the draft's vocabulary: `full_vocab` maps them to the
        target's)."""
        cfg = self.config
        block_len = cfg.block_size if cfg.anchor_as_first else cfg.block_size + 1
        r = anchor_ids.shape[0]
        ids = torch.full((r, block_len), cfg.mask_token_id, dtype=torch.long, device=anchor_ids.device)
        ids[:, 0] = anchor_ids
        offsets = torch.arange(block_len, device=anchor_ids.device)
        positions = start_positions.unsqueeze(1) + offsets                        # [R, T]
        x = self.embed_tokens(ids)                                                # [R, T, d]
        cos, sin = self.rotary(positions, x.dtype)
        ctx_len = ctx_len or max(int(start_positions.max()), 1)       # fixed shapes pass the full context
        ctx_mask = torch.arange(ctx_len, device=x.device).unsqueeze(0) < start_positions.unsqueeze(1)  # [R, L]
        mask = torch.cat([ctx_mask.unsqueeze(1).expand(r, block_len, -1),
                          ctx_mask.new_ones(r, block_len, block_len)], dim=-1)               # [R, T, L + T]
        for i, layer in enumerate(self.layers):
            ctx_k, ctx_v = cache.read(i, slots, ctx_len, slot_range)
            x = layer(x, cos, sin, ctx_k, ctx_v, mask, backend)
        hidden = self.norm(x if cfg.anchor_as_first else x[:, 1:])
        return hidden, self.lm_head(hidden)

    def full_vocab(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """[..., Vd] over the draft vocabulary -> [..., V] (identity without a reduced vocabulary)."""
        return DraftVocab.expand(self, values, fill) if self.config.reduced_vocab else values

    def train_blocks(self, input_ids, target_hidden, anchors, keep, backend):
        """The training forward: one block per sampled anchor, all blocks of a sequence at once.

        input_ids [B, T]; target_hidden [B, T, m * d]; anchors [B, A] positions; keep [B, A] bool.
        Block a holds [x_anchor, MASK, ...] at positions anchor + j; its queries see context
        strictly before the anchor plus their whole block, never another block (paper §3.3).
        Returns hidden [B, A, gamma, d] after the final norm; prediction k of block a is the
        token at anchor + 1 + k in both layouts.
        """
        cfg = self.config
        batch, length = input_ids.shape
        num_blocks = anchors.shape[1]
        block_len = cfg.block_size if cfg.anchor_as_first else cfg.block_size + 1
        device = input_ids.device
        offsets = torch.arange(block_len, device=device)
        ids = torch.full((batch, num_blocks, block_len), cfg.mask_token_id, dtype=torch.long, device=device)
        ids[:, :, 0] = input_ids.gather(1, anchors)
        positions = (anchors.unsqueeze(-1) + offsets).view(batch, -1)                  # [B, Q]
        x = self.embed_tokens(ids.view(batch, -1))                                     # [B, Q, d]
        ctx = self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))        # [B, T, d]
        mask = block_attention_mask(anchors, keep, length, block_len)                  # [B, Q, T + Q]
        cos, sin = self.rotary(positions, x.dtype)
        ctx_cos, ctx_sin = self.rotary(torch.arange(length, device=device).expand(batch, -1), x.dtype)
        for layer in self.layers:
            ctx_k, ctx_v = layer.self_attn.keys_values(ctx, ctx_cos, ctx_sin)
            x = layer(x, cos, sin, ctx_k, ctx_v, mask, backend)
        hidden = self.norm(x).view(batch, num_blocks, block_len, -1)
        return hidden if cfg.anchor_as_first else hidden[:, :, 1:]

    def confidence_logits(self, hidden, prev_ids) -> Optional[torch.Tensor]:
        """Raw confidence logits z_k (before STS temperatures): [R, gamma], or None."""
        if self.confidence_head is None:
            return None
        features = hidden
        if self.config.confidence_head_with_markov:
            features = torch.cat([hidden, self.markov_head.prev_embeddings(prev_ids).to(hidden.dtype)], dim=-1)
        return self.confidence_head(features).float()

    @torch.no_grad()
    def propose(self, anchor_ids, start_positions, slots, cache, backend, uniforms, temperature, top_k, top_p,
                slot_range=None, ctx_len: Optional[int] = None, **hints):
        """Draft one block per request. anchor_ids, start_positions, slots: [R]; uniforms: [R, gamma].
        hints: host-known sampling hints for `ops.sampling_probs` (all_greedy, filtered)."""
        hidden, base_logits = self.backbone(anchor_ids, start_positions, slots, cache, backend, slot_range, ctx_len)
        # The sequential stage samples over the draft's vocabulary (its Markov biases are over it
        # too): a reduced vocabulary of V/3 makes every step a third as wide. Only the finished
        # distributions are spread over the target's vocabulary, with zero mass outside.
        transition = self.markov_head.transition(hidden) if self.markov_head is not None else None
        token_ids = DraftVocab.target_ids(self) if self.config.reduced_vocab else None
        base_logits = base_logits.float()
        tokens, probs, prev_ids = backend.draft(base_logits, anchor_ids, uniforms,
                                                temperature, top_k, top_p, transition, token_ids, **hints)
        return DraftProposal(tokens=tokens, probs=self.full_vocab(probs, 0.0),
                             confidence_logits=self.confidence_logits(hidden, prev_ids), logits=base_logits)


def block_attention_mask(anchors: torch.Tensor, keep: torch.Tensor, length: int, block_len: int) -> torch.Tensor:
    """[B, A*block_len, length + A*block_len] bool: block queries see context positions strictly
    before their anchor and every slot of their own block. A dropped block (keep False) sees
    only its own block, so its (ignored) outputs stay finite.

    Worked example: length 4, anchors [1, 2], block_len 2 -> queries of block 0 see context {0}
    and block-0 keys; queries of block 1 see context {0, 1} and block-1 keys."""
    batch, num_blocks = anchors.shape
    queries = num_blocks * block_len
    query_block = torch.arange(queries, device=anchors.device) // block_len                      # [Q]
    query_anchor = anchors.gather(1, query_block.expand(batch, -1))                              # [B, Q]
    context = torch.arange(length, device=anchors.device).view(1, 1, -1) < query_anchor.unsqueeze(-1)
    context = context & keep.gather(1, query_block.expand(batch, -1)).unsqueeze(-1)
    own_block = (query_block.view(-1, 1) == query_block.view(1, -1)).expand(batch, -1, -1)      # [B, Q, Q]
    return torch.cat([context, own_block], dim=-1)


register_draft_algorithm(DraftAlgorithm(
    "dspark", "DSpark", "parallel backbone + Markov head + confidence head (DSpark)", DSparkDraft,
    dict(markov_rank=256, markov_head_type="vanilla", enable_confidence_head=True,
         confidence_head_with_markov=True, anchor_as_first=True),
    default_target_layer_ids, DSPARK_ARCHITECTURE, loss="dspark.training.losses:dspark_loss"))
register_draft_algorithm(DraftAlgorithm(
    "dflash", "DFlash", "parallel backbone only, anchor + gamma mask tokens (DFlash)", DSparkDraft,
    dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False, anchor_as_first=False),
    default_target_layer_ids, DSPARK_ARCHITECTURE, loss="dspark.training.losses:dflash_loss"))

__all__ = ["DSparkDraft", "block_attention_mask"]
