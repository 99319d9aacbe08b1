"""Real peers on loopback: free ports, dcmtk tools, and the rule that a missing peer fails in CI.

In CI (``CI=true``) a test whose real peer is missing fails instead of skipping."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import pytest

from tests.support.dicom_bytes import DEFAULT_AE, transfer_syntax_of
from tests.support.process import clean_env


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


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_peer(available: bool, what: str) -> None:
    """Skip locally, fail in CI, when a real peer the test needs is missing."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"required peer missing in CI: {what}")
    pytest.skip(f"peer missing: {what}")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need_peer(path is not None, f"command {name!r} (install the Debian package listed in .ci/run)")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
