"""``[logging] format = "json"``: a real ``serve`` receives a study and runs the echo pipeline; every line
of its log (receiver, scheduler, worker process, dispatcher) is one JSON object, with the ids of what it
is about, no Patient ID or Name of the data sent, and no raw UID at INFO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.paths import TESTDATA
from tests.support.peers import storescu
from tests.support.process import wait_until
from tests.support.service import start_service

pytestmark = pytest.mark.peer

HEAD_CT = sorted((TESTDATA / "ct_series" / "gantry_tilt").glob("GE_0[1-3].dcm"))


def test_json_log_lines_parse_and_name_no_patient(tmp_path: Path) -> None:
    service = start_service(
        tmp_path,
        env={
            "PACS_TRIAGE_LOGGING__FORMAT": "json",
            "PACS_TRIAGE_WORKERS__COUNT": "1",
            "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "0.2",
            "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.2",
            "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.2",
        },
    )
    try:
        out = storescu(service.port, HEAD_CT, calling_ae="LOG_SCU")
        assert out.returncode == 0, out.stderr

        def job_done() -> bool:
            jobs = service.status_json()["jobs"]
            return bool(jobs.get("succeeded") or jobs.get("failed") or jobs.get("dead"))

        wait_until(job_done, timeout=120, what="the echo pipeline's job to finish", interval=0.5)
        assert service.status_json()["jobs"]["succeeded"] == 1, service.log_text()[-3000:]
    finally:
        service.stop(timeout=60)

    text = service.log_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) > 5
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"event", "level", "logger", "timestamp"} <= set(r) for r in records)

    headers = [dcmread(p, stop_before_pixels=True) for p in HEAD_CT]
    secrets = {str(h.PatientID) for h in headers} | {str(h.PatientName) for h in headers}
    secrets.discard("")
    for secret in secrets:
        assert secret not in text, f"patient identifier {secret!r} in the log"
    uids = {str(h.StudyInstanceUID) for h in headers} | {str(h.SOPInstanceUID) for h in headers}
    uids |= {str(h.SeriesInstanceUID) for h in headers}
    for record in records:
        if record["level"] == "info":
            assert not any(uid in json.dumps(record) for uid in uids), record

    # The ids of what a line is about: the association on the receiver's, the job on the worker's.
    accepted = [r for r in records if "accepted from" in r["event"]]
    assert accepted and all(r.get("association_id") for r in accepted)
    started = [r for r in records if r["event"].startswith("job ") and r["event"].endswith(" started")]
    assert started and all(r.get("job_id") and r.get("study_id") for r in started), started
    completed = [r for r in records if "complete" in r["event"] and r["logger"] == "daemon.service.routing"]
    assert completed and all(r.get("study_id") for r in completed), completed
    # Third-party INFO chatter is held at WARNING by default.
    assert not [
        r
        for r in records
        if r["level"] == "info"
        and r["logger"].split(".")[0]
        in {"pynetdicom", "highdicom", "monai", "uvicorn", "apscheduler", "alembic"}
    ]
