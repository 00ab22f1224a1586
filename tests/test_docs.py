"""docs/INTERFACES.md names every module that exists, and nothing that does not."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "INTERFACES.md"
PACKAGES = ("database", "inference", "services", "training", "pages", "scripts", "benchmarks")
NAME = re.compile(rf"\b(?:{'|'.join(PACKAGES)})[./][a-z_0-9]+(?:\.py)?")


def modules() -> set[str]:
    """Every module as ``package.module`` (packages' __init__ and migrations left out)."""
    found = {"settings", "app"}
    for package in PACKAGES:
        for path in (REPO / package).glob("*.py"):
            if path.stem != "__init__":
                found.add(f"{package}.{path.stem}")
    return found


def named_in(text: str) -> set[str]:
    names = {m.removesuffix(".py").replace("/", ".") for m in NAME.findall(text)}
    for word in ("settings", "app.py"):
        if f"`{word}" in text:
            names.add(word.removesuffix(".py"))
    return names


def test_every_module_is_named() -> None:
    missing = modules() - named_in(DOC.read_text())
    assert not missing, f"docs/INTERFACES.md does not name {sorted(missing)}"


def test_nothing_named_is_missing() -> None:
    ghosts = named_in(DOC.read_text()) - modules()
    assert not ghosts, f"docs/INTERFACES.md names modules that do not exist: {sorted(ghosts)}"


def test_the_check_sees_a_ghost() -> None:
    assert named_in("see `inference.nowhere` and pages/x.py") == {"inference.nowhere", "pages.x"}
