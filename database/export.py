"""What a dataset export contains, read in one transaction: per study, the human mask versions
that go out (approved, or by choice submitted too), the reading, and the model's prediction.

Only queries here (the layer rule: no inference); ``services.dataset_export`` writes the files.
Every function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from database import annotation_versions, reading_versions
from database.models import AnnotationVersion, Image, ModelVersion, Prediction
from settings import MASK_KINDS


@dataclass(frozen=True)
class ExportMask:
    version_id: int
    status: str
    author: str
    created: datetime
    mask_png: bytes  # 0/255 PNG on the image grid, exactly as stored
    model_version: str | None  # the model whose mask it was drawn on, if known


@dataclass(frozen=True)
class ExportReading:
    version_id: int
    label: str
    status: str
    author: str
    author_role: str
    created: datetime


@dataclass(frozen=True)
class ExportStudy:
    image_id: int
    sha256: str  # of the original file
    payload_path: str
    payload_sha256: str
    source_format: str | None
    patient_hash: str | None
    width: int
    height: int
    masks: dict[str, ExportMask]  # kind -> the version exported (missing kinds: left out)
    reading: ExportReading | None
    model_version: str | None  # the active model
    model_class: str | None  # its predicted class for the study


def _mask(v: AnnotationVersion) -> ExportMask:
    model = v.prediction.model_version.version if v.prediction is not None else None
    return ExportMask(v.id, v.status, v.author.name, v.created, v.mask_png, model)


def export_studies(session: Session, include_submitted: bool = False) -> list[ExportStudy]:
    """Every study with at least one exportable mask version, by id. Per (study, kind) the
    current approved version; with ``include_submitted``, a submitted one where none is
    approved (the readers' rule, ``services.readings``). A later "sent back" vetoes either."""
    chosen: dict[int, dict[str, AnnotationVersion]] = {}
    statuses = ("submitted", "approved") if include_submitted else ("approved",)
    for status in statuses:  # approved last: it wins where both exist
        for v in annotation_versions.training_annotations(session, statuses=(status,)):
            chosen.setdefault(v.image_id, {})[v.kind] = v
    if not chosen:
        return []
    readings = reading_versions.current_readings(session, statuses=statuses)
    active = session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))
    predicted: dict[int, str] = {}
    if active is not None:
        rows = session.execute(
            select(Prediction.image_id, Prediction.predicted_class).where(
                Prediction.model_version_id == active.id, Prediction.image_id.in_(list(chosen))
            )
        )
        predicted = {image_id: cls for image_id, cls in rows}
    out = []
    rows_by_id = select(Image).where(Image.id.in_(list(chosen))).order_by(Image.id)
    for image in session.scalars(rows_by_id):
        meta = dict(image.meta or {})
        r = readings.get(image.id)
        reading = None if r is None else ExportReading(
            r.id, r.label, r.status, r.author.name, r.author.role, r.created
        )
        out.append(
            ExportStudy(
                image_id=image.id,
                sha256=image.sha256,
                payload_path=image.payload_path,
                payload_sha256=image.payload_sha256,
                source_format=meta.get("format"),
                patient_hash=meta.get("patient_hash"),
                width=image.width,
                height=image.height,
                masks={k: _mask(v) for k, v in chosen[image.id].items() if k in MASK_KINDS},
                reading=reading,
                model_version=active.version if active is not None else None,
                model_class=predicted.get(image.id),
            )
        )
    return out
