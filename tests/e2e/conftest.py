"""End-to-end tests run ``pacs-triage serve`` on SQLite, its default (fixtures: ``tests/support/e2e.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.service import ServiceFactory


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceFactory]:
    """``pacs-triage serve`` subprocesses (SQLite, the default), stopped after the test."""
    factory = ServiceFactory(tmp_path)
    yield factory
    factory.cleanup()
