"""Shape of a 3-D mask on a voxel grid: its connected components and its largest (Feret) diameter.

- Components: 26-connectivity (voxels touching by a face, an edge or a corner are connected), with
  ``scipy.ndimage.label`` when SciPy is installed, else an equivalent NumPy union-find.
- Largest diameter: the maximum distance between two voxel centres, in mm through the affine (so a
  one-voxel mask measures 0 mm). Masks are indexed ``[i, j, k]`` as in :mod:`pipeline.volume`.
"""

from __future__ import annotations

import importlib
import math

import numpy as np

__all__ = ["connected_components", "max_feret_diameter_mm"]


# --- connected components ------------------------------------------------------------------------

# 13 of the 26 neighbour offsets, one of each opposite pair: every adjacency is visited once.
_HALF_NEIGHBOURS = tuple(
    (di, dj, dk) for di in (-1, 0, 1) for dj in (-1, 0, 1) for dk in (-1, 0, 1) if (di, dj, dk) > (0, 0, 0)
)


def _scipy_ndimage() -> object | None:
    try:
        return importlib.import_module("scipy.ndimage")
    except ImportError:
        return None


def _components_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components by union-find over voxel adjacencies (hook to min root, compress)."""
    padded = np.pad(mask.astype(bool), 1)
    flat = padded.ravel()
    strides = (padded.shape[1] * padded.shape[2], padded.shape[2], 1)
    voxels = np.flatnonzero(flat)
    node = np.full(flat.size, -1, dtype=np.int64)
    node[voxels] = np.arange(voxels.size)
    src, dst = [], []
    for offset in _HALF_NEIGHBOURS:
        neighbours = voxels + sum(o * s for o, s in zip(offset, strides, strict=True))
        linked = flat[neighbours]  # the padding keeps every neighbour index inside the array
        src.append(node[voxels[linked]])
        dst.append(node[neighbours[linked]])
    a, b = np.concatenate(src), np.concatenate(dst)
    parent = np.arange(voxels.size)
    while a.size:
        ra, rb = parent[a], parent[b]
        open_ = ra != rb
        a, b, ra, rb = a[open_], b[open_], ra[open_], rb[open_]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # path compression: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    roots, ids = np.unique(parent, return_inverse=True)
    labels = np.zeros(flat.size, dtype=np.int32)
    labels[voxels] = ids + 1
    inner = (slice(1, -1),) * 3
    return labels.reshape(padded.shape)[inner], int(roots.size)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of a 3-D mask: (int32 labels 1..n, 0 outside; n)."""
    if mask.ndim != 3:
        raise ValueError(f"connected_components needs a 3-D mask, got shape {mask.shape}")
    ndimage = _scipy_ndimage()
    if ndimage is not None:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))  # type: ignore[attr-defined]
        return labels.astype(np.int32, copy=False), int(n)
    return _components_numpy(mask)


# --- diameter ------------------------------------------------------------------------------------


def _line_extremes(points: np.ndarray) -> np.ndarray:
    """Points that are first or last on their line along each of the three axes (hull candidates)."""
    keep = np.ones(len(points), dtype=bool)
    for axis in range(3):
        a, b = [x for x in range(3) if x != axis]
        order = np.lexsort((points[:, axis], points[:, b], points[:, a]))
        key = points[order][:, (a, b)]
        new_line = np.ones(len(points), dtype=bool)
        new_line[1:] = np.any(key[1:] != key[:-1], axis=1)
        last = np.roll(new_line, -1)
        extreme = np.zeros(len(points), dtype=bool)
        extreme[order[new_line | last]] = True
        keep &= extreme
    return points[keep]


def _hull_2d(points: np.ndarray) -> np.ndarray:
    """Vertices of the 2-D convex hull of integer points (Andrew's monotone chain)."""
    pts = sorted({(int(p[0]), int(p[1])) for p in points})
    if len(pts) <= 2:
        return np.asarray(pts, dtype=np.int64)

    def turn(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def chain(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in seq:
            while len(out) >= 2 and turn(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    return np.asarray(chain(pts)[:-1] + chain(pts[::-1])[:-1], dtype=np.int64)


def _hull_vertex_superset(points: np.ndarray) -> np.ndarray:
    """A superset of the 3-D convex hull vertices: each is a 2-D hull vertex of its k-slice."""
    points = _line_extremes(points)
    points = points[np.argsort(points[:, 2], kind="stable")]
    ks, starts = np.unique(points[:, 2], return_index=True)
    out = []
    for k, start, stop in zip(ks, starts, [*starts[1:], len(points)], strict=True):
        hull = _hull_2d(points[start:stop, :2])
        out.append(np.column_stack([hull, np.full(len(hull), k)]))
    return np.concatenate(out)


def max_feret_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Largest distance in mm between two voxel centres of ``mask`` ([i, j, k]) under ``affine``."""
    points = np.argwhere(mask)
    if len(points) < 2:
        return 0.0
    # Hull vertices are an affine invariant, so candidates found in index space are exact in mm.
    candidates = _hull_vertex_superset(points).astype(np.float64)
    xyz = candidates @ np.asarray(affine, dtype=np.float64)[:3, :3].T
    xyz -= xyz.mean(axis=0)
    sq = np.einsum("ij,ij->i", xyz, xyz)
    best = 0.0
    for start in range(0, len(xyz), 1024):
        block = xyz[start : start + 1024]
        d2 = sq[start : start + 1024, None] + sq[None, :] - 2.0 * (block @ xyz.T)
        best = max(best, float(d2.max()))
    return math.sqrt(max(best, 0.0))
