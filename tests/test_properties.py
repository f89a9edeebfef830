"""Property tests (hypothesis): affine invariance of the moment CNRs, backends agree, gCNR in [0, 1].

DESIGN §4: "Affine invariance holds for a > 0 (any a != 0 unsigned) and for the moment definitions";
DESIGN §1: identical counts, floating results within 1e-12 relative across backends.
"""

from __future__ import annotations

import array_api_compat
import array_api_strict
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpucnr
from gpucnr.backend import cupy_available, to_host
from gpucnr.kernels.batch import measure_batch
from gpucnr.kernels.masks import KIND_DISK, KIND_SQUARE
from gpucnr.kernels.params import Params

MOMENT_DEFINITIONS = ("pooled", "background", "roi", "pooled-mean")
DTYPES = ("uint8", "uint16", "int16", "float32", "float64")
NP = array_api_compat.array_namespace(np.empty(0))
# Fixed seeds: hypothesis derandomised (the same examples every run), nothing written to a database.
PROFILE = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


def random_images(seed: int, dtype: str, n: int, height: int, width: int) -> np.ndarray:
    """Noisy images with a brighter blob, in the value range of `dtype`."""
    rng = np.random.default_rng(seed)
    base = {"uint8": 100.0, "uint16": 30000.0, "int16": -500.0, "float32": 3.0, "float64": -2e3}[dtype]
    sigma = {"uint8": 8.0, "uint16": 40.0, "int16": 25.0, "float32": 0.5, "float64": 7.0}[dtype]
    img = base + rng.normal(0.0, sigma, (n, height, width))
    yy, xx = np.mgrid[:height, :width]
    for i in range(n):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        img[i] += 3 * sigma * (((yy - cy) ** 2 + (xx - cx) ** 2) < rng.integers(9, 100))
    if dtype[0] in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(img), info.min, info.max).astype(dtype)
    return img.astype(dtype)


def random_table(seed: int, n: int, height: int, width: int, max_rois: int) -> dict:
    """Random geometric ROIs (some clipped by the edge), at most one per (image, roi id)."""
    rng = np.random.default_rng(seed + 1)
    rows = [(0, 6, "square", width // 2, height // 2, 4)]  # one ROI that always has room for its background
    for i in range(n):
        ids = rng.choice(np.arange(1, 6), size=rng.integers(1, max_rois + 1), replace=False)
        for rid in ids:
            rows.append((i, int(rid), ["square", "disk"][rng.integers(0, 2)], int(rng.integers(-2, width + 2)),
                         int(rng.integers(-2, height + 2)), int(rng.integers(1, 7))))
    cols = list(zip(*rows, strict=True))
    return dict(zip(("image", "roi", "kind", "cx", "cy", "r"), map(list, cols), strict=True))


# --------------------------------------------------------------------------------------------------------------
# Affine invariance
# --------------------------------------------------------------------------------------------------------------

affine_case = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "dtype": st.sampled_from(DTYPES),
    "definition": st.sampled_from(MOMENT_DEFINITIONS),
    "background": st.sampled_from(("complement", "ring", "complement-all")),
    "ddof": st.sampled_from((0, 1)),
    "a_abs": st.floats(1e-2, 1e2),
    "b": st.floats(-1e4, 1e4),
})


def _measure(images, table, **kw):
    return gpucnr.measure(images, table, backend="numpy", **kw)


@settings(max_examples=35, **PROFILE)
@given(case=affine_case, negative=st.booleans())
def test_unsigned_cnr_invariant_to_affine_maps(case, negative):
    """Unsigned: CNR(a*x + b) == CNR(x) for any a != 0; status and counts unchanged."""
    images = random_images(case["seed"], case["dtype"], 2, 48, 52)
    table = random_table(case["seed"], 2, 48, 52, 3)
    a = -case["a_abs"] if negative else case["a_abs"]
    kw = {"definition": case["definition"], "background": case["background"], "ddof": case["ddof"]}
    before = _measure(images, table, **kw)
    assert before.status.values[0, -1] == 0
    after = _measure(a * images.astype(np.float64) + case["b"], table, **kw)
    _assert_same_cells(before, after)
    np.testing.assert_allclose(after.cnr.values, before.cnr.values, rtol=1e-7, atol=0, equal_nan=True)
    np.testing.assert_allclose(after.cnr_median.values, before.cnr_median.values, rtol=1e-7, equal_nan=True)
    np.testing.assert_allclose(after.var_roi.values, a * a * before.var_roi.values, rtol=1e-7, equal_nan=True)
    np.testing.assert_allclose(after.mean_bg.values, a * before.mean_bg.values + case["b"], rtol=1e-7,
                               atol=1e-9 * (abs(a) * 4e4 + abs(case["b"])), equal_nan=True)


@settings(max_examples=30, **PROFILE)
@given(case=affine_case, negative=st.booleans())
def test_signed_cnr_flips_sign_with_a(case, negative):
    """signed=True: a > 0 keeps the signed CNR, a < 0 negates it; status and counts unchanged."""
    images = random_images(case["seed"], case["dtype"], 2, 48, 52)
    table = random_table(case["seed"], 2, 48, 52, 3)
    a = -case["a_abs"] if negative else case["a_abs"]
    kw = {"definition": case["definition"], "background": case["background"], "ddof": case["ddof"], "signed": True}
    before = _measure(images, table, **kw)
    assert before.status.values[0, -1] == 0
    after = _measure(a * images.astype(np.float64) + case["b"], table, **kw)
    _assert_same_cells(before, after)
    expected = -before.cnr.values if negative else before.cnr.values
    np.testing.assert_allclose(after.cnr.values, expected, rtol=1e-7, atol=0, equal_nan=True)
    ok = before.status.values == 0
    assert np.all(np.sign(after.cnr.values[ok]) == np.sign(expected[ok]))


def _assert_same_cells(before, after):
    for k in ("status", "n_roi", "n_bg", "n_valid", "n_excluded"):
        np.testing.assert_array_equal(after[k].values, before[k].values, err_msg=k)


def test_affine_invariance_can_fail():
    """The invariance check is not vacuous: a non-affine map (x**2) does change the CNR of the same cells."""
    images = random_images(3, "float64", 2, 48, 52)
    table = random_table(3, 2, 48, 52, 3)
    before = _measure(images, table)
    assert (before.status.values == 0).any()
    after = _measure((images.astype(np.float64) + 3e3) ** 2, table)
    ok = before.status.values == 0
    assert not np.allclose(after.cnr.values[ok], before.cnr.values[ok], rtol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Backends agree
# --------------------------------------------------------------------------------------------------------------

MOMENTS = ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr", "cnr_median")
COUNTS = ("n_roi", "n_bg", "status", "n_valid", "n_excluded")


def _run(xp, images, labels, table, roi_ids, params, fast):
    images = xp.asarray(images)
    labels = None if labels is None else xp.asarray(labels)
    if table is not None:
        table = {k: xp.asarray(v) for k, v in table.items()}
    ids = None if roi_ids is None else xp.asarray(roi_ids)
    out = measure_batch(xp, images, roi_ids=ids, params=params, labels=labels, table=table, fast=fast)
    return {k: to_host(v) for k, v in out.items()}


def _namespaces():
    spaces = [("numpy-fast", NP, True), ("numpy-portable", NP, False), ("array_api_strict", array_api_strict, True)]
    if cupy_available():
        import array_api_compat.cupy as cupy_ns

        spaces += [("cupy-fast", cupy_ns, True), ("cupy-portable", cupy_ns, False)]
    return spaces


backend_case = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "dtype": st.sampled_from(DTYPES),
    "n": st.integers(1, 3),
    "height": st.integers(16, 40),
    "width": st.integers(16, 40),
    "rois": st.sampled_from(("table", "labels")),
    "background": st.sampled_from(("complement", "ring", "complement-all")),
    "footprint": st.sampled_from(("cross", "disk", "matlab-disk", "square")),
    "ddof": st.sampled_from((0, 1)),
    "definition": st.sampled_from(("pooled", "background", "gcnr")),
    "nan": st.booleans(),
})


@settings(max_examples=35, **PROFILE)
@given(case=backend_case)
def test_backends_agree(case):
    """numpy fast path, numpy portable path and array_api_strict (and CuPy when usable) give identical counts
    and status, and moments/CNR within 1e-12 relative, on random small stacks."""
    n, h, w = case["n"], case["height"], case["width"]
    images = random_images(case["seed"], case["dtype"], n, h, w)
    if case["nan"] and images.dtype.kind == "f":
        images[0, h // 2, : w // 3] = np.nan
    labels = table = roi_ids = None
    if case["rois"] == "labels":
        rng = np.random.default_rng(case["seed"] + 2)
        labels = np.zeros((n, h, w), np.int32)
        for i in range(n):
            # NB: image 0 always has a label: a batch without any ROI is covered in test_api.py.
            for rid in rng.choice(np.arange(1, 5), size=rng.integers(0 if i else 1, 4), replace=False):
                y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
                labels[i, y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = rid
    else:
        t = random_table(case["seed"], n, h, w, 3)
        roi_ids = np.unique(t["roi"]).astype(np.int64)
        kinds = {"square": KIND_SQUARE, "disk": KIND_DISK}
        table = {"image": np.asarray(t["image"], np.int64), "col": np.searchsorted(roi_ids, t["roi"]).astype(np.int64),
                 "kind": np.asarray([kinds[k] for k in t["kind"]], np.int64), "cx": np.asarray(t["cx"], np.int64),
                 "cy": np.asarray(t["cy"], np.int64), "r": np.asarray(t["r"], np.int64)}
    params = Params(background=case["background"], footprint=case["footprint"], ddof=case["ddof"],
                    definition=case["definition"], min_bg=10)
    results = [(name, _run(xp, images, labels, table, roi_ids, params, fast)) for name, xp, fast in _namespaces()]
    ref_name, ref = results[0]
    for name, got in results[1:]:
        np.testing.assert_array_equal(got["roi_ids"], ref["roi_ids"], err_msg=f"{name} vs {ref_name}: roi_ids")
        for k in COUNTS:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name} vs {ref_name}: {k}")
        for k in MOMENTS:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=0, equal_nan=True,
                                       err_msg=f"{name} vs {ref_name}: {k}")


# --------------------------------------------------------------------------------------------------------------
# gCNR
# --------------------------------------------------------------------------------------------------------------


@settings(max_examples=30, **PROFILE)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
       bins=st.one_of(st.just("auto"), st.integers(1, 64)),
       background=st.sampled_from(("complement", "ring", "complement-all")))
def test_gcnr_in_unit_interval(seed, dtype, bins, background):
    images = random_images(seed, dtype, 2, 40, 44)
    table = random_table(seed, 2, 40, 44, 3)
    ds = _measure(images, table, definition="gcnr", gcnr_bins=bins, background=background, min_bg=10)
    ok = ds.status.values == 0
    values = ds.cnr.values[ok]
    assert np.all(np.isfinite(values))
    assert np.all((values >= 0) & (values <= 1)), values
    assert np.all(np.isnan(ds.cnr.values[~ok]))


def test_gcnr_extremes():
    """Fully separated ROI and background give gCNR 1; identical distributions give gCNR near 0."""
    img = np.zeros((1, 60, 60), np.float64)
    img[0, 20:30, 20:30] = 100.0
    img += np.random.default_rng(0).uniform(0, 1, img.shape)
    table = {"image": [0], "roi": [1], "kind": ["square"], "cx": [25], "cy": [25], "r": [5]}
    ds = _measure(img, table, definition="gcnr")
    assert ds.status.item() == 0 and ds.cnr.item() == 1.0
    flat = np.random.default_rng(1).uniform(0, 1, (1, 60, 60))
    ds = _measure(flat, table, definition="gcnr")
    assert 0.0 <= ds.cnr.item() < 0.35
