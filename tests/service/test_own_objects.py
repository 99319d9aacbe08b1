"""Objects we created never become an analysis input (issue 11, item 10), on SQLite and PostgreSQL:
our SR coming back into its study changes neither the routing facts, the content digest, nor the
worker's input, so the study gets no new job."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import select

from daemon.config import load_config
from daemon.service.routing import CompletionSweep
from storage import completion
from storage.db import transaction
from storage.models import Association, Instance, Job, Result, Series, Study, StudyState
from storage.spool import Spool
from tests.support.queue_db import T0, Db, add_study

OUR_SR = "2.25.424242"


def _our_result_comes_back(db: Db, study_id: int, job_id: int) -> None:
    """Record our SR as a result of ``job_id``, then receive it into the study (a new series)."""
    with transaction(db.sessions, "test setup") as session:
        session.add(
            Result(
                job_id=job_id,
                study_id=study_id,
                input_fingerprint="f" * 64,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                sop_instance_uid=OUR_SR,
                series_instance_uid=OUR_SR + ".1",
                path=None,
                size_bytes=1,
                sha256="a" * 64,
                created_at=T0,
            )
        )
        study = session.get_one(Study, study_id)
        session.add(
            Association(
                id="pacs-sends-back",
                calling_ae="ORTHANC",
                called_ae="PACS_TRIAGE",
                source_address="127.0.0.1",
                started_at=T0 + dt.timedelta(seconds=100),
                ended_at=T0 + dt.timedelta(seconds=100),
                released=True,
            )
        )
        series = Series(
            study_id=study_id,
            series_instance_uid=OUR_SR + ".1",
            modality="SR",
            last_received_at=T0 + dt.timedelta(seconds=100),
            last_association_id="pacs-sends-back",
        )
        session.add(series)
        session.flush()
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=OUR_SR,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="objects/none/ours.dcm",
                size_bytes=1,
                sha256="a" * 64,
                calling_ae="ORTHANC",
                source_address="127.0.0.1",
                association_id="pacs-sends-back",
                received_at=T0 + dt.timedelta(seconds=100),
            )
        )
        study.state = StudyState.RECEIVING  # reopened, as ingest does
        study.last_received_at = T0 + dt.timedelta(seconds=100)


def test_our_results_sent_back_are_stored_but_start_no_analysis(db: Db, tmp_path: Path) -> None:
    sweep = CompletionSweep(
        load_config(environ={"PACS_TRIAGE_HOME": str(tmp_path)}), db.sessions, Spool(tmp_path)
    )
    study_id = add_study(db, "2.25.777", series=(("CT", 3),))
    (first,) = sweep.run_once(T0 + dt.timedelta(seconds=60))
    assert first.job_id is not None
    before = completion.snapshot(db.sessions, study_id)
    inputs = completion.study_input(db.sessions, study_id)

    _our_result_comes_back(db, study_id, first.job_id)

    after = completion.snapshot(db.sessions, study_id)
    assert after.content_digest == before.content_digest
    assert [s.modality for s in after.series] == ["CT"], "our SR is not a series routing looks at"
    assert completion.study_input(db.sessions, study_id) == inputs
    (again,) = sweep.run_once(T0 + dt.timedelta(seconds=200))
    assert (again.state, again.job_id) == (StudyState.COMPLETE, None)
    with db.sessions() as session:
        assert session.scalars(select(Job.id)).all() == [first.job_id]
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == OUR_SR)) is not None


def test_an_identical_resend_is_a_no_op(db: Db, tmp_path: Path) -> None:
    """The same bytes under the same UIDs again: no reopening, no new completion, no new job."""
    import uuid

    from tests.support.queue_db import ct_series, ingest_files
    from tests.support.stored import events

    spool = Spool(tmp_path / "spool")
    spool.open()
    config = load_config(environ={"PACS_TRIAGE_HOME": str(tmp_path)})
    study = f"2.25.{uuid.uuid4().int}"
    files = ct_series(tmp_path / "in", study, study + ".1", 3)
    ingest_files(db, spool, files)
    done = CompletionSweep(config, db.sessions, spool).force(study)
    assert done.job_id is not None
    before = events(db.url)
    ingest_files(db, spool, files)  # the PACS sends the whole study again
    with db.sessions() as session:
        row = session.scalars(select(Study).where(Study.study_instance_uid == study)).one()
        assert row.state == StudyState.COMPLETE
    assert [e for e in events(db.url) if e not in before and e[0] != "association"] == []
