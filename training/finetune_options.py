"""The option set of a fine-tuning run (``FinetuneOptions``, filled by
``training.finetune.parse_args`` or by the app) and what a run returns (``FinetuneResult``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.model import CLASS_NAMES
from training.loop import NATIVE_BF16


@dataclass
class FinetuneOptions:
    db: str
    out: str
    base: str | None = None  # checkpoint path; None: the active model version's checkpoint
    data: str | None = None  # COVID-QU-Ex root for replay and Val; None: the setting, if present
    steps: int = 150
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    replay_ratio: float = 0.5
    replay_classes: tuple[str, ...] = CLASS_NAMES  # which Train classes to replay
    replay_limit: int = 0  # 0: all of Train (from the array cache); N: a seeded N-image sample
    val_size: int = 200  # seeded subset of COVID-QU-Ex Val; 0: none
    val_exclude: tuple[str, ...] = ()  # Val file names never used here (a benchmark's test set)
    holdout: float = 0.2
    seed: int = 0
    tolerance: float = 0.01
    statuses: tuple[str, ...] = ("submitted", "approved")
    readings: bool = True  # learn the class from readings (False: masks only, as before)
    run_id: int | None = None
    version: str | None = None
    activate: str = "auto"  # "auto" (the rule), "never"
    bf16: bool = NATIVE_BF16  # autocast only where the CPU has native bf16
    channels_last: bool = True
    threads: int = 0
    cache_dir: str | None = ".cache/covid-qu-ex"
    progress: bool = True  # tqdm bars
    fail_after_step: int = 0  # tests: raise after this training step (0: never)
    onnx: bool = False  # CLI only: build the new version's ONNX file once it is registered


@dataclass
class FinetuneResult:
    run_id: int
    model_version_id: int
    version: str
    checkpoint: str
    activated: bool
    decision: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    train_seconds: float
    total_seconds: float
