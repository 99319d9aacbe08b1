"""What the service stored: instance rows, audit events and spool files, checked against each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from storage.db import make_engine
from storage.models import Event, Instance, Series, Study
from tests.support.dicom_bytes import content_digest, read_quietly


@dataclass(frozen=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str
    size_bytes: int
    sha256: str
    calling_ae: str
    source_address: str
    replaced_count: int
    series_changed: bool


def stored_instances(database_url: str) -> dict[str, StoredInstance]:
    """Every instance row (joined with its series and study), by SOP Instance UID."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.sop_class_uid,
                    Instance.transfer_syntax_uid,
                    Series.series_instance_uid,
                    Study.study_instance_uid,
                    Instance.path,
                    Instance.size_bytes,
                    Instance.sha256,
                    Instance.calling_ae,
                    Instance.source_address,
                    Instance.replaced_count,
                    Series.changed,
                )
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
            ).all()
    finally:
        engine.dispose()
    result: dict[str, StoredInstance] = {}
    for row in rows:
        item = StoredInstance(*row)  # type: ignore[call-arg]  # the columns, in field order
        assert item.sop_instance_uid not in result, f"{item.sop_instance_uid} recorded twice"
        result[item.sop_instance_uid] = item
    return result


def events(database_url: str) -> list[tuple[str, str, str, str]]:
    """(entity, entity_id, kind, detail) of every audit row, oldest first."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Event.entity, Event.entity_id, Event.kind, Event.detail).order_by(Event.id)
            )
            return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]
    finally:
        engine.dispose()


def spool_objects(spool: Path) -> dict[str, Path]:
    """Files of record under ``spool/objects``, keyed by their path relative to the spool."""
    objects = spool / "objects"
    if not objects.exists():
        return {}
    return {p.relative_to(spool).as_posix(): p for p in objects.rglob("*") if p.is_file()}


def spool_temp_files(spool: Path) -> list[Path]:
    tmp = spool / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def assert_spool_consistent(spool: Path, database_url: str) -> dict[str, StoredInstance]:
    """Every row points at a readable file with its size and sha256, every file has a row, no temp files."""
    rows = stored_instances(database_url)
    files = spool_objects(spool)
    assert spool_temp_files(spool) == [], f"temp files left in {spool / 'tmp'}"
    assert set(files) == {r.path for r in rows.values()}, (
        f"spool files without rows: {sorted(set(files) - {r.path for r in rows.values()})}; "
        f"rows without files: {sorted({r.path for r in rows.values()} - set(files))}"
    )
    for row in rows.values():
        path = files[row.path]
        assert content_digest(path) == (row.sha256, row.size_bytes), row
        ds = read_quietly(path)
        assert ds.SOPInstanceUID == row.sop_instance_uid
    return rows
