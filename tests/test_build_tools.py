"""The build scripts under tools/ (imported by path: tools/ is not a package)."""
import importlib.util
import json
from pathlib import Path

import pytest

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


def test_warm_started_smollm2_draft_records_the_budget_it_continues_from(tmp_path):
    """A draft that continues from a shipped one costs both budgets: the record carries the
    earlier total (itself possibly a warm start) and refuses a directory that records none."""
    warm_start_record = _tool("build_smollm2").warm_start_record
    stages = {"regenerate": {"t0": {"response_tokens": 100}, "t1": {"response_tokens": 50}},
              "drafts": {"dspark": {"budget_minutes": 22.0},
                         "dflash": {"budget_minutes": 10.0, "total_budget_minutes": 32.0}}}
    (tmp_path / "BUILD.json").write_text(json.dumps({"smollm2": {"stages": stages}}))
    record = warm_start_record(tmp_path, "dspark")
    assert record["budget_minutes"] == 22.0 and record["data"] == {"t0": 100, "t1": 50}
    assert record["from"].endswith("smollm2-dspark")
    assert warm_start_record(tmp_path, "dflash")["budget_minutes"] == 32.0
    with pytest.raises(SystemExit, match="no CPU budget for the eagle3 draft"):
        warm_start_record(tmp_path, "eagle3")
