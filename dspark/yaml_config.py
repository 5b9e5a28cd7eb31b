"""Reading a YAML file into a typed dataclass config, with unknown keys rejected."""
from dataclasses import fields
from pathlib import Path

import yaml

from .errors import ConfigError


def read_config_yaml(cls, path, what: str, missing_hint: str = "") -> dict:
    """The YAML mapping in `path`, checked against the fields of dataclass `cls`.
    Errors name the file and say what is wrong: missing file, invalid YAML, not a mapping,
    unknown keys (listing the valid ones)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{missing_hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {_where(path, exc)} is not valid YAML ({_problem(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a YAML mapping")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{what} {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return data


def _where(path: Path, exc: yaml.YAMLError) -> str:
    """`file:line` (1-based) of a parse error, or the file alone when PyYAML gives no position."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return str(path)
    lines = max(1, len(path.read_text().splitlines()))
    return f"{path}:{min(mark.line + 1, lines)}"      # an error at the end of the stream is on the last line


def _problem(exc: yaml.YAMLError) -> str:
    """PyYAML's reason in one line (its str() spans several, with the offending text and a caret)."""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    text = "; ".join(part for part in parts if part) or str(exc)
    return " ".join(text.split())
