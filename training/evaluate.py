"""Evaluate an InfMap checkpoint on one COVID-QU-Ex split (Test is reported once, never tuned on),
with the external-dev set beside it.

    python -m training.evaluate --data ../shared/data/covid-qu-ex --split Test \\
        --external ../shared/data/external-dev \\
        --checkpoint models/infmap.pt --out runs/eval/test [--limit N] [--batch-size B]

Writes ``<out>/metrics.json`` (numbers plus a ``definitions`` block saying how each is computed;
``external_dev`` holds the external set's block), ``per_image.csv``, ``curves.json`` (ROC points,
per-image Dice, risk-coverage: the data behind the app's Evaluation page figures) and the figures
(``confusion_matrix.png``, ``roc_curves.png``, ``reliability.png``, ``infection_dice_hist.png``)
in ``<out>`` and in ``<out>/external-dev``.

The model runs directly on the dataset's 256x256 images (the app's letterbox is the identity at
that size; external images are letterboxed as the app does), normalised as in training, in eval
mode under ``torch.inference_mode``, float32 unless ``--bf16``. The checkpoint's Val-chosen
decisions apply (:mod:`inference.calibration`: temperature, COVID-19 rule, mask thresholds, lung
clean-up, out-of-domain flag), exactly as in ``inference.predict``.

For other code (fine-tuning, benchmarks): ``predict_arrays`` returns probabilities and masks for
an in-memory :class:`training.data.SplitArrays`; ``evaluate_arrays`` returns the metrics dict;
``evaluate_set`` is the whole evaluation of one set (metrics, figure data, per-image rows, with
a progress callback), shared by this CLI and the app's Evaluation page (``services.evaluation``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import settings
from inference.calibration import IDENTITY, Calibration, binarise_masks, decide, in_domain
from inference.calibration import ood_scores as score_ood
from inference.model import InfMapNet, LoadedModel, load_checkpoint
from training.data import SPLITS, SplitArrays, list_samples, load_split, read_gray
from training.eval_metrics import (
    ECE_BINS,
    NEAR_EMPTY_FRACTION,
    PUBLISHED_ANCHORS,
    SplitPredictions,
    compute_metrics,
    curves,
)
from training.external import load_external
from training.outputs import RawOutputs, run_network
from training.report import (
    json_safe,
    per_image_rows,
    summary_table,
    write_per_image,
    write_plots,
)


def decisions(
    raw: RawOutputs, calibration: Calibration, class_names: list[str],
    threshold: float | None = None,
) -> SplitPredictions:
    """Apply a checkpoint's calibrated decisions to raw outputs, as ``inference.predict`` does
    for one image. ``threshold`` overrides both mask thresholds (fine-tuning's fixed 0.5)."""
    if threshold is not None:
        calibration = replace(calibration, lung_threshold=threshold,
                              infection_threshold=threshold)
    assert raw.lung_prob is not None and raw.infection_prob is not None
    probs = torch.softmax(torch.from_numpy(raw.logits).double() / calibration.temperature, 1)
    probs_np = probs.numpy()
    lungs = np.empty(raw.lung_prob.shape, bool)
    infs = np.empty(raw.lung_prob.shape, bool)
    for i in range(len(raw)):
        lungs[i], infs[i] = binarise_masks(raw.lung_prob[i].astype(np.float32),
                                           raw.infection_prob[i].astype(np.float32), calibration)
    scores = score_ood(torch.from_numpy(raw.embedding), calibration)
    return SplitPredictions(
        probs=probs_np, lungs=lungs, infections=infs,
        decided=decide(probs_np, calibration, class_names.index("COVID-19")),
        ood_scores=scores,
        in_domain=(None if scores is None
                   else np.array([bool(in_domain(float(v), calibration)) for v in scores])),
        cams=None if raw.cams is None else raw.cams.astype(np.float32),
    )


def predict_arrays(
    model: InfMapNet | LoadedModel,
    data: SplitArrays,
    batch_size: int = 16,
    bf16: bool = False,
    threshold: float | None = None,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> SplitPredictions:
    """Run the model on every image of ``data`` (images already at ``config.input_size``) and
    apply its checkpoint's decisions (a bare network: plain softmax, argmax, 0.5).
    ``on_batch(done, total)`` reports progress (``training.outputs.run_network``)."""
    raw = run_network(model, data.images, batch_size=batch_size, bf16=bf16, progress=progress,
                      on_batch=on_batch)
    calibration = model.calibration if isinstance(model, LoadedModel) else IDENTITY
    return decisions(raw, calibration, list(model.config.class_names), threshold)


def evaluate_arrays(
    model: InfMapNet | LoadedModel,
    split_arrays: SplitArrays,
    batch_size: int = 16,
    bf16: bool = False,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Predict on an in-memory split and return the metrics dict (same keys as metrics.json
    minus the run information: split, checkpoint, settings, notes)."""
    preds = predict_arrays(model, split_arrays, batch_size=batch_size, bf16=bf16,
                           threshold=threshold)
    return compute_metrics(split_arrays, preds)


@dataclass
class EvalResult:
    """One evaluated set: what ``training.evaluate`` computes, for the CLI and the app alike."""

    metrics: dict[str, Any]  # compute_metrics + "curves" (figure data) + "timing"
    preds: SplitPredictions
    data: SplitArrays
    per_image: list[dict[str, Any]]  # report.per_image_rows


def evaluate_set(
    model: LoadedModel,
    data: SplitArrays,
    has_lung_mask: np.ndarray | None = None,
    infection_masks: bool = True,
    batch_size: int = 16,
    bf16: bool = False,
    threshold: float | None = None,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """The one evaluation path: predict with the checkpoint's decisions, then every metric,
    the figures' data (``eval_metrics.curves``) and the per-image rows."""
    t0 = time.perf_counter()
    preds = predict_arrays(model, data, batch_size=batch_size, bf16=bf16, threshold=threshold,
                           progress=progress, on_batch=on_batch)
    seconds = time.perf_counter() - t0
    metrics = compute_metrics(data, preds, has_lung_mask, infection_masks)
    metrics["curves"] = curves(data, preds, has_lung_mask, infection_masks)
    metrics["timing"] = {"inference_seconds": round(seconds, 2),
                         "ms_per_image": round(1000 * seconds / max(len(data), 1), 2)}
    return EvalResult(metrics, preds, data, per_image_rows(data, preds))


# ----------------------------------------------------------------------------- data


def limited_indices(n: int, limit: int) -> np.ndarray:
    """``limit`` evenly spaced indices of ``n`` (samples are sorted by class, so every class
    keeps about its share); all of them when ``limit`` is 0 or >= n."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def load_eval_split(
    root: str | Path, split: str, size: int, limit: int = 0, cache_dir: str | Path | None = None
) -> SplitArrays:
    """The split in memory; with ``limit`` only those images are decoded (fast, no cache)."""
    if not limit:
        return load_split(root, split, size, cache_dir)
    samples = list_samples(root, split)
    picked = [samples[i] for i in limited_indices(len(samples), limit)]
    return SplitArrays(
        images=np.stack([read_gray(s.image, size) for s in picked]),
        lungs=np.stack([read_gray(s.lung_mask, size) > 127 for s in picked]).astype(np.uint8),
        infections=np.stack([read_gray(s.infection_mask, size) > 127 for s in picked]).astype(
            np.uint8
        ),
        labels=np.array([s.label for s in picked], np.int64),
        names=[s.image.name for s in picked],
    )


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=settings.cli_path_str, required=True,
                   help="COVID-QU-Ex root folder")
    p.add_argument("--split",
                   default="Test", choices=SPLITS)
    p.add_argument("--checkpoint", type=settings.cli_path_str, required=True,
                   help="InfMap checkpoint (.pt)")
    p.add_argument("--out", type=settings.cli_path_str, required=True,
                   help="output folder for metrics.json and figures")
    p.add_argument("--limit", type=int, default=0,
                   help="only N evenly spaced images of the split (smoke tests)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=None,
                   help="override both mask thresholds (default: the checkpoint's Val-chosen)")
    p.add_argument("--bf16", action="store_true", help="CPU bf16 autocast (default: float32)")
    p.add_argument("--cache-dir", type=settings.cli_path_str, default=".cache/covid-qu-ex",
                   help="decoded-array cache for full splits ('' to disable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--external", default="",
                   help="external-dev folder to report beside the split (evaluation only)")
    return p.parse_args(argv)


def _evaluate_one(
    loaded: LoadedModel, data: SplitArrays, args: argparse.Namespace, out: Path, title: str,
    has_lung_mask: np.ndarray | None = None, infection_masks: bool = True,
) -> dict[str, Any]:
    result = evaluate_set(loaded, data, has_lung_mask, infection_masks,
                          batch_size=args.batch_size, bf16=args.bf16, threshold=args.threshold,
                          progress=True)
    metrics = result.metrics
    out.mkdir(parents=True, exist_ok=True)
    write_per_image(out / "per_image.csv", result.per_image)
    (out / "curves.json").write_text(json.dumps(json_safe(metrics.pop("curves")),
                                                allow_nan=False))
    metrics["figures"] = [] if args.no_plots else write_plots(out, data, result.preds, metrics,
                                                              title)
    return metrics


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(args.checkpoint)
    size = loaded.config.input_size
    data = load_eval_split(args.data, args.split, size, args.limit, args.cache_dir or None)
    metrics = _evaluate_one(loaded, data, args, out, f"{args.split}, n={len(data)}")
    timing, figures = metrics.pop("timing"), metrics.pop("figures")

    meta = {k: v for k, v in loaded.meta.items() if k != "config"}
    notes = [
        "operating_point_spec95: the threshold on p(COVID-19) was chosen on this split itself to "
        "describe the ROC curve; it is NOT the app's decision rule and was not chosen on Test for "
        "the app (the app uses the Val-chosen rule in the checkpoint). Descriptive only.",
        "Test is the dataset authors' held-out split: report it once, never tune on it.",
    ]
    if args.limit:
        notes.append(f"--limit {args.limit}: evenly spaced subset of the split, not comparable "
                     "to published results.")
    result: dict[str, Any] = {
        "split": args.split,
        "data": str(args.data),
        "checkpoint": {"path": str(args.checkpoint), "sha256": loaded.sha256,
                       "version": loaded.version, "meta": meta,
                       "config": loaded.meta.get("config")},
        "settings": {"threshold": args.threshold, "bf16": args.bf16, "input_size": size,
                     "batch_size": args.batch_size, "limit": args.limit,
                     "near_empty_tolerance": NEAR_EMPTY_FRACTION, "ece_bins": ECE_BINS,
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "calibration": loaded.calibration.notes or None},
        "timing": timing,
        **metrics,
        "published_anchors": PUBLISHED_ANCHORS,
        "notes": notes,
        "figures": figures,
    }
    if args.external:
        ext = load_external(args.external, size, args.limit)
        ext_metrics = _evaluate_one(
            loaded, ext.arrays, args, out / "external-dev",
            f"external-dev, n={len(ext.arrays)}", ext.has_lung_mask, infection_masks=False)
        ext_metrics["notes"] = [
            "external-dev: evaluation only (nothing trained, calibrated or chosen on it).",
            "Its v7labs lung masks include the retrocardiac lung that COVID-QU-Ex masks leave "
            "out: a lower lung Dice is expected for that reason alone.",
            "roc_auc.COVID-19 here is the within-source AUROC of p(COVID-19) against the rest.",
            "It has no infection masks: infection Dice is not reported.",
        ]
        ext_metrics["data"] = str(args.external)
        result["external_dev"] = ext_metrics
    (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=1,
                                                 ensure_ascii=False, allow_nan=False))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(f"{args.split}: {result['n_images']} images, checkpoint {result['checkpoint']['version']}"
          f" ({(result['checkpoint']['sha256'] or '')[:12]})")
    print(summary_table(result))
    if "external_dev" in result:
        print(f"external-dev: {result['external_dev']['n_images']} images")
        print(summary_table(result["external_dev"]))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
