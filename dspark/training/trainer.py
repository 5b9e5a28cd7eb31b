"""The draft trainer: `dspark train`.

One loop for every registered draft algorithm; each brings its loss (`DraftAlgorithm.loss`). The frozen
target runs inside each step (online features: nothing is cached unless asked). Each
optimiser step consumes one global batch of sequences, fixed by the step number and the
seed, split across processes (`torchrun`; gradients all-reduced over gloo on CPU, the backend's
collective on accelerators) and across gradient-accumulation micro-batches. Every loss is a mean of
per-sequence losses and every random draw is seeded per (step, sequence), so the result
does not depend on how the batch is split, and a resumed run repeats an uninterrupted one.
"""
import importlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from ..errors import ConfigError, DataError
from ..yaml_config import read_config_yaml
from ..models import load_draft, load_target, save_draft
from ..files import check_output, refuse_changed_settings, write_text_atomic
from ..models.checkpoint import model_dir, read_config, target_config
from ..models.drafts.base import draft_algorithm
from ..models.drafts.config import DraftConfig, default_draft_sizes, draft_config_for_target
from ..models.drafts.io import draft_parameters, init_draft
from ..models.layers import prepare_for_inference
from .batch import TrainBatch
from .data import collate, global_batch_indices, load_conversations, select_draft_vocab
from .distributed import process_backend
from .features import FeatureCache, target_features
from .state import STATE_FILE, load_trainer_state, save_trainer_state


# Numeric settings checked by TrainConfig.validate: (name, smallest allowed, whether the smallest
# itself is allowed, largest).
TRAIN_NUMBERS = (("lr", 0, False, None), ("max_grad_norm", 0, False, None), ("weight_decay", 0, True, None),
                 ("warmup_ratio", 0, True, 1), ("ce_weight", 0, True, None), ("l1_weight", 0, True, None),
                 ("confidence_weight", 0, True, None), ("loss_decay", 0, True, None), ("ttt_decay", 0, True, None))


@dataclass
class TrainConfig:
    target: str = ""
    data: str = ""
    out: str = ""
    algorithm: str = "dspark"
    init: Optional[str] = None          # start from this draft directory instead of a fresh one
    draft_options: dict = field(default_factory=dict)   # init_draft options (num_layers, block_size, ...)
    steps: int = 200
    global_batch: int = 8               # sequences per optimiser step, over all processes
    micro_batch: int = 4                # sequences per forward on one process
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"             # fp32 | bf16 (autocast)
    num_anchors: int = 512
    anchor_density: Optional[float] = None   # at most this fraction of a response's positions as anchors
    max_length: int = 1024
    ce_weight: float = 0.1
    l1_weight: float = 0.9
    confidence_weight: float = 1.0
    loss_decay: float = 4.0
    ttt_steps: int = 7                  # eagle3
    ttt_decay: float = 0.8              # eagle3
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    backend: Optional[str] = None
    features: str = "online"            # online | cached (sharded safetensors in cache_dir)
    cache_dir: Optional[str] = None     # default: <out>/feature_cache
    # Layers a shared feature cache holds (a superset of this draft's); default: the draft's own.
    cache_layers: Optional[list] = None
    # Shard the frozen target over the processes (FSDP2, dspark.training.distributed) for
    # targets too large for one device; the trained draft is the same either way.
    shard_target: bool = False

    @property
    def data_files(self) -> list:
        """`data` is one JSONL path, a comma-separated list, or a YAML list."""
        items = self.data if isinstance(self.data, (list, tuple)) else str(self.data).split(",")
        return [str(item).strip() for item in items if str(item).strip()]

    def validate(self) -> None:
        for name in ("target", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"train config needs '{name}' (--{name} on the command line)")
        draft_algorithm(self.algorithm)          # an unknown name lists the registered ones
        if self.features not in ("online", "cached"):
            raise ConfigError(f"features must be 'online' or 'cached', got {self.features!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.anchor_density is not None and not 0 < self.anchor_density <= 1:
            raise ConfigError(f"anchor_density must be in (0, 1], got {self.anchor_density!r}")
        for name in ("steps", "global_batch", "micro_batch", "num_anchors", "max_length", "log_every",
                     "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.shard_target, bool):
            raise ConfigError(f"shard_target must be true or false, got {self.shard_target!r}")
        if self.shard_target and self.features == "cached":
            raise ConfigError("shard_target applies to online features: with features 'cached' the target runs "
                              "once, on rank 0, to build the cache; drop one of the two settings")
        if not isinstance(self.draft_options, dict):
            raise ConfigError(f"draft_options must be a mapping (num_layers, block_size, ...), got {self.draft_options!r}")
        # Numbers the optimiser or the loss would reject later, with a traceback.
        for name, low, low_allowed, high in TRAIN_NUMBERS:
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < low or (value == low and not low_allowed) or (high is not None and value > high):
                bound = (">= " if low_allowed else "> ") + str(low) + (f" and <= {high}" if high is not None else "")
                raise ConfigError(f"train setting {name} must be a finite number {bound}, got {value!r}")
        for name in ("seed", "ttt_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (name == "ttt_steps" and value < 1):
                raise ConfigError(f"train setting {name} must be an integer{' >= 1' if name == 'ttt_steps' else ''}, "
                                  f"got {value!r}")

    @classmethod
    def from_yaml(cls, path, **overrides) -> "TrainConfig":
        data = {} if path is None else read_config_yaml(cls, path, "train config")
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**data)
        config.validate()
        return config

    def check_output(self) -> Path:
        """The output guard for `out` (and a feature cache directory): not the target, the data or
        the initial draft, nor a folder holding one of them or a model that is not a draft; a
        directory this process can write. Cheap: run before anything is loaded."""
        inputs = [self.target, *self.data_files, self.init]
        if self.features == "cached" and self.cache_dir:
            check_output(self.cache_dir, "dir", flag="--cache-dir", inputs=inputs)
        return check_output(self.out, "dir", flag="--out", inputs=inputs, model="draft")


# ---------------------------------------------------------------------------- losses per algorithm
def training_loss(algorithm: str):
    """The loss a draft algorithm registered (`DraftAlgorithm.loss`, "module:function"); each
    takes (draft, batch, backend, generators, cfg) and returns (per-sequence losses [B], metrics)."""
    module, _, function = draft_algorithm(algorithm).loss.partition(":")
    return getattr(importlib.import_module(module), function)


# ---------------------------------------------------------------------------- the loop
RUN_RECORD = "train_config.yaml"     # the settings of the run in an --out directory


class Trainer:
    def __init__(self, cfg: TrainConfig, progress=None, fresh: bool = False):
        """fresh: discard an earlier run in `cfg.out` (its checkpoint, initial draft and log)
        instead of resuming it. Everything that can be checked without the models is checked
        first (settings, the output path, the data against the target's vocabulary, a resume's
        settings), so a mistake costs no loading and deletes nothing."""
        cfg.validate()
        self.cfg = cfg
        self.out = cfg.check_output()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if cfg.global_batch % self.world:
            raise ConfigError(f"global_batch {cfg.global_batch} must be divisible by the {self.world} processes")
        self.progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
        target_dir = model_dir(cfg.target, "target")
        vocab_size = target_config(read_config(target_dir, "target"), str(target_dir / "config.json")).vocab_size
        self.examples = [e for path in cfg.data_files for e in load_conversations(path, cfg.max_length, vocab_size)]
        if fresh:
            for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "init"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        else:
            self._check_resumable()
        self.backend = process_backend(cfg.backend)     # under torchrun: the device LOCAL_RANK
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(self.backend.collective_backend)
        sharded = cfg.shard_target and self.world > 1
        # A target to be sharded is read into host memory first; sharding moves each
        # process's share onto the device (dspark.training.distributed).
        self.target, _ = load_target(target_dir, torch.device("cpu") if sharded else self.backend.device,
                                     torch.float32)
        for p in self.target.parameters():
            p.requires_grad_(False)
        prepare_for_inference(self.target, self.backend)       # frozen: the backend's inference kernels
        if self.is_main:
            self._record_settings()
        self.draft = self._make_draft()
        self.trainable = [p for p in self.draft.parameters() if p.requires_grad]
        if self.world > 1:
            for p in self.trainable:              # every process starts from rank 0's weights
                dist.broadcast(p.data, src=0)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, int(cfg.warmup_ratio * cfg.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(
            (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, cfg.steps - warmup))))
            if s >= warmup else (s + 1) / warmup))
        self.cache = None
        if cfg.features == "cached":
            self.cache = FeatureCache(cfg.cache_dir or self.out / "feature_cache")
            if self.is_main:
                layers = cfg.cache_layers or self.draft.config.target_layer_ids
                self.cache.build(self.target, self.backend, self.examples, layers, progress=self.progress)
            if self.world > 1:
                dist.barrier()
        if sharded:      # last: the draft's embedding / LM head copies and the cache need the whole target
            from .distributed import local_fraction, shard_frozen_target

            shard_frozen_target(self.target, self.backend.device)
            if self.is_main:
                self.progress(f"target sharded over {self.world} processes: "
                              f"{local_fraction(self.target):.0%} of its weights on each")
        self.step = 0
        self._resume()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _make_draft(self):
        cfg = self.cfg
        source = cfg.init
        if source is None:
            source = self.out / "init"
            if self.is_main and not (source / "config.json").is_file():
                options = dict(cfg.draft_options)
                if "draft_vocab_size" not in options:        # the default that suits the target's size
                    options["draft_vocab_size"] = default_draft_sizes(self.target.config)["draft_vocab_size"]
                if not options["draft_vocab_size"]:           # 0 / None: the full vocabulary
                    options["draft_vocab_size"] = None
                self._check_memory(draft_config_for_target(self.target.config, cfg.algorithm, **options))
                vocab_ids = None
                size = options.get("draft_vocab_size")
                if size is not None and size < self.target.config.vocab_size:
                    vocab_ids, coverage = select_draft_vocab(self.examples, size, self.target.config.eos_token_ids)
                    self.progress(f"draft vocabulary: the {size} most frequent response tokens "
                                  f"({coverage:.2%} of response tokens)")
                init_draft(cfg.target, source, algorithm=cfg.algorithm, seed=cfg.seed, draft_vocab_ids=vocab_ids,
                           progress=self.progress, **options)
            if self.world > 1:
                dist.barrier()
        if cfg.init is not None:
            self._check_memory(DraftConfig.from_hf(read_config(model_dir(source, "draft"), "draft"),
                                                   str(Path(source) / "config.json")))
        draft = load_draft(model_dir(source, "draft"), self.target.config, self.target)
        if draft.config.algorithm != cfg.algorithm:
            raise ConfigError(f"draft {source} is a {draft.config.algorithm!r} draft, not {cfg.algorithm!r}; "
                              f"pass --algorithm {draft.config.algorithm} or another --init")
        draft.to(self.backend.device)
        # The embedding and LM head are frozen copies of the target's (paper §3.3).
        for module in (draft.embed_tokens, draft.lm_head):
            module.requires_grad_(False)
        self.base_config = read_config(model_dir(source, "draft"), "draft")
        return draft

    def _check_memory(self, draft_cfg: DraftConfig) -> None:
        """Refuse sizes whose training cannot fit, before the allocator is asked to try. A lower
        bound: the draft's logits for the micro-batch that holds the longest response (every row
        is padded to its anchor count: [micro_batch, anchors, block_size, draft vocabulary] in
        float32) plus the draft's weights, gradients and AdamW moments; activations come on top."""
        cfg = self.cfg
        longest = max(sum(e.loss_mask) for e in self.examples) - 1     # anchor candidates of a sequence
        anchors = min(cfg.num_anchors, longest)
        if cfg.anchor_density is not None:
            anchors = min(anchors, math.ceil(cfg.anchor_density * longest))
        rows = min(cfg.micro_batch, cfg.global_batch // self.world) * anchors * draft_cfg.block_size
        params = draft_parameters(draft_cfg)
        frozen = draft_cfg.vocab_size * draft_cfg.hidden_size + draft_cfg.output_size * draft_cfg.hidden_size
        needed = 4 * rows * draft_cfg.output_size + 16 * max(params - frozen, 0) + 4 * frozen
        limit = self.backend.memory_limit()
        if limit is not None and needed > limit:
            raise ConfigError(f"training this draft needs at least {needed / 2 ** 30:.1f} GiB (logits of {rows} block "
                              f"positions: micro_batch x {anchors} anchors x block_size {draft_cfg.block_size}, over "
                              f"{draft_cfg.output_size} tokens; {params / 1e6:.0f} M parameters with AdamW state), "
                              f"more than the {limit / 2 ** 30:.1f} GiB available; lower block_size, num_anchors, "
                              "micro_batch or the draft's size")

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    # Settings that may change between a run and its resume without changing what it computes.
    RESUME_FREE = ("steps", "log_every", "checkpoint_every", "backend", "features", "cache_dir", "micro_batch",
                   "shard_target")

    def _check_resumable(self) -> None:
        """A rerun into an existing --out resumes only with the same settings; otherwise refuse and
        name the differences (a silent resume would train something other than what was asked).
        The settings come from the last checkpoint, else from the run's train_config.yaml (written
        before the initial draft, so a run stopped before its first checkpoint, or finished, is
        covered too: its initial draft was made with those settings)."""
        state_file = self._checkpoint_dir() / STATE_FILE
        record_file = self.out / RUN_RECORD
        if state_file.is_file():
            try:
                previous = json.loads(state_file.read_text())["config"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise DataError(f"{state_file} is damaged ({exc}); start over with --fresh") from None
        elif (self._checkpoint_dir() / "trainer.pt").is_file():
            raise ConfigError(f"{self._checkpoint_dir()} holds a checkpoint in the old pickle format, which dspark "
                              "no longer loads (it could run code); start over with --fresh")
        elif record_file.is_file():
            try:
                previous = yaml.safe_load(record_file.read_text())
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                raise DataError(f"{record_file} is damaged ({exc}); start over with --fresh") from None
            if not isinstance(previous, dict):
                raise DataError(f"{record_file} is damaged (not a mapping); start over with --fresh")
        else:
            return
        current = json.loads(json.dumps(asdict(self.cfg)))
        refuse_changed_settings(f"the run in {self.out}", previous, current,
                                "resume it with the same settings, start over with --fresh, or choose another --out",
                                ignore=self.RESUME_FREE)

    def _record_settings(self) -> None:
        """The run's settings, in its directory before anything else is written there."""
        write_text_atomic(self.out / RUN_RECORD, yaml.safe_dump(asdict(self.cfg), sort_keys=False))

    def _save_checkpoint(self) -> None:
        if not self.is_main:
            return
        final, staging = self._checkpoint_dir(), self.out / "checkpoint.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_draft(self.draft, staging, self.base_config)
        save_trainer_state(staging, self.optimizer, self.scheduler, self.step, asdict(self.cfg))
        # Atomic for readers: the old checkpoint is replaced only once the new one is complete.
        old = self.out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        if not (self._checkpoint_dir() / STATE_FILE).is_file():
            return
        weights = load_draft(self._checkpoint_dir(), self.target.config, self.target).state_dict()
        self.draft.load_state_dict(weights)
        self.step = load_trainer_state(self._checkpoint_dir(), self.optimizer, self.scheduler)
        # The log of a resumed run equals an uninterrupted one: drop what ran after the checkpoint.
        metrics_file = self.out / "metrics.jsonl"
        if self.is_main and metrics_file.is_file():
            kept = [line for line in metrics_file.read_text().splitlines() if _logged_step(line) <= self.step]
            write_text_atomic(metrics_file, "".join(line + "\n" for line in kept))
        self.progress(f"resumed from {self._checkpoint_dir()} at step {self.step}")

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, device = self.cfg, self.backend.device
        indices = global_batch_indices(len(self.examples), cfg.global_batch, self.step, cfg.seed)
        mine = indices[self.rank::self.world]
        micro_batches = [mine[i:i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
        loss_fn = training_loss(cfg.algorithm)
        total_loss, tokens, metrics = 0.0, 0, {}
        for number, chunk in enumerate(micro_batches):
            ids, mask, lengths = collate([self.examples[i] for i in chunk], device)
            layers = self.draft.config.target_layer_ids
            if self.cache is not None:
                hidden, last, lse = self.cache.load(chunk, ids.shape[1], device, layers)
            else:
                hidden, last, lse = target_features(self.target, self.backend, ids, lengths, layers,
                                                    with_lse=self.draft.config.reduced_vocab)
            batch = TrainBatch(ids, mask, lengths, hidden, last, lse)
            generators = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step * 10_007 + i) for i in chunk]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                per_sequence, metrics = loss_fn(self.draft, batch, self.backend, generators, cfg)
                # This process's share of the mean over the whole global batch.
                loss = per_sequence.float().sum() / cfg.global_batch
            loss.backward()
            total_loss += float(per_sequence.detach().sum())
            tokens += int(lengths.sum())
        if self.world > 1:
            self._all_reduce_gradients()
            summary = torch.tensor([total_loss, float(tokens)], dtype=torch.float64)
            dist.all_reduce(summary)
            total_loss, tokens = float(summary[0]), int(summary[1])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": total_loss / cfg.global_batch, "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm), "tokens": tokens, **metrics}

    def _all_reduce_gradients(self) -> None:
        """Data parallelism: sum every process's gradient share (one flattened all-reduce).
        Each share is already divided by the global batch, so the sum is the global mean."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.trainable, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def train(self) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_file = self.out / "metrics.jsonl"
        started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
        first_step = self.step
        while self.step < cfg.steps:
            record = self.train_step()
            window_tokens += record["tokens"]
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                done = self.step - first_step
                eta = (time.perf_counter() - started) / max(done, 1) * (cfg.steps - self.step)
                if self.is_main:
                    with metrics_file.open("a") as sink:
                        sink.write(json.dumps(record) + "\n")
                    self.progress(f"step {self.step}/{cfg.steps}  loss {record['loss']:.4f}  "
                                  f"lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s  ETA {eta:.0f} s")
                window_tokens, window_start = 0, time.perf_counter()
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self._save_checkpoint()
        if self.is_main:
            save_draft(self.draft, self.out, self.base_config)
            self._record_settings()
            self.progress(f"saved the trained draft to {self.out}")
        if self.world > 1:
            dist.barrier()
        return self.out


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a blank line or one cut off by a crash sorts after every
    checkpoint, so a resume drops it."""
    try:
        return json.loads(line).get("step", math.inf)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def train(cfg: TrainConfig, progress=None, fresh: bool = False) -> Path:
    return Trainer(cfg, progress, fresh=fresh).train()
