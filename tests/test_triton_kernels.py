"""The CUDA backend's optional Triton kernels (backends/triton_kernels.py) against the reference ops
in dspark.ops, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1): integer outputs
bit-exact, probabilities within the conformance tolerance. Skipped where triton is not installed
(it is optional, `pip install 'dspark[cuda]'`, and not part of the CI install), and on a machine
with a GPU, where the conformance suite (`DSPARK_BACKEND=cuda`) checks the compiled kernels.

Triton decides interpreted vs compiled when each @triton.jit function is defined, its own library
functions (tl.cumsum, tl.argmax) included, so TRITON_INTERPRET=1 must be set before triton is first
imported: this module sets it at collection, for this CPU-only test process."""
import importlib
import os
import sys

import pytest
import torch

import dspark
import dspark.backends.cuda as cuda_module
from dspark import ops
from dspark.conformance import load_tolerances
from test_graph_standins import stand_in_backend

if torch.cuda.is_available():
    pytest.skip("a GPU is present: the conformance suite checks the compiled kernels", allow_module_level=True)
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (optional: pip install 'dspark[cuda]')")
if not triton.knobs.runtime.interpret:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own",
                allow_module_level=True)

MODULE = "dspark.backends.triton_kernels"
GREEDY = dspark.SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def kernels():
    """The kernel module, its @triton.jit functions interpreted."""
    return importlib.reload(sys.modules[MODULE]) if MODULE in sys.modules else importlib.import_module(MODULE)


def verify_inputs(seed, rows, gamma, vocab):
    g = torch.Generator().manual_seed(seed)
    draft_probs = torch.rand(rows, gamma, vocab, generator=g).pow(3).softmax(-1)
    target_probs = torch.rand(rows, gamma + 1, vocab, generator=g).pow(6)
    target_probs = target_probs / target_probs.sum(-1, keepdim=True)
    greedy = torch.rand(rows, generator=g) < 0.3                         # point masses, as greedy rows have
    target_probs[greedy] = torch.nn.functional.one_hot(target_probs[greedy].argmax(-1), vocab).float()
    draft_tokens = ops.sample_from_probs(draft_probs, torch.rand(rows, gamma, generator=g))
    agree = torch.rand(rows, gamma, generator=g) < 0.5                    # many drafts equal the target argmax
    draft_tokens = torch.where(agree, target_probs[:, :gamma].argmax(-1), draft_tokens)
    lens = torch.randint(0, gamma + 1, (rows,), generator=g)
    return (draft_tokens, draft_probs, target_probs, lens, torch.rand(rows, gamma, generator=g),
            torch.rand(rows, generator=g))


@pytest.mark.parametrize("rows,gamma,vocab", [(64, 5, 30), (16, 7, 2500), (8, 0, 50), (1, 1, 3)])
def test_verify_kernel_is_bit_exact(kernels, rows, gamma, vocab):
    inputs = verify_inputs(rows + gamma + vocab, rows, gamma, vocab)
    reference = ops.verify(*inputs)
    tokens, accepted = kernels.verify(*inputs)
    assert torch.equal(tokens, reference.output_tokens) and torch.equal(accepted, reference.num_accepted)
    if gamma and rows >= 8:
        assert 0 < int(reference.num_accepted.sum()) < int(inputs[3].sum())     # partial acceptance exercised


@pytest.mark.parametrize("transition", [True, False], ids=["markov", "independent"])
@pytest.mark.parametrize("vocab", [30, 2500])
def test_draft_sampling_kernel_matches_the_reference(kernels, transition, vocab):
    g = torch.Generator().manual_seed(vocab)
    rows, gamma, rank = 12, 4, 6
    base = torch.randn(rows, gamma, vocab, generator=g) * 3
    w1, w2 = torch.randn(vocab, rank, generator=g), torch.randn(vocab, rank, generator=g)
    step = (lambda k, prev, state: (ops.markov_bias(prev, w1, w2), None)) if transition else None
    anchors = torch.randint(0, vocab, (rows,), generator=g)
    uniforms = torch.rand(rows, gamma, generator=g, dtype=torch.float64)
    temperature = torch.rand(rows, generator=g) * 1.5 + 0.1
    temperature[::3] = 0.0                                                # greedy rows among sampled ones
    unfiltered = (torch.zeros(rows, dtype=torch.long), torch.ones(rows))
    ref_tokens, ref_probs, ref_prev = ops.sample_draft_block(base, anchors, uniforms, temperature, *unfiltered, step)
    tokens, probs, prev = kernels.sample_draft_block(base, anchors, uniforms, temperature, step)
    assert torch.equal(tokens, ref_tokens) and torch.equal(prev, ref_prev)
    assert probs.dtype == torch.float32
    assert (probs - ref_probs).abs().max() <= float(load_tolerances()["draft_probs"]["float32"]["default"])
    assert len(set(tokens[1::3].flatten().tolist())) > 3                  # sampled rows really sample


def test_cuda_backend_uses_the_kernels_only_on_cuda_with_triton(monkeypatch, kernels, bigram_qwen3):
    backend = stand_in_backend(monkeypatch, cuda_module, cuda_module.CUDABackend, "cuda", "CUDAGraph")
    assert backend.triton_kernels is None and backend.triton_reason == "device cpu is not CUDA"
    # The stand-in runs on the CPU; hand it the interpreted kernels to drive the backend's own wiring.
    backend._triton_kernels = kernels
    calls = {"verify": 0, "draft": 0}
    for name in calls:
        original = getattr(kernels, {"verify": "verify", "draft": "sample_draft_block"}[name])

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(kernels, {"verify": "verify", "draft": "sample_draft_block"}[name], counted)
    target, draft = bigram_qwen3
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [60]]
    plain = dspark.Engine.from_pretrained(target, backend="cpu", dtype="float32").generate(prompts, GREEDY)
    spec = dspark.Engine.from_pretrained(target, draft=draft, backend=backend, dtype="float32",
                                         max_batch_size=3, max_model_len=96).generate(prompts, GREEDY)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert calls["verify"] > 0 and calls["draft"] > 0
    # Top-k / top-p drafts take the reference: the kernel samples with temperature only.
    before = calls["draft"]
    dspark.Engine.from_pretrained(target, draft=draft, backend=backend, dtype="float32").generate(
        prompts, dspark.SamplingParams(max_new_tokens=8, temperature=1.0, top_k=5, seed=0))
    assert calls["draft"] == before and calls["verify"] > 0
