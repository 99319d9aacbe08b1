"""Disk full -> A700 (PS3.4 B.2.3 "Refused: Out of Resources"), nothing partial visible, service alive.

Two real ways to run out: the configured free-space threshold, and a small tmpfs mounted as the
spool in the service's own mount namespace (root only) that fills up for real: its bytes, or
its inodes (which makes the write itself fail with ENOSPC, past the free-space check).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from daemon.dicom.scu import SendResult, send_files
from tests.paths import TESTDATA
from tests.support.dicom_bytes import dataset_bytes, read_quietly
from tests.support.peers import need_peer
from tests.support.service import Service, ServiceFactory
from tests.support.stored import assert_spool_consistent, spool_objects, spool_temp_files, stored_instances

SERIES = sorted((TESTDATA / "ct_series" / "gantry_tilt").glob("*.dcm"))  # 28 x ~0.5 MB
A700 = 0xA700


def uid_of(path: Path) -> str:
    return str(read_quietly(path, stop_before_pixels=True).SOPInstanceUID)


def send(svc: Service, files: list[Path]) -> list[SendResult]:
    return list(send_files(svc.peer, files, calling_ae="FILLER_SCU"))


def test_free_space_threshold_refuses_with_a700(sqlite_services: ServiceFactory) -> None:
    svc = sqlite_services(env={"PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "1000TB"})
    results = send(svc, SERIES[:3])
    assert [r.status for r in results] == [A700] * 3
    assert results[0].comment.startswith("spool full"), results[0]
    assert stored_instances(svc.database_url) == {}
    assert spool_objects(svc.spool) == {} and spool_temp_files(svc.spool) == []
    assert svc.echo() == 0


def _tmpfs_service(services: ServiceFactory, tmp_path: Path, options: str) -> Service:
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    need_peer(
        os.geteuid() == 0 and unshare is not None and nsenter is not None,
        "root with unshare/nsenter (util-linux) to mount a private tmpfs",
    )
    spool = tmp_path / "spool"
    spool.mkdir()
    mount = f'mount -t tmpfs -o {options} pacs-triage-spool "$0" && exec "$@"'
    prefix = [str(unshare), "--mount", "--propagation", "private", "sh", "-c", mount, str(spool)]
    svc = services(prefix=prefix, spool=spool)
    st = os.statvfs(svc.spool_view())
    assert st.f_blocks * st.f_frsize <= 64 * 2**20, "the spool is not the private tmpfs"
    return svc


def _remount(svc: Service, options: str) -> None:
    subprocess.run(
        ["nsenter", "-t", str(svc.pid), "-m", "mount", "-o", f"remount,{options}", str(svc.spool)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _check(svc: Service, acked: set[str]) -> None:
    """The spool holds exactly the acknowledged instances, whole; no temp files; service alive."""
    rows = assert_spool_consistent(svc.spool_view(), svc.database_url)
    assert set(rows) == acked
    assert svc.echo() == 0


def test_full_tmpfs_refuses_with_a700_and_recovers(sqlite_services: ServiceFactory, tmp_path: Path) -> None:
    svc = _tmpfs_service(sqlite_services, tmp_path, "size=3m")
    filler = svc.spool_view() / "filler.bin"
    filler.write_bytes(b"\0" * 2**20)

    results = send(svc, SERIES)
    acked = {uid_of(r.path) for r in results if r.status == 0}
    refused = [r.path for r in results if r.status == A700]
    assert acked and refused and len(acked) + len(refused) == len(SERIES), [r.status for r in results]
    _check(svc, acked)

    # Space returns (the filler goes): what fits now is stored.
    filler.unlink()
    results = send(svc, refused)
    assert {r.status for r in results} <= {0, A700}
    newly = {uid_of(r.path) for r in results if r.status == 0}
    assert newly, "nothing fitted after 1 MiB was freed"
    acked |= newly
    refused = [r.path for r in results if r.status == A700]
    _check(svc, acked)

    # A bigger disk: everything else goes through, byte for byte.
    _remount(svc, "size=64m")
    results = send(svc, refused)
    assert all(r.status == 0 for r in results), [(r.path.name, r.status, r.comment) for r in results]
    _check(svc, {uid_of(p) for p in SERIES})
    rows = stored_instances(svc.database_url)
    for path in SERIES:
        assert dataset_bytes(svc.spool_view() / rows[uid_of(path)].path) == dataset_bytes(path)


def test_out_of_inodes_fails_the_write_itself(sqlite_services: ServiceFactory, tmp_path: Path) -> None:
    """Plenty of bytes, few inodes: creating the temp file (or a directory) fails with ENOSPC."""
    svc = _tmpfs_service(sqlite_services, tmp_path, "size=64m")
    st = os.statvfs(svc.spool_view())
    # Room for 9 more inodes: three stores of a file plus its two new objects/ab/cd directories.
    _remount(svc, f"nr_inodes={st.f_files - st.f_ffree + 9}")
    results = send(svc, SERIES[:8])
    statuses = [r.status for r in results]
    assert set(statuses) == {0, A700}, statuses
    assert statuses == sorted(s or 0 for s in statuses), "once full, every later store is refused"
    assert all(r.comment.startswith("disk full") for r in results if r.status == A700), results
    acked = {uid_of(r.path) for r in results if r.status == 0}
    _check(svc, acked)

    _remount(svc, "nr_inodes=1000")
    results = send(svc, [r.path for r in results if r.status == A700])
    assert all(r.status == 0 for r in results)
    _check(svc, {uid_of(p) for p in SERIES[:8]})
