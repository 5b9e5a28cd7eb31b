"""The CUDA and Ascend backends' graph code, run on the CPU through stand-ins of their device APIs.

This proves our control flow (capture per bucket touching only the scratch slot, replay from
static buffers, the shared memory pool, NPUGraph updates), not the hardware: docs/CONFORMANCE.md
keeps the record of real-device runs."""
import pytest
import torch

import dspark
import dspark.backends.ascend as ascend_module
import dspark.backends.cuda as cuda_module
from graph_standins import StandInGraph, TorchWithDevice, device_module, torch_npu_module
from test_engine_greedy import GREEDY, ragged_prompts


def stand_in_backend(monkeypatch, module, cls, device_name, graph_class):
    """The real backend class, on the CPU, with its device module replaced by the stand-in."""
    monkeypatch.setattr(module, "torch", TorchWithDevice(device_name, device_module(graph_class)))

    class StandIn(cls):
        device_type = "cpu"
        default_dtype = torch.float32

        @classmethod
        def unavailable_reason(cls):
            return None

        def __init__(self):
            dspark.backends.Backend.__init__(self)
            if cls is ascend_module.AscendBackend:           # what AscendBackend.__init__ sets after the import
                self.torch_npu = torch_npu_module()
                self._setup_attention("auto")

    return StandIn()


@pytest.mark.parametrize("which", ["cuda", "ascend"])
def test_backend_graph_code_replays_like_eager(monkeypatch, bigram_qwen3, which):
    if which == "cuda":
        backend = stand_in_backend(monkeypatch, cuda_module, cuda_module.CUDABackend, "cuda", "CUDAGraph")
    else:
        backend = stand_in_backend(monkeypatch, ascend_module, ascend_module.AscendBackend, "npu", "NPUGraph")
    assert backend.supports_graphs
    target, draft = bigram_qwen3
    prompts = ragged_prompts(6, seed=12)
    eager = dspark.Engine.from_pretrained(target, draft=draft, backend="cpu", dtype="float64", max_batch_size=3,
                                          max_model_len=128).generate(prompts, GREEDY)
    before = StandInGraph.captures
    engine = dspark.Engine.from_pretrained(target, draft=draft, backend=backend, dtype="float64", max_batch_size=3,
                                           max_model_len=128)
    assert engine.use_graphs and engine.static                  # graphs are on by default for this backend
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in eager]
    graphs = [getattr(handle, "graph", handle) for _, handle, _ in engine.captured_graphs.values()]
    assert StandInGraph.captures - before == len(graphs) >= 2   # one capture per bucket, then replays only
    assert all(isinstance(g, StandInGraph) and g.records for g in graphs)


def test_ascend_graph_without_fused_calls_replays_without_updates(monkeypatch):
    backend = stand_in_backend(monkeypatch, ascend_module, ascend_module.AscendBackend, "npu", "NPUGraph")
    buffer = torch.arange(4.0)
    handle, out = backend.graph_capture(lambda: buffer * 2)
    buffer.copy_(torch.tensor([5.0, 6.0, 7.0, 8.0]))
    backend.graph_replay(handle)
    assert out.tolist() == [10.0, 12.0, 14.0, 16.0]              # replay recomputed from the buffer
    assert handle.graph.auto_dispatch_capture and handle.length_sources == [] and handle.graph.updates == []
    monkeypatch.delattr(StandInGraph, "update")                  # an older torch_npu without NPUGraph.update
    assert not backend.supports_graph_updates
    handle, out = backend.graph_capture(lambda: buffer * 3)
    assert not handle.graph.auto_dispatch_capture
