"""Counters and histograms that only the receiver sees (nothing of them reaches the database).

What is in the database (instances and bytes received, job stage timings, deliveries, queue
depth) is counted by ``daemon/http/metrics.py`` at scrape time from the database, so workers on
any host are included. What the receiver alone knows (refusals by status, associations accepted,
rejected and active, TLS handshake failures, the time to store one instance) is counted here.

One receiver in the ``serve`` process: the instruments live in :func:`registry`, which the
``/metrics`` route includes. Several receiver processes (``dicom.receivers`` > 1): each child calls
:func:`share_through` with the directory the parent gave it before building its receiver, and
prometheus-client's multiprocess mode keeps every child's values in memory-mapped files there,
which the parent's ``/metrics`` sums (:func:`shared_collector`). A restarted child's counts stay
in the sum; its active-associations gauge is dropped when the parent marks it dead.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads this name; only children set it
PREFIX = "pacs_triage_"
# Seconds: a small instance is stored in a few ms, a large CT instance over a slow disk in ~100 ms.
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ReceiverInstruments:
    refusals: Counter  # status
    associations: Counter
    associations_rejected: Counter  # reason
    associations_active: Gauge
    tls_failures: Counter
    store_seconds: Histogram


@cache
def registry() -> CollectorRegistry:
    """The registry of this process's instruments (unused in multiprocess children)."""
    return CollectorRegistry(auto_describe=True)


@cache
def receiver_instruments() -> ReceiverInstruments:
    """The receiver's instruments, created on first use (after :func:`share_through`, in a child)."""
    shared = MULTIPROC_ENV in os.environ
    reg = None if shared else registry()
    return ReceiverInstruments(
        refusals=Counter(
            PREFIX + "refusals",
            "C-STOREs answered with a failure status, by status code",
            ["status"],
            registry=reg,
        ),
        associations=Counter(PREFIX + "associations", "DICOM associations accepted", registry=reg),
        associations_rejected=Counter(
            PREFIX + "associations_rejected",
            "DICOM associations rejected, by reason (access control)",
            ["reason"],
            registry=reg,
        ),
        associations_active=Gauge(
            PREFIX + "associations_active",
            "DICOM associations open now",
            registry=reg,
            multiprocess_mode="livesum",
        ),
        tls_failures=Counter(
            PREFIX + "tls_handshake_failures",
            "DICOM TLS connections that failed their handshake",
            registry=reg,
        ),
        store_seconds=Histogram(
            PREFIX + "store_seconds",
            "Time to validate, write durably and record one received instance (successes)",
            buckets=STORE_BUCKETS,
            registry=reg,
        ),
    )


def shared_directory(home: Path) -> Path:
    """Where the receiver children of the ``serve`` running in ``home`` keep their values."""
    return home / "run" / "receiver-metrics"


def prepare_shared_directory(directory: Path) -> Path:
    """In the parent, before its receiver children start: an empty directory for their values."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    return directory


def share_through(directory: Path) -> None:
    """In a receiver child, first thing: keep instrument values in ``directory`` (multiprocess mode)."""
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()


def forget_process(directory: Path, pid: int) -> None:
    """A child died: drop its live gauges (its counters stay in the sums)."""
    multiprocess.mark_process_dead(pid, path=str(directory))


def shared_collector(directory: Path, target: CollectorRegistry) -> None:
    """Register on ``target`` a collector summing the children's values kept in ``directory``."""
    multiprocess.MultiProcessCollector(target, path=str(directory))
