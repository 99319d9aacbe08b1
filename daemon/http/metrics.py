"""``GET /metrics``: Prometheus text format, names prefixed ``pacs_triage_``, from a private registry.

Where each figure comes from, so that one endpoint shows the whole node whatever process or
host did the work:

* **The database, at scrape time** (:class:`NodeCollector`, on its own read-only connection):
  studies by state, jobs by state and priority, the oldest queued job's age, deliveries by state
  and destination, dead items, workers and dispatchers busy or idle (their heartbeats); and, read
  incrementally after a cursor (``storage/reports.py``), instances and bytes received by calling
  AE, each pipeline stage of every job that succeeded (its audit row), delivery latency and time
  to result. Workers on other hosts are counted without reaching this process. These counters and
  histograms count from the start of this ``serve``, like any Prometheus counter. A database error
  gives ``pacs_triage_db_up 0`` and leaves its figures out; the scrape itself succeeds.
* **The receiver** (``daemon/telemetry.py``): refusals, associations, TLS failures, store latency;
  in this process, or summed from the receiver children's files (prometheus-client multiprocess
  mode) when ``dicom.receivers`` > 1.
* **The spool**: free bytes (statvfs).

The route is a plain ``def``: FastAPI runs it in its threadpool, so the database reads never block
the event loop (STYLE.md §9).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from daemon import telemetry
from daemon.config import Config
from daemon.http.auth import health_open
from daemon.service.health import readiness
from daemon.service.node import Node
from storage.db import make_session_factory
from storage.errors import StorageError
from storage.reports import (
    Activity,
    Cursor,
    NodeGauges,
    activity_since,
    cursor_at,
    node_gauges,
    reader_engine,
)
from storage.spool import Spool

log = logging.getLogger(__name__)

P = telemetry.PREFIX
# Seconds. Pipeline stages run from well under a second (measure) to minutes (CPU inference).
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Last instance acknowledged -> result delivered: the quiet period + queue + pipeline + sending.
RESULT_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

# Counters count from here: this module is imported when ``serve`` builds its HTTP app.
STARTED_AT = dt.datetime.now(dt.UTC)

router = APIRouter(tags=["health"], dependencies=[Depends(health_open)])


class _Histogram:
    """Bucket counts and sum accumulated across scrapes, exported as one histogram family."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class NodeCollector(Collector):
    """Reads the node from the database on every scrape; keeps the running counts between scrapes."""

    def __init__(self, node: Node, engine: Engine) -> None:
        self.node = node
        self.config: Config = node.config
        self.engine = engine  # read-only, its own connection (storage.reports.reader_engine)
        self.sessions = make_session_factory(engine)
        self.spool: Spool = node.spool
        self.started_at = STARTED_AT
        self.cursor: Cursor | None = None
        self.received: dict[str, tuple[int, int]] = {}
        self.stages: dict[str, _Histogram] = {}
        self.time_to_result = _Histogram(RESULT_BUCKETS)
        self.delivery = _Histogram(DELIVERY_BUCKETS)
        self._lock = threading.Lock()  # two scrapes at once must not count the same rows twice

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = dt.datetime.now(dt.UTC)
            up = 1
            gauges = None
            try:
                with self.sessions() as session:
                    gauges = node_gauges(
                        session,
                        now=now,
                        fresh_after=now - dt.timedelta(seconds=self.config.http.heartbeat_stale_seconds),
                    )
                    if self.cursor is None:
                        self.cursor = cursor_at(session, self.started_at)
                    activity, self.cursor = activity_since(session, self.cursor)
                self._add(activity)
            except StorageError as exc:
                up = 0
                log.warning("metrics: database unavailable: %s", exc)
            yield GaugeMetricFamily(P + "db_up", "1 when the database answered this scrape", value=up)
            if gauges is not None:
                yield from self._gauges(gauges)
            yield from self._accumulated()
            yield from self._readiness(now, bool(up))

    def _add(self, activity: Activity) -> None:
        for ae, (n, size) in activity.received.items():
            count, total = self.received.get(ae, (0, 0))
            self.received[ae] = (count + n, total + size)
        for stage, seconds in activity.stage_seconds:
            self.stages.setdefault(stage, _Histogram(STAGE_BUCKETS)).observe(seconds)
        for seconds in activity.delivery_seconds:
            self.delivery.observe(seconds)
        for seconds in activity.time_to_result:
            self.time_to_result.observe(seconds)

    def _gauges(self, g: NodeGauges) -> Iterable[Metric]:
        studies = GaugeMetricFamily(P + "studies", "Studies by state", labels=["state"])
        for state, n in g.studies.items():
            studies.add_metric([state], n)
        jobs = GaugeMetricFamily(
            P + "jobs", "Analysis jobs by state and priority", labels=["state", "priority"]
        )
        for (state, priority), n in sorted(g.jobs.items()):
            jobs.add_metric([state, priority], n)
        deliveries = GaugeMetricFamily(
            P + "deliveries", "Outbox rows by state and destination", labels=["state", "destination"]
        )
        for (state, destination), n in sorted(g.deliveries.items()):
            deliveries.add_metric([state, destination], n)
        dead = GaugeMetricFamily(
            P + "dead_items", "Dead jobs and deliveries waiting for an operator", labels=["kind"]
        )
        dead.add_metric(["job"], g.dead_jobs)
        dead.add_metric(["delivery"], g.dead_deliveries)
        components = GaugeMetricFamily(
            P + "components",
            "Workers, dispatchers, receivers and schedulers with a fresh heartbeat, busy or idle",
            labels=["component", "state"],
        )
        for (component, state), n in sorted(g.components.items()):
            components.add_metric([component, state], n)
        yield from (studies, jobs, deliveries, dead, components)
        yield GaugeMetricFamily(
            P + "oldest_queued_job_age_seconds",
            "How long the oldest queued job has waited (0: none queued)",
            value=g.oldest_queued_seconds,
        )

    def _accumulated(self) -> Iterable[Metric]:
        instances = CounterMetricFamily(
            P + "instances_received", "Instances stored, by calling AE title", labels=["calling_ae"]
        )
        size = CounterMetricFamily(
            P + "received_bytes", "Bytes of instances stored, by calling AE title", labels=["calling_ae"]
        )
        for ae, (n, total) in sorted(self.received.items()):
            instances.add_metric([ae], n)
            size.add_metric([ae], total)
        yield instances
        yield size
        stages = HistogramMetricFamily(
            P + "pipeline_stage_seconds",
            "Time of each pipeline stage of the jobs that succeeded",
            labels=["stage"],
        )
        for stage, hist in sorted(self.stages.items()):
            stages.add_metric([stage], hist.cumulative(), hist.total)
        yield stages
        for name, text, hist in (
            (
                "time_to_result_seconds",
                "Last instance received to the job's first result delivered",
                self.time_to_result,
            ),
            ("delivery_seconds", "Result queued for a destination to delivered", self.delivery),
        ):
            family = HistogramMetricFamily(P + name, text)
            family.add_metric([], hist.cumulative(), hist.total)
            yield family

    def _readiness(self, now: dt.datetime, db_up: bool) -> Iterable[Metric]:
        """What ``/readyz`` says, as gauges (the alert rules' "not ready"), and the spool's free space."""
        components = GaugeMetricFamily(
            P + "component_ready", "Readiness of each component (see /readyz)", labels=["component"]
        )
        if db_up:
            # On the scrape's own read-only connection: a scrape never takes SQLite's write lock.
            result = readiness(self.config, self.engine, self.sessions, self.spool, now=now)
            ready = result.ready
            for name, health in sorted(result.components.items()):
                components.add_metric([name], int(health.ok))
        else:  # already known: no second wait for a database that did not answer
            ready = False
            components.add_metric(["database"], 0)
        yield GaugeMetricFamily(P + "ready", "1 when /readyz would answer 200", value=int(ready))
        yield components
        with contextlib.suppress(OSError):
            free = float(self.spool.free_bytes())
            yield GaugeMetricFamily(
                P + "spool_free_bytes", "Free bytes on the spool's file system", value=free
            )
        yield GaugeMetricFamily(
            P + "spool_min_free_bytes",
            "storage.min_free_bytes: below this much free space stores are refused (A700)",
            value=float(self.spool.min_free_bytes),
        )


def build_registry(node: Node) -> CollectorRegistry:
    """The private registry of one ``serve``: the database collector plus the receiver's instruments."""
    config = node.config
    registry = CollectorRegistry(auto_describe=False)
    engine = reader_engine(config.effective_database_url)
    registry.register(NodeCollector(node, engine))
    if config.dicom.receivers > 1:
        telemetry.shared_collector(telemetry.shared_directory(config.home), registry)
    else:
        registry.register(_Forward(telemetry.registry()))
    return registry


class _Forward(Collector):
    """Another registry's metrics, collected as part of this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect()


_build_lock = threading.Lock()


def metrics_registry(request: Request) -> CollectorRegistry:
    state = request.app.state
    with _build_lock:
        if getattr(state, "metrics_registry", None) is None:
            state.metrics_registry = build_registry(state.node)
    registry: CollectorRegistry = state.metrics_registry
    return registry


@router.get(
    "/metrics",
    summary="Prometheus metrics of the whole node",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"}},
)
def metrics(registry: Annotated[CollectorRegistry, Depends(metrics_registry)]) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
