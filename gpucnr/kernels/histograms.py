"""Per-region value counts below thresholds, for the generalised CNR (gCNR) of every cell of a batch.

A background is "image region minus a window part" (or a window part alone), so its histogram is formed
the same way as its moments: counts over the image-level region minus counts over the window part. Counts
below a threshold come from segments of one sorted key array (segment id, rank of the value among all the
batch's values), so every query is a 1-D searchsorted and nothing is done per ROI over a whole image.
"""

from __future__ import annotations

import functools
import math

import array_api_compat

from gpucnr.backend import to_host
from gpucnr.kernels.cnr import gcnr_bins, gcnr_from_counts
from gpucnr.kernels.fastpath import kernel
from gpucnr.kernels.masks import (
    excluded_mask,
    iter_windows,
    union_boxes,
    union_masks,
)

__all__ = ["Segments", "background_region", "bin_counts_of", "bin_thresholds", "gcnr", "gcnr_from_counts",
           "inner_edges"]


class Segments:
    """Values grouped into segments 0..S-1, answering order queries per segment.

    Parameters
    ----------
    universe : float64 array, shape (N,)
        Sorted values containing every value of every segment (the batch's usable pixels).
    values : float64 array, shape (P,)
    segment : int64 array, shape (P,)
    n_segments : int
    """

    def __init__(self, xp, universe, values, segment, n_segments: int):
        self.xp = xp
        self.universe = universe
        self.stride = universe.shape[0] + 1
        rank = xp.searchsorted(universe, values, side="left")
        self.keys = xp.sort(segment * self.stride + rank)
        bounds = xp.arange(n_segments + 1, dtype=xp.int64) * self.stride
        edges = xp.searchsorted(self.keys, bounds, side="left")
        self.start = edges[:-1]
        self.count = edges[1:] - edges[:-1]

    def below(self, segment, thresholds, *, inclusive=False):
        """How many values of `segment` (shape (m,)) are < (or <=) each of `thresholds` (shape (m, B))."""
        xp = self.xp
        side = "right" if inclusive else "left"
        rank = xp.reshape(xp.searchsorted(self.universe, xp.reshape(thresholds, (-1,)), side=side),
                          thresholds.shape)
        # NB: a value v of the universe is < t iff rank_left(v) < rank(t), so the count is a searchsorted.
        query = segment[:, None] * self.stride + rank
        found = xp.reshape(xp.searchsorted(self.keys, xp.reshape(query, (-1,)), side="left"), query.shape)
        return found - xp.take(self.start, segment)[:, None]

    def kth(self, segment, k):
        """The k-th smallest value (0-based) of each `segment`, shape (m, K) for `k` of shape (m, K);
        NaN where k is out of range."""
        xp = self.xp
        count = xp.take(self.count, segment)[:, None]
        ok = (k >= 0) & (k < count)
        pos = xp.take(self.start, segment)[:, None] + xp.clip(k, 0, None)
        pos = xp.clip(pos, 0, max(self.keys.shape[0] - 1, 0))
        if self.keys.shape[0] == 0:
            return xp.full(k.shape, math.nan, dtype=xp.float64)
        key = xp.reshape(xp.take(self.keys, xp.reshape(pos, (-1,))), k.shape)
        rank = key - segment[:, None] * self.stride
        rank = xp.clip(rank, 0, max(self.universe.shape[0] - 1, 0))
        value = xp.reshape(xp.take(self.universe, xp.reshape(rank, (-1,))), k.shape)
        return xp.where(ok, value, xp.full_like(value, math.nan))


def gcnr(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding, roi_ids, n_roi, n_bg, *,
         impl=None, sizes=None, keep=None):
    """gCNR of every present cell (shape (m,)): ``1 - sum min(p_roi, p_bg)`` over ``B`` equal bins spanning
    the pair's joint range, ``B = ceil(2 n**0.4)`` with n the smaller region ("auto"), binned exactly as
    numpy.histogram does (edges from linspace, last bin closed). With `impl` "cuda" everything runs in device
    kernels with no host read (`_cuda.gcnr_values`: extremes, edges and counts; `sizes`: the window pass's
    host values of `_cuda.window_extent`, `keep`: complement-all's dilated union from `_cuda.union_sums`)."""
    n, height, width = images.shape
    m = cells.image.shape[0]
    dev = array_api_compat.device(images)
    f64 = xp.float64
    if m == 0:
        return xp.zeros((0,), dtype=f64, device=dev)

    ys = xp.arange(height, dtype=xp.int64)[None, :, None]
    xs = xp.arange(width, dtype=xp.int64)[None, None, :]
    vh, vw = valid_h[:, None, None], valid_w[:, None, None]
    device = kernel(impl, "gcnr_values")
    if device is not None and (keep is not None or params.background != "complement-all"):
        region = background_region(xp, images, lesions, params, valid_h, valid_w, padding, keep)
        return device(images, labels, cells, params, valid_h, valid_w, padding, region, n_roi, n_bg, sizes=sizes)
    bad = excluded_mask(xp, images, padding[:, None, None])
    usable = (ys < vh) & (xs < vw) & ~bad
    as_float = xp.astype(images, f64)
    universe = xp.sort(as_float[usable])
    image_of = xp.broadcast_to(xp.arange(n, dtype=xp.int64)[:, None, None], images.shape)

    def segments(mask, seg, n_segments):
        return Segments(xp, universe, as_float[mask], seg[mask], n_segments)

    # Cell-level segments: ROI pixels and the background's window part, from the same windows as moments.
    roi_vals, roi_seg, part_vals, part_seg = [], [], [], []
    for wm in iter_windows(xp, images, labels, cells, params, valid_h, valid_w, padding):
        seg = xp.broadcast_to(wm.idx[:, None, None], wm.pixels.shape)
        vals = xp.astype(wm.window.values, f64)
        roi_vals.append(vals[wm.pixels])
        roi_seg.append(seg[wm.pixels])
        if wm.part is not None:
            part_vals.append(vals[wm.part])
            part_seg.append(seg[wm.part])
    roi = Segments(xp, universe, xp.concat(roi_vals), xp.concat(roi_seg), m)
    cell_ids = xp.arange(m, dtype=xp.int64, device=dev)

    background = params.background
    whole = sub = add = None
    if background in ("complement", "complement-all", "label"):
        interior = (ys >= params.border) & (ys < vh - params.border) & (xs >= params.border) & (
            xs < vw - params.border)
        region = interior & ~bad
        if background == "label":
            region = region & (xp.astype(lesions, xp.int64) == params.background_label)
        whole = (segments(region, image_of, n), cells.image)
    if background == "complement":
        sub = (Segments(xp, universe, xp.concat(part_vals), xp.concat(part_seg), m), cell_ids)
    elif background == "ring":
        add = (Segments(xp, universe, xp.concat(part_vals), xp.concat(part_seg), m), cell_ids)
    elif background == "complement-all":
        boxes = union_boxes(xp, cells, grid, lesions, n, int(roi_ids.shape[0]), valid_h, valid_w)
        everything = xp.arange(n, dtype=xp.int64, device=dev)
        win, dilated, base = union_masks(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w,
                                         padding, everything, boxes, roi_ids)
        union = dilated & base
        seg = xp.broadcast_to(everything[:, None, None], union.shape)
        sub = (Segments(xp, universe, xp.astype(win.values, f64)[union], seg[union], n), cells.image)

    def bg_below(thresholds, inclusive=False):
        total = xp.zeros(thresholds.shape, dtype=xp.int64, device=dev)
        if whole is not None:
            total = total + whole[0].below(whole[1], thresholds, inclusive=inclusive)
        if sub is not None:
            total = total - sub[0].below(sub[1], thresholds, inclusive=inclusive)
        if add is not None:
            total = total + add[0].below(add[1], thresholds, inclusive=inclusive)
        return total

    lo_roi = roi.kth(cell_ids, xp.zeros((m, 1), dtype=xp.int64))[:, 0]
    hi_roi = roi.kth(cell_ids, (n_roi - 1)[:, None])[:, 0]
    lo_bg, hi_bg = _background_extremes(xp, whole, sub, add, n_bg, bg_below)
    lo = xp.minimum(lo_roi, lo_bg)
    hi = xp.maximum(hi_roi, hi_bg)
    # NB: numpy.histogram widens an empty range by 0.5 on each side.
    same = lo == hi
    lo = xp.where(same, lo - 0.5, lo)
    hi = xp.where(same, hi + 0.5, hi)
    smaller = xp.minimum(n_roi, n_bg)
    bins = [gcnr_bins(int(v), params.gcnr_bins) if int(v) > 0 else 1 for v in to_host(smaller).tolist()]
    n_bins = xp.asarray(bins, dtype=xp.int64, device=dev)
    inner = inner_edges(xp, lo, hi, n_bins, max(bins))
    roi_c = _bin_counts(xp, roi.below(cell_ids, inner), n_roi)
    bg_c = _bin_counts(xp, bg_below(inner), n_bg)
    value = gcnr_from_counts(xp, roi_c, bg_c, n_roi, n_bg)
    usable_cell = (n_roi > 0) & (n_bg > 0)
    return xp.where(usable_cell, value, xp.full_like(value, math.nan))


def background_region(xp, images, lesions, params, valid_h, valid_w, padding, keep=None):
    """The image-level part of every cell's background for the device kernels, a bool (n, H, W) mask without a
    host read: usable interior pixels (complement), those of the background label (label), those outside the
    image's dilated union `keep` (complement-all, from `_cuda.union_sums`); None for the ring (all in windows)."""
    if params.background == "ring":
        return None
    _, height, width = images.shape
    ys = xp.arange(height, dtype=xp.int64)[None, :, None]
    xs = xp.arange(width, dtype=xp.int64)[None, None, :]
    vh, vw = valid_h[:, None, None], valid_w[:, None, None]
    # NB: look=False: no host read to skip the padding comparison.
    bad = excluded_mask(xp, images, padding[:, None, None], look=False)
    region = (ys >= params.border) & (ys < vh - params.border) & (xs >= params.border) & (
        xs < vw - params.border) & ~bad
    if params.background == "label":
        region = region & (xp.astype(lesions, xp.int64) == params.background_label)
    elif params.background == "complement-all":
        region = region & (keep == 0)
    return region


def inner_edges(xp, lo, hi, n_bins, widest: int):
    """Each cell's inner bin edges, shape (m, widest - 1): numpy.linspace's ``k * step + lo`` for
    k = 1 .. n_bins - 1 (in that order of operations, one array operation each: no fused multiply-add), +inf
    past a cell's own bins. Shared by the portable and the device path, so their edges are the same floats."""
    f64 = xp.float64
    dev = array_api_compat.device(lo)
    k = xp.arange(1, max(int(widest), 1), dtype=xp.int64, device=dev)[None, :]
    step = (hi - lo) / xp.astype(n_bins, f64)
    inner = xp.astype(k, f64) * step[:, None]
    inner = inner + lo[:, None]
    return xp.where(k < n_bins[:, None], inner, xp.full_like(inner, math.inf))


@functools.lru_cache(maxsize=32)
def bin_thresholds(n_max: int) -> tuple:
    """The "auto" bin count as thresholds on n: entry b - 2 is the smallest n <= n_max with
    ``gcnr_bins(n, "auto") >= b``, for b = 2 .. gcnr_bins(n_max). ``gcnr_bins`` never decreases in n (it is
    ``ceil(2 n**0.4)`` in the host's floating point), so ``gcnr_bins(n) = 1 + (thresholds <= n)`` for
    0 <= n <= n_max — the host's value exactly (float rounding included: ``1024**0.4`` is not 16), computed on
    a device without a read. Bisection per threshold: O(bins log n_max) host calls, cached."""
    top = gcnr_bins(max(int(n_max), 0), "auto")
    out = []
    start = 1
    for b in range(2, top + 1):
        lo, hi = start, int(n_max)
        while lo < hi:
            mid = (lo + hi) // 2
            if gcnr_bins(mid, "auto") >= b:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
        start = lo
    return tuple(out)


def bin_counts_of(xp, smaller, option, n_max: int):
    """``(n_bins, widest)``: the bins of each cell (`gcnr_bins` of its smaller region, 1 where it is empty) as a
    device array without a host read, and an upper bound of them all for the edge array's width. `n_max`:
    an upper bound of `smaller` known on the host (the largest ROI box's area)."""
    dev = array_api_compat.device(smaller)
    if option != "auto":
        widest = int(option)
        n_bins = xp.where(smaller > 0, xp.full_like(smaller, widest), xp.ones_like(smaller))
        return n_bins, widest
    thresholds = bin_thresholds(max(int(n_max), 1))
    if not thresholds:
        return xp.ones_like(smaller), 1
    table = xp.asarray(list(thresholds), dtype=xp.int64, device=dev)
    n_bins = 1 + xp.astype(xp.searchsorted(table, xp.astype(smaller, xp.int64), side="right"), xp.int64)
    return n_bins, len(thresholds) + 1


def _bin_counts(xp, below, total):
    """Counts per bin from counts below the inner edges (shape (m, B-1)) and the region size."""
    m = below.shape[0]
    zero = xp.zeros((m, 1), dtype=xp.int64)
    cum = xp.concat([zero, below, total[:, None]], axis=1)
    return cum[:, 1:] - cum[:, :-1]


def _background_extremes(xp, whole, sub, add, n_bg, bg_below):
    """Min and max of each cell's background multiset (whole region - sub part, or add part alone).

    Memory O(cells): a bisection per cell over its region's sorted values, never a (cells, removed values)
    table (one large lesion would make that cells x its window part).
    """
    m = n_bg.shape[0]
    if add is not None and whole is None:
        seg, ids = add
        first = seg.kth(ids, xp.zeros((m, 1), dtype=xp.int64))[:, 0]
        last = seg.kth(ids, (xp.take(seg.count, ids) - 1)[:, None])[:, 0]
        return first, last
    seg, ids = whole
    if sub is None:
        first = seg.kth(ids, xp.zeros((m, 1), dtype=xp.int64))[:, 0]
        last = seg.kth(ids, (xp.take(seg.count, ids) - 1)[:, None])[:, 0]
        return first, last
    # NB: removing q values leaves the minimum among the q + 1 smallest s_0 <= s_1 <= ... of the region: the
    # first s_j with more region values <= s_j than removed values <= s_j. That count of background values <= s_j
    # never decreases with j, so the first such j is found by bisection. Symmetrically for the maximum.
    removed = xp.take(sub[0].count, sub[1])
    size = xp.take(seg.count, ids)
    limit = xp.minimum(removed + 1, size)
    widest = int(xp.max(limit)) if m else 0

    def low_at(j):
        return seg.kth(ids, j[:, None])[:, 0]

    def high_at(j):
        return seg.kth(ids, (size - 1 - j)[:, None])[:, 0]

    def low_alive(j):
        v = low_at(j)
        return ~xp.isnan(v) & (bg_below(xp.where(xp.isnan(v), math.inf, v)[:, None], inclusive=True)[:, 0] >= 1)

    def high_alive(j):
        v = high_at(j)
        return ~xp.isnan(v) & (n_bg - bg_below(xp.where(xp.isnan(v), -math.inf, v)[:, None])[:, 0] >= 1)

    first = _first_alive(xp, limit, widest, low_alive, low_at)
    last = _first_alive(xp, limit, widest, high_alive, high_at)
    return first, last


def _first_alive(xp, limit, widest: int, alive, value_at):
    """Per cell, value_at(j) at the first j in [0, limit) where alive(j) holds (alive is monotone in j: once
    true, true for every larger j); NaN where none. Bisection: ceil(log2(widest + 1)) steps of O(cells)."""
    lo = xp.zeros_like(limit)
    hi = limit
    for _ in range(max(int(widest), 1).bit_length()):
        active = lo < hi
        mid = (lo + hi) // 2
        ok = alive(xp.where(active, mid, xp.zeros_like(mid)))
        hi = xp.where(active & ok, mid, hi)
        lo = xp.where(active & ~ok, mid + 1, lo)
    found = lo < limit
    value = value_at(xp.where(found, lo, xp.zeros_like(lo)))
    return xp.where(found, value, xp.full_like(value, math.nan))
