"""Completion and routing on both databases, with an explicit clock (no sleeping)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from daemon.config import RouteRule, load_config
from daemon.service.routing import CompletionSweep, SeriesView, mismatch, route
from storage.completion import AssociationEnd, CompletionPolicy, CompletionReason, SeriesFacts, decide
from storage.db import transaction
from storage.models import Association, Job, JobState, Study, StudyState
from storage.spool import Spool
from tests.support.queue_db import T0, Db, add_study
from vocabulary import Priority

POLICY = CompletionPolicy(quiet_seconds=2, idle_timeout_seconds=30, open_association_timeout_seconds=100)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("ends", "now", "expected"),
    [
        ([AssociationEnd(at(1), True)], 2.9, None),  # released, quiet period not over
        ([AssociationEnd(at(1), True)], 3.0, CompletionReason.RELEASED),
        ([AssociationEnd(at(1), True), AssociationEnd(None, False)], 29, None),  # one still open
        # Issue 11 item 11: an open association holds the study past the idle timeout...
        ([AssociationEnd(at(1), True), AssociationEnd(None, False)], 30, None),
        ([AssociationEnd(None, False)], 99, None),
        # ...until it has been silent longer than a live receiver allows (its receiver died).
        ([AssociationEnd(None, False)], 100, CompletionReason.IDLE),
        ([AssociationEnd(at(1), False)], 29, None),  # aborted: no release, only the idle timeout
        ([AssociationEnd(at(1), False)], 30, CompletionReason.IDLE),
        ([AssociationEnd(at(5), True)], 6.9, None),  # quiet counts from the later release
    ],
)
def test_decide(ends: list[AssociationEnd], now: float, expected: CompletionReason | None) -> None:
    assert decide(T0, ends, POLICY, at(now)) is expected


def sweep(db: Db, tmp_path: Path, **env: str) -> CompletionSweep:
    config = load_config(
        environ={
            "PACS_TRIAGE_HOME": str(tmp_path),
            "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "2",
            "PACS_TRIAGE_COMPLETION__IDLE_TIMEOUT_SECONDS": "30",
            **env,
        }
    )
    return CompletionSweep(config, db.sessions, Spool(tmp_path / "spool"))


def jobs(db: Db) -> list[tuple[int, JobState]]:
    with db.sessions() as session:
        return [(j.study_id, JobState(j.state)) for j in session.scalars(select(Job).order_by(Job.id))]


def study_state(db: Db, study_id: int) -> StudyState:
    with db.sessions() as session:
        return StudyState(session.get_one(Study, study_id).state)


def test_series_on_several_associations_make_one_job_and_a_late_series_supersedes(
    db: Db, tmp_path: Path
) -> None:
    s = sweep(db, tmp_path)
    uid = "2.25.100"
    study_id = add_study(db, uid, at=at(0), ended_at=at(0.5))
    add_study(db, uid, at=at(1.5), ended_at=at(2))  # a second association 1.5 s later
    assert s.run_once(at(3)) == [], "quiet period counts from the last release"
    add_study(db, uid, at=at(3.5), released=None, association="third")  # a third one, still open
    assert s.run_once(at(10)) == []
    with transaction(db.sessions, "release") as session:
        third = session.get_one(Association, "third")
        third.ended_at, third.released = at(11), True
    assert s.run_once(at(12.9)) == []
    done = s.run_once(at(13))
    assert [(d.state, d.job_id is not None) for d in done] == [(StudyState.COMPLETE, True)]
    assert jobs(db) == [(study_id, JobState.QUEUED)]
    assert s.run_once(at(100)) == [], "a complete study is not completed again"
    # A late series reopens the study; completing it again supersedes the first job.
    add_study(db, uid, at=at(200), ended_at=at(200))
    assert study_state(db, study_id) is StudyState.RECEIVING
    s.run_once(at(203))
    assert jobs(db) == [(study_id, JobState.SUPERSEDED), (study_id, JobState.QUEUED)]


def test_not_routed_studies_are_recorded_with_the_reason(db: Db, tmp_path: Path) -> None:
    toml = tmp_path / "rules.toml"
    toml.write_text(
        '[[routing.rules]]\nname = "ct-chest"\npipeline = "echo"\npriority = "stat"\nmodality = ["CT"]\n'
    )
    config = load_config(toml, {"PACS_TRIAGE_HOME": str(tmp_path)})
    s = CompletionSweep(config, db.sessions, Spool(tmp_path / "spool"))
    mr = add_study(db, series=(("MR", 2),), at=at(0))
    ct = add_study(db, series=(("MR", 1), ("CT", 2)), at=at(0))
    s.run_once(at(100))
    assert study_state(db, mr) is StudyState.NOT_ROUTED
    with db.sessions() as session:
        detail = session.get_one(Study, mr).route_detail
        job = session.scalars(select(Job)).one()
    assert detail is not None and "ct-chest" in detail and "'MR'" in detail
    assert (job.study_id, job.pipeline, job.priority, job.rule) == (
        ct,
        "echo",
        int(Priority.STAT),
        "ct-chest",
    )


def test_forced_completion_and_an_instance_that_raced_completion(db: Db, tmp_path: Path) -> None:
    s = sweep(db, tmp_path)
    study_id = add_study(db, "2.25.300", at=at(0), released=None)
    assert s.run_once(at(5)) == []
    assert s.force("2.25.300").job_id is not None
    assert study_state(db, study_id) is StudyState.COMPLETE
    # A store that read the study before completion and committed after writes last_received_at
    # without reopening it; the sweep notices and reopens.
    with transaction(db.sessions, "racing store") as session:
        session.get_one(Study, study_id).last_received_at = at(4.9)
    s.run_once(at(6))
    assert study_state(db, study_id) is StudyState.RECEIVING


def facts(**kw: object) -> SeriesFacts:
    base: dict[str, object] = dict(
        series_instance_uid="2.25.1",
        modality="CT",
        body_part_examined="CHEST",
        series_description="Thorax 1.0 B31f",
        series_number=2,
        instance_count=120,
        calling_aes=("CT01",),
        sample_path="objects/x.dcm",
    )
    base.update(kw)
    return SeriesFacts(**base)  # type: ignore[arg-type]


def write_header(spool: Spool, image_type: list[str], thickness: str | None) -> str:
    ds = Dataset()
    ds.ImageType = image_type
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.SOPInstanceUID = "2.25.9"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    spool.objects.mkdir(parents=True, exist_ok=True)
    ds.save_as(spool.objects / "x.dcm", enforce_file_format=True)
    return "objects/x.dcm"


def test_rule_criteria(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = write_header(spool, ["ORIGINAL", "PRIMARY", "AXIAL"], "1.0")
    view = SeriesView(facts(sample_path=path), spool)
    rule = RouteRule(
        name="r",
        pipeline="echo",
        modality=("ct",),
        body_part=("CHEST", "ABDOMEN"),
        series_description="(?i)thorax",
        image_type=("original", "primary"),
        min_slices=64,
        max_slices=2000,
        min_slice_thickness=0.5,
        max_slice_thickness=2.0,
        calling_ae=("CT01",),
    )
    assert mismatch(rule, view) is None
    cases = {
        "Modality": {"modality": ("MR",)},
        "BodyPartExamined": {"body_part": ("HEAD",)},
        "SeriesDescription": {"series_description": "Abdomen"},
        "calling AE": {"calling_ae": ("OTHER",)},
        "min_slices": {"min_slices": 200},
        "max_slices": {"max_slices": 100, "min_slices": None},
        "ImageType": {"image_type": ("DERIVED",)},
        "SliceThickness 1.0 <": {"min_slice_thickness": 1.5},
        "SliceThickness 1.0 >": {"max_slice_thickness": 0.8, "min_slice_thickness": None},
    }
    for expected, change in cases.items():
        reason = mismatch(rule.model_copy(update=change), view)
        assert reason is not None and expected in reason, (change, reason)


def test_first_matching_rule_wins(tmp_path: Path) -> None:
    from storage.completion import NoRoute, Route, StudySnapshot

    spool = Spool(tmp_path / "spool")
    snap = StudySnapshot(
        study_id=1,
        study_instance_uid="2.25.5",
        content_digest="d",
        series=(facts(modality="MR"), facts(series_instance_uid="2.25.2", modality="CT")),
    )
    rules = [
        RouteRule(name="mr", pipeline="brain", priority="urgent", modality=("MR",)),
        RouteRule(name="all", pipeline="echo"),
    ]
    decision = route(rules, snap, spool)
    assert isinstance(decision, Route) and (decision.rule, decision.priority) == ("mr", Priority.URGENT)
    assert isinstance(route([], snap, spool), NoRoute)
