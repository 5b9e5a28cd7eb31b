"""Models: the target runner, the static KV cache, and the drafts.

What lives here: `TargetModel` (Qwen3 / Qwen2 / Llama) and `GemmaTargetModel` (Gemma 3 /
Gemma 4 text) over flattened variable-length batches, `StepBatch` and `KVCache`, the DSpark-family drafts
with their heads and algorithm registry, and checkpoint reading/writing.
Device work goes through the backend object passed into each forward.

Who may import it: the engine, the public API, the CLI, training and
benchmarks. It imports `dspark.ops`, `dspark.backends` (for the interface only)
and `dspark.errors`.
"""
from .batch import KVCache, StepBatch
from .checkpoint import load_target, load_tokenizer
from .config import TargetConfig
from .draft import DRAFT_ALGORITHMS, DraftConfig, DraftProposal, DSparkDraft, register_draft_algorithm
from .draft_io import init_draft, load_draft, save_draft
from .gemma import GemmaConfig, GemmaTargetModel
from .target import TargetModel, TargetOutput

__all__ = ["DRAFT_ALGORITHMS", "DSparkDraft", "GemmaConfig", "GemmaTargetModel", "DraftConfig", "DraftProposal", "KVCache", "StepBatch",
           "TargetConfig", "TargetModel", "TargetOutput", "init_draft", "load_draft", "load_target",
           "load_tokenizer", "register_draft_algorithm", "save_draft"]
from . import eagle3  # registers the "eagle3" draft algorithm
