"""Receivers on several hosts share one spool (deploy/compose.yaml, DESIGN "Scale") (issue 15 review).

A receiver keeps a pool of empty slot files (storage/slots.py). Another host's start treats
slots of other hosts older than ``STALE_TMP_SECONDS`` as abandoned and removes the empty ones,
which includes the idle spares of a receiver that is alive (a quiet night). Its next stores must
still succeed, not be refused because their slot vanished. The other host is a real process
whose host name differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from storage.db import make_engine, make_session_factory
from storage.ingest import Ingest, StoreOutcome
from storage.migrate import upgrade
from storage.slots import STALE_TMP_SECONDS
from storage.spool import Spool
from tests.storage.test_power_cut import AFTER, S1, SE1
from tests.support.instances import ct_chunks, ct_dataset, ct_incoming
from tests.support.stored import assert_spool_consistent

OTHER_HOST_START = """
import sys
from pathlib import Path
import storage.slots
storage.slots.HOST = "other-host"  # what socket.gethostname() gives on the other host
from storage.spool import Spool
Spool(Path(sys.argv[1])).open()
"""


def test_idle_slots_removed_by_another_hosts_start_do_not_refuse_stores(
    database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.open()
    ingest = Ingest(make_session_factory(engine), spool)
    first = ct_dataset("1.2.9.1.1.1", SE1, S1, patient="P1", fill=1)
    assert ingest.store(ct_incoming(first), ct_chunks(first), AFTER) is StoreOutcome.STORED
    spares = list((root / "slots").iterdir())
    assert spares  # this receiver's idle slots
    idle_since = time.time() - STALE_TMP_SECONDS - 60
    for slot in spares:
        os.utime(slot, (idle_since, idle_since))

    out = subprocess.run(
        [sys.executable, "-c", OTHER_HOST_START, str(root)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr

    for n in range(2, 5):
        ds = ct_dataset(f"1.2.9.1.1.{n}", SE1, S1, patient="P1", fill=n)
        assert ingest.store(ct_incoming(ds), ct_chunks(ds), AFTER) is StoreOutcome.STORED
    engine.dispose()
    assert len(assert_spool_consistent(root, database_url)) == 4
