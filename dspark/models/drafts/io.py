"""Creating, saving and loading draft directories (config.json + model.safetensors).

The layout is DeepSpec's: the target's HF config plus the draft fields
(`architectures: ["Qwen3DSparkModel"]`, `block_size`, `target_layer_ids`,
`mask_token_id`, `markov_rank`, ...) and unprefixed weight names (`fc`,
`hidden_norm`, `layers.{i}.self_attn.q_proj`, `markov_head.markov_w1`, ...),
so a directory released by DeepSpec loads here and ours loads there.
"""
import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ...errors import CheckpointError, ConfigError
from ...files import check_output, write_text_atomic
from ..checkpoint import (PathLike, load_state, model_dir, read_config, read_weights, save_weights,
                          strip_prefix, target_config)
from ..config import TargetConfig
from ..gemma_config import gemma_text_config
from .base import draft_algorithm
from .config import DraftConfig, check_draft_fits_target, draft_config_for_target, target_parameters
from .formats import import_draft
from .vocab import DraftVocab

SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")


def save_draft(model: torch.nn.Module, directory: PathLike, base_config: Optional[dict] = None) -> Path:
    """Write a draft directory: the weights first, then config.json, each file atomically. The
    config is what marks a directory as a draft (loaders and the trainer look for it), so a
    crash part-way leaves no config.json beside missing or half-written weights."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out)
    write_text_atomic(out / "config.json", json.dumps(model.config.to_hf(base_config), indent=2) + "\n")
    return out


def build_draft(cfg: DraftConfig) -> torch.nn.Module:
    return draft_algorithm(cfg.algorithm).model_class(cfg)


def load_draft(path: PathLike, target_cfg: Optional[TargetConfig], target_model=None):
    """Load a draft directory. With a target, check that the draft fits it, and fill in the
    embedding / LM head from the target when the directory leaves them out (they are frozen
    copies of the target's)."""
    directory = model_dir(path, "draft")
    # Any published layout (DeepSpec, z-lab DFlash, EAGLE-3, SGLang, vLLM, speculators), detected
    # from config.json, arrives here as our config fields and parameter names (formats.py).
    _, hf, weights = import_draft(directory, read_config(directory, "draft"), read_weights(directory, "draft"),
                                  target_cfg)
    cfg = DraftConfig.from_hf(hf, source=str(directory / "config.json"))
    if target_cfg is not None:
        check_draft_fits_target(cfg, target_cfg, str(directory))
    model = build_draft(cfg)
    weights = strip_prefix(weights, set(model.state_dict()))
    missing_shared = load_state(model, weights, directory, optional=SHARED_WITH_TARGET)
    if cfg.reduced_vocab:
        DraftVocab.check(model, str(directory))
    if missing_shared:
        if target_model is None:
            raise CheckpointError(f"{directory} has no {', '.join(missing_shared)}; load it together with its target")
        copy_shared_from_target(model, target_model, missing_shared)
    return model


def copy_shared_from_target(model: torch.nn.Module, target_model, names=SHARED_WITH_TARGET) -> None:
    """Fill the draft's frozen copies of the target's embedding and LM head (with a reduced
    draft vocabulary, the LM head rows of the draft's tokens)."""
    with torch.no_grad():
        if "embed_tokens.weight" in names:
            model.embed_tokens.weight.copy_(target_model.model.embed_tokens.weight)
        if "lm_head.weight" in names:
            rows = target_model.lm_head.weight
            if model.config.reduced_vocab:
                rows = rows[DraftVocab.target_ids(model).to(rows.device)]
            model.lm_head.weight.copy_(rows)


def start_from_target(model: torch.nn.Module, target_model) -> list:
    """Warm start: begin where the target ends instead of from noise.

    - every draft layer (`layers.{i}.*`, EAGLE-3's `midlayer.*`) takes the weights of the
      target's last layer wherever a leaf module has the same type and shapes (the MLP, the
      norms, the attention projections; EAGLE-3's 2d-wide q/k/v stay random);
    - the final norm takes the target's final norm (the frozen LM head expects its scale);
    - `fc` starts as the identity on the deepest fused layer's features and zero elsewhere, so
      the context the draft attends to begins as the target's own late representation.
    Modules of another type (Gemma's zero-centred norms, ...) are left as initialised.
    Returns the names of the draft parameters copied or set."""
    source_modules = dict(target_model.named_modules())
    last = f"model.layers.{len(target_model.model.layers) - 1}."
    done = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if list(module.children()) or not list(module.parameters(recurse=False)):
                continue
            parts = name.split(".")
            if parts[0] == "layers" and len(parts) > 2:
                source_name = last + ".".join(parts[2:])
            elif parts[0] == "midlayer":
                source_name = last + ".".join(parts[1:])
            elif name == "norm":
                source_name = "model.norm"
            else:
                continue
            source = source_modules.get(source_name)
            if type(source) is not type(module):
                continue
            own, theirs = module.state_dict(), source.state_dict()
            if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
                continue
            module.load_state_dict(theirs)
            done += [f"{name}.{k}" for k in own]
        fc = getattr(model, "fc", None)
        d = model.config.hidden_size
        if fc is not None and fc.weight.shape[0] == d and fc.weight.shape[1] % d == 0:
            layer_ids = list(model.config.target_layer_ids)
            deepest = layer_ids.index(max(layer_ids)) if len(layer_ids) * d == fc.weight.shape[1] else -1
            fc.weight.zero_()
            fc.weight[:, deepest * d:(deepest * d + d) or None] = torch.eye(d, dtype=fc.weight.dtype)
            done.append("fc.weight")
    return done


def init_draft(target_dir: PathLike, out_dir: PathLike, algorithm: str = "dspark",
               draft_vocab_ids: Optional[list] = None, progress=None, from_target: bool = False,
               **options) -> str:
    """Create an untrained draft sized for a target, with the target's embedding and LM head
    copied in; `from_target` also warm-starts its layers, final norm and feature fusion from the
    target (`start_from_target`). Options: see `dspark.models.draft.INIT_OPTIONS`. A reduced draft vocabulary
    (`draft_vocab_size` below the target's) needs `draft_vocab_ids`, the target ids of its tokens
    (`dspark.training.data.select_draft_vocab` picks the most frequent response tokens).

    `out_dir` is checked first (`dspark.files.check_output`): it may not be or contain the
    target, nor hold a model that is not a draft; an existing draft there is replaced. Sizes
    are checked against the block the target's context can hold and the memory the draft
    would need before anything is allocated. Returns `out_dir`."""
    from ..checkpoint import load_target

    check_output(out_dir, "dir", inputs=[target_dir], model="draft")
    target_path = model_dir(target_dir, "target")
    check_output(out_dir, "dir", inputs=[target_path], model="draft")    # a GGUF / name resolves elsewhere
    target_hf = read_config(target_path, "target")
    target_cfg = target_config(target_hf, source=str(target_path / "config.json"))
    seed = options.get("seed", 0)
    try:
        cfg = draft_config_for_target(target_cfg, algorithm, **options)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    params = check_draft_size(cfg, target_cfg)
    if progress is not None:
        progress(f"draft: {algorithm}, {cfg.num_layers} layer(s), block {cfg.block_size}, Markov rank "
                 f"{cfg.markov_rank}, vocabulary {cfg.output_size} of {cfg.vocab_size}, target layers "
                 f"{list(cfg.target_layer_ids)} ({params / 1e6:.1f} M parameters incl. the frozen embedding / LM head)")
    if cfg.reduced_vocab and draft_vocab_ids is None:
        raise ConfigError(f"draft_vocab_size {cfg.draft_vocab_size} < the target's {cfg.vocab_size} needs the draft "
                          "tokens (draft_vocab_ids); `dspark train` picks the most frequent ones from its --data")
    target, _ = load_target(target_path, torch.device("cpu"), torch.float32)
    torch.manual_seed(seed if seed is not None else 0)
    model = build_draft(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    if cfg.reduced_vocab:
        DraftVocab.set_tokens(model, draft_vocab_ids)
    copy_shared_from_target(model, target)
    if from_target:
        copied = start_from_target(model, target)
        if progress is not None:
            progress(f"warm start from the target's last layer and final norm: {len(copied)} tensors")
    # The draft's config.json starts from the target's text config (a multimodal wrapper's
    # text_config, not its vision / audio parts).
    text_hf = gemma_text_config(target_hf) or target_hf
    base = {k: v for k, v in text_hf.items() if k not in ("architectures", "auto_map")}
    save_draft(model, out_dir, base)
    return str(out_dir)


def draft_parameters(cfg: DraftConfig) -> int:
    """Parameters of the draft `cfg` describes, counted on the meta device (nothing allocated).
    Layers are identical, so a deep draft is counted from one- and two-layer builds: building a
    million meta layers would itself take minutes."""
    def count(config: DraftConfig) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build_draft(config).parameters())

    if cfg.num_layers <= 2:
        return count(cfg)
    try:
        one, two = count(replace(cfg, num_layers=1)), count(replace(cfg, num_layers=2))
    except ConfigError:          # the algorithm fixes its layer count: let it refuse the real one
        return count(cfg)
    return one + (cfg.num_layers - 1) * (two - one)


def check_draft_size(cfg: DraftConfig, target_cfg) -> int:
    """Refuse sizes that cannot work before the allocator is asked to try: a block the target's
    context cannot hold (a round verifies anchor + block_size positions), and a draft that, with
    the float32 target it is initialised from, needs more memory than the host has. Returns the
    draft's parameter count."""
    context = target_cfg.max_position_embeddings
    if cfg.block_size + 1 > context:
        raise ConfigError(f"block_size {cfg.block_size} does not fit the target's context of {context} positions "
                          "(max_position_embeddings); typical blocks are 4 to 16 tokens")
    params = draft_parameters(cfg)
    from ...backends import get_backend

    needed = 4 * (params + target_parameters(target_cfg))        # float32 draft + float32 target, no activations
    limit = get_backend("cpu").memory_limit()
    if limit is not None and needed > limit:
        raise ConfigError(f"this draft ({params / 1e6:.0f} M parameters: {cfg.num_layers} layer(s), intermediate size "
                          f"{cfg.intermediate_size}, Markov rank {cfg.markov_rank}) and its target need "
                          f"{needed / 2 ** 30:.1f} GiB in float32, more than the {limit / 2 ** 30:.1f} GiB available; "
                          "choose smaller sizes")
    return params
