"""Fine-tune InfMap on the annotators' corrections and readings and register the result as a
model version.

    python -m training.finetune --db sqlite:///data/infmap.sqlite --out models/versions/ft.pt \\
        [--base CHECKPOINT] [--data ../shared/data/covid-qu-ex] [--steps 150] \\
        [--replay-ratio 0.5] [--seed 0] [--tolerance 0.01] [--run-id ID] [--no-readings]

What it does, in order (progress goes to tqdm and to the ``finetune_runs`` row):

1. Training set: the latest submitted or approved annotation version per (study, mask kind).
   A study with only one corrected kind gets the base model's own mask for the other kind: the
   annotator saw both overlays and submitted, so the untouched one was accepted (and dropping
   half-corrected studies would waste most corrections, which usually fix only the infection).
   Infection drawn outside a model-made lung mask grows that lung mask (infection lies inside
   the lungs). Readings (the latest submitted or approved reading version per study;
   ``--no-readings`` ignores them) are class targets when they are COVID-19 / Non-COVID /
   Normal; "other finding" and "not assessable" are not (the head has only the three classes).
   So a study trains its masks (segmentation losses), its class (class loss) or both: a study
   with only a reading trains the class head alone, a study with only masks the segmentation
   alone, and a study whose only correction is a non-class reading is left out. Images are
   decoded from the stored payloads and letterboxed to the network's
   input size exactly as inference does; masks go through the same letterbox.
2. Held aside: each study is held aside for validation when a seeded hash of its content hash
   falls in the lowest ``--holdout`` share (default 20%; at least one study, at least one left
   for training). The hash keeps the choice stable as corrections accumulate, so a study used
   to judge one version is never trained on by the next.
3. Replay: each batch mixes ``--replay-ratio`` of COVID-QU-Ex Train samples (with their class
   labels and masks) into the corrections so the model does not forget what it knew.
   Corrections without a class reading stay out of the class loss and corrections without
   masks out of the mask losses (``training.losses.MultiTaskLoss``: ``NO_LABEL``,
   ``mask_known``); the replayed samples train both.
4. Fine-tuning from ``--base`` (default: the active model version's checkpoint) with AdamW,
   warm-up + cosine LR, bf16 autocast (on CPUs with native bf16) and channels_last
   (``training.loop.train_step``).
5. Evaluation of base and new on the held-aside corrections (per-image mean lung and infection
   Dice over the human-drawn masks only; an image whose human and predicted masks are both
   empty scores 1, exactly one empty scores 0), on the held-aside class readings (accuracy of
   the decided class and top-label ECE, 15 equal-width bins, on the calibrated probabilities:
   ``metrics["corrections"]`` and ``metrics["base"]["corrections"]``) and on a fixed seeded
   subset of COVID-QU-Ex Val (``--val-size``, default 200; lung Dice over all, infection Dice
   over COVID-19 images, accuracy).
6. The checkpoint is written atomically, then the model version is registered with lineage
   (base version, annotation version ids, data hash), metrics and training time in ONE
   transaction that also finishes the run. It becomes active only if, on the held-aside
   studies, it is no worse than the base on any measure there is (masks' Dice, readings'
   accuracy) and better on one (a higher accuracy, or the same with a lower ECE), AND it loses
   no more than ``--tolerance`` on Val (lung and infection Dice; accuracy too when the run
   learned readings); otherwise it is registered inactive and a user may activate it by hand.

Under ``torchrun`` (``training.distributed``: DDP over gloo on CPU) rank 0 does all of the above
and hands the others its plan (the base's architecture, the training corrections as arrays, the
replay source); every process trains on its share of each ``--batch-size`` batch, DDP gives them
rank 0's base weights and averages the gradients. Only rank 0 touches the database and writes::

    torchrun --standalone --nproc-per-node 2 -m training.finetune --db URL --out new.pt

Interruption: SIGTERM/SIGINT or any exception marks the run ``interrupted``/``failed``, removes
this run's checkpoint if it was not registered, and registers nothing. Resuming is re-running:
a run takes minutes and is deterministic for the same database contents and seed, so no
half-run optimiser state is kept.

The parts live beside this orchestration: ``training.corrections`` (reading the corrections,
the hold-out split, lineage hash), ``training.replay`` (COVID-QU-Ex replay and Val subsets),
``training.gate`` (metrics and the activation rule, pluggable: ``finetune(..., gate=...)``) and
``training.run_control`` (the run row, progress, signals, the app's background launcher).
This module is over 400 lines because it holds the option set and its CLI (one place for both)
and the run, which reads top to bottom as the steps above.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import settings
from database import model_versions, runs
from database.session import init_db, session_scope
from inference.model import (
    CLASS_NAMES,
    InfMapNet,
    LoadedModel,
    ModelConfig,
    build_model,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from training import distributed
from training.corrections import (
    Correction,
    as_split,
    data_hash,
    fill_missing_kinds,
    load_corrections,
    split_holdout,
)
from training.data import SplitArrays, to_tensors
from training.gate import ActivationGate, ForgettingGate, evaluate
from training.loop import NATIVE_BF16, lr_at, train_step
from training.losses import NO_LABEL, MultiTaskLoss
from training.replay import load_replay, load_val
from training.run_control import (
    FinetuneError,
    Interrupted,
    Progress,
    finish_failed,
    signals_blocked,
    signals_raise,
    start_run,
)

__all__ = [  # the public API (callers import these from here)
    "Correction",
    "FinetuneError",
    "FinetuneOptions",
    "FinetuneResult",
    "Interrupted",
    "finetune",
    "follow",
    "main",
    "parse_args",
]


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


# ----------------------------------------------------------------------------- orchestration


def finetune(
    opts: FinetuneOptions, engine: Any = None, gate: ActivationGate | None = None
) -> FinetuneResult:
    """Run one fine-tuning; see the module docstring. ``gate`` decides activation (default
    ``ForgettingGate(opts.tolerance)``). Raises ``FinetuneError`` for a run that cannot proceed
    (the run row says why), ``Interrupted`` on SIGTERM/SIGINT."""
    rule: ActivationGate = gate if gate is not None else ForgettingGate(opts.tolerance)
    d = _join(opts)
    if not d.is_main:
        raise FinetuneError("under torchrun only rank 0 runs finetune(); the others follow()")
    own_engine = engine is None
    engine = engine if engine is not None else init_db(opts.db)
    state: dict[str, Any] = {"registered": False, "checkpoint_written": None}
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
    run_id = start_run(engine, opts.run_id, args)
    try:
        with signals_raise():
            return _finetune(opts, engine, run_id, state, rule)
    except BaseException as exc:
        if d.enabled and not state.get("plan_shared"):
            distributed.broadcast_object(None, d)  # the followers stop instead of waiting
        with signals_blocked():
            if not state["registered"]:
                written = state["checkpoint_written"]
                if written is not None:  # the checkpoint and save_checkpoint's temporary file
                    Path(written).unlink(missing_ok=True)
                    Path(written + ".tmp").unlink(missing_ok=True)
                if isinstance(exc, Interrupted | KeyboardInterrupt):
                    finish_failed(engine, run_id, "interrupted", f"interrupted ({exc or 'SIGINT'})"
                                   "; nothing was registered. Start a new run to try again.")
                else:
                    finish_failed(engine, run_id, "failed", f"{type(exc).__name__}: {exc}")
        if state["registered"] and isinstance(exc, Interrupted | KeyboardInterrupt):
            return state["result"]  # the signal came after the run had completed
        raise
    finally:
        if own_engine:
            engine.dispose()


def _resolve_base(s: Any, opts: FinetuneOptions) -> tuple[Path, Any]:
    """(checkpoint path, its registered model version or None)."""
    versions = model_versions.list_model_versions(s)
    if opts.base:
        path = Path(opts.base).expanduser().resolve()
        if not path.is_file():
            raise FinetuneError(f"no base checkpoint at {path}")
        sha = file_sha256(path)
        match = [v for v in versions if v.checkpoint_sha256 == sha]
        return path, (match[-1] if match else None)  # the oldest registration of these weights
    active = model_versions.get_active_model_version(s)
    if active is None:
        raise FinetuneError("no active model version to start from; pass --base CHECKPOINT")
    return Path(active.checkpoint_path), active


def _batches(n: int, per_batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of ``per_batch`` indices of ``range(n)``, every index once per pass."""
    order = np.empty(0, np.int64)
    while True:
        while len(order) < per_batch:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:per_batch]
        order = order[per_batch:]


def _round_to_half(model: torch.nn.Module) -> None:
    """Round float weights to float16 and back, as the saved checkpoint stores them, so the
    metrics describe exactly the registered weights."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def _train(
    model: InfMapNet,
    config: ModelConfig,
    corr_arrays: SplitArrays,
    corr_has_masks: list[bool],
    replay: SplitArrays | None,
    opts: FinetuneOptions,
    progress: Progress,
    d: distributed.Dist,
) -> tuple[InfMapNet, int, float]:
    """The training loop on the base's network: corrections mixed with replayed Train images.
    A correction without masks (a reading only) trains the class head only.
    Returns (model in eval mode with float16-rounded weights, replayed per batch, seconds).
    Under torchrun each process takes its share of every batch (same seeds, same batches)."""
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    distributed.check_same("the training set (corrections, replay images)",
                           (len(corr_arrays), len(replay) if replay is not None else -1), d)
    trained = distributed.wrap(model, d)  # DDP starts every process from rank 0's weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = MultiTaskLoss()
    torch.manual_seed(opts.seed)  # dropout in the class head uses the global generator
    gen = torch.Generator().manual_seed(opts.seed + d.rank)  # augmentation draws per process
    rng = np.random.default_rng(opts.seed)  # the batches: the same in every process
    n_replay = min(opts.batch_size - 1, round(opts.batch_size * opts.replay_ratio)) \
        if replay is not None else 0
    corr_batches = _batches(len(corr_arrays), opts.batch_size - n_replay, rng)
    has_masks = torch.from_numpy(np.asarray(corr_has_masks, bool))
    replay_batches = (_batches(len(replay), n_replay, rng)
                      if replay is not None and n_replay else None)
    warmup = max(1, opts.steps // 10)
    running: dict[str, float] = {}
    t_train = time.monotonic()
    bar = progress.bar(opts.steps, "fine-tune")
    for step in range(opts.steps):
        idx = distributed.shard(next(corr_batches), d)
        img, masks, labels = to_tensors(corr_arrays, idx)
        known = has_masks[idx]
        if replay is not None and replay_batches is not None:
            r_img, r_masks, r_labels = to_tensors(
                replay, distributed.shard(next(replay_batches), d))
            img, masks = torch.cat([img, r_img]), torch.cat([masks, r_masks])
            labels = torch.cat([labels, r_labels])
            known = torch.cat([known, torch.ones(len(r_labels), dtype=torch.bool)])
        parts = train_step(trained, optimizer, loss_fn, img, masks, labels, gen, config,
                           lr_at(step, opts.steps, opts.lr, warmup), opts.bf16,
                           opts.channels_last, mask_known=known)
        for k, v in parts.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        progress.update(0.1 + 0.75 * (step + 1) / opts.steps,
                        f"fine-tuning: step {step + 1}/{opts.steps}",
                        force=step + 1 == opts.steps)
        if opts.fail_after_step and step + 1 >= opts.fail_after_step:
            raise RuntimeError(f"injected failure after step {step + 1} (test)")
    bar.close()
    distributed.check_in_sync(model, d)
    train_seconds = time.monotonic() - t_train
    model = model.to(memory_format=torch.contiguous_format).eval()
    _round_to_half(model)

    return model, n_replay, train_seconds


def _finetune(
    opts: FinetuneOptions, engine: Any, run_id: int, state: dict[str, Any], gate: ActivationGate
) -> FinetuneResult:
    t_start = time.monotonic()
    progress = Progress(engine, run_id, opts.progress)
    progress.update(0.01, "loading the base model and the corrections", force=True)
    out = Path(opts.out).expanduser().resolve()
    with session_scope(engine, write=False) as s:
        base_path, base_row = _resolve_base(s, opts)
        if out == base_path or any(Path(v.checkpoint_path).resolve() == out
                                   for v in model_versions.list_model_versions(s)):
            raise FinetuneError(f"{out} is a registered model's checkpoint; choose a new --out")
        base_version_id = int(base_row.id) if base_row is not None else None
        base_version = base_row.version if base_row is not None else None
        base = load_checkpoint(base_path)
        size = base.config.input_size
        corrections = load_corrections(s, opts.statuses, size, readings=opts.readings)
    if not corrections:
        raise FinetuneError("there are no submitted or approved corrections (masks or class "
                            "readings) to learn from")
    filled = fill_missing_kinds(corrections, base)
    train_set, held = split_holdout(corrections, opts.holdout, opts.seed)
    train_arrays = as_split(train_set)

    default_data = settings.shared_data_dir()
    data_root = opts.data or (str(default_data) if default_data.is_dir() else None)
    d = distributed.init()
    distributed.broadcast_object({"config": asdict(base.config), "corrections": train_arrays,
                                  "has_masks": [c.has_masks for c in train_set],
                                  "data": data_root}, d)  # the followers' plan
    state["plan_shared"] = True
    use_replay = bool(data_root) and opts.replay_ratio > 0
    opts_data = FinetuneOptions(**{**asdict(opts), "data": data_root})
    progress.update(0.03, "loading COVID-QU-Ex replay and Val images", force=True)
    replay = load_replay(opts_data, size) if use_replay else None
    val = load_val(opts_data, size) if data_root and opts.val_size else None

    progress.update(0.06, "evaluating the base model", force=True)
    trained_on = {"masks": sum(c.has_masks for c in train_set),
                  "readings": sum(c.label != NO_LABEL for c in train_set)}
    base_metrics = {**evaluate(base, held, val), "trained_on": trained_on}

    model, n_replay, train_seconds = _train(base.model, base.config, train_arrays,
                                            [c.has_masks for c in train_set], replay, opts,
                                            progress, d)

    progress.update(0.87, "evaluating the fine-tuned model", force=True)
    # The base's Val-fitted decisions (temperature, thresholds, out-of-domain reference) carry
    # over: a short fine-tune moves the features little, and base and new are then judged alike.
    new = LoadedModel(model=model, config=base.config, meta={}, path=None, sha256=None,
                      calibration=base.calibration)
    new_metrics = {**evaluate(new, held, val), "trained_on": trained_on}
    accept, reason = gate.decide(base_metrics, new_metrics)
    if opts.activate == "never":
        accept, reason = False, f"not activated (--activate never); rule says: {reason}"

    # ---- lineage, checkpoint, registration
    replay_info = {
        "dataset": "COVID-QU-Ex Infection Segmentation Data, Train" if replay is not None
        else None,
        "ratio": opts.replay_ratio if replay is not None else 0.0,
        "per_batch": n_replay, "classes": list(opts.replay_classes),
        "pool_images": len(replay) if replay is not None else 0, "limit": opts.replay_limit,
    }
    root = (base_version or str(base.meta.get("version", "model"))).split("-ft")[0]
    version = opts.version or f"{root}-ft{run_id}"
    lineage = {
        "source": "finetune",
        "run_id": run_id,
        "base_version": base_version,
        "base_version_id": base_version_id,
        "base_checkpoint": str(base_path),
        "base_checkpoint_sha256": base.sha256,
        "annotation_version_ids": sorted(v for c in train_set for v in c.human.values()),
        "held_aside_annotation_version_ids": sorted(v for c in held for v in c.human.values()),
        "train_image_ids": [c.image_id for c in train_set],
        "held_aside_image_ids": [c.image_id for c in held],
        "reading_version_ids": sorted(c.reading for c in train_set if c.reading is not None),
        "held_aside_reading_version_ids": sorted(c.reading for c in held
                                                 if c.reading is not None),
        "studies": {"masks_only": sum(c.has_masks and c.label == NO_LABEL
                                      for c in corrections),
                    "reading_only": sum(not c.has_masks for c in corrections),
                    "both": sum(c.has_masks and c.label != NO_LABEL for c in corrections),
                    "readings_not_class_targets": sum(c.reading is not None
                                                      and c.label == NO_LABEL
                                                      for c in corrections)},
        "model_filled_masks": filled,
        "statuses": list(opts.statuses),
        "data_hash": data_hash(train_set, held, replay_info),
        "replay": replay_info,
        "val": {"dataset": "COVID-QU-Ex Infection Segmentation Data, Val (seeded subset)",
                "images": len(val), "seed": opts.seed} if val is not None else None,
        "training": {"steps": opts.steps, "batch_size": opts.batch_size, "lr": opts.lr,
                     "weight_decay": opts.weight_decay, "seed": opts.seed, "bf16": opts.bf16,
                     "channels_last": opts.channels_last, "holdout": opts.holdout,
                     "threads": torch.get_num_threads()},
    }
    metrics = {
        "corrections": new_metrics["corrections"],
        "val": new_metrics["val"],
        "trained_on": trained_on,
        "base": {k: base_metrics[k] for k in ("corrections", "val")},
        "decision": {"activate": accept, "reason": reason, "tolerance": opts.tolerance,
                     "rule": gate.rule},
        "train_seconds": round(train_seconds, 1),
    }
    progress.update(0.95, "saving the checkpoint", force=True)
    meta = {
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_data": "fine-tuned on InfMap corrections + COVID-QU-Ex replay (CC BY-SA 4.0)",
        "base_version": base_version,
        "lineage": {k: lineage[k] for k in ("run_id", "base_version", "data_hash")},
        "metrics": {"val": metrics["val"], "corrections": metrics["corrections"]},
        "calibration": {**base.calibration.notes,
                        "inherited_from": base_version or str(base_path)},
    }
    state["checkpoint_written"] = str(out)
    save_checkpoint(model, out, meta=meta, half=True,  # atomic (tmp + os.replace)
                    calibration=base.calibration)
    sha = file_sha256(out)

    with signals_blocked():
        with session_scope(engine) as s:
            model_versions.lock_registry(s)  # no activation slips between check and register
            if accept and base_version_id is not None and not opts.base:
                active = model_versions.get_active_model_version(s)
                if active is None or active.id != base_version_id:
                    accept = False
                    reason = ("a user changed the active model during the run; not activated "
                              f"automatically (rule: {reason})")
                    metrics["decision"].update(activate=False, reason=reason)
            row = model_versions.register_model_version(
                s, version, str(out), sha, metrics=metrics, parent=base_version_id,
                lineage=lineage, train_minutes=round(train_seconds / 60, 3), activate=accept)
            activated = bool(row.active)
            runs.finish_run(s, run_id, "succeeded",
                            message=f"{version}: {'activated' if activated else 'not activated'}"
                                    f" - {reason}", model_version_id=row.id)
            row_id = int(row.id)
        state["registered"] = True
        state["result"] = FinetuneResult(
            run_id=run_id, model_version_id=row_id, version=version, checkpoint=str(out),
            activated=activated, decision=reason, metrics=metrics, lineage=lineage,
            train_seconds=train_seconds, total_seconds=time.monotonic() - t_start)
    return state["result"]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> FinetuneOptions:
    d = FinetuneOptions(db="", out="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--db", default=None, help="database URL (default: DATABASE_URL or "
                   "data/infmap.sqlite)")
    p.add_argument("--out", type=settings.cli_path_str, required=True,
                   help="where to write the new checkpoint")
    p.add_argument("--base", type=settings.cli_path_str, default=None,
                   help="checkpoint to start from (default: the active "
                   "model version's)")
    p.add_argument("--data", type=settings.cli_path_str, default=None,
                   help="COVID-QU-Ex root for replay and Val (default: "
                   f"{settings.shared_data_dir()} if present, INFMAP_DATA)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--replay-ratio", type=float, default=d.replay_ratio,
                   help="share of each batch replayed from COVID-QU-Ex Train")
    p.add_argument("--replay-classes", default=",".join(d.replay_classes),
                   help="comma-separated classes to replay")
    p.add_argument("--replay-limit", type=int, default=d.replay_limit,
                   help="replay from a seeded sample of N Train images (0: all)")
    p.add_argument("--val-size", type=int, default=d.val_size,
                   help="seeded COVID-QU-Ex Val subset size (0: skip Val)")
    p.add_argument("--holdout", type=float, default=d.holdout,
                   help="share of corrected studies held aside to judge the new model")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help="allowed Val Dice loss (lung and infection) for automatic activation")
    p.add_argument("--run-id", type=int, default=None,
                   help="a queued finetune_runs row to report progress to (the app's)")
    p.add_argument("--version", default=None, help="version name (default <base>-ft<run id>)")
    p.add_argument("--activate", choices=("auto", "never"), default="auto")
    p.add_argument("--statuses", default=",".join(d.statuses))
    p.add_argument("--no-readings", action="store_true",
                   help="ignore readings: learn from the masks only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-bf16", action="store_true",
                   help="no CPU bf16 autocast (it is used only where the CPU has native bf16)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--cache-dir", type=settings.cli_path_str, default=d.cache_dir,
                   help="COVID-QU-Ex decoded-array cache")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--fail-after-step", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    return FinetuneOptions(
        db=a.db or settings.database_url(), out=a.out, base=a.base, data=a.data, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, replay_ratio=a.replay_ratio,
        replay_classes=tuple(c.strip() for c in a.replay_classes.split(",") if c.strip()),
        replay_limit=a.replay_limit, val_size=a.val_size, holdout=a.holdout, seed=a.seed,
        tolerance=a.tolerance, run_id=a.run_id, version=a.version, activate=a.activate,
        statuses=tuple(x.strip() for x in a.statuses.split(",") if x.strip()),
        readings=not a.no_readings,
        threads=a.threads, bf16=NATIVE_BF16 and not a.no_bf16, channels_last=not a.no_channels_last,
        cache_dir=a.cache_dir or None, progress=not a.no_progress,
        fail_after_step=a.fail_after_step,
    )


def _join(opts: FinetuneOptions) -> distributed.Dist:
    """Join torchrun's process group (alone: nothing) and take this process's threads."""
    d = distributed.init()
    distributed.check_batch(opts.batch_size, d)
    if opts.threads or d.enabled:
        torch.set_num_threads(opts.threads or distributed.default_threads(d))
    return d


def follow(opts: FinetuneOptions) -> None:
    """A torchrun process other than rank 0: train rank 0's plan on its share of each batch.
    Needs no database; the replay images are read here from the same data root."""
    d = _join(opts)
    plan = distributed.broadcast_object(None, d)
    if plan is None:  # rank 0 stopped before training; its run row says why
        return
    assert isinstance(plan, dict)
    config = ModelConfig(**plan["config"])
    opts_data = FinetuneOptions(**{**asdict(opts), "data": plan["data"]})
    replay = (load_replay(opts_data, config.input_size)
              if plan["data"] and opts.replay_ratio > 0 else None)
    _train(build_model(config), config, plan["corrections"], plan["has_masks"], replay, opts,
           Progress(None, None, False), d)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    d = distributed.init()
    try:
        if not d.is_main:
            follow(opts)
            return 0
        return _main(opts)
    finally:
        distributed.finish(d)


def _main(opts: FinetuneOptions) -> int:
    try:
        result = finetune(opts)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"interrupted ({exc}); nothing registered", file=sys.stderr)
        return 128 + (signal.SIGINT if str(exc) == "SIGINT" else signal.SIGTERM)
    except KeyboardInterrupt:
        print("interrupted; nothing registered", file=sys.stderr)
        return 130
    m = result.metrics
    print(json.dumps({"version": result.version, "model_version_id": result.model_version_id,
                      "activated": result.activated, "decision": result.decision,
                      "corrections": m["corrections"], "val": m["val"],
                      "base": m["base"], "train_seconds": round(result.train_seconds, 1),
                      "total_seconds": round(result.total_seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


