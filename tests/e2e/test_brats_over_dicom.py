"""brats over DICOM: four MR series of one study arrive from dcmtk ``storescu`` at ``pacs-triage serve``.

The service runs the real brats_mri_segmentation config, unchanged (random weights), as a
``[[pipelines.monai]]`` entry with four ``[[pipelines.monai.channels]]`` (T1c, T1, T2, FLAIR, picked
by Series Description and contrast agent); results go to a dcmtk ``storescp``. The series are derived
at test time from the real MR (``tests/pipeline/brats_study.py``) and sent in reverse channel order.

* the complete study: the job succeeds, its recorded selection names the four series in the
  declared channel order, and a dciodvfy-clean SR and a SEG about the T1c series arrive;
* the same study without FLAIR: the job fails permanently with a reason naming FLAIR, nothing is sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.brats_study import CHANNELS, RULES, write_brats_study
from tests.pipeline.test_multiseries import brats_bundle
from tests.support.dicom_validators import assert_dciodvfy_clean
from tests.support.e2e import RESULT_DEADLINE_S, SEG_MODALITY, SR_MODALITY, headers, received
from tests.support.peers import free_port, storescu
from tests.support.process import wait_until
from tests.support.service import Service, ServiceFactory
from tests.support.storescp import Storescp

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

FINAL_JOB_STATES = ("succeeded", "failed", "dead", "cancelled")


def _config(path: Path, bundle: Path) -> Path:
    from pipeline.bundle_runtime import bundle_sha256

    channels = "".join(
        f"[[pipelines.monai.channels]]\nname = {json.dumps(n)}\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in RULES[n].items())
        for n in CHANNELS
    )
    path.write_text(
        f"""
[completion]
quiet_seconds = 1
sweep_interval_seconds = 0.5
[workers]
count = 1
poll_seconds = 0.5
lease_seconds = 300
[dispatch]
poll_seconds = 0.5
[[pipelines.monai]]
name = "mr-brats"
modalities = ["MR"]
orientations = ["sagittal"]
allowed_dirs = [{json.dumps(str(bundle.parent))}]
segmentation = {{ path = {json.dumps(str(bundle))}, sha256 = "{bundle_sha256(bundle)}" }}
thresholds = {{ urgent_volume_ml = 1.0 }}
device = "cpu"
{channels}
[[routing.rules]]
name = "brain-mr"
pipeline = "mr-brats"
modality = ["MR"]
""",
        encoding="utf-8",
    )
    return path


def _cli_json(service: Service, *args: str) -> Any:
    out = service.cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _finished_job(service: Service, study_uid: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        assert service.alive(), "pacs-triage serve died:\n" + service.log_text()[-3000:]
        jobs = [j for j in _cli_json(service, "jobs", "list") if j["study_instance_uid"] == study_uid]
        return next((j for j in jobs if j["state"] in FINAL_JOB_STATES), None)

    job: dict[str, Any] = wait_until(
        final, timeout=RESULT_DEADLINE_S, what=f"the job of study {study_uid}", interval=1.0
    )
    return job


def _send(service: Service, files: list[Path]) -> None:
    done = storescu(service.port, files)
    assert done.returncode == 0, done.stdout + done.stderr


def test_four_series_over_dicom_are_stacked_in_order_and_a_missing_flair_is_refused(
    tmp_path: Path,
) -> None:
    bundle = brats_bundle(tmp_path / "bundles")
    complete = write_brats_study(tmp_path / "complete")
    no_flair = write_brats_study(tmp_path / "no-flair", channels=("T1c", "T1", "T2"))
    storescp = Storescp(free_port(), tmp_path / "received").start()
    factory = ServiceFactory(tmp_path)
    try:
        service = factory(
            config=_config(tmp_path / "pacs-triage.toml", bundle),
            env={"PACS_TRIAGE_DESTINATION": storescp.destination, "PACS_TRIAGE_WORKERS__COUNT": "1"},
            name="e2e-brats",
        )
        _send(service, [p for n in reversed(CHANNELS) for p in complete[n]])
        _send(service, [p for n in ("T2", "T1", "T1c") for p in no_flair[n]])
        study = {n: headers(complete[n][:1])[0] for n in CHANNELS}
        study_uid = str(study["T1c"].StudyInstanceUID)

        job = _finished_job(service, study_uid)
        assert job["state"] == "succeeded", f"job {job['id']} {job['state']}: {job['last_error']}"
        shown = _cli_json(service, "jobs", "show", str(job["id"]))
        summary = shown["results"][0]["summary"]
        at = [
            summary.index(f"channel {i} {n!r}: series {study[n].SeriesInstanceUID}")
            for i, n in enumerate(CHANNELS)
        ]
        assert at == sorted(at), summary  # recorded in the declared channel order, each its own series
        assert "channel 'T2'" in summary and "resampled" in summary, summary

        def arrived() -> list[Any] | None:
            mine = [ds for ds in received(storescp) if ds.StudyInstanceUID == study_uid]
            kinds = [ds.Modality for ds in mine]
            return mine if SR_MODALITY in kinds and SEG_MODALITY in kinds else None

        mine = wait_until(arrived, timeout=120, what="the SR and SEG at the storescp", interval=0.5)
        sr = next(ds for ds in mine if ds.Modality == SR_MODALITY)
        seg = next(ds for ds in mine if ds.Modality == SEG_MODALITY)
        assert_dciodvfy_clean(sr, "brats SR over DICOM")
        assert_dciodvfy_clean(seg, "brats SEG over DICOM")
        assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {
            str(study["T1c"].SeriesInstanceUID)
        }

        refused_uid = str(headers(no_flair["T1c"][:1])[0].StudyInstanceUID)
        refused = _finished_job(service, refused_uid)
        assert (refused["state"], refused["attempts"]) == ("failed", 1), refused  # permanent: no retry
        reason = refused["last_error"]
        assert "NoUsableSeries" in reason and "missing input series FLAIR" in reason, reason
        assert "channel 3 'FLAIR' is missing" in reason, reason
        assert not [ds for ds in received(storescp) if ds.StudyInstanceUID == refused_uid]
    finally:
        factory.cleanup()
        storescp.stop()
