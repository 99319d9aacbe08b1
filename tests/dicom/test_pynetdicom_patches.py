"""The pynetdicom internals ``daemon/dicom/hardening.py`` relies on are still there and still used.

If a pynetdicom upgrade fails this file, re-read the patch points listed in hardening.py's module
docstring against the new pynetdicom source before changing anything here.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationServer, RequestHandler
from pynetdicom.utils import make_target

from daemon.dicom.hardening import BoundedSocket, ConnectionLimits, HardenedServer
from tests.support.hostile import associate_rq, connect_from, read_pdu
from tests.support.process import wait_until

VERIFIED_WITH = "3.0."  # the pynetdicom series the patch points were read in
LIMITS = ConnectionLimits(
    acse_timeout=20,
    network_timeout=20,
    max_pdu_size=2**20,
    max_pending_per_address=4,
    max_pending_connections=8,
)


def test_pynetdicom_is_the_series_the_patches_were_written_for() -> None:
    assert pynetdicom.__version__.startswith(VERIFIED_WITH), (
        f"pynetdicom {pynetdicom.__version__}: daemon/dicom/hardening.py was verified against "
        f"{VERIFIED_WITH}x; re-check its patch points, then update VERIFIED_WITH"
    )


def test_the_dul_reads_a_pdu_as_header_then_body() -> None:
    """BoundedSocket.recv tells a header from a body by this call sequence."""
    source = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in source
    assert "self.socket.recv(pdu_length)" in source
    assert source.index("self.socket.recv(6)") < source.index("self.socket.recv(pdu_length)")


def test_the_hooks_we_override_exist() -> None:
    for name in ("get_request", "verify_request", "process_request", "server_bind"):
        assert hasattr(AssociationServer, name), name
    assert "AssociationSocket(assoc, client_socket=self.request)" in inspect.getsource(
        RequestHandler._create_association
    )
    assert "AcceptorThread" in inspect.getsource(AssociationServer.active_associations.fget)  # type: ignore[attr-defined]


@pytest.fixture
def server() -> Iterator[HardenedServer]:
    ae = AE(ae_title="PATCH_TEST")
    ae.add_supported_context("1.2.840.10008.1.1")
    srv = ae.make_server(
        ("127.0.0.1", 0),
        server_class=lambda *a, **k: HardenedServer(*a, limits=LIMITS, **k),  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=make_target(srv.serve_forever), daemon=True)
    thread.start()
    ae._servers.append(srv)
    yield srv
    srv.shutdown()
    ae.shutdown()


def test_a_connection_is_pending_until_its_request_is_complete(server: HardenedServer) -> None:
    port = server.server_address[1]
    request = associate_rq(called_ae="PATCH_TEST")
    sock = connect_from("127.0.0.5", port)
    try:
        sock.sendall(request[:10])  # part of the A-ASSOCIATE-RQ
        (assoc,) = wait_until(
            lambda: server.active_associations, timeout=10, what="the association thread to start"
        )
        assert server.pending_by_address() == {"127.0.0.5": 1}
        assert isinstance(assoc.dul.socket, BoundedSocket)  # RequestHandler still built its socket
        sock.sendall(request[10:])
        pdu_type, _ = read_pdu(sock)
        assert pdu_type == 0x02  # A-ASSOCIATE-AC
        assert server.pending_by_address() == {}
    finally:
        sock.close()
