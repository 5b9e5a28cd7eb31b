"""The CUDA backend (NVIDIA GPUs): eager kernels, and each fixed-shape verify step captured
once per token bucket as a CUDA graph and replayed with new buffer contents.

Optional Triton kernels (backends/triton_kernels.py) replace the reference verification and the
draft's temperature-sampling step when triton is installed and the device is CUDA; triton is
imported lazily, on the first call that could use it, never at import. Top-k / top-p draft
sampling, and any call without host-known sampling hints, run the reference ops. The control
flow runs in CI through CPU stand-ins; see docs/CONFORMANCE.md for runs on real GPUs.
"""
import importlib
import importlib.util
from typing import Optional

import torch

from .. import ops
from .base import Backend, BackendUnavailableError, EventTimer


class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    default_dtype = torch.bfloat16
    supports_graphs = True
    collective_backend = "nccl"
    device_specs = ("a100", "h100", "h200")
    # Use the Triton kernels when triton is importable and the device is CUDA.
    use_triton = True

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

    def memory_limit(self):
        query = getattr(torch.cuda, "mem_get_info", None)     # absent from older releases (and the CPU stand-ins)
        return int(query(self.device)[0]) if query is not None else None

    def step_timer(self) -> EventTimer:
        """CUDA events on the current stream (read after the round's own sync, never waited on)."""
        return EventTimer(lambda: torch.cuda.Event(enable_timing=True))

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

    # --- optional Triton kernels ---
    @property
    def triton_kernels(self):
        """The Triton kernel module, or None (disabled, not a CUDA device, triton missing); the
        reason is kept in `triton_reason`. Imported once, on first use."""
        if not hasattr(self, "_triton_kernels"):
            self._triton_kernels, self.triton_reason = None, None
            if not self.use_triton:
                self.triton_reason = "disabled (use_triton = False)"
            elif self.device.type != "cuda":
                self.triton_reason = f"device {self.device} is not CUDA"
            elif importlib.util.find_spec("triton") is None:
                self.triton_reason = "triton is not installed (pip install 'dspark[cuda]')"
            else:
                try:
                    self._triton_kernels = importlib.import_module(".triton_kernels", __package__)
                except Exception as exc:  # a broken triton install must not break the backend
                    self.triton_reason = f"importing triton failed: {exc}"
        return self._triton_kernels

    def verify(self, draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms, sample_uniforms):
        kernels = self.triton_kernels
        if kernels is None:
            return super().verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms,
                                  sample_uniforms)
        tokens, accepted = kernels.verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms,
                                          sample_uniforms)
        return ops.VerifyResult(output_tokens=tokens, num_accepted=accepted, num_emitted=accepted + 1)

    def draft(self, base_logits, anchor_ids, uniforms, temperature, top_k, top_p, transition=None, token_ids=None,
              **hints):
        kernels = self.triton_kernels
        # The kernel samples with temperature only; top-k / top-p (or unknown hints) take the reference.
        if kernels is None or hints.get("filtered") is not False:
            return super().draft(base_logits, anchor_ids, uniforms, temperature, top_k, top_p, transition, token_ids,
                                 **hints)
        return kernels.sample_draft_block(base_logits, anchor_ids, uniforms, temperature, transition, token_ids)

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
        info["triton_kernels"] = self.triton_kernels is not None
        if self.triton_reason:
            info["triton_reason"] = self.triton_reason
        return info
