"""Retention racing a resend of the study it purges (issue 15 review).

``retention.purge`` commits the removal of a study's rows, then removes its files. A PACS that
sends the study again in between finds the instance's bytes still in place, records a row that
names that file and acknowledges; the purge must not then remove the file
(storage/file_records.py: a file is removed only under the instance lock, when no row names it).
The interleaving is made exact by a spool whose first removal lets the resend run first; where
the purge holds the instance lock at that moment, the resend waits for it. SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from storage import retention
from storage.db import make_engine, make_session_factory
from storage.ingest import Ingest, StoreOutcome
from storage.migrate import upgrade
from storage.models import Study, StudyState
from storage.spool import Spool
from tests.storage.test_power_cut import AFTER, BEFORE, S1, SE1, T0
from tests.support.instances import ct_chunks, ct_dataset, ct_incoming
from tests.support.stored import assert_spool_consistent


class _ResendFirst(Spool):
    """A spool whose first ``remove`` first lets ``resend`` run (on another thread) or block."""

    resend: Ingest | None = None
    outcome: list[StoreOutcome] = []

    def remove(self, relative_path: str) -> None:
        if self.resend is not None:
            ingest, self.resend = self.resend, None
            ds = ct_dataset("1.2.9.1.1.1", SE1, S1, patient="P1", fill=1)
            store = threading.Thread(
                target=lambda: self.outcome.append(ingest.store(ct_incoming(ds), ct_chunks(ds), AFTER))
            )
            store.start()
            store.join(timeout=5)  # returns at once unless the purge holds the instance lock
            self.thread = store
        super().remove(relative_path)


def test_a_resend_between_the_purge_commit_and_its_file_removal_keeps_its_file(
    database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    spool = _ResendFirst(tmp_path / "spool")
    spool.open()
    spool.outcome = []
    ingest = Ingest(sessions, spool)
    ds = ct_dataset("1.2.9.1.1.1", SE1, S1, patient="P1", fill=1)
    assert ingest.store(ct_incoming(ds), ct_chunks(ds), BEFORE, received_at=T0) is StoreOutcome.STORED
    with sessions.begin() as session:
        session.query(Study).update({"state": StudyState.NOT_ROUTED, "completed_at": T0})
    with sessions() as session:
        (study_id,) = session.query(Study.id).one()

    spool.resend = Ingest(sessions, spool)
    now = T0 + dt.timedelta(days=30)
    cutoffs = retention._Cutoffs.of(retention.Periods(not_routed_days=7), now)
    purged = retention.purge(sessions, spool, Spool(tmp_path / "results"), study_id, cutoff=cutoffs, now=now)
    spool.thread.join(timeout=60)
    engine.dispose()

    assert purged is not None and spool.outcome == [StoreOutcome.STORED]  # the resend was acknowledged
    rows = assert_spool_consistent(tmp_path / "spool", database_url)  # its row names an existing file
    assert set(rows) == {ds.SOPInstanceUID}
