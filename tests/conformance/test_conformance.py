"""Each backend against the CPU reference: `DSPARK_BACKEND=X python -m pytest tests/conformance`.

Without DSPARK_BACKEND every backend available on this machine is checked (here: cpu). The
same checks run from `dspark conformance --backend X`; see dspark/conformance/checks.py.
"""
import os

import pytest

from dspark.backends import available_backends
from dspark.conformance import CHECKS, MODES, run

BACKENDS = [os.environ["DSPARK_BACKEND"]] if os.environ.get("DSPARK_BACKEND", "auto") != "auto" \
    else available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("operation", list(CHECKS))
def test_operation_conforms(backend, dtype, operation, conformance_results):
    results = run(backend, dtypes=(dtype,), modes=MODES, checks=[operation])
    conformance_results.extend(results)
    assert all(r.status != "fail" for r in results), "; ".join(f"{r.mode}: {r.detail}" for r in results)
    passed = {r.mode for r in results if r.status == "pass"}
    expected = {"generation": {"eager", "static", "graph"}, "graph replay (update)": {"graph"}}.get(
        operation, {"eager"})
    # draft_block may skip at bfloat16 (a token on a CDF boundary is not a conformance signal)
    assert expected <= passed or (operation == "draft_block" and dtype == "bfloat16"), (operation, passed)
