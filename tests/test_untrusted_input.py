"""Issue 17: no bad file hangs, crashes or pollutes anything. The probe's inputs, each with the
outcome expected (tests/probe_inputs.py builds them from RG1 and samples/)."""

from __future__ import annotations

import csv
import os
import shutil
import time
import tomllib
from pathlib import Path

import numpy as np
import probe_inputs as probe
import pytest
import torch
from sqlalchemy import select

import settings
from database.models import Image
from database.session import init_db, session_scope
from inference import limits
from inference.batch import main as batch_main
from inference.checks import UnsupportedImage
from inference.isolation import Budget, load_xray_isolated, run_isolated
from inference.loading import load_xray
from inference.model import ModelConfig, build_model, save_checkpoint
from services import ingest
from services.import_masks import import_masks

GOOD = probe.SAMPLES / "Normal" / "normal_1.png"
GOOD2 = probe.SAMPLES / "COVID-19" / "covid_1582.png"


def refused(source: bytes | Path, *words: str, **kwargs: object) -> str:
    with pytest.raises(UnsupportedImage) as info:
        load_xray_isolated(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert "Traceback" not in message
    return message


# ----------------------------------------------------------------------------- 1. hangs


@pytest.mark.timeout(120)
def test_hanging_jpeg2000_dicom_is_refused_not_hung() -> None:
    start = time.monotonic()
    refused(probe.hanging_j2k_dicom(), "could not be decoded", budget=Budget(seconds=30))
    assert time.monotonic() - start < 30  # the JP2 box walk refuses it before pydicom's loop


@pytest.mark.timeout(120)
def test_worker_running_pydicoms_endless_loop_is_killed_at_its_time_budget() -> None:
    with pytest.raises(UnsupportedImage, match="longer than 3 seconds"):
        run_isolated(probe.decode_pixel_data, probe.hanging_j2k_dicom(), budget=Budget(seconds=3))
    # The next file is read as usual: the stuck worker is gone, not holding anything up.
    assert load_xray_isolated(GOOD).pixels.shape == (256, 256)


def test_worker_over_its_memory_budget_is_stopped() -> None:
    with pytest.raises(UnsupportedImage, match="memory"):
        run_isolated(np.ones, (1 << 28,), budget=Budget(memory_bytes=256 << 20))  # 2 GB


def test_worker_that_dies_gives_could_not_read() -> None:
    with pytest.raises(UnsupportedImage, match="could not read this file"):
        run_isolated(os._exit, 3)


# ----------------------------------------------------------------------------- 2. escaping errors


def test_unknown_vr_on_window_is_ignored_and_the_image_decodes() -> None:
    xray = load_xray(probe.unknown_vr_dicom())
    assert xray.pixels.shape == (1955, 1841) and np.isfinite(xray.pixels).all()


def test_malformed_modality_lut_is_refused_with_a_message() -> None:
    with pytest.raises(UnsupportedImage, match="Modality LUT"):
        load_xray(probe.bad_modality_lut_dicom())


def test_unforeseen_decoder_error_becomes_could_not_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(data: bytes, kind: str) -> None:
        patient = bytes.fromhex("446f65").decode()  # not in this source line, which is logged
        raise KeyError(f"PatientName={patient}")  # a decoder bug quoting a header value

    monkeypatch.setattr("inference.png_jpeg.decode_png_jpeg", broken)
    with pytest.raises(UnsupportedImage, match="could not read this file"):
        load_xray(GOOD)
    logged = caplog.text
    assert "Traceback" in logged and "KeyError" in logged and "Doe" not in logged


# ----------------------------------------------------------------------------- 3. float32 overflow


def test_window_of_1e308_falls_back_to_a_finite_window() -> None:
    xray = load_xray(probe.huge_window_dicom())
    assert np.isfinite(xray.pixels).all() and xray.pixels.max() > xray.pixels.min()
    assert xray.window is not None and all(abs(v) < 1e30 for v in xray.window)


def test_rescale_overflowing_float32_is_refused() -> None:
    ds = probe.rg1()
    ds.RescaleSlope, ds.RescaleIntercept = "1e308", "0"
    with pytest.raises(UnsupportedImage, match="too large to represent"):
        load_xray(probe._save(ds))


# ----------------------------------------------------------------------------- 5. memory


def test_jpeg_header_claiming_7000_by_8000_is_refused_before_decoding() -> None:
    data = probe.jpeg_claiming(8000, 7000)
    assert len(data) < 16_000
    refused(data, "far too small", "7000 x 8000")


@pytest.fixture(scope="module")
def rgba16_png() -> bytes:
    return probe.png_rgba16()


def test_big_16_bit_rgba_png_is_estimated_from_its_header(
    rgba16_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(rgba16_png) < 4 * 2**20  # a few MB on disk, 480 MB decoded
    monkeypatch.setenv("INFMAP_DECODE_MEMORY_MB", "512")
    start = time.monotonic()
    with pytest.raises(UnsupportedImage, match=r"would need about 1\.0 GB"):
        load_xray(rgba16_png)
    assert time.monotonic() - start < 5  # refused from the header, nothing inflated


def test_big_16_bit_rgba_png_refused_by_the_workers_budget(rgba16_png: bytes) -> None:
    refused(rgba16_png, "memory", budget=Budget(memory_bytes=512 << 20))


def test_sliver_64_by_60000_png_is_refused() -> None:
    refused(probe.sliver_png(), "60000 x 64", "narrower")


def test_one_upload_limit_from_streamlit_config() -> None:
    with open(settings.STREAMLIT_CONFIG, "rb") as fh:
        config = tomllib.load(fh)
    assert config["server"]["maxUploadSize"] * 2**20 == limits.MAX_FILE_BYTES


# ----------------------------------------------------------------------------- 7. server defaults


def test_server_listens_on_localhost_and_hides_error_details() -> None:
    with open(settings.STREAMLIT_CONFIG, "rb") as fh:
        config = tomllib.load(fh)
    assert config["server"]["address"] == "localhost"
    assert config["client"]["showErrorDetails"] == "none"  # False would still show tracebacks


def test_served_as_a_product_not_a_dev_server() -> None:
    """No Deploy button or developer menu for users; XSRF protection on (it needs CORS on)."""
    with open(settings.STREAMLIT_CONFIG, "rb") as fh:
        config = tomllib.load(fh)
    assert config["client"]["toolbarMode"] == "viewer"
    assert config["server"]["enableXsrfProtection"] is True
    assert config["server"]["enableCORS"] is True


def test_no_page_renders_html() -> None:
    """User and file text is shown through services.text.md_escape, never as HTML."""
    sources = [settings.REPO_ROOT / "app.py", *sorted((settings.REPO_ROOT / "pages").glob("*.py"))]
    for path in sources:
        text = path.read_text()
        for unsafe in ("unsafe_allow_html", "st.html(", "components.html("):
            assert unsafe not in text, f"{path.name} uses {unsafe}"


def test_import_masks_does_not_follow_symlinks_out_of_its_folders(tmp_path: Path) -> None:
    images, lung = tmp_path / "images", tmp_path / "lung"
    outside = tmp_path / "elsewhere"
    for folder in (images, lung, outside):
        folder.mkdir()
    shutil.copy(GOOD, images / "inside.png")
    shutil.copy(GOOD2, outside / "secret.png")
    (images / "secret.png").symlink_to(outside / "secret.png")
    for stem in ("inside", "secret"):
        shutil.copy(probe.SAMPLES / "Normal" / "normal_1_lung.png", lung / f"{stem}.png")
    engine = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        summary = import_masks(engine, images, lung, None, "importer")
        with session_scope(engine, write=False) as s:
            names = sorted(i.display_name for i in s.scalars(select(Image)))
    finally:
        engine.dispose()
    assert summary.images_new == 1 and names == ["inside.png"]


# ----------------------------------------------------------------------------- the app's upload


def test_upload_with_bad_files_stores_only_the_good_ones(tmp_path: Path) -> None:
    engine = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")

    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    files = {
        "good.png": GOOD.read_bytes(),
        "lut.dcm": probe.bad_modality_lut_dicom(),
        "hang.dcm": probe.hanging_j2k_dicom(),
        "claim.jpg": probe.jpeg_claiming(),
        "sliver.png": probe.sliver_png(),
        "window.dcm": probe.huge_window_dicom(),
        "good2.png": GOOD2.read_bytes(),
    }
    try:
        outcomes = {n: ingest.ingest_file(scope, d, n, []) for n, d in files.items()}
        with session_scope(engine, write=False) as s:
            stored = sorted(i.display_name for i in s.scalars(select(Image)))
    finally:
        engine.dispose()
    assert {n for n, o in outcomes.items() if o.ok} == {"good.png", "good2.png", "window.dcm"}
    # stored under neutral labels, never the file names (inference.deid.neutral_label)
    assert sorted(n.rsplit(" ", 1)[0] for n in stored) == ["CR upload", "PNG upload", "PNG upload"]
    for name in ("lut.dcm", "hang.dcm", "claim.jpg", "sliver.png"):
        assert outcomes[name].error and "Error" not in outcomes[name].error


# ----------------------------------------------------------------------------- the batch CLI


@pytest.mark.timeout(600)
def test_batch_over_hanging_escaping_and_good_files_gives_one_row_each(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_size=128, decoder_channels=[16, 8, 8, 8, 8])).eval()
    checkpoint = save_checkpoint(model, tmp_path / "small.pt", meta={"version": "probe"})
    src = tmp_path / "in"
    src.mkdir()
    bad = {
        "hang.dcm": probe.hanging_j2k_dicom(),
        "lut.dcm": probe.bad_modality_lut_dicom(),
        "claim.jpg": probe.jpeg_claiming(),
        "sliver.png": probe.sliver_png(),
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
    (src / "vr.dcm").write_bytes(probe.unknown_vr_dicom())
    (src / "window.dcm").write_bytes(probe.huge_window_dicom())
    shutil.copy(GOOD, src / "good.png")
    shutil.copy(GOOD2, src / "good2.png")
    out = tmp_path / "out"
    argv = [str(src), "--out", str(out), "--checkpoint", str(checkpoint), "--timeout", "30",
            "--names", "clear"]
    assert batch_main(argv) == 0
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == sorted([*bad, "vr.dcm", "window.dcm", "good.png", "good2.png"])
    for name in bad:
        assert rows[name]["error"] and not rows[name]["predicted_class"], name
    for name in ("vr.dcm", "window.dcm", "good.png", "good2.png"):
        assert rows[name]["error"] == "" and rows[name]["predicted_class"], name
