"""An uploaded file -> a stored study -> one prediction per active model version.

``ingest_file`` never raises for bad input: the outcome says what happened, with the loader's
human message when the file is refused, so one bad file in a batch does not stop the others.
Each file is stored once (the original bytes' sha256) and predicted once per model version; the
model runs outside any write transaction so other users' saves are not held up by it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from database import images, predictions
from database.models import Image
from inference.checks import UnsupportedImage
from inference.deid import name_hash, neutral_label
from inference.isolation import Budget, load_xray_isolated
from inference.loading import XRay
from inference.model import LoadedModel
from inference.predict import predict
from inference.storage import xray_to_npz_bytes
from services.storage import storage_problem

log = logging.getLogger(__name__)

SessionFactory = Callable[..., AbstractContextManager[Any]]


@dataclass(frozen=True)
class ModelHandle:
    """A registered model version and the loaded network that produces its predictions."""

    version_id: int
    version: str
    model: LoadedModel


@dataclass(frozen=True)
class IngestOutcome:
    name: str
    image_id: int | None = None
    created: bool = False  # False: the same file was already stored (dedupe by content)
    predicted: tuple[str, ...] = ()  # model versions that ran now (empty when already stored)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def ensure_prediction(
    scope: SessionFactory, image_id: int, xray: XRay, handle: ModelHandle
) -> bool:
    """Predict and store for (image, model version) unless stored. True if the model ran."""
    with scope(write=False) as session:
        if predictions.get_prediction(session, image_id, handle.version_id) is not None:
            return False
    prediction = predict(xray, handle.model)
    # The registered name is authoritative (a checkpoint without a version is registered under
    # a name derived from its hash).
    prediction = dataclasses.replace(prediction, model_version=handle.version)
    with scope() as session:
        predictions.store_prediction(session, image_id, handle.version_id, prediction)
    return True


def ensure_domain_score(
    scope: SessionFactory, image_id: int, xray: XRay, handle: ModelHandle
) -> bool:
    """Score a prediction stored without an out-of-domain score (before the database had the
    column) with the same model version. True if it was scored now; False when there is
    nothing to do (no prediction, already scored, or a checkpoint without the reference)."""
    if not handle.model.calibration.has_ood:
        return False
    with scope(write=False) as session:
        row = predictions.get_prediction(session, image_id, handle.version_id)
        if row is None or row.ood_score is not None:
            return False
        prediction_id = int(row.id)
    fresh = predict(xray, handle.model)
    if fresh.ood_score is None or fresh.in_domain is None:
        return False
    with scope() as session:
        current = predictions.get_prediction(session, image_id, handle.version_id)
        if current is not None and current.ood_score is None:  # not scored meanwhile
            predictions.set_domain(session, prediction_id, fresh.ood_score, fresh.in_domain)
    return True


def store_xray(
    session: Session, xray: XRay, name: str, source: str = "upload"
) -> tuple[Image, bool]:
    """Store ``xray`` (its de-identified payload, deduplicated by the original file's hash) in
    the caller's transaction. Returns (image row, created). An upload's file name may carry a
    patient's name: it is stored as a neutral label and a salted hash (``inference.deid``);
    the bundled samples and folder imports keep their dataset-relative names."""
    height, width = xray.pixels.shape[:2]
    metadata = dict(xray.metadata)
    if source == "upload":
        metadata["name_hash"] = name_hash(name)
        name = neutral_label(name, xray.metadata)
        xray = dataclasses.replace(xray, source_name=name)  # the payload keeps a name as well
    return images.add_image(
        session,
        xray_to_npz_bytes(xray),
        xray.sha256,
        name,
        metadata,
        width=width,
        height=height,
        source=source,
    )


def ingest_xray(
    scope: SessionFactory,
    xray: XRay,
    name: str,
    models: Iterable[ModelHandle],
    source: str = "upload",
) -> IngestOutcome:
    with scope() as session:
        image, created = store_xray(session, xray, name, source)
        image_id = int(image.id)
    ran = tuple(h.version for h in models if ensure_prediction(scope, image_id, xray, h))
    return IngestOutcome(name=name, image_id=image_id, created=created, predicted=ran)


def ingest_file(
    scope: SessionFactory,
    data: bytes,
    name: str,
    models: Iterable[ModelHandle],
    source: str = "upload",
    budget: Budget | None = None,
) -> IngestOutcome:
    """Load (in a worker process, within ``budget``), store (deduplicated) and predict one file.
    Bad input -> ``outcome.error``."""
    try:
        xray = load_xray_isolated(bytes(data), name=name, budget=budget)
    except UnsupportedImage as exc:
        return IngestOutcome(name=name, error=str(exc))
    try:
        return ingest_xray(scope, xray, name, models, source=source)
    except Exception as exc:  # never a traceback in the UI; the log has the details
        log.exception("ingest failed (%s)", type(exc).__name__)
        return IngestOutcome(
            name=name,
            error=storage_problem(exc)
            or f"The file was read but could not be stored or analysed ({type(exc).__name__}).",
        )
