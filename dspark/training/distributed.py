"""Training beyond one process: the frozen target sharded across the processes (FSDP2).

Data parallelism (one slice of each global batch per process, gradients all-reduced) lives in
`trainer.py`. This module adds the other half for targets too large for one device: each
process keeps only 1 / world of every sharded target weight, as a `DTensor` from
`torch.distributed.fsdp.fully_shard` (FSDP2), and the full weight of one unit is all-gathered
just before that unit runs and freed right after. Nothing of the target is trained, so no
gradient is reduced and the optimiser never sees a DTensor; the draft stays replicated.

What is sharded, and why exactly this:
    FSDP2 unit                    all-gathered                    holds
    each decoder layer            when that layer runs            almost all of the weights
    the target (root unit)        when the target's forward       the input embedding (vocabulary x
                                  starts                          hidden) and the final norm
    not sharded                   -                               the LM head: for a reduced draft
                                                                  vocabulary the log-sum-exp calls it
                                                                  once per chunk of this process's
                                                                  tokens, outside the forward, a
                                                                  rank-dependent number of times
An all-gather is a collective: every process must call every sharded unit the same number of
times. The trainer guarantees it (each process runs the same number of micro-batches, each one
target forward), and the feature cache is built before sharding, by rank 0 alone.

The result does not depend on sharding: the all-gathered weights are the stored weights, bit for
bit (tests/test_distributed.py trains with and without it and compares the drafts).

It also picks each process's device: under torchrun every process on a node gets its own
accelerator, the one numbered LOCAL_RANK (`process_backend`).

Imported by `dspark.training.trainer`; it imports torch.distributed, dspark.backends and
dspark.models.layers, nothing above them.
"""
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..backends import Backend, get_backend
from ..errors import ConfigError
from ..models.layers import drop_inference_kernels


def process_backend(name=None) -> Backend:
    """This process's backend (`name` as for `get_backend`). Under torchrun an accelerator
    backend uses the device numbered LOCAL_RANK, so the processes of one node do not all land
    on device 0; the CPU backend is shared by every process."""
    backend = get_backend(name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend.device.type == "cpu" or local_rank == 0:
        return backend
    torch.accelerator.set_device_index(local_rank)   # collectives and device meshes use the current device
    return type(backend)(local_rank)


def sharded_units(target: nn.Module) -> list:
    """The target's decoder layers, each one FSDP2 unit inside the root unit (the target)."""
    return list(target.model.layers)


def unsharded_parameters(target: nn.Module) -> set:
    """Parameters every process keeps whole (see the module docstring): the LM head."""
    return set(target.lm_head.parameters())


def shard_frozen_target(target: nn.Module, device: torch.device, world_size: Optional[int] = None) -> int:
    """Shard a frozen target's decoder layers and embedding across the default process group,
    in place (FSDP2 over a 1-D device mesh of `device.type`). Call it once, after everything
    that needs the target's full weights on one process (the draft's copies of its embedding
    and LM head, a feature cache). Returns the number of processes the target is split over;
    with one process there is nothing to split and the target is left as it is."""
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("shard_target needs torch.distributed: start training with torchrun "
                          "(see docs/DISTRIBUTED.md)")
    world = dist.get_world_size() if world_size is None else int(world_size)
    if world <= 1:
        return 1
    trainable = [name for name, p in target.named_parameters() if p.requires_grad]
    if trainable:
        raise ConfigError(f"shard_frozen_target shards frozen targets only; {trainable[0]} requires a gradient")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    ignored = unsharded_parameters(target)
    drop_inference_kernels(target)      # the LM head's too: every product then runs as it does unprepared
    for unit in sharded_units(target):
        # Reshard after each forward: at most one layer's full weights exist at a time.
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(target, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)
    with torch.no_grad():           # FSDP2 moved the shards and buffers to the mesh's device;
        for parameter in ignored:   # move what it ignores in place, so a tied embedding stays tied
            parameter.data = parameter.data.to(device)
    return world


def is_sharded(parameter: torch.Tensor) -> bool:
    """True for a parameter that `shard_frozen_target` split (a DTensor holding a local shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


def local_fraction(target: nn.Module) -> float:
    """The fraction of the target's weights this process stores (1.0 unsharded; close to
    1 / world plus the unsharded LM head and norms when sharded). Reported by the trainer."""
    total = stored = 0
    for parameter in target.parameters():
        total += parameter.numel()
        stored += parameter.to_local().numel() if is_sharded(parameter) else parameter.numel()
    return stored / max(total, 1)


__all__ = ["drop_inference_kernels", "is_sharded", "local_fraction", "process_backend", "shard_frozen_target",
           "sharded_units", "unsharded_parameters"]
