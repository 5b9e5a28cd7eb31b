"""Draft-training throughput on SmolLM2-135M-Instruct: DeepSpec's recipe as dspark ran it before
(the "8B defaults") against the settings dspark now chooses for a 135 M target.

    python tools/bench_training.py --data build/smollm2/regenerated_t0.jsonl [--steps 4] [--out docs/bench_training]

Both configurations train a DSpark draft on the same regenerated SmolLM2 responses (global batch 8,
micro-batch 8, fp32) and report the trainer's own tokens/s (sequence tokens per second) and the
supervised (anchor, position) pairs per second, medians over the timed steps after one warm-up step:

    before  5 layers, Markov rank 256, the full 49152-token vocabulary, up to 512 anchors per sequence
            (every response position), target features computed online inside every step
    after   the target-sized defaults: 1 layer, rank 64, a 16384-token draft vocabulary (d2t / t2d),
            anchors on a quarter of the response positions, and the feature cache (built once beforehand
            and shared by every draft trained on the same data; its build time is reported separately)

Run it on an otherwise idle machine: every concurrent process distorts the numbers.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dspark.training import TrainConfig
from dspark.training.trainer import Trainer

TARGET = "smollm2-135m-instruct"
CONFIGS = {
    "before (DeepSpec 8B defaults, online features)": dict(
        features="online", num_anchors=512, anchor_density=None,
        draft_options={"num_layers": 5, "markov_rank": 256, "draft_vocab_size": 0, "block_size": 7}),
    "after (target-sized defaults, cached features)": dict(
        features="cached", num_anchors=512, anchor_density=0.25,
        draft_options={"num_layers": 1, "markov_rank": 64, "draft_vocab_size": 16384, "block_size": 7}),
}


def measure(name: str, settings: dict, data: str, work: Path, steps: int) -> dict:
    out = work / name.split()[0]
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(target=TARGET, data=data, out=str(out), steps=steps + 1, global_batch=8, micro_batch=8,
                      max_length=640, log_every=1, checkpoint_every=10_000, backend="cpu",
                      cache_dir=str(work / "feature_cache"), **settings)
    started = time.perf_counter()
    trainer = Trainer(cfg, progress=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))
    setup = time.perf_counter() - started
    trainer.train_step()                                     # warm-up
    rates, pairs = [], []
    for _ in range(steps):
        tick = time.perf_counter()
        record = trainer.train_step()
        seconds = time.perf_counter() - tick
        rates.append(record["tokens"] / seconds)
        pairs.append(record["supervised"] / seconds)
        print(f"[{name}] step {record['step']}: {seconds:.1f} s, {rates[-1]:.0f} tokens/s", file=sys.stderr)
    parameters = sum(p.numel() for p in trainer.draft.parameters() if p.requires_grad)
    return {"config": name, "settings": settings, "setup_seconds": round(setup, 1),
            "tokens_per_s": statistics.median(rates), "supervised_pairs_per_s": statistics.median(pairs),
            "trainable_parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="regenerated SmolLM2 responses (dspark regenerate)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--workdir")
    parser.add_argument("--out", default="docs/bench_training")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dspark-train-bench-"))
    rows = [measure(name, settings, args.data, work, args.steps) for name, settings in CONFIGS.items()]
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    lines = ["| configuration | tokens/s | supervised pairs/s | trainable parameters | start-up s (cache build incl.) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['supervised_pairs_per_s']:.0f} | "
              f"{r['trainable_parameters'] / 1e6:.1f} M | {r['setup_seconds']:.0f} |" for r in rows]
    lines.append(f"\nSpeed-up in tokens/s: **{speedup:.1f}x**.")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": "python " + " ".join(sys.argv), "torch":
                                                    torch.__version__, "rows": rows, "speedup": speedup}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
