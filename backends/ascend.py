"""The Ascend NPU backend (torch_npu): eager kernels, and each fixed-shape verify step captured
once per token bucket as an ACL graph (torch.npu.NPUGraph) and replayed. Not yet run on an NPU
(see docs/CONFORMANCE.md); the fused-attention kernel with per-replay sequence-length updates
is still to come.

torch_npu is imported only when this backend is constructed, never at module
import: on a machine without Ascend's CANN toolkit merely importing it breaks
`import torch`. Detection looks for the package and the toolkit without
importing anything. Device facts: fused attention takes at most 16 query
tokens per request (so gamma + 1 <= 16), ACL graphs need captured sequence
lengths updated before each replay (the backends issue adds graph mode).
"""
import importlib
import importlib.util
import os
from typing import Optional

import torch

from .base import Backend, BackendUnavailableError

_TOOLKIT_ENV = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH")
_TOOLKIT_DIRS = ("/usr/local/Ascend/ascend-toolkit", "/usr/local/Ascend/cann")


class AscendBackend(Backend):
    name = "ascend"
    device_type = "npu"
    default_dtype = torch.bfloat16
    supports_graphs = True
    collective_backend = "hccl"
    max_query_tokens_per_request = 16

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if importlib.util.find_spec("torch_npu") is None:
            return "the torch_npu package is not installed (pip install 'dspark[ascend]' on a machine with CANN)"
        if not any(os.environ.get(v) for v in _TOOLKIT_ENV) and not any(os.path.isdir(d) for d in _TOOLKIT_DIRS):
            return ("Ascend's CANN toolkit was not found (source /usr/local/Ascend/ascend-toolkit/set_env.sh, "
                    "or set ASCEND_TOOLKIT_HOME)")
        if not any(name.startswith("davinci") for name in _dev_entries()):
            return "no Ascend NPU device (/dev/davinci*) is visible"
        return None

    def __init__(self, device_index: int = 0):
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"backend 'ascend' is unavailable: {reason}")
        try:
            self.torch_npu = importlib.import_module("torch_npu")
        except Exception as exc:  # a broken toolkit raises many kinds of errors
            raise BackendUnavailableError(f"backend 'ascend': importing torch_npu failed: {exc}") from exc
        if not torch.npu.is_available():
            raise BackendUnavailableError("backend 'ascend': torch_npu imported but reports no usable NPU")
        super().__init__(device_index)

    def synchronize(self) -> None:
        torch.npu.synchronize(self.device)

    @property
    def supports_graph_updates(self) -> bool:
        """NPUGraph.update (per-replay sequence lengths for fused attention) exists only in newer
        torch_npu releases; without it each sequence-length pattern would need its own capture."""
        return hasattr(torch.npu, "NPUGraph") and hasattr(torch.npu.NPUGraph, "update")

    def graph_capture(self, fn):
        """ACL graph per fixed-shape step. torch.npu.graph captures on its own non-default stream
        (required on Ascend); auto_dispatch_capture records the ops whose host-side arguments
        (sequence lengths) `NPUGraph.update` can rewrite before a replay."""
        torch.npu.synchronize(self.device)
        fn()                                                    # warm-up outside the capture
        torch.npu.synchronize(self.device)
        graph = torch.npu.NPUGraph()
        with torch.npu.graph(graph, pool=getattr(self, "_graph_pool", None),
                             auto_dispatch_capture=self.supports_graph_updates):
            outputs = fn()
        self._graph_pool = graph.pool()
        return graph, outputs

    def graph_replay(self, handle, updates=None) -> None:
        """Replay; `updates` (a list of per-op dicts, e.g. actual sequence lengths) are pushed
        into the captured graph first when this torch_npu supports it."""
        if updates:
            if not self.supports_graph_updates:
                raise BackendUnavailableError("this torch_npu has no NPUGraph.update; upgrade torch_npu or "
                                              "run with graphs=False")
            handle.update(cpu_update_input=updates)
        handle.replay()

    def device_prior(self) -> str:
        return "ascend-910c" if "910c" in torch.npu.get_device_name(self.device).lower() else "ascend-910b"


def _dev_entries() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:
        return []
