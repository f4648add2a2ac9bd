"""The house rules that keep the pipeline readable: a stage never imports another stage's module (shared
code lives in shared modules), and units fit on a screen."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"


def _stage_modules() -> set[str]:
    """The DVC stages (dvc.yaml) and the other command modules (a `__main__` block, e.g. ingest): everything
    else in stages/ is a shared module."""
    dvc = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    commands = {p.stem for p in STAGES.glob("*.py") if '__name__ == "__main__"' in p.read_text()}
    return dvc | commands


def _imported_stage_modules(path: Path) -> set[str]:
    """Every stages.<module> this file imports, at any depth (a function-level import counts too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "stages":
                out |= {a.name for a in node.names}
            elif node.module.startswith("stages."):
                out.add(node.module.split(".")[1])
    return out


def test_the_rule_sees_stage_modules_and_their_imports(tmp_path):
    stages = _stage_modules()
    assert {"redact", "export", "build_dataset", "train", "eval", "leaks", "gate", "ingest"} <= stages
    assert not stages & {"core", "chat", "executor", "scanning", "dedup", "detectors", "readers"}
    probe = tmp_path / "probe.py"  # the checker itself can fail: each import form is seen
    probe.write_text("import stages.leaks\nfrom stages import redact as r\ndef f():\n    from stages.train import x\n")
    assert _imported_stage_modules(probe) == {"leaks", "redact", "train"}


@pytest.mark.parametrize("module", sorted(_stage_modules()))
def test_a_stage_imports_no_other_stage(module):
    """Editing one stage's module must not rerun (or break) another: shared pieces live in shared modules."""
    others = (_imported_stage_modules(STAGES / f"{module}.py") & _stage_modules()) - {module}
    assert not others, f"stages/{module}.py imports the stage module(s) {sorted(others)}: move what it uses to a shared module"


def _oversize(max_lines: int = 79, max_main: int = 24) -> set[str]:
    out = set()
    for path in sorted(STAGES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > max_lines or (node.name == "main" and n > max_main):
                    out.add(f"{path.stem}.{node.name}")
    return out


def test_no_function_is_oversize():
    """< 80 lines a function, < 25 a main(): every unit of stages/ reads on one screen."""
    assert not _oversize(), f"split these: {sorted(_oversize())}"


def test_the_size_rule_can_fail(tmp_path, monkeypatch):
    """The checker sees a long function and a long main() (it is not vacuously empty)."""
    monkeypatch.setattr(__import__(__name__), "STAGES", tmp_path)
    (tmp_path / "probe.py").write_text("def f():\n" + "    x = 1\n" * 79 + "def main():\n" + "    y = 2\n" * 24)
    assert _oversize() == {"probe.f", "probe.main"}


def _code_deps(module: str, seen: set[str] | None = None) -> set[str]:
    """The files of stages/ and schemas/ a module imports, transitively (itself included)."""
    seen = set() if seen is None else seen
    path = ROOT / (module.replace(".", "/") + ".py")
    if module in seen or not path.exists():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in ("stages", "schemas"):
                _code_deps(name, seen)
    return seen


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(_dvc_stages()))
def test_dvc_deps_name_every_module_a_stage_runs(stage):
    """A change to any code a stage runs must rerun it: dvc.yaml lists every such module."""
    files = {m.replace(".", "/") + ".py" for m in _code_deps(f"stages.{stage}")}
    missing = sorted(files - set(_dvc_stages()[stage].get("deps", [])))
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but does not depend on them"
