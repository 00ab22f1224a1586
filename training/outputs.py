"""The network's raw outputs over a whole split, in one pass: the shared first step of
evaluation (``training.evaluate``) and of fitting the Val-chosen decisions (``training.calibrate``).

Nothing here decides anything (no thresholds, no argmax): :mod:`inference.calibration` does, the
same way for a split as for one image in ``inference.predict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from inference.gradcam import cam_from_features
from inference.model import InfMapNet, LoadedModel, ModelConfig
from training.loop import normalise


@dataclass
class RawOutputs:
    logits: np.ndarray  # float32 (N, C)
    lung_prob: np.ndarray | None  # float16 (N, H, W), None when maps were not kept
    infection_prob: np.ndarray | None  # float16 (N, H, W)
    embedding: np.ndarray  # float32 (N, D): pooled features for the out-of-domain score
    cams: np.ndarray | None  # float16 (N, h, w): CAM of the top class at feature resolution

    def __len__(self) -> int:
        return len(self.logits)


def unwrap(model: InfMapNet | LoadedModel) -> tuple[InfMapNet, ModelConfig]:
    if isinstance(model, LoadedModel):
        return model.model, model.config
    return model, model.config


def run_network(
    model: InfMapNet | LoadedModel,
    images: np.ndarray,
    batch_size: int = 16,
    bf16: bool = False,
    keep_maps: bool = True,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> RawOutputs:
    """Forward every uint8 (N, S, S) image (already at the network's input size) once.

    The model is put in eval mode for the call and given back in the mode it came in.
    ``progress``: a tqdm bar on the terminal; ``on_batch(done, total)``: called after each
    batch with the number of images done (the app's progress bar).
    """
    net, config = unwrap(model)
    size = config.input_size
    if images.shape[1:] != (size, size):
        raise ValueError(f"images are {images.shape[1:]}, the model expects {size}x{size}")
    n = len(images)
    logits: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    lungs: list[np.ndarray] = []
    infs: list[np.ndarray] = []
    cams: list[np.ndarray] = []
    weight = net.classifier_linear.weight
    was_training = net.training
    net.eval()
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="forward", unit="batch", mininterval=10)
    try:
        with torch.inference_mode():
            for start in starts:
                img = torch.from_numpy(images[start : start + batch_size]).float().div_(255.0)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = net.forward_all(normalise(img.unsqueeze(1), config))
                lg = out.logits.float()
                logits.append(lg.numpy())
                embeddings.append(out.embedding.float().numpy())
                if keep_maps:
                    prob = torch.sigmoid(out.masks.float()).numpy().astype(np.float16)
                    lungs.append(prob[:, 0])
                    infs.append(prob[:, 1])
                    top = lg.argmax(1).tolist()
                    head = out.head_map.float()
                    cams.append(np.stack([
                        cam_from_features(head[i], weight, c) for i, c in enumerate(top)
                    ]).astype(np.float16))
                if on_batch is not None:
                    on_batch(min(start + batch_size, n), n)
    finally:
        net.train(was_training)
    return RawOutputs(
        logits=np.concatenate(logits),
        lung_prob=np.concatenate(lungs) if keep_maps else None,
        infection_prob=np.concatenate(infs) if keep_maps else None,
        embedding=np.concatenate(embeddings),
        cams=np.concatenate(cams) if keep_maps else None,
    )
