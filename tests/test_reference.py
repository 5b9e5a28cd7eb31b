"""The built-in reference models, `dspark demo` and the `dspark bench` harness."""
import json
from dataclasses import replace
import subprocess
import sys

import pytest
import torch

import dspark
from dspark.bench import LosslessError, LosslessLedger, Models, load_prompt_sets
from dspark.bench.report import BEGIN, END, splice_markdown
from dspark.errors import ConfigError
from dspark.params import SamplingParams
from dspark.models.reference import SMOLLM2_DRAFTS, TINY_MODELS, reference_build_info, reference_model_dir


def test_every_reference_model_is_shipped_and_small():
    sizes = {}
    for name in TINY_MODELS:
        directory = reference_model_dir(name)
        assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
        sizes[name] = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert sum(sizes.values()) < 60e6, sizes
    info = reference_build_info()
    assert set(info["stages"]) == {"corpus", "tokenizer", "target", "regenerate", "drafts", "sts", "assistant"}


def test_smollm2_drafts_are_shipped_in_bf16_without_the_shared_embedding_and_under_80_mb():
    from safetensors import safe_open

    total = 0
    for name in SMOLLM2_DRAFTS:
        directory = reference_model_dir(name)
        config = json.loads((directory / "config.json").read_text())
        assert config["draft_vocab_size"] < config["vocab_size"]           # a reduced draft vocabulary
        with safe_open(str(directory / "model.safetensors"), "pt") as weights:
            names = list(weights.keys())
            assert not any(n.endswith("embed_tokens.weight") for n in names)   # shared with the target
            floats = [weights.get_slice(n).get_dtype() for n in names if n not in ("d2t", "t2d")]
            assert set(floats) == {"BF16"}, set(floats)
        total += sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert total < 80e6, total
    stages = reference_build_info()["smollm2"]["stages"]
    budgets = {stages["drafts"][a]["budget_minutes"] for a in ("dspark", "dflash", "eagle3")}
    assert len(budgets) == 1                                                # the same CPU budget for each


def test_unknown_reference_model_is_a_clear_error():
    with pytest.raises(ValueError, match="valid: smollm2, smollm2-dspark"):
        reference_model_dir("medusa")


def test_reference_target_matches_transformers():
    from transformers import AutoModelForCausalLM

    directory = reference_model_dir("target")
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    engine = dspark.Engine.from_pretrained(directory, backend="cpu", dtype="float32", max_batch_size=2)
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=False)
               for text in ("What is 7 times 8?", "Write a python function to reverse a list.")]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=24))
    for prompt, out in zip(prompts, ours):
        ids = engine.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=engine.tokenizer.eos_token_id,
                                 pad_token_id=engine.tokenizer.pad_token_id)
        assert out.token_ids == theirs[0, ids.shape[1]:].tolist()
    assert "<|im_start|>assistant\n" in prompts[0]


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_reference_drafts_are_trained_and_lossless(algorithm):
    """Greedy identity with plain decoding, and an acceptance well above an untrained draft's
    (tau is deterministic for greedy decoding: untrained drafts of each algorithm reach 1.00 on
    these prompts, the drafts of the first build 1.86-2.11)."""
    target = reference_model_dir("target")
    prompts = ["Tom has 3 apples and buys 5 more. How many apples does he have now?",
               "Write a python function `add` to add two numbers."]
    plain = dspark.Engine.from_pretrained(target, backend="cpu", max_batch_size=2)
    spec = dspark.Engine.from_pretrained(target, draft=reference_model_dir(algorithm), backend="cpu",
                                         max_batch_size=2)
    chat = [plain.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=False) for p in prompts]
    params = SamplingParams(max_new_tokens=40)
    expected = [o.token_ids for o in plain.generate(chat, params)]
    outputs = spec.generate(chat, params)
    assert [o.token_ids for o in outputs] == expected
    rounds = sum(o.stats["rounds"] for o in outputs)
    tau = sum(o.stats["tau"] * o.stats["rounds"] for o in outputs) / rounds
    assert tau > 1.5, f"{algorithm} draft accepts only tau={tau:.2f}: is it trained?"


def test_reference_dspark_draft_carries_sts_temperatures():
    config = json.loads((reference_model_dir("dspark") / "config.json").read_text())
    temperatures = config["confidence_temperatures"]
    assert len(temperatures) == config["block_size"] and all(t > 0 for t in temperatures)


@pytest.mark.parametrize("schedule", ["fixed", "budget"])
def test_demo_runs_and_reports_identical_outputs(schedule):
    result = subprocess.run([sys.executable, "-m", "dspark", "demo", "--model", "tiny", "--json", "--max-new-tokens", "32",
                             "--backend", "cpu", "--schedule", schedule], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["identical"] is True
    assert summary["tau"] > 2.0 and summary["tokens"] > 0
    assert summary["plain_tokens_per_s"] > 0 and summary["dspark_tokens_per_s"] > 0


# ------------------------------------------------------------------------------- the harness
def test_lossless_ledger_fails_on_a_real_mismatch_and_passes_identical_outputs():
    models = Models.load(reference_model_dir("target"), {}, backend="cpu")
    prompt = models.encode("What is 12 plus 30?")
    plain = models.engine(max_batch_size=1).generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
    ledger = LosslessLedger(models)
    ledger.check("identical", [prompt], [plain], [list(plain)])
    broken = list(plain)
    broken[5] = (broken[5] + 1) % models.target.config.vocab_size
    with pytest.raises(LosslessError, match="differs from plain decoding at token 5"):
        ledger.check("broken", [prompt], [plain], [broken])
    assert ledger.compared == 2


def test_prompt_sets_read_known_files_and_extra_jsonl(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"turns": ["a?"]}) + "\n" + json.dumps({"turns": ["b?"]}) + "\n")
    extra = tmp_path / "mine.jsonl"
    extra.write_text(json.dumps({"turns": ["c?", "second turn"]}) + "\n")
    assert load_prompt_sets(tmp_path, [extra], limit=1) == {"gsm8k": ["a?"], "mine": ["c?"]}
    with pytest.raises(FileNotFoundError, match="no evaluation prompts found"):
        load_prompt_sets(None, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_sets(tmp_path / "missing", [])


def test_splice_markdown_replaces_only_the_bench_section(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## other section\nkept\n")
    splice_markdown(doc, f"{BEGIN}\nnew\n{END}\n")
    text = doc.read_text()
    assert "new" in text and "old" not in text and "## other section\nkept" in text and text.startswith("# Bench")
    fresh = tmp_path / "fresh.md"
    splice_markdown(fresh, f"{BEGIN}\nx\n{END}\n")
    assert fresh.read_text() == f"{BEGIN}\nx\n{END}\n"


def test_bench_quick_runs_every_section_losslessly(tmp_path):
    """`dspark bench --quick`, cut further to fit the suite's time (one prompt per set, 12 tokens,
    two loads): every section, the lossless ledger, a results JSON and Markdown tables."""
    result = subprocess.run([sys.executable, "-m", "dspark", "bench", "--quick", "--out", str(tmp_path),
                             "--backend", "cpu", "--prompts-per-dataset", "1", "--max-new-tokens", "12",
                             "--concurrency", "1,4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["lossless"]["mismatches"] == 0 and results["lossless"]["outputs_compared"] > 0
    assert set(results["acceptance"]) == {"gsm8k", "math500", "humaneval", "mbpp", "mt-bench"}
    for per in results["acceptance"].values():
        assert set(per) == {"dspark", "dflash", "eagle3"}
        assert all(per[a]["T=0"]["tau"] >= 1.0 for a in per)
    methods = [r["method"] for r in results["speed"]]
    assert "transformers generate()" in methods and "transformers assisted generation" in methods
    assert all(r["identical_to_plain"].split("/")[0] == r["identical_to_plain"].split("/")[1]
               for r in results["speed"] if r["method"].startswith("dspark"))
    assert [r["concurrency"] for r in results["concurrency"]] == [1, 4]
    markdown = (tmp_path / "results.md").read_text()
    assert "macro average" in markdown and "x transformers generate()" in markdown and "| requests |" in markdown


def test_bench_labels_and_lengths_follow_each_drafts_own_block(tmp_path):
    """A block-4 DSpark draft beside a block-7 DFlash one: the speed rows name each draft's whole
    block ("fixed 4" / "fixed 7"), fixed lengths past a draft's block are capped at it instead of
    timing the same schedule twice under a wrong name, and the acceptance report names both blocks
    and leaves the positions a draft does not have empty (it used to index past them)."""
    from dspark.bench import harness
    from dspark.bench.report import acceptance_tables
    from dspark.models.drafts.io import init_draft

    block4 = init_draft(reference_model_dir("target"), tmp_path / "block4", "dspark", block_size=4)
    models = Models.load(reference_model_dir("target"), {"dspark": block4, "dflash": reference_model_dir("dflash")},
                         backend="cpu")
    assert (models.block_size("dspark"), models.block_size("dflash")) == (4, 7)
    assert models.full_block_label("dspark") == "dspark + DSpark, fixed 4"
    assert models.full_block_label("dflash") == "dspark + DFlash, fixed 7"
    assert harness.fixed_lengths([1, 3, 5, 7], 4) == [1, 3, 4]
    settings = harness.BenchSettings(prompts_per_dataset=1, max_new_tokens=4, speed_prompts=1, speed_max_new_tokens=4,
                                     concurrency=[1], fixed_lengths=[3, 7], repeats=1)
    labels = [label for label, _, _ in harness.concurrency_modes(models, settings, None)]
    assert {"fixed 3", "fixed 4", "DFlash fixed 3", "DFlash fixed 7"} <= set(labels)
    assert "fixed 7" not in labels
    # --modes keeps only the named groups, plain decoding always; the calibrated profile is not
    # even computed when its mode is not timed.
    chosen = replace(settings, modes=["budget", "dflash"])
    labels = [label for label, _, _ in harness.concurrency_modes(models, chosen, "profile.yaml")]
    assert labels == ["no speculation", "budget", "DFlash fixed 3", "DFlash fixed 7", "DFlash budget (margin)"]
    assert harness.calibrated_profile(models, chosen, []) is None
    with pytest.raises(ConfigError, match="unknown concurrency mode.*'budgte'.*valid: fixed"):
        harness.check_concurrency_modes(["budget", "budgte"])

    def stats(positions):
        return {"tau": 1.5, "rounds": 10, "position_acceptance": positions}

    results = {"settings": {"block_size": 7, "temperatures": [0.0]}, "block_sizes": {"dspark": 4, "dflash": 7},
               "datasets": {"gsm8k": 1},
               "acceptance": {"gsm8k": {"dspark": {"T=0": stats([0.5, 0.4, 0.3, 0.2])},
                                        "dflash": {"T=0": stats([0.3] * 7)}}}}
    text = "\n".join(acceptance_tables(results))
    assert "whole block verified: DSpark 4, DFlash 7" in text
    assert "| DSpark | T=0 | 0.50 | 0.40 | 0.30 | 0.20 | - | - | - |" in text
    assert "| DFlash | T=0 | " + " | ".join(["0.30"] * 7) + " |" in text
