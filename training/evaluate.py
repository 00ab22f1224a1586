"""Evaluate an InfMap checkpoint on one COVID-QU-Ex split (Test is reported once, never tuned on).

    python -m training.evaluate --data ../shared/data/covid-qu-ex --split Test \\
        --checkpoint models/infmap.pt --out runs/eval/test [--limit N] [--batch-size B]

Writes ``<out>/metrics.json`` (numbers plus a ``definitions`` block saying how each is computed),
``<out>/per_image.csv`` and four figures: ``confusion_matrix.png``, ``roc_curves.png``,
``reliability.png``, ``infection_dice_hist.png``.

The model runs directly on the dataset's 256x256 images (the app's letterbox is the identity at
that size), normalised as in training, in eval mode under ``torch.inference_mode``, float32
unless ``--bf16``. Masks are ``sigmoid > 0.5`` and the infection mask is kept inside the
predicted lung mask, as the app does.

For other code (fine-tuning, benchmarks): ``predict_arrays`` returns probabilities and masks for
an in-memory :class:`training.data.SplitArrays`; ``evaluate_arrays`` returns the metrics dict.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from inference.model import CLASS_NAMES, InfMapNet, LoadedModel, ModelConfig, load_checkpoint
from training.data import SPLITS, SplitArrays, list_samples, load_split, read_gray
from training.loop import normalise  # the same function training.train uses
from training.metrics import dice_iou_per_image, expected_calibration_error, pooled_dice_iou

COVID = CLASS_NAMES.index("COVID-19")
ECE_BINS = 15
NEAR_EMPTY_FRACTION = 0.005  # "near empty": fewer infection pixels than 0.5% of the lung pixels
TARGET_SPECIFICITY = 0.95

# Published results on this exact Test split (see the dataset README); their Dice averaging
# is not stated in the same terms as ours, so compare with care.
PUBLISHED_ANCHORS = {
    "lung_dice": {"value": 0.9799, "source": "Tahir et al. 2021, Comput Biol Med 139:105002"},
    "infection_dice": {"value": 0.8821, "source": "Tahir et al. 2021, Comput Biol Med 139:105002"},
    "accuracy_3class": {"value": 0.83, "source": "3-class Xception baseline, same 1,166 images"},
}

DEFINITIONS = {
    "dice_mean / iou_mean": (
        "per-image Dice = 2|P∩G|/(|P|+|G|) and IoU = |P∩G|/|P∪G|, then the mean over images. "
        "An image where prediction and ground truth are both empty scores 1; exactly one empty "
        "scores 0."
    ),
    "dice_pooled / iou_pooled": (
        "|P∩G|, |P| and |G| summed over all images of the group first, then the same ratios "
        "(large lungs/lesions weigh more; empty images add nothing)."
    ),
    "masks": (
        "sigmoid(logit) > threshold (0.5) on the model's 256x256 output; the infection mask is "
        "ANDed with the predicted lung mask, as in the app."
    ),
    "lungs": "lung mask metrics over all images of the split (every image has lungs).",
    "infection.covid": "infection mask metrics over COVID-19 images only (the annotated class).",
    "infection.non_covid_normal.empty_share": (
        "share of Non-COVID and Normal images (ground truth infection mask empty) whose predicted "
        "infection mask has no pixel at all."
    ),
    "infection.non_covid_normal.near_empty_share": (
        "same images: share with predicted infection pixels < 0.5% of the predicted lung pixels "
        "(an image with no predicted lung counts as near empty, its infection mask is empty too)."
    ),
    "classification.accuracy": "argmax of the 3-class softmax vs the folder label.",
    "classification.per_class": (
        "precision, recall, F1 and support per class, one-vs-rest on the argmax decision "
        "(sklearn, zero_division=0)."
    ),
    "classification.confusion_matrix": "rows = true class, columns = predicted class, counts.",
    "classification.covid_sensitivity / covid_specificity": (
        "COVID-19 vs rest on the argmax decision: TP/(TP+FN) over COVID-19 images and "
        "TN/(TN+FP) over Non-COVID + Normal images."
    ),
    "classification.roc_auc": (
        "one-vs-rest ROC AUC of each class's softmax probability; macro = unweighted mean of the "
        "per-class AUCs (null when the split lacks a class)."
    ),
    "classification.ece": (
        "top-label expected calibration error: confidence = max softmax probability, 15 equal-"
        "width bins (lo, hi], sum over bins of (bin share of images) x |accuracy - mean "
        "confidence|."
    ),
    "classification.operating_point_spec95": (
        "the highest threshold-based COVID-19 sensitivity among thresholds t on p(COVID-19) "
        "(positive when p >= t) whose specificity on THIS split is >= 0.95. Descriptive only."
    ),
}


# ----------------------------------------------------------------------------- prediction


@dataclass
class SplitPredictions:
    """Model outputs for a whole split: softmax probabilities and binary masks."""

    probs: np.ndarray  # float64 (N, 3), rows sum to 1, CLASS_NAMES order
    lungs: np.ndarray  # bool (N, H, W)
    infections: np.ndarray  # bool (N, H, W), always inside ``lungs``

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)


def _unwrap(model: InfMapNet | LoadedModel) -> tuple[InfMapNet, ModelConfig]:
    if isinstance(model, LoadedModel):
        return model.model, model.config
    return model, model.config


def predict_arrays(
    model: InfMapNet | LoadedModel,
    data: SplitArrays,
    batch_size: int = 16,
    bf16: bool = False,
    threshold: float = 0.5,
    progress: bool = False,
) -> SplitPredictions:
    """Run the model on every image of ``data`` (images already at ``config.input_size``).

    The model is put in eval mode for the call and given back in the mode it came in.
    """
    net, config = _unwrap(model)
    size = config.input_size
    if data.images.shape[1:] != (size, size):
        raise ValueError(
            f"images are {data.images.shape[1:]}, the model expects {size}x{size}; "
            f"load the split with size={size}"
        )
    n = len(data)
    probs = np.empty((n, len(config.class_names)), np.float64)
    lungs = np.empty((n, size, size), bool)
    infs = np.empty((n, size, size), bool)
    was_training = net.training
    net.eval()
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", mininterval=5)
    try:
        with torch.inference_mode():
            for start in starts:
                stop = min(start + batch_size, n)
                img = torch.from_numpy(data.images[start:stop]).float().div_(255.0).unsqueeze(1)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    mask_logits, class_logits = net(normalise(img, config))
                mask_prob = torch.sigmoid(mask_logits.float())
                lung = (mask_prob[:, 0] > threshold).numpy()
                lungs[start:stop] = lung
                infs[start:stop] = (mask_prob[:, 1] > threshold).numpy() & lung
                probs[start:stop] = torch.softmax(class_logits.float(), 1).double().numpy()
    finally:
        net.train(was_training)
    return SplitPredictions(probs=probs, lungs=lungs, infections=infs)


# ----------------------------------------------------------------------------- metrics


def _seg_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    if len(pred) == 0:
        return {"n_images": 0, "dice_mean": None, "iou_mean": None,
                "dice_pooled": None, "iou_pooled": None}
    dice, iou = dice_iou_per_image(pred, gt)
    pd, pi = pooled_dice_iou(pred, gt)
    return {"n_images": int(len(pred)), "dice_mean": float(dice.mean()),
            "iou_mean": float(iou.mean()), "dice_pooled": pd, "iou_pooled": pi}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per-bin count, mean confidence and accuracy of the top label (same bins as the ECE)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    count, mean_conf, acc = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        count.append(int(m.sum()))
        mean_conf.append(float(conf[m].mean()) if m.any() else None)
        acc.append(float(correct[m].mean()) if m.any() else None)
    return {"edges": edges.tolist(), "count": count, "confidence": mean_conf, "accuracy": acc}


def operating_point(
    scores: np.ndarray, positive: np.ndarray, min_specificity: float = TARGET_SPECIFICITY
) -> dict[str, Any]:
    """Best sensitivity among thresholds whose specificity is >= ``min_specificity``."""
    if positive.all() or not positive.any():
        return {"threshold": None, "sensitivity": None, "specificity": None,
                "target_specificity": min_specificity}
    fpr, tpr, thr = roc_curve(positive, scores, drop_intermediate=False)
    ok = (1 - fpr) >= min_specificity - 1e-12  # fpr[0] == 0 (threshold +inf) is always ok
    i = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    t = float(thr[i])
    return {"threshold": t if math.isfinite(t) else None, "sensitivity": float(tpr[i]),
            "specificity": float(1 - fpr[i]), "target_specificity": min_specificity}


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    k = len(CLASS_NAMES)
    pred = probs.argmax(1)
    prec, rec, f1, sup = precision_recall_fscore_support(
        labels, pred, labels=list(range(k)), zero_division=0
    )
    is_covid, pred_covid = labels == COVID, pred == COVID
    n_pos, n_neg = int(is_covid.sum()), int((~is_covid).sum())
    auc: dict[str, float | None] = {}
    for c, name in enumerate(CLASS_NAMES):
        y = labels == c
        auc[name] = float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else None
    present = [v for v in auc.values() if v is not None]
    auc["macro"] = float(np.mean(present)) if len(present) == k else None
    return {
        "accuracy": float((pred == labels).mean()),
        "per_class": {
            name: {"precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]),
                   "support": int(sup[c])}
            for c, name in enumerate(CLASS_NAMES)
        },
        "macro_f1": float(np.mean(f1)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
        "confusion_matrix_axes": {"rows": "true", "columns": "predicted",
                                  "order": list(CLASS_NAMES)},
        "covid_sensitivity": float((pred_covid & is_covid).sum() / n_pos) if n_pos else None,
        "covid_specificity": float((~pred_covid & ~is_covid).sum() / n_neg) if n_neg else None,
        "roc_auc": auc,
        "ece": expected_calibration_error(probs, labels, ECE_BINS),
        "ece_bins": ECE_BINS,
        "reliability": reliability_bins(probs, labels, ECE_BINS),
        "operating_point_spec95": operating_point(probs[:, COVID], is_covid),
    }


def compute_metrics(data: SplitArrays, preds: SplitPredictions) -> dict[str, Any]:
    """All metrics for predictions on ``data`` (no I/O). See ``DEFINITIONS``."""
    labels = np.asarray(data.labels)
    gt_lung, gt_inf = data.lungs > 0, data.infections > 0
    covid = labels == COVID
    rest = ~covid
    lung_px = preds.lungs[rest].reshape(int(rest.sum()), -1).sum(1)
    inf_px = preds.infections[rest].reshape(int(rest.sum()), -1).sum(1)
    lungs = _seg_metrics(preds.lungs, gt_lung)
    lungs["by_class_dice_mean"] = {
        name: (float(dice_iou_per_image(preds.lungs[labels == c], gt_lung[labels == c])[0].mean())
               if (labels == c).any() else None)
        for c, name in enumerate(CLASS_NAMES)
    }
    return {
        "n_images": len(data),
        "counts": {name: int((labels == c).sum()) for c, name in enumerate(CLASS_NAMES)},
        "lungs": lungs,
        "infection": {
            "covid": _seg_metrics(preds.infections[covid], gt_inf[covid]),
            "non_covid_normal": {
                "n_images": int(rest.sum()),
                "empty_share": float((inf_px == 0).mean()) if rest.any() else None,
                "near_empty_share": (
                    float(((inf_px == 0) | (inf_px < NEAR_EMPTY_FRACTION * lung_px)).mean())
                    if rest.any() else None
                ),
                "near_empty_tolerance": NEAR_EMPTY_FRACTION,
                "mean_predicted_infection_percent": (
                    float((100 * inf_px / np.maximum(lung_px, 1)).mean()) if rest.any() else None
                ),
            },
        },
        "classification": classification_metrics(preds.probs, labels),
        "definitions": DEFINITIONS,
    }


def evaluate_arrays(
    model: InfMapNet | LoadedModel,
    split_arrays: SplitArrays,
    batch_size: int = 16,
    bf16: bool = False,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Predict on an in-memory split and return the metrics dict (same keys as metrics.json
    minus the run information: split, checkpoint, settings, notes)."""
    preds = predict_arrays(model, split_arrays, batch_size=batch_size, bf16=bf16,
                           threshold=threshold)
    return compute_metrics(split_arrays, preds)


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


# ----------------------------------------------------------------------------- outputs


def write_plots(
    out: Path, data: SplitArrays, preds: SplitPredictions, metrics: dict[str, Any], title: str
) -> list[str]:
    """The four figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(data.labels)
    cls = metrics["classification"]
    names = list(CLASS_NAMES)
    written = []

    # Confusion matrix (counts, row-normalised colour).
    cm = np.array(cls["confusion_matrix"])
    row = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(row, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{cm[i, j]}\n{row[i, j]:.0%}", ha="center", va="center",
                    color="white" if row[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({title})\naccuracy {cls['accuracy']:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=120)
    plt.close(fig)
    written.append("confusion_matrix.png")

    # ROC curves one-vs-rest, with the descriptive spec>=0.95 point on the COVID-19 curve.
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(names):
        y = labels == c
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, preds.probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {cls['roc_auc'][name]:.3f})")
    op = cls["operating_point_spec95"]
    if op["sensitivity"] is not None:
        ax.plot(1 - op["specificity"], op["sensitivity"], "ko", ms=5,
                label=f"COVID-19 at spec>={op['target_specificity']:.2f}: "
                      f"sens {op['sensitivity']:.3f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC one-vs-rest ({title})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "roc_curves.png", dpi=120)
    plt.close(fig)
    written.append("roc_curves.png")

    # Reliability diagram (top label, same bins as the ECE).
    rel = cls["reliability"]
    edges = np.array(rel["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    acc = np.array([np.nan if a is None else a for a in rel["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in rel["confidence"]])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres, np.nan_to_num(acc), width=width * 0.95, color="tab:blue", label="accuracy")
    ax.bar(centres, np.nan_to_num(conf), width=width * 0.95, fill=False, edgecolor="tab:red",
           label="mean confidence")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Reliability, top label ({title})\nECE ({cls['ece_bins']} bins) "
                 f"{cls['ece']:.3f}", fontsize=10)
    ax2.bar(centres, rel["count"], width=width * 0.95, color="grey")
    ax2.set_xlabel("confidence (max softmax probability)")
    ax2.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)
    written.append("reliability.png")

    # Per-image infection Dice on COVID-19 images.
    covid = labels == COVID
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if covid.any():
        dice = dice_iou_per_image(preds.infections[covid], data.infections[covid] > 0)[0]
        ax.hist(dice, bins=np.linspace(0, 1, 21), color="tab:orange", edgecolor="white")
        ax.axvline(dice.mean(), color="black", ls="--", lw=1,
                   label=f"mean {dice.mean():.3f} (n={covid.sum()})")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("per-image infection Dice")
    ax.set_ylabel("COVID-19 images")
    ax.set_title(f"Infection Dice, COVID-19 images ({title})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "infection_dice_hist.png", dpi=120)
    plt.close(fig)
    written.append("infection_dice_hist.png")
    return written


def write_per_image(path: Path, data: SplitArrays, preds: SplitPredictions) -> None:
    labels = np.asarray(data.labels)
    gl, gi = data.lungs > 0, data.infections > 0
    ld = dice_iou_per_image(preds.lungs, gl)[0]
    idice = dice_iou_per_image(preds.infections, gi)[0]
    lung_px = preds.lungs.reshape(len(data), -1).sum(1)
    inf_px = preds.infections.reshape(len(data), -1).sum(1)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "true", "predicted", *[f"p_{n}" for n in CLASS_NAMES],
                    "lung_dice", "infection_dice", "predicted_infection_percent"])
        for i in range(len(data)):
            w.writerow([data.names[i], CLASS_NAMES[labels[i]], CLASS_NAMES[preds.predicted[i]],
                        *[f"{p:.5f}" for p in preds.probs[i]], f"{ld[i]:.5f}", f"{idice[i]:.5f}",
                        f"{100 * inf_px[i] / max(int(lung_px[i]), 1):.3f}"])


def _json_safe(x: Any) -> Any:
    """NaN/inf -> null so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def summary_table(m: dict[str, Any]) -> str:
    lung, inf = m["lungs"], m["infection"]["covid"]
    rest, cls = m["infection"]["non_covid_normal"], m["classification"]
    op = cls["operating_point_spec95"]
    rows = [
        ("images", " / ".join(f"{k} {v}" for k, v in m["counts"].items())),
        ("lung Dice mean / pooled", f"{_fmt(lung['dice_mean'])} / {_fmt(lung['dice_pooled'])}"),
        ("lung IoU mean / pooled", f"{_fmt(lung['iou_mean'])} / {_fmt(lung['iou_pooled'])}"),
        ("infection Dice mean / pooled (COVID-19)",
         f"{_fmt(inf['dice_mean'])} / {_fmt(inf['dice_pooled'])}"),
        ("infection IoU mean / pooled (COVID-19)",
         f"{_fmt(inf['iou_mean'])} / {_fmt(inf['iou_pooled'])}"),
        ("no infection predicted, empty / <0.5% lung (others)",
         f"{_fmt(rest['empty_share'], True)} / {_fmt(rest['near_empty_share'], True)}"),
        ("accuracy / macro F1", f"{_fmt(cls['accuracy'])} / {_fmt(cls['macro_f1'])}"),
        ("COVID-19 sens / spec (argmax)",
         f"{_fmt(cls['covid_sensitivity'])} / {_fmt(cls['covid_specificity'])}"),
        ("ROC AUC " + " / ".join(CLASS_NAMES) + " / macro",
         " / ".join(_fmt(cls["roc_auc"][k]) for k in [*CLASS_NAMES, "macro"])),
        (f"ECE ({cls['ece_bins']} bins)", _fmt(cls["ece"])),
        ("COVID-19 sens at spec>=0.95 (descriptive)",
         f"{_fmt(op['sensitivity'])} (t={_fmt(op['threshold'])}, spec {_fmt(op['specificity'])})"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="COVID-QU-Ex root folder")
    p.add_argument("--split", default="Test", choices=SPLITS)
    p.add_argument("--checkpoint", required=True, help="InfMap checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output folder for metrics.json and figures")
    p.add_argument("--limit", type=int, default=0,
                   help="only N evenly spaced images of the split (smoke tests)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.5, help="mask threshold on the sigmoid")
    p.add_argument("--bf16", action="store_true", help="CPU bf16 autocast (default: float32)")
    p.add_argument("--cache-dir", default=".cache/covid-qu-ex",
                   help="decoded-array cache for full splits ('' to disable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(args.checkpoint)
    size = loaded.config.input_size
    data = load_eval_split(args.data, args.split, size, args.limit, args.cache_dir or None)

    t0 = time.perf_counter()
    preds = predict_arrays(loaded, data, batch_size=args.batch_size, bf16=args.bf16,
                           threshold=args.threshold, progress=True)
    seconds = time.perf_counter() - t0
    metrics = compute_metrics(data, preds)

    meta = {k: v for k, v in loaded.meta.items() if k != "config"}
    notes = [
        "operating_point_spec95: the threshold on p(COVID-19) was chosen on this split itself to "
        "describe the ROC curve; it is NOT the app's decision rule and was not chosen on Test for "
        "the app (the app uses the argmax). Report it as a descriptive operating point only.",
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
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "timing": {"inference_seconds": round(seconds, 2),
                   "ms_per_image": round(1000 * seconds / max(len(data), 1), 2)},
        **metrics,
        "published_anchors": PUBLISHED_ANCHORS,
        "notes": notes,
    }
    write_per_image(out / "per_image.csv", data, preds)
    result["figures"] = [] if args.no_plots else write_plots(
        out, data, preds, metrics, f"{args.split}, n={len(data)}")
    (out / "metrics.json").write_text(json.dumps(_json_safe(result), indent=1,
                                                 ensure_ascii=False, allow_nan=False))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(f"{args.split}: {result['n_images']} images, checkpoint {result['checkpoint']['version']}"
          f" ({(result['checkpoint']['sha256'] or '')[:12]})")
    print(summary_table(result))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
