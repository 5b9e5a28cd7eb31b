"""The trainer's resumable state in a format that cannot run code when loaded.

A checkpoint directory holds the draft (config.json + model.safetensors) and a
`trainer_state/` folder with `state.json` + `optimizer.safetensors`: the optimiser's tensors (AdamW moments,
step counts) by name in safetensors, everything else (step, param groups, the LR schedule's
counters, the run's settings) as JSON. Nothing is unpickled: a crafted file can at worst fail
to parse, and that failure names the file.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import DataError
from ..files import atomic_output, write_text_atomic

STATE_DIR = "trainer_state"        # a folder of its own: the draft loader reads every *.safetensors beside it
STATE_FILE = f"{STATE_DIR}/state.json"
TENSOR_FILE = f"{STATE_DIR}/optimizer.safetensors"
FORMAT = 1


def _jsonable(value):
    """Scheduler / param-group values as JSON (tensors and tuples become lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None                 # callables (LambdaLR's lambdas) are rebuilt by the trainer, not stored


def save_trainer_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler, step: int, config: dict) -> None:
    state = optimizer.state_dict()
    (Path(directory) / STATE_DIR).mkdir(exist_ok=True)
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    with atomic_output(Path(directory) / TENSOR_FILE) as temporary:
        save_file(tensors, str(temporary))
    record = {"format": FORMAT, "step": int(step), "param_groups": _jsonable(state["param_groups"]),
              "optimizer_scalars": _jsonable(scalars), "scheduler": _jsonable(scheduler.state_dict()),
              "config": _jsonable(config)}
    write_text_atomic(Path(directory) / STATE_FILE, json.dumps(record, indent=1) + "\n")


def load_trainer_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Restore the optimiser and the LR schedule; returns the step. Errors name the file: a
    damaged or hand-edited state is one DataError that suggests --fresh, never a traceback."""
    directory = Path(directory)
    try:
        record, tensors = _read_state(directory)
        entries, groups, schedule, step = _parse_state(record, tensors)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, ValueError, TypeError, KeyError,
            AttributeError) as exc:
        raise DataError(f"the trainer state in {directory} is damaged or unreadable ({exc}); "
                        "start over with --fresh") from None
    try:
        optimizer.load_state_dict({"state": entries, "param_groups": groups})
        scheduler.load_state_dict({**scheduler.state_dict(), **schedule})
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"the trainer state in {directory} does not fit this draft ({exc}); start over with --fresh") \
            from None
    return step


def _read_state(directory: Path) -> tuple:
    path = directory / STATE_FILE
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"not a trainer state of format {FORMAT}")
    missing = [k for k in ("step", "param_groups", "optimizer_scalars", "scheduler") if k not in record]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return record, load_file(str(directory / TENSOR_FILE))


def _parse_state(record: dict, tensors: dict) -> tuple:
    """state.json + the tensors -> (optimizer entries by parameter index, param groups,
    scheduler state, step). Raises ValueError / TypeError / KeyError on anything malformed."""
    entries: dict = {}
    for key, value in list(tensors.items()) + list(record["optimizer_scalars"].items()):
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    groups = record["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise ValueError("param_groups is not a list of mappings")
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    schedule = {k: v for k, v in record["scheduler"].items() if k != "lr_lambdas"}
    step = record["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step {step!r} is not a non-negative integer")
    return entries, groups, schedule, step
