"""Build the reference models shipped in dspark/reference_models/ (see dspark.models.reference).

Every stage is seeded and logged; a stage whose output exists is skipped, so an interrupted
build resumes (`--redo STAGE` rebuilds one stage and everything after it). Stages:

  corpus      chat-formatted training text: ../shared/data/train (GSM8K, instructions) plus
              functions from the Python standard library (files and Python version recorded)
  tokenizer   byte-level BPE (vocabulary 8192) in the transformers format, with a chat template
  target      a Qwen3-architecture LM (hidden 384, 6 layers, 12.6 M parameters) trained from scratch;
              loads in dspark and in transformers' AutoModelForCausalLM
  regenerate  the target's own responses (greedy and T = 1) to training prompts, through dspark
  drafts      DSpark, DFlash and EAGLE-3 drafts trained on them with `dspark.training`
  sts         STS temperatures for the DSpark confidence head, fitted on held-out prompts
  assistant   a 2-layer standalone LM distilled from the same responses, for transformers'
              assisted generation (the peer baseline in `dspark bench`)

Weights are stored in bfloat16 (the target is rounded to bf16 *before* its responses are
regenerated, so the shipped weights are exactly the model the drafts learned). Running time on
2 CPU cores: see dspark/reference_models/BUILD.json ("seconds" per stage).

    python tools/build_reference.py [--out dspark/reference_models] [--work build/reference]
"""
import argparse
import ast
import json
import math
import random
import shutil
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "train"
STAGES = ("corpus", "tokenizer", "target", "regenerate", "drafts", "sts", "assistant")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TARGET = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rope_theta=10000.0,
              tie_word_embeddings=True, rms_norm_eps=1e-6)
ASSISTANT = dict(TARGET, hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3,
                 num_key_value_heads=1)
CODE_PROMPT = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{}\n```"


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# ----------------------------------------------------------------------------------- corpus
def stdlib_functions(max_chars: int = 1800) -> tuple[list, list]:
    """(records, files): every stdlib function or method (dedented) with a docstring, as a
    HumanEval-style prompt (signature + docstring) and an MBPP-style one (its first sentence)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    records = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None:
                continue
            code = ast.get_source_segment(source, node, padded=True)
            if code is None or len(code) > max_chars:
                continue
            code = textwrap.dedent(code)
            body_start = node.body[0]
            header = "\n".join(code.splitlines()[:body_start.end_lineno - node.lineno + 1])
            summary = ast.get_docstring(node).strip().split("\n")[0].rstrip(".")
            records.append({"source": f"stdlib/{path.name}", "prompt": CODE_PROMPT.format(header),
                            "response": f"```python\n{code}\n```"})
            if summary:
                records.append({"source": f"stdlib/{path.name}",
                                "prompt": f"Write a python function `{node.name}` to {summary[0].lower()}{summary[1:]}.",
                                "response": f"```python\n{code}\n```"})
    return records, [p.name for p in files]


def build_corpus(work: Path) -> dict:
    records = []
    for line in (DATA / "gsm8k_train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        records.append({"source": "gsm8k", "prompt": row["question"], "response": row["answer"]})
    for line in (DATA / "instructions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        response = row["completion"].replace("<|endoftext|>", "").strip()   # the dataset's own end marker
        records.append({"source": "instructions", "prompt": row["prompt"].strip(), "response": response})
    code, files = stdlib_functions()
    records += code
    random.Random(0).shuffle(records)
    with (work / "corpus.jsonl").open("w", encoding="utf-8") as sink:
        for record in records:
            sink.write(json.dumps(record) + "\n")
    counts = {}
    for record in records:
        key = record["source"].split("/")[0]
        counts[key] = counts.get(key, 0) + 1
    return {"records": counts, "stdlib_python": sys.version.split()[0], "stdlib_files": files}


def read_corpus(work: Path) -> list:
    return [json.loads(line) for line in (work / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]


def chat_text(prompt: str, response: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"


# ----------------------------------------------------------------------------------- tokenizer
def build_tokenizer(work: Path, out: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TARGET["vocab_size"], special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [chat_text(r["prompt"], r["response"]) for r in read_corpus(work)]
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, additional_special_tokens=["<|im_start|>", "<|mask|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = TARGET["max_position_embeddings"]
    (out / "target").mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out / "target")
    return {"vocab_size": tokenizer.get_vocab_size()}


def load_tokenizer(out: Path):
    from dspark.models.checkpoint import load_tokenizer as load_directory_tokenizer

    return load_directory_tokenizer(out / "target")


# ----------------------------------------------------------------------------------- causal LMs
def token_stream(tokenizer, texts: list) -> torch.Tensor:
    ids = []
    for start in range(0, len(texts), 1000):
        for row in tokenizer(texts[start:start + 1000], add_special_tokens=False)["input_ids"]:
            ids += row + [tokenizer.pad_token_id]
    return torch.tensor(ids, dtype=torch.long)


def train_causal_lm(config_kwargs: dict, stream: torch.Tensor, steps: int, batch: int, seq_len: int, lr: float,
                    seed: int, tokenizer, out_dir: Path, label: str) -> dict:
    """Plain next-token training on random windows of a packed token stream, then save in bf16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    special = tokenizer.convert_tokens_to_ids(SPECIAL)
    config = Qwen3Config(**config_kwargs, bos_token_id=None, eos_token_id=special[2], pad_token_id=special[0])
    model = Qwen3ForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{label}: {parameters / 1e6:.1f} M parameters, {steps} steps x {batch} x {seq_len} tokens "
        f"(stream of {len(stream) / 1e6:.2f} M tokens)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(     # linear warm-up, cosine decay to 5 %
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    generator = torch.Generator().manual_seed(seed)
    started, window, history = time.perf_counter(), [], []
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
        x = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if step % 25 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            history.append({"step": step, "loss": sum(window) / len(window)})
            log(f"{label} step {step}/{steps} loss {history[-1]['loss']:.3f} "
                f"({step * batch * seq_len / elapsed:.0f} tok/s, ETA {elapsed / step * (steps - step):.0f} s)")
            window = []
    model.eval()
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": parameters, "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed,
            "final_loss": history[-1]["loss"], "loss_curve": history}


def build_target(work: Path, out: Path, steps: int) -> dict:
    tokenizer = load_tokenizer(out)
    # The instruction prompts are long texts with short answers: half of them is plenty.
    records = [r for i, r in enumerate(read_corpus(work)) if r["source"] != "instructions" or i % 2 == 0]
    stream = token_stream(tokenizer, [chat_text(r["prompt"], r["response"]) for r in records])
    return train_causal_lm(TARGET, stream, steps=steps, batch=16, seq_len=256, lr=2e-3, seed=0,
                           tokenizer=tokenizer, out_dir=out / "target", label="target")


# ----------------------------------------------------------------------------------- drafts
def training_prompts(work: Path, count: int, offset: int = 0) -> list:
    """Prompts for regeneration, balanced over the corpus sources (math, instructions, code)."""
    by_source = {}
    for record in read_corpus(work):
        by_source.setdefault(record["source"].split("/")[0], []).append(record["prompt"])
    per_source = count // len(by_source)
    prompts = []
    for source in sorted(by_source):
        prompts += by_source[source][offset:offset + per_source]
    return [{"id": i, "prompt": p} for i, p in enumerate(prompts)]


def regenerate_responses(work: Path, out: Path, count: int, max_new_tokens: int) -> dict:
    """Greedy responses for half the prompts, T = 1 samples for the other half."""
    import dspark
    from dspark.training.data import regenerate

    engine = dspark.Engine.from_pretrained(out / "target", backend="cpu", max_batch_size=32)
    prompts = training_prompts(work, count)
    greedy, sampled = prompts[0::2], prompts[1::2]
    path = work / "regenerated.jsonl"
    regenerate(engine, greedy, path, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=32, progress=log)
    regenerate(engine, sampled, path, max_new_tokens=max_new_tokens, temperature=1.0, batch_size=32, seed=1,
               progress=log)
    lengths = [len(json.loads(line)["response_ids"]) for line in path.read_text().splitlines()]
    return {"prompts": len(lengths), "response_tokens": sum(lengths), "max_new_tokens": max_new_tokens}


# Every draft sees the same regenerated data and a similar CPU-time budget, about 12 minutes on
# 2 cores (EAGLE-3's 7-step training-time test costs about 3x a parallel draft's step, so it gets
# fewer steps; the first build gave DSpark 240 and DFlash 240 steps, about half of EAGLE-3's time).
DRAFT_SETTINGS = {
    "dspark": dict(steps=420, draft_options={"num_layers": 1, "block_size": 7, "markov_rank": 128}),
    "dflash": dict(steps=480, draft_options={"num_layers": 1, "block_size": 7}),
    "eagle3": dict(steps=160, draft_options={"block_size": 7}),
}


def build_drafts(work: Path, out: Path, steps_override=None, algorithms=None, previous=None) -> dict:
    from dspark.models import load_draft, load_target
    from dspark.models.checkpoint import save_weights
    from dspark.models.drafts.io import SHARED_WITH_TARGET
    from dspark.training import TrainConfig, Trainer

    report = {k: v for k, v in (previous or {}).items() if k in DRAFT_SETTINGS}   # drafts not rebuilt now
    for algorithm, settings in DRAFT_SETTINGS.items():
        if algorithms and algorithm not in algorithms:
            continue
        settings = dict(settings, steps=steps_override or settings["steps"])
        started = time.perf_counter()
        shutil.rmtree(work / f"draft-{algorithm}", ignore_errors=True)   # a fresh run, not a resume
        cfg = TrainConfig(target=str(out / "target"), data=str(work / "regenerated.jsonl"),
                          out=str(work / f"draft-{algorithm}"), algorithm=algorithm, steps=settings["steps"],
                          draft_options=settings["draft_options"], global_batch=16, micro_batch=8, lr=1e-3,
                          num_anchors=32, max_length=384, log_every=25, checkpoint_every=100, seed=0,
                          backend="cpu")
        Trainer(cfg, progress=log).train()
        target, _ = load_target(out / "target", torch.device("cpu"), torch.float32)
        draft = load_draft(work / f"draft-{algorithm}", target.config, target)
        ship = out / algorithm
        ship.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / f"draft-{algorithm}" / "config.json", ship / "config.json")
        draft.to(torch.bfloat16)
        save_weights(draft, ship, skip=SHARED_WITH_TARGET)   # the embedding and LM head come from the target
        report[algorithm] = {"steps": settings["steps"], "options": settings["draft_options"],
                             "seconds": round(time.perf_counter() - started, 1)}
    return report


def fit_sts(work: Path, out: Path, count: int) -> dict:
    import dspark
    from dspark.bench.sts import fit_from_engine
    from dspark.prompts import prompt_ids

    engine = dspark.Engine.from_pretrained(out / "target", draft=out / "dspark", backend="cpu", max_batch_size=16,
                                           schedule="fixed")
    prompts = training_prompts(work, count, offset=5000)     # not among the regenerated ones
    ids = [prompt_ids(p, engine.tokenizer) for p in prompts]
    report = fit_from_engine(engine, ids, dspark.SamplingParams(max_new_tokens=96, temperature=1.0, seed=3))
    config_path = out / "dspark" / "config.json"
    config = json.loads(config_path.read_text())
    config["confidence_temperatures"] = [round(float(t), 5) for t in report["temperatures"]]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"prompts": len(prompts), "rows": report["rows"], "before": report["before"], "after": report["after"]}


def build_assistant(work: Path, out: Path, steps: int) -> dict:
    tokenizer = load_tokenizer(out)
    texts = []
    for line in (work / "regenerated.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(tokenizer.decode(row["prompt_ids"] + row["response_ids"]) + "<|im_end|>\n")
    stream = token_stream(tokenizer, texts)
    return train_causal_lm(ASSISTANT, stream, steps=steps, batch=16, seq_len=256, lr=2e-3, seed=1,
                           tokenizer=tokenizer, out_dir=out / "assistant", label="assistant")


# ----------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "dspark" / "reference_models"))
    parser.add_argument("--work", default=str(ROOT / "build" / "reference"), help="intermediate files")
    parser.add_argument("--redo", choices=STAGES, help="rebuild this stage and every later one")
    parser.add_argument("--only", choices=STAGES, help="run this stage alone (its inputs must exist)")
    parser.add_argument("--target-steps", type=int, default=800)
    parser.add_argument("--assistant-steps", type=int, default=300)
    parser.add_argument("--regenerate", type=int, default=2400, metavar="N", help="prompts to regenerate")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--algorithms", type=lambda text: text.split(","), metavar="LIST",
                        help="with --only drafts: rebuild only these drafts, e.g. dspark,dflash")
    parser.add_argument("--draft-steps", type=int, metavar="N", help="override every draft's training steps "
                                                                     "(small values: a smoke test of the pipeline)")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    manifest_path = out / "BUILD.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"stages": {}}
    if args.redo:
        for stage in STAGES[STAGES.index(args.redo):]:
            manifest["stages"].pop(stage, None)
    runners = {
        "corpus": lambda: build_corpus(work),
        "tokenizer": lambda: build_tokenizer(work, out),
        "target": lambda: build_target(work, out, args.target_steps),
        "regenerate": lambda: regenerate_responses(work, out, args.regenerate, args.max_new_tokens),
        "drafts": lambda: build_drafts(work, out, args.draft_steps, args.algorithms,
                                       manifest["stages"].get("drafts")),
        "sts": lambda: fit_sts(work, out, 96),
        "assistant": lambda: build_assistant(work, out, args.assistant_steps),
    }
    for stage in STAGES:
        if args.only and stage != args.only:
            continue
        if stage in manifest["stages"] and not args.only:
            log(f"[{stage}] done earlier ({manifest['stages'][stage]['seconds']} s); skipping")
            continue
        log(f"[{stage}] ...")
        started = time.perf_counter()
        result = runners[stage]()
        result["seconds"] = round(time.perf_counter() - started, 1)
        if stage == "drafts":      # a partial rebuild keeps the other drafts' times: report the sum
            result["seconds"] = round(sum(v["seconds"] for v in result.values() if isinstance(v, dict)), 1)
        manifest["stages"][stage] = result
        manifest.update(torch=torch.__version__, python=sys.version.split()[0],
                        command="python tools/build_reference.py " + " ".join(sys.argv[1:]))
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        log(f"[{stage}] finished in {result['seconds']} s")
    total = sum(s["seconds"] for s in manifest["stages"].values())
    log(f"reference models in {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB); "
        f"build time {total / 60:.1f} min")


if __name__ == "__main__":
    main()
