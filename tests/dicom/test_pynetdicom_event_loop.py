"""The pynetdicom internals ``daemon/dicom/event_loop.py`` relies on are still there and still used.

If a pynetdicom upgrade fails this file, re-read the patch points in event_loop.py's module
docstring against the new pynetdicom source (the two reactor loops) before changing anything.
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Iterator
from typing import cast

import pynetdicom.association
import pynetdicom.dul
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.utils import make_target

from daemon.dicom import event_loop
from daemon.dicom.hardening import ConnectionLimits, HardenedServer

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
LIMITS = ConnectionLimits(
    acse_timeout=20,
    network_timeout=20,
    max_pdu_size=2**20,
    max_pending_per_address=4,
    max_pending_connections=8,
)


def test_the_reactors_sleep_where_the_patch_expects() -> None:
    dul_loop = inspect.getsource(DULServiceProvider.run_reactor)
    assert "time.sleep(self._run_loop_delay)" in dul_loop
    for name in ("event_queue.get(block=False)", "_process_recv_primitive()", "_is_transport_event()"):
        assert name in dul_loop, name
    assoc_loop = inspect.getsource(Association._run_reactor)
    assert f"time.sleep({event_loop._ASSOCIATION_SLEEP})" in assoc_loop
    assert "self.dimse.get_msg(block=False)" in assoc_loop
    assert "import time" in inspect.getsource(pynetdicom.dul)
    assert "import time" in inspect.getsource(pynetdicom.association)


def test_the_queues_the_patch_replaces_are_plain_queues() -> None:
    assert "self.to_user_queue" in inspect.getsource(DULServiceProvider.__init__)
    for attribute in ("event_queue", "to_provider_queue", "to_user_queue"):
        assert f"self.{attribute}" in inspect.getsource(DULServiceProvider.__init__), attribute
    assert "self.msg_queue" in inspect.getsource(DIMSEServiceProvider.__init__)
    assert "self.msg_queue.get(" in inspect.getsource(DIMSEServiceProvider.get_msg)
    assert issubclass(event_loop._WakingQueue, queue.Queue)


@pytest.fixture
def server() -> Iterator[tuple[HardenedServer, list[Association]]]:
    seen: list[Association] = []

    def on_store(event: evt.Event) -> int:
        seen.append(event.assoc)
        return 0x0000

    ae = AE(ae_title="LOOP_TEST")
    ae.add_supported_context(VERIFICATION)
    ae.add_supported_context(CT)
    srv = cast(
        HardenedServer,
        ae.make_server(
            ("127.0.0.1", 0),
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
            server_class=lambda *a, **k: HardenedServer(*a, limits=LIMITS, **k),  # type: ignore[arg-type]
        ),
    )
    thread = threading.Thread(target=make_target(srv.serve_forever), daemon=True)
    thread.start()
    ae._servers.append(srv)
    yield srv, seen
    srv.shutdown()
    ae.shutdown()


def _dataset(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid
    ds.PatientID = "LOOP"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    ds.set_original_encoding(False, True)
    return ds


def test_an_association_runs_on_the_waking_loops(server: tuple[HardenedServer, list[Association]]) -> None:
    """Stores are answered, and both reactors of the acceptor slept through the patch, not polled."""
    srv, seen = server
    scu = AE(ae_title="LOOP_SCU")
    scu.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = scu.associate("127.0.0.1", srv.server_address[1], ae_title="LOOP_TEST")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(_dataset(f"1.2.3.{i}")).Status for i in range(20)]
    finally:
        assoc.release()
    assert statuses == [0] * 20
    acceptor = seen[0]
    assert isinstance(acceptor.dul.event_queue, event_loop._WakingQueue)
    assert isinstance(acceptor.dimse.msg_queue, event_loop._WakingQueue)
    assoc_waits = acceptor._pacs_triage_wake.waits  # type: ignore[attr-defined]
    dul_waits = acceptor.dul._pacs_triage_waker.waits  # type: ignore[attr-defined]
    assert assoc_waits > 0, "Association._run_reactor no longer sleeps through the patch"
    assert dul_waits > 0, "DUL.run_reactor no longer sleeps through the patch"
    # The requestor (not installed) kept pynetdicom's own loops.
    assert not isinstance(assoc.dul.event_queue, event_loop._WakingQueue)
