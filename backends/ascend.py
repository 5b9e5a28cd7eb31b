"""The Ascend NPU backend (torch_npu): fused attention, and each fixed-shape verify step captured
once per token bucket as an ACL graph (torch.npu.NPUGraph) whose sequence lengths are updated
before every replay. Its control flow runs in CI through CPU stand-ins (tests/graph_standins.py);
it has not yet run on an NPU (see docs/CONFORMANCE.md).

torch_npu is imported only when this backend is constructed, never at module import: on a
machine without Ascend's CANN toolkit merely importing it breaks `import torch`. Detection looks
for the package and the toolkit without importing anything.

Attention. Decode / verify / prefill attention goes through
`torch_npu.npu_fused_infer_attention_score` in the BNSD layout: the models hand the backend
padded per-request blocks (query [R, H, Q, D], keys [R, KVH, K, D] straight from the head-major
per-slot KV cache; contiguous, so no copy, in the static step, which reads every slot's whole
length), and the output comes back as [R, H, Q, D]. The model's
boolean mask goes in inverted (`atten_mask`, True = masked, sparse_mode 0, shape [R, 1, Q, K]),
so the kernel computes exactly the reference's masked softmax; `actual_seq_lengths_kv` carries the
step's host-side per-request key bound (StepBatch.kv_lens = start + query width), so the kernel
stops reading the cache there. `actual_seq_lengths` (query) is not passed: per-request query
lengths live on the device (the budget schedule chooses them there), padded queries are computed
and dropped. TND was not chosen: it needs the keys flattened too (our cache is per slot), and the
aclnn TND path is restricted to N in {8..128} with D = 192 at bfloat16. A call the kernel cannot
take (float32 / float64, more than 16 query tokens per request, head dim not 16-aligned, a GQA
ratio over 64, autograd: the kernel has no backward, so draft training takes the reference) runs
the reference SDPA instead and is counted in `describe()`;
`AscendBackend(fused_attention=True)` makes that an `UnsupportedOperationError` naming the
constraint, `fused_attention=False` never uses the kernel.

Graphs. ACL graphs are captured on torch.npu.graph's own non-default stream, sharing one memory
pool. With `auto_dispatch_capture=True` torch_npu records every fused-attention call of the step;
`NPUGraph.update(cpu_update_input=[{"actual_seq_lengths_kv": [...]}, ...])` (one dict per recorded
call, in order) rewrites their host-side lengths before a replay. The backend remembers, per
captured call, which host list (the static buffers' `kv_lens`) it read, and pushes that list's
current contents before each replay. On a torch_npu without NPUGraph.update
(`supports_graph_updates` is False) the calls are captured without lengths: still exact, only
slower (each replay reads the whole cache).

Limits: gamma + 1 <= 16 query tokens per request (`max_query_tokens_per_request`; the engine's
static step also spreads its filler over rows of at most that width). Not routed to torch_npu:
`npu_rms_norm` and `npu_rotary_mul` (the norm and RoPE are module code shared by every model and
the training stack, with float32 normalisation the reference pins; see docs/CONFORMANCE.md).
"""
import importlib
import importlib.util
import os
from typing import Optional

import torch

from .base import Backend, BackendUnavailableError, EventTimer
from .devices import query_limit

_TOOLKIT_ENV = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH")
_TOOLKIT_DIRS = ("/usr/local/Ascend/ascend-toolkit", "/usr/local/Ascend/cann")
FUSED_ATTENTION = "npu_fused_infer_attention_score"
# The graph-update key that torch_npu's handler for the fused op rewrites in a captured call.
KV_LENGTHS_KEY = "actual_seq_lengths_kv"


class UnsupportedOperationError(RuntimeError):
    """The Ascend kernel cannot take this call (and the backend was told not to fall back)."""


class AscendGraph:
    """A captured ACL graph plus, per fused-attention call it recorded (in capture order), the
    host list that call's key lengths were read from and the key length K they are clamped to."""

    def __init__(self, graph, length_sources: list):
        self.graph, self.length_sources = graph, length_sources

    def updates(self) -> list:
        """`cpu_update_input` for NPUGraph.update: the current contents of every source list."""
        return [{} if source is None else {KV_LENGTHS_KEY: [min(int(n), keys) for n in source]}
                for source, keys in self.length_sources]

    def replay(self) -> None:
        self.graph.replay()


class AscendBackend(Backend):
    name = "ascend"
    device_type = "npu"
    default_dtype = torch.bfloat16
    supports_graphs = True
    collective_backend = "hccl"
    device_specs = ("ascend-910b", "ascend-910c")
    max_query_tokens_per_request = query_limit(*device_specs)     # fused attention: 16
    # What the fused kernel takes (torch_npu's documentation of npu_fused_infer_attention_score).
    fused_attention_dtypes = (torch.float16, torch.bfloat16)
    fused_max_heads, fused_max_group, fused_max_head_dim, fused_head_dim_align = 256, 64, 512, 16

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

    def __init__(self, device_index: int = 0, fused_attention="auto"):
        """fused_attention: "auto" (the kernel where it fits, else the reference attention),
        True (the kernel or UnsupportedOperationError), False (never the kernel)."""
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
        self._setup_attention(fused_attention)

    def _setup_attention(self, fused_attention) -> None:
        """Attention state; split from __init__ so the CPU stand-in tests construct the same state."""
        if fused_attention not in ("auto", True, False):
            raise ValueError(f"fused_attention must be 'auto', True or False, got {fused_attention!r}")
        if fused_attention is True and not hasattr(self.torch_npu, FUSED_ATTENTION):
            raise UnsupportedOperationError(f"this torch_npu ({getattr(self.torch_npu, '__version__', '?')}) has no "
                                            f"{FUSED_ATTENTION}; upgrade torch_npu or use fused_attention='auto'")
        self.fused_attention = fused_attention
        self.attention_calls = {"fused": 0}       # reference fallbacks are counted under their reason
        self._capture: Optional[list] = None      # length sources of the graph being captured

    def synchronize(self) -> None:
        torch.npu.synchronize(self.device)

    def step_timer(self) -> EventTimer:
        """NPU events on the current stream (read after the round's own sync, never waited on)."""
        return EventTimer(lambda: torch.npu.Event(enable_timing=True))

    def memory_limit(self):
        query = getattr(torch.npu, "mem_get_info", None)     # absent from older releases (and the CPU stand-ins)
        return int(query(self.device)[0]) if query is not None else None

    @property
    def supports_graph_updates(self) -> bool:
        """NPUGraph.update (per-replay sequence lengths for fused attention) exists only in newer
        torch_npu releases; without it graphs are captured without key lengths."""
        return hasattr(torch.npu, "NPUGraph") and hasattr(torch.npu.NPUGraph, "update")

    # ------------------------------------------------------------------ attention
    def fused_attention_rejection(self, query, key, value, mask) -> Optional[str]:
        """None when npu_fused_infer_attention_score can take this call, else why not."""
        if self.fused_attention is False:
            return "fused attention disabled"
        if not hasattr(self.torch_npu, FUSED_ATTENTION):
            return f"torch_npu has no {FUSED_ATTENTION}"
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            return "autograd (the kernel is inference-only; training takes the reference)"
        rows, heads, queries, head_dim = query.shape
        kv_heads = key.shape[1]
        if query.dtype not in self.fused_attention_dtypes or key.dtype != query.dtype:
            return f"dtype {str(query.dtype).replace('torch.', '')} (the kernel takes float16 / bfloat16)"
        if queries > self.max_query_tokens_per_request:
            return f"{queries} query tokens per request (the kernel takes at most {self.max_query_tokens_per_request})"
        if heads > self.fused_max_heads or heads % kv_heads or heads // kv_heads > self.fused_max_group:
            return f"{heads} query heads over {kv_heads} key heads"
        if head_dim > self.fused_max_head_dim or (queries > 1 and head_dim % self.fused_head_dim_align):
            return f"head dim {head_dim} (at most {self.fused_max_head_dim}, a multiple of {self.fused_head_dim_align})"
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
            return f"mask {tuple(mask.shape)} {mask.dtype} (the kernel takes a bool [R, 1, Q, K] mask)"
        return None

    def attention(self, query, key, value, mask, scale, kv_lens=None):
        reason = self.fused_attention_rejection(query, key, value, mask)
        if reason is not None:
            if self.fused_attention is True:
                raise UnsupportedOperationError(f"backend 'ascend': {FUSED_ATTENTION} cannot take this attention "
                                                f"call: {reason}; use AscendBackend(fused_attention='auto') to run "
                                                "the reference attention for it")
            self.attention_calls[reason] = self.attention_calls.get(reason, 0) + 1
            return super().attention(query, key, value, mask, scale, kv_lens)
        rows, heads, queries, _ = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        # Lengths baked into a graph that cannot update them would be stale at the next replay.
        if self._capture is not None and not self.supports_graph_updates:
            kv_lens = None
        lengths = None if kv_lens is None else [min(int(n), keys) for n in kv_lens]
        if self._capture is not None:
            self._capture.append((None if lengths is None else kv_lens, keys))
        blocked = (~mask).expand(rows, 1, queries, keys).contiguous()          # True = masked for the kernel
        out, _ = getattr(self.torch_npu, FUSED_ATTENTION)(
            query.contiguous(), key.contiguous(), value.contiguous(),
            atten_mask=blocked, actual_seq_lengths_kv=lengths, num_heads=heads, num_key_value_heads=kv_heads,
            scale=scale, input_layout="BNSD", sparse_mode=0)
        self.attention_calls["fused"] += 1
        return out                                                               # [R, H, Q, D]

    # ------------------------------------------------------------------ graphs
    def graph_capture(self, fn):
        """ACL graph per fixed-shape step. torch.npu.graph captures on its own non-default stream
        (required on Ascend); auto_dispatch_capture records the fused-attention calls whose
        host-side key lengths `graph_replay` rewrites through NPUGraph.update."""
        torch.npu.synchronize(self.device)
        fn()                                                    # warm-up outside the capture
        torch.npu.synchronize(self.device)
        graph = torch.npu.NPUGraph()
        self._capture = []
        try:
            with torch.npu.graph(graph, pool=getattr(self, "_graph_pool", None),
                                 auto_dispatch_capture=self.supports_graph_updates):
                outputs = fn()
            sources = self._capture
        finally:
            self._capture = None
        self._graph_pool = graph.pool()
        return AscendGraph(graph, sources if self.supports_graph_updates else []), outputs

    def graph_replay(self, handle: AscendGraph) -> None:
        """Push the current key lengths of every captured fused-attention call, then replay."""
        if any(source is not None for source, _ in handle.length_sources):
            handle.graph.update(cpu_update_input=handle.updates())
        handle.replay()

    # ------------------------------------------------------------------ reporting
    def device_prior(self) -> str:
        return "ascend-910c" if "910c" in torch.npu.get_device_name(self.device).lower() else "ascend-910b"

    def describe(self) -> dict:
        info = super().describe()
        info["fused_attention"] = self.fused_attention
        info["graph_updates"] = self.supports_graph_updates
        info["attention_calls"] = dict(self.attention_calls)
        return info


def _dev_entries() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:
        return []
