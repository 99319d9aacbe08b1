"""Worker error classes (issue 11, item 15): deterministic input errors from third-party code are
permanent at once with a one-line reason; a missing spool file and a full results disk are
transient, named, and found before the model runs; `pacs-triage worker` checks the spool at start.

The failing pipelines call the real libraries: highdicom on images without Slice Thickness, a
MONAI UNet on an all-air crop.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom import dcmread

from daemon.config import load_config
from daemon.pipelines.base import AnalysisOutcome
from daemon.pipelines.registry import Pipeline, Pipelines
from daemon.service.job_errors import classify
from daemon.service.routing import CompletionSweep
from daemon.service.worker import Worker
from storage.models import JobState
from storage.queue import JobQueue, JobView
from storage.spool import Spool
from tests.support.process import clean_env, run_cli
from tests.support.queue_db import Db, ct_series, ingest_files


class HighdicomSeg:
    """Builds a SEG of the input with highdicom (as pipeline/writers/seg.py does)."""

    name, version = "highdicom_seg", "1"

    def run(self, study_files: Sequence[Path], *, input_fingerprint: str) -> AnalysisOutcome:
        import highdicom as hd
        import numpy as np

        sources = [dcmread(p) for p in study_files]
        mask = np.zeros((len(sources), 8, 8), dtype=bool)
        mask[0, 2:4, 2:4] = True
        segment = hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="lesion",
            segmented_property_category=hd.sr.CodedConcept(
                "49755003", "SCT", "Morphologically Altered Structure"
            ),
            segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="test", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing")
            ),
        )
        hd.seg.Segmentation(
            source_images=sources,
            pixel_array=mask,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=1,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="pacs-triage tests",
            manufacturer_model_name="test",
            software_versions="1",
            device_serial_number="1",
        )
        raise AssertionError("highdicom accepted images without Slice Thickness")


class AllAirUnet:
    """Crops the volume to its foreground (tissue above -500 HU) and runs a MONAI UNet on it."""

    name, version = "all_air", "1"

    def run(self, study_files: Sequence[Path], *, input_fingerprint: str) -> AnalysisOutcome:
        import torch
        from monai.networks.nets import UNet
        from monai.transforms import CropForeground

        volume = torch.full((1, len(study_files), 8, 8), -1000.0)  # air everywhere
        crop = CropForeground(select_fn=lambda v: v > -500, allow_smaller=True)(volume)
        UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))(crop[None])
        raise AssertionError("the UNet accepted an empty crop")


class Counting:
    """Counts its runs (the model must not run when its input or the results disk is not ready)."""

    name, version = "counting", "1"

    def __init__(self) -> None:
        self.runs = 0

    def run(self, study_files: Sequence[Path], *, input_fingerprint: str) -> AnalysisOutcome:
        self.runs += 1
        raise AssertionError("the model ran")


class ExtraPipelines(Pipelines):
    def __init__(self, config: object, extra: dict[str, Pipeline]) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.extra = extra

    def get(self, name: str) -> Pipeline:
        return self.extra[name] if name in self.extra else super().get(name)


def _node(db: Db, tmp_path: Path, pipeline: Pipeline, **env: str) -> tuple[Worker, Spool]:
    (tmp_path / "node.toml").write_text(
        f'[[routing.rules]]\nname = "all"\npipeline = "{pipeline.name}"\nmodality = ["CT"]\n'
    )
    config = load_config(
        tmp_path / "node.toml",
        {
            "PACS_TRIAGE_HOME": str(tmp_path / "home"),
            "PACS_TRIAGE_WORKERS__BACKOFF__BASE_SECONDS": "0",
            "PACS_TRIAGE_WORKERS__BACKOFF__JITTER": "0",
            **env,
        },
    )
    spool, results = (
        Spool(config.spool_dir),
        Spool(config.results_dir, min_free_bytes=config.storage.min_free_bytes),
    )
    spool.open()
    results.open()
    pipelines = ExtraPipelines(config, {pipeline.name: pipeline})
    return Worker(config, db.sessions, spool, results, name="w", pipelines=pipelines), spool


def _run_study(db: Db, tmp_path: Path, worker: Worker, spool: Spool, *, strip: str | None = None) -> JobView:
    study = f"2.25.{uuid.uuid4().int}"
    files = ct_series(tmp_path / "in", study, study + ".1", 3)
    for path in files:
        ds = dcmread(path)
        ds.FrameOfReferenceUID = study + ".9"
        if strip:
            delattr(ds, strip)
        ds.save_as(path, enforce_file_format=True)
    ingest_files(db, spool, files)
    done = CompletionSweep(worker.config, db.sessions, spool).force(study)
    assert done.job_id is not None
    return _after_one_run(db, worker, done.job_id)


def _after_one_run(db: Db, worker: Worker, job_id: int) -> JobView:
    assert worker.run_one()
    return JobQueue(db.sessions).get(job_id)


@pytest.mark.parametrize(
    ("pipeline", "strip", "reason", "origin"),
    [
        (HighdicomSeg(), "SliceThickness", "DICOM attribute SliceThickness is missing", "highdicom"),
        (AllAirUnet(), None, "RuntimeError in torch", "Kernel size can't be greater"),
    ],
)
def test_deterministic_third_party_errors_fail_at_once_with_a_one_line_reason(
    db: Db, tmp_path: Path, pipeline: Pipeline, strip: str | None, reason: str, origin: str
) -> None:
    worker, spool = _node(db, tmp_path, pipeline)
    job = _run_study(db, tmp_path, worker, spool, strip=strip)
    assert (job.state, job.attempts) == (JobState.FAILED, 1), job.last_error
    assert job.last_error is not None
    first, _, rest = job.last_error.partition("\n")
    assert first.startswith(f"the input cannot be processed by pipeline {pipeline.name!r}"), first
    assert reason in first and origin in first and len(first) < 400
    assert "Traceback (most recent call last)" in rest, "the traceback is kept in the job's detail"


def test_a_missing_spool_file_is_transient_names_the_file_and_the_model_does_not_run(
    db: Db, tmp_path: Path
) -> None:
    model = Counting()
    worker, spool = _node(db, tmp_path, model)
    study = f"2.25.{uuid.uuid4().int}"
    ingest_files(db, spool, ct_series(tmp_path / "in", study, study + ".1", 3))
    lost = sorted(spool.objects.rglob("*.dcm"))[1]
    lost.unlink()  # as on a worker host without the spool (or with a stale mount)
    done = CompletionSweep(worker.config, db.sessions, spool).force(study)
    assert done.job_id is not None
    job = _after_one_run(db, worker, done.job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1), "transient: retried with backoff"
    assert job.last_error is not None
    assert str(lost.relative_to(spool.root)) in job.last_error and "missing or unreadable" in job.last_error
    assert "gap" not in job.last_error and model.runs == 0


def test_a_full_results_disk_is_found_before_the_model_runs(db: Db, tmp_path: Path) -> None:
    model = Counting()
    worker, spool = _node(db, tmp_path, model)
    worker.results.min_free_bytes = worker.results.free_bytes() + 2**40  # the results disk is full
    study = f"2.25.{uuid.uuid4().int}"
    ingest_files(db, spool, ct_series(tmp_path / "in", study, study + ".1", 3))
    done = CompletionSweep(worker.config, db.sessions, spool).force(study)
    assert done.job_id is not None
    job = _after_one_run(db, worker, done.job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.last_error is not None and "results disk full, the model was not run" in job.last_error
    assert model.runs == 0


def test_the_worker_command_refuses_to_start_without_a_readable_spool(db: Db, tmp_path: Path) -> None:
    home = tmp_path / "gpu-host"  # a host where the shared spool is not mounted
    out = run_cli(
        "worker",
        env=clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_DATABASE_URL": db.url}),
        timeout=60,
    )
    assert out.returncode != 0
    assert f"cannot read the spool of received instances at {home / 'spool' / 'objects'}" in out.stderr


class Unencodable:
    """Answers with a result that cannot be written as a Part 10 file (no SOP Class UID)."""

    name, version = "unencodable", "1"

    def run(self, study_files: Sequence[Path], *, input_fingerprint: str) -> AnalysisOutcome:
        from pydicom.dataset import Dataset

        from vocabulary import Priority

        broken = Dataset()
        broken.SOPInstanceUID = "2.25.1"
        return AnalysisOutcome(Priority.ROUTINE, "broken", (broken,))


def test_a_result_that_cannot_be_written_fails_the_job_once(db: Db, tmp_path: Path) -> None:
    worker, spool = _node(db, tmp_path, Unencodable())
    job = _run_study(db, tmp_path, worker, spool)
    assert (job.state, job.attempts) == (JobState.FAILED, 1), job.last_error
    assert job.last_error is not None and "SOPClassUID" in job.last_error.splitlines()[0]


def test_only_resource_errors_are_transient() -> None:
    import torch

    assert not classify(torch.cuda.OutOfMemoryError("CUDA out of memory."), pipeline="demo").permanent
    assert not classify(RuntimeError("CUDA error: all CUDA-capable devices are busy"), pipeline="d").permanent
    assert not classify(MemoryError(), pipeline="demo").permanent
    assert not classify(OSError(28, "No space left on device"), pipeline="demo").permanent
    for error in (KeyError("PixelSpacing"), ValueError("bad"), ZeroDivisionError(), IndexError()):
        assert classify(error, pipeline="demo").permanent, error


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Worker behaviour does not depend on the database; the queue is tested on both."""
    return f"sqlite:///{tmp_path / 'test.db'}"
