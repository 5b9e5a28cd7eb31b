import os

import pytest
import torch

# Without a GPU, Triton can only run interpreted, and it decides that when it is first imported
# (transformers imports it): set it before anything does, for tests/test_triton_kernels.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dspark.conformance.testing import make_agreeing_draft, make_target  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_target(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=1)


@pytest.fixture(scope="session")
def llama_target(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("llama"), "llama", seed=2)


@pytest.fixture(scope="session")
def bigram_qwen3(tmp_path_factory):
    """(target, agreeing draft): a mostly-bigram Qwen3 target and a draft that knows the bigram."""
    target = make_target(tmp_path_factory.mktemp("bigram_qwen3"), "qwen3", seed=3, context_scale=0.15,
                         logit_scale=8.0)
    return target, make_agreeing_draft(target, tmp_path_factory.mktemp("bigram_qwen3_draft"))


@pytest.fixture(scope="session")
def bigram_llama(tmp_path_factory):
    target = make_target(tmp_path_factory.mktemp("bigram_llama"), "llama", seed=4, context_scale=0.15,
                         logit_scale=8.0)
    return target, make_agreeing_draft(target, tmp_path_factory.mktemp("bigram_llama_draft"), block_size=5)


@pytest.fixture(scope="session")
def random_draft(tmp_path_factory, qwen3_target):
    import dspark

    return dspark.init_draft(qwen3_target, tmp_path_factory.mktemp("random_draft"), num_layers=1, markov_rank=16)
