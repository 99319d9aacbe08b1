"""HL7 v2 destinations (issue 13 items 11, 13): ORU^R01 and the priority order update over MLLP,
validated against v2.5 by hl7apy's MLLP server; acknowledgements mapped to delivered / retry /
dead, through the outbox like the DICOM results.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import hl7
import pydicom
import pytest

from daemon.config import DestinationConfig
from daemon.delivery import registry
from daemon.delivery.base import Outgoing, Permanent, Transient
from daemon.delivery.hl7 import Ack, interpret
from daemon.delivery.report import DISCLAIMER, load_report
from storage.models import DeliveryState
from storage.stats import queue_summary
from tests.support.delivery import make_multi_node
from tests.support.hl7_peer import MllpPeer
from tests.support.queue_db import Db
from tests.support.result_sr import SOURCE, write_result_sr


def tid1500_sr(tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    """A TID 1500 SR with two lesions and a classification, on disk, and the CT header it belongs to."""
    path = tmp_path / "sr.dcm"
    return path, write_result_sr(path)


def hl7_destination(peer: MllpPeer, **extra: object) -> DestinationConfig:
    return DestinationConfig.model_validate(
        {
            "name": "ris",
            "kind": "hl7",
            "host": "127.0.0.1",
            "port": peer.port,
            "receiving_application": "RIS",
            **extra,
        }
    )


def test_oru_and_order_updates_are_valid_v25_and_say_what_the_sr_says(tmp_path: Path) -> None:
    path, source = tid1500_sr(tmp_path)
    peer = MllpPeer()
    with peer.running():
        for order_message in ("OMI^O23", "ORM^O01"):
            ris = registry.build(hl7_destination(peer, order_message=order_message), calling_ae="PACS_TRIAGE")
            for content in ("hl7_oru", "hl7_priority"):
                accepted = ris.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content=content))
                assert accepted.status == 0 and accepted.warning == ""
    oru, omi, oru_again, orm = peer.messages()
    assert [m.message_type for m in (oru, omi, orm)] == [
        "ORU^R01^ORU_R01",
        "OMI^O23^OMI_O23",
        "ORM^O01^ORM_O01",
    ]
    assert [m.problems for m in peer.messages()] == ["", "", "", ""]
    assert oru_again.text == oru.text  # the same message on every attempt: same control ID, same time
    assert len({oru.control_id, omi.control_id, orm.control_id}) == 3

    (pid,) = oru.segments("PID")
    assert pid[3] == f"{source.PatientID}^^^&{source.IssuerOfPatientID}&ISO"  # an OID: HD of type ISO
    assert pid[5] == str(source.PatientName)
    (obr,) = oru.segments("OBR")
    accession = str(source.AccessionNumber) or str(source.StudyInstanceUID)
    assert obr[3].split("^")[0] == accession and obr[4].startswith("18748-4^")
    assert obr[25] == "P"  # preliminary: not the radiologist's report
    (nte,) = oru.segments("NTE")
    assert nte[3] == DISCLAIMER
    (tq1,) = oru.segments("TQ1")
    assert tq1[9] == "A"  # the synthetic case is URGENT
    obx = {(o[3].split("^")[0], o[4]): o for o in oru.segments("OBX")}
    assert obx[("113014", "")][5] == str(source.StudyInstanceUID)
    assert obx[("260870009", "")][5] == "103391001^Urgent^SCT"
    assert obx[("112039", "1")][5] == "lesion 1" and obx[("112039", "2")][5] == "lesion 2"
    volume = obx[("118565006", "1")]
    assert volume[2] == "NM" and volume[6] == "mL^milliliter^UCUM" and volume[5] == "24.3"
    assert obx[("81827009", "2")][6] == "mm^millimeter^UCUM"
    probability = obx[("122157", "3")]
    assert float(probability[5]) == pytest.approx(0.87) and probability[6] == "1^no units^UCUM"
    assert obx[("112039", "3")][5] == "splenic injury"

    (tq1,) = omi.segments("TQ1")
    assert tq1[9] == "A"
    (ipc,) = omi.segments("IPC")
    assert ipc[3] == str(source.StudyInstanceUID)
    (orc,) = orm.segments("ORC")
    assert orc[1] == "XO" and orc[7] == "^^^^^A"


@pytest.mark.parametrize(
    ("code", "errors", "outcome"),
    [
        ("AA", (), "delivered"),
        ("CA", (), "delivered"),
        ("AE", (), "permanent"),
        ("AE", (101,), "permanent"),  # required field missing: our message
        ("AE", (204,), "permanent"),  # unknown key identifier (patient, order)
        ("AE", (207,), "transient"),  # the receiver's internal error
        ("AE", (206,), "transient"),  # record locked
        ("AE", (205,), "delivered"),  # duplicate key: it already has this message (a re-send)
        ("AR", (), "transient"),  # receiver's back end down
        ("AR", (207,), "transient"),
        ("AR", (200,), "permanent"),  # unsupported message type
        ("AR", (203,), "permanent"),  # unsupported version
        ("CR", (202,), "permanent"),
        ("CE", (), "transient"),
        ("XX", (), "transient"),
    ],
)
def test_acknowledgements_map_to_delivered_retry_or_dead(
    code: str, errors: tuple[int, ...], outcome: str
) -> None:
    ack = Ack(code, "CTRL", "text", errors)
    if outcome == "delivered":
        assert interpret(ack, "CTRL", peer="ris").status in (0, 205)
    else:
        with pytest.raises(Permanent if outcome == "permanent" else Transient):
            interpret(ack, "CTRL", peer="ris")


def test_an_ack_of_another_message_is_not_a_delivery() -> None:
    with pytest.raises(Transient, match="not our message"):
        interpret(Ack("AA", "OTHER", "", ()), "CTRL", peer="ris")


def test_a_non_sr_result_or_a_dicom_content_is_refused_for_good(tmp_path: Path) -> None:
    peer = MllpPeer()
    ris = registry.build(hl7_destination(peer), calling_ae="PACS_TRIAGE")
    image = SOURCE
    with pytest.raises(Permanent, match="not a structured report"):
        ris.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=image, content="hl7_oru"))
    path, _ = tid1500_sr(tmp_path)
    with pytest.raises(Permanent, match="cannot send 'sr'"):
        ris.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="sr"))
    with pytest.raises(Transient):  # nobody listens
        ris.check()
    with peer.running():
        ris.check()
    assert peer.messages() == []


def _hl7_toml(peer: MllpPeer, receives: str = '["hl7_oru", "hl7_priority"]') -> str:
    return (
        f'[[destinations]]\nname = "ris"\nkind = "hl7"\nhost = "127.0.0.1"\nport = {peer.port}\n'
        f"receives = {receives}\ntimeout_seconds = 5\n"
    )


def test_through_the_outbox_accepted_refused_down_and_back(tmp_path: Path, db: Db) -> None:
    """AA delivers each message once; AE (content) is dead at once; AR (no reason) is retried;
    down then back: delivered once (the receiver sees one message per control ID)."""
    peer = MllpPeer()
    node = make_multi_node(db, tmp_path, [_hl7_toml(peer)], attempts=3)
    with peer.running():
        node.produce_result()
        assert sorted(d.content for d in node.deliveries()) == ["hl7_oru", "hl7_priority"]
        assert node.dispatcher.send_one() and node.dispatcher.send_one()
        assert {d.state for d in node.deliveries()} == {DeliveryState.DELIVERED}
        assert [m.message_type.split("^")[0] for m in peer.messages()] == ["ORU", "OMI"]
        assert [m.problems for m in peer.messages()] == ["", ""]

        peer.answer = ("AE", 101)
        node.produce_result()
        assert node.dispatcher.send_one()
        dead = node.deliveries()[2]
        assert dead.state == DeliveryState.DEAD and dead.last_status == 101
        assert "answered AE (ERR-3 101)" in (dead.last_error or "")
        (listed,) = queue_summary(db.sessions, dt.datetime.now(dt.UTC)).dead_deliveries  # `status`
        assert listed.id == dead.id and listed.detail.startswith(f"mllp://127.0.0.1:{peer.port} hl7_oru: ")

        peer.answer = ("AR", None)
        assert node.dispatcher.send_one()
        retried = node.deliveries()[3]
        assert retried.state == DeliveryState.PENDING and retried.attempts == 1
        assert "answered AR" in (retried.last_error or "")
        peer.answer = ("AA", None)
    # down: the pending row fails transiently, then the peer is back and it goes through once
    assert node.dispatcher.send_one()
    down = node.deliveries()[3]
    assert down.state == DeliveryState.PENDING and down.attempts == 2
    assert "ConnectionRefusedError" in (down.last_error or "")
    before = len(peer.messages())
    with peer.running():
        assert node.dispatcher.send_one()
        assert node.deliveries()[3].state == DeliveryState.DELIVERED
        node.outbox.retry(dead.id)  # the operator fixed the receiver's mapping: re-send the dead one
        assert node.dispatcher.send_one()
        assert node.deliveries()[2].state == DeliveryState.DELIVERED
    assert not node.dispatcher.send_one()
    received = peer.messages()[before:]
    assert len(received) == 2 and len({m.control_id for m in received}) == 2


def test_without_the_hl7_extra_the_delivery_is_dead_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tid1500_sr(tmp_path)
    ris = registry.build(hl7_destination(MllpPeer()), calling_ae="PACS_TRIAGE")
    monkeypatch.setitem(sys.modules, "hl7", None)
    monkeypatch.setitem(sys.modules, "hl7.mllp", None)
    with pytest.raises(
        Permanent, match=r"python-hl7 package: install the 'hl7' extra \(pip install 'pacs-triage\[hl7\]'\)"
    ):
        ris.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="hl7_oru"))


@pytest.mark.parametrize(
    ("segments", "errors"),
    [
        ("MSA|AE|CTRL|bad\rERR|||207|E", (207,)),  # ERR-3 with one component
        ("MSA|AE|CTRL\rERR|||101^Required field missing^HL70357~102^Data type error^HL70357|E", (101, 102)),
        ("MSA|AR|CTRL\rERR|^^^200&Unsupported message type&HL70357", (200,)),  # v2.3/2.4 ERR-1
        ("MSA|AE|CTRL|text|||207^Application internal error", (207,)),  # v2.3 MSA-6
        ("MSA|AE|CTRL\rERR|||207|E\rERR|||206|E", (207, 206)),
        ("MSA|AA|CTRL", ()),
    ],
)
def test_error_codes_are_read_from_every_place_receivers_put_them(
    segments: str, errors: tuple[int, ...]
) -> None:
    """ERR-3 (v2.5), ERR-1 component 4 and MSA-6 (older receivers), repeated or not: parsed by python-hl7."""
    ack = Ack.of(hl7.parse("MSH|^~\\&|RIS||PT||20261203||ACK^R01^ACK|A1|P|2.5\r" + segments))
    assert (ack.control_id, ack.errors) == ("CTRL", errors)


def test_a_report_that_supersedes_an_earlier_one_is_a_correction(tmp_path: Path) -> None:
    """Late instances give a new SR naming its predecessor: the ORU is a correction (OBR-25 C) of
    the same order, with its own control ID."""
    path, _ = tid1500_sr(tmp_path)
    first = load_report(path)
    ds = pydicom.dcmread(path)
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    series = pydicom.Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = ds.SeriesInstanceUID, [ref]
    study = pydicom.Dataset()
    study.StudyInstanceUID, study.ReferencedSeriesSequence = ds.StudyInstanceUID, [series]
    ds.PredecessorDocumentsSequence = [study]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    later = tmp_path / "later.dcm"
    ds.save_as(later)
    peer = MllpPeer()
    ris = registry.build(hl7_destination(peer), calling_ae="PACS_TRIAGE")
    with peer.running():
        for item in (path, later):
            ris.send(Outgoing(delivery_id=1, sop_instance_uid="x", path=item, content="hl7_oru"))
    original, correction = peer.messages()
    assert (original.problems, correction.problems) == ("", "")
    assert [m.segments("OBR")[0][25] for m in (original, correction)] == ["P", "C"]
    assert original.segments("OBR")[0][3] == correction.segments("OBR")[0][3]  # the same order
    assert original.control_id != correction.control_id
    assert load_report(later).supersedes == (first.sr_sop_instance_uid,)
