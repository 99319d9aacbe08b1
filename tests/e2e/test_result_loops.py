"""Results must not loop (issue 11, item 10): a PACS that sends every stored instance back to
pacs-triage, our SR included, and a user who sends the whole study again, get no second job and
no second report.

Orthanc runs a Lua ``OnStoredInstance`` that routes every instance it receives over DICOM back to
pacs-triage (the worst auto-route a site can configure). pacs-triage runs the ``echo`` stand-in
here; ``test_demo_report_does_not_loop`` runs the real demo MONAI pipeline (SR, SEG, a key image
per lesion and their KOS).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.demo.phantom import write_phantom_series
from storage.db import make_engine
from storage.models import Instance, Job, Study
from tests.support.e2e import RESULT_DEADLINE_S, DemoBundles, Orthanc, service_config
from tests.support.peers import free_port
from tests.support.process import wait_until
from tests.support.service import Service, ServiceFactory

pytestmark = [pytest.mark.peer]

TRIAGE = "pacs-triage"  # Orthanc's DicomModalities key for us
ROUTE_EVERYTHING_BACK = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] == 'DicomProtocol' then
    print('loop: routing ' .. instanceId .. ' back to pacs-triage')
    SendToModality(instanceId, 'pacs-triage')
  end
end
"""
QUIET_SECONDS = 1.0


def _orthanc(workdir: Path, our_port: int) -> Orthanc:
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "route-everything-back.lua"
    lua.write_text(ROUTE_EVERYTHING_BACK, encoding="utf-8")
    return Orthanc(
        workdir,
        modalities={TRIAGE: ["PACS_TRIAGE", "127.0.0.1", our_port]},
        base={"LuaScripts": [str(lua)]},
    )


def _by_modality(orthanc: Orthanc, study_id: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        found.setdefault(series["MainDicomTags"].get("Modality", ""), []).extend(series["Instances"])
    return found


class Triage:
    """What pacs-triage holds, read from its database."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.engine = make_engine(service.database_url, pool_size=1)

    def jobs(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Job)) or 0)

    def instances(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Instance)) or 0)

    def settled_after(self, since: dt.datetime) -> bool:
        """Every study complete again, by a sweep after ``since`` (so our copies were judged)."""
        assert self.service.alive(), "pacs-triage serve died:\n" + self.service.log_text()[-3000:]
        with self.engine.connect() as conn:
            rows = conn.execute(select(Study.state, Study.completed_at)).all()
        return bool(rows) and all(s == "complete" and c is not None and c >= since for s, c in rows)


def _run_loop(
    tmp_path: Path,
    services: ServiceFactory,
    *,
    slices: int,
    expected: set[str],
    config: Path | None = None,
    deadline: float = RESULT_DEADLINE_S,
) -> None:
    our_port = free_port()
    orthanc = _orthanc(tmp_path / "orthanc", our_port)
    orthanc.start()
    try:
        service = services(
            port=our_port,
            config=config,
            env={
                "PACS_TRIAGE_DESTINATION": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                "PACS_TRIAGE_WORKERS__COUNT": "1",
                "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": str(QUIET_SECONDS),
                "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.25",
                "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.25",
                "PACS_TRIAGE_DISPATCH__POLL_SECONDS": "0.25",
            },
            name="e2e-loop",
        )
        triage = Triage(service)
        write_phantom_series(tmp_path / "phantom", seed=11, lesions=1, slices=slices)
        files = sorted((tmp_path / "phantom").glob("*.dcm"))
        (study_id,) = {orthanc.upload(path)["ParentStudy"] for path in files}
        answer = orthanc.post_json(
            f"/modalities/{TRIAGE}/store", {"Resources": [study_id], "Synchronous": True}
        )
        assert answer.get("FailedInstancesCount", 0) == 0, answer

        def results_in_orthanc() -> dict[str, list[str]] | None:
            assert service.alive(), "pacs-triage serve died:\n" + service.log_text()[-3000:]
            found = _by_modality(orthanc, study_id)
            return found if expected <= set(found) else None

        wait_until(results_in_orthanc, timeout=deadline, what=f"{expected} in Orthanc", interval=0.5)
        # Orthanc routes our results back to us (OnStoredInstance); wait until pacs-triage has them.
        ours = len(files) + sum(len(_by_modality(orthanc, study_id)[m]) for m in expected)
        wait_until(lambda: triage.instances() == ours, timeout=120, what="our results back in pacs-triage")
        # A user sends the whole study again, our objects included: identical copies.
        again = orthanc.post_json(
            f"/modalities/{TRIAGE}/store", {"Resources": [study_id], "Synchronous": True}
        )
        assert again.get("FailedInstancesCount", 0) == 0, again
        since = dt.datetime.now(dt.UTC)
        wait_until(
            lambda: triage.settled_after(since), timeout=120, what="the study judged again", interval=0.25
        )
        # Twice the quiet period later: one job, one object of each kind in the PACS.
        wait_until(lambda: _later(since, 2 * QUIET_SECONDS), timeout=60, what="twice the quiet period")
        assert triage.jobs() == 1, f"{triage.jobs()} jobs: our own objects started new analyses"
        assert triage.settled_after(since)
        found = _by_modality(orthanc, study_id)
        for modality in expected:
            assert len(found[modality]) == 1, (modality, found)
        assert triage.instances() == ours
        assert orthanc.get("/studies") == [study_id]
    finally:
        orthanc.stop()


def _later(since: dt.datetime, seconds: float) -> bool:
    return dt.datetime.now(dt.UTC) >= since + dt.timedelta(seconds=seconds)


def test_our_report_routed_back_and_a_whole_study_resend_make_no_second_report(
    tmp_path: Path, services: ServiceFactory
) -> None:
    # The echo stand-in reads no pixels: 16 slices loop as 40 would, with fewer transfers each way.
    _run_loop(tmp_path, services, slices=16, expected={"SR"}, deadline=180)


@pytest.mark.slow
def test_demo_report_does_not_loop(
    tmp_path: Path, services: ServiceFactory, demo_bundles: DemoBundles
) -> None:
    """The same with the real demo MONAI pipeline: one SR, SEG, key image (one lesion) and KOS stay in Orthanc."""
    config = service_config(tmp_path / "pacs-triage.toml", demo_bundles, [("ct-demo", "CT")])
    _run_loop(tmp_path, services, slices=40, expected={"SR", "SEG", "OT", "KO"}, config=config)
