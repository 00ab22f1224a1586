"""Grad-CAM on the encoder's last stage, for the classification head.

The head is global-average-pool -> dropout -> linear, so for class ``c``
``logit_c = sum_k W[c, k] * mean_ij A_k[i, j] + b_c`` and
``d logit_c / d A_k[i, j] = W[c, k] / (h*w)`` at every position.
Grad-CAM's channel weights (the spatial mean of those gradients) are therefore ``W[c] / (h*w)``
and Grad-CAM equals the class activation map: no backward pass is needed, the features from the
one forward pass suffice. :func:`gradcam_reference` does the classic hook-based computation and
exists to test that equivalence.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from inference.model import InfMapNet
from inference.preprocess import Letterbox


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by the maximum; all-zero stays zero (no evidence is not "some" evidence).

    Dividing by the max (not min-max) keeps 0 meaning "no positive evidence", which ReLU made.
    """
    peak = cam.max()
    return cam / peak if peak > 0 else torch.zeros_like(cam)


def cam_from_features(
    features: torch.Tensor, weight: torch.Tensor, class_idx: int
) -> np.ndarray:
    """Class activation map at feature resolution, normalised to [0, 1].

    ``features``: (1, K, h, w) or (K, h, w) last encoder stage; ``weight``: (classes, K) of the
    head's linear layer. Returns float32 (h, w).
    """
    feats = features[0] if features.dim() == 4 else features
    h, w = feats.shape[-2:]
    # detach: the head's weights are parameters, but no gradient is wanted here
    channel_weights = weight[class_idx].detach().to(feats.dtype) / (h * w)  # = mean of grads
    cam = torch.relu(torch.einsum("k,khw->hw", channel_weights, feats))
    return _normalise(cam.float()).cpu().numpy().astype(np.float32)


def upsample_cam(cam: np.ndarray, box: Letterbox) -> np.ndarray:
    """Feature-resolution CAM -> network input square -> original image grid, float32 [0, 1]."""
    square = cv2.resize(cam, (box.size, box.size), interpolation=cv2.INTER_LINEAR)
    # Bilinear resizes never overshoot, the clip only guards float rounding.
    return np.clip(box.to_original(square), 0.0, 1.0)


def gradcam(
    model: InfMapNet, features: torch.Tensor, class_idx: int, box: Letterbox
) -> np.ndarray:
    """Grad-CAM for ``class_idx`` on the original grid from ``forward_with_features`` features."""
    with torch.inference_mode():
        cam = cam_from_features(features, model.classifier_linear.weight, class_idx)
    return upsample_cam(cam, box)


def gradcam_reference(model: InfMapNet, x: torch.Tensor, class_idx: int) -> np.ndarray:
    """Classic Grad-CAM with hooks (forward + gradient), at feature resolution, in [0, 1].

    A forward hook on the encoder catches its last stage output and hooks that tensor's gradient;
    the backward pass of ``logit[class_idx]`` fills it. The channel weights are the spatially
    averaged gradients; the map is ReLU of the weighted sum of activations. Slow (needs a
    backward pass); used to verify :func:`cam_from_features`.
    """
    captured: dict[str, torch.Tensor] = {}

    def on_gradient(grad: torch.Tensor) -> None:
        captured["grad"] = grad.detach()

    def on_forward(_module: torch.nn.Module, _inputs: object, output: list[torch.Tensor]) -> None:
        last = output[-1]
        captured["act"] = last.detach()
        last.register_hook(on_gradient)

    was_training = model.training
    model.eval()  # dropout off, BN running stats: the same function predict() explains
    handle = model.net.encoder.register_forward_hook(on_forward)
    try:
        with torch.enable_grad():
            _, logits = model(x)
            model.zero_grad(set_to_none=True)
            logits[0, class_idx].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    act, grad = captured["act"][0], captured["grad"][0]
    weights = grad.mean(dim=(1, 2))
    cam = torch.relu(torch.einsum("k,khw->hw", weights, act))
    return _normalise(cam).cpu().numpy().astype(np.float32)
