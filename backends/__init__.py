"""Hardware abstraction: one Backend class per device, a registry, and selection.

What lives here: `Backend` (device facts, synchronisation, the draft / verify /
schedule operator interface), `devices.py` (the DeviceSpec of every device class each backend
runs as: roofline facts and limits, written once), the `cpu` reference backend, the `cuda` and
`ascend` backends, and `get_backend`, which resolves a name or the
`DSPARK_BACKEND` environment variable (cpu | cuda | ascend | auto; auto prefers
ascend, then cuda, then cpu, detecting without initialising a device).

Who may import it: `dspark.models`, the engine and everything above. It
imports only `dspark.ops`, `dspark.errors` and `dspark.files` (the cache directory). Device
packages (torch_npu, triton) are imported inside the backend that needs them, when it is
constructed.
"""
import os
from typing import Union

from ..errors import ConfigError
from .ascend import AscendBackend
from .base import Backend, BackendUnavailableError
from .cpu import CPUBackend
from .cuda import CUDABackend

BACKENDS: dict[str, type[Backend]] = {"cpu": CPUBackend, "cuda": CUDABackend, "ascend": AscendBackend}
AUTO_ORDER = ("ascend", "cuda", "cpu")
ENV_VAR = "DSPARK_BACKEND"


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in `auto` preference order."""
    return [name for name in AUTO_ORDER if BACKENDS[name].is_available()]


def get_backend(name: Union[str, Backend, None] = None) -> Backend:
    """Construct a backend from a name, the DSPARK_BACKEND variable, or `auto`."""
    if isinstance(name, Backend):
        return name
    source = "argument"
    if name is None:
        name, source = os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}"
    key = name.strip().lower()
    if key == "auto":
        return BACKENDS[available_backends()[0]]()
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (from {source}); valid: {', '.join(list(BACKENDS) + ['auto'])}")
    return BACKENDS[key]()


__all__ = ["AscendBackend", "BACKENDS", "Backend", "BackendUnavailableError", "CPUBackend", "CUDABackend",
           "available_backends", "get_backend"]
