"""The built-in reference models: a small Qwen3-architecture target trained on math, instruction
and Python text, its DSpark / DFlash / EAGLE-3 drafts, and a standalone assistant LM for
transformers' assisted generation. They ship inside the package (dspark/reference_models/,
built by tools/build_reference.py, BUILD.json records how), so `dspark demo` and
`dspark bench` need no download.

    dspark.reference_model_dir("target")    # -> Path to a Hugging Face-format directory
"""
import json
from pathlib import Path

from .errors import CheckpointError

REFERENCE_MODELS = ("target", "dspark", "dflash", "eagle3", "assistant")
_ROOT = Path(__file__).resolve().parent / "reference_models"


def reference_model_dir(name: str) -> Path:
    """Directory of a built-in reference model: "target", "dspark", "dflash", "eagle3" or "assistant".
    The drafts leave out the embedding and LM head: they load together with the target."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; valid: {', '.join(REFERENCE_MODELS)}")
    directory = _ROOT / name
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"the reference model {name!r} is missing from {directory}: this installation was "
                              "built without it. Rebuild with `python tools/build_reference.py` from a source checkout "
                              "or reinstall dspark.")
    return directory


def reference_build_info() -> dict:
    """BUILD.json: how the reference models were built (stages, seeds, seconds, corpus)."""
    path = _ROOT / "BUILD.json"
    return json.loads(path.read_text()) if path.is_file() else {}
