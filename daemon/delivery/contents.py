"""Which result objects each kind of content is made of (the worker queues one outbox row per
result x destination x content; ``storage/outbox.py`` skips results of other SOP classes).

The DICOM contents are the objects themselves; ``hl7_oru``, ``hl7_priority`` and ``fhir`` are
messages built from the job's SR at send time (``daemon/delivery/report.py``).
"""

from __future__ import annotations

from pydicom import uid

from daemon.config import Content, DestinationConfig

SR_CLASSES = frozenset(
    {
        uid.BasicTextSRStorage,
        uid.EnhancedSRStorage,
        uid.ComprehensiveSRStorage,
        uid.Comprehensive3DSRStorage,
        uid.ExtensibleSRStorage,
    }
)
SOURCE_CLASSES: dict[Content, frozenset[str]] = {
    Content.SR: SR_CLASSES,
    Content.SEG: frozenset({uid.SegmentationStorage}),
    Content.KOS: frozenset({uid.KeyObjectSelectionDocumentStorage}),
    Content.KEY_IMAGES: frozenset(
        {
            uid.SecondaryCaptureImageStorage,
            uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
            uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
            uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
            uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
        }
    ),
    Content.HL7_ORU: SR_CLASSES,
    Content.HL7_PRIORITY: SR_CLASSES,
    Content.FHIR: SR_CLASSES,
}
ALL_DICOM = frozenset({Content.SR, Content.SEG, Content.KOS, Content.KEY_IMAGES})


def plan(destination: DestinationConfig, contents: tuple[Content, ...]) -> list[tuple[str, frozenset[str]]]:
    """(content, SOP classes of the results it is made of) for each outbox row kind of ``destination``.

    A DICOM destination that receives every DICOM kind gets every result object, whatever its
    class (content ``""``), as before contents existed.
    """
    if destination.kind == "dicom" and ALL_DICOM <= set(contents):
        return [("", frozenset())]
    return [(c.value, SOURCE_CLASSES[c]) for c in dict.fromkeys(contents)]


def status_text(content: str, status: int | None) -> str:
    """A delivery's last answer as its protocol spells it: DICOM ``0xA700``, HL7 ``ERR 207``, ``HTTP 503``."""
    if status is None:
        return "-"
    if content == Content.FHIR:
        return f"HTTP {status}"
    if content in (Content.HL7_ORU, Content.HL7_PRIORITY):
        return f"ERR {status}" if status else "AA"
    return f"0x{status:04X}"
