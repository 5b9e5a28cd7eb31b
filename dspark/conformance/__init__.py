"""The cross-hardware conformance suite: does a backend compute what the CPU reference computes?

What lives here: `run(backend, dtypes, modes)` -> a list of CheckResult rows (operation x mode x
dtype -> pass / fail / skip with a detail), `matrix(results)` to print them, and the tolerance
table (`tolerances.yaml`). `tests/conformance` runs the same checks under pytest
(`DSPARK_BACKEND=X python -m pytest tests/conformance`), and `dspark conformance --backend X`
runs them without pytest. Modes: "eager" (plain kernels), "static" (the padded, bucketed
fixed-shape step that graphs run) and "graph" (capture once per bucket, replay, including a
capture-at-one-length / replay-at-another update check); a backend without graphs reports
"graph" as skip, so the matrix shows what has and has not been proven on a device.

Who may import it: the CLI and the tests. It imports the ops, the backends, the models and the engine.
"""
from .checks import CHECKS, MODES, CheckResult, load_tolerances, matrix, run

__all__ = ["CHECKS", "MODES", "CheckResult", "load_tolerances", "matrix", "run"]
