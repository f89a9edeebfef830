"""Dataset-level CNR statistics: distributions, threshold fractions with Wilson intervals, drifting groups.

`summarize` turns a results Dataset (DESIGN §6) into one small xarray.Dataset that a report, a plot or a
notebook reads without touching the (image, roi) arrays again.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from gpucnr._version import __version__
from gpucnr.errors import InputError, NoticeWarning, OptionError
from gpucnr.grouping import segments
from gpucnr.rules import MAD_SCALE, parse_rule

__all__ = ["LEVELS", "MISSING", "OUTLIER_K", "QUANTILES", "WILSON_Z", "EmptyColumnWarning", "summarize",
           "warn_empty_columns", "wilson_interval"]

#: The two levels summarised: one value per image (its cnr_median), one per valid (image, roi) cell.
LEVELS = ("image", "roi")
#: The level added when the results have a per-image ``case`` column: one pooled CNR per case (`gpucnr.aggregate`).
CASE_LEVEL = "case"
#: Quantile probabilities reported (numpy's default "linear" method).
QUANTILES = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)
#: Two-sided 95 % normal quantile, Φ⁻¹(0.975), used by the Wilson score interval.
WILSON_Z = 1.959963984540054
#: A group is an outlier when |median − median of medians| > OUTLIER_K × MAD_SCALE × MAD.
OUTLIER_K = 3.0
#: Name of the group that collects images whose grouping value is missing.
MISSING = "(missing)"
# NB: the stack's and the results' table writers store text columns with ``astype(str)``, so a missing value
# (None, NaN, pandas.NA) comes back from Zarr as one of these strings; treating them as missing keeps a
# "(missing)" group whether the results were summarised in memory or after a round trip through the store.
_MISSING_TEXT = frozenset({"", "nan", "NaN", "None", "<NA>", "NaT"})
#: the end of the error for a `by` column the results lack: where per-image columns of a stack come from
KEEP_COLUMN = ("; a column of the stack reaches the results when the run keeps it: `gpucnr run ... "
               "--group-columns NAME` (group_columns= in Python)")


def groupable_columns(ds: xr.Dataset) -> list[str]:
    """The per-image columns a `by` can name, sorted: the coordinates along ``image`` (structure, acquisition,
    pseudonymous ids and the run's ``group_columns``), never the image index itself nor an output of the run
    (``cnr_median``, ``n_valid``, ``n_excluded``: data variables)."""
    return sorted(str(c) for c in ds.coords if ds[c].dims == ("image",) and c != "image")


def not_a_column(ds: xr.Dataset, name: str) -> str:
    """The error text for a `by` column that the results lack, the same for report, filter, enhance and aggregate:
    the closest column name, the columns one can group by, and how a stack's column reaches the results."""
    import difflib

    choices = groupable_columns(ds)
    close = difflib.get_close_matches(str(name), choices, n=1)
    return (f"by={name!r} is not a per-image column of the results"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + (f" Columns to group by: {', '.join(choices)}" if choices else " They have no column to group by")
            + KEEP_COLUMN)


#: The rules `summarize` shows by default, beside the absolute thresholds (issue 16).
DEFAULT_RULES = ("quantile:0.05", "mad:3")


def summarize(results, thresholds=(1.0, 1.5, 2.0, 3.0), by=None, *, bins: int = 50,
              rules=DEFAULT_RULES) -> xr.Dataset:
    """Summarise the CNR of a whole dataset, overall and per group of a per-image column.

    Two levels are summarised. ``image``: one value per image, its ``cnr_median``, taken as NaN when the image
    has no valid ROI (``n_valid == 0``) or was never computed (``n_valid < 0``, an unwritten row). ``roi``:
    the ``cnr`` of every (image, roi) cell whose ``status`` is 0 (ok). Only finite values enter the
    statistics; images without a valid ROI are counted separately (``n_no_valid_roi``), never dropped.

    Parameters
    ----------
    results : xarray.Dataset or str or os.PathLike
        Results of `gpucnr.measure` or `gpucnr.run` (DESIGN §6), or the path of a results store (opened with
        `gpucnr.results.open_results`). Needs ``cnr``, ``status`` (image, roi) and ``cnr_median``,
        ``n_valid`` (image).
    thresholds : sequence of float
        CNR thresholds, T of them after sorting and removing duplicates; each must be finite.
    by : str or sequence of str, optional
        Per-image columns (coordinates or variables of dims ``(image,)``, e.g. modality, site, split) to
        group by. Each column is a separate grouping; its missing values (NaN, None, "", and their text forms
        "nan", "None", "<NA>" after a Zarr round trip) form the group ``"(missing)"``.
    bins : int
        Number of histogram bins. The edges are shared by both levels and all groups: `bins` equal bins over
        the finite range of all values of the dataset (``numpy.histogram_bin_edges``).
    rules : sequence of str or gpucnr.rules.Rule
        Filtering rules (``"abs:T"``, ``"quantile:P"``, ``"mad:K"``; `gpucnr.manifest`'s ``rule``) whose cut is
        shown for every level and group: R of them, in the given order. The cut of a group comes from its finite
        values, as `gpucnr.manifest` with ``by=`` that column computes it at the image level.

    Returns
    -------
    xarray.Dataset
        Dimensions: ``level`` ("image", "roi", and "case" when the results have a per-image ``case`` column:
        each case's pooled CNR from `gpucnr.aggregate`, counted in the groups of its first image), ``group``
        (G), ``quantile`` (7), ``bin`` (`bins`),
        ``edge`` (`bins` + 1), ``threshold`` (T), ``rule`` (R; coordinate: the rules as text, e.g. "mad:3").

        Coordinates: ``level``; ``group`` (label: "all", or "<column>=<value>", or "<column>=(missing)");
        ``group_by`` (group,) the column ("all" for the whole dataset); ``group_value`` (group,) the value as
        text ("all" for the whole dataset, "(missing)"); ``quantile`` (the probabilities); ``bin`` (0..bins-1)
        with ``bin_low``, ``bin_high`` (bin,); ``edge`` (the bin edges); ``threshold``.

        Groups are ordered "all" first, then for each column of `by` in the given order its values sorted,
        "(missing)" last.

        Variables (counts int64, the rest float64 unless stated):

        - ``n_images`` (group,): images in the group.
        - ``n_not_computed`` (group,): images whose row was never written (n_valid < 0).
        - ``n_no_valid_roi`` (level, group): images of the group with n_valid == 0 (same for both levels).
        - ``count`` (level, group): finite values. Read it as ``summary["count"]``: ``summary.count`` is
          xarray's ``Dataset.count`` method, which the attribute syntax reaches first.
        - ``mean`` (level, group): mean of the finite values (NaN when count is 0).
        - ``quantiles`` (level, group, quantile): numpy's linear-method quantiles (NaN when count is 0).
        - ``histogram`` (level, group, bin): counts per bin, ``numpy.histogram`` semantics (half-open bins,
          the last one closed); sums to ``count``.
        - ``ecdf`` (level, group, edge): fraction of the finite values <= each edge (NaN when count is 0).
        - ``n_below`` (level, group, threshold): finite values strictly less than the threshold.
        - ``fraction_below`` (level, group, threshold): ``n_below / count`` (NaN when count is 0).
        - ``fraction_below_low``, ``fraction_below_high`` (level, group, threshold): 95 % Wilson score
          interval of ``fraction_below``.
        - ``outlier`` (level, group) bool and ``outlier_score`` (level, group): within the groups of one
          column, |median − median of the group medians| / (1.4826 × MAD of the group medians); flagged when
          the deviation exceeds 3 × 1.4826 × MAD (a zero MAD flags any deviation, score inf). Groups with
          no finite value, and "all", have score NaN and are never flagged.
        - ``rule_cut`` (level, group, rule): where the rule cuts the group (NaN where it drops nothing: a
          quantile's group smaller than 1/P, a MAD of 0, no finite value).
        - ``rule_n_below`` (level, group, rule): finite values strictly below the cut (what the rule drops).

        Attributes: ``thresholds`` (list of float), ``by`` (list of str, empty without grouping), ``rules``
        (list of str), ``bins``,
        ``quantile_method``, ``wilson_z``, ``outlier_rule``, ``gpucnr_version``.

    Raises
    ------
    InputError
        A variable the summary needs is missing, or a `by` column is not a per-image column.
    OptionError
        `thresholds` empty or not finite, or `bins` not a positive integer.
    RuleError
        ``bad-rule``: a rule that is not one of the accepted forms.
    """
    ds = _as_results(results)
    thr = _thresholds(thresholds)
    rule_list = [parse_rule(r) for r in ([rules] if isinstance(rules, str) else list(rules))]
    bins = _bins(bins)
    columns = _by(by)
    for name in columns:
        if name not in ds.variables or ds[name].dims != ("image",):
            raise InputError(not_a_column(ds, name))
    warn_empty_columns(ds, columns)

    n_valid = np.asarray(ds["n_valid"].values).astype(np.int64)
    cnr_median = np.asarray(ds["cnr_median"].values, np.float64)
    cnr = np.asarray(ds["cnr"].values, np.float64)
    status = np.asarray(ds["status"].values)
    n_images = n_valid.shape[0]

    # NB: an image's value is meaningful only when it has a valid ROI; a stale or filled cnr_median of an
    # image with n_valid <= 0 must not enter the distribution.
    image_values = np.where(n_valid > 0, cnr_median, np.nan)
    ok_rows, _ = np.nonzero(status == 0)
    roi_values = cnr[status == 0]  # row-major, the same order as ok_rows
    per_level = {
        "image": (image_values, np.arange(n_images)),
        "roi": (roi_values, ok_rows),
    }
    if CASE_LEVEL in ds.variables and ds[CASE_LEVEL].dims == ("image",):
        per_level[CASE_LEVEL] = _case_values(ds)
    levels = list(per_level)
    # NB: keep only finite values once, with the image that owns each (its group codes give the value's groups).
    for level, (values, owner) in per_level.items():
        finite = np.isfinite(values)
        per_level[level] = (values[finite], owner[finite])

    everything = np.concatenate([per_level[level][0] for level in levels])
    edges = np.histogram_bin_edges(everything, bins=bins)

    labels, group_by, group_value, groupings = _groups(ds, columns, n_images)
    n_groups = len(labels)
    n_thr = thr.size
    shape = (len(levels), n_groups)
    out = {
        "count": np.zeros(shape, np.int64),
        "mean": np.full(shape, np.nan),
        "quantiles": np.full((*shape, len(QUANTILES)), np.nan),
        "histogram": np.zeros((*shape, bins), np.int64),
        "ecdf": np.full((*shape, edges.size), np.nan),
        "n_below": np.zeros((*shape, n_thr), np.int64),
        "rule_cut": np.full((*shape, len(rule_list)), np.nan),
        "rule_n_below": np.zeros((*shape, len(rule_list)), np.int64),
    }
    # NB: one sort per (level, grouping column) gives every group's statistics at once (issue 17): no per-group
    # mask, so the cost is that of the values, not values × groups.
    for li, level in enumerate(levels):
        values, owner = per_level[level]
        by_value = np.argsort(values, kind="stable")
        for codes, offset, size in groupings:
            seg = segments(values, codes[owner], size, by_value=by_value)
            cols = slice(offset, offset + size)
            out["count"][li, cols] = seg.count
            out["mean"][li, cols] = seg.mean()
            out["quantiles"][li, cols] = seg.quantile(QUANTILES)
            # NB: numpy.histogram's bins are half-open [e_i, e_i+1), the last one closed: counts strictly below
            # each edge, differenced, and the last bin takes the values equal to the last edge too.
            lt = seg.count_at_or_below(edges, strict=True)
            le = seg.count_at_or_below(edges)
            hist = np.diff(lt, axis=1)
            hist[:, -1] += le[:, -1] - lt[:, -1]
            out["histogram"][li, cols] = hist
            # NB: "strict" counts values strictly below each threshold (the rule), the ECDF counts <= edge.
            out["n_below"][li, cols] = seg.count_at_or_below(thr, strict=True)
            for ri, rule in enumerate(rule_list):
                cut = rule.cuts(seg)
                out["rule_cut"][li, cols, ri] = cut
                out["rule_n_below"][li, cols, ri] = seg.count_below(cut)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["ecdf"][li, cols] = np.where(seg.count[:, None] > 0, le / np.maximum(seg.count, 1)[:, None],
                                                 np.nan)
    count = out["count"][..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["fraction_below"] = np.where(count > 0, out["n_below"] / np.maximum(count, 1), np.nan)
    out["fraction_below_low"], out["fraction_below_high"] = wilson_interval(out["n_below"], count)

    medians = out["quantiles"][:, :, QUANTILES.index(0.5)]
    outlier, score = _outliers(medians, np.asarray(group_by))

    n_in, n_no_valid, n_not_computed = (np.zeros(n_groups, np.int64) for _ in range(3))
    for codes, offset, size in groupings:
        cols = slice(offset, offset + size)
        n_in[cols] = np.bincount(codes, minlength=size)
        n_no_valid[cols] = np.bincount(codes[n_valid == 0], minlength=size)
        n_not_computed[cols] = np.bincount(codes[n_valid < 0], minlength=size)
    data = {
        "n_images": (("group",), n_in),
        "n_not_computed": (("group",), n_not_computed),
        # NB: an image without a valid ROI contributes to neither level; the count is the same for both.
        "n_no_valid_roi": (("level", "group"), np.broadcast_to(n_no_valid, shape).copy()),
        "count": (("level", "group"), out["count"]),
        "mean": (("level", "group"), out["mean"]),
        "quantiles": (("level", "group", "quantile"), out["quantiles"]),
        "histogram": (("level", "group", "bin"), out["histogram"]),
        "ecdf": (("level", "group", "edge"), out["ecdf"]),
        "n_below": (("level", "group", "threshold"), out["n_below"]),
        "fraction_below": (("level", "group", "threshold"), out["fraction_below"]),
        "fraction_below_low": (("level", "group", "threshold"), out["fraction_below_low"]),
        "fraction_below_high": (("level", "group", "threshold"), out["fraction_below_high"]),
        "rule_cut": (("level", "group", "rule"), out["rule_cut"]),
        "rule_n_below": (("level", "group", "rule"), out["rule_n_below"]),
        "outlier": (("level", "group"), outlier),
        "outlier_score": (("level", "group"), score),
    }
    coords = {
        "level": levels,
        "group": np.asarray(labels, dtype=object),
        "group_by": ("group", np.asarray(group_by, dtype=object)),
        "group_value": ("group", np.asarray(group_value, dtype=object)),
        "quantile": list(QUANTILES),
        "bin": np.arange(bins),
        "bin_low": ("bin", edges[:-1]),
        "bin_high": ("bin", edges[1:]),
        "edge": edges,
        "threshold": thr,
        "rule": np.asarray([str(r) for r in rule_list], dtype=object),
    }
    summary = xr.Dataset(data, coords=coords)
    summary.attrs.update({
        "thresholds": [float(t) for t in thr],
        "by": list(columns),
        "rules": [str(r) for r in rule_list],
        "bins": bins,
        "quantile_method": "linear",
        "wilson_z": WILSON_Z,
        "outlier_rule": f"|median - median(group medians)| > {OUTLIER_K:g} x {MAD_SCALE} x MAD(group medians), "
                        "within the groups of one column",
        "gpucnr_version": __version__,
    })
    return summary


def _case_values(ds: xr.Dataset):
    """(pooled CNR of every case, the first image of each case): a case counts in the groups of its first image."""
    from gpucnr.pooling import aggregate

    pooled = aggregate(ds, by=CASE_LEVEL)
    names = [str(v) for v in pooled[CASE_LEVEL].values.tolist()]
    first: dict[str, int] = {}
    for i, value in enumerate(ds[CASE_LEVEL].values.tolist()):
        first.setdefault(str(value), i)
    values = np.where(np.asarray(pooled["n_valid"].values) > 0, np.asarray(pooled["cnr_median"].values, float),
                      np.nan)
    return values, np.asarray([first[n] for n in names], np.int64)


def wilson_interval(k, n, z: float = WILSON_Z):
    """Wilson score interval of a binomial proportion k / n.

    Parameters
    ----------
    k : int or int array, any shape
        Successes (here: values below a threshold), 0 <= k <= n.
    n : int or int array, broadcastable with `k`
        Trials (here: finite values of the group).
    z : float
        Normal quantile of the two-sided level (default 95 %).

    Returns
    -------
    (low, high) : float64 arrays of the broadcast shape of `k` and `n`
        ``(p + z²/2n ∓ z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k / n``; NaN where n == 0. The
        bounds are clipped to [0, 1] and are exactly 0 at k == 0 and exactly 1 at k == n, where the formula
        gives them only up to rounding.
    """
    k = np.asarray(k, np.float64)
    n = np.asarray(n, np.float64)
    k, n = np.broadcast_arrays(k, n)
    low = np.full(k.shape, np.nan)
    high = np.full(k.shape, np.nan)
    has = n > 0
    kk, nn = k[has], n[has]
    p = kk / nn
    z2 = z * z
    denom = 1.0 + z2 / nn
    centre = (p + z2 / (2.0 * nn)) / denom
    half = z / denom * np.sqrt(p * (1.0 - p) / nn + z2 / (4.0 * nn * nn))
    low[has] = np.where(kk == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    high[has] = np.where(kk == nn, 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


# --- helpers ---------------------------------------------------------------------------------------------------


def _as_results(results) -> xr.Dataset:
    if isinstance(results, str | os.PathLike):
        from gpucnr.results import open_results

        results = open_results(results)
    if not isinstance(results, xr.Dataset):
        raise InputError(f"results must be an xarray.Dataset or the path of a results store, not "
                         f"{type(results).__name__}")
    missing = [v for v in ("cnr", "status", "cnr_median", "n_valid") if v not in results.variables]
    if missing:
        raise InputError(f"results lack {', '.join(missing)} (DESIGN §6)")
    return results


def _thresholds(thresholds) -> np.ndarray:
    values = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise OptionError(f"thresholds must be a non-empty sequence of finite numbers, got {thresholds!r}")
    # NB: sorted and unique, so the threshold coordinate is a clean index (.sel(threshold=1.5) is unambiguous).
    return np.unique(values)


def _bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise OptionError(f"bins must be a positive integer, got {bins!r}")
    return int(bins)


def _by(by) -> list[str]:
    if by is None:
        return []
    columns = [by] if isinstance(by, str) else list(by) if isinstance(by, Sequence) else None
    if columns is None or not all(isinstance(c, str) for c in columns):
        raise OptionError(f"by must be a column name or a sequence of column names, got {by!r}")
    if len(set(columns)) != len(columns):
        raise OptionError(f"by names a column twice: {columns!r}")
    return columns


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str | np.str_):
        return str(value).strip() in _MISSING_TEXT
    result = pd.isna(value)  # NaN, NaT, pandas.NA
    return bool(result) if isinstance(result, bool | np.bool_) else False


def _groups(ds: xr.Dataset, columns: list[str], n_images: int):
    """Group labels, their column and value, and per grouping ("all" first, then each column of `columns`) the
    group code of every image (int64 (n_images,)), the position of its first group among the labels and its
    number of groups."""
    labels, group_by, group_value = ["all"], ["all"], ["all"]
    groupings = [(np.zeros(n_images, np.int64), 0, 1)]
    for name in columns:
        codes, values = column_codes(ds[name].values)
        groupings.append((codes, len(labels), len(values)))
        labels += [f"{name}={v}" for v in values]
        group_by += [name] * len(values)
        group_value += values
    return labels, group_by, group_value, groupings


class EmptyColumnWarning(NoticeWarning):
    """A grouping column whose every value is empty: grouping by it makes one group, "(missing)"."""


def warn_empty_columns(ds: xr.Dataset, columns, *, command: str = "by") -> list[str]:
    """Warn (`EmptyColumnWarning`, one per column) about each of `columns` whose values are all empty: grouping
    by it silently cuts the whole set as one group otherwise. Returns the messages."""
    out = []
    for name in columns:
        if name not in ds.variables or ds[name].dims != ("image",) or not ds.sizes["image"]:
            continue
        _, values = column_codes(ds[name].values)
        if values != [MISSING]:
            continue
        hint = (" (modality comes from DICOM headers, and for NIfTI from a layout's dataset.json or BraTS file "
                "names: docs/ingest.md)" if name == "modality" else "")
        text = (f"{command} {name}: every value of the column {name!r} is empty, so all images form one group "
                f"{MISSING}; grouping by it does nothing{hint}")
        warnings.warn(text, EmptyColumnWarning, stacklevel=3)
        out.append(text)
    return out


def column_codes(raw) -> tuple[np.ndarray, list[str]]:
    """Group code of each value of a per-image column and the groups' values as text, in summarize's order.

    Parameters
    ----------
    raw : array (n,)
        The column's values, of any dtype.

    Returns
    -------
    codes : int64 array (n,)
        The group of each value: distinct values sorted (text order for a column mixing numbers and text),
        then ``"(missing)"`` last for NaN, None, "" and their text forms after a Zarr round trip.
    values : list of str
        The group values as text, ``"(missing)"`` for the missing group (present only if a value is missing).
    """
    # NB: pandas' hash table factorises the column in C; the Python-level rules (missing spellings, one group for
    # equal values of any dtype) then run once per distinct value, not once per image.
    first, uniques = pd.factorize(np.asarray(raw).astype(object), use_na_sentinel=True)
    uniques = list(uniques)
    missing = np.array([_is_missing(v) for v in uniques], bool)
    keys = [_scalar(v) for v, m in zip(uniques, missing, strict=True) if not m]
    try:
        distinct = sorted(set(keys))
    except TypeError:
        # NB: a column mixing types (numbers and text) has no natural order; text order is deterministic.
        distinct = sorted(set(keys), key=str)
    # NB: a dict keyed by value, as `set` groups them (1 and 1.0 are one group)
    index = {key: i for i, key in enumerate(distinct)}
    remap = np.full(len(uniques) + 1, len(distinct), np.int64)  # NB: the last slot: pandas' NA sentinel (-1)
    remap[np.flatnonzero(~missing)] = [index[k] for k in keys]
    codes = remap[first]
    has_missing = bool(missing.any() or (first < 0).any())
    return codes, [str(k) for k in distinct] + ([MISSING] if has_missing else [])


def _scalar(value):
    """A plain Python scalar (np.str_ -> str, np.int64 -> int), so equal values of any dtype are one group."""
    return value.item() if isinstance(value, np.generic) else value


def _outliers(medians: np.ndarray, group_by: np.ndarray):
    """Robust outlier flag and score of each group's median among the groups of the same column.

    medians : float array (level, group); group_by : object array (group,). Returns (bool, float) arrays of
    the shape of `medians`.
    """
    flag = np.zeros(medians.shape, bool)
    score = np.full(medians.shape, np.nan)
    for name in dict.fromkeys(group_by.tolist()):
        if name == "all":
            continue
        cols = np.flatnonzero(group_by == name)
        for li in range(medians.shape[0]):
            m = medians[li, cols]
            has = np.isfinite(m)
            if not has.any():
                continue
            centre = np.median(m[has])
            deviation = np.abs(m[has] - centre)
            spread = MAD_SCALE * np.median(deviation)
            # NB: a zero MAD (most groups agree exactly) flags any group that deviates at all: the literal
            # rule, with an infinite score; no deviation scores 0, not 0/0.
            if spread > 0:
                s = deviation / spread
            else:
                s = np.where(deviation > 0, math.inf, 0.0)
            score[li, cols[has]] = s
            flag[li, cols[has]] = deviation > OUTLIER_K * spread
    return flag, score
