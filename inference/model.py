"""The network and its one checkpoint format.

A checkpoint is a plain dict ``{"format", "meta", "state_dict"}`` holding only tensors and
JSON-like values, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations  # noqa: I001 - settings must import before smp (below)

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# settings first: it sets HF_HUB_OFFLINE before huggingface_hub (under smp/timm) reads it
import settings
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from inference.calibration import Calibration

CHECKPOINT_FORMAT = "infmap-checkpoint/1"
CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
SEG_CHANNELS: tuple[str, ...] = ("lungs", "infection")
# Architecture registry, keyed by ``ModelConfig.architecture`` (smp's style: a plain dict). Every
# entry takes smp's constructor arguments and returns (mask_logits, class_logits) with aux_params.
ARCHITECTURES: dict[str, type[smp.base.SegmentationModel]] = {"UnetPlusPlus": smp.UnetPlusPlus}
DEFAULT_CHECKPOINT = settings.SHIPPED_CHECKPOINT


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    architecture: str = "UnetPlusPlus"
    encoder_name: str = "mobilenet_v2"
    encoder_depth: int = 5
    decoder_channels: list[int] = field(default_factory=lambda: [96, 48, 24, 16, 8])
    in_channels: int = 1
    input_size: int = 256
    # Input convention: grayscale in [0, 1], air dark, letterboxed to a square, then (x-mean)/std.
    norm_mean: float = 0.5
    norm_std: float = 0.25
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    seg_channels: list[str] = field(default_factory=lambda: list(SEG_CHANNELS))
    head_dropout: float = 0.2
    # "avg": the head averages the whole last encoder stage (1.0.0). "lung": it averages only under
    # the predicted lung mask, so burned-in text, markers and collimation outside the lungs cannot
    # feed the diagnosis directly (2.0.0, against the source shortcuts of DeGrave et al. 2021).
    head_pooling: str = "avg"
    # What the input channels hold: the X-ray alone, or (the click-refinement network,
    # ``inference.click_model.CLICK_INPUTS``) the X-ray plus click maps and current masks.
    inputs: list[str] = field(default_factory=lambda: ["image"])


HEAD_POOLINGS = ("avg", "lung")
LUNG_CHANNEL = 0  # index of the lung logits in the mask output (SEG_CHANNELS order)
STYLE_STAGES = 4  # early encoder stages whose channel statistics describe the acquisition


def lung_pooled_features(features: torch.Tensor, lung_logits: torch.Tensor) -> torch.Tensor:
    """Reweight the last encoder stage so that its spatial MEAN is the mean under the lungs.

    ``features`` (B,K,h,w), ``lung_logits`` (B,1,H,W). The lung probability, detached (the class
    loss must not bend the lung masks), is area-averaged to (h,w) as weights ``a``; the result is
    ``f * a * h*w / (sum(a) + eps)``. A head that averages it (GAP + linear) thus sees only lung
    positions, and a CAM of it is each position's exact share of the logit. No lungs found: all
    zeros, so the logits fall back to the bias (the head's prior), not to a confident guess.
    """
    h, w = features.shape[-2:]
    weights = F.adaptive_avg_pool2d(torch.sigmoid(lung_logits.detach().float()), (h, w))
    scale = (h * w) / (weights.sum(dim=(2, 3), keepdim=True) + 1e-3)
    return features * (weights * scale).to(features.dtype)


class NetOutputs(NamedTuple):
    masks: torch.Tensor  # (B, 2, H, W) logits, SEG_CHANNELS order
    logits: torch.Tensor  # (B, classes)
    head_map: torch.Tensor  # (B, K, h, w): what the class head averages
    # (B, 2K + S) float32, for the out-of-domain score: the last stage averaged over the whole
    # image and under the lungs (2K, what the picture is), then the per-channel mean and standard
    # deviation of the early stages (S, how it was acquired: contrast, noise, sharpness).
    embedding: torch.Tensor


class InfMapNet(nn.Module):
    """UNet++ with two mask logits (lungs, infection) and a 3-class head on the encoder.

    ``forward`` returns ``(mask_logits[B,2,H,W], class_logits[B,3])``. ``forward_with_features``
    also returns the feature map the head averages (the encoder's last stage, reweighted under
    the lungs for ``head_pooling="lung"``), which Grad-CAM explains.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {config.architecture!r}")
        if config.head_pooling not in HEAD_POOLINGS:
            raise ValueError(f"unknown head pooling {config.head_pooling!r}")
        if len(config.inputs) != config.in_channels:
            raise ValueError(f"{config.in_channels} input channels but inputs {config.inputs}")
        self.config = config
        self.net = ARCHITECTURES[config.architecture](
            encoder_name=config.encoder_name,
            encoder_depth=config.encoder_depth,
            encoder_weights=None,
            decoder_channels=tuple(config.decoder_channels),
            in_channels=config.in_channels,
            classes=len(config.seg_channels),
            aux_params={
                "classes": len(config.class_names),
                "pooling": "avg",
                "dropout": config.head_dropout,
                "activation": None,
            },
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks, logits, _ = self.forward_with_features(x)
        return masks, logits

    def forward_with_features(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks, class logits and the feature map the head averages (for Grad-CAM)."""
        out = self.forward_all(x)
        return out.masks, out.logits, out.head_map

    def forward_all(self, x: torch.Tensor) -> NetOutputs:
        """Everything one forward pass gives, including the out-of-domain embedding."""
        features = self.net.encoder(x)
        decoded = self.net.decoder(features)
        masks = self.net.segmentation_head(decoded)
        last = features[-1]
        head_map = last
        if self.config.head_pooling == "lung":
            head_map = lung_pooled_features(last, masks[:, LUNG_CHANNEL : LUNG_CHANNEL + 1])
        logits = self.net.classification_head(head_map)
        # Whole-image and head (under-the-lungs) averages: the first sees what the picture is,
        # the second what the diagnosis is made from. The early stages' statistics see the
        # acquisition, which the deep features are trained (and augmented) to ignore.
        pooled = [last.mean(dim=(2, 3)), head_map.mean(dim=(2, 3))]
        style = [s for f in features[1 : 1 + STYLE_STAGES]
                 for s in (f.float().mean(dim=(2, 3)), f.float().std(dim=(2, 3)))]
        embedding = torch.cat([p.float() for p in pooled] + style, 1)
        return NetOutputs(masks, logits, head_map, embedding)

    @property
    def content_dims(self) -> int:
        """2K: the leading ``embedding`` columns that are pooled last-stage features."""
        return 2 * int(self.net.encoder.out_channels[-1])

    @property
    def classifier_linear(self) -> nn.Linear:
        """The linear layer of the GAP + linear head (its weights make the CAM)."""
        layers = [m for m in self.net.classification_head.modules() if isinstance(m, nn.Linear)]
        return layers[-1]


def build_model(config: ModelConfig | None = None) -> InfMapNet:
    return InfMapNet(config or ModelConfig())


@dataclass
class LoadedModel:
    model: InfMapNet
    config: ModelConfig
    meta: dict[str, Any]
    path: Path | None
    sha256: str | None
    calibration: Calibration = field(default_factory=Calibration)
    # Other runtimes of the same network, built on first use (inference.onnx_engine.forward_pass)
    engines: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))


def save_checkpoint(
    model: InfMapNet,
    path: str | Path,
    meta: dict[str, Any] | None = None,
    half: bool = False,
    calibration: Calibration | None = None,
) -> Path:
    """Write weights plus metadata. ``half`` stores float weights as float16 (shipping size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(torch.float16) if half and v.is_floating_point() else v.detach()).cpu()
        for k, v in model.state_dict().items()
    }
    full_meta = dict(meta or {})
    full_meta["config"] = asdict(model.config)
    payload: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "meta": full_meta, "state_dict": state}
    if calibration is not None:  # kept in float32 even in a half checkpoint: distances need it
        payload["calibration"] = calibration.to_payload()
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves half a checkpoint
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointError(ValueError):
    """The file is not an InfMap checkpoint this code can load."""


def load_checkpoint(path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"No model checkpoint at {path}.")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # pickle errors, truncated files
        raise CheckpointError(f"{path.name} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path.name} is not an {CHECKPOINT_FORMAT} checkpoint.")
    meta = dict(payload["meta"])
    config = ModelConfig(**meta["config"])
    model = build_model(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model=model, config=config, meta=meta, path=path, sha256=file_sha256(path),
                       calibration=Calibration.from_payload(payload.get("calibration")))


def model_from_state(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> LoadedModel:
    """Wrap an in-memory model (training, tests) in the same type the loader returns."""
    model = build_model(config)
    model.load_state_dict(state_dict)
    model.eval()
    return LoadedModel(model=model, config=config, meta=dict(meta or {}), path=None, sha256=None)
