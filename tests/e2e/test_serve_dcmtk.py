"""dcmtk in, dcmtk out: ``storescu`` -> ``pacs-triage serve`` (SQLite, the default) -> ``storescp``.

One service for the module, as a site would run it: embedded defaults plus a routing file (CT and
MR to the ``demo`` pipeline, quiet period 1 s) and ``PACS_TRIAGE_DESTINATION`` naming a dcmtk
storescp. Each test sends its own study and judges only that study's results:

* phantoms with known lesions: one SR each, total lesion volume within 15 % of the truth, a
  lesion-free phantom ROUTINE and a lesion-bearing one higher;
* the real abdominal CT (JPEG 2000, ``storescu -xv``): an SR that references all 20 instances;
* a study with no usable series (a sagittal MR only): a failed job, the reason in ``status`` and
  ``jobs show``, and no SR.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from daemon.demo.run import judge
from pipeline.demo.phantom import write_phantom_series
from tests.paths import TESTDATA
from tests.support.e2e import (
    RESULT_DEADLINE_S,
    SEG_MODALITY,
    SR_MODALITY,
    DemoBundles,
    check_seg,
    check_sr,
    headers,
    received,
    service_config,
)
from tests.support.peers import free_port, storescu
from tests.support.process import wait_until
from tests.support.service import Service, ServiceFactory
from tests.support.storescp import Storescp
from vocabulary import Priority

pytestmark = [pytest.mark.peer, pytest.mark.slow]

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
SAGITTAL_MR = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))
SLICES = 48
LESION_SEED, LESIONS = 19, 2  # 13.4 + 7.5 mL, in the default lesion range (2-30 mL)
LESION_FREE_SEED = 20
TOLERANCE = 0.15
FINAL_JOB_STATES = ("succeeded", "failed", "dead", "cancelled")


@dataclass
class Node:
    service: Service
    storescp: Storescp

    def cli_json(self, *args: str) -> Any:
        out = self.service.cli(*args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def job_for(self, study_uid: str) -> dict[str, Any] | None:
        """The study's job once it reached a final state (None before)."""
        assert self.service.alive(), "pacs-triage serve died:\n" + self.service.log_text()[-3000:]
        jobs = [j for j in self.cli_json("jobs", "list") if j["study_instance_uid"] == study_uid]
        return next((j for j in jobs if j["state"] in FINAL_JOB_STATES), None)

    def finished_job(self, study_uid: str) -> dict[str, Any]:
        job: dict[str, Any] = wait_until(
            lambda: self.job_for(study_uid),
            timeout=RESULT_DEADLINE_S,
            what=f"the job of study {study_uid} to finish",
            interval=1.0,
        )
        return job

    def results(self, study_uid: str) -> tuple[Dataset, Dataset | None]:
        """The study's SR (exactly one) and SEG (at most one), once every delivery was delivered."""
        job = self.finished_job(study_uid)
        assert job["state"] == "succeeded", f"job {job['id']} {job['state']}: {job['last_error']}"

        def delivered() -> bool:
            rows = [d for d in self.cli_json("deliveries", "list") if d["job_id"] == job["id"]]
            assert not [d for d in rows if d["state"] == "dead"], rows
            return bool(rows) and all(d["state"] == "delivered" for d in rows)

        wait_until(
            delivered, timeout=120, what=f"the results of job {job['id']} to be delivered", interval=0.5
        )
        mine = [ds for ds in received(self.storescp) if ds.StudyInstanceUID == study_uid]
        srs = [ds for ds in mine if ds.Modality == SR_MODALITY]
        segs = [ds for ds in mine if ds.Modality == SEG_MODALITY]
        assert len(srs) == 1, f"expected one SR for study {study_uid}, got {len(srs)}"
        assert len(segs) <= 1, f"expected at most one SEG for study {study_uid}, got {len(segs)}"
        return srs[0], (segs[0] if segs else None)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, demo_bundles: DemoBundles) -> Iterator[Node]:
    workdir = tmp_path_factory.mktemp("serve-dcmtk")
    storescp = Storescp(free_port(), workdir / "received").start()
    factory = ServiceFactory(workdir)
    try:
        config = service_config(
            workdir / "pacs-triage.toml", demo_bundles, [("ct-demo", "CT"), ("mr-demo", "MR")]
        )
        service = factory(
            config=config,
            env={"PACS_TRIAGE_DESTINATION": storescp.destination, "PACS_TRIAGE_WORKERS__COUNT": "1"},
            name="e2e-dcmtk",
        )
        yield Node(service, storescp)
    finally:
        factory.cleanup()
        storescp.stop()


def _send(node: Node, files: list[Path]) -> None:
    done = storescu(node.service.port, files)
    assert done.returncode == 0, done.stdout + done.stderr


def test_phantoms_get_one_sr_each_with_the_lesion_volume_and_priority_of_the_truth(
    node: Node, demo_bundles: DemoBundles, tmp_path: Path
) -> None:
    lesion_dir, clean_dir = tmp_path / "lesions", tmp_path / "lesion-free"
    truth = write_phantom_series(lesion_dir, seed=LESION_SEED, lesions=LESIONS, slices=SLICES)
    clean_truth = write_phantom_series(clean_dir, seed=LESION_FREE_SEED, lesions=0, slices=SLICES)
    lesion_files, clean_files = sorted(lesion_dir.glob("*.dcm")), sorted(clean_dir.glob("*.dcm"))
    _send(node, lesion_files)
    _send(node, clean_files)

    sr, seg = node.results(truth.study_instance_uid)
    sources = headers(lesion_files)
    assert seg is not None, "the lesions were segmented, so a SEG must come with the SR"
    check_seg(seg, sources)
    report = check_sr(sr, sources, demo_bundles, seg=seg)

    clean_sr, clean_seg = node.results(clean_truth.study_instance_uid)
    clean_sources = headers(clean_files)
    if clean_seg is not None:
        check_seg(clean_seg, clean_sources)
    clean_report = check_sr(clean_sr, clean_sources, demo_bundles, seg=clean_seg)

    assert clean_report.priority == Priority.ROUTINE, clean_report.summary
    assert report.priority is not None and clean_report.priority is not None
    assert report.priority > clean_report.priority, (report.summary, clean_report.summary)

    # Accuracy of the demo pipeline (demo_spec(): the trained, pinned bundles), judged end to end as
    # the demo judges it: one group per lesion, each within 15 % of its own truth (issue 13 item 3).
    assert len(report.findings) == len(truth.lesions), report.summary
    verdict = judge(report, truth, frozenset(str(s.SOPInstanceUID) for s in sources), TOLERANCE)
    assert verdict.ok, "\n".join([*verdict.lines, f"bundles in {demo_bundles.directory}"])


def test_the_real_abdominal_ct_in_jpeg_2000_gets_an_sr_referencing_all_20_instances(
    node: Node, demo_bundles: DemoBundles
) -> None:
    assert len(ABDOMEN) == 20
    _send(node, ABDOMEN)  # storescu -xv: proposes JPEG 2000 lossless, the files' own syntax
    sources = headers(ABDOMEN)
    sr, seg = node.results(str(sources[0].StudyInstanceUID))
    if seg is not None:
        check_seg(seg, sources)
    report = check_sr(sr, sources, demo_bundles, seg=seg)  # references exactly these images (+ SEG)
    assert report.evidence >= {str(s.SOPInstanceUID) for s in sources}
    assert len({str(s.SOPInstanceUID) for s in sources}) == 20


def test_a_study_with_no_usable_series_fails_its_job_visibly_and_sends_nothing(node: Node) -> None:
    _send(node, SAGITTAL_MR)
    study_uid = str(headers(SAGITTAL_MR[:1])[0].StudyInstanceUID)
    job = node.finished_job(study_uid)

    assert job["state"] == "failed", job  # permanent: not retried, not dead
    assert job["attempts"] == 1, job
    reason = job["last_error"]
    assert "NoUsableSeries" in reason and "Modality MR not in ['CT']" in reason, reason
    series_uid = str(headers(SAGITTAL_MR[:1])[0].SeriesInstanceUID)
    assert series_uid in reason, reason  # the message names the series and the rule

    status = node.service.cli("status")
    assert status.returncode == 0, status.stderr
    assert "failed jobs" in status.stdout and study_uid in status.stdout, status.stdout
    assert "no series qualifies" in status.stdout and "Modality MR not in ['CT']" in status.stdout, (
        status.stdout
    )
    failed = node.cli_json("status")["queue"]["failed_jobs"]
    assert [p["study_instance_uid"] for p in failed].count(study_uid) == 1, failed

    shown = node.service.cli("jobs", "show", str(job["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "NoUsableSeries" in shown.stdout and "deliveries: none" in shown.stdout, shown.stdout

    assert not [ds for ds in received(node.storescp) if ds.StudyInstanceUID == study_uid]
