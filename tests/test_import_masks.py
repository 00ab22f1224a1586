"""``python -m services.import_masks`` on the bundled samples (real COVID-QU-Ex Test images and
masks) laid out in the dataset's own folders under tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from covid_qu_ex import MASK_DIRS
from sqlalchemy import func, select

import settings
from database import annotation_versions, images
from database.masks import read_mask_file
from database.models import AnnotationVersion, Image
from database.session import init_db, session_scope
from inference.storage import xray_from_npz_bytes
from services.import_masks import import_masks, main

SAMPLES = settings.SAMPLES_DIR
CASES = [  # (class folder, file) of the bundled samples, laid out as COVID-QU-Ex's Test split
    ("COVID-19", "covid_1579.png"),
    ("COVID-19", "covid_1582.png"),
    ("Non-COVID", "non_covid_11905.png"),
    ("Normal", "normal_1.png"),
]
NO_INFECTION_MASK = ("Normal", "normal_10.png")  # copied without its infection mask


def _sample_mask(cls: str, name: str, kind: str) -> Path:
    return SAMPLES / cls / name.replace(".png", f"_{kind}.png")


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "qu-ex"
    images = root / "Infection Segmentation Data"
    for cls, name in [*CASES, NO_INFECTION_MASK]:
        for kind, (top, sub) in MASK_DIRS.items():
            if kind == "infection" and (cls, name) == NO_INFECTION_MASK:
                continue
            target = root / top / "Test" / cls / sub / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_sample_mask(cls, name, kind), target)
        target = images / "Test" / cls / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / cls / name, target)
    # One lung mask at twice the image size: must be resized back (nearest neighbour).
    big = root / "Lung Masks" / "Test" / "COVID-19" / "lung masks" / CASES[0][1]
    mask = cv2.imread(str(big), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(big), cv2.resize(mask, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST))
    # Not an X-ray, though it has both masks.
    (images / "Test" / "Normal" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    for sub, kind in MASK_DIRS.values():
        shutil.copyfile(
            root / sub / "Test" / "Normal" / kind / CASES[3][1],
            root / sub / "Test" / "Normal" / kind / "broken.png",
        )
    (images / "README.txt").write_text("not an image")
    return {
        "images": images,
        "lung": root / "Lung Masks",
        "infection": root / "Infection Masks",
        "db": tmp_path / "db" / "infmap.sqlite",
    }


def _versions(engine) -> int:
    with session_scope(engine, write=False) as s:
        return s.scalar(select(func.count()).select_from(AnnotationVersion))


def test_import_real_images_then_rerun_is_idempotent(
    dataset: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    engine = init_db(f"sqlite:///{dataset['db']}")
    try:
        summary = import_masks(
            engine, dataset["images"], dataset["lung"], dataset["infection"], "importer"
        )
        assert (summary.images_new, summary.images_present) == (4, 0)
        assert (summary.versions_saved, summary.versions_unchanged) == (8, 0)
        assert summary.masks_resized == 1
        assert summary.skipped["missing infection mask"] == 1
        assert sum(n for r, n in summary.skipped.items() if r.startswith("not a usable")) == 1
        assert sum(summary.skipped.values()) == 2
        assert any("nearest neighbour" in line for line in summary.lines())

        with session_scope(engine, write=False) as s:
            stored = list(s.scalars(select(Image).order_by(Image.id)))
            assert sorted(i.display_name for i in stored) == sorted(n for _, n in CASES)
            for image in stored:
                assert image.source == "import"
                cls = next(c for c, n in CASES if n == image.display_name)
                xray = xray_from_npz_bytes(images.read_image_payload(image))
                assert xray.pixels.shape == (image.height, image.width)
                for kind in MASK_DIRS:
                    head = annotation_versions.head_version(s, image.id, kind)
                    assert head.status == "submitted" and head.author.name == "importer"
                    assert head.parent_id is None
                    original = _sample_mask(cls, image.display_name, kind)
                    np.testing.assert_array_equal(
                        annotation_versions.version_mask(head), read_mask_file(str(original))
                    )

        # Second run through the command line: nothing new.
        url = f"sqlite:///{dataset['db']}"
        argv = [
            "--images", str(dataset["images"]),
            "--lung-masks", str(dataset["lung"]),
            "--infection-masks", str(dataset["infection"]),
            "--author", "importer",
            "--database-url", url,
        ]  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "0 imported, 4 already present" in out
        assert "0 saved, 8 already present" in out
        assert "covid" not in out.lower()  # only the files not imported are named
        assert _versions(engine) == 8

        # A changed mask becomes a new version on top of the previous head.
        changed = dataset["infection"] / "Test" / "COVID-19" / "infection masks" / CASES[1][1]
        cv2.imwrite(str(changed), np.full((256, 256), 255, np.uint8))
        assert main([*argv, "--verbose"]) == 0
        assert "1 saved, 7 already present" in capsys.readouterr().out
        with session_scope(engine, write=False) as s:
            image = s.scalar(select(Image).where(Image.display_name == CASES[1][1]))
            chain = annotation_versions.list_versions(s, image.id, "infection")
            assert len(chain) == 2 and chain[1].parent_id == chain[0].id
            assert annotation_versions.version_mask(chain[1]).all()
    finally:
        engine.dispose()


def test_approved_import_needs_a_radiologist(dataset: dict[str, Path]) -> None:
    argv = [
        "--images", str(dataset["images"]),
        "--lung-masks", str(dataset["lung"]),
        "--author", "importer",
        "--status", "approved",
        "--database-url", f"sqlite:///{dataset['db']}",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert not dataset["db"].exists()  # refused before opening the database

    assert main([*argv, "--role", "radiologist"]) == 0
    engine = init_db(f"sqlite:///{dataset['db']}")
    try:
        with session_scope(engine, write=False) as s:
            heads = [
                annotation_versions.head_version(s, i.id, "lung") for i in s.scalars(select(Image))
            ]
            assert len(heads) == 5  # lung only: the image without an infection mask counts too
            assert all(h.status == "approved" and h.author.role == "radiologist" for h in heads)
    finally:
        engine.dispose()


def test_import_of_links_that_do_not_resolve_names_them_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the annotation-loop benchmark once staged: relative symlinks written as given
    (``../shared/...``) that do not resolve from the staging folder. The import said
    "0 imported, 0 already present, 0 skipped" and exited 0."""
    staging = tmp_path / "staging"
    for folder in ("images", "lung", "inf"):
        (staging / folder).mkdir(parents=True)
        for name in ("covid_1.png", "covid_2.png"):
            (staging / folder / name).symlink_to(Path("../shared/data") / folder / name)
    (staging / "lung" / "orphan.png").write_bytes(
        _sample_mask("Normal", "normal_1.png", "lung").read_bytes()
    )
    monkeypatch.chdir(tmp_path)  # relative arguments: resolved against the caller's folder
    argv = [
        "--images", "staging/images", "--lung-masks", "staging/lung",
        "--infection-masks", "staging/inf", "--author", "oracle",
        "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}",
    ]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "0 imported, 0 already present, 6 skipped" in out
    for name in ("covid_1.png", "covid_2.png"):
        assert f"skipped: {name} (unreadable: a link to a file that does not exist)" in out
        assert f"skipped: lung mask {name} (unreadable" in out
    assert "unmatched: lung mask orphan.png" in out
    assert "Nothing imported." in out


def test_images_given_without_any_usable_one_exit_non_zero(
    dataset: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Files given, none imported (every mask folder empty): a failure, not a quiet success."""
    empty = dataset["db"].parent / "no-masks"
    empty.mkdir(parents=True)
    argv = [
        "--images", str(dataset["images"]), "--lung-masks", str(empty),
        "--database-url", f"sqlite:///{dataset['db']}", "--author", "importer",
    ]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "Skipped 6: missing lung mask" in out
    assert "skipped: Test/Normal/images/broken.png (missing lung mask)" in out
