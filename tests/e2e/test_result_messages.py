"""A real ``pacs-triage serve`` (echo pipeline) with an HL7 and a FHIR destination: a study received
over DICOM gives exactly one ORU^R01, one order update and one FHIR Bundle, shown as delivered by
``pacs-triage deliveries list`` (issue 13 items 11-13)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.support.dicom_bytes import associate, dataset_bytes, raw_c_store
from tests.support.fhir_peer import TOKEN, FhirPeer
from tests.support.hl7_peer import MllpPeer
from tests.support.process import wait_until
from tests.support.queue_db import ct_series
from tests.support.service import ServiceFactory


def _config(path: Path, ris: MllpPeer, fhir: FhirPeer) -> Path:
    path.write_text(
        f"""
[completion]
quiet_seconds = 1
idle_timeout_seconds = 5
sweep_interval_seconds = 0.5

[dispatch]
poll_seconds = 0.2

[[routing.rules]]
name = "all"
pipeline = "echo"
destinations = ["ris", "fhir"]

[[routing.rules.send]]
destination = "ris"
receives = ["hl7_oru", "hl7_priority"]

[[destinations]]
name = "ris"
kind = "hl7"
host = "127.0.0.1"
port = {ris.port}
receiving_application = "RIS"
timeout_seconds = 10

[[destinations]]
name = "fhir"
kind = "fhir"
url = "{fhir.url}"
token = "{TOKEN}"
timeout_seconds = 10
"""
    )
    return path


def test_serve_sends_one_oru_one_order_update_and_one_bundle(
    tmp_path: Path, services: ServiceFactory
) -> None:
    ris, fhir = MllpPeer(), FhirPeer()
    with ris.running(), fhir.running():
        service = services(
            config=_config(tmp_path / "pacs-triage.toml", ris, fhir),
            env={"PACS_TRIAGE_WORKERS__COUNT": "1"},
            name="hl7-fhir",
        )
        study = f"2.25.{uuid.uuid4().int}"
        assoc = associate(service.port, [(CTImageStorage, ExplicitVRLittleEndian)])
        assert assoc.is_established
        for path in ct_series(tmp_path / "in", study, f"{study}.1", 3):
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            sent = raw_c_store(assoc, dataset_bytes(path), sop_class=CTImageStorage, sop_instance=uid)
            assert sent.status == 0
        assoc.release()

        def listed() -> list[dict[str, object]]:
            out = service.cli("deliveries", "list", "--json")
            assert out.returncode == 0, out.stderr
            rows: list[dict[str, object]] = json.loads(out.stdout)
            return rows

        wait_until(
            lambda: len(listed()) == 3 and all(d["state"] == "delivered" for d in listed()),
            timeout=180,
            what="the ORU, the order update and the Bundle to be delivered",
            interval=1.0,
        )
        rows = listed()
        assert sorted(str(d["content"]) for d in rows) == ["fhir", "hl7_oru", "hl7_priority"]
        text = service.cli("deliveries", "list").stdout
        assert "hl7_oru" in text and "AA" in text and "HTTP 200" in text
    oru = ris.messages("ORU")
    assert len(oru) == 1 and oru[0].problems == ""
    (obx_study,) = [o for o in oru[0].segments("OBX") if o[3].startswith("113014^")]
    assert obx_study[5] == study
    assert len(ris.messages("OMI")) == 1 and ris.messages("OMI")[0].problems == ""
    assert len(fhir.posts) == 1 and fhir.problems == []
    (report,) = fhir.resources("DiagnosticReport")
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
