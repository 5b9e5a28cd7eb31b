"""CPU stand-ins for the parts of torch.cuda and torch.npu that our backends call for graphs.

These are test doubles, named as such. They prove our control flow (warm-up, capture on a side
stream, one shared memory pool, replay from static buffers, NPUGraph updates), not the hardware.
A stand-in graph records every aten op run during capture (a TorchDispatchMode) and replay
re-executes the recorded ops on the *same* tensor objects, writing results into the tensors
the capture produced: the semantics of a device graph, whose kernels keep fixed addresses.

For the Ascend backend there is also a stand-in `torch_npu` (`torch_npu_module()`) whose
`npu_fused_infer_attention_score` is plain torch on the argument layout torch_npu documents
(checked: layouts, shapes, contiguity, bool mask, sparse_mode 0, at most 16 query tokens, key
lengths), registered as one op so that a stand-in NPUGraph captured with
`auto_dispatch_capture=True` keeps it as an updatable dispatch record, as torch_npu's graph
dispatch mode does: its host-side arguments are copied at capture and only
`NPUGraph.update(cpu_update_input=...)` changes them (one dict per record, or one for all;
a key the captured call did not pass is ignored).
"""
import copy
import time
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# Ops whose host-side arguments a stand-in NPUGraph can update (torch_npu registers a graph
# handler for these names): the stand-in fused attention.
UPDATABLE_OPS = ("npu_fused_infer_attention_score.default",)


class _Recorder(TorchDispatchMode):
    def __init__(self, records, dispatch_records=None):
        super().__init__()
        self.records, self.dispatch_records = records, dispatch_records

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.dispatch_records is not None and func.__name__ in UPDATABLE_OPS:
            # As torch_npu's graph dispatch mode: host-side arguments are copied at capture.
            kwargs = {k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in kwargs.items()}
            self.dispatch_records.append(kwargs)
        out = func(*args, **kwargs)
        self.records.append((func, args, kwargs, out))
        return out


def _copy_into(target, value):
    if isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor):
        if target.data_ptr() != value.data_ptr() or target.shape != value.shape:
            target.copy_(value)
    elif isinstance(target, (tuple, list)):
        for t, v in zip(target, value):
            _copy_into(t, v)


class StandInGraph:
    """CUDAGraph / NPUGraph double: capture_begin/end around recorded ops, replay, pool, update."""
    captures = 0

    def __init__(self):
        self.records, self.updates, self._recorder = [], [], None
        self.dispatch_records, self.auto_dispatch_capture = [], False

    def capture_begin(self, *args, **kwargs):
        self._recorder = _Recorder(self.records, self.dispatch_records if self.auto_dispatch_capture else None)
        self._recorder.__enter__()
        StandInGraph.captures += 1

    def capture_end(self):
        self._recorder.__exit__(None, None, None)

    @torch.no_grad()                       # a device graph replays kernels, with no autograd
    def replay(self):
        for func, args, kwargs, out in self.records:
            _copy_into(out, func(*args, **kwargs))

    def pool(self):
        return ("stand-in pool", id(self))

    def update(self, cpu_update_input):
        """NPUGraph.update: rewrite the recorded host-side arguments of the updatable ops."""
        if not self.auto_dispatch_capture:
            raise RuntimeError("The current graph configuration does not support update (stand-in)")
        if len(cpu_update_input) == 1:
            cpu_update_input = [dict(cpu_update_input[0]) for _ in self.dispatch_records]
        if len(cpu_update_input) != len(self.dispatch_records):
            raise RuntimeError(f"{len(self.dispatch_records)} captured operators to update, "
                               f"{len(cpu_update_input)} entries in cpu_update_input (stand-in)")
        for recorded, update in zip(self.dispatch_records, cpu_update_input):
            for key, value in update.items():
                if key in recorded:
                    recorded[key] = value
        self.updates.append(cpu_update_input)


class _GraphContext:
    def __init__(self, graph, pool=None, stream=None, auto_dispatch_capture=False, **_):
        self.graph, self.pool = graph, pool
        graph.auto_dispatch_capture = auto_dispatch_capture

    def __enter__(self):
        self.graph.capture_begin()
        return self

    def __exit__(self, *exc):
        self.graph.capture_end()
        return False


class _Stream:
    def __init__(self, *args, **kwargs):
        self.waited = []

    def wait_stream(self, other):
        self.waited.append(other)


class _StreamContext:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        return False


class _Event:
    """torch.cuda.Event / torch.npu.Event double: host time at record(), done at once."""

    def __init__(self, enable_timing: bool = False):
        self.recorded_at = None

    def record(self, stream=None):
        self.recorded_at = time.perf_counter()

    def query(self) -> bool:
        return self.recorded_at is not None

    def elapsed_time(self, end) -> float:
        return (end.recorded_at - self.recorded_at) * 1000.0           # milliseconds, as the real API


def device_module(graph_class_name: str):
    """A stand-in `torch.cuda` (graph_class_name="CUDAGraph") or `torch.npu` ("NPUGraph")."""
    default = _Stream()
    module = types.SimpleNamespace(
        synchronize=lambda *args, **kwargs: None,
        Stream=_Stream,
        Event=_Event,
        stream=_StreamContext,
        current_stream=lambda *args, **kwargs: default,
        graph=_GraphContext,
        is_available=lambda: True,
        device_count=lambda: 1,
        get_device_name=lambda *args, **kwargs: "stand-in (CPU)",
    )
    setattr(module, graph_class_name, StandInGraph)
    return module


class TorchWithDevice(types.ModuleType):
    """`torch`, except that `torch.cuda` / `torch.npu` is a stand-in."""

    def __init__(self, name: str, stand_in):
        super().__init__("torch")
        self._name, self._stand_in = name, stand_in

    def __getattr__(self, attribute):
        return self._stand_in if attribute == self._name else getattr(torch, attribute)


# ----------------------------------------------------------------------------- stand-in torch_npu
# The dtypes the stand-in fused attention accepts. torch_npu's kernel takes float16 / bfloat16;
# tests that compare exactly in float64 widen this together with the backend's own gate.
FUSED_ATTENTION_DTYPES = [torch.float16, torch.bfloat16]
MAX_QUERY_TOKENS = 16          # project fact: at most 16 query tokens per request in decode / verify

_LIBRARY = torch.library.Library("dspark_standin", "DEF")
_LIBRARY.define(
    "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? atten_mask=None, "
    "SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, int num_heads=1, "
    "float scale=1.0, int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout=\"BSH\", "
    "int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, bool softmax_lse_flag=False) "
    "-> (Tensor, Tensor)")


def _check(condition, message):
    if not condition:
        raise ValueError(f"stand-in npu_fused_infer_attention_score: {message}")


def _lengths(values, batch, limit, what):
    if values is None:
        return [limit] * batch
    values = list(values)
    _check(len(values) == 1 or len(values) >= batch, f"{what} has {len(values)} entries for batch {batch}")
    values = values * batch if len(values) == 1 else values[:batch]
    _check(all(0 <= int(n) <= limit for n in values), f"{what} {values} outside [0, {limit}]")
    return [int(n) for n in values]


def _fused_attention(query, key, value, *, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
                     num_heads=1, scale=1.0, pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                     num_key_value_heads=0, sparse_mode=0, inner_precise=0, softmax_lse_flag=False):
    """Plain-torch stand-in for torch_npu.npu_fused_infer_attention_score (BSND / BNSD, no
    quantisation, paging or prefix): softmax(scale * q k^T with atten_mask's True entries and
    keys past actual_seq_lengths_kv removed) v, per batch, GQA by head groups."""
    _check(input_layout in ("BSND", "BNSD"), f"input_layout {input_layout!r} (stand-in: BSND, BNSD)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check(t.dim() == 4 and t.is_contiguous(), f"{name} must be a contiguous 4-D tensor")
        _check(t.dtype in FUSED_ATTENTION_DTYPES, f"{name} dtype {t.dtype} not in {FUSED_ATTENTION_DTYPES}")
    _check(key.shape == value.shape, "key and value shapes differ")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value)) if input_layout == "BSND" else (query, key, value)
    batch, heads, queries, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    _check(k.shape[0] == batch and k.shape[3] == head_dim, "key batch / head dim differ from the query's")
    _check(heads == num_heads, f"num_heads={num_heads} but the query has {heads} heads")
    _check(kv_heads == (num_key_value_heads or num_heads), f"num_key_value_heads={num_key_value_heads} but "
                                                           f"the key has {kv_heads} heads")
    _check(heads % kv_heads == 0 and heads // kv_heads <= 64, f"{heads} heads over {kv_heads} key heads")
    _check(queries <= MAX_QUERY_TOKENS, f"{queries} query tokens per request (at most {MAX_QUERY_TOKENS})")
    _check(queries == 1 or head_dim % 16 == 0, f"head dim {head_dim} must be 16-aligned for Q_S > 1")
    _check(sparse_mode == 0, f"sparse_mode {sparse_mode} (stand-in: 0, a full mask)")
    kv_lens = torch.tensor(_lengths(actual_seq_lengths_kv, batch, keys, "actual_seq_lengths_kv"))
    q_lens = _lengths(actual_seq_lengths, batch, queries, "actual_seq_lengths")
    blocked = (torch.arange(keys).view(1, 1, 1, keys) >= kv_lens.view(batch, 1, 1, 1)).to(q.device)
    if atten_mask is not None:
        _check(atten_mask.dtype == torch.bool and atten_mask.is_contiguous(), "atten_mask must be contiguous bool")
        _check(tuple(atten_mask.shape) in ((batch, 1, queries, keys), (1, 1, queries, keys), (1, queries, keys)),
               f"atten_mask shape {tuple(atten_mask.shape)} for B={batch}, Q_S={queries}, KV_S={keys}")
        blocked = blocked | atten_mask.view(-1, 1, queries, keys)
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    group = heads // kv_heads
    k = k.to(work).repeat_interleave(group, dim=1)
    v = v.to(work).repeat_interleave(group, dim=1)
    scores = (q.to(work) @ k.transpose(-1, -2)) * scale
    out = scores.masked_fill(blocked, float("-inf")).softmax(-1) @ v                  # [B, N, S, D]
    for b, n in enumerate(q_lens):                                                      # rows past a query length
        out[b, :, n:] = 0
    out = out.to(q.dtype)
    out = out.transpose(1, 2).contiguous() if input_layout == "BSND" else out.contiguous()
    return out, torch.zeros(1, dtype=torch.float32)


_LIBRARY.impl("npu_fused_infer_attention_score", _fused_attention, "CompositeExplicitAutograd")


def torch_npu_module():
    """A stand-in `torch_npu` with the fused attention op (as one dispatcher op)."""
    op = torch.ops.dspark_standin.npu_fused_infer_attention_score
    return types.SimpleNamespace(__version__="stand-in", npu_fused_infer_attention_score=op)
