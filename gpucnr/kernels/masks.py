"""ROI and background masks: ROI boxes, windows around each ROI, dilation by row runs, frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
from array_api_compat import device

from gpucnr.backend import is_cupy, ndimage_for, to_host
from gpucnr.kernels.footprints import ball_offsets, footprint_offsets, footprint_rows, ring_metric

__all__ = [
    "KIND_DISK",
    "KIND_LABEL",
    "KIND_SQUARE",
    "Cells",
    "Window",
    "WindowMasks",
    "base_mask",
    "dilate",
    "dilate_boxes",
    "excluded_mask",
    "gather_window",
    "is_exact_integer",
    "is_narrow_integer",
    "iter_windows",
    "label_boxes",
    "roi_mask",
    "size_groups",
    "union_boxes",
    "union_masks",
    "window_footprints",
]

#: ROI kinds as stored in `Cells.kind`.
KIND_SQUARE, KIND_DISK, KIND_LABEL = 0, 1, 2


@dataclass
class Cells:
    """The (image, roi) cells of one batch that have an ROI, one entry per cell (all arrays shape (m,)).

    Attributes
    ----------
    image, col : int64 arrays
        Position of the image in the batch and of the ROI id in the ``roi`` dimension.
    kind : int64 array
        KIND_SQUARE, KIND_DISK or KIND_LABEL.
    cx, cy, r : int64 arrays
        Geometry of square/disk ROIs (x = column, y = row); for label ROIs ``r`` holds the label value.
    y0, y1, x0, x1 : int64 arrays
        The ROI's bounding box, ``[y0, y1) x [x0, x1)``, clipped to the image's valid region; empty
        (y0 >= y1 or x0 >= x1) when no ROI pixel lies in it.
    """

    image: Any
    col: Any
    kind: Any
    cx: Any
    cy: Any
    r: Any
    y0: Any
    y1: Any
    x0: Any
    x1: Any

    def take(self, xp, idx) -> Cells:
        """The cells at positions `idx`."""
        return Cells(**{k: xp.take(v, idx) for k, v in vars(self).items()})


@dataclass
class Window:
    """Pixels of a window around each of m cells, all arrays shape (m, h, w).

    Attributes
    ----------
    values : array
        The images' stored values (clipped reads; meaningless where ``inside`` is False).
    yy, xx : int64 arrays
        Image coordinates of each window pixel (broadcastable: (m, h, 1) and (m, 1, w)).
    inside : bool array
        Pixel lies in the image's valid region.
    labels : array or None
        The gathered label values, when a label array was given.
    """

    values: Any
    yy: Any
    xx: Any
    inside: Any
    labels: Any = None


def label_boxes(xp, labels, roi_ids, valid_h, valid_w, *, exclude=None):
    """Bounding boxes of every ROI id in every image of a label batch, in one vectorised pass.

    Parameters
    ----------
    labels : int array, shape (n, H, W)
        0 = no ROI; values not in `roi_ids` are ignored.
    roi_ids : int64 array, shape (L,), or None
        Sorted ROI ids (the ``roi`` dimension); None: the non-zero labels present in this batch, inside the valid
        extents.
    valid_h, valid_w : int64 arrays, shape (n,)
        Valid extent of each image; label pixels outside it are ignored.
    exclude : int, optional
        A label that is never an ROI (the background label), when `roi_ids` is None.

    Returns
    -------
    roi_ids : int64 array, shape (L,)
    y0, y1, x0, x1 : int64 arrays, shape (n * L,)
        Box of cell ``image * L + col``, ``[y0, y1) x [x0, x1)``; y0 = y1 = 0 where the id is absent.
    """
    n, height, width = labels.shape
    flat = xp.reshape(labels, (-1,))
    # NB: one pass over the labels (a bool compare, then nonzero); everything after is O(labelled pixels).
    pos = xp.nonzero(flat != 0)[0]
    val = xp.astype(xp.take(flat, pos), xp.int64)
    img = pos // (height * width)
    y = (pos // width) % height
    x = pos % width
    inside = (y < xp.take(valid_h, img)) & (x < xp.take(valid_w, img))
    if roi_ids is None:
        # NB: the ids of pixels inside the valid extents (beyond them is canvas, as the compiled paths read it),
        # sorted: the array API leaves unique_values' order open, and NumPy 2.4 returns them unsorted.
        roi_ids = xp.sort(xp.unique_values(val[inside]))
        if exclude is not None:
            roi_ids = roi_ids[roi_ids != exclude]
    n_ids = roi_ids.shape[0]
    col = xp.searchsorted(roi_ids, val)
    col = xp.clip(col, 0, max(n_ids - 1, 0))
    keep = (xp.take(roi_ids, col) == val) & inside
    key = (img * n_ids + col)[keep]
    y, x = y[keep], x[keep]
    keys = xp.arange(n * n_ids, dtype=xp.int64)
    # NB: a segmented min/max without scatter: sort (key, coordinate) pairs packed into one int64, then
    # the first and last entry of each key's segment are its min and max.
    out = []
    for coord, extent in ((y, height), (x, width)):
        packed = xp.sort(key * extent + coord)
        first = xp.searchsorted(packed, keys * extent)
        end = xp.searchsorted(packed, (keys + 1) * extent)
        present = end > first
        last = xp.clip(end - 1, 0, max(packed.shape[0] - 1, 0))
        safe_first = xp.clip(first, 0, max(packed.shape[0] - 1, 0))
        if packed.shape[0] == 0:
            lo = hi = xp.zeros_like(keys)
        else:
            lo = xp.take(packed, safe_first) - keys * extent
            hi = xp.take(packed, last) - keys * extent + 1
        zero = xp.zeros_like(keys)
        out += [xp.where(present, lo, zero), xp.where(present, hi, zero)]
    return (roi_ids, *out)


def size_groups(xp, heights, widths):
    """Group cells by window size class, so a few padded windows serve ROIs of very different sizes.

    Returns a list of ``(index_array, h, w)``: the cells of each class and the window size that holds them
    (cells are classed by the next power of two of each side, so there are at most ~log2(H) * log2(W)
    classes, usually one; each class's window is the size of its largest member).
    """
    hs = to_host(heights).tolist()
    ws = to_host(widths).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(zip(hs, ws, strict=True)):
        groups.setdefault((_ceil_pow2(h), _ceil_pow2(w)), []).append(i)
    out = []
    for _, idx in sorted(groups.items()):
        # NB: the window is the largest member, not the class size: equal ROIs pay no padding.
        out.append((xp.asarray(idx, dtype=xp.int64), max(hs[i] for i in idx), max(ws[i] for i in idx)))
    return out


def gather_window(xp, images, labels, cells: Cells, reach: int, h: int, w: int, valid_h, valid_w) -> Window:
    """Read an (h, w) window per cell, its top-left corner `reach` pixels above-left of the ROI box.

    Reads are clipped to the array and flagged by ``inside``, so windows may stick out of the image.
    """
    _, height, width = images.shape
    yy = (cells.y0 - reach)[:, None, None] + xp.arange(h, dtype=xp.int64)[None, :, None]
    xx = (cells.x0 - reach)[:, None, None] + xp.arange(w, dtype=xp.int64)[None, None, :]
    vh = xp.take(valid_h, cells.image)[:, None, None]
    vw = xp.take(valid_w, cells.image)[:, None, None]
    # NB: row and column tests on (m, h, 1) and (m, 1, w), one broadcast op for the whole window.
    inside = ((yy >= 0) & (yy < vh)) & ((xx >= 0) & (xx < vw))
    rows = (cells.image * (height * width))[:, None, None] + xp.clip(yy, 0, height - 1) * width
    lin = xp.reshape(rows + xp.clip(xx, 0, width - 1), (-1,))
    shape = (cells.image.shape[0], h, w)
    values = xp.reshape(xp.take(xp.reshape(images, (-1,)), lin), shape)
    lab = None
    if labels is not None:
        lab = xp.reshape(xp.take(xp.reshape(labels, (-1,)), lin), shape)
    return Window(values=values, yy=yy, xx=xx, inside=inside, labels=lab)


def roi_mask(xp, cells: Cells, win: Window, kinds=None):
    """The ROI of each cell inside its window, shape (m, h, w), clipped to the valid region.

    Square (cx, cy, r): x in [cx - r, cx + r), y in [cy - r, cy + r) (the article's select_roi).
    Disk: (x - cx)^2 + (y - cy)^2 <= r^2. Label: the label value held in ``cells.r``.
    `kinds`: the set of kinds that may occur (found here with a host read per kind when None).
    """
    cx = cells.cx[:, None, None]
    cy = cells.cy[:, None, None]
    r = cells.r[:, None, None]
    kind = cells.kind[:, None, None]
    present = kinds if kinds is not None else _kinds(xp, cells)
    mask = None
    # NB: only the kinds present are evaluated; each is one broadcast of row and column terms.
    if KIND_SQUARE in present:
        mask = ((win.yy >= cy - r) & (win.yy < cy + r)) & ((win.xx >= cx - r) & (win.xx < cx + r))
    if KIND_DISK in present:
        dx = win.xx - cx
        dy = win.yy - cy
        disk = (dy * dy) + (dx * dx) <= r * r
        mask = disk if mask is None else xp.where(kind == KIND_DISK, disk, mask)
    if KIND_LABEL in present:
        lab = win.labels == xp.astype(r, win.labels.dtype)
        mask = lab if mask is None else xp.where(kind == KIND_LABEL, lab, mask)
    if mask is None:
        return xp.zeros(win.inside.shape, dtype=xp.bool)
    return mask & win.inside


def _kinds(xp, cells: Cells) -> set:
    """The ROI kinds among `cells` (one host read for all of them)."""
    kinds = (KIND_SQUARE, KIND_DISK, KIND_LABEL)
    present = to_host(xp.stack([xp.astype(xp.any(cells.kind == k), xp.int64) for k in kinds])).tolist()
    return {k for k, p in zip(kinds, present, strict=True) if p}


def dilate_boxes(xp, cells: Cells, win: Window, rows: tuple[int, ...]):
    """Dilation of each cell's (clipped) ROI box by a footprint of row half-widths, without a mask.

    The dilation of a box by a footprint made of one centred run per row is, on each window row y, one
    run: x in [x0 - reach(y), x1 + reach(y)) with reach(y) the widest footprint row dy whose shifted box
    row y - dy lies in [y0, y1). Exact, and a few row-sized operations instead of a 2-D dilation.
    """
    radius = len(rows) // 2
    y0 = cells.y0[:, None, None]
    y1 = cells.y1[:, None, None]
    reach = xp.full(win.yy.shape, -1, dtype=xp.int64)
    for dy, width in zip(range(-radius, radius + 1), rows, strict=True):
        src = win.yy - dy
        hit = (src >= y0) & (src < y1)
        reach = xp.where(hit & (reach < width), xp.asarray(width, dtype=xp.int64), reach)
    empty = (cells.x1 <= cells.x0)[:, None, None]
    lo = cells.x0[:, None, None] - reach
    hi = cells.x1[:, None, None] + reach
    return ((win.xx >= lo) & (win.xx < hi)) & ((reach >= 0) & ~empty)


def dilate(xp, mask, rows: tuple[int, ...]):
    """Binary dilation of each (h, w) plane of `mask` by a footprint given as row half-widths.

    Pixels beyond the window count as False, so the result is exact wherever the window extends at
    least the footprint's radius beyond the mask. Cost: about 2 max(w) + len(rows) array operations,
    whatever the number of windows.

    Parameters
    ----------
    mask : bool array, shape (m, h, w)
    rows : tuple of int
        ``w(dy)`` for ``dy = -R .. R`` (see `gpucnr.kernels.footprints.footprint_rows`).
    """
    radius = len(rows) // 2
    widest = max(rows)
    if is_cupy(mask):
        # NB: on a GPU every shifted OR below is a kernel launch (about 60 for a ring): one cupyx call instead.
        # On the CPU the row runs stay: scipy.ndimage.binary_dilation tests every footprint pixel at every
        # pixel, measured 6x (cross, r=5) to 14x (disk, r=15) slower on (1500, 40, 40) windows.
        dx = xp.arange(-widest, widest + 1, dtype=xp.int64, device=device(mask))[None, :]
        half = xp.asarray(rows, dtype=xp.int64, device=device(mask))[:, None]
        structure = xp.abs(dx) <= half  # (2 radius + 1, 2 widest + 1): row dy is the run |dx| <= rows[dy]
        return ndimage_for(mask).binary_dilation(mask, structure=structure[None, :, :])
    # NB: horizontal dilations by every half-width first (each one two shifted ORs from the previous),
    # then one vertical shift per footprint row: O(R) array operations instead of O(R^2) offsets.
    by_width = [mask]
    for width in range(1, widest + 1):
        prev = by_width[-1]
        by_width.append(prev | _shift(xp, mask, width, axis=2) | _shift(xp, mask, -width, axis=2))
    out = xp.zeros_like(mask)
    for dy, width in zip(range(-radius, radius + 1), rows, strict=True):
        out = out | _shift(xp, by_width[width], dy, axis=1)
    return out


def _shift(xp, a, s: int, *, axis: int):
    """`a` moved by `s` pixels along `axis` (positive = towards higher indices), zero-filled."""
    if s == 0:
        return a
    size = a.shape[axis]
    if abs(s) >= size:
        return xp.zeros_like(a)
    pad_shape = list(a.shape)
    pad_shape[axis] = abs(s)
    pad = xp.zeros(tuple(pad_shape), dtype=a.dtype, device=device(a))
    if s > 0:
        kept = a[:, : size - s, :] if axis == 1 else a[:, :, : size - s]
        return xp.concat([pad, kept], axis=axis)
    kept = a[:, -s:, :] if axis == 1 else a[:, :, -s:]
    return xp.concat([kept, pad], axis=axis)


def _ceil_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def is_exact_integer(xp, dtype) -> bool:
    """Integer (and boolean) images: their shifted sums are exact integers (DESIGN §4, docs/accuracy.md)."""
    return dtype == xp.bool or xp.isdtype(dtype, "integral")


def is_narrow_integer(xp, dtype) -> bool:
    """Integer images of at most 16 bits: |x - c| < 2**16 whatever the shift, so their sums of squares fit
    in one int64 word without looking at the values (for images of fewer than 2**30 pixels)."""
    return dtype in (xp.bool, xp.int8, xp.uint8, xp.int16, xp.uint16)


def excluded_mask(xp, values, padding, *, look=True):
    """Pixels left out of every region: not finite, or equal to the image's padding value.

    Parameters
    ----------
    values : array, shape (..., h, w)
    padding : float64 array broadcastable to `values`
        The DICOM pixel padding value per image, NaN where the image has none.
    look : bool
        Read from the device whether any image has a padding value, and skip the comparison when none has
        (a whole-image operation saved); False: always compare (small arrays, no host read).
    """
    if is_exact_integer(xp, values.dtype):
        bad = xp.zeros(values.shape, dtype=xp.bool, device=array_api_compat.device(values))
    else:
        bad = ~xp.isfinite(values)
    has_pad = xp.isfinite(padding)
    if not look or bool(xp.any(has_pad)):
        # NB: compare in float64, where every <= 32-bit stored value and the padding value are exact.
        bad = bad | (has_pad & (xp.astype(values, xp.float64) == padding))
    return bad




@dataclass
class WindowMasks:
    """One size class of cells with their window and masks, all masks bool of shape (k, h, w).

    Attributes
    ----------
    idx : int64 array, shape (k,)
        Positions of these cells among all cells.
    window : Window
    roi : ROI pixels inside the valid region (excluded pixels included: they fix the geometry).
    pixels : ROI pixels that enter the statistics (``roi`` minus excluded pixels).
    part : the window part of the background: the dilated ROI within the interior (complement, to be
        subtracted from the image totals), the ring within the interior (ring, the whole background),
        or None (label and complement-all take their background from the whole image).
    """

    idx: Any
    window: Window
    roi: Any
    pixels: Any
    part: Any


def window_footprints(params):
    """The footprints (row half-widths) that shape a cell's background window part.

    Returns ``(grow, keep_out)``: complement removes the ROI dilated by ``grow``; ring keeps the ROI
    dilated by ``grow`` (gap + width) minus the ROI dilated by ``keep_out`` (gap); other modes: (None, None).
    """
    if params.background == "complement":
        return footprint_rows(footprint_offsets(params.footprint, params.dilation)), None
    if params.background == "ring":
        metric = ring_metric(params.footprint)
        return (footprint_rows(ball_offsets(metric, params.ring_gap + params.ring_width)),
                footprint_rows(ball_offsets(metric, params.ring_gap)))
    return None, None


def iter_windows(xp, images, labels, cells: Cells, params, valid_h, valid_w, padding):
    """Yield a `WindowMasks` per size class of `cells` (see `size_groups`): the portable place that builds
    per-ROI masks, so moments and gCNR see the very same pixels."""
    reach = params.reach
    outer, inner = window_footprints(params)
    for idx, h, w in size_groups(xp, cells.y1 - cells.y0, cells.x1 - cells.x0):
        sub = cells.take(xp, idx)
        win = gather_window(xp, images, labels, sub, reach, h + 2 * reach, w + 2 * reach, valid_h, valid_w)
        roi = roi_mask(xp, sub, win)
        base, bad = base_mask(xp, win, sub, valid_h, valid_w, params.border, padding)
        # NB: square ROIs are boxes, whose dilation is analytic (dilate_boxes); other shapes dilate masks.
        boxes = bool(xp.all(sub.kind == KIND_SQUARE))

        def grow(rows_, sub=sub, win=win, roi=roi, boxes=boxes):
            return dilate_boxes(xp, sub, win, rows_) if boxes else dilate(xp, roi, rows_)

        part = None
        if params.background == "complement":
            part = grow(outer) & base
        elif params.background == "ring":
            part = grow(outer) & ~grow(inner) & base
        yield WindowMasks(idx=idx, window=win, roi=roi, pixels=roi if bad is None else roi & ~bad, part=part)


def base_mask(xp, win, cells, valid_h, valid_w, border, padding):
    """Window pixels that may be background: inside the interior (valid region minus frame), not excluded.

    Returns ``(base, bad)``; ``bad`` (excluded pixels) is None when nothing can be excluded (integer
    images without a padding value), which spares two whole-window operations.
    """
    vh = xp.take(valid_h, cells.image)[:, None, None]
    vw = xp.take(valid_w, cells.image)[:, None, None]
    interior = ((win.yy >= border) & (win.yy < vh - border)) & ((win.xx >= border) & (win.xx < vw - border))
    pad = xp.take(padding, cells.image)
    if is_exact_integer(xp, win.values.dtype) and not bool(xp.any(xp.isfinite(pad))):
        return interior, None
    bad = excluded_mask(xp, win.values, pad[:, None, None])
    return interior & ~bad, bad


def union_boxes(xp, cells, grid, lesions, n, n_ids, valid_h, valid_w):
    """Per image, the box holding all its ROIs (and lesion pixels): [y0, y1) x [x0, x1), shape (n,)."""
    big = 1 << 40
    present = xp.reshape(grid >= 0, (n, n_ids))
    where = xp.clip(grid, 0, max(cells.image.shape[0] - 1, 0))

    def dense(v, fill):
        return xp.reshape(xp.where(grid >= 0, xp.take(v, where), xp.full_like(where, fill)), (n, n_ids))

    if n_ids == 0 or cells.image.shape[0] == 0:
        # NB: no ROI in the batch: every box starts empty (a reduction over zero ids has no identity).
        y0 = x0 = xp.full((n,), big, dtype=xp.int64)
        y1 = x1 = xp.full((n,), -big, dtype=xp.int64)
    else:
        nonempty = present & (dense(cells.y1, 0) > dense(cells.y0, 0)) & (dense(cells.x1, 0) > dense(cells.x0, 0))
        y0 = xp.min(xp.where(nonempty, dense(cells.y0, big), big), axis=1)
        x0 = xp.min(xp.where(nonempty, dense(cells.x0, big), big), axis=1)
        y1 = xp.max(xp.where(nonempty, dense(cells.y1, -big), -big), axis=1)
        x1 = xp.max(xp.where(nonempty, dense(cells.x1, -big), -big), axis=1)
    if lesions is not None:
        ys = xp.arange(lesions.shape[1], dtype=xp.int64)[None, :, None]
        xs = xp.arange(lesions.shape[2], dtype=xp.int64)[None, None, :]
        les = (lesions != 0) & (ys < valid_h[:, None, None]) & (xs < valid_w[:, None, None])
        rows = xp.any(les, axis=2)
        cols = xp.any(les, axis=1)
        has = xp.any(rows, axis=1)
        ly0 = xp.argmax(xp.astype(rows, xp.int8), axis=1)
        ly1 = lesions.shape[1] - xp.argmax(xp.astype(xp.flip(rows, axis=1), xp.int8), axis=1)
        lx0 = xp.argmax(xp.astype(cols, xp.int8), axis=1)
        lx1 = lesions.shape[2] - xp.argmax(xp.astype(xp.flip(cols, axis=1), xp.int8), axis=1)
        y0 = xp.where(has, xp.minimum(y0, ly0), y0)
        x0 = xp.where(has, xp.minimum(x0, lx0), x0)
        y1 = xp.where(has, xp.maximum(y1, ly1), y1)
        x1 = xp.where(has, xp.maximum(x1, lx1), x1)
    empty = y1 <= y0
    zero = xp.zeros_like(y0)
    return (xp.where(empty, zero, y0), xp.where(empty, zero, y1), xp.where(empty, zero, x0),
            xp.where(empty, zero, x1))


def union_masks(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding, images_idx,
                 boxes, roi_ids):
    """complement-all, for each image in `images_idx`: a window over its box in `boxes` widened by the
    dilation, the union of all its ROIs (and lesion pixels) there dilated, and the window's base mask.

    Returns ``(window, dilated_union, base)``, the last two bool arrays of shape (k, h, w).
    """
    n_ids = int(roi_ids.shape[0])
    reach = params.dilation
    y0, y1, x0, x1 = (xp.take(b, images_idx) for b in boxes)
    k = images_idx.shape[0]
    # NB: one host read for both sizes.
    h, w = (int(v) for v in to_host(xp.stack([xp.max(y1 - y0), xp.max(x1 - x0)])).tolist()) if k else (0, 0)
    zero = xp.zeros_like(images_idx)
    holder = Cells(image=images_idx, col=zero, kind=zero, cx=zero, cy=zero, r=zero,
                   y0=y0, y1=y1, x0=x0, x1=x1)
    win = gather_window(xp, images, labels, holder, reach, h + 2 * reach, w + 2 * reach, valid_h, valid_w)
    if labels is not None:
        union = (win.labels != 0) & win.inside
    else:
        union = xp.zeros(win.inside.shape, dtype=xp.bool, device=array_api_compat.device(images))
        # NB: one vectorised step per ROI id (column), each covering every image of the batch; the kinds present
        # are read once for all of them.
        kinds = _kinds(xp, cells)
        for j in range(n_ids):
            cell = xp.take(grid, images_idx * n_ids + j)
            sub = cells.take(xp, xp.clip(cell, 0, max(cells.image.shape[0] - 1, 0)))
            union = union | (roi_mask(xp, sub, win, kinds) & (cell >= 0)[:, None, None])
    if lesions is not None:
        les = gather_window(xp, lesions, None, holder, reach, h + 2 * reach, w + 2 * reach, valid_h, valid_w)
        union = union | ((les.values != 0) & les.inside)
    rows = footprint_rows(footprint_offsets(params.footprint, params.dilation))
    base, _ = base_mask(xp, win, holder, valid_h, valid_w, params.border, padding)
    return win, dilate(xp, union, rows), base


