"""The corrections fine-tuning learns from: read from the database, put on the network's grid,
split into train / held aside by a stable hash, and hashed for lineage.

A correction is a study with human masks, a reading, or both. Masks: a study with only one
corrected kind gets the base model's own mask for the other kind (``fill_missing_kinds``);
infection drawn outside a model-made lung mask grows that lung mask. A study with a reading but
no human mask has no mask target at all (``has_masks`` False: the segmentation losses skip it).
Readings: COVID-19 / Non-COVID / Normal are class targets; "other finding" and "not assessable"
are not (the class head knows only the three classes), so such a study trains its masks only,
and is left out when it has no masks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from database import annotation_versions, images, reading_versions
from database.masks import png_to_mask, resize_mask
from inference.model import LoadedModel
from inference.preprocess import Letterbox, to_float_pixels
from inference.storage import xray_from_npz_bytes
from settings import MASK_KINDS as KINDS
from settings import READING_CLASSES
from training.data import SplitArrays
from training.evaluate import predict_arrays
from training.losses import NO_LABEL
from training.run_control import FinetuneError


@dataclass
class Correction:
    """One study's training target on the network grid."""

    image_id: int
    image_sha256: str
    image: np.ndarray  # uint8 (S, S), letterboxed
    lung: np.ndarray  # bool (S, S)
    infection: np.ndarray  # bool (S, S)
    human: dict[str, int] = field(default_factory=dict)  # kind -> annotation version id
    mask_sha256: dict[str, str] = field(default_factory=dict)  # kind -> sha of the stored PNG
    label: int = NO_LABEL  # class index from the reading; NO_LABEL: no class target
    reading: int | None = None  # the reading version id (also when it is not a class target)
    reading_label: str | None = None  # the reading as stored ("other finding", ...)

    @property
    def has_masks(self) -> bool:
        """Whether the study has mask targets (a human mask; the other kind is filled in)."""
        return bool(self.human)


def letterbox_uint8(pixels: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    image = to_float_pixels(pixels)
    box = Letterbox.fit(image.shape[0], image.shape[1], size)
    square = box.apply(image)
    return np.clip(np.rint(square * 255.0), 0, 255).astype(np.uint8), box


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """A bool mask on the original grid -> bool mask on the square grid (area > half)."""
    if mask.shape != (box.orig_h, box.orig_w):
        mask = resize_mask(mask, box.orig_h, box.orig_w)
    return box.apply(mask.astype(np.float32)) > 0.5


def holdout_key(image_sha256: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per study and seed."""
    digest = hashlib.sha256(f"{seed}:{image_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_holdout(
    corrections: Sequence[Correction], fraction: float, seed: int
) -> tuple[list[Correction], list[Correction]]:
    """(train, held aside): studies whose key < fraction are held aside; >= 1 each side."""
    if len(corrections) < 2:
        raise FinetuneError(
            f"need corrections on at least 2 studies (1 to train, 1 to check), got "
            f"{len(corrections)}"
        )
    ordered = sorted(corrections, key=lambda c: holdout_key(c.image_sha256, seed))
    n_hold = sum(holdout_key(c.image_sha256, seed) < fraction for c in ordered)
    n_hold = min(max(1, n_hold), len(ordered) - 1)
    held, train = ordered[:n_hold], ordered[n_hold:]
    return sorted(train, key=lambda c: c.image_id), sorted(held, key=lambda c: c.image_id)


def as_split(corrections: Sequence[Correction]) -> SplitArrays:
    return SplitArrays(
        images=np.stack([c.image for c in corrections]),
        lungs=np.stack([c.lung for c in corrections]).astype(np.uint8),
        infections=np.stack([c.infection for c in corrections]).astype(np.uint8),
        labels=np.array([c.label for c in corrections], np.int64),
        names=[f"image-{c.image_id}" for c in corrections],
    )


def class_target(reading_label: str) -> int:
    """The class index a reading teaches, or NO_LABEL ("other finding", "not assessable")."""
    return READING_CLASSES.index(reading_label) if reading_label in READING_CLASSES else NO_LABEL


def load_corrections(
    s: Any, statuses: Sequence[str], size: int, readings: bool = True
) -> list[Correction]:
    """Per study, its latest ``statuses`` mask versions and (``readings``) its latest
    ``statuses`` reading; a study whose only correction is a reading that is not a class
    target is left out (it would teach nothing)."""
    by_image: dict[int, dict[str, Any]] = {}
    for version in annotation_versions.training_annotations(s, statuses):
        by_image.setdefault(version.image_id, {})[version.kind] = version
    read = ({v.image_id: v for v in reading_versions.training_readings(s, statuses)}
            if readings else {})
    corrections = []
    for image_id in sorted(set(by_image) | set(read)):
        versions, reading = by_image.get(image_id, {}), read.get(image_id)
        if not versions and (reading is None or class_target(reading.label) == NO_LABEL):
            continue
        image = reading.image if reading is not None else next(iter(versions.values())).image
        xray = xray_from_npz_bytes(images.read_image_payload(image))
        square, box = letterbox_uint8(xray.pixels, size)
        c = Correction(image_id=image_id, image_sha256=image.sha256, image=square,
                       lung=np.zeros((size, size), bool), infection=np.zeros((size, size), bool))
        for kind, version in versions.items():
            setattr(c, kind, letterbox_mask(png_to_mask(version.mask_png), box))
            c.human[kind] = int(version.id)
            c.mask_sha256[kind] = hashlib.sha256(version.mask_png).hexdigest()
        if reading is not None:
            c.reading, c.reading_label = int(reading.id), reading.label
            c.label = class_target(reading.label)
        corrections.append(c)
    return corrections


def fill_missing_kinds(corrections: Sequence[Correction], base: LoadedModel) -> int:
    """Give each study the base model's own mask for a kind nobody corrected; keep infection
    inside the lungs. Returns how many masks were filled in."""
    todo = [c for c in corrections if 0 < len(c.human) < len(KINDS)]  # reading-only: no masks
    if todo:
        pred = predict_arrays(base, as_split(todo))
        for c, lung, inf in zip(todo, pred.lungs, pred.infections, strict=True):
            if "lung" not in c.human:
                c.lung = lung | c.infection  # the human infection lies inside the lungs
            if "infection" not in c.human:
                c.infection = inf & c.lung
    return sum(len(KINDS) - len(c.human) for c in todo)


def data_hash(train: Sequence[Correction], held: Sequence[Correction],
              replay: dict[str, Any]) -> str:
    """sha256 of what the model was trained and judged on: per study the payload hash, the
    annotation version ids and mask hashes (or 'model' for a model-filled kind, 'none' for a
    study without masks), its reading (version id and label) if any, which side of the split it
    is on, and the replay settings."""
    rows = []
    for side, group in (("train", train), ("held", held)):
        for c in group:
            fallback = "model" if c.has_masks else "none"
            row: list[Any] = [side, c.image_sha256,
                              {k: [c.human.get(k), c.mask_sha256.get(k, fallback)]
                               for k in KINDS}]
            if c.reading is not None:  # absent for mask-only studies: their hash is unchanged
                row.append({"reading": c.reading, "label": c.reading_label})
            rows.append(row)
    blob = json.dumps({"corrections": sorted(rows, key=lambda r: (r[0], r[1])),
                       "replay": replay}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
