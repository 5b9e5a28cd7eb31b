"""A/B of engine configurations at one concurrency on SmolLM2, alternating in one process.

The concurrency section of `dspark bench` times each configuration once per repeat, one after
another; on 2 cores, plain decoding alone moves by several percent between runs. This tool
alternates the configurations `--repeats` times in one process and prints every run's tokens/s,
the median, the rate while all requests were in flight (the bench's primary measure), the median
time of the rounds that did not draft, and how many rounds drafted.

    python tools/ab_schedule.py --requests 64 --repeats 2 --modes none,budget
    python tools/ab_schedule.py --requests 4 --max-new-tokens 512 --modes none,budget
    python tools/ab_schedule.py --requests 64 --modes none,fixed3 --distribution-verify

Every run also prints the median time of one greedy verification (the acceptance test after the
target's forward). `--distribution-verify` adds, for every mode, a run whose greedy rounds verify
the way they did before commit 7ace07d: one-hot target distributions from `sampling_probs`, then
`verify` (its draft distributions are rebuilt one-hot from the draft tokens, one scatter more than
the old path paid, which read the proposal's own).

Greedy, exactly --max-new-tokens per request, prompts from the eval sets interleaved (as the bench).
"""
import argparse
import contextlib
import gc
import statistics
import time

import torch

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


@contextlib.contextmanager
def timed_greedy_verify(backend, seconds: list, through_distributions: bool = False):
    """Time every greedy verification (its wall time into `seconds`); with `through_distributions`,
    verify the way the engine did before 7ace07d: one-hot target distributions, then `verify`."""
    fast = backend.verify_greedy

    def old_path(draft_tokens, target_logits, verify_lens):
        rows, width, vocab = draft_tokens.shape[0], draft_tokens.shape[1], target_logits.shape[-1]
        greedy = (torch.zeros(rows), torch.zeros(rows, dtype=torch.long), torch.ones(rows))
        target_probs = backend.sampling_probs(target_logits, *greedy, all_greedy=True, filtered=False)
        draft_probs = torch.zeros(rows, width, vocab).scatter_(-1, draft_tokens.unsqueeze(-1), 1.0)
        return backend.verify(draft_tokens, draft_probs, target_probs, verify_lens, torch.rand(rows, width),
                              torch.rand(rows))

    path = old_path if through_distributions else fast

    def timed(*args):
        started = time.perf_counter()
        result = path(*args)
        seconds.append(time.perf_counter() - started)
        return result

    backend.verify_greedy = timed
    try:
        yield
    finally:
        backend.verify_greedy = fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--modes", default="none,budget", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--distribution-verify", action="store_true",
                        help="also run every mode with greedy verification through distributions (before 7ace07d)")
    args = parser.parse_args()
    labels = args.modes.split(",")
    unknown = [label for label in labels if label not in MODES]
    if args.distribution_verify:
        labels = [variant for label in labels for variant in (label, f"{label}/dist")]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; valid: {', '.join(MODES)}")

    from dspark.bench.harness import (Models, _greedy, concurrency_prompts, find_eval_dir, in_flight_rate,
                                      interleaved_pool, load_prompt_sets)

    drafts = {MODES[label.partition("/")[0]][0] for label in labels} - {None}
    models = Models.load("smollm2", {name: f"smollm2-{name}" for name in sorted(drafts)})
    prompts = concurrency_prompts(interleaved_pool(models, load_prompt_sets(find_eval_dir(), limit=16)), args.requests)
    length = max(len(p) for p in prompts) + args.max_new_tokens + 9
    rates, reference = {label: [] for label in labels}, {}
    for _ in range(args.repeats):
        for label in labels:
            mode, _, variant = label.partition("/")
            draft, options = MODES[mode]
            engine = models.engine(draft, max_batch_size=args.requests, max_model_len=length, **options)
            verify_s = []
            with timed_greedy_verify(engine.backend, verify_s, through_distributions=variant == "dist"):
                started = time.perf_counter()
                outputs = engine.generate(prompts, _greedy(args.max_new_tokens, args.requests, ignore_eos=True))
                seconds = time.perf_counter() - started
            tokens = [o.token_ids for o in outputs]
            if variant and tokens != reference.get(mode, tokens):
                print(f"{label}: outputs differ from the argmax path", flush=True)
            reference.setdefault(mode, tokens)
            rates[label].append(sum(len(o.token_ids) for o in outputs) / seconds)
            rounds = [r for r in engine.round_log if "round_s" in r]
            plain = [r["round_s"] for r in rounds if not r.get("drafted")]
            print(f"{label:12s} {rates[label][-1]:7.1f} tokens/s  "
                  f"(all in flight: {in_flight_rate(engine.round_log, args.requests) or float('nan'):.1f})  "
                  f"rounds {len(rounds)}, drafted "
                  f"{sum(1 for r in rounds if r.get('drafted'))} (probes {sum(1 for r in rounds if r.get('probe'))}), "
                  f"plain round median {statistics.median(plain) * 1e3 if plain else float('nan'):.1f} ms, "
                  f"greedy verify median {statistics.median(verify_s) * 1e3:.2f} ms", flush=True)
            del engine
            gc.collect()
    for label in labels:
        print(f"{args.requests} requests, {label}: median {statistics.median(rates[label]):.1f} tokens/s "
              f"over {[round(r, 1) for r in rates[label]]}")


if __name__ == "__main__":
    main()
