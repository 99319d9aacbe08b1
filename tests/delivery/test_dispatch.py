"""Results to destinations over real associations: late, refusing, aborting, A700 and silent peers."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.events import Event

from storage.models import DeliveryState, utcnow
from storage.stats import queue_summary
from tests.support.peers import free_port
from tests.support.queue_db import Db, make_node
from tests.support.storescp import Storescp

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def test_destination_started_late_receives_the_result_once(
    db: Db, tmp_path: Path, storescp: Storescp
) -> None:
    node = make_node(db, tmp_path, storescp.destination)
    uid = node.produce_result()
    for _ in range(3):  # nothing listens yet: connection refused, retried
        assert node.dispatcher.send_one()
    assert node.delivery().state == DeliveryState.PENDING and node.delivery().attempts == 3
    storescp.start()
    assert node.dispatcher.send_one()
    assert not node.dispatcher.send_one(), "delivered: nothing left to send"
    row = node.delivery()
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.DELIVERED, 4, 0)
    received = storescp.files()
    assert len(received) == 1
    ds = dcmread(received[0])
    assert (ds.SOPClassUID, ds.SOPInstanceUID) == (BASIC_TEXT_SR, uid)


@dataclass
class MockPacs:
    """A pynetdicom Storage SCP that behaves as scripted, one behaviour per association."""

    script: list[str]
    port: int = field(default_factory=free_port)
    stored: list[str] = field(default_factory=list)
    _modes: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _requested(self, event: Event) -> None:
        with self._lock:
            mode = self.script.pop(0) if self.script else "accept"
            self._modes[id(event.assoc)] = mode
        if mode == "refuse":
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)

    def _store(self, event: Event) -> int:
        mode = self._modes.get(id(event.assoc), "accept")
        if mode == "abort":
            event.assoc.abort()
            return 0xC000
        if mode == "a700":
            return 0xA700
        self.stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    @contextlib.contextmanager
    def running(self) -> Iterator[MockPacs]:
        ae = AE(ae_title="MOCK")
        ae.add_supported_context(BASIC_TEXT_SR)
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store)],
        )
        assert server is not None
        try:
            yield self
        finally:
            server.shutdown()


def test_refuse_abort_and_a700_are_failures_then_one_delivery(db: Db, tmp_path: Path) -> None:
    mock = MockPacs(["refuse", "abort", "a700"])
    node = make_node(db, tmp_path, f"MOCK@127.0.0.1:{mock.port}")
    uid = node.produce_result()
    with mock.running():
        for _ in range(4):
            assert node.dispatcher.send_one()
        assert not node.dispatcher.send_one()
    assert mock.stored == [uid], "the result arrives exactly once"
    row = node.delivery()
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.DELIVERED, 4, 0)
    from tests.support.stored import events

    failures = [
        d
        for e, i, k, d in events(db.url)
        if (e, i, k) == ("delivery", str(row.id), "pending") and "error" in d
    ]
    assert len(failures) == 3
    assert "could not associate" in failures[0] and "no response" in failures[1]
    assert "0xA700" in failures[2], "a non-success status is recorded as a failure"


def test_silent_destination_ends_dead_and_visible(db: Db, tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts TCP connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        node = make_node(db, tmp_path, f"SILENT@127.0.0.1:{port}", attempts=2, timeout=1.0)
        node.produce_result()
        assert node.dispatcher.send_one() and node.dispatcher.send_one()
        assert not node.dispatcher.send_one(), "dead after the configured attempts"
    row = node.delivery()
    assert (row.state, row.attempts) == (DeliveryState.DEAD, 2)
    summary = queue_summary(db.sessions, utcnow())
    assert summary.dead_deliveries_total == 1
    assert summary.dead_deliveries[0].detail.startswith(f"SILENT@127.0.0.1:{port}")
    # An operator can send it again once the destination is fixed.
    assert node.outbox.retry(row.id).state is DeliveryState.PENDING


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Dispatch is daemon logic; the outbox itself is tested on both databases in test_queue.py."""
    return f"sqlite:///{tmp_path / 'test.db'}"
