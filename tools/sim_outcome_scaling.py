"""Simulated effect of the budget planner's per-request outcome scaling (RoundPlanner.OUTCOME_PRIOR,
OUTCOME_DECAY): tokens/s with it over tokens/s with the head's confidences alone, for requests
whose true acceptance is `factor` times what the head says, under a CPU-like cost (verify 60 ms +
5 ms per token, draft 12 ms at 1 request), mean over 3 seeds of 400 rounds.

    python tools/sim_outcome_scaling.py
"""
import numpy as np
import torch

from dspark.bench.simulator import Backend
from dspark.scheduling.cost_model import CostModel
from dspark.scheduling.planner import RoundPlanner

COST = CostModel(device="sim", source="measured", verify_tokens=[1, 1024], context_lens=[0],
                 verify_seconds=[[0.060, 0.060 + 1023 * 0.005]], draft_requests=[1, 64], draft_seconds=[0.012, 0.096])


def play(factor: float, prior=None, decay=None, rounds: int = 400, gamma: int = 7, seed: int = 0) -> float:
    planner = RoundPlanner("budget", COST, gamma, "cpu")
    planner.OUTCOME_PRIOR = 1e12 if prior is None else prior      # 1e12: the ratio stays 1 (head alone)
    if decay is not None:
        planner.OUTCOME_DECAY = decay
    generator = torch.Generator().manual_seed(seed)
    tokens = seconds = 0.0
    for _ in range(rounds):
        confidence = 0.3 + 0.4 * torch.rand(1, gamma, generator=generator, dtype=torch.float64)
        survived = torch.rand(1, gamma, generator=generator, dtype=torch.float64) < factor * confidence
        plan = planner.before_round([0], [gamma], 0)
        lens = torch.zeros(1, dtype=torch.long)
        if plan.draft:
            lens, _ = planner.verify_lengths(Backend(), plan, confidence, [gamma], 0)
            accepted = torch.minimum(survived.long().cumprod(-1).sum(-1), lens)
            planner.record([0], confidence, lens, accepted)
            tokens += float(accepted.sum())
        tokens += 1
        seconds += COST.verify_time(1 + int(lens.sum()), 0, 1) + (COST.draft_time(1) if plan.draft else 0.0)
    return tokens / seconds


def main() -> None:
    factors = (1.0, 0.1, 0.5, 1.3)
    print("prior decay | " + " | ".join(f"factor {f}" for f in factors))
    for prior, decay in ((1, 0.8), (3, 0.8), (3, 0.9), (5, 0.9), (8, 0.95)):
        ratios = [np.mean([play(f, prior, decay, seed=s) / play(f, seed=s) for s in range(3)]) for f in factors]
        print(f"{prior:5} {decay:5} | " + " | ".join(f"{r:.3f}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
