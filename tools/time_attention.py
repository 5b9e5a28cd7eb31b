"""Time the target's decode attention inside the engine on SmolLM2: R requests of the eval
prompts (interleaved across the sets, as the bench's concurrency section), plain greedy decoding,
`--max-new-tokens` each. Wraps `backend.attention` and prints the median time of one layer's
decode call, its sum per round, the median round and the key layout the backend received.
Results: docs/BENCHMARKS.md.

    python tools/time_attention.py --requests 64
"""
import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from dspark.bench.harness import (Models, _greedy, concurrency_prompts, find_eval_dir, interleaved_pool,
                                      load_prompt_sets)

    models = Models.load("smollm2", {})
    prompts = concurrency_prompts(interleaved_pool(models, load_prompt_sets(find_eval_dir(), limit=16)), args.requests)
    engine = models.engine(None, max_batch_size=args.requests,
                           max_model_len=max(map(len, prompts)) + args.max_new_tokens + 16)
    backend, attention, calls = engine.backend, engine.backend.attention, []

    def timed(query, key, value, mask, scale, kv_lens=None):
        started = time.perf_counter()
        out = attention(query, key, value, mask, scale, kv_lens)
        if query.shape[2] == 1:                                # decode steps only, not the prefill
            calls.append((time.perf_counter() - started, tuple(key.shape), key.stride()))
        return out

    backend.attention = timed
    try:
        engine.generate(prompts, _greedy(args.max_new_tokens, args.requests, ignore_eos=True))
    finally:
        backend.attention = attention
    rounds = [r["round_s"] for r in engine.round_log if "round_s" in r]
    layer_s = [t for t, _, _ in calls]
    print(f"{args.requests} requests: decode attention {statistics.median(layer_s) * 1e3:.2f} ms a layer, "
          f"{sum(layer_s) / len(rounds) * 1e3:.1f} ms a round; round median "
          f"{statistics.median(rounds) * 1e3:.1f} ms; keys {calls[-1][1]} with strides {calls[-1][2]}")


if __name__ == "__main__":
    main()
