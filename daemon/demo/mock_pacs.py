"""A mock PACS: a real pynetdicom C-STORE SCP in this process that keeps what it is sent.

Used by ``pacs-triage demo`` as the destination of the results, and by tests and benchmarks that
need a peer whose receive times they can read. It speaks real DICOM on a real socket (C-ECHO and
C-STORE of every storage class the receiver accepts, in every transfer syntax) and answers
success once it holds the object; it is not a PACS (no query, no retrieve, no persistence beyond
an optional folder).

    with MockPacs() as pacs:
        ...send to pacs.peer...
        sr = pacs.wait_for(lambda r: r.modality == "SR", timeout=60)
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from daemon.dicom import sop_classes
from daemon.dicom.status import EchoStatus, StoreStatus

DEFAULT_AE_TITLE = "MOCK_PACS"


@dataclass(frozen=True)
class Received:
    """One object the mock PACS stored, with when and from whom."""

    dataset: Dataset  # decoded, with its file meta
    calling_ae: str
    received_at: float  # time.time() when it was stored (before the response was sent)
    path: Path | None  # where it was written, when the mock PACS has a folder

    @property
    def modality(self) -> str:
        return str(self.dataset.get("Modality", ""))

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.dataset.get("StudyInstanceUID", ""))


class MockPacs:
    """C-STORE SCP on ``host:port`` (port 0: a free one, see :attr:`port` after :meth:`start`)."""

    def __init__(
        self,
        ae_title: str = DEFAULT_AE_TITLE,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        directory: Path | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.directory = directory
        self._received: list[Received] = []
        self._changed = threading.Condition()
        self._server: Any = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> MockPacs:
        """Bind and serve in background threads; returns self."""
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.add_supported_context(sop_classes.VERIFICATION)
        for sop_class in sop_classes.ACCEPTED_STORAGE:
            ae.add_supported_context(sop_class, sop_classes.TRANSFER_SYNTAXES)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._server = ae.start_server(
            (self.host, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)],
        )
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> MockPacs:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def peer(self) -> str:
        """``AET@HOST:PORT``, as ``PACS_TRIAGE_DESTINATION`` and ``pacs-triage send`` take it."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    # -- what arrived -------------------------------------------------------------------------

    def received(self) -> list[Received]:
        """Everything stored so far, in arrival order."""
        with self._changed:
            return list(self._received)

    def wait_for(
        self,
        predicate: Callable[[Received], bool],
        *,
        timeout: float,
        progress: Callable[[float], None] | None = None,
        progress_every: float = 10.0,
    ) -> Received | None:
        """The first object matching ``predicate``, waiting up to ``timeout`` s; None when none came.

        ``progress(elapsed_seconds)`` is called every ``progress_every`` seconds while waiting.
        """
        start = time.monotonic()
        deadline = start + timeout
        next_progress = start + progress_every
        with self._changed:
            while True:
                found = next((r for r in self._received if predicate(r)), None)
                now = time.monotonic()
                if found is not None or now >= deadline:
                    return found
                if progress is not None and now >= next_progress:
                    progress(now - start)
                    next_progress = now + progress_every
                self._changed.wait(min(deadline, next_progress) - now)

    # -- handlers (pynetdicom's threads) ---------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return int(EchoStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        data = event.encoded_dataset()  # Part 10: preamble, file meta, the data set as sent
        dataset = dcmread(io.BytesIO(data))
        path = None
        if self.directory is not None:
            # The name is ours (a hash), never a string from the peer.
            name = hashlib.sha256(str(dataset.SOPInstanceUID).encode()).hexdigest()[:32]
            path = self.directory / f"{name}.dcm"
            path.write_bytes(data)
        item = Received(
            dataset=dataset,
            calling_ae=str(event.assoc.requestor.ae_title),
            received_at=time.time(),
            path=path,
        )
        with self._changed:
            self._received.append(item)
            self._changed.notify_all()
        return int(StoreStatus.SUCCESS)
