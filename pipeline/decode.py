"""Decoding DICOM pixel data into a volume (the headers are read by :mod:`pipeline.headers`).

Pixels are decoded frame by frame, straight into a preallocated array, on a thread pool: the
codecs (gdcm, openjpeg, pylibjpeg-rle, CharLS) do their work in C, so the cores are used while
memory stays near the size of the output volume.

What is geometry (sorting, spacing, the affine) lives in ``geometry.py``; this module only reads.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pipeline.errors import GeometryError

# What pydicom and the codec plugins raise on data they cannot decode (never a bare Exception).
_DECODE_ERRORS = (
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    RuntimeError,
    NotImplementedError,
    OSError,
)


def read_frames(
    path: str | os.PathLike[str], indices: Sequence[int] | None = None, *, transfer_syntax_uid: str = ""
) -> Generator[np.ndarray, None, None]:
    """Yield decoded stored values, one frame at a time ((rows, columns) or (rows, columns, samples)).

    ``indices`` are 0-based frame indices (all frames when None). The file is read lazily frame by
    frame, except Deflated Explicit VR Little Endian (PS3.5 A.5), whose whole data set must be
    inflated first. Colour YBR data is converted to RGB, as pydicom does by default.
    """
    p = Path(path)
    ts = transfer_syntax_uid
    if not ts:
        meta = dcmread(p, stop_before_pixels=True).file_meta
        ts = str(meta.get("TransferSyntaxUID", ""))
    src: Path | Dataset = dcmread(p) if ts == DeflatedExplicitVRLittleEndian else p
    yield from iter_pixels(src, indices=None if indices is None else list(indices))


@dataclass(frozen=True)
class FrameJob:
    """Decode one frame of ``path`` into slice ``k`` of the output, as ``stored * slope + intercept``."""

    path: Path
    transfer_syntax_uid: str
    frame_index: int | None  # 0-based index in a multi-frame file; None for a single-frame file
    k: int
    slope: float
    intercept: float
    instance_name: str  # for messages


# Slices decoded into a small contiguous buffer before one transposing copy into the C-ordered
# [i, j, k] volume: a run of 8 floats along k per write instead of one scattered float per pixel.
BLOCK = 8


def _chunks(jobs: Sequence[FrameJob]) -> list[list[FrameJob]]:
    """Units of work for one thread each.

    Single-frame files: runs of up to BLOCK consecutive slices. A multi-frame file: one chunk, in
    frame order, because parsing its header (the per-frame functional groups, pure Python under the
    GIL) costs more than its frames and must happen once.
    """
    chunks: list[list[FrameJob]] = []
    multi: dict[Path, list[FrameJob]] = {}
    run: list[FrameJob] = []
    for job in sorted(jobs, key=lambda j: j.k):
        if job.frame_index is not None:
            multi.setdefault(job.path, []).append(job)
            continue
        if run and (job.k != run[-1].k + 1 or len(run) == BLOCK):
            chunks.append(run)
            run = []
        run.append(job)
    if run:
        chunks.append(run)
    chunks.extend(sorted(f, key=lambda j: j.frame_index or 0) for f in multi.values())
    return chunks


class _BlockWriter:
    """Collects consecutive slices in a small buffer and writes them into ``out`` transposed."""

    def __init__(self, out: np.ndarray, size: int) -> None:
        self.out = out
        self.buffer = np.empty((size, out.shape[1], out.shape[0]), dtype=out.dtype)  # (n, rows, columns)
        self.k0 = 0
        self.n = 0

    def slot(self, k: int) -> np.ndarray:
        """The (rows, columns) buffer slot to fill for slice ``k``."""
        if self.n and (k != self.k0 + self.n or self.n == len(self.buffer)):
            self.flush()
        if self.n == 0:
            self.k0 = k
        self.n += 1
        return self.buffer[self.n - 1]

    def flush(self) -> None:
        if self.n:
            # Array index [i, j, k] = [column, row, slice] (volume.py conventions).
            self.out[:, :, self.k0 : self.k0 + self.n] = self.buffer[: self.n].transpose(2, 1, 0)
            self.n = 0


def _frames_of(chunk: list[FrameJob], series_uid: str) -> Generator[tuple[FrameJob, np.ndarray], None, None]:
    """Decode the chunk's frames, one at a time, translating decoder failures into GeometryError."""
    by_file: list[list[FrameJob]] = []
    for job in chunk:
        if by_file and job.frame_index is not None and by_file[-1][0].path == job.path:
            by_file[-1].append(job)
        else:
            by_file.append([job])
    for file_jobs in by_file:
        first = file_jobs[0]
        indices = None if first.frame_index is None else [j.frame_index or 0 for j in file_jobs]
        frames = read_frames(first.path, indices, transfer_syntax_uid=first.transfer_syntax_uid)
        try:
            for job in file_jobs:
                try:
                    frame = next(frames)
                except StopIteration:
                    raise GeometryError(
                        f"series {series_uid}: {job.instance_name} has fewer frames than its header says"
                    ) from None
                except _DECODE_ERRORS as exc:
                    raise GeometryError(
                        f"series {series_uid}: cannot decode the pixel data of {job.instance_name} (transfer "
                        f"syntax {job.transfer_syntax_uid or 'unknown'}): {type(exc).__name__}: {exc}"
                    ) from exc
                yield job, frame
        finally:
            frames.close()


def _decode_chunk(out: np.ndarray, chunk: list[FrameJob], series_uid: str) -> None:
    rows, columns = out.shape[1], out.shape[0]
    writer = _BlockWriter(out, min(BLOCK, len(chunk)))
    for job, frame in _frames_of(chunk, series_uid):
        if frame.shape != (rows, columns):
            raise GeometryError(
                f"series {series_uid}: {job.instance_name} decoded to shape {frame.shape}, "
                f"expected (Rows, Columns) = ({rows}, {columns})"
            )
        dst = writer.slot(job.k)
        np.multiply(frame, job.slope, out=dst, casting="unsafe")
        if job.intercept != 0.0:
            np.add(dst, job.intercept, out=dst, casting="unsafe")
    writer.flush()


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def decode_into(
    out: np.ndarray, jobs: Sequence[FrameJob], *, series_uid: str, workers: int | None = None
) -> None:
    """Fill ``out[:, :, k]`` (``out`` is ``[columns, rows, slices]``) for every job, on ``workers`` threads.

    ``workers`` defaults to the usable cores. Extra memory: one frame plus a BLOCK-slice buffer per thread.
    """
    if not jobs:
        return
    n_workers = max(1, workers if workers is not None else _usable_cores())
    chunks = _chunks(jobs)
    n_workers = min(n_workers, len(chunks))
    if n_workers == 1:
        for chunk in chunks:
            _decode_chunk(out, chunk, series_uid)
        return
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="decode")
    try:
        futures: list[Future[None]] = [pool.submit(_decode_chunk, out, c, series_uid) for c in chunks]
        for future in futures:
            future.result()  # re-raises the first failure in submission order (deterministic message)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
