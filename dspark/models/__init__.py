"""Models: the target runners, the static KV cache, the drafts, and where checkpoints come from.

What lives here: `batch` (`StepBatch`, one flattened variable-length step, and `KVCache`),
`layers` (Linear, RMSNorm, RoPE, MLP), `config` / `target` (Qwen3 / Qwen2 / Llama) and
`gemma_config` / `gemma` (Gemma 3 / Gemma 4 text), `drafts/` (the Draft interface, the algorithm
registry and the DSpark / DFlash / EAGLE-3 drafts), `checkpoint` (reading and writing
Hugging Face directories), `sources` (GGUF files and known model names, converted once into a
cache) and `reference` (the built-in models). Device work goes through the backend object
passed into each forward.

Who may import it: the engine and everything above it. It imports `dspark.ops`,
`dspark.backends` (for the interface only) and `dspark.errors`.
"""
from .batch import KVCache, StepBatch
from .checkpoint import load_target, load_tokenizer
from .config import TargetConfig
from .drafts import (DRAFT_ALGORITHMS, Draft, DraftAlgorithm, DraftConfig, DraftProposal, DSparkDraft, Eagle3Draft,
                     draft_algorithm, init_draft, load_draft, register_draft_algorithm, save_draft)
from .gemma import GemmaTargetModel
from .gemma_config import GemmaConfig
from .reference import reference_model_dir
from .sources import resolve_model
from .target import TargetModel, TargetOutput

__all__ = ["DRAFT_ALGORITHMS", "DSparkDraft", "Draft", "DraftAlgorithm", "DraftConfig", "DraftProposal", "Eagle3Draft",
           "GemmaConfig", "GemmaTargetModel", "KVCache", "StepBatch", "TargetConfig", "TargetModel", "TargetOutput",
           "draft_algorithm", "init_draft", "load_draft", "load_target", "load_tokenizer", "reference_model_dir",
           "register_draft_algorithm", "resolve_model", "save_draft"]
