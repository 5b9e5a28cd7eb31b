"""Flags shared by the `dspark` commands, declared once.

- `add_backend`: `--backend` (every command that runs a model);
- argument types: `int_list`, `float_list`, `positive_int`, `non_negative_int`, `positive_float`,
  `probability`;
- `add_engine_flags` / `add_sampling_flags`: one flag per field of `EngineConfig` /
  `SamplingParams`, generated from the dataclass (its type, its default, the help text below),
  so a new engine option reaches the command line without anyone writing a flag for it;
  `engine_config(args)` and `sampling_params(args, base)` turn the parsed flags back into the
  dataclasses;
- `progress`: status lines on stderr (results go to stdout).

Sampling flags default to None: a flag the user did not give falls back to the target's
generation_config.json (`Engine.default_sampling_params`), else the dataclass default.
"""
import argparse
import math
import sys
import typing
from dataclasses import MISSING, fields, replace
from typing import Iterable, Optional

from ..backends import BACKENDS, ENV_VAR
from ..ops import SCHEDULE_MODES
from ..params import ACCEPTANCE_SOURCES, DTYPES, EngineConfig, SamplingParams


def progress(message: str) -> None:
    """A status line on stderr, flushed at once (stdout carries only results)."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- argument types
def _number_list(text: str, kind, example: str, noun: str) -> list:
    """'1,2,3' -> [kind(1), kind(2), kind(3)] (spaces allowed)."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {noun}s like '{example}', got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {noun}")
    return values


def int_list(text: str) -> list:
    """'1,2,3' -> [1, 2, 3] (spaces allowed)."""
    return _number_list(text, int, "1,2,3", "integer")


def positive_int_list(text: str) -> list:
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def float_list(text: str) -> list:
    """'0.9,0.8' -> [0.9, 0.8]."""
    return _number_list(text, float, "0.9,0.8", "number")


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, steps): 0 and negatives are usage errors."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    return _bounded_int(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates): 0, negatives, nan and inf are usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


# ----------------------------------------------------------------------------- shared flags
def add_backend(parser) -> None:
    parser.add_argument("--backend", choices=[*BACKENDS, "auto"], default=None,
                        help=f"device backend (default: ${ENV_VAR}, else auto)")


# Help text of each dataclass field. A field missing here still gets a flag (with a generic
# help line); tests/test_cli.py checks that every field has its own text.
ENGINE_HELP = {
    "dtype": "weights dtype; auto = the backend's default",
    "max_batch_size": "requests decoded together (KV-cache slots); more prompts queue",
    "max_model_len": "positions per request, prompt + output (default: min(model limit, 4096))",
    "schedule": "fixed: verify --verify-len drafts (default: the whole block); threshold: while the draft's "
                "survival >= --threshold; causal: paper Algorithm 1 against the device cost model; budget: the "
                "zero-overhead load-aware variant. All but fixed need confidences (see --acceptance)",
    "verify_len": "drafted tokens verified per round with --schedule fixed (default: the whole block)",
    "threshold": "survival threshold for --schedule threshold",
    "cost_profile": "measured cost profile from `dspark calibrate` (default: the backend's analytic prior)",
    "online_costs": "refit the cost model from this engine's measured rounds while it runs (--no-online-costs "
                    "keeps the starting model)",
    "acceptance": "where the load-aware schedules' confidences come from: head (the draft's confidence head), "
                  "margin (fitted online from the draft's top-2 margin), both, or auto (head if the draft has one)",
    "budget_lag": "--schedule budget: rounds between the confidences that size the budget and the round it "
                  "is spent in",
    "calibration": "how a confidence head is calibrated for the non-fixed schedules: online (default): the "
                   "stored STS temperatures, then a per-position logistic map refitted from verified rounds "
                   "while generating; offline: the stored STS temperatures alone",
    "static_shapes": "pad every round to the backend's token buckets (the path graph capture uses; same output)",
    "graphs": "capture each bucket's verify step once and replay it (default: the backend's choice)",
}
SAMPLING_HELP = {
    "max_new_tokens": "tokens to generate per prompt",
    "temperature": "0 = greedy",
    "top_k": "0 = off",
    "top_p": "1 = off",
    "seed": "per-request seed for reproducible sampling (default: random)",
    "stop_token_ids": "extra token ids that end generation, e.g. 7,9",
    "ignore_eos": "do not stop at end-of-sequence tokens",
    "stop": "a string that ends generation (the text stops before it); repeatable",
}
CHOICES = {"dtype": ["auto", *DTYPES], "schedule": list(SCHEDULE_MODES), "calibration": ["offline", "online"],
           "acceptance": list(ACCEPTANCE_SOURCES)}
# List fields: how one flag value is read, and whether the flag repeats.
LIST_FIELDS = {"stop": (str, "append", "STR"), "stop_token_ids": (int_list, "store", "IDS")}
METAVARS = {int: "N", float: "X", str: "VALUE"}
FIELD_METAVARS = {"cost_profile": "FILE.yaml", "seed": "S", "temperature": "T", "top_k": "K", "top_p": "P"}


def _field_type(cls, name: str):
    """The field's type with Optional[...] removed, and whether None is allowed."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is typing.Union and len(args) < len(typing.get_args(hint))
    return (args[0] if optional and len(args) == 1 else hint), optional


def add_dataclass_flags(parser, cls, help_text: dict, only: Optional[Iterable[str]] = None,
                        defaults: Optional[dict] = None, unset_default: bool = False) -> None:
    """One flag per field of dataclass `cls` (`--max-batch-size` for max_batch_size); the parsed
    value lands under the field's name. `only` picks fields; `defaults` overrides the dataclass
    defaults; with `unset_default` every flag defaults to None (= not given) and the help text
    says what applies then."""
    defaults = defaults or {}
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        kind, optional = _field_type(cls, f.name)
        default = defaults.get(f.name, None if f.default is MISSING else f.default)
        text = help_text.get(f.name, f"{cls.__name__}.{f.name}")
        if default is not None and default is not False:
            text += " (default: %(default)s)" if not unset_default else f" (default: {default})"
        options = dict(dest=f.name, default=None if unset_default else default, help=text)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            action = "store_true" if not optional and default is False else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, **options)
        elif f.name in LIST_FIELDS:
            reader, action, metavar = LIST_FIELDS[f.name]
            parser.add_argument(flag, type=reader, action=action, metavar=metavar, **options)
        elif f.name in CHOICES:
            parser.add_argument(flag, type=kind, choices=CHOICES[f.name], **options)
        else:
            metavar = FIELD_METAVARS.get(f.name, METAVARS.get(kind, "VALUE"))
            parser.add_argument(flag, type=kind, metavar=metavar, **options)


def add_engine_flags(parser, only: Optional[Iterable[str]] = None, defaults: Optional[dict] = None) -> None:
    """EngineConfig's fields as flags, with the dataclass's defaults (or `defaults`)."""
    add_dataclass_flags(parser, EngineConfig, ENGINE_HELP, only, defaults)


# Sampling fields a target's generation_config.json can set (Engine.default_sampling_params).
GENERATION_CONFIG_FIELDS = ("temperature", "top_k", "top_p")


def add_sampling_flags(parser, only: Optional[Iterable[str]] = None) -> None:
    """SamplingParams' fields as flags that default to None: not given = the target's
    generation_config.json for temperature / top-k / top-p, else the SamplingParams default."""
    texts = dict(SAMPLING_HELP)
    for f in fields(SamplingParams):
        if f.name in GENERATION_CONFIG_FIELDS:
            texts[f.name] = f"{SAMPLING_HELP[f.name]} (default: the target's generation_config.json, else {f.default})"
    add_dataclass_flags(parser, SamplingParams, texts, only,
                        defaults={name: None for name in GENERATION_CONFIG_FIELDS}, unset_default=True)


def engine_config(args) -> EngineConfig:
    """An EngineConfig from the engine flags present on `args` (the others keep their defaults).
    Validated here, before any model is loaded."""
    names = [f.name for f in fields(EngineConfig) if hasattr(args, f.name)]
    return EngineConfig(**{name: getattr(args, name) for name in names})


def sampling_overrides(args) -> dict:
    """The sampling flags the user gave, checked now (a bad value fails before loading)."""
    given = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if getattr(args, f.name, None) is not None}
    SamplingParams(**given)
    return given


def sampling_params(args, base: SamplingParams) -> SamplingParams:
    """`base` (e.g. `engine.default_sampling_params()`) with the given sampling flags on top."""
    return replace(base, **sampling_overrides(args))


__all__ = ["CHOICES", "ENGINE_HELP", "SAMPLING_HELP", "add_backend", "add_dataclass_flags", "add_engine_flags",
           "add_sampling_flags", "engine_config", "float_list", "int_list", "non_negative_int", "positive_float",
           "positive_int",
           "positive_int_list", "probability", "progress", "sampling_overrides", "sampling_params"]
