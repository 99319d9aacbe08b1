"""Fixtures for delivery tests: an in-process node whose results go to several destinations, and
pynetdicom Storage SCPs that behave like PACSs (one that checks the called AE title)."""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.events import Event
from sqlalchemy import select

from daemon.config import load_config
from daemon.delivery.dispatcher import Dispatcher
from daemon.service.routing import CompletionSweep
from daemon.service.worker import Worker
from storage.models import Delivery
from storage.outbox import DeliveryView, Outbox
from storage.retry import Backoff
from storage.spool import Spool
from tests.support.peers import free_port
from tests.support.queue_db import Db, ct_series, ingest_files

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@dataclass
class MultiNode:
    """Storage, a worker and a dispatcher in this process; results go to every configured destination."""

    db: Db
    worker: Worker
    dispatcher: Dispatcher
    outbox: Outbox
    spool: Spool
    tmp: Path

    def produce_result(self) -> str:
        """Receive a small study, complete it and run the echo pipeline; returns the study UID."""
        study = f"2.25.{uuid.uuid4().int}"
        ingest_files(self.db, self.spool, ct_series(self.tmp / "in" / study, study, study + ".1", 2))
        CompletionSweep(self.worker.config, self.db.sessions, self.spool).force(study)
        assert self.worker.run_one()
        return study

    def deliveries(self) -> list[DeliveryView]:
        return sorted(self.outbox.recent(limit=1000), key=lambda d: d.id)

    def rows(self) -> list[Delivery]:
        with self.db.sessions() as session:
            return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def destination_toml(name: str, address: str, **extra: object) -> str:
    ae, rest = address.split("@")
    host, port = rest.rsplit(":", 1)
    lines = [
        "[[destinations]]",
        f'name = "{name}"',
        f'ae_title = "{ae}"',
        f'host = "{host}"',
        f"port = {port}",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def make_multi_node(
    db: Db,
    tmp_path: Path,
    destinations: Sequence[str],
    *,
    attempts: int = 10,
    threads: int = 2,
    env: dict[str, str] | None = None,
) -> MultiNode:
    """``destinations``: TOML blocks from :func:`destination_toml`."""
    toml = tmp_path / "node.toml"
    toml.write_text("".join(destinations))
    config = load_config(
        toml,
        {
            "PACS_TRIAGE_HOME": str(tmp_path / "home"),
            "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
            "PACS_TRIAGE_DISPATCH__MAX_ATTEMPTS": str(attempts),
            "PACS_TRIAGE_DISPATCH__THREADS": str(threads),
            "PACS_TRIAGE_DISPATCH__POLL_SECONDS": "0.1",
            **(env or {}),
        },
    )
    spool = Spool(config.spool_dir)
    spool.open()
    results = Spool(config.results_dir)
    results.open()
    outbox = Outbox(db.sessions, lease_seconds=60, backoff=Backoff(base_seconds=0, max_seconds=0, jitter=0))
    return MultiNode(
        db,
        Worker(config, db.sessions, spool, results, name="test-worker"),
        Dispatcher(config, outbox, results, name="test-dispatch"),
        outbox,
        spool,
        tmp_path,
    )


@dataclass
class PickyPacs:
    """A pynetdicom Storage SCP that, like most PACSs, rejects associations not addressed to its AE
    title (A-ASSOCIATE-RJ rejected-permanent, "called AE title not recognised")."""

    ae_title: str = "PICKY"
    port: int = field(default_factory=free_port)
    stored: list[str] = field(default_factory=list)
    hold: threading.Event | None = None  # when set up, C-STORE responses wait for it
    receiving: threading.Event = field(default_factory=threading.Event)

    def _store(self, event: Event) -> int:
        self.stored.append(str(event.dataset.SOPInstanceUID))
        self.receiving.set()
        if self.hold is not None:
            self.hold.wait(120)
        return 0x0000

    @contextlib.contextmanager
    def running(self) -> Iterator[PickyPacs]:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(BASIC_TEXT_SR)
        ae.add_supported_context("1.2.840.10008.1.1")
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        try:
            yield self
        finally:
            if self.hold is not None:
                self.hold.set()
            server.shutdown()


@dataclass
class SlowPacs:
    """A pynetdicom Storage SCP that files what it receives by SOP Instance UID, as a PACS does (a
    second copy of an object replaces the first), counts every reception, and holds its answer to
    the first C-STORE until :attr:`answer` is set (a slow link or a busy PACS)."""

    directory: Path
    ae_title: str = "SLOW_PACS"
    port: int = field(default_factory=free_port)
    receptions: list[str] = field(default_factory=list)
    first_received: threading.Event = field(default_factory=threading.Event)
    answer: threading.Event = field(default_factory=threading.Event)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def copies(self) -> dict[str, int]:
        """SOP Instance UID -> how many objects the PACS holds with it."""
        held: dict[str, int] = {}
        for path in self.directory.iterdir():
            uid = str(dcmread(path).SOPInstanceUID)
            held[uid] = held.get(uid, 0) + 1
        return held

    def _store(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        ds.save_as(self.directory / f"{uid}.dcm", enforce_file_format=True)
        self.receptions.append(uid)
        if not self.first_received.is_set():
            self.first_received.set()
            self.answer.wait(300)
        return 0x0000

    @contextlib.contextmanager
    def running(self) -> Iterator[SlowPacs]:
        self.directory.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(BASIC_TEXT_SR)
        ae.add_supported_context("1.2.840.10008.1.1")
        ae.network_timeout = ae.dimse_timeout = 600
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        try:
            yield self
        finally:
            self.answer.set()
            server.shutdown()
