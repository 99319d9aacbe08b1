"""What the SR and SEG writers share: the source headers they copy patient and study from, the
precision of the numbers they write, and the finishing of every output object (character set,
implementation UID, creation date and time, the IHE AIR identity of the models behind it).
"""

from __future__ import annotations

import copy
import datetime
import math
from collections.abc import Sequence

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM

from pipeline import codes
from pipeline.findings import AlgorithmInfo
from pipeline.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MANUFACTURER,
    PRODUCT_NAME,
    SOFTWARE_VERSION,
    model_device_uid,
)

__all__ = [
    "DEIDENTIFICATION_METHOD_UNSTATED",
    "OUTPUT_CHARACTER_SET",
    "add_processing_algorithms",
    "finalize_output",
    "header_copies",
    "ihe_scheme_identification",
    "patient_study_header",
    "set_character_set",
    "significant",
]

OUTPUT_CHARACTER_SET = "ISO_IR 192"
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# Type 2 attributes highdicom reads from the first source (PS3.3 C.7.1.1, C.7.2.1): empty if absent.
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PIXEL_DATA_GROUP = 0x7FE00000
DEIDENTIFICATION_METHOD_UNSTATED = "not stated in the source images"


def header_copies(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    """Pixel-free copies of the sources for highdicom; the first one decoded (``patient_study_header``).

    The others are shallow: highdicom reads only their UIDs and geometry.
    """
    return [patient_study_header(source_datasets[0])] + [_pixel_free(ds) for ds in source_datasets[1:]]


def _pixel_free(ds: Dataset) -> Dataset:
    return Dataset({tag: elem for tag, elem in ds.items() if tag < _PIXEL_DATA_GROUP})


def patient_study_header(source: Dataset) -> Dataset:
    """A decoded, pixel-free copy of ``source`` from which highdicom copies patient and study.

    Every text value is decoded from the source's character set into ``str`` (sequences too), so
    the output can re-encode it in its own; Type 2 patient/study attributes that are absent become
    empty (PS3.3 C.7.1.1, C.7.2.1) so highdicom can copy them, and a de-identified patient
    whose source left the method empty gets a method that says so.
    """
    header = copy.deepcopy(_pixel_free(source))
    header.decode()
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    # PS3.3 C.7.1.1: a de-identified patient needs a method (1C); some anonymisers leave it empty.
    if (
        header.get("PatientIdentityRemoved") == "YES"
        and not header.get("DeidentificationMethod")
        and not header.get("DeidentificationMethodCodeSequence")
    ):
        header.DeidentificationMethod = DEIDENTIFICATION_METHOD_UNSTATED
    return header


def set_character_set(dataset: Dataset) -> None:
    """ISO_IR 192 (UTF-8) when any text is outside ASCII, else the default repertoire (PS3.5 6.1).

    Leaving plain-ASCII objects on the default repertoire keeps them readable by the oldest PACS
    and fully checkable by validators (dcmtk's VR checker skips ISO_IR 192 text).
    """
    if _has_non_ascii(dataset):
        dataset.SpecificCharacterSet = OUTPUT_CHARACTER_SET
    elif "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet


def _has_non_ascii(dataset: Dataset) -> bool:
    for elem in dataset:
        if elem.VR == "SQ":
            if any(_has_non_ascii(item) for item in elem.value):
                return True
        elif elem.VR in _TEXT_VRS and elem.value is not None:
            values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
            if any(not str(value).isascii() for value in values):
                return True
    return False


def significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits: decimal strings without false precision."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def ihe_scheme_identification() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification item (PS3.3 C.12.1) for IHE's ``99IHE`` interim codes."""
    return CodingSchemeIdentificationItem(
        designator=codes.PROCESSING_ALGORITHM.scheme_designator,
        name="IHE interim codes",
        responsible_organization="IHE International",
    )


def add_processing_algorithms(
    dataset: Dataset, algorithms: Sequence[AlgorithmInfo], when: datetime.datetime
) -> None:
    """One Contributing Equipment item per model (IHE AIR): purpose "Processing Algorithm", name,
    versions, and a Device UID derived from the bundle sha256 (new weights: a new device).

    highdicom accepts only DICOM purposes of reference, so the items are added here with pydicom.
    """
    items = list(dataset.get("ContributingEquipmentSequence", []))
    for algorithm in algorithms:
        purpose = Dataset()
        purpose.CodeValue = codes.PROCESSING_ALGORITHM.value
        purpose.CodingSchemeDesignator = codes.PROCESSING_ALGORITHM.scheme_designator
        purpose.CodeMeaning = codes.PROCESSING_ALGORITHM.meaning
        item = Dataset()
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.Manufacturer = MANUFACTURER
        item.ManufacturerModelName = algorithm.name[:64]
        item.SoftwareVersions = [algorithm.version[:64], f"{PRODUCT_NAME} {SOFTWARE_VERSION}"[:64]]
        item.DeviceUID = model_device_uid(algorithm)
        item.ContributionDateTime = DT(when)
        item.ContributionDescription = (
            f"{algorithm.name} {algorithm.version}, bundle sha256 {algorithm.sha256}, "
            f"pipeline {algorithm.pipeline}"
        )[:1024]
        items.append(item)
    dataset.ContributingEquipmentSequence = items


def finalize_output(
    dataset: Dataset, content_datetime: datetime.datetime, algorithms: Sequence[AlgorithmInfo]
) -> None:
    """Last touches shared by the SR and SEG writers: character set, implementation, date/time, models."""
    set_character_set(dataset)
    dataset.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    dataset.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    _stamp_datetime(dataset, content_datetime)
    add_processing_algorithms(dataset, algorithms, content_datetime)


def _stamp_datetime(dataset: Dataset, when: datetime.datetime) -> None:
    """Set Content, Series and Instance Creation Date/Time to ``when`` (IHE AIR: the analysis began)."""
    date, time = DA(when.date()), TM(when.time())
    for prefix in ("Content", "Series", "InstanceCreation"):
        setattr(dataset, f"{prefix}Date", date)
        setattr(dataset, f"{prefix}Time", time)
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:  # highdicom stamps its own item with the current time
            item.ContributionDateTime = DT(when)
