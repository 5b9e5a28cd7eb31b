"""The engine: requests, continuous batching and the draft -> plan -> verify -> commit round.

What lives here: `engine` (`Engine`: the public generate / stream API, the request queue and the
one loop that owns the caches), `request` (a request's state and its per-request statistics) and
`step` (the verify step: its layout, and the eager / fixed-shape / captured-graph ways to run it).

Who may import it: the public API, the CLI, training (regeneration) and dspark.bench. It imports
dspark.models, dspark.scheduling, dspark.backends, dspark.ops and dspark.errors.
"""
from .engine import Engine, RoundDriver, Stream

__all__ = ["Engine", "RoundDriver", "Stream"]
