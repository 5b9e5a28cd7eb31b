"""Training throughput per algorithm on this machine (issue: draft training stack).

    python tools/bench_training.py [--workdir DIR] [--steps 20] [--out docs/bench_training]

Uses the synthetic Qwen3 target from dspark.conformance.testing (hidden 512, 8 layers, vocabulary
2048), regenerates 64 responses with it through the engine, then trains a DSpark, a
DFlash and an EAGLE-3 draft for `--steps` steps each (global batch 8, micro-batch 4,
block 7, 64 anchors per sequence, fp32, online target features) and reports the
trainer's own tokens/s (sequence tokens per second, frozen-target forward included).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dspark
from dspark.conformance.testing import synthetic_pair
from dspark.training import TrainConfig, train
from dspark.training.data import regenerate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="docs/bench_training")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dspark-train-bench-"))
    target, _ = synthetic_pair(work)
    data = work / "train.jsonl"
    generator = torch.Generator().manual_seed(0)
    prompts = [{"id": i, "prompt_ids": torch.randint(0, 2048, (16,), generator=generator).tolist()} for i in range(64)]
    engine = dspark.Engine.from_pretrained(target, max_batch_size=16)
    regenerate(engine, prompts, data, max_new_tokens=64, temperature=1.0,
               progress=lambda m: print(m, file=sys.stderr, flush=True))
    rows = []
    for algorithm in ("dspark", "dflash", "eagle3"):
        options = {"block_size": 7} if algorithm == "eagle3" else {"block_size": 7, "num_layers": 1}
        cfg = TrainConfig(target=target, data=str(data), out=str(work / algorithm), algorithm=algorithm,
                          steps=args.steps, global_batch=8, micro_batch=4, lr=3e-3, num_anchors=64, log_every=5,
                          checkpoint_every=10_000, draft_options=options)
        started = time.perf_counter()
        out = train(cfg, progress=lambda m: print(f"[{algorithm}] {m}", file=sys.stderr, flush=True))
        seconds = time.perf_counter() - started
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rate = statistics.median(m["tokens_per_s"] for m in metrics[1:] or metrics)
        rows.append({"algorithm": algorithm, "steps": args.steps, "tokens_per_s": rate,
                     "seconds_per_step": seconds / args.steps, "first_loss": metrics[0]["loss"],
                     "last_loss": metrics[-1]["loss"]})
        print(rows[-1], file=sys.stderr, flush=True)
    lines = ["| algorithm | tokens/s | s/step (incl. start-up) | loss first → last log |", "|---|---|---|---|"]
    lines += [f"| {r['algorithm']} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | "
              f"{r['first_loss']:.3f} → {r['last_loss']:.3f} |" for r in rows]
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
