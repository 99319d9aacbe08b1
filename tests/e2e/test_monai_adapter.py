"""The MONAI pipeline behind the worker: named pipelines from ``[[pipelines.monai]]``, the built-in
``demo``, and the outcomes a worker records (succeeded with SR/SEG and stage times; failed,
permanently, with the reason in ``status``).

These run a real worker loop in this process on a real SQLite database and spool, with a tiny
but real Model Zoo bundle made here (a 1x1x1 convolution: "lesion" is every voxel above about
155 HU), so they need neither the trained demo bundles nor much CPU.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config, ConfigError, load_config
from daemon.pipelines.registry import Pipelines, check_routing
from daemon.service.routing import CompletionSweep
from daemon.service.worker import Worker
from pipeline.bundle_runtime import bundle_sha256
from pipeline.demo.phantom import write_phantom_series
from pipeline.writers.sr_reader import read_sr
from storage.db import make_engine, make_session_factory
from storage.ingest import AssociationInfo, IncomingInstance, Ingest
from storage.migrate import upgrade
from storage.models import Event, Job, Result, utcnow
from storage.spool import Spool
from storage.stats import queue_summary
from tests.paths import TESTDATA

SAGITTAL_MR = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))


def _threshold_bundle(root: Path) -> str:
    """A segmentation bundle: softmax of a fixed 1x1x1 convolution of the windowed image; its sha256."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    net = torch.nn.Conv3d(1, 2, 1)
    assert net.bias is not None
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1], net.bias[1] = 100.0, -97.5  # channel 1 wins above x = 0.975 (~155 HU)
    window = {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -60, "a_max": 160,
              "b_min": 0.0, "b_max": 1.0, "clip": True}  # fmt: skip
    inference = {
        "image_key": "image",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [4.0, 4.0, 5.0], "mode": "bilinear"},
            window,
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ]},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }  # fmt: skip
    meta = {
        "name": "threshold test bundle",
        "version": "0.0.1",
        "network_data_format": {"outputs": {"pred": {"type": "image", "channel_def": {"0": "background", "1": "lesion"}}}},
    }  # fmt: skip
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return bundle_sha256(root)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("bundles") / "threshold"
    return root, _threshold_bundle(root)


def _config(
    tmp_path: Path, bundle: tuple[Path, str], *, sha256: str | None = None, extra: str = ""
) -> Config:
    path, digest = bundle
    toml = tmp_path / "pacs-triage.toml"
    toml.write_text(
        f"""
home = {json.dumps(str(tmp_path / "home"))}
destination = "PACS@127.0.0.1:104"
[storage]
min_free_bytes = 0
[[pipelines.monai]]
name = "ct-threshold"
version = "7"
segmentation = {{ path = {json.dumps(str(path))}, sha256 = "{sha256 or digest}" }}
allowed_dirs = [{json.dumps(str(path.parent))}]
min_slices = 8
thresholds = {{ urgent_volume_ml = 1.0 }}
device = "cpu"
[[routing.rules]]
name = "all"
pipeline = "ct-threshold"
{extra}
""",
        encoding="utf-8",
    )
    return load_config(toml, environ={})


class _Node:
    """A migrated SQLite database, the spools, and a worker of ``config``, all in this process."""

    def __init__(self, config: Config) -> None:
        config.home.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(config.effective_database_url)
        upgrade(self.engine)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.spool = Spool(config.spool_dir, min_free_bytes=0)
        self.spool.open()
        self.results = Spool(config.results_dir, min_free_bytes=0)
        self.results.open()
        self.config = config
        self.worker = Worker(config, self.sessions, self.spool, self.results, name="test-worker")

    def receive_and_run(self, files: list[Path]) -> Job:
        """Store ``files`` as one released association, complete the study, run its job."""
        ingest = Ingest(self.sessions, self.spool)
        info = AssociationInfo(
            id=str(uuid.uuid4()),
            calling_ae="MODALITY",
            called_ae="PACS_TRIAGE",
            source_address="127.0.0.1",
            started_at=dt.datetime.now(dt.UTC),
        )
        study = ""
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            study = str(ds.StudyInstanceUID)
            incoming = IncomingInstance(
                study_instance_uid=study,
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                modality=str(ds.Modality),
                series_description=str(ds.get("SeriesDescription", "")),
                series_number=int(ds.get("SeriesNumber", 0) or 0),
            )
            ingest.store(incoming, (path.read_bytes(),), info)
        ingest.end_association(info.id, released=True)
        outcome = CompletionSweep(self.config, self.sessions, self.spool).force(study)
        assert outcome.job_id is not None, outcome
        assert self.worker.run_one()
        with self.sessions() as session:
            return session.get_one(Job, outcome.job_id)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def node(tmp_path: Path, bundle: tuple[Path, str]) -> Iterator[_Node]:
    n = _Node(_config(tmp_path, bundle))
    yield n
    n.close()


def test_a_configured_monai_pipeline_succeeds_with_an_sr_and_records_its_stage_times(
    node: _Node, tmp_path: Path, bundle: tuple[Path, str]
) -> None:
    truth = write_phantom_series(tmp_path / "phantom", seed=5, lesions=0, slices=16)
    files = sorted((tmp_path / "phantom").glob("*.dcm"))
    before = dt.datetime.now().replace(microsecond=0)  # DICOM dates are local time
    job = node.receive_and_run(files)
    after = dt.datetime.now()

    assert (job.state, job.pipeline, job.attempts) == ("succeeded", "ct-threshold", 1), job.last_error
    with node.sessions() as session:
        results = session.scalars(select(Result).where(Result.job_id == job.id)).all()
        succeeded = session.scalars(
            select(Event).where(
                Event.entity == "job", Event.entity_id == str(job.id), Event.kind == "succeeded"
            )
        ).one()
    modalities = sorted(dcmread(node.results.path_of(r.path)).Modality for r in results if r.path)
    # SR always; SEG when something was segmented; then one key image (OT) per lesion and one KOS (KO)
    assert set(modalities) <= {"SR", "SEG", "OT", "KO"} and modalities.count("SR") == 1, modalities
    assert modalities.count("SEG") <= 1 and modalities.count("KO") == (1 if "OT" in modalities else 0), (
        modalities
    )
    sr = next(
        dcmread(node.results.path_of(r.path))
        for r in results
        if r.sop_class_uid.endswith(".88.34") and r.path
    )
    report = read_sr(sr)
    assert report.study_instance_uid == truth.study_instance_uid
    # IHE AIR: the report's Content and Instance Creation Date/Time are when this analysis began (the
    # worker's clock, passed into pipeline/), not the study's acquisition time (issue 13 item 5).
    content = dt.datetime.strptime(f"{sr.ContentDate}{str(sr.ContentTime)[:6]}", "%Y%m%d%H%M%S")
    assert before <= content <= after, (content, before, after)
    assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == (sr.ContentDate, sr.ContentTime)
    assert (sr.ContentDate, sr.ContentTime) != (sr.StudyDate, sr.StudyTime)
    assert report.evidence >= {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert report.priority is not None and int(report.priority) == results[0].priority
    assert "series " in results[0].summary  # the summary says which series was analysed and why
    stages = json.loads(succeeded.detail)["stages"]
    assert set(stages) == {"select", "load", "headers", "bundles", "inference", "measure", "write"}
    assert all(seconds >= 0 for seconds in stages.values())


def test_no_usable_series_fails_the_job_permanently_with_the_reason_in_status(node: _Node) -> None:
    job = node.receive_and_run(SAGITTAL_MR)

    assert (job.state, job.attempts) == ("failed", 1)  # permanent: no retry
    assert job.last_error is not None and job.last_error.startswith("NoUsableSeries: pipeline 'ct-threshold'")
    assert "Modality MR not in ['CT']" in job.last_error
    with node.sessions() as session:
        assert session.scalars(select(Result).where(Result.job_id == job.id)).all() == []
    summary = queue_summary(node.sessions, utcnow())
    assert summary.failed_jobs_total == 1
    assert summary.failed_jobs[0].detail == job.last_error


def test_a_bundle_that_changed_after_pinning_fails_the_job_permanently(
    tmp_path: Path, bundle: tuple[Path, str]
) -> None:
    node = _Node(_config(tmp_path, bundle, sha256="0" * 64))
    try:
        write_phantom_series(tmp_path / "phantom", seed=6, lesions=0, slices=16)
        job = node.receive_and_run(sorted((tmp_path / "phantom").glob("*.dcm")))
    finally:
        node.close()
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.last_error is not None and "sha256 mismatch" in job.last_error


def test_each_worker_process_builds_a_pipeline_once(tmp_path: Path, bundle: tuple[Path, str]) -> None:
    pipelines = Pipelines(_config(tmp_path, bundle))
    assert {"demo", "echo", "noop", "ct-threshold"} <= set(pipelines.known())
    first = pipelines.get("ct-threshold")
    assert pipelines.get("ct-threshold") is first
    assert (first.name, first.version) == ("ct-threshold", "7")


def test_routing_to_a_pipeline_that_cannot_be_built_stops_the_start(
    tmp_path: Path, bundle: tuple[Path, str]
) -> None:
    empty = tmp_path / "no-bundles"
    empty.mkdir()
    config = _config(
        tmp_path,
        bundle,
        extra=f'[[routing.rules]]\nname = "demo"\npipeline = "demo"\n[pipelines]\ndemo_bundle_dir = {json.dumps(str(empty))}',
    )
    with pytest.raises(ConfigError, match=r"pipeline 'demo'.*PINS\.json"):
        check_routing(config)
    outside = _config(tmp_path, (tmp_path / "elsewhere" / "seg", "a" * 64))
    outside = outside.model_copy(
        update={"pipelines": outside.pipelines.model_copy(update={"monai": (outside.pipelines.monai[0].model_copy(
            update={"allowed_dirs": (tmp_path / "bundles",)}),)})}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="outside allowed_dirs"):
        check_routing(outside)
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
        check_routing(_config(tmp_path, bundle, extra='[[routing.rules]]\nname = "x"\npipeline = "nope"'))


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('name = "demo"', "is built in"),
        ('name = "x"\nmax_slice_thickness = 0.1\nmin_slice_thickness = 1.0', "max_slice_thickness"),
        ('name = "x"\nsegmentation = { path = "/b", sha256 = "abc" }', "not a sha256"),
        ('name = "x"\nallowed_dirs = []', "allowed_dirs"),
    ],
)
def test_pipeline_config_errors_name_the_key(tmp_path: Path, snippet: str, message: str) -> None:
    entry = {"segmentation": 'segmentation = { path = "/b", sha256 = "' + "a" * 64 + '" }',
             "allowed_dirs": 'allowed_dirs = ["/b"]'}  # fmt: skip
    lines = [snippet] + [line for key, line in entry.items() if f"{key} =" not in snippet]
    toml = tmp_path / "bad.toml"
    toml.write_text("[[pipelines.monai]]\n" + "\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as error:
        load_config(toml, environ={})
    assert "pipelines.monai" in str(error.value)
