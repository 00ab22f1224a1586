"""Segmentation and classification metrics, shared by training, evaluation and benchmarks.

Definitions (also in the model card):
- Per-image Dice = 2|P∩G| / (|P|+|G|), IoU = |P∩G| / |P∪G|, averaged over images. An image where
  both P and G are empty scores 1 (nothing to find, nothing predicted); P empty and G not, or the
  reverse, scores 0.
- Pooled Dice/IoU: the same ratios with |P∩G|, |P|, |G| summed over all images first.
"""

from __future__ import annotations

import numpy as np


def dice_iou_per_image(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pred, target: bool arrays (N,H,W). Returns per-image Dice and IoU (N,)."""
    p = pred.reshape(len(pred), -1).astype(bool)
    g = target.reshape(len(target), -1).astype(bool)
    inter = (p & g).sum(1).astype(np.float64)
    ps, gs = p.sum(1).astype(np.float64), g.sum(1).astype(np.float64)
    union = ps + gs - inter
    both_empty = (ps + gs) == 0
    dice = np.where(both_empty, 1.0, 2 * inter / np.maximum(ps + gs, 1))
    iou = np.where(both_empty, 1.0, inter / np.maximum(union, 1))
    return dice, iou


def pooled_dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    p, g = pred.astype(bool), target.astype(bool)
    inter = float((p & g).sum())
    ps, gs = float(p.sum()), float(g.sum())
    if ps + gs == 0:
        return 1.0, 1.0
    return 2 * inter / (ps + gs), inter / (ps + gs - inter)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)
