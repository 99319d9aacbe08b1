"""Per-job peak RSS (daemon/service/memory.py): the peak of what ran since the reset, not before."""

from __future__ import annotations

import numpy as np

from daemon.service.memory import start_peak_rss


def test_peak_covers_an_allocation_made_after_the_reset_and_resets_after_it() -> None:
    meter = start_peak_rss()
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    during = meter.peak()
    assert during.since_reset, "this Linux kernel should let a process reset its VmHWM"
    assert during.bytes >= block.nbytes
    del block
    after = start_peak_rss().peak()  # a new job: the freed 64 MiB no longer count
    assert after.bytes < during.bytes - 32 * 2**20
