"""One Engine called from many threads: every call gets exactly what it would get alone.

Concurrent `generate` and `stream` calls join one continuous batch. Greedy output must be
token-identical to the same request run alone on a fresh engine under every schedule and
draft; a seeded sample must be identical too under the schedules whose verify lengths do not
depend on the load (fixed, threshold). Abandoned streams free their slots without disturbing
anyone else.
"""
import random
import threading
import time

import pytest

import dspark

THREADS = 8


@pytest.fixture(scope="module")
def drafts(bigram_qwen3, tmp_path_factory):
    target, dspark_draft = bigram_qwen3
    work = tmp_path_factory.mktemp("concurrency_drafts")
    return target, {
        "dspark": dspark_draft,
        "dflash": dspark.init_draft(target, work / "dflash", algorithm="dflash", num_layers=1, block_size=4),
        "eagle3": dspark.init_draft(target, work / "eagle3", algorithm="eagle3", block_size=4),
    }


def _workload(seed: int) -> list:
    """Per thread: a list of (kind, prompt, params, abandon_after) with ragged prompts, greedy and
    seeded sampling, generate and stream calls, and some streams abandoned part-way."""
    rng = random.Random(seed)
    tasks = []
    for _ in range(3):
        prompt = [rng.randrange(64) for _ in range(rng.randint(1, 24))]
        if rng.random() < 0.5:
            params = dspark.SamplingParams(max_new_tokens=rng.randint(6, 20), ignore_eos=True)
        else:
            params = dspark.SamplingParams(max_new_tokens=rng.randint(6, 20), temperature=1.0,
                                           seed=rng.randrange(10_000), ignore_eos=True)
        kind = rng.choice(["generate", "stream"])
        abandon = rng.randint(1, 3) if kind == "stream" and rng.random() < 0.3 else None
        tasks.append((kind, prompt, params, abandon))
    return tasks


COMBINATIONS = [("dspark", mode) for mode in ("fixed", "threshold", "causal", "budget")] + \
               [("dflash", "fixed"), ("eagle3", "fixed")]


@pytest.mark.parametrize("algorithm,schedule", COMBINATIONS)
def test_concurrent_calls_match_runs_alone(drafts, algorithm, schedule):
    target, paths = drafts
    config = dict(draft=paths[algorithm], dtype="float64", max_batch_size=3, schedule=schedule)
    engine = dspark.Engine.from_pretrained(target, **config)
    workloads = [_workload(1000 * (COMBINATIONS.index((algorithm, schedule)) + 1) + t) for t in range(THREADS)]
    results = [[None] * len(w) for w in workloads]
    errors = []
    start = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        try:
            start.wait()
            for number, (kind, prompt, params, abandon) in enumerate(workloads[index]):
                if kind == "generate":
                    results[index][number] = engine.generate([prompt], params)[0].token_ids
                    continue
                tokens, events = [], 0
                for event in engine.stream([prompt], params):
                    tokens += event.token_ids
                    events += 1
                    if abandon is not None and events >= abandon:
                        break                     # the consumer walks away mid-stream
                results[index][number] = None if abandon is not None and events >= abandon else tokens
        except BaseException as exc:              # noqa: BLE001 (reported below, with the thread)
            errors.append((index, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)

    compare_samples = schedule in ("fixed", "threshold")
    checked = 0
    for workload, outputs in zip(workloads, results):
        for (kind, prompt, params, abandon), tokens in zip(workload, outputs):
            if tokens is None or (params.temperature > 0 and not compare_samples):
                continue
            alone = dspark.Engine.from_pretrained(target, **config).generate([prompt], params)[0].token_ids
            assert tokens == alone, (kind, prompt, params)
            checked += 1
    assert checked >= THREADS
    # Every slot is free again, abandoned streams included, and the engine still works.
    assert engine.pending_requests() == 0
    again = engine.generate([[1, 2, 3]], dspark.SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids
    fresh = dspark.Engine.from_pretrained(target, **config).generate(
        [[1, 2, 3]], dspark.SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids
    assert again == fresh


def test_a_stream_dropped_without_closing_frees_its_slot(bigram_qwen3):
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=1)
    stream = engine.stream([[4, 5, 6]], dspark.SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(stream)
    del stream                                     # garbage-collected mid-generation
    import gc

    gc.collect()
    out = engine.generate([[7, 8]], dspark.SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and engine.pending_requests() == 0


def test_an_exception_in_a_stream_consumer_leaves_other_callers_unharmed(bigram_qwen3):
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=2)
    params = dspark.SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = dspark.Engine.from_pretrained(target, draft=draft).generate([[9, 9, 1]], params)[0].token_ids
    box = {}

    def steady():
        box["tokens"] = engine.generate([[9, 9, 1]], params)[0].token_ids

    other = threading.Thread(target=steady)
    other.start()
    with pytest.raises(RuntimeError, match="consumer failed"):
        for _ in engine.stream([[3, 1, 4, 1, 5]], dspark.SamplingParams(max_new_tokens=40, ignore_eos=True)):
            raise RuntimeError("consumer failed")
    other.join(timeout=120)
    assert box["tokens"] == expected
    assert engine.pending_requests() == 0


def test_abort_from_another_thread_drops_a_waiting_request_before_its_prefill(bigram_qwen3):
    """Stream.abort (what `dspark serve` calls when a client disconnects): a request still waiting
    for a slot leaves without a prefill, its blocked consumer stops, and the running one goes on."""
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=1)
    prefilled, prefill, round_ = [], engine._prefill, engine._round
    engine._prefill = lambda requests: (prefilled.extend(requests), prefill(requests))[1]
    engine._round = lambda requests: (time.sleep(0.05), round_(requests))[1]     # the slot stays taken for seconds
    long = dspark.SamplingParams(max_new_tokens=200, ignore_eos=True)
    running = engine.stream([[4, 5, 6]], long)
    next(running)                                          # holds the only slot
    waiting = engine.stream([[7, 8]], dspark.SamplingParams(max_new_tokens=4, ignore_eos=True))
    box = {}
    consumer = threading.Thread(target=lambda: box.setdefault("events", list(waiting)))
    consumer.start()
    waiting.abort()
    consumer.join(timeout=30)
    assert not consumer.is_alive() and box["events"] == []
    assert engine.pending_requests() == 1                  # only the running request is left
    running.abort()
    assert list(running) == []                            # its queued events are dropped too
    assert [r.prompt_ids for r in prefilled] == [[4, 5, 6]]
    out = engine.generate([[7, 8]], dspark.SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and engine.pending_requests() == 0


def test_a_single_caller_runs_every_round_in_its_own_thread(bigram_qwen3):
    """No engine thread: on the CPU a round in a second thread (a second OpenMP team) ran 1.7x
    slower than in the thread that loaded the model, so a lone caller must do the work itself."""
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=2)
    threads, prefill, round_ = [], engine._prefill, engine._round
    engine._prefill = lambda requests: (threads.append(threading.get_ident()), prefill(requests))[1]
    engine._round = lambda requests: (threads.append(threading.get_ident()), round_(requests))[1]
    params = dspark.SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.generate([[1, 2, 3], [4, 5]], params)
    list(engine.stream([[6, 7]], params))
    assert len(threads) >= 4 and set(threads) == {threading.get_ident()}


def test_a_round_driver_runs_every_round_in_its_thread_until_stopped(bigram_qwen3):
    """`start_driver` (what `dspark serve` uses): while it runs, callers from any thread only wait
    and every round runs in the driver's thread, with the outputs of a run alone; once stopped,
    callers run the rounds again."""
    target, draft = bigram_qwen3
    engine = dspark.Engine.from_pretrained(target, draft=draft, max_batch_size=3)
    params = dspark.SamplingParams(max_new_tokens=9, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    alone = [dspark.Engine.from_pretrained(target, draft=draft).generate([p], params)[0].token_ids for p in prompts]
    threads, round_ = [], engine._round
    engine._round = lambda requests: (threads.append(threading.current_thread().name), round_(requests))[1]
    with engine.start_driver() as driver:
        with pytest.raises(dspark.errors.ConfigError, match="already has a round driver"):
            engine.start_driver()
        box = {}
        workers = [threading.Thread(target=lambda i=i: box.setdefault(i, engine.generate([prompts[i]], params)))
                   for i in range(1, 3)]
        for worker in workers:
            worker.start()
        box[0] = engine.generate([prompts[0]], params)
        for worker in workers:
            worker.join(timeout=120)
    assert not driver.thread.is_alive()
    assert [box[i][0].token_ids for i in range(3)] == alone
    assert threads and set(threads) == {"dspark-engine"}
    threads.clear()
    assert engine.generate([prompts[0]], params)[0].token_ids == alone[0]
    assert threads and set(threads) == {threading.current_thread().name}
