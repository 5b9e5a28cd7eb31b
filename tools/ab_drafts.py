"""Interleaved A/B of DSpark drafts on SmolLM2 at batch 1, greedy: plain decoding and each draft with
the whole block verified (`fixed`) and with `budget`, one engine per configuration, all loaded
before anything is timed, the order rotating every repeat. Prompts: the first of each eval set
(as `dspark bench`'s speed section), `--max-new-tokens` each, stopping at end of sequence. Prints
tokens/s per repeat, the medians, each configuration against plain decoding, τ, and whether every
output equals plain decoding.

    python tools/ab_drafts.py --draft shipped=smollm2-dspark --draft block4=build/exp/out/smollm2-dspark
"""
import argparse
import statistics
import time

import dspark
from dspark.bench.harness import find_eval_dir, load_prompt_sets, rotated
from dspark.prompts import prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", action="append", required=True, metavar="NAME=DIR",
                        help="a draft to compare (a directory or a built-in name); repeat for each")
    parser.add_argument("--modes", default="fixed,budget", help="comma-separated schedules per draft")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts-per-dataset", type=int, default=1)
    args = parser.parse_args()
    drafts = dict(item.split("=", 1) for item in args.draft)

    def engine(**options):
        return dspark.Engine.from_pretrained("smollm2-135m-instruct", backend="cpu", max_batch_size=1,
                                             max_model_len=1024, **options)

    engines = {"plain": engine()}
    for name, path in drafts.items():
        for mode in args.modes.split(","):
            engines[f"{name} {mode}"] = engine(draft=path, schedule=mode)
    sets = load_prompt_sets(find_eval_dir(), limit=args.prompts_per_dataset)
    plain = engines["plain"]
    prompts = [prompt_ids({"prompt": text}, plain.tokenizer) for texts in sets.values() for text in texts]
    params = dspark.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    for e in engines.values():                                         # warm-up
        e.generate(prompts[:1], dspark.SamplingParams(max_new_tokens=8))
    rates, outputs, taus = {key: [] for key in engines}, {}, {}
    for repeat in range(args.repeats):
        for key, e in rotated(list(engines.items()), repeat):
            started = time.perf_counter()
            results = [e.generate([p], params)[0] for p in prompts]
            seconds = time.perf_counter() - started
            rates[key].append(sum(len(r.token_ids) for r in results) / seconds)
            outputs[key] = [r.token_ids for r in results]
            rounds = [n for r in results for n in r.stats.get("verify_lens", [])]
            if rounds and key != "plain":
                taus[key] = sum(len(r.token_ids) for r in results) / len(rounds)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
              flush=True)
    base = statistics.median(rates["plain"])
    for key, runs in rates.items():
        tau = f", tokens per round {taus[key]:.2f}" if key in taus else ""
        print(f"{key:20s} median {statistics.median(runs):5.2f} tokens/s ({statistics.median(runs) / base:.3f}x plain), "
              f"runs {[round(r, 1) for r in runs]}{tau}")
    print("identical to plain decoding:", all(ids == outputs["plain"] for ids in outputs.values()))


if __name__ == "__main__":
    main()
