"""The messages say what the pipeline's own SR writer wrote: a TID 1500 SR from ``write_sr`` (two
labels and a classification) gives a v2.5-valid ORU^R01 and a valid FHIR Bundle whose lesions,
volumes, probabilities and priority are those ``read_sr`` reads back."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from daemon.delivery.fhir_bundle import FHIR_PRIORITY, transaction
from daemon.delivery.hl7_messages import PRIORITY_CODES, Header, oru_r01
from daemon.delivery.report import load_report
from pipeline.writers.sr import write_sr
from pipeline.writers.sr_reader import read_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import (
    encode,
    read_headers,
    roundtrip,
    synthetic_case,
    volume_from_headers,
)
from tests.support.fhir_peer import problems_of
from tests.support.hl7_peer import Received, validate_v25

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))


def test_messages_carry_what_the_writer_wrote(tmp_path: Path) -> None:
    headers = read_headers(ABDOMEN)
    volume = volume_from_headers(headers)
    _labels, findings = synthetic_case(volume)
    sr = write_sr(
        findings,
        headers,
        volume,
        input_fingerprint="messages",
        content_datetime=datetime.datetime(2026, 12, 3, 9),
    )
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(sr))
    written = read_sr(roundtrip(sr))
    report = load_report(path)
    assert written.priority is not None and report.priority == written.priority
    assert report.analysed_at == datetime.datetime(2026, 12, 3, 9, tzinfo=datetime.UTC)

    oru = Received("ORU^R01^ORU_R01", "C1", oru_r01(report, Header(), "C1"), "")
    assert validate_v25(oru.text) == ""
    obx = oru.segments("OBX")
    names = [o[5] for o in obx if o[3].startswith("112039^")]
    assert len(names) == len(written.findings) + len(written.classifications)
    volumes = [float(o[5]) for o in obx if o[3].startswith("118565006^")]
    assert volumes == [pytest.approx(f.volume_ml, abs=5e-4) for f in written.findings]
    probabilities = [float(o[5]) for o in obx if o[3].startswith("122157^")]
    assert probabilities == [pytest.approx(c.probability, abs=5e-4) for c in written.classifications]
    (tq1,) = oru.segments("TQ1")
    assert tq1[9] == PRIORITY_CODES[written.priority]

    bundle = transaction(report)
    assert problems_of(bundle) == []
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("DiagnosticReport") == 1 and kinds.count("Task") == 1
    task = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Task")
    assert task["priority"] == FHIR_PRIORITY[written.priority]
    quantities = [
        e["resource"]["valueQuantity"]["value"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "118565006"
    ]
    assert quantities == [pytest.approx(f.volume_ml, abs=5e-4) for f in written.findings]
