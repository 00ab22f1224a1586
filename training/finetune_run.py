"""One fine-tuning run on rank 0, top to bottom as ``training.finetune`` describes it: the base
and the corrections, the hold-out split, the followers' plan, replay and Val, evaluation of base
and new, the activation decision, lineage, the checkpoint and the registration (one transaction
that also finishes the run). ``training.finetune.finetune`` wraps it with the run row, signals
and clean-up."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import settings
from database import model_versions, runs
from database.session import session_scope
from inference.model import LoadedModel, file_sha256, load_checkpoint, save_checkpoint
from training import distributed
from training.corrections import (
    as_split,
    data_hash,
    fill_missing_kinds,
    load_corrections,
    split_holdout,
)
from training.finetune_options import FinetuneOptions, FinetuneResult
from training.finetune_train import train
from training.gate import ActivationGate, evaluate
from training.losses import NO_LABEL, MultiTaskLoss
from training.replay import load_replay, load_val
from training.run_control import FinetuneError, Progress, signals_blocked


def resolve_base(s: Any, opts: FinetuneOptions) -> tuple[Path, Any]:
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


def run(
    opts: FinetuneOptions, engine: Any, run_id: int, state: dict[str, Any], gate: ActivationGate
) -> FinetuneResult:
    """Steps 1-6 of ``training.finetune`` for the started run ``run_id``. ``state`` tells the
    caller what to clean up: ``checkpoint_written``, ``plan_shared``, ``registered``, ``result``."""
    t_start = time.monotonic()
    progress = Progress(engine, run_id, opts.progress)
    progress.update(0.01, "loading the base model and the corrections", force=True)
    out = Path(opts.out).expanduser().resolve()
    with session_scope(engine, write=False) as s:
        base_path, base_row = resolve_base(s, opts)
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
    loss_fn = MultiTaskLoss.as_trained(base.meta)
    distributed.broadcast_object({"config": asdict(base.config), "corrections": train_arrays,
                                  "loss": loss_fn.loss_options(),
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

    model, n_replay, train_seconds = train(base.model, base.config, train_arrays,
                                            [c.has_masks for c in train_set], replay, opts,
                                            progress, d, loss_fn)

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
