"""COVID-QU-Ex reader (the dataset's own Kaggle folder layout) and in-memory tensors for training.

Layout, as users get it when they download the set:
    <root>/Infection Segmentation Data/Infection Segmentation Data/<split>/<class>/images/<f>.png
    <root>/Infection Segmentation Data/Lung Masks/<split>/<class>/lung masks/<f>.png
    <root>/Infection Segmentation Data/Infection Masks/<split>/<class>/infection masks/<f>.png
``root`` may also be the inner "Infection Segmentation Data" folder itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from inference.model import CLASS_NAMES

SPLITS = ("Train", "Val", "Test")
SUBSET = "Infection Segmentation Data"


@dataclass(frozen=True)
class Sample:
    image: Path
    lung_mask: Path
    infection_mask: Path
    label: int  # index into CLASS_NAMES

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def _subset_root(root: Path) -> Path:
    root = Path(root)
    for candidate in (root / SUBSET, root):
        if (candidate / "Lung Masks").is_dir() and (candidate / SUBSET).is_dir():
            return candidate
    raise FileNotFoundError(
        f"{root} does not look like COVID-QU-Ex: expected '{SUBSET}/Lung Masks' inside it."
    )


def list_samples(root: str | Path, split: str) -> list[Sample]:
    """All samples of one split, sorted by class then file name (deterministic order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    base = _subset_root(Path(root))
    samples: list[Sample] = []
    for label, cls in enumerate(CLASS_NAMES):
        image_dir = base / SUBSET / split / cls / "images"
        for image in sorted(image_dir.glob("*.png")):
            lung = base / "Lung Masks" / split / cls / "lung masks" / image.name
            inf = base / "Infection Masks" / split / cls / "infection masks" / image.name
            if not (lung.is_file() and inf.is_file()):
                raise FileNotFoundError(f"masks missing for {image.name} in {split}/{cls}")
            samples.append(Sample(image, lung, inf, label))
    if not samples:
        raise FileNotFoundError(f"no images found for split {split} under {base}")
    return samples


def read_gray(path: Path, size: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"cannot read {path}")
    if img.shape != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


@dataclass
class SplitArrays:
    """A whole split in memory: uint8 images and masks (N,H,W) and labels (N,)."""

    images: np.ndarray
    lungs: np.ndarray
    infections: np.ndarray
    labels: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> SplitArrays:
        return SplitArrays(
            self.images[idx], self.lungs[idx], self.infections[idx], self.labels[idx],
            [self.names[i] for i in idx],
        )


def load_split(
    root: str | Path, split: str, size: int = 256, cache_dir: str | Path | None = None
) -> SplitArrays:
    """Read a split into memory, caching the arrays as .npz so restarts take seconds."""
    samples = list_samples(root, split)
    key = hashlib.sha256(
        ("|".join(str(s.image.name) + str(s.label) for s in samples) + str(size)).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) / f"{split}_{size}_{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        z = np.load(cache)
        return SplitArrays(z["images"], z["lungs"], z["infections"], z["labels"],
                           [s.image.name for s in samples])
    n = len(samples)
    images = np.empty((n, size, size), np.uint8)
    lungs = np.empty((n, size, size), np.uint8)
    infs = np.empty((n, size, size), np.uint8)
    for i, s in enumerate(samples):
        images[i] = read_gray(s.image, size)
        lungs[i] = read_gray(s.lung_mask, size) > 127
        infs[i] = read_gray(s.infection_mask, size) > 127
    labels = np.array([s.label for s in samples], np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, lungs=lungs, infections=infs, labels=labels)
    return SplitArrays(images, lungs, infs, labels, [s.image.name for s in samples])


def to_tensors(
    arrays: SplitArrays, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch ``idx`` as (image[B,1,H,W] in [0,1], masks[B,2,H,W] in {0,1}, labels[B])."""
    img = torch.from_numpy(arrays.images[idx]).float().div_(255.0).unsqueeze(1)
    masks = torch.from_numpy(np.stack([arrays.lungs[idx], arrays.infections[idx]], 1)).float()
    return img, masks, torch.from_numpy(arrays.labels[idx])
