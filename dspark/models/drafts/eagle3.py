"""EAGLE-3 drafts: one decoder layer over [token embedding; fused target feature], run as a chain.

Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test" (2025). Hidden states of three target layers (low, mid, high) are
fused per position, g_p = fc([H_low; H_mid; H_high]) (3d -> d). The draft's input at
position p is the pair (x_p, g_{p-1}) -- the token there and the feature of the position
before it -- and its output hidden h_p predicts x_{p+1}. Verified positions pair with
the target's features; inside the chain the draft feeds its own output hidden forward,
because the target has not seen the drafted tokens yet. Anchor x_n at position n:

    position     1      2     ...   n          n+1       n+2
    token        x_1    x_2         x_n        d_1       d_2
    feature      g_0    g_1         g_{n-1}    h_n       h_{n+1}
    predicts     x_2    x_3         d_1        d_2       d_3

Position 0 holds no pair (there is no feature before it): no query ever sees a key there.

The layer (weight names as in EAGLE-3's release, `midlayer.*`): attention reads the
2d-wide [input_layernorm(embed(x)); hidden_norm(g)] (q/k/v: 2d -> heads), the residual
stream starts from the feature g, o_proj and a SwiGLU MLP work in d, and
logits = lm_head(norm(h)). The residual output h (before `norm`) is what the chain feeds
forward. No q/k norms (the release has none). A reduced draft vocabulary (the release's
d2t / t2d maps, `DraftVocab`) keeps the LM head's rows of the draft tokens only; the chain
samples from the full-vocabulary distribution with zero mass elsewhere.

Inference differs from DSpark's parallel block: gamma sequential one-token steps per
round over the draft's own single-layer KV cache. Because the draft has one layer, the
K/V of a verified pair is a pure projection of that pair, so `append_context` computes
it directly (no catch-up pass, no per-slot counters, no host sync). The chain's K/V at
positions n.. are speculative; the next `append_context` overwrites the verified ones,
and stale entries past a request's length are never visible (a query at p sees keys <= p).
"""
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError
from ..batch import KVCache
from ..layers import MLP, Linear, RMSNorm, Rotary, apply_rope, linear_group
from .base import DraftAlgorithm, DraftProposal, register_draft_algorithm
from .config import DraftConfig
from .vocab import DraftVocab

NUM_FUSED_LAYERS = 3   # low, mid, high


def eagle3_target_layer_ids(num_target_layers: int) -> list[int]:
    """EAGLE-3's low / mid / high layers: the outputs of layers 1, L/2 - 1 and L - 4
    (0-based; the release taps the inputs of layers 2, L/2 and L - 3). Qwen3-8B (36 layers)
    -> [1, 17, 32]. Under 7 layers that rule repeats an id, so the three are spread over
    [0, L - 2] instead (never the last layer), e.g. L = 4 -> [0, 1, 2]; under 4 layers ids
    must repeat (the fusion still works, it just sees a layer twice)."""
    layers = num_target_layers
    preferred = [1, layers // 2 - 1, layers - 4]
    if preferred[0] < preferred[1] < preferred[2]:
        return preferred
    high = max(layers - 2, 0)
    return [0, high // 2, high]


def check_target_layer_ids(cfg: DraftConfig) -> None:
    """An EAGLE-3 draft fuses exactly three target layers (`init_draft` fills in
    eagle3_target_layer_ids through the registry when the user names none)."""
    if len(cfg.target_layer_ids) != NUM_FUSED_LAYERS:
        raise ConfigError(f"an EAGLE-3 draft fuses exactly {NUM_FUSED_LAYERS} target layers (low, mid, high); "
                          f"got target_layer_ids={list(cfg.target_layer_ids)}")


def masked_attention(
    query: torch.Tensor,    # [B, H, T, D]
    key: torch.Tensor,      # [B, KVH, S, D]
    value: torch.Tensor,    # [B, KVH, S, D]
    visible: torch.Tensor,  # [..., T, S] bool, broadcast over [B, H]
    scale: float,
) -> torch.Tensor:          # [B, H, T, D]
    """Softmax attention in at least float32 where a row with no visible key gets uniform
    weights instead of NaN (the reference pass has such a row at position 0; it is never
    used, but a NaN there would poison gradients through the masked sums)."""
    compute = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query.to(compute) @ key.to(compute).transpose(-1, -2)) * scale      # [B, H, T, S]
    weights = scores.masked_fill(~visible, torch.finfo(compute).min).softmax(dim=-1)
    return (weights @ value.to(compute)).to(query.dtype)


@dataclass
class Eagle3Cache:
    """Per-slot draft state. Like `KVCache` it stores no lengths: the engine's start
    positions say which entries are valid. `features` keeps g_p of verified positions
    because a pair needs the feature of the position before it, which an earlier
    `append_context` may have delivered (and the chain's first step needs g_{n-1})."""
    kv: KVCache              # one layer: K/V of the pair at each position
    features: torch.Tensor   # [slots, max_len, d] fused target features g_p


class Eagle3Attention(nn.Module):
    """Projections only; the attention itself is the backend's (inference) or the
    training-time test's (training)."""
    linear_groups = (("q_proj", "k_proj", "v_proj"),)

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pair = 2 * cfg.hidden_size
        self.q_proj = Linear(pair, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(pair, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(pair, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)


class Eagle3Layer(nn.Module):
    """The decoder layer, split at the attention so inference and training share the rest."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.self_attn = Eagle3Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)    # on the token embedding
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)        # on the feature
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def project(self, embeds: torch.Tensor, features: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values of pairs. embeds, features: [..., d]; cos, sin: [..., D]
        -> q [..., H, D], k [..., KVH, D] (both rotated), v [..., KVH, D]."""
        attn = self.self_attn
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(features)], dim=-1)   # [..., 2d]
        lead = x.shape[:-1]
        q, k, v = linear_group(attn, ("q_proj", "k_proj", "v_proj"), x)
        q = apply_rope(q.view(*lead, attn.num_heads, attn.head_dim), cos, sin)
        k = apply_rope(k.view(*lead, attn.num_kv_heads, attn.head_dim), cos, sin)
        v = v.view(*lead, attn.num_kv_heads, attn.head_dim)
        return q, k, v

    def finish(self, features: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer after attention. features [..., d] (the residual stream's start),
        attended [..., H * D] -> hidden [..., d]."""
        hidden = features + self.self_attn.o_proj(attended)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft with the engine's draft interface (make_cache / append_context / propose)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        cfg.validate()
        if cfg.num_layers != 1:
            raise ConfigError(f"an EAGLE-3 draft has exactly one layer, got num_layers={cfg.num_layers}")
        if cfg.markov_rank > 0 or cfg.enable_confidence_head:
            raise ConfigError("an EAGLE-3 draft has no Markov or confidence head: set markov_rank=0 and "
                              "enable_confidence_head=False")
        check_target_layer_ids(cfg)
        self.config = cfg
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.fc = Linear(NUM_FUSED_LAYERS * d, d, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.lm_head = Linear(d, cfg.output_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim)
        if cfg.reduced_vocab:
            DraftVocab.register(self, cfg.vocab_size, cfg.draft_vocab_size)
        # Copies of the target's, never trained (the loss also detaches them).
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    has_confidence = False          # no confidence head: the load-aware schedules need an estimator
    supports_static = False         # the chain reads a data-dependent number of keys per step

    @property
    def gamma(self) -> int:
        return self.config.block_size

    # --- pieces shared by inference, the reference pass and training -------------------
    def fuse(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """g = fc([H_low; H_mid; H_high]): [..., 3d] -> [..., d]."""
        return self.fc(target_hidden.to(self.fc.weight.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] over the target vocabulary (-inf outside a reduced draft vocabulary)."""
        return self._to_target_vocab(self.lm_head(self.norm(hidden)))

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return DraftVocab.expand(self, logits, float("-inf")) if self.config.reduced_vocab else logits

    def forward(self, input_ids: torch.Tensor, prev_features: torch.Tensor) -> torch.Tensor:
        """A causal pass over explicit pairs at positions 0..T-1, without a cache: the
        reference the cached chain and the training-time test are checked against.
        input_ids [B, T] (x_p); prev_features [B, T, d] (the feature paired with x_p:
        g_{p-1}, or a chain step's hidden) -> hidden [B, T, d] (h_p, before `norm`).
        Row 0 is meaningless (no pair at position 0, nothing visible)."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        cos, sin = self.rotary(positions, prev_features.dtype)                    # [T, D]
        q, k, v = self.midlayer.project(self.embed_tokens(input_ids), prev_features, cos, sin)
        visible = (positions >= 1) & (positions.unsqueeze(0) <= positions.unsqueeze(1))   # [T, T]
        attended = masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), visible,
                                    self.config.head_dim ** -0.5)                 # [B, H, T, D]
        return self.midlayer.finish(prev_features, attended.transpose(1, 2).reshape(batch, length, -1))

    # --- the engine's draft interface ----------------------------------------------------
    def make_cache(self, num_slots: int, max_len: int, dtype, device) -> Eagle3Cache:
        cfg = self.config
        return Eagle3Cache(
            kv=KVCache(1, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim, dtype, device),
            features=torch.zeros(num_slots, max_len, cfg.hidden_size, dtype=dtype, device=device))

    @torch.no_grad()
    def append_context(self, cache: Eagle3Cache, token_slots, positions, target_hidden, token_ids=None) -> None:
        """Store verified positions: their fused features, and the K/V of their pairs.
        token_slots, positions, token_ids: [N] long; target_hidden: [N, 3d].
        The pair at p needs g_{p-1}: features are written first, so p - 1 may come in the
        same call (prefill) or an earlier one. Position 0's K/V (paired, by clamping, with
        g_0) is written but never visible."""
        assert token_ids is not None, "an EAGLE-3 draft needs the verified token ids"
        assert target_hidden.shape == (positions.shape[0], NUM_FUSED_LAYERS * self.config.hidden_size), \
            f"target_hidden must be [N, 3d], got {tuple(target_hidden.shape)}"
        features = self.fuse(target_hidden)                                       # [N, d]
        cache.features[token_slots, positions] = features.to(cache.features.dtype)
        prev = cache.features[token_slots, (positions - 1).clamp(min=0)].to(features.dtype)   # [N, d] g_{p-1}
        cos, sin = self.rotary(positions, features.dtype)                         # [N, D]
        _, k, v = self.midlayer.project(self.embed_tokens(token_ids), prev, cos, sin)
        cache.kv.write(0, token_slots, positions, k, v)

    def _chain_step(self, token_ids, features, positions, slots, cache: Eagle3Cache, length: int, backend,
                    slot_range):
        """One chain step for every request: write the pair's K/V at its position, attend
        over keys 1..position. token_ids [R]; features [R, d]; positions [R] -> hidden [R, d].
        `length` bounds the keys read (host int, >= every position + 1 that fits the cache)."""
        num = token_ids.shape[0]
        cos, sin = self.rotary(positions, features.dtype)                        # [R, D]
        q, k, v = self.midlayer.project(self.embed_tokens(token_ids), features, cos, sin)
        # Near the end of the context the chain runs past the cache: those drafts can never
        # be verified (the engine caps verify lengths by the room left), so their K/V only
        # need somewhere harmless to go -- the last slot, which is at or after the anchor.
        cache.kv.write(0, slots, positions.clamp(max=cache.kv.max_len - 1), k, v)
        keys, values = cache.kv.read(0, slots, length, slot_range)               # [R, L, KVH, D]
        key_pos = torch.arange(length, device=positions.device)
        visible = (key_pos >= 1) & (key_pos <= positions.unsqueeze(1))           # [R, L]
        attended = backend.attention(q.unsqueeze(2), keys.transpose(1, 2).to(q.dtype),
                                     values.transpose(1, 2).to(q.dtype), visible[:, None, None, :],
                                     self.config.head_dim ** -0.5)               # [R, H, 1, D]
        return self.midlayer.finish(features, attended.reshape(num, -1))

    @torch.no_grad()
    def propose(self, anchor_ids, start_positions, slots, cache: Eagle3Cache, backend, uniforms, temperature,
                top_k, top_p, slot_range=None, **hints) -> DraftProposal:
        """Draft gamma tokens per request by running the chain from its anchor.
        anchor_ids [R] (x_n, not yet in the cache), start_positions [R] (n >= 1: the number of
        verified positions), slots [R]; uniforms [R, gamma]; temperature / top_k / top_p [R].
        Step k samples d_{k+1} from the request's filtered distribution with uniforms[:, k];
        that distribution is the one verification uses. With a reduced vocabulary each step
        filters and samples over the draft's own columns, and only the finished distributions are
        spread over the target's vocabulary (zero mass elsewhere: the same distribution)."""
        num, gamma = anchor_ids.shape[0], self.gamma
        assert start_positions.shape == (num,) and slots.shape == (num,), "anchor_ids, start_positions, slots: [R]"
        assert uniforms.shape == (num, gamma), f"uniforms must be [{num}, {gamma}], got {tuple(uniforms.shape)}"
        max_len = cache.kv.max_len
        first_length = int(start_positions.max()) + 1        # keys 0..n of the longest request
        features = cache.features[slots, start_positions - 1].to(self.fc.weight.dtype)   # [R, d] g_{n-1}
        column_ids = DraftVocab.target_ids(self) if self.config.reduced_vocab else None      # [V'] or None
        token_ids, tokens, probs, logits = anchor_ids, [], [], []
        for k in range(gamma):
            hidden = self._chain_step(token_ids, features, start_positions + k, slots, cache,
                                      min(first_length + k, max_len), backend, slot_range)       # [R, d]
            logits.append(self.lm_head(self.norm(hidden)))                       # [R, V'] the draft's vocabulary
            step_probs = backend.sampling_probs(logits[-1], temperature, top_k, top_p, **hints)  # [R, V']
            columns = backend.sample(step_probs, uniforms[:, k])                                 # [R]
            token_ids = columns if column_ids is None else column_ids[columns]
            tokens.append(token_ids)
            probs.append(step_probs)
            features = hidden
        probs = torch.stack(probs, dim=1)
        if column_ids is not None:
            probs = DraftVocab.expand(self, probs, 0.0)                                          # [R, gamma, V]
        return DraftProposal(tokens=torch.stack(tokens, dim=1), probs=probs, logits=torch.stack(logits, dim=1))


register_draft_algorithm(DraftAlgorithm(
    "eagle3", "EAGLE-3", "one layer over [embedding; fused low/mid/high target features], sequential chain (EAGLE-3)",
    Eagle3Draft,
    dict(num_layers=1, markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False,
         anchor_as_first=True),
    eagle3_target_layer_ids, "Eagle3DraftModel", loss="dspark.training.eagle3_loss:eagle3_training_loss"))


__all__ = ["Eagle3Cache", "Eagle3Draft", "check_target_layer_ids", "eagle3_target_layer_ids", "masked_attention"]
