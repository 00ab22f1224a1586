"""Train the InfMap model from scratch on COVID-QU-Ex.

    python -m training.train --data ../shared/data/covid-qu-ex --out models/infmap.pt

Resumable: the full training state goes to ``--work-dir/last.pt`` every few minutes and at every
epoch end; running the same command again continues where it stopped. The best-on-Val model is
written to ``--out`` (float16 weights, metadata with Val metrics).

In several processes, on one machine or several (``training.distributed``: DDP over gloo; the
global ``--batch-size`` is split among them; rank 0 validates and writes)::

    torchrun --standalone --nproc-per-node 2 -m training.train --data ... --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import settings
from inference.model import (
    HEAD_POOLINGS,
    InfMapNet,
    ModelConfig,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from training import distributed
from training.augment import AUGMENTATIONS
from training.data import SplitArrays, load_split, to_tensors
from training.eval_metrics import split_scores
from training.evaluate import predict_arrays
from training.loop import NATIVE_BF16, ema_with_warmup, lr_at, ramp_fraction, train_step
from training.losses import INFECTION_DICE, MultiTaskLoss

# What --freeze keeps of --init. "encoder": the encoder and the class head, so the reading, the
# features the out-of-domain score measures and the head's calibration input stay the init's
# while the decoder (the masks) trains.
FROZEN_PARTS = {"none": (), "encoder": ("encoder", "classification_head")}

DATASET_NOTE = "COVID-QU-Ex Infection Segmentation Data, Train split (CC BY-SA 4.0)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=settings.cli_path_str, required=True,
                   help="COVID-QU-Ex root folder")
    p.add_argument("--out", type=settings.cli_path_str, default="models/infmap.pt",
                   help="best-on-Val checkpoint")
    p.add_argument("--work-dir", type=settings.cli_path_str, default="runs/train",
                   help="resumable state and history")
    p.add_argument("--cache-dir", type=settings.cli_path_str, default=".cache/covid-qu-ex",
                   help="decoded-array cache")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default=ModelConfig.encoder_name)
    p.add_argument("--limit", type=int, default=0, help="use only N train/val images (tests)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (tests)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--no-bf16", action="store_true",
                   help="no CPU bf16 autocast (it is used only where the CPU has native bf16)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--save-every-min", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--head-pooling", choices=HEAD_POOLINGS, default="avg",
                   help="class head pooling: whole image (avg, 1.0) or under the lungs (lung, 2.0)")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="v1",
                   help="v2 adds randomised acquisition (training.acquisition)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the weights (0: off); the EMA model is validated and saved")
    p.add_argument("--init", default="",
                   help="start from this checkpoint's weights (same architecture), not at random")
    p.add_argument("--warmup", type=int, default=300, help="linear warm-up steps (at most)")
    p.add_argument("--infection-dice", choices=INFECTION_DICE, default="pooled",
                   help="infection Dice pooled over the batch (1.0, 2.0) or per image (2.1)")
    p.add_argument("--infection-weight", type=float, default=1.5)
    p.add_argument("--false-infection-weight", type=float, default=0.0,
                   help="weight of the false-infection share on lesion-free images (2.2)")
    p.add_argument("--false-infection-ramp-epochs", type=float, default=0.0,
                   help="raise that weight linearly from 0 over the first N epochs (2.5)")
    p.add_argument("--freeze", choices=sorted(FROZEN_PARTS), default="none",
                   help="parts of --init left as they are (encoder: train the masks only)")
    return p.parse_args(argv)


def validate(model: InfMapNet, data: SplitArrays, bf16: bool, batch: int = 32) -> dict[str, float]:
    """Val metrics (``training.eval_metrics.split_scores`` on ``training.evaluate.predict_arrays``:
    the same post-processing as evaluation and the app) and ``score``, which picks the best
    checkpoint: the mean of lung Dice, COVID-19 infection Dice, accuracy and the share of
    Non-COVID/Normal images given no severity grade (a healthy X-ray graded "mild" is an error a
    radiologist sees; recipe 2.1 scored well on the first three while grading most of them).
    The model is given back in the mode it came in."""
    scores = split_scores(data, predict_arrays(model, data, batch_size=batch, bf16=bf16))
    inf, graded = scores["infection_dice_covid"], scores["graded_without_lesion"]
    metrics = {"lung_dice": scores["lung_dice"],
               "infection_dice_covid": float("nan") if inf is None else inf,
               "accuracy": scores["accuracy"],
               "graded_without_lesion": float("nan") if graded is None else graded}
    terms = [metrics["lung_dice"], metrics["accuracy"]]
    terms += [inf] if inf is not None else []
    terms += [1.0 - graded] if graded is not None else []
    metrics["score"] = sum(terms) / len(terms)
    return metrics


def train(args: argparse.Namespace) -> dict[str, Any]:
    d = distributed.init()
    distributed.check_batch(args.batch_size, d)
    if args.threads or d.enabled:
        torch.set_num_threads(args.threads or distributed.default_threads(d))
    torch.manual_seed(args.seed)  # the same initial weights in every process
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bf16 = NATIVE_BF16 and not args.no_bf16
    config = ModelConfig(encoder_name=args.encoder, head_pooling=args.head_pooling)

    if not d.is_main:
        distributed.barrier(d)  # rank 0 fills the decoded-array cache first (one writer)
    train_data = load_split(args.data, "Train", config.input_size, args.cache_dir)
    val_data = load_split(args.data, "Val", config.input_size, args.cache_dir)
    if d.is_main:
        distributed.barrier(d)
    if args.limit:
        rng = np.random.default_rng(args.seed)
        train_data = train_data.subset(np.sort(rng.permutation(len(train_data))[: args.limit]))
        val_data = val_data.subset(np.sort(rng.permutation(len(val_data))[: args.limit]))

    model = build_model(config)
    init_note = "random"
    if args.init:
        start = load_checkpoint(args.init)
        if asdict(start.config) | {"head_pooling": config.head_pooling} != asdict(config):
            raise SystemExit(f"--init {args.init}: its architecture differs from this run's")
        model.load_state_dict(start.model.state_dict())
        init_note = f"{start.version} ({start.sha256})"
    elif args.freeze != "none":
        raise SystemExit("--freeze keeps parts of --init: give --init")
    frozen = [getattr(model.net, name) for name in FROZEN_PARTS[args.freeze]]
    for part in frozen:
        part.requires_grad_(False)
    if not args.no_channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, avg_fn=ema_with_warmup(args.ema),
            use_buffers=True,
        )
        if args.ema
        else None
    )
    augment_fn = AUGMENTATIONS[args.augment]
    trained = distributed.wrap(model, d)  # what steps; ``model`` keeps the weights
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = MultiTaskLoss(infection_weight=args.infection_weight,
                            infection_dice=args.infection_dice,
                            false_infection_weight=args.false_infection_weight)
    steps_per_epoch = len(train_data) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    warmup = min(args.warmup, max(1, total_steps // 20))
    ramp_steps = round(args.false_infection_ramp_epochs * steps_per_epoch)

    state_path = work / "last.pt"
    epoch, step_in_epoch, global_step, best, elapsed = 0, 0, 0, -1.0, 0.0
    history: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(args.seed + d.rank)  # augmentation draws per process
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        epoch, step_in_epoch, global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
        if d.is_main:  # the saved draws are rank 0's; the others start afresh
            gen.set_state(st["generator"])
        else:
            gen.manual_seed(args.seed + d.rank + 7919 * global_step)
        best, elapsed = st["best"], st["elapsed"]
        if ema is not None:
            ema.load_state_dict(st["ema"])
        history = json.loads(st["history"])
        print(f"resumed at epoch {epoch + 1}, step {step_in_epoch}/{steps_per_epoch}")
    # Every process must resume from the same state: on several machines --work-dir is shared.
    distributed.check_same("where training resumes (is --work-dir shared?)",
                           (epoch, step_in_epoch, global_step), d)

    def save_state(next_epoch: int, next_step: int) -> None:
        """Everything needed to continue at (next_epoch, next_step); written atomically."""
        tmp = state_path.with_suffix(".tmp")
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": gen.get_state(), "epoch": next_epoch, "step_in_epoch": next_step,
            "global_step": global_step, "best": best, "elapsed": elapsed,
            "history": json.dumps(history),
            **({"ema": ema.state_dict()} if ema is not None else {}),
        }, tmp)
        os.replace(tmp, state_path)

    last_save = time.monotonic()
    while epoch < args.epochs:
        perm = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(train_data))
        model.train()
        for part in frozen:  # batch-norm statistics and dropout stay the init's too
            part.eval()
        bar = tqdm(range(step_in_epoch, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   initial=step_in_epoch, total=steps_per_epoch, mininterval=5,
                   disable=not d.is_main)
        t0 = time.monotonic()
        running: dict[str, float] = {}
        for step_in_epoch in bar:
            idx = perm[step_in_epoch * args.batch_size : (step_in_epoch + 1) * args.batch_size]
            img, masks, labels = to_tensors(train_data, distributed.shard(idx, d))
            loss_fn.false_infection_scale = ramp_fraction(global_step, ramp_steps)
            parts = train_step(trained, optimizer, loss_fn, img, masks, labels, gen, config,
                               lr_at(global_step, total_steps, args.lr, warmup), bf16,
                               not args.no_channels_last, augment_fn=augment_fn)
            if ema is not None:
                ema.update_parameters(model)
            global_step += 1
            for k, v in parts.items():
                running[k] = 0.9 * running.get(k, v) + 0.1 * v
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            if d.is_main and time.monotonic() - last_save > args.save_every_min * 60:
                elapsed += time.monotonic() - t0
                t0 = time.monotonic()
                save_state(epoch, step_in_epoch + 1)
                last_save = time.monotonic()
            if args.max_steps and global_step >= args.max_steps:
                break
        elapsed += time.monotonic() - t0
        # The EMA of the weights is what is validated and shipped when it is on.
        chosen: InfMapNet = ema.module if ema is not None else model  # type: ignore[assignment]
        distributed.check_in_sync(model, d)
        if not d.is_main:  # rank 0 validates and writes; the others wait for it
            distributed.barrier(d)
            epoch, step_in_epoch = epoch + 1, 0
            if args.max_steps and global_step >= args.max_steps:
                break
            continue
        metrics = validate(chosen, val_data, bf16)
        metrics.update(epoch=epoch + 1, elapsed_min=round(elapsed / 60, 2), **running)
        history.append(metrics)
        print(json.dumps(metrics))
        if metrics["score"] > best:
            best = metrics["score"]
            save_checkpoint(chosen, args.out, half=True, meta={
                "version": args.version,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "training_data": DATASET_NOTE,
                "training": {"epoch": epoch + 1, "epochs": args.epochs, "seed": args.seed,
                             "batch_size": args.batch_size, "lr": args.lr, "bf16": bf16,
                             "init": init_note, "augment": args.augment, "ema": args.ema,
                             "head_pooling": args.head_pooling, "processes": d.world_size,
                             "frozen": args.freeze,
                             **loss_fn.loss_options(),
                             "false_infection_ramp_epochs": args.false_infection_ramp_epochs,
                             "train_minutes": round(elapsed / 60, 2),
                             "train_images": len(train_data)},
                "metrics": {"val": {k: metrics[k] for k in
                                    ("lung_dice", "infection_dice_covid", "accuracy",
                                     "graded_without_lesion")}},
            })
        epoch, step_in_epoch = epoch + 1, 0
        save_state(epoch, 0)
        (work / "history.json").write_text(json.dumps(history, indent=1))
        distributed.barrier(d)
        if args.max_steps and global_step >= args.max_steps:
            break
    return {"best_score": best, "history": history, "config": asdict(config),
            "train_minutes": elapsed / 60}


def main(argv: list[str] | None = None) -> None:
    result = train(parse_args(argv))
    d = distributed.init()  # already joined by train: this only reads who we are
    if d.is_main:
        print(f"done: best Val score {result['best_score']:.4f}, "
              f"{result['train_minutes']:.1f} min of training in {d.world_size} process(es)")
    distributed.finish(d)


if __name__ == "__main__":
    main()
