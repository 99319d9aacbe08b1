"""A throw-away PKI for DICOM TLS tests (PS3.15 B.1): a CA, server and client certificates, and a
client certificate from a CA the server does not trust. Made with the real openssl command."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.peers import need_tool


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by a CA the server does not trust
    rogue_key: Path


def _openssl(command: str, cwd: Path) -> None:
    subprocess.run(
        [need_tool("openssl"), *command.split()], cwd=cwd, check=True, capture_output=True, timeout=60
    )


EC_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def _ca(name: str, d: Path) -> None:
    _openssl(
        f"req -x509 {EC_KEY} -keyout {name}.key -out {name}.pem -days 2 -subj /CN={name} "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign",
        d,
    )


def _leaf(name: str, ca: str, extensions: str, d: Path) -> None:
    _openssl(f"req {EC_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}", d)
    (d / f"{name}.ext").write_text(extensions)
    _openssl(
        f"x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {name}.pem -days 2 "
        f"-extfile {name}.ext",
        d,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca("test-ca", d)
    _ca("rogue-ca", d)
    _leaf("server", "test-ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", d)
    _leaf("client", "test-ca", "extendedKeyUsage=clientAuth\n", d)
    _leaf("rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n", d)
    return Pki(
        ca=d / "test-ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        rogue_cert=d / "rogue.pem",
        rogue_key=d / "rogue.key",
    )
