"""Greedy τ of a SmolLM2 draft with the whole block verified, per eval set and macro: a quick check
of a draft under construction (the bench's acceptance section is the full measurement: T = 0 and
T = 1, per position, calibration).

    python tools/tau_greedy.py build/smollm2/draft-dspark --prompts-per-dataset 2
"""
import argparse

import dspark
from dspark.bench.harness import find_eval_dir, load_prompt_sets
from dspark.prompts import prompt_ids


def greedy_tau(draft: str, prompts_per_dataset: int = 2, max_new_tokens: int = 128, progress=print) -> tuple:
    """({eval set: tau}, per-position survival [gamma]) of `draft` with the whole block verified."""
    engine = dspark.Engine.from_pretrained("smollm2-135m-instruct", draft=str(draft), backend="cpu", schedule="fixed",
                                           max_batch_size=16, max_model_len=1024)
    taus, survived, rounds = {}, [0] * engine.gamma, 0
    for name, prompts in load_prompt_sets(find_eval_dir(), limit=prompts_per_dataset).items():
        ids = [prompt_ids({"prompt": p}, engine.tokenizer) for p in prompts]
        outputs = engine.generate(ids, dspark.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
        accepted = [a for o in outputs for a in o.stats["accepted"]]
        taus[name] = (sum(accepted) + len(accepted)) / len(accepted)
        rounds += len(accepted)
        for a in accepted:
            for k in range(a):
                survived[k] += 1
        progress(f"{name:10s} tau {taus[name]:.2f} over {len(accepted)} rounds")
    return taus, [s / rounds for s in survived]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draft", help="a draft directory for SmolLM2-135M-Instruct")
    parser.add_argument("--prompts-per-dataset", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    taus, _ = greedy_tau(args.draft, args.prompts_per_dataset, args.max_new_tokens,
                         progress=lambda m: print(m, flush=True))
    print(f"macro {sum(taus.values()) / len(taus):.3f} ({args.draft})")


if __name__ == "__main__":
    main()
