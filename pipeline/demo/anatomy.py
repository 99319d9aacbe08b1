"""The synthetic abdomen of a phantom: tissues and their HU, organs as ellipsoids, painted plane by plane.

The body is a pure function of the seed (stream :data:`ANATOMY_STREAM` of ``numpy.random.default_rng``):
subcutaneous fat, muscle wall, lung bases, liver, spleen, kidneys, aorta, IVC, spine with discs and
rib arcs, in LPS mm. :mod:`pipeline.demo.phantom` places lesions in it and renders series from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ANATOMY_STREAM",
    "TISSUE",
    "TISSUE_HU",
    "Anatomy",
    "Ellipsoid",
    "Plane",
    "body",
    "random_rotation",
]

ANATOMY_STREAM = 0  # the body's RNG stream per seed; phantom.py numbers the others

# Tissue ids (painter's order) and their HU, (low, high) drawn per seed.
TISSUE_HU: tuple[tuple[str, float, float], ...] = (
    ("air", -1000, -1000), ("fat", -110, -90), ("muscle", 45, 60), ("lung", -870, -830),
    ("liver", 100, 115), ("spleen", 110, 125), ("kidney", 150, 175), ("aorta", 150, 190),
    ("ivc", 120, 145), ("cortical", 650, 800), ("cancellous", 200, 280), ("canal", 10, 25),
    ("disc", 70, 95),
)  # fmt: skip
TISSUE = {name: index for index, (name, _, _) in enumerate(TISSUE_HU)}


@dataclass(frozen=True)
class Ellipsoid:
    centre: np.ndarray  # (3,) LPS mm
    axes: np.ndarray  # (3,) semi-axes mm
    rotation: np.ndarray  # (3, 3), columns are the axis directions

    @property
    def form(self) -> np.ndarray:
        """M with inside <=> d^T M d <= 1, d = point - centre."""
        return np.asarray(self.rotation @ np.diag(self.axes**-2.0) @ self.rotation.T)

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask for points given as broadcastable coordinate arrays (mm)."""
        m = self.form
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        q = m[0, 0] * dx * dx + m[1, 1] * dy * dy + m[2, 2] * dz * dz
        q = q + 2 * (m[0, 1] * dx * dy + m[0, 2] * dx * dz + m[1, 2] * dy * dz)
        return np.asarray(q <= 1.0)


@dataclass(frozen=True)
class Anatomy:
    """The body of one seed: ``plane`` then ``paint`` give tissue ids (painter's order) at points."""

    a: float  # body semi-axes (x, y), mm
    b: float
    cy: float  # body centre y
    zc: float  # body reference z (couch position)
    fat: float  # subcutaneous fat thickness
    organs: tuple[tuple[int, Ellipsoid], ...]  # lungs, liver, spleen, kidneys (drawn in order)
    rib_phase: float
    disc_phase: float
    hu: np.ndarray  # HU per tissue id

    def plane(self, x: np.ndarray, y: np.ndarray) -> Plane:
        """The z-independent part (elliptic cylinders) on points x, y."""
        u, v = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float) - self.cy)
        base = np.zeros(u.shape, dtype=np.uint8)
        base[(u / self.a) ** 2 + (v / self.b) ** 2 <= 1] = TISSUE["fat"]
        ai, bi = self.a - self.fat, self.b - self.fat
        base[(u / ai) ** 2 + (v / bi) ** 2 <= 1] = TISSUE["muscle"]
        inner = (u / (0.96 * ai)) ** 2 + (v / (0.96 * bi)) ** 2 <= 1
        late = np.zeros(u.shape, dtype=np.uint8)  # drawn over the organs
        ys = bi - 62.0  # vertebral body centre, relative to the body centre
        for name, (cx, cyy, ra, rb) in (("aorta", (20, ys - 32, 12, 12)), ("ivc", (-24, ys - 34, 15, 11))):
            late[((u - cx) / ra) ** 2 + ((v - cyy) / rb) ** 2 <= 1] = TISSUE[name]
        vertebra = u**2 + (v - ys) ** 2
        late[vertebra <= 18.0**2] = TISSUE["cortical"]
        late[vertebra <= 16.0**2] = TISSUE["cancellous"]
        late[(u / 24.0) ** 2 + ((v - ys - 38) / 9.0) ** 2 <= 1] = TISSUE["cortical"]
        late[u**2 + (v - ys - 27) ** 2 <= 8.0**2] = TISSUE["canal"]
        # Rib arcs on a ring inside the muscle wall, sparing the front and the spine.
        radial = (u / (ai - 6)) ** 2 + (v / (bi - 6)) ** 2
        phi = np.arctan2(v / bi, u / ai)
        ring = (radial <= 1.0) & (radial >= ((ai - 14) / (ai - 6)) ** 2)
        ring &= (np.abs(phi + np.pi / 2) > 0.3 * np.pi) & (np.abs(phi - np.pi / 2) > 0.12 * np.pi)
        return Plane(base, inner, late, np.nonzero(ring), phi[ring] * 6 / np.pi)

    def paint(self, plane: Plane, x: np.ndarray, y: np.ndarray, z: np.ndarray | float) -> np.ndarray:
        """Add the z-dependent structures (organs, discs, ribs) to ``plane``."""
        ids = plane.base.copy()
        x, y, z = np.asarray(x, float), np.asarray(y, float), np.asarray(z, float)
        grid = x.ndim == y.ndim == 2 and x.shape[1] == y.shape[0] == 1 and z.ndim == 0
        for tissue_id, ellipsoid in self.organs:
            if np.all(np.abs(z - ellipsoid.centre[2]) > ellipsoid.axes.max()):
                continue
            if grid:  # an axial plane: only the block around the organ
                reach = np.sqrt(np.diag(np.linalg.inv(ellipsoid.form)))
                bx = np.abs(x[:, 0] - ellipsoid.centre[0]) <= reach[0]
                by = np.abs(y[0, :] - ellipsoid.centre[1]) <= reach[1]
                block = np.ix_(bx, by)
                hit = plane.inner[block] & ellipsoid.inside(x[bx], y[:, by], z)
                ids[block] = np.where(hit, np.uint8(tissue_id), ids[block])
            else:
                hit = plane.inner & ellipsoid.inside(x, y, z)
                ids[np.broadcast_to(hit, ids.shape)] = tissue_id
        x, y, z = np.broadcast_arrays(x, y, z)
        ids[plane.late > 0] = plane.late[plane.late > 0]
        w = z - self.zc
        ids[(plane.late == TISSUE["cancellous"]) & ((w - self.disc_phase) % 32.0 < 6.0)] = TISSUE["disc"]
        # An arc's angular position drifts with z, as an oblique rib's does.
        w_ring = w[plane.ring]
        rib = ((plane.ring_angle + w_ring / 40.0 + self.rib_phase) % 1.0 < 0.3) & (w_ring > -70.0)
        ids[tuple(index[rib] for index in plane.ring)] = TISSUE["cortical"]
        return ids


@dataclass(frozen=True)
class Plane:
    base: np.ndarray  # fat and muscle ids
    inner: np.ndarray  # where organs may be drawn
    late: np.ndarray  # vessels and spine ids, 0 elsewhere
    ring: tuple[np.ndarray, ...]  # indices of the rib ring
    ring_angle: np.ndarray  # angle on the ring, in units of the rib period


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def body(seed: int) -> Anatomy:
    """The body of one seed (its own RNG stream: lesions and noise do not change it)."""
    rng = np.random.default_rng((seed, ANATOMY_STREAM))
    a, b, cy = rng.uniform(150, 175), rng.uniform(108, 130), rng.uniform(-10, 10)
    zc, fat = rng.uniform(-220, -120), rng.uniform(8, 22)
    zl = zc + rng.uniform(-10, 15)  # liver centre z
    organs: list[tuple[int, Ellipsoid]] = []
    for side in (-1, 1):
        centre = np.array([side * 0.45 * a, cy + 0.1 * b, zc + rng.uniform(140, 160)])
        organs.append((TISSUE["lung"], Ellipsoid(centre, np.array([0.42 * a, 0.7 * b, 110.0]), np.eye(3))))
    liver_axes = np.array([rng.uniform(72, 85), rng.uniform(70, 82), rng.uniform(68, 80)])
    liver_centre = np.array([-0.38 * a, cy - 0.08 * b, zl])
    organs.append((TISSUE["liver"], Ellipsoid(liver_centre, liver_axes, _rot_z(rng.uniform(-0.3, 0.3)))))
    spleen_centre = np.array([0.55 * a, cy + 0.3 * b, zl + rng.uniform(10, 30)])
    organs.append((TISSUE["spleen"], Ellipsoid(spleen_centre, np.array([25.0, 50, 50]), _rot_z(0.5))))
    for side in (-1, 1):
        centre = np.array([side * 62.0, cy + b - fat - 70, zl - rng.uniform(55, 70)])
        organs.append((TISSUE["kidney"], Ellipsoid(centre, np.array([28.0, 25, 52]), _rot_z(side * 0.4))))
    hu = np.array([rng.uniform(lo, hi) for _, lo, hi in TISSUE_HU], dtype=np.float32)
    return Anatomy(a, b, cy, zc, fat, tuple(organs), rng.uniform(0, 1), rng.uniform(0, 32), hu)
