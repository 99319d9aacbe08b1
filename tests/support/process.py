"""Running the real ``pacs-triage`` command line and waiting on conditions with a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[2]


T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns a truthy value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def cli_command() -> list[str]:
    """How to run ``pacs-triage``: the console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "pacs-triage"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli.main"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any PACS_TRIAGE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_TRIAGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["TCP_NODELAY"] = "1"  # for dcmtk tools (see the issue: 44 ms stalls without it)
    env.update(extra or {})
    return env


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli_command(), *args], env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
