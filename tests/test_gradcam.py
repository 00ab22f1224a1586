"""The fast Grad-CAM (class activation map from the head's weights) equals hook-based Grad-CAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import calibrated_random_model

from inference.gradcam import cam_from_features, gradcam, gradcam_reference
from inference.model import InfMapNet, ModelConfig
from inference.preprocess import Letterbox

CONFIG = ModelConfig(input_size=256, decoder_channels=[16, 8, 8, 8, 8])  # 8x8 last stage


@pytest.fixture(scope="module")
def model() -> InfMapNet:
    return calibrated_random_model(CONFIG)


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_cam_equals_hook_gradcam(model: InfMapNet, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.rand(1, 1, 256, 256) * 4 - 2
    with torch.inference_mode():
        _, logits, features = model.forward_with_features(x)
    assert features.shape[-2:] == (8, 8)
    assert features.abs().max() > 0.1  # non-trivial activations
    non_trivial = 0
    for c in range(len(CONFIG.class_names)):
        fast = cam_from_features(features, model.classifier_linear.weight, c)
        ref = gradcam_reference(model, x.clone(), c)
        assert fast.shape == ref.shape == (8, 8)
        assert np.abs(fast - ref).max() < 1e-4
        if 0.0 < (fast > 0).mean() < 1.0:  # ReLU left a real, non-constant map
            non_trivial += 1
            assert fast.max() == pytest.approx(1.0)
    assert non_trivial >= 2
    # the reference path leaves no gradients behind
    assert all(p.grad is None for p in model.parameters())


def test_reference_uses_the_same_head_gradient(model: InfMapNet) -> None:
    """d logit_c / d A_k(i,j) is W[c,k]/(h*w) everywhere: the premise of the fast path."""
    x = torch.rand(1, 1, 256, 256) * 4 - 2
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, _i: object, out: list[torch.Tensor]) -> None:
        out[-1].register_hook(lambda g: captured.__setitem__("g", g))

    handle = model.net.encoder.register_forward_hook(hook)
    try:
        _, logits = model(x)
        logits[0, 2].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    w = model.classifier_linear.weight[2].detach()
    expected = (w / 64)[:, None, None].expand(-1, 8, 8)
    torch.testing.assert_close(captured["g"][0], expected, rtol=1e-5, atol=1e-9)


def test_all_zero_cam_stays_zero() -> None:
    features = torch.rand(1, 4, 3, 3)
    weight = -torch.ones(2, 4)  # negative evidence everywhere -> ReLU gives zero
    cam = cam_from_features(features, weight, 0)
    assert cam.shape == (3, 3) and not cam.any()


def test_gradcam_maps_back_to_original_grid(model: InfMapNet) -> None:
    box = Letterbox.fit(300, 200, 256)
    with torch.inference_mode():
        _, _, features = model.forward_with_features(torch.rand(1, 1, 256, 256))
    cam = gradcam(model, features, 0, box)
    assert cam.shape == (300, 200) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
