"""The CUDA backend (NVIDIA GPUs): eager kernels, and each fixed-shape verify step captured
once per token bucket as a CUDA graph and replayed with new buffer contents.

Not yet run on a GPU (see docs/CONFORMANCE.md). Triton kernels arrive with the backends
issue; `triton` will be imported lazily inside them only.
"""
from typing import Optional

import torch

from .base import Backend, BackendUnavailableError


class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    default_dtype = torch.bfloat16
    supports_graphs = True
    collective_backend = "nccl"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if torch.version.cuda is None:
            return (f"this PyTorch build ({torch.__version__}) has no CUDA support; "
                    "install a CUDA build of torch or choose DSPARK_BACKEND=cpu")
        # device_count() asks the driver without creating a context.
        if torch.cuda.device_count() == 0:
            return "no NVIDIA GPU is visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)"
        return None

    def __init__(self, device_index: int = 0):
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"backend 'cuda' is unavailable: {reason}")
        super().__init__(device_index)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def graph_capture(self, fn):
        """CUDA graph per fixed-shape step: warm up on a side stream, capture into a memory pool
        shared by every bucket, return (graph, the captured step's output tensors)."""
        torch.cuda.synchronize(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=getattr(self, "_graph_pool", None)):
            outputs = fn()
        self._graph_pool = graph.pool()
        return graph, outputs

    def graph_replay(self, handle) -> None:
        handle.replay()

    def device_prior(self) -> str:
        name = torch.cuda.get_device_name(self.device).lower()
        for key in ("h200", "h100", "a100"):
            if key in name:
                return key
        return "h100"

    def describe(self) -> dict:
        info = super().describe()
        info["device_name"] = torch.cuda.get_device_name(self.device)
        info["cuda"] = torch.version.cuda
        return info
