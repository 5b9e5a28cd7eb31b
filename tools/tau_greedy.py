"""Greedy τ of a SmolLM2 draft with the whole block verified, per eval set and macro: a quick check
of a draft under construction (the bench's acceptance section is the full measurement: T = 0 and
T = 1, per position, calibration).

    python tools/tau_greedy.py build/smollm2/draft-dspark --prompts-per-dataset 2
"""
import argparse

import dspark
from dspark.bench.harness import find_eval_dir, load_prompt_sets
from dspark.prompts import prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draft", help="a draft directory for SmolLM2-135M-Instruct")
    parser.add_argument("--prompts-per-dataset", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    engine = dspark.Engine.from_pretrained("smollm2-135m-instruct", draft=args.draft, backend="cpu", schedule="fixed",
                                           max_batch_size=16, max_model_len=1024)
    taus = []
    for name, prompts in load_prompt_sets(find_eval_dir(), limit=args.prompts_per_dataset).items():
        ids = [prompt_ids({"prompt": p}, engine.tokenizer) for p in prompts]
        outputs = engine.generate(ids, dspark.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0))
        accepted = [a for o in outputs for a in o.stats["accepted"]]
        taus.append((sum(accepted) + len(accepted)) / len(accepted))
        print(f"{name:10s} tau {taus[-1]:.2f} over {len(accepted)} rounds", flush=True)
    print(f"macro {sum(taus) / len(taus):.3f} ({args.draft})")


if __name__ == "__main__":
    main()
