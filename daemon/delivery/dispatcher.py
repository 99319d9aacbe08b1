"""Dispatch: claim an outbox row, hand its result to the row's destination adapter, record the outcome.

The dispatcher knows no protocol: ``registry.build`` gives the adapter for a destination's
``kind`` (``base.Destination``), and the adapter says *delivered*, :class:`Transient` or
:class:`Permanent`. The outbox row owns attempts, backoff and the dead letter:

* delivered: the row is ``delivered`` (a warning from the peer is kept in the audit log);
* Transient: back to ``pending`` after a backoff, ``dead`` when its attempts are used up;
* Permanent: ``dead`` at once, with the reason (``pacs-triage deliveries retry`` once fixed);
* anything else an adapter raises (a bug) is contained the same way: this row fails (retried),
  with the exception in its error, and the loop goes on with the next row.

A send holds its row under a lease that a heartbeat thread extends while the send runs, so a
lease can be short (``dispatch.lease_seconds``) whatever the object's size: a dispatcher that
dies is noticed within a lease and the row is sent again. That re-send is counted (the reaper's
``lease_expired`` event, ``pacs-triage status``); a result's UIDs are deterministic, so it is a
duplicate the PACS ignores.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from daemon.config import Config, DestinationConfig
from daemon.delivery import registry
from daemon.delivery.base import Accepted, DeliveryFailure, Destination, Outgoing, Permanent
from daemon.logs import bound_ids, ref
from daemon.polling import run_until_stopped
from storage.errors import StorageError
from storage.leases import worker_name
from storage.outbox import DeliveryClaim, Outbox
from storage.spool import Spool

log = logging.getLogger(__name__)

RESTART_PAUSE_SECONDS = 5.0


class Dispatcher:
    """Claims due deliveries and sends them; run one per dispatch thread."""

    def __init__(self, config: Config, outbox: Outbox, results: Spool, *, name: str | None = None) -> None:
        self.config = config
        self.outbox = outbox
        self.results = results
        self.name = name or worker_name("dispatch")
        self.stop = threading.Event()

    def run(self) -> None:
        """Send due deliveries until :attr:`stop` is set."""
        run_until_stopped(
            self.stop,
            self.send_one,
            idle_seconds=self.config.dispatch.poll_seconds,
            who=f"dispatcher {self.name}",
        )

    def send_one(self) -> bool:
        """Claim one due delivery and attempt it; False when none was due."""
        claim = self.outbox.claim(self.name)
        if claim is None:
            return False
        with bound_ids(delivery_id=claim.delivery.id, job_id=claim.delivery.job_id):
            self._attempt(claim)
        return True

    def _attempt(self, claim: DeliveryClaim) -> None:
        d = claim.delivery
        try:
            destination = self._destination(d.destination, d.id)
            item = self._outgoing(claim)
            with self._heartbeat(claim):
                accepted = destination.send(item)
        except DeliveryFailure as exc:
            self._failed(claim, exc.reason, status=exc.status, permanent=isinstance(exc, Permanent))
            return
        except StorageError:
            raise  # the loop pauses while the database is away; the lease brings the row back
        except Exception as exc:  # an adapter's bug stays with its own row
            log.exception("delivery %d: the %r adapter failed unexpectedly", d.id, d.destination)
            self._failed(
                claim, f"unexpected error in the {d.destination!r} adapter: {type(exc).__name__}: {exc}"
            )
            return
        self._delivered(claim, destination, accepted)

    def _destination(self, name: str, delivery_id: int) -> Destination:
        config: DestinationConfig | None = next(
            (x for x in self.config.all_destinations if x.name == name), None
        )
        if config is None:
            raise Permanent(
                f"destination {name!r} is no longer configured; add it back and run "
                f"`pacs-triage deliveries retry {delivery_id}`"
            )
        return registry.build(config, calling_ae=self.config.ae_title)

    def _outgoing(self, claim: DeliveryClaim) -> Outgoing:
        d = claim.delivery
        if d.path is None or not self.results.path_of(d.path).is_file():
            raise Permanent(
                f"result file of {d.sop_instance_uid} is missing from the spool ({d.path}); "
                "retry the job with `pacs-triage jobs retry`"
            )
        return Outgoing(
            delivery_id=d.id,
            sop_instance_uid=d.sop_instance_uid,
            path=self.results.path_of(d.path),
            content=d.content,
        )

    @contextlib.contextmanager
    def _heartbeat(self, claim: DeliveryClaim) -> Iterator[None]:
        """Extend the row's lease while the send runs (a large object may take longer than a lease)."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.config.dispatch.heartbeat_interval):
                try:
                    if not self.outbox.heartbeat(claim):
                        log.warning("delivery %d: lease lost while sending", claim.delivery.id)
                        return
                except StorageError as exc:
                    log.warning("delivery %d: heartbeat failed: %s", claim.delivery.id, exc)

        thread = threading.Thread(target=beat, name=f"{self.name}-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _delivered(self, claim: DeliveryClaim, destination: Destination, accepted: Accepted) -> None:
        d = claim.delivery
        if self.outbox.delivered(claim, accepted.status, comment=accepted.warning):
            log.info(
                "delivery %d: %s stored by %s (0x%04X)",
                d.id,
                ref(d.sop_instance_uid),
                destination,
                accepted.status,
            )
        else:
            log.warning(
                "delivery %d: sent, but its lease was lost meanwhile (another dispatcher owns it)", d.id
            )

    def _failed(
        self, claim: DeliveryClaim, error: str, *, status: int | None = None, permanent: bool = False
    ) -> None:
        state = self.outbox.failed(claim, error, status=status, permanent=permanent)
        log.warning(
            "delivery %d (attempt %d/%d) failed%s: %s -> %s",
            claim.delivery.id,
            claim.delivery.attempts,
            claim.delivery.max_attempts,
            " for good" if permanent else "",
            error,
            state.value if state is not None else "lease lost",
        )


class DispatchThreads:
    """The dispatcher threads of ``serve``: a thread that died is started again and reported."""

    def __init__(self, config: Config, outbox: Outbox, results: Spool) -> None:
        self.dispatchers = [
            Dispatcher(config, outbox, results, name=f"{worker_name('dispatch')}#{i}")
            for i in range(config.dispatch.threads)
        ]
        self.threads: list[threading.Thread] = []
        self.restarts = 0

    def _start(self, d: Dispatcher) -> threading.Thread:
        thread = threading.Thread(target=d.run, name=d.name, daemon=True)
        thread.start()
        return thread

    def start(self) -> None:
        self.threads = [self._start(d) for d in self.dispatchers]

    def check(self) -> None:
        """Restart dispatcher threads that died (called by ``serve``'s supervision loop)."""
        for index, (d, thread) in enumerate(zip(self.dispatchers, self.threads, strict=True)):
            if not thread.is_alive() and not d.stop.is_set():
                self.restarts += 1
                log.error("dispatcher %s died; restarting it (%d restart(s) so far)", d.name, self.restarts)
                self.threads[index] = self._start(d)

    def stop(self, timeout: float) -> None:
        """Let in-flight sends finish (a send is bounded by its destination's timeouts)."""
        for d in self.dispatchers:
            d.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout)
