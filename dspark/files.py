"""Writing a user's files safely: one output-path guard and one atomic writer.

Every command that writes (init-draft, train, calibrate, sts --write, regenerate, bench) asks
`check_output` about its output before any expensive work, so a typo costs milliseconds, not
a profiling run, and never a model: an output that is (or contains) one of the command's inputs,
a file where a directory is needed (or the reverse), or a place that cannot be written is
refused with a `ConfigError` that names the flag and says what to do.

Every model, profile, config and data file is then written through `atomic_output`: the bytes
go to a temporary file in the same directory, are flushed to disk, and are renamed over the
destination. A crash or Ctrl-C leaves either the old file or the new one, never half of one, and
a directory whose config.json exists always has complete weights beside it (drafts write their
weights first; see `dspark.models.drafts.io.save_draft`).

The floor of the package beside `errors`: it imports nothing of dspark's but the errors.
"""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from .errors import ConfigError

PathLike = Union[str, os.PathLike]
TEMP_PREFIX = ".dspark-"           # temporary files start with this (a crash may leave one behind)


def cache_root() -> Path:
    """Where dspark keeps what it derives once per machine (converted models, kernel choices):
    $DSPARK_CACHE, else $XDG_CACHE_HOME/dspark, else ~/.cache/dspark."""
    if os.environ.get("DSPARK_CACHE"):
        return Path(os.environ["DSPARK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dspark"


# ----------------------------------------------------------------------------- the atomic writer
@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an exception, the file
    written there replaces `path` in one rename. On an exception it is deleted and `path` is
    untouched. Use it for writers that want a file name (safetensors' save_file):

        with atomic_output(directory / "model.safetensors") as temporary:
            save_file(tensors, str(temporary))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as written:      # on disk before the rename makes it visible
            os.fsync(written.fileno())
        _keep_mode(path, temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def _keep_mode(path: Path, temporary: Path) -> None:
    """mkstemp creates 0600 files; give the new file the old one's mode, or the umask's default."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(temporary, mode)


# ----------------------------------------------------------------------------- the output guard
def check_output(path: PathLike, kind: str, flag: str = "--out", inputs: Iterable[PathLike] = (),
                 model: Optional[str] = None) -> Path:
    """Refuse an output path that cannot work, before any work is done. Returns it as a Path.

    kind: "dir" (the command writes a directory) or "file".
    inputs: paths the command reads (the target, the data); the output may not be one of them,
        nor a directory that contains one (a draft written into the target's folder replaces the
        target's config.json and weights).
    model: for a directory that receives a model ("draft"): an existing config.json in it must
        be of that kind, so a draft never overwrites a target that was not named as an input.
    Checked: is / contains an input; a file where a directory is needed (or the reverse, or a
    device such as /dev/full); a directory (or the nearest existing parent) that this process
    cannot create files in.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")      # a programming error
    out = Path(path).expanduser()
    resolved = out.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).expanduser().resolve()
        if resolved == source or resolved in source.parents:
            relation = "is" if resolved == source else "contains"
            raise ConfigError(f"{flag} {str(out)!r} {relation} the input {str(source)!r}; writing there would "
                              f"replace it. Choose another {flag}")
    if out.exists() or out.is_symlink():
        if kind == "dir" and not out.is_dir():
            raise ConfigError(f"{flag} {str(out)!r} exists and is not a directory; give a directory path")
        if kind == "file" and out.is_dir():
            raise ConfigError(f"{flag} {str(out)!r} is a directory; give a file path (e.g. {out}/out.yaml)")
        if kind == "file" and not out.is_file():
            raise ConfigError(f"{flag} {str(out)!r} is not a regular file (a device or a pipe); "
                              "give the path of a file to write")
    if kind == "dir" and model is not None and (out / "config.json").is_file():
        _check_model_kind(out, flag, model)
    _check_writable(out if kind == "dir" else out.parent, out, flag)
    return out


def _check_model_kind(out: Path, flag: str, model: str) -> None:
    import json

    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        config = None
    is_draft = isinstance(config, dict) and "target_layer_ids" in config
    if model == "draft" and not is_draft:
        raise ConfigError(f"{flag} {str(out)!r} holds a model that is not a draft (its config.json has no "
                          "target_layer_ids); writing a draft there would replace it. Choose another "
                          f"{flag}")


def _check_writable(directory: Path, out: Path, flag: str) -> None:
    """Create (and remove) a file in `directory`, or in its nearest existing parent when it does
    not exist yet: the honest test (permission bits say nothing of read-only mounts, and root
    ignores them)."""
    existing = directory
    while not existing.exists():
        if existing.is_symlink():               # a dangling link: creating through it fails later
            raise ConfigError(f"{flag} {str(out)!r}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} cannot be created: {existing} is a file, not a directory")
    try:
        handle, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".probe", dir=existing)
    except OSError as exc:
        raise ConfigError(f"{flag} {str(out)!r} is not writable ({exc.strerror or exc} in {existing}); "
                          f"choose a {flag} this user can write") from None
    os.close(handle)
    os.unlink(name)


# ----------------------------------------------------------------------------- resuming into an output
def refuse_changed_settings(what: str, recorded: dict, current: dict, remedy: str, ignore: Iterable[str] = ()) -> None:
    """A resumed output (a run directory, a regenerated-data file) continues only with the settings
    it was started with: raise a ConfigError naming each setting that differs, then `remedy`.
    `ignore`: settings that may change between a run and its resume without changing its result."""
    ignored = set(ignore)
    changes = [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in current.items()
               if key not in ignored and recorded.get(key) != value]
    if changes:
        raise ConfigError(f"{what} was made with other settings ({'; '.join(changes)}); {remedy}")


__all__ = ["atomic_output", "check_output", "refuse_changed_settings", "write_bytes_atomic", "write_text_atomic"]
