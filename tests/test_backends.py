"""Backends agree: the kernel on NumPy, array-api-strict and CuPy; NumPy fast vs portable path; measure on
Dask and array-API input. Counts and status exactly, moments within 1e-12 relative (DESIGN §1)."""

from __future__ import annotations

import sys

import array_api_compat
import numpy as np
import pytest
from cases import BACKGROUNDS, BG_LABEL, COUNTS, DEFINITIONS, DTYPES, FLOATS, FOOTPRINTS, NP
from conftest import host

import gpucnr
from gpucnr.backend import cupy_available
from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE, measure_batch
from gpucnr.kernels.params import Params


def make_batch(seed, dtype, background, use_table, *, n=4, h=37, w=45, extras=False):
    """Random kernel inputs as NumPy arrays; `extras` adds padding values, NaNs, valid extents and rescale."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        images = rng.normal(float(rng.choice([0.0, 500.0])), 20.0, (n, h, w)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        images = rng.integers(max(info.min, -2000), min(info.max, 3000) + 1, (n, h, w)).astype(dtype)
    labels = np.zeros((n, h, w), np.int32)
    for i in range(n):
        for rid in (1, 2, 5):
            if rng.random() < 0.85:
                y, x = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
                labels[i, y : y + int(rng.integers(1, 9)), x : x + int(rng.integers(1, 9))] = rid
        labels[i][(labels[i] == 0) & (rng.random((h, w)) < 0.5)] = BG_LABEL
    images[labels == 2] = (images[labels == 2] + 40).astype(dtype)  # some contrast
    if background != "label":
        labels[labels == BG_LABEL] = 0
    batch = dict(images=images, roi_ids=None, labels=None, table=None, lesions=None)
    if use_table:
        rows = [(i, c, int(rng.integers(0, 2)), int(rng.integers(-4, w + 4)), int(rng.integers(-4, h + 4)),
                 int(rng.integers(0, 8))) for i in range(n) for c in range(3) if rng.random() < 0.8]
        cols = np.array(rows, np.int64).reshape(-1, 6)
        batch["table"] = dict(zip(("image", "col", "kind", "cx", "cy", "r"), cols.T, strict=True))
        batch["roi_ids"] = np.array([1, 4, 6], np.int64)
        if background in ("label", "complement-all"):
            batch["lesions"] = labels
    else:
        batch["labels"] = labels
        if background == "label":
            batch["lesions"] = labels
    if extras:
        pad = np.full(n, np.nan)
        pad[0] = 0.0
        images[0, :, -4:] = 0  # a padded strip
        images[0, 0, :] = 0  # and a padded first row
        pad[2] = float(images[2, 5, 5]) if np.isfinite(images[2, 5, 5]) else 0.0
        images[2, -3:, :] = pad[2]
        if dtype.kind == "f":
            bad = rng.random((n, h, w)) < 0.02
            images[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
        valid_h = np.array([h, h - 5, h, h - 1], np.int64)[:n]
        valid_w = np.array([w, w - 7, w - 2, w], np.int64)[:n]
        if dtype.kind == "f":
            images[1, h - 5 :, :] = np.nan  # beyond the valid extent: never looked at
        else:
            images[1, :, w - 7 :] = np.iinfo(dtype).max
        batch.update(padding=pad, valid_h=valid_h, valid_w=valid_w,
                     slope=rng.uniform(0.5, 2.0, n), intercept=rng.uniform(-1000, 1000, n))
    return batch


def params_for(seed, background, **kw):
    rng = np.random.default_rng(seed + 1000)
    opts = dict(background=background, footprint=FOOTPRINTS[seed % 4], definition=DEFINITIONS[seed % 5],
                dilation=int(rng.integers(0, 6)), border=int(rng.integers(0, 6)), ddof=int(rng.integers(0, 2)),
                min_bg=5, ring_gap=int(rng.integers(0, 4)), ring_width=int(rng.integers(1, 8)),
                signed=bool(seed % 5 != 4 and rng.random() < 0.3))
    if background == "label":
        opts["background_label"] = BG_LABEL
    opts.update(kw)
    return Params(**opts)


def run_kernel(xp, batch, params, fast=True):
    def conv(a):
        return None if a is None else xp.asarray(a)

    table = None if batch["table"] is None else {k: xp.asarray(v) for k, v in batch["table"].items()}
    extras = {k: conv(batch[k]) for k in ("valid_h", "valid_w", "slope", "intercept", "padding") if k in batch}
    return measure_batch(xp, conv(batch["images"]), roi_ids=conv(batch["roi_ids"]), params=params,
                         labels=conv(batch["labels"]), table=table, lesions=conv(batch["lesions"]), fast=fast,
                         **extras)


def assert_same(got, expected, what, rtol=1e-12):
    """Counts, status and ids exactly; floats within `rtol` relative, NaN/inf patterns identical."""
    np.testing.assert_array_equal(host(got["roi_ids"]), host(expected["roi_ids"]), err_msg=f"{what}: roi_ids")
    for k in COUNTS:
        np.testing.assert_array_equal(host(got[k]), host(expected[k]), err_msg=f"{what}: {k}")
    for k in FLOATS:
        a, b = host(got[k]), host(expected[k])
        assert a.shape == b.shape, (what, k)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN pattern of {k}")
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0, equal_nan=True, err_msg=f"{what}: {k}")


CASES = [(seed, dtype, background, seed % 2 == 1)
         for seed, (dtype, background) in enumerate((d, b) for d in DTYPES for b in BACKGROUNDS)]


def case_id(case):
    seed, dtype, background, use_table = case
    return f"{seed}-{np.dtype(dtype).name}-{background}-{'table' if use_table else 'labels'}"


# ------------------------------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_backends_agree(xp, case):
    seed, dtype, background, use_table = case
    batch = make_batch(seed, dtype, background, use_table, extras=seed % 3 == 0)
    params = params_for(seed, background)
    expected = run_kernel(NP, batch, params, fast=True)
    got = run_kernel(xp, batch, params, fast=False)
    assert_same(got, expected, f"{xp.__name__} {params}")
    if xp is not NP:
        assert_same(run_kernel(xp, batch, params, fast=True), expected, f"{xp.__name__} fast {params}")
    assert (host(expected["status"]) == 0).any(), "a case without a single valid cell tests little"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_numpy_fast_equals_portable_with_padding_and_nan(case):
    seed, dtype, background, use_table = case
    batch = make_batch(seed + 100, dtype, background, use_table, extras=True)
    params = params_for(seed + 100, background)
    fast = run_kernel(NP, batch, params, fast=True)
    portable = run_kernel(NP, batch, params, fast=False)
    assert_same(fast, portable, f"fast vs portable {params}")
    excluded = host(fast["n_excluded"])
    assert excluded[0] >= batch["images"].shape[1] * 4  # the padded strip is excluded
    assert excluded[2] >= batch["valid_w"][2] * 3


def test_fast_path_names_the_implementation():
    """One place names the compiled implementation (DESIGN §9): Numba's CPU kernels for NumPy, none (the portable
    path) for array-api-strict; CuPy's "cuda" and the simulator mode are tested in tests/test_cuda.py."""
    import array_api_strict

    from gpucnr.backend import fast_path

    assert fast_path(NP) == "numba-cpu"
    assert fast_path(array_api_strict) is None
    assert fast_path(array_api_compat.array_namespace(array_api_strict.asarray([1]))) is None


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_portable_path_runs_no_compiled_code(monkeypatch, background):
    """fast=False means no compiled code anywhere: with the compiled module unimportable, the portable path still
    measures and agrees with the compiled one, while fast=True fails loudly (so the block is real). Without
    Numba, `fast_path` names nothing and fast=True is the portable path too."""
    from gpucnr.backend import fast_path

    batch = make_batch(11, np.float32, background, background in ("ring", "complement-all"), extras=True)
    params = params_for(11, background)
    expected = run_kernel(NP, batch, params, fast=True)
    import gpucnr.kernels as kernels_pkg

    # NB: None in sys.modules makes importlib refuse the module, whether or not it was imported before.
    monkeypatch.setitem(sys.modules, "gpucnr.kernels._numpy_fast", None)
    monkeypatch.delattr(kernels_pkg, "_numpy_fast", raising=False)
    assert_same(run_kernel(NP, batch, params, fast=False), expected, f"portable, compiled module blocked {params}")
    with pytest.raises(ImportError):
        run_kernel(NP, batch, params, fast=True)
    monkeypatch.setitem(sys.modules, "numba", None)
    assert fast_path(NP) is None
    assert_same(run_kernel(NP, batch, params, fast=True), expected, f"no Numba {params}")


@pytest.mark.parametrize("name", FOOTPRINTS)
def test_device_dilation_is_one_ndimage_call_with_the_same_footprint(monkeypatch, name):
    """CuPy masks dilate in one `backend.ndimage_for` call (cupyx); its structuring element, checked here through
    scipy.ndimage on NumPy masks, gives the row-run dilation's pixels exactly."""
    from gpucnr.kernels import masks
    from gpucnr.kernels.footprints import footprint_offsets, footprint_rows

    rng = np.random.default_rng(4)
    mask = rng.random((3, 30, 34)) < 0.02
    rows = footprint_rows(footprint_offsets(name, 4))
    expected = masks.dilate(NP, mask, rows)
    calls = []
    real = masks.ndimage_for

    def spy(x):
        calls.append(x.shape)
        return real(x)

    monkeypatch.setattr(masks, "is_cupy", lambda x: True)
    monkeypatch.setattr(masks, "ndimage_for", spy)
    np.testing.assert_array_equal(masks.dilate(NP, mask, rows), expected)
    assert calls == [mask.shape]


def test_padding_and_extent_against_plain_numpy():
    """One cell checked by hand: padding pixels, NaNs and pixels beyond the valid extent are left out."""
    rng = np.random.default_rng(3)
    images = rng.normal(100, 5, (2, 30, 34))
    images[:, 0, :] = -2000.0  # padding value in the first row
    images[0, 12, 13] = np.nan
    images[1, :, 30:] = 1e9  # beyond valid_w
    labels = np.zeros(images.shape, np.int32)
    labels[:, 10:16, 10:16] = 1
    params = Params(dilation=0, border=0, min_bg=1)
    for fast in (True, False):
        out = run_kernel(NP, dict(images=images, roi_ids=None, labels=labels, table=None, lesions=None,
                                  padding=np.array([-2000.0, -2000.0]), valid_h=np.array([30, 30]),
                                  valid_w=np.array([34, 30])), params, fast=fast)
        for i, width in enumerate((34, 30)):
            region = images[i, 1:, :width]
            bg = region[(labels[i, 1:, :width] == 0) & np.isfinite(region)]
            assert host(out["n_bg"])[i, 0] == bg.size
            np.testing.assert_allclose(host(out["mean_bg"])[i, 0], bg.mean(), rtol=1e-12)
            np.testing.assert_allclose(host(out["var_bg"])[i, 0], bg.var(ddof=1), rtol=1e-10)
        np.testing.assert_array_equal(host(out["n_excluded"]), [34 + 1, 30])
        np.testing.assert_array_equal(host(out["n_roi"])[:, 0], [35, 36])


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_outputs_stay_in_the_namespace_with_their_dtypes(xp, background):
    batch = make_batch(7, np.uint16, background, background == "ring", extras=True)
    out = run_kernel(xp, batch, params_for(7, background))
    assert set(out) == {*OUTPUT_CELL, *OUTPUT_IMAGE, "roi_ids"}
    for k, v in out.items():
        assert array_api_compat.array_namespace(v) is xp, (k, type(v))
        if array_api_compat.is_cupy_namespace(xp):
            import cupy

            assert isinstance(v, cupy.ndarray), k
        if xp is NP:
            assert isinstance(v, np.ndarray), k
    n = batch["images"].shape[0]
    n_ids = out["roi_ids"].shape[0]
    assert out["status"].dtype == xp.int8
    for k in ("n_roi", "n_bg", "n_valid", "n_excluded", "roi_ids"):
        assert out[k].dtype == xp.int64, k
    for k in FLOATS:
        assert out[k].dtype == xp.float64, k
    for k in OUTPUT_CELL:
        assert out[k].shape == (n, n_ids), k
    for k in OUTPUT_IMAGE:
        assert out[k].shape == (n,), k


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_kernel_backends_agree_on_large_offsets(xp, dtype):
    """Data far from zero (uint16 near 40000 with sigma 2; floats at 1e6): the shifted sums must agree."""
    rng = np.random.default_rng(17)
    if np.dtype(dtype).kind == "f":
        images = (1e6 + rng.normal(0, 2, (3, 40, 40))).astype(dtype)
    else:
        info = np.iinfo(dtype)
        centre = {np.uint8: 200, np.uint16: 40000, np.int16: -30000}[dtype]
        images = np.clip(np.round(rng.normal(centre, 2, (3, 40, 40))), info.min, info.max).astype(dtype)
    labels = np.zeros(images.shape, np.int32)
    labels[:, 10:20, 12:22] = 1
    labels[:, 25:30, 25:33] = 2
    batch = dict(images=images, roi_ids=None, labels=labels, table=None, lesions=None)
    params = Params()
    assert_same(run_kernel(xp, batch, params, fast=False), run_kernel(NP, batch, params), f"{xp.__name__}")


# ------------------------------------------------------------------------------------------ measure


def measure_values(ds):
    return {k: ds[k].values for k in ds.data_vars} | {"roi": ds.roi.values, "image": ds.image.values}


def assert_identical(a, b):
    va, vb = measure_values(a), measure_values(b)
    assert va.keys() == vb.keys()
    for k in va:
        assert va[k].dtype == vb[k].dtype, k
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)  # NaN == NaN here, bit for bit otherwise


def stack_inputs(seed, dtype, n=7, h=33, w=41):
    batch = make_batch(seed, dtype, "label", False, n=n, h=h, w=w)
    labels = np.where(batch["labels"] == BG_LABEL, 0, batch["labels"])
    return batch["images"], labels, batch["labels"]


@pytest.mark.parametrize("dtype", [np.uint16, np.float32], ids=lambda d: np.dtype(d).name)
def test_measure_dask_whole_image_chunks(dtype):
    da = pytest.importorskip("dask.array")
    images, labels, _ = stack_inputs(1, dtype)
    expected = gpucnr.measure(images, labels, backend="numpy")
    got = gpucnr.measure(da.from_array(images, chunks=(2, 33, 41)), labels, backend="numpy")
    assert_identical(got, expected)
    got = gpucnr.measure(da.from_array(images, chunks=(3, 33, 41)), da.from_array(labels, chunks=(2, 33, 41)),
                         backend="numpy")
    assert_identical(got, expected)


@pytest.mark.parametrize("dtype", [np.int16, np.float64], ids=lambda d: np.dtype(d).name)
def test_measure_dask_chunks_split_along_h_and_w(dtype):
    da = pytest.importorskip("dask.array")
    images, labels, _ = stack_inputs(2, dtype)
    expected = gpucnr.measure(images, labels, footprint="disk", ddof=0, backend="numpy")
    got = gpucnr.measure(da.from_array(images, chunks=(2, 10, 15)), da.from_array(labels, chunks=(4, 33, 7)),
                         footprint="disk", ddof=0, backend="numpy")
    assert_identical(got, expected)


def test_measure_dask_with_table_and_background_label():
    da = pytest.importorskip("dask.array")
    images, _, with_bg = stack_inputs(3, np.uint8)
    rng = np.random.default_rng(3)
    n = images.shape[0]
    table = {"image": np.repeat(np.arange(n), 2), "roi": np.tile([3, 8], n),
             "kind": np.tile(["square", "disk"], n), "cx": rng.integers(5, 36, 2 * n),
             "cy": rng.integers(5, 28, 2 * n), "r": rng.integers(2, 6, 2 * n)}
    kw = dict(background="label", background_label=BG_LABEL, min_bg=10, backend="numpy")
    expected = gpucnr.measure(images, table, labels=with_bg, **kw)
    got = gpucnr.measure(da.from_array(images, chunks=(2, 11, 41)), table,
                         labels=da.from_array(with_bg, chunks=(3, 33, 20)), **kw)
    assert_identical(got, expected)
    assert (expected.status.values == 0).any()


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_measure_array_api_strict_equals_numpy(background):
    xps = pytest.importorskip("array_api_strict")
    images, labels, with_bg = stack_inputs(4, np.float32, n=4)
    rois = with_bg if background == "label" else labels
    kw = dict(background=background, background_label=BG_LABEL if background == "label" else None, min_bg=10)
    expected = gpucnr.measure(images, rois, backend="numpy", **kw)
    got = gpucnr.measure(xps.asarray(images), xps.asarray(rois), **kw)
    assert got.attrs["backend"] != expected.attrs["backend"]  # it did run on array-api-strict
    e, g = measure_values(expected), measure_values(got)
    for k in e:
        if k in FLOATS:
            np.testing.assert_array_equal(np.isnan(g[k]), np.isnan(e[k]), err_msg=k)
            np.testing.assert_allclose(g[k], e[k], rtol=1e-12, atol=0, equal_nan=True, err_msg=k)
        else:
            np.testing.assert_array_equal(g[k], e[k], err_msg=k)
    assert (e["status"] == 0).any()


def test_measure_auto_backend_on_numpy_input():
    images, labels, _ = stack_inputs(5, np.uint16, n=2)
    ds = gpucnr.measure(images, labels)
    assert ds.attrs["backend"] == ("cupy" if cupy_available() else "numpy")
    assert_identical(ds, gpucnr.measure(images, labels, backend="numpy" if not cupy_available() else "cupy"))


def test_measure_cupy_backend(gpu_xp):
    """backend="cupy" (GPU only) equals the NumPy backend within 1e-12."""
    images, labels, _ = stack_inputs(6, np.float64, n=3)
    expected = gpucnr.measure(images, labels, backend="numpy")
    got = gpucnr.measure(images, labels, backend="cupy")
    assert got.attrs["backend"] == "cupy"
    e, g = measure_values(expected), measure_values(got)
    for k in e:
        if k in FLOATS:
            np.testing.assert_allclose(g[k], e[k], rtol=1e-12, atol=0, equal_nan=True, err_msg=k)
        else:
            np.testing.assert_array_equal(g[k], e[k], err_msg=k)


def test_cupy_backend_without_gpu_raises():
    if cupy_available():
        pytest.skip("a GPU is available")
    with pytest.raises(gpucnr.BackendUnavailableError):
        gpucnr.measure(np.zeros((1, 10, 10)), np.ones((1, 10, 10), np.int32), backend="cupy")
