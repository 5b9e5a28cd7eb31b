"""Every kind of bad input gets a clear error that says what is wrong and how to fix it."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dspark
from dspark import CheckpointError, DraftMismatchError, SamplingParams
from dspark.conformance.testing import make_target


def test_missing_and_wrong_paths(tmp_path, qwen3_target):
    with pytest.raises(CheckpointError, match="does not exist"):
        dspark.Engine.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        dspark.Engine.from_pretrained(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        dspark.Engine.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(CheckpointError, match="draft directory .* does not exist"):
        dspark.Engine.from_pretrained(qwen3_target, draft=tmp_path / "no_draft")
    with pytest.raises(CheckpointError, match="Did you pass the target directory as the draft"):
        dspark.Engine.from_pretrained(qwen3_target, draft=qwen3_target)


def test_target_and_draft_swapped(random_draft, qwen3_target):
    with pytest.raises(CheckpointError, match="is a draft model directory"):
        dspark.Engine.from_pretrained(random_draft, draft=qwen3_target)


def test_draft_for_another_target_is_rejected(tmp_path, qwen3_target):
    other_vocab = make_target(tmp_path / "v80", vocab=80, seed=7)
    wider = make_target(tmp_path / "h48", hidden=48, seed=8)
    for other, message in ((other_vocab, "vocabulary size 80 != target's 64"), (wider, "hidden size 48 != target's 32")):
        draft = dspark.init_draft(other, tmp_path / f"draft_{message[:5]}", num_layers=1, markov_rank=8)
        with pytest.raises(DraftMismatchError, match=message) as info:
            dspark.Engine.from_pretrained(qwen3_target, draft=draft)
        assert "init-draft" in str(info.value)


def test_corrupt_and_incomplete_weights(tmp_path, qwen3_target):
    broken = tmp_path / "broken"
    shutil.copytree(qwen3_target, broken)
    weights_file = broken / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        dspark.Engine.from_pretrained(broken)

    partial = tmp_path / "partial"
    shutil.copytree(qwen3_target, partial)
    weights = load_file(str(partial / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(partial / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensors .*layers.1.mlp.up_proj"):
        dspark.Engine.from_pretrained(partial)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(partial / "config.json", no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights .*safe_serialization"):
        dspark.Engine.from_pretrained(no_weights)

    bad_json = tmp_path / "bad_json"
    shutil.copytree(qwen3_target, bad_json)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        dspark.Engine.from_pretrained(bad_json)


def test_unsupported_architecture(tmp_path, qwen3_target):
    other = tmp_path / "gpt2ish"
    shutil.copytree(qwen3_target, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported .*qwen3"):
        dspark.Engine.from_pretrained(other)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-3), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(seed="abc"), "seed"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_sampling_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_invalid_engine_options(qwen3_target):
    with pytest.raises(ValueError, match="unknown engine option.*valid: dtype"):
        dspark.Engine.from_pretrained(qwen3_target, max_batch=3)
    with pytest.raises(ValueError, match="dtype must be"):
        dspark.Engine.from_pretrained(qwen3_target, dtype="float8")
    with pytest.raises(ValueError, match="unknown schedule 'magic'"):
        dspark.Engine.from_pretrained(qwen3_target, schedule="magic")
    with pytest.raises(ValueError, match="threshold.*confidence head"):
        dspark.Engine.from_pretrained(qwen3_target, schedule="threshold")
    with pytest.raises(ValueError, match="unknown draft option.*valid"):
        dspark.init_draft(qwen3_target, "/tmp/unused", blocksize=4)
    with pytest.raises(ValueError, match="unknown draft algorithm 'medusa'; valid: dspark, dflash"):
        dspark.init_draft(qwen3_target, "/tmp/unused", algorithm="medusa")


def test_bad_prompts_fail_before_any_work(qwen3_target):
    engine = dspark.Engine.from_pretrained(qwen3_target, max_model_len=32)
    with pytest.raises(ValueError, match="prompt 1 has 40 tokens but the context holds 32"):
        engine.generate([[1, 2], [3] * 40])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 64]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.generate(["hello"])
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        engine.generate([[1], [2]], [SamplingParams()])
    # The engine still works after refusing bad input.
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_nan_logits_fail_that_request_alone(tmp_path, qwen3_target, random_draft):
    """A request whose logits turn NaN (here: its prompt holds a token whose embedding is NaN)
    ends with finish_reason "error" and the reason; the requests beside it are unaffected."""
    poisoned = tmp_path / "nan"
    shutil.copytree(qwen3_target, poisoned)
    weights = load_file(str(poisoned / "model.safetensors"))
    weights["model.embed_tokens.weight"][63] = float("nan")
    save_file(weights, str(poisoned / "model.safetensors"))
    prompts = [[1, 2, 3], [5, 63, 7], [9, 8]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    for draft in (None, random_draft):
        clean = dspark.Engine.from_pretrained(qwen3_target, draft=draft).generate([prompts[0], prompts[2]], params)
        outputs = dspark.Engine.from_pretrained(poisoned, draft=draft, max_batch_size=3).generate(prompts, params)
        assert outputs[1].finish_reason == "error" and "NaN or infinite logits" in outputs[1].error
        assert [outputs[0].token_ids, outputs[2].token_ids] == [c.token_ids for c in clean]
        assert outputs[0].finish_reason == outputs[2].finish_reason == "length"

