"""Random networks for tests that need realistic activations without a trained model."""

from __future__ import annotations

import torch

from inference.model import InfMapNet, ModelConfig, build_model


def calibrated_random_model(config: ModelConfig, seed: int = 0) -> InfMapNet:
    """A random network (eval mode) whose activations neither vanish nor saturate.

    Fresh BatchNorm running stats (mean 0, var 1) make a deep random net's last stage ~1e-8, so
    ReLU and normalisation would act on noise; one train-mode pass with cumulative statistics
    calibrates them like a trained net.
    """
    torch.manual_seed(seed)
    model = build_model(config)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        s = config.input_size
        model(torch.rand(4, 1, s, s) * 4 - 2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()
