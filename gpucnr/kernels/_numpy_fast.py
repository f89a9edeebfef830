"""The NumPy fast path of `moments.image_totals`: one fused, compiled pass per image (Numba, GIL released).

The portable path materialises whole-batch int64/float64 temporaries and makes several passes over them.
This one reads each pixel once and keeps its running sums in registers: int64 for integer images (exact),
float64 per row then per image for float images (two-level summation). Measured in scripts/bench.py:
about 0.8x the speed of ``stack.sum(dtype=uint64)`` on one thread, against about 0.5x for the best NumPy
formulation (a cache-sized float64 buffer and two BLAS dots). It releases the GIL, so threads scale.
"""

from __future__ import annotations

import numba
import numpy as np

from gpucnr.kernels.moments import Sums, is_exact_integer

__all__ = ["image_totals"]


def image_totals(images, shift, valid_h, valid_w, border, padding):
    """Same contract as `gpucnr.kernels.moments.image_totals` with region=None, for NumPy arrays."""
    images = np.ascontiguousarray(images)
    if images.dtype == np.bool_:
        images = images.view(np.uint8)
    exact = is_exact_integer(np, images.dtype)
    vh = np.ascontiguousarray(valid_h, np.int64)
    vw = np.ascontiguousarray(valid_w, np.int64)
    pad = np.ascontiguousarray(padding, np.float64)
    if exact:
        count, s1, s2, n_excluded = _exact_totals(images, np.ascontiguousarray(shift, np.int64), vh, vw,
                                                  int(border), pad)
    else:
        count, s1, s2, n_excluded = _float_totals(images, np.ascontiguousarray(shift, np.float64), vh, vw,
                                                  int(border), pad)
    return Sums(n=count, s1=s1, s2=s2), n_excluded


@numba.njit(nogil=True, cache=True)
def _exact_totals(images, shift, valid_h, valid_w, border, padding):  # pragma: no cover - compiled
    n = images.shape[0]
    count = np.zeros(n, np.int64)
    s1 = np.zeros(n, np.int64)
    s2 = np.zeros(n, np.int64)
    n_excluded = np.zeros(n, np.int64)
    for i in range(n):
        vh, vw = valid_h[i], valid_w[i]
        y0, y1 = border, max(vh - border, border)
        x0, x1 = border, max(vw - border, border)
        c = shift[i]
        pad = padding[i]
        if np.isfinite(pad):
            # Padding pixels are skipped and counted; integer images have no non-finite pixels.
            for y in range(vh):
                inner_row = y0 <= y < y1
                for x in range(vw):
                    v = np.int64(images[i, y, x])
                    if v == pad:
                        n_excluded[i] += 1
                    elif inner_row and x0 <= x < x1:
                        d = v - c
                        count[i] += 1
                        s1[i] += d
                        s2[i] += d * d
        else:
            # Raw sums first (the loop vectorises best without the shift), re-centred exactly afterwards.
            a1 = np.int64(0)
            a2 = np.int64(0)
            for y in range(y0, y1):
                row = images[i, y]
                r1 = np.int64(0)
                r2 = np.int64(0)
                for x in range(x0, x1):
                    v = np.int64(row[x])
                    r1 += v
                    r2 += v * v
                a1 += r1
                a2 += r2
            k = (y1 - y0) * (x1 - x0)
            count[i] = k
            s1[i] = a1 - k * c
            s2[i] = a2 - 2 * c * a1 + k * c * c
    return count, s1, s2, n_excluded


@numba.njit(nogil=True, cache=True)
def _float_totals(images, shift, valid_h, valid_w, border, padding):  # pragma: no cover - compiled
    n = images.shape[0]
    count = np.zeros(n, np.int64)
    s1 = np.zeros(n, np.float64)
    s2 = np.zeros(n, np.float64)
    n_excluded = np.zeros(n, np.int64)
    for i in range(n):
        vh, vw = valid_h[i], valid_w[i]
        y0, y1 = border, max(vh - border, border)
        x0, x1 = border, max(vw - border, border)
        c = shift[i]
        pad = padding[i]
        has_pad = np.isfinite(pad)
        for y in range(vh):
            inner_row = y0 <= y < y1
            # Row partial sums, then image sums: error ~ eps (W + H), not eps * H * W.
            r1 = 0.0
            r2 = 0.0
            for x in range(vw):
                v = np.float64(images[i, y, x])
                if not np.isfinite(v) or (has_pad and v == pad):
                    n_excluded[i] += 1
                elif inner_row and x0 <= x < x1:
                    d = v - c
                    count[i] += 1
                    r1 += d
                    r2 += d * d
            s1[i] += r1
            s2[i] += r2
    return count, s1, s2, n_excluded
