"""De-identification: the only form in which a patient ID leaves the loader (a salted hash)."""

from __future__ import annotations

import hashlib

import settings


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
