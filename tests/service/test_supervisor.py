"""The one supervisor of serve's children (receivers, workers): real child processes, a hand-moved clock.

A crash-looping child is restarted after 1, 2, 4 ... s (capped), not every second; a child that ran
long enough is restarted after the first delay again; a child that reports a start failure fails
``start``; a child gets its kind's signal when the supervising process is killed with ``kill -9``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from daemon.service.supervisor import ChildSpec, ChildStartError, Readiness, RestartPolicy, Supervisor
from tests.support.process import wait_until


def exits_at_once(_index: int, _readiness: Readiness) -> None:
    sys.exit(3)


def cannot_start(_index: int, readiness: Readiness, problem: str) -> None:
    readiness.failed(problem)
    sys.exit(1)


def marks_its_signal(_index: int, readiness: Readiness, marker: str) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        Path(marker).write_text(signal.Signals(signum).name)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    readiness.ready()
    signal.pause()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dead(supervisor: Supervisor) -> bool:
    return supervisor.pids() == []


def test_restart_delay_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(first_delay_seconds=1, max_delay_seconds=60)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 7, 8, 100)] == [1, 2, 4, 8, 60, 60, 60]
    with pytest.raises(ValueError, match="first"):
        RestartPolicy(first_delay_seconds=5, max_delay_seconds=1)


def test_a_crash_loop_is_restarted_with_growing_delays_and_a_stable_run_resets_them() -> None:
    clock = Clock()
    policy = RestartPolicy(first_delay_seconds=1, max_delay_seconds=4, stable_seconds=30)
    supervisor = Supervisor(
        ChildSpec(kind="crasher", target=exits_at_once, stop_grace_seconds=5), 1, policy=policy, clock=clock
    )
    supervisor.start(wait=False)
    try:
        for delay in (1, 2, 4, 4):
            restarts = supervisor.restarts
            wait_until(lambda: dead(supervisor), timeout=60, what="the child to exit")
            supervisor.check()  # sees the death, schedules the restart
            clock.now += delay - 0.5
            supervisor.check()
            assert supervisor.restarts == restarts, f"restarted before its {delay} s delay"
            clock.now += 0.5
            supervisor.check()
            assert supervisor.restarts == restarts + 1, f"not restarted after its {delay} s delay"
        wait_until(lambda: dead(supervisor), timeout=60, what="the child to exit")
        clock.now += 30  # as if it had lived 30 s: no crash loop, the first delay again
        supervisor.check()
        clock.now += 1
        supervisor.check()
        assert supervisor.restarts == 5
    finally:
        supervisor.stop()


def test_a_child_that_cannot_start_fails_the_start_with_its_reason() -> None:
    spec = ChildSpec(
        kind="receiver", target=cannot_start, args=("OSError: [Errno 98] Address already in use",)
    )
    supervisor = Supervisor(spec, 2)
    with pytest.raises(ChildStartError, match="receiver process 0 could not start: OSError: .*in use"):
        supervisor.start(wait=True)
    assert supervisor.pids() == []


@pytest.mark.parametrize("death_signal", [signal.SIGTERM, signal.SIGKILL])
def test_children_get_their_signal_when_the_parent_is_killed(
    tmp_path: Path, death_signal: signal.Signals
) -> None:
    marker = tmp_path / "signal"
    script = textwrap.dedent(
        f"""
        import signal, time
        from daemon.service.supervisor import ChildSpec, Supervisor
        from tests.service.test_supervisor import marks_its_signal

        if __name__ == "__main__":
            spec = ChildSpec(kind="child", target=marks_its_signal, args=({str(marker)!r},),
                             death_signal=signal.{death_signal.name})
            supervisor = Supervisor(spec, 1)
            supervisor.start(wait=True)
            print(supervisor.pids()[0], flush=True)
            signal.pause()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=30)
        wait_until(
            lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
            timeout=30,
            what="the child to die with its parent",
        )
        if death_signal == signal.SIGTERM:
            assert marker.read_text() == "SIGTERM", "a worker is told to stop (finish or give back its job)"
        else:
            assert not marker.exists(), "a receiver is killed outright"
    finally:
        parent.kill()
        parent.wait(timeout=30)
