"""Train draft variants for SmolLM2 on one build's cached features and compare their greedy τ.

Each variant is the build's recipe for one algorithm (`build_smollm2.DRAFT_SETTINGS[--algorithm]`,
same batch, learning rate, anchors and seed) with its shape set: `base` (1 layer, block 7, the
recipe before DSpark moved to block 4), `layers2` (2 layers, block 7), `block4` (1 layer, a block of
4), and block 4 with the loss reweighted: `block4-ce` (1.0 CE + 0.9 L1 instead of 0.1 + 0.9) and
`block4-ce-only` (CE alone, the Markov and confidence terms kept). DFlash takes the same variants (`--algorithm dflash`). The work directory must hold a build's regenerated data and feature cache
(`python tools/build_smollm2.py --work DIR --only prompts|regenerate|features ...`). Prints each
variant's CPU seconds, then τ (whole block verified, greedy, the first prompts of each eval set)
and per-position survival. Results: docs/BENCHMARKS.md, "Draft shape at equal steps and equal CPU".

    python tools/draft_shape_trial.py build/exp --steps 160 --variants block4,base,layers2
    python tools/draft_shape_trial.py build/exp --steps 260 --variants block4
    python tools/draft_shape_trial.py build/exp --algorithm dflash --steps 535 --variants block4
"""
import argparse
import dataclasses
import time
from pathlib import Path

import build_smollm2 as build
from tau_greedy import greedy_tau

VARIANTS = {"base": {"num_layers": 1, "block_size": 7}, "layers2": {"num_layers": 2, "block_size": 7},
            "block4": {"num_layers": 1, "block_size": 4},
            # block 4 with the loss reweighted: the recipe's 0.1 CE + 0.9 L1 gives a draft token the
            # target ranks first but the draft rates low a gradient scaled by that small probability
            # (L1 on probabilities); cross-entropy pulls it up at full strength.
            "block4-ce": {"num_layers": 1, "block_size": 4, "train": {"ce_weight": 1.0, "l1_weight": 0.9}},
            "block4-ce-only": {"num_layers": 1, "block_size": 4, "train": {"ce_weight": 1.0, "l1_weight": 0.0}}}


def train(work: Path, algorithm: str, name: str, steps: int) -> Path:
    from dspark.training.trainer import Trainer

    out = work / f"trial-{algorithm}-{name}-{steps}"
    shape = {k: v for k, v in VARIANTS[name].items() if k != "train"}
    config = dataclasses.replace(build.train_config(work, algorithm, steps, out), **VARIANTS[name].get("train", {}),
                                 draft_options={**build.DRAFT_SETTINGS[algorithm]["draft_options"], **shape})
    started = time.process_time()
    Trainer(config, progress=lambda m: build.log(f"[{name}] {m}")).train()
    build.log(f"[{name}] {steps} steps, {(time.process_time() - started) / 2:.0f} CPU s (both cores / 2)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="a build_smollm2 work directory with its feature cache")
    parser.add_argument("--algorithm", choices=("dspark", "dflash"), default="dspark")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--variants", default="block4,base,layers2", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--prompts-per-dataset", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not (args.work / "feature_cache" / "cache.json").is_file():
        parser.error(f"unknown variants {unknown}" if unknown else
                     f"{args.work} has no feature cache; build one with tools/build_smollm2.py --work {args.work}")
    drafts = {name: train(args.work, args.algorithm, name, args.steps) for name in names}
    for name, draft in drafts.items():
        taus, survival = greedy_tau(draft, args.prompts_per_dataset, args.max_new_tokens, progress=lambda m: None)
        print(f"{name} ({args.steps} steps): macro tau {sum(taus.values()) / len(taus):.3f}, "
              f"per set {[round(t, 3) for t in taus.values()]}, survival {[round(s, 3) for s in survival]}",
              flush=True)


if __name__ == "__main__":
    main()
