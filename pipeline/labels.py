"""Bundle label names -> coded concepts for DICOM SEG and the TID 1500 SR: the one place for them.

A segment is described by a Segmented Property Category (DICOM CID 7150), a Segmented Property
Type (CID 7151) and, where the type is not itself anatomy, a finding site. Codes are SNOMED CT
(scheme designator ``SCT``), with the code meanings used in DICOM PS3.16 (checked against
pydicom's ``codes.SCT``). Bundle channel names (``channel_def`` in a bundle's ``metadata.json``) are
matched case-insensitively, with spaces and hyphens read as underscores, so ``"Right kidney"`` and
``"kidney_right"`` are both found. A name like ``"liver_lesion"`` is a lesion whose finding site is
the liver.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.findings import Code

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "LESION",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "SegmentCodes",
    "is_background",
    "segment_codes",
]

# CID 7150 Segmentation Property Categories
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LESION = Code("52988006", "SCT", "Lesion")

_BACKGROUND_NAMES = frozenset({"background", "bg"})

# Normal anatomy: the property type is the organ itself.
_ANATOMY: dict[str, Code] = {
    "spleen": Code("78961009", "SCT", "Spleen"),
    "liver": Code("10200004", "SCT", "Liver"),
    "kidney": Code("64033007", "SCT", "Kidney"),
    "kidney_right": Code("9846003", "SCT", "Right kidney"),
    "right_kidney": Code("9846003", "SCT", "Right kidney"),
    "kidney_left": Code("18639004", "SCT", "Left kidney"),
    "left_kidney": Code("18639004", "SCT", "Left kidney"),
    "gallbladder": Code("28231008", "SCT", "Gallbladder"),
    "stomach": Code("69695003", "SCT", "Stomach"),
    "aorta": Code("15825003", "SCT", "Aorta"),
    "inferior_vena_cava": Code("64131007", "SCT", "Inferior vena cava"),
    "pancreas": Code("15776009", "SCT", "Pancreas"),
    "adrenal_gland": Code("23451007", "SCT", "Adrenal gland"),
    "esophagus": Code("32849002", "SCT", "Esophagus"),
    "trachea": Code("44567001", "SCT", "Trachea"),
    "lung": Code("39607008", "SCT", "Lung"),
    "heart": Code("80891009", "SCT", "Heart"),
    "pulmonary_artery": Code("81040000", "SCT", "Pulmonary artery"),
    "brain": Code("12738006", "SCT", "Brain"),
    "small_bowel": Code("30315005", "SCT", "Small intestine"),
    "small_intestine": Code("30315005", "SCT", "Small intestine"),
    "duodenum": Code("38848004", "SCT", "Duodenum"),
    "colon": Code("71854001", "SCT", "Colon"),
    "sacrum": Code("54735007", "SCT", "Sacrum"),
    "urinary_bladder": Code("89837001", "SCT", "Bladder"),
    "bladder": Code("89837001", "SCT", "Bladder"),
    "prostate": Code("41216001", "SCT", "Prostate"),
}

# Abnormal structures: category "Morphologically Abnormal Structure".
_ABNORMAL: dict[str, Code] = {
    "lesion": LESION,
    "tumor": Code("108369006", "SCT", "Neoplasm"),
    "tumour": Code("108369006", "SCT", "Neoplasm"),
    "neoplasm": Code("108369006", "SCT", "Neoplasm"),
    "mass": Code("4147007", "SCT", "Mass"),
    "nodule": Code("27925004", "SCT", "Nodule"),
    "cyst": Code("367643001", "SCT", "Cyst"),
    "metastasis": Code("128462008", "SCT", "Metastasis"),
    "hemorrhage": Code("50960005", "SCT", "Hemorrhage"),
}


@dataclass(frozen=True)
class SegmentCodes:
    """What a segment is, coded: category (CID 7150), type (CID 7151), optional finding site."""

    category: Code
    type: Code
    finding_site: Code | None = None


def _normalise(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())


def is_background(name: str) -> bool:
    """True for the conventional names of channel 0 ("background")."""
    return _normalise(name) in _BACKGROUND_NAMES


def segment_codes(name: str) -> SegmentCodes | None:
    """The codes for a bundle channel name, or ``None`` when this table does not know it."""
    key = _normalise(name)
    if key in _ANATOMY:
        return SegmentCodes(category=ANATOMICAL_STRUCTURE, type=_ANATOMY[key])
    if key in _ABNORMAL:
        return SegmentCodes(category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE, type=_ABNORMAL[key])
    site, _, kind = key.rpartition("_")
    if kind in _ABNORMAL and site in _ANATOMY:
        return SegmentCodes(
            category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE, type=_ABNORMAL[kind], finding_site=_ANATOMY[site]
        )
    return None
