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
