"""The click-guided refinement network (issue 14.1): the InfMap network with six more inputs.

Inputs, in ``CLICK_INPUTS`` order, all at the model's input size: the X-ray (normalised as for
the ordinary model), then for the lungs and for the infection a positive-click map, a
negative-click map and the current mask (0/1). A click is a disk of ``CLICK_RADIUS`` pixels, as
in RITM (Sofiiuk et al. 2022). The current mask is what the annotator has now (the model's
prediction, their own brush edits or the last refinement), so a refinement continues from it.

It is trained (``training.train_click``) from the ordinary model's weights with the new input
channels starting at zero, so before training it *is* the ordinary model, and trained with
"no click" samples, so that without clicks it still gives the ordinary prediction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import cv2
import numpy as np
import torch
from torch import nn

from inference.click_refine import Click, disk
from inference.model import InfMapNet, LoadedModel, build_model
from inference.preprocess import Letterbox, to_float_pixels

KINDS: tuple[str, ...] = ("lung", "infection")  # mask output channels, SEG_CHANNELS order
CLICK_INPUTS: tuple[str, ...] = (
    "image",
    "lung_positive", "lung_negative", "lung_mask",
    "infection_positive", "infection_negative", "infection_mask",
)
CLICK_RADIUS = 5  # pixels at 256²: RITM's disk
MAX_CLICKS = 24  # per mask kind; more are ignored (oldest first kept)


def is_click_model(model: LoadedModel | InfMapNet) -> bool:
    return tuple(model.config.inputs) == CLICK_INPUTS


def _first_conv(model: InfMapNet) -> nn.Conv2d:
    for module in model.net.encoder.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError("the encoder has no convolution")


def with_click_inputs(model: InfMapNet) -> InfMapNet:
    """A copy of an ordinary (image-only) model taking ``CLICK_INPUTS``; the new channels' first
    convolution weights are zero, so it predicts exactly what ``model`` does whatever the clicks."""
    if tuple(model.config.inputs) != ("image",):
        raise ValueError("only an image-only model can be given click inputs")
    config = replace(model.config, inputs=list(CLICK_INPUTS), in_channels=len(CLICK_INPUTS))
    out = build_model(config)
    state = model.state_dict()
    first = _first_conv(out)
    conv_name = next(n for n, m in out.named_modules() if m is first) + ".weight"
    old = state[conv_name]
    new = torch.zeros(old.shape[0], len(CLICK_INPUTS), *old.shape[2:], dtype=old.dtype)
    new[:, :1] = old
    out.load_state_dict({**state, conv_name: new})
    return out


def stamp(shape: tuple[int, int], points: Iterable[tuple[int, int]],
          radius: int = CLICK_RADIUS) -> np.ndarray:
    """A 0/1 float map with a disk of ``radius`` at each (y, x)."""
    out = np.zeros(shape, np.float32)
    r = radius
    yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
    disk = (yy**2 + xx**2 <= r**2).astype(np.float32)
    h, w = shape
    for y, x in points:
        y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        patch = disk[y0 - (y - r) : y1 - (y - r), x0 - (x - r) : x1 - (x - r)]
        np.maximum(out[y0:y1, x0:x1], patch, out=out[y0:y1, x0:x1])
    return out


def encode_guidance(
    clicks: Mapping[str, Sequence[Click]], masks: Mapping[str, np.ndarray],
    shape: tuple[int, int],
) -> np.ndarray:
    """The six guidance channels (everything after the image), float32 (6, H, W)."""
    planes: list[np.ndarray] = []
    for kind in KINDS:
        kind_clicks = list(clicks.get(kind, ()))[-MAX_CLICKS:]
        planes.append(stamp(shape, [(c.y, c.x) for c in kind_clicks if c.positive]))
        planes.append(stamp(shape, [(c.y, c.x) for c in kind_clicks if not c.positive]))
        mask = masks.get(kind)
        planes.append(np.zeros(shape, np.float32) if mask is None
                      else (np.asarray(mask) > 0).astype(np.float32))
    return np.stack(planes)


def forward_probabilities(
    model: LoadedModel | InfMapNet, images: torch.Tensor, guidance: torch.Tensor,
    bf16: bool = False,
) -> torch.Tensor:
    """Lung and infection probabilities (B, 2, H, W) for images already at the input size in
    [0, 1] (B, 1, H, W) and their guidance (B, 6, H, W)."""
    net = model.model if isinstance(model, LoadedModel) else model
    cfg = net.config
    x = torch.cat([(images - cfg.norm_mean) / cfg.norm_std, guidance], 1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, _ = net(x)
    return torch.sigmoid(logits.float())


def refine_probabilities(
    model: LoadedModel, image: np.ndarray, clicks: Mapping[str, Sequence[Click]],
    masks: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """One refinement of one image at the model's input size: ``image`` float in [0, 1] (H, W),
    ``clicks`` and current ``masks`` per kind in the same grid. Returns the probability per kind."""
    size = model.config.input_size
    if image.shape != (size, size):
        raise ValueError(f"the image must be {size}x{size}, not {image.shape}")
    guidance = torch.from_numpy(encode_guidance(clicks, masks, image.shape))[None]
    img = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    prob = forward_probabilities(model, img, guidance)[0].numpy()
    return {kind: prob[i] for i, kind in enumerate(KINDS)}


def with_click_spot(mask: np.ndarray, click: Click, radius: float) -> np.ndarray:
    """``mask`` with the disk around the latest click set to what the click says: a click
    always corrects at least its own spot, whatever the network makes of it."""
    spot = disk(mask.shape, click.y, click.x, radius)
    return mask | spot if click.positive else mask & ~spot


def decide(probability: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
    """The refined mask on the network's grid: probability above 0.5, the last click's spot
    corrected (the benchmark and the app alike)."""
    mask = np.asarray(probability) > 0.5
    return with_click_spot(mask, clicks[-1], CLICK_RADIUS) if clicks else mask


def _to_square(box: Letterbox, mask: np.ndarray) -> np.ndarray:
    content = cv2.resize(np.asarray(mask, np.float32), (box.new_w, box.new_h),
                         interpolation=cv2.INTER_AREA)
    out = np.zeros((box.size, box.size), bool)
    out[box.top : box.top + box.new_h, box.left : box.left + box.new_w] = content > 0.5
    return out


def _point_to_square(box: Letterbox, click: Click) -> Click:
    y = box.top + min(box.new_h - 1, int((click.y + 0.5) * box.new_h / box.orig_h))
    x = box.left + min(box.new_w - 1, int((click.x + 0.5) * box.new_w / box.orig_w))
    return Click(y, x, click.positive)


def refine_mask(
    model: LoadedModel, pixels: np.ndarray, kind: str, clicks: Sequence[Click],
    masks: Mapping[str, np.ndarray], within: np.ndarray | None = None,
) -> np.ndarray:
    """The ``kind`` mask after ``clicks`` (all of this kind so far, the last one new), on the
    image's own grid. ``masks``: the current mask of each kind on that grid.

    The network works at its input size; only what its answer changes is taken from it, so
    the current mask keeps its full-resolution detail wherever the refinement agrees with it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    image = to_float_pixels(pixels)
    box = Letterbox.fit(image.shape[0], image.shape[1], model.config.input_size)
    current = np.asarray(masks[kind], bool)
    square_masks = {k: _to_square(box, m) for k, m in masks.items()}
    square_clicks = {kind: [_point_to_square(box, c) for c in clicks]}
    prob = refine_probabilities(model, box.apply(image), square_clicks, square_masks)[kind]
    # Where the network's answer differs from the current mask on its own grid, the answer
    # (resized smoothly); elsewhere the current mask, pixel for pixel.
    changed = box.to_original(((prob > 0.5) != square_masks[kind]).astype(np.float32)) > 0.5
    out = np.where(changed, box.mask_to_original(prob), current)
    if clicks:
        scale = max(box.orig_h / box.new_h, box.orig_w / box.new_w)
        out = with_click_spot(out, clicks[-1], CLICK_RADIUS * scale)
    if within is not None:
        out &= np.asarray(within, bool)
    return out
