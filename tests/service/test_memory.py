"""Per-job peak RSS (daemon/service/memory.py): the peak of what ran since the reset, not before.

The measurement runs in a fresh interpreter, as in a worker process: inside the long-lived pytest
process (GiBs resident, arenas full of freed memory) a 64 MiB block need not move the high-water mark.
"""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json
import numpy as np
from daemon.service.memory import start_peak_rss

meter = start_peak_rss()
block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
during = meter.peak()
size = block.nbytes
del block
after = start_peak_rss().peak()  # a new job: the freed 64 MiB no longer count
print(json.dumps({"since_reset": during.since_reset, "during": during.bytes, "after": after.bytes, "size": size}))
"""


def test_peak_covers_an_allocation_made_after_the_reset_and_resets_after_it() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["since_reset"], "this Linux kernel should let a process reset its VmHWM"
    assert seen["during"] >= seen["size"]
    assert seen["after"] < seen["during"] - 32 * 2**20, seen
