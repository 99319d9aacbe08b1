"""Where the shared, read-only test inputs live (used in place, never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
TESTDATA = SHARED / "testdata"
BUNDLES = SHARED / "bundles"
