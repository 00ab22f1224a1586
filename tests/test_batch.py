"""Batch CLI: folder walk, CSV rows and errors, mask files, missing checkpoint."""

from __future__ import annotations

import csv
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import settings
from inference.batch import COLUMNS, main
from inference.model import ModelConfig, build_model, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
SMALL = ModelConfig(input_size=128, decoder_channels=[16, 8, 8, 8, 8])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "small.pt",
                           meta={"version": "batch-test"})


def real_pngs(n: int) -> list[Path]:
    """Real COVID-QU-Ex Test X-rays: the bundled COVID-19 samples (two)."""
    pngs = [p for p in sorted((settings.SAMPLES_DIR / "COVID-19").glob("*.png"))
            if not p.stem.endswith(("_lung", "_infection"))][:n]
    assert len(pngs) == n
    return pngs


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        return list(reader)


def test_batch_folder(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = real_pngs(2)
    src = tmp_path / "in"
    (src / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(a, src / "a.png")
    shutil.copy(b, src / "nested" / "deeper" / "b.PNG")  # upper-case suffix is still picked
    (src / "bad.dcm").write_text("this is not a DICOM file\n")
    (src / "notes.txt").write_text("ignored: not an image suffix\n")
    (src / "README").write_text("ignored: no suffix and no DICOM magic\n")
    out = tmp_path / "out"

    assert main([str(src), "--out", str(out), "--checkpoint", str(checkpoint),
                 "--names", "clear"]) == 0

    rows = {r["file"]: r for r in read_rows(out)}
    assert set(rows) == {"a.png", "bad.dcm", "nested/deeper/b.PNG"}
    bad = rows["bad.dcm"]
    assert bad["error"]
    assert all(bad[c] == "" for c in COLUMNS if c not in ("file", "error"))
    for name, source in (("a.png", a), ("nested/deeper/b.PNG", b)):
        row = rows[name]
        assert row["error"] == ""
        assert row["predicted_class"] in SMALL.class_names
        probs = [float(row[c]) for c in ("p_covid19", "p_non_covid", "p_normal")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        for c in ("infection_percent", "infection_percent_left", "infection_percent_right"):
            assert 0.0 <= float(row[c]) <= 100.0
        assert row["severity"] in ("none", "mild", "moderate", "severe")
        stem = str(Path(name).with_suffix(""))
        h, w = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE).shape
        lung = cv2.imread(str(out / "masks" / f"{stem}_lung.png"), cv2.IMREAD_UNCHANGED)
        inf = cv2.imread(str(out / "masks" / f"{stem}_infection.png"), cv2.IMREAD_UNCHANGED)
        for m in (lung, inf):
            assert m is not None and m.shape == (h, w) and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 255}
        assert not ((inf > 0) & (lung == 0)).any()
    assert not (out / "masks" / "bad_lung.png").exists()
    assert "3 images, 1 failed" in capsys.readouterr().err


def test_batch_explicit_files_and_missing_path(tmp_path: Path, checkpoint: Path) -> None:
    (a,) = real_pngs(1)
    other = tmp_path / "x" / a.name  # same name from two places: masks must not clash
    other.parent.mkdir()
    shutil.copy(a, other)
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    args = [str(a), str(other), str(missing), "--out", str(out), "--checkpoint", str(checkpoint),
            "--names", "clear"]
    assert main(args) == 0
    rows = read_rows(out)
    assert [r["file"] for r in rows] == [str(a), str(other), str(missing)]
    assert rows[0]["error"] == rows[1]["error"] == "" and rows[2]["error"]
    assert (out / "masks" / f"{a.stem}_lung.png").is_file()
    assert (out / "masks" / f"{a.stem}_2_lung.png").is_file()


def test_batch_extensionless_dicom(tmp_path: Path, checkpoint: Path) -> None:
    try:
        dist = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pydicom-data not installed")
    rg1 = Path(str(dist.locate_file("data_store/data/RG1_UNCR.dcm")))
    src = tmp_path / "in" / "series"
    src.mkdir(parents=True)
    shutil.copy(rg1, src / "IMG0001")  # no suffix: found by the DICM magic
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "--out", str(out), "--checkpoint", str(checkpoint),
                 "--names", "clear"]) == 0
    (row,) = read_rows(out)
    assert row["file"] == "series/IMG0001" and row["error"] == ""
    lung = cv2.imread(str(out / "masks" / "series" / "IMG0001_lung.png"), cv2.IMREAD_UNCHANGED)
    assert lung.shape == (1955, 1841)


def test_missing_checkpoint_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(tmp_path), "--out", str(tmp_path / "o"), "--checkpoint",
                 str(tmp_path / "nope.pt")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "No model checkpoint" in err and len(err.splitlines()) == 1


def test_missing_checkpoint_cli_no_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "inference.batch", str(tmp_path), "--out", str(tmp_path / "o"),
         "--checkpoint", str(tmp_path / "nope.pt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")
