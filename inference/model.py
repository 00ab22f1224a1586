"""The network and its one checkpoint format.

A checkpoint is a plain dict ``{"format", "meta", "state_dict"}`` holding only tensors and
JSON-like values, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time

import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

CHECKPOINT_FORMAT = "infmap-checkpoint/1"
CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
SEG_CHANNELS: tuple[str, ...] = ("lungs", "infection")
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "infmap.pt"


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


class InfMapNet(nn.Module):
    """UNet++ with two mask logits (lungs, infection) and a 3-class head on the encoder.

    ``forward`` returns ``(mask_logits[B,2,H,W], class_logits[B,3])``. ``features`` exposes the
    encoder's last stage, which Grad-CAM explains.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.architecture != "UnetPlusPlus":
            raise ValueError(f"unknown architecture {config.architecture!r}")
        self.config = config
        self.net = smp.UnetPlusPlus(
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
        masks, logits = self.net(x)
        return masks, logits

    def forward_with_features(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like ``forward`` but also returns the encoder's last feature map (for Grad-CAM)."""
        features = self.net.encoder(x)
        decoded = self.net.decoder(features)
        masks = self.net.segmentation_head(decoded)
        logits = self.net.classification_head(features[-1])
        return masks, logits, features[-1]

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

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))


def save_checkpoint(
    model: InfMapNet,
    path: str | Path,
    meta: dict[str, Any] | None = None,
    half: bool = False,
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
    payload = {"format": CHECKPOINT_FORMAT, "meta": full_meta, "state_dict": state}
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
    return LoadedModel(model=model, config=config, meta=meta, path=path, sha256=file_sha256(path))


def model_from_state(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> LoadedModel:
    """Wrap an in-memory model (training, tests) in the same type the loader returns."""
    model = build_model(config)
    model.load_state_dict(state_dict)
    model.eval()
    return LoadedModel(model=model, config=config, meta=dict(meta or {}), path=None, sha256=None)
