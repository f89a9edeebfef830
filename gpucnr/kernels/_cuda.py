"""The "cuda" kernels (`gpucnr.backend.fast_path` for CuPy): numba-cuda device kernels for the image pass,
the ROI window pass, the label boxes (and the ids when they are not given), complement-all's union, gCNR
(extremes and histograms), MRQy's patches and the status/CNR step, taking CuPy arrays through the CUDA array
interface. A batch costs at most 12 launches and 2 device->host reads (tests/test_cuda.py counts them).

Each kernel reads each pixel once, keeps its running sums in registers and writes a handful of numbers per
image or per cell. Integer sums (counts, exact int64 sums of d = x - c, ranges) meet in atomics, whose order
does not matter; float sums never do: each block reduces its threads' partials in a fixed tree, and a second
kernel adds the block partials of an image in block order, so a float result is the same bit for bit on every
run (DESIGN §9). Float atomics serve only min and max, whose result does not depend on order.

Arrays: every kernel argument must expose ``__cuda_array_interface__`` (numba would silently copy a NumPy
argument to the device and back); outputs and temporaries are allocated through the arrays' own namespace,
so on CuPy they come from CuPy's memory pool; launches go to CuPy's current stream (`_stream`), with numba's
implicit synchronisation on foreign arrays off (``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0``: the stream orders the
work).

Test mode: with ``GPUCNR_CUDA_SIM=1`` (and ``NUMBA_ENABLE_CUDASIM=1`` set before numba.cuda is first imported)
the same kernels run in numba's CUDA simulator on NumPy arrays, which proves their logic on a CPU, not CuPy's
(see docs/gpu.md). The launch configuration is then a few threads per block: the simulator runs every thread
as a Python thread. `LAUNCHES` counts the kernel launches (tests and scripts/gpu_check.py read it).
"""

from __future__ import annotations

import math
import os
import threading

# NB: before numba.cuda is imported: the kernels run on CuPy's stream, which orders them with CuPy's own work;
# numba's default would synchronise the device on every foreign array it is handed.
if "NUMBA_CUDA_ARRAY_INTERFACE_SYNC" not in os.environ:
    os.environ["NUMBA_CUDA_ARRAY_INTERFACE_SYNC"] = "0"
    _SYNC_CHOSEN = False
else:
    _SYNC_CHOSEN = True

import array_api_compat
import numpy as np
from numba import cuda

from gpucnr.backend import BackendUnavailableError, to_host
from gpucnr.kernels.footprints import footprint_offsets, footprint_rows
from gpucnr.kernels.masks import is_exact_integer, window_footprints
from gpucnr.kernels.moments import image_shift
from gpucnr.kernels.sums import Sums

__all__ = ["LAUNCHES", "direct_background", "finish_cells", "gcnr_counts", "gcnr_values", "image_range",
           "image_totals", "integer_pass", "label_boxes", "label_dense", "mrqy", "native", "signatures", "simulated",
           "union_sums", "window_extent", "window_sums"]


if not _SYNC_CHOSEN:
    # NB: numba.cuda may have been imported (and its configuration read) before gpucnr; the user's own choice,
    # made in the environment, stands.
    from numba.cuda.core import config as _config

    _config.CUDA_ARRAY_INTERFACE_SYNC = 0


def simulated() -> bool:
    """True when numba.cuda is numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 before its first import)."""
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


_SIM = simulated()
if os.environ.get("GPUCNR_CUDA_SIM") == "1" and not _SIM:
    raise BackendUnavailableError("GPUCNR_CUDA_SIM=1 runs the device kernels in numba's CUDA simulator, which "
                                  "needs NUMBA_ENABLE_CUDASIM=1 in the environment before numba.cuda is first "
                                  "imported")

# Threads per block (a power of two: the float tree reductions halve it) and, for the image pass, the most
# blocks per image (row groups). The simulator runs each thread as a Python thread, so it gets few.
THREADS = 4 if _SIM else 256
_MAX_ROW_GROUPS = 2 if _SIM else 64
_MAX_CELL_BLOCKS = 2 if _SIM else 4096
# The window pass keeps one window-sized slot (int32 distances, int8 masks) per block: at most this many
# entries in all (64 MB of distances), so a batch holding one very large ROI runs fewer blocks, not more memory.
_SLOT_ENTRIES = 1 << 24

# NB: the simulator swaps module globals while a kernel runs, so two kernels simulated at once from two host
# threads (the pipeline's batch threads) would see each other's thread ids: one at a time.
_SIM_LOCK = threading.Lock()

#: Kernel launches since import (a counter on the launch dispatchers, read by tests and scripts/gpu_check.py):
#: "count" in all, and per kernel name.
LAUNCHES = {"count": 0}


def native(a):
    """`a` as the kernels take it: float16 as float32 (exact; the kernels sum in float64 anyway) and, for
    NumPy arrays (the simulator), native byte order. Booleans are turned into uint8 by the caller."""
    if a is None:
        return None
    xp = array_api_compat.array_namespace(a)
    if getattr(xp, "float16", None) is not None and a.dtype == xp.float16:
        return xp.astype(a, xp.float32)
    if isinstance(a, np.ndarray) and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def _stream():
    """CuPy's current stream as a numba stream (0: the default stream, for the simulator)."""
    if _SIM:
        return 0
    import cupy

    return cuda.external_stream(cupy.cuda.get_current_stream().ptr)


def _launch(kern, grid, block, *args):
    """Launch `kern` on CuPy's current stream after checking that every array argument lives on the device."""
    if _SIM:
        # NB: the simulator's device arrays are NumPy arrays, or array-api-strict arrays (whose every host read
        # a test can count), handed over as the NumPy buffer they wrap (shared: the kernel's writes land there).
        args = tuple(getattr(a, "_array", a) for a in args)
    else:
        for a in args:
            # NB: numba copies a host array to the device and back without a word; that is a bug here.
            assert not hasattr(a, "shape") or hasattr(a, "__cuda_array_interface__"), (
                f"a host array ({type(a).__name__}) was passed to device kernel {kern.__name__}")
    LAUNCHES["count"] += 1
    name = getattr(kern, "__name__", "?")
    LAUNCHES[name] = LAUNCHES.get(name, 0) + 1
    if _SIM:
        with _SIM_LOCK:
            kern[grid, block, 0](*args)
        return
    kern[grid, block, _stream()](*args)


def _row_groups(height: int) -> int:
    """Blocks per image in the image pass: a function of the canvas height only, so an image's float sums do
    not depend on which other images share its batch."""
    return max(1, min(_MAX_ROW_GROUPS, -(-height // 32)))


# ------------------------------------------------------------------------------------------ device helpers


@cuda.jit(device=True, inline=True)
def _tree_sum(buf, a, b, c, d):  # pragma: no cover - compiled
    """Sums of a, b, c and d over the block's threads, in a fixed order (a binary tree over thread ids), through
    the (4, THREADS) shared `buf`; four at a time, so a block pays one tree's barriers for them."""
    t = cuda.threadIdx.x
    buf[0, t] = a
    buf[1, t] = b
    buf[2, t] = c
    buf[3, t] = d
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if t < step:
            for k in range(4):
                buf[k, t] += buf[k, t + step]
        cuda.syncthreads()
        step //= 2
    ra, rb, rc, rd = buf[0, 0], buf[1, 0], buf[2, 0], buf[3, 0]
    cuda.syncthreads()
    return ra, rb, rc, rd


@cuda.jit(device=True, inline=True)
def _box_reach(y, y0, y1, dys, widths):  # pragma: no cover - compiled
    """Half-width of the dilated box [y0, y1) on row y (as `_numpy_fast._box_reach`)."""
    reach = -1
    for k in range(dys.shape[0]):
        if y0 <= y - dys[k] < y1 and widths[k] > reach:
            reach = widths[k]
    return reach


@cuda.jit(device=True, inline=True)
def _in_roi(labels, i, kind, cx, cy, r, y0, y1, x0, x1, y, x):  # pragma: no cover - compiled
    """Pixel (y, x) of image i, inside the valid region, belongs to the cell's ROI (masks.roi_mask)."""
    if not (y0 <= y < y1 and x0 <= x < x1):
        return False
    if kind == 0:
        return True
    if kind == 1:
        return (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r
    return np.int64(labels[i, y, x]) == r


@cuda.jit(device=True, inline=True)
def _dilated(kind, y0, y1, x0, x1, y, x, yy, xx, h, w, dist, slot, dys, widths):  # pragma: no cover - compiled
    """(y, x) lies in the ROI dilated by the footprint (rows dys, half-widths): analytic for a box, else from
    the per-row distances to the nearest ROI pixel of the (h, w) window (`dist`, row-major)."""
    if kind == 0:
        if y1 <= y0 or x1 <= x0:
            return False
        reach = _box_reach(y, y0, y1, dys, widths)
        return reach >= 0 and x0 - reach <= x < x1 + reach
    for k in range(dys.shape[0]):
        src = yy - dys[k]
        if 0 <= src < h and dist[slot, src * w + xx] <= widths[k]:
            return True
    return False


# ------------------------------------------------------------------------------------------ the image pass


@cuda.jit
def _int_pass(images, shift, valid_h, valid_w, border, padding, want_range, count, s1, s2, n_excluded, lo, hi,
              found):  # pragma: no cover - compiled
    """Integer images: per image, count and exact int64 sums of d = x - c over the interior, excluded
    (padding) pixels over the valid region and, with `want_range`, min and max over its usable pixels.
    Block (i, b) takes rows b, b + B, ... of image i; its threads take columns t, t + T, ... (coalesced).
    Partials meet in integer atomics (wrapping int64 adds: exact whenever the total fits)."""
    groups = cuda.gridDim.y
    t = cuda.threadIdx.x
    for i in range(cuda.blockIdx.x, images.shape[0], cuda.gridDim.x):
        vh, vw = valid_h[i], valid_w[i]
        y0, y1 = border, max(vh - border, border)
        x0, x1 = border, max(vw - border, border)
        c = shift[i]
        pad = padding[i]
        has_pad = math.isfinite(pad)
        k = np.int64(0)
        a1 = np.int64(0)
        a2 = np.int64(0)
        bad = np.int64(0)
        seen = False
        rlo = lo[i]
        rhi = hi[i]
        for y in range(cuda.blockIdx.y, vh, groups):
            inner_row = y0 <= y < y1
            for x in range(t, vw, THREADS):
                raw = images[i, y, x]
                if has_pad and np.float64(raw) == pad:
                    bad += 1
                    continue
                if want_range:
                    seen = True
                    rlo = min(rlo, raw)
                    rhi = max(rhi, raw)
                if inner_row and x0 <= x < x1:
                    d = np.int64(raw) - c
                    k += 1
                    a1 += d
                    a2 += d * d
        cuda.atomic.add(count, i, k)
        cuda.atomic.add(s1, i, a1)
        cuda.atomic.add(s2, i, a2)
        cuda.atomic.add(n_excluded, i, bad)
        if seen:
            cuda.atomic.min(lo, i, rlo)
            cuda.atomic.max(hi, i, rhi)
            found[i] = 1


@cuda.jit
def _float_pass(images, shift, valid_h, valid_w, border, padding, scale, count, part_s1, part_s2, n_excluded,
                lo, hi, found):  # pragma: no cover - compiled
    """Float images: per image, count and block partial sums of d = (x - c) * scale over the interior
    (part_s1/part_s2 of shape (n, B), reduced in block order by `_float_finish`), excluded pixels (not
    finite, or padding) over the valid region, and min and max of its usable pixels (float64)."""
    groups = cuda.gridDim.y
    b = cuda.blockIdx.y
    t = cuda.threadIdx.x
    buf = cuda.shared.array((4, THREADS), np.float64)
    for i in range(cuda.blockIdx.x, images.shape[0], cuda.gridDim.x):
        vh, vw = valid_h[i], valid_w[i]
        y0, y1 = border, max(vh - border, border)
        x0, x1 = border, max(vw - border, border)
        c = shift[i]
        sc = scale[i]
        pad = padding[i]
        has_pad = math.isfinite(pad)
        k = np.int64(0)
        bad = np.int64(0)
        r1 = 0.0
        r2 = 0.0
        seen = False
        flo = math.inf
        fhi = -math.inf
        for y in range(b, vh, groups):
            inner_row = y0 <= y < y1
            for x in range(t, vw, THREADS):
                v = np.float64(images[i, y, x])
                if not math.isfinite(v) or (has_pad and v == pad):
                    bad += 1
                    continue
                seen = True
                flo = min(flo, v)
                fhi = max(fhi, v)
                if inner_row and x0 <= x < x1:
                    d = (v - c) * sc
                    k += 1
                    r1 += d
                    r2 += d * d
        cuda.atomic.add(count, i, k)
        cuda.atomic.add(n_excluded, i, bad)
        if seen:
            # NB: min and max do not depend on the order of the updates (no float sum meets in an atomic).
            cuda.atomic.min(lo, i, flo)
            cuda.atomic.max(hi, i, fhi)
            found[i] = 1
        p1, p2, _, _ = _tree_sum(buf, r1, r2, 0.0, 0.0)
        if t == 0:
            part_s1[i, b] = p1
            part_s2[i, b] = p2


@cuda.jit
def _float_finish(part_s1, part_s2, s1, s2):  # pragma: no cover - compiled
    """s1[i], s2[i] = the block partials of image i added in block order (deterministic)."""
    for i in range(cuda.grid(1), s1.shape[0], cuda.gridsize(1)):
        a = 0.0
        q = 0.0
        for b in range(part_s1.shape[1]):
            a += part_s1[i, b]
            q += part_s2[i, b]
        s1[i] = a
        s2[i] = q


def _image_pass(images, shift, valid_h, valid_w, border, padding, scale, with_range):
    """Run the image pass; returns ``(Sums, n_excluded, (lo, hi, found))`` as arrays of `images`' namespace."""
    xp = array_api_compat.array_namespace(images)
    dev = array_api_compat.device(images)
    n, height, _ = images.shape
    exact = is_exact_integer(xp, images.dtype)
    groups = _row_groups(height)
    grid = (max(1, min(n, 65535)), groups)
    count = xp.zeros((n,), dtype=xp.int64, device=dev)
    n_excluded = xp.zeros((n,), dtype=xp.int64, device=dev)
    found = xp.zeros((n,), dtype=xp.int8, device=dev)
    vh = xp.astype(valid_h, xp.int64)
    vw = xp.astype(valid_w, xp.int64)
    pad = xp.astype(padding, xp.float64)
    if exact:
        # NB: the range meets in atomic min/max, which exist for 32- and 64-bit integers; narrower images
        # keep int64 bounds (their values all fit).
        wide = images.dtype in (xp.int64, xp.uint64)
        rdt = images.dtype if wide else xp.int64
        info = xp.iinfo(images.dtype if wide else xp.int64)
        lo = xp.full((n,), info.max, dtype=rdt, device=dev)
        hi = xp.full((n,), info.min, dtype=rdt, device=dev)
        s1 = xp.zeros((n,), dtype=xp.int64, device=dev)
        s2 = xp.zeros((n,), dtype=xp.int64, device=dev)
        if n:
            _launch(_int_pass, grid, THREADS, images, xp.astype(shift, xp.int64), vh, vw, int(border), pad,
                    bool(with_range), count, s1, s2, n_excluded, lo, hi, found)
        if not wide:
            lo, hi = xp.astype(lo, images.dtype), xp.astype(hi, images.dtype)
    else:
        lo = xp.full((n,), math.inf, dtype=xp.float64, device=dev)
        hi = xp.full((n,), -math.inf, dtype=xp.float64, device=dev)
        sc = xp.ones((n,), dtype=xp.float64, device=dev) if scale is None else xp.astype(scale, xp.float64)
        part1 = xp.zeros((n, groups), dtype=xp.float64, device=dev)
        part2 = xp.zeros((n, groups), dtype=xp.float64, device=dev)
        s1 = xp.zeros((n,), dtype=xp.float64, device=dev)
        s2 = xp.zeros((n,), dtype=xp.float64, device=dev)
        if n:
            _launch(_float_pass, grid, THREADS, images, xp.astype(shift, xp.float64), vh, vw, int(border), pad, sc,
                    count, part1, part2, n_excluded, lo, hi, found)
            _launch(_float_finish, max(1, min(-(-n // THREADS), 1024)), THREADS, part1, part2, s1, s2)
    return Sums(n=count, s1=s1, s2=s2), n_excluded, (lo, hi, xp.astype(found, xp.bool))


def image_totals(images, shift, valid_h, valid_w, border, padding, scale=None, *, with_range=False):
    """Same contract as `gpucnr.kernels._numpy_fast.image_totals`, for device arrays: one pass per image."""
    totals, n_excluded, rng = _image_pass(images, shift, valid_h, valid_w, border, padding, scale, with_range)
    return (totals, n_excluded, rng) if with_range else (totals, n_excluded)


def integer_pass(images, valid_h, valid_w, border, padding, *, with_range, shift=None):
    """Same contract as `gpucnr.kernels._numpy_fast.integer_pass`, for device arrays: the shift (the grid
    median of `moments.image_shift`, unless given), then one pass for the totals about it and, with
    `with_range`, the range. Returns ``(shift, totals, n_excluded, range or None)``."""
    xp = array_api_compat.array_namespace(images)
    if shift is None:
        # NB: the grid median is 1024 values per image: a few array operations on the device, not a pass.
        shift = image_shift(xp, images, valid_h, valid_w, padding)
    totals, n_excluded, rng = _image_pass(images, shift, valid_h, valid_w, border, padding, None, with_range)
    return shift, totals, n_excluded, (rng if with_range else None)


def image_range(images, valid_h, valid_w, padding):
    """Same contract as `gpucnr.kernels.moments.image_range`, for device arrays (the image pass's range)."""
    xp = array_api_compat.array_namespace(images)
    n = images.shape[0]
    zero = xp.zeros((n,), dtype=xp.int64 if is_exact_integer(xp, images.dtype) else xp.float64,
                    device=array_api_compat.device(images))
    return _image_pass(images, zero, valid_h, valid_w, 0, padding, None, True)[2]


# ------------------------------------------------------------------------------------------ the window pass


@cuda.jit(device=True, inline=True)
def _window_of(j, image, y0, y1, x0, x1, valid_h, valid_w, reach):  # pragma: no cover - compiled
    """Cell j's image i, its valid extents, its ROI box [ky0, ky1) x [kx0, kx1) and its window: the box grown by
    `reach` within the valid region, from (wy0, wx0), h x w (h or w <= 0 when the box lies outside it)."""
    i = image[j]
    vh, vw = valid_h[i], valid_w[i]
    ky0, ky1, kx0, kx1 = y0[j], y1[j], x0[j], x1[j]
    wy0, wy1 = max(ky0 - reach, 0), min(ky1 + reach, vh)
    wx0, wx1 = max(kx0 - reach, 0), min(kx1 + reach, vw)
    return i, vh, vw, ky0, ky1, kx0, kx1, wy0, wx0, wy1 - wy0, wx1 - wx0


@cuda.jit(device=True, inline=True)
def _window_pixel(q, labels, i, kind, cx, cy, r, ky0, ky1, kx0, kx1, wy0, wx0, h, w, vh, vw, border, mode, dist, slot,
                  grow_dy, grow_w, keep_dy, keep_w):  # pragma: no cover - compiled
    """Pixel q (row-major) of a cell's window: its (y, x), whether it is in the ROI, and whether it is in the
    background window part — mode 1: the dilated ROI within the interior; mode 2: the ring (dilated by grow, not
    by keep) within the interior; mode 0: never."""
    yy = q // w
    xx = q - yy * w
    y, x = wy0 + yy, wx0 + xx
    in_roi = _in_roi(labels, i, kind, cx, cy, r, ky0, ky1, kx0, kx1, y, x)
    in_part = False
    if mode != 0 and border <= y < vh - border and border <= x < vw - border:
        in_part = _dilated(kind, ky0, ky1, kx0, kx1, y, x, yy, xx, h, w, dist, slot, grow_dy, grow_w)
        if in_part and mode == 2:
            in_part = not _dilated(kind, ky0, ky1, kx0, kx1, y, x, yy, xx, h, w, dist, slot, keep_dy, keep_w)
    return y, x, in_roi, in_part


@cuda.jit(device=True, inline=True)
def _fill_dist(labels, i, kind, cx, cy, r, y0, y1, x0, x1, wy0, wx0, h, w, dist, slot):  # pragma: no cover
    """dist[slot, yy * w + xx] = distance along window row yy to its nearest ROI pixel (a large number when
    the row has none): a left and a right scan per row, rows shared among the block's threads."""
    far = 1 << 30
    for yy in range(cuda.threadIdx.x, h, THREADS):
        y = wy0 + yy
        last = -far
        for xx in range(w):
            if _in_roi(labels, i, kind, cx, cy, r, y0, y1, x0, x1, y, wx0 + xx):
                last = xx
            dist[slot, yy * w + xx] = xx - last
        nxt = far
        for xx in range(w - 1, -1, -1):
            if dist[slot, yy * w + xx] == 0:
                nxt = xx
            if nxt - xx < dist[slot, yy * w + xx]:
                dist[slot, yy * w + xx] = nxt - xx


@cuda.jit
def _int_windows(images, labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w, padding, border, mode,
                 reach, grow_dy, grow_w, keep_dy, keep_w, shift, dist, out_n, out_s1, out_s2, inside_n, part_n,
                 part_s1, part_s2):  # pragma: no cover - compiled
    """Integer images, one block per cell (cells strided over the grid): per cell, the ROI's count and exact
    sums of d = x - c, its pixels inside the valid region, and the background window part (mode 1: the
    dilated ROI within the interior; mode 2: the ring within the interior). As `_numpy_fast._exact_windows`."""
    slot = cuda.blockIdx.x
    t = cuda.threadIdx.x
    for j in range(cuda.blockIdx.x, image.shape[0], cuda.gridDim.x):
        i, vh, vw, ky0, ky1, kx0, kx1, wy0, wx0, h, w = _window_of(j, image, y0, y1, x0, x1, valid_h, valid_w, reach)
        if ky1 <= ky0 or kx1 <= kx0:
            continue
        k_ = kind[j]
        need_dist = mode != 0 and k_ != 0
        if need_dist:
            _fill_dist(labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0, h, w, dist, slot)
        cuda.syncthreads()
        c = shift[i]
        pad = padding[i]
        has_pad = math.isfinite(pad)
        rn = np.int64(0)
        r1 = np.int64(0)
        r2 = np.int64(0)
        inn = np.int64(0)
        pn = np.int64(0)
        p1 = np.int64(0)
        p2 = np.int64(0)
        for q in range(t, h * w, THREADS):
            y, x, in_roi, in_part = _window_pixel(q, labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0,
                                                  h, w, vh, vw, border, mode, dist, slot, grow_dy, grow_w, keep_dy,
                                                  keep_w)
            if not (in_roi or in_part):
                continue
            raw = images[i, y, x]
            if in_roi:
                inn += 1
            # NB: compared in float64 like `masks.excluded_mask` (a uint64 above 2**63 wraps in int64).
            if has_pad and np.float64(raw) == pad:
                continue
            d = np.int64(raw) - c
            if in_roi:
                rn += 1
                r1 += d
                r2 += d * d
            if in_part:
                pn += 1
                p1 += d
                p2 += d * d
        cuda.atomic.add(out_n, j, rn)
        cuda.atomic.add(out_s1, j, r1)
        cuda.atomic.add(out_s2, j, r2)
        cuda.atomic.add(inside_n, j, inn)
        cuda.atomic.add(part_n, j, pn)
        cuda.atomic.add(part_s1, j, p1)
        cuda.atomic.add(part_s2, j, p2)
        # NB: the next cell of this block overwrites `dist`.
        cuda.syncthreads()


@cuda.jit
def _float_windows(images, labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w, padding, border, mode,
                   reach, grow_dy, grow_w, keep_dy, keep_w, shift, scale, dist, flags, out_n, out_s1, out_s2,
                   inside_n, part_n, part_s1, part_s2, centre, part_centre):  # pragma: no cover - compiled
    """Float images, one block per cell: as `_int_windows` with d = (x - c) * scale, the ROI moments two-pass
    (about the ROI's own mean, `centre`) and, for a ring (mode 2, a whole background), the ring's too
    (`part_centre`); a complement part stays about c (it is subtracted from the image totals). Float sums
    are block tree reductions (fixed order); `flags` (per window pixel: 1 ROI, 2 part, usable pixels only)
    carries the masks from the first pass to the second."""
    slot = cuda.blockIdx.x
    t = cuda.threadIdx.x
    fbuf = cuda.shared.array((4, THREADS), np.float64)
    ibuf = cuda.shared.array((4, THREADS), np.int64)
    for j in range(cuda.blockIdx.x, image.shape[0], cuda.gridDim.x):
        i, vh, vw, ky0, ky1, kx0, kx1, wy0, wx0, h, w = _window_of(j, image, y0, y1, x0, x1, valid_h, valid_w, reach)
        if ky1 <= ky0 or kx1 <= kx0:
            continue
        k_ = kind[j]
        if mode != 0 and k_ != 0:
            _fill_dist(labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0, h, w, dist, slot)
        cuda.syncthreads()
        c = shift[i]
        sc = scale[i]
        pad = padding[i]
        has_pad = math.isfinite(pad)
        rn = np.int64(0)
        inn = np.int64(0)
        pn = np.int64(0)
        r1 = 0.0
        p1 = 0.0
        p2 = 0.0
        for q in range(t, h * w, THREADS):
            y, x, in_roi, in_part = _window_pixel(q, labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0,
                                                  h, w, vh, vw, border, mode, dist, slot, grow_dy, grow_w, keep_dy,
                                                  keep_w)
            flags[slot, q] = 0
            if not (in_roi or in_part):
                continue
            v = np.float64(images[i, y, x])
            if in_roi:
                inn += 1
            if not math.isfinite(v) or (has_pad and v == pad):
                continue
            d = (v - c) * sc
            f = 0
            if in_roi:
                f = 1
                rn += 1
                r1 += d
            if in_part:
                f += 2
                pn += 1
                p1 += d
                p2 += d * d
            flags[slot, q] = f
        n_roi, n_part, inside, _ = _tree_sum(ibuf, rn, pn, inn, np.int64(0))
        s_roi, s_part, q_part, _ = _tree_sum(fbuf, r1, p1, p2, 0.0)
        mean = s_roi / n_roi if n_roi > 0 else 0.0
        ring_mean = s_part / n_part if (mode == 2 and n_part > 0) else 0.0
        # Pass 2 over the flagged pixels: the ROI (and a ring) about its own mean.
        r1 = 0.0
        r2 = 0.0
        g1 = 0.0
        g2 = 0.0
        for q in range(t, h * w, THREADS):
            f = flags[slot, q]
            if f == 0:
                continue
            yy = q // w
            xx = q - yy * w
            d = (np.float64(images[i, wy0 + yy, wx0 + xx]) - c) * sc
            if f & 1:
                e = d - mean
                r1 += e
                r2 += e * e
            if mode == 2 and f & 2:
                e = d - ring_mean
                g1 += e
                g2 += e * e
        s1, s2, g1, g2 = _tree_sum(fbuf, r1, r2, g1, g2)
        if mode == 2:
            s_part, q_part = g1, g2
        if t == 0:
            out_n[j] = n_roi
            out_s1[j] = s1
            out_s2[j] = s2
            inside_n[j] = inside
            part_n[j] = n_part
            part_s1[j] = s_part
            part_s2[j] = q_part
            centre[j] = mean
            part_centre[j] = ring_mean
        cuda.syncthreads()


def _row_arrays(xp, rows, dev):
    """Footprint rows (half-widths for dy = -R..R) as (dy, half-width) int64 device arrays."""
    if rows is None:
        return xp.zeros((1,), dtype=xp.int64, device=dev), xp.full((1,), -1, dtype=xp.int64, device=dev)
    radius = len(rows) // 2
    return (xp.arange(-radius, radius + 1, dtype=xp.int64, device=dev),
            xp.asarray(list(rows), dtype=xp.int64, device=dev))


def window_extent(cells):
    """The device values that size the window kernels' slots, int64 ``(h_max, w_max, non_box)``: the largest ROI
    box and whether any ROI is not a box. A caller that reads the device anyway reads them with its own values
    and passes them as `window_sums`'s `sizes`."""
    xp = array_api_compat.array_namespace(cells.image)
    if cells.image.shape[0] == 0:
        return xp.zeros((3,), dtype=xp.int64, device=array_api_compat.device(cells.image))
    return xp.stack([xp.astype(xp.max(cells.y1 - cells.y0), xp.int64), xp.astype(xp.max(cells.x1 - cells.x0),
                     xp.int64), xp.astype(xp.any(cells.kind != 0), xp.int64)])


def _window_setup(xp, labels, cells, params, valid_h, valid_w, padding, dev, sizes=None):
    """What the per-cell window kernels share: ``(blocks, area, dist, labels, geometry, rows, per_image)``;
    `sizes`: `window_extent`'s values on the host, when the caller has read them (else one read here)."""
    grow, keep_out = window_footprints(params)
    mode = {"complement": 1, "ring": 2}.get(params.background, 0)
    reach = params.reach if mode else 0
    m = int(cells.image.shape[0])
    # NB: the per-row distances (non-box ROIs with a window part) and the float masks live in one window-sized
    # slot per block, reused cell after cell: the one host read of this pass sizes them.
    h_max = w_max = 0
    has_dist = False
    if m:
        if sizes is None:
            sizes = to_host(window_extent(cells)).tolist()
        h_max, w_max, non_box = (int(v) for v in sizes)
        h_max, w_max = h_max + 2 * reach, w_max + 2 * reach
        has_dist = mode != 0 and bool(non_box)
    area = max(1, h_max * w_max)
    blocks = max(1, min(m, _MAX_CELL_BLOCKS, _SLOT_ENTRIES // area))
    dist = xp.zeros((blocks, area if has_dist else 1), dtype=xp.int32, device=dev)
    lab = labels if labels is not None else xp.zeros((1, 1, 1), dtype=xp.int64, device=dev)
    geometry = [xp.astype(getattr(cells, k), xp.int64) for k in ("image", "kind", "cx", "cy", "r", "y0", "y1", "x0",
                                                                   "x1")]
    rows = (*_row_arrays(xp, grow, dev), *_row_arrays(xp, keep_out, dev))
    per_image = (xp.astype(valid_h, xp.int64), xp.astype(valid_w, xp.int64), xp.astype(padding, xp.float64),
                 int(params.border), mode, int(reach))
    return blocks, area, dist, lab, geometry, rows, per_image


def window_sums(images, labels, cells, params, shift, valid_h, valid_w, padding, scale=None, *, sizes=None):
    """Same contract as `gpucnr.kernels._numpy_fast.window_sums` (and `batch._window_pass`), for device
    arrays: one block per cell over its window (the ROI box widened by the background's reach, clipped to
    the valid region). Returns ``(roi_sums, roi_centre, n_inside, part_sums, part_centre)``. `sizes`: the host
    values of `window_extent(cells)` when the caller has read them (saves this pass its one host read)."""
    xp = array_api_compat.array_namespace(images)
    dev = array_api_compat.device(images)
    mode = {"complement": 1, "ring": 2}.get(params.background, 0)
    exact = is_exact_integer(xp, images.dtype)
    m = int(cells.image.shape[0])
    blocks, area, dist, lab, geometry, rows, per_image = _window_setup(xp, labels, cells, params, valid_h, valid_w,
                                                                       padding, dev, sizes)

    def zeros(dtype):
        return xp.zeros((m,), dtype=dtype, device=dev)

    i64 = xp.int64
    acc = i64 if exact else xp.float64
    out_n, out_s1, out_s2, inside_n = zeros(i64), zeros(acc), zeros(acc), zeros(i64)
    part_n, part_s1, part_s2 = zeros(i64), zeros(acc), zeros(acc)
    centre, part_centre = zeros(xp.float64), zeros(xp.float64)
    if m:
        if exact:
            _launch(_int_windows, blocks, THREADS, images, lab, *geometry, *per_image, *rows,
                    xp.astype(shift, xp.int64), dist, out_n, out_s1, out_s2, inside_n, part_n, part_s1, part_s2)
        else:
            sc = xp.ones((images.shape[0],), dtype=xp.float64, device=dev) if scale is None else xp.astype(
                scale, xp.float64)
            flags = xp.zeros((blocks, area), dtype=xp.int8, device=dev)
            _launch(_float_windows, blocks, THREADS, images, lab, *geometry, *per_image, *rows,
                    xp.astype(shift, xp.float64), sc, dist, flags, out_n, out_s1, out_s2, inside_n, part_n, part_s1,
                    part_s2, centre, part_centre)
    if exact or mode != 2:
        part_centre = zeros(xp.float64)
    if exact:
        centre = zeros(xp.float64)
    return Sums(out_n, out_s1, out_s2), centre, inside_n, Sums(part_n, part_s1, part_s2), part_centre


@cuda.jit(device=True, inline=True)
def _direct_pixel(q, images, i, iy0, ix0, iw, removed, use_removed, has_roi, k_, ky0, ky1, kx0, kx1, wy0, wx0, h, w,
                  dist, slot, grow_dy, grow_w, has_pad, pad):  # pragma: no cover - compiled
    """Interior pixel q (row-major from (iy0, ix0), rows of iw) of image i in `_float_direct`'s background:
    (usable, its stored value as float64) — not in the left-out part (the union `removed`, or the cell's dilated
    ROI), finite, not padding. Both of the kernel's passes read the same pixels through it."""
    y = iy0 + q // iw
    x = ix0 + q - (q // iw) * iw
    if use_removed and removed[i, y, x] != 0:
        return False, 0.0
    if has_roi and wy0 <= y < wy0 + h and wx0 <= x < wx0 + w and _dilated(
            k_, ky0, ky1, kx0, kx1, y, x, y - wy0, x - wx0, h, w, dist, slot, grow_dy, grow_w):
        return False, 0.0
    v = np.float64(images[i, y, x])
    return math.isfinite(v) and not (has_pad and v == pad), v


@cuda.jit
def _float_direct(images, labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w, padding, border, reach,
                  grow_dy, grow_w, shift, scale, ill, dist, removed, use_removed, out_n, out_s1, out_s2,
                  centre):  # pragma: no cover
    """Float images, complement background, the cells flagged `ill` only (the others' blocks move on at once):
    the background summed directly over the image's interior minus the cell's dilated ROI, two-pass about its
    own mean (`centre`, scaled units) — `batch._direct_background`, without a host read to pick the cells.
    complement-all (`use_removed`): the pixels left out are the image's dilated union (`removed`, from
    `union_sums`) instead of the cell's dilated ROI. One block per cell; float sums are block tree reductions
    (fixed order)."""
    slot = cuda.blockIdx.x
    t = cuda.threadIdx.x
    fbuf = cuda.shared.array((4, THREADS), np.float64)
    ibuf = cuda.shared.array((4, THREADS), np.int64)
    for j in range(cuda.blockIdx.x, image.shape[0], cuda.gridDim.x):
        if ill[j] == 0:
            continue
        i, vh, vw, ky0, ky1, kx0, kx1, wy0, wx0, h, w = _window_of(j, image, y0, y1, x0, x1, valid_h, valid_w, reach)
        has_roi = ky1 > ky0 and kx1 > kx0 and not use_removed
        k_ = kind[j]
        if has_roi and k_ != 0:
            _fill_dist(labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0, h, w, dist, slot)
        cuda.syncthreads()
        c = shift[i]
        sc = scale[i]
        pad = padding[i]
        has_pad = math.isfinite(pad)
        iy0, iy1 = border, max(vh - border, border)
        ix0, ix1 = border, max(vw - border, border)
        iw = ix1 - ix0
        total = (iy1 - iy0) * iw
        cnt = np.int64(0)
        a1 = 0.0
        for q in range(t, total, THREADS):
            usable, v = _direct_pixel(q, images, i, iy0, ix0, iw, removed, use_removed, has_roi, k_, ky0, ky1, kx0,
                                      kx1, wy0, wx0, h, w, dist, slot, grow_dy, grow_w, has_pad, pad)
            if not usable:
                continue
            cnt += 1
            a1 += (v - c) * sc
        n_bg, _, _, _ = _tree_sum(ibuf, cnt, np.int64(0), np.int64(0), np.int64(0))
        s_bg, _, _, _ = _tree_sum(fbuf, a1, 0.0, 0.0, 0.0)
        mean = s_bg / n_bg if n_bg > 0 else 0.0
        e1 = 0.0
        e2 = 0.0
        for q in range(t, total, THREADS):
            usable, v = _direct_pixel(q, images, i, iy0, ix0, iw, removed, use_removed, has_roi, k_, ky0, ky1, kx0,
                                      kx1, wy0, wx0, h, w, dist, slot, grow_dy, grow_w, has_pad, pad)
            if not usable:
                continue
            e = (v - c) * sc - mean
            e1 += e
            e2 += e * e
        s1, s2, _, _ = _tree_sum(fbuf, e1, e2, 0.0, 0.0)
        if t == 0:
            out_n[j] = n_bg
            out_s1[j] = s1
            out_s2[j] = s2
            centre[j] = mean
        # NB: the next cell of this block overwrites `dist`.
        cuda.syncthreads()


def direct_background(images, labels, cells, params, shift, valid_h, valid_w, padding, scale, ill, *, sizes=None,
                      removed=None):
    """Same contract as `batch._direct_background` for the complement (and, with `removed`, the image's dilated
    union from `union_sums`, complement-all) background of float images, for device arrays and every cell at
    once: ``(sums, centre)`` of the cells flagged `ill` (bool, shape (m,)), zeros elsewhere. One launch, no host
    read (`sizes` as `window_sums`'s)."""
    xp = array_api_compat.array_namespace(images)
    dev = array_api_compat.device(images)
    m = int(cells.image.shape[0])
    blocks, _, dist, lab, geometry, rows, per_image = _window_setup(xp, labels, cells, params, valid_h, valid_w,
                                                                    padding, dev, sizes)
    f64 = xp.float64
    out_n = xp.zeros((m,), dtype=xp.int64, device=dev)
    out_s1, out_s2, centre = (xp.zeros((m,), dtype=f64, device=dev) for _ in range(3))
    if m:
        vh, vw, pad, border, _, reach = per_image
        _launch(_float_direct, blocks, THREADS, images, lab, *geometry, vh, vw, pad, border, reach, *rows[:2],
                xp.astype(shift, f64), xp.astype(scale, f64), xp.astype(ill, xp.int8), dist,
                _region_array(xp, removed, dev), removed is not None, out_n, out_s1, out_s2, centre)
    return Sums(out_n, out_s1, out_s2), centre


# ------------------------------------------------------------------------------------------ gCNR histograms


@cuda.jit(device=True, inline=True)
def _bin_of(edges, j, v):  # pragma: no cover - compiled
    """Bin of value v under cell j's inner edges (row j of `edges`, non-decreasing, +inf past its last): how
    many edges are <= v, so bin b holds e_b <= v < e_(b+1) as `histograms._bin_counts` forms it."""
    lo = 0
    hi = edges.shape[1]
    while lo < hi:
        mid = (lo + hi) // 2
        if edges[j, mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit
def _gcnr_extremes(images, labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w, padding, border, mode,
                   reach, grow_dy, grow_w, keep_dy, keep_w, dist, region, use_region, lo, hi):  # pragma: no cover
    """Per cell j, the extremes of its two value multisets (the stored values as float64): lo/hi[j, 0] of the
    ROI's usable pixels, lo/hi[j, 1] of its background — the ring's usable pixels (mode 2), or the image's
    `region` (usable pixels of the background's image-level region) less, for the complement (mode 1), the
    cell's dilated ROI. One block per cell over its window and, with `use_region`, its image's region; min and
    max meet in atomics (order-free: the same result on every run). +inf/-inf where a multiset is empty."""
    slot = cuda.blockIdx.x
    t = cuda.threadIdx.x
    height = region.shape[1]
    width = region.shape[2]
    for j in range(cuda.blockIdx.x, image.shape[0], cuda.gridDim.x):
        i, vh, vw, ky0, ky1, kx0, kx1, wy0, wx0, h, w = _window_of(j, image, y0, y1, x0, x1, valid_h, valid_w, reach)
        if ky1 <= ky0 or kx1 <= kx0:
            continue
        k_ = kind[j]
        if mode != 0 and k_ != 0:
            _fill_dist(labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0, h, w, dist, slot)
        cuda.syncthreads()
        pad = padding[i]
        has_pad = math.isfinite(pad)
        rlo = math.inf
        rhi = -math.inf
        blo = math.inf
        bhi = -math.inf
        for q in range(t, h * w, THREADS):
            y, x, in_roi, in_part = _window_pixel(q, labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0,
                                                  h, w, vh, vw, border, mode, dist, slot, grow_dy, grow_w, keep_dy,
                                                  keep_w)
            if not (in_roi or (mode == 2 and in_part)):
                continue
            v = np.float64(images[i, y, x])
            if not math.isfinite(v) or (has_pad and v == pad):
                continue
            if in_roi:
                rlo = min(rlo, v)
                rhi = max(rhi, v)
            if mode == 2 and in_part:
                blo = min(blo, v)
                bhi = max(bhi, v)
        if use_region:
            # NB: the region holds usable interior pixels only; the complement leaves out the cell's dilated ROI.
            for q in range(t, height * width, THREADS):
                yy = q // width
                xx = q - yy * width
                if region[i, yy, xx] == 0:
                    continue
                if mode == 1 and wy0 <= yy < wy0 + h and wx0 <= xx < wx0 + w and _dilated(
                        k_, ky0, ky1, kx0, kx1, yy, xx, yy - wy0, xx - wx0, h, w, dist, slot, grow_dy, grow_w):
                    continue
                v = np.float64(images[i, yy, xx])
                blo = min(blo, v)
                bhi = max(bhi, v)
        cuda.atomic.min(lo, (j, 0), rlo)
        cuda.atomic.max(hi, (j, 0), rhi)
        cuda.atomic.min(lo, (j, 1), blo)
        cuda.atomic.max(hi, (j, 1), bhi)
        # NB: the next cell of this block overwrites `dist`.
        cuda.syncthreads()


@cuda.jit
def _gcnr_windows(images, labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w, padding, border, mode,
                  reach, grow_dy, grow_w, keep_dy, keep_w, dist, region, use_region, edges, roi_counts,
                  bg_counts):  # pragma: no cover - compiled
    """One block per cell over its window (as `_int_windows`): the ROI's usable pixels counted into
    roi_counts[j, bin] and the background window part into bg_counts[j, bin], subtracted for the complement
    (mode 1: the part is removed from the image region), added for the ring (mode 2); then, with `use_region`,
    the usable pixels of the image-level `region` of the cell's image added to bg_counts. Integer atomics."""
    slot = cuda.blockIdx.x
    t = cuda.threadIdx.x
    sign = np.int64(-1) if mode == 1 else np.int64(1)
    one = np.int64(1)
    height = region.shape[1]
    width = region.shape[2]
    for j in range(cuda.blockIdx.x, image.shape[0], cuda.gridDim.x):
        i, vh, vw, ky0, ky1, kx0, kx1, wy0, wx0, h, w = _window_of(j, image, y0, y1, x0, x1, valid_h, valid_w, reach)
        if ky1 <= ky0 or kx1 <= kx0:
            continue
        k_ = kind[j]
        if mode != 0 and k_ != 0:
            _fill_dist(labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0, h, w, dist, slot)
        cuda.syncthreads()
        pad = padding[i]
        has_pad = math.isfinite(pad)
        for q in range(t, h * w, THREADS):
            y, x, in_roi, in_part = _window_pixel(q, labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0,
                                                  h, w, vh, vw, border, mode, dist, slot, grow_dy, grow_w, keep_dy,
                                                  keep_w)
            if not (in_roi or in_part):
                continue
            # NB: the stored value as float64, as `histograms.gcnr` bins it (excluded pixels enter no region).
            v = np.float64(images[i, y, x])
            if not math.isfinite(v) or (has_pad and v == pad):
                continue
            b = _bin_of(edges, j, v)
            if in_roi:
                cuda.atomic.add(roi_counts, (j, b), one)
            if in_part:
                cuda.atomic.add(bg_counts, (j, b), sign)
        if use_region:
            for q in range(t, height * width, THREADS):
                yy = q // width
                xx = q - yy * width
                if region[i, yy, xx] == 0:
                    continue
                cuda.atomic.add(bg_counts, (j, _bin_of(edges, j, np.float64(images[i, yy, xx]))), one)
        # NB: the next cell of this block overwrites `dist`.
        cuda.syncthreads()


def gcnr_counts(images, labels, cells, params, valid_h, valid_w, padding, inner, region=None, *, sizes=None):
    """The histograms of every cell for gCNR, for device arrays: ``(roi_counts, bg_counts)`` of shape (m, B)
    with B = inner.shape[1] + 1, cell j's bins being [e_b, e_(b+1)) over its inner edges ``inner[j]`` (+inf
    past its own bins; the last bin closed). The background is `region` (a bool or uint8 (n, H, W) mask of each
    image's usable background region, or None for the ring) minus, for the complement, the cell's window part
    (for the ring, that part alone). Counts are integers meeting in atomics: identical to the portable path's.
    One launch (`sizes` as `window_sums`'s)."""
    xp = array_api_compat.array_namespace(images)
    dev = array_api_compat.device(images)
    m = int(cells.image.shape[0])
    edges = xp.astype(inner, xp.float64)
    width = int(edges.shape[1]) + 1
    roi_c = xp.zeros((m, width), dtype=xp.int64, device=dev)
    bg_c = xp.zeros((m, width), dtype=xp.int64, device=dev)
    if m == 0:
        return roi_c, bg_c
    if width == 1:
        # NB: a zero-width edge array has no element for the kernels' indexing: +inf stands for "no edge".
        edges = xp.full((m, 1), math.inf, dtype=xp.float64, device=dev)
    blocks, _, dist, lab, geometry, rows, per_image = _window_setup(xp, labels, cells, params, valid_h, valid_w,
                                                                    padding, dev, sizes)
    reg = _region_array(xp, region, dev)
    _launch(_gcnr_windows, blocks, THREADS, images, lab, *geometry, *per_image, *rows, dist, reg, region is not None,
            edges, roi_c, bg_c)
    return roi_c, bg_c


def _region_array(xp, region, dev):
    """`region` as the kernels take it (uint8), or a one-pixel stand-in that is never read."""
    if region is None:
        return xp.zeros((1, 1, 1), dtype=xp.uint8, device=dev)
    return region if region.dtype == xp.uint8 else xp.astype(region, xp.uint8)


def gcnr_values(images, labels, cells, params, valid_h, valid_w, padding, region, n_roi, n_bg, *, sizes=None):
    """gCNR of every cell (shape (m,), NaN where a region is empty) for device arrays, with no host read: the
    extremes of each cell's ROI and background by `_gcnr_extremes`, the bins and their edges as array
    operations (the formulas of `histograms.gcnr`, so the edges are the same floats), the counts by
    `gcnr_counts`. The bin count comes from `histograms.bin_thresholds` (the host's ``gcnr_bins`` exactly,
    as thresholds on n), the edge array's width from the largest ROI box (`sizes`), not from a read. Two
    launches; memory O(pixels of the batch + cells x bins)."""
    from gpucnr.kernels import histograms

    xp = array_api_compat.array_namespace(images)
    dev = array_api_compat.device(images)
    f64 = xp.float64
    m = int(cells.image.shape[0])
    if m == 0:
        return xp.zeros((0,), dtype=f64, device=dev)
    if sizes is None:
        sizes = to_host(window_extent(cells)).tolist()
    blocks, _, dist, lab, geometry, rows, per_image = _window_setup(xp, labels, cells, params, valid_h, valid_w,
                                                                    padding, dev, sizes)
    lo = xp.full((m, 2), math.inf, dtype=f64, device=dev)
    hi = xp.full((m, 2), -math.inf, dtype=f64, device=dev)
    _launch(_gcnr_extremes, blocks, THREADS, images, lab, *geometry, *per_image, *rows, dist,
            _region_array(xp, region, dev), region is not None, lo, hi)
    low = xp.minimum(lo[:, 0], lo[:, 1])
    high = xp.maximum(hi[:, 0], hi[:, 1])
    usable = (n_roi > 0) & (n_bg > 0)
    # NB: cells with an empty region get NaN below; finite stand-ins keep their edges harmless meanwhile.
    low = xp.where(usable, low, xp.zeros_like(low))
    high = xp.where(usable, high, xp.zeros_like(high))
    n_bins, widest = histograms.bin_counts_of(xp, xp.minimum(n_roi, n_bg), params.gcnr_bins,
                                              int(sizes[0]) * int(sizes[1]))
    inner = histograms.inner_edges(xp, low, high, n_bins, widest)
    roi_c, bg_c = gcnr_counts(images, labels, cells, params, valid_h, valid_w, padding, inner, region, sizes=sizes)
    value = histograms.gcnr_from_counts(xp, roi_c, bg_c, n_roi, n_bg)
    return xp.where(usable, value, xp.full_like(value, math.nan))


# ------------------------------------------------------------------------------------------ MRQy's patches


@cuda.jit(device=True, inline=True)
def _sum25(a):  # pragma: no cover - compiled
    """numpy's pairwise sum of 25 float64 values (8 running sums, combined as a tree, then the 25th): the order
    numpy.mean uses for a row of 25, so `patches.mrqy`'s means are the same floats here."""
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    for i in range(8, 24, 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
    return ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)) + a[24]


@cuda.jit(device=True, inline=True)
def _mrqy_member(images, labels, i, k_, cx, cy, r, ky0, ky1, kx0, kx1, wy0, wx0, h, w, vh, vw, border, mode, dist,
                 grow_dy, grow_w, keep_dy, keep_w, region, padding, which, q):  # pragma: no cover - compiled
    """Pixel q (row-major) of image i, inside its valid extent, belongs to the cell's ROI (which 0: usable ROI
    pixels) or to its background (which 1: complement and ring as the window kernels shape them, label and
    complement-all from `region`), as `patches._regions` forms them. NB: fewer than 30 arguments (CPython passes
    more as a tuple, which numba cannot inline); the block's slot is its index."""
    slot = cuda.blockIdx.x
    y = q // images.shape[2]
    x = q - y * images.shape[2]
    pad = padding[i]
    has_pad = math.isfinite(pad)
    v = np.float64(images[i, y, x])
    usable = math.isfinite(v) and not (has_pad and v == pad)
    if which == 0:
        return usable and _in_roi(labels, i, k_, cx, cy, r, ky0, ky1, kx0, kx1, y, x)
    if mode == 0 or mode == 1:
        if region[i, y, x] == 0:
            return False
        if mode == 0:
            return True
        inside = wy0 <= y < wy0 + h and wx0 <= x < wx0 + w
        return not (inside and _dilated(k_, ky0, ky1, kx0, kx1, y, x, y - wy0, x - wx0, h, w, dist, slot, grow_dy,
                                        grow_w))
    if not (usable and wy0 <= y < wy0 + h and wx0 <= x < wx0 + w):
        return False
    if not (border <= y < vh - border and border <= x < vw - border):
        return False
    return _dilated(k_, ky0, ky1, kx0, kx1, y, x, y - wy0, x - wx0, h, w, dist, slot, grow_dy, grow_w) and not (
        _dilated(k_, ky0, ky1, kx0, kx1, y, x, y - wy0, x - wx0, h, w, dist, slot, keep_dy, keep_w))


@cuda.jit
def _mrqy(images, labels, image, kind, cx, cy, r, y0, y1, x0, x1, valid_h, valid_w, padding, border, mode, reach,
          grow_dy, grow_w, keep_dy, keep_w, dist, region, value, zero):  # pragma: no cover - compiled
    """MRQy's CNR per cell (`patches.mrqy`): for its ROI F and background B, the first maximum in row-major order of
    the region's values zero-filled over the valid extent (a block-wide arg-max: larger value, then smaller index;
    the same answer in any order), the 5 x 5 patch above-left of it (zeros beyond the top and left edges), and
    mean(P_F - P_B) / std(P_B) with numpy's order of sums; `zero` flags std(P_B) == 0. One block per cell."""
    slot = cuda.blockIdx.x
    t = cuda.threadIdx.x
    height = images.shape[1]
    width = images.shape[2]
    best_v = cuda.shared.array(THREADS, np.float64)
    best_q = cuda.shared.array(THREADS, np.int64)
    at = cuda.shared.array(2, np.int64)
    p_f = cuda.local.array(25, np.float64)
    p_b = cuda.local.array(25, np.float64)
    for j in range(cuda.blockIdx.x, image.shape[0], cuda.gridDim.x):
        i, vh, vw, ky0, ky1, kx0, kx1, wy0, wx0, h, w = _window_of(j, image, y0, y1, x0, x1, valid_h, valid_w, reach)
        if ky1 <= ky0 or kx1 <= kx0:
            # NB: an empty ROI dilates to nothing: no window, so no pixel is taken for its dilation.
            h = 0
        k_ = kind[j]
        if mode != 0 and k_ != 0 and h > 0:
            _fill_dist(labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0, h, w, dist, slot)
        cuda.syncthreads()
        for which in range(2):
            bv = -math.inf
            bq = np.int64(height * width)
            for q in range(t, vh * width, THREADS):
                y = q // width
                x = q - y * width
                if x >= vw:
                    continue
                v = 0.0
                if _mrqy_member(images, labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, wy0, wx0, h, w, vh,
                                vw, border, mode, dist, grow_dy, grow_w, keep_dy, keep_w, region, padding, which, q):
                    v = np.float64(images[i, y, x])
                if v > bv:
                    bv = v
                    bq = q
            best_v[t] = bv
            best_q[t] = bq
            cuda.syncthreads()
            step = THREADS // 2
            while step > 0:
                if t < step:
                    ov = best_v[t + step]
                    oq = best_q[t + step]
                    if ov > best_v[t] or (ov == best_v[t] and oq < best_q[t]):
                        best_v[t] = ov
                        best_q[t] = oq
                cuda.syncthreads()
                step //= 2
            if t == 0:
                at[which] = best_q[0]
            cuda.syncthreads()
        if t == 0:
            for which in range(2):
                a = at[which] // width
                b = at[which] - a * width
                for k in range(25):
                    y = a - 5 + k // 5
                    x = b - 5 + k % 5
                    v = 0.0
                    if y >= 0 and x >= 0 and _mrqy_member(images, labels, i, k_, cx[j], cy[j], r[j], ky0, ky1, kx0,
                                                          kx1, wy0, wx0, h, w, vh, vw, border, mode, dist, grow_dy,
                                                          grow_w, keep_dy, keep_w, region, padding, which,
                                                          y * width + x):
                        v = np.float64(images[i, y, x])
                    if which == 0:
                        p_f[k] = v
                    else:
                        p_b[k] = v
            mb = _sum25(p_b) / 25.0
            for k in range(25):
                p_f[k] = p_f[k] - p_b[k]
                e = p_b[k] - mb
                p_b[k] = e * e
            diff = _sum25(p_f) / 25.0
            var = _sum25(p_b) / 25.0
            is_zero = var == 0
            if is_zero:
                if diff != 0:
                    out = -math.inf if diff < 0 else math.inf
                else:
                    out = math.nan
            else:
                out = diff / math.sqrt(var)
            value[j] = out
            zero[j] = 1 if is_zero else 0
        # NB: the next cell of this block overwrites `dist` and the arg-max buffers.
        cuda.syncthreads()


def mrqy(images, labels, cells, params, valid_h, valid_w, padding, region, *, sizes=None):
    """MRQy's CNR of every cell (`patches.mrqy`'s contract: ``(cnr, zero_noise)``, shape (m,)) for device arrays,
    in one launch with no host read; `region` as `gcnr_values`'s (the usable interior for the complement, the
    label or complement-all background; None for the ring)."""
    xp = array_api_compat.array_namespace(images)
    dev = array_api_compat.device(images)
    m = int(cells.image.shape[0])
    value = xp.zeros((m,), dtype=xp.float64, device=dev)
    zero = xp.zeros((m,), dtype=xp.int8, device=dev)
    if m:
        blocks, _, dist, lab, geometry, rows, per_image = _window_setup(xp, labels, cells, params, valid_h, valid_w,
                                                                        padding, dev, sizes)
        _launch(_mrqy, blocks, THREADS, images, lab, *geometry, *per_image, *rows, dist, _region_array(xp, region, dev),
                value, zero)
    return value, zero != 0


# ------------------------------------------------------------------------------------------ complement-all union


@cuda.jit
def _union_paint(image, kind, cx, cy, r, y0, y1, x0, x1, painted):  # pragma: no cover - compiled
    """painted[i, y, x] = 1 over every geometric ROI (square, disk) of image i, clipped to its box (the valid
    region). One block per cell; every write is the same 1, so overlapping ROIs need no order."""
    for j in range(cuda.blockIdx.x, image.shape[0], cuda.gridDim.x):
        i = image[j]
        ky0, ky1, kx0, kx1 = y0[j], y1[j], x0[j], x1[j]
        h = ky1 - ky0
        w = kx1 - kx0
        if h <= 0 or w <= 0:
            continue
        for q in range(cuda.threadIdx.x, h * w, THREADS):
            y = ky0 + q // w
            x = kx0 + q - (q // w) * w
            # NB: kinds 0 and 1 only (a label ROI is its label array's non-zero pixels, `_union_rows`).
            if _in_roi(painted, i, kind[j], cx[j], cy[j], r[j], ky0, ky1, kx0, kx1, y, x):
                painted[i, y, x] = 1


@cuda.jit
def _union_rows(painted, labels, lesions, use_painted, use_labels, use_lesions, valid_h, valid_w,
                dist):  # pragma: no cover - compiled
    """dist[i, y, x] = distance along row y of image i to its nearest union pixel (a large number when the row
    has none): union = painted ROIs, non-zero labels and non-zero lesion pixels (each where asked for) within
    the valid region. One thread per row (rows grid-strided): a left and a right scan."""
    n = dist.shape[0]
    height = dist.shape[1]
    width = dist.shape[2]
    far = 1 << 30
    for q in range(cuda.grid(1), n * height, cuda.gridsize(1)):
        i = q // height
        y = q - i * height
        vw = valid_w[i]
        live = y < valid_h[i]
        last = -far
        for x in range(width):
            hit = False
            if live and x < vw:
                if use_painted and painted[i, y, x] != 0:
                    hit = True
                elif use_labels and labels[i, y, x] != 0:
                    hit = True
                elif use_lesions and lesions[i, y, x] != 0:
                    hit = True
            if hit:
                last = x
            dist[i, y, x] = x - last
        nxt = far
        for x in range(width - 1, -1, -1):
            if dist[i, y, x] == 0:
                nxt = x
            if nxt - x < dist[i, y, x]:
                dist[i, y, x] = nxt - x


@cuda.jit
def _union_keep(images, dist, valid_h, valid_w, padding, border, dys, widths, exact, shift_i, shift_f, scale, keep,
                count, s1_i, s2_i, s1_f, s2_f):  # pragma: no cover - compiled
    """complement-all, per image (one block each, images grid-strided): keep[i, y, x] = 1 on the usable interior
    pixels of the union dilated by the footprint (rows dys, half-widths; from the row distances `dist`), and
    the sums of d over them — d = x - c exact in int64 atomics (`exact`), else d = (x - c) * scale reduced by
    the block's fixed tree (deterministic; one block per image, so no second kernel adds block partials)."""
    t = cuda.threadIdx.x
    height = images.shape[1]
    buf = cuda.shared.array((4, THREADS), np.float64)
    for i in range(cuda.blockIdx.x, images.shape[0], cuda.gridDim.x):
        vh, vw = valid_h[i], valid_w[i]
        y0, y1 = border, max(vh - border, border)
        x0, x1 = border, max(vw - border, border)
        iw = x1 - x0
        pad = padding[i]
        has_pad = math.isfinite(pad)
        ci = shift_i[i]
        cf = shift_f[i]
        sc = scale[i]
        k = np.int64(0)
        a1 = np.int64(0)
        a2 = np.int64(0)
        f1 = 0.0
        f2 = 0.0
        for q in range(t, (y1 - y0) * iw, THREADS):
            y = y0 + q // iw
            x = x0 + q - (q // iw) * iw
            hit = False
            for kk in range(dys.shape[0]):
                src = y - dys[kk]
                if 0 <= src < height and dist[i, src, x] <= widths[kk]:
                    hit = True
                    break
            if not hit:
                continue
            raw = images[i, y, x]
            v = np.float64(raw)
            if not math.isfinite(v) or (has_pad and v == pad):
                continue
            keep[i, y, x] = 1
            k += 1
            if exact:
                d = np.int64(raw) - ci
                a1 += d
                a2 += d * d
            else:
                e = (v - cf) * sc
                f1 += e
                f2 += e * e
        cuda.atomic.add(count, i, k)
        if exact:
            cuda.atomic.add(s1_i, i, a1)
            cuda.atomic.add(s2_i, i, a2)
        p1, p2, _, _ = _tree_sum(buf, f1, f2, 0.0, 0.0)
        if t == 0 and not exact:
            s1_f[i] = p1
            s2_f[i] = p2


def union_sums(images, labels, lesions, cells, params, shift, valid_h, valid_w, padding, scale=None):
    """complement-all on device arrays: ``(sums, keep)`` — per image, the sums of d over its dilated ROI union
    within the usable interior (as `batch._union_pass`), and that union as a uint8 (n, H, W) mask (gCNR and the
    direct recompute of ill-conditioned backgrounds read it). The union: every geometric ROI (painted by
    `_union_paint`), the label array's non-zero pixels, the lesions' non-zero pixels, within the valid region,
    dilated by the complement's footprint. Two or three launches, no host read; memory O(pixels)."""
    xp = array_api_compat.array_namespace(images)
    dev = array_api_compat.device(images)
    n, height, width = images.shape
    exact = is_exact_integer(xp, images.dtype)
    i64, f64 = xp.int64, xp.float64
    stand_in = xp.zeros((1, 1, 1), dtype=xp.uint8, device=dev)
    painted = stand_in
    geometric = labels is None
    m = int(cells.image.shape[0])
    if geometric and m:
        painted = xp.zeros((n, height, width), dtype=xp.uint8, device=dev)
        geometry = [xp.astype(getattr(cells, k), i64) for k in ("image", "kind", "cx", "cy", "r", "y0", "y1", "x0",
                                                                 "x1")]
        _launch(_union_paint, max(1, min(m, _MAX_CELL_BLOCKS)), THREADS, *geometry, painted)
    vh, vw = xp.astype(valid_h, i64), xp.astype(valid_w, i64)
    dist = xp.zeros((n, height, width), dtype=xp.int32, device=dev)
    keep = xp.zeros((n, height, width), dtype=xp.uint8, device=dev)
    count = xp.zeros((n,), dtype=i64, device=dev)
    s1_i, s2_i = xp.zeros((n,), dtype=i64, device=dev), xp.zeros((n,), dtype=i64, device=dev)
    s1_f, s2_f = xp.zeros((n,), dtype=f64, device=dev), xp.zeros((n,), dtype=f64, device=dev)
    if n:
        rows_ = max(1, min(-(-(n * height) // THREADS), 4096))
        _launch(_union_rows, rows_, THREADS, painted, labels if labels is not None else stand_in,
                lesions if lesions is not None else stand_in, geometric and m > 0, labels is not None,
                lesions is not None, vh, vw, dist)
        dys, widths = _row_arrays(xp, footprint_rows(footprint_offsets(params.footprint, params.dilation)), dev)
        sc = xp.ones((n,), dtype=f64, device=dev) if scale is None else xp.astype(scale, f64)
        _launch(_union_keep, max(1, min(n, 65535)), THREADS, images, dist, vh, vw, xp.astype(padding, f64),
                int(params.border), dys, widths, bool(exact), xp.astype(shift, i64) if exact else count,
                xp.astype(shift, f64), sc, keep, count, s1_i, s2_i, s1_f, s2_f)
    sums = Sums(count, s1_i, s2_i) if exact else Sums(count, s1_f, s2_f)
    return sums, keep


# ------------------------------------------------------------------------------------------ label boxes

_BIG = 1 << 40


@cuda.jit
def _label_boxes(labels, roi_ids, valid_h, valid_w, boxes):  # pragma: no cover - compiled
    """boxes[i, col] = (y0, y1, x0, x1) of roi_ids[col] in image i (min/max by integer atomics; y0 = x0 = BIG
    and y1 = x1 = -1 where absent). Block (i, b) takes rows b, b + B, ...; threads take columns."""
    n_ids = roi_ids.shape[0]
    for i in range(cuda.blockIdx.x, labels.shape[0], cuda.gridDim.x):
        for y in range(cuda.blockIdx.y, valid_h[i], cuda.gridDim.y):
            for x in range(cuda.threadIdx.x, valid_w[i], THREADS):
                v = np.int64(labels[i, y, x])
                if v == 0:
                    continue
                lo = 0
                hi = n_ids
                while lo < hi:
                    mid = (lo + hi) // 2
                    if roi_ids[mid] < v:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < n_ids and roi_ids[lo] == v:
                    cuda.atomic.min(boxes, (i, lo, 0), y)
                    cuda.atomic.max(boxes, (i, lo, 1), y + 1)
                    cuda.atomic.min(boxes, (i, lo, 2), x)
                    cuda.atomic.max(boxes, (i, lo, 3), x + 1)


def label_boxes(labels, roi_ids, valid_h, valid_w, *, exclude=None):
    """Same contract as `gpucnr.kernels.masks.label_boxes`, for device arrays, when the ids are known (the
    ``roi`` dimension); None when `roi_ids` is None (the batch's ids are found by the portable path)."""
    if roi_ids is None:
        return None
    xp = array_api_compat.array_namespace(labels)
    dev = array_api_compat.device(labels)
    n, height, _ = labels.shape
    ids = xp.astype(roi_ids, xp.int64)
    n_ids = int(ids.shape[0])
    boxes = xp.full((n, n_ids, 4), -1, dtype=xp.int64, device=dev)
    if n * n_ids:
        # NB: one strided fill for the lower corners (BIG), the upper ones stay -1.
        start = xp.asarray([_BIG, -1, _BIG, -1], dtype=xp.int64, device=dev)
        boxes = boxes * 0 + start
        _launch(_label_boxes, (max(1, min(n, 65535)), _row_groups(height)), THREADS, labels, ids,
                xp.astype(valid_h, xp.int64), xp.astype(valid_w, xp.int64), boxes)
    # NB: absent ids (no pixel: y1 stays -1) as empty boxes, all zero; array operations, not a launch.
    flat = xp.reshape(boxes, (n * n_ids, 4))
    present = flat[:, 1] > 0
    zero = xp.zeros((n * n_ids,), dtype=xp.int64, device=dev)
    return (ids, *(xp.where(present, flat[:, k], zero) for k in range(4)))


@cuda.jit
def _label_dense(labels, lo, exclude, valid_h, valid_w, boxes, bits):  # pragma: no cover - compiled
    """The batch's label ids found on the device, for label values within [lo, lo + R): bits[v - lo] = 1 for
    every non-zero value v other than `exclude` (-1: none) inside an image's valid extent (as `masks.label_boxes`
    finds them), and boxes[i, v - lo] = (y0, y1, x0, x1) of v in image i (integer atomics;
    y0 = x0 = BIG and y1 = x1 = -1 where absent). Every write to `bits` is the same 1. Block (i, b) takes rows
    b, b + B, ...; threads take columns."""
    height = labels.shape[1]
    width = labels.shape[2]
    for i in range(cuda.blockIdx.x, labels.shape[0], cuda.gridDim.x):
        vh = valid_h[i]
        vw = valid_w[i]
        for y in range(cuda.blockIdx.y, height, cuda.gridDim.y):
            for x in range(cuda.threadIdx.x, width, THREADS):
                v = np.int64(labels[i, y, x])
                if v == 0 or v == exclude or y >= vh or x >= vw:
                    continue
                k = v - lo
                bits[k] = 1
                cuda.atomic.min(boxes, (i, k, 0), y)
                cuda.atomic.max(boxes, (i, k, 1), y + 1)
                cuda.atomic.min(boxes, (i, k, 2), x)
                cuda.atomic.max(boxes, (i, k, 3), x + 1)


def label_dense(labels, lo: int, span: int, valid_h, valid_w, *, exclude=None):
    """Label boxes when the ids are not given, without a host read: every value of [lo, lo + span) is a
    candidate id (`lo`, `span` from the batch's smallest non-zero and largest label, which the input checks
    read). Returns ``(ids, y0, y1, x0, x1, bits)``: the candidates, their boxes as `label_boxes`'s (shape
    (n * span,)) and the int64 presence of each candidate (shape (span,)), which the caller reads with its
    next transfer and hands to `compact_ids`. One launch; memory O(n * span), which the caller bounds."""
    xp = array_api_compat.array_namespace(labels)
    dev = array_api_compat.device(labels)
    n, height, _ = labels.shape
    ids = xp.arange(lo, lo + span, dtype=xp.int64, device=dev)
    start = xp.asarray([_BIG, -1, _BIG, -1], dtype=xp.int64, device=dev)
    boxes = xp.zeros((n, span, 4), dtype=xp.int64, device=dev) + start
    bits = xp.zeros((span,), dtype=xp.int64, device=dev)
    if n * span:
        _launch(_label_dense, (max(1, min(n, 65535)), _row_groups(height)), THREADS, labels, int(lo),
                -1 if exclude is None else int(exclude), xp.astype(valid_h, xp.int64), xp.astype(valid_w, xp.int64),
                boxes, bits)
    flat = xp.reshape(boxes, (n * span, 4))
    present = flat[:, 1] > 0
    zero = xp.zeros((n * span,), dtype=xp.int64, device=dev)
    return (ids, *(xp.where(present, flat[:, k], zero) for k in range(4)), bits)


# ------------------------------------------------------------------------------------------ CNR and status

#: `definition` codes of `_finish`.
_DEFINITIONS = {"pooled": 0, "background": 1, "roi": 2, "pooled-mean": 3, "gcnr": 4, "viqa": 5, "mrqy": 6}


@cuda.jit
def _finish(grid, n_roi, mean_roi, var_roi, n_bg, mean_bg, var_bg, diff, var_roi_s, var_bg_s, slope, polarity,
            n_inside, out_of_range, given, given_zero, definition, signed, ddof, min_bg, o_n_roi, o_mean_roi, o_var_roi,
            o_n_bg, o_mean_bg, o_var_bg, o_cnr, o_status):  # pragma: no cover - compiled
    """Per (image, roi) grid position q: the cell's moments scattered to q (fills where absent), its CNR under
    the definition (`cnr.contrast_to_noise`, operation for operation; gCNR values `given`), and its status
    (`cnr.cell_status`); a CNR is kept only where the status is ok or zero-noise."""
    nan = math.nan
    for q in range(cuda.grid(1), grid.shape[0], cuda.gridsize(1)):
        j = grid[q]
        if j < 0:
            o_n_roi[q] = 0
            o_n_bg[q] = 0
            o_mean_roi[q] = nan
            o_var_roi[q] = nan
            o_mean_bg[q] = nan
            o_var_bg[q] = nan
            o_cnr[q] = nan
            o_status[q] = 1
            continue
        nr, nb = n_roi[j], n_bg[j]
        o_n_roi[q] = nr
        o_n_bg[q] = nb
        o_mean_roi[q] = mean_roi[j]
        o_var_roi[q] = var_roi[j]
        o_mean_bg[q] = mean_bg[j]
        o_var_bg[q] = var_bg[j]
        zero = False
        if definition == 4 or definition == 6:
            # NB: gCNR and MRQy come formed (their own kernels); MRQy flags its zero noise.
            value = given[j]
            zero = given_zero[j] != 0
        else:
            vr, vb = var_roi_s[j], var_bg_s[j]
            if definition == 0:
                noise2 = vr + vb
            elif definition == 1 or definition == 5:
                noise2 = vb
            elif definition == 2:
                noise2 = vr
            else:
                noise2 = (vr + vb) / 2
            d = -diff[j] if slope[j] < 0 else diff[j]
            zero = noise2 == 0
            if zero:
                value = math.inf if d != 0 else nan
            else:
                value = abs(d) / math.sqrt(noise2)
            if definition == 5:
                # NB: vIQA's (mr - mb) / std(b): always signed, never flipped by the display's polarity.
                if d < 0:
                    value = -value
            elif signed:
                if d < 0:
                    value = -value
                value = value * polarity[j]
        if n_inside[j] == 0:
            code = 2
        elif nr <= ddof:
            code = 3
        elif nb <= ddof or nb < min_bg:
            code = 4
        elif out_of_range[j]:
            code = 7
        elif zero:
            code = 5
        else:
            code = 0
        o_status[q] = code
        o_cnr[q] = value if code == 0 or code == 5 else nan


def finish_cells(n, n_ids, grid, params, moments, diff, var_roi_s, var_bg_s, slope, polarity, n_inside, out_of_range,
                 given=None, given_zero=None):
    """The (n, L) outputs of `batch.measure_batch` but the per-image ones, in one launch: `moments` = (n_roi,
    mean_roi, var_roi, n_bg, mean_bg, var_bg) per cell, the scaled variances and contrast for the CNR, the
    cells' slope and polarity, ROI pixels inside the valid region, numeric-range flags and, for gCNR and MRQy,
    their values (`given`; MRQy's zero-noise flags `given_zero`). Same formulas, operation for operation, as the
    portable path (tests compare them)."""
    xp = array_api_compat.array_namespace(grid)
    dev = array_api_compat.device(grid)
    cells = n * n_ids
    f64 = xp.float64
    outs = [xp.zeros((cells,), dtype=xp.int64, device=dev)] + [xp.zeros((cells,), dtype=f64, device=dev)
                                                                 for _ in range(2)]
    outs += [xp.zeros((cells,), dtype=xp.int64, device=dev)] + [xp.zeros((cells,), dtype=f64, device=dev)
                                                                  for _ in range(3)]
    status = xp.zeros((cells,), dtype=xp.int8, device=dev)
    m = int(moments[0].shape[0])
    if given is None:
        given = xp.zeros((max(m, 1),), dtype=f64, device=dev)
    if given_zero is None:
        given_zero = xp.zeros((max(m, 1),), dtype=xp.bool, device=dev)
    if cells:
        if m == 0:
            # NB: no cell at all: one-element stand-ins, never read (every grid position is absent).
            one_i = xp.zeros((1,), dtype=xp.int64, device=dev)
            one_f = xp.zeros((1,), dtype=f64, device=dev)
            moments = (one_i, one_f, one_f, one_i, one_f, one_f)
            diff = var_roi_s = var_bg_s = slope = polarity = one_f
            n_inside = one_i
            out_of_range = xp.zeros((1,), dtype=xp.bool, device=dev)
        ints = (xp.astype(moments[0], xp.int64), xp.astype(moments[3], xp.int64))
        floats = [xp.astype(v, f64) for v in (moments[1], moments[2], moments[4], moments[5], diff, var_roi_s,
                                              var_bg_s, slope, polarity)]
        _launch(_finish, max(1, min(-(-cells // THREADS), 4096)), THREADS, xp.astype(grid, xp.int64), ints[0],
                floats[0], floats[1], ints[1], floats[2], floats[3], *floats[4:], xp.astype(n_inside, xp.int64),
                xp.astype(out_of_range, xp.int8), xp.astype(given, f64), xp.astype(given_zero, xp.int8),
                _DEFINITIONS[params.definition],
                bool(params.signed), int(params.ddof), int(params.min_bg), *outs, status)
    names = ("n_roi", "mean_roi", "var_roi", "n_bg", "mean_bg", "var_bg", "cnr")
    order = (outs[0], outs[1], outs[2], outs[3], outs[4], outs[5], outs[6])
    out = {k: xp.reshape(v, (n, n_ids)) for k, v in zip(names, order, strict=True)}
    out["status"] = xp.reshape(status, (n, n_ids))
    return out


#: The definitions `finish_cells` forms (others take the portable step).
finish_cells.definitions = tuple(_DEFINITIONS)


#: Every kernel with the argument types it is compiled for (`numba.cuda.compile_ptx` in the tests): one
#: signature per image dtype and per label dtype the kernels meet after `batch._entry`.
IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")
LABEL_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")


def signatures():
    """``{kernel name: [argument type tuples]}`` for `numba.cuda.compile_ptx` (tests/test_cuda.py)."""
    from numba import types

    a1 = types.Array(types.int64, 1, "A")
    f1 = types.Array(types.float64, 1, "A")
    f2 = types.Array(types.float64, 2, "A")
    i8 = types.Array(types.int8, 1, "A")
    i2 = types.Array(types.int32, 2, "A")
    b2 = types.Array(types.int8, 2, "A")
    u3 = types.Array(types.uint8, 3, "A")
    out = {"_int_pass": [], "_float_pass": [], "_float_finish": [(f2, f2, f1, f1)], "_int_windows": [],
           "_float_windows": [], "_label_boxes": [], "_gcnr_extremes": [], "_gcnr_windows": [], "_float_direct": [],
           "_union_paint": [(*(a1,) * 9, u3)], "_union_rows": [], "_union_keep": [], "_label_dense": [], "_mrqy": [],
           "_finish": [(a1, a1, f1, f1, a1, f1, f1, f1, f1, f1, f1, f1, a1, i8, f1, i8, types.int64, types.boolean,
                        types.int64, types.int64, a1, f1, f1, a1, f1, f1, f1, i8)]}
    i64, b = types.int64, types.boolean
    for name in IMAGE_DTYPES:
        dt = getattr(types, name)
        img = types.Array(dt, 3, "A")
        geometry = (a1,) * 9
        tail = (a1, a1, f1, i64, i64, i64, a1, a1, a1, a1)
        c2 = types.Array(types.int64, 2, "A")
        out["_union_keep"].append((img, types.Array(types.int32, 3, "A"), a1, a1, f1, i64, a1, a1, b, a1, f1, f1,
                                   u3, a1, a1, a1, f1, f1))
        for lab in LABEL_DTYPES:
            labels = types.Array(getattr(types, lab), 3, "A")
            out["_gcnr_extremes"].append((img, labels, *geometry, *tail, i2, u3, b, f2, f2))
            out["_gcnr_windows"].append((img, labels, *geometry, *tail, i2, u3, b, f2, c2, c2))
            out["_mrqy"].append((img, labels, *geometry, *tail, i2, u3, f1, i8))
        if dt in (types.float32, types.float64):
            out["_float_pass"].append((img, f1, a1, a1, i64, f1, f1, a1, f2, f2, a1, f1, f1, i8))
            for lab in LABEL_DTYPES:
                out["_float_direct"].append((img, types.Array(getattr(types, lab), 3, "A"), *geometry, a1, a1, f1,
                                             i64, i64, a1, a1, f1, f1, i8, i2, u3, b, a1, f1, f1, f1))
                out["_float_windows"].append((img, types.Array(getattr(types, lab), 3, "A"), *geometry, *tail, f1,
                                              f1, i2, b2, a1, f1, f1, a1, a1, f1, f1, f1, f1))
        else:
            rng = types.Array(dt if name in ("int64", "uint64") else types.int64, 1, "A")
            out["_int_pass"].append((img, a1, a1, a1, i64, f1, b, a1, a1, a1, a1, rng, rng, i8))
            for lab in LABEL_DTYPES:
                out["_int_windows"].append((img, types.Array(getattr(types, lab), 3, "A"), *geometry, *tail, a1,
                                            i2, a1, a1, a1, a1, a1, a1, a1))
    for lab in LABEL_DTYPES:
        labels = types.Array(getattr(types, lab), 3, "A")
        # NB: the union's label array and lesions, each with the other absent (a uint8 stand-in) or alike.
        for pair in ((labels, u3), (u3, labels), (labels, labels)):
            out["_union_rows"].append((u3, *pair, b, b, b, a1, a1, types.Array(types.int32, 3, "A")))
        out["_label_dense"].append((labels, i64, i64, a1, a1, types.Array(types.int64, 3, "A"), a1))
        out["_label_boxes"].append((types.Array(getattr(types, lab), 3, "A"), a1, a1, a1,
                                    types.Array(types.int64, 3, "A")))
    return out

