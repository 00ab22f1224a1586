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

This module is the entry point (``finetune()``, the CLI, the torchrun followers); the parts live
beside it: ``training.finetune_options`` (the option set and the result),
``training.finetune_run`` (steps 1-6 on rank 0), ``training.finetune_train`` (the optimisation
loop of step 4), ``training.corrections`` (reading the corrections, the hold-out split, lineage
hash), ``training.replay`` (COVID-QU-Ex replay and Val subsets), ``training.gate`` (metrics and
the activation rule, pluggable: ``finetune(..., gate=...)``) and ``training.run_control`` (the
run row, progress, signals, the app's background launcher).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import settings
from database.session import init_db
from inference.model import ModelConfig, build_model
from training import distributed, finetune_run
from training.corrections import Correction
from training.finetune_options import FinetuneOptions, FinetuneResult
from training.finetune_train import train
from training.gate import ActivationGate, ForgettingGate
from training.loop import NATIVE_BF16
from training.losses import MultiTaskLoss
from training.replay import load_replay
from training.run_control import (
    FinetuneError,
    Heartbeat,
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
        with signals_raise(), Heartbeat(engine, run_id):
            return finetune_run.run(opts, engine, run_id, state, rule)
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
    p.add_argument("--onnx", action="store_true",
                   help="then build the new version's ONNX file (INFMAP_ENGINE=auto serves it)")
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
        fail_after_step=a.fail_after_step, onnx=a.onnx,
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
    train(build_model(config), config, plan["corrections"], plan["has_masks"], replay, opts,
          Progress(None, None, False), d, MultiTaskLoss(**plan["loss"]))


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
    if opts.onnx:  # after the run is recorded: a failure here costs speed, not the version
        from inference import onnx_engine
        from inference.model import load_checkpoint

        onnx_engine.build(load_checkpoint(result.checkpoint))
    m = result.metrics
    print(json.dumps({"version": result.version, "model_version_id": result.model_version_id,
                      "activated": result.activated, "decision": result.decision,
                      "corrections": m["corrections"], "val": m["val"],
                      "base": m["base"], "train_seconds": round(result.train_seconds, 1),
                      "total_seconds": round(result.total_seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

