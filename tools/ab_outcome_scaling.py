"""Interleaved A/B on the `dspark demo` prompts (SmolLM2 + its DSpark draft, batch 1, greedy, 96
tokens): plain decoding, budget with the head's confidences alone (OUTCOME_PRIOR = 1e12) and
budget with the per-request outcome scaling (the default); the order rotates each repeat.

    python tools/ab_outcome_scaling.py [REPEATS]
"""
import statistics
import sys
import time

import dspark
from dspark.bench.demo import DEMO_PROMPTS
from dspark.bench.harness import rotated


def engine(**options):
    return dspark.Engine.from_pretrained("smollm2-135m-instruct", backend="cpu", max_batch_size=1, max_model_len=1024,
                                         **options)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    draft = dspark.reference_model_dir("smollm2-dspark")
    engines = {"plain": engine(), "budget-old": engine(draft=draft, schedule="budget"),
               "budget-new": engine(draft=draft, schedule="budget")}
    engines["budget-old"].planner.OUTCOME_PRIOR = 1e12          # the ratio stays 1: the head alone
    params = dspark.SamplingParams(max_new_tokens=96, temperature=0.0)
    chats = [[{"role": "user", "content": q}] for q in DEMO_PROMPTS["smollm2"]]
    for e in engines.values():                                  # warm-up
        e.generate(chats[:1], dspark.SamplingParams(max_new_tokens=8))
    rates = {name: [[] for _ in chats] for name in engines}
    drafted = {name: [0] * len(chats) for name in engines}
    outputs = {}
    for repeat in range(repeats):
        for name, e in rotated(list(engines.items()), repeat):
            for i, chat in enumerate(chats):
                e.round_log.clear()
                started = time.perf_counter()
                output = e.generate([chat], params)[0]
                rates[name][i].append(len(output.token_ids) / (time.perf_counter() - started))
                outputs[name, i] = output.token_ids
                drafted[name][i] += sum(1 for r in e.round_log if r.get("drafted"))
    for name, per_prompt in rates.items():
        print(name, [[round(x, 1) for x in runs] for runs in per_prompt])
    for i in range(len(chats)):
        base = statistics.median(rates["plain"][i])
        print(f"prompt {i}: " + "  ".join(
            f"{name} {statistics.median(r[i]):.2f} ({statistics.median(r[i]) / base:.3f}x, "
            f"drafted {drafted[name][i] // repeats})" for name, r in rates.items()))
    seconds = {name: statistics.median([sum(1 / r[i][k] for i in range(len(chats))) for k in range(repeats)])
               for name, r in rates.items()}
    print("sum of per-token seconds (lower is better):", {k: round(v, 4) for k, v in seconds.items()},
          "ratio vs plain:", {k: round(seconds["plain"] / v, 3) for k, v in seconds.items()})
    print("identical:", all(outputs[name, i] == outputs["plain", i] for name in engines for i in range(len(chats))))


if __name__ == "__main__":
    main()
