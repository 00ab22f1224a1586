"""De-identification (issue 15.4): a DICOM with a patient's name, ID, birth date and institution
in its header and in its file name is uploaded (the Worklist's path: ``UploadSource`` through
``datastore.ingest_source``, with a model predicting) and run through the batch CLI; none of
those values is then in the database file, the data folder, the logs or the batch outputs."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_samples import dicom_bytes, synthetic_dicom

from inference.batch import main as batch_main
from inference.deid import basic_profile, name_hash
from services import bootstrap, datastore, ingest
from services.storage import open_store

NAME, PATIENT_ID, BIRTH_DATE = "Doeberl^Janina^Q", "MRN-8675309", "19710402"
INSTITUTION = "St Elsewhere General Hospital"
SECRETS = ("Doeberl", "Janina", "8675309", BIRTH_DATE, "Elsewhere")
FILE_NAME = f"Doeberl_Janina_{PATIENT_ID}_{BIRTH_DATE}_Elsewhere.dcm"


def phi_dicom() -> bytes:
    pixels = (np.add.outer(np.arange(256), np.arange(256)) * 8).astype(np.uint16)
    ds = synthetic_dicom(pixels, bits_stored=12, patient_id=PATIENT_ID)
    ds.PatientName = NAME
    ds.PatientBirthDate = BIRTH_DATE
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 Elsewhere Road"
    ds.ReferringPhysicianName = "Doeberl^Otto"
    ds.StudyDescription = "CXR of Janina Doeberl"
    return dicom_bytes(ds)


def found(blob: bytes) -> set[str]:
    """The secrets in ``blob`` as UTF-8, UTF-16 or UTF-32 text (numpy keeps strings as UTF-32),
    inside zip archives too (the stored payloads are .npz)."""
    texts = [blob]
    if blob[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            texts += [archive.read(member) for member in archive.namelist()]
    return {
        secret for secret in SECRETS for text in texts
        for encoding in ("utf-8", "utf-16-le", "utf-32-le") if secret.encode(encoding) in text
    }


def found_in_tree(root: Path) -> dict[str, set[str]]:
    """Per file under ``root`` (its relative path included), the secrets it holds."""
    hits = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        secrets = found(path.read_bytes()) | {s for s in SECRETS if s in relative}
        if secrets:
            hits[relative] = secrets
    return hits


def test_the_basic_profile_removes_what_the_header_names() -> None:
    ds = pydicom.dcmread(io.BytesIO(phi_dicom()))
    clean = basic_profile(ds)
    assert not found(str(clean).encode())
    assert clean.Modality == "DX" and clean.BodyPartExamined == "CHEST"  # kept: not identifying
    assert "PixelData" not in clean and ds.PatientName == NAME  # a copy: ds is unchanged


def test_no_identifier_reaches_the_database_the_data_folder_the_logs_or_the_batch(
    tmp_path: Path, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    from inference.model import load_checkpoint

    data = phi_dicom()
    assert found(data) == set(SECRETS) and all(s in FILE_NAME for s in SECRETS)  # controls
    state = tmp_path / "state"
    monkeypatch.setenv("INFMAP_DATA_DIR", str(state / "data"))
    caplog.set_level(logging.DEBUG)
    store = open_store(f"sqlite:///{state / 'infmap.sqlite'}")
    row, _ = bootstrap.register_checkpoint(store.scope, random_checkpoint, load_checkpoint)
    handle = ingest.ModelHandle(row.id, row.version, load_checkpoint(random_checkpoint))

    (outcome,) = datastore.ingest_source(
        store.scope, datastore.UploadSource([(FILE_NAME, data)]), [handle]
    )
    assert outcome.ok and outcome.created and outcome.predicted == (row.version,)
    with store.scope(write=False) as s:
        from database.models import Image

        image = s.get(Image, outcome.image_id)
        assert image.display_name.startswith("DX upload ")
        assert image.meta["name_hash"] == name_hash(FILE_NAME)
        assert image.meta["patient_hash"] and image.meta["modality"] == "DX"
    store.engine.dispose()

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / FILE_NAME).write_bytes(data)
    out = tmp_path / "batch"
    assert batch_main([str(inputs), "--out", str(out), "--checkpoint", str(random_checkpoint),
                       "--report", "pdf"]) == 0

    assert found_in_tree(state) == {}  # the SQLite file (and its WAL) and the data folder
    assert found_in_tree(out) == {}  # predictions.csv, masks, the report
    said = caplog.text + "".join(capfd.readouterr())
    assert not {s for s in SECRETS if s in said}
