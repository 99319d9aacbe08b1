"""A dcmtk ``storescp`` as the destination PACS."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.peers import free_port, need_dcmtk
from tests.support.process import clean_env, wait_until


@dataclass
class Storescp:
    """dcmtk storescp writing what it receives into ``directory``."""

    port: int
    directory: Path
    ae_title: str = "DEST"
    process: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> Storescp:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [need_dcmtk("storescp"), "-od", str(self.directory), "-aet", self.ae_title, str(self.port)],
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        from tests.support.dicom_bytes import echo_status

        wait_until(
            lambda: echo_status(self.port, called_ae=self.ae_title, timeout=2) == 0,
            timeout=20,
            what="storescp to answer C-ECHO",
        )
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file()) if self.directory.exists() else []

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Storescp]:
    """A storescp on a free port, not started yet (tests start it when they want it up)."""
    scp = Storescp(free_port(), tmp_path / "received")
    yield scp
    scp.stop()
