"""One X-ray -> masks, class probabilities, per-lung infection share, severity and Grad-CAM.

All maps in :class:`Prediction` are on the ORIGINAL image grid. Left/right are the PATIENT's:
on a standard frontal (PA/AP) display the patient's left lung is on the image's right.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch

from inference.calibration import (
    binarise_masks,
    class_probabilities,
    decide,
    in_domain,
    ood_scores,
)
from inference.gradcam import cam_from_features, upsample_cam
from inference.model import LoadedModel
from inference.onnx_engine import forward_pass
from inference.preprocess import preprocess
from inference.severity import severity as score_severity


class HasPixels(Protocol):
    """What ``predict`` reads of an image: an ``inference.loading.XRay`` or anything with its
    ``.pixels`` (float32 [0, 1], 2-D)."""

    @property
    def pixels(self) -> np.ndarray: ...


@dataclass
class Prediction:
    class_names: list[str]
    probabilities: dict[str, float]  # in class_names order, sums to 1
    predicted_class: str
    lung_mask: np.ndarray  # bool (H, W), original grid
    infection_mask: np.ndarray  # bool (H, W), always inside lung_mask
    lung_probability: np.ndarray  # float32 (H, W)
    infection_probability: np.ndarray  # float32 (H, W)
    infection_percent: float  # infected share of both lungs, 0..100
    infection_percent_left: float  # patient's left lung = image right
    infection_percent_right: float
    severity: str
    severity_score: int
    gradcam: np.ndarray  # float32 (H, W) in [0, 1]
    gradcam_class: str
    model_version: str
    uncertainty: float  # mean binary entropy (bits) of infection prob inside the lungs
    timings_ms: dict[str, float]
    # Distance to the Train images' features (inference.calibration) and whether it is within
    # the 95% of Val; None for a checkpoint without an out-of-domain reference (1.0.0).
    ood_score: float | None = None
    in_domain: bool | None = None


def split_lungs(lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a lung mask into (patient_left, patient_right) bool masks.

    The two largest connected components are the lungs; the one further right in the image is
    the patient's left. Smaller fragments join the lung on their side of the midpoint between the
    two lungs' centroids, so left + right always covers the whole mask. With a single component
    (lungs touching, or one lung missing) the mask is cut at the column midway between its
    leftmost and rightmost pixels.
    """
    mask = np.asarray(lung_mask, dtype=bool)
    left = np.zeros_like(mask)
    right = np.zeros_like(mask)
    if not mask.any():
        return left, right
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if count - 1 >= 2:  # label 0 is the background
        areas = stats[1:, cv2.CC_STAT_AREA]
        a, b = (np.argsort(areas)[::-1][:2] + 1).tolist()
        divide = (centroids[a][0] + centroids[b][0]) / 2.0
        image_right_labels = np.flatnonzero(centroids[:, 0] > divide)
        image_right = np.isin(labels, image_right_labels) & mask
    else:
        cols = np.flatnonzero(mask.any(axis=0))
        divide = (cols[0] + cols[-1]) / 2.0
        image_right = mask & (np.arange(mask.shape[1])[None, :] > divide)
    left[:] = image_right  # image right = patient left
    right[:] = mask & ~image_right
    return left, right


def _percent(infected: np.ndarray, lung: np.ndarray) -> float:
    lung_pixels = int(np.count_nonzero(lung))
    if lung_pixels == 0:
        return 0.0
    return 100.0 * int(np.count_nonzero(infected & lung)) / lung_pixels


def infection_percentages(
    lung_mask: np.ndarray, infection_mask: np.ndarray
) -> tuple[float, float, float]:
    """(both, patient_left, patient_right) infected share of the lung pixels, in percent.

    A lung with no pixels has 0 %. Infection outside the lung mask is ignored.
    """
    lung = np.asarray(lung_mask, dtype=bool)
    infected = np.asarray(infection_mask, dtype=bool) & lung
    left, right = split_lungs(lung)
    return _percent(infected, lung), _percent(infected, left), _percent(infected, right)


def mean_binary_entropy(prob: np.ndarray, where: np.ndarray) -> float:
    """Mean binary entropy in bits of ``prob`` over ``where``; 1.0 (maximal) if ``where`` is empty.

    An image where the model finds no lungs is not a confident one, so it sorts to the top of an
    uncertainty-ordered worklist instead of the bottom.
    """
    p = np.clip(prob[where].astype(np.float64), 1e-7, 1 - 1e-7)
    if p.size == 0:
        return 1.0
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


def _resolve_class(name: str | None, class_names: list[str], default: int) -> int:
    if name is None:
        return default
    if name not in class_names:
        raise ValueError(f"unknown class {name!r}; expected one of {class_names}")
    return class_names.index(name)


def predict(
    xray_or_pixels: HasPixels | np.ndarray, model: LoadedModel, gradcam_class: str | None = None
) -> Prediction:
    """Run the model on an ``XRay`` (its ``.pixels``) or a float32 [0, 1] 2-D array."""
    timings: dict[str, float] = {}
    config = model.config
    net = model.model
    if net.training:  # dropout and batch statistics would make results random
        net.eval()
    param = next(net.parameters())

    t0 = time.perf_counter()
    pixels = (
        xray_or_pixels if isinstance(xray_or_pixels, np.ndarray) else xray_or_pixels.pixels
    )
    x, box = preprocess(pixels, config.input_size, config.norm_mean, config.norm_std)
    tensor = torch.from_numpy(x)[None, None].to(device=param.device, dtype=param.dtype)
    t1 = time.perf_counter()
    timings["preprocess"] = (t1 - t0) * 1000

    calibration = model.calibration
    forward = forward_pass(model)  # torch or ONNX Runtime (INFMAP_ENGINE), same outputs
    with torch.inference_mode():
        out = forward(tensor)
        features = out.head_map
        seg_prob = torch.sigmoid(out.masks[0].float()).cpu().numpy()
        class_prob = class_probabilities(out.logits[0], calibration).cpu().numpy()
        scores = ood_scores(out.embedding, calibration)
    ood_score = None if scores is None else float(scores[0])
    t2 = time.perf_counter()
    timings["model"] = (t2 - t1) * 1000

    class_names = list(config.class_names)
    predicted = int(decide(class_prob[None], calibration, class_names.index("COVID-19"))[0])
    cam_idx = _resolve_class(gradcam_class, class_names, predicted)
    with torch.inference_mode():
        cam_small = cam_from_features(features, net.classifier_linear.weight, cam_idx)
    cam = upsample_cam(cam_small, box)
    t3 = time.perf_counter()
    timings["gradcam"] = (t3 - t2) * 1000

    lung_idx = list(config.seg_channels).index("lungs")
    inf_idx = list(config.seg_channels).index("infection")
    lung_prob = box.to_original(seg_prob[lung_idx])
    inf_prob = box.to_original(seg_prob[inf_idx])
    lung_mask, infection_mask = binarise_masks(lung_prob, inf_prob, calibration)
    both, left, right = infection_percentages(lung_mask, infection_mask)
    sev = score_severity(left, right)
    # Entropy on the network grid (padding cropped): independent of the input's resolution,
    # so images of different sizes compare fairly on the worklist, and cheap for big DICOMs.
    lung_sq = box.crop(seg_prob[lung_idx]) > calibration.lung_threshold
    uncertainty = mean_binary_entropy(box.crop(seg_prob[inf_idx]), lung_sq)
    probabilities = {name: float(p) for name, p in zip(class_names, class_prob, strict=True)}
    t4 = time.perf_counter()
    timings["postprocess"] = (t4 - t3) * 1000

    return Prediction(
        class_names=class_names,
        probabilities=probabilities,
        predicted_class=class_names[predicted],
        lung_mask=lung_mask,
        infection_mask=infection_mask,
        lung_probability=lung_prob,
        infection_probability=inf_prob,
        infection_percent=both,
        infection_percent_left=left,
        infection_percent_right=right,
        severity=sev.grade,
        severity_score=sev.score,
        gradcam=cam,
        gradcam_class=class_names[cam_idx],
        model_version=model.version,
        uncertainty=uncertainty,
        timings_ms=timings,
        ood_score=ood_score,
        in_domain=in_domain(ood_score, calibration),
    )
