"""Issue 11 item 6: connections that stall before association cannot lock legitimate senders out.

A hostile (or broken) peer connects, sends the first bytes of a PDU and then nothing. Each such
connection has until the ACSE timeout, counted from accept, to deliver a whole A-ASSOCIATE-RQ;
connections still negotiating are capped per source address and in total (refused at accept),
and they never count against ``dicom.max_associations``.
"""

from __future__ import annotations

from pathlib import Path

from tests.paths import TESTDATA
from tests.support.dicom_bytes import echo_status, read_quietly
from tests.support.hostile import (
    P_DATA_TF,
    associate_rq,
    connect_from,
    pdu_header,
    peer_closed,
    read_pdu,
    stalled_connections,
)
from tests.support.peers import need_dcmtk, storescu
from tests.support.process import wait_until
from tests.support.service import ServiceFactory
from tests.support.stored import stored_instances

SLICE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_03.dcm"
ACSE_TIMEOUT = 20  # long enough that the legitimate sends below happen while the stalled peers wait


def test_legitimate_senders_work_while_100_stalled_connections_are_open(
    sqlite_services: ServiceFactory, tmp_path: Path
) -> None:
    need_dcmtk("storescu")
    svc = sqlite_services(
        env={
            "PACS_TRIAGE_DICOM__ACSE_TIMEOUT": str(ACSE_TIMEOUT),
            "PACS_TRIAGE_DICOM__MAX_PENDING_PER_ADDRESS": "10",
            "PACS_TRIAGE_DICOM__MAX_PENDING_CONNECTIONS": "200",
        }
    )
    # 50 stalled connections from one address (over its cap of 10) and 50 more spread over ten
    # other addresses (5 each, under the cap): 60 wait in negotiation, 40 are refused at accept.
    crowded, spread = "127.0.0.2", [f"127.0.0.{3 + i % 10}" for i in range(50)]
    with stalled_connections(svc.port, [crowded] * 50 + spread) as crowd:
        wait_until(
            lambda: crowd.closed(crowded) == 40,
            timeout=ACSE_TIMEOUT / 2,
            what="connections over the per-address cap to be refused at accept",
        )
        # A real storescu and a real pynetdicom SCU (from 127.0.0.1) are served meanwhile.
        out = storescu(svc.port, [SLICE], calling_ae="LEGIT_SCU", timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert echo_status(svc.port, timeout=10) == 0
        uid = str(read_quietly(SLICE, stop_before_pixels=True).SOPInstanceUID)
        assert stored_instances(svc.database_url)[uid].calling_ae == "LEGIT_SCU"
        # ...and the 60 stalled peers were still connected all that time (nothing was freed for them).
        assert crowd.open() == 60, f"{crowd.open()} stalled connections open, expected 60"
        # The ACSE timeout ends every stalled connection, including those that sent a partial PDU.
        wait_until(
            lambda: crowd.closed() == 100,
            timeout=ACSE_TIMEOUT + 30,
            what="every stalled connection to be closed after the ACSE timeout",
        )
    assert svc.alive() and svc.echo() == 0
    assert "Traceback" not in svc.log_text()


def test_total_cap_on_connections_still_negotiating(sqlite_services: ServiceFactory) -> None:
    svc = sqlite_services(
        env={
            "PACS_TRIAGE_DICOM__ACSE_TIMEOUT": "10",
            "PACS_TRIAGE_DICOM__MAX_PENDING_PER_ADDRESS": "10",
            "PACS_TRIAGE_DICOM__MAX_PENDING_CONNECTIONS": "20",
        }
    )
    sources = [f"127.0.1.{i}" for i in range(1, 31)]  # 30 addresses, one connection each
    with stalled_connections(svc.port, sources) as crowd:
        wait_until(lambda: crowd.closed() >= 10, timeout=5, what="connections over the total cap refused")
        assert crowd.open() == 20, f"{crowd.open()} open, expected the total cap of 20"
        wait_until(lambda: crowd.closed() == 30, timeout=40, what="the ACSE timeout to end the rest")
    # Once they are gone, everyone is served again.
    assert svc.echo() == 0
    log = svc.log_text()
    assert "refused at accept" in log and "Traceback" not in log


def test_an_associated_peer_that_stalls_inside_a_pdu_is_closed(sqlite_services: ServiceFactory) -> None:
    """After association, each PDU must be complete within dicom.network_timeout of its first byte."""
    svc = sqlite_services(env={"PACS_TRIAGE_DICOM__NETWORK_TIMEOUT": "3"})
    sock = connect_from("127.0.0.2", svc.port)
    try:
        sock.sendall(associate_rq(called_ae=svc.ae_title))
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(pdu_header(P_DATA_TF, 1000) + b"\0" * 10)  # 10 of 1000 bytes, then nothing
        wait_until(lambda: peer_closed(sock), timeout=60, what="the stalled association to be closed")
    finally:
        sock.close()
    log = svc.log_text()
    assert "a PDU not completed within the network timeout (3 s)" in log
    assert svc.echo() == 0
