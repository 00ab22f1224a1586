"""A study's masks as DICOM SEG: which versions go in, read from the database.

By default each mask kind is the study's current reading (``services.readings``: the newest
approved, else submitted, human version), else the active model's mask. A chosen annotation
version or a chosen model version overrides that. A PNG/JPEG study's SEG comes with the Secondary
Capture it refers to (``services.dicom_seg``).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from database import annotation_versions, images, model_versions, predictions
from services import readings
from services.dicom_seg import (
    SegError,
    Segment,
    build_seg,
    dicom_reference,
    has_dicom_identity,
    secondary_capture,
)
from services.ingest import SessionFactory
from services.studies import load_xray_payload
from settings import MASK_KINDS


@dataclass(frozen=True)
class SegExport:
    image_id: int
    seg: bytes  # the SEG (DICOM Part 10 file)
    secondary_capture: bytes | None  # the image it refers to, for PNG/JPEG studies
    series_description: str

    def files(self) -> dict[str, bytes]:
        out = {f"study-{self.image_id}-seg.dcm": self.seg}
        if self.secondary_capture is not None:
            out[f"study-{self.image_id}-image.dcm"] = self.secondary_capture
        return out

    def download(self) -> tuple[str, bytes, str]:
        """(file name, bytes, MIME type): the SEG alone, or a ZIP with its Secondary Capture."""
        files = self.files()
        if len(files) == 1:
            ((name, data),) = files.items()
            return name, data, "application/dicom"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return f"study-{self.image_id}-seg.zip", buffer.getvalue(), "application/zip"


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _human_segment(session: Session, image_id: int, kind: str, version_id: int) -> Segment:
    v = annotation_versions.get_version(session, version_id)
    if v is None or v.image_id != image_id or v.kind != kind:
        raise SegError(f"Version {version_id} is not one of this study's {kind} masks.")
    model = v.prediction.model_version.version if v.prediction is not None else None
    return Segment(
        kind=kind,
        mask=annotation_versions.version_mask(v),
        model_version=model,
        version_id=v.id,
        status=v.status,
        author=v.author.name,
    )


def _model_segment(
    session: Session, image_id: int, kind: str, model_version: str | None
) -> Segment:
    row = (
        model_versions.get_model_version(session, model_version)
        if model_version is not None
        else model_versions.get_active_model_version(session)
    )
    if row is None:
        raise SegError(f"There is no model version {model_version or '(active)'}.")
    pred = predictions.get_prediction(session, image_id, row.id)
    if pred is None:
        raise SegError(f"Model {row.version} has no prediction for this study yet; open it first.")
    lung, infection = predictions.prediction_masks(pred)
    return Segment(kind=kind, mask=lung if kind == "lung" else infection, model_version=row.version)


def study_seg(
    scope: SessionFactory,
    image_id: int,
    versions: dict[str, int] | None = None,
    model_version: str | None = None,
) -> SegExport:
    """The SEG of study ``image_id``: ``versions`` maps a mask kind to a chosen annotation
    version; ``model_version`` takes that model's masks for the kinds not chosen (instead of the
    current reading). Raises ``SegError`` (a plain message) or ``LookupError`` (no such study)."""
    chosen = dict(versions or {})
    reading = {} if model_version is not None else readings.reading_for(scope, image_id)
    with scope(write=False) as session:
        img = images.get_image(session, image_id)
        if img is None:
            raise LookupError(f"no study {image_id}")
        metadata, sha256, rows, columns = dict(img.meta or {}), img.sha256, img.height, img.width
        segments = []
        for kind in MASK_KINDS:
            version_id = chosen.get(kind) or (reading[kind].id if kind in reading else None)
            if version_id is not None:
                segments.append(_human_segment(session, image_id, kind, version_id))
            else:
                segments.append(_model_segment(session, image_id, kind, model_version))
    if has_dicom_identity(metadata):
        reference, made = dicom_reference(metadata, rows, columns), None
    else:
        xray = load_xray_payload(scope, image_id)
        reference = made = secondary_capture(xray.pixels, sha256, metadata.get("patient_hash"))
    models = sorted({s.model_version for s in segments if s.model_version})
    seg = build_seg(reference, segments, "InfMap model " + (", ".join(models) or "none"))
    return SegExport(
        image_id=image_id,
        seg=dicom_bytes(seg),
        secondary_capture=None if made is None else dicom_bytes(made),
        series_description=str(seg.SeriesDescription),
    )
