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
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a YAML mapping")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{what} {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return data
