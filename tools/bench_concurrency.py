"""Tokens/s vs concurrency on this machine for every scheduling mode (issue: load-aware scheduling).

    python tools/bench_concurrency.py [--workdir DIR] [--concurrency 1,2,4,8,16,32] [--max-new-tokens 48]
                                      [--out docs/bench_concurrency] [--backend cpu]

Builds (or reuses) the synthetic target + DSpark draft pair from dspark.conformance.testing, measures
a cost profile with `profile_engine` (what `dspark calibrate` does), then at each
concurrency C decodes C random prompts together, greedy, with: no speculation, fixed
verify lengths, threshold, causal and budget. The modes are timed round-robin, `--repeats`
times, and the median is kept (slow phases of a shared machine then hit every mode alike).
Next to wall clock it reports a modelled throughput: the same rounds priced by the measured
cost profile, which compares the schedulers' decisions without timing noise. Every
speculative run is compared token by token with no speculation; any mismatch aborts.
Writes a Markdown table, a JSON file with the raw numbers and a PNG plot next to `--out`.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dspark
from dspark.bench.profiling import profile_engine
from dspark.conformance.testing import synthetic_pair


def measure(engine, prompts, params, cost):
    """One timed run: wall-clock numbers, plus the same rounds priced by the measured cost
    profile (`modelled`), which is free of this machine's timing noise."""
    started = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for o in outputs)
    rounds = engine.round_log
    context = sum(len(p) for p in prompts) // len(prompts) + params.max_new_tokens // 2
    modelled_seconds = sum(cost.verify_time(r["verify_tokens"], context)
                           + (cost.draft_time(r["requests"]) if r.get("drafted") else 0.0) for r in rounds)
    schedule_share = sum(r["schedule_s"] for r in rounds) / max(sum(r["round_s"] for r in rounds), 1e-12)
    taus = [o.stats["tau"] for o in outputs if o.stats["tau"] is not None]
    return outputs, {"seconds": seconds, "tokens": tokens, "throughput": tokens / seconds,
                     "modelled_throughput": tokens / modelled_seconds,
                     "tau": sum(taus) / len(taus) if taus else 1.0,
                     "verify_tokens_per_round": sum(r["verify_tokens"] for r in rounds) / max(len(rounds), 1),
                     "schedule_share": schedule_share,
                     "drafted_rounds": sum(1 for r in rounds if r.get("drafted", False)) / max(len(rounds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the synthetic models live (default: a temporary folder)")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--fixed", default="1,2,4,6", help="fixed verify lengths to run")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin repeats per concurrency")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--out", default="docs/bench_concurrency", help="output prefix (.md, .json, .png)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dspark-bench-"))
    target, draft = synthetic_pair(workdir)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    profile_path = workdir / "profile.yaml"
    print(f"profiling the engine on this device -> {profile_path}", file=sys.stderr, flush=True)
    profiler = dspark.Engine.from_pretrained(target, draft=draft, backend=args.backend,
                                             max_batch_size=max(concurrency))
    profile_engine(profiler, context_lens=(64, 256), repeats=3,
                   progress=lambda m: print("  " + m, file=sys.stderr, flush=True)).to_yaml(profile_path)
    del profiler

    modes = [("none", None, {})] + [(f"fixed-{n}", draft, {"schedule": "fixed", "verify_len": n})
                                     for n in map(int, args.fixed.split(","))]
    modes += [("threshold", draft, {"schedule": "threshold", "threshold": 0.5}),
              ("causal", draft, {"schedule": "causal", "cost_profile": str(profile_path)}),
              ("budget", draft, {"schedule": "budget", "cost_profile": str(profile_path)})]
    cost = dspark.CostModel.from_yaml(profile_path)
    results = []
    for c in concurrency:
        generator = torch.Generator().manual_seed(c)
        prompts = [torch.randint(0, 2048, (int(n),), generator=generator).tolist()
                   for n in torch.randint(4, 64, (c,), generator=generator)]
        params = dspark.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        engines = {}
        for name, draft_dir, config in modes:
            engines[name] = dspark.Engine.from_pretrained(target, draft=draft_dir, backend=args.backend,
                                                          max_batch_size=c, **config)
            engines[name].generate(prompts[:2], dspark.SamplingParams(max_new_tokens=4, ignore_eos=True))
        # Round-robin repeats: a slow phase of this shared machine hits every mode alike.
        samples = {name: [] for name in engines}
        baseline = None
        for _ in range(args.repeats):
            for name, engine in engines.items():
                outputs, numbers = measure(engine, prompts, params, cost)
                if baseline is None:
                    baseline = [o.token_ids for o in outputs]
                elif [o.token_ids for o in outputs] != baseline:
                    sys.exit(f"LOSSLESS CHECK FAILED: {name} at concurrency {c} differs from no speculation")
                samples[name].append(numbers)
        for name, runs in samples.items():
            numbers = dict(runs[0])
            numbers["throughput"] = statistics.median(r["throughput"] for r in runs)
            numbers["throughput_runs"] = [r["throughput"] for r in runs]
            numbers["per_user"] = numbers["throughput"] / c
            numbers["schedule_share"] = statistics.median(r["schedule_share"] for r in runs)
            results.append({"mode": name, "concurrency": c, **numbers})
            print(f"C={c:<3d} {name:<10s} {numbers['throughput']:8.1f} tok/s (modelled "
                  f"{numbers['modelled_throughput']:7.1f})  tau {numbers['tau']:.2f}"
                  f"  B/round {numbers['verify_tokens_per_round']:6.1f}  drafted {numbers['drafted_rounds']:.2f}"
                  f"  scheduler {100 * numbers['schedule_share']:.2f}% of round", file=sys.stderr, flush=True)
        del engines

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
    names = [m[0] for m in modes]
    lines = ["Aggregate tokens/s, wall clock (median of the round-robin repeats):", "",
             "| concurrency | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in concurrency:
        row = {r["mode"]: r for r in results if r["concurrency"] == c}
        lines.append(f"| {c} | " + " | ".join(f"{row[n]['throughput']:.0f}" for n in names) + " |")
    lines += ["", "Aggregate tokens/s, modelled (the same rounds priced by the measured cost profile):", "",
              "| concurrency | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in concurrency:
        row = {r["mode"]: r for r in results if r["concurrency"] == c}
        lines.append(f"| {c} | " + " | ".join(f"{row[n]['modelled_throughput']:.0f}" for n in names) + " |")
    lines += ["", "τ (tokens per round per request) and verify tokens per round:", "",
              "| concurrency | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in concurrency:
        row = {r["mode"]: r for r in results if r["concurrency"] == c}
        lines.append(f"| {c} | " + " | ".join(f"{row[n]['tau']:.2f} / {row[n]['verify_tokens_per_round']:.0f}"
                                               for n in names) + " |")
    lines.append("")
    lines.append("Scheduler time as a share of the round (causal / budget): " + ", ".join(
        f"C={r['concurrency']} {r['mode']} {100 * r['schedule_share']:.2f}%" for r in results
        if r["mode"] in ("causal", "budget")))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        points = [r for r in results if r["mode"] == name]
        style = "-" if name in ("none", "causal", "budget", "threshold") else ":"
        axes[0].plot([p["concurrency"] for p in points], [p["throughput"] for p in points], style, marker="o",
                     label=name)
        axes[1].plot([p["concurrency"] for p in points], [p["modelled_throughput"] for p in points], style,
                     marker="o", label=name)
    for axis, label in zip(axes, ("aggregate tokens/s (wall clock)", "aggregate tokens/s (modelled)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("dspark on this CPU: synthetic Qwen3 target + DSpark draft, greedy, measured cost profile")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.md')}, .json, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
