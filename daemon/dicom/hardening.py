"""pynetdicom's acceptor, bounded in time and memory from a connection's first byte.

DESIGN "Hostile peers are bounded": a silent or oversized peer costs one slot for seconds, not
the service. pynetdicom 3.0 reads a PDU with blocking ``recv`` calls on a socket without a timeout,
so a peer that sends a few bytes and stops holds two threads and an association slot forever;
it buffers whatever length a PDU header announces; and it runs the TLS handshake in the accept
loop, so one idle TCP connection on the TLS port stops every TLS peer.

This module and ``daemon/dicom/event_loop.py`` (the reactors' polling, installed on each
association here) are the only ones that subclass or patch pynetdicom internals. The patch points, each
guarded by ``tests/dicom/test_pynetdicom_patches.py`` (which fails if an upgrade moves them):

* ``AssociationServer.verify_request`` / ``process_request`` (socketserver hooks): connections
  still negotiating are counted per source address and in total, and refused at accept over
  the caps (``dicom.max_pending_per_address``, ``dicom.max_pending_connections``).
* ``AssociationServer.get_request`` only accepts; ``process_request_thread`` runs the TLS
  handshake in the connection's own thread, bounded by the ACSE timeout.
* ``RequestHandler._create_association``: the socket pynetdicom wraps becomes a
  :class:`BoundedSocket` (same class, two methods replaced).
* ``AssociationSocket.recv``: the DUL (``DULServiceProvider._read_pdu_data``) reads a PDU as
  ``recv(6)`` (type, reserved, length) and then ``recv(length)``. Here the whole
  A-ASSOCIATE-RQ must arrive within the ACSE timeout of accept, each later PDU within the
  network timeout of its first byte, and a PDU announcing more than we accept is answered
  with an A-ABORT before a byte of it is buffered.

What a peer gets in each case is in the README's fault table.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from daemon.config import DicomConfig
from daemon.dicom.event_loop import install as install_event_loop
from daemon.logs import peer_text
from daemon.telemetry import receiver_instruments

log = logging.getLogger(__name__)

# PS3.8 9.3.1: every PDU starts with type (1 byte), reserved (1), length of the rest (4, big endian).
PDU_HEADER = struct.Struct(">BBL")
# A P-DATA-TF may exceed our Maximum Length Received by its own item headers (some senders count
# only the PDV values); anything further over is refused.
PDU_MARGIN = 64 * 1024
# The A-ASSOCIATE-RQ: 128 presentation contexts with several transfer syntaxes each, plus user
# identity tokens of up to 2 x 64 KiB, stay far below this. Only it may arrive before association.
ASSOCIATE_RQ_LIMIT = 256 * 1024
_READ_CHUNK = 256 * 1024  # per recv: far fewer calls than pynetdicom's 4 KiB, little transient memory
# PS3.8 Table 9-26: A-ABORT from the service provider (source 2), invalid PDU parameter value (6).
_ABORT_PDU = bytes([0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
# pynetdicom refuses associations over AE.maximum_associations counting every connection, even
# those still negotiating; we count only negotiated ones ourselves (see over_association_limit).
UNLIMITED_BY_PYNETDICOM = 1_000_000


@dataclass(frozen=True)
class ConnectionLimits:
    """Time and size bounds on every connection, from ``[dicom]``."""

    acse_timeout: float  # accept -> whole A-ASSOCIATE-RQ (TLS handshake included)
    network_timeout: float  # first byte of a PDU -> its last byte, after association
    max_pdu_size: int  # our Maximum Length Received (PS3.8 D.1)
    max_pending_per_address: int  # connections not yet associated, per source address
    max_pending_connections: int  # ...and in total

    @classmethod
    def from_config(cls, dicom: DicomConfig) -> ConnectionLimits:
        return cls(
            acse_timeout=dicom.acse_timeout,
            network_timeout=dicom.network_timeout,
            max_pdu_size=dicom.max_pdu_size,
            max_pending_per_address=dicom.max_pending_per_address,
            max_pending_connections=dicom.max_pending_connections,
        )

    @property
    def max_pdu_length(self) -> int:
        """The largest PDU (variable field) accepted after association."""
        return self.max_pdu_size + PDU_MARGIN


class BoundedSocket(AssociationSocket):
    """pynetdicom's socket wrapper with deadlines and a PDU length limit on what it reads.

    Never instantiated: :class:`BoundedRequestHandler` turns the instance pynetdicom builds into
    one (building a second would queue a second transport-connection event).
    """

    limits: ConnectionLimits
    peer: str
    _negotiation_deadline: float
    _pdu_deadline: float | None
    _body_expected: int | None
    _associate_rq_read: bool

    def _bound(self, limits: ConnectionLimits, peer: str, accepted_at: float) -> None:
        self.limits = limits
        self.peer = peer
        self._negotiation_deadline = accepted_at + limits.acse_timeout
        self._pdu_deadline = None
        self._body_expected = None
        self._associate_rq_read = False
        self._cut = False  # we shut the connection down; the DUL may still try to read
        self.handed_over = False  # counted by the server's thread scan, no longer as "starting"

    @property
    def negotiating(self) -> bool:
        """True until the peer has delivered its whole A-ASSOCIATE-RQ."""
        return not self._associate_rq_read

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (a PDU header, then its body) within the deadline; short on failure.

        A short read is how pynetdicom's DUL learns that the transport is gone (event 17); it then
        ends the association as for a peer that closed.
        """
        if self._cut:
            return bytearray()
        is_body = self._body_expected is not None and nr_bytes == self._body_expected
        if not is_body:
            self._pdu_deadline = (
                self._negotiation_deadline
                if self.negotiating
                else time.monotonic() + self.limits.network_timeout
            )
        data = self._read(nr_bytes)
        if len(data) < nr_bytes:
            self._body_expected = None
            return data
        if is_body:
            self._body_expected = None
            self._associate_rq_read = True
            self._idle()
            return data
        _type, _reserved, length = PDU_HEADER.unpack(bytes(data[:6]))
        limit = ASSOCIATE_RQ_LIMIT if self.negotiating else self.limits.max_pdu_length
        if length > limit:
            log.warning(
                "aborting the connection from %s: a PDU of %d bytes announced, over the %d accepted %s",
                self.peer,
                length,
                limit,
                "before association" if self.negotiating else "(dicom.max_pdu_size plus a margin)",
            )
            self._abort()
            return bytearray()  # pynetdicom: connection closed, before buffering any of it
        self._body_expected = length
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        assert self._pdu_deadline is not None
        # Grown as bytes arrive (never allocated up front): a peer that announces a PDU within the
        # limit and then stalls costs only what it really sent, until the deadline.
        buffer = bytearray()
        while len(buffer) < nr_bytes:
            remaining = self._pdu_deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                data = sock.recv(min(nr_bytes - len(buffer), _READ_CHUNK))
            except TimeoutError:
                self._timed_out(len(buffer), nr_bytes)
                break
            except OSError:
                break  # reset or closed: the DUL treats a short read as a closed connection
            if not data:
                break
            buffer += data
        return buffer

    def _timed_out(self, got: int, wanted: int) -> None:
        if self.negotiating:
            what = f"no complete A-ASSOCIATE-RQ within the ACSE timeout ({self.limits.acse_timeout:g} s)"
        else:
            what = f"a PDU not completed within the network timeout ({self.limits.network_timeout:g} s)"
        log.warning("closing the connection from %s: %s (%d of %d bytes)", self.peer, what, got, wanted)
        self._shutdown()

    def _idle(self) -> None:
        """Between PDUs: sends (responses) are bounded by the network timeout as well."""
        if self.socket is not None:
            try:
                self.socket.settimeout(self.limits.network_timeout)
            except OSError:
                pass

    def _abort(self) -> None:
        sock = cast(socket.socket, self.socket)
        try:
            sock.settimeout(1.0)
            sock.sendall(_ABORT_PDU)
        except OSError:
            pass  # the peer may already be gone; closing is what matters
        self._shutdown()

    def _shutdown(self) -> None:
        self._cut = True
        if self.socket is not None:
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's handler, whose association reads through a :class:`BoundedSocket`."""

    server: HardenedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None and type(sock) is AssociationSocket, "pynetdicom changed its socket"
        sock.__class__ = BoundedSocket
        accepted_at = self.server.accepted_at(self.request)
        bounded = cast(BoundedSocket, sock)
        bounded._bound(self.server.limits, str(self.client_address[0]), accepted_at)  # from the kernel
        self.server.created(self.request, bounded)
        install_event_loop(assoc)  # its reactors wait for work instead of polling (event_loop.py)
        return assoc


class HardenedServer(ThreadedAssociationServer):
    """A threaded association server that bounds connections before association (see module doc)."""

    # listen() backlog (socketserver's default is 5): under a connection flood, legitimate peers
    # still reach accept, where the caps decide, instead of waiting for SYN retransmissions.
    request_queue_size = 256

    def __init__(self, *args: Any, limits: ConnectionLimits, reuse_port: bool = False, **kwargs: Any) -> None:
        self.limits = limits
        self.reuse_port = reuse_port
        # Connections still negotiating: from accept until the handler thread has started their
        # association, counted in _starting; after that, found by scanning the association
        # threads (so no path that ends a connection can leave a count behind).
        self._pending_lock = threading.Lock()
        self._starting: collections.Counter[str] = collections.Counter()
        self._created: dict[socket.socket, BoundedSocket] = {}
        self._accepted: weakref.WeakKeyDictionary[socket.socket, float] = weakref.WeakKeyDictionary()
        self._refusals = _RateLimitedLog()
        kwargs["request_handler"] = BoundedRequestHandler
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.reuse_port:
            # Several receiver processes bind the same port this way and the kernel spreads incoming
            # connections over them (Linux: only sockets of the same user may join the group).
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def pending_by_address(self) -> collections.Counter[str]:
        """Connections not yet associated, by source address."""
        with self._pending_lock:
            counts = collections.Counter(self._starting)
            for assoc in self.active_associations:
                sock = assoc.dul.socket
                if isinstance(sock, BoundedSocket) and sock.handed_over and sock.negotiating:
                    counts[sock.peer] += 1  # client_address[0], as verify_request counts it
        return +counts

    def created(self, request: socket.socket, sock: BoundedSocket) -> None:
        with self._pending_lock:
            self._created[request] = sock

    def _started(self, request: socket.socket, address: str) -> None:
        """The connection's thread is done: its association (if any) runs, and is scanned from now."""
        with self._pending_lock:
            self._starting[address] -= 1
            if self._starting[address] <= 0:
                del self._starting[address]
            sock = self._created.pop(request, None)
            if sock is not None:
                sock.handed_over = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only: the TLS handshake runs in the connection's thread (process_request_thread)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        self._accepted[client] = time.monotonic()
        return client, address

    def accepted_at(self, sock: socket.socket) -> float:
        """When ``sock`` (or the TCP connection under it) was accepted; deadlines count from there."""
        return self._accepted.get(sock, time.monotonic())

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        counts = self.pending_by_address()
        if counts[address] >= self.limits.max_pending_per_address:
            reason = f"{counts[address]} connections from this address are still negotiating"
        elif sum(counts.values()) >= self.limits.max_pending_connections:
            reason = f"{sum(counts.values())} connections in all are still negotiating"
        else:
            return True
        self._refusals.warning(address, reason)
        return False  # socketserver closes the connection

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        with self._pending_lock:
            self._starting[address] += 1
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._started(request, address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        connection = request
        try:
            if self.ssl_context is not None:
                connection = self._handshake(request, address)
                if connection is None:
                    return
            super().process_request_thread(connection, client_address)
        finally:
            self._started(connection if connection is not None else request, address)

    def _handshake(self, raw: socket.socket, address: str) -> ssl.SSLSocket | None:
        """TLS handshake within what is left of the ACSE timeout; None (connection closed) on failure."""
        assert self.ssl_context is not None
        accepted_at = self.accepted_at(raw)
        raw.settimeout(max(0.001, accepted_at + self.limits.acse_timeout - time.monotonic()))
        try:
            tls = self.ssl_context.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            log.warning("TLS handshake with %s failed: %s", peer_text(address), peer_text(str(exc)))
            receiver_instruments().tls_failures.inc()
            self.shutdown_request(raw)
            return None
        self._accepted[tls] = accepted_at
        return tls


class _RateLimitedLog:
    """One warning per source address per interval, with the count of those not logged."""

    INTERVAL_SECONDS = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, address: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(address, (float("-inf"), 0))
            if now - last < self.INTERVAL_SECONDS:
                self._last[address] = (last, suppressed + 1)
                return
            self._last[address] = (now, 0)
            if len(self._last) > 10_000:  # forget old addresses (a scan from many sources)
                self._last = {a: v for a, v in self._last.items() if now - v[0] < self.INTERVAL_SECONDS}
        more = f" ({suppressed} more refused since the last message)" if suppressed else ""
        log.warning("connection from %s refused at accept: %s%s", peer_text(address), reason, more)


def over_association_limit(assoc: Association, maximum: int) -> bool:
    """Whether ``maximum`` other associations of this AE have already sent their A-ASSOCIATE-RQ.

    Connections still negotiating are bounded by the caps at accept and never count here, so
    stalled peers cannot use up ``dicom.max_associations``.
    """
    negotiated = 0
    for other in assoc.ae.active_associations:
        if other is assoc or not other.is_acceptor or other.requestor.primitive is None:
            continue
        if other.is_released or other.is_aborted or other.is_rejected:
            continue
        negotiated += 1
    return negotiated >= maximum
