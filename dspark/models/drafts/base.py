"""The draft interface every algorithm implements, and the registry of draft algorithms.

A draft is anything that satisfies `Draft`: the engine and the trainer use nothing else of it.
Algorithms register once (`register_draft_algorithm`) with their model class, their defaults,
the training loss that fits them and the `architectures` name their checkpoints carry; every
list of algorithm names in dspark (CLI choices, the trainer, the bench) is read from
`DRAFT_ALGORITHMS`, so a new algorithm is one registration away.

Who may import it: everything in dspark.models and above. It imports nothing of dspark's own
but the errors.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from ...errors import ConfigError


@dataclass
class DraftProposal:
    """One round's drafts for R requests."""
    tokens: torch.Tensor                # [R, gamma] long
    probs: torch.Tensor                 # [R, gamma, V] the distributions the tokens were sampled from
    # [R, gamma] raw confidence logits z_k (None without a confidence head); the engine turns them
    # into c_k = sigmoid(z_k / T_k) with its current STS temperatures.
    confidence_logits: Optional[torch.Tensor] = None
    # [R, gamma, V'] the draft's own untempered logits per position (V' its vocabulary, reduced or
    # not), before any Markov bias; None if the draft does not expose them. The margin estimator
    # reads their top-2 margin: greedy `probs` are one-hot and say nothing.
    logits: Optional[torch.Tensor] = None


@runtime_checkable
class Draft(Protocol):
    """What the engine asks of a draft.

    config            its DraftConfig (block_size, target_layer_ids, ...)
    gamma             tokens proposed per round
    has_confidence    proposals carry confidence logits (a DSpark confidence head)
    supports_static   `propose` accepts fixed shapes: every request row and `ctx_len` context
                      positions, as a captured graph needs
    make_cache        the draft's per-request state (context K/V, features)
    append_context    store verified positions: their target features [N, m * d] and token ids [N]
    propose           sample one block per request from its anchor; randomness only from `uniforms`
    """
    config: object
    has_confidence: bool
    supports_static: bool

    @property
    def gamma(self) -> int: ...

    def make_cache(self, num_slots: int, max_len: int, dtype, device): ...

    def append_context(self, cache, token_slots: torch.Tensor, positions: torch.Tensor,
                       target_hidden: torch.Tensor, token_ids: torch.Tensor) -> None: ...

    def propose(self, anchor_ids: torch.Tensor, start_positions: torch.Tensor, slots: torch.Tensor, cache, backend,
                uniforms: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                slot_range=None, ctx_len: Optional[int] = None, **hints) -> DraftProposal: ...


@dataclass(frozen=True)
class DraftAlgorithm:
    name: str                   # as in config.json's dspark_algorithm and on the command line
    label: str                  # for reports: "DSpark"
    description: str
    model_class: type           # built from a DraftConfig
    defaults: dict              # DraftConfig fields this algorithm fixes or defaults
    default_layers: Callable[[int], list]   # target layers it reads, from the target's layer count
    architecture: str           # the "architectures" entry of its config.json
    loss: str                   # "module:function" of its training loss (dspark.training imports it)


DRAFT_ALGORITHMS: dict[str, DraftAlgorithm] = {}


def register_draft_algorithm(algorithm: DraftAlgorithm) -> None:
    """Add an algorithm; a name that is already taken is an error (a silent replacement would
    change what every existing checkpoint of that name loads as)."""
    if algorithm.name in DRAFT_ALGORITHMS:
        raise ValueError(f"draft algorithm {algorithm.name!r} is already registered")
    DRAFT_ALGORITHMS[algorithm.name] = algorithm


def draft_algorithm(name: str) -> DraftAlgorithm:
    if name not in DRAFT_ALGORITHMS:
        raise ConfigError(f"unknown draft algorithm {name!r}; valid: {', '.join(DRAFT_ALGORITHMS)}")
    return DRAFT_ALGORITHMS[name]


def algorithm_for_architecture(architecture: str) -> Optional[DraftAlgorithm]:
    """The first registered algorithm whose checkpoints carry this architectures entry."""
    return next((a for a in DRAFT_ALGORITHMS.values() if a.architecture == architecture), None)


__all__ = ["DRAFT_ALGORITHMS", "Draft", "DraftAlgorithm", "DraftProposal", "algorithm_for_architecture",
           "draft_algorithm", "register_draft_algorithm"]
