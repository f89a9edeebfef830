"""One batch of images through the kernels: masks, moments and CNR of every (image, roi) cell in one pass."""

from __future__ import annotations

import math

import array_api_compat

from gpucnr.errors import InputError
from gpucnr.kernels import histograms
from gpucnr.kernels.cnr import (
    STATUS,
    cell_status,
    contrast_to_noise,
    median_of_valid,
)
from gpucnr.kernels.footprints import footprint_offsets, footprint_rows
from gpucnr.kernels.masks import (
    KIND_DISK,
    KIND_LABEL,
    Cells,
    base_mask,
    dilate,
    gather_window,
    is_exact_integer,
    iter_windows,
    label_boxes,
    roi_mask,
    union_boxes,
    union_masks,
)
from gpucnr.kernels.moments import (
    Sums,
    image_shift,
    image_totals,
    masked_sums,
    moments,
    shifted,
    two_pass,
)
from gpucnr.kernels.params import Params

__all__ = ["OUTPUT_CELL", "OUTPUT_IMAGE", "measure_batch"]

#: Variables of dims (image, roi) and (image,) returned by `measure_batch`.
OUTPUT_CELL = ("n_roi", "mean_roi", "var_roi", "n_bg", "mean_bg", "var_bg", "cnr", "status")
OUTPUT_IMAGE = ("cnr_median", "n_valid", "n_excluded")

#: The largest |cx|, |cy| and r of a table ROI (as gpucnr.roitable.MAX_COORDINATE): window arithmetic stays far
#: from int64 overflow.
_MAX_COORDINATE = 2**31 - 1

# A float background whose subtracted sums are this much larger than its own centred sum of squares
# could lose more than ~1e-12 relative to cancellation; such cells are recomputed directly.
_ILL_CONDITIONED = 1e3


def measure_batch(
    xp,
    images,
    *,
    roi_ids,
    params: Params,
    labels=None,
    table=None,
    lesions=None,
    valid_h=None,
    valid_w=None,
    slope=None,
    intercept=None,
    padding=None,
    polarity=None,
    fast: bool = True,
) -> dict:
    """Measure every (image, roi) cell of one batch.

    Parameters
    ----------
    xp : namespace
        The array namespace of `images` (array_api_compat's).
    images : array, shape (n, H, W)
        Stored values in their native dtype.
    roi_ids : int64 array, shape (L,), or None
        Sorted ROI ids: the ``roi`` dimension. None with a label array: the non-zero labels present in
        this batch (less the background label), returned as ``out["roi_ids"]``.
    params : Params
    labels : int array, shape (n, H, W), optional
        ROIs as a label array (exclusive with `table`).
    table : dict of int64 arrays of shape (m,), optional
        Geometric ROIs: ``image`` (position in the batch), ``col`` (position in `roi_ids`), ``kind``
        (0 square, 1 disk), ``cx``, ``cy``, ``r``. At most one row per (image, col).
    lesions : int array, shape (n, H, W), optional
        background="label": its `params.background_label` pixels are the background;
        background="complement-all": its non-zero pixels are dilated and removed as well.
    valid_h, valid_w : int64 arrays, shape (n,), optional
        Valid extent of each image (default: all of it). Pixels beyond it enter no statistic.
    slope, intercept : float64 arrays, shape (n,), optional
        Modality rescale, applied to the moments (mean * slope + intercept, var * slope**2).
    padding : float64 array, shape (n,), optional
        Pixel padding value per image (NaN: none); such pixels are excluded like non-finite ones.
    polarity : float64 array, shape (n,), optional
        -1 for images displayed inverted (MONOCHROME1), else +1; used by ``signed``.
    fast : bool
        Allow backend-specific fast paths (tests switch them off to check the portable path).

    Returns
    -------
    dict of arrays
        `OUTPUT_CELL` variables of shape (n, L), `OUTPUT_IMAGE` variables of shape (n,), and ``roi_ids``.
    """
    n, height, width = images.shape
    dev = array_api_compat.device(images)
    f64 = xp.float64

    def per_image(a, fill, dtype):
        if a is None:
            return xp.full((n,), fill, dtype=dtype, device=dev)
        return xp.asarray(a, dtype=dtype, device=dev)

    valid_h = per_image(valid_h, height, xp.int64)
    valid_w = per_image(valid_w, width, xp.int64)
    slope = per_image(slope, 1.0, f64)
    intercept = per_image(intercept, 0.0, f64)
    padding = per_image(padding, math.nan, f64)
    polarity = per_image(polarity, 1.0, f64)
    # NB: the compiled kernels index with these values unchecked: nothing inconsistent gets past this line.
    _check_inputs(xp, images, roi_ids, labels, table, lesions, valid_h, valid_w, slope, intercept, polarity)
    exact = is_exact_integer(xp, images.dtype)
    shift = image_shift(xp, images, valid_h, valid_w, padding)

    cells, grid, roi_ids = _cells(xp, images, labels, table, roi_ids, valid_h, valid_w, params, fast)
    n_ids = int(roi_ids.shape[0])
    n_cells = n * n_ids

    region = None
    if params.background == "label":
        region = xp.astype(lesions, xp.int64) == params.background_label
    totals, region_centre, n_excluded = image_totals(
        xp, images, shift, valid_h, valid_w, params.border, padding, region, fast=fast
    )

    if fast and array_api_compat.is_numpy_namespace(xp) and cells.image.shape[0]:
        from gpucnr.kernels import _numpy_fast

        roi_sums, roi_shift, n_inside, bg_window, window_shift = _numpy_fast.window_sums(
            images, labels, cells, params, shift, valid_h, valid_w, padding
        )
    else:
        roi_sums, roi_shift, n_inside, bg_window, window_shift = _window_pass(
            xp, images, labels, cells, params, shift, valid_h, valid_w, padding, exact
        )

    # Background sums per cell: image-level region (+/-) the cell's window part (DESIGN §4, §7).
    bg_shift = xp.take(shift, cells.image) if exact else xp.take(xp.astype(shift, f64), cells.image)
    removed = None
    if params.background == "complement":
        bg = _gather_sums(xp, totals, cells.image) - bg_window
        removed = bg_window.s2
    elif params.background == "ring":
        # NB: the ring is all in the window; its float sums are two-pass there (window_shift).
        bg, bg_shift = bg_window, window_shift
    elif params.background == "label":
        bg = _gather_sums(xp, totals, cells.image)
        if region_centre is not None:
            bg_shift = bg_shift + xp.take(region_centre, cells.image)
    else:
        union = _union_pass(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding,
                            shift, roi_ids)
        bg = _gather_sums(xp, totals - union, cells.image)
        removed = xp.take(union.s2, cells.image)

    n_roi, mean_roi, var_roi = moments(xp, roi_sums, roi_shift, params.ddof, exact=exact)
    n_bg, mean_bg, var_bg = moments(xp, bg, bg_shift, params.ddof, exact=exact)
    if removed is not None and not exact:
        idx = xp.nonzero(_ill_conditioned(xp, bg, removed, params.ddof))[0]
        if idx.shape[0]:
            direct, centre = _direct_background(xp, images, labels, lesions, cells, grid, params, valid_h,
                                                valid_w, padding, shift, roi_ids, idx)
            _, mean_d, var_d = moments(xp, direct, xp.take(bg_shift, idx) + centre, params.ddof, exact=False)
            mean_bg = _replace(xp, mean_bg, idx, mean_d)
            var_bg = _replace(xp, var_bg, idx, var_d)
    a = xp.take(slope, cells.image)
    b = xp.take(intercept, cells.image)
    mean_roi, mean_bg = mean_roi * a + b, mean_bg * a + b
    var_roi, var_bg = var_roi * (a * a), var_bg * (a * a)

    if params.definition == "gcnr":
        cnr = histograms.gcnr(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding,
                              roi_ids, n_roi, n_bg)
        zero_noise = xp.zeros(cnr.shape, dtype=xp.bool, device=dev)
    else:
        cnr, zero_noise = contrast_to_noise(
            xp, mean_roi, var_roi, mean_bg, var_bg, params.definition,
            signed=params.signed, polarity=xp.take(polarity, cells.image),
        )

    # Scatter the m present cells into the dense (n, L) grid through `grid` (cell index or -1).
    present = grid >= 0
    where = xp.clip(grid, 0, max(cells.image.shape[0] - 1, 0))

    def dense(v, fill):
        if cells.image.shape[0] == 0:
            return xp.full((n, n_ids), fill, dtype=v.dtype, device=dev)
        out = xp.where(present, xp.take(v, where), xp.full((n_cells,), fill, dtype=v.dtype, device=dev))
        return xp.reshape(out, (n, n_ids))

    out = {
        "n_roi": dense(n_roi, 0),
        "mean_roi": dense(mean_roi, math.nan),
        "var_roi": dense(var_roi, math.nan),
        "n_bg": dense(n_bg, 0),
        "mean_bg": dense(mean_bg, math.nan),
        "var_bg": dense(var_bg, math.nan),
        "cnr": dense(cnr, math.nan),
    }
    status = cell_status(
        xp,
        present=xp.reshape(present, (n, n_ids)),
        n_roi_inside=dense(n_inside, 0),
        n_roi=out["n_roi"],
        n_bg=out["n_bg"],
        zero_noise=dense(zero_noise, False),
        ddof=params.ddof,
        min_bg=params.min_bg,
    )
    out["status"] = status
    # NB: a cell without a valid status keeps its region moments but no CNR (DESIGN §4).
    out["cnr"] = xp.where(status == STATUS["ok"], out["cnr"], xp.where(
        status == STATUS["zero-noise"], out["cnr"], xp.full_like(out["cnr"], math.nan)))
    out["cnr_median"], out["n_valid"] = median_of_valid(xp, out["cnr"], status, signed=params.signed)
    out["n_excluded"] = n_excluded
    out["roi_ids"] = roi_ids
    return out


def _check_inputs(xp, images, roi_ids, labels, table, lesions, valid_h, valid_w, slope, intercept, polarity):
    """`InputError` unless the batch's per-image values, ROI table and label arrays agree with its images."""
    if images.ndim != 3:
        raise InputError(f"images must be (n, H, W), got shape {tuple(images.shape)}")
    n, height, width = (int(v) for v in images.shape)
    for name, v in (("valid_h", valid_h), ("valid_w", valid_w), ("slope", slope), ("intercept", intercept),
                    ("polarity", polarity)):
        if tuple(v.shape) != (n,):
            raise InputError(f"{name} has shape {tuple(v.shape)} for {n} images")
    for name, v, top in (("valid_h", valid_h, height), ("valid_w", valid_w, width)):
        if n and bool(xp.any((v < 1) | (v > top))):
            raise InputError(f"{name} must lie in [1, {top}] (the images' extent)")
    for name, v in (("slope", slope), ("intercept", intercept), ("polarity", polarity)):
        if n and not bool(xp.all(xp.isfinite(v))):
            raise InputError(f"{name} must be finite")
    if n and bool(xp.any(slope == 0)):
        raise InputError("slope must be != 0")
    if (labels is None) == (table is None):
        raise InputError("give the ROIs as exactly one of labels= and table=")
    if roi_ids is None and labels is None:
        raise InputError("roi_ids may be None only with a label array")
    if roi_ids is not None:
        if roi_ids.ndim != 1 or not xp.isdtype(roi_ids.dtype, "integral"):
            raise InputError("roi_ids must be a 1-D integer array")
        if roi_ids.shape[0] > 1 and bool(xp.any(roi_ids[1:] <= roi_ids[:-1])):
            raise InputError("roi_ids must be sorted and unique")
    for name, lab in (("labels", labels), ("lesions", lesions)):
        if lab is None:
            continue
        if tuple(lab.shape) != tuple(images.shape) or not xp.isdtype(lab.dtype, "integral"):
            raise InputError(f"{name} must be integers of the images' shape {tuple(images.shape)}, got "
                             f"{tuple(lab.shape)} {lab.dtype}")
        if xp.isdtype(lab.dtype, "signed integer") and lab.size and int(xp.min(lab)) < 0:
            raise InputError(f"{name} hold negative values; labels are >= 0 (0 = no ROI)")
    if table is None:
        return
    columns = ("image", "col", "kind", "cx", "cy", "r")
    if any(c not in table for c in columns):
        raise InputError(f"table needs the columns {columns}")
    m = table["image"].shape[0] if table["image"].ndim == 1 else -1
    if any(table[c].ndim != 1 or table[c].shape[0] != m or not xp.isdtype(table[c].dtype, "integral")
           for c in columns):
        raise InputError("table columns must be 1-D integer arrays of one length")
    if not m:
        return
    n_ids = int(roi_ids.shape[0])
    for c, lo, hi in (("image", 0, n - 1), ("col", 0, n_ids - 1), ("kind", 0, KIND_DISK), ("r", 0, _MAX_COORDINATE),
                      ("cx", -_MAX_COORDINATE, _MAX_COORDINATE), ("cy", -_MAX_COORDINATE, _MAX_COORDINATE)):
        v = table[c]
        if bool(xp.any((v < lo) | (v > hi))):
            raise InputError(f"table column {c} must lie in [{lo}, {hi}]")
    key = xp.sort(table["image"] * max(n_ids, 1) + table["col"])
    if m > 1 and bool(xp.any(key[1:] == key[:-1])):
        raise InputError("table has two rows for one (image, col)")


def _cells(xp, images, labels, table, roi_ids, valid_h, valid_w, params, fast=True):
    """The present cells, the dense (n * L,) map from grid position to cell index (-1: absent), the ids."""
    n = images.shape[0]
    dev = array_api_compat.device(images)
    if labels is not None:
        exclude = params.background_label if params.background == "label" else None
        boxes = None
        if fast and array_api_compat.is_numpy_namespace(xp):
            from gpucnr.kernels import _numpy_fast

            boxes = _numpy_fast.label_boxes(labels, roi_ids, valid_h, valid_w, exclude=exclude)
        if boxes is None:
            boxes = label_boxes(xp, labels, roi_ids, valid_h, valid_w, exclude=exclude)
        roi_ids, y0, y1, x0, x1 = boxes
        n_ids = int(roi_ids.shape[0])
        present = y1 > y0
        idx = xp.nonzero(present)[0]
        image = idx // max(n_ids, 1)
        col = idx % max(n_ids, 1)
        zero = xp.zeros_like(idx)
        cells = Cells(image=image, col=col, kind=xp.full_like(idx, KIND_LABEL), cx=zero, cy=zero,
                      r=xp.take(roi_ids, col), y0=xp.take(y0, idx), y1=xp.take(y1, idx),
                      x0=xp.take(x0, idx), x1=xp.take(x1, idx))
        rank = xp.cumulative_sum(xp.astype(present, xp.int64)) - 1
        grid = xp.where(present, rank, xp.full_like(rank, -1))
        return cells, grid, roi_ids
    n_ids = int(roi_ids.shape[0])
    grid_pos = xp.arange(n * n_ids, dtype=xp.int64, device=dev)
    image, col, kind = table["image"], table["col"], table["kind"]
    cx, cy, r = table["cx"], table["cy"], table["r"]
    order = xp.argsort(image * max(n_ids, 1) + col)
    image, col, kind, cx, cy, r = (xp.take(v, order) for v in (image, col, kind, cx, cy, r))
    extra = xp.where(kind == KIND_DISK, xp.ones_like(r), xp.zeros_like(r))
    vh = xp.take(valid_h, image)
    vw = xp.take(valid_w, image)
    y0 = xp.clip(cy - r, 0, None)
    y1 = xp.minimum(cy + r + extra, vh)
    x0 = xp.clip(cx - r, 0, None)
    x1 = xp.minimum(cx + r + extra, vw)
    # NB: an ROI wholly outside keeps an empty box, so it is a present cell with status roi-outside.
    y1 = xp.maximum(y1, y0)
    x1 = xp.maximum(x1, x0)
    cells = Cells(image=image, col=col, kind=kind, cx=cx, cy=cy, r=r, y0=y0, y1=y1, x0=x0, x1=x1)
    key = image * n_ids + col
    if key.shape[0] == 0:
        return cells, xp.full_like(grid_pos, -1), roi_ids
    pos = xp.clip(xp.searchsorted(key, grid_pos), 0, key.shape[0] - 1)
    grid = xp.where(xp.take(key, pos) == grid_pos, pos, xp.full_like(pos, -1))
    return cells, grid, roi_ids


def _gather_sums(xp, sums: Sums, idx) -> Sums:
    return Sums(xp.take(sums.n, idx), xp.take(sums.s1, idx), xp.take(sums.s2, idx))


def _zeros_sums(xp, m, exact, dev) -> Sums:
    acc = xp.int64 if exact else xp.float64
    return Sums(xp.zeros((m,), dtype=xp.int64, device=dev), xp.zeros((m,), dtype=acc, device=dev),
                xp.zeros((m,), dtype=acc, device=dev))


def _window_pass(xp, images, labels, cells, params, shift, valid_h, valid_w, padding, exact):
    """ROI moments and the background window part of every cell, one size class at a time.

    Returns ROI sums (relative to the returned per-cell shift), the count of ROI pixels inside the valid
    region, and the window part of the background (see `WindowMasks.part`; zero where there is none).
    """
    dev = array_api_compat.device(images)
    m = cells.image.shape[0]
    roi_shift = xp.take(shift, cells.image) if exact else xp.take(xp.astype(shift, xp.float64), cells.image)
    if m == 0:
        zero = _zeros_sums(xp, 0, exact, dev)
        return zero, roi_shift, xp.zeros((0,), dtype=xp.int64, device=dev), zero, roi_shift
    parts = []
    for wm in iter_windows(xp, images, labels, cells, params, valid_h, valid_w, padding):
        c = xp.take(shift, xp.take(cells.image, wm.idx))[:, None, None]
        d = shifted(xp, wm.window.values, c)
        s = masked_sums(xp, d, wm.pixels)
        sub_shift = part_shift = xp.take(roi_shift, wm.idx)
        if not exact:
            # NB: two-pass ROI moments for float data: re-centre on the ROI's own mean, then sum again.
            s, centre = two_pass(xp, d, wm.pixels, s)
            sub_shift = sub_shift + centre
        inside = xp.sum(xp.astype(wm.roi, xp.int64), axis=(1, 2))
        if wm.part is None:
            part = _zeros_sums(xp, wm.idx.shape[0], exact, dev)
        else:
            part = masked_sums(xp, d, wm.part)
            if not exact and params.background == "ring":
                part, centre = two_pass(xp, d, wm.part, part)
                part_shift = part_shift + centre
        parts.append((wm.idx, s, sub_shift, inside, part, part_shift))
    return _scatter_parts(xp, parts)


def _scatter_parts(xp, parts):
    """Put per-group results back in cell order (groups partition the cells)."""
    if len(parts) == 1:
        return parts[0][1:]
    idx = xp.concat([p[0] for p in parts])
    inverse = xp.argsort(idx)

    def cat(k, attr=None):
        vals = [getattr(p[k], attr) if attr else p[k] for p in parts]
        return xp.take(xp.concat(vals), inverse)

    s = Sums(cat(1, "n"), cat(1, "s1"), cat(1, "s2"))
    part = Sums(cat(4, "n"), cat(4, "s1"), cat(4, "s2"))
    return s, cat(2), cat(3), part, cat(5)


def _union_pass(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding, shift, roi_ids):
    """complement-all: per image, sums over its dilated ROI union within the interior, shape (n,)."""
    n = images.shape[0]
    boxes = union_boxes(xp, cells, grid, lesions, n, int(roi_ids.shape[0]), valid_h, valid_w)
    everything = xp.arange(n, dtype=xp.int64, device=array_api_compat.device(images))
    win, dilated, base = union_masks(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w,
                                      padding, everything, boxes, roi_ids)
    return masked_sums(xp, shifted(xp, win.values, shift[:, None, None]), dilated & base)


def _ill_conditioned(xp, bg: Sums, removed_s2, ddof: int):
    """Float backgrounds whose "totals minus window" sums may have lost more than ~1e-12 relative."""
    nf = xp.astype(bg.n, xp.float64)
    centred = bg.s2 - bg.s1 * (bg.s1 / xp.where(bg.n > 0, nf, xp.ones_like(nf)))
    return (bg.n > ddof) & (xp.abs(bg.s2) + xp.abs(removed_s2) > _ILL_CONDITIONED * centred)


def _direct_background(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding, shift,
                       roi_ids, idx):
    """Background of cells `idx` summed directly, two-pass, over a whole-image window (the rare exact path
    for float images; its cost is a full image per cell, so it runs only for ill-conditioned cells).

    Returns ``(sums, centre)``: sums of (x - centre) over each cell's background, and the centre.
    """
    n, height, width = images.shape
    sub = cells.take(xp, idx)
    zero = xp.zeros_like(idx)
    if params.background == "complement":
        whole = Cells(image=sub.image, col=sub.col, kind=sub.kind, cx=sub.cx, cy=sub.cy, r=sub.r,
                      y0=zero, y1=zero, x0=zero, x1=zero)
        win = gather_window(xp, images, labels, whole, 0, height, width, valid_h, valid_w)
        base, _ = base_mask(xp, win, whole, valid_h, valid_w, params.border, padding)
        rows = footprint_rows(footprint_offsets(params.footprint, params.dilation))
        keep = base & ~dilate(xp, roi_mask(xp, sub, win), rows)
    else:
        full = xp.full((n,), height, dtype=xp.int64)
        boxes = (xp.zeros((n,), dtype=xp.int64), full, xp.zeros((n,), dtype=xp.int64),
                 xp.full((n,), width, dtype=xp.int64))
        win, dilated, base = union_masks(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w,
                                          padding, sub.image, boxes, roi_ids)
        keep = base & ~dilated
    d = shifted(xp, win.values, xp.astype(xp.take(shift, sub.image), xp.float64)[:, None, None])
    return two_pass(xp, d, keep, masked_sums(xp, d, keep))


def _replace(xp, values, idx, new):
    """`values` with entries `idx` (sorted) replaced by `new` (the array API has no scatter: select)."""
    m = values.shape[0]
    positions = xp.arange(m, dtype=xp.int64)
    pos = xp.clip(xp.searchsorted(idx, positions), 0, idx.shape[0] - 1)
    hit = xp.take(idx, pos) == positions
    return xp.where(hit, xp.take(new, pos), values)
