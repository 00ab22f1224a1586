"""The simulated annotator of the interactive-segmentation literature (RITM, DeepGrow), shared by
the click-model training (``training.train_click``) and its benchmark (``benchmarks.interactive``).

Each click is at the centre of the largest remaining error: the pixel of the largest 8-connected
error region farthest from the region's border; positive where the mask misses the reference,
negative where it wrongly has it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from inference.click_refine import EIGHT, Click


def largest_error(mask: np.ndarray, truth: np.ndarray) -> tuple[Click, np.ndarray] | None:
    """The next click and the error region it is in; None when the mask equals the truth."""
    error = np.asarray(mask, bool) ^ np.asarray(truth, bool)
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=EIGHT)
    sizes = ndimage.sum_labels(error, labels, index=np.arange(1, n + 1))
    region = labels == (int(np.argmax(sizes)) + 1)
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return Click(int(y), int(x), bool(truth[y, x])), region


def next_click(mask: np.ndarray, truth: np.ndarray) -> Click | None:
    found = largest_error(mask, truth)
    return None if found is None else found[0]


def clicks_on(start: np.ndarray, truth: np.ndarray, n: int) -> list[Click]:
    """``n`` clicks (fewer if the errors run out) as an annotator would place them on ``start``
    if each click fixed the whole error region it is in (training-time proxy for the model)."""
    proxy = np.asarray(start, bool).copy()
    truth = np.asarray(truth, bool)
    clicks: list[Click] = []
    for _ in range(n):
        found = largest_error(proxy, truth)
        if found is None:
            break
        click, region = found
        clicks.append(click)
        proxy[region] = truth[region]
    return clicks
