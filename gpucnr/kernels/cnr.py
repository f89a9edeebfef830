"""The CNR definitions, cell status, the multi-ROI median and the generalised CNR (gCNR)."""

from __future__ import annotations

import math

__all__ = [
    "DEFINITIONS",
    "FORCED",
    "STATUS",
    "cell_status",
    "contrast_to_noise",
    "gcnr_bins",
    "gcnr_from_counts",
    "median_of_valid",
]

#: Names accepted by ``definition=`` (DESIGN §4).
DEFINITIONS = ("pooled", "background", "roi", "pooled-mean", "gcnr", "mriqc", "viqa", "mrqy")

#: Definitions that reproduce a peer tool and so fix options whatever the user gave; `Params` applies them and
#: records them in the results' attributes (``definition_forces``).
FORCED = {
    # NB: vIQA's contrast_to_noise_ratio is (np.mean(signal) - np.mean(background)) / np.std(background): the
    # population standard deviation and the sign of the difference (viqa 3.0.1, viqa/nr_metrics/cnr.py).
    "viqa": {"ddof": 0, "signed": True},
    # NB: MRQy's cnr is np.nanmean(fore_patch - back_patch) / np.nanstd(back_patch): signed, ddof 0 (mrqy 0.0.3,
    # mrqy/QCF.py; gpucnr/kernels/patches.py). ddof 0 also lets a 1-pixel ROI be measured, as MRQy does.
    "mrqy": {"ddof": 0, "signed": True},
}

#: Status codes of an (image, roi) cell, in order of precedence after "not computed" (DESIGN §4).
STATUS = {
    "not-computed": -1,
    "ok": 0,
    "absent": 1,
    "roi-outside": 2,
    "roi-too-small": 3,
    "background-too-small": 4,
    "zero-noise": 5,
    "failed": 6,
    # NB: an image whose values cannot be measured exactly by construction: an integer image whose spread
    # (max - min) does not fit in 63 bits, a float image whose spread overflows float64 (DESIGN §10). It comes
    # after the geometric statuses (they stay true whatever the values) and before zero-noise.
    "numeric-range": 7,
    # NB: rois="auto" did not find the cell's regions (no air, no body, or not two tissue classes) (DESIGN §10).
    "region-not-found": 8,
    # NB: a group of cells whose definition cannot be pooled from moments (gCNR is a histogram statistic, MRQy's
    # CNR a statistic of two 5x5 patches):
    # `gpucnr.aggregate` only (DESIGN §10).
    "not-poolable": 9,
}


def contrast_to_noise(xp, mean_roi, var_roi, mean_bg, var_bg, definition: str, *, signed: bool, polarity,
                      var_air=None):
    """CNR of every cell under a moment definition.

    Parameters
    ----------
    mean_roi, var_roi, mean_bg, var_bg : float64 arrays, one shape
        Region moments in modality units.
    definition : {"pooled", "background", "roi", "pooled-mean", "mriqc", "viqa"}
        ``|mr - mb| / sqrt(vr + vb)`` (the article's), ``/ sqrt(vb)``, ``/ sqrt(vr)``,
        ``/ sqrt((vr + vb) / 2)``, ``/ sqrt(var_air + vr + vb)`` (MRIQC's); "viqa" is vIQA's
        ``(mr - mb) / sqrt(vb)``, always signed and never flipped by `polarity` (vIQA sees the array's own values,
        not the display).
    signed : bool
        Keep sign(mr - mb) times `polarity` instead of the absolute value.
    polarity : float64 array broadcastable to the moments
        +1, or -1 for images displayed inverted (MONOCHROME1).
    var_air : float64 array broadcastable to the moments, optional
        ``definition="mriqc"`` only (required there): the air variance, 0 where the image has no air.

    Returns
    -------
    cnr : float64 array
        inf (signed: +-inf) where the noise term is zero and the means differ, NaN where both are zero.
    zero_noise : bool array
        The definition's noise term is exactly zero.
    """
    if definition == "pooled":
        noise2 = var_roi + var_bg
    elif definition == "pooled-mean":
        noise2 = (var_roi + var_bg) / 2
    elif definition == "background":
        noise2 = var_bg
    elif definition == "roi":
        noise2 = var_roi
    elif definition == "viqa":
        noise2 = var_bg
    elif definition == "mriqc":
        if var_air is None:
            raise ValueError("definition 'mriqc' needs var_air, the air variance (rois='auto' measures it)")
        noise2 = var_air + var_roi + var_bg  # MRIQC's CNR, |mu_1 - mu_2| / sqrt(var_air + var_1 + var_2)
    else:
        raise ValueError(f"not a moment definition: {definition!r}")
    diff = mean_roi - mean_bg
    zero_noise = noise2 == 0
    one = xp.ones_like(noise2)
    value = xp.abs(diff) / xp.sqrt(xp.where(zero_noise, one, noise2))
    inf = xp.full_like(value, math.inf)
    nan = xp.full_like(value, math.nan)
    value = xp.where(zero_noise, xp.where(diff != 0, inf, nan), value)
    if definition == "viqa":
        return xp.where(diff < 0, -value, value), zero_noise
    if signed:
        value = xp.where(diff < 0, -value, value) * polarity
    return value, zero_noise


def cell_status(xp, *, present, n_roi_inside, n_roi, n_bg, zero_noise, ddof: int, min_bg: int,
                numeric_range=None):
    """Status code per cell, the first that applies (DESIGN §4): absent, roi-outside, roi-too-small,
    background-too-small, numeric-range, zero-noise, else ok. Returns an int8 array."""
    code = xp.zeros(n_roi.shape, dtype=xp.int8)
    checks = (
        (~present, STATUS["absent"]),
        (n_roi_inside == 0, STATUS["roi-outside"]),
        (n_roi <= ddof, STATUS["roi-too-small"]),
        ((n_bg <= ddof) | (n_bg < min_bg), STATUS["background-too-small"]),
        *(() if numeric_range is None else ((numeric_range, STATUS["numeric-range"]),)),
        (zero_noise, STATUS["zero-noise"]),
    )
    # NB: applied from the lowest precedence up, so that the first check that holds has the last word.
    for cond, value in reversed(checks):
        code = xp.where(cond, xp.asarray(value, dtype=xp.int8), code)
    return code


def median_of_valid(xp, cnr, status, *, signed: bool):
    """Per image, numpy.median of the valid (status ok) cells' CNR (|cnr| unless signed).

    Parameters
    ----------
    cnr : float64 array, shape (n, L)
    status : int8 array, shape (n, L)

    Returns
    -------
    median : float64 array, shape (n,)
        NaN where no cell is valid (no warning).
    n_valid : int64 array, shape (n,)
    """
    valid = status == STATUS["ok"]
    n_valid = xp.sum(xp.astype(valid, xp.int64), axis=1)
    value = cnr if signed else xp.abs(cnr)
    # NB: invalid cells sort to the end as +inf, so the k valid values are the first k of each row.
    ordered = xp.sort(xp.where(valid, value, xp.full_like(value, math.inf)), axis=1)
    if ordered.shape[1] == 0:
        return xp.full(n_valid.shape, math.nan, dtype=xp.float64), n_valid
    lo = xp.clip((n_valid - 1) // 2, 0, ordered.shape[1] - 1)
    hi = xp.clip(n_valid // 2, 0, ordered.shape[1] - 1)
    a = xp.take_along_axis(ordered, lo[:, None], axis=1)[:, 0]
    b = xp.take_along_axis(ordered, hi[:, None], axis=1)[:, 0]
    # NB: (a + b) / 2 is what numpy.median computes (the mean of the two middle values), bit for bit.
    median = xp.where(n_valid > 0, (a + b) / 2, xp.full_like(a, math.nan))
    return median, n_valid


def gcnr_bins(n_smaller, gcnr_bins_option):
    """Number of bins for gCNR: ``ceil(2 n**0.4)`` for "auto" (n = the smaller region), else the integer."""
    if gcnr_bins_option == "auto":
        return max(1, math.ceil(2 * n_smaller**0.4))
    return int(gcnr_bins_option)


def gcnr_from_counts(xp, roi_counts, bg_counts, n_roi, n_bg):
    """gCNR = 1 - sum_b min(p_roi(b), p_bg(b)) from histogram counts over a common binning.

    Formed in integers: ``sum_b min(c_roi nb, c_bg nr)`` is exact in int64 (it is at most nr nb, for regions of
    fewer than 2**31 pixels each), so the value ``(nr nb - that sum) / (nr nb)`` is one rounding away from the
    exact one, whatever the order of the bins or the width of the count arrays (padding bins hold 0): the
    device path, whose count arrays are as wide as the largest possible bin count, gives the same bits.

    Parameters
    ----------
    roi_counts, bg_counts : int64 arrays, shape (m, B)
        Counts per bin (padding bins hold 0).
    n_roi, n_bg : int64 arrays, shape (m,)
    """
    i64 = xp.int64
    one = xp.ones(n_roi.shape, dtype=i64)
    nr = xp.where(n_roi > 0, xp.astype(n_roi, i64), one)
    nb = xp.where(n_bg > 0, xp.astype(n_bg, i64), one)
    shared = xp.sum(xp.minimum(xp.astype(roi_counts, i64) * nb[:, None], xp.astype(bg_counts, i64) * nr[:, None]),
                    axis=1)
    total = nr * nb
    return xp.astype(total - shared, xp.float64) / xp.astype(total, xp.float64)
