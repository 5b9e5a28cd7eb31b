"""Training beyond one process: the frozen target sharded over two CPU processes (gloo, FSDP2)
selects the same target tensors and trains the same draft as one process holding it whole.

The two processes are spawned here (world size 2, rendezvous over localhost); each runs the
real `Trainer` on the tiny reference target twice, with the target whole and with
`shard_target=True`, and reports what it held; the parent compares the two drafts.
"""
import json
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dspark.errors import ConfigError
from dspark.models import load_draft, load_target, reference_model_dir
from dspark.training import TrainConfig, Trainer, train
from dspark.training.distributed import is_sharded, local_fraction
from dspark.training.features import LSE_CHUNK, target_features

WORLD = 2
DRAFT_VOCAB = 1024          # a reduced draft vocabulary: the log-sum-exp path calls the target's LM head


def write_corpus(path, vocab: int) -> None:
    """Token-id conversations of uneven lengths: one rank's micro-batch spans more than one
    log-sum-exp chunk while the other's does not (the LM head stays whole for that reason)."""
    rng = random.Random(0)
    lengths = [300, 40, 60, 30, 90, 20, 50, 70]
    with open(path, "w") as sink:
        for number, length in enumerate(lengths):
            record = {"id": number, "prompt_ids": [rng.randrange(vocab) for _ in range(6)],
                      "response_ids": [rng.randrange(64) for _ in range(length)]}
            sink.write(json.dumps(record) + "\n")


def settings(tmp_path) -> dict:
    target = reference_model_dir("target")
    write_corpus(tmp_path / "data.jsonl", json.loads((target / "config.json").read_text())["vocab_size"])
    return dict(target=str(target), data=str(tmp_path / "data.jsonl"), steps=3, global_batch=4, micro_batch=1,
                lr=3e-3, num_anchors=8, log_every=1, checkpoint_every=1000, seed=5,
                draft_options={"num_layers": 1, "block_size": 4, "markov_rank": 16, "draft_vocab_size": DRAFT_VOCAB})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, config: dict, out: str) -> None:
    """One of the spawned processes: train once with the whole target on each process and once
    with it sharded, and report what this rank held while sharded. The backend's prepacked
    inference kernels are turned off in this process so that both runs multiply the same way
    (sharding runs every product as F.linear on the all-gathered weights)."""
    from dspark.backends.cpu import CPUBackend

    CPUBackend.inference_linear = lambda self, weights, biases: None
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig(**config, out=os.path.join(out, "whole")), progress=lambda m: None)
    trainer = Trainer(TrainConfig(**config, out=os.path.join(out, "sharded"), shard_target=True),
                      progress=lambda m: None)
    target = trainer.target
    report = {"sharded": [n for n, p in target.named_parameters() if is_sharded(p)],
              "whole": [n for n, p in target.named_parameters() if not is_sharded(p)],
              "fraction": local_fraction(target)}
    # The sharded target selects the same tensors as the whole one, bit for bit.
    whole, _ = load_target(reference_model_dir("target"), torch.device("cpu"), torch.float32)
    rows = LSE_CHUNK + 40 if rank == 0 else 12             # a rank-dependent number of LM head chunks
    ids = torch.randint(0, 64, (1, rows), generator=torch.Generator().manual_seed(rank))
    layers = trainer.draft.config.target_layer_ids
    got = target_features(target, trainer.backend, ids, torch.tensor([rows]), layers, with_lse=True)
    want = target_features(whole, trainer.backend, ids, torch.tensor([rows]), layers, with_lse=True)
    report["features_equal"] = all(torch.equal(a, b) for a, b in zip(got, want))
    trainer.train()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as sink:
        json.dump(report, sink)
    dist.destroy_process_group()


def test_sharded_target_training_matches_the_unsharded_run(tmp_path):
    """Two processes (data parallel), the target whole on each vs sharded over both: the same
    draft, bit for bit. (Two processes against one, which only reorders the gradient sum, is
    tests/test_training.py::test_two_processes_match_one_process.)"""
    mp.spawn(worker, args=(free_port(), settings(tmp_path), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["features_equal"], rank
        assert "model.embed_tokens.weight" in report["sharded"] and report["whole"] == ["lm_head.weight"]
        assert any(name.startswith("model.layers.") for name in report["sharded"])
        assert report["fraction"] < 0.75           # half of everything but the LM head
    init = load_draft(tmp_path / "sharded" / "init", None).state_dict()
    whole = load_draft(tmp_path / "whole", None).state_dict()
    sharded = load_draft(tmp_path / "sharded", None).state_dict()
    assert whole.keys() == sharded.keys()
    assert all(torch.equal(whole[name], sharded[name]) for name in whole)
    # Training moved the draft, so the equality means something.
    assert max(float((whole[n] - init[n]).abs().max()) for n in whole if whole[n].is_floating_point()) > 1e-3


def test_shard_target_settings_are_checked(tmp_path):
    base = dict(target="t", data="d", out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="shard_target must be true or false"):
        TrainConfig(**base, shard_target="yes").validate()
    with pytest.raises(ConfigError, match="shard_target applies to online features"):
        TrainConfig(**base, shard_target=True, features="cached").validate()
