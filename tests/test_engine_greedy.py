"""Greedy speculative decoding is token-identical to plain decoding and to transformers."""
import pytest
import torch

import dspark
from dspark.conformance.testing import load_hf

GREEDY = dspark.SamplingParams(max_new_tokens=24, ignore_eos=True)


def ragged_prompts(count, vocab=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=generator).tolist()
            for n in torch.randint(1, 20, (count,), generator=generator)]


def hf_greedy(path, prompts, max_new_tokens):
    model = load_hf(path, torch.float64)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        # An explicit mask: with pad_token_id set, transformers would otherwise hide prompt tokens equal to it.
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


@pytest.mark.parametrize("pair", ["bigram_qwen3", "bigram_llama"])
def test_agreeing_draft_greedy_matches_plain_decoding_and_transformers(request, pair):
    target, draft = request.getfixturevalue(pair)
    prompts = ragged_prompts(8, seed=1)
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, GREEDY)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64")
    spec = engine.generate(prompts, GREEDY)
    reference = hf_greedy(target, prompts, GREEDY.max_new_tokens)
    for p, s, ref in zip(plain, spec, reference):
        assert s.token_ids == p.token_ids == ref
    # The run must actually have exercised speculation: multi-token rounds and partial acceptance.
    accepted = [a for s in spec for a in s.stats["accepted"]]
    gamma = engine.gamma
    assert sum(s.stats["tau"] for s in spec) / len(spec) > 1.5
    assert any(0 < a < gamma for a in accepted) and any(a == 0 for a in accepted)
    assert engine.backend.name == "cpu"


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 8])
def test_batch_sizes_and_queueing_do_not_change_greedy_output(bigram_qwen3, batch_size):
    target, draft = bigram_qwen3
    prompts = ragged_prompts(8, seed=2)
    alone = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, GREEDY)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", max_batch_size=batch_size)
    for a, s in zip(alone, engine.generate(prompts, GREEDY)):
        assert s.token_ids == a.token_ids


@pytest.mark.parametrize("family_fixture", ["qwen3_target", "llama_target"])
def test_random_draft_greedy_matches_plain_decoding(request, tmp_path, family_fixture):
    target = request.getfixturevalue(family_fixture)
    draft = dspark.init_draft(target, tmp_path / "draft", num_layers=1, markov_rank=16, block_size=6)
    prompts = ragged_prompts(6, seed=3)
    plain = dspark.Engine.from_pretrained(target).generate(prompts, GREEDY)
    spec = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=4).generate(prompts, GREEDY)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert all(s.stats["rounds"] >= 1 for s in spec)


def test_dflash_draft_and_threshold_schedule_are_lossless(bigram_qwen3, tmp_path):
    target, draft = bigram_qwen3
    prompts = ragged_prompts(5, seed=4)
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, GREEDY)
    dflash = dspark.init_draft(target, tmp_path / "dflash", algorithm="dflash", num_layers=1, block_size=4)
    for engine in (dspark.Engine.from_pretrained(target, draft=dflash, dtype="float64"),
                   dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", schedule="threshold",
                                                 threshold=0.3),
                   dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", verify_len=2)):
        outputs = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in outputs] == [p.token_ids for p in plain]
    assert max(max(o.stats["verify_lens"]) for o in outputs) <= 2


def test_float32_speculation_matches_plain_decoding(bigram_qwen3):
    target, draft = bigram_qwen3
    prompts = ragged_prompts(4, seed=5)
    plain = dspark.Engine.from_pretrained(target).generate(prompts, GREEDY)
    spec = dspark.Engine.from_pretrained(target, draft=draft).generate(prompts, GREEDY)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]


def test_stop_tokens_end_requests_inside_the_accepted_prefix(bigram_qwen3):
    target, draft = bigram_qwen3
    prompts = ragged_prompts(4, seed=6)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64")
    free = engine.generate(prompts, GREEDY)
    # Stop at a token that appears mid-output (likely inside a multi-token round).
    for output in free:
        stop = output.token_ids[len(output.token_ids) // 2]
        [stopped] = engine.generate([output.prompt_token_ids],
                                    dspark.SamplingParams(max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop]))
        cut = output.token_ids.index(stop) + 1
        assert stopped.token_ids == output.token_ids[:cut] and stopped.finish_reason == "stop"
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in free)


def test_stream_yields_the_generated_tokens_in_order(bigram_qwen3):
    target, draft = bigram_qwen3
    prompts = ragged_prompts(3, seed=7)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64")
    expected = engine.generate(prompts, GREEDY)
    streamed = {i: [] for i in range(3)}
    finished = set()
    for event in engine.stream(prompts, GREEDY):
        assert event.index not in finished
        streamed[event.index] += event.token_ids
        if event.finished:
            finished.add(event.index)
    assert finished == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == [o.token_ids for o in expected]


def test_context_limit_ends_generation_with_length(bigram_qwen3):
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_model_len=20)
    [output] = engine.generate([[1, 2, 3, 4, 5]], dspark.SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert output.finish_reason == "length" and 5 + len(output.token_ids) <= 20


def test_one_host_sync_per_round_with_a_fixed_schedule(bigram_qwen3):
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft)
    engine.generate(ragged_prompts(3, seed=8), GREEDY)
    assert engine.round_host_syncs and set(engine.round_host_syncs) == {1}


@pytest.mark.parametrize("schedule", ["causal", "budget"])
def test_load_aware_schedules_are_lossless_and_sync_as_designed(bigram_qwen3, schedule):
    target, draft = bigram_qwen3
    prompts = ragged_prompts(6, seed=9)
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, GREEDY)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", schedule=schedule, max_batch_size=4)
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == [p.token_ids for p in plain]
    lens = [l for o in outputs for l in o.stats["verify_lens"]]
    assert len(set(lens)) > 1                       # the scheduler really chose different lengths
    # budget knows the step size on the host in advance: one copy per round; causal needs a second
    # whenever it drafts (a round whose history says drafting does not pay decodes plainly).
    assert any(record["drafted"] for record in engine.round_log)
    for record in engine.round_log:
        assert record["host_syncs"] == (2 if schedule == "causal" and record["drafted"] else 1)
    assert all(record["verify_tokens"] == record["requests"] + sum(record["verify_lens"].tolist())
               for record in engine.round_log)


@pytest.mark.parametrize("schedule", ["fixed", "threshold", "budget"])
def test_static_shape_path_reproduces_eager(bigram_qwen3, schedule):
    """The padded, bucketed step that graph capture replays computes what eager computes."""
    target, draft = bigram_qwen3
    prompts = ragged_prompts(6, seed=10)
    sampled = [dspark.SamplingParams(max_new_tokens=20, temperature=1.0, seed=i, ignore_eos=True) for i in range(6)]
    # A frozen cost model: with online learning, budget decisions follow measured times, so two
    # engines would draw the same seeded samples only by chance (each stays exact in distribution).
    common = dict(draft=draft, dtype="float64", max_batch_size=4, schedule=schedule, max_model_len=128,
                  online_costs=False)
    eager = dspark.Engine.from_pretrained(target, **common)
    static = dspark.Engine.from_pretrained(target, static_shapes=True, **common)
    assert static.static and static.target_cache.num_slots == 5          # one scratch slot for filler tokens
    for params in (GREEDY, sampled):
        a, b = eager.generate(prompts, params), static.generate(prompts, params)
        assert [x.token_ids for x in a] == [y.token_ids for y in b]
        assert [x.stats["accepted"] for x in a] == [y.stats["accepted"] for y in b]


def test_graph_replay_path_reproduces_eager(bigram_qwen3):
    """Each bucket's verify step is captured once (touching only the scratch slot) and replayed
    with new buffer contents; on the CPU the reference backend's recorded graph stands in for a
    device graph, which proves the control flow (static buffers in, the same tensors out)."""
    target, draft = bigram_qwen3
    prompts = ragged_prompts(7, seed=11)
    common = dict(draft=draft, dtype="float64", max_batch_size=3, max_model_len=128, schedule="budget")
    eager = dspark.Engine.from_pretrained(target, **common).generate(prompts, GREEDY)
    engine = dspark.Engine.from_pretrained(target, graphs=True, **common)
    graphed = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert len(engine.captured_graphs) >= 2 and engine.static        # several buckets captured and reused


def test_deferred_draft_context_reaches_the_draft_as_if_appended_every_round(bigram_qwen3):
    """Rounds that do not draft defer their verified positions' draft context to one batched call
    (at the next drafted round, a prefill, or PENDING_CONTEXT_LIMIT rows). The draft must then see
    exactly the context it would have seen appended round by round: the same proposals, so the same
    acceptance per round, and the same cache. Requests queue behind 3 slots, so freed slots are
    reused by new prompts while rows of their previous owner may still be pending."""
    from dspark.scheduling.planner import RoundPlan

    target, draft = bigram_qwen3
    # Short prompts first, then long ones: a freed slot's pending rows sit at positions the next
    # owner's prompt covers, so appending them after its prefill would overwrite that prompt.
    prompts = [p[:2] for p in ragged_prompts(3, seed=5)] + [p * 4 for p in ragged_prompts(4, seed=6)]

    def run(limit):
        engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", schedule="budget",
                                               max_batch_size=3)
        engine.PENDING_CONTEXT_LIMIT = limit
        rounds = iter(range(10 ** 6))
        # Draft every fourth round (two probes' worth of verified drafts), plain decoding otherwise.
        engine.planner.before_round = lambda keys, caps, context: RoundPlan(draft=True, budget=2) \
            if next(rounds) % 4 == 3 else RoundPlan(draft=False)
        outputs = engine.generate(prompts, GREEDY)
        engine._flush_draft_context()
        accepted = [r["accepted"].tolist() for r in engine.round_log if r.get("drafted")]
        return [o.token_ids for o in outputs], accepted, engine.draft_cache

    deferred, every_round = run(limit=4096), run(limit=0)
    assert deferred[0] == every_round[0]
    assert deferred[1] == every_round[1] and sum(map(sum, deferred[1])) > 0
    assert torch.allclose(deferred[2].k, every_round[2].k, atol=1e-12)
    assert torch.allclose(deferred[2].v, every_round[2].v, atol=1e-12)


@pytest.mark.parametrize("schedule", ["budget", "causal"])
def test_probes_that_draft_for_some_requests_only_are_lossless(bigram_qwen3, schedule):
    """A probe drafts for a quarter of the requests (RoundPlan.rows); the others verify nothing
    that round. Greedy output stays identical to plain decoding, only the chosen rows verify
    drafts, and the draft's cost is learned at the number of rows that drafted."""
    from dspark.scheduling.planner import RoundPlan

    target, draft = bigram_qwen3
    prompts = ragged_prompts(6, seed=9)
    plain = dspark.Engine.from_pretrained(target, dtype="float64").generate(prompts, GREEDY)
    engine = dspark.Engine.from_pretrained(target, draft=draft, dtype="float64", schedule=schedule,
                                           max_batch_size=4)
    rounds = iter(range(10 ** 6))
    engine.planner.before_round = lambda keys, caps, context: RoundPlan(
        draft=True, budget=3, probe=True, rows=[len(keys) - 1]) if next(rounds) % 2 else RoundPlan(draft=False)
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == [p.token_ids for p in plain]
    probes = [r for r in engine.round_log if r.get("probe")]
    assert probes and all((r["verify_lens"][:-1] == 0).all() for r in probes)
    assert sum(int(r["accepted"].sum()) for r in probes) > 0          # the drafting row did verify drafts
    assert set(engine.cost_model._draft_cells) == {1}                  # one row drafted each time
