"""DICOM SEG export (issue 12.1): a study's masks as a two-segment SEG that refers to the
de-identified source (DICOM upload) or to a Secondary Capture made for it (PNG), read back with
highdicom and pydicom and validated by Debian's dciodvfy and dcmtk."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_samples import pydicom_data_file
from dicom_tools import dciodvfy_errors, dcmtk_reads
from pydicom.sr.codedict import codes

from database import annotation_versions, model_versions, predictions, users
from services import bootstrap, ingest
from services.dicom_seg import SegError
from services.seg_export import study_seg
from services.storage import open_store


@pytest.fixture(scope="module")
def model(random_checkpoint: Path) -> object:
    from inference.model import load_checkpoint

    return load_checkpoint(random_checkpoint)


def _store(tmp_path: Path, random_checkpoint: Path, loaded: object):  # noqa: ANN202
    from inference.model import load_checkpoint

    store = open_store(f"sqlite:///{tmp_path / 'infmap.sqlite'}")
    row, _ = bootstrap.register_checkpoint(store.scope, random_checkpoint, load_checkpoint)
    return store, ingest.ModelHandle(row.id, row.version, loaded)  # type: ignore[arg-type]


def _save(store, image_id: int, kind: str, mask: np.ndarray, name: str) -> int:  # noqa: ANN001
    """A submitted version drawn on the active model's mask, as the correction page saves it."""
    with store.scope() as s:
        author = users.get_or_create_user(s, name, "annotator")
        base = annotation_versions.head_version(s, image_id, kind)
        model = model_versions.get_active_model_version(s)
        pred = predictions.get_prediction(s, image_id, model.id)
        v = annotation_versions.save_annotation(
            s, image_id, kind, mask, author, "submitted", base.id if base else None,
            prediction_id=pred.id,
        )
        return v.id


def _png(gray: np.ndarray) -> bytes:
    return cv2.imencode(".png", gray)[1].tobytes()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_seg_of_a_dicom_study_refers_to_its_deidentified_uids(
    tmp_path: Path, random_checkpoint: Path, model: object
) -> None:
    store, handle = _store(tmp_path, random_checkpoint, model)
    original = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    out = ingest.ingest_file(
        store.scope, pydicom_data_file("RG1_UNCR.dcm").read_bytes(), "rg1.dcm", [handle]
    )
    assert out.ok, out.error
    with store.scope(write=False) as s:
        from database import images

        row = images.get_image(s, out.image_id)
        meta, rows, cols = dict(row.meta), row.height, row.width
    # the stored identity is de-identified: none of the original UIDs, a stable 2.25 stand-in
    assert meta["study_uid"].startswith("2.25.") and meta["study_uid"] != original.StudyInstanceUID
    assert meta["sop_instance_uid"] != original.SOPInstanceUID
    assert meta["sop_class_uid"] == original.SOPClassUID
    lung = np.zeros((rows, cols), bool)
    lung[200:1500, 150:900] = True
    lung_id = _save(store, out.image_id, "lung", lung, "Ann Author")

    export = study_seg(store.scope, out.image_id)
    assert export.secondary_capture is None  # a DICOM study is referred to, not copied
    path = _write(tmp_path, "seg.dcm", export.seg)
    seg = hd.seg.segread(path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == meta["study_uid"]
    assert seg.PatientID == meta["patient_hash"] and seg.PatientIdentityRemoved == "YES"
    assert str(seg.PatientName) == ""
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == meta["series_uid"]
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == meta["sop_instance_uid"]
    assert str(seg.ContentCreatorName) == "Ann Author^"
    assert f"lung v{lung_id} submitted" in seg.SeriesDescription
    assert f"infection model {handle.version}" in seg.SeriesDescription

    lung_seg, infection_seg = seg.SegmentSequence
    assert lung_seg.SegmentLabel == "Lung" and infection_seg.SegmentLabel == "Infection"
    assert lung_seg.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert lung_seg.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Lung.value
    assert infection_seg.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert infection_seg.SegmentedPropertyTypeCodeSequence[0].CodeValue == "409774005"
    assert infection_seg.AnatomicRegionSequence[0].CodeValue == "39607008"
    assert lung_seg.SegmentAlgorithmType == "SEMIAUTOMATIC"  # drawn on the model's mask
    assert infection_seg.SegmentAlgorithmType == "AUTOMATIC"

    pixels = seg.get_pixels_by_source_instance(
        [meta["sop_instance_uid"]], segment_numbers=[1, 2]
    )
    assert pixels.shape == (1, rows, cols, 2)
    assert np.array_equal(pixels[0, ..., 0].astype(bool), lung)
    from services import studies

    pred = studies.stored_prediction(store.scope, out.image_id, studies.active_model(store.scope))
    assert np.array_equal(pixels[0, ..., 1].astype(bool), pred.infection_mask)

    assert dciodvfy_errors(path) == []
    dump = dcmtk_reads(path)
    assert "SegmentationStorage" in dump and "Ann Author^" in dump


def test_seg_of_a_png_study_comes_with_its_secondary_capture(
    tmp_path: Path, random_checkpoint: Path, model: object
) -> None:
    store, handle = _store(tmp_path, random_checkpoint, model)
    gray = (np.random.default_rng(3).random((300, 280)) * 255).astype(np.uint8)
    out = ingest.ingest_file(store.scope, _png(gray), "a.png", [handle])
    assert out.ok, out.error

    first, again = study_seg(store.scope, out.image_id), study_seg(store.scope, out.image_id)
    assert first.secondary_capture is not None
    sc = pydicom.dcmread(io.BytesIO(first.secondary_capture))
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert pydicom.dcmread(io.BytesIO(again.secondary_capture)).SOPInstanceUID == sc.SOPInstanceUID
    assert np.abs(sc.pixel_array.astype(int) - gray.astype(int)).max() <= 1

    seg = pydicom.dcmread(io.BytesIO(first.seg))
    assert seg.StudyInstanceUID == sc.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert "ContentCreatorName" not in seg or not seg.ContentCreatorName  # the model's masks only
    assert seg.SeriesDescription == (
        f"InfMap lung model {handle.version}; infection model {handle.version}"
    )
    name, data, mime = first.download()
    assert mime == "application/zip" and name.endswith(".zip")
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == [
        f"study-{out.image_id}-image.dcm", f"study-{out.image_id}-seg.dcm"
    ]
    for file_name, payload in first.files().items():
        path = _write(tmp_path, file_name, payload)
        assert dciodvfy_errors(path) == [], file_name
        dcmtk_reads(path)


def test_a_chosen_version_must_be_of_the_study_and_kind(
    tmp_path: Path, random_checkpoint: Path, model: object
) -> None:
    store, handle = _store(tmp_path, random_checkpoint, model)
    gray = (np.random.default_rng(4).random((200, 220)) * 255).astype(np.uint8)
    out = ingest.ingest_file(store.scope, _png(gray), "b.png", [handle])
    lung_id = _save(store, out.image_id, "lung", np.ones((200, 220), bool), "Ann Author")
    with pytest.raises(SegError, match="not one of this study's infection masks"):
        study_seg(store.scope, out.image_id, versions={"infection": lung_id})
    chosen = study_seg(store.scope, out.image_id, {"lung": lung_id})
    chosen = pydicom.dcmread(io.BytesIO(chosen.seg))
    assert f"lung v{lung_id} submitted" in chosen.SeriesDescription
    with pytest.raises(SegError, match="no model version"):
        study_seg(store.scope, out.image_id, model_version="9.9.9")
