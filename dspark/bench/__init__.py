"""Measurement tools that drive an engine: the benchmark harness, its report, the device profiler
(`dspark calibrate`) and the serving simulator.

What lives here: `harness` (tau per dataset, speed against transformers, concurrency, the lossless
ledger), `report` (Markdown tables and plots), `profiling` (measured cost profiles) and
`simulator` (throughput against concurrency from a cost model).

Who may import it: the CLI and tools. It imports the engine and everything below it.
"""
from .harness import (ALGORITHMS, LABELS, BenchSettings, LosslessError, LosslessLedger, Models, find_eval_dir,
                      load_prompt_sets, macro_tau, run_acceptance, run_benchmark, run_concurrency, run_speed)

__all__ = ["ALGORITHMS", "BenchSettings", "LABELS", "LosslessError", "LosslessLedger", "Models", "find_eval_dir",
           "load_prompt_sets", "macro_tau", "run_acceptance", "run_benchmark", "run_concurrency", "run_speed"]
