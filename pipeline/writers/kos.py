"""Key images and the SR -> a Key Object Selection document (PS3.3 A.35.4, PS3.16 TID 2010).

A viewer that shows key objects (most PACS flag a study that has them) opens the lesions' key
images and the report straight from the study, without reading the SR tree. The title is
(113000, DCM, "Of Interest") from CID 7010: the images are flagged by an algorithm for a reader's
attention, not selected for a purpose (referral, surgery, teaching) that the other titles name.
The description says what made the selection and that the images are not for diagnosis.

The document is in a new series of the source study (Series Number ``ResultSeries.KOS``), its UIDs
derived from the input fingerprint; the device observer and the IHE AIR Contributing Equipment
item are the same as the SR's. Pure: the analysis time is passed in.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import KeyObjectSelectionDocumentStorage

from pipeline.findings import Findings
from pipeline.uids import (
    DEVICE_OBSERVER_UID,
    MANUFACTURER,
    PRODUCT_NAME,
    SOFTWARE_VERSION,
    ResultSeries,
    result_uids,
)
from pipeline.writers.output import finalize_output, ihe_scheme_identification

__all__ = ["KOS_SERIES_NUMBER", "KOS_TITLE", "write_kos"]

KOS_SERIES_NUMBER = int(ResultSeries.KOS)
KOS_TITLE = hd.sr.CodedConcept.from_code(dicom_codes.DCM.OfInterest)  # (113000, DCM), CID 7010


def write_kos(
    key_images: Sequence[Dataset],
    report: Dataset,
    findings: Findings,
    *,
    input_fingerprint: str,
    content_datetime: datetime.datetime,
    series_number: int = KOS_SERIES_NUMBER,
) -> Dataset:
    """The KOS that references ``key_images`` and the SR ``report`` (all of one study).

    ``content_datetime`` is when the analysis began (Content Date/Time, IHE AIR). Raises
    ``ValueError`` when the objects are not of one study, or a referenced object is itself a KOS.
    """
    referenced = [*key_images, report]
    studies = {str(ds.StudyInstanceUID) for ds in referenced}
    if len(studies) != 1:
        raise ValueError(f"a KOS references objects of one study; these are of {sorted(studies)}")
    if any(ds.SOPClassUID == KeyObjectSelectionDocumentStorage for ds in referenced):
        raise ValueError("a KOS of ours references the key images and the SR, never another KOS")
    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name=PRODUCT_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=f"{PRODUCT_NAME} {SOFTWARE_VERSION}",
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=KOS_TITLE,
        referenced_objects=referenced,
        observer_device_context=observer,
        description=_description(len(key_images), findings),
    )
    uids = result_uids(input_fingerprint, findings.algorithm, "kos")
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="AI triage key objects",
        coding_schemes=[ihe_scheme_identification()],  # 99IHE of the Contributing Equipment purpose
    )
    finalize_output(kos, content_datetime, findings.algorithms)
    return kos


def _description(n_images: int, findings: Findings) -> str:
    """Key Object Description (TID 2010, TEXT 113012): who selected what, and how far to trust it."""
    what = f"{n_images} key image{'' if n_images == 1 else 's'} and the report" if n_images else "the report"
    priority = findings.priority.name.lower()  # ROUTINE is 0: name it, never test it for truth
    return (
        f"Selected by {PRODUCT_NAME} ({findings.algorithm.name} {findings.algorithm.version}): {what}; "
        f"triage priority {priority}. Key images are NOT FOR DIAGNOSTIC USE."
    )[:1024]
