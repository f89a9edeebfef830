"""Structuring elements by name, as row runs that the window dilation consumes."""

from __future__ import annotations

import math
from functools import cache

__all__ = ["FOOTPRINTS", "ball_offsets", "footprint_offsets", "footprint_rows", "ring_metric"]

#: Footprint names accepted by ``measure(footprint=...)``.
FOOTPRINTS = ("cross", "disk", "matlab-disk", "square")

# Distance used by background="ring" for each footprint (DESIGN §4): L1 for the cross (its iterates are
# L1 diamonds), L-infinity for the square, Euclidean for both disks.
_RING_METRIC = {"cross": "l1", "square": "linf", "disk": "l2", "matlab-disk": "l2"}

Offsets = frozenset[tuple[int, int]]


def ring_metric(footprint: str) -> str:
    """Return the distance metric (``"l1"``, ``"l2"`` or ``"linf"``) that ``ring`` uses with `footprint`."""
    _check_name(footprint)
    return _RING_METRIC[footprint]


@cache
def ball_offsets(metric: str, radius: int) -> Offsets:
    """Offsets ``(dy, dx)`` within distance `radius` of the origin under `metric` (l1, l2 or linf)."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    rng = range(-radius, radius + 1)
    if metric == "l1":
        return frozenset((y, x) for y in rng for x in rng if abs(y) + abs(x) <= radius)
    if metric == "l2":
        return frozenset((y, x) for y in rng for x in rng if y * y + x * x <= radius * radius)
    if metric == "linf":
        return frozenset((y, x) for y in rng for x in rng)
    raise ValueError(f"unknown metric {metric!r}")


@cache
def footprint_offsets(name: str, radius: int) -> Offsets:
    """Offsets ``(dy, dx)`` of the structuring element `name` of radius `radius`.

    Parameters
    ----------
    name : {"cross", "disk", "matlab-disk", "square"}
        ``cross`` is scipy.ndimage's default 3x3 cross iterated `radius` times (the article's
        ``binary_dilation(mask, iterations=5)``), i.e. the L1 diamond; ``disk`` the exact Euclidean disk;
        ``matlab-disk`` what MATLAB's ``strel('disk', radius)`` builds with its default n = 4;
        ``square`` the (2 radius + 1)-wide square.
    radius : int
        Radius in pixels, >= 0. Radius 0 is the single origin pixel for every name.

    Returns
    -------
    frozenset of (int, int)
        The offsets, symmetric about the origin.
    """
    _check_name(name)
    if radius < 0:
        raise ValueError(f"footprint radius must be >= 0, got {radius}")
    if name == "cross":
        return ball_offsets("l1", radius)
    if name == "disk":
        return ball_offsets("l2", radius)
    if name == "square":
        return ball_offsets("linf", radius)
    return _matlab_disk(radius)


def footprint_rows(offsets: Offsets) -> tuple[int, ...]:
    """Half-widths of the rows of a footprint, for the row-run dilation in `gpucnr.kernels.masks`.

    Parameters
    ----------
    offsets : frozenset of (int, int)
        A footprint whose every row ``dy`` is one run ``dx in [-w, w]`` (true of all named footprints
        and of every ball).

    Returns
    -------
    tuple of int
        ``w(dy)`` for ``dy = -R .. R``, where R is the footprint's row radius.
    """
    radius = max(abs(y) for y, _ in offsets)
    rows = []
    for dy in range(-radius, radius + 1):
        xs = sorted(x for y, x in offsets if y == dy)
        w = xs[-1] if xs else -1
        # NB: the row-run dilation needs each row to be one symmetric run, or it would dilate wrongly.
        if not xs or xs != list(range(-w, w + 1)):
            raise ValueError(f"footprint row {dy} is not a symmetric run: {xs}")
        rows.append(w)
    return tuple(rows)


def _check_name(name: str) -> None:
    if name not in FOOTPRINTS:
        raise ValueError(f"footprint must be one of {FOOTPRINTS}, got {name!r}")


def _minkowski(a: Offsets, b: Offsets) -> Offsets:
    return frozenset((ya + yb, xa + xb) for ya, xa in a for yb, xb in b)


def _matlab_disk(radius: int) -> Offsets:
    """MATLAB's ``strel('disk', r)`` with its default n = 4 (radial decomposition, Adams 1993).

    For r < 3 MATLAB uses the exact disk. Otherwise it dilates four periodic lines along (1,0), (1,1),
    (0,1) and (-1,1), each of ``2 floor(k/|v|) + 1`` points with ``k = 2r / (cot(pi/8) + 1/sin(pi/8))``,
    and then, if the row radius R reached is short of r - 1, an L x L square with ``L = 2(r - R - 1) + 1``.
    For r = 5 this is the 9 x 9 octagon of 69 pixels.
    """
    if radius < 3:
        return ball_offsets("l2", radius)
    theta = math.pi / 8
    # NB: the same double-precision expression as MATLAB's strel.m, so floor() lands on the same integers.
    k = 2 * radius / (1 / math.tan(theta) + 1 / math.sin(theta))
    shape: Offsets = frozenset({(0, 0)})
    for vy, vx in ((1, 0), (1, 1), (0, 1), (-1, 1)):
        p = math.floor(k / math.hypot(vy, vx))
        shape = _minkowski(shape, frozenset((i * vy, i * vx) for i in range(-p, p + 1)))
    reached = max(abs(y) for y, _ in shape)
    side = 2 * (radius - reached - 1) + 1
    if side >= 3:
        shape = _minkowski(shape, ball_offsets("linf", (side - 1) // 2))
    return shape
