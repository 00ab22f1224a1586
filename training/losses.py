"""Multi-task loss: Dice + BCE for each mask, cross-entropy for the class.

Dice is computed pooled over the batch (smp's default), so images with empty infection masks
(all Normal and Non-COVID) still contribute through BCE and the pooled denominator.

A sample labelled ``NO_LABEL`` trains the masks but not the class: a human mask correction
without a reading carries no diagnosis. The class term is the mean over labelled samples only
(0 when a batch has none), so a fully labelled batch (training from scratch) gets the plain
cross-entropy. Likewise ``mask_known`` (per sample; default all) says which samples have mask
targets: a study with only a reading trains the class and not the masks, and the mask terms are
computed over the samples with masks only (0 when a batch has none).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

NO_LABEL = -1  # class label of a sample that has masks but no class (a human mask correction)


class MultiTaskLoss(nn.Module):
    def __init__(self, class_weight: float = 0.5, infection_weight: float = 1.5) -> None:
        super().__init__()
        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.class_weight = class_weight
        self.infection_weight = infection_weight

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
        for ch, name in enumerate(("lung", "infection")):
            logit, target = mask_logits[:, ch : ch + 1], masks[:, ch : ch + 1]
            if len(logit) == 0:  # no sample of the batch has masks
                parts[name] = logit.sum() * 0.0
                continue
            parts[name] = self.dice(logit, target) + F.binary_cross_entropy_with_logits(
                logit, target
            )
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
