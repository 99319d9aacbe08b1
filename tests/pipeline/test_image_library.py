"""TID 1600 Image Library of our SR (pipeline.writers.image_library): every source once, descriptors per group.

The full SR with this library passes dciodvfy, dsrdump and the TID 1500 checks in test_sr_writer.py;
these tests pin the structure itself (issue 15: per-image descriptors cost 13-19 s for 300 slices).
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

from pipeline.writers.image_library import image_library


def _header(modality: str, frame: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.FrameOfReferenceUID = frame
    return ds


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def test_every_source_is_one_image_entry_without_per_image_descriptors() -> None:
    frame_ct, frame_mr = generate_uid(), generate_uid()
    headers = [_header("CT", frame_ct, CTImageStorage) for _ in range(300)]
    headers += [_header("MR", frame_mr, MRImageStorage) for _ in range(3)]

    library = image_library(headers)

    assert _concept(library) == ("111028", "DCM")
    groups = list(library.ContentSequence)
    assert [_concept(g) for g in groups] == [("126200", "DCM")] * 2
    images = [item for g in groups for item in g.ContentSequence if item.ValueType == "IMAGE"]
    referenced = [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in images]
    assert referenced == [str(ds.SOPInstanceUID) for ds in headers]
    assert all("ContentSequence" not in item for item in images), "entries carry no descriptors"
    ct_group = groups[0]
    context = {_concept(item): item for item in ct_group.ContentSequence if item.ValueType != "IMAGE"}
    assert context[("121139", "DCM")].ConceptCodeSequence[0].CodeValue == "CT"
    assert context[("112227", "DCM")].UID == frame_ct
    assert all(item.RelationshipType == "HAS ACQ CONTEXT" for item in context.values())


def test_an_empty_library_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one source image"):
        image_library([])
