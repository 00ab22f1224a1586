"""Per-stage inference latency, and the model's forward time against a VGG-16 UNet++ baseline.

    python -m benchmarks.inference_latency [--checkpoint PATH] [--repeat N] [--threads T]

Two inputs: a 256x256 COVID-QU-Ex PNG and the 1955x1841 RG1 DICOM of the pydicom-data package.
Stages: decode (load_xray), preprocess, model, Grad-CAM, postprocess (from predict's own timers),
overlays (lung + infection + heat map). Medians over N runs after one warm-up run. The baseline is
InfLocNet's choice, smp.UnetPlusPlus with a VGG-16 encoder, timed in the same process, on the
same normalised input tensor, with the same thread count, runs interleaved. Prints a markdown
table and writes benchmarks/results/inference_latency.json.
"""

from __future__ import annotations

import os

import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402

from inference.loading import load_xray  # noqa: E402
from inference.model import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    CheckpointError,
    LoadedModel,
    ModelConfig,
    build_model,
    load_checkpoint,
    model_from_state,
)
from inference.overlay import LUNG_COLOR, heatmap_overlay, mask_overlay  # noqa: E402
from inference.predict import predict  # noqa: E402
from inference.preprocess import preprocess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "inference_latency.json"
QU_EX_IMAGES = Path(
    "covid-qu-ex/Infection Segmentation Data/Infection Segmentation Data/Test/COVID-19/images"
)
STAGES = ("decode", "preprocess", "model", "gradcam", "postprocess", "overlays")


def find_png(explicit: str | None) -> tuple[Path, str]:
    """A COVID-QU-Ex test PNG; a synthetic 256x256 PNG if the data set is not on this machine."""
    if explicit:
        return Path(explicit), "given"
    for base in (REPO.parent / "shared" / "data", REPO / "data", Path("/work/shared/data")):
        folder = base / QU_EX_IMAGES
        if folder.is_dir():
            pngs = sorted(folder.glob("*.png"))
            if pngs:
                return pngs[0], "COVID-QU-Ex"
    path = Path(tempfile.mkdtemp()) / "synthetic_256.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 256, (256, 256), dtype=np.uint8))
    return path, "synthetic (COVID-QU-Ex not found)"


def find_rg1_dicom(explicit: str | None) -> Path | None:
    """RG1_UNCR.dcm from the installed pydicom-data package (its files live in data_store/)."""
    if explicit:
        return Path(explicit)
    try:
        dist = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("data_store/data/RG1_UNCR.dcm")))
    return path if path.is_file() else None


def get_model(checkpoint: Path) -> tuple[LoadedModel, str]:
    try:
        return load_checkpoint(checkpoint), f"checkpoint {checkpoint}"
    except CheckpointError as exc:
        # Timings do not depend on the weights, only on the architecture.
        torch.manual_seed(0)
        config = ModelConfig()
        state = build_model(config).state_dict()
        loaded = model_from_state(config, state, meta={"version": "random"})
        return loaded, f"RANDOM weights, default config ({exc})"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1000


def run_pipeline(path: Path, model: LoadedModel) -> dict[str, float]:
    """One end-to-end pass over a file; per-stage milliseconds."""
    xray, decode_ms = timed(lambda: load_xray(path))
    pred = predict(xray, model)

    def overlays() -> None:
        mask_overlay(xray.pixels, pred.lung_mask, LUNG_COLOR)
        mask_overlay(xray.pixels, pred.infection_mask)
        heatmap_overlay(xray.pixels, pred.gradcam)

    _, overlay_ms = timed(overlays)
    t = pred.timings_ms
    return {
        "decode": decode_ms, "preprocess": t["preprocess"], "model": t["model"],
        "gradcam": t["gradcam"], "postprocess": t["postprocess"], "overlays": overlay_ms,
    }


def median_stages(path: Path, model: LoadedModel, repeat: int) -> dict[str, Any]:
    run_pipeline(path, model)  # warm-up: lazy init, allocator, file cache
    runs = [run_pipeline(path, model) for _ in range(repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    med["total"] = statistics.median(sum(r[k] for k in STAGES) for r in runs)
    xray = load_xray(path)
    return {"file": path.name, "shape": list(xray.pixels.shape), "median_ms": med}


def forward_medians(
    nets: list[torch.nn.Module], x: torch.Tensor, repeat: int
) -> list[float]:
    """Median forward ms per network. Runs alternate between the networks so a background load
    that comes and goes hits all of them alike and the ratio stays fair."""
    times: list[list[float]] = [[] for _ in nets]
    with torch.inference_mode():
        for net in nets:
            net.eval()
            net(x)  # warm-up
        for _ in range(repeat):
            for net, bucket in zip(nets, times, strict=True):
                bucket.append(timed(lambda net=net: net(x))[1])
    return [statistics.median(t) for t in times]


def baseline_model() -> torch.nn.Module:
    """InfLocNet's network: UNet++ with a VGG-16 encoder (random weights; timing only)."""
    torch.manual_seed(0)
    return smp.UnetPlusPlus(
        encoder_name="vgg16", encoder_weights=None, in_channels=1, classes=2,
        aux_params={"classes": 3},
    )


def count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| input | size | " + " | ".join(STAGES) + " | total |",
        "|---|---|" + "---:|" * (len(STAGES) + 1),
    ]
    for case in result["cases"]:
        ms = case["median_ms"]
        cells = " | ".join(f"{ms[k]:.1f}" for k in (*STAGES, "total"))
        lines.append(f"| {case['label']} | {case['shape'][0]}x{case['shape'][1]} | {cells} |")
    fw = result["forward"]
    lines += [
        "",
        "| model (forward only, 1x1x{s}x{s}) | params (M) | median ms |".format(s=fw["input_size"]),
        "|---|---:|---:|",
        f"| InfMap ({fw['infmap']['name']}) | {fw['infmap']['params'] / 1e6:.2f} "
        f"| {fw['infmap']['ms']:.1f} |",
        f"| baseline ({fw['baseline']['name']}) | {fw['baseline']['params'] / 1e6:.2f} "
        f"| {fw['baseline']['ms']:.1f} |",
        "",
        f"InfMap / baseline forward time: **{fw['ratio']:.3f}** "
        f"({1 / fw['ratio']:.1f}x faster)" if fw["ratio"] > 0 else "",
        "",
        f"Medians of {result['repeat']} runs, {result['torch_threads']} torch thread(s), "
        f"{result['cpu_count']} CPUs; weights: {result['model_source']}."
        + (f" Note: {result['note']}" if result["note"] else ""),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=settings.cli_path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--repeat", type=int, default=10, help="timed runs per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--png", help="PNG to time (default: first COVID-QU-Ex Test COVID-19 image)")
    p.add_argument("--dicom", type=settings.cli_path_str,
                   help="DICOM to time (default: pydicom-data RG1_UNCR.dcm)")
    p.add_argument("--out", type=settings.cli_path, default=RESULTS)
    p.add_argument("--note", default="", help="free text stored with the results (e.g. load)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, model_source = get_model(args.checkpoint)
    print(f"model: {model_source}")

    cases: list[dict[str, Any]] = []
    png, png_source = find_png(args.png)
    cases.append({"label": f"PNG ({png_source})", **median_stages(png, model, args.repeat)})
    dicom = find_rg1_dicom(args.dicom)
    if dicom is None:
        print("RG1_UNCR.dcm not found (pip install pydicom-data); DICOM case skipped")
    else:
        try:
            cases.append({"label": "DICOM RG1_UNCR", **median_stages(dicom, model, args.repeat)})
        except Exception as exc:  # e.g. no DICOM decoder installed: still time the PNG
            print(f"DICOM case skipped: {type(exc).__name__}: {exc}")

    # Forward-only comparison: the same normalised 256x256 input tensor for both networks.
    size = model.config.input_size
    x, _ = preprocess(load_xray(png).pixels, size, model.config.norm_mean, model.config.norm_std)
    tensor = torch.from_numpy(x)[None, None]
    base = baseline_model()
    infmap_ms, base_ms = forward_medians([model.model, base], tensor, args.repeat)

    result: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_source": model_source,
        "random_weights": model_source.startswith("RANDOM"),
        "model_version": model.version,
        "repeat": args.repeat,
        "note": args.note,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "smp": smp.__version__,
        "cases": cases,
        "forward": {
            "input_size": size,
            "infmap": {"name": f"UNet++ {model.config.encoder_name}", "ms": infmap_ms,
                       "params": count_params(model.model)},
            "baseline": {"name": "UNet++ vgg16", "ms": base_ms, "params": count_params(base)},
            "ratio": infmap_ms / base_ms,
        },
    }
    table = markdown(result)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
