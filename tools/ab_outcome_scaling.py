"""Interleaved A/B on the `dspark demo` prompts (SmolLM2 + its DSpark draft, batch 1, greedy, 96
tokens): plain decoding, budget with the head's confidences alone (OUTCOME_PRIOR = 1e12) and
budget with the per-request outcome scaling (the default); the order rotates each repeat.

    python tools/ab_outcome_scaling.py [REPEATS]
"""
import time, statistics, dspark, sys
from dspark.bench.demo import DEMO_PROMPTS
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
mk = lambda **k: dspark.Engine.from_pretrained("smollm2-135m-instruct", backend="cpu", max_batch_size=1, max_model_len=1024, **k)
d = dspark.reference_model_dir("smollm2-dspark")
engines = {"plain": mk(), "budget-old": mk(draft=d, schedule="budget"), "budget-new": mk(draft=d, schedule="budget")}
engines["budget-old"].planner.OUTCOME_PRIOR = 1e12          # the ratio stays 1: the head alone
p = dspark.SamplingParams(max_new_tokens=96, temperature=0.0)
msgs = [[{"role": "user", "content": q}] for q in DEMO_PROMPTS["smollm2"]]
for e in engines.values(): e.generate(msgs[:1], dspark.SamplingParams(max_new_tokens=8))
res = {k: [[] for _ in msgs] for k in engines}
drafted = {k: [0] * len(msgs) for k in engines}
outs = {}
for rep in range(reps):
    order = list(engines.items()); order = order[rep % 3:] + order[:rep % 3]
    for name, e in order:
        for i, m in enumerate(msgs):
            e.round_log.clear()
            t = time.perf_counter(); o = e.generate([m], p)[0]; dt = time.perf_counter() - t
            res[name][i].append(len(o.token_ids) / dt); outs[(name, i)] = o.token_ids
            drafted[name][i] += sum(1 for r in e.round_log if r.get("drafted"))
for k, v in res.items(): print(k, [[round(x,1) for x in v[i]] for i in range(len(msgs))])
for i in range(len(msgs)):
    base = statistics.median(res["plain"][i])
    print(f"prompt {i}: " + "  ".join(f"{k} {statistics.median(v[i]):.2f} ({statistics.median(v[i])/base:.3f}x, drafted {drafted[k][i]//reps})" for k, v in res.items()))
tot = {k: statistics.median([sum(1/v[i][r] for i in range(len(msgs))) for r in range(reps)]) for k, v in res.items()}
print("sum of per-token seconds (lower is better):", {k: round(x, 4) for k, x in tot.items()}, "ratio vs plain:", {k: round(tot["plain"]/x, 3) for k, x in tot.items()})
print("identical:", all(outs[(k, i)] == outs[("plain", i)] for k in engines for i in range(len(msgs))))
