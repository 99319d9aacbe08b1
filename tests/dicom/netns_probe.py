"""Run inside a private network namespace by test_access.py: a receiver and non-loopback peers.

The namespace's ``lo`` also carries PEER_ADDRESS, so a connection from
PEER_ADDRESS to PEER_ADDRESS reaches the receiver from a non-loopback source address without
any traffic leaving the namespace. Prints one JSON object with the outcome of each probe.

    python -m tests.dicom.netns_probe WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate
from tests.support.service import start_service

PEER_ADDRESS = "198.18.0.1"  # RFC 2544 benchmarking range: never a real peer
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SLICE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_01.dcm"

CONFIG = """
[[access.allow]]
ae_title = "ALLOWED_AE"
network = "198.18.0.0/15"

[[access.allow]]
ae_title = "OTHER_NET_AE"
network = "10.0.0.0/8"
"""


def probe(port: int, calling_ae: str, source: str) -> dict[str, Any]:
    assoc = associate(
        port, [(CT_IMAGE, EXPLICIT_LE)], calling_ae=calling_ae, host=source, bind_address=(source, 0)
    )
    outcome: dict[str, Any] = {"established": assoc.is_established, "rejected": assoc.is_rejected}
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        rj = assoc.acceptor.primitive
        outcome["reject"] = [rj.result, rj.result_source, rj.diagnostic]
    if assoc.is_established:
        outcome["store"] = int(assoc.send_c_store(SLICE).Status)
        assoc.release()
    return outcome


def main(workdir: Path) -> None:
    config = workdir / "access.toml"
    config.write_text(CONFIG)
    service = start_service(workdir, config=config)  # bind 0.0.0.0 (default); ready via loopback
    try:
        results = {
            "allowed": probe(service.port, "ALLOWED_AE", PEER_ADDRESS),
            "unknown_ae": probe(service.port, "STRANGER_AE", PEER_ADDRESS),
            "wrong_network": probe(service.port, "OTHER_NET_AE", PEER_ADDRESS),
            "loopback_any_ae": probe(service.port, "STRANGER_AE", "127.0.0.1"),
        }
    finally:
        results_code = service.stop()
    print(json.dumps({"results": results, "exit_code": results_code, "db": service.database_url}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
