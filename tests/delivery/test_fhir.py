"""FHIR R4 destinations (issue 13 items 12, 13): a transaction Bundle per result, validated by a test
server with fhir.resources; 4xx dead (but 408/429), 5xx retried, down and back delivered once.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pydicom
import pytest

from daemon.config import DestinationConfig
from daemon.delivery import registry
from daemon.delivery.base import Outgoing, Permanent, Transient
from daemon.delivery.fhir_bundle import _patient, transaction
from daemon.delivery.hl7_messages import Header, oru_r01
from daemon.delivery.report import load_report
from storage.models import DeliveryState
from tests.support.delivery import make_multi_node
from tests.support.fhir_peer import TOKEN, FhirPeer, problems_of
from tests.support.hl7_peer import MllpPeer, validate_v25
from tests.support.queue_db import Db
from tests.support.result_sr import LESIONS, write_result_sr


def fhir_destination(peer: FhirPeer, token: str = TOKEN) -> DestinationConfig:
    return DestinationConfig.model_validate(
        {"name": "fhir", "kind": "fhir", "url": peer.url, "token": token, "timeout_seconds": 5}
    )


def test_the_bundle_is_valid_r4_and_says_what_the_sr_says(tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    source = write_result_sr(path)
    peer = FhirPeer()
    fhir = registry.build(fhir_destination(peer), calling_ae="PACS_TRIAGE")
    item = Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="fhir")
    with peer.running():
        fhir.check()
        assert fhir.send(item).status == 200
        assert fhir.send(item).status == 200  # a re-send updates, adds nothing
    assert peer.problems == [] and len(peer.posts) == 2 and peer.posts[0] == peer.posts[1]
    (report,) = peer.resources("DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    assert report["imagingStudy"] == [
        {
            "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"},
            "type": "ImagingStudy",
        }
    ]
    assert report["subject"]["identifier"]["value"] == str(source.PatientID)
    assert "lesion 1 24.3 mL" in report["conclusion"] and "NOT FOR DIAGNOSTIC USE" in report["conclusion"]
    observations = peer.resources("Observation")
    assert len(observations) == 2 * len(LESIONS) + 1 == len(report["result"])
    volumes = [o["valueQuantity"] for o in observations if o["code"]["coding"][0]["code"] == "118565006"]
    assert volumes[0] == {"value": 24.3, "unit": "mL", "system": "http://unitsofmeasure.org", "code": "mL"}
    (task,) = peer.resources("Task")
    assert task["priority"] == "urgent" and task["intent"] == "order"
    assert {e["fullUrl"] for e in peer.posts[0]["entry"]} >= {r["reference"] for r in report["result"]}


def test_the_test_server_catches_an_invalid_resource(tmp_path: Path) -> None:
    """The validating peer is not a rubber stamp: a wrong status or a missing code is found."""
    path = tmp_path / "sr.dcm"
    write_result_sr(path)
    bundle = transaction(load_report(path))
    assert problems_of(bundle) == []
    bundle["entry"][0]["resource"]["status"] = "done"
    del bundle["entry"][1]["resource"]["code"]
    found = problems_of(bundle)
    assert any("DiagnosticReport.status 'done'" in p for p in found)
    assert any("entry 1 (Observation)" in p for p in found)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, Permanent),
        (404, Permanent),
        (422, Permanent),
        (408, Transient),
        (429, Transient),
        (500, Transient),
        (503, Transient),
    ],
)
def test_http_answers_map_to_dead_or_retry(tmp_path: Path, status: int, error: type[Exception]) -> None:
    path = tmp_path / "sr.dcm"
    write_result_sr(path)
    peer = FhirPeer(refuse=status)
    fhir = registry.build(fhir_destination(peer), calling_ae="PACS_TRIAGE")
    with peer.running(), pytest.raises(error, match=f"HTTP {status}: refused by the test"):
        fhir.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="fhir"))


def test_a_wrong_token_is_dead_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    write_result_sr(path)
    peer = FhirPeer()
    fhir = registry.build(fhir_destination(peer, token="not-the-token"), calling_ae="PACS_TRIAGE")
    with peer.running(), pytest.raises(Permanent, match="HTTP 401.*refuses our token"):
        fhir.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="fhir"))
    assert peer.posts == []


def test_through_the_outbox_refused_then_down_and_back(tmp_path: Path, db: Db) -> None:
    peer = FhirPeer()
    toml = (
        f'[[destinations]]\nname = "fhir"\nkind = "fhir"\nurl = "{peer.url}"\ntoken = "{TOKEN}"\n'
        "timeout_seconds = 5\n"
    )
    node = make_multi_node(db, tmp_path, [toml], attempts=3)
    with peer.running():
        node.produce_result()
        (first,) = node.deliveries()
        assert first.content == "fhir" and first.peer == peer.url
        assert node.dispatcher.send_one()
        assert node.deliveries()[0].state == DeliveryState.DELIVERED
        assert peer.problems == [] and len(peer.resources("DiagnosticReport")) == 1

        peer.refuse = 400
        node.produce_result()
        assert node.dispatcher.send_one()
        dead = node.deliveries()[1]
        assert dead.state == DeliveryState.DEAD and dead.last_status == 400

        peer.refuse = 503
        node.produce_result()
        assert node.dispatcher.send_one()
        retried = node.deliveries()[2]
        assert retried.state == DeliveryState.PENDING and retried.last_status == 503
        peer.refuse = None
    assert node.dispatcher.send_one()  # down
    assert node.deliveries()[2].state == DeliveryState.PENDING and node.deliveries()[2].attempts == 2
    with peer.running():
        assert node.dispatcher.send_one()
        node.outbox.retry(dead.id)
        assert node.dispatcher.send_one()
    assert not node.dispatcher.send_one()
    assert {d.state for d in node.deliveries()} == {DeliveryState.DELIVERED}
    assert peer.problems == [] and len(peer.resources("DiagnosticReport")) == 3
    assert len(peer.resources("Task")) == 3


@pytest.mark.parametrize("missing", ["httpx", "fhir.resources"])
def test_without_the_fhir_extra_the_delivery_is_dead_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    path = tmp_path / "sr.dcm"
    write_result_sr(path)
    fhir = registry.build(fhir_destination(FhirPeer()), calling_ae="PACS_TRIAGE")
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(Permanent, match=rf"{missing} is missing\): install the 'fhir' extra"):
        fhir.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="fhir"))


def test_a_study_without_patient_id_or_accession_gives_valid_messages(tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    write_result_sr(path)
    ds = pydicom.dcmread(path)
    del ds.PatientID
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.AccessionNumber = ""
    ds.save_as(path)
    report = load_report(path)
    bundle = transaction(report)
    assert problems_of(bundle) == []
    assert all("subject" not in e["resource"] and "for" not in e["resource"] for e in bundle["entry"])
    peer = MllpPeer()
    ris = registry.build(
        DestinationConfig.model_validate(
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": peer.port}
        ),
        calling_ae="X",
    )
    with peer.running():
        for content in ("hl7_oru", "hl7_priority"):
            ris.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content=content))
    assert [m.problems for m in peer.messages()] == ["", ""]
    assert peer.messages()[0].segments("PID") == []  # PID-3 is required: no patient group at all
    (obr,) = peer.messages()[0].segments("OBR")
    assert obr[3].split("^")[0] == report.study_instance_uid  # no accession: the study is the order
    # the alphabetic group of a multi-group name, in both messages
    named = dataclasses.replace(report, patient_id="P1")
    oru = oru_r01(named, Header(), "CTRL")
    issuer = report.issuer_of_patient_id  # an OID in the test CT: HD universal ID of type ISO
    assert validate_v25(oru) == "" and f"\rPID|1||P1^^^&{issuer}&ISO||Yamada^Tarou\r" in oru
    assert _patient(named) == {
        "identifier": {"value": "P1", "system": f"urn:oid:{issuer}"},
        "display": "Tarou Yamada",
    }
