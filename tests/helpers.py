"""Reusable test helpers: a real pacs-triage service, dcmtk tools, raw DICOM bytes and records.

``start_service`` runs ``pacs-triage serve`` as a subprocess (the real thing: its own process,
signals, ``kill -9``); ``InProcessService`` runs ``daemon.service.serve`` in a thread when a test
only needs a receiver quickly. Both are waited for with a deadline until C-ECHO succeeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select

from daemon.scu import Peer
from storage.db import make_engine
from storage.models import Event, Instance, Series, Study
from tests.conftest import free_port, need_peer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_AE = "PACS_TRIAGE"
VERIFICATION = "1.2.840.10008.1.1"
READY_DEADLINE_S = 60.0

T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns a truthy value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- the command line ---------------------------------------------------------------------------


def cli_command() -> list[str]:
    """How to run ``pacs-triage``: the console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "pacs-triage"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any PACS_TRIAGE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_TRIAGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["TCP_NODELAY"] = "1"  # for dcmtk tools (see the issue: 44 ms stalls without it)
    env.update(extra or {})
    return env


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli_command(), *args], env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


# -- dcmtk ----------------------------------------------------------------------------------------


@cache
def _find_dcmtk(name: str) -> str | None:
    # pynetdicom installs its own "storescu"/"storescp" apps into the virtual environment; we want
    # dcmtk's, so look at every PATH entry and ask each candidate who it is.
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=10)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(candidate)
    return None


def need_dcmtk(name: str) -> str:
    """Path of dcmtk's ``name`` (storescu, storescp, dcmdump...); skip locally / fail in CI if absent."""
    path = _find_dcmtk(name)
    need_peer(path is not None, f"dcmtk {name!r} (Debian package dcmtk)")
    assert path is not None
    return path


# storescu option that makes it propose (and so send unchanged) a file's own transfer syntax.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": ["-xi"],
    "1.2.840.10008.1.2.1": ["-xe"],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.5": ["-xr"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
}


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    called_ae: str = DEFAULT_AE,
    calling_ae: str = "DCMTK_SCU",
    extra: Sequence[str] = (),
    host: str = "127.0.0.1",
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk storescu, proposing their own transfer syntax (all must share it)."""
    syntaxes = {transfer_syntax_of(f) for f in files}
    assert len(syntaxes) == 1, f"storescu proposes one compressed syntax at a time, got {syntaxes}"
    flags = STORESCU_PROPOSE[syntaxes.pop()]
    cmd = [
        need_dcmtk("storescu"),
        "-nh",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        *flags,
        *extra,
        host,
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env())


# -- DICOM bytes ----------------------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its preamble and file meta: the data set as encoded."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def transfer_syntax_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode_dataset(ds: Dataset, *, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    """Encode ``ds`` without file meta, keeping invalid values (pydicom only warns about them)."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit_vr
    buffer.is_little_endian = little_endian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        write_dataset(buffer, ds)
    return buffer.getvalue()


def read_quietly(path: Path, **kwargs: Any) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dcmread(path, **kwargs)


# -- low-level SCU --------------------------------------------------------------------------------


def associate(
    port: int,
    contexts: Sequence[tuple[str, str]] = (),
    *,
    called_ae: str = DEFAULT_AE,
    calling_ae: str = "TEST_SCU",
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    **kwargs: Any,
) -> Association:
    """A real pynetdicom association proposing (abstract syntax, transfer syntax) pairs and echo."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    for abstract, ts in contexts:
        ae.add_requested_context(abstract, ts)
    return ae.associate(host, port, ae_title=called_ae, **kwargs)


_message_ids = itertools.count(1)


@dataclass(frozen=True)
class StoreResponse:
    status: int | None  # None: no response (DIMSE timeout or the association was lost)
    comment: str = ""


def raw_c_store(
    assoc: Association,
    data: bytes,
    *,
    sop_class: str,
    sop_instance: str,
    context: tuple[str, str] | None = None,
) -> StoreResponse:
    """Send a C-STORE whose request UIDs and data set bytes are exactly what the test says.

    pynetdicom as an SCU refuses over-long UIDs and derives the request UIDs from the data set;
    this builds the primitive itself so the receiver really gets mismatched or invalid values.
    ``context`` (abstract syntax, transfer syntax) picks the presentation context; by default
    the one for ``sop_class`` in Explicit VR Little Endian.
    """
    abstract, ts = context or (sop_class, "1.2.840.10008.1.2.1")
    cx = next(
        (c for c in assoc.accepted_contexts if c.abstract_syntax == abstract and c.transfer_syntax[0] == ts),
        None,
    )
    assert cx is not None, f"no accepted context for {abstract} in {ts}"
    req = C_STORE()
    req.MessageID = next(_message_ids) % 0xFFFF or 1
    req.Priority = 2
    # The public setters validate; the private fields are what the message is built from.
    req._affected_sop_class_uid = UID(sop_class)
    req._affected_sop_instance_uid = UID(sop_instance)
    req.DataSet = io.BytesIO(data)
    pause_reactor(assoc)  # as Association.send_c_store does, but without its race (see pause_reactor)
    try:
        # The response echoes the request's UID; let our own pynetdicom decode it whatever it is.
        with warnings.catch_warnings(), lenient_uids():
            warnings.simplefilter("ignore", UserWarning)
            assert cx.context_id is not None
            assoc.dimse.send_msg(req, cx.context_id)
            _cx_id, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return StoreResponse(None)
    status = getattr(rsp, "Status", None)
    return StoreResponse(None if status is None else int(status), str(getattr(rsp, "ErrorComment", "") or ""))


def pause_reactor(assoc: Association) -> None:
    """Stop the association's reactor thread from taking messages off the DIMSE queue.

    pynetdicom's send_* methods clear the reactor checkpoint and wait for ``_is_paused``; right
    after a previous send that flag is still set from the last pause although the reactor was just
    woken, so it can take the next response off the queue ("unexpected service message") and the
    caller waits for its DIMSE timeout. Waiting until the reactor really blocks on the checkpoint
    (an un-notified waiter) closes that window; the send_* method then finds it paused.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + 10
    while not (assoc._is_paused and checkpoint._cond._waiters):  # type: ignore[attr-defined]
        if not assoc.is_alive() or time.monotonic() > deadline:
            return  # no reactor to pause (association ended); the send fails on its own
        time.sleep(0.0001)


def echo_on(assoc: Association) -> int | None:
    """C-ECHO on an existing association (proves it survived what was sent before)."""
    pause_reactor(assoc)
    rsp = assoc.send_c_echo()
    return int(rsp.Status) if "Status" in rsp else None


def echo_status(
    port: int, *, host: str = "127.0.0.1", called_ae: str = DEFAULT_AE, timeout: float = 5.0, **kwargs: Any
) -> int | None:
    """C-ECHO status, or None when no association could be established."""
    assoc = associate(port, called_ae=called_ae, host=host, timeout=timeout, **kwargs)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


# -- the service ----------------------------------------------------------------------------------


@dataclass
class Service:
    """A ``pacs-triage serve`` subprocess with its environment, data directory and log."""

    home: Path
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]
    database_url: str
    spool: Path
    ae_title: str = DEFAULT_AE
    tls_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def peer(self) -> Peer:
        return Peer(self.ae_title, "127.0.0.1", self.port)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def echo(self, timeout: float = 5.0) -> int | None:
        return echo_status(self.port, called_ae=self.ae_title, timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = READY_DEADLINE_S) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"pacs-triage serve exited with {self.process.returncode} before it was ready:\n"
                    + self.log_text()[-4000:]
                )
            return self.echo(timeout=2.0) == 0

        try:
            wait_until(ready, timeout=timeout, what=f"pacs-triage on port {self.port} to answer C-ECHO")
        except AssertionError:
            self.kill9()
            raise

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill9(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=30)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``pacs-triage ARGS`` with the service's configuration (same environment)."""
        return run_cli(*args, env=self.env, timeout=timeout)

    def status_json(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def spool_view(self) -> Path:
        """The spool as the service sees it (through /proc when it runs in its own mount namespace)."""
        if self.alive():
            return Path(f"/proc/{self.pid}/root") / self.spool.relative_to("/")
        return self.spool


def start_service(
    workdir: Path,
    *,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    config: Path | None = None,
    prefix: Sequence[str] = (),
    port: int | None = None,
    home: Path | None = None,
    spool: Path | None = None,
    ae_title: str = DEFAULT_AE,
    tls_port: int | None = None,
    wait: bool = True,
    name: str = "service",
) -> Service:
    """Start ``pacs-triage serve`` (optionally under a ``prefix`` such as ``unshare ...``)."""
    home = home or workdir / "home"
    port = port or free_port()
    database_url = database_url or f"sqlite:///{home / 'pacs-triage.db'}"
    settings = {
        "PACS_TRIAGE_HOME": str(home),
        "PACS_TRIAGE_PORT": str(port),
        "PACS_TRIAGE_DATABASE_URL": database_url,
        "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
        "PACS_TRIAGE_LOGGING__LEVEL": "INFO",
        # Receiver tests need no analysis workers (each would import the ML stack on 2 cores).
        "PACS_TRIAGE_WORKERS__COUNT": "0",
    }
    if spool is not None:
        settings["PACS_TRIAGE_STORAGE__SPOOL_DIR"] = str(spool)
    if ae_title != DEFAULT_AE:
        settings["PACS_TRIAGE_AE_TITLE"] = ae_title
    settings.update(env or {})
    full_env = clean_env(settings)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}-{port}-{time.monotonic_ns()}.log"
    args = [*prefix, *cli_command(), "serve"]
    if config is not None:
        args += ["--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    service = Service(
        home=home,
        port=port,
        env=full_env,
        log_path=log_path,
        process=process,
        database_url=database_url,
        spool=spool or home / "spool",
        ae_title=ae_title,
        tls_port=tls_port,
    )
    if wait:
        service.wait_ready()
    return service


@dataclass
class ServiceFactory:
    """Starts services for one test and makes sure none outlives it."""

    workdir: Path
    database_url: str | None = None
    started: list[Service] = field(default_factory=list)

    def __call__(self, **kwargs: Any) -> Service:
        kwargs.setdefault("database_url", self.database_url)
        service = start_service(self.workdir, **kwargs)
        self.started.append(service)
        return service

    def cleanup(self) -> None:
        for service in self.started:
            if service.alive():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.stop(timeout=15)
            service.kill9()


class InProcessService:
    """``daemon.service.serve`` in a thread (fast start; shares pynetdicom's globals with the test)."""

    def __init__(self, workdir: Path, database_url: str | None = None, **settings: str) -> None:
        from daemon.config import load_config

        self.home = workdir / "home"
        self.port = free_port()
        environ = clean_env(
            {
                "PACS_TRIAGE_HOME": str(self.home),
                "PACS_TRIAGE_PORT": str(self.port),
                "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
                "PACS_TRIAGE_WORKERS__COUNT": "0",
                **({"PACS_TRIAGE_DATABASE_URL": database_url} if database_url else {}),
                **settings,
            }
        )
        self.config = load_config(environ=environ)
        self.database_url = self.config.effective_database_url
        self.spool = self.config.spool_dir
        self.ae_title = self.config.ae_title
        self.ready = threading.Event()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pacs-triage-serve", daemon=True)

    def _run(self) -> None:
        from daemon.service import serve

        try:
            serve(self.config, ready=self.ready, stop=self.stop_event)
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc

    @property
    def peer(self) -> Peer:
        return Peer(self.ae_title, "127.0.0.1", self.port)

    def start(self, timeout: float = READY_DEADLINE_S) -> InProcessService:
        self.thread.start()
        wait_until(
            lambda: self.ready.is_set() or self.error is not None,
            timeout=timeout,
            what="the in-process receiver to start",
        )
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the in-process receiver did not stop"
        if self.error is not None:
            raise self.error


# -- what was stored ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str
    size_bytes: int
    sha256: str
    calling_ae: str
    source_address: str
    replaced_count: int
    series_changed: bool


def stored_instances(database_url: str) -> dict[str, StoredInstance]:
    """Every instance row (joined with its series and study), by SOP Instance UID."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.sop_class_uid,
                    Instance.transfer_syntax_uid,
                    Series.series_instance_uid,
                    Study.study_instance_uid,
                    Instance.path,
                    Instance.size_bytes,
                    Instance.sha256,
                    Instance.calling_ae,
                    Instance.source_address,
                    Instance.replaced_count,
                    Series.changed,
                )
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
            ).all()
    finally:
        engine.dispose()
    result: dict[str, StoredInstance] = {}
    for row in rows:
        item = StoredInstance(*row)  # type: ignore[call-arg]  # the columns, in field order
        assert item.sop_instance_uid not in result, f"{item.sop_instance_uid} recorded twice"
        result[item.sop_instance_uid] = item
    return result


def events(database_url: str) -> list[tuple[str, str, str, str]]:
    """(entity, entity_id, kind, detail) of every audit row, oldest first."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Event.entity, Event.entity_id, Event.kind, Event.detail).order_by(Event.id)
            )
            return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]
    finally:
        engine.dispose()


def spool_objects(spool: Path) -> dict[str, Path]:
    """Files of record under ``spool/objects``, keyed by their path relative to the spool."""
    objects = spool / "objects"
    if not objects.exists():
        return {}
    return {p.relative_to(spool).as_posix(): p for p in objects.rglob("*") if p.is_file()}


def spool_temp_files(spool: Path) -> list[Path]:
    tmp = spool / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def assert_spool_consistent(spool: Path, database_url: str) -> dict[str, StoredInstance]:
    """Every row points at a readable file with its size and sha256, every file has a row, no temp files."""
    rows = stored_instances(database_url)
    files = spool_objects(spool)
    assert spool_temp_files(spool) == [], f"temp files left in {spool / 'tmp'}"
    assert set(files) == {r.path for r in rows.values()}, (
        f"spool files without rows: {sorted(set(files) - {r.path for r in rows.values()})}; "
        f"rows without files: {sorted({r.path for r in rows.values()} - set(files))}"
    )
    for row in rows.values():
        path = files[row.path]
        assert path.stat().st_size == row.size_bytes, row
        assert sha256_file(path) == row.sha256, row
        ds = read_quietly(path)
        assert ds.SOPInstanceUID == row.sop_instance_uid
    return rows


@contextlib.contextmanager
def lenient_uids() -> Iterator[None]:
    """Let this process's pynetdicom build and decode DIMSE messages with any UID (even > 64 chars)."""
    from pynetdicom import _config

    with pynetdicom_config(VALIDATORS={**_config.VALIDATORS, "UI": lambda _value: (True, "")}):
        yield


@contextlib.contextmanager
def pynetdicom_config(**values: Any) -> Iterator[None]:
    """Flip pynetdicom's module-level switches for the block only (they are process-global)."""
    from pynetdicom import _config

    saved = {k: getattr(_config, k) for k in values}
    for key, value in values.items():
        setattr(_config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(_config, key, value)
