"""ONNX Runtime for the forward pass of ``InfMapNet`` (``INFMAP_ENGINE=onnx``).

The network is exported once per checkpoint with ``torch.onnx.export`` (the dynamo exporter: the
TorchScript one cannot trace the lung-pooled head's data-dependent pooling size) into a cache
folder, as ``<checkpoint sha256>.onnx``. Nothing is downloaded. ``OnnxEngine.forward_all`` gives
the same ``NetOutputs`` as ``InfMapNet.forward_all`` (mask logits, class logits, the head's
feature map and the out-of-domain embedding), so ``inference.predict`` computes masks,
probabilities, the CAM and the out-of-domain score from it exactly as from torch. The CAM needs
no backward pass (``inference.gradcam``); the hook-based Grad-CAM reference
(``gradcam_reference``) and training stay on torch.

``forward_pass(model)`` is the seam ``predict`` uses. Under ``INFMAP_ENGINE=auto`` (the default)
ONNX Runtime serves a checkpoint whose ONNX file is already in the cache and torch any other, so
no request waits for an export: the file is built by ``make run`` for the shipped model,
by a fine-tuning run started from the app for the version it registers, by the batch CLI before
a large batch, or by hand::

    python -m inference.onnx_engine --checkpoint models/infmap.pt

``onnx`` exports on first use; either falls back to torch with a logged warning when the ONNX
file cannot be built or loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import settings
from inference.model import InfMapNet, LoadedModel, NetOutputs

log = logging.getLogger(__name__)

EXPORT_FORMAT = "infmap-onnx/1"  # part of the cache key: a change of export invalidates files
OPSET = 18
OUTPUT_NAMES: tuple[str, ...] = NetOutputs._fields  # masks, logits, head_map, embedding
MAX_BATCH = 256  # the exported batch axis is dynamic up to this size


class _AllOutputs(nn.Module):
    """``forward_all`` as a plain tuple: what the exporter can name output by output."""

    def __init__(self, net: InfMapNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net.forward_all(x))


def model_key(model: LoadedModel) -> str:
    """The cache key: the checkpoint file's sha256, or for an in-memory model (training, tests)
    a digest of its configuration and weights; with the export format, so files never mix."""
    digest = hashlib.sha256(EXPORT_FORMAT.encode())
    if model.sha256 is not None:
        digest.update(model.sha256.encode())
    else:
        digest.update(repr(sorted(vars(model.config).items())).encode())
        for name, tensor in model.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def onnx_path(model: LoadedModel, cache_dir: Path | None = None) -> Path:
    return (cache_dir or settings.onnx_cache_dir()) / f"{model_key(model)}.onnx"


def export_onnx(net: InfMapNet, path: Path) -> Path:
    """Export ``net`` (float32, eval mode) to ``path`` atomically; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = net.config.input_size
    example = torch.zeros(2, net.config.in_channels, size, size)
    wrapper = _AllOutputs(net).eval()
    # A unique temporary name, then a rename: two replicas exporting at once never see half a file.
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                input_names=["image"], output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
            )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_file(model: LoadedModel, cache_dir: Path | None = None) -> Path:
    """``model``'s ONNX file, exported into the cache first if it is not there."""
    path = onnx_path(model, cache_dir)
    if not path.is_file():
        net = model.model
        was_training = net.training
        net.eval()
        try:
            export_onnx(net, path)
        finally:
            net.train(was_training)
    return path


class OnnxEngine:
    """An ONNX Runtime CPU session over one exported ``InfMapNet``."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort  # here: torch-only installs and processes never load it

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    @classmethod
    def for_model(
        cls, model: LoadedModel, cache_dir: Path | None = None, threads: int | None = None
    ) -> OnnxEngine:
        """The engine of ``model``, exporting it into the cache first if it is not there."""
        return cls(ensure_file(model, cache_dir), threads)

    def forward_all(self, x: torch.Tensor) -> NetOutputs:
        """``InfMapNet.forward_all`` on ONNX Runtime: float32 (B, 1, H, W) in, torch tensors out."""
        image = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        outputs = self.session.run(list(OUTPUT_NAMES), {"image": image})
        return NetOutputs(*(torch.from_numpy(np.asarray(o)) for o in outputs))


def forward_pass(model: LoadedModel) -> Callable[[torch.Tensor], NetOutputs]:
    """What serves ``model``'s forward pass under ``INFMAP_ENGINE``: torch, or the ONNX engine
    (loaded once per model and kept on it; under ``auto`` only from a file already built). If
    the ONNX file cannot be built or loaded, torch, with a warning that names no file (paths can
    carry patient or site names)."""
    engine_name = settings.inference_engine()
    if engine_name == "torch":
        return model.model.forward_all
    if "onnx" not in model.engines:
        if engine_name == "auto" and not built(model):
            return model.model.forward_all  # not built yet: looked for again next time
        try:
            model.engines["onnx"] = OnnxEngine.for_model(model)
        except Exception as exc:  # an exporter or runtime failure must not stop predictions
            log.warning("ONNX engine unavailable (%s); using torch for the forward pass",
                        type(exc).__name__)
            model.engines["onnx"] = None
    engine = model.engines["onnx"]
    return model.model.forward_all if engine is None else engine.forward_all


def built(model: LoadedModel) -> bool:
    """Whether ``model``'s ONNX file is in the cache. Only a checkpoint file counts: keying an
    in-memory model hashes all its weights, too dear to do on every prediction."""
    return model.sha256 is not None and onnx_path(model).is_file()


def build(model: LoadedModel, cache_dir: Path | None = None) -> Path | None:
    """Make ``model``'s ONNX file ahead of its use (nothing to do if it is there); None, with
    a warning that names no file, if it cannot be made: torch then serves, nothing fails."""
    try:
        return ensure_file(model, cache_dir)
    except Exception as exc:
        log.warning("ONNX file not built (%s); torch will serve", type(exc).__name__)
        return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build the ONNX file of a checkpoint, so that "
                                "INFMAP_ENGINE=auto serves it with ONNX Runtime.")
    p.add_argument("--checkpoint", type=settings.cli_path, default=None,
                   help="default: INFMAP_CHECKPOINT or models/infmap.pt")
    p.add_argument("--cache-dir", type=settings.cli_path, default=None,
                   help="default: INFMAP_ONNX_CACHE or <repo>/.cache/onnx")
    args = p.parse_args(argv)
    from inference.model import load_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    path = build(load_checkpoint(args.checkpoint or settings.checkpoint_path()), args.cache_dir)
    if path is None:
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
