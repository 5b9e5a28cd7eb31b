"""CPU stand-ins for the parts of torch.cuda and torch.npu that our backends call for graphs.

These are test doubles, named as such. They prove our control flow (warm-up, capture on a side
stream, one shared memory pool, replay from static buffers, NPUGraph updates), not the hardware.
A stand-in graph records every aten op run during capture (a TorchDispatchMode) and replay
re-executes the recorded ops on the *same* tensor objects, writing results into the tensors
the capture produced: the semantics of a device graph, whose kernels keep fixed addresses.
"""
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Recorder(TorchDispatchMode):
    def __init__(self, records):
        super().__init__()
        self.records = records

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
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

    def capture_begin(self, *args, **kwargs):
        self._recorder = _Recorder(self.records)
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


def device_module(graph_class_name: str):
    """A stand-in `torch.cuda` (graph_class_name="CUDAGraph") or `torch.npu` ("NPUGraph")."""
    default = _Stream()
    module = types.SimpleNamespace(
        synchronize=lambda *args, **kwargs: None,
        Stream=_Stream,
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
