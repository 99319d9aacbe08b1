"""Hostile peers on loopback: raw TCP sockets that stall, lie about PDU lengths or never speak TLS.

Linux routes all of 127.0.0.0/8 to loopback, so binding a socket to 127.0.0.N before connecting
gives each hostile peer its own source address (the receiver's per-address caps see them apart).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

# PS3.8 9.3.2: an A-ASSOCIATE-RQ PDU starts with type 0x01, a reserved byte and a 32-bit length.
ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
A_ABORT = 0x07


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def connect_from(source: str, port: int, *, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``host:port`` whose source address is ``source`` (any 127.0.0.N)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def peer_closed(sock: socket.socket) -> bool:
    """True once the receiver has closed (or reset) the connection; never blocks."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset by the receiver
    if not data:
        return True
    # The receiver answered (an A-ABORT, say) and may close next: read it and look again.
    sock.recv(len(data), socket.MSG_DONTWAIT)
    return peer_closed(sock)


def received_abort(sock: socket.socket) -> bool:
    """Whether the first bytes the receiver sent on ``sock`` were an A-ABORT PDU."""
    try:
        data = sock.recv(6, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except OSError:
        return False
    return data[:1] == bytes([A_ABORT])


@dataclass
class Crowd:
    """Many hostile connections, each remembered with its source address."""

    sockets: list[tuple[str, socket.socket]] = field(default_factory=list)

    def closed(self, source: str | None = None) -> int:
        return sum(peer_closed(s) for src, s in self.sockets if source in (None, src))

    def open(self, source: str | None = None) -> int:
        return sum(not peer_closed(s) for src, s in self.sockets if source in (None, src))

    def close(self) -> None:
        for _src, sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()


@contextlib.contextmanager
def stalled_connections(
    port: int, sources: Sequence[str], *, first_bytes: bytes = b"\x01\x00\x00"
) -> Iterator[Crowd]:
    """One connection per entry of ``sources`` that sends ``first_bytes`` (a PDU's start) and then nothing."""
    crowd = Crowd()
    try:
        for source in sources:
            sock = connect_from(source, port)
            if first_bytes:
                with contextlib.suppress(OSError):  # refused at accept already: that is allowed
                    sock.sendall(first_bytes)
            crowd.sockets.append((source, sock))
        yield crowd
    finally:
        crowd.close()


def associate_rq(*, called_ae: str, calling_ae: str = "HOSTILE", max_pdu: int = 0) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification, declaring ``max_pdu`` (0: "unlimited") as its own."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    # The private fields: the setters would refuse the odd titles hostile tests send.
    primitive._calling_ae_title = calling_ae
    primitive._called_ae_title = called_ae
    context = build_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    primitive.user_information = [length, implementation]
    from tests.support.dicom_bytes import pynetdicom_config

    with pynetdicom_config(VALIDATORS={**_validators(), "AE": lambda _value: (True, "")}):
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(primitive)
        return bytes(pdu.encode())


def _validators() -> dict[str, object]:
    from pynetdicom import _config

    return dict(_config.VALIDATORS)


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """One whole PDU from ``sock`` (blocking, with ``timeout``): its type and its body."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    header = _read_exactly(sock, 6)
    pdu_type, _reserved, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data
