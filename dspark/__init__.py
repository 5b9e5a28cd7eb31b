"""dspark: lossless DSpark speculative decoding for Qwen3 / Llama / Gemma targets on CPU, CUDA and Ascend.

Layers (each imports only those below it):
    dspark.ops        pure tensor ops: sampling, draft block sampling, verify, schedule
    dspark.backends   device facts + the operator interface (cpu, cuda, ascend)
    dspark.models     target runner, KV cache, drafts, checkpoints
    dspark.cost_model, dspark.scheduler, dspark.calibration
                      cost tables per device, the prefix-scheduler state, confidence calibration
    dspark.engine     the draft -> schedule -> verify round loop with continuous batching
    dspark.bench      the evaluation / benchmark harness (dspark.reference: the built-in models)
    dspark (this)     the public API; dspark.cli on top

Quick use:
    engine = dspark.Engine.from_pretrained("path/to/target", draft="path/to/draft")
    outputs = engine.generate(["Hello"], dspark.SamplingParams(max_new_tokens=32))
"""
from .backends import Backend, BackendUnavailableError, available_backends, get_backend
from .engine import Engine
from .errors import CheckpointError, DraftMismatchError, DSparkError, NumericalError
from .models import init_draft
from .scheduling import CostModel, analytic_cost_model, device_spec, schedule_prefix
from .params import EngineConfig, GenerationOutput, SamplingParams, StreamEvent
from .models import reference_model_dir

__version__ = "0.1.0"

__all__ = ["Backend", "BackendUnavailableError", "CheckpointError", "CostModel", "DSparkError", "DraftMismatchError",
           "Engine", "analytic_cost_model", "device_spec", "schedule_prefix",
           "EngineConfig", "GenerationOutput", "NumericalError", "SamplingParams", "StreamEvent",
           "available_backends", "get_backend", "init_draft", "reference_model_dir", "__version__"]
