"""Batch inference over files and folders -> predictions.csv and mask PNGs.

    python -m inference.batch INPUT... --out DIR [--checkpoint PATH] [--timeout SECONDS]
                              [--report pdf|png] [--names hashed|clear]

INPUT is a file or a folder (searched recursively for .dcm/.dicom/.png/.jpg/.jpeg and for
extension-less DICOM files). Writes ``DIR/predictions.csv`` (one row per input file; a file that
cannot be read gets its message in ``error`` and the run goes on) and
``DIR/masks/<stem>_lung.png`` / ``<stem>_infection.png`` (0/255, the input image's size). Files
inside a sub-folder of an INPUT folder keep that sub-folder under ``masks/`` so names never clash.
Each file is decoded in a worker process with a time limit (``--timeout``) and a memory limit
(``inference.isolation``): a file that stalls or bloats the decoder gets an error row.
``--report`` also writes ``DIR/reports/<stem>_report.pdf`` (or .png): the one-page study report
(``inference.study_report``) of the model's output.

File names may carry patients' names, so by default (``--names hashed``) the outputs never name
the files: rows, masks and reports are ``case-0001``, ``case-0002``... in the inputs' sorted
order, and ``name_hash`` is the salted sha256 of each file's path as given or relative to its
folder (``inference.deid.name_hash``, ``INFMAP_ID_SALT``); an error message that quotes the
path says the case label instead. ``--names clear`` names the files as above (for outputs that
stay with the files).

Under ``INFMAP_ENGINE=auto`` (the default) a batch of ``AUTO_BUILD_MIN_IMAGES`` images or more
builds the model's ONNX file first if it is not built yet (about 15 s once), since ONNX Runtime
then serves it about 2.5 times as fast as torch; a smaller batch uses it only if it is there.
"""

from __future__ import annotations

import argparse  # noqa: E402
import csv  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path, PurePosixPath  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import settings  # noqa: E402 - also sets HF_HUB_OFFLINE before timm loads
from inference import study_report  # noqa: E402
from inference.checks import UnsupportedImage  # noqa: E402
from inference.deid import name_hash  # noqa: E402
from inference.isolation import Budget, load_xray_isolated  # noqa: E402
from inference.model import DEFAULT_CHECKPOINT, CheckpointError, LoadedModel, load_checkpoint  # noqa: E402
from inference.predict import Prediction, predict  # noqa: E402

# The export (~15 s here) pays for itself after ~300 images: batch-8 throughput 12.6 images/s
# on torch against 30.9 on ONNX Runtime (benchmarks/results/inference_engine.json, 2 threads).
AUTO_BUILD_MIN_IMAGES = 300

COLUMNS: tuple[str, ...] = (
    "file", "predicted_class", "p_covid19", "p_non_covid", "p_normal", "infection_percent",
    "infection_percent_left", "infection_percent_right", "severity", "ood_score", "in_domain",
    "error",
)
# CSV column -> class name in the model's class list
PROBABILITY_COLUMNS: dict[str, str] = {
    "p_covid19": "COVID-19", "p_non_covid": "Non-COVID", "p_normal": "Normal",
}


@dataclass(frozen=True)
class InputFile:
    path: Path
    display: str  # the CSV ``file`` value: as given, or relative to its input folder
    mask_key: str  # relative path without suffix, used for mask file names


def has_dicom_magic(path: Path) -> bool:
    """Part-10 DICOM files carry ``DICM`` after a 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _wanted(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in settings.IMAGE_SUFFIXES:
        return True
    return suffix == "" and has_dicom_magic(path)


def collect_inputs(inputs: Iterable[str]) -> Iterator[InputFile]:
    """Expand INPUT arguments: files as given, folders recursively (sorted, deterministic).

    A path that does not exist is still yielded so it gets a row with its error.
    """
    for arg in inputs:
        root = Path(arg)
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file() and _wanted(p)):
                rel = PurePosixPath(path.relative_to(root).as_posix())
                yield InputFile(path, str(rel), str(rel.with_suffix("")))
        else:
            yield InputFile(root, arg, root.stem or root.name)


def hashed_names(items: list[InputFile]) -> list[tuple[InputFile, str]]:
    """Each input as ``case-NNNN`` (display and mask name), with the salted hash of its name."""
    width = max(4, len(str(len(items))))
    out = []
    for n, item in enumerate(items, start=1):
        label = f"case-{n:0{width}d}"
        out.append((InputFile(item.path, label, label), name_hash(item.display)))
    return out


def scrub(message: str, original: InputFile, label: str) -> str:
    """``message`` without the file's path or name (an OS error quotes them)."""
    for text in sorted({str(original.path), original.display, original.path.name}, key=len,
                       reverse=True):
        if text:
            message = message.replace(text, label)
    return message


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 1
    while candidate in used:  # e.g. a.png and a.dcm in one folder, or two inputs with one name
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def _write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), mask.astype(np.uint8) * 255):
        raise OSError(f"could not write {path}")


def prediction_row(display: str, p: Prediction) -> dict[str, str]:
    row = {
        "file": display,
        "predicted_class": p.predicted_class,
        "infection_percent": f"{p.infection_percent:.3f}",
        "infection_percent_left": f"{p.infection_percent_left:.3f}",
        "infection_percent_right": f"{p.infection_percent_right:.3f}",
        "severity": p.severity,
        # empty for a checkpoint without an out-of-domain reference (1.0.0)
        "ood_score": "" if p.ood_score is None else f"{p.ood_score:.3f}",
        "in_domain": "" if p.in_domain is None else str(p.in_domain).lower(),
        "error": "",
    }
    for column, name in PROBABILITY_COLUMNS.items():
        row[column] = f"{p.probabilities[name]:.6f}" if name in p.probabilities else ""
    return row


def error_row(display: str, message: str) -> dict[str, str]:
    row = dict.fromkeys(COLUMNS, "")
    row.update(file=display, error=message)
    return row


def _write_report(path: Path, title: str, pixels: np.ndarray, p: Prediction) -> None:
    content = study_report.ReportContent(
        title=title, pixels=pixels, lung_mask=p.lung_mask, infection_mask=p.infection_mask,
        gradcam=p.gradcam, gradcam_class=p.gradcam_class, probabilities=p.probabilities,
        predicted_class=p.predicted_class, infection_percent=p.infection_percent,
        infection_percent_left=p.infection_percent_left,
        infection_percent_right=p.infection_percent_right, severity=p.severity,
        severity_score=p.severity_score, model_version=p.model_version,
        masks_source="the model's", reading=None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(study_report.render(content, path.suffix.lstrip(".")))


def process_one(
    item: InputFile,
    model: LoadedModel,
    masks_dir: Path,
    key: str,
    budget: Budget | None = None,
    report_dir: Path | None = None,
    report_format: str = "pdf",
) -> dict[str, str]:
    """One file -> its CSV row (and report, with ``report_dir``); every failure becomes the
    row's error message."""
    try:
        # In a worker within the budget; also reports missing files and folders given as files.
        xray = load_xray_isolated(item.path, budget=budget)
        p = predict(xray, model)
        _write_mask(masks_dir / f"{key}_lung.png", p.lung_mask)
        _write_mask(masks_dir / f"{key}_infection.png", p.infection_mask)
        if report_dir is not None:
            _write_report(report_dir / f"{key}_report.{report_format}", item.display,
                          xray.pixels, p)
        return prediction_row(item.display, p)
    except UnsupportedImage as exc:
        return error_row(item.display, str(exc))
    except Exception as exc:  # one bad file must not end a batch of thousands
        return error_row(item.display, f"{type(exc).__name__}: {exc}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m inference.batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", type=settings.cli_path_str, metavar="INPUT",
                   help="image files and/or folders")
    p.add_argument("--out", required=True, type=settings.cli_path, help="output folder")
    p.add_argument("--checkpoint", type=settings.cli_path, default=DEFAULT_CHECKPOINT,
                   help=f"model checkpoint (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--timeout", type=float, default=settings.decode_seconds(), metavar="SECONDS",
                   help="stop reading a file after this many seconds and record an error row "
                   f"(default: {settings.decode_seconds():g})")
    p.add_argument("--report", choices=study_report.FORMATS, default=None,
                   help="also write a one-page study report per image (reports/<name>_report.*)")
    p.add_argument("--names", choices=("hashed", "clear"), default="hashed",
                   help="hashed (default): outputs name cases, never files; clear: file names")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be a positive number of seconds")
    return args


def prepare_engine(model: LoadedModel, n_images: int) -> None:
    """Build the ONNX file before a large batch under ``auto`` (a failure leaves torch)."""
    from inference import onnx_engine

    if (settings.inference_engine() != "auto" or n_images < AUTO_BUILD_MIN_IMAGES
            or onnx_engine.built(model)):
        return
    print(f"{n_images} images: building the ONNX engine first (once per model)", file=sys.stderr)
    onnx_engine.build(model)  # then forward_pass finds it; if it fails, torch serves


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint)  # once, before any file is read
    except CheckpointError as exc:
        print(f"error: {exc} Train one (python -m training.train) or pass --checkpoint PATH.",
              file=sys.stderr)
        return 2
    items = list(collect_inputs(args.inputs))
    if not items:
        print("error: no images found in the given inputs.", file=sys.stderr)
        return 2

    prepare_engine(model, len(items))
    out: Path = args.out
    masks_dir = out / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    report_dir = out / "reports" if args.report else None
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out / "predictions.csv"
    used: set[str] = set()
    budget = Budget(seconds=args.timeout)
    failed = 0
    hashed = args.names == "hashed"
    named = hashed_names(items) if hashed else [(item, "") for item in items]
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=(*COLUMNS, "name_hash") if hashed else COLUMNS)
        writer.writeheader()
        # File names are not printed: they may carry patient identifiers.
        for original, (item, digest) in tqdm(zip(items, named, strict=True), total=len(items),
                                             desc="InfMap", unit="image", file=sys.stderr):
            row = process_one(item, model, masks_dir, _unique(item.mask_key, used), budget,
                              report_dir, args.report or "pdf")
            failed += bool(row["error"])
            if hashed:
                row["error"] = scrub(row["error"], original, item.display)
                row["name_hash"] = digest
            writer.writerow(row)
            fh.flush()  # rows survive an interrupted run
    print(f"{len(items)} images, {failed} failed -> {csv_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
