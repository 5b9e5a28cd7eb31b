"""The `dspark` command line, run in-process through `dspark.cli.main` on a tiny random Qwen3.

The target directory has no tokenizer, so prompts are token ids and outputs are ids.
"""
import json
import subprocess
import sys

import pytest
import torch
import transformers

import dspark
from dspark.backends import BACKENDS
from dspark.cli import main

GREEDY = ["--max-new-tokens", "12", "--ignore-eos", "--prompt-ids", "1,2,3", "--prompt-ids", "7,8"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli_target")
    transformers.Qwen3ForCausalLM(config).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def draft(target, tmp_path_factory):
    return dspark.init_draft(target, tmp_path_factory.mktemp("cli_draft"), num_layers=1, block_size=4,
                             markov_rank=8, seed=0)


def run_json(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def run_error(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    return captured.err


def test_info_json_lists_cpu(capsys, monkeypatch):
    monkeypatch.delenv("DSPARK_BACKEND", raising=False)
    report = run_json(capsys, ["info", "--json"])
    assert report["dspark"] == dspark.__version__
    assert report["backends"]["cpu"]["available"] is True
    assert report["backends"]["cpu"]["describe"]["name"] == "cpu"
    assert set(report["backends"]) == set(BACKENDS)
    for entry in report["backends"].values():
        assert entry["available"] or entry["reason"]
    assert report["selected_backend"]["resolves_to"] in BACKENDS
    assert {"dspark", "dflash"} <= set(report["draft_algorithms"])


def test_init_draft_writes_a_loadable_directory(capsys, target, tmp_path):
    out = tmp_path / "draft"
    report = run_json(capsys, ["init-draft", "--target", target, "--out", str(out), "--num-layers", "1",
                               "--block-size", "3", "--markov-rank", "8", "--target-layer-ids", "1,2",
                               "--seed", "1", "--json"])
    assert report == {"draft": str(out), "algorithm": "dspark"}
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["block_size"] == 3 and config["target_layer_ids"] == [1, 2] and config["markov_rank"] == 8

    assert main(["init-draft", "--target", target, "--out", str(tmp_path / "dflash"), "--algorithm", "dflash",
                 "--num-layers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "dflash")


def test_generate_greedy_is_identical_with_and_without_draft(capsys, target, draft):
    plain = run_json(capsys, ["generate", "--target", target, "--backend", "cpu", "--json", *GREEDY])
    speculative = run_json(capsys, ["generate", "--target", target, "--draft", draft, "--backend", "cpu",
                                    "--json", *GREEDY])
    assert plain["backend"] == speculative["backend"] == "cpu"
    assert [o["index"] for o in speculative["outputs"]] == [0, 1]
    for base, spec in zip(plain["outputs"], speculative["outputs"]):
        assert len(base["token_ids"]) == 12
        assert spec["token_ids"] == base["token_ids"]
        assert spec["text"] is None and spec["finish_reason"] == "length"
        assert spec["stats"]["rounds"] >= 1 and set(spec["stats"]) >= {"tau", "accepted", "verify_lens"}
    assert speculative["elapsed_s"] > 0


def test_plain_output_and_stream_match_json(capsys, target, draft):
    reference = run_json(capsys, ["generate", "--target", target, "--json", *GREEDY])
    ids = [o["token_ids"] for o in reference["outputs"]]

    assert main(["generate", "--target", target, "--draft", draft, *GREEDY]) == 0
    captured = capsys.readouterr()
    assert " ".join(map(str, ids[0])) in captured.out and " ".join(map(str, ids[1])) in captured.out
    assert "loading target" in captured.err and "loading draft" in captured.err and "tokens/s" in captured.err

    assert main(["generate", "--target", target, "--draft", draft, "--stream", "--max-new-tokens", "12",
                 "--ignore-eos", "--prompt-ids", "1,2,3"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in ids[0]]


def test_missing_target_is_a_clean_error(capsys, tmp_path):
    missing = str(tmp_path / "no_such_model")
    err = run_error(capsys, ["generate", "--target", missing, "--prompt-ids", "1,2"])
    assert "dspark: error:" in err and missing in err


def test_text_prompt_without_tokenizer(capsys, target):
    err = run_error(capsys, ["generate", "--target", target, "--prompt", "hello"])
    assert "tokenizer" in err and "token" in err


def test_bad_prompts_file_line(capsys, target, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"turns": ["hi"]}\n{"question": 1}\n')
    err = run_error(capsys, ["generate", "--target", target, "--prompts-file", str(prompts)])
    assert f"{prompts}:2" in err


def test_unknown_backend(capsys, target):
    err = run_error(capsys, ["generate", "--target", target, "--prompt-ids", "1", "--backend", "foo"])
    assert "foo" in err


def test_unavailable_backend_from_environment(capsys, monkeypatch, target):
    if BACKENDS["cuda"].is_available():
        pytest.skip("CUDA is available on this machine")
    monkeypatch.setenv("DSPARK_BACKEND", "cuda")
    err = run_error(capsys, ["generate", "--target", target, "--prompt-ids", "1"])
    assert "cuda" in err and "unavailable" in err


def test_python_m_dspark_help():
    result = subprocess.run([sys.executable, "-m", "dspark", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "init-draft" in result.stdout and "info" in result.stdout
