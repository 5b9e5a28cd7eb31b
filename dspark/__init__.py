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
import importlib

__version__ = "0.1.0"

# The public names and the module each comes from. They load on first use (PEP 562), so
# `import dspark` costs nothing until one is touched: the command line starts inside its own
# Ctrl-C handling, and a tool that only needs `dspark.errors` does not pay for torch.
_EXPORTS = {
    "Backend": "backends", "BackendUnavailableError": "backends", "available_backends": "backends",
    "get_backend": "backends",
    "Engine": "engine",
    "CheckpointError": "errors", "DraftMismatchError": "errors", "DSparkError": "errors",
    "NumericalError": "errors",
    "init_draft": "models", "reference_model_dir": "models",
    "CostModel": "scheduling", "analytic_cost_model": "scheduling", "device_spec": "scheduling",
    "schedule_prefix": "scheduling",
    "EngineConfig": "params", "GenerationOutput": "params", "SamplingParams": "params", "StreamEvent": "params",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value          # later lookups skip this function
        return value
    try:                                 # a subpackage used as an attribute: dspark.models.X
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["Backend", "BackendUnavailableError", "CheckpointError", "CostModel", "DSparkError", "DraftMismatchError",
           "Engine", "analytic_cost_model", "device_spec", "schedule_prefix",
           "EngineConfig", "GenerationOutput", "NumericalError", "SamplingParams", "StreamEvent",
           "available_backends", "get_backend", "init_draft", "reference_model_dir", "__version__"]
