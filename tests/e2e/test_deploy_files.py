"""deploy/ stays consistent with itself and with the code: the files a site copies must work together.

(No Docker engine runs the compose file here; ``test_deploy_orthanc.py`` runs its Orthanc
configuration and auto-routing script in a real Orthanc.)
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import re

from daemon.config import load_config
from tests.support.process import REPO

DEPLOY = REPO / "deploy"


def test_the_compose_configuration_loads_and_lets_orthanc_in() -> None:
    compose = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    config = load_config(
        DEPLOY / "pacs-triage.compose.toml",
        environ={
            "PACS_TRIAGE_DATABASE_URL": "postgresql://pacs_triage:x@postgres:5432/pacs_triage",
            "PACS_TRIAGE_DESTINATION": "ORTHANC@orthanc:4242",
        },
    )
    subnet = ipaddress.ip_network(re.search(r"subnet: ([0-9./]+)", compose).group(1))  # type: ignore[union-attr]
    orthanc_ip = ipaddress.ip_address(re.search(r"ipv4_address: ([0-9.]+)", compose).group(1))  # type: ignore[union-attr]
    orthanc = json.loads((DEPLOY / "orthanc.json").read_text(encoding="utf-8"))

    assert orthanc_ip in subnet
    allowed = [a for a in config.access.allow if a.ae_title == orthanc["DicomAet"]]
    assert allowed and orthanc_ip in ipaddress.ip_network(allowed[0].network), config.access.allow
    ae, host, port = orthanc["DicomModalities"]["pacs-triage"]
    assert (ae, host, port) == (config.ae_title, "pacs-triage", config.port)
    assert f"ORTHANC@orthanc:{orthanc['DicomPort']}" in compose  # results go back to Orthanc
    assert [(r.pipeline, r.modality) for r in config.routing.rules] == [("demo", ("CT",))]
    assert config.workers.count == 0  # the compose `worker` service analyses
    for service in ("postgres:", "orthanc:", "pacs-triage:", "worker:"):
        assert f"\n  {service}" in compose, service
    assert "./orthanc.json:/etc/orthanc/orthanc.json:ro" in compose
    assert "./orthanc-autoroute.lua:/etc/orthanc/autoroute.lua:ro" in compose


def test_systemd_units_run_as_a_dedicated_user_and_restart_on_failure() -> None:
    for name, command in (("pacs-triage.service", "serve"), ("pacs-triage-worker.service", "worker")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string((DEPLOY / name).read_text(encoding="utf-8"))
        service = unit["Service"]
        assert service["User"] == "pacs-triage" and service["Restart"] == "on-failure", name
        assert f"pacs-triage {command} " in service["ExecStart"], name


def test_the_images_install_cpu_or_cuda_torch_before_the_project() -> None:
    for name, index in (("Dockerfile", "whl/cpu"), ("Dockerfile.cuda", "whl/cu")):
        text = (DEPLOY / name).read_text(encoding="utf-8")
        assert text.splitlines()[[line.startswith("FROM") for line in text.splitlines()].index(True)] == (
            "FROM python:3.11-slim"
        )
        assert f"https://download.pytorch.org/{index}" in text
        assert text.index('pip install "torch==') < text.index("RUN pip install .")
