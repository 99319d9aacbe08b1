"""``/metrics`` scraped by a real Prometheus; the alert rules checked by ``promtool``.

A running ``serve`` (SQLite and PostgreSQL) is scraped every second by Prometheus on loopback;
dcmtk ``storescu`` sends a study; PromQL through Prometheus's HTTP API must return the instance
count just sent (by calling AE), the job the study queued (jobs by state), and the database up.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import HEAD_CT, as_worker, queued_job, start_http_node, study_uid
from tests.support.peers import storescu
from tests.support.pki import Pki
from tests.support.process import REPO, wait_until
from tests.support.prometheus import promtool_binary, running_prometheus

pytestmark = pytest.mark.peer

RULES = REPO / "deploy" / "prometheus" / "pacs-triage.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "pacs-triage.json"


def test_prometheus_sees_instances_sent_and_jobs_by_state(tmp_path: Path, database_url: str) -> None:
    (tmp_path / "node").mkdir()
    node = start_http_node(tmp_path / "node", database_url=database_url)
    try:
        target = node.base_url.removeprefix("http://")
        with running_prometheus(tmp_path / "prometheus", [target]) as prometheus:
            wait_until(prometheus.targets_up, timeout=60, what="Prometheus to scrape /metrics", interval=0.5)
            assert prometheus.value("pacs_triage_db_up") == 1.0
            # Nothing received yet: the counter exists only once an AE has sent something.
            assert (
                prometheus.value('sum(pacs_triage_instances_received_total{calling_ae="METRICS_SCU"})')
                is None
            )

            # The C-ECHOs that waited for the service were associations too.
            echoes = prometheus.value("pacs_triage_associations_total")
            assert echoes is not None and echoes >= 1
            out = storescu(node.service.port, HEAD_CT, calling_ae="METRICS_SCU")
            assert out.returncode == 0, out.stderr
            job_id = queued_job(database_url, study_uid(HEAD_CT))

            def counted(promql: str, want: float) -> bool:
                return prometheus.value(promql) == want

            wait_until(
                lambda: counted('sum(pacs_triage_instances_received_total{calling_ae="METRICS_SCU"})', 3.0),
                timeout=60,
                what="Prometheus to count the 3 instances sent",
                interval=0.5,
            )
            sizes = sum(p.stat().st_size for p in HEAD_CT)
            received_bytes = prometheus.value('pacs_triage_received_bytes_total{calling_ae="METRICS_SCU"}')
            assert received_bytes is not None and 0.9 * sizes < received_bytes <= sizes
            wait_until(
                lambda: counted('sum(pacs_triage_jobs{state="queued"})', 1.0),
                timeout=60,
                what="Prometheus to see the queued job",
                interval=0.5,
            )
            assert prometheus.value('pacs_triage_studies{state="complete"}') == 1.0
            assert prometheus.value("pacs_triage_associations_total") == echoes + 1
            assert prometheus.value("pacs_triage_store_seconds_count") == 3.0

            # Every query of the Grafana dashboard is valid PromQL for this Prometheus.
            for expr in _dashboard_queries():
                prometheus.query(expr)

            # The test acts as the worker: the job dies; jobs by state and dead items follow.
            as_worker(database_url, job_id, succeed=False)
            wait_until(
                lambda: (
                    counted('sum(pacs_triage_jobs{state="dead"})', 1.0)
                    and counted('pacs_triage_dead_items{kind="job"}', 1.0)
                    and counted('sum(pacs_triage_jobs{state="queued"})', 0.0)
                ),
                timeout=60,
                what="Prometheus to see the job dead",
                interval=0.5,
            )
    finally:
        node.close()
        node.service.stop(timeout=30)


def test_metrics_text_names_every_family(tmp_path: Path) -> None:
    """The exposition parses and carries every family the rules and the dashboard use."""
    node = start_http_node(tmp_path)
    try:
        out = storescu(node.service.port, HEAD_CT[:1], calling_ae="TEXT_SCU")
        assert out.returncode == 0, out.stderr
        queued_job(node.service.database_url, study_uid(HEAD_CT))
        response = httpx.get(node.base_url + "/metrics", timeout=15.0)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        for name in (
            "pacs_triage_db_up",
            "pacs_triage_studies",
            "pacs_triage_jobs",
            "pacs_triage_oldest_queued_job_age_seconds",
            "pacs_triage_deliveries",
            "pacs_triage_dead_items",
            "pacs_triage_components",
            "pacs_triage_spool_free_bytes",
            "pacs_triage_instances_received",
            "pacs_triage_received_bytes",
            "pacs_triage_pipeline_stage_seconds",
            "pacs_triage_time_to_result_seconds",
            "pacs_triage_delivery_seconds",
            "pacs_triage_refusals",
            "pacs_triage_associations",
            "pacs_triage_associations_rejected",
            "pacs_triage_associations_active",
            "pacs_triage_tls_handshake_failures",
            "pacs_triage_store_seconds",
            "pacs_triage_ready",
            "pacs_triage_component_ready",
            "pacs_triage_spool_min_free_bytes",
        ):
            assert name in families, f"{name} missing from /metrics"
        for name in _names_used(RULES.read_text() + DASHBOARD.read_text()):
            base = (
                name.removesuffix("_total")
                .removesuffix("_bucket")
                .removesuffix("_count")
                .removesuffix("_sum")
            )
            assert base in families, f"{name} is used by deploy/ but not exported"
        received = families["pacs_triage_instances_received"].samples
        assert [(s.labels, s.value) for s in received if s.name.endswith("_total")] == [
            ({"calling_ae": "TEXT_SCU"}, 1.0)
        ]
        # A worker on another host records its stage timings in the database; they reach /metrics.
    finally:
        node.close()
        node.service.stop(timeout=30)


def test_metrics_survive_a_stopped_database(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL gone: the scrape still answers, with db_up 0 and the spool figure."""
    import sqlalchemy

    node = start_http_node(tmp_path, database_url=pg_url)
    try:
        assert "pacs_triage_db_up 1.0" in httpx.get(node.base_url + "/metrics", timeout=15.0).text
        database = sqlalchemy.make_url(pg_url).database
        admin = sqlalchemy.create_engine(
            "postgresql+psycopg://127.0.0.1:5432/test", isolation_level="AUTOCOMMIT"
        )
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
                conn.exec_driver_sql(
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
                )
            text = httpx.get(node.base_url + "/metrics", timeout=30.0).text
            assert "pacs_triage_db_up 0.0" in text
            assert "pacs_triage_spool_free_bytes" in text
            assert "pacs_triage_jobs{" not in text
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            admin.dispose()
        wait_until(
            lambda: "pacs_triage_db_up 1.0" in httpx.get(node.base_url + "/metrics", timeout=30.0).text,
            timeout=30,
            what="db_up back to 1",
        )
    finally:
        node.close()
        node.service.stop(timeout=30)


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"].replace("$instance", ".*")
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def _names_used(text: str) -> set[str]:
    import re

    return set(re.findall(r"\bpacs_triage_[a-z_]+", text))


def test_alert_rules_pass_promtool() -> None:
    out = subprocess.run(
        [promtool_binary(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 4 rules found" in out.stdout, out.stdout


def test_alert_rules_fire_in_promtool_unit_tests(tmp_path: Path) -> None:
    """``promtool test rules``: each alert fires on series that should trigger it, not before."""
    import yaml  # PyYAML comes with the dev extras (openapi-spec-validator)

    node = {"job": "pacs-triage", "instance": "a"}

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        body = ",".join(f'{k}="{v}"' for k, v in {**node, **labels}.items())
        return {"series": f"{name}{{{body}}}", "values": values}

    descriptions = {
        rule["alert"]: " ".join(rule["annotations"]["description"].split())
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }

    def fires(alert: str, summary: str, **labels: str) -> dict[str, object]:
        return {
            "eval_time": "15m",
            "alertname": alert,
            "exp_alerts": [
                {
                    "exp_labels": {**node, **labels},
                    "exp_annotations": {"summary": summary, "description": descriptions[alert]},
                }
            ],
        }

    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("up", "1x20"),
                    series("pacs_triage_ready", "1x5 0x15"),
                    series("pacs_triage_dead_items", "0x5 2x15", kind="job"),
                    series("pacs_triage_oldest_queued_job_age_seconds", "0+120x20"),
                    series("pacs_triage_spool_free_bytes", "100e9x5 1e9x15"),
                    series("pacs_triage_spool_min_free_bytes", "1e9x20"),
                ],
                "alert_rule_test": [
                    *({"eval_time": "4m", "alertname": alert, "exp_alerts": []} for alert in descriptions),
                    fires("PacsTriageNotReady", "pacs-triage a is not ready", severity="critical"),
                    fires("PacsTriageDeadItems", "2 dead job(s) on a", severity="warning", kind="job"),
                    fires("PacsTriageQueueStuck", "oldest queued job waits 30m 0s on a", severity="warning"),
                    fires("PacsTriageDiskLow", "spool of a has 953.7MiB free", severity="critical"),
                ],
            }
        ],
    }
    path = tmp_path / "rules_test.yml"
    path.write_text(json.dumps(tests, indent=1))  # JSON is YAML
    out = subprocess.run(
        [promtool_binary(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_timings_of_workers_anywhere_reach_metrics_from_the_database(
    tmp_path: Path, database_url: str
) -> None:
    """A worker and a dispatcher that are not this process (here: the test, through the real queue and
    outbox) record stage timings and a delivery; /metrics turns them into histograms."""
    from storage.db import make_engine, make_session_factory
    from storage.outbox import Destination, Outbox
    from storage.queue import JobQueue, NewResult

    node = start_http_node(tmp_path, database_url=database_url)
    engine = make_engine(database_url)
    try:
        out = storescu(node.service.port, HEAD_CT, calling_ae="TIMING_SCU")
        assert out.returncode == 0, out.stderr
        job_id = queued_job(database_url, study_uid(HEAD_CT))
        sessions = make_session_factory(engine)
        queue = JobQueue(sessions)
        claim = queue.claim("remote-gpu-worker")
        assert claim is not None and claim.job.id == job_id
        assert queue.succeed(
            claim,
            [
                NewResult(
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                    sop_instance_uid="2.25.1234567",
                    series_instance_uid="2.25.1234568",
                    path="results/x.dcm",
                    size_bytes=10,
                    sha256="0" * 64,
                )
            ],
            [Destination(name="pacs", peer="PACS@127.0.0.1:104")],
            stage_seconds={"load": 0.3, "inference": 42.0},
        )
        outbox = Outbox(sessions)
        sending = outbox.claim("remote-dispatcher")
        assert sending is not None
        assert outbox.delivered(sending, 0)

        def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            text = httpx.get(node.base_url + "/metrics", timeout=15.0).text
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            found = samples()
            return found if found.get(("pacs_triage_delivery_seconds_count", ())) == 1.0 else None

        found = wait_until(counted, timeout=30, what="the delivery counted in /metrics")
        stage = (("stage", "inference"),)
        assert found[("pacs_triage_pipeline_stage_seconds_count", stage)] == 1.0
        assert found[("pacs_triage_pipeline_stage_seconds_sum", stage)] == 42.0
        assert found[("pacs_triage_pipeline_stage_seconds_bucket", (("le", "30.0"), *stage))] == 0.0
        assert found[("pacs_triage_pipeline_stage_seconds_bucket", (("le", "60.0"), *stage))] == 1.0
        assert found[("pacs_triage_time_to_result_seconds_count", ())] == 1.0
        assert found[("pacs_triage_deliveries", (("destination", "pacs"), ("state", "delivered")))] == 1.0
        # Counted once: a later scrape does not count the same rows again.
        assert samples()[("pacs_triage_pipeline_stage_seconds_count", stage)] == 1.0
    finally:
        engine.dispose()
        node.close()
        node.service.stop(timeout=30)


def test_receiver_processes_are_summed(tmp_path: Path) -> None:
    """dicom.receivers = 2: the receiver children's counters reach the one /metrics (multiprocess files)."""
    node = start_http_node(tmp_path, env={"PACS_TRIAGE_DICOM__RECEIVERS": "2"})
    try:
        for files in (HEAD_CT[:1], HEAD_CT[1:]):  # two associations: the kernel may give each to either child
            out = storescu(node.service.port, files, calling_ae="MULTI_SCU")
            assert out.returncode == 0, out.stderr

        def stored() -> dict[str, float] | None:
            text = httpx.get(node.base_url + "/metrics", timeout=15.0).text
            values = {
                s.name: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if not s.labels or s.name.endswith("_total")
            }
            return values if values.get("pacs_triage_store_seconds_count") == 3.0 else None

        values = wait_until(stored, timeout=30, what="3 stores counted across receiver processes")
        assert values["pacs_triage_associations_total"] >= 2.0
    finally:
        node.close()
        node.service.stop(timeout=30)


def test_refusals_rejections_and_tls_failures_are_counted(tmp_path: Path, pki: Pki) -> None:
    """Each receiver-side failure moves its counter: a refused C-STORE (by status), a rejected
    association (by reason), a failed TLS handshake (also logged with the peer's address)."""
    import socket

    from tests.support.dicom_bytes import associate, dataset_bytes, raw_c_store
    from tests.support.peers import free_port

    tls_port = free_port()
    node = start_http_node(
        tmp_path,
        env={
            "PACS_TRIAGE_TLS__ENABLED": "true",
            "PACS_TRIAGE_TLS__PORT": str(tls_port),
            "PACS_TRIAGE_TLS__CERTIFICATE": str(pki.server_cert),
            "PACS_TRIAGE_TLS__PRIVATE_KEY": str(pki.server_key),
            "PACS_TRIAGE_TLS__CA_CERTIFICATES": str(pki.ca),
        },
    )
    try:
        ct = "1.2.840.10008.5.1.4.1.1.2"
        assoc = associate(node.service.port, [(ct, "1.2.840.10008.1.2.1")])
        assert assoc.is_established
        try:
            data = dataset_bytes(HEAD_CT[0])
            # The request names another instance than the data set: refused with A900.
            response = raw_c_store(assoc, data, sop_class=ct, sop_instance="2.25.42")
            assert response.status == 0xA900, response
        finally:
            assoc.release()
        rejected = associate(node.service.port, called_ae="NOT_OUR_AE")
        assert not rejected.is_established
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
            raw.sendall(b"this is not a TLS ClientHello\r\n\r\n")
            raw.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                raw.recv(1024)  # the server closes (or resets) once the handshake failed

        def counts() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            text = httpx.get(node.base_url + "/metrics", timeout=15.0).text
            found = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            return found if found.get(("pacs_triage_tls_handshake_failures_total", ())) else None

        found = wait_until(counts, timeout=30, what="the TLS failure counted")
        assert found[("pacs_triage_tls_handshake_failures_total", ())] == 1.0
        assert found[("pacs_triage_refusals_total", (("status", "0xA900"),))] == 1.0
        reason = (("reason", "called_ae_not_recognised"),)
        assert found[("pacs_triage_associations_rejected_total", reason)] == 1.0
        assert found[("pacs_triage_associations_active", ())] == 0.0
        wait_until(
            lambda: "TLS handshake with 127.0.0.1 failed" in node.service.log_text(),
            timeout=10,
            what="the TLS failure logged with the peer's address",
        )
    finally:
        node.close()
        node.service.stop(timeout=30)
