"""The pieces of a training step shared by ``training.train`` and ``training.finetune``.

One optimisation step is: augment -> normalise -> channels_last -> forward under CPU bf16
autocast (where the CPU has native bf16, see ``NATIVE_BF16``) -> multi-task loss (in float32)
-> backward -> clip -> AdamW step. Keeping it in one
place means the shipped model and every fine-tuned version are trained the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from inference.model import ModelConfig
from training.augment import augment

AugmentFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated: on an AVX2-only
    CPU a training step measured 8.2x slower than float32 + channels_last, where on an AMX CPU it
    is 2x faster (``benchmarks/train_step.py``)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# The default for training and fine-tuning: bf16 autocast only where it is a speed-up.
NATIVE_BF16 = cpu_has_native_bf16()


def normalise(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return (images - config.norm_mean) / config.norm_std


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ramp_fraction(step: int, ramp_steps: int) -> float:
    """Linear rise from 0 at step 0 to 1 at ``ramp_steps`` (1 throughout when ``ramp_steps`` is
    0). A function of the global step, so a resumed run picks the ramp up where it stopped."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, step / ramp_steps)


def ema_decay_at(updates: int, decay: float) -> float:
    """The EMA decay after ``updates`` averaging steps: ``min(decay, (1 + n) / (10 + n))``.

    A fixed decay from the first step keeps the random initial weights in the average for
    thousands of steps (0.998**466 = 0.39 after two epochs here), and a mix of random and trained
    weights predicts nothing: a from-scratch run validated lung Dice 0 for two epochs. With the
    warm-up the average follows the model early and settles to ``decay`` later.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_with_warmup(
    decay: float,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
    """``avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: EMA with :func:`ema_decay_at`."""

    def average(averaged: torch.Tensor, current: torch.Tensor,
                updates: torch.Tensor | int) -> torch.Tensor:
        d = ema_decay_at(int(updates), decay)
        return averaged * d + current * (1.0 - d)

    return average


def train_step(
    model: torch.nn.Module,  # an InfMapNet, or DistributedDataParallel around one
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    img: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    config: ModelConfig,
    lr: float,
    bf16: bool = NATIVE_BF16,
    channels_last: bool = True,
    clip: float = 5.0,
    augment_fn: AugmentFn = augment,
    mask_known: torch.Tensor | None = None,
) -> dict[str, float]:
    """One augmented optimisation step on a batch; returns the loss parts (floats).
    ``mask_known`` (bool per sample, default all): which samples have mask targets."""
    img, masks = augment_fn(img, masks, generator)
    x = normalise(img, config)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mask_logits, class_logits = model(x)
    if mask_known is None:
        loss, parts = loss_fn(mask_logits, class_logits, masks, labels)
    else:
        loss, parts = loss_fn(mask_logits, class_logits, masks, labels, mask_known)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return parts
