"""What the load-aware planner expected of each round against what the round delivered.

The engine records, for every round the planner priced, `round_log[i]["planned"]`: the tokens it
expected the round to emit, the seconds it expected the round to take, and what a plain round
would have taken. This tool runs one configuration at one concurrency on SmolLM2 (greedy, exactly
--max-new-tokens per request, the bench's interleaved eval prompts) and prints, per run:

- tokens/s, and how many rounds drafted, probed or decoded plainly;
- over the drafted rounds (probes apart): planned against emitted tokens and planned against
  measured seconds, and the gain over plain decoding the plans promised against the one realized;
- the round pattern (`D` drafted, `P` probe, `.` plain), and the realized ratio the planner holds;
- with --verbose, one line per round.

    python tools/trace_plan.py --requests 4 --mode budget --repeats 3
    python tools/trace_plan.py --requests 16 --mode dflash --verbose

Modes: budget (DSpark draft, online cost model), frozen (budget priced by the analytic prior),
dflash (DFlash draft, budget with the margin estimator).
"""
import argparse
import statistics
import time

from dspark.bench.harness import (Models, _greedy, concurrency_prompts, find_eval_dir, interleaved_pool,
                                  load_prompt_sets)

MODES = {
    "budget": ("dspark", {"schedule": "budget"}),
    "frozen": ("dspark", {"schedule": "budget", "online_costs": False}),
    "dflash": ("dflash", {"schedule": "budget"}),
}


def summary(engine, rounds: list, requests: int, rate: float) -> list:
    drafted = [r for r in rounds if r["drafted"] and not r["probe"] and "planned" in r]
    plain = [r for r in rounds if not r["drafted"] and "planned" in r]
    lines = [f"{rate:.1f} tokens/s; rounds {len(rounds)}: drafted {len(drafted)}, probes "
             f"{sum(r['probe'] for r in rounds)}, plain {len(plain)}"]
    plain_s = statistics.median(r["round_s"] for r in plain) if plain else None
    if drafted:
        planned_tokens, tokens = sum(r["planned"][0] for r in drafted), sum(r["emitted"] for r in drafted)
        planned_s, seconds = sum(r["planned"][1] for r in drafted), sum(r["round_s"] for r in drafted)
        priced_plain = statistics.median(r["planned"][2] for r in drafted)
        lines.append(f"  drafted: tokens planned {planned_tokens:.0f}, emitted {tokens} ({tokens / planned_tokens:.2f}x);"
                     f" seconds planned {planned_s * 1e3 / len(drafted):.1f} ms, measured "
                     f"{seconds * 1e3 / len(drafted):.1f} ms ({seconds / planned_s:.2f}x)")
        realized = f"{(tokens / seconds) / (requests / plain_s):.2f}" if plain_s else "-"
        lines.append(f"  gain over plain decoding: planned {(planned_tokens / planned_s) / (requests / priced_plain):.2f},"
                     f" realized {realized} (against the measured plain rounds)")
    if plain:
        lines.append(f"  plain rounds: planned {statistics.median(r['planned'][1] for r in plain) * 1e3:.1f} ms, "
                     f"measured {plain_s * 1e3:.1f} ms (medians)")
    lines.append("  " + "".join("P" if r["probe"] else ("D" if r["drafted"] else ".") for r in rounds))
    lines.append(f"  realized ratio now {engine.planner.realized_ratio(requests):.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4, help="concurrency (default 4)")
    parser.add_argument("--mode", choices=sorted(MODES), default="budget")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--verbose", action="store_true", help="one line per round")
    args = parser.parse_args()
    draft, options = MODES[args.mode]
    models = Models.load("smollm2", {draft: f"smollm2-{draft}"})
    prompts = concurrency_prompts(interleaved_pool(models, load_prompt_sets(find_eval_dir(), limit=16)), args.requests)
    length = max(len(p) for p in prompts) + args.max_new_tokens + 9
    for repeat in range(args.repeats):
        engine = models.engine(draft, max_batch_size=args.requests, max_model_len=length, **options)
        started = time.perf_counter()
        outputs = engine.generate(prompts, _greedy(args.max_new_tokens, args.requests, ignore_eos=True))
        rate = sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started)
        rounds = [r for r in engine.round_log if "round_s" in r and r["requests"] == args.requests]
        print(f"run {repeat}: " + "\n".join(summary(engine, rounds, args.requests, rate)))
        if args.verbose:
            for i, r in enumerate(rounds):
                planned = r.get("planned")
                print(f"  {i:4d} {'P' if r['probe'] else ('D' if r['drafted'] else '.')} verify {r['verify_tokens']:4d}"
                      f" emitted {r['emitted']:4d} {r['round_s'] * 1e3:7.1f} ms" +
                      (f"   planned {planned[0]:.1f} tokens, {planned[1] * 1e3:.1f} ms (plain {planned[2] * 1e3:.1f} ms)"
                       if planned else ""))


if __name__ == "__main__":
    main()
