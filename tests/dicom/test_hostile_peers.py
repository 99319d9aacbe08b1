"""Issue 11 items 7 and 8: the TLS handshake cannot block the accept loop, and a PDU length is a
claim we check before buffering anything (DESIGN "Hostile peers are bounded")."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import psutil

from tests.support.dicom_bytes import associate
from tests.support.hostile import (
    A_ABORT,
    ASSOCIATE_RQ,
    P_DATA_TF,
    associate_rq,
    connect_from,
    pdu_header,
    peer_closed,
    read_pdu,
    stalled_connections,
)
from tests.support.peers import free_port
from tests.support.pki import Pki
from tests.support.process import wait_until
from tests.support.service import ServiceFactory

ACSE_TIMEOUT = 5


def _tls_config(path: Path, pki: Pki, tls_port: int) -> Path:
    path.write_text(
        f"""
[dicom]
acse_timeout = {ACSE_TIMEOUT}

[tls]
enabled = true
port = {tls_port}
certificate = "{pki.server_cert}"
private_key = "{pki.server_key}"
ca_certificates = "{pki.ca}"
require_client_certificate = true
"""
    )
    return path


def test_idle_tcp_connections_on_the_tls_port_do_not_block_tls(
    pki: Pki, sqlite_services: ServiceFactory, tmp_path: Path
) -> None:
    tls_port = free_port()
    svc = sqlite_services(config=_tls_config(tmp_path / "tls.toml", pki, tls_port), tls_port=tls_port)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    client.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    # Two peers that connect and say nothing, one that stops inside its ClientHello.
    with (
        stalled_connections(tls_port, ["127.0.0.2", "127.0.0.3"], first_bytes=b"") as idle,
        stalled_connections(tls_port, ["127.0.0.4"], first_bytes=b"\x16\x03\x01\x02") as half,
    ):
        assoc = associate(tls_port, tls_args=(client, "127.0.0.1"), calling_ae="TLS_SCU", timeout=20)
        try:
            assert assoc.is_established, "a TLS association failed while idle TCP connections were open"
            assert assoc.send_c_echo().Status == 0
        finally:
            if assoc.is_established:
                assoc.release()
        # The handshake has the ACSE timeout: the silent peers are closed, not kept forever.
        wait_until(
            lambda: idle.closed() + half.closed() == 3,
            timeout=ACSE_TIMEOUT + 30,
            what="idle TLS connections to be closed after the ACSE timeout",
        )
    assert "TLS handshake with 127.0.0.2 failed" in svc.log_text()
    assert svc.echo() == 0


HUGE = 0xFFFF_FFF0
STREAM_BYTES = 40 * 2**20  # what each hostile peer tries to push after its header
RSS_GROWTH_LIMIT = 50 * 2**20


def _push(sock: socket.socket, header: bytes, outcome: list[str]) -> None:
    """Send ``header`` and then up to STREAM_BYTES of PDU 'body', until the receiver cuts us off."""
    sock.setblocking(True)
    sock.settimeout(60)
    chunk = b"\0" * 2**20
    try:
        sock.sendall(header)
        for _ in range(STREAM_BYTES // len(chunk)):
            sock.sendall(chunk)
        outcome.append("sent everything")
    except OSError:
        outcome.append("cut off")


def _associated(port: int, called_ae: str, source: str) -> socket.socket:
    """A raw association (Verification) whose requestor declares Maximum Length 0, "unlimited"."""
    sock = connect_from(source, port)
    sock.sendall(associate_rq(called_ae=called_ae, max_pdu=0))
    pdu_type, _body = read_pdu(sock)
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}"
    return sock


def test_huge_pdu_lengths_are_aborted_and_memory_stays_bounded(sqlite_services: ServiceFactory) -> None:
    svc = sqlite_services()
    assert svc.echo() == 0
    process = psutil.Process(svc.pid)
    baseline = process.memory_info().rss
    # Five peers announce a 4 GiB A-ASSOCIATE-RQ; five associate (declaring "unlimited" PDUs for
    # themselves) and then announce a 4 GiB P-DATA-TF. All then try to stream 40 MB each.
    peers = [(connect_from(f"127.0.0.{2 + i}", svc.port), pdu_header(ASSOCIATE_RQ, HUGE)) for i in range(5)]
    peers += [
        (_associated(svc.port, svc.ae_title, f"127.0.0.{7 + i}"), pdu_header(P_DATA_TF, HUGE))
        for i in range(5)
    ]
    outcome: list[str] = []
    threads = [threading.Thread(target=_push, args=(sock, header, outcome)) for sock, header in peers]
    peak = baseline
    try:
        for thread in threads:
            thread.start()

        def pushed() -> bool:
            nonlocal peak
            peak = max(peak, process.memory_info().rss)
            return not any(t.is_alive() for t in threads)

        wait_until(pushed, timeout=120, what="the hostile peers to finish pushing", interval=0.02)
        peak = max(peak, process.memory_info().rss)
        assert peak - baseline < RSS_GROWTH_LIMIT, (
            f"receiver memory grew by {(peak - baseline) / 2**20:.0f} MB under 10 huge-PDU peers"
        )
        assert outcome == ["cut off"] * 10, outcome
        for sock, _header in peers:
            assert _first_pdu_type(sock) == A_ABORT, "the receiver closed without an A-ABORT"
            wait_until(lambda s=sock: peer_closed(s), timeout=10, what="the receiver to close")
    finally:
        for sock, _header in peers:
            with contextlib.suppress(OSError):
                sock.close()
    assert svc.alive() and svc.echo() == 0
    assert "a PDU of 4294967280 bytes announced" in svc.log_text()


def _first_pdu_type(sock: socket.socket) -> int | None:
    sock.setblocking(True)
    sock.settimeout(10)
    try:
        data = sock.recv(1)
    except OSError:
        return None
    return data[0] if data else None
