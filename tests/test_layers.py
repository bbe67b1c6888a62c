"""The layers: the library imports neither the application nor the experiments above it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_imports_neither_the_application_nor_the_experiments():
    library = [p for p in (ROOT / "raymimic").rglob("*.py") if "app" not in p.relative_to(ROOT / "raymimic").parts]
    assert len(library) > 30
    upward = {str(p.relative_to(ROOT)): sorted(n for n in _imported(p) if n.split(".")[0] == "raymimic_experiments"
                                               or n == "raymimic.app" or n.startswith("raymimic.app."))
              for p in library}
    assert {p: names for p, names in upward.items() if names} == {}


def test_the_experiments_import_no_application():
    experiments = list((ROOT / "raymimic_experiments").rglob("*.py"))
    assert experiments and not [p for p in experiments if any(n.startswith("raymimic.app") for n in _imported(p))]
