"""Scheduling: what a round should verify, from the device's costs and the draft's confidences.

What lives here: `cost_model` (steps per second of the target and the draft per device: measured
YAML profiles and analytic priors), `planner` (the one place that dispatches on the schedule mode:
verify lengths per round, the token budget and draft-or-not from finished rounds;
`schedule_prefix` is a thin wrapper for one-off use), `online_cost` (the cost model the engine
refits from its own timed rounds; `dspark calibrate` runs it offline), `acceptance` (the margin
acceptance estimator for drafts without a confidence head), `sps_table` (a cost profile as an
engine-neutral JSON table) and `calibration` (ECE / AUROC / Brier, STS temperatures, the head recalibrated online).

Who may import it: the engine and everything above it. It imports dspark.ops, dspark.backends
(device facts) and dspark.errors; never the engine (tools that drive an engine to measure it live
in dspark.bench).
"""
from .cost_model import DEVICE_SPECS, CostModel, ModelSpec, analytic_cost_model, device_spec
from .planner import RoundPlanner, cost_model_for, schedule_prefix

__all__ = ["CostModel", "DEVICE_SPECS", "ModelSpec", "RoundPlanner", "analytic_cost_model", "cost_model_for",
           "device_spec", "schedule_prefix"]
