"""A/B of the CPU backend's linear kernels for steps of 1-3 rows (MKL vs oneDNN) on SmolLM2.

The CPU backend measures once per machine which kernel is faster for 1-3 rows
(`dspark.backends.cpu.mkl_rows`, `DSPARK_CPU_LINEAR`). This tool checks the choice end to end:

    python tools/ab_cpu_linear.py --kernels      # ms per forward over SmolLM2's linear layers, 1-64 rows
    python tools/ab_cpu_linear.py                # tokens/s of plain decoding and budget, both kernels

The second form loads the model twice, once per kernel choice, and alternates the engines prompt
by prompt (one prompt per eval set, `--repeats` times, 128 new tokens, greedy, batch 1), so the
machine's drift hits both sides alike. It prints every run and the means.
"""
import argparse
import os
import statistics
import time


def kernel_table(rows=(1, 2, 3, 4, 8, 16, 32, 64), repeats: int = 5) -> None:
    """ms per forward over every linear layer of SmolLM2 but the embedding, F.linear vs oneDNN
    (median of `repeats`; the backend's own timing, on the real weights)."""
    from safetensors.torch import load_file

    from dspark.backends.cpu import time_linear_kernels
    from dspark.models.sources import resolve_model

    directory = resolve_model("smollm2-135m-instruct")
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    weights = [t.float().contiguous() for name, t in tensors.items() if t.dim() == 2 and "embed" not in name]
    print(f"{len(weights)} linear layers, {sum(w.numel() for w in weights) * 4 / 2 ** 20:.0f} MiB of float32")
    print("rows  F.linear ms  oneDNN ms")
    for n in rows:
        (mkl, onednn), = time_linear_kernels(rows=(n,), repeats=repeats, weights=weights,
                                             statistic=statistics.median).values()
        print(f"{n:4d}  {mkl:11.1f}  {onednn:9.1f}", flush=True)


def engine_ab(repeats: int, max_new_tokens: int) -> None:
    from dspark.backends import cpu
    from dspark.bench.harness import Models, _greedy, find_eval_dir, load_prompt_sets

    sets = load_prompt_sets(find_eval_dir(), limit=1)
    engines, prompts = {}, None
    for choice in ("mkl", "onednn"):              # the choice is read when a model's linears are prepared
        os.environ[cpu.LINEAR_ENV] = choice
        cpu.mkl_rows.cache_clear()
        models = Models.load("smollm2", {"dspark": "smollm2-dspark"})
        prompts = [models.encode(texts[0]) for texts in sets.values()]
        length = max(len(p) for p in prompts) + max_new_tokens + 9
        engines[choice] = {"plain": models.engine(None, max_batch_size=1, max_model_len=length),
                           "budget": models.engine("dspark", max_batch_size=1, max_model_len=length,
                                                   schedule="budget")}
    rates = {(choice, mode): [] for choice in engines for mode in ("plain", "budget")}
    for _ in range(repeats):
        for prompt in prompts:
            for choice, pair in engines.items():
                for mode, engine in pair.items():
                    started = time.perf_counter()
                    output = engine.generate([prompt], _greedy(max_new_tokens, 1, ignore_eos=True))[0]
                    rates[choice, mode].append(len(output.token_ids) / (time.perf_counter() - started))
    for (choice, mode), values in rates.items():
        print(f"{choice:6s} {mode:6s} mean {statistics.mean(values):6.2f} tokens/s over "
              f"{[round(v, 1) for v in values]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", action="store_true", help="time the linear layers alone, 1-64 rows")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts (engine A/B)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.kernels:
        kernel_table()
    else:
        engine_ab(args.repeats, args.max_new_tokens)


if __name__ == "__main__":
    main()
