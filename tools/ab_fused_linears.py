"""Interleaved A/B of the CPU backend's fused projections: SmolLM2 with q/k/v and gate/up each run
as one packed matmul (`linear_groups`, the default) against one kernel per Linear (the groups
emptied while the engine is built), batch 1, greedy, the first `dspark demo` prompt. Plain
decoding, and the DSpark draft with the whole block verified (8 rows per verify); the order of
the four engines rotates each repeat. Prints tokens/s per run, medians and the ratios.

    python tools/ab_fused_linears.py [REPEATS] [MAX_NEW_TOKENS]
"""
import contextlib
import statistics
import sys
import time

import dspark
from dspark.bench.demo import DEMO_PROMPTS
from dspark.bench.harness import rotated
from dspark.models import layers, target
from dspark.models.drafts import dspark as dspark_draft

GROUPED = (target.TargetAttention, layers.MLP, dspark_draft.DraftAttention)


@contextlib.contextmanager
def one_kernel_per_linear():
    saved = [(cls, cls.linear_groups) for cls in GROUPED]
    for cls, _ in saved:
        cls.linear_groups = ()
    try:
        yield
    finally:
        for cls, groups in saved:
            cls.linear_groups = groups


def engine(**options):
    return dspark.Engine.from_pretrained("smollm2-135m-instruct", backend="cpu", max_batch_size=1, max_model_len=1024,
                                         **options)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    max_new = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    draft = dspark.reference_model_dir("smollm2-dspark")
    configs = {"plain": {}, "fixed 7": {"draft": draft, "schedule": "fixed"}}
    engines = {}
    for name, options in configs.items():
        engines[name, "fused"] = engine(**options)
        with one_kernel_per_linear():
            engines[name, "per linear"] = engine(**options)
    chat = [[{"role": "user", "content": DEMO_PROMPTS["smollm2"][0]}]]
    params = dspark.SamplingParams(max_new_tokens=max_new, temperature=0.0)
    for e in engines.values():                                  # warm-up
        e.generate(chat, dspark.SamplingParams(max_new_tokens=8))
    rates, outputs = {key: [] for key in engines}, {}
    for repeat in range(repeats):
        for key, e in rotated(list(engines.items()), repeat):
            started = time.perf_counter()
            output = e.generate(chat, params)[0]
            rates[key].append(len(output.token_ids) / (time.perf_counter() - started))
            outputs[key] = output.token_ids
    for (name, kernels), runs in rates.items():
        print(f"{name:8s} {kernels:10s} median {statistics.median(runs):5.2f} tokens/s, runs "
              f"{[round(r, 1) for r in runs]}")
    for name in configs:
        print(f"{name}: fused / per linear {statistics.median(rates[name, 'fused']) / statistics.median(rates[name, 'per linear']):.3f}")
    print("identical to plain decoding:", all(ids == outputs["plain", "fused"] for ids in outputs.values()))


if __name__ == "__main__":
    main()
