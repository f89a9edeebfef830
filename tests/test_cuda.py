"""The device kernels ("cuda", gpucnr/kernels/_cuda.py) without a GPU: run in numba's CUDA simulator on NumPy
arrays (GPUCNR_CUDA_SIM=1; tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1 when no device is visible) against the
plain reference and the NumPy path, and compiled to PTX for sm_90 (an H100/H200) by NVVM.

The simulator proves the kernels' logic (indexing, masks, reductions, atomics), not CuPy's or the hardware's:
scripts/gpu_check.py is the check for a machine with a GPU (docs/gpu.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cases import BACKGROUNDS, COUNTS, DEFINITIONS, DTYPES, FLOATS, FOOTPRINTS, NP
from test_oracle import assert_matches, data_scale, make_case, random_images, run_reference, table_columns

import gpucnr
from gpucnr.kernels.batch import measure_batch
from gpucnr.kernels.params import Params

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (the test extra installs it)")
ROOT = Path(__file__).resolve().parents[1]


def _simulator_on() -> bool:
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


@pytest.fixture
def sim(monkeypatch):
    """The device kernels in numba's CUDA simulator, on NumPy arrays; yields the kernels' module."""
    if not _simulator_on():
        pytest.skip("numba.cuda is not the simulator here (a GPU is visible: scripts/gpu_check.py covers it)")
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "1")
    from gpucnr.kernels import _cuda

    return _cuda


def run_batch(case, padding=None):
    """measure_batch on NumPy arrays with the fast path on: the device kernels under GPUCNR_CUDA_SIM=1, Numba's
    CPU kernels otherwise."""
    params = Params(**case["options"])
    labels, table, roi_ids, lesions = case["labels"], None, None, case["lesions"]
    if labels is not None and params.background == "label":
        lesions = labels
    if case["table"] is not None:
        cols = table_columns(case["table"])
        roi_ids = np.unique(cols["roi"]).astype(np.int64)
        table = {"image": cols["image"], "col": np.searchsorted(roi_ids, cols["roi"]),
                 "kind": (cols["kind"] == "disk").astype(np.int64), "cx": cols["cx"], "cy": cols["cy"], "r": cols["r"]}
        table = {k: np.asarray(v, np.int64) for k, v in table.items()}
    out = measure_batch(NP, case["images"], roi_ids=roi_ids, params=params, labels=labels, table=table,
                        lesions=lesions, padding=padding, fast=True)
    return [int(v) for v in out["roi_ids"]], out


def assert_same_as_numpy(got, expected, what):
    """Counts, status and integer results identical; floats within 1e-12 relative (NaN patterns equal)."""
    assert got[0] == expected[0], what
    for k in COUNTS:
        np.testing.assert_array_equal(np.asarray(got[1][k]), np.asarray(expected[1][k]), err_msg=f"{what}: {k}")
    for k in FLOATS:
        a, b = np.asarray(got[1][k], np.float64), np.asarray(expected[1][k], np.float64)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN pattern of {k}")
        ok = ~np.isnan(b)
        with np.errstate(invalid="ignore"):
            close = (a[ok] == b[ok]) | (np.abs(a[ok] - b[ok]) <= 1e-12 * np.abs(b[ok]))
        assert close.all(), f"{what}: {k}\n got {a[ok][~close]}\n numpy {b[ok][~close]}"


# ------------------------------------------------------------------------------------- the oracle sweep


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("footprint", FOOTPRINTS)
def test_simulated_device_kernels_against_reference(sim, monkeypatch, footprint, background, seed):
    """Every footprint x background x seed; the seeds cycle through every dtype (seed % 5) and every definition
    ((seed + footprint) % 5), with label arrays and ROI tables, padding values, non-finite pixels and bright
    lesions (tests/test_oracle.py's `make_case`, small images: the simulator runs each thread in Python)."""
    case = make_case(seed, footprint, background, n=2, size=(12, 20))
    padding = case["padding"]
    what = f"{case['images'].dtype} {case['options']} table={case['table'] is not None} padding={padding}"
    before = sim.LAUNCHES["count"]
    histograms_before = sim.LAUNCHES.get("_gcnr_windows", 0)
    got = run_batch(case, padding)
    # NB: the device kernels really ran (the image pass at least): this is not the NumPy path again.
    assert sim.LAUNCHES["count"] > before
    if case["options"]["definition"] == "gcnr":
        assert sim.LAUNCHES.get("_gcnr_windows", 0) > histograms_before, "gCNR histograms not counted on the device"
    assert_matches(got, run_reference(case, padding), "device " + what, data_scale(case["images"]),
                   case["options"]["definition"])
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    assert_same_as_numpy(got, run_batch(case, padding), "device vs numba-cpu " + what)


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_simulated_gcnr_histograms_equal_the_portable_counts(sim, monkeypatch, background, dtype):
    """The device histograms (`_cuda.gcnr_counts`) hold the very counts of the portable path's (searchsorted over
    sorted segments), bin by bin, for ROI and background: disks and squares from a table, padding and non-finite
    pixels, a lesion label for the label background and complement-all, several bins (auto) and one (gcnr_bins=1)."""
    from gpucnr.kernels import histograms

    rng = np.random.default_rng(11)
    n, h, w = 2, 22, 24
    images = rng.integers(0, 60, (n, h, w)).astype(dtype)
    images[0, 9:14, 8:13] += 40  # a bright lesion: the ROI's histogram differs from its background's
    padding = np.array([7.0, np.nan])
    if dtype == np.float32:
        images[1, 3, 4] = np.nan
        images[1, 15, 2] = np.inf
    lesions = np.zeros((n, h, w), np.int32)
    lesions[:, 17:, :] = 9
    lesions[0, 9:14, 8:13] = 1
    rows = np.array([(0, 0, 1, 10, 11, 3), (0, 1, 0, 16, 5, 2), (1, 0, 0, 6, 6, 3), (1, 1, 1, 18, 12, 2)], np.int64)
    table = {c: rows[:, k] for k, c in enumerate(("image", "col", "kind", "cx", "cy", "r"))}
    roi_ids = np.arange(2, dtype=np.int64)
    got = {}

    def spy(real, key):
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            got.setdefault(key, []).append(np.asarray(out))
            return out
        return wrapper

    monkeypatch.setattr(sim, "gcnr_counts", spy(sim.gcnr_counts, "device"))
    monkeypatch.setattr(histograms, "_bin_counts", spy(histograms._bin_counts, "portable"))
    for bins in ("auto", 1):
        got.clear()
        params = Params(background=background, definition="gcnr", gcnr_bins=bins, dilation=2, border=1, min_bg=5,
                        ring_gap=1, ring_width=3, background_label=9 if background == "label" else None)
        kwargs = dict(roi_ids=roi_ids, params=params, table=table, lesions=lesions, padding=padding)
        device = measure_batch(NP, images, fast=True, **kwargs)
        portable = measure_batch(NP, images, fast=False, **kwargs)
        (roi_c, bg_c), = got["device"]
        # NB: the device's count arrays are as wide as the largest bin count the largest ROI box allows (no read
        # of the batch's own largest); the bins past the portable width hold nothing.
        width = got["portable"][0].shape[1]
        assert roi_c.shape == bg_c.shape and roi_c.shape[0] == got["portable"][0].shape[0] and roi_c.shape[1] >= width
        assert not roi_c[:, width:].any() and not bg_c[:, width:].any()
        np.testing.assert_array_equal(roi_c[:, :width], got["portable"][0], err_msg=f"ROI counts, bins={bins}")
        np.testing.assert_array_equal(bg_c[:, :width], got["portable"][1], err_msg=f"background counts, bins={bins}")
        assert (roi_c.sum(axis=1) > 0).all() and (bg_c >= 0).all()
        np.testing.assert_array_equal(device["cnr"], portable["cnr"])
        np.testing.assert_array_equal(device["status"], portable["status"])


@pytest.mark.parametrize("rois", ["table", "labels"])
def test_simulated_direct_recompute_of_ill_conditioned_backgrounds(sim, monkeypatch, rois):
    """Float images, complement background, a lesion 10^5 sigma above its background that the ROI's dilation
    removes: the background's "totals minus window" sums are ill-conditioned, and the device recomputes those cells
    directly in one launch (no host read to find them); moments equal the NumPy path's, within 1e-12."""
    rng = np.random.default_rng(5)
    images = rng.normal(0.0, 1.0, (2, 20, 22))
    images[:, 6:10, 7:11] += 1e5
    images[1, 14, 3] = np.nan
    labels = np.zeros(images.shape, np.int32)
    labels[:, 6:10, 7:11] = 1
    labels[1, 13:16, 15:18] = 2
    table = None if rois == "labels" else {
        "image": np.array([0, 1, 1]), "col": np.array([0, 0, 1]), "kind": np.array([0, 1, 0]),
        "cx": np.array([9, 9, 16]), "cy": np.array([8, 8, 14]), "r": np.array([2, 2, 1])}
    case = dict(images=images, labels=labels if rois == "labels" else None, lesions=None, padding=None,
                table=None, options=dict(background="complement", footprint="disk", dilation=2, border=1, ddof=1,
                                         min_bg=5, definition="pooled", signed=False))
    flagged = []
    real = sim.direct_background

    def spy(*args, **kwargs):
        flagged.append(np.asarray(args[9]).copy())
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "direct_background", spy)
    if table is not None:
        params = Params(**case["options"])
        kwargs = dict(roi_ids=np.arange(2, dtype=np.int64), params=params,
                      table={k: np.asarray(v, np.int64) for k, v in table.items()})
        got = ([0, 1], measure_batch(NP, images, fast=True, **kwargs))
        monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
        expected = ([0, 1], measure_batch(NP, images, fast=True, **kwargs))
    else:
        got = run_batch(case)
        monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
        expected = run_batch(case)
    assert len(flagged) == 1 and flagged[0].any() and not flagged[0].all(), flagged
    assert_same_as_numpy(got, expected, f"ill-conditioned backgrounds ({rois})")


@pytest.mark.parametrize("definition", ["viqa", "mrqy"])
def test_simulated_peer_definitions_equal_numpy(sim, monkeypatch, definition):
    """vIQA (signed by the contrast, never by the display's polarity) and MRQy on the device path, with a negative
    slope and an inverted image: identical to the NumPy path (the sweep above covers the other definitions)."""
    rng = np.random.default_rng(4)
    images = rng.normal(100.0, 4.0, (2, 20, 22))
    images[0, 5:10, 6:11] += 9.0
    images[1, 12:16, 3:8] -= 7.0
    labels = np.zeros(images.shape, np.int32)
    labels[0, 5:10, 6:11] = 1
    labels[1, 12:16, 3:8] = 2
    labels[:, 1:3, 15:19] = 3
    params = Params(background="complement", definition=definition, dilation=1, border=1, min_bg=5)
    kwargs = dict(roi_ids=None, params=params, labels=labels, slope=np.array([-2.0, 1.5]),
                  intercept=np.array([3.0, 0.0]), polarity=np.array([1.0, -1.0]))
    before = sim.LAUNCHES["count"]
    got = measure_batch(NP, images, **kwargs)
    assert sim.LAUNCHES["count"] > before
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    expected = measure_batch(NP, images, **kwargs)
    assert np.isfinite(expected["cnr"]).sum() >= 4
    assert_same_as_numpy(([int(v) for v in got["roi_ids"]], got), ([int(v) for v in expected["roi_ids"]], expected),
                         definition)


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("rois", ["table", "labels"])
def test_simulated_mrqy_equals_numpy(sim, monkeypatch, background, rois):
    """MRQy's patch CNR on the device (`_mrqy`: arg-max of each region, the patch above-left of it) for every
    background, squares and disks or labels, with padding, non-finite pixels and regions of negative values (their
    maximum is a zero outside them): identical to the NumPy path."""
    rng = np.random.default_rng(12)
    n, h, w = 2, 22, 24
    images = rng.normal(20.0, 6.0, (n, h, w))
    images[0, 9:14, 8:13] += 30
    images[1, 3:8, 14:20] = -rng.uniform(1, 5, (5, 6))  # a negative ROI
    images[1, 3, 4] = np.nan
    padding = np.array([images[0, 15, 2], np.nan])
    lesions = np.zeros((n, h, w), np.int32)
    lesions[:, 17:, :] = 9
    lesions[0, 9:14, 8:13] = 1
    labels = table = None
    if rois == "labels":
        labels = np.zeros((n, h, w), np.int32)
        labels[0, 9:14, 8:13] = 1
        labels[1, 3:8, 14:20] = 1
        labels[:, 5:8, 3:6] = 2
        roi_ids = np.array([1, 2], np.int64)
    else:
        rows = np.array([(0, 0, 1, 10, 11, 3), (0, 1, 0, 16, 5, 2), (1, 0, 0, 16, 5, 2), (1, 1, 1, 8, 12, 2)], np.int64)
        table = {c: rows[:, k] for k, c in enumerate(("image", "col", "kind", "cx", "cy", "r"))}
        roi_ids = np.arange(2, dtype=np.int64)
    params = Params(background=background, definition="mrqy", dilation=2, border=1, min_bg=5, ring_gap=1,
                    ring_width=3, background_label=9 if background == "label" else None)
    kwargs = dict(roi_ids=roi_ids, params=params, labels=labels, table=table, lesions=lesions, padding=padding)
    before = sim.LAUNCHES.get("_mrqy", 0)
    got = measure_batch(NP, images, **kwargs)
    assert sim.LAUNCHES.get("_mrqy", 0) > before
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    expected = measure_batch(NP, images, **kwargs)
    assert np.isfinite(expected["cnr"]).sum() >= 2
    assert_same_as_numpy(([0, 1], got), ([0, 1], expected), f"mrqy {background} {rois}")


@pytest.mark.parametrize("ids", ["small", "sparse", "uint64"])
def test_simulated_label_ids_found_on_the_device(sim, monkeypatch, ids):
    """roi_ids=None: the ids of a label batch are found by `_label_dense` over the range the input checks read
    (the background label and an id present only beyond the valid extent left out); ids too sparse for a candidate
    table (1 and 2**40) or uint64 ids above 2**63 take the portable search. Same results as the NumPy path (fast
    and portable: the portable search returned NumPy 2.4's unsorted unique values, and kept ids beyond the valid
    extent) either way."""
    images = np.random.default_rng(8).integers(0, 500, (2, 16, 18)).astype(np.uint16)
    big = {"small": 7, "sparse": 2**40, "uint64": 2**63 + 5}[ids]
    labels = np.zeros(images.shape, np.uint64 if ids == "uint64" else np.int64)
    labels[0, 3:7, 4:9] = 3
    labels[1, 9:13, 2:6] = big
    labels[:, 14:, :] = 9  # the background label
    labels[1, 2, 17] = 5  # beyond image 1's valid width: an id with no cell
    params = Params(background="label", background_label=9, dilation=1, min_bg=5)
    kwargs = dict(roi_ids=None, params=params, labels=labels, lesions=labels, valid_w=np.array([18, 15]))
    before = sim.LAUNCHES.get("_label_dense", 0)
    got = measure_batch(NP, images, **kwargs)
    assert (sim.LAUNCHES.get("_label_dense", 0) > before) == (ids == "small")
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    expected = measure_batch(NP, images, **kwargs)
    portable = measure_batch(NP, images, fast=False, **kwargs)
    found = [int(v) for v in expected["roi_ids"]]
    assert found == sorted({3, big if ids != "uint64" else big - 2**64})
    for name, out in (("device", got), ("portable", portable)):
        assert_same_as_numpy(([int(v) for v in out["roi_ids"]], out), (found, expected), f"{name}: label ids {ids}")


def test_gcnr_bin_thresholds_are_the_host_bin_counts():
    """The device's bin counts (`histograms.bin_counts_of`, thresholds on n) equal `cnr.gcnr_bins` for every n up to
    the bound, its float rounding included (1024**0.4 is a hair above 16, so 1024 takes 33 bins)."""
    from gpucnr.kernels.cnr import gcnr_bins
    from gpucnr.kernels.histograms import bin_counts_of

    n = np.concatenate([np.arange(0, 20001), [2**20, 2**20 + 1, 3**12, 5**10 - 1, 5**10]]).astype(np.int64)
    got, widest = bin_counts_of(NP, n, "auto", int(n.max()))
    expected = np.array([gcnr_bins(int(v), "auto") if v > 0 else 1 for v in n])
    np.testing.assert_array_equal(got, expected)
    assert widest == expected.max() and gcnr_bins(1024, "auto") == 33
    fixed, width = bin_counts_of(NP, n, 7, 10)
    assert width == 7 and (fixed == np.where(n > 0, 7, 1)).all()


def test_gcnr_from_counts_does_not_depend_on_the_width_of_the_count_arrays():
    """gCNR from counts in exact integers: bins of zeros appended (the device's count arrays are wider than the
    portable path's) change no bit, and the value is the exact fraction rounded once."""
    from fractions import Fraction

    from gpucnr.kernels.cnr import gcnr_from_counts

    rng = np.random.default_rng(2)
    roi = rng.integers(0, 50, (40, 13))
    bg = rng.integers(0, 70, (40, 13))
    n_roi, n_bg = roi.sum(axis=1), bg.sum(axis=1)
    value = gcnr_from_counts(NP, roi, bg, n_roi, n_bg)
    wide = gcnr_from_counts(NP, np.pad(roi, ((0, 0), (0, 300))), np.pad(bg, ((0, 0), (0, 300))), n_roi, n_bg)
    np.testing.assert_array_equal(value, wide)
    for k in range(40):
        exact = 1 - sum(min(Fraction(int(a), int(n_roi[k])), Fraction(int(b), int(n_bg[k]))) for a, b in
                        zip(roi[k], bg[k], strict=True))
        assert value[k] == float(exact)


def test_sweep_covers_every_dtype_and_definition():
    """The sweep above reaches every dtype and every definition (its parameters are chosen for that)."""
    dtypes = {np.dtype(DTYPES[s % len(DTYPES)]) for s in range(5)}
    definitions = {DEFINITIONS[(s + FOOTPRINTS.index(f)) % len(DEFINITIONS)] for s in range(5) for f in FOOTPRINTS}
    assert dtypes == {np.dtype(d) for d in DTYPES}
    assert definitions == set(DEFINITIONS)


@pytest.mark.parametrize("dtype", ["int32", "uint32", "int64", "uint64", ">i4", "float16", "bool"])
def test_simulated_device_kernels_on_wide_and_odd_dtypes(sim, monkeypatch, dtype):
    """32/64-bit integers far from zero (the range meets in 64-bit atomics), big-endian and float16 input
    (made native first) and booleans: identical to the NumPy path."""
    rng = np.random.default_rng(7)
    base = random_images(rng, np.uint16, 3, 18, 21).astype(np.int64)
    offset = {"int32": -2**30, "uint32": 2**31, "int64": 2**40, "uint64": 2**63 + 2**20}.get(dtype, 0)
    if dtype == "bool":
        images = base % 2 == 0
    elif dtype == "float16":
        images = (base % 2000).astype(np.float16)
    else:
        images = (base.astype(np.uint64) + np.uint64(offset) if dtype == "uint64" else base + offset).astype(dtype)
    labels = np.zeros(images.shape, np.int32)
    labels[:, 4:9, 5:11] = 1
    labels[1:, 10:14, 3:6] = 2
    case = dict(images=images, labels=labels, table=None, lesions=None, padding=None,
                options=dict(background="complement", footprint="disk", dilation=2, border=1, ddof=1, min_bg=5,
                             definition="pooled", signed=False))
    got = run_batch(case)
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    assert_same_as_numpy(got, run_batch(case), f"dtype {dtype}")


def test_float_sums_are_deterministic_and_independent_of_the_batch(sim):
    """A float image's sums are the same bits run after run, and alone or beside other images (the image pass's
    block layout depends on the canvas height only; block partials are added in block order, never in atomics)."""
    rng = np.random.default_rng(3)
    images = rng.normal(1e4, 3.0, (3, 19, 23))
    shift = np.full(3, 1e4)
    vh, vw, pad = np.full(3, 19), np.array([23, 20, 17]), np.full(3, np.nan)
    first, _ = sim.image_totals(images, shift, vh, vw, 2, pad)
    again, _ = sim.image_totals(images, shift, vh, vw, 2, pad)
    alone, _ = sim.image_totals(images[1:2], shift[1:2], vh[1:2], vw[1:2], 2, pad[1:2])
    for k in ("n", "s1", "s2"):
        np.testing.assert_array_equal(getattr(first, k), getattr(again, k), err_msg=k)
        np.testing.assert_array_equal(getattr(first, k)[1:2], getattr(alone, k), err_msg=k)
    d = images[1, 2:17, 2:18] - 1e4
    np.testing.assert_allclose(first.s2[1], (d * d).sum(), rtol=1e-13)
    assert first.n[1] == d.size


def test_measure_backend_cupy_runs_the_simulated_kernels(sim, monkeypatch):
    """gpucnr.measure(backend="cupy") in the simulator mode: the device kernels, results equal to NumPy's."""
    case = make_case(1, "disk", "complement", n=3, size=(20, 24))
    rois = case["labels"] if case["labels"] is not None else table_columns(case["table"])
    before = sim.LAUNCHES["count"]
    ds = gpucnr.measure(case["images"], rois, backend="cupy", **case["options"])
    assert sim.LAUNCHES["count"] > before
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    ref = gpucnr.measure(case["images"], rois, backend="numpy", **case["options"])
    got = ([int(v) for v in ds.roi.values], {k: ds[k].values for k in (*COUNTS, *FLOATS)})
    expected = ([int(v) for v in ref.roi.values], {k: ref[k].values for k in (*COUNTS, *FLOATS)})
    assert_same_as_numpy(got, expected, "measure backend=cupy (simulated) vs numpy")


def test_fast_path_names_cuda_only_in_the_simulator_mode(monkeypatch):
    from gpucnr.backend import cupy_available, fast_path, resolve_backend

    monkeypatch.delenv("GPUCNR_CUDA_SIM", raising=False)
    assert fast_path(NP) == "numba-cpu"
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "1")
    assert fast_path(NP) == "cuda"
    assert resolve_backend("cupy") == "cupy"
    if _simulator_on():
        # NB: numba.cuda.is_available() is True under the simulator; gpucnr never asks it.
        from numba import cuda

        assert cuda.is_available()
        assert not cupy_available()


def test_launch_refuses_host_arrays_on_a_device(sim, monkeypatch):
    """Outside the simulator a NumPy argument is refused before the launch (numba would copy it silently)."""
    monkeypatch.setattr(sim, "_SIM", False)
    with pytest.raises(AssertionError, match="host array"):
        sim._launch(sim._float_finish, 1, 1, np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), np.zeros(1))


# ------------------------------------------------------------------------------------- compiled for a GPU

_PTX = """
import sys
from numba import cuda
import gpucnr.kernels._cuda as K
assert not K.simulated()
only = sys.argv[1] == "one"
done = 0
for name, sigs in K.signatures().items():
    for sig in (sigs[-1:] if only else sigs):
        ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=(9, 0))
        assert ".target sm_90" in ptx, name
        done += 1
print("compiled", done)
"""


def _compile_ptx(which: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUCNR_CUDA_SIM")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # NB: every signature (399) outlasted 30 minutes on the shared 2-core machine under a load of 8 to 10.
    proc = subprocess.run([sys.executable, "-c", _PTX, which], capture_output=True, text=True, env=env,
                          timeout=3600 if which == "all" else 1800)
    if "NvvmSupportError" in proc.stderr or "libNVVM cannot be found" in proc.stderr:
        pytest.skip("NVVM is not installed (pip install 'numba-cuda[cu13]')")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return int(proc.stdout.split()[-1])


def test_every_kernel_compiles_to_ptx_for_sm90():
    """Each kernel, for one signature, through NVVM for compute capability 9.0: the simulator runs Python, which
    accepts kernels a GPU cannot compile (the slow test below compiles every signature)."""
    from gpucnr.kernels import _cuda

    assert _compile_ptx("one") == len(_cuda.signatures())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GPUCNR_PTX_ALL") != "1",
                    reason="every signature takes several minutes on 2 cores: set GPUCNR_PTX_ALL=1 to compile them")
def test_every_kernel_signature_compiles_to_ptx_for_sm90():
    """Every kernel for every image and label dtype (`_cuda.signatures()`, 399 of them: tens of minutes on 2 shared
    cores). Opt-in: `make test` stays within its budget with one signature per kernel above."""
    from gpucnr.kernels import _cuda

    assert _compile_ptx("all") == sum(len(v) for v in _cuda.signatures().values())


# ------------------------------------------------------------------------------------- gCNR memory


def test_gcnr_memory_is_linear_in_the_batch_not_cells_times_the_largest_region():
    """One 180 x 180 lesion among 300 small ROIs: gCNR's temporaries stay O(pixels of the batch). The background
    extremes were a (cells, largest removed part) table (about 800 MB here, 800x the images); now a bisection
    per cell. Measured with tracemalloc on the portable path (the code every path shares)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    images = rng.normal(100.0, 5.0, (2, 256, 256))
    rows = [(0, 0, 0, 128, 128, 90)] + [(i, 1 + 150 * i + j, 0, int(x), int(y), 2) for i in range(2)
                                        for j, (x, y) in enumerate(rng.integers(10, 246, (150, 2)))]
    t = np.array(rows, np.int64)
    table = {k: t[:, c] for c, k in enumerate(("image", "col", "kind", "cx", "cy", "r"))}
    roi_ids = np.arange(len(rows), dtype=np.int64)
    params = Params(definition="gcnr")
    tracemalloc.start()
    try:
        out = measure_batch(NP, images, roi_ids=roi_ids, params=params, table=table, fast=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30 * images.nbytes, f"peak {peak / 1e6:.0f} MB for {images.nbytes / 1e6:.0f} MB of images"
    assert np.isfinite(out["cnr"][0, 0]) and 0 <= out["cnr"][0, 0] <= 1


# ------------------------------------------------------------------------------------- launches and host reads


@pytest.fixture
def counting(sim, monkeypatch):
    """array-api-strict arrays standing for device arrays (the simulated kernels take the NumPy buffer they wrap),
    with every host read counted: ``__bool__/__int__/__float__/__index__``, host transfers (``__dlpack__``,
    ``__array__``) and data-dependent shapes (nonzero, unique_*, boolean indexing) — each one a device->host
    synchronisation on a GPU. Yields ``(xps, counts)``; ``counts["launches"]`` counts the kernel launches."""
    xps = pytest.importorskip("array_api_strict")
    from array_api_strict._array_object import Array

    counts = {"sync": 0, "launches": 0}

    def spy(name):
        real = getattr(Array, name)

        def wrapper(self, *args, **kwargs):
            counts["sync"] += 1
            return real(self, *args, **kwargs)

        return wrapper

    for name in ("__bool__", "__int__", "__float__", "__index__", "__dlpack__", "__array__"):
        if hasattr(Array, name):
            monkeypatch.setattr(Array, name, spy(name))
    real_getitem = Array.__getitem__

    def getitem(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, Array) and k.dtype == xps.bool for k in keys):
            counts["sync"] += 1
        return real_getitem(self, key)

    monkeypatch.setattr(Array, "__getitem__", getitem)
    for name in ("nonzero", "unique_all", "unique_counts", "unique_inverse", "unique_values"):
        real = getattr(xps, name)

        def data_dependent(*args, _real=real, **kwargs):
            counts["sync"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(xps, name, data_dependent)
    real_launch = sim._launch

    def launch(*args):
        counts["launches"] += 1
        return real_launch(*args)

    monkeypatch.setattr(sim, "_launch", launch)
    return xps, counts


def _counted_batch(xps, counts, rois: str, background: str, definition: str, n_rois: int, dtype=np.uint16):
    """One batch on array-api-strict arrays with its launches and host reads counted. `rois`: "table", "labels"
    (ids given) or "labels-found" (roi_ids=None: the batch's ids are found on the device)."""
    found = rois == "labels-found"
    rois = "labels" if found else rois
    rng = np.random.default_rng(0)
    n, h, w = 2, 18, 18
    host = rng.integers(0, 4000, (n, h, w)).astype(dtype) if dtype != np.float64 else rng.normal(0, 1, (n, h, w))
    options = dict(background=background, definition=definition, min_bg=5)
    labels = table = lesions = None
    if background == "label":
        options["background_label"] = 9
    if rois == "labels":
        lab = np.zeros((n, h, w), np.int32)
        for k in range(n_rois):
            lab[:, 2 + (k % 4) * 4: 4 + (k % 4) * 4, 2 + (k // 4) * 3: 4 + (k // 4) * 3] = k + 1
        lab[:, 16:, :] = 9 if background == "label" else 0
        labels = xps.asarray(lab)
        roi_ids = xps.asarray(np.arange(1, n_rois + 1, dtype=np.int64))
        lesions = labels if background == "label" else None
    else:
        rows = np.array([(i, k, k % 2, 3 + (k % 5) * 3, 3 + (k // 5) * 3, 2) for i in range(n) for k in range(n_rois)])
        table = {c: xps.asarray(rows[:, j].astype(np.int64)) for j, c in enumerate(("image", "col", "kind", "cx", "cy",
                                                                                    "r"))}
        roi_ids = xps.asarray(np.arange(n_rois, dtype=np.int64))
        if background == "label":
            lesions = xps.asarray(np.broadcast_to(np.where(np.arange(h)[:, None] >= 16, 9, 0), (n, h, w)).astype(
                np.int32))
    counts.update(sync=0, launches=0)
    out = measure_batch(xps, xps.asarray(host), roi_ids=None if found else roi_ids, params=Params(**options),
                        labels=labels, table=table, lesions=lesions)
    assert out["roi_ids"].shape[0] == n_rois
    return dict(counts)


#: The issue's targets per batch, for geometric, label and table ROIs, every background, gCNR and the ill-conditioned
#: recompute included: kernel launches and device->host reads (docs/gpu.md has the measured table).
MAX_LAUNCHES, MAX_READS = 12, 2


#: (definition, ROI source, background, dtype): every source x background x dtype for a moment definition; gCNR
#: and MRQy (whose own kernels do not depend on the image's integer or float moments) on float images.
COUNTED = [("pooled", rois, background, dtype) for rois in ("table", "labels", "labels-found")
           for background in BACKGROUNDS for dtype in ("uint16", "float64")]
COUNTED += [("gcnr", rois, background, "float64") for rois in ("table", "labels-found") for background in BACKGROUNDS]
# NB: MRQy's kernel visits each cell's whole image twice, slow in the simulator: two cases (its launches and reads
# are those of the moments plus its one launch; docs/gpu.md has every row).
COUNTED += [("mrqy", "table", "complement", "float64"), ("mrqy", "labels-found", "complement-all", "float64")]


@pytest.mark.parametrize(("definition", "rois", "background", "dtype"), COUNTED, ids=["-".join(c) for c in COUNTED])
def test_launches_and_host_reads_per_batch(counting, definition, rois, background, dtype):
    """Per batch: at most 12 kernel launches and 2 host reads, the same for 2 and 5 ROI ids, for ROI tables, label
    arrays with their ids given and found on the device (roi_ids=None), every background (complement-all's union on
    the device), gCNR (extremes, bins, edges and histograms on the device). The two reads: the input checks with
    the valid extents (and the label range), and the window kernels' slot sizes (with the float plan's range, and
    the presence of the candidate label ids, in one transfer)."""
    xps, counts = counting
    few = _counted_batch(xps, counts, rois, background, definition, 2, np.dtype(dtype).type)
    many = _counted_batch(xps, counts, rois, background, definition, 5, np.dtype(dtype).type)
    assert 1 <= few["launches"] <= MAX_LAUNCHES and 1 <= many["launches"] <= MAX_LAUNCHES, (few, many)
    assert few["sync"] == many["sync"], (few, many)
    assert few["sync"] <= MAX_READS, few


@pytest.mark.parametrize("rois", ["table", "labels-found"])
def test_viqa_runs_in_the_device_status_kernel(counting, rois):
    """vIQA's signed CNR is formed by the device's status/CNR kernel (`_finish`), within the same budget."""
    xps, counts = counting
    from gpucnr.kernels import _cuda

    before = _cuda.LAUNCHES.get("_finish", 0)
    got = _counted_batch(xps, counts, rois, "complement", "viqa", 3, np.float64)
    assert _cuda.LAUNCHES.get("_finish", 0) > before
    assert 1 <= got["launches"] <= MAX_LAUNCHES and got["sync"] <= MAX_READS, got


def test_simulated_kernels_from_several_host_threads(sim, monkeypatch):
    """The pipeline measures batches on several threads: simulated launches from two threads at once must not mix
    (the simulator swaps module globals during a launch; `_cuda` serialises them)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [make_case(seed, "disk", "ring", n=2, size=(12, 16)) for seed in (0, 1, 2, 3)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(run_batch, cases))
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    for case, result in zip(cases, got, strict=True):
        assert_same_as_numpy(result, run_batch(case), "threads")


def test_run_backend_cupy_through_the_simulated_kernels(sim, monkeypatch, tmp_path):
    """gpucnr.run(backend="cupy") over a stack in the simulator mode (batches on the pipeline's threads): the device
    kernels ran, and the results equal backend="numpy" (counts identical, floats within 1e-12)."""
    from gpucnr.phantom import make_phantom

    ph = make_phantom(6, (64, 64), lesions=3, radius=6, margin=8, seed=2)
    gpucnr.write_stack(tmp_path / "s.zarr", ph.images, rois=ph.rois.assign(kind="square", r=4), shard=3)
    before = sim.LAUNCHES["count"]
    got = gpucnr.run(tmp_path / "s.zarr", tmp_path / "device.zarr", backend="cupy").load()
    assert sim.LAUNCHES["count"] > before
    monkeypatch.setenv("GPUCNR_CUDA_SIM", "0")
    ref = gpucnr.run(tmp_path / "s.zarr", tmp_path / "numpy.zarr", backend="numpy").load()
    assert_same_as_numpy(([int(v) for v in got.roi.values], {k: got[k].values for k in (*COUNTS, *FLOATS)}),
                         ([int(v) for v in ref.roi.values], {k: ref[k].values for k in (*COUNTS, *FLOATS)}),
                         "run backend=cupy (simulated) vs numpy")
