"""DraftConfig: everything that shapes a draft, and how a draft is sized for a target.

Saved inside the draft's config.json with DeepSpec's field names (the target's config plus
`block_size`, `target_layer_ids`, `mask_token_id`, `markov_rank`, ...). `draft_config_for_target`
fills what the user leaves out from the algorithm's registered defaults and the target's size
(`default_draft_sizes`).
"""
from dataclasses import dataclass, field, fields
from typing import Optional

from ...errors import CheckpointError, ConfigError, DraftMismatchError
from ..config import RopeConfig, TargetConfig
from .base import DRAFT_ALGORITHMS, draft_algorithm
from .heads import MARKOV_HEADS

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
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.markov_rank > 0 and self.markov_head_type not in MARKOV_HEADS:
            raise ConfigError(f"unknown markov_head_type {self.markov_head_type!r}; valid: {', '.join(MARKOV_HEADS)}")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank <= 0:
            raise ConfigError("confidence_head_with_markov needs a Markov head: set markov_rank > 0, or "
                              "confidence_head_with_markov=False")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")
        for layer_id in self.target_layer_ids:
            if not -1 <= layer_id < self.num_target_layers:
                raise ConfigError(f"target layer id {layer_id} is outside [-1, {self.num_target_layers - 1}]")
        if not self.embed_scale > 0:
            raise ConfigError(f"embed_scale must be positive, got {self.embed_scale}")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(f"draft_vocab_size must be in [1, {self.vocab_size}] (the target vocabulary), "
                              f"got {self.draft_vocab_size}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ConfigError(f"final_logit_softcapping must be positive or None, got {self.final_logit_softcapping}")

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



INIT_OPTIONS = ("num_layers", "block_size", "target_layer_ids", "mask_token_id", "num_anchors", "markov_rank",
                "markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "anchor_as_first",
                "intermediate_size", "draft_vocab_size", "seed", "from_target")


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
        raise ConfigError(f"unknown draft option(s) {', '.join(unknown)}; valid: {', '.join(INIT_OPTIONS)}")
    options.pop("seed", None)
    options.pop("from_target", None)         # how init_draft fills the weights, not a size
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




__all__ = ["DSPARK_ARCHITECTURE", "DraftConfig", "INIT_OPTIONS", "check_draft_fits_target", "default_draft_sizes",
           "default_target_layer_ids", "draft_config_for_target", "target_parameters"]
