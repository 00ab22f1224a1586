"""Forward pass and pipeline on torch float32, torch bf16 autocast and ONNX Runtime (issue 13.5).

    python -m benchmarks.inference_engine [--checkpoint PATH] [--repeat N] [--threads 1 2]

In one process, for each thread count (torch.set_num_threads and ONNX Runtime's intra-op threads
set alike): the model forward at 256x256 batch 1 (median ms over N interleaved runs after a
warm-up), batch throughput at batch 8 (images/s), and the whole ``predict`` on a bundled sample
PNG and on the RG1 DICOM (decoded once beforehand) with ``INFMAP_ENGINE`` torch and onnx; OpenVINO
(float32 and bfloat16, on the same ONNX file) too when it is installed, with the agreement of
each engine with torch float32 on the bundled samples (mask Dice, class probabilities). Ratios
are against torch float32 of the same run. The ONNX file is built in the usual cache
(``settings.onnx_cache_dir``) if it is not there. Writes benchmarks/results/inference_engine.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import settings
from inference.loading import XRay, load_xray
from inference.model import DEFAULT_CHECKPOINT, LoadedModel, load_checkpoint
from inference.onnx_engine import OnnxEngine
from inference.predict import predict
from inference.preprocess import preprocess
from training.metrics import dice_iou_per_image

RESULTS = settings.REPO_ROOT / "benchmarks" / "results" / "inference_engine.json"
SAMPLE_PNG = settings.SAMPLES_DIR / "COVID-19" / "covid_1579.png"
FORWARD_ENGINES = ("torch_fp32", "torch_bf16_autocast", "onnxruntime")


def rg1_path() -> Path | None:
    sys.path.insert(0, str(settings.REPO_ROOT / "tests"))
    from dicom_samples import pydicom_data_file  # the tests' locator of pydicom-data's files

    try:
        return pydicom_data_file("RG1_UNCR.dcm")
    except FileNotFoundError:
        return None


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (first-run allocations, ONNX Runtime's arena)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def openvino_forward(
    onnx_file: Path, threads: int, precision: str = "f32"
) -> Callable[[np.ndarray], list] | None:
    """OpenVINO on the same ONNX file at ``precision`` ("f32", or "bf16": its default on a CPU
    with AMX); None when OpenVINO is not installed (measured here, not used by the app)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(
        str(onnx_file), "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision},
    )
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list:
        result = request.infer({0: x})
        return [result[out] for out in compiled.outputs]

    return run


def max_abs_diff(model: LoadedModel, run: Callable[[np.ndarray], list], x: torch.Tensor) -> dict:
    """Largest |difference| to torch float32 per output (masks, logits, head_map, embedding)."""
    with torch.inference_mode():
        want = model.model.forward_all(x)
    got = run(x.numpy())
    return {name: float(np.abs(np.asarray(g) - w.numpy()).max())
            for name, g, w in zip(want._fields, got, want, strict=True)}


def sample_inputs(model: LoadedModel) -> torch.Tensor:
    """The bundled samples as the network sees them (predict's preprocessing)."""
    sys.path.insert(0, str(settings.REPO_ROOT / "tests"))
    from covid_qu_ex import sample_cases  # the tests' list of the bundled samples

    cfg = model.config
    xs = [preprocess(load_xray(settings.SAMPLES_DIR / cls / f"{stem}.png").pixels,
                     cfg.input_size, cfg.norm_mean, cfg.norm_std)[0]
          for cls, stem in sample_cases()]
    return torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))


def agreement(model: LoadedModel, run: Callable[[np.ndarray], list], x: torch.Tensor) -> dict:
    """On real images: worst per-image Dice of the 0.5-thresholded masks against torch
    float32's, and the largest class-probability difference (the issue's tolerance: Dice
    >= 0.999, probabilities within 1e-3)."""
    with torch.inference_mode():
        want = model.model.forward_all(x)
    got = run(x.numpy())
    size = want[0].shape[-2:]
    masks_w = (want[0] > 0).numpy().reshape(-1, *size)  # logit > 0: probability > 0.5
    masks_g = (np.asarray(got[0]) > 0).reshape(-1, *size)
    dices = dice_iou_per_image(masks_g, masks_w)[0]  # per image and mask
    probs_w = torch.softmax(want[1], 1).numpy()
    probs_g = torch.softmax(torch.from_numpy(np.asarray(got[1], np.float32)), 1).numpy()
    return {"images": len(x), "worst_mask_dice": float(dices.min()),
            "max_probability_diff": float(np.abs(probs_w - probs_g).max())}


def forward_fns(
    model: LoadedModel, engine: OnnxEngine, x: torch.Tensor,
    openvino: Callable[[np.ndarray], list] | None,
    openvino_bf16: Callable[[np.ndarray], list] | None = None,
) -> dict[str, Callable[[], object]]:
    net = model.model

    def fp32() -> object:
        with torch.inference_mode():
            return net.forward_all(x)

    def bf16() -> object:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net.forward_all(x)

    fns: dict[str, Callable[[], object]] = {
        "torch_fp32": fp32, "torch_bf16_autocast": bf16,
        "onnxruntime": lambda: engine.forward_all(x)}
    xn = x.numpy()
    if openvino is not None:
        fns["openvino_fp32"] = lambda: openvino(xn)
    if openvino_bf16 is not None:
        fns["openvino_bf16"] = lambda: openvino_bf16(xn)
    return fns


def time_interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms per function, the functions taking turns so a busy machine hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def pipeline_ms(model: LoadedModel, xray: XRay, engine: str, repeat: int) -> float:
    os.environ["INFMAP_ENGINE"] = engine
    try:
        return _median_ms(lambda: predict(xray, model), repeat)
    finally:
        os.environ.pop("INFMAP_ENGINE", None)


def run(checkpoint: Path, threads: list[int], repeat: int) -> dict[str, Any]:
    load_before = round(os.getloadavg()[0], 2)  # how busy the machine was (2 cores here)
    model = load_checkpoint(checkpoint)
    size = model.config.input_size
    rng = np.random.default_rng(0)
    x1 = torch.from_numpy(rng.standard_normal((1, 1, size, size), dtype=np.float32))
    x8 = torch.from_numpy(rng.standard_normal((8, 1, size, size), dtype=np.float32))
    t0 = time.perf_counter()
    OnnxEngine.for_model(model)  # export into the cache if it is not there yet
    build_s = time.perf_counter() - t0
    inputs = {"sample_png_256": load_xray(SAMPLE_PNG)}
    rg1 = rg1_path()
    if rg1 is not None and rg1.is_file():
        inputs["rg1_dicom_1955x1841"] = load_xray(rg1)

    samples = sample_inputs(model)
    per_threads: dict[str, Any] = {}
    for t in threads:
        torch.set_num_threads(t)
        engine = OnnxEngine.for_model(model, threads=t)
        model.engines["onnx"] = engine  # what predict uses under INFMAP_ENGINE=onnx
        session = engine.session
        openvino = openvino_forward(engine.path, t)
        ov_bf16 = openvino_forward(engine.path, t, "bf16")
        fwd = time_interleaved(forward_fns(model, engine, x1, openvino, ov_bf16), repeat)
        batch_ms = time_interleaved(forward_fns(model, engine, x8, openvino, ov_bf16),
                                    max(3, repeat // 4))
        throughput = {name: 8000.0 / ms for name, ms in batch_ms.items()}
        pipe = {
            name: {e: pipeline_ms(model, xray, e, max(3, repeat // 4)) for e in ("torch", "onnx")}
            for name, xray in inputs.items()
        }
        per_threads[str(t)] = {
            "forward_256_batch1_ms": fwd,
            "forward_ratio_vs_torch_fp32": {k: fwd["torch_fp32"] / v for k, v in fwd.items()},
            "batch8_images_per_s": throughput,
            "batch8_ratio_vs_torch_fp32": {
                k: v / throughput["torch_fp32"] for k, v in throughput.items()
            },
            "predict_ms": pipe,
            "max_abs_diff_vs_torch_fp32": {
                "onnxruntime": max_abs_diff(
                    model, lambda a, s=session: s.run(None, {"image": a}), x8),
                **({"openvino_fp32": max_abs_diff(model, openvino, x8)} if openvino else {}),
            },
            "agreement_on_samples_vs_torch_fp32": {
                "onnxruntime": agreement(
                    model, lambda a, s=session: s.run(None, {"image": a}), samples),
                **({"openvino_fp32": agreement(model, openvino, samples)} if openvino else {}),
                **({"openvino_bf16": agreement(model, ov_bf16, samples)} if ov_bf16 else {}),
                "torch_bf16_autocast": agreement(model, lambda a: _torch_bf16(model, a), samples),
            },
        }
        print(f"threads={t}: forward ms {fwd}; batch-8 images/s {throughput}; predict ms {pipe}")

    return {
        "benchmark": "inference_engine",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": checkpoint.name,
        "model_version": model.version,
        "input": f"1x1x{size}x{size} float32 (random normal; forward cost does not depend on it)",
        "repeat": repeat,
        "onnx_first_build_s": round(build_s, 2),
        "versions": {p: _version(p) for p in ("torch", "onnxruntime", "onnx", "openvino")},
        "machine": f"{platform.machine()} {os.cpu_count()} cores; ratios are from "
                   "interleaved runs",
        "load_average_1min_at_start": load_before,
        "threads": per_threads,
    }


def _torch_bf16(model: LoadedModel, x: np.ndarray) -> list:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.model.forward_all(torch.from_numpy(x))
    return [o.float().numpy() for o in out]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=settings.cli_path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=settings.cli_path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.checkpoint, args.threads, args.repeat)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
