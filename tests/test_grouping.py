"""One-pass grouping (issue 17): summarize, the filtering rules, manifest and aggregate equal a plain per-group loop.

Every expected value here is computed by a loop over the groups written in the test (a boolean mask per group, numpy
on each group's values), on results with NaN, flagged and never-computed images, ties, groups of one image and
missing group values.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from gpucnr.grouping import segments
from gpucnr.statistics import MISSING, QUANTILES, summarize


def messy(n=400, n_roi=3, groups=37, seed=0) -> xr.Dataset:
    """Results with ties (CNR on a 0.25 grid), NaN cells, non-ok statuses, images with no valid ROI and never
    computed, a per-image ``site`` with many small groups (some of one image) and missing values."""
    rng = np.random.default_rng(seed)
    cnr = np.round(rng.gamma(2.0, 1.0, (n, n_roi)) * 4) / 4
    status = np.where(rng.random((n, n_roi)) < 0.15, rng.choice([1, 2, 4, 5], (n, n_roi)), 0).astype(np.int8)
    cnr[rng.random((n, n_roi)) < 0.05] = np.nan
    failed = rng.random(n) < 0.03
    status[failed] = 6
    never = rng.random(n) < 0.02
    status[never] = -1
    cnr[never | failed] = np.nan
    ok = (status == 0) & np.isfinite(cnr)
    n_valid = np.where(never, -1, ok.sum(axis=1)).astype(np.int64)
    with np.errstate(all="ignore"):
        median = np.array([np.median(r[k]) if k.any() else np.nan for r, k in zip(cnr, ok, strict=True)])
    # group sizes from 1 upwards: a few large groups, many tiny ones
    site = np.array([f"s{int(v):03d}" for v in np.minimum(rng.zipf(1.6, n), groups)], dtype=object)
    site[rng.random(n) < 0.05] = None
    site[rng.random(n) < 0.02] = ""
    modality = rng.choice(np.array(["CT", "MR", "XR"], dtype=object), n)
    return xr.Dataset(
        {"cnr": (("image", "roi"), cnr), "status": (("image", "roi"), status),
         "cnr_median": (("image",), median), "n_valid": (("image",), n_valid),
         "n_excluded": (("image",), np.zeros(n, np.int64))},
        coords={"image": np.arange(n), "roi": np.arange(1, n_roi + 1), "site": ("image", site),
                "modality": ("image", modality)},
    )


def group_masks(ds, column):
    """{label: image mask}: a plain loop over the column's distinct values, "(missing)" for None and ""."""
    raw = pd.Series(ds[column].values, dtype=object)
    missing = raw.isna() | (raw == "")
    out = {}
    for value in sorted(raw[~missing].unique()):
        out[f"{column}={value}"] = (raw == value).to_numpy() & ~missing.to_numpy()
    if missing.any():
        out[f"{column}={MISSING}"] = missing.to_numpy()
    return out


def test_segments_equal_numpy_per_group():
    rng = np.random.default_rng(1)
    values = np.round(rng.normal(size=3000), 1)  # NB: many ties
    codes = rng.integers(0, 300, values.size)
    codes[codes == 7] = 8  # an empty group
    seg = segments(values, codes, 301)
    q = np.array([0.0, 0.01, 0.05, 0.5, 0.75, 0.99, 1.0])
    got_q, got_m, got_mean = seg.quantile(q), seg.median(), seg.mean()
    for g in range(301):
        sample = values[codes == g]
        if not sample.size:
            assert np.isnan(got_q[g]).all() and np.isnan(got_m[g]) and np.isnan(got_mean[g])
            continue
        # exact: the same arithmetic as numpy's
        np.testing.assert_array_equal(got_q[g], np.quantile(sample, q, method="linear"))
        assert got_m[g] == np.median(sample)
        np.testing.assert_allclose(got_mean[g], sample.mean(), rtol=1e-12, atol=1e-15)
    assert seg.count[7] == 0 and seg.count.sum() == values.size


@pytest.mark.parametrize("seed", [0, 1])
def test_summarize_equals_a_per_group_loop(seed):
    ds = messy(seed=seed)
    thr = (0.5, 1.0, 1.5, 2.25)
    s = summarize(ds, thr, by=["site", "modality"], bins=13)
    edges = s["edge"].values
    n_valid = ds["n_valid"].values
    image_values = np.where(n_valid > 0, ds["cnr_median"].values, np.nan)
    cell_ok = ds["status"].values == 0
    masks = {"all": np.ones(ds.sizes["image"], bool), **group_masks(ds, "site"), **group_masks(ds, "modality")}
    assert list(s["group"].values) == list(masks)
    for label, mask in masks.items():
        assert int(s["n_images"].sel(group=label)) == mask.sum()
        assert int(s["n_not_computed"].sel(group=label)) == (mask & (n_valid < 0)).sum()
        for level, values in (("image", image_values[mask]), ("roi", ds["cnr"].values[mask][cell_ok[mask]])):
            sample = np.sort(values[np.isfinite(values)])
            x = s.sel(level=level, group=label)
            assert int(x["count"]) == sample.size
            assert int(x["n_no_valid_roi"]) == (mask & (n_valid == 0)).sum()
            np.testing.assert_array_equal(x["histogram"].values, np.histogram(sample, bins=edges)[0])
            np.testing.assert_array_equal(x["n_below"].values, [(sample < t).sum() for t in thr])
            if sample.size:
                np.testing.assert_array_equal(x["quantiles"].values, np.quantile(sample, QUANTILES))
                np.testing.assert_allclose(float(x["mean"]), sample.mean(), rtol=1e-12)
                np.testing.assert_array_equal(x["ecdf"].values, [(sample <= e).sum() / sample.size for e in edges])
                np.testing.assert_array_equal(x["fraction_below"].values,
                                              [(sample < t).sum() / sample.size for t in thr])
            else:
                assert np.isnan(x["quantiles"].values).all() and np.isnan(float(x["mean"]))
                assert np.isnan(x["ecdf"].values).all() and np.isnan(x["fraction_below"].values).all()
