"""Serving benchmark: throughput, time to first token (TTFT) and inter-token latency (ITL) against
request rate, for plain target decoding vs DSpark with the `budget` schedule, through `dspark serve`.

    python tools/bench_serve.py --out results/serve                       # the built-in reference pair
    python tools/bench_serve.py --target smollm2-135m-instruct \\
        --draft "$(python -c 'import dspark; print(dspark.reference_model_dir("smollm2-dspark"))')" \\
        --rates 0.5,1,2,4,8 --num-requests 64 --max-tokens 128 --out results/serve-smollm2

For each mode (`none`: the target alone; `budget`: the draft with --schedule budget; any other
schedule name works too) the tool starts `dspark serve` as a subprocess on a free port, sends two
warm-up requests, then for each request rate R sends --num-requests streamed chat completions whose
send times form a Poisson process of rate R (exponential gaps with mean 1/R s). The arrival times
and prompts are drawn once from --seed, so every mode sees exactly the same traffic.

Measured by the client, per request:
    TTFT   send -> first chunk with tokens
    ITL    the gap between consecutive chunks, shared by the tokens of the later chunk (a
           speculative round delivers several tokens at once; this is also how the server's
           dspark:inter_token_latency_seconds histogram counts)
    e2e    send -> last chunk
Per rate: output tokens/s = all output tokens / (last answer - first send); requests/s likewise;
mean acceptance length from the responses' metrics.speculative_decoding. Requests are greedy, so
the modes must answer token for token the same; the report says whether they did.

Writes into --out: bench_serve.json (every number, per-request records included),
bench_serve.md (tables, the exact command, machine, date) and bench_serve.png (three panels vs
request rate). Each server's log goes to serve_<mode>.log there. Progress goes to stderr.
Needs the serve extra and matplotlib: pip install 'dspark[serve]' matplotlib.
"""
import argparse
import asyncio
import datetime
import json
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import httpx

import dspark
from dspark.bench.harness import find_eval_dir, git_commit, load_prompt_sets, machine_description
from dspark.prompts import read_prompts

FALLBACK_PROMPTS = ["Explain why the sky is blue.", "Write a python function that reverses a string.",
                    "What is 17 times 23? Think step by step.", "Give three tips for learning a language.",
                    "Summarise the story of Romeo and Juliet.", "How does a hash table work?"]
READY = re.compile(r"ready at (http://[^ ]+) ")


# ----------------------------------------------------------------------------- settings and traffic
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tools/bench_serve.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", required=True, metavar="DIR", help="folder for bench_serve.{json,md,png} and the server logs")
    add("--target", metavar="MODEL", default=str(dspark.reference_model_dir("target")),
        help="target model: a directory, a .gguf file or a known name (default: the built-in reference target)")
    add("--draft", metavar="DIR", default=str(dspark.reference_model_dir("dspark")),
        help="draft directory for the speculative modes (default: the built-in reference DSpark draft)")
    add("--modes", default="none,budget", metavar="M1,M2,...",
        help="comma-separated: none (no draft) and/or schedule names (fixed, threshold, causal, budget); "
             "default: none,budget")
    add("--rates", default="1,2,4,8", metavar="R1,R2,...",
        help="request rates in requests/s, comma-separated (default: 1,2,4,8)")
    add("--num-requests", type=int, default=64, metavar="N", help="requests sent at each rate (default: 64)")
    add("--max-tokens", type=int, default=128, metavar="N",
        help="tokens each request generates, EOS ignored (default: 128)")
    add("--prompts", metavar="FILE.jsonl",
        help="prompt file (dspark's JSONL shapes); default: ../shared/data/eval if found, else a few built-in prompts")
    add("--max-batch-size", type=int, default=16, metavar="N", help="the server's --max-batch-size (default: 16)")
    add("--dtype", default="float32", help="the server's --dtype (default: float32)")
    add("--backend", help="the server's --backend (default: $DSPARK_BACKEND or auto)")
    add("--serve-args", default="", metavar="FLAGS", help="more `dspark serve` flags, e.g. \"--cost-profile p.yaml\"")
    add("--seed", type=int, default=0, help="seed of the arrival times and the prompt order (default: 0)")
    add("--ready-timeout", type=float, default=600, metavar="S",
        help="seconds to wait for a server to load its model (default: 600)")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates must be numbers separated by commas, got {args.rates!r}")
    if not args.rates or min(args.rates) <= 0:
        parser.error("--rates must be positive request rates")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes:
        parser.error("--modes is empty")
    if args.num_requests < 1 or args.max_tokens < 1:
        parser.error("--num-requests and --max-tokens must be >= 1")
    return args


def load_prompts(path: Optional[str], count: int, seed: int) -> list:
    """`count` prompt texts, shuffled with `seed` (repeated if the source has fewer)."""
    if path:
        texts = [p["prompt"] for p in read_prompts(path) if "prompt" in p]
    else:
        eval_dir = find_eval_dir()
        texts = [t for ts in load_prompt_sets(eval_dir).values() for t in ts] if eval_dir else FALLBACK_PROMPTS
    if not texts:
        raise SystemExit(f"bench_serve: no text prompts in {path}")
    random.Random(seed).shuffle(texts)
    return [texts[i % len(texts)] for i in range(count)]


def arrival_times(rate: float, count: int, seed: int) -> list:
    """Send offsets (s) of a Poisson process of `rate` requests/s; the first request goes at 0."""
    rng, at, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(at)
        at += rng.expovariate(rate)
    return times


# ----------------------------------------------------------------------------- the server
def start_server(args, mode: str, out: Path) -> tuple:
    """`dspark serve` for one mode on a free port; -> (process, url)."""
    command = [sys.executable, "-m", "dspark", "serve", "--target", args.target, "--port", "0",
               "--max-batch-size", str(args.max_batch_size), "--dtype", args.dtype, "--log-interval", "10",
               "--no-access-log"]
    if mode != "none":
        command += ["--draft", args.draft, "--schedule", mode]
    if args.backend:
        command += ["--backend", args.backend]
    command += shlex.split(args.serve_args)
    log_path = out / f"serve_{mode}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    deadline = time.monotonic() + args.ready_timeout
    while time.monotonic() < deadline:
        match = READY.search(log_path.read_text())
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"bench_serve: the {mode} server did not start; its log:\n{log_path.read_text()[-3000:]}")


def stop_server(process) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


# ----------------------------------------------------------------------------- one request
@dataclass
class Record:
    """What the client saw of one request."""
    index: int
    sent: float = 0.0                   # seconds since the rate's start
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    itl: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    spec: Optional[dict] = None
    error: Optional[str] = None


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      record: Record) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    started = previous = time.perf_counter()
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                document = json.loads(line[6:])
                if "error" in document:
                    record.error = document["error"]["message"]
                    return
                if not document["choices"]:
                    record.spec = document.get("metrics", {}).get("speculative_decoding")
                    continue
                ids = document["choices"][0].get("token_ids") or []
                if not ids:
                    continue
                now = time.perf_counter()
                if record.ttft is None:         # the first chunk: TTFT, and its other tokens came with it
                    record.ttft = now - started
                    record.itl += [0.0] * (len(ids) - 1)
                else:                           # the gap since the last chunk, shared by this chunk's tokens
                    record.itl += [(now - previous) / len(ids)] * len(ids)
                record.token_ids += ids
                previous = now
        record.e2e = previous - started
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"


async def run_rate(url: str, model: str, prompts: list, rate: float, args, label: str) -> tuple:
    """Send every prompt at its Poisson time; -> (records, seconds from first send to last answer)."""
    offsets = arrival_times(rate, len(prompts), args.seed)
    records = [Record(i, sent=offset) for i, offset in enumerate(offsets)]
    finished = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits, trust_env=False) as http:
        start = time.perf_counter()

        async def send(record: Record, prompt: str) -> None:
            nonlocal finished
            await asyncio.sleep(max(0.0, start + record.sent - time.perf_counter()))
            record.sent = time.perf_counter() - start
            await one_request(http, url, model, prompt, args.max_tokens, record)
            finished += 1
            if finished % max(1, len(prompts) // 4) == 0 or finished == len(prompts):
                print(f"  {label}: {finished}/{len(prompts)} answered", file=sys.stderr, flush=True)

        await asyncio.gather(*[send(r, p) for r, p in zip(records, prompts)])
        ends = [r.sent + r.e2e for r in records if r.e2e is not None]
    return records, (max(ends) if ends else time.perf_counter() - start)


# ----------------------------------------------------------------------------- summaries
def _percentiles(values: list) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]}


def summarise(records: list, seconds: float) -> dict:
    done = [r for r in records if r.error is None and r.e2e is not None]
    tokens = sum(len(r.token_ids) for r in done)
    steps = sum(r.spec["num_spec_steps"] for r in done if r.spec)
    accepted = sum(r.spec["num_accepted_draft_tokens"] for r in done if r.spec)
    return {"completed": len(done), "failed": len(records) - len(done), "seconds": seconds,
            "request_throughput": len(done) / seconds, "output_throughput": tokens / seconds,
            "ttft": _percentiles([r.ttft for r in done]), "itl": _percentiles([x for r in done for x in r.itl]),
            "e2e": _percentiles([r.e2e for r in done]),
            "mean_acceptance_length": 1 + accepted / steps if steps else None,
            "errors": sorted({r.error for r in records if r.error})[:5]}


def lossless_check(results: dict, modes: list) -> dict:
    """Greedy answers per (rate, request) of every mode against the first mode's."""
    reference, checked, mismatched = modes[0], 0, []
    for mode in modes[1:]:
        for rate, run in results[mode].items():
            for mine, theirs in zip(run["records"], results[reference][rate]["records"]):
                if mine["error"] or theirs["error"]:
                    continue
                checked += 1
                if mine["token_ids"] != theirs["token_ids"]:
                    mismatched.append({"mode": mode, "rate": rate, "request": mine["index"]})
    return {"reference": reference, "compared": checked, "mismatched": mismatched}


# ----------------------------------------------------------------------------- reports
def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def markdown(report: dict) -> str:
    lines = ["# Serving benchmark: dspark serve, Poisson arrivals", "",
             f"- command: `{report['command']}`", f"- machine: {report['machine']}", f"- date: {report['date']}",
             f"- git commit: {report['commit'] or 'unknown'}",
             f"- target: `{report['settings']['target']}`; draft: `{report['settings']['draft']}`",
             f"- {report['settings']['num_requests']} streamed greedy chat requests per rate, "
             f"{report['settings']['max_tokens']} tokens each (EOS ignored), max batch size "
             f"{report['settings']['max_batch_size']}, dtype {report['settings']['dtype']}", "",
             "TTFT, ITL and e2e in milliseconds (mean / median / p99); τ = mean acceptance length "
             "(tokens per speculative round).", "",
             "| rate (req/s) | mode | done / failed | req/s | output tok/s | TTFT | ITL | e2e | τ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate in report["settings"]["rates"]:
        for mode in report["settings"]["modes"]:
            s = report["results"][mode][str(rate)]["summary"]
            trio = lambda d: f"{_ms(d['mean'])} / {_ms(d['median'])} / {_ms(d['p99'])}"     # noqa: E731
            tau = "-" if s["mean_acceptance_length"] is None else f"{s['mean_acceptance_length']:.2f}"
            lines.append(f"| {rate:g} | {mode} | {s['completed']} / {s['failed']} | {s['request_throughput']:.2f} | "
                         f"{s['output_throughput']:.1f} | {trio(s['ttft'])} | {trio(s['itl'])} | {trio(s['e2e'])} | "
                         f"{tau} |")
    check = report["lossless"]
    lines += ["", f"Lossless check: {check['compared']} greedy answers compared with `{check['reference']}`, "
                  f"{len(check['mismatched'])} differed." if len(report['settings']['modes']) > 1 else "",
              f"Server exit codes after SIGTERM: {report['exit_codes']}.", "", "![plot](bench_serve.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = report["settings"]["rates"]
    panels = [("output tokens/s", lambda s: s["output_throughput"]),
              ("median TTFT (ms)", lambda s: None if s["ttft"]["median"] is None else s["ttft"]["median"] * 1000),
              ("median ITL (ms)", lambda s: None if s["itl"]["median"] is None else s["itl"]["median"] * 1000)]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, (title, value) in zip(axes, panels):
        for mode in report["settings"]["modes"]:
            ys = [value(report["results"][mode][str(r)]["summary"]) for r in rates]
            axis.plot(rates, [float("nan") if y is None else y for y in ys], marker="o", label=mode)
        axis.set_xlabel("request rate (requests/s)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"dspark serve, {Path(report['settings']['target']).name}: "
                    f"{report['settings']['max_tokens']} tokens per request", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------- main
def run_mode(args, mode: str, prompts: list, out: Path) -> tuple:
    print(f"[{mode}] starting dspark serve ...", file=sys.stderr, flush=True)
    process, url = start_server(args, mode, out)
    try:
        model = httpx.get(url + "/v1/models", trust_env=False).json()["data"][0]["id"]
        warm = [Record(-1), Record(-2)]
        for record in warm:
            asyncio.run(run_rate_once(url, model, prompts[0], args.max_tokens, record))
        runs = {}
        for rate in args.rates:
            label = f"[{mode}] rate {rate:g} req/s"
            records, seconds = asyncio.run(run_rate(url, model, prompts, rate, args, label))
            summary = summarise(records, seconds)
            runs[str(rate)] = {"summary": summary, "records": [asdict(r) for r in records]}
            print(f"{label}: {summary['output_throughput']:.1f} tok/s, median TTFT {_ms(summary['ttft']['median'])} "
                  f"ms, median ITL {_ms(summary['itl']['median'])} ms, {summary['failed']} failed",
                  file=sys.stderr, flush=True)
    finally:
        code = stop_server(process)
    return runs, code


async def run_rate_once(url: str, model: str, prompt: str, max_tokens: int, record: Record) -> None:
    async with httpx.AsyncClient(timeout=600, trust_env=False) as http:
        await one_request(http, url, model, prompt, max_tokens, record)
    if record.error:
        raise SystemExit(f"bench_serve: the warm-up request failed: {record.error}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "bench_serve.json").exists():
        print(f"note: {out} holds an earlier run; its bench_serve.* files will be replaced", file=sys.stderr)
    prompts = load_prompts(args.prompts, args.num_requests, args.seed)
    results, exit_codes = {}, {}
    for mode in args.modes:
        results[mode], exit_codes[mode] = run_mode(args, mode, prompts, out)
    report = {
        "command": shlex.join(["python", "tools/bench_serve.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "dspark_version": dspark.__version__,
        "settings": {k: getattr(args, k) for k in ("target", "draft", "modes", "rates", "num_requests", "max_tokens",
                                                  "max_batch_size", "dtype", "backend", "serve_args", "seed")},
        "exit_codes": exit_codes, "results": results, "lossless": lossless_check(results, args.modes)}
    (out / "bench_serve.json").write_text(json.dumps(report, indent=1))
    (out / "bench_serve.md").write_text(markdown(report))
    plot(report, out / "bench_serve.png")
    mismatched = len(report["lossless"]["mismatched"])
    print(f"wrote {out / 'bench_serve.json'}, {out / 'bench_serve.md'}, {out / 'bench_serve.png'}"
          + (f"; WARNING: {mismatched} greedy answers differ between modes" if mismatched else ""),
          file=sys.stderr, flush=True)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
