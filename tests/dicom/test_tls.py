"""DICOM TLS (PS3.15 B.1) on its own port, client certificates required; the plain port keeps working."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.dicom.scu import Peer, TlsClient, echo, send_files
from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate, read_quietly
from tests.support.peers import free_port
from tests.support.pki import Pki
from tests.support.service import Service, start_service
from tests.support.stored import stored_instances

SLICE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_02.dcm"


@pytest.fixture(scope="module")
def tls_service(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("tls-service")
    tls_port = free_port()
    config = workdir / "tls.toml"
    config.write_text(
        f"""
[tls]
enabled = true
port = {tls_port}
certificate = "{pki.server_cert}"
private_key = "{pki.server_key}"
ca_certificates = "{pki.ca}"
require_client_certificate = true
"""
    )
    svc = start_service(workdir, config=config, tls_port=tls_port)
    yield svc
    assert svc.stop() == 0
    svc.kill9()


def tls_args(pki: Pki) -> list[str]:
    return ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]


def tls_peer(service: Service) -> str:
    assert service.tls_port is not None
    return f"{service.ae_title}@127.0.0.1:{service.tls_port}"


def test_cli_echo_and_send_with_a_trusted_client_certificate(tls_service: Service, pki: Pki) -> None:
    out = tls_service.cli("echo", *tls_args(pki), tls_peer(tls_service))
    assert out.returncode == 0, out.stderr
    assert "success" in out.stdout
    out = tls_service.cli(
        "send", "--calling-ae", "TLS_SCU", *tls_args(pki), tls_peer(tls_service), str(SLICE)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    uid = str(read_quietly(SLICE, stop_before_pixels=True).SOPInstanceUID)
    row = stored_instances(tls_service.database_url)[uid]
    assert (row.calling_ae, row.source_address) == ("TLS_SCU", "127.0.0.1")


def test_cli_refused_without_or_with_an_untrusted_client_certificate(tls_service: Service, pki: Pki) -> None:
    out = tls_service.cli("echo", "--tls-ca", str(pki.ca), "--timeout", "10", tls_peer(tls_service))
    assert out.returncode == 1, out.stdout
    assert "could not associate" in out.stderr, out.stderr
    out = tls_service.cli(
        "echo",
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.rogue_cert),
        "--tls-key",
        str(pki.rogue_key),
        "--timeout",
        "10",
        tls_peer(tls_service),
    )
    assert out.returncode == 1, out.stdout
    assert "could not associate" in out.stderr, out.stderr
    assert tls_service.alive() and tls_service.echo() == 0


def _context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.mark.parametrize(("who", "accepted"), [("client", True), ("none", False), ("rogue", False)])
def test_pynetdicom_tls_association(tls_service: Service, pki: Pki, who: str, accepted: bool) -> None:
    cert, key = {
        "client": (pki.client_cert, pki.client_key),
        "none": (None, None),
        "rogue": (pki.rogue_cert, pki.rogue_key),
    }[who]
    assert tls_service.tls_port is not None
    assoc = associate(tls_service.tls_port, tls_args=(_context(pki, cert, key), "127.0.0.1"), timeout=10)
    try:
        assert assoc.is_established == accepted
        if accepted:
            assert assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def test_scu_api_tls_and_the_plain_port(tls_service: Service, pki: Pki) -> None:
    assert tls_service.tls_port is not None
    client = TlsClient(ca_certificates=pki.ca, certificate=pki.client_cert, private_key=pki.client_key)
    assert echo(Peer(tls_service.ae_title, "127.0.0.1", tls_service.tls_port), tls=client, timeout=10) == 0
    (result,) = send_files(Peer(tls_service.ae_title, "127.0.0.1", tls_service.tls_port), [SLICE], tls=client)
    assert result.ok
    # The plain port still serves plain DICOM; a plain client gets nowhere on the TLS port.
    assert tls_service.echo() == 0
    assert associate(tls_service.tls_port, timeout=5).is_established is False
