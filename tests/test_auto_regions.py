"""rois="auto": Otsu on the backend, the automatic regions, their CNR on phantoms, statuses, mriqc, the CLI."""

from __future__ import annotations

import math

import array_api_compat
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import host

import gpucnr
from gpucnr.cli import main
from gpucnr.errors import InputError, OptionError
from gpucnr.kernels import STATUS
from gpucnr.kernels.params import Params
from gpucnr.kernels.regions import (
    REGION_AIR,
    REGION_LOWER,
    REGION_UPPER,
    find_regions,
    histograms,
    measure_auto,
    otsu_thresholds,
)
from gpucnr.phantom import make_body_phantom, make_phantom

skimage_filters = pytest.importorskip("skimage.filters")
NOT_FOUND = STATUS["region-not-found"]


def _random_images(seed: int, count: int):
    """Random float images of the shapes and distributions Otsu meets: normal, uniform, two- and three-mode
    mixtures, of 20x20 to 90x90 pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        h, w = (int(v) for v in rng.integers(20, 90, 2))
        size = h * w
        kind = k % 4
        if kind == 0:
            v = rng.normal(rng.uniform(-50, 50), rng.uniform(0.1, 30), size)
        elif kind == 1:
            v = rng.uniform(-5, 5, size) ** 3
        else:
            parts = np.array_split(np.arange(size), kind)
            v = np.concatenate([rng.normal(rng.uniform(0, 10), rng.uniform(0.3, 2), len(p)) for p in parts])
        out.append(v.reshape(h, w))
    return out


def _thresholds(xp, image, classes):
    values = xp.asarray(np.asarray(image, np.float64)[None])
    counts, edges, ok = histograms(xp, values, xp.ones(values.shape, dtype=xp.bool))
    assert bool(host(ok)[0])
    return host(otsu_thresholds(xp, counts, edges, classes))[0]


def test_histograms_are_numpy_histograms(xp):
    for image in _random_images(1, 12):
        values = xp.asarray(image[None])
        counts, edges, _ = histograms(xp, values, xp.ones(values.shape, dtype=xp.bool))
        want, want_edges = np.histogram(image, 256)
        assert np.array_equal(host(counts)[0], want)
        assert np.array_equal(host(edges)[0], want_edges)


def test_otsu_two_classes_equals_skimage(xp):
    """Reference: skimage.filters.threshold_otsu (scikit-image 0.26), its 256-bin histogram of a float image."""
    for image in _random_images(2, 40):
        assert _thresholds(xp, image, 2)[0] == skimage_filters.threshold_otsu(image)


def test_otsu_three_classes_equals_skimage(xp):
    """Reference: skimage.filters.threshold_multiotsu(image, classes=3) (scikit-image 0.26); the first maximum wins
    ties in both (lexicographic order of the two split bins)."""
    for image in _random_images(3, 40):
        assert np.array_equal(_thresholds(xp, image, 3), skimage_filters.threshold_multiotsu(image, classes=3))


def _textbook_multiotsu(image):
    """Three-class Otsu written out: every split (i, j) of the 256 bins, the between-class variance sum(S**2 / W)
    over the classes (S the sum of count * bin index, 0 for an empty class), the first maximum kept."""
    counts, edges = np.histogram(image, 256)
    p = counts.astype(np.float64)
    k = np.arange(256.0)
    best, pair = -np.inf, None
    for i in range(254):
        for j in range(i + 1, 255):
            score = 0.0
            for lo, hi in ((0, i), (i + 1, j), (j + 1, 255)):
                w = p[lo : hi + 1].sum()
                score += (p[lo : hi + 1] * k[lo : hi + 1]).sum() ** 2 / w if w > 0 else 0.0
            if score > best:
                best, pair = score, (i, j)
    centres = (edges[:-1] + edges[1:]) / 2
    return centres[list(pair)]


def test_otsu_ties_go_to_the_first_maximum(xp):
    # Four equal spikes: every split of two spikes a side is equally good (two classes); so is every three-class
    # split that keeps two neighbouring spikes together (sums of integers: the ties are exact).
    image = np.repeat([0.0, 1.0, 2.0, 3.0], 50).reshape(10, 20)
    assert _thresholds(xp, image, 2)[0] == skimage_filters.threshold_otsu(image)
    got = _thresholds(xp, image, 3)
    assert np.array_equal(got, _textbook_multiotsu(image))
    assert got[0] < 1.0 < got[1] < 2.0  # the first of the tied splits in (i, j) order: {0}, {1}, {2, 3}


def test_three_classes_weigh_the_first_bin_by_its_value(xp):
    """scikit-image's multi-Otsu counts the first bin's pixels at value 1 in the first moment (its
    ``first_moment[0] = prob[0]``; scikit-image PRs #6596 and #8252 propose the fix): where that bin holds much of
    the data the two can differ. gpucnr weighs it 0, as the textbook (and skimage's own threshold_otsu) does."""
    image = np.random.default_rng(6).exponential(3.0, (60, 60))
    want = _textbook_multiotsu(image)
    assert np.array_equal(_thresholds(xp, image, 3), want)
    assert not np.array_equal(skimage_filters.threshold_multiotsu(image, classes=3), want)


# --- regions --------------------------------------------------------------------------------------------------------
def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.mark.parametrize("cnr", [10.0, 5.0, 3.0])
def test_phantom_regions_have_dice_above_095(cnr):
    ph = make_body_phantom(4, (128, 128), tissue_cnr=cnr, seed=11)
    exact = gpucnr.auto_regions(ph.images, edge=0, backend="numpy")
    banded = gpucnr.auto_regions(ph.images, backend="numpy")
    for i in range(len(ph.images)):
        for value in (REGION_AIR, REGION_LOWER, REGION_UPPER):
            assert _dice(exact[i] == value, ph.regions[i] == value) >= 0.95, (cnr, i, value)
        assert _dice(exact[i] >= 2, ph.regions[i] >= 3) >= 0.95
        # with the 2-px band: every pixel kept lies in its true region
        for value in (REGION_AIR, REGION_LOWER, REGION_UPPER):
            kept = banded[i] == value
            assert np.count_nonzero(kept & (ph.regions[i] != value)) <= 0.01 * np.count_nonzero(kept), (cnr, i)


def test_region_masks_are_identical_on_every_backend(xp):
    ph = make_body_phantom(3, (96, 96), tissue_cnr=4, seed=5, dtype="uint16")
    images = np.concatenate([ph.images, make_body_phantom(1, (96, 96), with_air=False, seed=6,
                                                          dtype="uint16").images])
    valid_h = np.array([96, 90, 96, 96])
    padding = np.array([np.nan, np.nan, 100.0, np.nan])
    ref, found_ref = find_regions(array_api_compat.array_namespace(images), images, valid_h=valid_h, padding=padding)
    got, found = find_regions(xp, xp.asarray(images), valid_h=xp.asarray(valid_h), padding=xp.asarray(padding))
    assert array_api_compat.array_namespace(got) is array_api_compat.array_namespace(xp.asarray(images))
    assert np.array_equal(host(got), host(ref))
    for k in found_ref:
        assert np.array_equal(host(found[k]), host(found_ref[k]))
    assert host(found["air"]).tolist() == [True, True, True, False]


def test_auto_measurements_agree_on_every_backend_and_path(xp):
    ph = make_body_phantom(3, (80, 80), tissue_cnr=5, seed=7, dtype="uint16")
    np_xp = array_api_compat.array_namespace(ph.images)
    ref = measure_auto(np_xp, ph.images, params=Params(), fast=False)
    for fast in (True, False):
        out = measure_auto(xp, xp.asarray(ph.images), params=Params(), fast=fast)
        for k, v in ref.items():
            np.testing.assert_allclose(host(out[k]), host(v), rtol=1e-12, err_msg=k)


def test_dask_and_xarray_inputs_measure_the_same_auto_regions():
    ph = make_body_phantom(6, (64, 64), tissue_cnr=5, seed=8)
    ref = gpucnr.measure(ph.images, "auto", backend="numpy")
    lazy = gpucnr.measure(da.from_array(ph.images, chunks=(2, 64, 64)), "auto", backend="numpy")
    for k in ("cnr", "status", "n_roi", "n_bg", "n_air", "mean_air", "var_air", "noise_source", "cnr_median"):
        np.testing.assert_array_equal(lazy[k].values, ref[k].values, err_msg=k)
    regions = gpucnr.auto_regions(da.from_array(ph.images, chunks=(2, 64, 64)), backend="numpy")
    assert isinstance(regions, da.Array)
    assert np.array_equal(regions.compute(), gpucnr.auto_regions(ph.images, backend="numpy"))


def test_monochrome1_uses_the_display_polarity():
    ph = make_body_phantom(2, (64, 64), tissue_cnr=5, seed=9, dtype="uint16")
    inverted = (4000 - ph.images.astype(np.int64)).astype(np.uint16)
    arr = xr.DataArray(inverted, dims=("image", "y", "x"),
                       coords={"photometric": ("image", ["MONOCHROME1", "MONOCHROME1"])})
    assert np.array_equal(gpucnr.auto_regions(arr, backend="numpy"), gpucnr.auto_regions(ph.images, backend="numpy"))
    plain = gpucnr.auto_regions(inverted, backend="numpy")
    assert not np.array_equal(plain, gpucnr.auto_regions(ph.images, backend="numpy"))
    a = gpucnr.measure(arr, "auto", backend="numpy")
    b = gpucnr.measure(ph.images, "auto", backend="numpy")
    np.testing.assert_allclose(a["cnr"].values, b["cnr"].values, rtol=1e-12)


def test_auto_regions_keep_the_input_namespace(xp):
    ph = make_body_phantom(1, (48, 48), seed=1)
    regions = gpucnr.auto_regions(xp.asarray(ph.images))
    assert array_api_compat.array_namespace(regions) is array_api_compat.array_namespace(xp.asarray(ph.images))
    assert regions.dtype == xp.int8 and tuple(regions.shape) == (1, 48, 48)
    assert set(np.unique(host(regions)).tolist()) == {0, 1, 2, 3, 4}


# --- CNR on phantoms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cnr", [10.0, 7.0, 5.0, 4.0, 3.0])
def test_tissue_cnr_is_within_5_percent_of_the_analytic_value(cnr):
    ph = make_body_phantom(3, (256, 256), tissue_cnr=cnr, seed=12)
    ds = gpucnr.measure(ph.images, "auto", backend="numpy")
    assert (ds["status"].values == 0).all()
    got = ds["cnr"].sel(roi=2).values
    assert np.all(np.abs(got / ph.tissue_cnr - 1) <= 0.05), got / ph.tissue_cnr
    # the foreground: the body (a mixture of the two tissues) against the air, as the kept regions make it
    kept = gpucnr.auto_regions(ph.images, backend="numpy") > 0
    np.testing.assert_allclose(ds["cnr"].sel(roi=1).values, ph.foreground_cnr(kept), rtol=0.05)


def test_auto_cnr_falls_as_noise_rises():
    # NB: true tissue CNR 26.5 down to 1.3; further up the tissue classes dissolve (region-not-found)
    sigma = np.geomspace(4.0, 80.0, 8)
    ph = make_body_phantom(len(sigma), (128, 128), body_contrast=150.0, noise=sigma, air=0.0, lower=400.0,
                           same_anatomy=True, seed=13)
    ds = gpucnr.measure(ph.images, "auto", backend="numpy")
    assert (ds["status"].values == 0).all()
    for name in ("cnr",):
        for roi in (1, 2):
            assert np.all(np.diff(ds[name].sel(roi=roi).values) < 0), (roi, ds[name].sel(roi=roi).values)
    assert np.all(np.diff(ds["cnr_median"].values) < 0)


def test_overlapping_classes_bias_the_tissue_cnr_upwards_as_documented():
    """docs/choosing.md, "Otsu's bias": the measured bias of the tissue CNR below a true CNR of 3 (256 x 256
    phantoms, scripts/choosing.py): about +1 % at 1 and +7 % at 0.5, where thresholds alone give +87 % and +273 %."""
    for cnr, low, high in ((1.0, -0.03, 0.06), (0.5, 0.0, 0.2)):
        ph = make_body_phantom(3, (256, 256), tissue_cnr=cnr, seed=14)
        ds = gpucnr.measure(ph.images, "auto", backend="numpy")
        bias = float(np.mean(ds["cnr"].sel(roi=2).values / ph.tissue_cnr)) - 1
        assert low < bias < high, (cnr, bias)


# --- statuses -----------------------------------------------------------------------------------------------------
def test_images_without_air_constant_tiny_or_empty_get_statuses_never_exceptions():
    rng = np.random.default_rng(0)
    patch = make_body_phantom(1, (64, 64), tissue_cnr=6.0, with_air=False, seed=3)
    cases = {
        "no air": (patch.images[0], [NOT_FOUND, 0]),
        "constant": (np.full((40, 40), 7.0), [NOT_FOUND, NOT_FOUND]),
        "constant integers": (np.zeros((40, 40), np.uint8), [NOT_FOUND, NOT_FOUND]),
        "tiny": (rng.normal(0, 1, (3, 3)), [NOT_FOUND, NOT_FOUND]),
        "one pixel": (np.ones((1, 1)), [NOT_FOUND, NOT_FOUND]),
        "not finite": (np.full((16, 16), np.nan), [NOT_FOUND, NOT_FOUND]),
        "all air": (rng.normal(0, 1, (64, 64)), [NOT_FOUND, NOT_FOUND]),
    }
    for name, (image, want) in cases.items():
        ds = gpucnr.measure(image, "auto", backend="numpy")
        assert ds["status"].values[0].tolist() == want, name
        assert ds["roi_name"].values[0].tolist() == ["foreground", "tissue"]
        assert np.isnan(ds["cnr"].values[0][np.array(want) != 0]).all()
    ds = gpucnr.measure(patch.images, "auto", backend="numpy")
    assert ds["noise_source"].values.tolist() == ["tissue"] and ds["n_air"].values.tolist() == [0]
    np.testing.assert_allclose(ds["cnr"].sel(roi=2).values, patch.tissue_cnr, rtol=0.05)
    assert ds["cnr_median"].values[0] == ds["cnr"].values[0, 1]


def test_an_image_of_air_alone_keeps_its_air_moments():
    rng = np.random.default_rng(1)
    image = rng.normal(10.0, 2.0, (1, 64, 64))
    image[0, 30:33, 30:33] += 100  # a speck of signal: no body worth the name
    ds = gpucnr.measure(image, "auto", backend="numpy")
    assert ds["status"].values.tolist() == [[NOT_FOUND, NOT_FOUND]]
    regions = gpucnr.auto_regions(image, backend="numpy")
    air = image[regions == REGION_AIR]
    assert int(ds["n_air"].values[0]) == air.size > 0
    np.testing.assert_allclose(ds["var_air"].values[0], air.var(ddof=1), rtol=1e-12)


# --- mriqc -----------------------------------------------------------------------------------------------------
def test_mriqc_follows_the_published_formula():
    """MRIQC's CNR (Magnotta & Friedman 2006, as MRIQC computes it): |mu_WM - mu_GM| / sqrt(sigma_air^2 + sigma_WM^2
    + sigma_GM^2); here the two tissue classes of the automatic regions and their air, with ddof=1."""
    ph = make_body_phantom(3, (128, 128), tissue_cnr=5, seed=15)
    images = np.concatenate([ph.images, make_body_phantom(1, (128, 128), tissue_cnr=5, with_air=False,
                                                          seed=16).images])
    ds = gpucnr.measure(images, "auto", definition="mriqc", backend="numpy")
    pooled = gpucnr.measure(images, "auto", backend="numpy")
    regions = gpucnr.auto_regions(images, backend="numpy")
    for i in range(len(images)):
        up, lo, air = (images[i][regions[i] == v].astype(np.float64) for v in (REGION_UPPER, REGION_LOWER, REGION_AIR))
        noise = up.var(ddof=1) + lo.var(ddof=1) + (air.var(ddof=1) if air.size else 0.0)
        np.testing.assert_allclose(ds["cnr"].values[i, 1], abs(up.mean() - lo.mean()) / math.sqrt(noise), rtol=1e-9)
    # the foreground's background is the air: counted once, the pooled formula
    np.testing.assert_allclose(ds["cnr"].values[:3, 0], pooled["cnr"].values[:3, 0], rtol=1e-12)
    assert ds["noise_source"].values.tolist() == ["air+tissue"] * 3 + ["tissue"]
    assert ds["status"].values[3].tolist() == [NOT_FOUND, 0]
    np.testing.assert_allclose(ds["cnr"].values[3, 1], pooled["cnr"].values[3, 1], rtol=1e-12)
    np.testing.assert_allclose(ds["cnr"].values[:3, 1], ph.mriqc_cnr, rtol=0.05)
    assert ds.attrs["definition"] == "mriqc" and ds.attrs["roi_source"] == "auto"


def test_mriqc_signed_keeps_the_sign_and_polarity():
    ph = make_body_phantom(1, (96, 96), tissue_cnr=5, seed=17)
    a = gpucnr.measure(ph.images, "auto", definition="mriqc", signed=True, backend="numpy")
    assert (a["cnr"].values > 0).all()


def test_mriqc_is_not_poolable():
    # NB: MRIQC's noise term holds each image's own air variance, which pooled ROI/background moments lack
    ph = make_body_phantom(4, (96, 96), tissue_cnr=5, seed=3)
    ds = gpucnr.measure(ph.images, "auto", definition="mriqc", backend="numpy")
    ds = ds.assign_coords(case=("image", ["a", "a", "b", "b"]))
    assert (ds["status"].values == STATUS["ok"]).any()
    pooled = gpucnr.aggregate(ds, by="case")
    ok_somewhere = (ds["status"].values == STATUS["ok"]).reshape(2, 2, -1).any(axis=1)
    assert (pooled["status"].values[ok_somewhere] == STATUS["not-poolable"]).all()
    assert np.isnan(pooled["cnr"].values).all()


def test_options_that_contradict_the_automatic_regions_are_coded_errors():
    ph = make_phantom(2, (64, 64), seed=0)
    with pytest.raises(OptionError, match="mriqc"):
        gpucnr.measure(ph.images, ph.labels, definition="mriqc", backend="numpy")
    with pytest.raises(OptionError, match="background"):
        gpucnr.measure(ph.images, "auto", background="ring", backend="numpy")
    with pytest.raises(OptionError, match="footprint='disk', dilation=9"):
        gpucnr.measure(ph.images, "auto", footprint="disk", dilation=9, backend="numpy")
    with pytest.raises(OptionError, match="border=3"):
        gpucnr.measure(ph.images, "auto", border=3, backend="numpy")
    with pytest.raises(OptionError, match="edge"):
        gpucnr.measure(ph.images, ph.labels, edge=3, backend="numpy")
    with pytest.raises(OptionError):
        gpucnr.measure(ph.images, "auto", edge=-1, backend="numpy")
    with pytest.raises(InputError, match="labels"):
        gpucnr.measure(ph.images, "auto", labels=ph.labels, backend="numpy")
    with pytest.raises(InputError):
        gpucnr.measure(ph.images, "autox", backend="numpy")


# --- run, results and the command line -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    from dicomfactory import write_dicom

    root = tmp_path_factory.mktemp("auto_dicom")
    ph = make_body_phantom(6, (64, 64), tissue_cnr=(4, 8), seed=21, dtype="uint16")
    for i, image in enumerate(ph.images):
        if i == 5:
            # the same anatomy stored inverted, displayed as MONOCHROME1
            write_dicom(root / "src" / f"{i}.dcm", (4000 - image.astype(np.int64)).astype(np.uint16),
                        photometric="MONOCHROME1", modality="DX")
        else:
            write_dicom(root / "src" / f"{i}.dcm", image, modality="MR" if i % 2 else "CT")
    return root, ph


def _coded(capsys, argv, code):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code, argv
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured


def test_cli_rois_auto_end_to_end(dicom_dir, tmp_path, capsys, monkeypatch):
    root, ph = dicom_dir
    stack, results = tmp_path / "stack.zarr", tmp_path / "results.zarr"
    _coded(capsys, ["ingest", root / "src", stack], 0)
    _coded(capsys, ["run", stack, results, "--rois", "auto", "--backend", "numpy"], 0)
    ds = gpucnr.open_results(results)
    assert ds.attrs["roi_source"] == "auto" and ds.attrs["edge"] == 2
    assert ds["roi"].values.tolist() == [1, 2]
    assert (ds["status"].values == 0).all()
    assert {"n_air", "mean_air", "var_air", "noise_source"} <= set(ds.data_vars)
    assert (ds["n_air"].values > 0).all()
    # the MONOCHROME1 file (an inverted copy of image 5) measures as the original would
    inverted = int(np.flatnonzero(ds["photometric"].values == "MONOCHROME1")[0])
    direct = gpucnr.measure(ph.images[5], "auto", backend="numpy")
    np.testing.assert_allclose(ds["cnr"].values[inverted], direct["cnr"].values[0], rtol=1e-9)
    out = _coded(capsys, ["filter", results, "--out", tmp_path / "keep.csv"], 0)
    assert "keep 6" in out.out
    keep = pd.read_csv(tmp_path / "keep.csv")
    np.testing.assert_allclose(keep["cnr"].to_numpy(), ds["cnr_median"].values[keep["image"].to_numpy()])
    assert "automatic regions" in _coded(capsys, ["info", results, "--verify"], 0).out
    # a resume must name the automatic regions again
    _coded(capsys, ["run", stack, results, "--rois", "auto", "--resume"], 0)
    err = _coded(capsys, ["run", stack, results, "--rois", "auto", "--edge", "3", "--resume"], 2).err
    assert "resume-mismatch" in err and "edge" in err


def test_cli_refuses_roi_source_and_other_backgrounds_with_rois_auto(dicom_dir, tmp_path, capsys):
    root, _ = dicom_dir
    stack = tmp_path / "stack.zarr"
    _coded(capsys, ["ingest", root / "src", stack], 0)
    for extra in (["--roi-source", "labels"], ["--roi-source", "auto"], ["--background", "ring"]):
        results = tmp_path / "r.zarr"
        err = _coded(capsys, ["run", stack, results, "--rois", "auto", *extra], 2).err
        assert "bad-option" in err
        assert not results.exists()
    err = _coded(capsys, ["run", stack, tmp_path / "r.zarr", "--definition", "mriqc"], 2).err
    assert "mriqc" in err and not (tmp_path / "r.zarr").exists()


def test_a_file_named_auto_is_a_table_when_written_as_a_path(tmp_path, capsys, monkeypatch):
    ph = make_phantom(4, (64, 64), seed=3)
    stack = gpucnr.write_stack(tmp_path / "stack.zarr", ph.images)
    ph.rois.to_csv(tmp_path / "auto", index=False)
    monkeypatch.chdir(tmp_path)
    _coded(capsys, ["run", "stack.zarr", "r.zarr", "--rois", "./auto", "--backend", "numpy"], 0)
    ds = gpucnr.open_results(tmp_path / "r.zarr")
    assert ds.attrs["roi_source"] == "table"
    assert "n_air" not in ds
    auto = gpucnr.run(stack, tmp_path / "a.zarr", rois="auto", backend="numpy")
    assert auto.attrs["roi_source"] == "auto"


def test_run_auto_equals_measure_auto_and_results_stay_checked(tmp_path):
    ph = make_body_phantom(10, (64, 64), tissue_cnr=(3, 9), seed=22, dtype="uint16")
    stack = gpucnr.write_stack(tmp_path / "stack.zarr", ph.images, shard=4)
    ds = gpucnr.run(stack, tmp_path / "r.zarr", rois="auto", backend="numpy", definition="mriqc").load()
    ref = gpucnr.measure(ph.images, "auto", definition="mriqc", backend="numpy")
    for k in ("cnr", "status", "n_roi", "n_bg", "mean_roi", "var_bg", "cnr_median", "n_air", "var_air"):
        np.testing.assert_allclose(ds[k].values, ref[k].values, rtol=1e-12, err_msg=k)
    assert ds["noise_source"].values.tolist() == ref["noise_source"].values.tolist()
    assert ds["roi_name"].values[:, 0].tolist() == ["foreground"] * 10
    with pytest.raises(InputError, match="roi-source"):
        gpucnr.run(stack, tmp_path / "x.zarr", rois="auto", roi_source="labels")
    # a damaged air variable is found by the results' checks, like every other variable
    from gpucnr.results import ResultsError, verify_results

    shard = next((tmp_path / "r.zarr" / "var_air").rglob("c/*"))
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any(d["array"] == "var_air" for d in verify_results(tmp_path / "r.zarr")["damaged"])
    with pytest.raises(ResultsError, match="results-damaged"):
        gpucnr.open_results(tmp_path / "r.zarr")


def test_report_gallery_draws_the_automatic_regions(tmp_path, monkeypatch):
    from gpucnr import report

    ph = make_body_phantom(4, (64, 64), tissue_cnr=(3, 9), seed=23, dtype="uint16")
    stack = gpucnr.write_stack(tmp_path / "stack.zarr", ph.images)
    gpucnr.run(stack, tmp_path / "r.zarr", rois="auto", backend="numpy")
    drawn = []
    three_panel = report.three_panel

    def spy(image, roi_mask, bg_mask, caption, **kw):
        drawn.append((roi_mask, bg_mask))
        return three_panel(image, roi_mask, bg_mask, caption, **kw)

    monkeypatch.setattr(report, "three_panel", spy)
    ds = gpucnr.open_results(tmp_path / "r.zarr").load()
    page = report.write_report(tmp_path / "r.zarr", tmp_path / "rep", lowest=4).read_text()
    assert "cannot draw" not in page and len(drawn) == 4
    regions = gpucnr.auto_regions(ph.images, backend="numpy")
    for (roi_mask, bg_mask), i in zip(drawn, report.lowest_images(ds["cnr_median"].values, 4), strict=True):
        # the drawn masks hold exactly the pixels the run measured for the cell shown
        counts = {(int(np.count_nonzero(roi_mask)), int(np.count_nonzero(bg_mask)))}
        assert counts <= {(int(ds["n_roi"].values[i, j]), int(ds["n_bg"].values[i, j])) for j in (0, 1)}
        assert np.array_equal(roi_mask, regions[i] >= 2) or np.array_equal(roi_mask, regions[i] == REGION_UPPER)


def test_enhance_remeasures_auto_results_with_the_automatic_regions(tmp_path):
    ph = make_body_phantom(4, (64, 64), tissue_cnr=(1.2, 6), seed=24)
    stack = gpucnr.write_stack(tmp_path / "stack.zarr", ph.images)
    gpucnr.run(stack, tmp_path / "r.zarr", rois="auto", backend="numpy")
    out = gpucnr.enhance(tmp_path / "r.zarr", tmp_path / "enh", threshold=1000.0, method="median", backend="numpy")
    after = gpucnr.open_results(tmp_path / "enh" / "results.zarr")
    assert after.attrs["roi_source"] == "auto" and out.sizes["image"] == after.sizes["image"] >= 1
