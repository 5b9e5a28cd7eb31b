"""Careless and hostile command-line input (issue 18): the tools never lose a user's files, never
run code from a checkpoint, never ignore what was asked, and report bad input in one line.

Cases that depend on the process itself (a closed or full stdout, a reader that leaves, Ctrl-C,
an output path that is the target) run `python -m dspark ...` as a subprocess; the others call
`dspark.cli.main` in-process, which is the same code without the start-up cost. Every bad input
must end with exit status 2 and one `dspark: error: ...` line that names the file or the setting.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dspark
from dspark.cli import main
from dspark.conformance.testing import make_target

ROOT = Path(dspark.__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "DSPARK_BACKEND": "cpu", "PYTHONUNBUFFERED": "1"}
VOCAB = 64


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("robustness")


@pytest.fixture(scope="module")
def target(work):
    """A tiny Qwen3 without a tokenizer (vocab 64, 256 positions): prompts are token ids."""
    return make_target(work / "target", "qwen3", seed=1, max_positions=256)


@pytest.fixture(scope="module")
def data(work):
    """Training data in the regenerated form, for the tiny target."""
    generator = torch.Generator().manual_seed(0)
    path = work / "train.jsonl"
    lines = [json.dumps({"prompt_ids": torch.randint(0, VOCAB, (5,), generator=generator).tolist(),
                         "response_ids": torch.randint(0, VOCAB, (20,), generator=generator).tolist()})
             for _ in range(8)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def engine(target):
    return dspark.Engine.from_pretrained(target, max_batch_size=2)


def cli(*args, stdout=subprocess.PIPE, timeout=120) -> subprocess.CompletedProcess:
    """`python -m dspark ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "dspark", *map(str, args)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=ENV, timeout=timeout)


def assert_one_line_error(stderr: str, *names) -> str:
    """Exactly one `dspark: error:` line, no traceback, and it names each of `names`."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("dspark: error:")]
    assert len(errors) == 1, stderr
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def run_error(capsys, argv, *names) -> str:
    """In-process: `dspark ARGV` exits with status 2 and one line naming `names`."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    if any(line.startswith("dspark: error:") for line in captured.err.splitlines()):
        return assert_one_line_error(captured.err, *names)
    usage = captured.err.strip().splitlines()[-1]          # an argparse usage error
    assert "Traceback" not in captured.err and all(str(n) in usage for n in names), captured.err
    return usage


def run_ok(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


TRAIN = ("--steps", "2", "--global-batch", "2", "--micro-batch", "2", "--num-anchors", "4", "--num-layers", "1",
         "--block-size", "4", "--markov-rank", "4", "--log-every", "1", "--checkpoint-every", "1")


# ----------------------------------------------------------------------------- data lost or overwritten
def test_train_and_init_draft_refuse_to_overwrite_the_target(work, target, data):
    """`--out T` would replace the target's config.json and weights with a draft's."""
    victim = work / "victim_target"
    shutil.copytree(target, victim)
    before = snapshot(victim)
    result = cli("init-draft", "--target", victim, "--out", victim)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--out", victim)
    result = cli("train", "--target", victim, "--data", data, "--out", victim, *TRAIN)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--out", victim)
    assert snapshot(victim) == before


def test_outputs_that_cannot_be_written_are_refused_before_any_work(capsys, work, target, data):
    blocker = work / "a_file"
    blocker.write_text("not a directory\n")
    prompts = work / "prompts_ok.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n')
    run_error(capsys, ["init-draft", "--target", target, "--out", blocker], "--out", blocker)
    run_error(capsys, ["init-draft", "--target", target, "--out", work], "--out", "contains")  # holds the target
    run_error(capsys, ["train", "--target", target, "--data", data, "--out", blocker, *TRAIN], "--out", blocker)
    run_error(capsys, ["train", "--target", target, "--data", data, "--out", data.parent / "run" / ".." / data.name,
                       *TRAIN], "--out")
    run_error(capsys, ["regenerate", "--target", target, "--prompts", prompts, "--out", work], "--out", work)
    run_error(capsys, ["regenerate", "--target", target, "--prompts", prompts, "--out", blocker / "x.jsonl"],
              "--out", blocker)
    run_error(capsys, ["calibrate", "--target", target, "--out", work], "--out", work)
    run_error(capsys, ["calibrate", "--target", target, "--out", work / "profile.yaml", "--context-lens", "64,100000"],
              "--context-lens", "100000")


def test_calibrate_checks_out_before_measuring(work, target):
    """A measurement that cannot be saved must not be taken: nothing is loaded."""
    blocker = work / "calibrate_blocker"
    blocker.write_text("")
    started = time.perf_counter()
    result = cli("calibrate", "--target", target, "--out", blocker / "profile.yaml", "--max-batch-size", "1",
                 "--context-lens", "8", "--repeats", "1")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--out", blocker)
    assert "loading" not in result.stderr and "profiled" not in result.stderr
    assert time.perf_counter() - started < 60


def test_generate_with_stdout_closed_is_an_error(target):
    result = subprocess.run(f'exec "{sys.executable}" -m dspark generate --target "{target}" --prompt-ids 1,2 '
                            "--max-new-tokens 2 >&-", shell=True, stderr=subprocess.PIPE, text=True, env=ENV,
                            timeout=120)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "standard output")


def test_regenerate_resumes_by_prompt_and_refuses_other_settings_or_files(capsys, work):
    """Records are keyed by the prompt, not its line: after an edit the new prompt is generated,
    the kept ones are not redone; other settings and unrelated files are refused untouched."""
    target = dspark.models.reference_model_dir("target")
    prompts, out = work / "regen_prompts.jsonl", work / "regen.jsonl"
    a, b, c = [5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]
    common = ["regenerate", "--target", target, "--prompts", prompts, "--out", out, "--max-new-tokens", "3"]
    prompts.write_text("".join(json.dumps({"prompt_ids": ids}) + "\n" for ids in (a, b)))
    run_ok(capsys, common)
    prompts.write_text("".join(json.dumps({"prompt_ids": ids}) + "\n" for ids in (c, b)))   # a edited into c
    run_ok(capsys, common)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [r["prompt_ids"] for r in records if "prompt_ids" in r]
    assert sorted(map(tuple, pairs)) == sorted(map(tuple, (a, b, c)))      # c generated, b not twice
    before = out.read_bytes()
    run_error(capsys, [*common[:-1], "5"], "max_new_tokens")
    run_error(capsys, [*common, "--temperature", "0.7"], "temperature")
    assert out.read_bytes() == before
    unrelated = work / "notes.jsonl"
    unrelated.write_text('{"my": "notes"}\n')
    run_error(capsys, [*common[:-3], unrelated, "--max-new-tokens", "3"], unrelated)
    assert unrelated.read_text() == '{"my": "notes"}\n'


# ----------------------------------------------------------------------------- code execution, resume
class _Payload:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_train_resume_refuses_changes_damage_and_pickles(capsys, monkeypatch, work, target, data):
    out = work / "run"
    common = ["train", "--target", target, "--data", data, "--out", out, *TRAIN]
    run_ok(capsys, common)
    # The same run with its paths spelled another way is the same run.
    monkeypatch.chdir(work)
    run_ok(capsys, ["train", "--target", "./target", "--data", "train.jsonl", "--out", "./run/", *TRAIN])
    # Other settings: refused, naming them, suggesting --fresh; the recorded settings are kept.
    recorded = (out / "train_config.yaml").read_text()
    message = run_error(capsys, [*common, "--lr", "0.01", "--seed", "5"], "lr", "seed", "--fresh")
    assert "block_size" not in message
    run_error(capsys, [*common, "--block-size", "3"], "block_size", "--fresh")
    assert (out / "train_config.yaml").read_text() == recorded
    # A damaged (truncated) trainer state: one line naming the run and --fresh.
    longer = [*common, "--steps", "3"]
    checkpoint = out / "checkpoint"
    state_files = [p for p in checkpoint.rglob("*") if p.is_file() and p.name not in ("config.json",
                                                                                       "model.safetensors")]
    assert state_files
    for path in state_files:
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    run_error(capsys, longer, "--fresh")
    # A crafted pickle where an old checkpoint kept its state is never loaded.
    for path in state_files:
        path.unlink()
    marker = work / "code_ran"
    torch.save({"payload": _Payload(marker)}, checkpoint / "trainer.pt")
    code = main([str(a) for a in longer])
    captured = capsys.readouterr()
    assert not marker.exists(), "resuming unpickled a crafted trainer.pt"
    assert code == 2 and "--fresh" in captured.err, captured.err
    # --fresh starts over.
    run_ok(capsys, [*longer, "--fresh", "--lr", "0.01"])
    assert "lr: 0.01" in (out / "train_config.yaml").read_text()


def test_truncated_trainer_state_through_the_library(work, target, data):
    from dspark.errors import DSparkError
    from dspark.training import TrainConfig, train

    settings = dict(target=target, data=str(data), out=str(work / "lib_run"), steps=2, global_batch=2, micro_batch=2,
                    num_anchors=4, log_every=1, checkpoint_every=1,
                    draft_options={"num_layers": 1, "block_size": 4, "markov_rank": 4})
    train(TrainConfig(**settings), progress=lambda message: None)
    for path in (work / "lib_run" / "checkpoint").rglob("*"):
        if path.is_file() and path.suffix != ".json" and path.name != "model.safetensors":
            path.write_bytes(path.read_bytes()[:7])
    with pytest.raises(DSparkError, match="--fresh"):
        train(TrainConfig(**{**settings, "steps": 3}), progress=lambda message: None)


def test_a_hand_edited_trainer_state_is_one_error(tmp_path):
    from dspark.errors import DataError
    from dspark.training.state import STATE_FILE, load_trainer_state, save_trainer_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    save_trainer_state(tmp_path, optimizer, scheduler, 5, {})
    assert load_trainer_state(tmp_path, optimizer, scheduler) == 5
    good = json.loads((tmp_path / STATE_FILE).read_text())
    for edit in ({"optimizer_scalars": [1]}, {"optimizer_scalars": {"x": 1}}, {"param_groups": 5},
                 {"scheduler": []}, {"step": "x"}, {"param_groups": [{"betas": 3}]}):
        (tmp_path / STATE_FILE).write_text(json.dumps({**good, **edit}))
        with pytest.raises(DataError, match="--fresh"):
            load_trainer_state(tmp_path, optimizer, scheduler)


# ----------------------------------------------------------------------------- bad data, one line each
def test_training_data_errors_name_the_file_and_line(capsys, work, target, data):
    lines = data.read_text().splitlines()
    broken = work / "broken.jsonl"
    broken.write_text("\n".join([lines[0], lines[1], '{"prompt_ids": [1, 2], "response_ids": [3,', *lines[2:]]) + "\n")
    run_error(capsys, ["train", "--target", target, "--data", broken, "--out", work / "run_broken", *TRAIN],
              f"{broken}:3")
    outside = work / "outside.jsonl"
    outside.write_text("\n".join([lines[0], json.dumps({"prompt_ids": [1, 2], "response_ids": [3, 4, 100000]}),
                                  *lines[1:]]) + "\n")
    message = run_error(capsys, ["train", "--target", target, "--data", outside, "--out", work / "run_oov", *TRAIN],
                        f"{outside}:2", "100000")
    assert "vocabulary" in message
    folder = work / "data_folder"
    folder.mkdir()
    run_error(capsys, ["train", "--target", target, "--data", folder, "--out", work / "run_folder", *TRAIN], folder)
    run_error(capsys, ["regenerate", "--target", target, "--prompts", folder, "--out", work / "folder.jsonl"], folder)


def test_prompt_file_errors_name_the_file_and_line(capsys, work, target):
    draft = dspark.models.reference_model_dir("dspark")
    reference = dspark.models.reference_model_dir("target")
    prompts = work / "sts_prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3, 4]}\n{"prompt_ids": [5, 6\n')
    run_error(capsys, ["sts", "--target", reference, "--draft", draft, "--prompts-file", prompts, "--num-prompts", "3"],
              f"{prompts}:3")
    outside = work / "outside_prompts.jsonl"
    outside.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3, 100000]}\n')
    message = run_error(capsys, ["regenerate", "--target", target, "--prompts", outside, "--out",
                                 work / "regen_outside.jsonl"], f"{outside}:2", "100000")
    assert "vocabulary" in message and not (work / "regen_outside.jsonl").exists()
    for bare in ("[1, 2, 3]", "42"):
        regen = work / "bare_prompts.jsonl"
        regen.write_text(f'{{"prompt_ids": [1, 2]}}\n{bare}\n')
        run_error(capsys, ["regenerate", "--target", target, "--prompts", regen, "--out", work / "bare.jsonl"],
                  f"{regen}:2")


# ----------------------------------------------------------------------------- settings never ignored
def test_out_of_range_settings_are_refused(capsys, work, target):
    prompts = work / "three_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": [i, i + 1]}) + "\n" for i in range(3)))
    run_error(capsys, ["regenerate", "--target", target, "--prompts", prompts, "--out", work / "limit.jsonl",
                       "--limit", "-1"], "--limit")
    run_error(capsys, ["generate", "--target", target, "--prompt-ids", "1,2", "--seed", str(2 ** 70)], "seed")
    run_error(capsys, ["regenerate", "--target", target, "--prompts", prompts, "--out", work / "temperature.jsonl",
                       "--temperature", "-1"], "temperature")
    assert not (work / "temperature.jsonl").exists()
    run_error(capsys, ["train", "--target", target, "--data", prompts, "--out", work / "nan_lr", "--lr", "nan"],
              "--lr")
    config = work / "run.yaml"
    config.write_text(f"target: {target}\nout: {work / 'yaml_run'}\nlr: [0.1\n")
    run_error(capsys, ["train", "--config", config], f"{config}:3")
    config.write_text(f"target: {target}\ndata: {prompts}\nout: {work / 'yaml_run'}\nlr: -1\n")
    run_error(capsys, ["train", "--config", config], "lr")
    run_error(capsys, ["simulate", "--device", "h100", "--target", target, "--acceptance", "0.8", "--rounds", "0"],
              "--rounds")
    run_error(capsys, ["simulate", "--device", "h100", "--target", target, "--acceptance", "0.8",
                       "--concurrency", "0"], "--concurrency")
    run_error(capsys, ["simulate", "--device", "h100", "--target", target, "--acceptance", "0.8",
                       "--concurrency", "1000000000"], "--concurrency", "GiB")
    run_error(capsys, ["simulate", "--device", "h100", "--target", target, "--acceptance", "0.8",
                       "--context-len", "1000000"], "--context-len", "max_position_embeddings")
    run_error(capsys, ["generate", "--target", target, "--prompt-ids", "1,2", "--max-model-len", "1000"],
              "max_model_len", "max_position_embeddings")


def test_library_refuses_bytes_prompts_huge_seeds_and_positions(engine, target):
    from dspark.errors import ConfigError, DataError

    with pytest.raises(DataError, match="prompt 0"):
        engine.generate([b"\x01\x02\x03"], dspark.SamplingParams(max_new_tokens=2))
    with pytest.raises(ConfigError, match="seed"):
        dspark.SamplingParams(seed=2 ** 70)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        dspark.Engine.from_pretrained(target, max_model_len=10 ** 9)


def test_absurd_sizes_are_checked_against_memory_first(work, target, data):
    from dspark.errors import ConfigError
    from dspark.training import TrainConfig, Trainer

    with pytest.raises(ConfigError, match="GiB"):
        dspark.Engine.from_pretrained(target, max_batch_size=10_000_000)
    reference = str(dspark.models.reference_model_dir("target"))       # an 8192-token vocabulary
    settings = dict(target=reference, data=str(data), out=str(work / "huge_block"), steps=1, global_batch=2,
                    micro_batch=2, num_anchors=512, max_length=4096,
                    draft_options={"num_layers": 1, "block_size": 100_000, "draft_vocab_size": 0})
    long_data = work / "long.jsonl"
    long_data.write_text(json.dumps({"prompt_ids": [1] * 5, "response_ids": [2] * 2000}) + "\n")
    settings["data"] = str(long_data)
    with pytest.raises(ConfigError, match="block_size"):
        Trainer(TrainConfig(**settings), progress=lambda message: None)


# ----------------------------------------------------------------------------- crash consistency
def test_atomic_writer_leaves_the_old_file_or_the_new_one(tmp_path):
    from dspark.files import atomic_output, write_text_atomic

    path = tmp_path / "profile.yaml"
    write_text_atomic(path, "old\n")

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        with atomic_output(path) as temporary:
            temporary.write_text("half of the ne")
            raise Crash
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.yaml"]     # no temporary left behind
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"


def test_init_draft_crash_leaves_no_config_without_weights(work, target, monkeypatch):
    """A crash while the weights are written must not leave a config.json that marks the
    directory as a complete draft (the trainer would then reuse the broken one forever)."""
    import dspark.models.checkpoint as checkpoint

    class Crash(Exception):
        pass

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 16)           # a torn file, then the process dies
        raise Crash

    out = work / "crashed_draft"
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(Crash):
        dspark.init_draft(target, out, num_layers=1, block_size=4, markov_rank=4, seed=0)
    monkeypatch.undo()
    assert not (out / "config.json").exists()
    assert not (out / "model.safetensors").exists()
    dspark.init_draft(target, out, num_layers=1, block_size=4, markov_rank=4, seed=0)     # a rerun just works
    dspark.Engine.from_pretrained(target, draft=out, max_batch_size=1)


# ----------------------------------------------------------------------------- the process: pipes and Ctrl-C
GENERATE_LONG = ("generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "240", "--ignore-eos")


def test_full_disk_behind_stdout_is_one_line(target):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        result = cli(*GENERATE_LONG, "--target", target, stdout=full)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "standard output")


def test_a_reader_that_leaves_ends_the_stream_quietly(target):
    """`dspark generate --stream | head -c 1`."""
    process = subprocess.Popen([sys.executable, "-m", "dspark", *GENERATE_LONG, "--target", target, "--stream"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert process.stdout.read(1)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "error" not in stderr, stderr
    assert code in (0, 141)


def test_ctrl_c_during_start_up_is_one_line(target):
    """Ctrl-C while Python imports (0.4 s in), while the target loads and while it generates. The
    last two wait for the line that starts that phase: a fixed 1.2 s delay came after the end of
    the whole run on a fast machine (240 tokens in 0.67 s)."""
    for when in (0.4, "loading target", "ready in"):
        process = subprocess.Popen([sys.executable, "-m", "dspark", *GENERATE_LONG, "--target", target],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        seen = ""
        if isinstance(when, float):
            time.sleep(when)
        else:
            while when not in seen:
                line = process.stderr.readline().decode()
                assert line, f"the run ended before {when!r}:\n{seen}"
                seen += line
        process.send_signal(signal.SIGINT)
        stderr = seen + process.stderr.read().decode()
        code = process.wait(timeout=60)
        assert "Traceback" not in stderr, f"at {when!r}:\n{stderr}"
        assert code == 130 and stderr.strip().splitlines()[-1] == "dspark: interrupted", stderr
