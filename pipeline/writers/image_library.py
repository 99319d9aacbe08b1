"""The TID 1600 Image Library of our SR: every source image referenced, descriptors once per group.

PS3.16 TID 1600 makes the Image Library container mandatory (TID 1500 includes it) but its
groups, their TID 1602 descriptors and the TID 1601 entries all user-optional ("U"), and TID 1601
makes each entry's own descriptors optional too. highdicom's ``MeasurementReport(referenced_images=)``
writes the full TID 1602/1604/1605 descriptors (position, orientation, spacing, ...) for every
image: 13-19 s for a 300-slice CT (issue 15), most of the SR writer's time, for values every
reader takes from the images themselves. This library holds what a reader needs to list the
evidence: one Image Library Group per (modality, frame of reference) with those two as the
group's descriptors, and one IMAGE entry per source instance (so every source is referenced from
the content tree, which ``tests/support/tid1500_checks.py`` asks). About 0.1 s for 300 images.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

__all__ = ["image_library", "insert_image_library"]

# CID 29 Acquisition Modality, for the modalities a pipeline takes (others: the group names none).
_MODALITY = {
    "CT": codes.cid29.ComputedTomography,
    "MR": codes.cid29.MagneticResonance,
    "PT": codes.cid29.PositronEmissionTomography,
}
_SOURCE = hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT")


def image_library(headers: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """Image Library (111028, DCM) referencing each of ``headers`` once, grouped by modality and frame."""
    if not headers:
        raise ValueError("the Image Library needs at least one source image")
    groups: dict[tuple[str, str], list[Dataset]] = {}
    for ds in headers:
        key = (str(ds.get("Modality", "")), str(ds.get("FrameOfReferenceUID", "")))
        groups.setdefault(key, []).append(ds)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence()
    for (modality, frame_of_reference), members in groups.items():
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        content = hd.sr.ContentSequence()
        if modality in _MODALITY:
            content.append(
                hd.sr.CodeContentItem(
                    name=codes.DCM.Modality,
                    value=_MODALITY[modality],
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
        if frame_of_reference:
            content.append(
                hd.sr.UIDRefContentItem(
                    name=codes.DCM.FrameOfReferenceUID,
                    value=frame_of_reference,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
        for ds in members:
            content.append(
                hd.sr.ImageContentItem(
                    name=_SOURCE,
                    referenced_sop_class_uid=ds.SOPClassUID,
                    referenced_sop_instance_uid=ds.SOPInstanceUID,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        group.ContentSequence = content
        library.ContentSequence.append(group)
    return library


def insert_image_library(root: Dataset, headers: Sequence[Dataset]) -> None:
    """Put the Image Library of ``headers`` into a TID 1500 root, after its Procedure Reported items."""
    items = root.ContentSequence
    position = len(items)
    for number, item in enumerate(items):
        name = item.get("ConceptNameCodeSequence")
        if name and (name[0].CodeValue, name[0].CodingSchemeDesignator) == ("121058", "DCM"):
            position = number + 1
    items.insert(position, image_library(headers))
