"""storage.ingest on SQLite and PostgreSQL: new, duplicate and replaced instances; failures leave nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.db import make_engine, make_session_factory
from storage.errors import SpoolUnavailable
from storage.ingest import AssociationInfo, IncomingInstance, Ingest, StoreOutcome
from storage.migrate import upgrade
from storage.models import Event, Instance, Series, Study
from storage.spool import Spool


@pytest.fixture
def ingest(database_url: str, tmp_path: Path) -> Ingest:
    engine = make_engine(database_url)
    upgrade(engine)
    spool = Spool(tmp_path / "spool")
    spool.open()
    return Ingest(make_session_factory(engine), spool)


ASSOC = AssociationInfo("a" * 36, "MODALITY", "PACS_TRIAGE", "127.0.0.1", dt.datetime.now(dt.UTC))


def incoming(sop: str = "1.2.3.4.1", series: str = "1.2.3.2", study: str = "1.2.3.1") -> IncomingInstance:
    return IncomingInstance(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
    )


def objects(spool: Spool) -> list[Path]:
    return sorted(p for p in spool.objects.rglob("*") if p.is_file())


def test_new_duplicate_replace(ingest: Ingest) -> None:
    assert ingest.store(incoming(), [b"header", b"pixels-1"], ASSOC) is StoreOutcome.STORED
    assert ingest.store(incoming(), [b"header", b"pixels-1"], ASSOC) is StoreOutcome.DUPLICATE
    assert len(objects(ingest.spool)) == 1
    first = objects(ingest.spool)[0]
    assert first.read_bytes() == b"headerpixels-1"

    assert ingest.store(incoming(), [b"header", b"pixels-2"], ASSOC) is StoreOutcome.REPLACED
    files = objects(ingest.spool)
    assert len(files) == 1 and files[0] != first and files[0].read_bytes() == b"headerpixels-2"
    with ingest.sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.replaced_count == 1 and inst.size_bytes == len(b"headerpixels-2")
        assert (ingest.spool.root / inst.path) == files[0]
        assert s.scalars(select(Series)).one().changed is True
        kinds = [e.kind for e in s.scalars(select(Event).order_by(Event.id))]
        assert kinds == ["created", "instance_replaced"]
    assert list(ingest.spool.tmp.iterdir()) == []


def test_one_study_many_series(ingest: Ingest) -> None:
    for i in range(3):
        ingest.store(incoming(sop=f"1.2.3.4.{i}", series=f"1.2.3.2.{i % 2}"), [b"x" * (i + 1)], ASSOC)
    with ingest.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        assert s.scalar(select(func.count()).select_from(Series)) == 2
        assert s.scalar(select(func.count()).select_from(Instance)) == 3


def test_series_in_another_study_is_refused_and_leaves_no_file(ingest: Ingest) -> None:
    ingest.store(incoming(sop="1.9.1", series="1.9.2", study="1.9.3"), [b"a"], ASSOC)
    with pytest.raises(Exception, match="another study"):
        ingest.store(incoming(sop="1.9.4", series="1.9.2", study="1.9.5"), [b"b"], ASSOC)
    assert len(objects(ingest.spool)) == 1


def test_free_space_threshold_refuses_before_writing(ingest: Ingest) -> None:
    ingest.spool.min_free_bytes = ingest.spool.free_bytes() + 2**40
    with pytest.raises(SpoolUnavailable, match="min_free_bytes"):
        ingest.store(incoming(), [b"data"], ASSOC)
    assert objects(ingest.spool) == [] and list(ingest.spool.tmp.iterdir()) == []
    with ingest.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0


def test_spool_paths_are_server_derived(ingest: Ingest) -> None:
    rel = ingest.spool.relative_path_for("1.2.3", "ab" * 32)
    assert rel.startswith("objects/") and "1.2.3" not in rel
    with pytest.raises(ValueError):
        ingest.spool.path_of("../outside.dcm")
