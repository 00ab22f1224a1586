"""Judging a fine-tuned model: its metrics beside the base's, and the activation rule as a
pluggable gate (``ActivationGate``: anything with ``decide(base, new) -> (activate, reason)``).

Metrics: per-image mean lung and infection Dice on the held-aside corrections (the human-drawn
kinds only), accuracy (of the decided class) and top-label ECE on the held-aside class readings,
and, on a fixed seeded subset of COVID-QU-Ex Val, lung Dice over all images, infection Dice over
COVID-19 images and accuracy. ``ForgettingGate`` is the shipped rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from inference.model import CLASS_NAMES, LoadedModel
from training.corrections import KINDS, Correction, as_split
from training.data import SplitArrays
from training.eval_metrics import ECE_BINS, SplitPredictions, split_scores
from training.evaluate import predict_arrays
from training.losses import NO_LABEL
from training.metrics import dice_iou_per_image, expected_calibration_error

Metrics = dict[str, Any]  # {"corrections": {...}, "val": {...} | None}


class ActivationGate(Protocol):
    """Whether a fine-tuned model replaces its base, and a sentence saying why."""

    @property
    def rule(self) -> str:
        """The rule in words (stored with the model version's metrics)."""
        ...

    def decide(self, base: Metrics, new: Metrics) -> tuple[bool, str]: ...


def correction_metrics(
    model: LoadedModel, held: Sequence[Correction], bf16: bool = False
) -> dict[str, Any]:
    """Per-image mean lung and infection Dice on held-aside corrections, counting only the
    human-drawn kind of each study (the model-filled kind would flatter the base)."""
    arrays = as_split(held)
    pred = predict_arrays(model, arrays, bf16=bf16)
    out: dict[str, Any] = {"n_images": len(held)}
    for kind, p, g in (("lung", pred.lungs, arrays.lungs), ("infection", pred.infections,
                                                             arrays.infections)):
        rows = [i for i, c in enumerate(held) if kind in c.human]
        out[f"n_{kind}"] = len(rows)
        out[f"{kind}_dice"] = (float(dice_iou_per_image(p[rows], g[rows] > 0)[0].mean())
                               if rows else None)
    present = [out[f"{k}_dice"] for k in KINDS if out[f"{k}_dice"] is not None]
    out["score"] = float(np.mean(present)) if present else None
    out.update(reading_metrics(pred, arrays.labels))
    return out


def reading_metrics(pred: SplitPredictions, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of the decided class and top-label ECE (``ECE_BINS`` equal-width bins, on the
    calibrated probabilities) over the studies whose reading is a class (label != NO_LABEL)."""
    rows = np.flatnonzero(labels != NO_LABEL)
    if not len(rows):
        return {"n_readings": 0, "reading_accuracy": None, "reading_ece": None}
    return {
        "n_readings": int(len(rows)),
        "reading_accuracy": float((pred.predicted[rows] == labels[rows]).mean()),
        "reading_ece": expected_calibration_error(pred.probs[rows], labels[rows], ECE_BINS),
    }


def val_metrics(model: LoadedModel, val: SplitArrays, bf16: bool = False) -> dict[str, Any]:
    scores = split_scores(val, predict_arrays(model, val, bf16=bf16))
    n_covid = int((val.labels == CLASS_NAMES.index("COVID-19")).sum())
    return {"n_images": len(val), "n_covid": n_covid, **scores}


def _held_aside(base: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, bool, bool]]:
    """(what, not worse, better) for each held-aside measure both models have: the masks'
    Dice score, and the readings' accuracy (a tie is broken by a lower ECE)."""
    parts = []
    b, n = base.get("score"), new.get("score")
    if b is not None and n is not None:
        parts.append((f"corrections Dice {n:.4f} vs base {b:.4f}", n >= b, n > b))
    ba, na = base.get("reading_accuracy"), new.get("reading_accuracy")
    if ba is not None and na is not None:
        be, ne = base["reading_ece"], new["reading_ece"]
        parts.append((f"readings accuracy {na:.4f} vs base {ba:.4f} (ECE {ne:.4f} vs {be:.4f})",
                      na >= ba, na > ba or (na == ba and ne < be)))
    return parts


def decide(
    base: dict[str, Any], new: dict[str, Any], tolerance: float
) -> tuple[bool, str]:
    """The activation rule. On the held-aside studies: not worse on any measure there is (the
    mean of the lung and infection Dice that exist; the readings' accuracy) and better on at
    least one (Dice higher; accuracy higher, or equal with a lower ECE). On Val: neither lung
    nor infection Dice lower than the base's by more than ``tolerance``, nor, when the run
    learned readings, the accuracy; nor the share of Non-COVID/Normal images given a severity
    grade higher by more than ``tolerance``."""
    parts = _held_aside(base["corrections"], new["corrections"])
    if not parts:
        return False, "no held-aside corrections or readings to compare on"
    worse = [what for what, not_worse, _ in parts if not not_worse]
    if worse:
        return False, f"worse on held-aside {'; '.join(worse)}"
    if not any(better for _, _, better in parts):
        return False, f"not better on held-aside {'; '.join(w for w, _, _ in parts)}"
    if base.get("val") is None or new.get("val") is None:
        return False, "no COVID-QU-Ex Val to check against forgetting (--data); activate by hand"
    keys = ["lung_dice", "infection_dice_covid"]
    if (new.get("trained_on") or {}).get("readings"):
        keys.append("accuracy")
    for key in keys:
        bv, nv = base["val"].get(key), new["val"].get(key)
        if bv is not None and nv is not None and nv < bv - tolerance:
            return False, f"worse on Val {key}: {nv:.4f} < base {bv:.4f} - {tolerance}"
    # Corrections are lesions an annotator drew: learning them must not teach the masks to paint
    # healthy lungs (a severity grade on a Non-COVID/Normal X-ray).
    bg, ng = base["val"].get("graded_without_lesion"), new["val"].get("graded_without_lesion")
    if bg is not None and ng is not None and ng > bg + tolerance:
        return False, (f"worse on Val graded_without_lesion: {ng:.4f} > base {bg:.4f} + "
                       f"{tolerance}")
    return True, (f"better on held-aside ({'; '.join(w for w, _, _ in parts)}) and within "
                  f"{tolerance} of the base on Val")


@dataclass(frozen=True)
class ForgettingGate:
    """Better on the held-aside corrections and readings, and no more than ``tolerance`` lost
    on Val (see ``decide``)."""

    tolerance: float = 0.01
    rule: str = ("held-aside Dice / reading accuracy not worse than base and one better; Val "
                 "lung/infection Dice (and accuracy when readings were learned) >= base - "
                 "tolerance; Val share of healthy X-rays graded <= base + tolerance")

    def decide(self, base: Metrics, new: Metrics) -> tuple[bool, str]:
        return decide(base, new, self.tolerance)


def evaluate(model: LoadedModel, held: Sequence[Correction], val: SplitArrays | None) -> Metrics:
    return {"corrections": correction_metrics(model, held),
            "val": val_metrics(model, val) if val is not None else None}
