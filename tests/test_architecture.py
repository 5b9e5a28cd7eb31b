"""The floor plan: every layer imports only the layers below it, the registry refuses duplicates,
and the engine prices its schedule in the dtype it runs."""
import ast
from pathlib import Path

import pytest
import torch

import dspark
from dspark.models.drafts import DRAFT_ALGORITHMS, DraftAlgorithm, register_draft_algorithm

ROOT = Path(dspark.__file__).resolve().parent.parent
# Layer of each top-level part (installed names); a module may import its own layer and lower ones.
LAYERS = {"errors": 0, "ops": 0, "yaml_config": 0, "backends": 1, "params": 1, "prompts": 1, "files": 1,
          "models": 2, "scheduling": 3, "engine": 4, "training": 5, "bench": 5, "conformance": 5,
          "serve": 6, "cli": 7, "__init__": 8, "__main__": 8}
SOURCES = {"ops": ROOT / "ops", "backends": ROOT / "backends"}


def _part_of(path: Path) -> str:
    for name, folder in SOURCES.items():
        if folder in path.parents:
            return name
    relative = path.relative_to(ROOT / "dspark")
    return relative.parts[0].removesuffix(".py")


def _package(path: Path) -> list:
    """The dotted package a source file belongs to, as installed: ops/ and backends/ are dspark.ops
    and dspark.backends."""
    for name, folder in SOURCES.items():
        if folder in path.parents:
            return ["dspark", name] + list(path.relative_to(folder).parts[:-1])
    return ["dspark"] + list(path.relative_to(ROOT / "dspark").parts[:-1])


def _imported_parts(path: Path) -> set:
    """The dspark parts (second component of the dotted name) a module imports."""
    package, found = _package(path), set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            if node.module:
                targets.append(base + node.module.split("."))
            else:
                targets += [base + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            targets += [alias.name.split(".") for alias in node.names]
        found |= {t[1] for t in targets if len(t) > 1 and t[0] == "dspark"}
    return found


def _modules():
    for folder in (ROOT / "dspark", ROOT / "ops", ROOT / "backends"):
        yield from (p for p in folder.rglob("*.py") if "reference_models" not in p.parts)


def test_no_layer_imports_a_layer_above_it():
    violations = []
    for path in _modules():
        part = _part_of(path)
        if part not in LAYERS:
            violations.append(f"{path.relative_to(ROOT)}: part {part!r} has no layer in LAYERS")
            continue
        for imported in _imported_parts(path):
            if imported in LAYERS and LAYERS[imported] > LAYERS[part]:
                violations.append(f"{path.relative_to(ROOT)} ({part}) imports {imported}")
    assert not violations, "\n".join(violations)


def test_the_error_module_is_the_floor():
    assert _imported_parts(ROOT / "dspark" / "errors.py") == set()
    assert _imported_parts(ROOT / "ops" / "schedule.py") == set()


def test_the_draft_registry_refuses_a_duplicate_name():
    entry = DRAFT_ALGORITHMS["dspark"]
    with pytest.raises(ValueError, match="'dspark' is already registered"):
        register_draft_algorithm(DraftAlgorithm(entry.name, entry.label, "again", entry.model_class, entry.defaults,
                                                entry.default_layers, entry.architecture, entry.loss))
    assert DRAFT_ALGORITHMS["dspark"] is entry


def test_the_engine_prices_its_schedule_in_its_own_dtype(qwen3_target, random_draft):
    fp32 = dspark.Engine.from_pretrained(qwen3_target, draft=random_draft, dtype="float32", schedule="budget")
    bf16 = dspark.Engine.from_pretrained(qwen3_target, draft=random_draft, dtype="bfloat16", schedule="budget")
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    # Same backend and prior; float32 moves twice the bytes, so every memory-bound step is priced slower.
    assert fp32.cost_model.verify_time(1, 512) > bf16.cost_model.verify_time(1, 512)
