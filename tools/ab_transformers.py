"""Interleaved A/B of dspark's plain decoding against transformers `generate()` on SmolLM2: batch 1,
greedy, the first gsm8k eval prompt, exactly 64 new tokens (end of sequence ignored), the order
alternating every repeat, so a machine that changes speed during the run moves both sides alike.
Prints tokens/s per run.

    python tools/ab_transformers.py [REPEATS]
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import dspark
from dspark.bench.harness import find_eval_dir, load_prompt_sets
from dspark.models.sources import resolve_model
from dspark.prompts import prompt_ids


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    engine = dspark.Engine.from_pretrained("smollm2-135m-instruct", backend="cpu", max_batch_size=1, max_model_len=1024)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32).eval()
    ids = prompt_ids({"prompt": load_prompt_sets(find_eval_dir(), limit=1)["gsm8k"][0]}, engine.tokenizer)
    params = dspark.SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)

    def ours():
        return len(engine.generate([ids], params)[0].token_ids)

    def theirs():
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
        return out.shape[1] - len(ids)

    runs = [("dspark plain", ours), ("transformers generate()", theirs)]
    for _, fn in runs:                                   # warm-up
        fn()
    for repeat in range(repeats):
        for name, fn in (runs if repeat % 2 == 0 else runs[::-1]):
            started = time.perf_counter()
            tokens = fn()
            print(f"{name}: {tokens / (time.perf_counter() - started):.2f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
