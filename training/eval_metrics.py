"""Evaluation metrics for a split, with a ``DEFINITIONS`` block that says how each is computed.

Pure numpy/sklearn on predictions already made (:class:`SplitPredictions`): no model, no I/O.
Used by ``training.evaluate`` (COVID-QU-Ex Test and external-dev side by side), fine-tuning's gate
and the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from inference.model import CLASS_NAMES
from inference.predict import infection_percentages
from inference.severity import severity
from training.data import SplitArrays
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
    "infection.non_covid_normal.graded_share": (
        "same images: share given a severity grade other than none by the app's rule (either "
        "lung's predicted infected share >= 1%, inference.severity): a healthy X-ray with a "
        "grade. In training's Val score as 1 - this share."
    ),
    "classification.accuracy": (
        "the shipped decision rule (COVID-19 when the temperature-scaled p(COVID-19) >= the "
        "Val-chosen threshold, else the likelier other class; argmax for a checkpoint without "
        "one) vs the folder label."
    ),
    "gradcam_in_lung": (
        "per image, the share of the class activation map's mass (predicted class, ReLU, "
        "upsampled bilinearly) inside the ground-truth lung mask; mean and median over images "
        "that have a lung mask."
    ),
    "domain": (
        "in_domain = out-of-domain score <= the Val 95th percentile. pass_rate = share in "
        "domain; accuracy_in_domain = accuracy over those; others_called_covid_in_domain_share "
        "= share of Non-COVID + Normal images decided COVID-19 AND in domain."
    ),
    "classification.per_class": (
        "precision, recall, F1 and support per class, one-vs-rest on the shipped decision "
        "(sklearn, zero_division=0)."
    ),
    "classification.confusion_matrix": "rows = true class, columns = predicted class, counts.",
    "classification.covid_sensitivity / covid_specificity": (
        "COVID-19 vs rest on the shipped decision: TP/(TP+FN) over COVID-19 images and "
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



@dataclass
class SplitPredictions:
    """Model outputs for a whole split, after the checkpoint's calibrated decisions."""

    probs: np.ndarray  # float64 (N, 3), rows sum to 1, CLASS_NAMES order (temperature-scaled)
    lungs: np.ndarray  # bool (N, H, W)
    infections: np.ndarray  # bool (N, H, W), always inside ``lungs``
    decided: np.ndarray | None = None  # int (N,): the shipped decision rule; None = argmax
    ood_scores: np.ndarray | None = None  # float (N,), None without an OOD reference
    in_domain: np.ndarray | None = None  # bool (N,)
    cams: np.ndarray | None = None  # float (N, h, w): CAM of the predicted class

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1) if self.decided is None else self.decided


def severity_graded(lungs: np.ndarray, infections: np.ndarray) -> np.ndarray:
    """Per image (bool): the app would give it a severity grade other than "none"."""
    out = np.zeros(len(lungs), dtype=bool)
    for i, (lung, inf) in enumerate(zip(lungs, infections, strict=True)):
        if inf.any():  # no infection pixel: grade none, no need to split the lungs
            _, left, right = infection_percentages(lung, inf)
            out[i] = severity(left, right).score > 0
    return out


def graded_share(lungs: np.ndarray, infections: np.ndarray) -> float | None:
    """Share of the images given a severity grade (None for no image)."""
    return float(severity_graded(lungs, infections).mean()) if len(lungs) else None


def split_scores(data: SplitArrays, preds: SplitPredictions) -> dict[str, Any]:
    """The few numbers training picks checkpoints by and fine-tuning's gate checks forgetting
    with: per-image mean lung Dice over all images, infection Dice over COVID-19 images (None
    when the split holds none), the accuracy of the decided class, and the share of Non-COVID
    and Normal images given a severity grade (None when the split holds none)."""
    covid = data.labels == COVID
    lung = dice_iou_per_image(preds.lungs, data.lungs > 0)[0]
    infection = None
    if covid.any():  # a small seeded subset may hold no COVID-19 image
        inf = dice_iou_per_image(preds.infections[covid], data.infections[covid] > 0)[0]
        infection = float(inf.mean())
    return {
        "lung_dice": float(lung.mean()),
        "infection_dice_covid": infection,
        "accuracy": float((preds.predicted == data.labels).mean()),
        "graded_without_lesion": graded_share(preds.lungs[~covid], preds.infections[~covid]),
    }


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


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, pred: np.ndarray | None = None
) -> dict[str, Any]:
    """``pred``: the decisions to score (the shipped rule); None = argmax of ``probs``."""
    k = len(CLASS_NAMES)
    pred = probs.argmax(1) if pred is None else np.asarray(pred)
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


def cam_in_lung_share(cams: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Per image: the share of the (non-negative) CAM's mass inside the lung mask, the CAM
    bilinearly upsampled to the mask grid. An all-zero CAM counts as 1 (no evidence outside)."""
    out = np.empty(len(cams))
    h, w = lungs.shape[1:]
    for i, cam in enumerate(cams):
        big = np.clip(cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR),
                      0, None)
        total = float(big.sum())
        out[i] = float(big[lungs[i]].sum()) / total if total > 0 else 1.0
    return out


def domain_metrics(labels: np.ndarray, preds: SplitPredictions) -> dict[str, Any] | None:
    """What the out-of-domain flag does here: pass rate, accuracy on what passes, and how many
    Non-COVID/Normal images are called COVID-19 while flagged in domain."""
    if preds.in_domain is None or preds.ood_scores is None:
        return None
    ok = preds.in_domain
    correct = preds.predicted == labels
    rest = labels != COVID
    return {
        "pass_rate": float(ok.mean()),
        "accuracy_all": float(correct.mean()),
        "accuracy_in_domain": float(correct[ok].mean()) if ok.any() else None,
        "ood_score_median": float(np.median(preds.ood_scores)),
        "others_called_covid_in_domain_share": (
            float(((preds.predicted == COVID) & ok)[rest].mean()) if rest.any() else None),
        "others_called_covid_share": (
            float((preds.predicted == COVID)[rest].mean()) if rest.any() else None),
    }


def compute_metrics(
    data: SplitArrays,
    preds: SplitPredictions,
    has_lung_mask: np.ndarray | None = None,
    infection_masks: bool = True,
) -> dict[str, Any]:
    """All metrics for predictions on ``data`` (no I/O). See ``DEFINITIONS``.

    ``has_lung_mask``: lung metrics and the CAM-in-lung share only over these images (external
    sets where some images have no mask); ``infection_masks=False``: the set has no infection
    annotation, so infection Dice is not reported (null).
    """
    labels = np.asarray(data.labels)
    gt_lung, gt_inf = data.lungs > 0, data.infections > 0
    covid = labels == COVID
    rest = ~covid
    lung_px = preds.lungs[rest].reshape(int(rest.sum()), -1).sum(1)
    inf_px = preds.infections[rest].reshape(int(rest.sum()), -1).sum(1)
    with_mask = np.ones(len(labels), bool) if has_lung_mask is None else has_lung_mask
    lungs = _seg_metrics(preds.lungs[with_mask], gt_lung[with_mask])
    lungs["by_class_dice_mean"] = {
        name: (float(dice_iou_per_image(preds.lungs[sel], gt_lung[sel])[0].mean())
               if sel.any() else None)
        for c, name in enumerate(CLASS_NAMES)
        for sel in [(labels == c) & with_mask]
    }
    cam_share = None
    if preds.cams is not None and with_mask.any():
        shares = cam_in_lung_share(preds.cams[with_mask], gt_lung[with_mask])
        cam_share = {"mean": float(shares.mean()), "median": float(np.median(shares)),
                     "n_images": int(with_mask.sum())}
    return {
        "n_images": len(data),
        "counts": {name: int((labels == c).sum()) for c, name in enumerate(CLASS_NAMES)},
        "lungs": lungs,
        "infection": {
            "covid": (_seg_metrics(preds.infections[covid], gt_inf[covid]) if infection_masks
                      else None),
            "non_covid_normal": {
                "n_images": int(rest.sum()),
                "empty_share": float((inf_px == 0).mean()) if rest.any() else None,
                "near_empty_share": (
                    float(((inf_px == 0) | (inf_px < NEAR_EMPTY_FRACTION * lung_px)).mean())
                    if rest.any() else None
                ),
                "near_empty_tolerance": NEAR_EMPTY_FRACTION,
                "graded_share": graded_share(preds.lungs[rest], preds.infections[rest]),
                "mean_predicted_infection_percent": (
                    float((100 * inf_px / np.maximum(lung_px, 1)).mean()) if rest.any() else None
                ),
            },
        },
        "classification": classification_metrics(preds.probs, labels, preds.predicted),
        "gradcam_in_lung": cam_share,
        "domain": domain_metrics(labels, preds),
        "definitions": DEFINITIONS,
    }




def risk_coverage(correct: np.ndarray, order_key: np.ndarray) -> dict[str, Any]:
    """Accuracy on the ``k`` images kept, for every ``k``, keeping the lowest ``order_key``
    first (the most in-domain, or the most confident when negated)."""
    order = np.argsort(order_key, kind="stable")
    kept = np.cumsum(correct[order].astype(float))
    n = np.arange(1, len(order) + 1)
    return {"coverage": (n / len(order)).tolist(), "accuracy": (kept / n).tolist()}


def curves(
    data: SplitArrays,
    preds: SplitPredictions,
    has_lung_mask: np.ndarray | None = None,
    infection_masks: bool = True,
) -> dict[str, Any]:
    """The data behind the figures (no I/O): one-vs-rest ROC points per class, per-image lung
    Dice (images with a lung mask) and infection Dice (COVID-19 images, when annotated), and
    risk-coverage curves ordered by the out-of-domain score (when there is one) and by the
    top-class confidence."""
    labels = np.asarray(data.labels)
    roc: dict[str, Any] = {}
    for c, name in enumerate(CLASS_NAMES):
        y = labels == c
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, preds.probs[:, c])
            roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        else:
            roc[name] = None
    with_mask = np.ones(len(labels), bool) if has_lung_mask is None else has_lung_mask
    lung_dice = (dice_iou_per_image(preds.lungs[with_mask], data.lungs[with_mask] > 0)[0]
                 if with_mask.any() else np.array([]))
    covid = labels == COVID
    inf_dice = (dice_iou_per_image(preds.infections[covid], data.infections[covid] > 0)[0]
                if infection_masks and covid.any() else None)
    correct = preds.predicted == labels
    by_domain = (None if preds.ood_scores is None
                 else risk_coverage(correct, np.asarray(preds.ood_scores, float)))
    return {
        "roc": roc,
        "lung_dice": lung_dice.tolist(),
        "infection_dice_covid": None if inf_dice is None else inf_dice.tolist(),
        "risk_coverage": {
            "by_ood_score": by_domain,
            "by_confidence": risk_coverage(correct, -preds.probs.max(1)),
        },
    }
