"""Train the click-refinement network (issue 14.1) on COVID-QU-Ex Train; choose it on Val.

    python -m training.train_click --data ../shared/data/covid-qu-ex --init models/infmap.pt \
        --out models/infmap_click.pt --work-dir runs/click

It starts from the shipped model's weights with the click inputs at zero
(``inference.click_model.with_click_inputs``) and learns from simulated annotators:

- **Start mask**, per sample and mask kind: the shipped model's prediction (60 %), nothing
  (20 %) or the reference grown or shrunk by 2-8 pixels (20 %, an annotator's rough edit).
- **Clicks**: none (25 %: without clicks it must give the ordinary prediction) or a geometric
  number (mean 2.9, at most 12), each at the centre of the largest remaining error as if every
  earlier click had fixed its region (``inference.click_sim.clicks_on``).
- **Iterative** (RITM): in half the batches the network first runs on those inputs, and for every
  kind that had clicks its output becomes the current mask and one more click goes on its largest
  error, so it also learns to continue from its own output, as it does in the app.

The augmentation is Model 2.0's (``training.augment.augment_v2``) applied to the image, the
reference and the start masks together. The loss is the masks' Dice + BCE (the class head is not
trained: the ordinary model classifies). Val: a fixed subset corrected by the simulated annotator
(``training.click_eval``), 5 clicks from the prediction, stopping at Dice 0.95; the epoch with
the best mean Dice after 1-5 clicks (lungs and COVID-19 infection alike) is written to
``--out``. Resumable as
``training.train``: state in ``--work-dir/last.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

import settings
from inference.click_model import KINDS, encode_guidance, with_click_inputs
from inference.click_refine import Click
from inference.click_sim import clicks_on, largest_error
from inference.model import CLASS_NAMES, InfMapNet, LoadedModel, load_checkpoint, save_checkpoint
from training.augment import augment_v2
from training.click_eval import simulate_clicks
from training.data import SplitArrays, load_split
from training.evaluate import predict_arrays
from training.loop import NATIVE_BF16, lr_at, normalise
from training.losses import MultiTaskLoss

DATASET_NOTE = "COVID-QU-Ex Infection Segmentation Data, Train split (CC BY-SA 4.0)"
VAL_CLICKS = 5
VAL_STOP = 0.95  # the Val annotator stops here (at 0.90 most lungs would need no click)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=settings.cli_path_str, required=True)
    p.add_argument("--init", type=settings.cli_path_str, default=str(settings.SHIPPED_CHECKPOINT),
                   help="the ordinary model to start from (and whose predictions start masks)")
    p.add_argument("--out", type=settings.cli_path_str, default="models/infmap_click.pt")
    p.add_argument("--work-dir", type=settings.cli_path_str, default="runs/click")
    p.add_argument("--cache-dir", type=settings.cli_path_str, default=".cache/covid-qu-ex")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-images", type=int, default=160)
    p.add_argument("--limit", type=int, default=0, help="use only N train images (tests)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (tests)")
    p.add_argument("--save-every-min", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--version", default="click-1.0.0")
    return p.parse_args(argv)


def start_masks(truth: np.ndarray, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask a simulated annotator starts from (see the module docstring)."""
    u = rng.random()
    if u < 0.6:
        return base.copy()
    if u < 0.8:
        return np.zeros_like(truth)
    r = int(rng.integers(2, 9))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    op = cv2.dilate if rng.random() < 0.5 else cv2.erode
    return op(truth.astype(np.uint8), kernel).astype(bool)


def click_count(rng: np.random.Generator) -> int:
    return 0 if rng.random() < 0.25 else int(min(rng.geometric(0.35), 12))


def guidance_of(clicks: list[dict[str, list[Click]]], current: np.ndarray) -> torch.Tensor:
    """(B, 6, S, S) from per-sample clicks and current masks (B, 2, S, S) bool."""
    size = current.shape[-2:]
    return torch.from_numpy(np.stack([
        encode_guidance(c, {k: current[i, j] for j, k in enumerate(KINDS)}, size)
        for i, c in enumerate(clicks)]))


def make_batch(
    model: InfMapNet, img: torch.Tensor, truth: torch.Tensor, base: torch.Tensor,
    rng: np.random.Generator, bf16: bool, iterate: bool,
) -> torch.Tensor:
    """The network input (B, 7, S, S) for augmented images, references and base predictions."""
    t = truth.numpy() > 0.5
    b = base.numpy() > 0.5
    n = len(t)
    current = np.zeros_like(t)
    clicks: list[dict[str, list[Click]]] = [{} for _ in range(n)]
    for i in range(n):
        for j, kind in enumerate(KINDS):
            current[i, j] = start_masks(t[i, j], b[i, j], rng)
            clicks[i][kind] = clicks_on(current[i, j], t[i, j], click_count(rng))
    x_img = normalise(img, model.config)
    if iterate:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            was = model.training
            model.eval()
            out, _ = model(torch.cat([x_img, guidance_of(clicks, current)], 1))
            model.train(was)
        out_masks = out.float().numpy() > 0
        for i in range(n):
            for j, kind in enumerate(KINDS):
                if not clicks[i][kind]:
                    continue  # the app leaves a kind without clicks as it is
                current[i, j] = out_masks[i, j] & (current[i, 0] if j == 1 else True)
                found = largest_error(current[i, j], t[i, j])
                if found is not None:
                    clicks[i][kind].append(found[0])
    return torch.cat([x_img, guidance_of(clicks, current)], 1)


class BaseMasks(NamedTuple):
    """The ordinary model's masks for a split, bool (N, S, S)."""

    lungs: np.ndarray
    infections: np.ndarray


def validation_set(
    data: SplitArrays, base: BaseMasks, count: int, seed: int,
) -> dict[str, np.ndarray]:
    idx = np.sort(np.random.default_rng(seed + 17).permutation(len(data))[:count])
    return {"idx": idx, "base_lungs": base.lungs[idx], "base_infections": base.infections[idx]}


def validate(model: InfMapNet, data: SplitArrays, val: dict[str, np.ndarray],
             bf16: bool) -> dict[str, float]:
    """Mean Dice after 0..VAL_CLICKS clicks from the prediction, lungs (all images) and
    infection (COVID-19 images with infection; inside the reference lungs)."""
    idx = val["idx"]
    images, lungs = data.images[idx], data.lungs[idx] > 0
    infs = data.infections[idx] > 0
    model.eval()
    lung_run = simulate_clicks(model, images, lungs, val["base_lungs"], val["base_infections"],
                               "lung", VAL_CLICKS, stop_at=VAL_STOP, bf16=bf16)
    covid = (data.labels[idx] == CLASS_NAMES.index("COVID-19")) & infs.any((1, 2))
    inf_run = simulate_clicks(model, images[covid], infs[covid], val["base_infections"][covid],
                              lungs[covid], "infection", VAL_CLICKS, within=lungs[covid],
                              stop_at=VAL_STOP, bf16=bf16)
    model.train()
    out: dict[str, float] = {}
    for name, run in (("lung", lung_run), ("infection", inf_run)):
        for k in range(VAL_CLICKS + 1):
            out[f"{name}_dice@{k}"] = float(run.dices[:, k].mean())
    out["score"] = float(np.mean([out[f"{name}_dice@{k}"] for name in ("lung", "infection")
                                  for k in range(1, VAL_CLICKS + 1)]))
    return out


def base_predictions(
    init: LoadedModel, data: SplitArrays, work: Path, split: str, bf16: bool,
) -> BaseMasks:
    """The ordinary model's masks for a split (cached: one forward pass over it)."""
    cache = work / f"base_{split}_{(init.sha256 or 'unsaved')[:12]}_{len(data)}.npz"
    if cache.is_file():
        z = np.load(cache)
        return BaseMasks(z["lungs"], z["infections"])
    preds = predict_arrays(init, data, batch_size=32, bf16=bf16, progress=True)
    np.savez_compressed(cache, lungs=preds.lungs, infections=preds.infections)
    return BaseMasks(preds.lungs, preds.infections)


def train(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bf16 = NATIVE_BF16
    init = load_checkpoint(args.init)
    size = init.config.input_size
    train_data = load_split(args.data, "Train", size, args.cache_dir)
    val_data = load_split(args.data, "Val", size, args.cache_dir)
    if args.limit:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(train_data))[: args.limit])
        train_data = train_data.subset(keep)
    base_train = base_predictions(init, train_data, work, "Train", bf16)
    base_val = base_predictions(init, val_data, work, "Val", bf16)
    val = validation_set(val_data, base_val, args.val_images, args.seed)

    model = with_click_inputs(init.model).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = MultiTaskLoss(class_weight=0.0)
    steps_per_epoch = max(1, len(train_data) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = min(100, max(1, total_steps // 20))
    state_path = work / "last.pt"
    epoch, step_in_epoch, global_step, best, elapsed = 0, 0, 0, -1.0, 0.0
    history: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(args.seed)
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        epoch, step_in_epoch, global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
        best, elapsed = st["best"], st["elapsed"]
        history = json.loads(st["history"])
        print(f"resumed at epoch {epoch + 1}, step {step_in_epoch}/{steps_per_epoch}")
    else:
        before = validate(model, val_data, val, bf16)  # the ordinary model: clicks ignored
        history.append({"epoch": 0, **before})
        print(json.dumps(history[-1]), flush=True)

    def save_state(next_epoch: int, next_step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(), "epoch": next_epoch,
                    "step_in_epoch": next_step, "global_step": global_step, "best": best,
                    "elapsed": elapsed, "history": json.dumps(history)}, tmp)
        os.replace(tmp, state_path)

    last_save = time.monotonic()
    while epoch < args.epochs:
        perm = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(train_data))
        bar = tqdm(range(step_in_epoch, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   initial=step_in_epoch, total=steps_per_epoch, mininterval=10)
        t0 = time.monotonic()
        running: dict[str, float] = {}
        for step_in_epoch in bar:
            idx = perm[step_in_epoch * args.batch_size : (step_in_epoch + 1) * args.batch_size]
            # Clicks depend on the step only, so a resumed run places the same ones.
            rng = np.random.default_rng([args.seed, global_step])
            img = torch.from_numpy(train_data.images[idx]).float().div_(255.0).unsqueeze(1)
            masks = torch.from_numpy(np.stack([
                train_data.lungs[idx], train_data.infections[idx],
                base_train.lungs[idx], base_train.infections[idx]], 1)).float()
            img, masks = augment_v2(img, masks, gen)
            x = make_batch(model, img, masks[:, :2], masks[:, 2:], rng, bf16,
                           iterate=rng.random() < 0.5)
            x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total_steps, args.lr, warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                mask_logits, class_logits = model(x)
            labels = torch.from_numpy(train_data.labels[idx])
            loss, parts = loss_fn(mask_logits, class_logits, masks[:, :2], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            global_step += 1
            for k in ("lung", "infection"):
                running[k] = 0.9 * running.get(k, parts[k]) + 0.1 * parts[k]
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            if time.monotonic() - last_save > args.save_every_min * 60:
                elapsed += time.monotonic() - t0
                t0 = time.monotonic()
                save_state(epoch, step_in_epoch + 1)
                last_save = time.monotonic()
            if args.max_steps and global_step >= args.max_steps:
                break
        elapsed += time.monotonic() - t0
        metrics = validate(model, val_data, val, bf16)
        metrics.update(epoch=epoch + 1, elapsed_min=round(elapsed / 60, 2), **running)
        history.append(metrics)
        print(json.dumps(metrics), flush=True)
        if metrics["score"] > best:
            best = metrics["score"]
            save_checkpoint(model, args.out, half=True, meta={
                "version": args.version,
                "kind": "click-refinement",
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "training_data": DATASET_NOTE,
                "training": {"epoch": epoch + 1, "epochs": args.epochs, "seed": args.seed,
                             "batch_size": args.batch_size, "lr": args.lr, "bf16": bf16,
                             "init": f"{init.version} ({init.sha256})",
                             "train_minutes": round(elapsed / 60, 2),
                             "train_images": len(train_data)},
                "metrics": {"val": {k: v for k, v in metrics.items() if "@" in k},
                            "val_images": len(val["idx"])},
            })
        epoch, step_in_epoch = epoch + 1, 0
        save_state(epoch, 0)
        (work / "history.json").write_text(json.dumps(history, indent=1))
        if args.max_steps and global_step >= args.max_steps:
            break
    return {"best_score": best, "history": history, "train_minutes": elapsed / 60}


def main(argv: list[str] | None = None) -> None:
    result = train(parse_args(argv))
    print(f"done: best Val score {result['best_score']:.4f}, "
          f"{result['train_minutes']:.1f} min of training")


if __name__ == "__main__":
    main()
