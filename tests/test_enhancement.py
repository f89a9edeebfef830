"""gpucnr.enhance: the low-CNR hook, checked against numpy on the results and scipy.ndimage by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage

import gpucnr
from gpucnr.backend import BackendUnavailableError, cupy_available
from gpucnr.enhancement import NOTE, enhance
from gpucnr.errors import InputError, OptionError
from gpucnr.kernels.params import Params
from gpucnr.phantom import make_phantom

# NB: not the defaults, so a re-measurement with default parameters would fail the comparison.
RUN = {"dilation": 3, "border": 3, "ddof": 0, "min_bg": 20}
N = 12


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 12-image uint16 phantom (CNR 0.3..3, so both sides of 1.5), non-default slope/intercept, and its run."""
    root = tmp_path_factory.mktemp("enh")
    ph = make_phantom(N, (80, 80), lesions=1, radius=6, cnr=(0.3, 3.0), noise=20.0, dtype="uint16", seed=3)
    meta = pd.DataFrame({"slope": np.where(np.arange(N) % 2, 2.0, 1.0),
                         "intercept": np.where(np.arange(N) % 3, -7.0, 0.0),
                         "patient_id": [f"p{i // 3}" for i in range(N)]})
    # NB: one low-CNR image loses its ROI row: flagged ("no valid roi"), it must not be enhanced.
    lost = int(np.flatnonzero(ph.cnr[:, 0] < 1.0)[0])
    rois = ph.rois[ph.rois["image"] != lost]
    stack = gpucnr.write_stack(root / "stack.zarr", ph.images, labels=ph.labels, rois=rois, meta=meta, shard=4,
                               key_file=root / "stack.key")
    # NB: the labels are the lesions the table's ROIs lie in (same ids): the table is the ROI source
    results = gpucnr.run(stack, root / "results.zarr", roi_source="table", **RUN)
    cnr = np.asarray(results["cnr_median"].values)
    assert np.isnan(cnr[lost]) and int(results["n_valid"].values[lost]) == 0
    below = np.asarray(results["image"].values)[cnr < 1.5]
    assert 0 < len(below) < N, "the phantom must have images on both sides of the threshold"
    return root, stack, results


@pytest.fixture(scope="module")
def median(source):
    root, _, _ = source
    return enhance(root / "results.zarr", root / "median", method="median", size=3, backend="numpy")


@pytest.fixture(scope="module")
def gaussian(source):
    root, _, _ = source
    return enhance(root / "results.zarr", root / "gaussian", method="gaussian", sigma=1.5, backend="numpy")


def _by_hand(stack, index: int) -> np.ndarray:
    """The stored pixels of global image `index`, as float64, by hand from the stack."""
    row = stack.images.set_index("index").loc[index]
    bucket = next(b for b in stack.buckets if b.name == row["bucket"])
    img, _ = stack.read(bucket, int(row["position"]), int(row["position"]) + 1, labels=False)
    return img[0, : int(row["valid_h"]), : int(row["valid_w"])].astype(np.float64)


def _enhanced_pixels(new, index: int) -> np.ndarray:
    row = new.images.set_index("original_index").loc[index]
    bucket = next(b for b in new.buckets if b.name == row["bucket"])
    img, _ = new.read(bucket, int(row["position"]), int(row["position"]) + 1, labels=False)
    return img[0, : int(row["valid_h"]), : int(row["valid_w"])]


@pytest.mark.parametrize("which", ["median", "gaussian"])
def test_exactly_the_images_below_threshold(source, which, request):
    _, _, results = source
    ds = request.getfixturevalue(which)
    cnr = np.asarray(results["cnr_median"].values)
    expected = np.asarray(results["image"].values)[cnr < 1.5]
    np.testing.assert_array_equal(ds["image"].values, np.sort(expected))
    np.testing.assert_array_equal(ds["cnr_before"].values, cnr[np.sort(expected)])
    assert set(ds.data_vars) == {"cnr_before", "cnr_after", "delta"}


def test_median_pixels_equal_scipy(source, median):
    root, stack, _ = source
    new = gpucnr.open_stack(root / "median" / "enhanced.zarr")
    index = int(median["image"].values[-1])
    got = _enhanced_pixels(new, index)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, scipy.ndimage.median_filter(_by_hand(stack, index), size=3))
    # NB: the filter did something: a median of noise is not the noise.
    assert not np.array_equal(got, _by_hand(stack, index))


def test_gaussian_pixels_equal_scipy(source, gaussian):
    root, stack, _ = source
    new = gpucnr.open_stack(root / "gaussian" / "enhanced.zarr")
    index = int(gaussian["image"].values[0])
    got = _enhanced_pixels(new, index)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, scipy.ndimage.gaussian_filter(_by_hand(stack, index), sigma=1.5))
    # NB: stored unrounded: a Gaussian of integers has fractional values.
    assert np.any(got != np.rint(got))


@pytest.mark.parametrize("which", ["median", "gaussian"])
def test_denoising_raises_cnr(source, which, request):
    root, _, _ = source
    ds = request.getfixturevalue(which)
    after = gpucnr.open_results(root / which / "results.zarr")
    np.testing.assert_array_equal(ds["cnr_after"].values, after["cnr_median"].values[ds["enhanced_index"].values])
    np.testing.assert_array_equal(ds["delta"].values, ds["cnr_after"].values - ds["cnr_before"].values)
    assert np.all(np.isfinite(ds["cnr_after"].values))
    assert ds["cnr_after"].mean() > ds["cnr_before"].mean()
    assert ds.attrs["note"] == NOTE and "without adding information" in NOTE


@pytest.mark.parametrize("which", ["median", "gaussian"])
def test_remeasured_with_the_same_parameters(source, which, request):
    root, _, results = source
    ds = request.getfixturevalue(which)
    after = gpucnr.open_results(root / which / "results.zarr")
    for key in Params().as_attrs():
        assert after.attrs[key] == results.attrs[key], key
        assert ds.attrs[key] == results.attrs[key], key
    assert after.attrs["roi_source"] == results.attrs["roi_source"] == "table"
    assert {k: after.attrs[k] for k in RUN} == RUN
    assert ds.attrs["method"] == which and ds.attrs["threshold"] == 1.5 and ds.attrs["dtype"] == "float64"
    assert ("size" in ds.attrs) == (which == "median") and ("sigma" in ds.attrs) == (which == "gaussian")


def test_original_index_mapping(source, median):
    root, stack, _ = source
    new = gpucnr.open_stack(root / "median" / "enhanced.zarr")
    table = new.images.set_index("index")
    np.testing.assert_array_equal(table.loc[median["enhanced_index"].values, "original_index"].to_numpy(),
                                  median["image"].values)
    old = stack.images.set_index("index").loc[median["image"].values]
    for col in ("slope", "intercept", "padding", "photometric", "patient_id"):
        np.testing.assert_array_equal(table.loc[median["enhanced_index"].values, col].to_numpy(), old[col].to_numpy())
    # NB: the ROI rows follow their image: same disk, new global index.
    rois = new.rois.merge(new.images[["index", "original_index"]], left_on="image", right_on="index")
    orig = stack.rois[stack.rois["image"].isin(median["image"].values)]
    merged = rois.merge(orig, left_on=["original_index", "roi"], right_on=["image", "roi"], suffixes=("", "_old"))
    assert len(merged) == len(orig) == len(new.rois) == median.sizes["image"]
    for col in ("cx", "cy", "r", "kind"):
        np.testing.assert_array_equal(merged[col].to_numpy(), merged[f"{col}_old"].to_numpy())
    # NB: the labels travel too.
    row = table.loc[int(median["enhanced_index"].values[0])]
    bucket = next(b for b in new.buckets if b.name == row["bucket"])
    _, lab = new.read(bucket, int(row["position"]), int(row["position"]) + 1)
    o = stack.images.set_index("index").loc[int(median["image"].values[0])]
    ob = next(b for b in stack.buckets if b.name == o["bucket"])
    _, olab = stack.read(ob, int(o["position"]), int(o["position"]) + 1)
    np.testing.assert_array_equal(lab, olab)


@pytest.mark.parametrize("kwargs", [{"method": "wiener"}, {"method": "median", "size": 0},
                                    {"method": "median", "size": 2.5}, {"method": "median", "size": True},
                                    {"method": "gaussian", "sigma": -1.0}, {"method": "gaussian", "sigma": math.nan},
                                    {"method": "gaussian", "sigma": "1"}, {"threshold": math.nan}])
def test_bad_options(source, tmp_path, kwargs):
    root, _, _ = source
    with pytest.raises(OptionError):
        enhance(root / "results.zarr", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_nothing_below_threshold(source, tmp_path):
    root, _, _ = source
    ds = enhance(root / "results.zarr", tmp_path / "out", threshold=0.0)
    assert set(ds.data_vars) == {"cnr_before", "cnr_after", "delta"}
    assert ds.sizes["image"] == 0 and ds.attrs["threshold"] == 0.0
    assert not (tmp_path / "out").exists()


def test_stack_argument_and_checks(source, tmp_path):
    root, stack, results = source
    with pytest.raises(InputError, match="stack="):
        enhance(results, tmp_path / "a", threshold=1.0)
    ds = enhance(results, tmp_path / "b", threshold=1.0, stack=stack, backend="numpy")
    assert ds.sizes["image"] == int((results["cnr_median"].values < 1.0).sum()) > 0
    other = gpucnr.write_stack(tmp_path / "other.zarr", make_phantom(2, (80, 80), seed=9).images,
                               rois=make_phantom(2, (80, 80), seed=9).rois)
    with pytest.raises(InputError, match="not the stack"):
        enhance(results, tmp_path / "c", threshold=1.0, stack=other)
    with pytest.raises(InputError, match="already exists"):
        enhance(root / "results.zarr", root / "median")


def test_cupy_backend(source, tmp_path, median):
    root, _, _ = source
    if not cupy_available():
        with pytest.raises(BackendUnavailableError):
            enhance(root / "results.zarr", tmp_path / "gpu", backend="cupy")
        return
    ds = enhance(root / "results.zarr", tmp_path / "gpu", backend="cupy")
    assert ds.attrs["backend"] == "cupy"
    np.testing.assert_array_equal(ds["image"].values, median["image"].values)
    got = gpucnr.open_stack(tmp_path / "gpu" / "enhanced.zarr")
    ref = gpucnr.open_stack(root / "median" / "enhanced.zarr")
    for i in ds["image"].values:
        np.testing.assert_array_equal(_enhanced_pixels(got, int(i)), _enhanced_pixels(ref, int(i)))


def test_padding_pixels_keep_their_value(tmp_path):
    ph = make_phantom(4, (80, 80), cnr=(0.3, 1.0), seed=5)
    images = ph.images.copy()
    images[:, :, :8] = 0
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, rois=ph.rois, meta=pd.DataFrame({"padding": [0.0] * 4}))
    gpucnr.run(stack, tmp_path / "r.zarr")
    ds = enhance(tmp_path / "r.zarr", tmp_path / "out", method="gaussian", sigma=2.0, backend="numpy")
    assert ds.sizes["image"] == 4 and np.all(np.isfinite(ds["cnr_after"].values))
    new = gpucnr.open_stack(tmp_path / "out" / "enhanced.zarr")
    assert np.all(new.images["padding"].to_numpy() == 0.0)
    for i in ds["image"].values:
        got = _enhanced_pixels(new, int(i))
        np.testing.assert_array_equal(got[:, :8], 0.0)
        ref = scipy.ndimage.gaussian_filter(_by_hand(stack, int(i)), sigma=2.0)
        np.testing.assert_array_equal(got[:, 8:], ref[:, 8:])


def test_a_rule_enhances_what_filter_drops(source, tmp_path):
    root, _, results = source
    # NB: 11 usable images: a 25 % quantile (needs 4) cuts, per patient_id group of 3 it does not
    ds = enhance(root / "results.zarr", tmp_path / "q", rule="quantile:0.25", backend="numpy")
    m = gpucnr.manifest(results, rule="quantile:0.25")
    cnr = np.asarray(results["cnr_median"].values)
    usable = np.isfinite(cnr)
    expected = np.asarray(results["image"].values)[usable & (cnr < np.quantile(cnr[usable], 0.25))]
    assert len(expected) and list(ds["image"].values) == sorted(m.loc[m["decision"] == "drop", "image"])
    np.testing.assert_array_equal(ds["image"].values, np.sort(expected))
    assert ds.attrs["rule"] == "quantile:0.25" and math.isnan(ds.attrs["threshold"])
    none = enhance(root / "results.zarr", tmp_path / "p", rule="quantile:0.25", by="patient_id")
    assert none.sizes["image"] == 0 and not (tmp_path / "p").exists()
    with pytest.raises(gpucnr.InputError, match="not both"):
        enhance(root / "results.zarr", tmp_path / "x", threshold=1.0, rule="mad:3")


def test_both_sources_with_chosen_images_labelled_only(tmp_path):
    """Results of both sources (labels and an ROI table, other ids) where every image enhance chooses has label
    cells only: the new stack has no ROI table, so it is re-measured by its labels (it was refused: "--roi-source
    both: ... has no ROI table", and the half-written stack was left behind)."""
    ph = make_phantom(8, (80, 80), lesions=1, radius=6, cnr=(0.3, 3.0), noise=20.0, dtype="uint16", seed=4)
    high = np.flatnonzero(ph.cnr[:, 0] >= 1.5)
    table = ph.rois[ph.rois["image"].isin(high)].assign(roi=100, kind="square", r=3)
    stack = gpucnr.write_stack(tmp_path / "stack.zarr", ph.images, labels=ph.labels, rois=table)
    results = gpucnr.run(stack, tmp_path / "results.zarr", backend="numpy")
    assert results.attrs["roi_source"] == "both"
    ds = enhance(tmp_path / "results.zarr", tmp_path / "out", threshold=1.5, backend="numpy")
    assert ds.sizes["image"] > 0 and not set(ds["image"].values) & set(high)
    after = gpucnr.open_results(tmp_path / "out" / "results.zarr")
    assert after.attrs["roi_source"] == "labels" and np.isfinite(ds["cnr_after"].values).all()


def test_a_failure_after_writing_began_leaves_nothing(source, tmp_path, monkeypatch):
    """A refusal raised once the new stack is written (here: by the re-measurement) removes both outputs: exit 2
    means nothing was written, and the same command can start again."""
    import gpucnr.enhancement as enhancement

    root, _, _ = source

    def refused(*a, **k):
        raise InputError("refused for the test")

    monkeypatch.setattr(enhancement, "run", refused)
    with pytest.raises(InputError, match="refused for the test"):
        enhance(root / "results.zarr", tmp_path / "out", backend="numpy")
    assert not (tmp_path / "out" / "enhanced.zarr").exists() and not (tmp_path / "out" / "results.zarr").exists()
    monkeypatch.undo()
    assert enhance(root / "results.zarr", tmp_path / "out", backend="numpy").sizes["image"] > 0
