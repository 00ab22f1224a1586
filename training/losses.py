"""Multi-task loss: Dice + BCE for each mask, cross-entropy for the class.

Dice is computed pooled over the batch (smp's default), so images with empty infection masks
(all Normal and Non-COVID) still contribute through BCE and the pooled denominator.

A sample labelled ``NO_LABEL`` trains the masks but not the class: a human mask correction
without a reading carries no diagnosis. The class term is the mean over labelled samples only
(0 when a batch has none), so a fully labelled batch (training from scratch) gets the plain
cross-entropy. Likewise ``mask_known`` (per sample; default all) says which samples have mask
targets: a study with only a reading trains the class and not the masks, and the mask terms are
computed over the samples with masks only (0 when a batch has none).

``infection_dice="per_image"`` (recipe 2.1) replaces the infection's pooled Dice by the mean soft
Dice of each image that has a lesion: the target metric is a per-image mean, in which a missed
small lesion scores 0, while a pooled Dice lets the large lesions of a batch outweigh it. Images
without a lesion are still taught "no infection" by the BCE term.

``false_infection_weight`` (recipe 2.2) adds, for the images without a lesion, the soft share
A / (A + s) of predicted infection, A the summed infection probability and s 1% of the image's
lung area (the severity grade's floor): near 0 while the false infection stays well under 1% of
the lungs, 0.5 at 1%, near 1 beyond. Per-image Dice on lesions alone (2.1) drove the model to call
1% or more of the lungs infected on over half the healthy Val images; BCE over all pixels is too
weak a counterweight, since a few hundred false pixels are a tiny share of an image's pixels.
``false_infection_scale`` (set per step by ``training.train --false-infection-ramp-epochs``,
recipe 2.5) multiplies that weight: rising from 0, the term leaves the first epochs to the Dice,
which learns where lesions are, before it starts to prune false infection (in 2.3 the two terms
competed from the first step).
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

NO_LABEL = -1  # class label of a sample that has masks but no class (a human mask correction)
INFECTION_DICE = ("pooled", "per_image")
# recorded per checkpoint, read back
LOSS_OPTIONS = ("infection_weight", "infection_dice", "false_infection_weight")


def per_image_soft_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                             eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the images whose target is not empty (0 when none is)."""
    prob = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1)
    has = tgt.sum(1) > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    prob, tgt = prob[has], tgt[has]
    dice = (2 * (prob * tgt).sum(1) + eps) / (prob.sum(1) + tgt.sum(1) + eps)
    return 1.0 - dice.mean()


FALSE_INFECTION_FLOOR = 0.01  # share of the lungs at which a false infection costs half


def false_infection_loss(logits: torch.Tensor, target: torch.Tensor, lungs: torch.Tensor,
                         floor: float = FALSE_INFECTION_FLOOR) -> torch.Tensor:
    """Mean of A / (A + floor x lung area) over the images whose target is empty, A the summed
    infection probability (0 when every image has a lesion)."""
    prob = torch.sigmoid(logits).flatten(1)
    empty = target.flatten(1).sum(1) == 0
    if not bool(empty.any()):
        return logits.sum() * 0.0
    area = prob[empty].sum(1)
    allowed = (floor * lungs.flatten(1)[empty].sum(1)).clamp(min=1.0)
    return (area / (area + allowed)).mean()


class MultiTaskLoss(nn.Module):
    def __init__(self, class_weight: float = 0.5, infection_weight: float = 1.5,
                 infection_dice: str = "pooled", false_infection_weight: float = 0.0) -> None:
        super().__init__()
        if infection_dice not in INFECTION_DICE:
            raise ValueError(f"infection_dice must be one of {INFECTION_DICE}")
        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.infection_dice = infection_dice
        self.class_weight = class_weight
        self.infection_weight = infection_weight
        self.false_infection_weight = false_infection_weight
        # Not a constructor option: a schedule factor the training loop sets, 1 when fine-tuning.
        self.false_infection_scale = 1.0

    @classmethod
    def as_trained(cls, meta: dict) -> MultiTaskLoss:
        """The loss a checkpoint was trained with (its ``meta["training"]``), so fine-tuning
        goes on the same way; checkpoints from before the option get 1.0's loss."""
        training = meta.get("training", {})
        return cls(**{k: training[k] for k in LOSS_OPTIONS if k in training})

    def loss_options(self) -> dict[str, Any]:
        """The options of this loss as keyword arguments of the constructor (what a checkpoint's
        ``meta["training"]`` records)."""
        return {k: getattr(self, k) for k in LOSS_OPTIONS}

    def forward(
        self,
        mask_logits: torch.Tensor,
        class_logits: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        mask_known: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mask_logits = mask_logits.float()
        if mask_known is not None and not bool(mask_known.all()):
            known = mask_known.bool()
            mask_logits, masks = mask_logits[known], masks[known]
        parts: dict[str, torch.Tensor] = {}
        false_weight = self.false_infection_weight * self.false_infection_scale
        for ch, name in enumerate(("lung", "infection")):
            logit, target = mask_logits[:, ch : ch + 1], masks[:, ch : ch + 1]
            if len(logit) == 0:  # no sample of the batch has masks
                parts[name] = logit.sum() * 0.0
                continue
            dice = (per_image_soft_dice_loss(logit, target)
                    if name == "infection" and self.infection_dice == "per_image"
                    else self.dice(logit, target))
            parts[name] = dice + F.binary_cross_entropy_with_logits(logit, target)
            if name == "infection" and false_weight:
                parts[name] = parts[name] + false_weight * false_infection_loss(
                    logit, target, masks[:, :1])
        labelled = labels != NO_LABEL
        if bool(labelled.all()):
            parts["class"] = F.cross_entropy(class_logits.float(), labels, label_smoothing=0.05)
        elif bool(labelled.any()):
            parts["class"] = F.cross_entropy(
                class_logits.float()[labelled], labels[labelled], label_smoothing=0.05
            )
        else:
            parts["class"] = class_logits.float().sum() * 0.0  # keeps the graph, adds nothing
        total = (
            parts["lung"] + self.infection_weight * parts["infection"]
            + self.class_weight * parts["class"]
        )
        return total, {k: float(v.detach()) for k, v in parts.items()}
