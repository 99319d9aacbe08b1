"""Fixtures for receiver tests: a real ``pacs-triage serve`` per test, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.paths import TESTDATA
from tests.support.service import InProcessService, Service, ServiceFactory


@pytest.fixture
def services(tmp_path: Path, database_url: str) -> Iterator[ServiceFactory]:
    """Start ``pacs-triage serve`` subprocesses on the parametrised database; all stopped afterwards."""
    factory = ServiceFactory(tmp_path, database_url)
    yield factory
    factory.cleanup()


@pytest.fixture
def sqlite_services(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Like ``services`` but SQLite only (for tests about the network or the disk, not the database)."""
    factory = ServiceFactory(tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
def service(services: ServiceFactory) -> Service:
    """One running receiver (loopback, free port, MIN_FREE_BYTES=0) on the parametrised database."""
    return services()


@pytest.fixture
def inproc_service(tmp_path: Path, database_url: str) -> Iterator[InProcessService]:
    """``daemon.service.serve.serve`` in a thread of the test process, on the parametrised database."""
    svc = InProcessService(tmp_path, database_url).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def series64(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 64-instance CT series (~34 MB): a real gantry-tilt slice with new Series/SOP Instance UIDs."""
    source = dcmread(TESTDATA / "ct_series" / "gantry_tilt" / "GE_01.dcm")
    folder = tmp_path_factory.mktemp("series64")
    series_uid = generate_uid(entropy_srcs=["pacs-triage series64"])
    paths = []
    for number in range(1, 65):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["pacs-triage series64", str(number)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
