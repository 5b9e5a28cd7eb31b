"""Target features for training: online (the frozen target runs inside the step) or cached.

Online is the default: no hidden states ever touch the disk. `target_features` runs the
frozen target over a padded batch once and returns the selected layers' hidden states and
the final normed hidden state; target *distributions* are never materialised here (the
losses push the final hidden state through the frozen LM head at supervised positions only).
"""
import torch

from ..models import StepBatch


@torch.no_grad()
def target_features(target, backend, input_ids: torch.Tensor, lengths: torch.Tensor, layer_ids) -> tuple:
    """input_ids [B, T] (padded), lengths [B] -> (target_hidden [B, T, m * d], target_last [B, T, d])."""
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
    return hidden, last


class FeatureCache:
    """Target features precomputed once and kept as sharded safetensors (the optional mode).

    Compact by design: only the m selected layers and the final hidden state are stored (d
    values each per token, never V-sized logits), in bfloat16 by default, and the size is
    printed before anything is written. `build` is resumable shard by shard.
    """

    def __init__(self, directory, dtype: torch.dtype = torch.bfloat16):
        from pathlib import Path

        self.directory, self.dtype = Path(directory), dtype
        self._index, self._shards = None, {}

    @staticmethod
    def estimate_bytes(examples, num_layers: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> int:
        tokens = sum(len(e.input_ids) for e in examples)
        return tokens * (num_layers + 1) * hidden * torch.tensor([], dtype=dtype).element_size()

    def build(self, target, backend, examples, layer_ids, shard_size: int = 256, progress=lambda m: None) -> None:
        import json

        from safetensors.torch import save_file

        from .data import collate

        hidden = target.config.hidden_size
        size = self.estimate_bytes(examples, len(layer_ids), hidden, self.dtype)
        progress(f"feature cache: {len(examples)} sequences, {size / 2 ** 20:.1f} MiB "
                 f"({len(layer_ids)} layers + final hidden, {str(self.dtype).replace('torch.', '')}) "
                 f"-> {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True)
        index = {}
        for shard, start in enumerate(range(0, len(examples), shard_size)):
            name = f"shard_{shard:05d}.safetensors"
            chunk = list(range(start, min(start + shard_size, len(examples))))
            index.update({str(i): name for i in chunk})
            if (self.directory / name).is_file():
                continue
            tensors = {}
            for i in chunk:
                ids, _, lengths = collate([examples[i]], backend.device)
                h, last = target_features(target, backend, ids, lengths, layer_ids)
                tensors[f"hidden.{i}"] = h[0].to(self.dtype).cpu().contiguous()
                tensors[f"last.{i}"] = last[0].to(self.dtype).cpu().contiguous()
            save_file(tensors, str(self.directory / (name + ".tmp")))
            (self.directory / (name + ".tmp")).rename(self.directory / name)
            progress(f"  wrote {name} ({len(chunk)} sequences)")
        (self.directory / "index.json").write_text(json.dumps(index))

    def load(self, indices, length: int, device) -> tuple:
        """Padded (target_hidden [B, T, m * d], target_last [B, T, d]) for these examples."""
        import json

        from safetensors import safe_open

        if self._index is None:
            self._index = json.loads((self.directory / "index.json").read_text())
        hidden_rows, last_rows = [], []
        for i in indices:
            name = self._index[str(i)]
            if name not in self._shards:
                self._shards[name] = safe_open(str(self.directory / name), framework="pt")
            hidden_rows.append(self._shards[name].get_tensor(f"hidden.{i}"))
            last_rows.append(self._shards[name].get_tensor(f"last.{i}"))

        def pad(rows):
            out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
            for r, row in enumerate(rows):
                out[r, :row.shape[0]] = row
            return out.float().to(device)

        return pad(hidden_rows), pad(last_rows)
