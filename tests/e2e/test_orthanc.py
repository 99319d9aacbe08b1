"""A real PACS in the loop: Orthanc pushes a phantom study to pacs-triage; the SR, SEG, key images
and their KOS come back into the same study in Orthanc, with the lesion volume and priority the
ground truth calls for.

Orthanc (Debian package ``orthanc``) runs from a generated configuration on loopback ports with
temporary storage; the test talks to it only through its REST API and DICOM, as a hospital would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.demo.phantom import write_phantom_series
from tests.support.dicom_validators import assert_dciodvfy_clean
from tests.support.e2e import (
    RESULT_DEADLINE_S,
    SEG_MODALITY,
    SR_MODALITY,
    DemoBundles,
    Orthanc,
    check_seg,
    check_sr,
    headers,
    service_config,
)
from tests.support.peers import free_port
from tests.support.process import wait_until
from tests.support.service import ServiceFactory
from vocabulary import Priority

pytestmark = [pytest.mark.peer, pytest.mark.slow]

SEED, LESIONS, SLICES = 11, 1, 40
MODALITY_NAME = "pacs-triage"  # Orthanc's name for our node (its DicomModalities key)
TOLERANCE = 0.15
KOS_MODALITY, KEY_IMAGE_MODALITY = "KO", "OT"  # highdicom's secondary captures are "other"
RESULT_MODALITIES = (SR_MODALITY, SEG_MODALITY, KEY_IMAGE_MODALITY, KOS_MODALITY)


def _series_by_modality(orthanc: Orthanc, study_id: str) -> dict[str, dict[str, Any]]:
    return {s["MainDicomTags"].get("Modality", ""): s for s in orthanc.get(f"/studies/{study_id}/series")}


def test_orthanc_pushes_a_study_and_gets_the_sr_seg_key_images_and_kos_back_in_the_same_study(
    tmp_path: Path, demo_bundles: DemoBundles, orthanc_factory: list[Orthanc], services: ServiceFactory
) -> None:
    our_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc", modalities={MODALITY_NAME: ["PACS_TRIAGE", "127.0.0.1", our_port]}
    )
    orthanc_factory.append(orthanc)
    orthanc.start()
    service = services(
        port=our_port,
        config=service_config(tmp_path / "pacs-triage.toml", demo_bundles, [("ct-demo", "CT")]),
        env={
            "PACS_TRIAGE_DESTINATION": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            "PACS_TRIAGE_WORKERS__COUNT": "1",
        },
        name="e2e-orthanc",
    )

    truth = write_phantom_series(tmp_path / "phantom", seed=SEED, lesions=LESIONS, slices=SLICES)
    files = sorted((tmp_path / "phantom").glob("*.dcm"))
    study_ids = {orthanc.upload(path)["ParentStudy"] for path in files}
    assert len(study_ids) == 1
    study_id = study_ids.pop()

    # Orthanc pushes the study to pacs-triage (C-STORE SCU, its own association).
    answer = orthanc.post_json(
        f"/modalities/{MODALITY_NAME}/store", {"Resources": [study_id], "Synchronous": True}
    )
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    assert answer.get("InstancesCount") == len(files), answer

    def results_back() -> dict[str, dict[str, Any]] | None:
        assert service.alive(), "pacs-triage serve died:\n" + service.log_text()[-3000:]
        series = _series_by_modality(orthanc, study_id)
        return series if all(m in series for m in RESULT_MODALITIES) else None

    series = wait_until(
        results_back,
        timeout=RESULT_DEADLINE_S,
        what="the SR, SEG, key images and KOS in Orthanc",
        interval=1.0,
    )

    # Same study: Orthanc keys studies by StudyInstanceUID, and it still holds exactly one.
    assert orthanc.get("/studies") == [study_id]
    sources = headers(files)
    (sr_id,) = series[SR_MODALITY]["Instances"]
    (seg_id,) = series[SEG_MODALITY]["Instances"]
    tags = orthanc.get(f"/instances/{sr_id}/tags?simplify")
    assert tags["StudyInstanceUID"] == truth.study_instance_uid
    assert tags["PatientID"] == sources[0].PatientID
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert orthanc.get(f"/instances/{seg_id}/tags?simplify")["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.66.4"

    seg = orthanc.file(seg_id)
    check_seg(seg, sources)
    report = check_sr(orthanc.file(sr_id), sources, demo_bundles, seg=seg)

    true_ml = sum(lesion.volume_ml for lesion in truth.lesions)
    found_ml = report.total_volume_ml()
    assert abs(found_ml - true_ml) <= TOLERANCE * true_ml, (
        f"lesion volume in the SR {found_ml:.2f} mL, ground truth {true_ml:.2f} mL "
        f"(bundles in {demo_bundles.directory})"
    )
    assert report.priority is not None and report.priority >= Priority.URGENT, report.summary
    assert report.evidence >= {str(s.SOPInstanceUID) for s in sources}

    # One key image per reported lesion, and a KOS that points at exactly them and the SR.
    key_images = [orthanc.file(i) for i in series[KEY_IMAGE_MODALITY]["Instances"]]
    (kos_id,) = series[KOS_MODALITY]["Instances"]
    kos = orthanc.file(kos_id)
    assert len(key_images) == len(report.findings) >= LESIONS
    for image in key_images:
        assert image.StudyInstanceUID == kos.StudyInstanceUID == truth.study_instance_uid
        assert image.BurnedInAnnotation == "YES"
        assert_dciodvfy_clean(image, "key image from Orthanc")
    referenced = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in key_images} | {tags["SOPInstanceUID"]}
    assert_dciodvfy_clean(kos, "KOS from Orthanc")
