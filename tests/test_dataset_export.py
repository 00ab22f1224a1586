"""Dataset export (issue 12.2): approved studies out as a COVID-QU-Ex tree in a ZIP with a
manifest and README, read back by ``training.train`` and ``training.evaluate`` as they read the
public set (the round trip)."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from database import annotation_versions, reading_versions, users
from database.masks import png_to_mask, read_mask_file
from services.dataset_export import ExportOptions, export_to_folder, main, split_for
from services.datastore import FolderSource, ingest_source
from services.storage import open_store
from settings import SAMPLES_DIR

OPTIONS = ExportOptions(split="hash", val_percent=50, test_percent=0)


def _approve(store, image_id: int, sample: Path, rad: str, reading: str | None) -> None:  # noqa: ANN001
    with store.scope() as s:
        author = users.get_or_create_user(s, rad, "radiologist")
        for kind in ("lung", "infection"):
            mask = read_mask_file(str(sample.with_name(f"{sample.stem}_{kind}.png")))
            annotation_versions.save_annotation(s, image_id, kind, mask, author, "approved", None)
        if reading is not None:
            reading_versions.save_reading(s, image_id, reading, None, author, "approved", None)


@pytest.fixture
def store_with_samples(tmp_path: Path):  # noqa: ANN201
    """The six bundled samples: four with approved masks and their class as the reading, one
    with approved masks read "other finding", one with only a submitted lung mask."""
    store = open_store(f"sqlite:///{tmp_path / 'db' / 'infmap.sqlite'}")
    outcomes = ingest_source(store.scope, FolderSource(SAMPLES_DIR), models=[])
    assert all(o.ok for o in outcomes) and len(outcomes) == 6
    samples = {o.name: o.image_id for o in outcomes}
    names = sorted(samples)  # 2 COVID-19, 2 Non-COVID, 2 Normal
    exported = [names[i] for i in (0, 2, 4, 5)]
    for name in exported:
        _approve(store, samples[name], SAMPLES_DIR / name, "Rad One", name.split("/")[0])
    _approve(store, samples[names[1]], SAMPLES_DIR / names[1], "Rad One", "other finding")
    with store.scope() as s:
        ann = users.get_or_create_user(s, "Ann Two", "annotator")
        lung = read_mask_file(str((SAMPLES_DIR / names[3]).with_name(
            f"{Path(names[3]).stem}_lung.png")))
        annotation_versions.save_annotation(s, samples[names[3]], "lung", lung, ann,
                                            "submitted", None)
    return store, samples, exported


def test_export_is_a_covid_qu_ex_tree_with_manifest_and_readme(
    store_with_samples, tmp_path: Path  # noqa: ANN001
) -> None:
    store, samples, exported = store_with_samples
    path, summary = export_to_folder(store.scope, tmp_path / "out", OPTIONS)
    assert path.suffix == ".zip" and not list((tmp_path / "out").glob("*.partial"))
    assert summary.total == 4
    # the study with only a submitted lung mask has nothing approved: not part of the export
    assert summary.left_out == {"reading is 'other finding' (not one of the three classes)": 1}
    zf = zipfile.ZipFile(path)
    rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    assert len(rows) == 4
    for row, name in zip(rows, exported, strict=True):
        split, cls = row["split"], row["class"]
        assert cls == name.split("/")[0] and row["class_source"] == "reading"
        assert row["reading"] == cls and row["reading_status"] == "approved"
        assert row["reading_author"] == "Rad One (radiologist)"
        assert row["lung_status"] == row["infection_status"] == "approved"
        assert row["lung_author"] == "Rad One" and row["lung_time"].endswith("Z")
        assert split == split_for(row["image_sha256"], OPTIONS)
        sub = "Infection Segmentation Data"
        image = zf.read(f"{sub}/{sub}/{split}/{cls}/images/{row['file']}")
        lung = zf.read(f"{sub}/Lung Masks/{split}/{cls}/lung masks/{row['file']}")
        infection = zf.read(f"{sub}/Infection Masks/{split}/{cls}/infection masks/{row['file']}")
        assert hashlib.sha256(image).hexdigest() == row["image_png_sha256"]
        assert hashlib.sha256(lung).hexdigest() == row["lung_png_sha256"]
        assert hashlib.sha256(infection).hexdigest() == row["infection_png_sha256"]
        original = SAMPLES_DIR / name
        assert np.array_equal(png_to_mask(lung), read_mask_file(
            str(original.with_name(f"{original.stem}_lung.png"))))
        assert "covid" not in row["file"] and "normal" not in row["file"]  # no upload names
    readme = zf.read("README.md").decode()
    assert "4 studies with approved lung and infection masks" in readme
    assert "Left out" in readme and "other finding" in readme


def test_submitted_masks_only_by_choice(store_with_samples, tmp_path: Path) -> None:  # noqa: ANN001
    store, _, _ = store_with_samples
    options = ExportOptions(include_submitted=True, split="Test")
    _, summary = export_to_folder(store.scope, tmp_path / "out", options)
    # the study with a submitted lung mask now fails on its missing infection mask only
    assert summary.left_out["no exportable infection mask"] == 1
    assert set(summary.written) == {("Test", c) for c in ("COVID-19", "Non-COVID", "Normal")}


def test_export_round_trips_through_training_and_evaluation(
    store_with_samples, tmp_path: Path, capsys  # noqa: ANN001
) -> None:
    from training import evaluate, train
    from training.data import list_samples

    store, _, _ = store_with_samples
    url = str(store.engine.url)
    assert main(["--out", str(tmp_path / "out"), "--db", url, "--split", "hash",
                 "--val-percent", "50", "--test-percent", "0"]) == 0
    (path,) = (tmp_path / "out").glob("infmap-export-*.zip")
    root = tmp_path / "unzipped"
    zipfile.ZipFile(path).extractall(root)
    splits = {s: list_samples(root, s) for s in ("Train", "Val") if _has(root, s)}
    assert set(splits) == {"Train", "Val"}, "the fixed samples hash into both splits"
    assert sum(len(v) for v in splits.values()) == 4

    best = tmp_path / "best.pt"
    train.main(["--data", str(root), "--out", str(best), "--work-dir", str(tmp_path / "work"),
                "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2", "--epochs", "1",
                "--max-steps", "1", "--limit", "4", "--version", "0.0.1-export", "--threads", "1"])
    assert best.is_file()
    evaluate.main(["--data", str(root), "--split", "Val", "--checkpoint", str(best),
                   "--out", str(tmp_path / "eval"), "--cache-dir", "", "--no-plots",
                   "--batch-size", "2", "--threads", "1"])
    assert "lung Dice mean / pooled" in capsys.readouterr().out


def _has(root: Path, split: str) -> bool:
    sub = root / "Infection Segmentation Data" / "Infection Segmentation Data" / split
    return any(sub.glob("*/images/*.png"))
