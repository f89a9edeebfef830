"""Pooled region moments: gpucnr.aggregate, one CNR per group of images (case, series, patient, …)."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from gpucnr.errors import InputError
from gpucnr.kernels.cnr import STATUS, cell_status, contrast_to_noise, median_of_valid

__all__ = ["aggregate", "pool_moments"]

#: Images read at a time: memory stays bounded by this many rows of the results, whatever their size.
_BLOCK = 2**16
#: Definitions whose sign never follows the display polarity (they reproduce tools that see stored arrays).
_POLARITY_FREE = ("viqa", "mrqy")
#: Definitions whose CNR is not a function of the pooled ROI and background moments: gCNR (a histogram
#: statistic), MRIQC's (it adds each image's air variance) and MRQy's (two 5x5 patches); their groups get status 9
#: not-poolable.
_NOT_POOLABLE = ("gcnr", "mriqc", "mrqy")


def pool_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two sets of moments into those of the union of their pixels (Chan, Golub & LeVeque 1979).

    Parameters
    ----------
    n_a, mean_a, m2_a, n_b, mean_b, m2_b : arrays of one shape
        Counts, means and sums of squared deviations from the mean (M2 = variance·(n − ddof)); a side with n = 0
        contributes nothing whatever its mean (NaN) and M2.

    Returns
    -------
    n, mean, m2 : arrays
        Of the union: n = n_a + n_b, mean = mean_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n with δ = mean_b − mean_a;
        NaN mean and 0 M2 where n = 0.

    References
    ----------
    T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise algorithm for computing sample
    variances", Stanford CS report STAN-CS-79-773 (1979).
    """
    n_a, n_b = np.asarray(n_a, np.int64), np.asarray(n_b, np.int64)
    n = n_a + n_b
    fa, fb, fn = (v.astype(np.float64) for v in (n_a, n_b, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = np.where(n_a > 0, mean_a, 0.0)
        mb = np.where(n_b > 0, mean_b, 0.0)
        delta = mb - ma
        mean = np.where(n_a == 0, mb, np.where(n_b == 0, ma, ma + delta * (fb / np.where(n > 0, fn, 1.0))))
        both = (n_a > 0) & (n_b > 0)
        m2 = (np.where(n_a > 0, m2_a, 0.0) + np.where(n_b > 0, m2_b, 0.0)
              + np.where(both, delta * delta * (fa * fb / np.where(n > 0, fn, 1.0)), 0.0))
    return n, np.where(n > 0, mean, np.nan), m2


def _cell_m2(n, var, ddof: int):
    """M2 of each cell from its reported variance: var·(n − ddof) for n > ddof, 0 for n = 1 (and n = 0)."""
    with np.errstate(invalid="ignore"):
        return np.where(n > ddof, var * (n - ddof), 0.0)


def _group_block(codes, n_groups: int, n, mean, m2):
    """(n, mean, M2) of every group of one block, two-pass about each group's mean (codes: group of each row,
    −1 = none; arrays (rows, L))."""
    width = n.shape[1]
    keep = (codes >= 0)[:, None] & (n > 0)
    flat = (np.where(codes >= 0, codes, 0)[:, None] * width + np.arange(width)[None, :]).ravel()
    keep = keep.ravel()
    idx, nn, mm, qq = flat[keep], n.ravel()[keep], mean.ravel()[keep], m2.ravel()[keep]
    size = n_groups * width
    count = np.zeros(size, np.int64)  # NB: integer counts, exact
    np.add.at(count, idx, nn)
    total = np.bincount(idx, weights=nn * mm, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    spread = np.bincount(idx, weights=qq + nn * (mm - centre[idx]) ** 2, minlength=size)
    shape = (n_groups, width)
    return count.reshape(shape), centre.reshape(shape), spread.reshape(shape)


def aggregate(results, *, by: str = "case") -> xr.Dataset:
    """One CNR per group of images and ROI id, from the pooled moments of the group's cells.

    For each group (the images sharing a value of the per-image column `by`) and ROI id, the moments of every cell
    whose ROI has at least one pixel are pooled — ROI and background separately — into the count, mean and variance
    that measuring the union of those pixels at once would give (a case's background is the union of its slices'
    2-D backgrounds where the ROI is present; no 3-D dilation). The results' definition, ``ddof``, ``min_bg`` and
    status rules then apply to the pooled values.

    Parameters
    ----------
    results : str, Path or xarray.Dataset
        Results of `gpucnr.run` (a path is opened with `gpucnr.open_results`, which checks them) or of
        `gpucnr.measure`, with ``by`` among their per-image coordinates.
    by : str
        A per-image column: ``case``, ``series_id``, ``study_id``, ``patient_id`` or a grouping column the run
        named. Images without a value are left out (counted in the ``images_without_group`` attribute).

    Returns
    -------
    xarray.Dataset
        Dims (`by`, roi): ``n_roi``, ``mean_roi``, ``var_roi``, ``n_bg``, ``mean_bg``, ``var_bg``, ``cnr``,
        ``status``, ``roi_name`` (the first name the group's cells give the id);
        dims (`by`): ``n_images``, ``cnr_median``, ``n_valid``. Status as for images, and: −1 when a cell
        of the group was never computed, 6 when one failed, 7 when one is out of numeric range, 9 ``not-poolable``
        for gCNR (a histogram statistic, not a function of moments), MRIQC's CNR (its air term is each
        image's own air region, which the cells' moments do not carry) and MRQy's (a statistic of two 5x5 patches).

    Raises
    ------
    InputError
        ``by`` is not a per-image column or no image has a value of it, or the results' ``ddof`` is neither 0
        nor 1.

    Notes
    -----
    Pooling uses M2 = var·(n − ddof) for n > ddof and 0 for n = 1, merged by Chan et al.'s formula
    (`pool_moments`); results are read `_BLOCK` images at a time, so memory does not grow with their size. A signed
    CNR takes the group's display polarity; a group mixing MONOCHROME1 and MONOCHROME2 images is refused.
    """
    from gpucnr.results import open_results

    ds = results if isinstance(results, xr.Dataset) else open_results(results)
    if by not in ds.coords and by not in ds.data_vars:
        from gpucnr.statistics import not_a_column  # NB: the same list as report's and filter's `by`

        raise InputError(not_a_column(ds, by))
    ddof = int(ds.attrs.get("ddof", 1))
    if ddof not in (0, 1):
        raise InputError(f"aggregate pools moments measured with ddof 0 or 1, not {ddof}")
    min_bg = int(ds.attrs.get("min_bg", 30))
    definition = str(ds.attrs.get("definition", "pooled"))
    signed = ds.attrs.get("signed") is True

    labels = np.asarray(ds[by].values).tolist()
    missing = np.array([v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == "")
                        for v in labels], bool)
    # NB: through Python strings: a results' text coordinate may be numpy's StringDType, a number column numbers
    names, codes = np.unique(np.array([str(v) for v, m in zip(labels, missing, strict=True) if not m], dtype=str),
                             return_inverse=True)
    if len(labels) and missing.all():
        # NB: every image would be left out: an empty result that said nothing (PNG results by patient_id)
        raise InputError(f"no image of these results has a value of {by!r}, so there is no group to pool (PNG, TIFF, "
                         "JPEG and NIfTI files carry no ids: give them with `gpucnr ingest --meta`)")
    code_of = np.full(len(labels), -1, np.int64)
    code_of[~missing] = codes
    n_groups, width = len(names), int(ds.sizes.get("roi", 0))

    shape = (n_groups, width)
    roi = [np.zeros(shape, np.int64), np.full(shape, np.nan), np.zeros(shape)]
    bg = [np.zeros(shape, np.int64), np.full(shape, np.nan), np.zeros(shape)]
    counts = {k: np.zeros(shape, np.int64) for k in ("not-computed", "failed", "numeric-range", "outside")}
    n_images = np.bincount(code_of[code_of >= 0], minlength=n_groups).astype(np.int64)
    polarity = np.zeros(n_groups, np.int64)  # NB: bit 1 = a MONOCHROME2 image, bit 2 = a MONOCHROME1 one
    roi_name = np.full(shape, "", dtype=object)  # NB: the first name a group's cells give each ROI id
    photometric = (np.array([str(v) for v in ds["photometric"].values.tolist()]) if "photometric" in ds.coords
                   else None)
    for lo in range(0, ds.sizes["image"], _BLOCK):
        wanted = ["n_roi", "mean_roi", "var_roi", "n_bg", "mean_bg", "var_bg", "status"]
        part = ds.isel(image=slice(lo, lo + _BLOCK))[wanted + (["roi_name"] if "roi_name" in ds else [])].load()
        c = code_of[lo : lo + _BLOCK]
        status = part["status"].values
        n_r, n_b = part["n_roi"].values, part["n_bg"].values
        # NB: a cell whose ROI has no pixel contributes nothing (absent, roi-outside); its slice's background
        # is not the ROI's surroundings.
        has = (n_r > 0) & (status != STATUS["failed"]) & (status != STATUS["not-computed"])
        n_r, n_b = np.where(has, n_r, 0), np.where(has, np.maximum(n_b, 0), 0)
        for acc, n, mean, var in ((roi, n_r, part["mean_roi"].values, part["var_roi"].values),
                                  (bg, n_b, part["mean_bg"].values, part["var_bg"].values)):
            got = _group_block(c, n_groups, n, mean, _cell_m2(n, var, ddof))
            acc[0], acc[1], acc[2] = pool_moments(acc[0], acc[1], acc[2], *got)
        for key, mask in (("not-computed", status == STATUS["not-computed"]), ("failed", status == STATUS["failed"]),
                          ("numeric-range", status == STATUS["numeric-range"]),
                          ("outside", status == STATUS["roi-outside"])):
            hit = np.zeros(shape, np.int64)
            rows, cols = np.nonzero(mask & (c >= 0)[:, None])
            np.add.at(hit, (c[rows], cols), 1)
            counts[key] += hit
        if "roi_name" in part:
            names_block = np.asarray(part["roi_name"].values).astype(object)
            rows, cols = np.nonzero((names_block != "") & (c >= 0)[:, None])
            # NB: the first named cell of each (group, roi) in image order, all groups at once: np.unique's first
            # index of each flat (group, roi) cell, in the row-major order of the block's cells
            cells, first = np.unique(c[rows] * width + cols, return_index=True)
            empty = roi_name.ravel()[cells] == ""
            roi_name.ravel()[cells[empty]] = [str(v) for v in names_block[rows[first[empty]], cols[first[empty]]]]
        if photometric is not None:
            inverted = photometric[lo : lo + _BLOCK] == "MONOCHROME1"
            for bit, sel in ((1, ~inverted), (2, inverted)):
                np.bitwise_or.at(polarity, c[(c >= 0) & sel], bit)

    n_roi, mean_roi, m2_roi = roi
    n_bg, mean_bg, m2_bg = bg
    with np.errstate(invalid="ignore", divide="ignore"):
        var_roi = np.where(n_roi > ddof, m2_roi / (n_roi - ddof), np.nan)
        var_bg = np.where(n_bg > ddof, m2_bg / (n_bg - ddof), np.nan)
    if signed and definition not in _POLARITY_FREE and (polarity == 3).any():
        bad = names[polarity == 3][:3].tolist()
        raise InputError(f"a signed CNR cannot be pooled over groups mixing MONOCHROME1 and MONOCHROME2 images "
                         f"(e.g. {bad}); aggregate unsigned results")
    sign = np.where(polarity == 2, -1.0, 1.0)[:, None]
    if definition in _NOT_POOLABLE:
        cnr, zero_noise = np.full(shape, np.nan), np.zeros(shape, bool)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            cnr, zero_noise = contrast_to_noise(np, mean_roi, var_roi, mean_bg, var_bg, definition, signed=signed,
                                                polarity=sign)
    status = cell_status(np, present=(n_roi > 0) | (counts["outside"] > 0), n_roi_inside=n_roi, n_roi=n_roi,
                         n_bg=n_bg, zero_noise=zero_noise, ddof=ddof, min_bg=min_bg,
                         numeric_range=counts["numeric-range"] > 0)
    if definition in _NOT_POOLABLE:
        status = np.where(status == STATUS["ok"], np.int8(STATUS["not-poolable"]), status)
    status = np.where(counts["failed"] > 0, np.int8(STATUS["failed"]), status)
    status = np.where(counts["not-computed"] > 0, np.int8(STATUS["not-computed"]), status).astype(np.int8)
    cnr = np.where(status == STATUS["ok"], cnr, np.where(status == STATUS["zero-noise"], cnr, np.nan))
    median, n_valid = median_of_valid(np, cnr, status, signed=signed)
    cell, group = (by, "roi"), (by,)
    out = xr.Dataset(
        {"n_roi": (cell, n_roi), "mean_roi": (cell, mean_roi), "var_roi": (cell, var_roi), "n_bg": (cell, n_bg),
         "mean_bg": (cell, mean_bg), "var_bg": (cell, var_bg), "cnr": (cell, cnr), "status": (cell, status),
         "roi_name": (cell, roi_name.astype(str)),
         "n_images": (group, n_images), "cnr_median": (group, median), "n_valid": (group, n_valid)},
        coords={by: names, "roi": ds["roi"].values},
    )
    out.attrs = {**{k: v for k, v in ds.attrs.items() if k != "failures"}, "aggregated_by": by,
                 "images_without_group": int(missing.sum())}
    return out
