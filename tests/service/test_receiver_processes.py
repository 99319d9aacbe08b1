"""``dicom.receivers = 2``: two receiver processes on one port (SO_REUSEPORT), supervised by serve.

Real ``pacs-triage serve`` subprocesses, real associations from dcmtk's storescu, SQLite and
PostgreSQL: concurrent associations (which the kernel spreads over the processes) record every
instance once; SIGTERM stops every process cleanly; a dead receiver is restarted; ``kill -9`` of serve
leaves no receiver holding the port; a port already served is refused, not shared; the receivers
stay up (same PIDs) while nothing kills them, after a restart too.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.paths import TESTDATA
from tests.support.peers import need_dcmtk
from tests.support.process import wait_until
from tests.support.service import Service, ServiceFactory, start_service
from tests.support.stored import assert_spool_consistent

pytestmark = pytest.mark.peer

RECEIVERS = {"PACS_TRIAGE_DICOM__RECEIVERS": "2", "PACS_TRIAGE_WORKERS__COUNT": "0"}
TEMPLATE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_01.dcm"


@pytest.fixture
def services(tmp_path: Path, database_url: str) -> Iterator[ServiceFactory]:
    factory = ServiceFactory(tmp_path, database_url)
    yield factory
    factory.cleanup()


@pytest.fixture
def sqlite_services(tmp_path: Path) -> Iterator[ServiceFactory]:
    factory = ServiceFactory(tmp_path)
    yield factory
    factory.cleanup()


def receiver_pids(service: Service) -> list[int]:
    """The receiver processes: serve's children that run multiprocessing's spawn_main."""
    pids = []
    for child in psutil.Process(service.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # a zombie not reaped yet, or gone
            continue
    return pids


# Long enough for several supervision rounds (serve checks its children every second; the crash
# loop of issue 11 item 14 replaced a receiver every ~3 s), short enough for a test.
STABLE_WINDOW_S = 15.0


def assert_pids_stay(service: Service, pids: list[int], *, window: float) -> None:
    """Poll serve's receiver children until ``window`` has passed; fail at the first change."""
    deadline = time.monotonic() + window

    def unchanged_until_the_window_ends() -> bool:
        assert service.alive(), service.log_text()[-3000:]
        now = receiver_pids(service)
        assert sorted(now) == sorted(pids), f"receiver processes changed from {pids} to {now}"
        return time.monotonic() >= deadline

    wait_until(
        unchanged_until_the_window_ends, timeout=window + 30, what="the observation window", interval=0.2
    )


def small_instances(directory: Path, count: int) -> list[Path]:
    directory.mkdir()
    ds = dcmread(TEMPLATE)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 16
    ds.PixelData = bytes(16 * 16 * 2)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = directory / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_concurrently(service: Service, files: list[Path], associations: int) -> None:
    need_dcmtk("storescu")
    parts = [files[i::associations] for i in range(associations)]
    cmd = [need_dcmtk("storescu"), "-aet", "MP_SCU", "-aec", service.ae_title, "127.0.0.1", str(service.port)]
    procs = [subprocess.Popen([*cmd, *map(str, part)]) for part in parts]
    assert [p.wait(timeout=180) for p in procs] == [0] * associations


def test_concurrent_associations_on_two_receivers_record_each_instance_once(
    services: ServiceFactory, tmp_path: Path
) -> None:
    service = services(env=RECEIVERS)
    assert len(receiver_pids(service)) == 2
    files = small_instances(tmp_path / "in", 48)
    send_concurrently(service, files, associations=8)
    rows = assert_spool_consistent(service.spool, service.database_url)
    assert len(rows) == 48
    assert service.status_json()["instances"] == 48
    assert service.log_text().count("accepted from MP_SCU") == 8  # spread by the kernel's hash
    assert service.stop() == 0
    assert "receiver 0: SIGTERM received" in service.log_text()
    assert "receiver 1: SIGTERM received" in service.log_text()


def test_sigterm_stops_every_receiver(sqlite_services: ServiceFactory) -> None:
    service = sqlite_services(env=RECEIVERS)
    pids = receiver_pids(service)
    assert service.stop() == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_dead_receiver_is_restarted(sqlite_services: ServiceFactory, tmp_path: Path) -> None:
    service = sqlite_services(env=RECEIVERS)
    victim = receiver_pids(service)[0]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    wait_until(
        lambda: len(set(receiver_pids(service)) - {victim}) == 2, timeout=60, what="a replacement receiver"
    )
    wait_until(lambda: "restarting it" in service.log_text(), timeout=10, what="the restart to be logged")
    files = small_instances(tmp_path / "in", 12)
    send_concurrently(service, files, associations=4)
    assert service.status_json()["instances"] == 12


def test_kill_9_of_serve_takes_the_receivers_with_it(tmp_path: Path) -> None:
    first = start_service(tmp_path / "a", env=RECEIVERS)
    pids = receiver_pids(first)
    first.kill9()
    wait_until(
        lambda: all(
            not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids
        ),
        timeout=10,
        what="the receivers to die with serve",
    )
    # The port is free again: a new serve takes it.
    second = start_service(tmp_path / "a", env=RECEIVERS, port=first.port, home=first.home)
    try:
        assert second.echo() == 0
    finally:
        second.stop()


def test_a_port_already_served_is_refused_not_shared(sqlite_services: ServiceFactory, tmp_path: Path) -> None:
    service = sqlite_services(env=RECEIVERS)
    intruder = start_service(tmp_path / "b", env=RECEIVERS, port=service.port, wait=False)
    assert intruder.process.wait(timeout=120) == 1
    assert "Address already in use" in intruder.log_text()
    assert service.echo() == 0


def test_receivers_keep_their_pids_before_and_after_a_restart(
    sqlite_services: ServiceFactory, tmp_path: Path
) -> None:
    """Issue 11 item 14: with receivers > 1 a restarted child died again every ~3 s (BrokenPipeError)."""
    service = sqlite_services(env=RECEIVERS)
    first = receiver_pids(service)
    assert len(first) == 2
    assert_pids_stay(service, first, window=STABLE_WINDOW_S)
    victim, survivor = first
    psutil.Process(victim).send_signal(signal.SIGKILL)

    def replacement() -> list[int] | None:
        pids = receiver_pids(service)
        return pids if len(set(pids) - {victim}) == 2 else None

    replaced = wait_until(replacement, timeout=60, what="a replacement receiver")
    assert survivor in replaced
    assert_pids_stay(service, replaced, window=STABLE_WINDOW_S)
    files = small_instances(tmp_path / "in", 12)
    send_concurrently(service, files, associations=4)
    assert service.status_json()["instances"] == 12
    assert receiver_pids(service) == replaced, "the receivers stayed up while receiving"
    restarts = [
        line
        for line in service.log_text().splitlines()
        if "receiver process" in line and "restarting it" in line
    ]
    assert len(restarts) == 1, service.log_text()[-3000:]
    assert "BrokenPipeError" not in service.log_text()
