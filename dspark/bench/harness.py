"""The evaluation and benchmark harness behind `dspark bench`.

Three measurements on JSONL prompt sets ({"turns": [...]}, the first turn is the prompt):

  acceptance   tau (tokens per round) per dataset and draft algorithm at T = 0 and T = 1 with the
               whole block verified, per-position conditional acceptance, and the DSpark confidence
               head's calibration (ECE / AUROC / Brier) before and after its stored STS temperatures;
  speed        wall-clock tokens/s at batch 1: transformers generate(), dspark without a draft,
               transformers assisted generation with a standalone draft, dspark with each draft and
               each scheduler mode; configurations are timed round-robin and the median is kept;
  concurrency  tokens/s for 1..64 requests decoded together, each generating exactly max_new_tokens
               (end-of-sequence ignored, so every mode does the same work): no speculation, fixed
               verify lengths, and the load-aware modes with the online cost model (the default),
               budget with the frozen prior and with a calibrated profile (settings.cost_profile,
               else one calibrated first), DFlash with its margin estimator, and each speculative
               configuration's scheduler share of round time.

Lossless check: every greedy speculative output is compared token by token with dspark's plain
decoding of the same prompt. A mismatch fails the run (LosslessError) unless the target's two best
logits at the first differing position are within `TIE_TOLERANCE` (a floating-point near-tie,
which batching may legitimately break either way); such positions are counted and reported.

Uses only the public engine API and transformers; imported by dspark.cli_bench.
"""
import gc
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..backends import get_backend
from ..backends.cpu import cpu_model
from ..engine import Engine
from ..errors import ConfigError, DSparkError
from ..models import DRAFT_ALGORITHMS, load_draft, load_target
from ..models.sources import resolve_model
from ..params import DTYPES, EngineConfig, SamplingParams
from ..prompts import prompt_ids, read_prompts
from ..scheduling.acceptance import heldout_report
from ..scheduling.calibration import calibration_report, survival_labels
from .profiling import profile_engine

DATASETS = ("gsm8k", "math500", "humaneval", "mbpp", "mt-bench")
ALGORITHMS = tuple(DRAFT_ALGORITHMS)                          # from the registry
LABELS = {name: entry.label for name, entry in DRAFT_ALGORITHMS.items()}
SCHEDULER_MODES = ("threshold", "causal", "budget")
# The concurrency section's configuration groups (`dspark bench --modes`). Plain decoding is always
# timed: it is every output's lossless reference and every ratio's baseline.
CONCURRENCY_MODES = {
    "fixed": "the main draft at each --fixed-lengths verify length",
    "threshold": "the main draft, threshold schedule",
    "causal": "the main draft, Algorithm 1 with the online cost model",
    "budget": "the main draft, budget schedule with the online cost model (the engine's default)",
    "frozen": "budget with the backend's prior, never refitted",
    "calibrated": "budget with a `dspark calibrate` profile (calibrated first unless --cost-profile)",
    "dflash": "the DFlash draft at each fixed length, and with budget and the margin estimator",
}
TIE_TOLERANCE = 1e-3


class LosslessError(DSparkError):
    """A speculative greedy output differed from plain decoding (outside a floating-point near-tie)."""


@dataclass
class BenchSettings:
    prompts_per_dataset: int       # acceptance prompts per dataset
    max_new_tokens: int
    speed_prompts: int             # batch-1 speed prompts per dataset
    speed_max_new_tokens: int
    concurrency: list
    fixed_lengths: list
    repeats: int                   # round-robin repeats of every timed configuration
    block_size: int = 7            # the longest block among the drafts (set by run_benchmark from them)
    temperatures: list = field(default_factory=lambda: [0.0, 1.0])
    cost_profile: Optional[str] = None   # the concurrency section's calibrated profile (None: calibrate there)
    calibrated_out: Optional[str] = None  # where a profile calibrated there is written (None: a temporary file)
    assistant: bool = True         # time transformers' assisted generation (an early-exit assistant by default)
    modes: Optional[list] = None   # the concurrency section's configuration groups (None: all of CONCURRENCY_MODES)


QUICK = BenchSettings(prompts_per_dataset=3, max_new_tokens=48, speed_prompts=1, speed_max_new_tokens=48,
                      concurrency=[1, 8, 32], fixed_lengths=[3, 7], repeats=1)
FULL = BenchSettings(prompts_per_dataset=24, max_new_tokens=128, speed_prompts=2, speed_max_new_tokens=128,
                     concurrency=[1, 2, 4, 8, 16, 32, 64], fixed_lengths=[1, 3, 5, 7], repeats=3)


# ------------------------------------------------------------------------------------ inputs
def find_eval_dir() -> Optional[Path]:
    """$DSPARK_EVAL_DATA, else ../shared/data/eval or shared/data/eval from the working directory or
    from a source checkout of dspark."""
    if os.environ.get("DSPARK_EVAL_DATA"):
        return Path(os.environ["DSPARK_EVAL_DATA"])
    source_root = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), source_root):
        for candidate in (base.parent / "shared" / "data" / "eval", base / "shared" / "data" / "eval"):
            if candidate.is_dir():
                return candidate
    return None


def load_prompt_sets(data_dir=None, files=(), limit: Optional[int] = None) -> dict:
    """{dataset name: [prompt text, ...]} from the known files of a folder and any extra JSONL files."""
    sets = {}
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"evaluation data folder {str(data_dir)!r} does not exist")
        for name in DATASETS:
            path = data_dir / f"{name}.jsonl"
            if path.is_file():
                sets[name] = [p["prompt"] for p in read_prompts(path, limit)]
    for path in files:
        sets[Path(path).stem] = [p["prompt"] for p in read_prompts(path, limit)]
    if not sets:
        raise FileNotFoundError("no evaluation prompts found: pass --data DIR (a folder with gsm8k.jsonl, "
                                "mt-bench.jsonl, ... like ../shared/data/eval) or --prompts FILE.jsonl, "
                                "or set DSPARK_EVAL_DATA")
    return sets


@dataclass
class Models:
    """The target, its tokenizer and drafts, loaded once and shared by every engine of a run."""
    target_dir: Path
    target: torch.nn.Module
    tokenizer: object
    drafts: dict
    backend: object
    assistant_dir: Optional[Path] = None
    dtype: str = "float32"         # what dspark's engines run in ("auto": the backend's default)

    @classmethod
    def load(cls, target_dir, drafts: dict, assistant_dir=None, backend=None, dtype: str = "float32") -> "Models":
        backend = get_backend(backend)
        EngineConfig(dtype=dtype)                              # a bad dtype fails here, with the valid names
        # names ("smollm2", "smollm2-dspark") and .gguf files become directories transformers can read too
        target_dir = resolve_model(target_dir)
        drafts = {name: resolve_model(path) for name, path in drafts.items()}
        torch_dtype = backend.default_dtype if dtype == "auto" else DTYPES[dtype]
        target, tokenizer = load_target(target_dir, backend.device, torch_dtype)
        if tokenizer is None:
            raise ValueError(f"the benchmark needs a tokenizer in the target directory {target_dir}")
        loaded = {}
        for name, path in drafts.items():
            draft = load_draft(path, target.config, target)
            loaded[name] = draft.to(device=backend.device, dtype=torch_dtype).eval()
        return cls(Path(target_dir), target, tokenizer, loaded, backend,
                   Path(assistant_dir) if assistant_dir else None, dtype)

    def engine(self, draft: Optional[str] = None, **config) -> Engine:
        return Engine(self.target, self.tokenizer, self.drafts[draft] if draft else None, self.backend,
                      EngineConfig.from_kwargs(dtype=self.dtype, **config))

    def encode(self, text: str) -> list:
        return prompt_ids({"prompt": text}, self.tokenizer)

    def block_size(self, draft: str) -> int:
        """Tokens the draft proposes per round: its whole block, the most a round verifies."""
        return self.drafts[draft].config.block_size

    def full_block_label(self, draft: str) -> str:
        """The speed section's label of the draft's whole-block row, e.g. "dspark + DSpark, fixed 4"."""
        return f"dspark + {LABELS.get(draft, draft)}, fixed {self.block_size(draft)}"


def _greedy(max_new_tokens: int, count: int, ignore_eos: bool = False) -> list:
    return [SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos) for _ in range(count)]


# ------------------------------------------------------------------------------------ lossless
def _top2_gap(target_dir: Path, ids: list, cache: dict) -> float:
    """The target's top-1 minus top-2 logit after `ids`, from an independent implementation
    (transformers, float32), so a near-tie is judged without the engine under test."""
    if "hf" not in cache:
        from transformers import AutoModelForCausalLM

        cache["hf"] = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = cache["hf"](torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits.double(), 2).values
    return float(top[0] - top[1])


class LosslessLedger:
    """Compares speculative greedy outputs with plain decoding; keeps count for the report."""

    def __init__(self, models: Models):
        self.models, self.compared, self.near_ties, self.failures, self._cache = models, 0, [], [], {}

    def check(self, label: str, prompts: list, reference: list, outputs: list) -> None:
        for prompt, ref, out in zip(prompts, reference, outputs):
            self.compared += 1
            if ref == out:
                continue
            common = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
            gap = _top2_gap(self.models.target_dir, prompt + ref[:common], self._cache)
            entry = {"run": label, "position": common, "top2_gap": gap}
            (self.near_ties if gap < TIE_TOLERANCE else self.failures).append(entry)
        if self.failures:
            worst = self.failures[0]
            raise LosslessError(f"{worst['run']}: speculative greedy output differs from plain decoding at token "
                                f"{worst['position']} (target top-2 logit gap {worst['top2_gap']:.3g}, not a near-tie)")

    def summary(self) -> dict:
        return {"outputs_compared": self.compared, "near_ties": self.near_ties, "mismatches": len(self.failures)}


# ------------------------------------------------------------------------------------ acceptance
def _acceptance_stats(engine: Engine, gamma: int, with_confidence: bool, greedy: bool = False) -> dict:
    rounds = [r for r in engine.round_log if r.get("drafted")]
    if not rounds:
        return {"tau": 1.0, "rounds": 0, "position_acceptance": []}
    accepted = torch.cat([r["accepted"] for r in rounds]).long()
    lens = torch.cat([r["verify_lens"] for r in rounds]).long()
    tau = float((accepted + 1).double().mean())
    conditional = []
    for k in range(1, gamma + 1):
        reached = (accepted >= k - 1) & (lens >= k)
        conditional.append(float((accepted[reached] >= k).double().mean()) if reached.any() else float("nan"))
    stats = {"tau": tau, "rounds": int(accepted.numel()), "position_acceptance": conditional}
    if with_confidence and all("confidence_logits" in r for r in rounds):
        logits = torch.cat([r["confidence_logits"] for r in rounds]).float()
        labels, known = survival_labels(lens, accepted, gamma)
        temperatures = (engine.sts.greedy if greedy else None) or engine.sts.sampled
        stats["calibration"] = {"before": _mean_report(calibration_report(logits, labels, known)),
                                "after": _mean_report(calibration_report(logits, labels, known, temperatures))}
    if all("acceptance_features" in r for r in rounds):
        # The acceptance estimator for drafts without a confidence head, judged like the head:
        # fitted on the first half of these whole-block rounds, scored on the second.
        features = torch.cat([r["acceptance_features"] for r in rounds]).float()
        report = heldout_report(features, lens, accepted)
        if report:
            stats["margin_estimator"] = _mean_report(report)
    return stats


def _mean_report(per_position: list) -> dict:
    """Count-weighted means over positions of ECE and Brier; AUROC averaged over positions with both classes."""
    total = sum(p["count"] for p in per_position) or 1
    aurocs = [p["auroc"] for p in per_position if p["auroc"] == p["auroc"]]
    return {"ece": sum(p["ece"] * p["count"] for p in per_position if p["count"]) / total,
            "brier": sum(p["brier"] * p["count"] for p in per_position if p["count"]) / total,
            "auroc": sum(aurocs) / len(aurocs) if aurocs else float("nan")}


def run_acceptance(models: Models, sets: dict, settings: BenchSettings, ledger: LosslessLedger,
                   progress: Callable = print) -> dict:
    """tau per dataset x algorithm x temperature with the whole block verified."""
    results = {}
    for dataset, texts in sets.items():
        prompts = [models.encode(t) for t in texts]
        longest = max(len(p) for p in prompts) + settings.max_new_tokens + settings.block_size + 2
        common = dict(max_batch_size=len(prompts), max_model_len=longest)
        plain = models.engine(**common).generate(prompts, _greedy(settings.max_new_tokens, len(prompts)))
        reference = [o.token_ids for o in plain]
        for algorithm in models.drafts:
            # acceptance="margin": every round also logs the draft's top-2 margins (the schedule
            # stays fixed, so outputs and tau are unchanged) for the margin estimator's report.
            engine = models.engine(algorithm, schedule="fixed", acceptance="margin", **common)
            for temperature in settings.temperatures:
                params = [SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=temperature, seed=i)
                          for i in range(len(prompts))]
                outputs = engine.generate(prompts, params)
                if temperature == 0.0:
                    ledger.check(f"acceptance/{dataset}/{algorithm}", prompts, reference,
                                 [o.token_ids for o in outputs])
                stats = _acceptance_stats(engine, engine.gamma, engine.draft.has_confidence, temperature == 0.0)
                results.setdefault(dataset, {}).setdefault(algorithm, {})[f"T={temperature:g}"] = stats
                progress(f"  {dataset:10s} {LABELS.get(algorithm, algorithm):8s} T={temperature:g}: "
                         f"tau {stats['tau']:.2f} over {stats['rounds']} request-rounds")
    return results


def macro_tau(acceptance: dict, algorithm: str, temperature: str) -> float:
    values = [per[algorithm][temperature]["tau"] for per in acceptance.values() if algorithm in per]
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------ speed at batch 1
class _Runner:
    """Generates one prompt at batch 1; keeps tau's numerator and denominator for the engine runs."""

    def __init__(self, generate, kind: str):
        self.generate, self.kind = generate, kind
        self.rounds = self.round_tokens = 0

    def __call__(self, prompt: list, max_new_tokens: int) -> list:
        return self.generate(self, prompt, max_new_tokens)

    @property
    def tau(self) -> Optional[float]:
        return self.round_tokens / self.rounds if self.rounds else None


HF_METHODS = {
    "generate": "transformers generate()",
    "prompt_lookup": "transformers prompt lookup",
    "assisted": "transformers assisted generation",
}


def _hf_runner(models: Models, method: str, assistant=None) -> _Runner:
    """transformers' own batch-1 decoding: plain `generate()`, prompt-lookup decoding
    (`prompt_lookup_num_tokens`, drafts copied from the prompt), or assisted generation with a small
    assistant model sharing the tokenizer. All greedy: they are lossless too."""
    from transformers import AutoModelForCausalLM

    device = models.backend.device
    target = AutoModelForCausalLM.from_pretrained(models.target_dir, dtype=torch.float32).to(device).eval()
    extra = {"generate": {}, "prompt_lookup": {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 3},
             "assisted": {"assistant_model": assistant}}[method]
    eos, pad = models.tokenizer.eos_token_id, models.tokenizer.pad_token_id

    def generate(runner, prompt: list, max_new_tokens: int) -> list:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=eos, pad_token_id=pad, **extra)
        return out[0, len(prompt):].tolist()
    return _Runner(generate, "transformers")


def load_assistant(models: Models):
    """The assistant model for transformers' assisted generation: the given directory, or else an
    early-exit slice of the target itself (its first quarter of layers, its final norm and LM head:
    the one small model with the target's tokenizer that can be built here without training)."""
    from transformers import AutoModelForCausalLM

    device = models.backend.device
    if models.assistant_dir is not None:
        return AutoModelForCausalLM.from_pretrained(models.assistant_dir, dtype=torch.float32).to(device).eval()
    model = AutoModelForCausalLM.from_pretrained(models.target_dir, dtype=torch.float32).to(device).eval()
    keep = max(1, model.config.num_hidden_layers // 4)
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:keep]
    return model


def _engine_runner(engine: Engine, kind: str) -> _Runner:
    def generate(runner, prompt: list, max_new_tokens: int) -> list:
        output = engine.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens))[0]
        if engine.draft is not None and output.stats.get("tau") is not None:
            runner.rounds += output.stats["rounds"]
            runner.round_tokens += output.stats["tau"] * output.stats["rounds"]
        return output.token_ids
    return _Runner(generate, kind)


def run_speed(models: Models, sets: dict, settings: BenchSettings, ledger: LosslessLedger,
              progress: Callable = print) -> list:
    prompts = [models.encode(t) for texts in sets.values() for t in texts[:settings.speed_prompts]]
    n = settings.speed_max_new_tokens
    config = dict(max_batch_size=1, max_model_len=max(len(p) for p in prompts) + n + settings.block_size + 2)
    runners = {HF_METHODS["generate"]: _hf_runner(models, "generate"),
               HF_METHODS["prompt_lookup"]: _hf_runner(models, "prompt_lookup")}
    if settings.assistant:
        runners[HF_METHODS["assisted"]] = _hf_runner(models, "assisted", load_assistant(models))
    runners["dspark, no draft"] = _engine_runner(models.engine(**config), "plain")
    for algorithm in models.drafts:
        runners[models.full_block_label(algorithm)] = _engine_runner(
            models.engine(algorithm, schedule="fixed", **config), "speculative")
    if "dspark" in models.drafts:
        for mode in SCHEDULER_MODES:
            runners[f"dspark + DSpark, {mode}"] = _engine_runner(models.engine("dspark", schedule=mode, **config),
                                                                 "speculative")
    for run in runners.values():                         # warm-up (allocations, first-call costs)
        run(prompts[0], 4)
    seconds = {label: [] for label in runners}
    outputs = {}
    for repeat in range(settings.repeats):
        for label, run in rotated(list(runners.items()), repeat):
            run.rounds = run.round_tokens = 0
            started = time.perf_counter()
            outputs[label] = [run(p, n) for p in prompts]
            seconds[label].append(time.perf_counter() - started)
        progress(f"  speed: round-robin {repeat + 1}/{settings.repeats} done")
    reference = outputs["dspark, no draft"]
    rows = []
    for label, run in runners.items():
        tokens = sum(len(o) for o in outputs[label])
        median = statistics.median(seconds[label])
        identical = sum(a == b for a, b in zip(outputs[label], reference))
        if run.kind == "speculative":
            ledger.check(f"speed/{label}", prompts, reference, outputs[label])
        rows.append({"method": label, "tokens": tokens, "seconds": median, "all_seconds": seconds[label],
                     "tokens_per_s": tokens / median, "tau": run.tau,
                     "identical_to_plain": f"{identical}/{len(prompts)}"})
    base = {r["method"]: r["tokens_per_s"] for r in rows}
    best_hf = max(base[label] for label in HF_METHODS.values() if label in base)
    for r in rows:
        r["vs_transformers"] = r["tokens_per_s"] / base[HF_METHODS["generate"]]
        r["vs_best_transformers"] = r["tokens_per_s"] / best_hf
        r["vs_plain"] = r["tokens_per_s"] / base["dspark, no draft"]
    return rows


def machine_limits(models: Models, sets: dict, settings: BenchSettings, speed: list) -> list:
    """machine_limit for every draft, at the tau its fixed full-block row measured in the speed section."""
    taus = {r["method"]: r["tau"] for r in speed}
    limits = []
    for algorithm in models.drafts:
        tau = taus.get(models.full_block_label(algorithm))
        if tau is not None:
            limits.append(machine_limit(models, sets, settings, algorithm, tau))
    return limits


def machine_limit(models: Models, sets: dict, settings: BenchSettings, algorithm: str, tau: float) -> dict:
    """The speed-up this machine allows a draft with acceptance tau at batch 1:
    tau * t_target(1) / (t_draft + t_verify(gamma + 1)), from the engine's own round times
    (median over the rounds of a few prompts; host overheads included on both sides)."""
    prompts = [models.encode(t) for texts in sets.values() for t in texts[:1]]
    n = min(64, settings.speed_max_new_tokens)
    config = dict(max_batch_size=1, max_model_len=max(len(p) for p in prompts) + n + settings.block_size + 2)
    times = {}
    for label, engine in (("plain", models.engine(**config)), ("speculative", models.engine(algorithm, **config))):
        rounds = []
        for prompt in prompts:
            engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))
            rounds += [r["round_s"] for r in engine.round_log if label == "plain" or r.get("drafted")]
        times[label] = statistics.median(rounds)
    return {"algorithm": algorithm, "tau": tau, "t_target_1": times["plain"],
            "t_draft_plus_verify": times["speculative"], "limit": tau * times["plain"] / times["speculative"]}


# ------------------------------------------------------------------------------------ concurrency
def concurrency_modes(models: Models, settings: BenchSettings, calibrated: Optional[str]) -> list:
    """(label, draft, engine options) of every configuration the concurrency section times: plain
    decoding, fixed verify lengths and the load-aware modes with the online cost model (the
    engine's default), budget with the frozen prior and with a calibrated profile, and DFlash
    (no confidence head: the margin estimator) with fixed lengths and budget; only the groups of
    `settings.modes` when it is set (plain decoding always)."""
    wanted = wanted_modes(settings)
    main = "dspark" if "dspark" in models.drafts else next(iter(models.drafts), None)
    modes = [("no speculation", None, {})]
    if main is None:
        return modes
    if "fixed" in wanted:
        modes += [(f"fixed {k}", main, {"schedule": "fixed", "verify_len": k})
                  for k in fixed_lengths(settings.fixed_lengths, models.block_size(main))]
    modes += [(mode, main, {"schedule": mode}) for mode in SCHEDULER_MODES if mode in wanted]
    if "frozen" in wanted:
        modes.append(("budget, frozen prior", main, {"schedule": "budget", "online_costs": False}))
    if calibrated is not None and "calibrated" in wanted:
        modes.append(("budget, calibrated", main, {"schedule": "budget", "online_costs": False,
                                                   "cost_profile": calibrated}))
    if "dflash" in wanted and "dflash" in models.drafts and main != "dflash":
        modes += [(f"DFlash fixed {k}", "dflash", {"schedule": "fixed", "verify_len": k})
                  for k in fixed_lengths(settings.fixed_lengths, models.block_size("dflash"))]
        modes.append(("DFlash budget (margin)", "dflash", {"schedule": "budget"}))
    return modes


def wanted_modes(settings: BenchSettings) -> set:
    """The configuration groups the concurrency section times: `settings.modes`, else all."""
    return set(CONCURRENCY_MODES if settings.modes is None else settings.modes)


def check_concurrency_modes(names: list) -> list:
    """`--modes` as given, checked against CONCURRENCY_MODES (a ConfigError names the valid ones)."""
    unknown = [name for name in names if name not in CONCURRENCY_MODES]
    if unknown or not names:
        raise ConfigError(f"unknown concurrency mode(s) {', '.join(map(repr, unknown)) or '(none given)'}; valid: "
                          f"{', '.join(CONCURRENCY_MODES)} (plain decoding is always timed)")
    return names


def fixed_lengths(lengths: list, block_size: int) -> list:
    """The fixed verify lengths a draft can run: longer ones are capped at its block (a fixed
    schedule verifies at most the whole block), duplicates dropped."""
    return sorted({min(k, block_size) for k in lengths})


def calibrated_profile(models: Models, settings: BenchSettings, pool: list, progress: Callable = print) -> Optional[str]:
    """settings.cost_profile, or a profile calibrated here (`dspark calibrate`'s estimator, at the
    section's concurrencies and one context bucket covering its requests), written to
    settings.calibrated_out (else a temporary file). None without a draft."""
    if settings.cost_profile or not models.drafts or "calibrated" not in wanted_modes(settings):
        return settings.cost_profile
    draft = "dspark" if "dspark" in models.drafts else next(iter(models.drafts))
    context = int(statistics.median(len(p) for p in pool) + settings.max_new_tokens // 2)
    # Room for the section's requests, and for the profile's own rounds at that context (two
    # repeats of whole blocks: profile_engine refuses a context it cannot decode behind).
    longest = max(max(len(p) for p in pool) + settings.max_new_tokens + settings.block_size + 2,
                  context + 2 * (settings.block_size + 1) + 4)
    engine = models.engine(draft, max_batch_size=max(settings.concurrency), max_model_len=longest)
    started = time.perf_counter()
    profile = profile_engine(engine, context_lens=(context,), repeats=2, requests=settings.concurrency)
    path = Path(settings.calibrated_out or Path(tempfile.mkdtemp(prefix="dspark-bench-")) / "calibrated.yaml")
    profile.to_yaml(path)
    progress(f"  calibrated a cost profile in {time.perf_counter() - started:.0f} s ({path})")
    return str(path)


def _scheduler_share(engine: Engine) -> float:
    """Planning, scheduling, estimation and cost learning as a share of the rounds' wall time."""
    rounds = engine.round_log
    spent = sum(r.get("schedule_s", 0.0) + r.get("learn_s", 0.0) + r.get("estimate_s", 0.0) for r in rounds)
    return spent / max(sum(r["round_s"] for r in rounds), 1e-12)


def in_flight_rate(round_log: list, concurrency: int) -> Optional[float]:
    """Tokens/s while all `concurrency` requests were in flight: from the start of the first round
    to the end of the last round that still carried every request (host time between rounds
    included, the prefill and the ragged end excluded).

    The concurrency section starts its requests together and asks each for exactly the same
    number of tokens. Plain decoding finishes them all in the same round; speculation finishes
    the luckiest first, and the batch ends with rounds that carry fewer requests (at 2 requests
    on SmolLM2, ~18 of ~126 rounds ran one request at half the batch's rate). A server whose
    freed slots are refilled never has that end, so this rate is what "tokens/s at concurrency C"
    means there; the closed batch's wall-clock rate is reported beside it."""
    full = []
    for record in round_log:
        if record["requests"] != concurrency:
            break
        full.append(record)
    if not full:
        return None
    seconds = full[-1]["ended"] - (full[0]["ended"] - full[0]["round_s"])
    return sum(record["emitted"] for record in full) / max(seconds, 1e-12)


def rotated(configurations: list, repeat: int) -> list:
    """The round-robin order of repeat `repeat`: each repeat starts one configuration later, so
    a machine that drifts within a repeat (turbo, a neighbour's load) does not always charge the
    same configuration for being first or last."""
    shift = repeat % max(1, len(configurations))
    return configurations[shift:] + configurations[:shift]


def interleaved_pool(models: Models, sets: dict) -> list:
    """Every prompt of the sets, encoded, the datasets interleaved (one of each set in turn)."""
    return [models.encode(t) for group in zip(*sets.values()) for t in group]


def concurrency_prompts(pool: list, count: int) -> list:
    """The prompts of `count` concurrent requests: the pool's first `count`, cycling."""
    return [pool[i % len(pool)] for i in range(count)]


def run_concurrency(models: Models, sets: dict, settings: BenchSettings, ledger: LosslessLedger,
                    progress: Callable = print) -> list:
    """Tokens/s per configuration of `concurrency_modes` at each concurrency, timed round-robin
    (median of `repeats`): over the whole closed batch (row[label]) and while all its requests
    were in flight (row["in_flight"][label], see `in_flight_rate`), plus each speculative
    configuration's scheduler share of round time and every repeat's raw numbers (row["runs"]).
    One engine (and its KV cache) exists at a time: at high concurrency the caches of every mode
    together would not fit, so each configuration's engine is built for its turn and released."""
    pool = interleaved_pool(models, sets)
    n = settings.max_new_tokens
    modes = concurrency_modes(models, settings, calibrated_profile(models, settings, pool, progress))
    rows = []
    for concurrency in settings.concurrency:
        prompts = concurrency_prompts(pool, concurrency)
        config = dict(max_batch_size=concurrency, max_model_len=max(len(p) for p in prompts) + n + settings.block_size + 2)
        seconds, outputs, shares, in_flight = ({label: [] for label, _, _ in modes} for _ in range(4))
        for repeat in range(settings.repeats):
            for label, draft, options in rotated(modes, repeat):
                engine = models.engine(draft, **config, **options)
                started = time.perf_counter()
                outputs[label].append([o.token_ids for o in engine.generate(prompts,
                                                                             _greedy(n, concurrency, ignore_eos=True))])
                seconds[label].append(time.perf_counter() - started)
                in_flight[label].append(in_flight_rate(engine.round_log, concurrency))
                if engine.draft is not None:
                    shares[label].append(_scheduler_share(engine))
                del engine
                gc.collect()
        row = {"concurrency": concurrency}
        reference = outputs["no speculation"][0]
        for label in seconds:                       # every repeat's outputs, not only the last one's
            for repeat, run in enumerate(outputs[label]):
                if label != "no speculation" or repeat > 0:
                    ledger.check(f"concurrency/{concurrency}/{label}/repeat {repeat}", prompts, reference, run)
            row[label] = sum(len(o) for o in outputs[label][-1]) / statistics.median(seconds[label])
        row["scheduler_share"] = {label: statistics.median(values) for label, values in shares.items() if values}
        row["in_flight"] = {label: statistics.median(rates) for label, rates in in_flight.items()
                            if rates and None not in rates}
        # Every repeat's own numbers, in run order: on a noisy machine the medians hide how far
        # one configuration's runs spread (the tables print medians; the JSON keeps these).
        row["runs"] = {label: {"seconds": seconds[label], "in_flight": in_flight[label]} for label in seconds}
        rows.append(row)
        steady = row["in_flight"]
        best = max(steady, key=steady.get)
        progress(f"  concurrency {concurrency:3d}: all {concurrency} in flight: best {best} at {steady[best]:.0f} "
                 f"tokens/s, budget {steady.get('budget', float('nan')):.0f}; whole batch: no speculation "
                 f"{row['no speculation']:.0f}, budget {row.get('budget', float('nan')):.0f}; scheduler share "
                 f"{row['scheduler_share'].get('budget', float('nan')):.1%}")
    return rows


# ------------------------------------------------------------------------------------ the run
def machine_description() -> str:
    """Architecture, CPU model and vector extensions, cores, OS and torch: CPU speed-ups depend on the
    CPU (a memory-bound core gains more from speculation than one with AMX), so tables name it."""
    cores = os.cpu_count()
    cpu = cpu_model()
    arch = platform.machine() or platform.processor()
    return f"{arch}{f' ({cpu})' if cpu else ''}, {cores} cores, {platform.system()} (torch {torch.__version__})"


def git_commit() -> Optional[str]:
    """The short commit of the dspark checkout this runs from (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_benchmark(models: Models, sets: dict, settings: BenchSettings, sections=("acceptance", "speed", "concurrency"),
                  progress: Callable = print) -> dict:
    ledger = LosslessLedger(models)
    if models.drafts:
        settings = replace(settings, block_size=max(models.block_size(name) for name in models.drafts))
    results = {"settings": asdict(settings), "block_sizes": {name: models.block_size(name) for name in models.drafts},
               "datasets": {k: len(v) for k, v in sets.items()},
               "target": models.target_dir.name, "machine": machine_description(), "backend": models.backend.name,
               "date": time.strftime("%Y-%m-%d"), "commit": git_commit()}
    timings = {}
    for section, runner in (("acceptance", run_acceptance), ("speed", run_speed), ("concurrency", run_concurrency)):
        if section not in sections:
            continue
        progress(f"[{section}]")
        started = time.perf_counter()
        results[section] = runner(models, sets, settings, ledger, progress)
        timings[section] = round(time.perf_counter() - started, 1)
        if section == "speed":
            results["machine_limit"] = machine_limits(models, sets, settings, results["speed"])
    results["seconds"] = timings
    results["lossless"] = ledger.summary()
    return results
