"""The layout rules of issue 12 that import-linter cannot see: no private name crosses a module, no
sys.path edits, and app_pages/app never reach into the library's internals."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("cifar_core", "ui")
SOURCES = sorted(p for folder in ("cifar_core", "ui", "app_pages", "bench", "tests")
                 for p in (REPO / folder).rglob("*.py")) + [REPO / "app.py"]


def _is_project(module: str | None, level: int) -> bool:
    return level > 0 or (module or "").split(".")[0] in PROJECT


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _crossings(path: Path, root: Path = REPO) -> list[str]:
    """`from project import _x`, and `m._x` / `C._x` where m or C was imported from the project."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    imported: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_project(node.module, node.level):
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {alias.name}")
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    imported.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in imported:
            found.append(f"{path.relative_to(root)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    crossings = [c for path in SOURCES for c in _crossings(path)]
    assert not crossings, "private names used outside their module:\n" + "\n".join(crossings)


def test_the_rule_catches_a_crossing(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from cifar_core.engine.rng import _hidden\nfrom cifar_core import jobs\njobs._signal(1)\n"
                   "self._fine = 1\n")
    assert len(_crossings(bad, tmp_path)) == 2


def test_no_sys_path_edits():
    offenders = [str(p.relative_to(REPO)) for p in SOURCES if "sys.path" in p.read_text(encoding="utf-8")
                 and p.name != "test_layout.py"]
    assert not offenders, f"sys.path is edited in {offenders}: the project is installed (pip install -e .)"
