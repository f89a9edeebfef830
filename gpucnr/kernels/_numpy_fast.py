"""The NumPy fast path of `moments.image_totals`: one pass per image through a reused cache-sized buffer.

The portable path materialises whole-batch int64/float64 temporaries (several passes over 4-8x the
image bytes); this one converts a block of rows at a time into a float64 buffer that stays in cache and
reduces it with two BLAS dots. For integer images every block's partial sums are integers below 2**53,
so the float64 dots are exact and are carried on in Python integers. Measured in scripts/bench.py.
"""

from __future__ import annotations

import numpy as np

from gpucnr.kernels.moments import Sums, is_exact_integer

__all__ = ["image_totals"]

# Elements per block: 2**18 float64 = 2 MiB (fits L2), and 2**18 * 65535**2 < 2**53 keeps the
# integer dots exact for 16-bit data.
_BLOCK = 1 << 18


def image_totals(images, shift, valid_h, valid_w, border, padding):
    """Same contract as `gpucnr.kernels.moments.image_totals` (region=None), for NumPy arrays."""
    n = images.shape[0]
    exact = is_exact_integer(np, images.dtype)
    acc = np.int64 if exact else np.float64
    count = np.zeros(n, np.int64)
    s1 = np.zeros(n, acc)
    s2 = np.zeros(n, acc)
    n_excluded = np.zeros(n, np.int64)
    width = images.shape[2]
    buf = np.empty(min(_BLOCK, max(width, 1) * max(1, _BLOCK // max(width, 1))), np.float64)
    ones = np.ones_like(buf)
    for i in range(n):
        vh, vw = int(valid_h[i]), int(valid_w[i])
        valid = images[i, :vh, :vw]
        inner = valid[border : max(vh - border, border), border : max(vw - border, border)]
        pad = float(padding[i])
        if exact:
            c = int(shift[i])
            sx, sxx = _raw_sums(inner, buf, ones)
            k = inner.size
            if np.isfinite(pad):
                # NB: padding pixels are removed from the exact integer sums afterwards, without a mask.
                p = int(pad) if pad == int(pad) else None
                k_pad = int(np.count_nonzero(inner == pad)) if p is not None else 0
                if k_pad:
                    sx -= k_pad * p
                    sxx -= k_pad * p * p
                    k -= k_pad
                n_excluded[i] = int(np.count_nonzero(valid == pad)) if p is not None else 0
            count[i] = k
            s1[i] = sx - k * c
            s2[i] = sxx - 2 * c * sx + k * c * c
        else:
            c = float(shift[i])
            t1, t2 = _shifted_float_sums(inner, c, buf)
            frame_ok = bool(np.isfinite(_frame_sum(valid, border)))
            if np.isfinite(t1) and np.isfinite(t2) and frame_ok and not np.isfinite(pad):
                count[i], s1[i], s2[i] = inner.size, t1, t2
            else:
                bad = ~np.isfinite(valid)
                if np.isfinite(pad):
                    bad |= valid == pad
                n_excluded[i] = int(np.count_nonzero(bad))
                keep = ~bad[border : max(vh - border, border), border : max(vw - border, border)]
                d = np.subtract(inner[keep], c, dtype=np.float64)
                count[i], s1[i], s2[i] = d.size, d.sum(), d @ d
    return Sums(n=count, s1=s1, s2=s2), n_excluded


def _blocks(a, buf):
    """Yield flat float64 views of `buf`, each holding the next rows of the 2-D array `a`."""
    rows_per = max(1, buf.size // max(a.shape[1], 1))
    for r0 in range(0, a.shape[0], rows_per):
        blk = a[r0 : r0 + rows_per]
        view = buf[: blk.size]
        yield blk, view


def _raw_sums(a, buf, ones):
    """Exact (sum x, sum x**2) of an integer 2-D array, as Python ints."""
    sx = sxx = 0
    for blk, view in _blocks(a, buf):
        np.copyto(view.reshape(blk.shape), blk, casting="unsafe")
        # NB: both dots are integers below 2**53 per block, hence exact in float64 in any BLAS order.
        sx += int(view @ ones[: view.size])
        sxx += int(view @ view)
    return sx, sxx


def _shifted_float_sums(a, c, buf):
    """(sum d, sum d**2) of d = a - c in float64 (pairwise sum for d, BLAS dot for d**2)."""
    t1 = t2 = 0.0
    for blk, view in _blocks(a, buf):
        np.subtract(blk, c, out=view.reshape(blk.shape), dtype=np.float64)
        t1 += float(view.sum())
        t2 += float(view @ view)
    return t1, t2


def _frame_sum(valid, border):
    """Sum over the border frame of a valid region: finite iff the frame holds no NaN/inf."""
    if border == 0:
        return 0.0
    vh, vw = valid.shape
    top = valid[:border].sum(dtype=np.float64)
    bottom = valid[max(vh - border, border) :].sum(dtype=np.float64)
    mid = valid[border : max(vh - border, border)]
    return top + bottom + mid[:, :border].sum(dtype=np.float64) + mid[:, max(vw - border, border) :].sum(
        dtype=np.float64
    )
