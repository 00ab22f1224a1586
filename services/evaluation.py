"""The Evaluation page's work: where to read a labelled set from (a typed folder, checked), run
``training.evaluate.evaluate_set`` on it with the active model (the CLI's own code path), and
the worst cases, opened in Review by storing them as studies.

A typed folder is resolved (``~``, relative to the repository, symlinks followed) and accepted
only when it exists, is a directory and lies inside ``settings.eval_roots()``; the set is
bounded by ``training.eval_sources.MAX_IMAGES`` and the limit the user gives.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import settings
from inference.model import CLASS_NAMES, LoadedModel
from services.display import thumbnail_uri
from services.ingest import ModelHandle, SessionFactory, ingest_file
from training.data import SPLITS
from training.eval_sources import (
    MAX_IMAGES,
    EvalSet,
    EvalSourceError,
    load_database_set,
    load_folder,
)
from training.evaluate import EvalResult, evaluate_set
from training.report import json_safe

Progress = Callable[[float, str], None]  # (fraction 0..1, what is happening)
DEFAULT_LIMIT = 300
WORST_CASES = 8
SPLIT_NAMES: tuple[str, ...] = SPLITS


class EvaluationInputError(ValueError):
    """What the user gave cannot be evaluated; ``str(e)`` says why in plain words."""


def resolve_folder(text: str, roots: Iterable[Path] | None = None) -> Path:
    """The folder a user typed, resolved, or ``EvaluationInputError`` saying why not."""
    typed = (text or "").strip()
    if not typed:
        raise EvaluationInputError("Type the path of a labelled folder.")
    if "\x00" in typed or len(typed) > 4096:
        raise EvaluationInputError("That is not a folder path.")
    path = Path(typed).expanduser()
    if not path.is_absolute():
        path = settings.REPO_ROOT / path
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise EvaluationInputError(f"There is no folder at {typed}.") from None
    if not resolved.is_dir():
        raise EvaluationInputError(f"{typed} is a file, not a folder.")
    allowed = tuple(roots) if roots is not None else settings.eval_roots()
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise EvaluationInputError(
            f"{typed} is outside the folders this app may read ("
            + ", ".join(str(r) for r in allowed)
            + "; INFMAP_EVAL_ROOTS sets them)."
        )
    return resolved


@dataclass(frozen=True)
class WorstCase:
    index: int  # row in the evaluated set
    name: str
    true: str
    predicted: str
    p_true: float  # the probability the model gave the true class
    lung_dice: float | None
    thumbnail: str  # PNG data URI
    image_id: int | None  # the study (database sets)
    file: Path | None  # the file (folder sets): stored as a study when opened


@dataclass
class EvaluationReport:
    """What the page keeps of one evaluation (no image arrays: it lives in the session)."""

    metrics: dict[str, Any]  # training.evaluate.evaluate_set's, with "curves" and "timing"
    per_image: list[dict[str, Any]]
    worst: list[WorstCase]
    title: str
    layout: str
    notes: list[str]
    model_version: str
    total_available: int

    @property
    def n_images(self) -> int:
        return int(self.metrics["n_images"])


def _stages(progress: Progress | None) -> tuple[Callable[[int, int], None], Callable[[int, int],
                                                                                      None]]:
    """Reading takes the first 30% of the bar, the model the rest."""
    def reading(done: int, total: int) -> None:
        if progress is not None:
            progress(0.3 * done / max(total, 1), f"Reading images ({done}/{total})")

    def predicting(done: int, total: int) -> None:
        if progress is not None:
            progress(0.3 + 0.7 * done / max(total, 1), f"Running the model ({done}/{total})")

    return reading, predicting


def _run(source: EvalSet, loaded: LoadedModel, predicting: Callable[[int, int], None]
         ) -> EvaluationReport:
    result = evaluate_set(loaded, source.arrays, source.has_lung_mask, source.infection_masks,
                          batch_size=8, on_batch=predicting)
    return EvaluationReport(
        metrics=result.metrics, per_image=result.per_image, worst=worst_cases(result, source),
        title=source.title, layout=source.layout, notes=list(source.notes),
        model_version=loaded.version, total_available=source.total_available,
    )


def _limit(limit: int) -> int:
    if not 1 <= int(limit) <= MAX_IMAGES:
        raise EvaluationInputError(f"The number of images must be between 1 and {MAX_IMAGES}.")
    return int(limit)


def evaluate_folder(
    folder: Path, loaded: LoadedModel, split: str = "Test", limit: int = DEFAULT_LIMIT,
    progress: Progress | None = None,
) -> EvaluationReport:
    """``folder``: from ``resolve_folder``. Bad sets raise ``EvaluationInputError``."""
    reading, predicting = _stages(progress)
    try:
        source = load_folder(folder, loaded.config.input_size, split, _limit(limit), reading)
    except (EvalSourceError, FileNotFoundError) as exc:
        raise EvaluationInputError(str(exc)) from None
    return _run(source, loaded, predicting)


def evaluate_database(
    scope: SessionFactory, loaded: LoadedModel, limit: int = DEFAULT_LIMIT,
    progress: Progress | None = None,
) -> EvaluationReport:
    reading, predicting = _stages(progress)
    try:
        with scope(write=False) as session:
            source = load_database_set(session, loaded.config.input_size, _limit(limit),
                                       reading)
    except EvalSourceError as exc:
        raise EvaluationInputError(str(exc)) from None
    return _run(source, loaded, predicting)


def worst_cases(result: EvalResult, source: EvalSet, n: int = WORST_CASES) -> list[WorstCase]:
    """The images the model got most wrong: lowest probability of the true class first,
    then lowest lung Dice."""
    data, preds, rows = result.data, result.preds, result.per_image
    labels = np.asarray(data.labels)
    p_true = preds.probs[np.arange(len(labels)), labels]
    has = source.has_lung_mask
    dice = np.array([r["lung_dice"] if has[i] else 1.0 for i, r in enumerate(rows)])
    order = np.lexsort((dice, p_true))[:n]
    return [
        WorstCase(
            index=int(i), name=data.names[i], true=CLASS_NAMES[labels[i]],
            predicted=CLASS_NAMES[preds.predicted[i]], p_true=float(p_true[i]),
            lung_dice=float(dice[i]) if has[i] else None,
            thumbnail=thumbnail_uri(data.images[i].astype(np.float32) / 255.0),
            image_id=source.image_ids[i] if source.image_ids else None,
            file=source.files[i] if source.files else None,
        )
        for i in order
    ]


def open_case(scope: SessionFactory, case: WorstCase, handles: list[ModelHandle]) -> int:
    """The study to open in Review: the case's own, or the file stored as an imported study
    (once by content, through the same loader as uploads)."""
    if case.image_id is not None:
        return case.image_id
    if case.file is None:
        raise EvaluationInputError("This case has no file to open.")
    outcome = ingest_file(scope, case.file.read_bytes(), case.name, handles, source="import")
    if outcome.image_id is None:
        raise EvaluationInputError(outcome.error or "The file could not be stored.")
    return outcome.image_id


def downloads(run: EvaluationReport) -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, MIME type): the metrics, the per-image table, the figures' data."""
    metrics = {k: v for k, v in run.metrics.items() if k != "curves"}
    report = {"model_version": run.model_version, "set": run.title,
              "layout": run.layout, "notes": run.notes, **metrics}
    buffer = io.StringIO()
    rows = run.per_image
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {
        "metrics.json": (json.dumps(json_safe(report), indent=1, allow_nan=False).encode(),
                         "application/json"),
        "per_image.csv": (buffer.getvalue().encode(), "text/csv"),
        "curves.json": (json.dumps(json_safe(run.metrics["curves"]), allow_nan=False).encode(),
                        "application/json"),
    }
