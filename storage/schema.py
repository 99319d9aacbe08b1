"""Which schema revision a database is at, and which this code needs, without importing Alembic.

For the read-only commands, which only compare the two (``pacs-triage status`` must answer in
well under a second; Alembic's import alone is a sixth of that). Migrating stays in
``storage/migrate.py``; ``tests/storage/test_schema_revision.py`` keeps the two in agreement.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from storage.db import translate_errors

VERSIONS = Path(__file__).resolve().parent / "migrations" / "versions"


@cache
def expected_revision() -> str:
    """The head of the migration chain: the one revision no other names as its ``down_revision``."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in VERSIONS.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
                    if target.id == "revision":
                        revisions.add(str(node.value.value))
                    elif target.id == "down_revision" and node.value.value is not None:
                        parents.add(str(node.value.value))
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"migrations in {VERSIONS} have {len(heads)} heads: {sorted(heads)}")
    return heads.pop()


def stored_revision(engine: Engine) -> str | None:
    """The revision recorded in the database; None when it has no schema (no ``alembic_version``)."""
    with translate_errors("reading the schema revision"), engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError as exc:
            if "no such table" in str(exc) or "does not exist" in str(exc):  # SQLite, PostgreSQL
                return None
            raise
