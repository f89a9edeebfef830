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


def moment_results(n=300, seed=0) -> xr.Dataset:
    """Results with moments (what aggregate pools), ROI names on some cells only, absent ROIs, failed and never
    computed cells, and a ``site`` column with tiny groups and missing values."""
    from gpucnr.kernels.cnr import STATUS

    rng = np.random.default_rng(seed)
    shape = (n, 3)
    n_roi = rng.integers(1, 60, shape)
    n_roi[rng.random(shape) < 0.2] = 0  # absent
    n_bg = rng.integers(40, 400, shape)
    mean_roi, mean_bg = np.round(rng.normal(300, 30, shape)), np.round(rng.normal(100, 10, shape))  # ties
    var_roi, var_bg = rng.gamma(4, 100, shape), rng.gamma(4, 100, shape)
    var_roi[n_roi == 1] = np.nan
    status = np.where(n_roi == 0, STATUS["absent"], 0).astype(np.int8)
    status[rng.random(shape) < 0.03] = STATUS["failed"]
    status[rng.random(n) < 0.02] = STATUS["not-computed"]
    names = np.where(rng.random(shape) < 0.5, rng.choice(np.array(["liver", "kidney", "spleen"], dtype=object),
                                                          shape), "")
    names[n_roi == 0] = ""
    site = np.array([f"s{int(v)}" for v in np.minimum(rng.zipf(1.5, n), 40)], dtype=object)
    site[rng.random(n) < 0.05] = None
    cell = ("image", "roi")
    return xr.Dataset(
        {"n_roi": (cell, n_roi), "mean_roi": (cell, mean_roi), "var_roi": (cell, var_roi), "n_bg": (cell, n_bg),
         "mean_bg": (cell, mean_bg), "var_bg": (cell, var_bg), "cnr": (cell, np.full(shape, np.nan)),
         "status": (cell, status), "roi_name": (cell, names.astype(str)),
         "cnr_median": (("image",), np.full(n, np.nan)), "n_valid": (("image",), np.zeros(n, np.int64))},
        coords={"image": np.arange(n), "roi": [1, 2, 3], "site": ("image", site)},
        attrs={"ddof": 1, "min_bg": 30, "definition": "pooled"},
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_aggregate_equals_a_per_group_loop(seed, monkeypatch):
    from gpucnr import pooling
    from gpucnr.kernels.cnr import STATUS

    ds = moment_results(seed=seed)
    monkeypatch.setattr(pooling, "_BLOCK", 64)  # NB: groups spread over several blocks
    out = pooling.aggregate(ds, by="site")
    site = pd.Series(ds["site"].values, dtype=object)
    present = sorted(site.dropna().unique())
    assert list(out["site"].values) == present and out.attrs["images_without_group"] == site.isna().sum()
    st = ds["status"].values
    for value in present:
        mask = (site == value).to_numpy()
        got = out.sel(site=value)
        assert int(got["n_images"]) == mask.sum()
        for j in range(3):
            use = mask & (ds["n_roi"].values[:, j] > 0) & (st[:, j] != STATUS["failed"]) & \
                (st[:, j] != STATUS["not-computed"])
            for side in ("roi", "bg"):
                n = ds[f"n_{side}"].values[use, j].astype(float)
                mean = ds[f"mean_{side}"].values[use, j]
                m2 = np.where(n > 1, ds[f"var_{side}"].values[use, j] * (n - 1), 0.0)
                total = n.sum()
                assert int(got[f"n_{side}"][j]) == total
                if total:
                    centre = (n * mean).sum() / total
                    np.testing.assert_allclose(float(got[f"mean_{side}"][j]), centre, rtol=1e-12)
                    if total > 1:
                        want = (m2.sum() + (n * (mean - centre) ** 2).sum()) / (total - 1)
                        np.testing.assert_allclose(float(got[f"var_{side}"][j]), want, rtol=1e-9)
            named = [x for x in ds["roi_name"].values[mask, j] if x]
            assert str(got["roi_name"][j].values) == (named[0] if named else "")
            if (mask & (st[:, j] == STATUS["not-computed"])).any():
                assert int(got["status"][j]) == STATUS["not-computed"]
            elif (mask & (st[:, j] == STATUS["failed"])).any():
                assert int(got["status"][j]) == STATUS["failed"]
        # the whole group's result equals aggregating its images alone
        alone = pooling.aggregate(ds.isel(image=np.flatnonzero(mask)), by="site")
        xr.testing.assert_allclose(got.drop_vars("site"), alone.isel(site=0).drop_vars("site"), rtol=1e-12)
