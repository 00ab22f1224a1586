"""The COVID-QU-Ex images fine-tuning mixes in (replay, against forgetting) and checks on (a
fixed seeded subset of Val)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from inference.model import CLASS_NAMES
from training.data import SplitArrays, list_samples, load_split, read_gray
from training.run_control import FinetuneError


def read_samples(root: str | Path, split: str, size: int, pick: Callable[[list], list]
                 ) -> SplitArrays:
    """Decode only the samples ``pick`` chooses from the split's sorted sample list."""
    samples = pick(list_samples(root, split))
    if not samples:
        raise FinetuneError(f"no {split} samples selected")
    return SplitArrays(
        images=np.stack([read_gray(s.image, size) for s in samples]),
        lungs=np.stack([read_gray(s.lung_mask, size) > 127 for s in samples]).astype(np.uint8),
        infections=np.stack([read_gray(s.infection_mask, size) > 127
                             for s in samples]).astype(np.uint8),
        labels=np.array([s.label for s in samples], np.int64),
        names=[s.image.name for s in samples],
    )


def load_replay(opts: Any, size: int) -> SplitArrays:
    """Train images of ``opts.replay_classes``: all (array cache) or a seeded ``replay_limit``."""
    classes = {CLASS_NAMES.index(c) for c in opts.replay_classes}
    rng = np.random.default_rng(opts.seed + 1)
    if opts.replay_limit:
        def pick(samples: list) -> list:
            pool = [s for s in samples if s.label in classes]
            idx = np.sort(rng.permutation(len(pool))[: opts.replay_limit])
            return [pool[i] for i in idx]

        return read_samples(opts.data, "Train", size, pick)
    data = load_split(opts.data, "Train", size, opts.cache_dir)
    return data.subset(np.flatnonzero(np.isin(data.labels, sorted(classes))))


def load_val(opts: Any, size: int) -> SplitArrays:
    """A fixed subset of Val: ``val_size`` images by a seeded permutation (same for every run
    with the same seed), minus ``val_exclude``."""
    exclude = set(opts.val_exclude)

    def pick(samples: list) -> list:
        pool = [s for s in samples if s.image.name not in exclude]
        idx = np.sort(np.random.default_rng(opts.seed + 2).permutation(len(pool))[: opts.val_size])
        return [pool[i] for i in idx]

    return read_samples(opts.data, "Val", size, pick)
