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
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import CheckpointError, DraftMismatchError
from .batch import KVCache
from .config import RopeConfig, TargetConfig
from .heads import MARKOV_HEADS, ConfidenceHead
from .layers import MLP, Linear, RMSNorm, Rotary, apply_rope

DSPARK_ARCHITECTURE = "Qwen3DSparkModel"


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> list[int]:
    """`count` layers evenly spaced from 1 to L - 3 (the last layers are never used).
    Qwen3-4B (36 layers) -> [1, 9, 17, 25, 33], as in the DSpark release."""
    high = num_target_layers - 3 if num_target_layers >= 5 else max(0, num_target_layers - 2)
    low = min(1, high)
    count = max(1, min(count, high - low + 1))
    if count == 1:
        return [high]
    return sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)})


@dataclass
class DraftConfig:
    """Everything that shapes a draft. Saved inside its config.json (DeepSpec field names)."""
    algorithm: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    target_layer_ids: list
    num_target_layers: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    block_size: int = 7
    num_anchors: int = 512
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    anchor_as_first: bool = True
    # Per-position STS temperatures on the confidence logit (None = uncalibrated), fitted on
    # sampled rounds (T > 0); greedy rounds have their own set when fitted (acceptance under
    # greedy verification is a different event, and one set fitted at T = 1 calibrates it worse).
    confidence_temperatures: Optional[list] = None
    confidence_temperatures_greedy: Optional[list] = None
    # The target's logit scale, for targets that scale embeddings (Gemma: sqrt(d)) or soft-cap
    # logits: the draft's copied embedding and LM head must be used the way the target uses them.
    embed_scale: float = 1.0
    final_logit_softcapping: Optional[float] = None
    # Tokens the draft can propose (EAGLE-3's reduced draft vocabulary, d2t / t2d maps in the
    # weights); None = the whole target vocabulary.
    draft_vocab_size: Optional[int] = None

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size is not None and self.draft_vocab_size < self.vocab_size

    @property
    def output_size(self) -> int:
        """Rows of the draft's LM head (and Markov W2): the draft vocabulary."""
        return self.draft_vocab_size if self.reduced_vocab else self.vocab_size

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.markov_rank > 0 and self.markov_head_type not in MARKOV_HEADS:
            raise ValueError(f"unknown markov_head_type {self.markov_head_type!r}; valid: {', '.join(MARKOV_HEADS)}")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank <= 0:
            raise ValueError("confidence_head_with_markov needs a Markov head: set markov_rank > 0, or "
                             "confidence_head_with_markov=False")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")
        for layer_id in self.target_layer_ids:
            if not -1 <= layer_id < self.num_target_layers:
                raise ValueError(f"target layer id {layer_id} is outside [-1, {self.num_target_layers - 1}]")
        if not self.embed_scale > 0:
            raise ValueError(f"embed_scale must be positive, got {self.embed_scale}")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, {self.vocab_size}] (the target vocabulary), "
                             f"got {self.draft_vocab_size}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ValueError(f"final_logit_softcapping must be positive or None, got {self.final_logit_softcapping}")

    # The HF-style config.json: the target's config with the draft's own fields on top.
    def to_hf(self, base: Optional[dict] = None) -> dict:
        hf = dict(base or {})
        hf.update({
            "architectures": [DRAFT_ALGORITHMS[self.algorithm].architecture if self.algorithm in DRAFT_ALGORITHMS
                              else DSPARK_ARCHITECTURE],
            "dspark_algorithm": self.algorithm,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope.theta, "rope_type": self.rope.type,
                                **({"factor": self.rope.factor} if self.rope.type != "default" else {})},
            "block_size": self.block_size,
            "target_layer_ids": list(self.target_layer_ids),
            "num_target_layers": self.num_target_layers,
            "mask_token_id": self.mask_token_id,
            "num_anchors": self.num_anchors,
            "markov_rank": self.markov_rank,
            "markov_head_type": self.markov_head_type,
            "enable_confidence_head": self.enable_confidence_head,
            "confidence_head_with_markov": self.confidence_head_with_markov,
            "anchor_as_first": self.anchor_as_first,
            "confidence_temperatures": self.confidence_temperatures,
        })
        if self.confidence_temperatures_greedy is not None:
            hf["confidence_temperatures_greedy"] = self.confidence_temperatures_greedy
        # Written only when they differ from the defaults, so Qwen3 / Llama drafts keep DeepSpec's field set.
        if self.embed_scale != 1.0:
            hf["embed_scale"] = self.embed_scale
        if self.final_logit_softcapping is not None:
            hf["final_logit_softcapping"] = self.final_logit_softcapping
        if self.reduced_vocab:
            hf["draft_vocab_size"] = self.draft_vocab_size
        hf.pop("rope_theta", None)
        hf.pop("rope_scaling", None)
        return hf

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "DraftConfig":
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            markov_rank = int(hf.get("markov_rank", 0) or 0)
            confidence = bool(hf.get("enable_confidence_head", False))
            algorithm = hf.get("dspark_algorithm") or ("dspark" if markov_rank > 0 or confidence else "dflash")
            cfg = cls(
                algorithm=algorithm,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                target_layer_ids=[int(i) for i in hf["target_layer_ids"]],
                num_target_layers=int(hf.get("num_target_layers", 0)),
                mask_token_id=int(hf["mask_token_id"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(hf),
                block_size=int(hf.get("block_size", 7)),
                num_anchors=int(hf.get("num_anchors", 512)),
                markov_rank=markov_rank,
                markov_head_type=hf.get("markov_head_type", "vanilla") or "vanilla",
                enable_confidence_head=confidence,
                confidence_head_with_markov=bool(hf.get("confidence_head_with_markov", False)) and confidence,
                anchor_as_first=bool(hf.get("anchor_as_first", algorithm != "dflash")),
                confidence_temperatures=hf.get("confidence_temperatures"),
                confidence_temperatures_greedy=hf.get("confidence_temperatures_greedy"),
                embed_scale=float(hf.get("embed_scale", 1.0)),
                final_logit_softcapping=(None if hf.get("final_logit_softcapping") is None
                                         else float(hf["final_logit_softcapping"])),
                draft_vocab_size=None if hf.get("draft_vocab_size") is None else int(hf["draft_vocab_size"]),
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: draft field {exc.args[0]!r} is missing") from None
        if cfg.num_target_layers == 0:
            cfg.num_target_layers = max(cfg.target_layer_ids) + 3
        try:
            cfg.validate()
        except ValueError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        return cfg


@dataclass
class DraftProposal:
    tokens: torch.Tensor                # [R, gamma] long
    probs: torch.Tensor                 # [R, gamma, V] the distributions the tokens were sampled from
    confidence: Optional[torch.Tensor]  # [R, gamma] conditional survival c_k, None without a confidence head
    confidence_logits: Optional[torch.Tensor] = None  # [R, gamma] before STS temperatures (for calibration)


class DraftVocab:
    """A reduced draft vocabulary, in EAGLE-3's convention: the draft's LM head has one row per
    draft token, `d2t` [Vd] int64 holds offsets (target id = draft id + d2t[draft id]) and `t2d`
    [V] bool marks the target tokens the draft can propose. The draft distribution is expanded
    to the full vocabulary with zero mass outside, so verification is unchanged and stays exact:
    a target token the draft cannot propose is simply never accepted as a draft.

    Worked example: V = 6, draft tokens = target ids [0, 2, 5] -> d2t = [0, 1, 3],
    t2d = [T, F, T, F, F, T], to_draft([5, 1]) = [2, -1]."""

    @staticmethod
    def register(module: nn.Module, vocab_size: int, draft_vocab_size: int) -> None:
        """Add the d2t / t2d buffers (names as in EAGLE-3's release) to a draft module."""
        module.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        module.register_buffer("t2d", torch.zeros(vocab_size, dtype=torch.bool))

    @staticmethod
    def set_tokens(module: nn.Module, target_ids) -> None:
        """Fill d2t / t2d from the (sorted, distinct) target ids of the draft tokens."""
        ids = torch.as_tensor(sorted(set(int(i) for i in target_ids)), dtype=torch.long)
        if ids.numel() != module.d2t.numel():
            raise ValueError(f"expected {module.d2t.numel()} distinct draft tokens, got {ids.numel()}")
        if ids.min() < 0 or ids.max() >= module.t2d.numel():
            raise ValueError("draft token ids must lie inside the target vocabulary")
        module.d2t.copy_(ids - torch.arange(ids.numel()))
        module.t2d.zero_()
        module.t2d[ids] = True

    @staticmethod
    def target_ids(module: nn.Module) -> torch.Tensor:
        """[Vd] the target id of each draft token."""
        return torch.arange(module.d2t.numel(), device=module.d2t.device) + module.d2t

    @staticmethod
    def check(module: nn.Module, source: str) -> None:
        """The maps loaded from a checkpoint must describe the same token set."""
        ids = DraftVocab.target_ids(module)
        ok = bool((ids >= 0).all() and (ids < module.t2d.numel()).all())
        ok = ok and bool((ids[1:] > ids[:-1]).all()) and int(module.t2d.sum()) == ids.numel() \
            and bool(module.t2d[ids].all())
        if not ok:
            raise CheckpointError(f"{source}: d2t and t2d do not describe the same set of draft tokens")

    @staticmethod
    def expand(module: nn.Module, values: torch.Tensor, fill: float) -> torch.Tensor:
        """[..., Vd] in draft order -> [..., V] with `fill` at tokens outside the draft vocabulary."""
        out = values.new_full(values.shape[:-1] + (module.t2d.numel(),), fill)
        out[..., DraftVocab.target_ids(module)] = values
        return out

    @staticmethod
    def to_draft(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft ids, -1 where the draft cannot propose the token."""
        index = torch.cumsum(module.t2d.long(), 0) - 1
        return torch.where(module.t2d[ids], index[ids], torch.full_like(ids, -1))


class ScaledEmbedding(nn.Embedding):
    """Token embedding times `scale`, the scale rounded to the weight dtype first, exactly as
    Gemma targets embed (scale sqrt(d)); scale 1 is a plain embedding."""

    def __init__(self, num_embeddings: int, dim: int, scale: float = 1.0):
        super().__init__(num_embeddings, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        return x if self.scale == 1.0 else x * torch.tensor(self.scale, dtype=x.dtype, device=x.device)


class LMHead(Linear):
    """The (frozen, target-copied) LM head, with the target's final-logit soft-capping
    cap * tanh(logits / cap) when it has one. Training computes the target's distribution
    through this same module, so both sides of every loss are on the target's scale."""

    def __init__(self, dim: int, vocab_size: int, softcap: Optional[float] = None):
        super().__init__(dim, vocab_size, bias=False)
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


class DraftAttention(nn.Module):
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
        k = apply_rope(self.k_norm(self.k_proj(x).view(shape)), cos, sin)
        return k, self.v_proj(x).view(shape)

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

    def backbone(self, anchor_ids, start_positions, slots, cache: KVCache, backend, slot_range=None,
                 ctx_len: Optional[int] = None):
        """One parallel pass over the block. Returns (hidden [R, gamma, d] after the final norm,
        base logits U [R, gamma, V])."""
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
        return hidden, self.full_vocab(self.lm_head(hidden), float("-inf"))

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

    def confidence(self, logits: Optional[torch.Tensor], greedy: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """c_k = sigmoid(z_k / T_k), with the STS temperatures when calibrated: [R, gamma] in (0, 1).
        greedy [R] bool marks rows decoded at temperature 0, which use the greedy set when fitted."""
        if logits is None:
            return None
        return torch.sigmoid(logits / self.sts_temperatures(logits, greedy))

    def sts_temperatures(self, logits: torch.Tensor, greedy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The STS temperature of every entry of `logits` [R, gamma] (1 where uncalibrated)."""
        cfg = self.config
        sampled = torch.tensor(cfg.confidence_temperatures or [1.0] * logits.shape[-1], device=logits.device)
        if greedy is None or not cfg.confidence_temperatures_greedy:
            return sampled.expand_as(logits)
        greedy_set = torch.tensor(cfg.confidence_temperatures_greedy, device=logits.device)
        return torch.where(greedy.view(-1, 1), greedy_set, sampled)

    @torch.no_grad()
    def propose(self, anchor_ids, start_positions, slots, cache, backend, uniforms, temperature, top_k, top_p,
                slot_range=None, ctx_len: Optional[int] = None, **hints):
        """Draft one block per request. anchor_ids, start_positions, slots: [R]; uniforms: [R, gamma].
        hints: host-known sampling hints for `ops.sampling_probs` (all_greedy, filtered)."""
        hidden, base_logits = self.backbone(anchor_ids, start_positions, slots, cache, backend, slot_range, ctx_len)
        transition = self.markov_head.transition(hidden) if self.markov_head is not None else None
        if transition is not None and self.config.reduced_vocab:
            step = transition

            def transition(k, prev_ids, state):          # biases over the full vocabulary
                bias, state = step(k, prev_ids, state)
                return self.full_vocab(bias, 0.0), state
        tokens, probs, prev_ids = backend.draft(base_logits.float(), anchor_ids, uniforms,
                                                temperature, top_k, top_p, transition, **hints)
        logits = self.confidence_logits(hidden, prev_ids)
        return DraftProposal(tokens=tokens, probs=probs, confidence=self.confidence(logits, temperature == 0),
                             confidence_logits=logits)


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


# --- the algorithm registry ---------------------------------------------------------------

@dataclass(frozen=True)
class DraftAlgorithm:
    name: str
    description: str
    defaults: dict
    model_class: type
    # target layers the draft reads when the user names none, from the target's layer count
    default_layers: Callable[[int], list] = default_target_layer_ids
    architecture: str = DSPARK_ARCHITECTURE       # "architectures" entry written to config.json


DRAFT_ALGORITHMS: dict[str, DraftAlgorithm] = {}


def register_draft_algorithm(algorithm: DraftAlgorithm) -> None:
    DRAFT_ALGORITHMS[algorithm.name] = algorithm


def draft_algorithm(name: str) -> DraftAlgorithm:
    if name not in DRAFT_ALGORITHMS:
        raise ValueError(f"unknown draft algorithm {name!r}; valid: {', '.join(DRAFT_ALGORITHMS)}")
    return DRAFT_ALGORITHMS[name]


register_draft_algorithm(DraftAlgorithm(
    "dspark", "parallel backbone + Markov head + confidence head (DSpark)",
    dict(markov_rank=256, markov_head_type="vanilla", enable_confidence_head=True,
         confidence_head_with_markov=True, anchor_as_first=True),
    DSparkDraft))
register_draft_algorithm(DraftAlgorithm(
    "dflash", "parallel backbone only, anchor + gamma mask tokens (DFlash)",
    dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False, anchor_as_first=False),
    DSparkDraft))

# init_draft options a user may set (the rest come from the target).
INIT_OPTIONS = ("num_layers", "block_size", "target_layer_ids", "mask_token_id", "num_anchors", "markov_rank",
                "markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "anchor_as_first",
                "intermediate_size", "draft_vocab_size", "seed")


def target_parameters(target) -> int:
    """Parameters of a decoder-only target from its config (embedding once, tied or not)."""
    d, layers = target.hidden_size, target.num_layers
    attention = 2 * d * target.num_heads * target.head_dim + 2 * d * target.num_kv_heads * target.head_dim
    intermediate = getattr(target, "intermediate_size", 4 * d) or 4 * d
    return layers * (attention + 3 * d * intermediate) + target.vocab_size * d


def default_draft_sizes(target) -> dict:
    """Draft sizes that suit the target's size. DeepSpec's recipe (5 layers, Markov rank 256, the
    full vocabulary) is sized for 8 B targets; for a 135 M target it makes a draft nearly as
    large as the target, and a draft LM head over 49 k tokens costs more than a target token.
        target parameters    layers   Markov rank   draft vocabulary
        < 0.5 B              1        64            16384 (when the vocabulary is larger)
        < 2 B                2        128           32768
        < 6 B                3        256           full
        >= 6 B               5        256           full
    """
    params = target_parameters(target)
    for limit, layers, rank, vocab in ((0.5e9, 1, 64, 16384), (2e9, 2, 128, 32768), (6e9, 3, 256, None)):
        if params < limit:
            break
    else:
        layers, rank, vocab = 5, 256, None
    return {"num_layers": min(layers, max(1, target.num_layers // 4)), "markov_rank": rank,
            "draft_vocab_size": vocab if vocab is not None and vocab < target.vocab_size else None}


def draft_config_for_target(target: TargetConfig, algorithm: str, **options) -> DraftConfig:
    unknown = sorted(set(options) - set(INIT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown draft option(s) {', '.join(unknown)}; valid: {', '.join(INIT_OPTIONS)}")
    options.pop("seed", None)
    entry = draft_algorithm(algorithm)
    settings = dict(entry.defaults)
    settings.update({k: v for k, v in options.items() if v is not None})
    if settings.get("markov_rank", 0) <= 0 and "confidence_head_with_markov" not in options:
        settings["confidence_head_with_markov"] = False   # nothing to condition on without a Markov head
    if settings.get("target_layer_ids") is None:
        settings["target_layer_ids"] = entry.default_layers(target.num_layers)
    sizes = default_draft_sizes(target)
    settings.setdefault("num_layers", sizes["num_layers"])
    if "markov_rank" not in options and settings.get("markov_rank", 0) > 0:
        settings["markov_rank"] = sizes["markov_rank"]
    settings.setdefault("mask_token_id", target.vocab_size - 1)
    settings.setdefault("intermediate_size", target.intermediate_size)
    known = {f.name for f in fields(DraftConfig)}
    return DraftConfig(
        algorithm=algorithm, vocab_size=target.vocab_size, hidden_size=target.hidden_size,
        num_heads=target.num_heads, num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
        num_target_layers=target.num_layers, rms_norm_eps=target.rms_norm_eps, rope=target.rope,
        # Gemma targets (GemmaConfig) scale embeddings and may soft-cap logits; others do neither.
        embed_scale=getattr(target, "embed_scale", 1.0),
        final_logit_softcapping=getattr(target, "final_logit_softcapping", None),
        **{k: v for k, v in settings.items() if k in known},
    )


def check_draft_fits_target(draft: DraftConfig, target: TargetConfig, source: str) -> None:
    problems = []
    if draft.vocab_size != target.vocab_size:
        problems.append(f"vocabulary size {draft.vocab_size} != target's {target.vocab_size}")
    if draft.hidden_size != target.hidden_size:
        problems.append(f"hidden size {draft.hidden_size} != target's {target.hidden_size}")
    bad_layers = [i for i in draft.target_layer_ids if not -1 <= i < target.num_layers]
    if bad_layers:
        problems.append(f"target_layer_ids {bad_layers} do not exist in a {target.num_layers}-layer target")
    if problems:
        raise DraftMismatchError(f"draft {source} was not made for this target: " + "; ".join(problems)
                                 + ". Create a matching draft with `dspark init-draft --target <target dir>` "
                                 "(or train one with `dspark train`).")


__all__ = ["DRAFT_ALGORITHMS", "DraftAlgorithm", "DraftConfig", "DraftProposal", "DSparkDraft", "DraftVocab", "LMHead",
           "ScaledEmbedding", "check_draft_fits_target", "default_draft_sizes", "default_target_layer_ids",
           "draft_algorithm",
           "draft_config_for_target", "register_draft_algorithm"]
