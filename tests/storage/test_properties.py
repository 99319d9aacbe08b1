"""Property tests: the backoff policy, and the queue's state machine driven by random operations."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import select

from storage.db import make_engine, make_session_factory
from storage.errors import InvalidTransition
from storage.migrate import upgrade
from storage.models import Base, Event, Job, JobState
from storage.outbox import DELIVERY_MOVES
from storage.queue import JOB_MOVES, Claim, JobQueue
from storage.retry import Backoff
from tests.support.queue_db import Clock, Db, add_job

policies = st.builds(
    Backoff,
    base_seconds=st.floats(0, 100),
    factor=st.floats(1, 10),
    max_seconds=st.floats(100, 10_000),
    jitter=st.floats(0, 1),
)


@given(policies, st.integers(1, 10_000), st.integers(0, 2**32))
def test_backoff_is_bounded_and_within_the_jitter(policy: Backoff, attempts: int, seed: int) -> None:
    delay = policy.delay(attempts, random.Random(seed))
    nominal = policy.nominal(attempts)
    assert 0 <= delay <= policy.max_seconds
    assert (
        nominal * (1 - policy.jitter) - 1e-9
        <= delay
        <= min(policy.max_seconds, nominal * (1 + policy.jitter)) + 1e-9
    )


@given(policies, st.integers(1, 10_000))
def test_backoff_never_shrinks_without_jitter(policy: Backoff, attempts: int) -> None:
    assert policy.nominal(attempts) <= policy.nominal(attempts + 1) <= policy.max_seconds
    assert policy.nominal(1) == min(policy.base_seconds, policy.max_seconds)


@given(st.floats(-10, -0.001) | st.floats(1.001, 5))
def test_backoff_rejects_bad_jitter(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=jitter)


def test_state_tables_are_closed_and_final_states_final() -> None:
    for table in (JOB_MOVES, DELIVERY_MOVES):
        for state, targets in table.items():
            assert state not in targets
            assert targets <= set(table)
    assert JOB_MOVES[JobState.SUPERSEDED] == frozenset()
    # Every state can reach "queued" again except those that are final by design.
    assert {s for s, t in JOB_MOVES.items() if JobState.QUEUED in t} == {
        JobState.RUNNING,
        JobState.FAILED,
        JobState.DEAD,
        JobState.CANCELLED,
    }


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    url = f"sqlite:///{tmp_path_factory.mktemp('props') / 'q.db'}"
    engine = make_engine(url)
    upgrade(engine)
    yield Db(url, engine, make_session_factory(engine))
    engine.dispose()


class QueueMachine(RuleBasedStateMachine):
    """Random claims, heartbeats, failures, reaps and operator moves against a real SQLite queue."""

    db: Db

    def __init__(self) -> None:
        super().__init__()
        # Every example starts from the same, empty database and a fixed clock, with no jitter:
        # Hypothesis replays examples and needs them to behave the same way.
        with self.db.engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                if table.name != "alembic_version":
                    conn.execute(table.delete())
        self.clock = Clock()
        self.queue = JobQueue(
            self.db.sessions,
            lease_seconds=10,
            clock=self.clock,
            backoff=Backoff(base_seconds=1, max_seconds=8, jitter=0),
        )
        self.job_ids = [add_job(self.db, at=self.clock.now, max_attempts=3) for _ in range(3)]
        self.claims: list[Claim] = []

    @rule()
    def claim(self) -> None:
        claim = self.queue.claim("w")
        if claim is not None:
            assert claim.job.state is JobState.RUNNING and claim.job.attempts <= claim.job.max_attempts
            self.claims.append(claim)

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), outcome=st.sampled_from(["succeed", "transient", "permanent", "release", "beat"]))
    def settle(self, data: st.DataObject, outcome: str) -> None:
        claim = data.draw(st.sampled_from(self.claims))
        if outcome == "succeed":
            self.queue.succeed(claim, [], [])
        elif outcome == "transient":
            self.queue.fail(claim, "transient", permanent=False)
        elif outcome == "permanent":
            self.queue.fail(claim, "permanent", permanent=True)
        elif outcome == "release":
            self.queue.release(claim, reason="test")
        else:
            self.queue.heartbeat(claim)

    @rule(seconds=st.floats(0, 15))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.queue.reap()

    @rule(data=st.data(), move=st.sampled_from(["retry", "cancel"]))
    def operator(self, data: st.DataObject, move: str) -> None:
        job_id = data.draw(st.sampled_from(self.job_ids))
        try:
            getattr(self.queue, move)(job_id)
        except InvalidTransition:
            pass

    @invariant()
    def consistent(self) -> None:
        with self.db.sessions() as session:
            for job in session.scalars(select(Job).where(Job.id.in_(self.job_ids))):
                running = job.state == JobState.RUNNING
                assert (job.lease_owner is not None) == running, job.state
                assert (job.lease_expires_at is not None) == running
                assert 0 <= job.attempts <= job.max_attempts
                if job.state == JobState.DEAD:
                    assert job.attempts == job.max_attempts
                last = session.scalars(
                    select(Event)
                    .where(Event.entity == "job", Event.entity_id == str(job.id))
                    .order_by(Event.id.desc())
                ).first()
                assert last is not None and last.kind == job.state, "the audit log ends in the current state"
            for kind, detail in session.execute(
                select(Event.kind, Event.detail).where(
                    Event.entity == "job", Event.entity_id.in_([str(i) for i in self.job_ids])
                )
            ):
                previous = json.loads(detail).get("previous") if detail else None
                if previous is not None:
                    assert JobState(kind) in JOB_MOVES[JobState(previous)], f"{previous} -> {kind}"


def test_queue_state_machine(shared_db: Db) -> None:
    QueueMachine.db = shared_db
    run = QueueMachine.TestCase
    run.settings = settings(
        max_examples=25,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    run().runTest()
