"""inference.loading refuses bad input with a clear message and no traceback: empty, truncated,
non-image, wrong modality or body part, lateral, multi-frame, huge, tiny, blank, undecodable."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from dicom_samples import dicom_bytes, pydicom_data_file, synthetic_dicom
from loading_helpers import expect_refusal, png_bytes, ramp
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, JPEG2000Lossless

from inference.limits import MAX_PIXELS
from inference.loading import load_xray

# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    expect_refusal(b"", "empty")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    expect_refusal(empty, "empty")


def test_text_file_renamed_dcm(tmp_path: Path) -> None:
    fake = tmp_path / "chest.dcm"
    fake.write_text("Patient: chest X-ray report\nFindings: none\n" * 20)
    message = expect_refusal(fake, "not a DICOM, PNG or JPEG")
    assert "chest.dcm" not in message


def test_other_formats_named() -> None:
    expect_refusal(b"%PDF-1.7\n" + b"x" * 200, "PDF")
    expect_refusal(b"II*\x00" + b"\x00" * 200, "TIFF")


def test_truncated_png(sample_gray: np.ndarray) -> None:
    data = png_bytes(sample_gray)
    expect_refusal(data[: len(data) // 2], "damaged or incomplete")
    expect_refusal(data[:-12], "damaged or incomplete")  # IEND chunk missing
    expect_refusal(data[:20], "damaged or incomplete")  # inside the header


def test_truncated_jpeg(sample_gray: np.ndarray) -> None:
    data = cv2.imencode(".jpg", sample_gray)[1].tobytes()
    expect_refusal(data[: len(data) // 2], "damaged or incomplete")


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_truncated_dicom(name: str) -> None:
    data = pydicom_data_file(name).read_bytes()
    expect_refusal(data[: len(data) // 2], "incomplete")
    expect_refusal(data[:-10], "incomplete")


def test_dicom_without_pixel_data() -> None:
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    expect_refusal(dicom_bytes(ds), "no image", "no pixel data")


def test_multi_frame_dicom() -> None:
    frames = np.stack([ramp(), ramp()[::-1]])
    ds = synthetic_dicom(frames, bits_stored=12)
    assert int(ds.NumberOfFrames) == 2
    expect_refusal(dicom_bytes(ds), "2 images", "multi-frame")


def test_ct_modality() -> None:
    # A real CT slice shipped with pydicom, and a synthetic CT labelled CHEST.
    expect_refusal(Path(pydicom.data.get_testdata_file("CT_small.dcm")), "CT", "chest X-rays")
    ds = synthetic_dicom(ramp(), bits_stored=12, modality="CT")
    expect_refusal(dicom_bytes(ds), "a CT image", "'CT'", "frontal chest X-rays")
    for modality, words in {"MR": "MRI", "US": "ultrasound", "NM": "nuclear", "PT": "PET"}.items():
        ds = synthetic_dicom(ramp(), bits_stored=12, modality=modality)
        expect_refusal(dicom_bytes(ds), words)


def test_lenient_modalities() -> None:
    # OT (secondary capture) or no modality: accepted when chest or no body part is given.
    for modality, body_part in (("OT", "CHEST"), ("OT", None), (None, None), (None, "THORAX")):
        ds = synthetic_dicom(ramp(), bits_stored=12, modality=modality, body_part=body_part)
        assert load_xray(dicom_bytes(ds)).metadata["modality"] == modality
    ds = synthetic_dicom(ramp(), bits_stored=12, modality="OT", body_part="HAND")
    expect_refusal(dicom_bytes(ds), "'HAND'", "not chest")


def test_rg3_tibia_radiograph_refused() -> None:
    header = pydicom.dcmread(pydicom_data_file("RG3_UNCR.dcm"), stop_before_pixels=True)
    assert (header.Modality, header.BodyPartExamined) == ("CR", "EXTREMITY")
    for name in ("RG3_UNCR.dcm", "RG3_J2KR.dcm"):
        expect_refusal(pydicom_data_file(name), "EXTREMITY", "frontal chest X-rays")


def test_lateral_view_refused() -> None:
    for view in ("LL", "RL", "LATERAL"):
        ds = synthetic_dicom(ramp(), bits_stored=12, view_position=view)
        expect_refusal(dicom_bytes(ds), "lateral", "frontal", "only")
    ds = synthetic_dicom(ramp(), bits_stored=12, view_position="AP")
    assert load_xray(dicom_bytes(ds)).metadata["view_position"] == "AP"


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """Patch a real PNG's IHDR to claim another size (with a valid CRC); no pixels decoded."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_huge_images_refused_before_decoding(sample_gray: np.ndarray) -> None:
    png = png_bytes(sample_gray)
    for side in (20000, 8000):  # 400 MP (PIL itself refuses) and 64 MP (our own limit)
        expect_refusal(png_with_size(png, side, side), "too large", "megapixels")
    # DICOM: Rows/Columns claim 10000 x 10000 with a tiny payload.
    ds = synthetic_dicom(ramp(), bits_stored=12)
    ds.Rows = ds.Columns = 10000
    message = expect_refusal(dicom_bytes(ds), "too large")
    assert f"{MAX_PIXELS // 1_000_000} megapixels" in message


def test_jpeg2000_codestream_bomb_refused() -> None:
    # Header says 200 x 180, but the JPEG 2000 codestream claims 30000 x 30000.
    ds = synthetic_dicom(ramp(), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    data = bytearray(dicom_bytes(ds))
    siz = data.find(b"\xff\x4f\xff\x51")
    assert siz > 0
    data[siz + 8 : siz + 16] = struct.pack(">II", 30000, 30000)
    expect_refusal(bytes(data), "too large")


def test_tiny_images_refused(sample_gray: np.ndarray) -> None:
    expect_refusal(png_bytes(sample_gray[:32, :200]), "too small", "64")
    ds = synthetic_dicom(ramp(48, 300))
    expect_refusal(dicom_bytes(ds), "too small")


def test_blank_image_refused() -> None:
    expect_refusal(png_bytes(np.full((128, 128), 7, np.uint8)), "blank")


def test_unsupported_transfer_syntax() -> None:
    ds = synthetic_dicom(ramp(), bits_stored=12)
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    expect_refusal(dicom_bytes(ds), "cannot decode", "MPEG2", "uncompressed")
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9999.1"  # a private syntax
    data = dicom_bytes(ds, implicit_vr=False, little_endian=True)
    expect_refusal(data, "cannot be decoded")


def test_corrupt_compressed_pixel_data() -> None:
    noise = np.random.default_rng(1).integers(0, 4096, (200, 180)).astype(np.uint16)
    ds = synthetic_dicom(noise, bits_stored=12)
    ds.compress(JPEG2000Lossless)
    data = bytearray(dicom_bytes(ds))
    siz = data.find(b"\xff\x4f\xff\x51")
    assert len(data) - siz > 20_000  # noise does not compress: plenty of coded data
    data[siz + 40 : siz + 10_040] = b"\xa5" * 10_000  # scramble headers and coded data in place
    expect_refusal(bytes(data), "could not be decoded")


