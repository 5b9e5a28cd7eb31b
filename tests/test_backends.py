"""Backend selection through DSPARK_BACKEND, detection without device initialisation, clear errors."""
import json
import subprocess
import sys

import pytest
import torch

import dspark
from dspark.backends import BACKENDS, AscendBackend, BackendUnavailableError, CUDABackend, get_backend


def test_cpu_is_always_available_and_auto_falls_back_to_it(monkeypatch):
    assert "cpu" in dspark.available_backends()
    assert dspark.available_backends()[-1] == "cpu"
    monkeypatch.setenv("DSPARK_BACKEND", "auto")
    assert get_backend().name == dspark.available_backends()[0]
    monkeypatch.setenv("DSPARK_BACKEND", "CPU")
    assert get_backend().name == "cpu"


def test_unknown_backend_lists_the_valid_names(monkeypatch):
    monkeypatch.setenv("DSPARK_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"unknown backend 'tpu' \(from \$DSPARK_BACKEND\); valid: cpu, cuda, ascend, auto"):
        get_backend()


@pytest.mark.skipif(CUDABackend.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_clearly(monkeypatch, qwen3_target):
    monkeypatch.setenv("DSPARK_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable: .*(CUDA|GPU)"):
        dspark.Engine.from_pretrained(qwen3_target)


@pytest.mark.skipif(AscendBackend.is_available(), reason="this machine has an NPU")
def test_ascend_without_torch_npu_fails_clearly():
    with pytest.raises(BackendUnavailableError, match="backend 'ascend' is unavailable: .*torch_npu|CANN|NPU"):
        get_backend("ascend")


def test_auto_prefers_ascend_then_cuda(monkeypatch):
    monkeypatch.setattr(AscendBackend, "unavailable_reason", classmethod(lambda cls: None))
    assert dspark.available_backends()[0] == "ascend"
    monkeypatch.setattr(AscendBackend, "unavailable_reason", classmethod(lambda cls: "absent"))
    monkeypatch.setattr(CUDABackend, "unavailable_reason", classmethod(lambda cls: None))
    assert dspark.available_backends()[:2] == ["cuda", "cpu"]


def test_importing_dspark_loads_no_device_package():
    code = ("import sys, dspark; dspark.available_backends(); "
            "print(','.join(m for m in ('torch_npu', 'triton') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_engine_reports_its_backend(qwen3_target):
    engine = dspark.Engine.from_pretrained(qwen3_target, backend="cpu")
    assert engine.backend.name == "cpu" and engine.backend.device == torch.device("cpu")
    assert set(BACKENDS) == {"cpu", "cuda", "ascend"}
    assert AscendBackend.max_query_tokens_per_request == 16


def test_the_backends_query_limit_caps_verify_lengths(bigram_qwen3):
    """Device facts reach the scheduler through the backend (Ascend: gamma + 1 <= 16)."""
    class NarrowCPU(dspark.backends.CPUBackend):
        max_query_tokens_per_request = 3

    target, draft = bigram_qwen3
    assert NarrowCPU().max_verify_len(7) == 2
    engine = dspark.Engine.from_pretrained(target, draft=draft, backend=NarrowCPU())
    [output] = engine.generate([[1, 2, 3]], dspark.SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert max(output.stats["verify_lens"]) == 2
    plain = dspark.Engine.from_pretrained(target).generate([[1, 2, 3]],
                                                            dspark.SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert output.token_ids == plain[0].token_ids


def test_each_backend_carries_its_device_specs_and_takes_its_limits_from_them():
    from dspark.backends import BACKENDS
    from dspark.backends.devices import DEVICE_SPECS
    from dspark.scheduling import cost_model

    assert cost_model.DeviceSpec is DEVICE_SPECS["cpu"].__class__          # one definition, re-exported
    for cls in BACKENDS.values():
        assert cls.device_specs and all(name in DEVICE_SPECS for name in cls.device_specs)
        for name in cls.device_specs:
            assert DEVICE_SPECS[name].max_query_tokens_per_request == cls.max_query_tokens_per_request
    assert BACKENDS["cpu"]().device_prior() in BACKENDS["cpu"].device_specs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("choice", ["mkl", "onednn", "auto"])
def test_cpu_inference_linear_matches_f_linear_with_every_kernel_choice(bias, choice, monkeypatch):
    """Frozen linears run through MKL or oneDNN's packed weight for 1-3 rows (as chosen) and
    through oneDNN from 4 rows: every path must give F.linear's result, in float64 terms."""
    from dspark.backends import cpu
    from dspark.models.layers import Linear, prepare_for_inference

    monkeypatch.setenv(cpu.LINEAR_ENV, choice)
    cpu.mkl_rows.cache_clear()
    try:
        gen = torch.Generator().manual_seed(7)
        layer = Linear(96, 80, bias=bias)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(80, 96, generator=gen))
            if bias:
                layer.bias.copy_(torch.randn(80, generator=gen))
        prepare_for_inference(layer, get_backend("cpu"))
        assert layer.kernel is not None or not torch.backends.mkldnn.is_available()
        expected_rows = {"mkl": {1, 2, 3}, "onednn": set()}
        assert cpu.mkl_rows() == expected_rows[choice] if choice in expected_rows else cpu.mkl_rows() <= {1, 2, 3}
        for rows in range(1, 7):
            x = torch.randn(rows, 96, generator=gen)
            with torch.no_grad():
                out = layer(x)
            expected = torch.nn.functional.linear(x.double(), layer.weight.double(),
                                                  None if layer.bias is None else layer.bias.double())
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    finally:
        cpu.mkl_rows.cache_clear()


@pytest.mark.parametrize("choice", ["mkl", "onednn"])
def test_cpu_linear_group_runs_fused_and_matches_each_linear(choice, monkeypatch):
    """Linears a module lists in `linear_groups` run as one kernel over their concatenated
    weights at inference (a bias None counting as zeros), and give each Linear's own product;
    with a gradient wanted, or once a weight changed, each Linear runs on its own again."""
    from dspark.backends import cpu
    from dspark.models.layers import Linear, linear_group, prepare_for_inference

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")

    class Projections(torch.nn.Module):
        linear_groups = (("a", "b", "c"),)

        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = Linear(48, 40, bias=True), Linear(48, 24), Linear(48, 8, bias=True)

    monkeypatch.setenv(cpu.LINEAR_ENV, choice)
    cpu.mkl_rows.cache_clear()
    try:
        gen = torch.Generator().manual_seed(11)
        module = Projections()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
                p.requires_grad_(False)
        prepare_for_inference(module, get_backend("cpu"))
        assert set(module.group_kernels) == {("a", "b", "c")}
        assert all(m.kernel is None for m in (module.a, module.b, module.c))   # the group's kernel only

        def expected(x):
            return [torch.nn.functional.linear(x.double(), m.weight.double(),
                                               None if m.bias is None else m.bias.double())
                    for m in (module.a, module.b, module.c)]

        for rows in (1, 2, 5, 9):
            x = torch.randn(3, rows, 48, generator=gen)
            with torch.no_grad():
                outs = linear_group(module, ("a", "b", "c"), x)
            assert [o.shape for o in outs] == [(3, rows, 40), (3, rows, 24), (3, rows, 8)]
            for out, ref in zip(outs, expected(x)):
                torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)

        calls = []
        fn, identity, sizes = module.group_kernels[("a", "b", "c")]
        module.group_kernels[("a", "b", "c")] = (lambda x: calls.append(1) or fn(x), identity, sizes)
        x = torch.randn(4, 48, generator=gen, requires_grad=True)
        outs = linear_group(module, ("a", "b", "c"), x)                    # autograd wanted: unfused
        assert not calls and all(o.requires_grad for o in outs)
        with torch.no_grad():
            linear_group(module, ("a", "b", "c"), x)
            assert calls == [1]
            module.b.weight.mul_(2.0)                                       # a changed weight: dropped
            outs = linear_group(module, ("a", "b", "c"), x)
        assert calls == [1] and ("a", "b", "c") not in module.group_kernels
        for out, ref in zip(outs, expected(x)):
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    finally:
        cpu.mkl_rows.cache_clear()


def test_cpu_linear_choice_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    """auto: the first process on a machine times both kernels and caches the faster per row count
    under the machine's key; later processes read it; a corrupt cache is measured and rewritten."""
    from dspark.backends import cpu

    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu.LINEAR_ENV, "auto")
    timings = {1: (5.0, 7.0), 2: (9.0, 6.0), 3: (9.5, 6.5)}         # MKL faster at 1 row only
    calls = []
    monkeypatch.setattr(cpu, "time_linear_kernels", lambda: calls.append(1) or timings)
    try:
        cpu.mkl_rows.cache_clear()
        assert cpu.mkl_rows() == {1} and len(calls) == 1
        cached = json.loads((tmp_path / cpu.TUNING_FILE).read_text())
        (entry,) = cached.values()
        assert entry["mkl_rows"] == [1] and entry["ms"]["2"] == [9.0, 6.0]
        cpu.mkl_rows.cache_clear()                                    # a new process: read, not measured
        assert cpu.mkl_rows() == {1} and len(calls) == 1
        (tmp_path / cpu.TUNING_FILE).write_text("{not json")
        cpu.mkl_rows.cache_clear()
        assert cpu.mkl_rows() == {1} and len(calls) == 2
        assert json.loads((tmp_path / cpu.TUNING_FILE).read_text()) == cached
    finally:
        cpu.mkl_rows.cache_clear()


def test_cpu_linear_kernel_timing_measures_both_kernels():
    """The real timing run (small): positive times for both kernels at each requested row count."""
    from dspark.backends.cpu import time_linear_kernels

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    times = time_linear_kernels(rows=(1, 2), megabytes=8, repeats=1)
    assert set(times) == {1, 2} and all(t > 0 for pair in times.values() for t in pair)


def test_unknown_cpu_linear_choice_is_a_clear_error(monkeypatch):
    from dspark.backends import cpu
    from dspark.errors import ConfigError

    monkeypatch.setenv(cpu.LINEAR_ENV, "fastest")
    with pytest.raises(ConfigError, match="DSPARK_CPU_LINEAR='fastest'.*auto.*mkl.*onednn"):
        get_backend("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_cpu_release_host_threads_ends_this_threads_openmp_workers():
    """A server's main thread loads the model and then leaves the rounds to the engine's driver:
    its OpenMP team must go, or libgomp stops spinning with more team threads than cores."""
    import os
    import time

    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: no OpenMP worker to release")
    backend = get_backend("cpu")
    torch.randn(256, 256) @ torch.randn(256, 256)           # this thread's team exists now
    before = len(os.listdir("/proc/self/task"))
    assert backend.release_host_threads() is True
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/task")) >= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) <= before - (torch.get_num_threads() - 1)
