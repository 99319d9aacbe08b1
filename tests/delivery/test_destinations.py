"""Destinations behind one protocol, and failures contained to their own rows (issue 11, items 13, 16).

Real peers: dcmtk storescp, pynetdicom Storage SCPs that check the called AE title.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from daemon.config import DestinationConfig
from daemon.delivery import registry
from daemon.delivery.base import Outgoing, Permanent, Transient
from daemon.delivery.dispatcher import DispatchThreads
from daemon.polling import run_until_stopped
from storage.models import DeliveryState
from storage.outbox import DeliveryView
from tests.support.delivery import PickyPacs, destination_toml, make_multi_node
from tests.support.peers import free_port
from tests.support.process import wait_until
from tests.support.queue_db import Db
from tests.support.stored import events
from tests.support.storescp import Storescp


def _dicom(name: str, address: str, **extra: object) -> DestinationConfig:
    ae, rest = address.split("@")
    host, port = rest.rsplit(":", 1)
    return DestinationConfig.model_validate(
        {"name": name, "ae_title": ae, "host": host, "port": int(port), **extra}
    )


def test_the_dicom_adapter_checks_and_sends_and_says_transient_or_permanent(
    tmp_path: Path, storescp: Storescp
) -> None:
    """send() and check() of the C-STORE adapter against real peers, each failure typed."""
    pacs = registry.build(_dicom("pacs", storescp.destination), calling_ae="PACS_TRIAGE")
    with pytest.raises(Transient, match="could not associate"):
        pacs.check()  # nothing listens yet
    storescp.start()
    pacs.check()
    from tests.support.queue_db import ct_series

    (image,) = ct_series(tmp_path / "img", "2.25.1", "2.25.1.1", 1)
    accepted = pacs.send(Outgoing(delivery_id=1, sop_instance_uid="2.25.1.1.1", path=image))
    assert accepted.status == 0 and len(storescp.files()) == 1
    picky = PickyPacs()
    with picky.running():
        wrong = registry.build(_dicom("wrong", f"NOT_PICKY@127.0.0.1:{picky.port}"), calling_ae="PACS_TRIAGE")
        with pytest.raises(Permanent, match="Called AE title not recognised"):
            wrong.check()
        with pytest.raises(Permanent, match="Called AE title not recognised"):
            wrong.send(Outgoing(delivery_id=1, sop_instance_uid="2.25.1.1.1", path=image))
    broken = registry.build(
        _dicom("broken", storescp.destination, tls=True, ca_certificates=str(tmp_path / "missing-ca.crt")),
        calling_ae="PACS_TRIAGE",
    )
    with pytest.raises(Permanent, match="missing-ca.crt"):
        broken.send(Outgoing(delivery_id=1, sop_instance_uid="2.25.1.1.1", path=image))


def test_wrong_called_ae_is_dead_at_once_with_the_reason(db: Db, tmp_path: Path) -> None:
    """Item 16: a PACS that rejects our called AE title (rejected-permanent) is not retried for an hour."""
    picky = PickyPacs()
    node = make_multi_node(db, tmp_path, [destination_toml("pacs", f"WRONG_AE@127.0.0.1:{picky.port}")])
    node.produce_result()
    with picky.running():
        assert node.dispatcher.send_one()
        assert not node.dispatcher.send_one(), "nothing left to retry"
    (row,) = node.deliveries()
    assert (row.state, row.attempts) == (DeliveryState.DEAD, 1)
    assert row.last_error is not None and "Called AE title not recognised" in row.last_error
    assert "ae_title" in row.last_error, "the reason says what to fix"
    assert picky.stored == []
    dead = [d for e, i, k, d in events(db.url) if (e, i, k) == ("delivery", str(row.id), "dead")]
    assert len(dead) == 1 and "Called AE title not recognised" in dead[0]


def test_a_broken_destination_does_not_starve_the_healthy_ones(
    db: Db, tmp_path: Path, storescp: Storescp, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 13: a TLS destination whose CA file is missing kills no dispatcher thread; its rows are
    dead with the reason, and every row of the healthy destination is delivered."""
    storescp.start()
    missing = tmp_path / "no-such-ca.crt"
    node = make_multi_node(
        db,
        tmp_path,
        [
            destination_toml(
                "broken", f"TLS_PACS@127.0.0.1:{free_port()}", tls=True, ca_certificates=str(missing)
            ),
            destination_toml("healthy", storescp.destination),
        ],
        threads=2,
    )
    studies = [node.produce_result() for _ in range(3)]
    dispatch = DispatchThreads(node.worker.config, node.outbox, node.dispatcher.results)
    dispatch.start()
    try:

        def settled() -> list[DeliveryView] | None:
            rows = node.deliveries()
            final = (DeliveryState.DELIVERED, DeliveryState.DEAD)
            return rows if rows and all(r.state in final for r in rows) else None

        done = wait_until(
            settled,
            timeout=60,
            what="every delivery to be settled",
            interval=0.1,
        )
        assert all(t.is_alive() for t in dispatch.threads), "a dispatcher thread died"
    finally:
        dispatch.stop(timeout=10)
    by_destination = {name: [r for r in done if r.destination == name] for name in ("broken", "healthy")}
    assert len(by_destination["healthy"]) == len(studies) == len(by_destination["broken"])
    assert all(r.state is DeliveryState.DELIVERED for r in by_destination["healthy"])
    for row in by_destination["broken"]:
        assert (row.state, row.attempts) == (DeliveryState.DEAD, 1)
        assert row.last_error is not None and str(missing) in row.last_error
    assert len(storescp.files()) == len(studies)


def test_a_loop_that_crashes_is_reported_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """Anything a step raises is logged as an ERROR with its traceback, and the loop starts again."""
    stop = threading.Event()
    calls: list[int] = []

    def step() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom in a destination adapter")
        stop.set()
        return True

    with caplog.at_level(logging.ERROR, logger="daemon.polling"):
        restarts = run_until_stopped(stop, step, idle_seconds=0.01, who="dispatcher t", crash_pause_seconds=0)
    assert restarts == 1 and len(calls) == 2
    (record,) = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Dispatch is daemon logic; the outbox itself is tested on both databases in tests/storage."""
    return f"sqlite:///{tmp_path / 'test.db'}"
