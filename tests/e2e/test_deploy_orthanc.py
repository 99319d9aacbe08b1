"""deploy/orthanc.json and its Lua auto-routing, run by a real Orthanc: a study stored in Orthanc
reaches pacs-triage on its own once stable, the report comes back into the same study, and the
report does not send the study round again.

The configuration is the deployed one with only what a test must change: loopback ports,
temporary storage, no HTTP authentication, pacs-triage's address, a 1 s StableAge. pacs-triage
runs the ``echo`` stand-in here (the Orthanc routing is under test, not the model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.demo.phantom import write_phantom_series
from tests.support.e2e import RESULT_DEADLINE_S, Orthanc
from tests.support.peers import free_port
from tests.support.process import REPO, wait_until
from tests.support.service import ServiceFactory

pytestmark = [pytest.mark.peer]

DEPLOY = REPO / "deploy"
TRIAGE_MODALITY = "pacs-triage"  # as in deploy/orthanc.json and deploy/orthanc-autoroute.lua


def _deployed_orthanc(workdir: Path, our_port: int) -> Orthanc:
    base: dict[str, Any] = json.loads((DEPLOY / "orthanc.json").read_text(encoding="utf-8"))
    assert base["DicomModalities"][TRIAGE_MODALITY][0] == "PACS_TRIAGE"
    assert base["LuaScripts"] == ["/etc/orthanc/autoroute.lua"]  # where compose.yaml mounts it
    base["LuaScripts"] = [str(DEPLOY / "orthanc-autoroute.lua")]
    base["StableAge"] = 1
    base["AuthenticationEnabled"] = False
    modalities = {TRIAGE_MODALITY: ["PACS_TRIAGE", "127.0.0.1", our_port]}
    return Orthanc(workdir, modalities=modalities, aet=base["DicomAet"], base=base)


def test_the_deployed_orthanc_forwards_new_studies_once_and_files_the_report_in_the_study(
    tmp_path: Path, orthanc_factory: list[Orthanc], services: ServiceFactory
) -> None:
    our_port = free_port()
    orthanc = _deployed_orthanc(tmp_path / "orthanc", our_port)
    orthanc_factory.append(orthanc)
    orthanc.start()
    service = services(
        port=our_port,
        env={
            "PACS_TRIAGE_DESTINATION": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            "PACS_TRIAGE_WORKERS__COUNT": "1",
            "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "1",
            "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.5",
            "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.5",
            "PACS_TRIAGE_DISPATCH__POLL_SECONDS": "0.5",
        },
        name="e2e-deploy-orthanc",
    )
    truth = write_phantom_series(tmp_path / "phantom", seed=3, lesions=0, slices=16)
    files = sorted((tmp_path / "phantom").glob("*.dcm"))
    (study_id,) = {orthanc.upload(path)["ParentStudy"] for path in files}  # nothing pushes by hand

    def report_in_orthanc() -> list[dict[str, Any]] | None:
        assert service.alive(), "pacs-triage serve died:\n" + service.log_text()[-3000:]
        series = orthanc.get(f"/studies/{study_id}/series")
        reports = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
        return reports or None

    (report,) = wait_until(
        report_in_orthanc, timeout=RESULT_DEADLINE_S, what="the SR in Orthanc", interval=0.5
    )
    assert orthanc.get("/studies") == [study_id]
    (sr_id,) = report["Instances"]
    assert orthanc.get(f"/instances/{sr_id}/metadata/RemoteAET") == b"PACS_TRIAGE"
    assert orthanc.get(f"/instances/{sr_id}/tags?simplify")["StudyInstanceUID"] == truth.study_instance_uid

    # The report made the study change: once Orthanc found it stable again, the Lua callback ran
    # a second time and forwarded nothing; pacs-triage holds the images once and ran one job.
    log = tmp_path / "orthanc" / "orthanc.log"
    forwarded = wait_until(
        lambda: _forward_counts(log.read_text(errors="replace"), study_id)[1:],
        timeout=60,
        what="Orthanc's auto-routing to run again after the report arrived",
        interval=0.5,
    )
    assert _forward_counts(log.read_text(errors="replace"), study_id)[0] == len(files)
    assert forwarded == [0], forwarded
    status = json.loads(service.cli("status", "--json").stdout)
    assert status["instances"] == len(files), status
    jobs = json.loads(service.cli("jobs", "list", "--json").stdout)
    assert [j["state"] for j in jobs] == ["succeeded"], jobs
    assert "ForwardedToTriage" not in orthanc.get(f"/instances/{sr_id}/metadata?expand")
    marked = [
        orthanc.get(f"/instances/{i['ID']}/metadata?expand")
        for i in orthanc.get(f"/studies/{study_id}/instances")
    ]
    assert sum("ForwardedToTriage" in m for m in marked) == len(files), marked


def _forward_counts(log: str, study_id: str) -> list[int]:
    """How many instances each run of the auto-routing callback forwarded for the study."""
    marker = f"pacs-triage: study {study_id} stable, forwarding "
    return [int(line.split(marker, 1)[1].split()[0]) for line in log.splitlines() if marker in line]
