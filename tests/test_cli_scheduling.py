"""`dspark calibrate`, `dspark sts` and `dspark simulate` end to end on tiny models."""
import json

import pytest
import yaml

from dspark.cli import main
from dspark.scheduling.cost_model import CostModel


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_calibrate_writes_a_believable_profile_the_engine_uses(tmp_path, capsys, bigram_qwen3):
    target, draft = bigram_qwen3
    out = tmp_path / "cpu.yaml"
    code, stdout, stderr = run(capsys, "calibrate", "--target", target, "--draft", draft, "--out", str(out),
                               "--max-batch-size", "4", "--repeats", "2", "--context-lens", "16,64")
    assert code == 0 and "[1/" in stderr and "verify B=" in stderr     # progress display
    profile = CostModel.from_yaml(out)
    assert profile.source == "measured" and profile.context_lens == [16, 64]
    assert profile.verify_tokens[0] == 1 and profile.verify_tokens[-1] == 4 * 5
    assert all(t > 0 for row in profile.verify_seconds for t in row) and len(profile.draft_seconds) == 3
    assert yaml.safe_load(out.read_text())["meta"]["backend"] == "cpu"
    code, stdout, _ = run(capsys, "generate", "--target", target, "--draft", draft, "--prompt-ids", "1,2,3",
                          "--max-new-tokens", "12", "--ignore-eos", "--schedule", "budget", "--cost-profile",
                          str(out), "--json")
    assert code == 0 and len(json.loads(stdout)["outputs"][0]["token_ids"]) == 12


def test_sts_fits_and_writes_temperatures(tmp_path, capsys, bigram_qwen3):
    import shutil

    target, draft = bigram_qwen3
    local = tmp_path / "draft"
    shutil.copytree(draft, local)
    code, stdout, _ = run(capsys, "sts", "--target", target, "--draft", str(local), "--num-prompts", "16",
                          "--max-new-tokens", "24", "--write", "--json")
    assert code == 0
    document = json.loads(stdout)
    assert len(document["temperatures"]) == 4 and all(t > 0 for t in document["temperatures"])
    assert document["held_out_after"][0]["count"] > 0
    assert json.loads((local / "config.json").read_text())["confidence_temperatures"] == document["temperatures"]


def test_simulate_prints_a_table_and_a_plot(tmp_path, capsys, qwen3_target, random_draft):
    png = tmp_path / "sim.png"
    code, stdout, _ = run(capsys, "simulate", "--device", "h100", "--target", qwen3_target, "--draft",
                          random_draft, "--acceptance", "0.9,0.8,0.7", "--concurrency", "1,16,256", "--rounds", "8",
                          "--plot", str(png))
    assert code == 0 and "| 256 |" in stdout and png.stat().st_size > 10_000
    code, stdout, _ = run(capsys, "simulate", "--device", "ascend-910b", "--target", qwen3_target,
                          "--acceptance", "0.9,0.8", "--concurrency", "4", "--rounds", "4", "--json")
    rows = json.loads(stdout)["rows"]
    assert {r["mode"] for r in rows} >= {"none", "fixed-1", "fixed-2", "threshold", "causal", "budget"}


@pytest.mark.parametrize("argv,message", [
    (["simulate", "--device", "h100", "--acceptance", "0.9"], "--device needs --target"),
    (["simulate", "--profile", "/nope.yaml", "--acceptance", "0.9"], "does not exist"),
    (["simulate", "--device", "h100", "--target", "/nope", "--acceptance", "0.9"], "does not exist"),
])
def test_scheduling_commands_report_bad_input(capsys, argv, message):
    code, _, stderr = run(capsys, *argv)
    assert code == 2 and message in stderr and "Traceback" not in stderr


def test_simulate_rejects_bad_acceptance(capsys, qwen3_target):
    code, _, stderr = run(capsys, "simulate", "--device", "h100", "--target", qwen3_target, "--acceptance", "1.5")
    assert code == 2 and "acceptance" in stderr
