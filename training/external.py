"""The external-dev set (``../shared/data/external-dev``): X-rays from another public source,
for EVALUATION ONLY (never train, calibrate or choose on it).

Images are letterboxed to the network's square exactly as the app does
(:mod:`inference.preprocess`), so the figures measure what a user's own upload gets; the v7labs
lung masks, where present, are letterboxed the same way and thresholded at half.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inference.model import CLASS_NAMES
from inference.preprocess import Letterbox
from training.data import SplitArrays

LABELS = {"COVID-19": "COVID-19", "Non-COVID": "Non-COVID", "Normal": "Normal"}


@dataclass
class ExternalSet:
    arrays: SplitArrays  # letterboxed uint8 images, lung masks (zeros where none), labels
    has_lung_mask: np.ndarray  # bool (N,)
    patients: list[str]


def letterbox_u8(image: np.ndarray, size: int) -> np.ndarray:
    """The app's letterbox (``Letterbox.apply``), back to uint8 for ``SplitArrays``."""
    box = Letterbox.fit(image.shape[0], image.shape[1], size)
    return np.clip(np.rint(box.apply(image)), 0, 255).astype(np.uint8)


def load_external(root: str | Path, size: int = 256, limit: int = 0) -> ExternalSet:
    root = Path(root)
    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if limit:
        rows = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, limit).astype(int))]
    images, lungs, labels, has, names, patients = [], [], [], [], [], []
    for row in rows:
        path = root / "images" / row["file"]
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"cannot read {path}")
        images.append(letterbox_u8(img, size))
        mask = np.zeros((size, size), np.uint8)
        with_mask = row.get("has_lung_mask", "").strip().lower() in {"1", "true", "yes"}
        if with_mask:
            mpath = root / "lung_masks" / Path(row["file"]).with_suffix(".png")
            m = cv2.imread(str(mpath), cv2.IMREAD_GRAYSCALE)
            if m is None:
                with_mask = False
            else:
                mask = (letterbox_u8(m, size) > 127).astype(np.uint8)
        lungs.append(mask)
        has.append(with_mask)
        labels.append(CLASS_NAMES.index(LABELS[row["label"]]))
        names.append(row["file"])
        patients.append(row.get("patient", ""))
    n = len(rows)
    arrays = SplitArrays(
        images=np.stack(images), lungs=np.stack(lungs),
        infections=np.zeros((n, size, size), np.uint8),  # no infection masks in this set
        labels=np.array(labels, np.int64), names=names,
    )
    return ExternalSet(arrays=arrays, has_lung_mask=np.array(has, bool), patients=patients)
