"""Layers point down: a module imports only modules of its own layer or below, even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "visrec"

# Lowest first. A package or module of visrec is named by its first component under visrec/.
LAYERS: list[set[str]] = [
    {"errors", "io", "coerce", "config", "device", "distributed", "plotting", "checkpoint", "version", "presets"},
    {"data", "models", "ref", "inference"},
    {"evaluate", "run_store", "prediction"},
    {"training"},
    {"tasks"},
    {"runs", "report", "explain", "transfer", "ensemble", "tune", "doctor", "export", "classic", "fit", "serve",
     "synthesis"},
    {"cli", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _component(module: str) -> str | None:
    """`visrec.training.loop` -> `training`; the package itself (`visrec`) -> its facade `__init__`."""
    parts = module.split(".")
    if parts[0] != "visrec":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute visrec module) for every import in the file, function bodies included."""
    package = list(path.relative_to(SRC.parent).parts[:-1])  # the package the file's relative imports start in
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # `from . import x`: x is a module of that package
                    out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
                    continue
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
    return out


def _violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        own = _component(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if own == "__init__":  # the package facade re-exports every layer
            continue
        assert own in LAYER, f"{path}: visrec.{own} has no layer in tests/test_layers.py; add it where it belongs"
        for line, module in _imports(path):
            other = _component(module)
            if other is None or other == own:
                continue
            if LAYER.get(other, len(LAYERS)) > LAYER[own]:
                found.append(f"{path.relative_to(SRC)}:{line}: visrec.{own} (layer {LAYER[own]}) imports "
                             f"{module} (layer {LAYER.get(other, 'facade')})")
    return found


def test_layers_point_down():
    assert _violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The test itself can fail: a training module that imports the report is caught, inside a function too."""
    pkg = tmp_path / "visrec" / "training"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("def f():\n    from ..report import build_report\n    from .. import tune\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "visrec")
    bad = _violations()
    assert len(bad) == 2 and "visrec.report" in bad[0] and "visrec.tune" in bad[1]


@pytest.mark.parametrize(("file", "expected"), [
    ("training/loop.py", {"visrec.run_store", "visrec.training.averaging", "visrec.data"}),
    ("tasks/__init__.py", {"visrec.config", "visrec.tasks.classification", "visrec.training.task"}),
])
def test_relative_imports_resolve_to_the_modules_they_name(file, expected):
    assert expected <= {m for _, m in _imports(SRC / file)}


# Prediction still names tasks in these files: each goes when predicting goes through the task (Task.predictor).
# The counts may only fall; a comparison anywhere else is a task-specific branch the task should declare instead.
TASK_NAME_COMPARISONS_LEFT: dict[str, int] = {}


def _task_name_comparisons() -> dict[str, list[tuple[int, str]]]:
    """Per file outside tasks/: comparisons of something named like a task against a registered task's name."""
    from visrec.tasks import TASKS

    found: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("tasks/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]

            def named(e) -> bool:
                if isinstance(e, ast.Constant):
                    return e.value in TASKS
                return isinstance(e, ast.Tuple | ast.List | ast.Set) and any(named(x) for x in e.elts)

            if any(named(e) for e in sides) and any("task" in ast.unparse(e) for e in sides if not named(e)):
                found.setdefault(rel, []).append((node.lineno, ast.unparse(node)))
    return found


def test_no_task_is_named_outside_tasks_but_where_prediction_still_does():
    found = _task_name_comparisons()
    extra = {f: v for f, v in found.items() if len(v) > TASK_NAME_COMPARISONS_LEFT.get(f, 0)}
    assert not extra, f"declare a capability on the Task instead of comparing its name: {extra}"
    # the ratchet: a file that compares fewer names than listed lowers its entry
    assert {f: len(v) for f, v in found.items()} == TASK_NAME_COMPARISONS_LEFT


def test_nothing_outside_tasks_reads_a_task_attribute_by_duck_typing():
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).as_posix().startswith("tasks/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            if call and node.func.id in ("getattr", "hasattr") and node.args and "task" in ast.unparse(node.args[0]):
                hits.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not hits, f"declare it on visrec.training.task.Task: {hits}"
