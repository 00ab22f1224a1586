"""The layer rules, read from the source (``ast``): a forbidden import edge fails here.

- ``inference/`` never imports database, services, pages, training or Streamlit;
- ``training/`` never imports Streamlit, pages or services;
- ``database/`` is storage only: no inference, training, services, pages or Streamlit;
- ``services/`` never imports Streamlit or pages;
- ``pages/`` and ``app.py`` hold no SQL and no sessions: no SQLAlchemy, no ``database``;
- ``settings`` imports nothing of InfMap (every layer imports it).

Imports inside functions count the same as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("app", "benchmarks", "database", "inference", "pages", "scripts", "services", "settings",
        "training")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "inference": ("database", "services", "pages", "training", "app", "streamlit"),
    "training": ("streamlit", "pages", "services", "app"),
    "database": ("inference", "training", "services", "pages", "app", "streamlit"),
    "services": ("streamlit", "pages", "app"),
    "pages": ("sqlalchemy", "database"),
    "app": ("sqlalchemy", "database"),
    "settings": tuple(p for p in OURS if p != "settings"),
}

# Known violations being removed on another branch; each must still violate (so a fixed one is
# taken off this list) and nothing else may.
PENDING: dict[str, str] = {}


def layer_of(path: Path) -> str:
    rel = path.relative_to(REPO)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_modules(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def forbidden_in(layer: str, source: str) -> list[str]:
    banned = FORBIDDEN.get(layer, ())
    modules = imported_modules(ast.parse(source))
    return sorted(m for m in modules if any(m == b or m.startswith(b + ".") for b in banned))


def violations(path: Path) -> list[str]:
    return forbidden_in(layer_of(path), path.read_text())


def checked_files() -> list[Path]:
    files = [REPO / "app.py", REPO / "settings.py"]
    for layer in ("inference", "training", "database", "services", "pages"):
        files += sorted((REPO / layer).rglob("*.py"))
    return [f for f in files if "migrations" not in f.parts]


def test_the_checker_sees_a_forbidden_edge() -> None:
    source = "import numpy\ndef f():\n    from database import images\nimport streamlit.x\n"
    assert forbidden_in("inference", source) == ["database", "database.images", "streamlit.x"]
    assert forbidden_in("services", source) == ["streamlit.x"]
    assert forbidden_in("pages", "from sqlalchemy.orm import Session\n") == [
        "sqlalchemy.orm", "sqlalchemy.orm.Session"
    ]
    assert layer_of(REPO / "inference" / "predict.py") == "inference"
    assert layer_of(REPO / "app.py") == "app"


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_forbidden_import(path: Path) -> None:
    rel = str(path.relative_to(REPO))
    found = violations(path)
    if rel in PENDING:
        assert found, f"{rel} no longer breaks the layer rules: remove it from PENDING"
    else:
        assert not found, f"{rel} ({layer_of(path)}/) must not import {', '.join(found)}"
