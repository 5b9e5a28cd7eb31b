"""The Ascend backend's fused attention, graph capture, per-replay update and replay code, run on
the CPU through stand-ins of torch.npu and torch_npu (tests/graph_standins.py), each compared with
the CPU reference backend. This proves our control flow and argument contract, not the chip:
docs/CONFORMANCE.md records which backend ran on which real device."""
import pytest
import torch

import dspark
import dspark.backends.ascend as ascend_module
import graph_standins
from dspark.backends import CPUBackend
from dspark.backends.ascend import UnsupportedOperationError
from dspark.conformance import load_tolerances
from dspark.conformance.testing import make_agreeing_draft, make_target
from graph_standins import StandInGraph, torch_npu_module
from test_graph_standins import stand_in_backend

WIDE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GREEDY = dspark.SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture
def ascend(monkeypatch):
    return stand_in_backend(monkeypatch, ascend_module, ascend_module.AscendBackend, "npu", "NPUGraph")


@pytest.fixture
def wide_ascend(monkeypatch, ascend):
    """The kernel's float16 / bfloat16 gate widened on both sides (backend and stand-in op), so
    the fused path can be compared with the reference exactly in float64."""
    monkeypatch.setattr(graph_standins, "FUSED_ATTENTION_DTYPES", list(WIDE))
    ascend.fused_attention_dtypes = WIDE
    return ascend


@pytest.fixture(scope="module")
def aligned_pair(tmp_path_factory):
    """A mostly-bigram Qwen3 target with head dim 16 (the kernel's alignment) and its agreeing draft."""
    target = make_target(tmp_path_factory.mktemp("ascend_t"), "qwen3", hidden=64, layers=2, seed=7,
                         context_scale=0.15, logit_scale=8.0)
    return target, make_agreeing_draft(target, tmp_path_factory.mktemp("ascend_d"), block_size=4)


def attention_inputs(seed, rows=3, heads=4, kv_heads=2, queries=5, keys=13, dim=16):
    """Random non-zero q/k/v, a causal mask with random holes, and each row's key bound."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, queries, dim, generator=g, dtype=torch.float64)
    k = torch.randn(rows, kv_heads, keys, dim, generator=g, dtype=torch.float64)
    v = torch.randn(rows, kv_heads, keys, dim, generator=g, dtype=torch.float64)
    starts = torch.randint(0, keys - queries + 1, (rows,), generator=g)
    query_pos = starts.unsqueeze(1) + torch.arange(queries)
    mask = torch.arange(keys).view(1, 1, -1) <= query_pos.unsqueeze(-1)
    mask &= torch.rand(rows, queries, keys, generator=g) < 0.8
    mask[..., 0] = True
    return q, k, v, mask.unsqueeze(1), (starts + queries).tolist()


@pytest.mark.parametrize("queries,kv_heads", [(1, 2), (5, 2), (16, 4), (7, 1)])
def test_fused_attention_matches_the_reference(wide_ascend, queries, kv_heads):
    q, k, v, mask, kv_lens = attention_inputs(queries, queries=queries, kv_heads=kv_heads, keys=queries + 9)
    reference = CPUBackend().attention(q, k, v, mask, 0.25)
    got = wide_ascend.attention(q, k, v, mask, 0.25, kv_lens=kv_lens)
    assert wide_ascend.attention_calls == {"fused": 1}
    assert (got - reference).abs().max() < 1e-12
    # The kernel honours the key lengths: a bound that cuts off attended keys changes the result.
    short = [max(1, n - 2) for n in kv_lens]
    assert (wide_ascend.attention(q, k, v, mask, 0.25, kv_lens=short) - reference).abs().max() > 1e-3


def test_fused_attention_in_bfloat16_within_the_conformance_tolerance(ascend):
    q, k, v, mask, kv_lens = attention_inputs(3)
    reference = CPUBackend().attention(q, k, v, mask, 0.25)
    got = ascend.attention(*(t.to(torch.bfloat16) for t in (q, k, v)), mask, 0.25, kv_lens=kv_lens)
    assert ascend.attention_calls == {"fused": 1} and got.dtype == torch.bfloat16
    worst = float((got.double() - reference).abs().max())
    assert 0 < worst <= float(load_tolerances()["attention"]["bfloat16"]["default"])


def test_calls_the_kernel_cannot_take_fall_back_or_fail_clearly(monkeypatch, ascend):
    q, k, v, mask, kv_lens = attention_inputs(4, queries=17, keys=30)
    reference = CPUBackend().attention(q, k, v, mask, 0.25)
    got = ascend.attention(*(t.bfloat16() for t in (q, k, v)), mask, 0.25, kv_lens=kv_lens)     # 17 > 16 queries
    assert (got.double() - reference).abs().max() < 3e-2
    assert ascend.attention(q, k, v, mask, 0.25).dtype == torch.float64                         # float64: reference
    assert ascend.attention_calls == {"fused": 0, "17 query tokens per request (the kernel takes at most 16)": 1,
                                      "dtype float64 (the kernel takes float16 / bfloat16)": 1}
    assert ascend.describe()["attention_calls"] == ascend.attention_calls
    leaf = q[:, :, :4].bfloat16().requires_grad_()                                            # training
    ascend.attention(leaf, k.bfloat16(), v.bfloat16(), mask[:, :, :4], 0.25).sum().backward()
    assert leaf.grad is not None and ascend.attention_calls["fused"] == 0
    assert ascend.attention_calls["autograd (the kernel is inference-only; training takes the reference)"] == 1
    ascend._setup_attention(True)
    with pytest.raises(UnsupportedOperationError, match="cannot take this attention call: 17 query tokens"):
        ascend.attention(*(t.bfloat16() for t in (q, k, v)), mask, 0.25)
    with pytest.raises(ValueError, match="fused_attention must be"):
        ascend._setup_attention("yes")
    monkeypatch.setattr(ascend, "torch_npu", object())
    with pytest.raises(UnsupportedOperationError, match="has no npu_fused_infer_attention_score"):
        ascend._setup_attention(True)


def test_the_stand_in_op_checks_the_documented_contract():
    op = torch_npu_module().npu_fused_infer_attention_score
    q = torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)        # BSND: 2 requests, 3 queries, 4 heads
    k = torch.randn(2, 9, 2, 16, dtype=torch.bfloat16)
    ok = dict(num_heads=4, num_key_value_heads=2, input_layout="BSND", scale=0.25)
    out, _ = op(q, k, k, actual_seq_lengths_kv=[5, 9], **ok)
    assert out.shape == q.shape
    bad = [(dict(input_layout="TND"), "input_layout"), (dict(num_heads=8), "num_heads=8"),
           (dict(actual_seq_lengths_kv=[5, 10]), "outside"), (dict(sparse_mode=3), "sparse_mode"),
           (dict(atten_mask=torch.zeros(2, 1, 3, 9, dtype=torch.uint8)), "contiguous bool")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            op(q, k, k, **{**ok, **change})
    with pytest.raises(ValueError, match="17 query tokens"):
        op(torch.randn(2, 17, 4, 16, dtype=torch.bfloat16), k, k, **ok)
    with pytest.raises(ValueError, match="contiguous"):
        op(q.transpose(1, 2), k, k, **ok)
    with pytest.raises(ValueError, match="dtype"):
        op(q.float(), k.float(), k.float(), **ok)


def _random_caches(*engines):
    g = torch.Generator().manual_seed(11)
    k = torch.randn(engines[0].target_cache.k.shape, generator=g, dtype=torch.float64)
    v = torch.randn(engines[0].target_cache.v.shape, generator=g, dtype=torch.float64)
    for engine in engines:
        engine.target_cache.k.copy_(k)
        engine.target_cache.v.copy_(v)


@pytest.mark.parametrize("updates", [True, False], ids=["with NPUGraph.update", "older torch_npu"])
def test_capture_at_one_length_replay_at_another(monkeypatch, wide_ascend, aligned_pair, updates):
    """Each bucket's graph is captured on the all-filler step (key bound = the query width), then
    replayed for requests far into their context: the pushed key lengths must follow, and the
    logits must equal the CPU reference's eager fixed-shape step."""
    if not updates:
        monkeypatch.delattr(StandInGraph, "update")
    target, draft = aligned_pair
    common = dict(draft=draft, dtype="float64", max_batch_size=3, max_model_len=64)
    engine = dspark.Engine.from_pretrained(target, backend=wide_ascend, graphs=True, **common)
    reference = dspark.Engine.from_pretrained(target, backend="cpu", static_shapes=True, graphs=False, **common)
    assert engine.verify_step.query_width == reference.verify_step.query_width == 5
    _random_caches(engine, reference)
    g = torch.Generator().manual_seed(5)
    checked = 0
    for bucket in engine.verify_step.buckets:
        for starts in ([0, 3, 1], [40, 17, 52]):
            lens = torch.randint(1, min(bucket, 5) + 1, (3,), generator=g)
            while int(lens.sum()) > bucket:
                lens[int(lens.argmax())] -= 1
            if (lens == 0).any():
                continue
            num = int(lens.sum())
            ids = torch.randint(0, 64, (num,), generator=g)
            logits = []
            for e in (engine, reference):
                batch = e.verify_step.static_batch(lens, starts, [0, 1, 2], num, bucket)
                batch.input_ids[:num] = ids
                out = e.verify_step.replay(batch, bucket) if e is engine else e.target(batch, e.target_cache, e.backend)
                logits.append(out.logits[:num])
            assert (logits[0] - logits[1]).abs().max() < 1e-10, (bucket, starts)
            handle = engine.captured_graphs[bucket][1]
            layers = len(handle.length_sources)
            if updates:
                assert layers == 2 and handle.graph.updates[-1] == \
                    [{"actual_seq_lengths_kv": engine.captured_graphs[bucket][0].kv_lens}] * layers
            else:
                assert layers == 0 and not handle.graph.auto_dispatch_capture
            checked += 1
    assert checked >= 6 and wide_ascend.attention_calls["fused"] > 0
    assert set(wide_ascend.attention_calls) == {"fused"}


def test_replay_without_the_update_would_read_stale_lengths(monkeypatch, wide_ascend, aligned_pair):
    """The negative control: skip the update and the captured key bound cuts off the context."""
    target, draft = aligned_pair
    common = dict(draft=draft, dtype="float64", max_batch_size=3, max_model_len=64)
    engine = dspark.Engine.from_pretrained(target, backend=wide_ascend, graphs=True, **common)
    reference = dspark.Engine.from_pretrained(target, backend="cpu", static_shapes=True, graphs=False, **common)
    _random_caches(engine, reference)
    monkeypatch.setattr(wide_ascend, "graph_replay", lambda handle: handle.replay())
    lens, starts, bucket = torch.tensor([2, 3, 1]), [30, 20, 45], 8
    logits = []
    for e in (engine, reference):
        batch = e.verify_step.static_batch(lens, starts, [0, 1, 2], 6, bucket)
        batch.input_ids[:6] = torch.arange(1, 7)
        out = e.verify_step.replay(batch, bucket) if e is engine else e.target(batch, e.target_cache, e.backend)
        logits.append(out.logits[:6])
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_lossless_generation_through_fused_attention_graphs(monkeypatch, wide_ascend, aligned_pair):
    """End to end on the stand-in: speculative greedy decoding through captured graphs with fused
    attention is token-identical to plain decoding on the CPU reference (float64), and in
    bfloat16 (the kernel's own dtype, default gates) speculative == plain on the backend."""
    target, draft = aligned_pair
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [60], [5, 5]]
    common = dict(max_batch_size=3, max_model_len=96)
    plain = dspark.Engine.from_pretrained(target, backend="cpu", dtype="float64", **common).generate(prompts, GREEDY)
    before = StandInGraph.captures
    engine = dspark.Engine.from_pretrained(target, draft=draft, backend=wide_ascend, dtype="float64", **common)
    assert engine.use_graphs
    spec = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert StandInGraph.captures - before == len(engine.captured_graphs) >= 2
    assert sum(len(h.graph.updates) for _, h, _ in engine.captured_graphs.values()) == len(engine.round_log)
    assert set(wide_ascend.attention_calls) == {"fused"}          # target, draft and prefill all fused

    monkeypatch.setattr(graph_standins, "FUSED_ATTENTION_DTYPES", [torch.float16, torch.bfloat16])
    wide_ascend.fused_attention_dtypes = ascend_module.AscendBackend.fused_attention_dtypes
    runs = [dspark.Engine.from_pretrained(target, draft=d, backend=wide_ascend, dtype="bfloat16", **common)
            .generate(prompts, GREEDY) for d in (None, draft)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
    assert set(wide_ascend.attention_calls) == {"fused"}
