"""A/B of engine configurations at one concurrency on SmolLM2, alternating in one process.

The concurrency section of `dspark bench` times each configuration once per repeat, one after
another; on 2 cores, plain decoding alone moves by several percent between runs. This tool
alternates the configurations `--repeats` times in one process and prints every run's tokens/s,
the median, the rate while all requests were in flight (the bench's primary measure), the median
time of the rounds that did not draft, and how many rounds drafted.

    python tools/ab_schedule.py --requests 64 --repeats 2 --modes none,budget
    python tools/ab_schedule.py --requests 4 --max-new-tokens 512 --modes none,budget

Greedy, exactly --max-new-tokens per request, prompts from the eval sets interleaved (as the bench).
"""
import argparse
import gc
import statistics
import time

MODES = {
    "none": (None, {}),
    "budget": ("dspark", {"schedule": "budget"}),
    "causal": ("dspark", {"schedule": "causal"}),
    "frozen": ("dspark", {"schedule": "budget", "online_costs": False}),
    "offline": ("dspark", {"schedule": "budget", "calibration": "offline"}),
    "fixed3": ("dspark", {"schedule": "fixed", "verify_len": 3}),
    "fixed7": ("dspark", {"schedule": "fixed", "verify_len": 7}),
    "dflash": ("dflash", {"schedule": "budget"}),            # the margin estimator (no confidence head)
    "dflash-fixed3": ("dflash", {"schedule": "fixed", "verify_len": 3}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--modes", default="none,budget", help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    labels = args.modes.split(",")
    unknown = [label for label in labels if label not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; valid: {', '.join(MODES)}")

    from dspark.bench.harness import Models, _greedy, find_eval_dir, in_flight_rate, load_prompt_sets

    drafts = {MODES[label][0] for label in labels} - {None}
    models = Models.load("smollm2", {name: f"smollm2-{name}" for name in sorted(drafts)})
    sets = load_prompt_sets(find_eval_dir(), limit=16)
    pool = [models.encode(text) for group in zip(*sets.values()) for text in group]
    prompts = [pool[i % len(pool)] for i in range(args.requests)]
    length = max(len(p) for p in prompts) + args.max_new_tokens + 9
    rates = {label: [] for label in labels}
    for _ in range(args.repeats):
        for label in labels:
            draft, options = MODES[label]
            engine = models.engine(draft, max_batch_size=args.requests, max_model_len=length, **options)
            started = time.perf_counter()
            outputs = engine.generate(prompts, _greedy(args.max_new_tokens, args.requests, ignore_eos=True))
            seconds = time.perf_counter() - started
            rates[label].append(sum(len(o.token_ids) for o in outputs) / seconds)
            rounds = [r for r in engine.round_log if "round_s" in r]
            plain = [r["round_s"] for r in rounds if not r.get("drafted")]
            print(f"{label:8s} {rates[label][-1]:7.1f} tokens/s  "
                  f"(all in flight: {in_flight_rate(engine.round_log, args.requests) or float('nan'):.1f})  "
                  f"rounds {len(rounds)}, drafted "
                  f"{sum(1 for r in rounds if r.get('drafted'))} (probes {sum(1 for r in rounds if r.get('probe'))}), "
                  f"plain round median {statistics.median(plain) * 1e3 if plain else float('nan'):.1f} ms", flush=True)
            del engine
            gc.collect()
    for label in labels:
        print(f"{args.requests} requests, {label}: median {statistics.median(rates[label]):.1f} tokens/s "
              f"over {[round(r, 1) for r in rates[label]]}")


if __name__ == "__main__":
    main()
