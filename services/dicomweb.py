"""The hospital's PACS over DICOMweb (dicomweb-client): find studies (QIDO-RS), bring chosen
CR/DX studies into the worklist (WADO-RS), send a study's masks back as DICOM SEG (STOW-RS).

The server is ``INFMAP_DICOMWEB_URL`` with optional basic credentials from the environment
(``settings.dicomweb_credentials``). Search results carry the patient only as InfMap's salted
hash (``inference.deid.patient_hash``), so a study can be found by the hash the app shows; the
original study UID is kept in memory just long enough to retrieve it and is never stored.
Imports go through the datastore seam (``DicomWebSource`` -> ``services.datastore.ingest_source``)
and so through the same isolated decoding and de-identification as uploads. A study is
downloaded completely before anything of it is stored: a server or network error stores nothing.
Every failure is a ``DicomWebError`` whose text says what the server answered, in plain words.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass
from pydicom.dataset import Dataset

import settings
from inference.deid import patient_hash
from services.datastore import SourceItem, ingest_source
from services.ingest import IngestOutcome, ModelHandle, SessionFactory
from services.seg_export import study_seg

log = logging.getLogger(__name__)

RADIOGRAPHY = ("CR", "DX")  # what the model reads (inference.dicom_header.ACCEPTED_MODALITIES)
SEARCH_LIMIT = 200
MIN_HASH_PREFIX = 8  # the worklist shows the hash's start; fewer characters match too much


class DicomWebError(RuntimeError):
    """The PACS could not be used; the message is for the user."""


@dataclass(frozen=True)
class StudyHit:
    study_uid: str  # the PACS's own UID: to retrieve it now, never stored or shown
    study_date: str  # YYYY-MM-DD or ""
    modalities: tuple[str, ...]
    patient_hash: str | None
    instances: int | None
    description: str


@dataclass(frozen=True)
class ImportReport:
    outcomes: list[IngestOutcome]
    skipped: int  # instances of other kinds in the studies (reports, SEG, CT, ...)

    @property
    def imported(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)


def _plain(exc: BaseException, url: str) -> DicomWebError:
    """What went wrong, in words: never a traceback, never credentials."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code, reason = exc.response.status_code, exc.response.reason or ""
        if code in (401, 403):
            return DicomWebError(
                f"The DICOMweb server refused the credentials (HTTP {code} {reason}). Check "
                "INFMAP_DICOMWEB_USER and INFMAP_DICOMWEB_PASSWORD."
            )
        return DicomWebError(f"The DICOMweb server answered HTTP {code} {reason}.".strip())
    if isinstance(exc, requests.Timeout):
        return DicomWebError(f"The DICOMweb server at {url} did not answer in time.")
    if isinstance(exc, requests.ConnectionError):
        return DicomWebError(f"The DICOMweb server at {url} cannot be reached.")
    return DicomWebError(f"The DICOMweb exchange failed ({type(exc).__name__}).")


@dataclass(frozen=True)
class Pacs:
    """A configured DICOMweb server."""

    url: str
    client: DICOMwebClient

    def call(self, what: Callable[[], Any]) -> Any:
        try:
            return what()
        except DicomWebError:
            raise
        except Exception as exc:  # requests and dicomweb-client raise many types
            log.warning("DICOMweb call failed: %s", type(exc).__name__)
            raise _plain(exc, self.url) from exc


def connect(url: str | None = None, credentials: tuple[str, str] | None = None) -> Pacs:
    """The server of ``INFMAP_DICOMWEB_URL`` (or ``url``), with the configured credentials."""
    url = (url or settings.dicomweb_url() or "").rstrip("/")
    if not url:
        raise DicomWebError("No DICOMweb server is configured (set INFMAP_DICOMWEB_URL).")
    credentials = credentials or settings.dicomweb_credentials()
    session = create_session_from_user_pass(*credentials) if credentials else create_session()
    return Pacs(url, DICOMwebClient(url, session=session, timeout=60))


def configured() -> bool:
    return settings.dicomweb_url() is not None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _hit(found: dict[str, Any]) -> StudyHit:
    ds = Dataset.from_json(found)
    raw_date = _text(ds, "StudyDate")
    shown = f"{raw_date[:4]}-{raw_date[4:6]}-{raw_date[6:8]}" if len(raw_date) == 8 else ""
    modalities = ds.get("ModalitiesInStudy") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    count = ds.get("NumberOfStudyRelatedInstances")
    return StudyHit(
        study_uid=_text(ds, "StudyInstanceUID"),
        study_date=shown,
        modalities=tuple(sorted(str(m) for m in modalities)),
        patient_hash=patient_hash(_text(ds, "PatientID") or None),
        instances=int(count) if count not in (None, "") else None,
        description=_text(ds, "StudyDescription")[:64],
    )


def search_studies(
    pacs: Pacs,
    date_from: date | None = None,
    date_to: date | None = None,
    modalities: Sequence[str] = RADIOGRAPHY,
    patient: str | None = None,
) -> list[StudyHit]:
    """Studies with one of ``modalities`` in the date range (inclusive), newest first; with
    ``patient``, only those whose patient hash starts with it (at least 8 characters)."""
    wanted = patient.strip().lower() if patient else None
    if wanted is not None and len(wanted) < MIN_HASH_PREFIX:
        raise DicomWebError(f"Give at least {MIN_HASH_PREFIX} characters of the patient hash.")
    filters: dict[str, Any] = {}
    if date_from or date_to:
        start = date_from.strftime("%Y%m%d") if date_from else ""
        end = date_to.strftime("%Y%m%d") if date_to else ""
        filters["StudyDate"] = f"{start}-{end}"
    fields = ["PatientID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
              "StudyDescription"]
    hits: dict[str, StudyHit] = {}
    for modality in modalities or RADIOGRAPHY:
        found = pacs.call(functools.partial(
            pacs.client.search_for_studies,
            search_filters={**filters, "ModalitiesInStudy": modality},
            fields=fields, limit=SEARCH_LIMIT,
        ))
        for item in found:
            hit = _hit(item)
            if hit.study_uid and (wanted is None or (hit.patient_hash or "").startswith(wanted)):
                hits[hit.study_uid] = hit
    return sorted(hits.values(), key=lambda h: (h.study_date, h.study_uid), reverse=True)


@dataclass(frozen=True)
class DicomWebSource:
    """Instances already retrieved from the PACS, as datastore items (``ImageSource``)."""

    files: Sequence[tuple[str, bytes]]
    source: str = "import"  # images.source: brought in from outside by a user's choice

    def items(self) -> Iterator[SourceItem]:
        for name, data in self.files:
            yield SourceItem(name, functools.partial(bytes, data))


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def retrieve(pacs: Pacs, hits: Iterable[StudyHit]) -> tuple[list[tuple[str, bytes]], int]:
    """Every CR/DX instance of the chosen studies as (name, Part 10 bytes), all downloaded
    before anything is stored; the number of other instances left out. Names carry no UIDs."""
    files: list[tuple[str, bytes]] = []
    skipped = 0
    for hit in hits:
        datasets = pacs.call(functools.partial(pacs.client.retrieve_study, hit.study_uid))
        for ds in datasets:
            modality = _text(ds, "Modality").upper()
            if modality not in RADIOGRAPHY:
                skipped += 1
                continue
            view = _text(ds, "ViewPosition") or "view?"
            files.append((f"PACS {hit.study_date or 'undated'} {modality} {view} "
                          f"#{len(files) + 1}.dcm", _part10(ds)))
    return files, skipped


def import_studies(
    scope: SessionFactory,
    pacs: Pacs,
    hits: Sequence[StudyHit],
    models: Iterable[ModelHandle],
    before_each: Callable[[int, SourceItem], None] | None = None,
) -> ImportReport:
    """Bring the chosen studies into the worklist. Raises ``DicomWebError`` (nothing stored)
    when the server fails; an instance the loader refuses (a lateral view, ...) is reported in
    its outcome and the others are imported."""
    files, skipped = retrieve(pacs, hits)
    outcomes = ingest_source(scope, DicomWebSource(files), models, before_each=before_each)
    return ImportReport(outcomes, skipped)


def push_seg(
    scope: SessionFactory,
    pacs: Pacs,
    image_id: int,
    versions: dict[str, int] | None = None,
    model_version: str | None = None,
) -> str:
    """Send the study's SEG (``services.seg_export.study_seg``; with its Secondary Capture for
    a PNG/JPEG study) to the PACS; returns what was sent, in words."""
    export = study_seg(scope, image_id, versions, model_version)
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in export.files().values()]
    answer = pacs.call(functools.partial(pacs.client.store_instances, datasets))
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
        raise DicomWebError(
            f"The DICOMweb server refused {len(failed)} of {len(datasets)} objects "
            f"(failure reason {', '.join(reasons)})."
        )
    what = "the SEG" if len(datasets) == 1 else "the SEG and its Secondary Capture"
    return f"Sent {what} ({export.series_description}) to the PACS."
