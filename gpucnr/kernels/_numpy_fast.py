"""The "numba-cpu" kernels (`gpucnr.backend.fast_path`), e.g. `moments.image_totals` as one fused, compiled
pass per image (Numba, GIL released).

The portable path materialises whole-batch int64/float64 temporaries and makes several passes over them.
This one reads each pixel once and keeps its running sums in registers: int64 for integer images (exact),
float64 per row then per image for float images (two-level summation). Measured in scripts/bench.py:
about 0.8x the speed of ``stack.sum(dtype=uint64)`` on one thread, against about 0.5x for the best NumPy
formulation (a cache-sized float64 buffer and two BLAS dots). It releases the GIL, so threads scale.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from gpucnr.kernels.masks import is_exact_integer
from gpucnr.kernels.sums import Sums

__all__ = ["image_totals"]


def native(a):
    """`a` in native byte order, float16 as float32 (both exact): Numba compiles neither a big-endian nor a
    half-precision loop, and the kernels' rule (docs/accuracy.md) is written for native types."""
    if a is None:
        return None
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def image_totals(images, shift, valid_h, valid_w, border, padding, scale=None, *, with_range=False):
    """Same contract as `gpucnr.kernels.moments.image_totals` with region=None, for NumPy arrays.

    The images are split over `threads()` threads: the compiled loop releases the GIL. With `with_range`,
    the same pass also returns ``(lo, hi, found)`` of `image_range` (float images: lo and hi in float64).
    """
    images = np.ascontiguousarray(images)
    if images.dtype == np.bool_:
        images = images.view(np.uint8)
    exact = is_exact_integer(np, images.dtype)
    shift = np.ascontiguousarray(shift, np.int64 if exact else np.float64)
    vh = np.ascontiguousarray(valid_h, np.int64)
    vw = np.ascontiguousarray(valid_w, np.int64)
    pad = np.ascontiguousarray(padding, np.float64)
    n = images.shape[0]
    found = np.zeros(n, np.bool_)
    if exact:
        _, sums, n_excluded, found_range = integer_pass(images, vh, vw, border, pad, with_range=with_range,
                                                        shift=shift)
        return (sums, n_excluded, found_range) if with_range else (sums, n_excluded)
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    sc = np.ones(n) if scale is None else np.ascontiguousarray(scale, np.float64)
    parts = _split(n, lambda a, b: _float_totals(images[a:b], shift[a:b], vh[a:b], vw[a:b], int(border), pad[a:b],
                                                 sc[a:b], lo[a:b], hi[a:b], found[a:b]))
    count, s1, s2, n_excluded = (np.concatenate([p[k] for p in parts]) for k in range(4))
    if with_range:
        return Sums(n=count, s1=s1, s2=s2), n_excluded, (lo, hi, found)
    return Sums(n=count, s1=s1, s2=s2), n_excluded


def integer_pass(images, valid_h, valid_w, border, padding, *, with_range, shift=None):
    """Integer images, one compiled pass (threads over images): the shift (the grid median of
    `moments.image_shift`, unless given), the image totals about it, excluded pixels and, with `with_range`,
    ``(lo, hi, found)`` of `image_range`.

    The sums are raw sums of x and x**2, re-centred exactly afterwards: s1 = a1 - k c, s2 = a2 - 2 c a1 + k c**2,
    in wrapping int64 arithmetic, exact whenever the result fits (which `moments.plan_numerics` checks).
    Returns ``(shift, totals, n_excluded, range or None)``.
    """
    images = np.ascontiguousarray(images)
    if images.dtype == np.bool_:
        images = images.view(np.uint8)
    n = images.shape[0]
    info = np.iinfo(images.dtype)
    lo, hi = np.full(n, info.max, images.dtype), np.full(n, info.min, images.dtype)
    found = np.zeros(n, np.bool_)
    grid = np.empty((n, _GRID * _GRID), images.dtype)
    grid_count = np.zeros(n, np.int64)
    vh = np.ascontiguousarray(valid_h, np.int64)
    vw = np.ascontiguousarray(valid_w, np.int64)
    pad = np.ascontiguousarray(padding, np.float64)
    parts = _split(n, lambda a, b: _exact_raw(images[a:b], vh[a:b], vw[a:b], int(border), pad[a:b], with_range,
                                              lo[a:b], hi[a:b], found[a:b], grid[a:b], grid_count[a:b]))
    count, a1, a2, n_excluded = (np.concatenate([p[k] for p in parts]) for k in range(4))
    c = _median_rows(grid, grid_count).astype(np.int64) if shift is None else np.asarray(shift, np.int64)
    # NB: NumPy's int64 array arithmetic wraps without a warning, like the compiled loop's.
    s1 = a1 - count * c
    s2 = a2 - 2 * c * a1 + count * c * c
    return c, Sums(n=count, s1=s1, s2=s2), n_excluded, ((lo, hi, found) if with_range else None)


def _median_rows(buf, count):
    """The lower median of the first count[i] values of each row of `buf` (0 where count is 0)."""
    n, size = buf.shape
    out = np.zeros(n, buf.dtype)
    full = count == size
    if full.any():
        out[full] = np.partition(buf[full], (size - 1) // 2, axis=1)[:, (size - 1) // 2]
    for i in np.flatnonzero(~full & (count > 0)).tolist():
        m = (int(count[i]) - 1) // 2
        out[i] = np.partition(buf[i, : count[i]], m)[m]
    return out


def grid_median(images, valid_h, valid_w, padding):
    """Same contract as `gpucnr.kernels.moments.image_shift`, for NumPy arrays: the usable pixels of the 32 x 32
    grid gathered in a compiled loop, their lower median selected by NumPy's partition (measured: about 3x
    faster than a compiled quickselect)."""
    images = np.ascontiguousarray(images)
    if images.dtype == np.bool_:
        images = images.view(np.uint8)
    n = images.shape[0]
    size = _GRID * _GRID
    buf = np.empty((n, size), images.dtype)
    count = np.zeros(n, np.int64)
    _grid_gather(images, np.ascontiguousarray(valid_h, np.int64), np.ascontiguousarray(valid_w, np.int64),
                 np.ascontiguousarray(padding, np.float64), images.dtype.kind == "f", buf, count)
    return _median_rows(buf, count).astype(np.float64 if images.dtype.kind == "f" else np.int64)


_GRID = 32


@numba.njit(nogil=True, cache=True)
def _grid_gather(images, valid_h, valid_w, padding, is_float, buf, count):  # pragma: no cover - compiled
    grid = 32
    for i in range(images.shape[0]):
        vh, vw = valid_h[i], valid_w[i]
        pad = padding[i]
        has_pad = np.isfinite(pad)
        k = 0
        for a in range(grid):
            y = a * vh // grid
            if y >= vh:
                continue
            for b in range(grid):
                x = b * vw // grid
                if x >= vw:
                    continue
                v = images[i, y, x]
                if is_float and not np.isfinite(v):
                    continue
                if has_pad and np.float64(v) == pad:
                    continue
                buf[i, k] = v
                k += 1
        count[i] = k


def image_range(images, valid_h, valid_w, padding):
    """Same contract as `gpucnr.kernels.moments.image_range`, for NumPy arrays: one compiled pass."""
    images = np.ascontiguousarray(images)
    n = images.shape[0]
    if images.dtype.kind == "f":
        lo = np.full(n, np.inf, images.dtype)
        hi = np.full(n, -np.inf, images.dtype)
    else:
        info = np.iinfo(images.dtype)
        lo = np.full(n, info.max, images.dtype)
        hi = np.full(n, info.min, images.dtype)
    found = np.zeros(n, np.bool_)
    vh = np.ascontiguousarray(valid_h, np.int64)
    vw = np.ascontiguousarray(valid_w, np.int64)
    pad = np.ascontiguousarray(padding, np.float64)
    _split(n, lambda a, b: _range(images[a:b], vh[a:b], vw[a:b], pad[a:b], images.dtype.kind == "f", lo[a:b],
                                  hi[a:b], found[a:b]))
    return lo, hi, found


@numba.njit(nogil=True, cache=True)
def _range(images, valid_h, valid_w, padding, is_float, lo, hi, found):  # pragma: no cover - compiled
    for i in range(images.shape[0]):
        pad = padding[i]
        has_pad = np.isfinite(pad)
        for y in range(valid_h[i]):
            for x in range(valid_w[i]):
                v = images[i, y, x]
                if is_float and not np.isfinite(v):
                    continue
                if has_pad and np.float64(v) == pad:
                    continue
                found[i] = True
                if v < lo[i]:
                    lo[i] = v
                if v > hi[i]:
                    hi[i] = v


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
# NB: batches run on several threads at once; two of them growing the pool together would each build one.
_POOL_LOCK = threading.Lock()


_LOCAL = threading.local()


def threads() -> int:
    """Threads used by the compiled loops: this thread's `set_thread_limit`, else ``GPUCNR_THREADS``, else the
    CPU count."""
    limit = getattr(_LOCAL, "limit", None)
    if limit:
        return limit
    return max(1, int(os.environ.get("GPUCNR_THREADS", 0)) or os.cpu_count() or 1)


def set_thread_limit(limit: int | None) -> None:
    """Threads the compiled loops may use when called from this thread (None: the default of `threads`).

    A pool that already runs one batch per core (the pipeline's workers) sets 1: splitting each batch again over
    a shared pool of the same cores only adds hand-offs and contention."""
    _LOCAL.limit = None if limit is None else max(1, int(limit))


def _split(n: int, fn):
    """Run ``fn(start, stop)`` over `threads()` contiguous slices of range(n) in a shared pool."""
    global _POOL, _POOL_SIZE
    k = min(threads(), n)
    if k <= 1:
        return [fn(0, n)]
    with _POOL_LOCK:
        if _POOL_SIZE < k:
            # NB: the smaller pool is left to finish what it runs (a concurrent caller may hold it).
            _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=k, thread_name_prefix="gpucnr"), k
        pool = _POOL
    bounds = [n * j // k for j in range(k + 1)]
    return list(pool.map(lambda j: fn(bounds[j], bounds[j + 1]), range(k)))


@numba.njit(nogil=True, cache=True)
def _exact_raw(images, valid_h, valid_w, border, padding, want_range, lo, hi, found, grid,
               grid_count):  # pragma: no cover - compiled
    """Integer images: count and raw sums of x and x**2 (int64, wrapping: exact modulo 2**64) over the
    interior, excluded pixels, the range over the valid region (`want_range`) and, right after each image's
    pass while it is in cache, its usable 32 x 32 grid pixels (for the shift, known only afterwards)."""
    n = images.shape[0]
    count = np.zeros(n, np.int64)
    a1s = np.zeros(n, np.int64)
    a2s = np.zeros(n, np.int64)
    n_excluded = np.zeros(n, np.int64)
    g = 32
    for i in range(n):
        vh, vw = valid_h[i], valid_w[i]
        y0, y1 = border, max(vh - border, border)
        x0, x1 = border, max(vw - border, border)
        pad = padding[i]
        has_pad = np.isfinite(pad)
        a1 = np.int64(0)
        a2 = np.int64(0)
        if has_pad:
            # Padding pixels are skipped and counted; integer images have no non-finite pixels.
            for y in range(vh):
                inner_row = y0 <= y < y1
                for x in range(vw):
                    raw = images[i, y, x]
                    if np.float64(raw) == pad:
                        n_excluded[i] += 1
                        continue
                    if want_range:
                        found[i] = True
                        lo[i] = min(lo[i], raw)
                        hi[i] = max(hi[i], raw)
                    if inner_row and x0 <= x < x1:
                        v = np.int64(raw)
                        count[i] += 1
                        a1 += v
                        a2 += v * v
        else:
            if want_range and vh > 0 and vw > 0:
                # NB: the range covers the whole valid region (ROIs may lie in the border frame).
                found[i] = True
                rlo, rhi = lo[i], hi[i]
                for y in range(vh):
                    row = images[i, y]
                    for x in range(vw):
                        rlo = min(rlo, row[x])
                        rhi = max(rhi, row[x])
                lo[i], hi[i] = rlo, rhi
            # Raw sums (the loop vectorises best without a shift), re-centred exactly afterwards. The row is sliced
            # and walked from 0: LLVM vectorised `for x in range(x0, x1)` over the whole row not at all (4.5 against
            # 23 GB/s on one core, scripts/bench.py pipeline's kernel time, issue 17).
            for y in range(y0, y1):
                row = images[i, y, x0:x1]
                r1 = np.int64(0)
                r2 = np.int64(0)
                for x in range(row.shape[0]):
                    v = np.int64(row[x])
                    r1 += v
                    r2 += v * v
                a1 += r1
                a2 += r2
            count[i] = (y1 - y0) * (x1 - x0)
        a1s[i] = a1
        a2s[i] = a2
        k = 0
        for a in range(g):
            y = a * vh // g
            if y >= vh:
                continue
            for b in range(g):
                x = b * vw // g
                if x >= vw:
                    continue
                raw = images[i, y, x]
                if has_pad and np.float64(raw) == pad:
                    continue
                grid[i, k] = raw
                k += 1
        grid_count[i] = k
    return count, a1s, a2s, n_excluded


@numba.njit(nogil=True, cache=True)
def _float_totals(images, shift, valid_h, valid_w, border, padding, scale, lo, hi,
                  found):  # pragma: no cover - compiled
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
        sc = scale[i]
        pad = padding[i]
        has_pad = np.isfinite(pad)
        flo, fhi, seen = lo[i], hi[i], False
        for y in range(vh):
            inner_row = y0 <= y < y1
            # Row partial sums, then image sums: error ~ eps (W + H), not eps * H * W.
            r1 = 0.0
            r2 = 0.0
            for x in range(vw):
                v = np.float64(images[i, y, x])
                if not np.isfinite(v) or (has_pad and v == pad):
                    n_excluded[i] += 1
                    continue
                seen = True
                if v < flo:
                    flo = v
                if v > fhi:
                    fhi = v
                if inner_row and x0 <= x < x1:
                    d = (v - c) * sc
                    count[i] += 1
                    r1 += d
                    r2 += d * d
            s1[i] += r1
            s2[i] += r2
        lo[i], hi[i], found[i] = flo, fhi, seen
    return count, s1, s2, n_excluded


def window_sums(images, labels, cells, params, shift, valid_h, valid_w, padding, scale=None):
    """Same contract as `gpucnr.kernels.batch._window_pass`, for NumPy arrays: per cell, in compiled loops
    over its window, the ROI sums (two-pass for float images), the ROI pixels inside the valid region and
    the background window part (see `gpucnr.kernels.masks.WindowMasks`; ring sums two-pass for floats).

    Returns ``(roi_sums, roi_centre, n_inside, part_sums, part_centre)`` like the portable path: the
    centres are relative to the image's shift, in its scaled units (0 for integer images).
    """
    from gpucnr.kernels.masks import window_footprints

    grow, keep_out = window_footprints(params)
    mode = {"complement": 1, "ring": 2}.get(params.background, 0)
    images = np.ascontiguousarray(images)
    if images.dtype == np.bool_:
        images = images.view(np.uint8)
    has_labels = labels is not None
    labels = np.ascontiguousarray(labels) if has_labels else np.zeros((1, 1, 1), np.int64)
    exact = is_exact_integer(np, images.dtype)
    geometry = [np.ascontiguousarray(getattr(cells, k), np.int64) for k in ("image", "kind", "cx", "cy", "r",
                                                                          "y0", "y1", "x0", "x1")]
    rest = (np.ascontiguousarray(valid_h, np.int64), np.ascontiguousarray(valid_w, np.int64),
            np.ascontiguousarray(padding, np.float64), int(params.border), mode, *_row_arrays(grow),
            *_row_arrays(keep_out), np.ascontiguousarray(shift, np.int64 if exact else np.float64))
    if exact:
        kernel = _exact_windows
    else:
        sc = np.ones(images.shape[0]) if scale is None else np.ascontiguousarray(scale, np.float64)
        rest = (*rest, sc)
        kernel = _float_windows
    # NB: cells are independent, so they are split over threads like the image pass.
    parts = _split(geometry[0].shape[0], lambda a, b: kernel(images, labels, has_labels,
                                                             *(g[a:b] for g in geometry), *rest))
    out = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
    zero = np.zeros(geometry[0].shape[0], np.float64)
    roi_centre, part_centre = (zero, zero) if exact else (out[7], out[8])
    return Sums(out[0], out[1], out[2]), roi_centre, out[3], Sums(out[4], out[5], out[6]), part_centre


def _row_arrays(rows):
    """Footprint rows (half-widths for dy = -R..R) as (dy, half-width) arrays."""
    if rows is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    radius = len(rows) // 2
    return np.arange(-radius, radius + 1, dtype=np.int64), np.asarray(rows, np.int64)


@numba.njit(nogil=True, cache=True)
def _cell_masks(labels, has_labels, i, kind, cx, cy, r, y0, y1, x0, x1, vh, vw, reach, border, mode,
                grow_dy, grow_w, keep_dy, keep_w, roi, part, hole, dist):  # pragma: no cover - compiled
    """Fill `roi` and `part` (window-sized views of reused buffers) for one cell; return its window corner
    and size. The window is the ROI box widened by `reach` and clipped to the valid region (pixels beyond
    it belong to no region). `part`: the dilated ROI (mode 1), or the ring (mode 2), within the interior."""
    wy0, wy1 = max(y0 - reach, 0), min(y1 + reach, vh)
    wx0, wx1 = max(x0 - reach, 0), min(x1 + reach, vw)
    if y1 <= y0 or x1 <= x0:
        return wy0, wx0, 0, 0
    h, w = wy1 - wy0, wx1 - wx0
    if kind == 0:
        # NB: a square ROI is its (clipped) box, and its dilation is one run per row (masks.dilate_boxes).
        for yy in range(h):
            y = wy0 + yy
            row_in = border <= y < vh - border
            grow = _box_reach(y, y0, y1, grow_dy, grow_w)
            keep = _box_reach(y, y0, y1, keep_dy, keep_w) if mode == 2 else -1
            for xx in range(w):
                x = wx0 + xx
                roi[yy, xx] = y0 <= y < y1 and x0 <= x < x1
                if mode != 0:
                    hit = row_in and border <= x < vw - border and grow >= 0 and x0 - grow <= x < x1 + grow
                    part[yy, xx] = hit and not (keep >= 0 and x0 - keep <= x < x1 + keep)
        return wy0, wx0, h, w
    far = 1 << 30
    for yy in range(h):
        y = wy0 + yy
        last = -far
        for xx in range(w):
            x = wx0 + xx
            if kind == 1:
                inside = (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r
            else:
                inside = has_labels and np.int64(labels[i, y, x]) == r
            roi[yy, xx] = inside
            if inside:
                last = xx
            dist[yy, xx] = xx - last
        # Distance along the row to the nearest ROI pixel: left scan above, right scan here.
        nxt = far
        for xx in range(w - 1, -1, -1):
            if roi[yy, xx]:
                nxt = xx
            if nxt - xx < dist[yy, xx]:
                dist[yy, xx] = nxt - xx
    if mode == 0:
        return wy0, wx0, h, w
    _dilate_rows(dist, grow_dy, grow_w, part, h, w)
    if mode == 2:
        _dilate_rows(dist, keep_dy, keep_w, hole, h, w)
    for yy in range(h):
        y = wy0 + yy
        row_in = border <= y < vh - border
        for xx in range(w):
            x = wx0 + xx
            keep = row_in and border <= x < vw - border and part[yy, xx]
            part[yy, xx] = keep and not (mode == 2 and hole[yy, xx])
    return wy0, wx0, h, w


@numba.njit(nogil=True, cache=True)
def _box_reach(y, y0, y1, dys, widths):  # pragma: no cover - compiled
    """Half-width of the dilated box [y0, y1) on row y: the widest footprint row dy with y - dy in the box."""
    reach = -1
    for k in range(dys.shape[0]):
        if y0 <= y - dys[k] < y1 and widths[k] > reach:
            reach = widths[k]
    return reach


@numba.njit(nogil=True, cache=True)
def _dilate_rows(dist, dys, widths, out, h, w):  # pragma: no cover - compiled
    """out = the ROI dilated by the footprint (rows dys, half-widths): pixel (y, x) is in it when row
    y - dy holds an ROI pixel within half-width of x. One simple pass per footprint row (vectorises)."""
    for yy in range(h):
        for xx in range(w):
            out[yy, xx] = False
    for k in range(dys.shape[0]):
        dy, half = dys[k], widths[k]
        for yy in range(max(0, dy), min(h, h + dy)):
            src = dist[yy - dy]
            dst = out[yy]
            for xx in range(w):
                dst[xx] = dst[xx] or src[xx] <= half


@numba.njit(nogil=True, cache=True)
def _buffers(y0, y1, x0, x1, reach):  # pragma: no cover - compiled
    hmax, wmax = 1, 1
    for j in range(y0.shape[0]):
        hmax = max(hmax, y1[j] - y0[j] + 2 * reach)
        wmax = max(wmax, x1[j] - x0[j] + 2 * reach)
    return (np.zeros((hmax, wmax), np.bool_), np.zeros((hmax, wmax), np.bool_),
            np.zeros((hmax, wmax), np.bool_), np.zeros((hmax, wmax), np.int64))


@numba.njit(nogil=True, cache=True)
def _cell(j, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w, padding, shift, labels, has_labels, reach,
          border, mode, grow_dy, grow_w, keep_dy, keep_w, roi, part, hole, dist):  # pragma: no cover - compiled
    """Cell j's image, padding, shift and window, its masks filled in the reused buffers."""
    i = image[j]
    wy0, wx0, h, w = _cell_masks(labels, has_labels, i, kind[j], cx[j], cy[j], r[j], y0[j], y1[j], x0[j], x1[j],
                                 valid_h[i], valid_w[i], reach, border, mode, grow_dy, grow_w, keep_dy, keep_w,
                                 roi, part, hole, dist)
    return i, padding[i], np.isfinite(padding[i]), shift[i], wy0, wx0, h, w


@numba.njit(nogil=True, cache=True)
def _exact_windows(images, labels, has_labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w,
                   padding, border, mode, grow_dy, grow_w, keep_dy, keep_w, shift):  # pragma: no cover
    m = image.shape[0]
    out_n = np.zeros(m, np.int64)
    out_s1 = np.zeros(m, np.int64)
    out_s2 = np.zeros(m, np.int64)
    inside_n = np.zeros(m, np.int64)
    part_n = np.zeros(m, np.int64)
    part_s1 = np.zeros(m, np.int64)
    part_s2 = np.zeros(m, np.int64)
    reach = grow_dy.shape[0] // 2 if mode != 0 else 0
    roi, part, hole, dist = _buffers(y0, y1, x0, x1, reach)
    for j in range(m):
        i, pad, has_pad, c, wy0, wx0, h, w = _cell(j, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w,
                                                    padding, shift, labels, has_labels, reach, border, mode,
                                                    grow_dy, grow_w, keep_dy, keep_w, roi, part, hole, dist)
        for yy in range(h):
            for xx in range(w):
                in_roi = roi[yy, xx]
                in_part = mode != 0 and part[yy, xx]
                if not (in_roi or in_part):
                    continue
                raw = images[i, wy0 + yy, wx0 + xx]
                v = np.int64(raw)
                # NB: compared in float64 like `masks.excluded_mask` (a uint64 above 2**63 wraps in int64).
                bad = has_pad and np.float64(raw) == pad
                if in_roi:
                    inside_n[j] += 1
                if bad:
                    continue
                d = v - c
                if in_roi:
                    out_n[j] += 1
                    out_s1[j] += d
                    out_s2[j] += d * d
                if in_part:
                    part_n[j] += 1
                    part_s1[j] += d
                    part_s2[j] += d * d
    return out_n, out_s1, out_s2, inside_n, part_n, part_s1, part_s2


@numba.njit(nogil=True, cache=True)
def _is_bad(v, pad, has_pad):  # pragma: no cover - compiled
    return (not np.isfinite(v)) or (has_pad and v == pad)


@numba.njit(nogil=True, cache=True)
def _float_windows(images, labels, has_labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w,
                   padding, border, mode, grow_dy, grow_w, keep_dy, keep_w, shift, scale):  # pragma: no cover
    m = image.shape[0]
    out_n = np.zeros(m, np.int64)
    out_s1 = np.zeros(m, np.float64)
    out_s2 = np.zeros(m, np.float64)
    centre = np.zeros(m, np.float64)
    part_centre = np.zeros(m, np.float64)
    inside_n = np.zeros(m, np.int64)
    part_n = np.zeros(m, np.int64)
    part_s1 = np.zeros(m, np.float64)
    part_s2 = np.zeros(m, np.float64)
    reach = grow_dy.shape[0] // 2 if mode != 0 else 0
    roi, part, hole, dist = _buffers(y0, y1, x0, x1, reach)
    for j in range(m):
        i, pad, has_pad, c, wy0, wx0, h, w = _cell(j, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w,
                                                    padding, shift, labels, has_labels, reach, border, mode,
                                                    grow_dy, grow_w, keep_dy, keep_w, roi, part, hole, dist)
        # Pass 1: counts and sums about c. Pass 2: the ROI (and a ring, which is a whole background) about
        # its own mean; a complement part stays about c, since it is subtracted from the image totals.
        sc = scale[i]
        roi_s1 = 0.0
        for yy in range(h):
            for xx in range(w):
                in_roi = roi[yy, xx]
                in_part = mode != 0 and part[yy, xx]
                if not (in_roi or in_part):
                    continue
                v = np.float64(images[i, wy0 + yy, wx0 + xx])
                if in_roi:
                    inside_n[j] += 1
                if _is_bad(v, pad, has_pad):
                    continue
                d = (v - c) * sc
                if in_roi:
                    out_n[j] += 1
                    roi_s1 += d
                if in_part:
                    part_n[j] += 1
                    part_s1[j] += d
                    part_s2[j] += d * d
        mean = roi_s1 / out_n[j] if out_n[j] > 0 else 0.0
        centre[j] = mean
        ring_mean = 0.0
        if mode == 2:
            ring_mean = part_s1[j] / part_n[j] if part_n[j] > 0 else 0.0
            part_centre[j] = ring_mean
            part_s1[j] = 0.0
            part_s2[j] = 0.0
        for yy in range(h):
            for xx in range(w):
                in_roi = roi[yy, xx]
                in_ring = mode == 2 and part[yy, xx]
                if not (in_roi or in_ring):
                    continue
                v = np.float64(images[i, wy0 + yy, wx0 + xx])
                if _is_bad(v, pad, has_pad):
                    continue
                if in_roi:
                    d = (v - c) * sc - mean
                    out_s1[j] += d
                    out_s2[j] += d * d
                if in_ring:
                    d = (v - c) * sc - ring_mean
                    part_s1[j] += d
                    part_s2[j] += d * d
    return out_n, out_s1, out_s2, inside_n, part_n, part_s1, part_s2, centre, part_centre


# Label values up to this bound get a direct (image, label) table in `label_boxes`; larger ones take the
# portable sort-based path.
_MAX_DIRECT_LABEL = 1 << 16


def label_boxes(labels, roi_ids, valid_h, valid_w, *, exclude=None):
    """Same contract as `gpucnr.kernels.masks.label_boxes`, for NumPy arrays: one compiled pass over the
    labels into an (image, label value) table of boxes. Returns None when the labels are negative or too
    large for a direct table, and the caller takes the portable path."""
    labels = np.ascontiguousarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    if labels.size == 0:
        return None
    top = int(labels.max())
    if top >= _MAX_DIRECT_LABEL:
        return None
    boxes, negative = _label_table(labels, np.ascontiguousarray(valid_h, np.int64),
                                   np.ascontiguousarray(valid_w, np.int64), max(top, 0) + 1)
    if negative:
        return None
    present = boxes[:, :, 1] > boxes[:, :, 0]
    if roi_ids is None:
        roi_ids = np.flatnonzero(present.any(axis=0)).astype(np.int64)
        roi_ids = roi_ids[(roi_ids != 0) & (roi_ids != (exclude if exclude is not None else 0))]
    roi_ids = np.asarray(roi_ids, np.int64)
    n = labels.shape[0]
    inside = (roi_ids > 0) & (roi_ids <= top)
    table = np.zeros((n, roi_ids.size, 4), np.int64)
    table[:, inside] = boxes[:, roi_ids[inside]]
    y0, y1, x0, x1 = (np.ascontiguousarray(table[:, :, k]).reshape(-1) for k in range(4))
    return roi_ids, y0, y1, x0, x1


@numba.njit(nogil=True, cache=True)
def _label_table(labels, valid_h, valid_w, n_values):  # pragma: no cover - compiled
    """Boxes [y0, y1) x [x0, x1) per (image, label value) over each image's valid region; y0 = y1 = 0
    where the value is absent."""
    n = labels.shape[0]
    out = np.zeros((n, n_values, 4), np.int64)
    negative = False
    for i in range(n):
        for v in range(n_values):
            out[i, v, 0] = 1 << 40
            out[i, v, 2] = 1 << 40
        for y in range(valid_h[i]):
            row = labels[i, y]
            # NB: most rows hold no label; an OR-reduction (which vectorises) skips them.
            any_label = False
            for x in range(valid_w[i]):
                any_label |= row[x] != 0
            if not any_label:
                continue
            for x in range(valid_w[i]):
                v = np.int64(row[x])
                if v > 0:
                    if y < out[i, v, 0]:
                        out[i, v, 0] = y
                    out[i, v, 1] = y + 1
                    if x < out[i, v, 2]:
                        out[i, v, 2] = x
                    if x + 1 > out[i, v, 3]:
                        out[i, v, 3] = x + 1
                elif v < 0:
                    negative = True
        for v in range(n_values):
            if out[i, v, 1] == 0:
                out[i, v, 0] = out[i, v, 1] = out[i, v, 2] = out[i, v, 3] = 0
    return out, negative


def masked_float_sums(d, mask):
    """Counts and sums of float `d` and `d`**2 over `mask`, per leading index, over the last two axes:
    row partial sums in row-major order, so padding around the pixels never changes a bit of the result."""
    shape = d.shape[:-2]
    d3 = np.ascontiguousarray(np.broadcast_to(d, np.broadcast_shapes(d.shape, mask.shape)), np.float64)
    m3 = np.ascontiguousarray(np.broadcast_to(mask, d3.shape))
    h, w = d3.shape[-2:]
    k = int(np.prod(shape, dtype=np.int64))
    n, s1, s2 = _masked_rows(d3.reshape(k, h, w), m3.reshape(k, h, w))
    return n.reshape(shape), s1.reshape(shape), s2.reshape(shape)


@numba.njit(nogil=True, cache=True)
def _masked_rows(d, mask):  # pragma: no cover - compiled
    k = d.shape[0]
    n = np.zeros(k, np.int64)
    s1 = np.zeros(k, np.float64)
    s2 = np.zeros(k, np.float64)
    for i in range(k):
        for y in range(d.shape[1]):
            r1 = 0.0
            r2 = 0.0
            for x in range(d.shape[2]):
                if mask[i, y, x]:
                    v = d[i, y, x]
                    n[i] += 1
                    r1 += v
                    r2 += v * v
            s1[i] += r1
            s2[i] += r2
    return n, s1, s2
