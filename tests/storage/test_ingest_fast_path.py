"""The ingest fast path (known series, group commit) records exactly what the full path would.

On SQLite and PostgreSQL: a new instance of a series this process already recorded is written with
three statements; anything else (reopened study, duplicate, replacement, rows gone) falls back to
the full path with the same outcome as before. Concurrent stores share commits but each is
recorded exactly once, and one failing unit of a shared commit does not fail the others.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage.db import make_engine, make_session_factory
from storage.group_commit import GroupCommit
from storage.ingest import AssociationInfo, IncomingInstance, Ingest, StoreOutcome
from storage.migrate import upgrade
from storage.models import Association, Event, Instance, Series, Study, StudyState
from storage.spool import Spool

T0 = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def ingest(database_url: str, tmp_path: Path) -> Ingest:
    engine = make_engine(database_url)
    upgrade(engine)
    spool = Spool(tmp_path / "spool")
    spool.open()
    return Ingest(make_session_factory(engine), spool)


def assoc(n: int = 1) -> AssociationInfo:
    return AssociationInfo(f"{n:036d}", f"SCU{n}", "PACS_TRIAGE", "127.0.0.1", T0)


def incoming(sop: str, series: str = "1.2.3.2", study: str = "1.2.3.1") -> IncomingInstance:
    return IncomingInstance(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
    )


def at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def test_fast_path_writes_what_the_full_path_writes(ingest: Ingest) -> None:
    a1, a2 = assoc(1), assoc(2)
    assert ingest.store(incoming("1.9.1"), [b"one"], a1, received_at=at(1)) is StoreOutcome.STORED
    assert ingest.store(incoming("1.9.2"), [b"two"], a1, received_at=at(2)) is StoreOutcome.STORED  # fast
    assert ingest.store(incoming("1.9.3"), [b"three"], a2, received_at=at(3)) is StoreOutcome.STORED
    assert ingest.store(incoming("1.9.4"), [b"four"], a2, received_at=at(4)) is StoreOutcome.STORED  # fast
    with ingest.sessions() as s:
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        assert study.last_received_at == at(4) and study.first_received_at == at(1)
        assert series.last_received_at == at(4) and series.last_association_id == a2.id
        assert sorted(rows) == ["1.9.1", "1.9.2", "1.9.3", "1.9.4"]
        fast = rows["1.9.4"]
        assert (fast.series_id, fast.association_id, fast.calling_ae, fast.received_at) == (
            series.id,
            a2.id,
            "SCU2",
            at(4),
        )
        assert fast.size_bytes == 4 and fast.replaced_count == 0 and ingest.spool.has(fast.path)
        assert s.scalar(select(func.count()).select_from(Association)) == 2
        assert [e.kind for e in s.scalars(select(Event))] == ["created"]


def test_duplicate_and_replacement_after_the_fast_path(ingest: Ingest) -> None:
    a = assoc()
    ingest.store(incoming("1.8.1"), [b"a"], a)
    assert ingest.store(incoming("1.8.2"), [b"b"], a) is StoreOutcome.STORED
    assert ingest.store(incoming("1.8.2"), [b"b"], a) is StoreOutcome.DUPLICATE
    assert ingest.store(incoming("1.8.2"), [b"B"], a) is StoreOutcome.REPLACED
    assert ingest.store(incoming("1.8.3"), [b"c"], a) is StoreOutcome.STORED
    with ingest.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 3
        assert s.scalars(select(Series)).one().changed is True
        assert [e.kind for e in s.scalars(select(Event).order_by(Event.id))] == [
            "created",
            "instance_replaced",
        ]
    files = [p for p in ingest.spool.objects.rglob("*.dcm")]
    assert sorted(p.read_bytes() for p in files) == [b"B", b"a", b"c"]


def test_a_completed_study_is_reopened_not_silently_updated(ingest: Ingest) -> None:
    a = assoc()
    ingest.store(incoming("1.7.1"), [b"a"], a)
    ingest.store(incoming("1.7.2"), [b"b"], a)
    with ingest.sessions() as s, s.begin():
        s.execute(update(Study).values(state=StudyState.COMPLETE, completed_at=at(5)))
    assert ingest.store(incoming("1.7.3"), [b"c"], a, received_at=at(6)) is StoreOutcome.STORED
    with ingest.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.state == StudyState.RECEIVING and study.completed_at is None
        assert [e.kind for e in s.scalars(select(Event).order_by(Event.id))] == ["created", "reopened"]


def test_rows_removed_behind_the_cache_are_recreated(ingest: Ingest) -> None:
    a = assoc()
    ingest.store(incoming("1.6.1"), [b"a"], a)
    with ingest.sessions() as s, s.begin():  # e.g. retention or an operator removed the study
        s.execute(delete(Instance))
        s.execute(delete(Series))
        s.execute(delete(Study))
        s.execute(delete(Association))
    assert ingest.store(incoming("1.6.2"), [b"b"], a) is StoreOutcome.STORED
    with ingest.sessions() as s:
        series = s.scalars(select(Series)).one()
        instance = s.scalars(select(Instance)).one()
        assert instance.series_id == series.id and instance.sop_instance_uid == "1.6.2"
        assert s.get(Association, a.id) is not None


def test_a_series_under_another_study_is_still_refused(ingest: Ingest) -> None:
    a = assoc()
    ingest.store(incoming("1.5.1", series="1.5.2", study="1.5.3"), [b"a"], a)
    with pytest.raises(Exception, match="another study"):
        ingest.store(incoming("1.5.4", series="1.5.2", study="1.5.9"), [b"b"], a)


def test_concurrent_associations_record_each_instance_once(ingest: Ingest) -> None:
    threads, per_thread = 6, 15
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            for i in range(per_thread):
                ingest.store(incoming(f"1.4.{n}.{i}"), [f"{n}-{i}".encode()], assoc(n))
                if i % 5 == 0:  # and a resend of what was just stored
                    assert ingest.store(incoming(f"1.4.{n}.{i}"), [f"{n}-{i}".encode()], assoc(n)) is (
                        StoreOutcome.DUPLICATE
                    )
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    with ingest.sessions() as s:
        uids = list(s.scalars(select(Instance.sop_instance_uid)))
        assert len(uids) == len(set(uids)) == threads * per_thread
        assert s.scalar(select(func.count()).select_from(Study)) == 1
    assert len(list(ingest.spool.objects.rglob("*.dcm"))) == threads * per_thread


def test_one_failing_unit_does_not_fail_the_others_of_its_commit(database_url: str) -> None:
    engine = make_engine(database_url)
    table = Table("gc_probe", MetaData(), Column("id", Integer, primary_key=True))
    table.create(engine)
    group = GroupCommit(engine, "testing")
    gate, queued = threading.Event(), threading.Semaphore(0)
    outcomes: dict[int, str] = {}

    def blocker(conn: Connection) -> None:
        gate.wait(30)  # holds the first batch open while the others queue up behind it
        conn.execute(insert(table).values(id=1))

    def unit(n: int) -> None:
        def work(conn: Connection) -> None:
            conn.execute(insert(table).values(id=1 if n == 3 else n))  # 3 collides with 1

        queued.release()
        try:
            group.run(work)
            outcomes[n] = "ok"
        except IntegrityError:
            outcomes[n] = "duplicate"

    first = threading.Thread(target=group.run, args=(blocker,))
    first.start()
    while not group._busy:  # the blocker leads the first batch
        threading.Event().wait(0.01)
    others = [threading.Thread(target=unit, args=(n,)) for n in (2, 3, 4)]
    for t in others:
        t.start()
    for _ in others:
        queued.acquire()
    threading.Event().wait(0.2)  # let them reach the queue
    gate.set()
    for t in (first, *others):
        t.join(30)
    assert outcomes == {2: "ok", 3: "duplicate", 4: "ok"}
    with engine.connect() as conn:
        assert sorted(conn.scalars(select(table.c.id))) == [1, 2, 4]
    assert group.units == 4 and group.batches == 2
    engine.dispose()


def test_new_object_directories_are_created_and_recreated(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    assert len([p for p in spool.objects.iterdir() if p.is_dir()]) == 256  # objects/00 .. ff
    stored = spool.commit(spool.write_pending([b"x"]), "1.2.3")
    directory = (spool.root / stored.relative_path).parent
    assert directory.is_dir() and spool.has(stored.relative_path)
    (spool.root / stored.relative_path).unlink()
    directory.rmdir()  # removed behind the spool's back: the next commit makes it again
    again = spool.commit(spool.write_pending([b"x"]), "1.2.3")
    assert again.relative_path == stored.relative_path and spool.has(again.relative_path)
