"""HL7 over MLLP with TLS and FHIR over HTTPS: the destination's CA verifies the peer, its client
certificate is offered; a peer we cannot verify is a failed send (retried), our own TLS files
missing is dead at once naming the key. Real openssl PKI (tests/support/pki.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from daemon.config import DestinationConfig
from daemon.delivery import registry
from daemon.delivery.base import Destination, Outgoing, Permanent, Transient
from tests.support.fhir_peer import TOKEN, FhirPeer
from tests.support.hl7_peer import MllpPeer
from tests.support.pki import Pki
from tests.support.result_sr import write_result_sr


def server_context(pki: Pki, *, client_certificates: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED if client_certificates else ssl.CERT_NONE
    return context


def _tls(pki: Pki, **extra: object) -> dict[str, object]:
    return {
        "tls": True,
        "ca_certificates": str(pki.ca),
        "certificate": str(pki.client_cert),
        "private_key": str(pki.client_key),
        **extra,
    }


def test_hl7_over_tls_with_client_certificates(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "sr.dcm"
    write_result_sr(path)
    item = Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="hl7_oru")
    peer = MllpPeer(tls=server_context(pki, client_certificates=True))

    def ris(**settings: object) -> Destination:
        config = {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": peer.port, "timeout_seconds": 5}
        return registry.build(DestinationConfig.model_validate({**config, **settings}), calling_ae="X")

    with peer.running():
        good = ris(**_tls(pki))
        assert str(good) == f"mllps://127.0.0.1:{peer.port}"
        good.check()
        assert good.send(item).status == 0
        untrusted = ris(tls=True)  # the system CAs do not know the test CA
        with pytest.raises(Transient, match="certificate verify failed"):
            untrusted.send(item)
        missing = ris(**_tls(pki, private_key=str(tmp_path / "nope.key")))
        with pytest.raises(Permanent, match="private_key .*nope.key is missing or unreadable"):
            missing.send(item)
    assert len(peer.messages()) == 1 and peer.messages()[0].problems == ""


def test_fhir_over_https(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "sr.dcm"
    write_result_sr(path)
    item = Outgoing(delivery_id=1, sop_instance_uid="x", path=path, content="fhir")
    peer = FhirPeer(tls=server_context(pki, client_certificates=True))
    assert peer.url.startswith("https://")

    def fhir(**settings: object) -> Destination:
        config = {"name": "fhir", "kind": "fhir", "url": peer.url, "token": TOKEN, "timeout_seconds": 5}
        return registry.build(DestinationConfig.model_validate({**config, **settings}), calling_ae="X")

    with peer.running():
        good = fhir(**_tls(pki))
        good.check()
        assert good.send(item).status == 200
        with pytest.raises(Transient, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            fhir().send(item)
    assert len(peer.posts) == 1 and peer.problems == []
