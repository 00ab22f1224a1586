"""The external-dev set (``../shared/data/external-dev``): X-rays from another public source,
for EVALUATION ONLY (never train, calibrate or choose on it).

Images are letterboxed to the network's square exactly as the app does
(:mod:`inference.preprocess`), so the figures measure what a user's own upload gets; the v7labs
lung masks, where present, are letterboxed the same way and thresholded at half.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import SplitArrays
from training.eval_sources import load_labels_csv


@dataclass
class ExternalSet:
    arrays: SplitArrays  # letterboxed uint8 images, lung masks (zeros where none), labels
    has_lung_mask: np.ndarray  # bool (N,)
    patients: list[str]


def load_external(root: str | Path, size: int = 256, limit: int = 0) -> ExternalSet:
    """external-dev through the one labels.csv reader (``training.eval_sources``), which the
    app's Evaluation page uses too; ``limit``: evenly spaced images."""
    found = load_labels_csv(Path(root).resolve(), size, limit)
    return ExternalSet(arrays=found.arrays, has_lung_mask=found.has_lung_mask,
                       patients=found.patients)
