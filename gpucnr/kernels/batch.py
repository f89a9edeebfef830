"""One batch of images through the kernels: masks, moments and CNR of every (image, roi) cell in one pass."""

from __future__ import annotations

import math

import array_api_compat

from gpucnr.backend import to_host
from gpucnr.errors import InputError
from gpucnr.kernels import histograms, patches
from gpucnr.kernels.cnr import (
    STATUS,
    cell_status,
    contrast_to_noise,
    median_of_valid,
)
from gpucnr.kernels.fastpath import implementation, kernel
from gpucnr.kernels.footprints import footprint_offsets, footprint_rows
from gpucnr.kernels.masks import (
    KIND_DISK,
    KIND_LABEL,
    Cells,
    base_mask,
    dilate,
    gather_window,
    is_exact_integer,
    is_narrow_integer,
    iter_windows,
    label_boxes,
    roi_mask,
    union_boxes,
    union_masks,
)
from gpucnr.kernels.moments import (
    Sums,
    float_moments,
    image_shift,
    image_totals,
    integer_difference,
    integer_moments,
    limbs_value,
    masked_sums,
    narrow_from_limbs,
    plan_numerics,
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
        Use the compiled implementation that `gpucnr.backend.fast_path` names for `xp` ("numba-cpu" for
        NumPy), if any. False: the portable array-API path, no compiled code at all (tests compare the two).

    Returns
    -------
    dict of arrays
        `OUTPUT_CELL` variables of shape (n, L), `OUTPUT_IMAGE` variables of shape (n,), and ``roi_ids``.
    """
    # NB: the one place the implementation is chosen; everything below asks `impl`, never the namespace.
    impl = implementation(xp, fast=fast)
    images, labels, lesions = (_entry(xp, a, impl) for a in (images, labels, lesions))
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
    # NB: the device finds a label batch's ids without a read of its own: the label range rides in this transfer.
    find_ids = impl is not None and roi_ids is None and labels is not None and kernel(impl, "label_dense") is not None
    extents, label_range = _check_inputs(xp, images, roi_ids, labels, table, lesions, valid_h, valid_w, slope,
                                         intercept, polarity, label_range=find_ids)
    exact = is_exact_integer(xp, images.dtype)
    region = None
    if params.background == "label":
        region = xp.astype(lesions, xp.int64) == params.background_label
    # NB: on NumPy the image pass also finds each image's range (and, for integer images, its grid median,
    # gathered while the image is in cache), so neither costs a pass of its own; its sums (one int64 word,
    # unscaled floats) stand unless the plan asks for limbs or a scale (rare).
    early = None
    fused = None if region is not None else kernel(impl, "integer_pass" if exact else "image_totals")
    if fused is not None:
        if exact:
            shift, *early = fused(images, valid_h, valid_w, params.border, padding,
                                  with_range=not is_narrow_integer(xp, images.dtype))
        else:
            shift = image_shift(xp, images, valid_h, valid_w, padding, impl=impl)
            early = fused(images, shift, valid_h, valid_w, params.border, padding, with_range=True)
    else:
        shift = image_shift(xp, images, valid_h, valid_w, padding, impl=impl)
    cells, grid, roi_ids, bits = _cells(xp, images, labels, table, roi_ids, valid_h, valid_w, params, impl,
                                        label_range=label_range)
    # NB: float images' plan reads the device; the window pass's sizes (and the presence of the candidate label
    # ids, when the device is finding them) ride in that transfer (one sync, not two).
    extent = kernel(impl, "window_extent")
    pending = None if extent is None else extent(cells)
    if pending is not None and bits is not None:
        pending = xp.concat([pending, bits])
    also = pending if not exact else None
    # NB: the written rule of docs/accuracy.md ("Exact arithmetic at the edges of the types"): per image, its
    # range decides numeric-range, one int64 word or limbs (integers), the power of two scaling x - c (floats).
    plan = plan_numerics(xp, images, shift, valid_h, valid_w, padding, impl=impl,
                         known_range=None if early is None else early[2], extents=extents, also=also)
    limbs, scale = plan.limbs, plan.scale
    # NB: the compiled loops sum one int64 word; a batch holding a wide integer image takes the portable path.
    sums_impl = None if limbs else impl

    if early is not None and not (limbs or plan.scaled):
        totals, n_excluded, _ = early
        region_centre = None
    else:
        totals, region_centre, n_excluded = image_totals(
            xp, images, shift, valid_h, valid_w, params.border, padding, region, impl=sums_impl, scale=scale,
            limbs=limbs,
        )

    windows = kernel(sums_impl, "window_sums")
    # NB: the device kernels size their window slots from the largest ROI box: read once (with the float plan's
    # values where it reads the device), shared by every kernel below.
    sizes = plan.also
    if sizes is None and pending is not None and (cells.image.shape[0] or bits is not None):
        sizes = [int(v) for v in to_host(pending).tolist()]
    if bits is not None:
        sizes, present = sizes[:3], sizes[3:]
        cells, grid, roi_ids = _compact_ids(xp, cells, roi_ids, present, n)
    n_ids = int(roi_ids.shape[0])
    n_cells = n * n_ids
    sized = {} if sizes is None else {"sizes": sizes}
    if windows is not None and cells.image.shape[0]:
        roi_sums, roi_rel, n_inside, bg_window, window_rel = windows(
            images, labels, cells, params, shift, valid_h, valid_w, padding, scale, **sized
        )
    else:
        roi_sums, roi_rel, n_inside, bg_window, window_rel = _window_pass(
            xp, images, labels, cells, params, shift, valid_h, valid_w, padding, exact, scale=scale, limbs=limbs,
            impl=impl,
        )

    # Background sums per cell: image-level region (+/-) the cell's window part (DESIGN §4, §7). Float sums
    # are about the image's shift plus a centre ("rel", scaled units: 0 unless two-pass).
    bg_rel = xp.zeros((cells.image.shape[0],), dtype=f64, device=dev)
    removed = keep = None
    if params.background == "complement":
        bg = _gather_sums(xp, totals, cells.image) - bg_window
        removed = None if exact else bg_window.s2
    elif params.background == "ring":
        # NB: the ring is all in the window; its float sums are two-pass there (window_rel).
        bg, bg_rel = bg_window, window_rel
    elif params.background == "label":
        bg = _gather_sums(xp, totals, cells.image)
        if region_centre is not None:
            bg_rel = xp.take(region_centre, cells.image)
    else:
        device_union = kernel(sums_impl, "union_sums")
        if device_union is not None:
            union, keep = device_union(images, labels, lesions, cells, params, shift, valid_h, valid_w, padding,
                                       scale)
        else:
            union = _union_pass(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding,
                                shift, roi_ids, scale=scale, limbs=limbs, impl=impl)
        bg = _gather_sums(xp, totals - union, cells.image)
        removed = None if exact else xp.take(union.s2, cells.image)

    if exact:
        n_roi, mean_roi, var_roi, n_bg, mean_bg, var_bg, diff = _integer_cells(
            xp, roi_sums, bg, cells, shift, plan, params.ddof, unsigned64=images.dtype == xp.uint64)
        var_roi_s, var_bg_s = var_roi, var_bg
    else:
        n_roi, md_roi, var_roi_s = float_moments(xp, roi_sums, roi_rel, params.ddof)
        n_bg, md_bg, var_bg_s = float_moments(xp, bg, bg_rel, params.ddof)
        direct = kernel(sums_impl, "direct_background")
        if params.background == "complement-all" and keep is None:
            direct = None
        if removed is not None and direct is not None:
            # NB: the device recomputes the flagged cells in one launch, the others' blocks skipping at once: no
            # host read to find them.
            ill = _ill_conditioned(xp, bg, removed, params.ddof)
            sums_d, centre = direct(images, labels, cells, params, shift, valid_h, valid_w, padding, scale, ill,
                                    removed=keep, **sized)
            _, md_d, var_d = float_moments(xp, sums_d, bg_rel + centre, params.ddof)
            md_bg = xp.where(ill, md_d, md_bg)
            var_bg_s = xp.where(ill, var_d, var_bg_s)
        elif removed is not None:
            idx = xp.nonzero(_ill_conditioned(xp, bg, removed, params.ddof))[0]
            if idx.shape[0]:
                direct, centre = _direct_background(xp, images, labels, lesions, cells, grid, params, valid_h,
                                                    valid_w, padding, shift, roi_ids, idx, scale, impl=impl)
                _, md_d, var_d = float_moments(xp, direct, xp.take(bg_rel, idx) + centre, params.ddof)
                md_bg = _replace(xp, md_bg, idx, md_d)
                var_bg_s = _replace(xp, var_bg_s, idx, var_d)
        # NB: the contrast is formed from the means relative to the image's shift (no rounding of c enters it),
        # the variances stay in the scaled units for the CNR, and only the reported moments are unscaled.
        diff = md_roi - md_bg
        c = xp.take(shift, cells.image)
        inv = xp.take(plan.inv_scale, cells.image)
        mean_roi, mean_bg = c + md_roi * inv, c + md_bg * inv
        var_roi, var_bg = _unscale(xp, var_roi_s, inv), _unscale(xp, var_bg_s, inv)
    out_of_range = xp.take(plan.out_of_range, cells.image)
    if plan.any_out_of_range:
        nan = xp.full(diff.shape, math.nan, dtype=f64, device=dev)
        mean_roi, var_roi, mean_bg, var_bg, diff, var_roi_s, var_bg_s = (
            xp.where(out_of_range, nan, v) for v in (mean_roi, var_roi, mean_bg, var_bg, diff, var_roi_s, var_bg_s))
    a = xp.take(slope, cells.image)
    b = xp.take(intercept, cells.image)
    mean_roi, mean_bg = mean_roi * a + b, mean_bg * a + b
    var_roi, var_bg = var_roi * (a * a), var_bg * (a * a)

    finish = kernel(impl, "finish_cells")
    if params.definition == "mrqy" and params.background == "complement-all" and keep is None:
        finish = None  # NB: complement-all's union came from the portable pass (wide integers): MRQy's own path too
    if finish is not None and params.definition in finish.definitions:
        # NB: the device path forms CNR, status and the dense (n, L) grid in one kernel (same formulas as below).
        given = given_zero = None
        if params.definition == "gcnr":
            given = histograms.gcnr(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding,
                                    roi_ids, n_roi, n_bg, impl=impl, sizes=sizes, keep=keep)
        elif params.definition == "mrqy":
            region = histograms.background_region(xp, images, lesions, params, valid_h, valid_w, padding, keep)
            given, given_zero = kernel(impl, "mrqy")(images, labels, cells, params, valid_h, valid_w, padding, region,
                                                     **sized)
        out = finish(n, n_ids, grid, params, (n_roi, mean_roi, var_roi, n_bg, mean_bg, var_bg), diff, var_roi_s,
                     var_bg_s, a, xp.take(polarity, cells.image), n_inside, out_of_range, given, given_zero)
        out["cnr_median"], out["n_valid"] = median_of_valid(xp, out["cnr"], out["status"], signed=params.signed)
        out["n_excluded"] = n_excluded
        out["roi_ids"] = roi_ids
        return out

    if params.definition == "gcnr":
        cnr = histograms.gcnr(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding,
                              roi_ids, n_roi, n_bg, impl=impl)
        zero_noise = xp.zeros(cnr.shape, dtype=xp.bool, device=dev)
    elif params.definition == "mrqy":
        # NB: a pixel statistic (5x5 patches at each region's maximum), on the stored values as MRQy reads them
        cnr, zero_noise = patches.mrqy(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding,
                                       roi_ids)
    else:
        # NB: the CNR is invariant to the slope a (and to the power-of-two scale): it is formed from the
        # unscaled-by-a contrast and the scaled variances, the sign of a kept for signed CNRs.
        contrast = xp.where(a < 0, -diff, diff)
        cnr, zero_noise = contrast_to_noise(
            xp, contrast, var_roi_s, xp.zeros_like(contrast), var_bg_s, params.definition,
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
        numeric_range=dense(out_of_range, False),
    )
    out["status"] = status
    # NB: a cell without a valid status keeps its region moments but no CNR (DESIGN §4).
    out["cnr"] = xp.where(status == STATUS["ok"], out["cnr"], xp.where(
        status == STATUS["zero-noise"], out["cnr"], xp.full_like(out["cnr"], math.nan)))
    out["cnr_median"], out["n_valid"] = median_of_valid(xp, out["cnr"], status, signed=params.signed)
    out["n_excluded"] = n_excluded
    out["roi_ids"] = roi_ids
    return out


def _check_inputs(xp, images, roi_ids, labels, table, lesions, valid_h, valid_w, slope, intercept, polarity, *,
                  label_range=False):
    """`InputError` unless the batch's per-image values, ROI table and label arrays agree with its images.

    Shapes and dtypes are checked on the host as they come; the checks of values are gathered and read from the
    device together, in one transfer (a GPU batch pays one synchronisation for them, not one per check), with
    the valid extents and, with `label_range`, the smallest non-zero and the largest label value.
    The first failing check, in the order written, is the error raised.

    Returns
    -------
    extents : list of two lists of int
        ``valid_h`` and ``valid_w`` on the host (for `plan_numerics`).
    label_range : (int, int) or None
        With `label_range`: the smallest non-zero label and the largest label as int64 (a uint64 label above
        2**63 reads negative), ``(0, 0)`` for an all-zero label array; else None.
    """
    pending = []  # (0-d bool array: the check fails, message)
    if images.ndim != 3:
        raise InputError(f"images must be (n, H, W), got shape {tuple(images.shape)}")
    n, height, width = (int(v) for v in images.shape)
    for name, v in (("valid_h", valid_h), ("valid_w", valid_w), ("slope", slope), ("intercept", intercept),
                    ("polarity", polarity)):
        if tuple(v.shape) != (n,):
            raise InputError(f"{name} has shape {tuple(v.shape)} for {n} images")
    if n:
        for name, v, top in (("valid_h", valid_h, height), ("valid_w", valid_w, width)):
            pending.append((xp.any((v < 1) | (v > top)), f"{name} must lie in [1, {top}] (the images' extent)"))
        for name, v in (("slope", slope), ("intercept", intercept), ("polarity", polarity)):
            pending.append((~xp.all(xp.isfinite(v)), f"{name} must be finite"))
        pending.append((xp.any(slope == 0), "slope must be != 0"))
    if (labels is None) == (table is None):
        raise InputError("give the ROIs as exactly one of labels= and table=")
    if roi_ids is None and labels is None:
        raise InputError("roi_ids may be None only with a label array")
    if roi_ids is not None:
        if roi_ids.ndim != 1 or not xp.isdtype(roi_ids.dtype, "integral"):
            raise InputError("roi_ids must be a 1-D integer array")
        if roi_ids.shape[0] > 1:
            pending.append((xp.any(roi_ids[1:] <= roi_ids[:-1]), "roi_ids must be sorted and unique"))
    for name, lab in (("labels", labels), ("lesions", lesions)):
        if lab is None:
            continue
        if tuple(lab.shape) != tuple(images.shape) or not xp.isdtype(lab.dtype, "integral"):
            raise InputError(f"{name} must be integers of the images' shape {tuple(images.shape)}, got "
                             f"{tuple(lab.shape)} {lab.dtype}")
        if xp.isdtype(lab.dtype, "signed integer") and lab.size:
            pending.append((xp.min(lab) < 0, f"{name} hold negative values; labels are >= 0 (0 = no ROI)"))
    if table is not None:
        columns = ("image", "col", "kind", "cx", "cy", "r")
        if any(c not in table for c in columns):
            raise InputError(f"table needs the columns {columns}")
        m = table["image"].shape[0] if table["image"].ndim == 1 else -1
        if any(table[c].ndim != 1 or table[c].shape[0] != m or not xp.isdtype(table[c].dtype, "integral")
               for c in columns):
            raise InputError("table columns must be 1-D integer arrays of one length")
        if m:
            n_ids = int(roi_ids.shape[0])
            for c, lo, hi in (("image", 0, n - 1), ("col", 0, n_ids - 1), ("kind", 0, KIND_DISK),
                              ("r", 0, _MAX_COORDINATE), ("cx", -_MAX_COORDINATE, _MAX_COORDINATE),
                              ("cy", -_MAX_COORDINATE, _MAX_COORDINATE)):
                v = table[c]
                pending.append((xp.any((v < lo) | (v > hi)), f"table column {c} must lie in [{lo}, {hi}]"))
            if m > 1:
                # NB: (image, col) keys of rows out of range may collide; that error comes first above.
                key = xp.sort(table["image"] * max(n_ids, 1) + table["col"])
                pending.append((xp.any(key[1:] == key[:-1]), "table has two rows for one (image, col)"))
    words = [xp.astype(xp.stack([xp.reshape(c, ()) for c, _ in pending]), xp.int64)] if pending else []
    span = []
    if label_range and labels.size:
        # NB: in the labels' own dtype (no int64 copy of the array); a uint64 above 2**63 wraps negative in int64.
        top = xp.max(labels)
        span = [xp.astype(xp.stack([xp.min(xp.where(labels != 0, labels, top)), top]), xp.int64)]
    read = to_host(xp.concat([*words, xp.astype(valid_h, xp.int64), xp.astype(valid_w, xp.int64), *span])).tolist()
    failed = read[: len(pending)]
    for bad, (_, message) in zip(failed, pending, strict=True):
        if bad:
            raise InputError(message)
    start = len(pending)
    found = None
    if label_range:
        found = (int(read[start + 2 * n]), int(read[start + 2 * n + 1])) if span else (0, 0)
    return [read[start: start + n], read[start + n: start + 2 * n]], found


def _cells(xp, images, labels, table, roi_ids, valid_h, valid_w, params, impl=None, *, label_range=None):
    """The present cells, the dense (n * L,) map from grid position to cell index (-1: absent), the ids, and
    None — or, when the device finds a label batch's ids (`label_range` read by the input checks, the range
    small enough), the cells of every candidate id in that range and the candidates' presence (an int64 device
    array) for `_compact_ids` once the caller has read it."""
    n, height, width = images.shape
    dev = array_api_compat.device(images)
    bits = None
    if labels is not None:
        exclude = params.background_label if params.background == "label" else None
        boxes = None
        lo, hi = label_range if label_range is not None else (0, -1)
        # NB: candidates' boxes cost n * span; a span beyond the pixels' count (sparse huge ids, uint64 ids above
        # 2**63) takes the portable search, with its host reads.
        span = hi - lo + 1 if lo >= 1 else (0 if (lo, hi) == (0, 0) else -1)
        if label_range is not None and 0 <= span <= max(1024, (height * width) // 4):
            *boxes, bits = kernel(impl, "label_dense")(labels, lo, span, valid_h, valid_w, exclude=exclude)
        compiled = kernel(impl, "label_boxes")
        if compiled is not None and boxes is None:
            boxes = compiled(labels, roi_ids, valid_h, valid_w, exclude=exclude)
        if boxes is None:
            boxes = label_boxes(xp, labels, roi_ids, valid_h, valid_w, exclude=exclude)
        roi_ids, y0, y1, x0, x1 = boxes
        n_ids = int(roi_ids.shape[0])
        present = y1 > y0
        if impl == "cuda":
            # NB: every (image, id) is a cell, absent ones with an empty box (the device kernels skip them, `grid`
            # leaves them out): a nonzero's data-dependent shape would cost the batch a host read.
            idx = xp.arange(n * n_ids, dtype=xp.int64, device=dev)
        else:
            idx = xp.nonzero(present)[0]
        image = idx // max(n_ids, 1)
        col = idx % max(n_ids, 1)
        zero = xp.zeros_like(idx)
        cells = Cells(image=image, col=col, kind=xp.full_like(idx, KIND_LABEL), cx=zero, cy=zero,
                      r=xp.take(roi_ids, col), y0=xp.take(y0, idx), y1=xp.take(y1, idx),
                      x0=xp.take(x0, idx), x1=xp.take(x1, idx))
        rank = idx if impl == "cuda" else xp.cumulative_sum(xp.astype(present, xp.int64)) - 1
        grid = xp.where(present, rank, xp.full_like(rank, -1))
        return cells, grid, roi_ids, bits
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
        return cells, xp.full_like(grid_pos, -1), roi_ids, None
    pos = xp.clip(xp.searchsorted(key, grid_pos), 0, key.shape[0] - 1)
    grid = xp.where(xp.take(key, pos) == grid_pos, pos, xp.full_like(pos, -1))
    return cells, grid, roi_ids, None


def _compact_ids(xp, cells, candidates, present, n: int):
    """The cells, grid and ids of the candidate label ids found present (`present`: host list, one flag per
    candidate): `_cells`'s device-found cells (every image x candidate, in that order) narrowed to those ids
    by a gather whose index is built on the host (a transfer to the device, not a read)."""
    dev = array_api_compat.device(candidates)
    span = int(candidates.shape[0])
    cols = [k for k, bit in enumerate(present) if bit]
    n_ids = len(cols)
    idx = xp.asarray([i * span + k for i in range(n) for k in cols], dtype=xp.int64, device=dev)
    roi_ids = xp.take(candidates, xp.asarray(cols, dtype=xp.int64, device=dev))
    sub = cells.take(xp, idx)
    pos = xp.arange(n * n_ids, dtype=xp.int64, device=dev)
    sub = Cells(image=pos // max(n_ids, 1), col=pos % max(n_ids, 1), kind=sub.kind, cx=sub.cx, cy=sub.cy, r=sub.r,
                y0=sub.y0, y1=sub.y1, x0=sub.x0, x1=sub.x1)
    grid = xp.where(sub.y1 > sub.y0, pos, xp.full_like(pos, -1))
    return sub, grid, roi_ids


def _entry(xp, a, impl=None):
    """An input as the kernels' rule takes it: booleans as uint8, float16 as float32 and, for a compiled
    implementation that asks for it (numba-cpu's `native`), native byte order. Every conversion is exact."""
    if a is None:
        return None
    native = kernel(impl, "native")
    if native is not None:
        a = native(a)
    elif getattr(xp, "float16", None) is not None and a.dtype == xp.float16:
        a = xp.astype(a, xp.float32)
    if a.dtype == xp.bool:
        a = xp.astype(a, xp.uint8)
    return a


def _integer_cells(xp, roi: Sums, bg: Sums, cells, shift, plan, ddof: int, *, unsigned64: bool):
    """Moments of every cell of an integer batch and its contrast mean_roi - mean_bg, from exact sums.

    Narrow images: vectorised (`integer_moments`, `integer_difference`). Wide images (limb sums): exactly on
    the host with Python integers, each value correctly rounded once — they are rare, and their cells few.
    """
    c = xp.take(shift, cells.image)
    if plan.limbs:
        roi_w, bg_w = narrow_from_limbs(xp, roi), narrow_from_limbs(xp, bg)
    else:
        roi_w, bg_w = roi, bg
    n_r, mean_r, var_r, q_r, s1_r = integer_moments(xp, roi_w, c, ddof, unsigned64=unsigned64)
    n_b, mean_b, var_b, q_b, s1_b = integer_moments(xp, bg_w, c, ddof, unsigned64=unsigned64)
    diff = integer_difference(xp, n_r, q_r, s1_r, n_b, q_b, s1_b)
    if not plan.limbs:
        return n_r, mean_r, var_r, n_b, mean_b, var_b, diff
    image = to_host(cells.image).tolist()
    wide = [j for j, i in enumerate(image) if plan.wide[i]]
    if not wide:
        return n_r, mean_r, var_r, n_b, mean_b, var_b, diff
    dev = array_api_compat.device(c)
    idx = xp.asarray(wide, dtype=xp.int64, device=dev)
    rows = {}
    for name, sums in (("roi", roi), ("bg", bg)):
        rows[name] = (to_host(xp.take(sums.n, idx)).tolist(), limbs_value(xp.take(sums.s1, idx, axis=0)),
                      limbs_value(xp.take(sums.s2, idx, axis=0)))
    nan = math.nan
    new = {k: [] for k in ("mean_r", "var_r", "mean_b", "var_b", "diff")}
    for k, j in enumerate(wide):
        ci = plan.shift[image[j]]
        for tag, (ns, s1s, s2s) in (("r", rows["roi"]), ("b", rows["bg"])):
            n_, s1_, s2_ = int(ns[k]), s1s[k], s2s[k]
            # NB: Python's int / int is correctly rounded, whatever the size of the integers.
            new["mean_" + tag].append((ci * n_ + s1_) / n_ if n_ > 0 else nan)
            new["var_" + tag].append((n_ * s2_ - s1_ * s1_) / (n_ * (n_ - ddof)) if n_ > ddof else nan)
        nr, nb = int(rows["roi"][0][k]), int(rows["bg"][0][k])
        sr, sb = rows["roi"][1][k], rows["bg"][1][k]
        new["diff"].append((sr * nb - sb * nr) / (nr * nb) if nr > 0 and nb > 0 else nan)

    def put(values, key):
        return _replace(xp, values, idx, xp.asarray(new[key], dtype=xp.float64, device=dev))

    return (n_r, put(mean_r, "mean_r"), put(var_r, "var_r"), n_b, put(mean_b, "mean_b"), put(var_b, "var_b"),
            put(diff, "diff"))


def _unscale(xp, var, inv):
    """``var * inv**2``: a variance back from the scaled units, inf where float64 cannot hold it (values near
    1e308 have variances near 1e600), without an overflow warning."""
    fmax = xp.finfo(xp.float64).max
    big = xp.where(inv > 1, inv, xp.ones_like(inv))  # NB: only a scale-down (inv > 1) can overflow
    over = var > (fmax / big) / big
    safe = xp.where(over, xp.zeros_like(var), var)
    return xp.where(over, xp.full_like(var, math.inf), (safe * inv) * inv)


def _gather_sums(xp, sums: Sums, idx) -> Sums:
    return Sums(xp.take(sums.n, idx), xp.take(sums.s1, idx, axis=0), xp.take(sums.s2, idx, axis=0))


def _zeros_sums(xp, m, exact, dev, limbs=False) -> Sums:
    acc = xp.int64 if exact else xp.float64
    s1_shape, s2_shape = ((m, 4), (m, 7)) if limbs else ((m,), (m,))
    return Sums(xp.zeros((m,), dtype=xp.int64, device=dev), xp.zeros(s1_shape, dtype=acc, device=dev),
                xp.zeros(s2_shape, dtype=acc, device=dev))


def _window_pass(xp, images, labels, cells, params, shift, valid_h, valid_w, padding, exact, *, scale=None,
                 limbs=False, impl=None):
    """ROI moments and the background window part of every cell, one size class at a time.

    Returns ROI sums (about the image's shift plus the returned per-cell centre, in scaled units: 0 but for
    two-pass float sums), the count of ROI pixels inside the valid region, and the window part of the
    background (see `WindowMasks.part`; zero where there is none) with its centre.
    """
    dev = array_api_compat.device(images)
    m = cells.image.shape[0]
    if m == 0:
        zero = _zeros_sums(xp, 0, exact, dev, limbs)
        rel = xp.zeros((0,), dtype=xp.float64, device=dev)
        return zero, rel, xp.zeros((0,), dtype=xp.int64, device=dev), zero, rel
    parts = []
    for wm in iter_windows(xp, images, labels, cells, params, valid_h, valid_w, padding):
        img = xp.take(cells.image, wm.idx)
        c = xp.take(shift, img)[:, None, None]
        d = shifted(xp, wm.window.values, c, None if scale is None else xp.take(scale, img)[:, None, None])
        s = masked_sums(xp, d, wm.pixels, limbs=limbs, impl=impl)
        roi_rel = part_rel = xp.zeros((wm.idx.shape[0],), dtype=xp.float64, device=dev)
        if not exact:
            # NB: two-pass ROI moments for float data: re-centre on the ROI's own mean, then sum again.
            s, roi_rel = two_pass(xp, d, wm.pixels, s, impl=impl)
        inside = xp.sum(xp.astype(wm.roi, xp.int64), axis=(1, 2))
        if wm.part is None:
            part = _zeros_sums(xp, wm.idx.shape[0], exact, dev, limbs)
        else:
            part = masked_sums(xp, d, wm.part, limbs=limbs, impl=impl)
            if not exact and params.background == "ring":
                part, part_rel = two_pass(xp, d, wm.part, part, impl=impl)
        parts.append((wm.idx, s, roi_rel, inside, part, part_rel))
    return _scatter_parts(xp, parts)


def _scatter_parts(xp, parts):
    """Put per-group results back in cell order (groups partition the cells)."""
    if len(parts) == 1:
        return parts[0][1:]
    idx = xp.concat([p[0] for p in parts])
    inverse = xp.argsort(idx)

    def cat(k, attr=None):
        vals = [getattr(p[k], attr) if attr else p[k] for p in parts]
        return xp.take(xp.concat(vals, axis=0), inverse, axis=0)

    s = Sums(cat(1, "n"), cat(1, "s1"), cat(1, "s2"))
    part = Sums(cat(4, "n"), cat(4, "s1"), cat(4, "s2"))
    return s, cat(2), cat(3), part, cat(5)


def _union_pass(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding, shift, roi_ids, *,
                scale=None, limbs=False, impl=None):
    """complement-all: per image, sums over its dilated ROI union within the interior, shape (n,)."""
    n = images.shape[0]
    boxes = union_boxes(xp, cells, grid, lesions, n, int(roi_ids.shape[0]), valid_h, valid_w)
    everything = xp.arange(n, dtype=xp.int64, device=array_api_compat.device(images))
    win, dilated, base = union_masks(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w,
                                      padding, everything, boxes, roi_ids)
    d = shifted(xp, win.values, shift[:, None, None], None if scale is None else scale[:, None, None])
    return masked_sums(xp, d, dilated & base, limbs=limbs, impl=impl)


def _ill_conditioned(xp, bg: Sums, removed_s2, ddof: int):
    """Float backgrounds whose "totals minus window" sums may have lost more than ~1e-12 relative."""
    nf = xp.astype(bg.n, xp.float64)
    centred = bg.s2 - bg.s1 * (bg.s1 / xp.where(bg.n > 0, nf, xp.ones_like(nf)))
    return (bg.n > ddof) & (xp.abs(bg.s2) + xp.abs(removed_s2) > _ILL_CONDITIONED * centred)


def _direct_background(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding, shift,
                       roi_ids, idx, scale, *, impl=None):
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
    d = shifted(xp, win.values, xp.take(shift, sub.image)[:, None, None], xp.take(scale, sub.image)[:, None, None])
    return two_pass(xp, d, keep, masked_sums(xp, d, keep, impl=impl), impl=impl)


def _replace(xp, values, idx, new):
    """`values` with entries `idx` (sorted) replaced by `new` (the array API has no scatter: select)."""
    m = values.shape[0]
    positions = xp.arange(m, dtype=xp.int64)
    pos = xp.clip(xp.searchsorted(idx, positions), 0, idx.shape[0] - 1)
    hit = xp.take(idx, pos) == positions
    return xp.where(hit, xp.take(new, pos), values)
