"""De-identification before anything is stored.

- The DICOM header the loader reads is a copy de-identified by the PS3.15 Basic Application
  Level Confidentiality Profile (:func:`basic_profile`, dicom-anonymizer's Table E.1-1); the
  loader then keeps only a few technical fields of it (``inference.dicom``).
- The patient ID leaves the loader only as a salted hash (:func:`patient_hash`), UIDs only as
  salted stand-ins (:func:`deidentified_uid`), an uploaded file's name only as a neutral label
  and a salted hash (:func:`name_hash`, :func:`neutral_label`).
"""

from __future__ import annotations

import copy
import hashlib
from functools import cache
from typing import Any

from pydicom.dataset import Dataset

import settings

PROFILE_EDITION = "dicomfields_2026c"  # the DICOM edition of Table E.1-1 applied
PIXEL_DATA = 0x7FE00010


@cache
def _profile_actions() -> dict[tuple[int, ...], Any]:
    """Table E.1-1's action per tag; UIDs are removed from the copy rather than replaced (the
    loader derives its own salted stand-ins from the originals, see :func:`deidentified_uid`),
    which also keeps the library's process-wide table of replaced UIDs from growing."""
    from dicomanonymizer import simpledicomanonymizer as profile

    uid_actions = (profile.replace_UID, profile.delete_or_empty_or_replace_UID)
    return {
        tag: profile.delete if action in uid_actions else action
        for tag, action in profile.initialize_actions(PROFILE_EDITION).items()
    }


def basic_profile(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its pixel data, de-identified by the PS3.15 basic profile
    (names, IDs, dates, institutions, addresses, free text and private tags removed, emptied
    or replaced). ``ds`` itself is not changed: its pixels are still to be decoded. An element
    that cannot be parsed (an unknown VR, a broken value) is left out of the copy: the profile
    cannot judge it, and the loader could not read it either."""
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset

    header = Dataset()
    for tag in list(ds.keys()):
        if tag == PIXEL_DATA:
            continue
        try:
            element = ds[tag]
        except Exception:  # noqa: BLE001 - pydicom raises many types for a malformed element
            continue
        header.add(copy.deepcopy(element))
    if hasattr(ds, "file_meta"):
        header.file_meta = copy.deepcopy(ds.file_meta)
    anonymize_dataset(header, base_rules_gen=_profile_actions, delete_private_tags=True)
    return header


def patient_hash(patient_id: str | None) -> str | None:
    """Salted sha256 of a patient ID (hex), or None when there is no ID.

    The salt comes from ``INFMAP_ID_SALT``. The built-in default is for development only: with a
    public salt, common IDs could be recovered by brute force, so deployments must set their own.
    """
    if patient_id is None:
        return None
    pid = str(patient_id).strip()
    if not pid:
        return None
    salt = settings.id_salt()
    return hashlib.sha256(f"{salt}\x00{pid}".encode()).hexdigest()


def name_hash(name: str) -> str:
    """Salted sha256 (hex) of an uploaded file's name: the name itself is never stored (it may
    carry a patient's name), but the same name gives the same hash with this deployment's salt."""
    return hashlib.sha256(f"{settings.id_salt()}\x00name\x00{name}".encode()).hexdigest()


def neutral_label(name: str, metadata: dict[str, Any]) -> str:
    """What the worklist calls an uploaded study instead of its file name: the kind of image and
    the start of :func:`name_hash` (e.g. ``DX upload 3f2a91c0e1``), so two uploads differ."""
    kind = metadata.get("modality") or metadata.get("format") or "image"
    return f"{kind} upload {name_hash(name)[:10]}"


def deidentified_uid(uid: str | None) -> str | None:
    """A stable stand-in for a DICOM UID (study, series, instance): ``2.25.<128-bit integer>``
    from the salted sha256 of the original, as the DICOM Basic Profile replaces UIDs. The same
    original always maps to the same stand-in, so a study's files stay together."""
    if uid is None:
        return None
    value = str(uid).strip().rstrip("\x00")
    if not value:
        return None
    digest = hashlib.sha256(f"{settings.id_salt()}\x00uid\x00{value}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"
