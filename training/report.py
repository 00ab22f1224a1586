"""Evaluation outputs: figures, the per-image CSV, strict JSON and the summary table."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from inference.model import CLASS_NAMES
from training.data import SplitArrays
from training.eval_metrics import COVID, SplitPredictions
from training.metrics import dice_iou_per_image


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

    if metrics["infection"]["covid"] is None:  # no infection annotation in this set
        return written
    # Per-image infection Dice on COVID-19 images.
    covid = labels == COVID
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if covid.any():
        dice = dice_iou_per_image(preds.infections[covid], data.infections[covid] > 0)[0]
        ax.hist(dice, bins=np.linspace(0, 1, 21).tolist(), color="tab:orange", edgecolor="white")
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


def per_image_rows(data: SplitArrays, preds: SplitPredictions) -> list[dict[str, Any]]:
    """One row per image: truth, decision, probabilities, Dice, infection %, domain."""
    labels = np.asarray(data.labels)
    gl, gi = data.lungs > 0, data.infections > 0
    ld = dice_iou_per_image(preds.lungs, gl)[0]
    idice = dice_iou_per_image(preds.infections, gi)[0]
    lung_px = preds.lungs.reshape(len(data), -1).sum(1)
    inf_px = preds.infections.reshape(len(data), -1).sum(1)
    rows = []
    for i in range(len(data)):
        rows.append({
            "name": data.names[i],
            "true": CLASS_NAMES[labels[i]],
            "predicted": CLASS_NAMES[preds.predicted[i]],
            **{f"p_{n}": round(float(p), 5) for n, p in zip(CLASS_NAMES, preds.probs[i],
                                                            strict=True)},
            "lung_dice": round(float(ld[i]), 5),
            "infection_dice": round(float(idice[i]), 5),
            "predicted_infection_percent": round(100 * float(inf_px[i]) / max(int(lung_px[i]),
                                                                            1), 3),
            "ood_score": (None if preds.ood_scores is None
                          else round(float(preds.ood_scores[i]), 4)),
            "in_domain": None if preds.in_domain is None else bool(preds.in_domain[i]),
        })
    return rows


def write_per_image(path: Path, rows: list[dict[str, Any]]) -> None:
    """``per_image_rows`` as CSV (empty cells where a value does not exist)."""
    with open(path, "w", newline="") as fh:
        if not rows:
            return
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def json_safe(x: Any) -> Any:
    """NaN/inf -> null so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
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
    lung = m["lungs"]
    inf = m["infection"]["covid"] or dict.fromkeys(("dice_mean", "dice_pooled", "iou_mean",
                                                     "iou_pooled"))
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
        ("given a severity grade (others)", _fmt(rest.get("graded_share"), True)),
        ("accuracy / macro F1", f"{_fmt(cls['accuracy'])} / {_fmt(cls['macro_f1'])}"),
        ("COVID-19 sens / spec (shipped rule)",
         f"{_fmt(cls['covid_sensitivity'])} / {_fmt(cls['covid_specificity'])}"),
        ("ROC AUC " + " / ".join(CLASS_NAMES) + " / macro",
         " / ".join(_fmt(cls["roc_auc"][k]) for k in [*CLASS_NAMES, "macro"])),
        (f"ECE ({cls['ece_bins']} bins)", _fmt(cls["ece"])),
        ("COVID-19 sens at spec>=0.95 (descriptive)",
         f"{_fmt(op['sensitivity'])} (t={_fmt(op['threshold'])}, spec {_fmt(op['specificity'])})"),
    ]
    cam, dom = m.get("gradcam_in_lung"), m.get("domain")
    if cam:
        rows.append(("Grad-CAM mass inside the lungs, mean / median",
                     f"{_fmt(cam['mean'], True)} / {_fmt(cam['median'], True)}"))
    if dom:
        rows.append(("in domain / accuracy in domain / all",
                     f"{_fmt(dom['pass_rate'], True)} / {_fmt(dom['accuracy_in_domain'])} / "
                     f"{_fmt(dom['accuracy_all'])}"))
        rows.append(("others called COVID-19, in domain / all",
                     f"{_fmt(dom['others_called_covid_in_domain_share'], True)} / "
                     f"{_fmt(dom['others_called_covid_share'], True)}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


