"""inference.loading on real files: pydicom-data radiographs and COVID-QU-Ex PNGs (bad input:
test_loading_refusals)."""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from dicom_samples import dicom_bytes, pydicom_data_file, synthetic_dicom
from loading_helpers import expect_refusal, png_bytes, ramp
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from inference.checks import UnsupportedImage
from inference.loading import XRay, load_xray
from inference.storage import xray_from_npz_bytes, xray_to_npz_bytes
from inference.windowing import apply_window

RG1 = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_UNCI.dcm", "RG1_J2KI.dcm")

# Regions of the RG1 PA chest (1955 x 1841), chosen on a rendered PNG: (rows, cols).
LUNG_IMAGE_LEFT = (slice(450, 1000), slice(420, 700))  # patient's right lung
LUNG_IMAGE_RIGHT = (slice(450, 1000), slice(1100, 1380))
MEDIASTINUM = (slice(300, 1000), slice(840, 960))
HEART = (slice(1050, 1300), slice(800, 1050))
SOFT_TISSUE_LEFT = (slice(800, 1200), slice(40, 160))  # lateral chest wall
SOFT_TISSUE_RIGHT = (slice(800, 1200), slice(1700, 1800))




@pytest.fixture(scope="module")
def rg1() -> dict[str, XRay]:
    return {name: load_xray(pydicom_data_file(name)) for name in RG1}


# ------------------------------------------------------------------------------------------
# Real DICOM: the RG1 chest radiograph in four encodings
# ------------------------------------------------------------------------------------------


def test_rg1_decodes_in_all_encodings(rg1: dict[str, XRay]) -> None:
    for name, x in rg1.items():
        assert x.pixels.shape == (1955, 1841) and x.pixels.dtype == np.float32, name
        assert x.raw is not None and x.raw.shape == (1955, 1841) and x.raw.dtype == np.float32
        assert x.pixels.min() >= 0.0 and x.pixels.max() <= 1.0
        assert x.window == (15000.0, 30000.0)  # from the header
        assert x.invert is True  # MONOCHROME1
        meta = x.metadata
        assert meta["format"] == "DICOM" and meta["modality"] == "CR"
        assert meta["body_part"] == "CHEST" and meta["view_position"] == "PA"
        assert meta["photometric_interpretation"] == "MONOCHROME1"
        assert (meta["rows"], meta["columns"], meta["bits_stored"]) == (1955, 1841, 15)
        assert meta["pixel_spacing"] is None  # the header says 0\0, which means unknown
        assert x.sha256 == hashlib.sha256(pydicom_data_file(name).read_bytes()).hexdigest()
        assert x.source_name == name
    assert rg1["RG1_J2KR.dcm"].metadata["transfer_syntax"].startswith("JPEG 2000")


def test_rg1_lossless_encodings_agree_exactly(rg1: dict[str, XRay]) -> None:
    # J2KR is the lossless JPEG 2000 of UNCR; UNCI is the lossy J2KI image stored uncompressed.
    assert np.array_equal(rg1["RG1_UNCR.dcm"].raw, rg1["RG1_J2KR.dcm"].raw)
    assert np.array_equal(rg1["RG1_UNCR.dcm"].pixels, rg1["RG1_J2KR.dcm"].pixels)
    assert np.array_equal(rg1["RG1_UNCI.dcm"].raw, rg1["RG1_J2KI.dcm"].raw)


def test_rg1_lossy_close_to_lossless(rg1: dict[str, XRay]) -> None:
    lossy, lossless = rg1["RG1_J2KI.dcm"].pixels, rg1["RG1_UNCR.dcm"].pixels
    assert not np.array_equal(lossy, lossless)
    assert float(np.abs(lossy - lossless).mean()) < 0.02


def test_rg1_lungs_dark_after_monochrome1_inversion(rg1: dict[str, XRay]) -> None:
    x = rg1["RG1_UNCR.dcm"]
    p = x.pixels
    lungs = [float(p[box].mean()) for box in (LUNG_IMAGE_LEFT, LUNG_IMAGE_RIGHT)]
    dense = [float(p[box].mean()) for box in (MEDIASTINUM, HEART)]
    soft = [float(p[box].mean()) for box in (SOFT_TISSUE_LEFT, SOFT_TISSUE_RIGHT)]
    assert max(lungs) + 0.15 < min(dense), (lungs, dense)
    assert max(lungs) + 0.15 < min(soft), (lungs, soft)
    # MONOCHROME1 stores air as high values: inversion was needed, and was applied exactly once.
    assert x.raw is not None
    assert x.raw[LUNG_IMAGE_LEFT].mean() > x.raw[MEDIASTINUM].mean()


def test_default_window_reproduces_pixels(rg1: dict[str, XRay]) -> None:
    x = rg1["RG1_UNCR.dcm"]
    assert x.raw is not None and x.window is not None
    again = apply_window(x.raw, *x.window, invert=x.invert)
    assert again.dtype == np.float32
    np.testing.assert_allclose(again, x.pixels, atol=1e-6)
    # A narrower window raises contrast and stays within [0, 1].
    narrow = apply_window(x.raw, 14000, 8000, invert=True)
    assert narrow.min() == 0.0 and narrow.max() == 1.0
    assert narrow.std() > x.pixels.std()


def test_apply_window_dicom_linear_formula() -> None:
    raw = np.array([-10.0, 0.0, 49.5, 50.0, 99.0, 200.0], dtype=np.float32)
    out = apply_window(raw, center=50.0, width=100.0, invert=False)
    # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1]
    expected = np.clip((raw - 49.5) / 99.0 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(apply_window(raw, 50.0, 100.0, invert=True), 1 - expected, atol=1e-6)
    assert apply_window(raw, 50.0, 0.2, invert=False).tolist() == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------------------------------
# Synthetic DICOM: rescale + window, VOI LUT, RLE, JPEG 2000, JPEG lossless, no preamble
# ------------------------------------------------------------------------------------------


def test_monochrome2_rescale_and_window() -> None:
    stored = ramp()
    ds = synthetic_dicom(
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=1500,
        WindowWidth=2000,
        PixelSpacing=[0.2, 0.2],
    )
    x = load_xray(dicom_bytes(ds), name="synthetic.dcm")
    expected_raw = stored.astype(np.float64) * 2 - 1024
    assert x.raw is not None
    np.testing.assert_array_equal(x.raw, expected_raw.astype(np.float32))
    expected = np.clip((expected_raw - 1499.5) / 1999.0 + 0.5, 0, 1)
    np.testing.assert_allclose(x.pixels, expected, atol=1e-5)
    assert x.window == (1500.0, 2000.0) and x.invert is False
    assert x.metadata["pixel_spacing"] == [0.2, 0.2]
    assert x.metadata["photometric_interpretation"] == "MONOCHROME2"
    assert x.source_name == "synthetic.dcm"


def test_no_window_uses_robust_percentiles() -> None:
    stored = ramp()
    stored[0, 0] = 4095  # one hot pixel must not set the window
    x = load_xray(dicom_bytes(synthetic_dicom(stored, bits_stored=12)))
    assert x.window is not None
    center, width = x.window
    lo, hi = np.percentile(stored, [0.5, 99.5])
    assert (center, width) == pytest.approx(((lo + hi) / 2 + 0.5, hi - lo + 1))
    assert width < 2700  # the ramp spans 2785 values; min-max with the outlier would be 3096
    assert x.pixels[stored < np.percentile(stored, 0.4)].max() == 0.0
    assert x.pixels[stored > np.percentile(stored, 99.6)].min() == 1.0
    assert x.raw is not None
    np.testing.assert_allclose(apply_window(x.raw, center, width, False), x.pixels, atol=1e-6)


def test_voi_lut_sequence_is_applied() -> None:
    stored = ramp()
    ds = synthetic_dicom(stored, bits_stored=12, WindowCenter=2000, WindowWidth=4000)
    item = pydicom.Dataset()
    lut = (np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(np.uint16)  # a gamma curve
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = [item]
    x = load_xray(dicom_bytes(ds))
    expected = lut[stored].astype(np.float64) / 65535.0
    np.testing.assert_allclose(x.pixels, expected, atol=1e-4)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_synthetic_matches_uncompressed(syntax: pydicom.uid.UID) -> None:
    stored = ramp()
    plain = load_xray(dicom_bytes(synthetic_dicom(stored, bits_stored=12)))
    ds = synthetic_dicom(stored, bits_stored=12)
    ds.compress(syntax)  # pydicom's RLE encoder / pylibjpeg-openjpeg
    x = load_xray(dicom_bytes(ds))
    assert x.metadata["transfer_syntax"] == syntax.name
    assert x.raw is not None and plain.raw is not None
    np.testing.assert_array_equal(x.raw, plain.raw)
    np.testing.assert_array_equal(x.pixels, plain.pixels)


@pytest.mark.parametrize("name", ["JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG-LL.dcm"])
def test_jpeg_lossless_real_codestream(name: str) -> None:
    # pydicom has no JPEG lossless encoder, so reuse real JPEG lossless files (an 8-bit US frame,
    # a 16-bit signed NM image) relabelled as a chest DX; the codestream is untouched.
    ds = pydicom.dcmread(pydicom_data_file(name))
    expected = ds.pixel_array.astype(np.float32)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    x = load_xray(dicom_bytes(ds))
    assert x.metadata["transfer_syntax"].startswith("JPEG Lossless")
    assert x.raw is not None
    np.testing.assert_array_equal(x.raw, expected)
    assert 0.0 <= x.pixels.min() < x.pixels.max() <= 1.0


def test_dicom_without_preamble_or_file_meta() -> None:
    stored = ramp()
    no_preamble = dicom_bytes(synthetic_dicom(stored, bits_stored=12), file_format=False)
    assert no_preamble[128:132] != b"DICM"
    x = load_xray(no_preamble)
    assert x.raw is not None and np.array_equal(x.raw, stored.astype(np.float32))

    ds = synthetic_dicom(stored, bits_stored=12)
    del ds.file_meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    x = load_xray(buffer.getvalue())
    assert x.metadata["transfer_syntax"] == "Implicit VR Little Endian"
    assert x.raw is not None and np.array_equal(x.raw, stored.astype(np.float32))

    ds.PixelData = stored.astype(">u2").tobytes()  # big endian: pixel bytes swapped too
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=False)
    assert buffer.getvalue()[:2] == b"\x00\x08"
    x = load_xray(buffer.getvalue())
    assert x.metadata["transfer_syntax"] == "Explicit VR Big Endian"
    assert x.raw is not None and np.array_equal(x.raw, stored.astype(np.float32))


def test_deflated_dicom_and_inflation_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(pydicom.data.get_testdata_file("image_dfl.dcm"))  # real deflated file, 512x512
    x = load_xray(path)
    assert x.metadata["transfer_syntax"] == "Deflated Explicit VR Little Endian"
    assert x.pixels.shape == (512, 512)
    # The inflated size is bounded before pydicom inflates everything (zip-bomb guard).
    monkeypatch.setattr("inference.dicom._MAX_INFLATED_BYTES", 100_000)
    expect_refusal(path, "too large")


def test_format_from_content_not_extension(tmp_path: Path, sample_gray: np.ndarray) -> None:
    png_named_dcm = tmp_path / "scan.dcm"
    png_named_dcm.write_bytes(png_bytes(sample_gray))
    assert load_xray(png_named_dcm).metadata["format"] == "PNG"
    dcm_named_png = tmp_path / "scan.png"
    dcm_named_png.write_bytes(pydicom_data_file("RG1_UNCR.dcm").read_bytes())
    x = load_xray(dcm_named_png)
    assert x.metadata["format"] == "DICOM" and x.source_name == "scan.png"


# ------------------------------------------------------------------------------------------
# De-identification
# ------------------------------------------------------------------------------------------


def test_patient_id_only_as_salted_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    data = dicom_bytes(synthetic_dicom(ramp(), bits_stored=12, patient_id="PAT-42"))
    monkeypatch.setenv("INFMAP_ID_SALT", "salt-one")
    first = load_xray(data).metadata["patient_hash"]
    assert first == load_xray(data).metadata["patient_hash"]  # stable: groups a patient's files
    monkeypatch.setenv("INFMAP_ID_SALT", "salt-two")
    second = load_xray(data).metadata["patient_hash"]
    assert len(first) == 64 and first != second
    assert first != hashlib.sha256(b"PAT-42").hexdigest()
    no_id = dicom_bytes(synthetic_dicom(ramp(), bits_stored=12, patient_id=None))
    assert load_xray(no_id).metadata["patient_hash"] is None


def test_no_identifiers_in_storage_or_logs(
    rg1: dict[str, XRay], caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    # RG1's header: PatientName "CompressedSamples^RG1", PatientID "9RG1".
    blob = xray_to_npz_bytes(rg1["RG1_UNCR.dcm"])
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        stored = b"".join(archive.read(member) for member in archive.namelist())
    for secret in ("CompressedSamples", "9RG1"):
        assert secret.encode("utf-32-le") not in stored and secret.encode() not in stored

    # Invalid values make pydicom warn and log, quoting them, when they are first read.
    ds = synthetic_dicom(ramp(), bits_stored=12, patient_id="SECRET-ID-" + "7" * 70)
    ds.PatientName = "Secret^Name"
    ds.BodyPartExamined = "chest secret!"
    ds.ViewPosition = "pa secret!"
    data = dicom_bytes(ds)
    recwarn.clear()  # building the file above warned, quoting the values
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        x = load_xray(data, name="Secret_Name_scan.dcm")
        load_xray(pydicom_data_file("RG1_UNCR.dcm"))
    assert x.metadata["patient_hash"] is not None
    # pydicom complained (the ID is too long for its VR) but nothing reached logs or warnings.
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert not [w for w in recwarn if "pydicom" in w.filename]
    said = caplog.text + " ".join(str(w.message) for w in recwarn)
    for secret in ("ecret", "SECRET", "777", "CompressedSamples", "9RG1", "RG1_UNCR"):
        assert secret not in said


# ------------------------------------------------------------------------------------------
# PNG / JPEG
# ------------------------------------------------------------------------------------------


def test_covid_qu_ex_pngs(covid_pngs: list[Path]) -> None:
    for path in covid_pngs:
        x = load_xray(path)
        assert x.pixels.shape == (256, 256) and x.pixels.dtype == np.float32
        assert x.pixels.min() >= 0.0 and x.pixels.max() <= 1.0 and x.pixels.std() > 0.05
        expected = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
        np.testing.assert_allclose(x.pixels, expected, atol=1e-6)
        assert x.raw is None and x.window is None and x.invert is False
        assert x.metadata["format"] == "PNG" and x.metadata["bits_stored"] == 8
        assert x.metadata["patient_hash"] is None


def test_png_and_jpeg_variants_give_the_same_image(sample_gray: np.ndarray) -> None:
    reference = load_xray(png_bytes(sample_gray)).pixels
    bgra = cv2.cvtColor(sample_gray, cv2.COLOR_GRAY2BGRA)
    bgra[:, :, 3] = np.random.default_rng(0).integers(0, 256, sample_gray.shape)  # alpha ignored
    variants = {
        "png16": png_bytes(sample_gray.astype(np.uint16) * 257),
        "png16_12bit": png_bytes(sample_gray.astype(np.uint16) * 16),  # 12-bit data in 16-bit PNG
        "rgb": png_bytes(cv2.cvtColor(sample_gray, cv2.COLOR_GRAY2BGR)),
        "rgba": png_bytes(bgra),
        "jpeg": cv2.imencode(".jpg", sample_gray, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
        "jpeg_rgb": cv2.imencode(".jpg", cv2.cvtColor(sample_gray, cv2.COLOR_GRAY2BGR))[
            1
        ].tobytes(),
    }
    tolerance = {"png16": 1e-6, "rgb": 1e-6, "rgba": 1e-6, "png16_12bit": 0.005}
    for name, data in variants.items():
        x = load_xray(data)
        assert x.pixels.shape == (256, 256) and x.pixels.dtype == np.float32, name
        error = np.abs(x.pixels - reference)
        if name in tolerance:
            assert float(error.max()) <= tolerance[name], name
        else:  # lossy JPEG
            assert float(error.mean()) < 0.01, name
        assert x.metadata["format"] == ("JPEG" if name.startswith("jpeg") else "PNG")
    assert load_xray(variants["png16_12bit"]).metadata["bits_stored"] == 12
    assert load_xray(variants["png16"]).metadata["bits_stored"] == 16


def test_png_sbit_chunk_sets_bit_depth(sample_gray: np.ndarray) -> None:
    # 10-bit data in a 16-bit PNG, declared with sBIT = 10.
    data = png_bytes(sample_gray.astype(np.uint16) * 4)
    payload = bytes([10])
    chunk = struct.pack(">I", 1) + b"sBIT" + payload
    chunk += struct.pack(">I", zlib.crc32(b"sBIT" + payload))
    with_sbit = data[:33] + chunk + data[33:]  # right after the 8-byte magic + 25-byte IHDR
    x = load_xray(with_sbit)
    assert x.metadata["bits_stored"] == 10
    expected = sample_gray.astype(np.float32) * 4 / 1023
    np.testing.assert_allclose(x.pixels, expected, atol=1e-6)


def test_jpeg_exif_orientation_applied(sample_gray: np.ndarray) -> None:
    image = Image.fromarray(sample_gray[:, :200])  # not square, so rotation shows in the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    x = load_xray(buffer.getvalue())
    assert x.pixels.shape == (200, 256)
    expected = np.rot90(sample_gray[:, :200], -1).astype(np.float32) / 255.0
    assert float(np.abs(x.pixels - expected).mean()) < 0.01


# ------------------------------------------------------------------------------------------
# Storage form
# ------------------------------------------------------------------------------------------


def test_npz_round_trip_dicom(rg1: dict[str, XRay]) -> None:
    x = rg1["RG1_UNCR.dcm"]
    y = xray_from_npz_bytes(xray_to_npz_bytes(x))
    assert y.pixels.dtype == np.float32 and y.pixels.shape == x.pixels.shape
    assert float(np.abs(y.pixels - x.pixels).max()) <= 0.5 / 65535 + 1e-7
    assert y.raw is not None and x.raw is not None
    assert y.raw.dtype == np.float32 and np.array_equal(y.raw, x.raw)
    assert y.window == x.window and y.invert is x.invert
    assert y.metadata == x.metadata
    assert (y.sha256, y.source_name) == (x.sha256, x.source_name)
    assert y.raw is not None and y.window is not None
    np.testing.assert_allclose(apply_window(y.raw, *y.window, y.invert), x.pixels, atol=1e-6)


def test_npz_round_trip_png(covid_pngs: list[Path]) -> None:
    x = load_xray(covid_pngs[0].read_bytes(), name="Ünïcødé name.png")
    y = xray_from_npz_bytes(xray_to_npz_bytes(x))
    assert y.raw is None and y.window is None and y.invert is False
    np.testing.assert_allclose(y.pixels, x.pixels, atol=1e-5)
    assert y.metadata == x.metadata and y.source_name == "Ünïcødé name.png"
    assert y.sha256 == x.sha256


def test_npz_round_trip_keeps_raw_exact() -> None:
    # Integer raw is stored compactly, fractional raw (slope 0.25) as float32: both exact.
    for slope, intercept in ((1, 0), (1, -2048), (0.25, -10.5)):
        ds = synthetic_dicom(
            ramp(), bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept
        )
        x = load_xray(dicom_bytes(ds))
        y = xray_from_npz_bytes(xray_to_npz_bytes(x))
        assert x.raw is not None and y.raw is not None and y.raw.dtype == np.float32
        assert np.array_equal(y.raw, x.raw), (slope, intercept)
        assert y.window == x.window


def test_npz_damaged_blob() -> None:
    with pytest.raises(UnsupportedImage, match="damaged"):
        xray_from_npz_bytes(b"not an npz at all")
