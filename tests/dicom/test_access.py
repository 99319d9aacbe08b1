"""Who may associate: loopback by default, an allow-list (AE title + network) for others, called AE checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from daemon.dicom.scu import send_files
from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate, echo_status
from tests.support.peers import need_dcmtk, need_peer, storescu
from tests.support.process import REPO, clean_env
from tests.support.service import ServiceFactory
from tests.support.stored import stored_instances

SLICE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_01.dcm"


def test_unknown_calling_ae_from_loopback_is_accepted(sqlite_services: ServiceFactory) -> None:
    svc = sqlite_services()
    assert echo_status(svc.port, calling_ae="NEVER_HEARD_OF") == 0
    (result,) = send_files(svc.peer, [SLICE], calling_ae="NEVER_HEARD_OF")
    assert result.status == 0
    (row,) = stored_instances(svc.database_url).values()
    assert (row.calling_ae, row.source_address) == ("NEVER_HEARD_OF", "127.0.0.1")


def test_wrong_called_ae_is_rejected(sqlite_services: ServiceFactory) -> None:
    svc = sqlite_services()
    assoc = associate(svc.port, called_ae="NOT_PACS_TRIAGE")
    assert assoc.is_rejected and not assoc.is_established
    rj = assoc.acceptor.primitive
    assert rj is not None
    # A-ASSOCIATE-RJ: rejected-permanent, by the service user, called AE title not recognised.
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)

    out = svc.cli("echo", f"NOT_PACS_TRIAGE@127.0.0.1:{svc.port}")
    assert out.returncode == 1 and "rejected the association" in out.stderr

    need_dcmtk("storescu")
    out = storescu(svc.port, [SLICE], called_ae="NOT_PACS_TRIAGE")
    assert out.returncode != 0
    assert "reject" in (out.stdout + out.stderr).lower()
    assert stored_instances(svc.database_url) == {}
    assert svc.echo() == 0


def test_non_loopback_peers_need_an_allow_list_entry(tmp_path: Path) -> None:
    """In a private network namespace: a peer at 198.18.0.1 is accepted only with a matching entry."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    need_peer(
        os.geteuid() == 0 and unshare is not None and ip is not None,
        "root with unshare and ip (util-linux, iproute2) for a private network namespace",
    )
    setup = (
        # (no dummy/veth modules in every container: the non-loopback address goes on lo)
        'set -e; ip link set lo up; ip addr add 198.18.0.1/32 dev lo; exec "$@"'
    )
    out = subprocess.run(
        [
            str(unshare),
            "--net",
            "sh",
            "-c",
            setup,
            "sh",
            sys.executable,
            "-m",
            "tests.dicom.netns_probe",
            str(tmp_path),
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert results["allowed"] == {"established": True, "rejected": False, "store": 0}
    # rejected-permanent by the service user, calling AE title not recognised (PS3.8 9.3.4)
    refused = {"established": False, "rejected": True, "reject": [1, 1, 3]}
    assert results["unknown_ae"] == refused
    assert results["wrong_network"] == refused
    assert results["loopback_any_ae"] == {"established": True, "rejected": False, "store": 0}
    assert report["exit_code"] == 0
    (row,) = stored_instances(report["db"]).values()
    assert (row.calling_ae, row.source_address) == ("ALLOWED_AE", "198.18.0.1")
