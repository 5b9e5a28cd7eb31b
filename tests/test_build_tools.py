"""The build scripts under tools/ (imported by path: tools/ is not a package)."""
import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_json_keeps_every_invocation_of_a_resumed_build():
    """A build resumed with other arguments must say so: BUILD.json lists each command in order
    (an older file's single `command` first), without repeating a rerun of the same command."""
    record = _tool("build_smollm2").record_command
    build = {"command": "python tools/build_smollm2.py --per-source 100"}
    record(build, "python tools/build_smollm2.py --per-source 400 --budget-minutes 20")
    record(build, "python tools/build_smollm2.py --per-source 400 --budget-minutes 16")
    record(build, "python tools/build_smollm2.py --per-source 400 --budget-minutes 16")
    assert build["commands"] == ["python tools/build_smollm2.py --per-source 100",
                                 "python tools/build_smollm2.py --per-source 400 --budget-minutes 20",
                                 "python tools/build_smollm2.py --per-source 400 --budget-minutes 16"]
    assert build["command"] == build["commands"][-1]
    fresh = {}
    record(fresh, "python tools/build_smollm2.py")
    assert fresh == {"commands": ["python tools/build_smollm2.py"], "command": "python tools/build_smollm2.py"}
