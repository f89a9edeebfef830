"""gpucnr.statistics.summarize: dataset-level CNR distributions, threshold fractions, Wilson intervals, outliers.

The expected values are computed here independently (pandas filtering and numpy on the long table, the
closed-form Wilson formula with published values) from small hand-made result Datasets built with xarray.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import gpucnr
from gpucnr.errors import InputError, OptionError
from gpucnr.phantom import make_phantom
from gpucnr.statistics import QUANTILES, WILSON_Z, summarize, wilson_interval

NAN = np.nan
Z = 1.959963984540054


def results_ds(cnr, status, cnr_median, n_valid, **columns) -> xr.Dataset:
    """A results Dataset of the shape DESIGN §6 gives, with per-image columns as coordinates along image."""
    cnr = np.asarray(cnr, np.float64)
    n, n_roi = cnr.shape
    coords = {"image": np.arange(n), "roi": np.arange(1, n_roi + 1)}
    coords.update({k: ("image", np.asarray(v, dtype=object)) for k, v in columns.items()})
    return xr.Dataset(
        {
            "cnr": (("image", "roi"), cnr),
            "status": (("image", "roi"), np.asarray(status, np.int8)),
            "cnr_median": (("image",), np.asarray(cnr_median, np.float64)),
            "n_valid": (("image",), np.asarray(n_valid, np.int64)),
            "n_excluded": (("image",), np.zeros(n, np.int64)),
        },
        coords=coords,
    )


# Ten images, three ROIs. Image 3: no valid ROI but a stale finite cnr_median (must read as NaN). Image 7:
# never computed (status -1, n_valid -1). Cell (1, 2) has status 4 with a finite cnr (must be left out);
# cell (5, 0) has status 0 and a NaN cnr (not finite: left out of the counts).
CNR = [
    [1.2, 0.4, NAN],
    [2.5, 3.1, 9.9],
    [0.9, NAN, 1.7],
    [NAN, NAN, NAN],
    [4.0, 1.5, 2.2],
    [NAN, 0.7, 1.1],
    [3.3, NAN, NAN],
    [NAN, NAN, NAN],
    [1.0, 2.0, 0.2],
    [0.6, 5.5, NAN],
]
STATUS = [
    [0, 0, 1],
    [0, 0, 4],
    [0, 1, 0],
    [4, 4, 1],
    [0, 0, 0],
    [0, 0, 0],
    [0, 1, 1],
    [-1, -1, -1],
    [0, 0, 0],
    [0, 0, 1],
]
N_VALID = [2, 2, 2, 0, 3, 3, 1, -1, 3, 2]
# The medians a run would store (over the status-0 cells; image 5 has one non-finite ok cell), except image 3.
CNR_MEDIAN = [0.8, 2.8, 1.3, 0.2, 2.2, 0.9, 3.3, NAN, 1.0, 3.05]
SITE = ["A", "B", "A", None, "B", "", "A", "B", NAN, "A"]
SPLIT = [0, 1, 0, 1, 0, 1, 0, 1, 0, 2]


@pytest.fixture
def hand() -> xr.Dataset:
    return results_ds(CNR, STATUS, CNR_MEDIAN, N_VALID, site=SITE, split=SPLIT)


def long_tables(ds: xr.Dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image and per-cell tables, the grouping columns normalised by hand ("(missing)" for NA and "")."""
    images = pd.DataFrame({
        "image": ds["image"].values,
        "value": ds["cnr_median"].values.astype(float),
        "n_valid": ds["n_valid"].values,
        "site": pd.Series(ds["site"].values, dtype=object),
        "split": ds["split"].values.astype(int),
    })
    images.loc[images["n_valid"] <= 0, "value"] = np.nan
    images["site"] = images["site"].where(images["site"].notna() & (images["site"] != ""), "(missing)")
    cells = pd.DataFrame({
        "image": np.repeat(ds["image"].values, ds.sizes["roi"]),
        "value": ds["cnr"].values.ravel(),
        "status": ds["status"].values.ravel(),
    })
    cells = cells[cells["status"] == 0].merge(images[["image", "site", "split"]], on="image")
    return images, cells


def expected_groups(ds) -> dict:
    """{(level, group label): (finite values, images in group, images with n_valid == 0)}."""
    images, cells = long_tables(ds)
    out = {}
    selections = [("all", np.ones(len(images), bool))]
    for col in ("site", "split"):
        for key in images[col].unique():
            selections.append((f"{col}={key}", (images[col] == key).to_numpy()))
    for label, mask in selections:
        img = images[mask]
        finite_img = img["value"][np.isfinite(img["value"])].to_numpy()
        roi = cells[cells["image"].isin(img["image"])]["value"]
        finite_roi = roi[np.isfinite(roi)].to_numpy()
        n_zero = int((img["n_valid"] == 0).sum())
        out["image", label] = (finite_img, len(img), n_zero)
        out["roi", label] = (finite_roi, len(img), n_zero)
    return out


def test_groups_layout_and_attrs(hand):
    s = summarize(hand, by=["site", "split"], bins=7)
    assert list(s["level"].values) == ["image", "roi"]
    assert list(s["group"].values) == ["all", "site=A", "site=B", "site=(missing)", "split=0", "split=1",
                                       "split=2"]
    assert list(s["group_by"].values) == ["all", "site", "site", "site", "split", "split", "split"]
    assert list(s["group_value"].values) == ["all", "A", "B", "(missing)", "0", "1", "2"]
    assert s["histogram"].dims == ("level", "group", "bin") and s.sizes["bin"] == 7 and s.sizes["edge"] == 8
    assert s["quantiles"].dims == ("level", "group", "quantile")
    assert s["fraction_below_low"].dims == ("level", "group", "threshold")
    assert s.attrs["thresholds"] == [1.0, 1.5, 2.0, 3.0] and s.attrs["by"] == ["site", "split"]
    # Image 3 (None), image 5 ("") and image 8 (NaN) are the missing group.
    assert int(s["n_images"].sel(group="site=(missing)")) == 3
    plain = summarize(hand, thresholds=[2.0, 1.0])
    assert list(plain["group"].values) == ["all"] and plain.attrs["by"] == []
    assert list(plain["threshold"].values) == [1.0, 2.0]


def test_summary_matches_pandas(hand):
    thresholds = (1.0, 1.5, 2.0, 3.0)
    s = summarize(hand, thresholds, by=["site", "split"], bins=6)
    expected = expected_groups(hand)
    assert {label for _, label in expected} == set(s["group"].values)
    _, cells = long_tables(hand)
    everything = np.concatenate([expected["image", "all"][0], expected["roi", "all"][0]])
    edges = np.linspace(everything.min(), everything.max(), 7)
    np.testing.assert_allclose(s["edge"].values, edges, rtol=0, atol=1e-12)
    for (level, label), (values, n_images, n_zero) in expected.items():
        cell = s.sel(level=level, group=label)
        assert int(cell["n_images"]) == n_images, (level, label)
        assert int(cell["n_no_valid_roi"]) == n_zero, (level, label)
        assert int(cell["count"]) == values.size, (level, label)
        if values.size == 0:
            assert np.isnan(cell["mean"]) and np.isnan(cell["quantiles"]).all()
            continue
        series = pd.Series(values)
        assert float(cell["mean"]) == pytest.approx(series.mean(), rel=1e-12)
        np.testing.assert_allclose(cell["quantiles"].values, series.quantile(list(QUANTILES)).to_numpy(),
                                   rtol=1e-12, atol=0)
        counts = [int(((values >= lo) & ((values < hi) | ((i == 5) & (values == hi)))).sum())
                  for i, (lo, hi) in enumerate(itertools.pairwise(edges))]
        assert cell["histogram"].values.tolist() == counts, (level, label)
        np.testing.assert_allclose(cell["ecdf"].values, [(values <= e).mean() for e in edges], rtol=1e-12)
        below = [int((values < t).sum()) for t in thresholds]
        assert cell["n_below"].values.tolist() == below, (level, label)
        np.testing.assert_allclose(cell["fraction_below"].values, np.array(below) / values.size, rtol=1e-12)
    # Spot checks written out by hand, in case the table helpers above share a mistake with the module.
    a = s.sel(group="all")
    assert int(a["count"].sel(level="image")) == 8  # 10 images - image 3 (n_valid 0) - image 7 (not computed)
    assert int(a["count"].sel(level="roi")) == 17  # 18 status-0 cells, one of them NaN
    assert int(a["n_no_valid_roi"].sel(level="image")) == 1
    assert int(a["n_not_computed"]) == 1
    assert float(a["quantiles"].sel(level="image", quantile=0.5)) == pytest.approx(np.median(
        [0.8, 2.8, 1.3, 2.2, 0.9, 3.3, 1.0, 3.05]))
    assert 9.9 not in cells["value"].to_numpy()  # the status-4 cell never enters


def test_status_and_n_valid_rules_change_the_result(hand):
    s = summarize(hand)
    # If the stale cnr_median (0.2) of image 3 (no valid ROI) were used, it would be the image minimum.
    assert float(s["quantiles"].sel(level="image", group="all", quantile=0.01)) >= 0.8
    assert float(s["edge"].max()) == 5.5  # 9.9 has status 4: not in the range
    assert float(s["ecdf"].sel(level="image", group="all").min()) == 0.0


def test_thresholds_are_strictly_less_than():
    values = [1.0, 1.5, 1.5, 2.0, 3.0]
    ds = results_ds(np.array(values)[:, None], np.zeros((5, 1)), values, np.ones(5))
    s = summarize(ds, thresholds=(1.0, 1.5, 2.0, 3.0, 3.5))
    for level in ("image", "roi"):
        assert s["n_below"].sel(level=level, group="all").values.tolist() == [0, 1, 3, 4, 5]
        np.testing.assert_allclose(s["fraction_below"].sel(level=level, group="all"), [0, 0.2, 0.6, 0.8, 1.0])
    low, high = wilson_interval([0, 1, 3, 4, 5], 5)
    np.testing.assert_array_equal(s["fraction_below_low"].sel(level="image", group="all"), low)
    np.testing.assert_array_equal(s["fraction_below_high"].sel(level="image", group="all"), high)


def _wilson_formula(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n", "published"), [
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (5, 10, (0.2366, 0.7634)),
    (81, 263, (0.2553, 0.3662)),
])
def test_wilson_known_values(k, n, published):
    assert WILSON_Z == Z
    by_formula = _wilson_formula(k, n)
    assert by_formula == pytest.approx(published, abs=5e-5)
    low, high = wilson_interval(k, n)
    assert (float(low), float(high)) == pytest.approx(by_formula, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0
    if k == 0:
        assert float(low) == 0.0
    if k == n:
        assert float(high) == 1.0


def test_wilson_bounds_exact_at_zero_and_all():
    # The closed formula leaves a rounding residue at k = 0 (n = 7, 9, 12, ...) and k = n (n = 10, 13, ...).
    n = np.arange(1, 200)
    low, _ = wilson_interval(0, n)
    _, high = wilson_interval(n, n)
    assert (low == 0.0).all() and (high == 1.0).all()


def test_wilson_vectorised_and_empty():
    low, high = wilson_interval(np.array([[0, 3], [2, 0]]), np.array([[4, 9], [2, 0]]))
    assert low.shape == high.shape == (2, 2)
    assert (float(low[0, 1]), float(high[0, 1])) == pytest.approx(_wilson_formula(3, 9), abs=1e-12)
    assert np.isnan(low[1, 1]) and np.isnan(high[1, 1])
    assert high[1, 0] == 1.0 and low[0, 0] == 0.0


def drifting(last_site_level: float) -> xr.Dataset:
    """Six sites of five images each, medians 1.9, 1.95, 2.0, 2.05, 2.1 and `last_site_level` (site F)."""
    centres = [1.9, 1.95, 2.0, 2.05, 2.1, last_site_level]
    values = np.concatenate([c + np.array([-0.02, -0.01, 0.0, 0.01, 0.02]) for c in centres])
    sites = np.repeat(list("ABCDEF"), 5)
    return results_ds(values[:, None], np.zeros((30, 1)), values, np.ones(30), site=sites)


def test_outlier_flags_a_drifting_site():
    ds = drifting(0.8)
    s = summarize(ds, by="site")
    for level in ("image", "roi"):
        flags = s["outlier"].sel(level=level)
        assert flags.sel(group="site=F").item()
        assert not flags.drop_sel(group="site=F").any()
    medians = np.array([np.median(ds["cnr_median"].values[i * 5:(i + 1) * 5]) for i in range(6)])
    centre = np.median(medians)
    mad = np.median(np.abs(medians - centre))
    assert mad == pytest.approx(0.075)  # the hand computation: centre 1.975, deviations .025 .025 .075 .075 ...
    np.testing.assert_allclose(s["outlier_score"].sel(level="image").values[1:],
                               np.abs(medians - centre) / (1.4826 * mad), rtol=1e-12)
    assert np.isnan(s["outlier_score"].sel(level="image", group="all"))
    assert not s["outlier"].sel(group="all").any()


def test_outlier_threshold_is_three_scaled_mads():
    # Site F at 2.305: centre 2.025, MAD 0.075, score 0.28 / (1.4826 x 0.075) = 2.52: beyond 2, within 3.
    s = summarize(drifting(2.305), by="site")
    score = float(s["outlier_score"].sel(level="image", group="site=F"))
    assert score == pytest.approx(0.28 / (1.4826 * 0.075), rel=1e-9)
    assert 2.0 < score < 3.0
    assert not s["outlier"].any()
    # ... and at 2.40 (score 3.37) it is flagged.
    assert summarize(drifting(2.40), by="site")["outlier"].sel(level="image", group="site=F").item()


def test_outlier_with_zero_mad_flags_any_deviation():
    values = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0])
    ds = results_ds(values[:, None], np.zeros((8, 1)), values, np.ones(8), site=list("AABBCCDD"))
    s = summarize(ds, by="site").sel(level="image")
    assert s["outlier"].values.tolist() == [False, False, False, False, True]
    assert s["outlier_score"].values[1:].tolist() == [0.0, 0.0, 0.0, math.inf]


def test_histogram_edges_span_both_levels():
    # summarize never recomputes medians: image values (0.5, 5.0) outside the ROI range (1..3) must still
    # fall inside the shared edges, and every finite value of each level lands in a bin.
    ds = results_ds([[1.0, 2.0], [3.0, 2.5]], np.zeros((2, 2)), [0.5, 5.0], [2, 2])
    s = summarize(ds, bins=9)
    assert s["edge"].values[0] == 0.5 and s["edge"].values[-1] == 5.0
    assert s["histogram"].sum("bin").values.tolist() == s["count"].values.tolist() == [[2], [4]]
    assert s["ecdf"].isel(edge=-1).values.tolist() == [[1.0], [1.0]]


def test_missing_group_spellings():
    # Missing values as they come back from Zarr text arrays ("nan", "None") and as Python/pandas missing.
    site = np.array(["A", "nan", None, pd.NA, "", "None", "A"], dtype=object)
    values = np.arange(1.0, 8.0)
    ds = results_ds(values[:, None], np.zeros((7, 1)), values, np.ones(7), site=site)
    s = summarize(ds, by="site")
    assert list(s["group"].values) == ["all", "site=A", "site=(missing)"]
    assert s["count"].sel(level="image").values.tolist() == [7, 2, 5]
    assert float(s["mean"].sel(level="image", group="site=A")) == 4.0


def test_no_valid_roi_anywhere_gives_nan_without_warnings():
    ds = results_ds(np.full((4, 2), NAN), np.full((4, 2), 4), np.full(4, NAN), np.zeros(4), site=list("aabb"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize(ds, by="site", bins=5)
    assert s["count"].values.sum() == 0
    assert s["n_no_valid_roi"].sel(level="image").values.tolist() == [4, 2, 2]
    assert s["n_no_valid_roi"].sel(level="roi").values.tolist() == [4, 2, 2]
    assert np.isnan(s["fraction_below"]).all() and np.isnan(s["fraction_below_high"]).all()
    assert s["histogram"].values.sum() == 0 and not s["outlier"].any()


def test_lazy_input_equals_eager(hand):
    eager = summarize(hand, by="site")
    lazy = summarize(hand.chunk({"image": 3}), by="site")
    xr.testing.assert_identical(eager, lazy)


def test_bad_arguments(hand):
    with pytest.raises(InputError, match="not a per-image column"):
        summarize(hand, by="scanner")
    with pytest.raises(InputError, match="not a per-image column"):
        summarize(hand, by="cnr")
    for bad in ([], [1.0, NAN], [math.inf]):
        with pytest.raises(OptionError):
            summarize(hand, thresholds=bad)
    for bad in (0, 2.5, True):
        with pytest.raises(OptionError):
            summarize(hand, bins=bad)
    with pytest.raises(InputError, match="lack"):
        summarize(hand.drop_vars("status"))
    with pytest.raises(InputError):
        summarize(42)


def test_end_to_end_measure_then_summarize():
    ph = make_phantom(20, (64, 64), lesions=3, radius=5, margin=6, cnr=(0.5, 4.0), seed=7)
    ds = gpucnr.measure(ph.images, ph.rois, backend="numpy")
    site = np.array(["north", "south", None, "north", "east"] * 4, dtype=object)
    ds = ds.assign_coords(site=("image", site))
    s = summarize(ds, by="site", bins=20)
    med = ds["cnr_median"].values
    ok = ds["status"].values == 0
    assert ok.sum() > 40  # the phantom's lesions are measurable: the check below is not vacuous
    image = s.sel(level="image", group="all")
    assert int(image["count"]) == np.isfinite(med).sum()
    assert float(image["quantiles"].sel(quantile=0.5)) == pytest.approx(np.median(med[np.isfinite(med)]), rel=1e-12)
    roi = s.sel(level="roi", group="all")
    cells = ds["cnr"].values[ok]
    assert int(roi["count"]) == np.isfinite(cells).sum()
    assert float(roi["quantiles"].sel(quantile=0.5)) == pytest.approx(np.median(cells[np.isfinite(cells)]))
    assert int(roi["histogram"].sum()) == int(roi["count"])
    north = site == "north"
    assert int(s["count"].sel(level="image", group="site=north")) == np.isfinite(med[north]).sum()
    assert float(s["n_below"].sel(level="roi", group="all", threshold=1.5)) == (cells < 1.5).sum()
    assert list(s["group"].values) == ["all", "site=east", "site=north", "site=south", "site=(missing)"]


def test_end_to_end_from_results_path(tmp_path):
    ph = make_phantom(12, (64, 64), lesions=2, radius=5, margin=6, seed=1)
    meta = pd.DataFrame({"site": ["a", "b", None, "a", "b", "", "a", "a", "b", "a", "b", "a"]})
    stack = gpucnr.write_stack(tmp_path / "s.zarr", ph.images, rois=ph.rois, meta=meta, shard=4)
    ds = gpucnr.run(stack, tmp_path / "r.zarr", backend="numpy", workers=2, group_columns=["site"]).load()
    s = summarize(tmp_path / "r.zarr", thresholds=[1.5], by="site")
    assert list(s["group"].values) == ["all", "site=a", "site=b", "site=(missing)"]
    assert s["n_images"].values.tolist() == [12, 6, 4, 2]
    med = ds["cnr_median"].values
    assert int(s["count"].sel(level="image", group="all")) == np.isfinite(med).sum() > 0
    assert float(s["quantiles"].sel(level="image", group="all", quantile=0.5)) == pytest.approx(
        np.median(med[np.isfinite(med)]), rel=1e-12)
    xr.testing.assert_identical(s, summarize(ds, thresholds=[1.5], by="site"))
