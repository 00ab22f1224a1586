"""Debian's DICOM tools for the tests: dciodvfy (dicom3tools) and dcmtk validate what InfMap
writes. Missing tools skip a test with the reason, or fail it under INFMAP_REQUIRE_SERVERS=1
(CI), as the browser tests do with chromium."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import settings


def require_tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found:
        return found
    reason = f"{name} is missing (apt-get install {package}; make test installs it as root)"
    if settings.require_servers():
        pytest.fail(f"INFMAP_REQUIRE_SERVERS=1 but {reason}")
    pytest.skip(reason)


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for ``path`` (its exit status is 0 even when it finds errors)."""
    tool = require_tool("dciodvfy", "dicom3tools")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def dcmtk_reads(path: Path) -> str:
    """dcmftest says it is a DICOM Part 10 file and dcmdump parses all of it; the dump."""
    ftest = require_tool("dcmftest", "dcmtk")
    assert subprocess.run([ftest, str(path)], capture_output=True, timeout=60).returncode == 0
    dump = subprocess.run(
        [require_tool("dcmdump", "dcmtk"), "-q", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert dump.returncode == 0, dump.stderr
    return dump.stdout
