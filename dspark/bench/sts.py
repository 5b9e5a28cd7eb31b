"""Offline STS: fit the confidence head's temperatures from rounds an engine actually served."""
import torch

from ..errors import ConfigError
from ..scheduling.calibration import calibration_report, fit_sts, survival_labels


def fit_from_engine(engine, prompts: list, params, holdout: bool = True) -> dict:
    """Replay prompts with full-block verification (the engine's schedule should be "fixed"),
    collect the raw confidence logits and outcomes from `engine.round_log`, fit temperatures on
    every other row and report on the rest. The rounds are sampled as `params` says: fit greedy
    and sampled temperatures with separate calls. The engine and its draft are not changed.

    Returns {"temperatures", "rows", "before", "after"}."""
    if engine.draft is None or not engine.draft.has_confidence:
        raise ConfigError("STS needs a draft with a confidence head (a DSpark draft)")
    engine.generate(prompts, params)
    records = [r for r in engine.round_log if "confidence_logits" in r]
    if not records:
        raise ConfigError("no drafted rounds to calibrate on: use more prompts or max_new_tokens")
    logits = torch.cat([r["confidence_logits"] for r in records])
    labels, known = survival_labels(torch.cat([r["verify_lens"] for r in records]),
                                    torch.cat([r["accepted"] for r in records]), engine.gamma)
    fit_rows = torch.arange(len(logits)) % 2 == 0 if holdout else torch.ones(len(logits), dtype=torch.bool)
    report_rows = ~fit_rows if holdout else fit_rows
    temperatures = fit_sts(logits[fit_rows], labels[fit_rows], known[fit_rows])
    return {"temperatures": temperatures, "rows": len(logits),
            "before": calibration_report(logits[report_rows], labels[report_rows], known[report_rows]),
            "after": calibration_report(logits[report_rows], labels[report_rows], known[report_rows], temperatures)}


__all__ = ["fit_from_engine"]
