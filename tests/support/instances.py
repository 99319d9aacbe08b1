"""Small valid CT instances as the receiver stores them: Part 10 header + data set bytes."""

from __future__ import annotations

from pydicom.dataset import Dataset

from daemon.dicom.file_meta import file_header
from storage.recording import IncomingInstance
from tests.support.dicom_bytes import encode_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def ct_dataset(sop: str, series: str, study: str, *, patient: str = "P1", fill: int = 0) -> Dataset:
    """A 4x4 16-bit CT image that passes the receiver's validation; ``fill`` varies the pixels."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes([fill % 256]) * 32
    return ds


def ct_chunks(ds: Dataset) -> tuple[bytes, bytes]:
    """(Part 10 header, data set) as the receiver passes them to ``Ingest.store``."""
    return file_header(CT, str(ds.SOPInstanceUID), EXPLICIT_LE), encode_dataset(ds)


def ct_incoming(ds: Dataset) -> IncomingInstance:
    return IncomingInstance(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=CT,
        transfer_syntax_uid=EXPLICIT_LE,
        patient_id=str(ds.PatientID),
        modality="CT",
        series_number=1,
    )
