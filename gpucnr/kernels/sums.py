"""Counts and sums over regions: the value every moment kernel (portable or compiled) returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Sums"]


@dataclass
class Sums:
    """Counts and sums of d = x - c over one region per entry (arrays of one leading shape).

    For integer images ``s1`` and ``s2`` are exact: int64 words, or (batches holding a wide image, see
    `gpucnr.kernels.moments.plan_numerics`) int64 limb sums along a trailing axis (4 for s1, 7 for s2; value =
    sum of limb k times 2**(16 k), see `gpucnr.kernels.moments.limbs_value`). Otherwise float64, in the image's
    scaled units. Sums of two disjoint regions add, and a sub-region subtracts, which is how background = image
    totals minus window sums is formed.
    """

    n: Any
    s1: Any
    s2: Any

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)

    def __sub__(self, other: Sums) -> Sums:
        return Sums(self.n - other.n, self.s1 - other.s1, self.s2 - other.s2)
