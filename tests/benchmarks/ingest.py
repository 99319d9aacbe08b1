"""Ingest benchmark: pacs-triage vs dcmtk ``storescp`` vs Orthanc, same run, same sender.

    .venv/bin/python -m tests.benchmarks.ingest [--rounds 3] [--quick]

A script, not a test (tests never assert on wall-clock time). It generates, in a temporary
directory that is removed afterwards, a 300-slice 512x512 16-bit CT series (~0.5 MB per instance,
rewritten from ``shared/testdata/ct_series/gantry_tilt/GE_01.dcm``) and 2,000 small 64x64
instances (~10 KB), and sends each set with dcmtk ``storescu`` over 1 association and over 4
concurrent associations (4 ``storescu`` processes, a quarter of the files each) to:

- pacs-triage: ``pacs-triage serve`` with its defaults (SQLite, full durability: every instance
  flushed to disk with its receipt (``fdatasync`` of its slot, storage/spool.py,
  storage/receipt.py) and its rows committed (without a flush: storage/recovery.py rebuilds
  them from the files after a power cut) before 0x0000);
- dcmtk ``storescp --fork`` writing to a temporary directory (no fsync: it has no such option);
- Orthanc (generated JSON config on loopback ports, temporary storage, default durability).

``TCP_NODELAY=1`` is in the environment of every dcmtk tool and of Orthanc (without it each
dcmtk side stalls ~44 ms per instance on loopback). Every round starts each receiver fresh with
an empty store, times from the senders' start to the last sender's exit, and then checks that
every instance was stored (pacs-triage ``status --json``, storescp's files, Orthanc's REST
``/statistics``), so a failed run cannot look fast. Figures are medians over the rounds; ratios
are computed within each round, then their median is taken (the machine is shared and noisy).
Peak RSS is the largest sum of RSS over the receiver's process tree (psutil, every 20 ms; pages
shared between processes are counted more than once, so it is an upper bound); receiver CPU is
the process tree's user + system time during the send, per instance.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import psutil
import pydicom
from pydicom.uid import generate_uid

from tests.paths import REPO, TESTDATA

TEMPLATE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_01.dcm"
SENDER_AE = "BENCH_SCU"
NODELAY_ENV = {"TCP_NODELAY": "1"}
START_TIMEOUT = 60.0
SEND_TIMEOUT = 900.0


# -- test data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    files: tuple[Path, ...]
    total_bytes: int

    @property
    def mean_kb(self) -> float:
        return self.total_bytes / len(self.files) / 1000


def make_ct_series(directory: Path, count: int) -> Workload:
    """``count`` 512x512 16-bit CT slices: GE_01 with new UIDs and positions along z."""
    directory.mkdir(parents=True)
    ds = pydicom.dcmread(TEMPLATE)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "ingest benchmark CT"
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    files = []
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, y, round(z + 2.5 * i, 3)]
        ds.SliceLocation = round(z + 2.5 * i, 3)
        path = directory / f"ct{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Workload("CT 512x512", tuple(files), sum(p.stat().st_size for p in files))


def make_small_instances(directory: Path, count: int) -> Workload:
    """``count`` 64x64 16-bit CT instances (~10 KB each), one series, distinct pixel data."""
    directory.mkdir(parents=True)
    ds = pydicom.dcmread(TEMPLATE)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "ingest benchmark small"
    ds.Rows = ds.Columns = 64
    rng = np.random.default_rng(20261121)
    files = []
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.PixelData = rng.integers(0, 2000, size=(64, 64), dtype=np.int16).tobytes()
        path = directory / f"small{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Workload("small 64x64", tuple(files), sum(p.stat().st_size for p in files))


# -- receivers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants, plus descendants it has reaped."""
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        return float("nan")
    return total


class TreeSampler:
    """Samples a process tree every 20 ms in a thread: peak summed RSS and CPU time used.

    CPU: the last CPU time seen for every process of the tree (so a child that exits between
    two samples, like storescp's per-association fork, still counts up to its last sample), plus
    what the root accounted for reaped children, minus what the tree had used at the start.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._cpu: dict[int, float] = {}
        self._reaped = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._sample()
        self._baseline = self.cpu_total()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            times = root.cpu_times()
            self._reaped = times.children_user + times.children_system
        except psutil.Error:
            return
        rss = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    t = proc.cpu_times()
                    self._cpu[proc.pid] = t.user + t.system
        self.peak = max(self.peak, rss)

    def cpu_total(self) -> float:
        return sum(self._cpu.values()) + self._reaped

    @property
    def cpu_used(self) -> float:
        return self.cpu_total() - self._baseline

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class Receiver(Protocol):
    label: str
    ae_title: str
    port: int
    proc: subprocess.Popen[bytes]

    def start(self) -> None: ...
    def stored(self) -> int: ...
    def stop(self) -> None: ...
    def log_tail(self) -> str: ...


class _Base:
    label = ""
    ae_title = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "receiver.log"
        self._log = self.log_path.open("wb")
        self.proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def pacs_triage_command() -> list[str]:
    script = Path(sys.executable).with_name("pacs-triage")
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli.main"]


class PacsTriage(_Base):
    ae_title = "PACS_TRIAGE"

    def __init__(self, workdir: Path, label: str, extra_env: dict[str, str]) -> None:
        super().__init__(workdir)
        self.label = label
        # Defaults only: no PACS_TRIAGE_* from the caller's environment leaks in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_TRIAGE_")}
        self.env.update(
            PACS_TRIAGE_HOME=str(workdir / "home"),
            PACS_TRIAGE_PORT=str(self.port),
            PACS_TRIAGE_AE_TITLE=self.ae_title,
            # Ingest only: no analysis worker processes (none would get a job during a run, but
            # their start-up would compete for the CPU and count in the process tree's RSS).
            PACS_TRIAGE_WORKERS__COUNT="0",
            **extra_env,
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*pacs_triage_command(), "serve"], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while "pacs-triage ready" not in self.log_path.read_text(encoding="utf-8", errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"pacs-triage exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pacs-triage not ready within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stored(self) -> int:
        out = subprocess.run(
            [*pacs_triage_command(), "status", "--json"],
            env={**self.env, "PACS_TRIAGE_LOGGING__LEVEL": "WARNING"},
            capture_output=True,
            check=True,
            timeout=120,
        )
        return int(json.loads(out.stdout)["instances"])


class StoreScp(_Base):
    label = "storescp"
    ae_title = "STORESCP"

    def start(self) -> None:
        self.out = self.workdir / "out"
        self.out.mkdir()
        self.proc = subprocess.Popen(
            ["storescp", "--fork", "-dhl", "-aet", self.ae_title, "-od", str(self.out), str(self.port)],
            env={**os.environ, **NODELAY_ENV},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.proc, "storescp")

    def stored(self) -> int:
        return sum(1 for entry in os.scandir(self.out) if entry.is_file())


class Orthanc(_Base):
    label = "Orthanc"
    ae_title = "ORTHANC"

    def start(self) -> None:
        self.http_port = free_port()
        config = {
            "Name": "ingest-benchmark",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": True,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,  # for /statistics only, on loopback
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
        }  # durability left at Orthanc's default (SyncStorageArea: true, fsync per file)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        self.proc = subprocess.Popen(
            ["Orthanc", str(config_path)],
            env={**os.environ, **NODELAY_ENV},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.proc, "Orthanc (DICOM)")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._statistics()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def _statistics(self) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=10) as rsp:
            result: dict[str, object] = json.load(rsp)
            return result

    def stored(self) -> int:
        value = self._statistics()["CountInstances"]
        assert isinstance(value, int)
        return value


# -- one measured run -------------------------------------------------------------------------


@dataclass
class Result:
    receiver: str
    workload: str
    associations: int
    round: int
    seconds: float
    instances: int
    total_bytes: int
    peak_rss: int
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / self.seconds / 1e6


def shards(files: Sequence[Path], n: int) -> list[list[Path]]:
    """Split into ``n`` contiguous parts (each association sends a quarter of the series in order)."""
    size = -(-len(files) // n)
    return [list(files[i : i + size]) for i in range(0, len(files), size)]


def send(files: Sequence[Path], receiver: Receiver, associations: int) -> float:
    """Run ``associations`` storescu processes at once; seconds from the first start to the last exit."""
    base = ["storescu", "-aet", SENDER_AE, "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port)]
    env = {**os.environ, **NODELAY_ENV}
    started = time.perf_counter()
    procs = [
        subprocess.Popen([*base, *map(str, part)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for part in shards(files, associations)
    ]
    outputs = [p.communicate(timeout=SEND_TIMEOUT)[0] for p in procs]
    elapsed = time.perf_counter() - started
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(
                f"storescu to {receiver.label} exited with {proc.returncode}:\n"
                + output.decode(errors="replace")[-2000:]
            )
    return elapsed


def settle(pid: int, timeout: float = 20.0) -> None:
    """Wait until the receiver's process tree is idle (start-up work done), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(0.5)
        if tree_cpu_seconds(pid) - before < 0.05:  # under 10 % of one core
            return


def measure(receiver: Receiver, workload: Workload, associations: int, round_no: int) -> Result:
    receiver.start()
    try:
        settle(receiver.proc.pid)
        with TreeSampler(receiver.proc.pid) as sampler:
            seconds = send(workload.files, receiver, associations)
        stored = receiver.stored()
        if stored != len(workload.files):
            raise RuntimeError(
                f"{receiver.label} stored {stored} of {len(workload.files)} instances "
                f"({workload.name}, {associations} assoc):\n{receiver.log_tail()}"
            )
    finally:
        receiver.stop()
    return Result(
        receiver=receiver.label,
        workload=workload.name,
        associations=associations,
        round=round_no,
        seconds=seconds,
        instances=len(workload.files),
        total_bytes=workload.total_bytes,
        peak_rss=sampler.peak,
        cpu_seconds=sampler.cpu_used,
    )


# -- report ----------------------------------------------------------------------------------


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def select(self, receiver: str, workload: str, associations: int) -> list[Result]:
        return [
            r
            for r in self.results
            if (r.receiver, r.workload, r.associations) == (receiver, workload, associations)
        ]

    def ratio(self, num: str, den: str, workload: str, associations: int) -> float:
        """Median over rounds of the same-round ratio num/den of instances per second."""
        a = {r.round: r.rate for r in self.select(num, workload, associations)}
        b = {r.round: r.rate for r in self.select(den, workload, associations)}
        ratios = [a[k] / b[k] for k in a.keys() & b.keys()]
        return statistics.median(ratios) if ratios else float("nan")


def markdown(report: Report, receivers: list[str], ours: list[str], workloads: list[Workload]) -> str:
    combos = [(w, n) for w in workloads for n in (1, 4)]
    head = ["workload", "assoc"] + receivers
    for mine in ours:
        head += [f"{mine} / storescp", f"{mine} / Orthanc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload, n in combos:
        row = [f"{workload.name} ({len(workload.files)} x {workload.mean_kb:.1f} KB)", str(n)]
        for name in receivers:
            runs = report.select(name, workload.name, n)
            if not runs:
                row.append("-")
                continue
            rate = statistics.median(r.rate for r in runs)
            mbs = statistics.median(r.mb_per_s for r in runs)
            row.append(f"{rate:.0f}/s, {mbs:.1f} MB/s")
        for mine in ours:
            for peer in ("storescp", "Orthanc"):
                row.append(f"{report.ratio(mine, peer, workload.name, n):.2f}")
        lines.append("| " + " | ".join(row) + " |")

    lines += [
        "",
        "| receiver | peak RSS, CT | peak RSS, small | receiver CPU ms/instance (CT 1, CT 4, small 1, small 4) |",
    ]
    lines.append("|---|---|---|---|")
    for name in receivers:
        peaks = []
        for workload in workloads:
            runs = [r for r in report.results if r.receiver == name and r.workload == workload.name]
            peaks.append(f"{max((r.peak_rss for r in runs), default=0) / 2**20:.0f} MB")
        cpu = []
        for workload, n in combos:
            runs = report.select(name, workload.name, n)
            cpu.append(
                f"{statistics.median(r.cpu_seconds / r.instances * 1000 for r in runs):.2f}" if runs else "-"
            )
        lines.append(f"| {name} | {peaks[0]} | {peaks[1]} | {', '.join(cpu)} |")
    return "\n".join(lines)


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    import pynetdicom
    import sqlalchemy

    return (
        f"Python {platform.python_version()}, pynetdicom {pynetdicom.__version__}, "
        f"pydicom {pydicom.__version__}, SQLAlchemy {sqlalchemy.__version__}, SQLite "
        f"{__import__('sqlite3').sqlite_version}; {first_line(['storescu', '--version'])}; "
        f"{first_line(['Orthanc', '--version'])}; {platform.platform()}, {os.cpu_count()} CPUs"
    )


# -- main -------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL`` or ``LABEL:KEY=VALUE,KEY=VALUE`` (environment of that pacs-triage variant)."""
    label, _, rest = text.partition(":")
    env = dict(item.split("=", 1) for item in rest.split(",") if item)
    return label, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 round, 100 CT + 500 small instances")
    parser.add_argument("--ct", type=int, default=None, help="CT slices (default 300)")
    parser.add_argument("--small", type=int, default=None, help="small instances (default 2000)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL[:ENV=VAL,...]",
        help="pacs-triage configuration to measure (repeatable); default: one, 'pacs-triage', "
        "with its defaults. Example: --variant 'pt-1proc:PACS_TRIAGE_DICOM__RECEIVERS=1'",
    )
    parser.add_argument("--no-peers", action="store_true", help="measure pacs-triage variants only")
    parser.add_argument("--json", type=Path, help="also write every result to this JSON file")
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where test data and the receivers' stores go (default: the system's temp dir). "
        "/dev/shm (tmpfs, fsync free) shows what the receivers cost when the disk costs nothing.",
    )
    args = parser.parse_args(argv)

    rounds = 1 if args.quick else args.rounds
    ct_count = args.ct or (100 if args.quick else 300)
    small_count = args.small or (500 if args.quick else 2000)
    variants = [parse_variant(v) for v in args.variant] or [("pacs-triage", {})]
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: apt-get install dcmtk orthanc", file=sys.stderr)
            return 2

    started = time.monotonic()
    print(f"# ingest benchmark, {dt.date.today().isoformat()}\n{versions()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pacs-triage-ingest-bench-", dir=args.tmpdir) as tmp_name:
        tmp = Path(tmp_name)
        workloads = [
            make_ct_series(tmp / "data" / "ct", ct_count),
            make_small_instances(tmp / "data" / "small", small_count),
        ]
        print(f"data generated in {time.monotonic() - started:.0f} s", flush=True)
        report = Report()
        run_no = 0
        for round_no in range(rounds):
            for workload in workloads:
                for associations in (1, 4):
                    factories = [
                        *(lambda d, lab=label, e=env: PacsTriage(d, lab, e) for label, env in variants),
                        *([] if args.no_peers else [StoreScp, Orthanc]),
                    ]
                    # Rotate the order each round so that drift in the machine's load is shared.
                    shift = round_no % len(factories)
                    for factory in factories[shift:] + factories[:shift]:
                        run_no += 1
                        workdir = tmp / "runs" / f"{run_no:03d}"
                        workdir.mkdir(parents=True)
                        receiver: Receiver = factory(workdir)
                        result = measure(receiver, workload, associations, round_no)
                        report.results.append(result)
                        print(
                            f"round {round_no + 1}/{rounds} {workload.name:12s} {associations} assoc "
                            f"{result.receiver:14s} {result.rate:7.1f}/s {result.mb_per_s:7.1f} MB/s "
                            f"rss {result.peak_rss / 2**20:5.0f} MB "
                            f"cpu {result.cpu_seconds / result.instances * 1000:.2f} ms/inst",
                            flush=True,
                        )
                        shutil.rmtree(workdir, ignore_errors=True)
        receivers = [label for label, _ in variants] + ([] if args.no_peers else ["storescp", "Orthanc"])
        ours = [] if args.no_peers else [label for label, _ in variants]
        print()
        print(
            f"Median of {rounds} round(s); ratios are same-round ratios of instances/s, median over rounds.\n"
        )
        print(markdown(report, receivers, ours, workloads))
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in report.results], indent=1), encoding="utf-8")
    print(f"\ntotal {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
