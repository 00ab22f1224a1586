"""Recipe 2.1's infection Dice (per image, so a missed small lesion counts as a big one does) and
recipe 2.2's false-infection term on lesion-free images, and recipe 2.5's ramp of that term."""

from __future__ import annotations

import pytest
import torch

from training.loop import ramp_fraction
from training.losses import MultiTaskLoss, false_infection_loss, per_image_soft_dice_loss


def _logits(mask: torch.Tensor) -> torch.Tensor:
    """Near-certain logits for a binary mask."""
    return (mask * 2 - 1) * 20.0


def _big_and_small_lesion() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images: a 40x40 lesion found exactly, and a 4x4 lesion missed entirely."""
    target = torch.zeros(2, 1, 64, 64)
    target[0, :, 10:50, 10:50] = 1
    target[1, :, 30:34, 30:34] = 1
    pred = target.clone()
    pred[1] = 0
    return _logits(pred), target


def test_per_image_dice_counts_a_missed_small_lesion_as_half_the_batch() -> None:
    logits, target = _big_and_small_lesion()
    per_image = float(per_image_soft_dice_loss(logits, target))
    pooled = float(MultiTaskLoss().dice(logits, target))
    assert per_image == pytest.approx(0.5, abs=0.03)  # one image of two scores 0
    assert pooled < 0.02  # the big lesion's pixels hide the miss


def test_per_image_dice_ignores_images_without_a_lesion_and_keeps_the_graph() -> None:
    logits, target = _big_and_small_lesion()
    empty = torch.zeros(1, 1, 64, 64)
    with_empty = per_image_soft_dice_loss(torch.cat([logits, _logits(empty)]),
                                          torch.cat([target, empty]))
    assert float(with_empty) == pytest.approx(float(per_image_soft_dice_loss(logits, target)))
    none = torch.zeros(3, 1, 8, 8, requires_grad=True)
    loss = per_image_soft_dice_loss(none, torch.zeros(3, 1, 8, 8))
    loss.backward()
    assert float(loss.detach()) == 0.0 and none.grad is not None


def test_the_loss_option_is_read_back_from_a_checkpoints_training_meta() -> None:
    loss = MultiTaskLoss.as_trained({"training": {"infection_dice": "per_image",
                                                  "infection_weight": 2.0}})
    assert loss.loss_options() == {"infection_weight": 2.0, "infection_dice": "per_image",
                                   "false_infection_weight": 0.0}
    old = MultiTaskLoss.as_trained({"training": {"epoch": 8}})  # a 1.0/2.0 checkpoint
    assert old.loss_options() == {"infection_weight": 1.5, "infection_dice": "pooled",
                                  "false_infection_weight": 0.0}
    with pytest.raises(ValueError):
        MultiTaskLoss(infection_dice="per_batch")


def test_per_image_infection_dice_changes_the_total_loss_only_through_infection() -> None:
    logits, target = _big_and_small_lesion()
    mask_logits = torch.cat([_logits(torch.ones_like(target)), logits], 1)
    masks = torch.cat([torch.ones_like(target), target], 1)
    class_logits, labels = torch.zeros(2, 3), torch.tensor([0, 0])
    _, pooled = MultiTaskLoss()(mask_logits, class_logits, masks, labels)
    _, per_image = MultiTaskLoss(infection_dice="per_image")(mask_logits, class_logits, masks,
                                                             labels)
    assert per_image["lung"] == pytest.approx(pooled["lung"])
    assert per_image["class"] == pytest.approx(pooled["class"])
    assert per_image["infection"] > pooled["infection"] + 0.4


def _lungs(n: int) -> torch.Tensor:
    lungs = torch.zeros(n, 1, 64, 64)
    lungs[:, :, 8:56, 8:56] = 1  # 2,304 lung pixels: 1% is 23
    return lungs


def test_false_infection_costs_half_at_one_percent_of_the_lungs_and_only_without_a_lesion() -> None:
    empty = torch.zeros(1, 1, 64, 64)
    few = torch.zeros(1, 1, 64, 64)
    few[:, :, 20:23, 20:23] = 1  # 9 pixels, 0.4% of the lungs
    one_percent = torch.zeros(1, 1, 64, 64)
    one_percent.view(-1)[:23] = 1
    lungs = _lungs(1)
    cost = {name: float(false_infection_loss(_logits(pred), empty, lungs))
            for name, pred in (("none", empty), ("few", few), ("one", one_percent))}
    assert cost["none"] < 0.01 and 0.25 < cost["few"] < 0.3
    assert cost["one"] == pytest.approx(0.5, abs=0.01)
    lesion = one_percent.clone()  # the same prediction on an image that has this lesion
    assert float(false_infection_loss(_logits(one_percent), lesion, lungs)) == 0.0


def test_false_infection_weight_adds_to_the_infection_term_only() -> None:
    target = torch.zeros(2, 1, 64, 64)
    target[0, :, 10:30, 10:30] = 1  # a lesion on image 0, none on image 1
    pred = target.clone()
    pred[1, :, 40:50, 40:50] = 1  # 100 false pixels on the lesion-free image
    lungs = _lungs(2)
    mask_logits = torch.cat([_logits(lungs), _logits(pred)], 1)
    masks = torch.cat([lungs, target], 1)
    class_logits, labels = torch.zeros(2, 3), torch.tensor([0, 2])
    _, off = MultiTaskLoss(infection_dice="per_image")(mask_logits, class_logits, masks, labels)
    on_loss = MultiTaskLoss(infection_dice="per_image", false_infection_weight=1.0)
    _, on = on_loss(mask_logits, class_logits, masks, labels)
    assert on["lung"] == pytest.approx(off["lung"]) and on["class"] == pytest.approx(off["class"])
    assert on["infection"] - off["infection"] == pytest.approx(100 / (100 + 23.04), abs=0.01)
    assert on_loss.loss_options()["false_infection_weight"] == 1.0


def test_ramp_fraction_rises_linearly_then_holds_and_is_off_without_a_ramp() -> None:
    assert [ramp_fraction(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert ramp_fraction(0, 0) == 1.0


def test_false_infection_scale_multiplies_the_term_and_is_not_a_recorded_option() -> None:
    target = torch.zeros(2, 1, 64, 64)
    target[0, :, 10:30, 10:30] = 1
    pred = target.clone()
    pred[1, :, 40:50, 40:50] = 1  # false infection on the lesion-free image
    lungs = _lungs(2)
    mask_logits = torch.cat([_logits(lungs), _logits(pred)], 1)
    masks = torch.cat([lungs, target], 1)
    class_logits, labels = torch.zeros(2, 3), torch.tensor([0, 2])
    loss = MultiTaskLoss(infection_dice="per_image", false_infection_weight=1.0)
    term = {}
    for scale in (0.0, 0.5, 1.0):
        loss.false_infection_scale = scale
        term[scale] = loss(mask_logits, class_logits, masks, labels)[1]["infection"]
    assert term[0.5] - term[0.0] == pytest.approx(0.5 * (term[1.0] - term[0.0]))
    assert term[1.0] > term[0.0]
    assert "false_infection_scale" not in loss.loss_options()
