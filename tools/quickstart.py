"""The quick start: build a small synthetic target and a draft for it, then decode with and without
speculation through the `dspark` CLI and show that the outputs are identical.

No download, no training: the target is a randomly initialised Qwen3-architecture model whose
next-token distribution depends mostly on the current token, and the draft's Markov head is set
to that bigram table in closed form (see dspark.conformance.testing). It demonstrates the mechanics -- lossless
verification, tau, the speed of a round -- not the acceptance a trained draft reaches on real
text; trained reference models and `dspark demo` come with the reference-model work.

    python tools/quickstart.py [--workdir DIR] [--max-new-tokens N]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_cli(*args: str) -> dict:
    command = [sys.executable, "-m", "dspark", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"command failed: {' '.join(command)}\n{result.stderr}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write the models (default: a temporary folder)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    from dspark.conformance.testing import synthetic_pair

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dspark-quickstart-"))
    started = time.perf_counter()
    print(f"[1/2] building a synthetic Qwen3 target (hidden 512, 8 layers, vocab 2048) and a DSpark draft for it\n"
          f"      (1 layer, block 6, closed-form Markov head) in {workdir}", flush=True)
    target, draft = synthetic_pair(workdir)
    print(f"      models ready in {time.perf_counter() - started:.1f} s", flush=True)

    prompts = ["--prompt-ids", "1,2,3,4", "--prompt-ids", "100,200,300", "--prompt-ids", "7"]
    common = ["--target", str(target), *prompts, "--max-new-tokens", str(args.max_new_tokens),
              "--ignore-eos", "--max-batch-size", "1", "--json"]
    print("[2/2] decoding 3 prompts at batch 1, greedy: plain target, then target + DSpark draft", flush=True)
    plain = run_cli("generate", *common)
    spec = run_cli("generate", *common, "--draft", str(draft))

    tokens = sum(len(o["token_ids"]) for o in plain["outputs"])
    identical = all(p["token_ids"] == s["token_ids"] for p, s in zip(plain["outputs"], spec["outputs"]))
    taus = [o["stats"]["tau"] for o in spec["outputs"]]
    print()
    print(f"backend: {spec['backend']}")
    print(f"plain decoding : {tokens / plain['elapsed_s']:7.1f} tokens/s")
    print(f"DSpark         : {tokens / spec['elapsed_s']:7.1f} tokens/s   "
          f"(x{plain['elapsed_s'] / spec['elapsed_s']:.2f}, tau = {sum(taus) / len(taus):.2f} tokens per round)")
    print(f"outputs identical token by token: {'yes' if identical else 'NO'}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
