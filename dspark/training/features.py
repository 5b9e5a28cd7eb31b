"""Target features for training: online (the frozen target runs inside the step) or cached.

Online is the default: no hidden states ever touch the disk. `target_features` runs the
frozen target over a padded batch once and returns the selected layers' hidden states, the
final normed hidden state and, when a reduced draft vocabulary needs it, the log-sum-exp of
the target's full logits per position. Target *distributions* are never materialised here
(the losses push the final hidden state through the frozen LM head at supervised positions).

`FeatureCache` precomputes the same tensors once, for every draft trained on the same data:
one pass of the target instead of one per step and per draft. Several drafts can share a
cache when it holds the union of the layers they read.
"""
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..files import atomic_output, write_text_atomic
from ..models import StepBatch

LSE_CHUNK = 256      # rows of full-vocabulary logits materialised at once for the log-sum-exp


@torch.no_grad()
def target_features(target, backend, input_ids: torch.Tensor, lengths: torch.Tensor, layer_ids,
                    with_lse: bool = False) -> tuple:
    """input_ids [B, T] (padded), lengths [B] -> (target_hidden [B, T, m * d], target_last [B, T, d],
    target_lse [B, T] float32 or None)."""
    batch, length = input_ids.shape
    rows = [input_ids[b, :int(lengths[b])].tolist() for b in range(batch)]
    dtype = next(target.parameters()).dtype
    cache = target.make_cache(batch, length, dtype, backend.device)
    step = StepBatch.build(rows, [0] * batch, list(range(batch)), backend.device)
    out = target(step, cache, backend, logits_indices=step.input_ids.new_zeros(0), hidden_layer_ids=list(layer_ids),
                 final_hidden=True)
    hidden = out.hidden.new_zeros(batch, length, out.hidden.shape[-1])
    last = out.last_hidden.new_zeros(batch, length, out.last_hidden.shape[-1])
    hidden[step.token_rows, step.token_offsets] = out.hidden
    last[step.token_rows, step.token_offsets] = out.last_hidden
    lse = None
    if with_lse:
        flat = torch.cat([target.lm_head(out.last_hidden[i:i + LSE_CHUNK]).float().logsumexp(dim=-1)
                          for i in range(0, out.last_hidden.shape[0], LSE_CHUNK)])
        lse = flat.new_zeros(batch, length)
        lse[step.token_rows, step.token_offsets] = flat
    return hidden, last, lse


class FeatureCache:
    """Target features precomputed once and kept as sharded safetensors (the optional mode).

    Compact by design: only the selected layers, the final hidden state (d values each per
    token, never V-sized logits, in bfloat16) and one float32 log-sum-exp per token are stored,
    and the size is printed before anything is written. `build` is resumable shard by shard;
    `index.json` records the target and the layers, and a cache built for other ones is refused.
    """

    def __init__(self, directory, dtype: torch.dtype = torch.bfloat16):
        self.directory, self.dtype = Path(directory), dtype
        self._index, self._shards = None, {}

    @staticmethod
    def estimate_bytes(examples, num_layers: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> int:
        tokens = sum(len(e.input_ids) for e in examples)
        return tokens * ((num_layers + 1) * hidden * torch.tensor([], dtype=dtype).element_size() + 4)

    def _meta(self, target, layer_ids, examples) -> dict:
        return {"format": 2, "layer_ids": [int(i) for i in layer_ids], "hidden_size": target.config.hidden_size,
                "num_target_layers": target.config.num_layers, "sequences": len(examples),
                "tokens": sum(len(e.input_ids) for e in examples), "dtype": str(self.dtype).replace("torch.", "")}

    def build(self, target, backend, examples, layer_ids, shard_size: int = 128, batch_size: int = 8,
              progress=lambda m: None) -> None:
        from safetensors.torch import save_file

        from .data import collate

        meta = self._meta(target, layer_ids, examples)
        meta_path = self.directory / "cache.json"
        if meta_path.is_file():
            try:
                existing = json.loads(meta_path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                existing = "unreadable"
            if existing != meta:
                raise ConfigError(f"the feature cache in {self.directory} was built for other data, target or layers "
                                  f"({existing}); delete it or give another cache directory")
        hidden = target.config.hidden_size
        size = self.estimate_bytes(examples, len(layer_ids), hidden, self.dtype)
        progress(f"feature cache: {len(examples)} sequences, {size / 2 ** 20:.1f} MiB "
                 f"(layers {list(layer_ids)} + final hidden, {meta['dtype']}; + log-sum-exp) -> {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(meta_path, json.dumps(meta))
        index, started, done = {}, __import__("time").perf_counter(), 0
        num_shards = -(-len(examples) // shard_size)
        for shard, start in enumerate(range(0, len(examples), shard_size)):
            name = f"shard_{shard:05d}.safetensors"
            chunk = list(range(start, min(start + shard_size, len(examples))))
            index.update({str(i): name for i in chunk})
            if (self.directory / name).is_file():
                continue
            tensors = {}
            # Similar lengths together, so padding wastes little of each forward.
            order = sorted(chunk, key=lambda i: len(examples[i].input_ids))
            for group in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
                ids, _, lengths = collate([examples[i] for i in group], backend.device)
                h, last, lse = target_features(target, backend, ids, lengths, layer_ids, with_lse=True)
                for row, i in enumerate(group):
                    n = int(lengths[row])
                    tensors[f"hidden.{i}"] = h[row, :n].to(self.dtype).cpu().contiguous()
                    tensors[f"last.{i}"] = last[row, :n].to(self.dtype).cpu().contiguous()
                    tensors[f"lse.{i}"] = lse[row, :n].float().cpu().contiguous()
            with atomic_output(self.directory / name) as temporary:
                save_file(tensors, str(temporary))
            done += 1
            elapsed = __import__("time").perf_counter() - started
            progress(f"  wrote {name} ({shard + 1}/{num_shards}, {len(chunk)} sequences; "
                     f"ETA {elapsed / done * (num_shards - shard - 1):.0f} s)")
        write_text_atomic(self.directory / "index.json", json.dumps(index))

    def load(self, indices, length: int, device, layer_ids: Optional[Sequence[int]] = None) -> tuple:
        """Padded (target_hidden [B, T, m * d], target_last [B, T, d], target_lse [B, T]) for these
        examples; `layer_ids` picks a subset of the cached layers (default: all, in cache order)."""
        from safetensors import safe_open

        if self._index is None:
            self._index = json.loads((self.directory / "index.json").read_text())
            self._meta_cached = json.loads((self.directory / "cache.json").read_text())
        cached = self._meta_cached["layer_ids"]
        columns = None
        if layer_ids is not None and list(layer_ids) != cached:
            missing = [i for i in layer_ids if i not in cached]
            if missing:
                raise ConfigError(f"the feature cache in {self.directory} holds layers {cached}, not {missing}")
            d = self._meta_cached["hidden_size"]
            columns = torch.cat([torch.arange(cached.index(i) * d, (cached.index(i) + 1) * d) for i in layer_ids])
        hidden_rows, last_rows, lse_rows = [], [], []
        for i in indices:
            name = self._index[str(i)]
            if name not in self._shards:
                self._shards[name] = safe_open(str(self.directory / name), framework="pt")
            h = self._shards[name].get_tensor(f"hidden.{i}")
            hidden_rows.append(h if columns is None else h[:, columns])
            last_rows.append(self._shards[name].get_tensor(f"last.{i}"))
            lse_rows.append(self._shards[name].get_tensor(f"lse.{i}").unsqueeze(-1))

        def pad(rows):
            out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
            for r, row in enumerate(rows):
                out[r, :row.shape[0]] = row
            return out.float().to(device)

        return pad(hidden_rows), pad(last_rows), pad(lse_rows).squeeze(-1)
