"""A small TID 1500 SR as the pipeline's writer encodes it (the codes ``sr_reader`` reads), on the
header of a real CT: what HL7 and FHIR destinations build their messages from. Built with pydicom so
that the message tests do not depend on the segmentation writer's inputs."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.paths import TESTDATA

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SOURCE = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))[0]
# (tracking identifier, volume mL, diameter mm) and (classification, probability)
LESIONS = (("lesion 1", 24.3, 41.25), ("lesion 2", 3.46, 17.5))
CLASSIFICATION = ("splenic injury", 0.87)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _item(value_type: str, concept: tuple[str, str, str], **values: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([_code(*concept)])
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _num(concept: tuple[str, str, str], value: float, unit: tuple[str, str, str]) -> Dataset:
    measured = Dataset()
    measured.NumericValue = f"{value:g}"
    measured.MeasurementUnitsCodeSequence = Sequence([_code(*unit)])
    return _item("NUM", concept, MeasuredValueSequence=Sequence([measured]))


def _group(name: str, *children: Dataset) -> Dataset:
    group = _item("CONTAINER", ("125007", "DCM", "Measurement Group"), ContinuityOfContent="SEPARATE")
    group.ContentSequence = Sequence(
        [_item("TEXT", ("112039", "DCM", "Tracking Identifier"), TextValue=name), *children]
    )
    return group


def write_result_sr(path: Path, *, priority: tuple[str, str] = ("103391001", "Urgent")) -> Dataset:
    """Write the SR to ``path``; returns the CT header it belongs to."""
    source = pydicom.dcmread(SOURCE, stop_before_pixels=True)
    ds = Dataset()
    for keyword in (
        "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
    ):  # fmt: skip
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path), "series"])
    ds.Modality = "SR"
    ds.ContentDate = "20261203"
    ds.ContentTime = "093000"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("126000", "DCM", "Imaging Measurement Report")])
    groups = [
        _group(
            name,
            _num(("118565006", "SCT", "Volume"), volume, ("ml", "UCUM", "milliliter")),
            _num(("81827009", "SCT", "Diameter"), diameter, ("mm", "UCUM", "millimeter")),
        )
        for name, volume, diameter in LESIONS
    ]
    groups.append(
        _group(
            f"{CLASSIFICATION[0]} (classification)",
            _num(("122157", "DCM", "Probability"), CLASSIFICATION[1], ("1", "UCUM", "no units")),
            _item(
                "CODE",
                ("260870009", "SCT", "Priority"),
                ConceptCodeSequence=Sequence([_code(priority[0], "SCT", priority[1])]),
            ),
        )
    )
    summary = _item("TEXT", ("121111", "DCM", "Summary"), TextValue="lesion 1 24.3 mL; lesion 2 3.46 mL")
    ds.ContentSequence = Sequence([summary, *groups])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return source
