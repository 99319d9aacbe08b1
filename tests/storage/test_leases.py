"""The leased-row mechanism, the same contract for both of its tables (jobs, deliveries) on both backends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage import events
from storage.errors import InvalidTransition
from storage.leases import LeasedTable, Leases
from storage.models import Delivery, Job
from storage.outbox import DELIVERIES, Destination
from storage.queue import JOBS, JobQueue, NewResult
from storage.retry import Backoff
from tests.support.queue_db import Clock, Db, add_job

NO_JITTER = Backoff(base_seconds=10, factor=2, max_seconds=100, jitter=0)
TABLES = {"jobs": JOBS, "deliveries": DELIVERIES}


@pytest.fixture(params=sorted(TABLES))
def table(request: pytest.FixtureRequest) -> LeasedTable[Any, Any]:
    return TABLES[request.param]


def seed(db: Db, clock: Clock, table: LeasedTable[Any, Any], count: int) -> list[int]:
    """``count`` ready rows of ``table``, each allowed 3 attempts."""
    if table is JOBS:
        return [add_job(db, at=clock.now, max_attempts=3) for _ in range(count)]
    add_job(db, at=clock.now)
    queue = JobQueue(db.sessions, clock=clock)
    claim = queue.claim("producer")
    assert claim is not None
    results = [
        NewResult(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
            sop_instance_uid=f"2.25.{claim.job.id}.{i}",
            series_instance_uid=f"2.25.{claim.job.id}.0",
            path=f"objects/x/{i}.dcm",
            size_bytes=1,
            sha256="0" * 64,
        )
        for i in range(1, count + 1)
    ]
    assert queue.succeed(claim, results, [Destination(name="pacs", peer="P@h:1")], delivery_max_attempts=3)
    with db.sessions() as session:
        return list(session.scalars(select(Delivery.id).order_by(Delivery.id)))


def row_id(session: Session, row: Job | Delivery) -> int:
    return row.id


def read(db: Db, table: LeasedTable[Any, Any], rid: int) -> Any:
    with db.sessions() as session:
        return session.get_one(table.model, rid)


def test_claim_heartbeat_reap_backoff_dead_and_operator_retry(
    db: Db, clock: Clock, table: LeasedTable[Any, Any]
) -> None:
    (rid,) = seed(db, clock, table, 1)
    leases = Leases(db.sessions, table, lease_seconds=10, backoff=NO_JITTER, clock=clock)

    first = leases.claim("w1", row_id)
    assert first is not None and first[0] == rid
    owner = first[1]
    assert leases.claim("w2", row_id) is None, "the only row is held"
    clock.advance(8)
    assert leases.heartbeat(rid, owner)
    clock.advance(8)
    assert leases.reap() == 0, "the heartbeat pushed the expiry forward"
    clock.advance(3)
    assert leases.reap() == 1
    assert read(db, table, rid).state == table.ready
    assert not leases.heartbeat(rid, owner), "a reaped lease cannot be extended"
    assert leases.fail(rid, owner, "late", permanent=False) is None, "nor settled"
    assert not leases.release(rid, owner, reason="late")

    second = leases.claim("w2", row_id)
    assert second is not None
    assert leases.fail(rid, second[1], "refused", permanent=False) == table.ready
    clock.advance(19)
    assert leases.claim("w3", row_id) is None, "the second failure backs off 20 s"
    clock.advance(1)
    third = leases.claim("w3", row_id)
    assert third is not None and read(db, table, rid).attempts == 3
    clock.advance(11)
    assert leases.reap() == 1
    dead = read(db, table, rid)
    assert (dead.state, dead.lease_owner, dead.last_error) == (
        table.dead,
        None,
        "lease expired on the last attempt (3/3)",
    )

    assert leases.retry(rid, row_id) == rid
    again = read(db, table, rid)
    assert (again.state, again.attempts) == (table.ready, 0)
    with pytest.raises(
        InvalidTransition, match=f"{table.entity} {rid} is {table.ready.value}; only .* can be retried"
    ):
        leases.retry(rid, row_id)

    with db.sessions() as session:
        trail = events.history(session, table.entity, rid)
    r, s, d = table.ready.value, table.running.value, table.dead.value
    assert [e.kind for e in trail] == [r, s, r, s, r, s, d, r]
    assert '"owner": "w1/' in trail[2].detail, "the reaper names the holder it took the lease from"


def test_concurrent_claimers_take_each_row_exactly_once(
    db: Db, clock: Clock, table: LeasedTable[Any, Any]
) -> None:
    ids = seed(db, clock, table, 24)
    leases = Leases(db.sessions, table, lease_seconds=60, backoff=NO_JITTER, clock=clock)

    def claimer(name: str) -> list[int]:
        mine = []
        while (claimed := leases.claim(name, row_id)) is not None:
            mine.append(claimed[0])
        return mine

    with ThreadPoolExecutor(max_workers=4) as pool:
        claimers = [pool.submit(claimer, f"w{i}") for i in range(4)]
        taken = [rid for done in claimers for rid in done.result(timeout=120)]
    assert sorted(taken) == ids, "every row claimed, none twice"
