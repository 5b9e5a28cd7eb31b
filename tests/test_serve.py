"""`dspark serve`: the OpenAI-compatible server, driven as a real subprocess by the official
`openai` client (sync and async, streaming and not) and by raw HTTP for malformed input.

What must hold: greedy answers equal `Engine.generate` on the same prompts (lossless through
the server), bad input gets a 400 with an OpenAI error body, each response's
metrics.speculative_decoding adds up to the /metrics counters, 64 concurrent clients (some
leaving mid-stream) lose and duplicate nothing, a client that leaves (streamed, non-streamed or
still waiting) has its request aborted and its place freed, SIGTERM drains and exits 0 while the
drain timeout bounds how long, and an internal failure is a 500 without a traceback that leaves
the other requests alone. The in-process tests (`start_server`) inject failures and slowness.

Everything runs on the built-in reference pair (a 6-layer Qwen3 target and its DSpark draft),
one thread, short answers. The last tests check tools/bench_serve.py's arithmetic.
"""
import asyncio
import importlib.util
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import dspark  # noqa: E402
from dspark import Engine, SamplingParams  # noqa: E402
from dspark.params import StreamEvent  # noqa: E402
from dspark.serve import ServeConfig, start_server  # noqa: E402
from dspark.serve.bridge import TextAssembler  # noqa: E402
from dspark.serve.metrics import spec_decode_metrics  # noqa: E402

TARGET, DRAFT = dspark.reference_model_dir("target"), dspark.reference_model_dir("dspark")
MODEL = TARGET.name                      # the served name: the target directory's name
ENGINE_OPTIONS = dict(dtype="float32", schedule="budget", max_batch_size=8)
TEXT_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hello there",
                "In 1492, Columbus", "The quick brown fox"]
CHATS = [[{"role": "user", "content": "What is 2+2?"}],
         [{"role": "user", "content": "Write a python function that reverses a string."}],
         [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]]


# ----------------------------------------------------------------------------- fixtures
def _launch(tmp_path, name: str, *flags: str):
    """Start `dspark serve` on a free port; return (process, base url, log path)."""
    log_path = tmp_path / f"{name}.log"
    log_file = open(log_path, "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dspark", "serve", "--target", str(TARGET), "--draft", str(DRAFT), "--port", "0",
         "--dtype", "float32", "--schedule", "budget", "--max-batch-size", "8", "--no-access-log", *flags],
        stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    log_file.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"ready at (http://127\.0\.0\.1:\d+) ", log_path.read_text())
        if match:
            return process, match.group(1), log_path
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"dspark serve did not become ready:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url, log_path = _launch(tmp_path_factory.mktemp("serve"), "server", "--log-interval", "1")
    yield {"url": url, "base_url": url + "/v1", "log": log_path, "process": process}
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def engine():
    """The same target and draft in this process: what the server must reproduce."""
    return Engine.from_pretrained(TARGET, draft=DRAFT, **ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base_url"], api_key="unused", max_retries=0, timeout=60)


def _greedy(engine, prompts, max_tokens, **options):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **options)
    return engine.generate(prompts, params)


def _wait_until_idle_after_aborts(url: str, before: dict, aborts: int) -> dict:
    """Scrape /metrics until `aborts` more requests ended as aborted and nothing runs or waits
    (at most 30 s); assert it happened and return the last scrape."""
    deadline = time.monotonic() + 30
    while True:
        after = _scrape(url)
        aborted = _metric(after, "dspark:request_success_total", finished_reason="abort") - \
            _metric(before, "dspark:request_success_total", finished_reason="abort")
        idle = _metric(after, "dspark:num_requests_running") == 0 == _metric(after, "dspark:num_requests_waiting")
        if (aborted == aborts and idle) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert aborted == aborts and idle
    return after


def _scrape(url: str) -> dict:
    """/metrics as {"name{labels}": value} (label sets as written)."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def _metric(values: dict, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == str(v) for k, v in labels.items()):
            total += value
    return total


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------- endpoints
def test_health_models_and_metrics_endpoints(server):
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    models = openai.OpenAI(base_url=server["base_url"], api_key="x", max_retries=0).models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(server["url"] + "/metrics").text
    for name in ("dspark:spec_decode_num_drafts_total", "dspark:spec_decode_num_draft_tokens_total",
                 "dspark:spec_decode_num_accepted_tokens_total", "dspark:spec_decode_num_accepted_tokens_per_pos_total",
                 "dspark:num_requests_running", "dspark:num_requests_waiting",
                 "dspark:time_to_first_token_seconds_bucket", "dspark:inter_token_latency_seconds_bucket",
                 "dspark:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    assert 'position="6"' in text                       # gamma = 7 positions, 0-based


def test_greedy_completions_equal_engine_generate(server, client, engine):
    expected = _greedy(engine, TEXT_PROMPTS[:3], 16)
    for prompt, want in zip(TEXT_PROMPTS[:3], expected):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                        extra_body={"return_token_ids": True})
        choice = got.choices[0]
        assert choice.text == want.text and choice.token_ids == want.token_ids
        assert choice.finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        spec = got.metrics["speculative_decoding"]       # the schedule depends on load: check its shape
        assert spec["num_spec_tokens"] == engine.gamma and sum(spec["acceptance_histogram"]) == spec["num_spec_steps"]

        pieces, finish, final = [], None, None
        for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
                assert chunk.usage is None and "metrics" not in (chunk.model_extra or {})   # only the last chunk
            else:
                assert final is None                     # one usage chunk
                final = chunk
        assert "".join(pieces) == want.text and finish == want.finish_reason
        assert final.usage.completion_tokens == len(want.token_ids)
        assert final.usage.prompt_tokens == len(want.prompt_token_ids)
        assert final.metrics["speculative_decoding"]["num_spec_tokens"] == engine.gamma


def test_greedy_chat_equals_engine_generate_with_chat_template(server, client, engine):
    expected = _greedy(engine, CHATS, 24)
    for chat, want in zip(CHATS, expected):
        got = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=24, temperature=0)
        assert got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)

        chunks = list(client.chat.completions.create(model=MODEL, messages=chat, max_tokens=24, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == want.finish_reason
        assert sum("metrics" in (c.model_extra or {}) for c in chunks) == 1   # once, on the last chunk
        assert "metrics" in chunks[-1].model_extra


def test_async_client_concurrent_streams_equal_engine_generate(server, engine):
    prompts = TEXT_PROMPTS
    expected = _greedy(engine, prompts, 12)

    async def one(client, prompt, stream):
        if not stream:
            got = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
            return got.choices[0].text
        pieces = []
        async for chunk in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                           stream=True):
            pieces.append(chunk.choices[0].text)
        return "".join(pieces)

    async def main():
        async with openai.AsyncOpenAI(base_url=server["base_url"], api_key="x", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*[one(client, p, i % 2 == 0) for i, p in enumerate(prompts)])

    assert asyncio.run(main()) == [o.text for o in expected]


def test_stop_strings_cut_the_text_the_same_way_streamed_or_not(server, client, engine):
    prompt = "Once upon a time"
    full = _greedy(engine, [prompt], 24)[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]                                # a stop string the answer really contains
    want = _greedy(engine, [prompt], 24, stop=[stop])[0]
    assert want.finish_reason == "stop" and stop not in want.text
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert streamed == want.text


def test_sampling_parameters_are_honoured(server, client):
    got = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                    top_p=0.9, extra_body={"top_k": 20}, seed=1234)
    assert got.choices[0].finish_reason in ("stop", "length") and 1 <= got.usage.completion_tokens <= 12


# ----------------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    ("negative max_tokens", "/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("top_p zero", "/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("top_p above one", "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5},
     "top_p"),
    ("negative temperature", "/completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    ("n > 1", "/completions", {"prompt": "hi", "n": 2}, "n"),
    ("logprobs", "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
     "logprobs"),
    ("unknown model", "/completions", {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("prompt longer than the context", "/completions", {"prompt": [5] * 2100}, "prompt"),
    ("empty messages", "/chat/completions", {"messages": []}, "messages"),
]


@pytest.mark.parametrize("path,body,param", [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_parameters_get_400_with_an_openai_error_body(server, path, body, param):
    response = httpx.post(server["base_url"] + path, json={"model": MODEL, **body})
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_nan_temperature_and_malformed_json_get_400(server):
    url = server["base_url"] + "/completions"
    headers = {"Content-Type": "application/json"}
    nan = httpx.post(url, content=f'{{"model": "{MODEL}", "prompt": "hi", "temperature": NaN}}', headers=headers)
    assert nan.status_code == 400 and _error(nan)["param"] == "temperature"
    broken = httpx.post(url, content='{"model": "x", "prompt": ', headers=headers)
    assert broken.status_code == 400 and "JSON" in _error(broken)["message"]


def test_unknown_paths_and_methods_get_openai_error_bodies(server):
    missing = httpx.get(server["base_url"] + "/engines")
    assert missing.status_code == 404 and _error(missing)["type"] == "not_found_error"
    wrong = httpx.get(server["base_url"] + "/completions")
    assert wrong.status_code == 405 and "/v1/completions" in _error(wrong)["message"]


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert info.value.body["param"] == "temperature"


# ----------------------------------------------------------------------------- metrics
def test_per_request_metrics_add_up_to_the_prometheus_counters(server, client):
    before = _scrape(server["url"])
    totals = dict(num_spec_steps=0, num_draft_tokens=0, num_accepted_draft_tokens=0)
    histogram, completion_tokens, prompt_tokens = None, 0, 0
    for index, chat in enumerate(CHATS):
        if index % 2:
            got = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=20, temperature=0)
            spec, use = got.metrics["speculative_decoding"], got.usage
        else:
            final = list(client.chat.completions.create(model=MODEL, messages=chat, max_tokens=20, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))[-1]
            spec, use = final.metrics["speculative_decoding"], final.usage
        for key in totals:
            totals[key] += spec[key]
        histogram = spec["acceptance_histogram"] if histogram is None else \
            [a + b for a, b in zip(histogram, spec["acceptance_histogram"])]
        completion_tokens += use.completion_tokens
        prompt_tokens += use.prompt_tokens
        if spec["num_spec_steps"]:
            assert math.isclose(spec["mean_acceptance_length"],
                                1 + spec["num_accepted_draft_tokens"] / spec["num_spec_steps"])
        assert sum(spec["acceptance_histogram"]) == spec["num_spec_steps"]
    after = _scrape(server["url"])

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("dspark:spec_decode_num_drafts_total") == totals["num_spec_steps"]
    assert delta("dspark:spec_decode_num_draft_tokens_total") == totals["num_draft_tokens"]
    assert delta("dspark:spec_decode_num_accepted_tokens_total") == totals["num_accepted_draft_tokens"]
    # Position k was accepted in every step that accepted more than k drafted tokens.
    for position in range(len(histogram) - 1):
        assert delta("dspark:spec_decode_num_accepted_tokens_per_pos_total", position=position) == \
            sum(histogram[position + 1:])
    assert delta("dspark:generation_tokens_total") == completion_tokens
    assert delta("dspark:prompt_tokens_total") == prompt_tokens
    assert delta("dspark:e2e_request_latency_seconds_count") == len(CHATS)
    assert delta("dspark:time_to_first_token_seconds_count") == len(CHATS)
    assert delta("dspark:inter_token_latency_seconds_count") == completion_tokens - len(CHATS)


def test_the_server_logs_acceptance_and_throughput(server, client):
    client.chat.completions.create(model=MODEL, messages=CHATS[0], max_tokens=8, temperature=0)
    deadline = time.monotonic() + 10
    while "mean acceptance length" not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server["log"].read_text()
    assert "mean acceptance length" in log and "generation" in log and "tokens/s" in log


# ----------------------------------------------------------------------------- load
def test_64_concurrent_clients_lose_and_duplicate_nothing(server, engine):
    """Mixed lengths, streaming and not, chat and completions; 8 clients leave after their first
    chunk (their requests ask for far more tokens than they can get before the server notices)."""
    jobs = []
    for i in range(64):
        chat = i % 3 == 0
        prompt = CHATS[i % len(CHATS)] if chat else TEXT_PROMPTS[i % len(TEXT_PROMPTS)]
        leaves = i % 8 == 5
        jobs.append(dict(id=i, chat=chat, prompt=prompt, stream=leaves or i % 2 == 0, leaves=leaves,
                         max_tokens=400 if leaves else 4 + (i * 7) % 21))
    kept = [j for j in jobs if not j["leaves"]]
    expected = engine.generate([j["prompt"] for j in kept],
                               [SamplingParams(max_new_tokens=j["max_tokens"], temperature=0.0) for j in kept])
    before = _scrape(server["url"])

    async def run(job, client):
        create = client.chat.completions.create if job["chat"] else client.completions.create
        what = {"messages": job["prompt"]} if job["chat"] else {"prompt": job["prompt"]}
        args = dict(model=MODEL, max_tokens=job["max_tokens"], temperature=0, **what)
        if not job["stream"]:
            got = await create(**args)
            choice = got.choices[0]
            return job["id"], choice.message.content if job["chat"] else choice.text, got.usage.completion_tokens, \
                got.metrics["speculative_decoding"]
        stream = await create(stream=True, stream_options={"include_usage": True},
                              extra_body={"ignore_eos": True} if job["leaves"] else None, **args)
        pieces, usage, spec = [], None, None
        async for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                pieces.append((choice.delta.content if job["chat"] else choice.text) or "")
                if job["leaves"] and len(pieces) >= 2:
                    await stream.close()         # the client goes away mid-stream
                    return job["id"], None, None, None
            else:
                usage, spec = chunk.usage.completion_tokens, chunk.metrics["speculative_decoding"]
        return job["id"], "".join(pieces), usage, spec

    async def main():
        async with openai.AsyncOpenAI(base_url=server["base_url"], api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*[run(job, client) for job in jobs])

    results = asyncio.run(main())
    assert sorted(r[0] for r in results) == list(range(64))                  # every request answered once
    answers = {r[0]: r for r in results}
    for job, want in zip(kept, expected):
        _, text, tokens, _ = answers[job["id"]]
        assert text == want.text, job
        assert tokens == len(want.token_ids), job

    # The server is healthy, idle again, and its counters add up.
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    after = _wait_until_idle_after_aborts(server["url"], before, 8)
    finished = _metric(after, "dspark:request_success_total") - _metric(before, "dspark:request_success_total")
    assert finished == 64
    completed = [answers[j["id"]] for j in kept]
    for counter, key in (("dspark:spec_decode_num_drafts_total", "num_spec_steps"),
                         ("dspark:spec_decode_num_draft_tokens_total", "num_draft_tokens"),
                         ("dspark:spec_decode_num_accepted_tokens_total", "num_accepted_draft_tokens")):
        assert _metric(after, counter) - _metric(before, counter) == sum(r[3][key] for r in completed), counter
    generated = _metric(after, "dspark:generation_tokens_total") - _metric(before, "dspark:generation_tokens_total")
    assert generated >= sum(r[2] for r in completed) + 8                   # the leavers got tokens too
    # and it still answers correctly
    again = openai.OpenAI(base_url=server["base_url"], api_key="x", max_retries=0).completions.create(
        model=MODEL, prompt=TEXT_PROMPTS[0], max_tokens=8, temperature=0)
    assert again.choices[0].text == _greedy(engine, [TEXT_PROMPTS[0]], 8)[0].text


def test_a_client_leaving_a_non_streamed_request_aborts_it_and_frees_its_slot(server):
    """The client gives up (read timeout) long before its 1500 tokens could be generated: the
    request is counted as aborted, generation stops, and nothing stays running."""
    before = _scrape(server["url"])
    body = {"model": MODEL, "prompt": TEXT_PROMPTS[1], "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base_url"] + "/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    after = _wait_until_idle_after_aborts(server["url"], before, 1)
    for reason in ("stop", "length", "error"):                       # it did not finish any other way
        assert _metric(after, "dspark:request_success_total", finished_reason=reason) == \
            _metric(before, "dspark:request_success_total", finished_reason=reason)
    time.sleep(0.5)                                                  # generation has stopped for good
    generated = _metric(_scrape(server["url"]), "dspark:generation_tokens_total") - \
        _metric(before, "dspark:generation_tokens_total")
    assert generated < 1500


# ----------------------------------------------------------------------------- shutdown
def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(tmp_path, engine):
    process, url, log_path = _launch(tmp_path, "drain", "--drain-timeout", "30", "--log-interval", "0")
    try:
        want = _greedy(engine, [TEXT_PROMPTS[0]], 48, ignore_eos=True)[0].text
        body = {"model": MODEL, "prompt": TEXT_PROMPTS[0], "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "stream": True}
        pieces = []
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                if len(pieces) == 1:
                    process.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    try:                                           # nothing new gets in: 503, or the
                        late = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=5)
                    except httpx.TransportError:                   # listener is already closed
                        late = None
                    assert late is None or late.status_code == 503
        assert "".join(pieces) == want                             # the running request finished
        assert process.wait(30) == 0
        assert "shutting down" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()


# ----------------------------------------------------------------------------- in-process helper
def _engine_like(engine, **config) -> Engine:
    """Another engine over the same modules (own caches and loop), with other settings."""
    return Engine(engine.target, engine.tokenizer, engine.draft, engine.backend, replace(engine.config, **config))


def _parse(text: str) -> dict:
    return {key: float(value) for key, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def _sse_texts(lines) -> tuple:
    """(text pieces, error bodies, saw [DONE]) of a completions event stream."""
    pieces, errors = [], []
    for line in lines:
        if line == "data: [DONE]":
            return pieces, errors, True
        if line.startswith("data: "):
            document = json.loads(line[6:])
            if "error" in document:
                errors.append(document)
            else:
                pieces.extend(c["text"] for c in document["choices"])
    return pieces, errors, False


def test_the_server_runs_every_round_in_one_engine_thread(engine):
    """Each HTTP request waits in a thread of its own; the rounds of all of them run in the one
    thread the server starts (`Engine.start_driver`), which stops with the server."""
    import threading

    mine = _engine_like(engine, max_batch_size=4)
    threads, round_ = set(), mine._round
    mine._round = lambda requests: (threads.add(threading.current_thread().name), round_(requests))[1]
    expected = [o.text for o in _greedy(engine, TEXT_PROMPTS[:4], 10)]

    async def main(base_url):
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60) as client:
            answers = await asyncio.gather(*[client.completions.create(model="dspark", prompt=p, max_tokens=10,
                                                                       temperature=0) for p in TEXT_PROMPTS[:4]])
            return [a.choices[0].text for a in answers]

    with start_server(mine, config=ServeConfig(port=0, log_interval=0, access_log=False)) as server:
        assert asyncio.run(main(server.base_url)) == expected
    assert threads == {"dspark-engine"}
    assert not any(t.name == "dspark-engine" and t.is_alive() for t in threading.enumerate())


def test_start_server_helper_answers_429_with_retry_after_when_the_queue_is_full(engine):
    """In this process: one batch slot and no waiting room; a second request gets 429 with
    Retry-After; once the first client leaves, its place is free again."""
    small = _engine_like(engine, max_batch_size=1, schedule="fixed")
    config = ServeConfig(port=0, max_waiting_requests=0, log_interval=0, access_log=False)
    with start_server(small, config=config) as server:
        assert server.url.startswith("http://127.0.0.1:")
        url, body = server.base_url + "/completions", {"model": server.model, "prompt": "Once upon a time",
                                                      "max_tokens": 300, "ignore_eos": True, "temperature": 0}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", url, json={**body, "stream": True}) as running:
                lines = running.iter_lines()     # kept: dropping it would close the response
                assert running.status_code == 200 and next(lines).startswith("data: ")
                full = http.post(url, json={**body, "max_tokens": 4})
                assert full.status_code == 429 and full.headers["Retry-After"] == "1"
                assert _error(full)["type"] == "rate_limit_error"
            deadline = time.monotonic() + 10                       # the abandoned stream frees its place
            while (server.state.in_flight or small.pending_requests()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.state.in_flight == 0 and small.pending_requests() == 0
            again = http.post(url, json={**body, "max_tokens": 4})
            assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
            # Seeded sampling through the server is the engine's own sample (fixed schedule: reproducible).
            sampled = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.8,
                       "top_p": 0.9, "seed": 7}
            want = small.generate("Once upon a time", SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9,
                                                                     seed=7))[0].text
            assert http.post(url, json=sampled).json()["choices"][0]["text"] == want
    assert not server.running


def test_a_waiting_request_whose_client_leaves_gives_up_its_place(engine):
    """One slot, one waiting place: a client that leaves while its request waits frees the place
    at once; the engine drops the request instead of answering it."""
    small = _engine_like(engine, max_batch_size=1, schedule="fixed")
    config = ServeConfig(port=0, max_waiting_requests=1, log_interval=0, access_log=False)
    with start_server(small, config=config) as server, httpx.Client(timeout=60) as http:
        url = server.base_url + "/completions"
        body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True,
                "temperature": 0, "stream": True}
        with http.stream("POST", url, json=body) as running:
            lines = running.iter_lines()
            first = next(lines)
            with http.stream("POST", url, json={**body, "max_tokens": 5}) as waiting:
                assert waiting.status_code == 200 and server.state.in_flight == 2
                assert small.pending_requests() == 2
            deadline = time.monotonic() + 10
            while server.state.in_flight != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.state.in_flight == 1                     # the waiting place is free again
            pieces, _, done = _sse_texts([first, *lines])
        assert done and len(pieces) >= 1
        deadline = time.monotonic() + 10
        while small.pending_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert small.pending_requests() == 0
        counts = _parse(server.state.metrics.render().decode())
        assert _metric(counts, "dspark:request_success_total", finished_reason="abort") == 1
        assert _metric(counts, "dspark:request_success_total", finished_reason="length") == 1
        assert _metric(counts, "dspark:generation_tokens_total") == 120      # nothing of the one that left


def test_a_draining_server_answers_503_with_retry_after(engine):
    """Once shutdown has begun, a request that still reaches the app (an open connection) is
    refused with 503 and Retry-After, and /health says draining."""
    from dspark.serve import create_app

    app = create_app(engine, ServeConfig(log_interval=0), "m")
    app.state.dspark.draining = True

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            refused = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
            health = await http.get("/health")
        return refused, health

    refused, health = asyncio.run(main())
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert _error(refused)["code"] == "server_shutting_down"
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    assert app.state.dspark.in_flight == 0


def test_api_key_guards_the_openai_endpoints_only(engine):
    from dspark.serve import create_app

    app = create_app(engine, ServeConfig(log_interval=0, api_key="sesame"), "m")

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return (await http.get("/v1/models"), await http.get("/v1/models", headers={"Authorization": "Bearer no"}),
                    await http.get("/v1/models", headers={"Authorization": "Bearer sesame"}), await http.get("/health"))

    missing, wrong, right, health = asyncio.run(main())
    assert missing.status_code == wrong.status_code == 401 and _error(wrong)["code"] == "invalid_api_key"
    assert right.status_code == 200 and right.json()["data"][0]["id"] == "m"
    assert health.status_code == 200                                  # probes need no key


def test_internal_failures_are_500s_without_traceback_and_others_carry_on(engine, monkeypatch, caplog):
    """While a greedy stream runs, three requests fail inside the server: one when it is
    submitted, one mid-generation (as when its logits turn NaN) non-streamed and streamed. Each
    gets a 500-style error without a traceback, logged here; the running stream's answer is
    still exactly the engine's."""
    mine = _engine_like(engine, max_batch_size=4, schedule="fixed")
    real_stream = mine.stream

    def failing_stream(prompts, params):
        if params.max_new_tokens == 13:
            raise RuntimeError("injected failure /secret/path")
        events = real_stream(prompts, params)
        if params.max_new_tokens != 11:
            return events

        class Broken:                            # an engine Stream whose request fails at once
            def __iter__(self):
                return self

            def __next__(self):
                if events is None:
                    raise StopIteration
                self.close()
                return StreamEvent(0, [], None, True, "error", "injected NaN logits", None)

            def close(self):
                nonlocal events
                if events is not None:
                    events.close()
                    events = None

            def abort(self):                     # any thread: the engine's own abort
                if events is not None:
                    events.abort()
        return Broken()

    monkeypatch.setattr(mine, "stream", failing_stream)
    want = mine.generate("Once upon a time", SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True))[0]
    config = ServeConfig(port=0, log_interval=0, access_log=False)
    with start_server(mine, config=config) as server, httpx.Client(timeout=60) as http:
        url = server.base_url + "/completions"
        body = {"model": server.model, "prompt": "Once upon a time", "temperature": 0, "ignore_eos": True}
        with http.stream("POST", url, json={**body, "max_tokens": 60, "stream": True}) as running:
            lines = running.iter_lines()
            first = next(lines)
            for tokens in (13, 11):
                failed = http.post(url, json={**body, "max_tokens": tokens})
                assert failed.status_code == 500
                error = _error(failed)
                assert error["type"] == "internal_server_error" and "secret" not in error["message"]
            with http.stream("POST", url, json={**body, "max_tokens": 11, "stream": True}) as broken:
                pieces, errors, done = _sse_texts(broken.iter_lines())
            assert errors and errors[0]["error"]["type"] == "internal_server_error" and done
            pieces, errors, done = _sse_texts([first, *lines])
        assert "".join(pieces) == want.text and not errors and done
        assert "injected failure" in caplog.text and "injected NaN logits" in caplog.text   # logged server-side
        assert http.get(server.url + "/health").json() == {"status": "ok"}
        assert server.state.in_flight == 0
        counts = _parse(server.state.metrics.render().decode())
        assert _metric(counts, "dspark:request_success_total", finished_reason="error") == 2


def test_shutdown_waits_at_most_the_drain_timeout_then_aborts(engine, monkeypatch):
    """A request that cannot finish within drain_timeout is aborted: stop() returns soon after
    the timeout, the client's stream ends early, and the engine frees the slot."""
    slow = _engine_like(engine, max_batch_size=2, schedule="fixed")
    real_stream = slow.stream

    class SlowStream:                            # the engine's Stream, read slowly
        def __init__(self, events):
            self.events = events

        def __iter__(self):
            return self

        def __next__(self):
            event = next(self.events)
            time.sleep(0.2)                      # >= 400 / 8 rounds x 0.2 s: far beyond the timeout
            return event

        def close(self):
            self.events.close()

        def abort(self):
            self.events.abort()

    def slow_stream(prompts, params):
        return SlowStream(real_stream(prompts, params))

    monkeypatch.setattr(slow, "stream", slow_stream)
    config = ServeConfig(port=0, drain_timeout=0.5, log_interval=0, access_log=False)
    server = start_server(slow, config=config)
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.base_url + "/completions", json=body) as running:
        lines = running.iter_lines()
        first = next(lines)
        started = time.monotonic()
        server.stop()
        assert not server.running and time.monotonic() - started < 5
        try:
            done = _sse_texts([first, *lines])[2]
        except httpx.HTTPError:                  # the connection was cut mid-response
            done = False
    assert not done
    counts = _parse(server.state.metrics.render().decode())
    assert _metric(counts, "dspark:request_success_total", finished_reason="abort") == 1
    assert _metric(counts, "dspark:generation_tokens_total") < 400
    deadline = time.monotonic() + 10
    while slow.pending_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.pending_requests() == 0


# ----------------------------------------------------------------------------- pieces
class _CharTokenizer:
    """Token i is chr(i); 0xFF stands for half a character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\ufffd" if i == 0xFF else chr(i) for i in ids)


def test_text_assembler_holds_back_what_may_become_a_stop_string():
    text = TextAssembler(_CharTokenizer(), ["\n\n"])
    assert text.add([ord("H"), ord("i")], False, None) == "Hi"
    assert text.add([ord("\n")], False, None) == ""              # may be the start of "\n\n"
    assert text.add([ord("x")], False, None) == "\nx"
    assert text.add([ord("\n"), ord("\n")], True, "stop") == ""  # the stop string is never sent
    assert text.text == "Hi\nx"
    partial = TextAssembler(_CharTokenizer(), None)
    assert partial.add([ord("a"), 0xFF], False, None) == "a"     # half a character waits
    assert partial.add([ord("b")], True, "length") == "\ufffdb"


def test_spec_decode_metrics_follow_vllm_definitions():
    stats = [{"accepted": [2, 0, 1, 0], "verify_lens": [3, 2, 3, 0]}, {"accepted": [3], "verify_lens": [3]}]
    spec = spec_decode_metrics(stats, gamma=3)
    assert spec["num_spec_steps"] == 4                            # the round that verified nothing is no step
    assert spec["num_draft_tokens"] == 11 and spec["num_accepted_draft_tokens"] == 6
    assert spec["acceptance_histogram"] == [1, 1, 1, 1]
    assert spec["mean_acceptance_length"] == 1 + 6 / 4 and spec["draft_acceptance_rate"] == 6 / 11
    empty = spec_decode_metrics([{"accepted": [], "verify_lens": []}], gamma=3)
    assert empty["mean_acceptance_length"] is None and empty["num_spec_steps"] == 0


def test_cli_refuses_a_bad_port_before_loading_anything():
    result = subprocess.run([sys.executable, "-m", "dspark", "serve", "--target", str(TARGET), "--port", "70000"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "port" in result.stderr and "Traceback" not in result.stderr


def _bench_serve():
    path = Path(__file__).resolve().parent.parent / "tools" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_serve_arrivals_are_poisson_and_summaries_add_up():
    bench = _bench_serve()
    times = bench.arrival_times(rate=4.0, count=4000, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) >= 0 and times == bench.arrival_times(4.0, 4000, 3)
    assert abs(statistics.fmean(gaps) - 0.25) < 0.02                     # mean gap 1 / rate
    assert abs(statistics.pstdev(gaps) - 0.25) < 0.03                     # exponential: sd = mean
    done = bench.Record(0, sent=0.0, ttft=0.1, e2e=0.5, itl=[0.1, 0.1, 0.2], token_ids=[1, 2, 3, 4],
                        spec={"num_spec_steps": 2, "num_accepted_draft_tokens": 3})
    failed = bench.Record(1, sent=0.2, error="HTTP 429")
    summary = bench.summarise([done, failed], seconds=2.0)
    assert summary["completed"] == 1 and summary["failed"] == 1 and summary["output_throughput"] == 2.0
    assert summary["ttft"]["median"] == 0.1 and summary["itl"]["p99"] == 0.2
    assert summary["mean_acceptance_length"] == 1 + 3 / 2 and summary["errors"] == ["HTTP 429"]
    runs = {mode: {"1.0": {"records": [{"index": 0, "error": None, "token_ids": ids}]}}
            for mode, ids in (("none", [1, 2]), ("budget", [1, 3]))}
    check = bench.lossless_check(runs, ["none", "budget"])
    assert check["compared"] == 1 and check["mismatched"] == [{"mode": "budget", "rate": "1.0", "request": 0}]
