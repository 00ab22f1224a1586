"""Clicks to a good mask with the click-refinement network, many images at once: the Val check
of ``training.train_click`` and the ``model`` method of ``benchmarks.interactive``.

The simulated annotator (``inference.click_sim``) clicks at the centre of the largest remaining
error of each image's current mask and stops once its Dice reaches ``stop_at``. After each click
the network sees all of that image's clicks so far and its current masks, and its answer
(``inference.click_model.decide``: above 0.5, the last click's spot corrected; the infection
inside ``within`` where given) becomes the current mask, as in the app.
Dice is per image; two empty masks agree (1.0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from inference.click_model import KINDS, decide, encode_guidance, forward_probabilities
from inference.click_refine import Click
from inference.click_sim import next_click
from inference.model import InfMapNet, LoadedModel
from training.metrics import dice_iou_per_image


def dice_of(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return dice_iou_per_image(pred, truth)[0]


@dataclass
class ClickRun:
    dices: np.ndarray  # (N, max_clicks + 1): Dice after 0, 1, ... clicks
    seconds: list[float] = field(default_factory=list)  # per forward pass (batch of ``active``)


def simulate_clicks(
    model: LoadedModel | InfMapNet, images: np.ndarray, truth: np.ndarray, start: np.ndarray,
    other: np.ndarray, kind: str, max_clicks: int, within: np.ndarray | None = None,
    stop_at: float = 0.90, batch_size: int = 32, bf16: bool = False,
) -> ClickRun:
    """Correct the ``kind`` mask of every image by clicks. ``images`` uint8 (N, S, S) at the
    model's input size; ``truth``, ``start``, ``other`` (the other kind's current mask, left as
    it is) and ``within`` bool (N, S, S)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    other_kind = KINDS[1 - KINDS.index(kind)]
    n, size = len(images), images.shape[1]
    masks = np.asarray(start, bool).copy()
    if within is not None:
        masks &= within
    dices = np.zeros((n, max_clicks + 1))
    dices[:, 0] = dice_of(masks, truth)
    clicks: list[list[Click]] = [[] for _ in range(n)]
    run = ClickRun(dices)
    for step in range(1, max_clicks + 1):
        active = []
        for i in range(n):
            if dices[i, step - 1] >= stop_at:
                continue
            click = next_click(masks[i], truth[i])
            if click is None:
                continue
            clicks[i].append(click)
            active.append(i)
        for lo in range(0, len(active), batch_size):
            idx = active[lo : lo + batch_size]
            guidance = np.stack([
                encode_guidance({kind: clicks[i]}, {kind: masks[i], other_kind: other[i]},
                                (size, size))
                for i in idx])
            img = torch.from_numpy(images[idx]).float().div_(255.0).unsqueeze(1)
            t0 = time.perf_counter()
            prob = forward_probabilities(model, img, torch.from_numpy(guidance), bf16=bf16)
            run.seconds.append(time.perf_counter() - t0)
            channel = prob[:, KINDS.index(kind)].numpy()
            new = np.stack([decide(channel[j], clicks[i]) for j, i in enumerate(idx)])
            if within is not None:
                new &= within[idx]
            masks[idx] = new
        dices[:, step] = dices[:, step - 1]
        if active:
            dices[active, step] = dice_of(masks[active], truth[active])
    return run


def noc(dices: np.ndarray, threshold: float) -> tuple[float, float]:
    """(mean clicks until Dice >= threshold, an image never there counting as the maximum;
    the share of images never there)."""
    reached = dices >= threshold
    ever = reached.any(1)
    first = np.where(ever, reached.argmax(1), dices.shape[1] - 1)
    return float(first.mean()), float(1.0 - ever.mean())
