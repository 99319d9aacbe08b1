"""End-to-end fixtures: the trained demo bundles, a real Orthanc, a dcmtk storescp, result checks.

Every test here runs the real product (``pacs-triage serve`` with one worker, the ``demo`` MONAI
pipeline) against a real peer, and validates each SR/SEG that comes back with the real validators
(dciodvfy, dsrdump) and the project's TID 1500 checks.

The demo bundles are the trained, committed ones (``pipeline/demo/bundles``, pinned by its
PINS.json). When they are absent the tests fail and say so. ``PACS_TRIAGE_TEST_DEMO_BUNDLES=DIR``
points the tests at another bundle directory laid out the same way (a developer's training run);
accuracy assertions then judge that bundle."""

from __future__ import annotations

import io
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.findings import AlgorithmInfo, Classification, Finding, Findings
from pipeline.spec import BundleSpec
from pipeline.writers.sr_reader import SrReport, read_sr
from tests.support.dicom_bytes import echo_status
from tests.support.dicom_validators import assert_dciodvfy_clean, assert_dsrdump_ok, roundtrip
from tests.support.peers import free_port, need_tool
from tests.support.process import clean_env, wait_until
from tests.support.storescp import Storescp
from tests.support.tid1500_checks import check_pacs_triage_sr

DEV_BUNDLES_ENV = "PACS_TRIAGE_TEST_DEMO_BUNDLES"


RESULT_DEADLINE_S = 600.0  # CPU inference on 2 shared cores; the tests poll, they never sleep blindly


SR_MODALITY, SEG_MODALITY = "SR", "SEG"


@dataclass(frozen=True)
class DemoBundles:
    """Where the demo bundles are and what their results must carry (TID 4019)."""

    directory: Path
    committed: bool  # the shipped bundles (not a PACS_TRIAGE_TEST_DEMO_BUNDLES override)
    algorithm: AlgorithmInfo  # the segmentation bundle's identification, as every lesion group carries it
    classifier: AlgorithmInfo | None = None  # the classification bundle's, as its group carries it

    def config_lines(self) -> list[str]:
        """TOML for a service that runs these bundles as its ``demo`` pipeline."""
        if self.committed:
            return []
        return ["[pipelines]", f"demo_bundle_dir = {json.dumps(str(self.directory))}"]


@pytest.fixture(scope="session")
def demo_bundles() -> DemoBundles:
    """The trained demo bundles, pinned; fails with what to do when they are not there."""
    from pipeline.demo.bundle import DEMO_BUNDLE_DIR, demo_spec
    from pipeline.errors import PipelineError

    override = os.environ.get(DEV_BUNDLES_ENV)
    where = Path(override).resolve() if override else DEMO_BUNDLE_DIR
    try:
        spec = demo_spec(bundle_dir=where)
    except PipelineError as exc:
        pytest.fail(
            f"these end-to-end tests need the trained demo bundles ({exc}). Train them with "
            f"`python -m pipeline.demo.training --out {where}` and pin them with "
            f"`python -m pipeline.demo.bundle --pin`, or set {DEV_BUNDLES_ENV}=DIR to test other bundles."
        )

    def identification(bundle: BundleSpec) -> AlgorithmInfo:
        meta = json.loads((bundle.path / "configs" / "metadata.json").read_text(encoding="utf-8"))
        return AlgorithmInfo(
            name=str(meta.get("name") or bundle.path.name),
            version=str(meta.get("version") or "unknown"),
            sha256=bundle.sha256,
            pipeline=spec.name,
        )

    return DemoBundles(
        directory=where,
        committed=override is None,
        algorithm=identification(spec.segmentation),
        classifier=None if spec.classification is None else identification(spec.classification),
    )


def service_config(path: Path, bundles: DemoBundles, rules: Sequence[tuple[str, str]]) -> Path:
    """A pacs-triage TOML: short quiet period, one worker, ``rules`` = (name, modality) -> demo."""
    lines = [
        "[completion]",
        "quiet_seconds = 1",
        "sweep_interval_seconds = 0.5",
        "[workers]",
        "count = 1",
        "poll_seconds = 0.5",
        "lease_seconds = 300",
        "[dispatch]",
        "poll_seconds = 0.5",
        *bundles.config_lines(),
    ]
    for name, modality in rules:
        lines += ["[[routing.rules]]", f'name = "{name}"', 'pipeline = "demo"', f'modality = ["{modality}"]']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def headers(paths: Sequence[Path]) -> list[Dataset]:
    return [dcmread(p, stop_before_pixels=True) for p in paths]


def check_sr(
    sr: Dataset, sources: Sequence[Dataset], bundles: DemoBundles, seg: Dataset | None = None
) -> SrReport:
    """Validate an SR that arrived (dciodvfy, dsrdump, round trip, TID 1500) and read its values."""
    assert sr.Modality == SR_MODALITY
    assert_dciodvfy_clean(sr, "SR")
    assert_dsrdump_ok(sr, "SR")
    decoded = roundtrip(sr)
    report = read_sr(decoded)
    assert report.priority is not None, "the SR carries no triage priority"
    # The checks compare the tree with the findings; the reported ones are taken from the SR itself,
    # while the algorithm (bundle name, version, pinned sha256) and the sources are known here.
    findings = Findings(
        algorithm=bundles.algorithm,
        findings=tuple(
            Finding(
                label=1,
                name=f.name,
                lesion=int(f.identifier.rpartition(" ")[2]),
                volume_ml=f.volume_ml,
                largest_diameter_mm=f.diameter_mm or 0.0,
                centroid_lps=f.centroid_lps or (0.0, 0.0, 0.0),
            )
            for f in report.findings
        ),
        classifications=tuple(
            Classification(c.name, c.probability, bundles.classifier) for c in report.classifications
        ),
        priority=report.priority,
    )
    check_pacs_triage_sr(decoded, sources=sources, findings=findings, seg=seg)
    return report


def check_seg(seg: Dataset, sources: Sequence[Dataset]) -> None:
    """Validate a SEG that arrived: dciodvfy clean, round trip, same study, new series, on the sources."""
    assert seg.Modality == SEG_MODALITY
    assert_dciodvfy_clean(seg, "SEG")
    decoded = roundtrip(seg)
    first = sources[0]
    assert decoded.StudyInstanceUID == first.StudyInstanceUID, "the SEG must be in the source study"
    assert decoded.SeriesInstanceUID != first.SeriesInstanceUID, "the SEG must be in a new series"
    assert decoded.FrameOfReferenceUID == first.FrameOfReferenceUID, "the SEG is on the source geometry"
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for series in decoded.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced <= {str(s.SOPInstanceUID) for s in sources}, "the SEG references foreign images"


def received(storescp: Storescp) -> list[Dataset]:
    """Every object a storescp wrote so far (one being written at this moment is left out)."""
    found: list[Dataset] = []
    for path in storescp.files():
        try:
            found.append(dcmread(path))
        except (InvalidDicomError, EOFError, ValueError):
            continue
    return found


@dataclass
class Orthanc:
    """``Orthanc cfg.json`` on loopback ports with temporary storage, driven over its REST API."""

    workdir: Path
    modalities: dict[str, list[Any]]
    aet: str = "ORTHANC"
    base: dict[str, Any] = field(default_factory=dict)  # a configuration to start from (deploy/)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        config = {
            **self.base,
            "Name": "pacs-triage-e2e",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "Plugins": [],
            "LuaScripts": self.base.get("LuaScripts", []),
        }
        path = self.workdir / "orthanc.json"
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        log = (self.workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [need_tool("Orthanc"), str(path)], env=clean_env(), stdout=log, stderr=subprocess.STDOUT
        )

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, (
                "Orthanc exited:\n" + (self.workdir / "orthanc.log").read_text(errors="replace")[-3000:]
            )
            try:
                self.get("/system")
            except OSError:
                return False
            return echo_status(self.dicom_port, called_ae=self.aet, timeout=2) == 0

        wait_until(up, timeout=60, what="Orthanc to answer REST and C-ECHO")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(data)
        return data

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post_json(self, path: str, value: Any) -> Any:
        return self._request("POST", path, json.dumps(value).encode(), "application/json")

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /instances: store one DICOM file; returns Orthanc's answer (ID, ParentStudy...)."""
        answer: dict[str, Any] = self._request("POST", "/instances", path.read_bytes(), "application/dicom")
        return answer

    def file(self, instance_id: str) -> Dataset:
        data = self._request("GET", f"/instances/{instance_id}/file")
        return dcmread(io.BytesIO(data))


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[list[Orthanc]]:
    """Orthanc instances started by a test (``Orthanc(...).start()`` appended here), stopped after."""
    started: list[Orthanc] = []
    yield started
    for instance in started:
        instance.stop()
