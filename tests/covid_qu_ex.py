"""COVID-QU-Ex for the tests: the shared copy (found through ``settings.shared_data_dir``,
``INFMAP_DATA``) and a miniature tree in the dataset's own layout built from ``samples/``.

Tests that need the real set call ``shared_data()``: it skips when the set is missing, except
under ``INFMAP_REQUIRE_DATA=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import settings

SUBSET = "Infection Segmentation Data"
SPLITS = ("Train", "Val", "Test")
CLASSES = ("COVID-19", "Non-COVID", "Normal")  # folder names, in inference.model.CLASS_NAMES order
MASK_DIRS = {"lung": ("Lung Masks", "lung masks"), "infection": ("Infection Masks",
                                                                 "infection masks")}


def shared_data() -> Path:
    """The shared COVID-QU-Ex root, or skip (fail under INFMAP_REQUIRE_DATA=1)."""
    root = settings.shared_data_dir()
    if (root / SUBSET / SUBSET).is_dir():
        return root
    reason = f"COVID-QU-Ex not found at {root} (set INFMAP_DATA)"
    if settings.require_data():
        pytest.fail(f"INFMAP_REQUIRE_DATA=1 but {reason}")
    pytest.skip(reason)


def sample_cases(samples: Path = settings.SAMPLES_DIR) -> list[tuple[str, str]]:
    """(class folder, image stem) of every bundled sample, sorted."""
    return sorted(
        (p.parent.name, p.stem)
        for p in samples.glob("*/*.png")
        if not p.stem.endswith(("_lung", "_infection"))
    )


def build_mini_tree(
    dest: Path, copies: int = 1, splits: tuple[str, ...] = SPLITS,
    samples: Path = settings.SAMPLES_DIR,
) -> Path:
    """``dest`` as a COVID-QU-Ex root: each split and class holds ``copies`` copies of every
    sample of that class (``<stem>.png``, then ``<stem>_copy<k>.png``) with both masks."""
    for split in splits:
        for cls, stem in sample_cases(samples):
            for k in range(copies):
                name = f"{stem}.png" if k == 0 else f"{stem}_copy{k}.png"
                _copy(samples / cls / f"{stem}.png",
                      dest / SUBSET / SUBSET / split / cls / "images" / name)
                for kind, (top, sub) in MASK_DIRS.items():
                    _copy(samples / cls / f"{stem}_{kind}.png",
                          dest / SUBSET / top / split / cls / sub / name)
    return dest


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
