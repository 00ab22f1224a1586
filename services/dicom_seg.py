"""DICOM SEG of a study's lung and infection masks (highdicom), and the image it refers to.

A SEG must reference the image it segments. For a DICOM upload that is the original instance
under its de-identified UIDs as stored (``inference.deid.deidentified_uid``): a reference-only
stand-in carries them, with the hashed patient ID. A PNG/JPEG upload has no DICOM identity, so a
Secondary Capture of the stored pixels is made for the purpose, with UIDs derived from the file's
sha256 (the same study always gives the same Secondary Capture) and delivered with the SEG.

Coded concepts (DICOM CID 7150/7151/7159, SNOMED CT): lung = Anatomical Structure (91723000) /
Lung (39607008); infection = Morphologically Abnormal Structure (49755003) / Inflammation
(409774005) in the Lung. Nothing here reads the database (``services.seg_export`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.deid import deidentified_uid

MANUFACTURER = "InfMap"
DEIDENTIFICATION = "InfMap: salted-hash patient ID, new UIDs, no names or dates"
SEG_SERIES_NUMBER = 900
SC_SERIES_NUMBER = 901
_LO = 64  # DICOM LO (long string) limit

SEGMENT_CODES: dict[str, tuple[str, Any, Any, list[Any]]] = {
    # kind: (label, category, type, anatomic regions)
    "lung": ("Lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung, []),
    "infection": (
        "Infection",
        codes.SCT.MorphologicallyAbnormalStructure,
        codes.SCT.Inflammation,
        [codes.SCT.Lung],
    ),
}


class SegError(ValueError):
    """The masks cannot be written as a SEG (plain message for the user)."""


@dataclass(frozen=True)
class Segment:
    """One mask to export and where it comes from."""

    kind: str  # lung | infection
    mask: np.ndarray  # bool (H, W), the image's size
    model_version: str | None  # the model that predicted it (or the human version started from)
    version_id: int | None = None  # the annotation version; None: the model's own mask
    status: str | None = None  # the annotation version's status
    author: str | None = None  # the annotation version's author

    def summary(self) -> str:
        """A few words for the series description: 'lung v12 approved' / 'lung model 2.0.0'."""
        if self.version_id is None:
            return f"{self.kind} model {self.model_version or '?'}"
        return f"{self.kind} v{self.version_id} {self.status or ''}".rstrip()


def _short(text: str) -> str:
    return text if len(text) <= _LO else text[: _LO - 3] + "..."


def _person_name(name: str) -> str:
    # A user name is one component; the trailing caret says so (DICOM PS3.5 6.2.1.2).
    return name.replace("^", " ").replace("\\", " ")[: _LO - 1] + "^"


def _deidentified(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION


def has_dicom_identity(metadata: dict[str, Any]) -> bool:
    """True when the study came from DICOM and its de-identified UIDs were stored."""
    return metadata.get("format") == "DICOM" and all(
        metadata.get(k) for k in ("study_uid", "series_uid", "sop_instance_uid", "sop_class_uid")
    )


def dicom_reference(metadata: dict[str, Any], rows: int, columns: int) -> Dataset:
    """A reference-only stand-in for a DICOM upload: its de-identified identity, no pixels."""
    ds = Dataset()
    ds.SOPClassUID = metadata["sop_class_uid"]
    ds.SOPInstanceUID = metadata["sop_instance_uid"]
    ds.StudyInstanceUID = metadata["study_uid"]
    ds.SeriesInstanceUID = metadata["series_uid"]
    ds.Modality = metadata.get("modality") or "OT"
    ds.Rows, ds.Columns = int(rows), int(columns)
    ds.PatientID = metadata.get("patient_hash") or ""
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, "")
    ds.PatientOrientation = metadata.get("patient_orientation") or ""
    return ds


def secondary_capture(pixels: np.ndarray, image_sha256: str, patient_hash: str | None) -> Dataset:
    """The Secondary Capture of a PNG/JPEG study's stored pixels (air dark, 8-bit), with UIDs
    derived from the original file's sha256 so every export of the study names the same one."""
    arr = np.round(np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0) * 255.0)

    def uid(part: str) -> str:
        value = deidentified_uid(f"infmap-secondary-capture:{part}:{image_sha256}")
        assert value is not None
        return value

    sc = hd.sc.SCImage(
        pixel_array=arr.astype(np.uint8),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=uid("study"),
        series_instance_uid=uid("series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uid("instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_id=patient_hash or "",
        # Frontal chest X-rays are shown as if facing the patient: columns run to the patient's
        # left, rows to the feet. The model and the app's R/L markers assume the same.
        patient_orientation=("L", "F"),
    )
    sc.SeriesDescription = "InfMap secondary capture of an uploaded PNG/JPEG"
    sc.ConversionType = "WSD"  # workstation: made from a file, not scanned
    sc.BodyPartExamined = "CHEST"  # not a paired part, so no Laterality (Type 2C)
    _deidentified(sc)
    return sc


def _description(segment: Segment, number: int) -> hd.seg.SegmentDescription:
    if segment.kind not in SEGMENT_CODES:
        raise SegError(f"There is no SEG segment for a {segment.kind!r} mask.")
    label, category, kind_code, regions = SEGMENT_CODES[segment.kind]
    algorithm = None
    if segment.model_version is not None:
        algorithm = hd.AlgorithmIdentificationSequence(
            name="InfMap UNet++",
            version=_short(segment.model_version),
            family=codes.cid7162.ArtificialIntelligence,
        )
    if segment.version_id is None:
        algorithm_type = "AUTOMATIC"
    else:  # a human version: drawn on the model's mask when we know which model made it
        algorithm_type = "SEMIAUTOMATIC" if algorithm is not None else "MANUAL"
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=kind_code,
        algorithm_type=algorithm_type,
        algorithm_identification=algorithm,
        anatomic_regions=regions or None,
    )


def build_seg(
    reference: Dataset, segments: Sequence[Segment], software_version: str
) -> hd.seg.Segmentation:
    """A binary SEG with one segment per mask (segment numbers 1, 2, ... in order given).

    Content creator: the author of the newest human version among the segments (none when all
    are the model's). Series description: what each segment is (version and status, or model).
    """
    if not segments:
        raise SegError("There is no mask to export.")
    rows, columns = int(reference.Rows), int(reference.Columns)
    for s in segments:
        if np.shape(s.mask) != (rows, columns):
            raise SegError(
                f"The {s.kind} mask is {np.shape(s.mask)}, the image is {rows}x{columns}."
            )
    stacked = np.stack([np.asarray(s.mask, dtype=bool) for s in segments], axis=-1)
    human = [s for s in segments if s.version_id is not None and s.author]
    creator = max(human, key=lambda s: s.version_id or 0).author if human else None
    seg = hd.seg.Segmentation(
        source_images=[reference],
        pixel_array=stacked[np.newaxis].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(s, i + 1) for i, s in enumerate(segments)],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="InfMap",
        software_versions=_short(software_version),
        device_serial_number="InfMap",
        content_label="INFMAP_MASKS",
        content_description=_short("Lung and infection masks from InfMap"),
        content_creator_name=_person_name(creator) if creator else None,
        series_description=_short("InfMap " + "; ".join(s.summary() for s in segments)),
        omit_empty_frames=False,  # an empty infection mask is a finding too: keep its frame
    )
    # Type 2C without a frame of reference: the source's orientation, empty when not known.
    seg.PatientOrientation = reference.get("PatientOrientation") or ""
    _deidentified(seg)
    return seg
