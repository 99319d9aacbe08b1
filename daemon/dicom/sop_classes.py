"""The storage SOP classes the receiver accepts: what a CT/MR study carries (PS3.4 Annex B.5).

One table, one place. ``True`` marks image classes, whose Pixel Data the receiver checks.
"""

from __future__ import annotations

import pydicom.uid as sc
from pydicom.uid import UID, AllTransferSyntaxes

VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4, the Verification SOP Class (C-ECHO)

ACCEPTED_STORAGE: dict[str, bool] = {
    # the images we analyse
    sc.CTImageStorage: True,
    sc.EnhancedCTImageStorage: True,
    sc.LegacyConvertedEnhancedCTImageStorage: True,
    sc.MRImageStorage: True,
    sc.EnhancedMRImageStorage: True,
    sc.EnhancedMRColorImageStorage: True,
    sc.LegacyConvertedEnhancedMRImageStorage: True,
    # other images a CT/MR (or PET/CT) study carries
    sc.PositronEmissionTomographyImageStorage: True,
    sc.EnhancedPETImageStorage: True,
    sc.LegacyConvertedEnhancedPETImageStorage: True,
    sc.SecondaryCaptureImageStorage: True,
    sc.MultiFrameSingleBitSecondaryCaptureImageStorage: True,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage: True,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage: True,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage: True,
    sc.SegmentationStorage: True,
    # non-image objects that travel with the study (kept so the study is complete)
    sc.MRSpectroscopyStorage: False,
    sc.RawDataStorage: False,
    sc.GrayscaleSoftcopyPresentationStateStorage: False,
    sc.KeyObjectSelectionDocumentStorage: False,
    sc.BasicTextSRStorage: False,
    sc.EnhancedSRStorage: False,
    sc.ComprehensiveSRStorage: False,
    sc.Comprehensive3DSRStorage: False,
    sc.XRayRadiationDoseSRStorage: False,
    sc.EnhancedXRayRadiationDoseSRStorage: False,
    sc.EncapsulatedPDFStorage: False,
}

# Every transfer syntax pydicom knows, i.e. all standard ones; stored exactly as received.
TRANSFER_SYNTAXES: list[str] = [str(ts) for ts in AllTransferSyntaxes]


def is_image(sop_class_uid: str) -> bool:
    return ACCEPTED_STORAGE.get(sop_class_uid, False)


def describe(sop_class_uid: str) -> str:
    return UID(sop_class_uid).name or sop_class_uid
