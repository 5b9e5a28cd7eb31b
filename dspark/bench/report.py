"""Markdown tables and PNG plots for `dspark bench` results (the dict from dspark.bench.run_benchmark).

`splice_markdown` replaces the marked section of a document (docs/BENCHMARKS.md) and leaves the
rest alone. Plots need matplotlib (`pip install 'dspark[plot]'`); without it they are skipped.
"""
import math
import re
import statistics
from pathlib import Path
from typing import Optional

from ..files import atomic_output, write_text_atomic
from .harness import ALGORITHMS, LABELS, macro_tau

BEGIN, END = "<!-- dspark bench: begin -->", "<!-- dspark bench: end -->"
# Goals from the paper's Qwen3 results (issue: reference models and benchmark harness).
TAU_GOALS = {"dflash": 0.15, "eagle3": 0.25}


def _f(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def acceptance_tables(results: dict) -> list:
    acceptance = results["acceptance"]
    algorithms = [a for a in ALGORITHMS if any(a in per for per in acceptance.values())]
    temps = results["settings"]["temperatures"]
    columns = [(a, f"T={t:g}") for t in temps for a in algorithms]
    blocks = results.get("block_sizes") or {a: results["settings"]["block_size"] for a in algorithms}
    verified = ", ".join(f"{LABELS[a]} {blocks[a]}" for a in algorithms if a in blocks)
    lines = [f"### Accepted length tau (tokens per round, whole block verified: {verified})", "",
             "| dataset | prompts | " + " | ".join(f"{LABELS[a]} {t}" for a, t in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for dataset, per in acceptance.items():
        cells = [_f(per.get(a, {}).get(t, {}).get("tau")) for a, t in columns]
        lines.append(f"| {dataset} | {results['datasets'][dataset]} | " + " | ".join(cells) + " |")
    lines.append("| **macro average** | | " + " | ".join(f"**{_f(macro_tau(acceptance, a, t))}**"
                                                        for a, t in columns) + " |")
    if "dspark" in algorithms:
        lines.append("")
        for t in temps:
            mine = macro_tau(acceptance, "dspark", f"T={t:g}")
            for other, goal in TAU_GOALS.items():
                if other in algorithms:
                    theirs = macro_tau(acceptance, other, f"T={t:g}")
                    gain = mine / theirs - 1
                    lines.append(f"- T={t:g}: DSpark tau {_f(mine)} vs {LABELS[other]} {_f(theirs)}: "
                                 f"{gain:+.1%} (goal at T=1: >= +{goal:.0%}: {_met(gain >= goal)})")
    lines += ["", "### Per-position conditional acceptance (P(draft k accepted | drafts 1..k-1 accepted), "
              "macro over datasets)", ""]
    gamma = results["settings"]["block_size"]
    lines += ["| draft | T | " + " | ".join(f"k={k}" for k in range(1, gamma + 1)) + " |",
              "|---|---|" + "---:|" * gamma]
    for a, t in columns:
        rows = [per[a][t]["position_acceptance"] for per in acceptance.values() if a in per and
                per[a][t]["position_acceptance"]]
        means = [_mean([r[k] for r in rows if k < len(r)]) for k in range(gamma)]
        lines.append(f"| {LABELS[a]} | {t} | " + " | ".join(_f(m) for m in means) + " |")
    calibrated = [(t, [per["dspark"][t].get("calibration") for per in acceptance.values() if "dspark" in per])
                  for t in (f"T={x:g}" for x in temps)]
    if any(all(c) and c for _, c in calibrated):
        lines += ["", "### DSpark confidence head calibration (cumulative survival; count-weighted over positions, "
                  "macro over datasets)", "",
                  "| T | ECE before STS | ECE after | AUROC before | AUROC after | Brier before | Brier after |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for t, reports in calibrated:
            if not reports or not all(reports):
                continue
            cell = lambda when, metric: _f(_mean([r[when][metric] for r in reports]), 3)  # noqa: E731
            lines.append(f"| {t} | {cell('before', 'ece')} | {cell('after', 'ece')} | {cell('before', 'auroc')} | "
                         f"{cell('after', 'auroc')} | {cell('before', 'brier')} | {cell('after', 'brier')} |")
    return lines + _margin_estimator_table(acceptance, algorithms, temps)


def _margin_estimator_table(acceptance: dict, algorithms: list, temps: list) -> list:
    """The margin acceptance estimator (a logistic model of the draft's top-2 margin, fitted on the
    first half of each run's rounds, scored on the second) beside the DSpark head after STS."""
    def macro(reports: list, metric: str) -> str:
        return _f(_mean([r[metric] for r in reports]), 3) if reports and all(reports) else "-"

    rows = []
    for a in algorithms:
        for t in (f"T={x:g}" for x in temps):
            runs = [per[a][t] for per in acceptance.values() if a in per]
            margin = [run.get("margin_estimator") for run in runs]
            if not margin or not all(margin):
                continue
            head = [(run.get("calibration") or {}).get("after") for run in runs]
            rows.append(f"| {LABELS[a]} | {t} | {macro(margin, 'ece')} | {macro(margin, 'auroc')} | "
                        f"{macro(margin, 'brier')} | {macro(head, 'ece')} | {macro(head, 'auroc')} |")
    if not rows:
        return []
    return ["", "### Margin acceptance estimator (held-out half of each run's rounds, cumulative survival, macro "
                "over datasets) beside the DSpark confidence head after STS", "",
            "| draft | T | margin ECE | margin AUROC | margin Brier | head ECE | head AUROC |",
            "|---|---|---:|---:|---:|---:|---:|"] + rows


def _mean(values: list) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def speed_table(results: dict) -> list:
    rows = results["speed"]
    s = results["settings"]
    lines = [f"### Batch 1, greedy, up to {s['speed_max_new_tokens']} new tokens per prompt (stopping at end of "
             f"sequence), the first {s['speed_prompts']} prompt(s) of each dataset; median of {s['repeats']} "
             "round-robin repeat(s); tau here is over these prompts only", "",
             "| method | tokens/s | x transformers generate() | x dspark no draft | tau | output = plain decoding |",
             "|---|---:|---:|---:|---:|---:|"]
    limits = results.get("machine_limit", [])
    for r in rows:
        lines.append(f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['vs_transformers']:.2f} | {r['vs_plain']:.2f} "
                     f"| {_f(r['tau'])} | {r['identical_to_plain']} |")
    if limits:
        lines += ["", "This machine's limit for each draft at batch 1, tau * t_target(1) / (t_draft + t_verify(block + 1)), "
                      "from the engine's median round times (fixed full block):", "",
                  "| draft | tau | t_target(1) ms | t_draft + t_verify ms | limit (x plain) |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {LABELS.get(m['algorithm'], m['algorithm'])} | {m['tau']:.2f} | {m['t_target_1'] * 1e3:.1f} | "
                  f"{m['t_draft_plus_verify'] * 1e3:.1f} | {m['limit']:.2f} |" for m in limits]
    dspark = next((r for r in rows if r["method"].startswith("dspark + DSpark")), None)
    if dspark is not None:
        best = max((r for r in rows if r["method"].startswith("dspark + DSpark")), key=lambda r: r["tokens_per_s"])
        lines += ["", f"- best DSpark configuration: {best['method']}, {best['vs_plain']:.2f}x dspark's plain decoding "
                      f"(goal >= 2.5x: {_met(best['vs_plain'] >= 2.5)})"]
        transformers = [r for r in rows if r["method"].startswith("transformers")]
        if transformers:
            fastest = max(transformers, key=lambda r: r["tokens_per_s"])
            ratio = best["tokens_per_s"] / fastest["tokens_per_s"]
            lines.append(f"- vs the fastest transformers option ({fastest['method']}): {ratio:.2f}x "
                         f"(goal >= 1.5x: {_met(ratio >= 1.5)})")
    return lines


def _modes(row: dict) -> list:
    """The timed configurations of a concurrency row (its tokens/s entries)."""
    return [k for k, v in row.items() if k != "concurrency" and isinstance(v, (int, float))]


def concurrency_table(results: dict) -> list:
    rows = results["concurrency"]
    modes = _modes(rows[0])
    steady = _in_flight_rows(rows)
    tokens = results["settings"]["max_new_tokens"]
    lines = [f"### Tokens/s vs concurrency (greedy, exactly {tokens} new tokens per request{_mode_notes(modes)})", ""]
    if steady:
        lines += ["While all requests are in flight (from the first round to the last one that carries every "
                  "request: what a server that refills freed slots sees):", ""]
        lines += _rate_table(steady, modes) + [""] + _concurrency_goals(steady, modes) + [""]
        lines += ["The whole closed batch (prefill, and the ragged end where speculation has finished the luckiest "
                  "requests first and the last rounds carry fewer requests):", ""]
    lines += _rate_table(rows, modes) + [""] + _concurrency_goals(rows, modes) + _scheduler_share_table(rows)
    return lines


def _mode_notes(modes: list) -> str:
    """What the timed load-aware configurations price rounds with, naming only those timed."""
    learning = [mode for mode in ("threshold", "causal", "budget", "DFlash budget (margin)") if mode in modes]
    notes = [f"{' / '.join(learning)} learn{'s' if len(learning) == 1 else ''} the device's costs online from "
             "the analytic prior"] if learning else []
    if "budget, frozen prior" in modes:
        notes.append("\"frozen prior\" keeps the prior")
    if "budget, calibrated" in modes:
        notes.append("\"calibrated\" a `dspark calibrate` profile")
    return "; " + ", ".join(notes) if notes else ""


def _in_flight_rows(rows: list) -> Optional[list]:
    """The rows' in-flight rates shaped like the rows themselves; None when any row lacks them
    (results written before the bench measured them)."""
    if not all(row.get("in_flight") for row in rows):
        return None
    return [{"concurrency": row["concurrency"], **row["in_flight"],
             "repeat_rates": {label: run["in_flight"] for label, run in row.get("runs", {}).items()}}
            for row in rows]


def _repeat_rates(row: dict) -> dict:
    """Each configuration's rate in every repeat, in run order (relative over the whole batch:
    every configuration emits the same tokens); empty for results without per-repeat numbers."""
    if "repeat_rates" in row:
        return row["repeat_rates"]
    return {label: [1.0 / s for s in run["seconds"]] for label, run in row.get("runs", {}).items()}


def _paired_ratio(row: dict, budget: str, rivals: list) -> Optional[float]:
    """The median over repeats of budget / max(rivals) within each repeat; None without two
    complete repeats. A repeat runs its configurations one after another in minutes, so a slow
    stretch of the machine hits a whole repeat more evenly than the medians of separate columns
    (plain decoding alone moved by 37 % between repeats at 8 requests)."""
    rates = _repeat_rates(row)
    if budget not in rates or any(label not in rates for label in rivals):
        return None
    count = min(len(rates[label]) for label in [budget] + rivals)
    if count < 2 or any(value is None for label in [budget] + rivals for value in rates[label][:count]):
        return None
    return statistics.median(rates[budget][i] / max(rates[label][i] for label in rivals) for i in range(count))


def _rate_table(rows: list, modes: list) -> list:
    lines = ["| requests | " + " | ".join(modes) + " |", "|---:|" + "---:|" * len(modes)]
    for row in rows:
        best = max(modes, key=row.get)
        lines.append(f"| {row['concurrency']} | " + " | ".join(
            (f"**{row[m]:.0f}**" if m == best else f"{row[m]:.0f}") for m in modes) + " |")
    return lines


def _scheduler_share_table(rows: list) -> list:
    """Planning, scheduling, acceptance estimation and cost learning as a share of round time, per
    speculative configuration (from engine.round_log: schedule_s + estimate_s + learn_s over round_s)."""
    labels = [label for label in rows[0].get("scheduler_share", {})]
    if not labels:
        return []
    lines = ["", "Scheduler share of round time (planning + schedule + acceptance estimate + cost learning):", "",
             "| requests | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for row in rows:
        shares = row.get("scheduler_share", {})
        lines.append(f"| {row['concurrency']} | " + " | ".join(
            f"{shares[label]:.1%}" if label in shares else "-" for label in labels) + " |")
    return lines


def _concurrency_goals(rows: list, modes: list) -> list:
    """Issue 13's goal per draft: budget >= 0.97 x max(no speculation, best fixed length) at every
    concurrency; and the scheduler's share of round time (goal < 2 %)."""
    lines = []
    for budget, prefix in (("budget", "fixed "), ("DFlash budget (margin)", "DFlash fixed ")):
        if budget not in modes:
            continue
        ratios, paired = [], []
        for row in rows:
            rivals = ["no speculation"] + [m for m in modes if m.startswith(prefix)]
            ratios.append((row["concurrency"], row[budget] / max(row[m] for m in rivals)))
            paired.append((row["concurrency"], _paired_ratio(row, budget, rivals)))
        worst = min(ratios, key=lambda item: item[1])
        shares = [row.get("scheduler_share", {}).get(budget) for row in rows]
        shares = [x for x in shares if x is not None]
        lines.append(f"- {budget}: " + ", ".join(f"{c}: {r:.2f}" for c, r in ratios) +
                     f" x max(no speculation, best fixed); worst {worst[1]:.2f} at {worst[0]} (goal >= 0.97: "
                     f"{_met(worst[1] >= 0.97)})" +
                     (f"; scheduler share of round time up to {max(shares):.1%} (goal < 2 %: "
                      f"{_met(max(shares) < 0.02)})" if shares else ""))
        if all(ratio is not None for _, ratio in paired):
            worst_paired = min(paired, key=lambda item: item[1])
            lines.append(f"- {budget}, paired by repeat (median over repeats of budget / the best rival in the same "
                         "repeat): " + ", ".join(f"{c}: {r:.2f}" for c, r in paired) +
                         f"; worst {worst_paired[1]:.2f} at {worst_paired[0]} (goal >= 0.97: "
                         f"{_met(worst_paired[1] >= 0.97)})")
    return lines


def to_markdown(results: dict, command: str, plots: Optional[dict] = None) -> str:
    lossless = results["lossless"]
    lines = [BEGIN, f"## `dspark bench` on {results.get('target', 'the reference models')}", "",
             f"- command: `{command}`",
             f"- machine: {results['machine']}, backend `{results['backend']}`",
             f"- date: {results['date']}, commit {results.get('commit') or 'unknown'}",
             f"- section times (s): " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()),
             f"- lossless check: {lossless['outputs_compared']} greedy speculative outputs compared token by token "
             f"with plain decoding: {lossless['mismatches']} mismatches, {len(lossless['near_ties'])} "
             f"floating-point near-ties", ""]
    for section, builder in (("acceptance", acceptance_tables), ("speed", speed_table),
                             ("concurrency", concurrency_table)):
        if section in results:
            lines += builder(results) + [""]
            if plots and section in plots:
                lines += [f"![{section}]({plots[section]})", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def splice_markdown(document: Path, section: str) -> None:
    """Replace the marked bench section of `document` (append it when absent)."""
    text = document.read_text() if document.is_file() else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    text = pattern.sub(lambda _: section, text, count=1) if pattern.search(text) else \
        text.rstrip("\n") + ("\n\n" if text else "") + section
    write_text_atomic(document, text)


def _save(fig, path: Path) -> None:
    """Write a figure atomically (a PNG written halfway never replaces the last good one)."""
    with atomic_output(path) as temporary:
        fig.savefig(temporary, dpi=110, format=path.suffix.lstrip("."))


def plot(results: dict, out_dir: Path, prefix: str = "bench") -> dict:
    """PNG plots beside the Markdown; returns {section: file name}. Empty without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    if "acceptance" in results:
        acceptance = results["acceptance"]
        datasets = list(acceptance)
        algorithms = [a for a in ALGORITHMS if any(a in per for per in acceptance.values())]
        fig, axes = plt.subplots(1, len(results["settings"]["temperatures"]), figsize=(11, 3.8), sharey=True)
        for ax, t in zip(list(getattr(axes, "flat", [axes])), results["settings"]["temperatures"]):
            width = 0.8 / len(algorithms)
            for i, a in enumerate(algorithms):
                values = [acceptance[d].get(a, {}).get(f"T={t:g}", {}).get("tau", 0) for d in datasets]
                ax.bar([x + i * width for x in range(len(datasets))], values, width, label=LABELS[a])
            ax.set_xticks([x + width * (len(algorithms) - 1) / 2 for x in range(len(datasets))], datasets)
            ax.set_title(f"T = {t:g}")
            ax.set_ylabel("tau (tokens per round)")
        axes_list = list(getattr(axes, "flat", [axes]))
        axes_list[0].legend()
        fig.tight_layout()
        files["acceptance"] = f"{prefix}_acceptance.png"
        _save(fig, out_dir / files["acceptance"])
        plt.close(fig)
    if "speed" in results:
        rows = results["speed"]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
        ax.barh([r["method"] for r in rows][::-1], [r["tokens_per_s"] for r in rows][::-1], color="tab:blue")
        ax.set_xlabel("tokens/s at batch 1")
        fig.tight_layout()
        files["speed"] = f"{prefix}_speed.png"
        _save(fig, out_dir / files["speed"])
        plt.close(fig)
    if "concurrency" in results:
        steady = _in_flight_rows(results["concurrency"])
        rows = steady or results["concurrency"]
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for mode in _modes(results["concurrency"][0]):
            ax.plot([r["concurrency"] for r in rows], [r[mode] for r in rows], marker="o", label=mode,
                    linestyle="-" if mode in ("budget", "causal", "threshold", "no speculation") else ":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("tokens/s, all requests in flight" if steady else "tokens/s")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files["concurrency"] = f"{prefix}_concurrency.png"
        _save(fig, out_dir / files["concurrency"])
        plt.close(fig)
    return files
