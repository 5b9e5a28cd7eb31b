"""Reading and writing Hugging Face-style model directories, with clear errors.

A directory holds `config.json` and one or more `*.safetensors` files (a
sharded checkpoint lists its shards in `model.safetensors.index.json`). Only
safetensors are read: they cannot execute code, and their headers let a
corrupt or truncated file be reported by name.
"""
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_output

PathLike = Union[str, os.PathLike]
# Prefixes some exporters put in front of parameter names.
KNOWN_PREFIXES = ("model.", "module.", "_orig_mod.")


def model_dir(path: PathLike, what: str) -> Path:
    """The model directory for `path`: a directory, or a GGUF file / known model name, converted
    once into the cache (see `sources.resolve_model`)."""
    from .sources import resolve_model

    directory = resolve_model(path)
    if not directory.exists():
        raise CheckpointError(f"{what} directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{what} path {str(directory)!r} is not a directory "
                              "(pass the folder that contains config.json)")
    return directory


def read_config(directory: Path, what: str) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{what} directory {str(directory)!r} has no config.json "
                              "(is this a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def read_weights(directory: Path, what: str) -> dict[str, torch.Tensor]:
    """All tensors of the directory's safetensors files, by name."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        files = [directory / shard for shard in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin files: re-save with safe_serialization=True)" \
            if any(directory.glob("*.bin")) else ""
        raise CheckpointError(f"{what} directory {str(directory)!r} has no *.safetensors weights{hint}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight shard {file} listed in the index is missing")
        try:
            weights.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"weight file {file} is corrupt or truncated ({exc}); "
                                  "re-download or re-save the checkpoint") from None
    return weights


def strip_prefix(weights: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop an exporter prefix when that makes the names match the expected ones."""
    if set(weights) & expected:
        return weights
    for prefix in KNOWN_PREFIXES:
        stripped = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if set(stripped) & expected:
            return stripped
    return weights


def load_state(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path,
               optional: tuple[str, ...] = ()) -> list[str]:
    """Load weights into a module; any missing or extra name is an error that lists them.
    Names in `optional` may be missing; returns those that were."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    tolerated = [k for k in missing if k in optional]
    missing = [k for k in missing if k not in optional]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:4])})")
        raise CheckpointError(f"weights in {source} do not match the architecture in its config.json: "
                              + "; ".join(parts))
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(expected[name].shape)}")
    module.load_state_dict(weights, strict=False)
    return tolerated


def save_weights(module: torch.nn.Module, directory: Path, skip: tuple[str, ...] = ()) -> None:
    """Write `directory/model.safetensors` atomically (a crash leaves the old file or the new one)."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items() if k not in skip}
    with atomic_output(Path(directory) / "model.safetensors") as temporary:
        save_file(state, str(temporary), metadata={"format": "pt"})


def load_tokenizer(directory: Path) -> Optional[object]:
    """The directory's tokenizer through transformers, or None when it ships none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((directory / name).is_file() for name in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many kinds here
        raise CheckpointError(f"tokenizer files in {directory} could not be loaded: {exc}") from None


def target_config(hf: dict, source: str = "config.json"):
    """The runner config for a target's config.json: a `GemmaConfig` for Gemma 3 / Gemma 4 text
    models (also inside a multimodal wrapper's text_config), else a `TargetConfig`."""
    from .config import TargetConfig
    from .gemma_config import GemmaConfig, gemma_text_config

    if gemma_text_config(hf) is not None:
        return GemmaConfig.from_hf(hf, source)
    return TargetConfig.from_hf(hf, source)


def load_target(path: PathLike, device: torch.device, dtype: torch.dtype):
    """Build the target runner from a checkpoint directory. Returns (model, tokenizer)."""
    from .gemma import GemmaTargetModel, gemma_text_weights
    from .gemma_config import GemmaConfig, gemma_text_config
    from .target import TargetModel

    directory = model_dir(path, "target")
    hf = read_config(directory, "target")
    if "target_layer_ids" in hf:
        raise CheckpointError(f"{directory} is a draft model directory (its config.json has target_layer_ids); "
                              "pass it as the draft and give the target model's directory as the target")
    if gemma_text_config(hf) is None and "text_config" in hf and "model_type" not in hf.get("text_config", {}):
        raise CheckpointError(f"{directory}/config.json wraps a text_config without a model_type")
    cfg = target_config(hf, source=str(directory / "config.json"))
    if isinstance(cfg, GemmaConfig):
        model = GemmaTargetModel(cfg)
        load_state(model, gemma_text_weights(read_weights(directory, "target"), model), directory,
                   optional=model.optional_weights())
        model.to(device=device, dtype=dtype).eval()
        return model, load_tokenizer(directory)
    model = TargetModel(cfg)
    weights = read_weights(directory, "target")
    if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
        if "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    load_state(model, weights, directory)
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(directory)
