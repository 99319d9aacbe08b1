"""``storage.schema`` (what the read-only commands use, without Alembic) agrees with Alembic."""

from __future__ import annotations

from storage.db import make_engine
from storage.migrate import current_revision, head_revision, upgrade
from storage.schema import expected_revision, stored_revision


def test_expected_and_stored_revision_agree_with_alembic(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert stored_revision(engine) is None  # an empty database has no schema
        assert expected_revision() == head_revision(engine)
        upgrade(engine, "0001")
        assert stored_revision(engine) == current_revision(engine) == "0001"
        upgrade(engine)
        assert stored_revision(engine) == current_revision(engine) == expected_revision()
    finally:
        engine.dispose()
