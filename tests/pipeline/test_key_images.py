"""Key images and the Key Object Selection document (issue 13 item 10), from a real phantom series.

The phantom (seed 5, two lesions of 16.3 and 7.2 mL) is written as CT files and read back through
``load_volume``; its ground-truth label map stands in for a model, so the test is about the
writers: one outlined, labelled secondary capture per lesion on its largest cross-section, and a
KOS that points at exactly those images and the SR. Every object is checked by dciodvfy.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from scipy import ndimage

from pipeline.demo.phantom import GroundTruth, lesion_label_map, write_phantom_series
from pipeline.findings import Findings
from pipeline.geometry import load_volume
from pipeline.measure import measure_lesions
from pipeline.uids import ResultSeries, model_device_uid
from pipeline.volume import Volume
from pipeline.writers.key_images import (
    BANNER_TEXT,
    OUTLINE_PIXELS,
    OUTLINE_RGB,
    TEXT_RGB,
    KeyImageLayout,
    patient_orientation,
    write_key_images,
)
from pipeline.writers.kos import write_kos
from pipeline.writers.seg import write_seg
from pipeline.writers.sr import write_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import ALGORITHM, assert_dciodvfy_clean, assert_dsrdump_ok, roundtrip
from vocabulary import Priority

pytestmark = [pytest.mark.peer]  # dciodvfy and dsrdump are real external tools

SEED, LESIONS, SLICES = 5, 2, 48
FINGERPRINT = "sha256:key-image-study"
WHEN = datetime.datetime(2026, 12, 3, 10, 30, 5)  # when the analysis began
PROCESSING_ALGORITHM = ("Newcode1", "99IHE")


@dataclasses.dataclass(frozen=True)
class Case:
    truth: GroundTruth
    volume: Volume
    headers: Sequence[Dataset]  # one per slice, volume order
    findings: Findings
    lesion_map: np.ndarray
    sr: Dataset
    key_images: tuple[Dataset, ...]
    kos: Dataset


def _build(directory: Path, fingerprint: str = FINGERPRINT) -> Case:
    files = sorted(directory.glob("*.dcm"))
    truth = GroundTruth.from_json((directory / "truth.json").read_text())
    volume = load_volume(files)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p, stop_before_pixels=True) for p in files)}
    headers = [by_uid[ref.sop_instance_uid] for ref in volume.source_instances]
    labels = (lesion_label_map(truth, volume.affine, volume.array.shape) > 0).astype(np.uint8)
    found, lesion_map = measure_lesions(labels, volume, ("background", "liver lesion"))
    findings = Findings(algorithm=ALGORITHM, findings=found, priority=Priority.URGENT, summary="two lesions")
    seg = write_seg(
        lesion_map, volume, headers, findings, input_fingerprint=fingerprint, content_datetime=WHEN
    )
    sr = write_sr(findings, headers, volume, input_fingerprint=fingerprint, seg=seg, content_datetime=WHEN)
    key_images = write_key_images(
        lesion_map, volume, headers, findings, input_fingerprint=fingerprint, content_datetime=WHEN
    )
    kos = write_kos(key_images, sr, findings, input_fingerprint=fingerprint, content_datetime=WHEN)
    return Case(truth, volume, headers, findings, lesion_map, sr, key_images, kos)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two-lesions")
    truth = write_phantom_series(out, seed=SEED, lesions=LESIONS, slices=SLICES)
    (out / "truth.json").write_text(truth.to_json())
    return out


@pytest.fixture(scope="module")
def case(phantom_dir: Path) -> Case:
    return _build(phantom_dir)


def _slice_of(case: Case, image: Dataset) -> int:
    (source,) = image.SourceImageSequence
    uids = [ref.sop_instance_uid for ref in case.volume.source_instances]
    return uids.index(str(source.ReferencedSOPInstanceUID))


def test_two_lesions_give_two_key_images_in_a_new_series_of_the_same_study(case: Case) -> None:
    assert len(case.findings.findings) == 2 and len(case.key_images) == 2
    study = case.headers[0].StudyInstanceUID
    series = {str(ds.SeriesInstanceUID) for ds in case.key_images}
    assert len(series) == 1 and series.isdisjoint(
        {case.headers[0].SeriesInstanceUID, case.sr.SeriesInstanceUID}
    )
    for number, image in enumerate(case.key_images, start=1):
        assert image.SOPClassUID == SecondaryCaptureImageStorage
        assert image.StudyInstanceUID == study and image.PatientID == case.headers[0].PatientID
        assert int(image.SeriesNumber) == ResultSeries.KEY_IMAGES and int(image.InstanceNumber) == number
        assert image.BurnedInAnnotation == "YES"
        assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert BANNER_TEXT in image.ImageComments
        assert (str(image.ContentDate), str(image.ContentTime)) == ("20261203", "103005")
        assert (str(image.DateOfSecondaryCapture), str(image.TimeOfSecondaryCapture)) == (
            "20261203",
            "103005",
        )
        assert tuple(image.PatientOrientation) == patient_orientation(case.volume.affine) == ("L", "P")
        assert_dciodvfy_clean(image, f"key image {number}")


def test_each_key_image_is_the_slice_of_its_lesions_largest_cross_section(case: Case) -> None:
    spacing = case.volume.spacing[2]
    for value, (finding, image) in enumerate(zip(case.findings.findings, case.key_images, strict=True), 1):
        k = _slice_of(case, image)
        areas = np.count_nonzero(case.lesion_map == value, axis=(0, 1))
        assert areas[k] == areas.max() > 0, (finding.tracking_identifier, k, areas.tolist())
        # An ellipsoid's largest section parallel to the slices passes through its centre.
        lesion = min(
            case.truth.lesions, key=lambda t: np.linalg.norm(np.subtract(t.centre_lps, finding.centroid_lps))
        )
        z = float(case.headers[k].ImagePositionPatient[2])
        assert abs(z - lesion.centre_lps[2]) <= 1.5 * spacing, (
            finding.tracking_identifier,
            z,
            lesion.centre_lps,
        )
        assert finding.tracking_identifier in image.ImageComments


def test_outline_surrounds_the_lesion_and_the_text_is_burned_in(case: Case) -> None:
    for value, image in enumerate(case.key_images, start=1):
        pixels = roundtrip(image).pixel_array  # what a viewer decodes
        k = _slice_of(case, image)
        layout = KeyImageLayout(case.volume.array.shape[1], case.volume.array.shape[0])
        assert pixels.shape == (layout.rows, layout.columns, 3) and layout.columns >= 512
        rows, columns = layout.image_box()
        picture = pixels[rows, columns]
        outline = np.all(picture == OUTLINE_RGB, axis=-1)
        mask = (case.lesion_map[:, :, k] == value).T
        mask = np.repeat(np.repeat(mask, layout.scale, axis=0), layout.scale, axis=1)
        ring = ndimage.binary_dilation(mask, iterations=OUTLINE_PIXELS) & ~mask
        assert (
            outline.sum() == ring.sum() > 4 * layout.scale * OUTLINE_PIXELS
        )  # drawn all round, nowhere else
        assert np.array_equal(outline, ring)
        inside = picture[mask]
        assert np.all(inside[:, 0] == inside[:, 1]) and np.all(
            inside[:, 1] == inside[:, 2]
        )  # lesion stays visible
        for band in (layout.banner_box(), layout.caption_box()):
            text = np.all(pixels[band] == TEXT_RGB, axis=-1)
            assert text.sum() > 50, f"no burned-in text in rows {band[0]} of key image {value}"
        assert not np.all(picture == TEXT_RGB, axis=-1).any()  # the text never covers the anatomy


def test_key_images_carry_the_ihe_air_contributing_equipment(case: Case) -> None:
    for image in (*case.key_images, case.kos):
        items = [
            item
            for item in image.ContributingEquipmentSequence
            if (
                item.PurposeOfReferenceCodeSequence[0].CodeValue,
                item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
            )
            == PROCESSING_ALGORITHM
        ]
        assert [item.DeviceUID for item in items] == [model_device_uid(ALGORITHM)]
        assert "99IHE" in {s.CodingSchemeDesignator for s in image.CodingSchemeIdentificationSequence}


def _kos_references(kos: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }


def _evidence(kos: Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def test_kos_references_exactly_the_key_images_and_the_sr(case: Case) -> None:
    kos = roundtrip(case.kos)
    expected = {str(ds.SOPInstanceUID) for ds in case.key_images} | {str(case.sr.SOPInstanceUID)}
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage and kos.Modality == "KO"
    assert kos.StudyInstanceUID == case.headers[0].StudyInstanceUID
    assert int(kos.SeriesNumber) == ResultSeries.KOS
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113000",
        "DCM",
        "Of Interest",
    )
    assert _kos_references(kos) == expected
    assert _evidence(kos) == expected
    classes = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPClassUID)
        for item in kos.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    assert classes == {SecondaryCaptureImageStorage, Comprehensive3DSRStorage}
    assert (str(kos.ContentDate), str(kos.ContentTime)) == ("20261203", "103005")
    assert_dciodvfy_clean(case.kos, "KOS")
    assert_dsrdump_ok(case.kos, "KOS")


def test_same_input_same_uids_other_input_other_uids(case: Case, phantom_dir: Path) -> None:
    again = _build(phantom_dir)
    other = _build(phantom_dir, fingerprint="sha256:another-study-version")
    uids = [str(ds.SOPInstanceUID) for ds in (*case.key_images, case.kos)]
    assert [str(ds.SOPInstanceUID) for ds in (*again.key_images, again.kos)] == uids
    assert np.array_equal(again.key_images[0].pixel_array, case.key_images[0].pixel_array)
    assert set(uids).isdisjoint(str(ds.SOPInstanceUID) for ds in (*other.key_images, other.kos))


def test_a_cap_keeps_the_key_images_of_the_largest_lesions(case: Case) -> None:
    """max_images = 1: the larger lesion's image only, wherever it stands in the findings, with the
    UID it has uncapped; a cap the findings fit in changes nothing."""
    larger, smaller = case.findings.findings
    assert larger.volume_ml > smaller.volume_ml

    def write(lesion_map: np.ndarray, findings: Findings, cap: int | None) -> tuple[Dataset, ...]:
        return write_key_images(
            lesion_map,
            case.volume,
            case.headers,
            findings,
            input_fingerprint=FINGERPRINT,
            content_datetime=WHEN,
            max_images=cap,
        )

    swapped = np.select([case.lesion_map == 1, case.lesion_map == 2], [2, 1], 0).astype(case.lesion_map.dtype)
    (image,) = write(swapped, dataclasses.replace(case.findings, findings=(smaller, larger)), 1)
    assert image.SOPInstanceUID == case.key_images[0].SOPInstanceUID
    assert larger.tracking_identifier in image.ImageComments and int(image.InstanceNumber) == 1
    assert np.array_equal(image.pixel_array, case.key_images[0].pixel_array)
    capped = write(case.lesion_map, case.findings, 2)
    assert [ds.SOPInstanceUID for ds in capped] == [ds.SOPInstanceUID for ds in case.key_images]
    with pytest.raises(ValueError, match="max_images"):
        write(case.lesion_map, case.findings, 0)


def test_a_kos_refuses_objects_of_another_study(case: Case) -> None:
    stranger = Dataset()
    stranger.update(case.key_images[0])
    stranger.StudyInstanceUID = "2.25.1"
    with pytest.raises(ValueError, match="one study"):
        write_kos([stranger], case.sr, case.findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN)


@pytest.mark.slow
def test_the_runner_sends_a_key_image_per_reported_lesion_and_their_kos(phantom_dir: Path) -> None:
    """The demo pipeline (trained bundles) on the same phantom: SR, SEG, one key image per lesion, KOS."""
    from pipeline.demo.bundle import demo_spec
    from pipeline.runner import run

    files = sorted(phantom_dir.glob("*.dcm"))
    result = run(files, demo_spec(), input_fingerprint="sha256:runner-study", analysis_started=WHEN)
    lesions = result.findings.findings
    assert lesions, result.findings.summary
    assert result.seg is not None and result.kos is not None
    assert [ds.SOPClassUID for ds in result.datasets] == [
        Comprehensive3DSRStorage,
        result.seg.SOPClassUID,
        *[SecondaryCaptureImageStorage] * len(lesions),
        KeyObjectSelectionDocumentStorage,
    ]
    for finding, image in zip(lesions, result.key_images, strict=True):
        assert finding.tracking_identifier in image.ImageComments
    expected = {str(ds.SOPInstanceUID) for ds in result.key_images} | {str(result.sr.SOPInstanceUID)}
    assert _kos_references(result.kos) == _evidence(result.kos) == expected
    assert {str(ds.StudyInstanceUID) for ds in result.datasets} == {result.study_instance_uid}
    assert len({int(ds.SeriesNumber) for ds in result.datasets}) == len(
        {ds.Modality for ds in result.datasets}
    )


def test_patient_orientation_of_a_sagittal_slice_follows_its_direction_cosines() -> None:
    """PS3.3 C.7.6.1.1.1 from the real sagittal MR's Image Orientation (0\\1\\0\\0\\0\\-1): rows run P, columns F."""
    path = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))[0]
    iop = [float(v) for v in dcmread(path, stop_before_pixels=True).ImageOrientationPatient]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = np.multiply(iop[:3], 0.9), np.multiply(iop[3:], 0.9)
    assert patient_orientation(affine) == ("P", "F")
    oblique = np.eye(4)
    oblique[:3, 0] = (0.8, 0.6, 0.0)
    assert patient_orientation(oblique)[0] == "LP"  # major axis first


def test_inputs_that_do_not_line_up_are_refused_and_a_lesion_without_voxels_gets_no_image(case: Case) -> None:
    def write(lesion_map: np.ndarray, headers: Sequence[Dataset] = case.headers) -> tuple[Dataset, ...]:
        return write_key_images(
            lesion_map,
            case.volume,
            headers,
            case.findings,
            input_fingerprint=FINGERPRINT,
            content_datetime=WHEN,
        )

    with pytest.raises(ValueError, match="lesion map shape"):
        write(case.lesion_map[:, :, 1:])
    with pytest.raises(ValueError, match="volume order"):
        write(case.lesion_map, case.headers[::-1])
    (image,) = write(np.where(case.lesion_map == 1, 1, 0).astype(case.lesion_map.dtype))
    assert image.SOPInstanceUID == case.key_images[0].SOPInstanceUID  # the same lesion, the same UID
    assert write(np.zeros_like(case.lesion_map)) == ()
