"""Judging a fine-tuned model: its metrics beside the base's, and the activation rule as a
pluggable gate (``ActivationGate``: anything with ``decide(base, new) -> (activate, reason)``).

Metrics: per-image mean lung and infection Dice on the held-aside corrections (the human-drawn
kinds only) and, on a fixed seeded subset of COVID-QU-Ex Val, lung Dice over all images and
infection Dice over COVID-19 images. ``ForgettingGate`` is the shipped rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from inference.model import CLASS_NAMES, LoadedModel
from training.corrections import KINDS, Correction, as_split
from training.data import SplitArrays
from training.eval_metrics import split_scores
from training.evaluate import predict_arrays
from training.metrics import dice_iou_per_image

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
    return out


def val_metrics(model: LoadedModel, val: SplitArrays, bf16: bool = False) -> dict[str, Any]:
    scores = split_scores(val, predict_arrays(model, val, bf16=bf16))
    n_covid = int((val.labels == CLASS_NAMES.index("COVID-19")).sum())
    return {"n_images": len(val), "n_covid": n_covid, **scores}


def decide(
    base: dict[str, Any], new: dict[str, Any], tolerance: float
) -> tuple[bool, str]:
    """The activation rule. Better on the held-aside corrections (mean of the lung and
    infection Dice that exist) and, on Val, neither lung nor infection Dice lower than the
    base's by more than ``tolerance``."""
    b, n = base["corrections"]["score"], new["corrections"]["score"]
    if b is None or n is None:
        return False, "no held-aside corrections to compare on"
    if not n > b:
        return False, f"not better on held-aside corrections ({n:.4f} <= base {b:.4f})"
    if base.get("val") is None or new.get("val") is None:
        return False, "no COVID-QU-Ex Val to check against forgetting (--data); activate by hand"
    for key in ("lung_dice", "infection_dice_covid"):
        bv, nv = base["val"].get(key), new["val"].get(key)
        if bv is not None and nv is not None and nv < bv - tolerance:
            return False, f"worse on Val {key}: {nv:.4f} < base {bv:.4f} - {tolerance}"
    return True, (f"better on held-aside corrections ({n:.4f} > base {b:.4f}) and within "
                  f"{tolerance} of the base on Val")


@dataclass(frozen=True)
class ForgettingGate:
    """Better on the held-aside corrections, and no more than ``tolerance`` Dice lost on Val."""

    tolerance: float = 0.01
    rule: str = "held-aside score > base and Val lung/infection Dice >= base - tolerance"

    def decide(self, base: Metrics, new: Metrics) -> tuple[bool, str]:
        return decide(base, new, self.tolerance)


def evaluate(model: LoadedModel, held: Sequence[Correction], val: SplitArrays | None) -> Metrics:
    return {"corrections": correction_metrics(model, held),
            "val": val_metrics(model, val) if val is not None else None}
