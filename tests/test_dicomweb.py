"""DICOMweb against a real Orthanc (issue 12.3): upload RG1 to the PACS, find it through InfMap
by date, modality and patient hash (QIDO-RS), import it into the worklist (WADO-RS, the same
isolated decoding as uploads), push its SEG back (STOW-RS) and read that from Orthanc. Server
errors come back in plain words and a failed retrieval stores nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dicom_samples import pydicom_data_file
from orthanc_server import OrthancServer, OrthancUnavailable, dicomweb_plugin, start_orthanc
from sqlalchemy import func, select

import settings
from database.models import Image
from inference.deid import deidentified_uid, patient_hash
from services import bootstrap, dicomweb, ingest
from services.storage import open_store


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    try:
        dicomweb_plugin()
    except OrthancUnavailable as exc:
        if settings.require_servers():
            pytest.fail(f"INFMAP_REQUIRE_SERVERS=1 but {exc}")
        pytest.skip(str(exc))
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        server.upload(pydicom_data_file("RG1_UNCR.dcm").read_bytes())
        yield server
    finally:
        server.stop()


@pytest.fixture
def store_and_model(tmp_path: Path, random_checkpoint: Path):  # noqa: ANN201
    from inference.model import load_checkpoint

    store = open_store(f"sqlite:///{tmp_path / 'infmap.sqlite'}")
    row, _ = bootstrap.register_checkpoint(store.scope, random_checkpoint, load_checkpoint)
    return store, ingest.ModelHandle(row.id, row.version, load_checkpoint(random_checkpoint))


def _images(store) -> int:  # noqa: ANN001
    with store.scope(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Image)))


RG1 = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def test_find_import_and_push_back_through_orthanc(
    orthanc: OrthancServer, store_and_model  # noqa: ANN001
) -> None:
    store, model = store_and_model
    pacs = dicomweb.connect(orthanc.dicomweb_url, orthanc.auth)
    rg1_hash = patient_hash(str(RG1.PatientID))
    on_the_day = date(int(RG1.StudyDate[:4]), int(RG1.StudyDate[4:6]), int(RG1.StudyDate[6:]))

    hits = dicomweb.search_studies(pacs, on_the_day, on_the_day, ["CR"], rg1_hash[:12])
    assert len(hits) == 1
    hit = hits[0]
    assert hit.patient_hash == rg1_hash and hit.modalities == ("CR",) and hit.instances == 1
    assert hit.study_date == on_the_day.isoformat()
    assert dicomweb.search_studies(pacs, date(2020, 1, 1), None) == []  # after the study
    assert dicomweb.search_studies(pacs, modalities=["DX"]) == []
    assert dicomweb.search_studies(pacs, patient="0" * 12) == []

    report = dicomweb.import_studies(store.scope, pacs, hits, [model])
    assert report.imported == 1 and report.skipped == 0, report
    (outcome,) = report.outcomes
    assert outcome.created and outcome.predicted == (model.version,)
    with store.scope(write=False) as s:
        image = s.get(Image, outcome.image_id)
        meta, source = dict(image.meta), image.source
    assert source == "import" and meta["patient_hash"] == rg1_hash
    assert meta["study_uid"] == deidentified_uid(str(RG1.StudyInstanceUID))
    assert "PACS" in outcome.name and str(RG1.StudyInstanceUID) not in outcome.name
    again = dicomweb.import_studies(store.scope, pacs, hits, [model])
    assert again.outcomes[0].image_id == outcome.image_id and not again.outcomes[0].created

    def seg_series() -> list[dict]:
        return pacs.client.search_for_series(
            search_filters={"StudyInstanceUID": meta["study_uid"], "Modality": "SEG"}
        )

    def uid(series: dict) -> str:
        return str(pydicom.Dataset.from_json(series).SeriesInstanceUID)

    # Another test on this Orthanc may have pushed a SEG of the same study already.
    before = {uid(x) for x in seg_series()}
    message = dicomweb.push_seg(store.scope, pacs, outcome.image_id)
    assert message.startswith("Sent the SEG")
    new = [uid(x) for x in seg_series() if uid(x) not in before]
    assert len(new) == 1
    series_uid = new[0]
    (stored,) = pacs.client.retrieve_series(meta["study_uid"], series_uid)
    seg = hd.seg.Segmentation.from_dataset(stored)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lung", "Infection"]
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == meta["sop_instance_uid"]
    assert seg.PatientID == rg1_hash

    # the SEG now in the PACS is not a radiograph: importing its study brings nothing in
    seg_study = dataclasses.replace(hit, study_uid=meta["study_uid"])
    skipped = dicomweb.import_studies(store.scope, pacs, [seg_study], [model]).skipped
    assert skipped == len(before) + 1  # every SEG instance of the study, none imported


def test_server_errors_are_plain_and_nothing_is_half_imported(
    orthanc: OrthancServer, store_and_model  # noqa: ANN001
) -> None:
    store, model = store_and_model
    wrong = dicomweb.connect(orthanc.dicomweb_url, ("infmap", "wrong"))
    with pytest.raises(dicomweb.DicomWebError, match="refused the credentials .HTTP 401"):
        dicomweb.search_studies(wrong)

    pacs = dicomweb.connect(orthanc.dicomweb_url, orthanc.auth)
    (real,) = dicomweb.search_studies(pacs)
    missing = dataclasses.replace(real, study_uid="1.2.3.4.5.6.7.8.9")
    with pytest.raises(dicomweb.DicomWebError, match="answered HTTP 404"):
        dicomweb.import_studies(store.scope, pacs, [real, missing], [model])
    assert _images(store) == 0  # the first study arrived, but nothing was stored

    port = orthanc.http_port
    orthanc_down = dicomweb.connect(f"http://127.0.0.1:{port + 1 if port < 65535 else 1}/x")
    with pytest.raises(dicomweb.DicomWebError, match="cannot be reached"):
        dicomweb.search_studies(orthanc_down)
    with pytest.raises(dicomweb.DicomWebError, match="at least 8 characters"):
        dicomweb.search_studies(pacs, patient="abc")


def test_no_server_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFMAP_DICOMWEB_URL", raising=False)
    assert not dicomweb.configured()
    with pytest.raises(dicomweb.DicomWebError, match="set INFMAP_DICOMWEB_URL"):
        dicomweb.connect()
    monkeypatch.setenv("INFMAP_DICOMWEB_URL", "http://pacs.example:8042/dicom-web/")
    monkeypatch.setenv("INFMAP_DICOMWEB_USER", "reader")
    monkeypatch.setenv("INFMAP_DICOMWEB_PASSWORD", "s3cret")
    assert settings.dicomweb_url() == "http://pacs.example:8042/dicom-web"
    assert settings.dicomweb_credentials() == ("reader", "s3cret")
    assert dicomweb.connect().url == "http://pacs.example:8042/dicom-web"


def test_worklist_imports_from_the_pacs_and_review_sends_the_seg(
    orthanc: OrthancServer, tmp_path: Path, random_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamlit.testing.v1 import AppTest

    (tmp_path / "no-samples").mkdir()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'infmap.sqlite'}")
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(random_checkpoint))
    monkeypatch.setenv("INFMAP_SAMPLES_DIR", str(tmp_path / "no-samples"))
    monkeypatch.delenv("INFMAP_DATA_DIR", raising=False)
    monkeypatch.setenv("INFMAP_DICOMWEB_URL", orthanc.dicomweb_url)
    monkeypatch.setenv("INFMAP_DICOMWEB_USER", orthanc.auth[0])
    monkeypatch.setenv("INFMAP_DICOMWEB_PASSWORD", orthanc.auth[1])
    app = str(Path(__file__).resolve().parent.parent / "app.py")
    at = AppTest.from_file(app, default_timeout=180).run()
    assert not at.exception, at.exception

    at.button(key="pacs.search").click().run()
    assert not at.error, [e.value for e in at.error]
    chosen = at.multiselect(key="pacs.chosen")
    assert len(chosen.options) >= 1
    chosen.select(chosen.options[0]).run()
    at.button(key="pacs.import").click().run()
    assert not at.exception, at.exception
    assert any("added as study #" in s.value for s in at.success), [e.value for e in at.error]

    at.switch_page("pages/review.py").run()
    at.button(key="pacs.push").click().run()
    assert not at.exception, at.exception
    assert any(s.value.startswith("Sent the SEG") for s in at.success), [
        e.value for e in at.error
    ]
