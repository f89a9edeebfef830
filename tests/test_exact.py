"""Exact at the extremes of the types (issue 10; docs/accuracy.md, "Exact arithmetic at the edges of the types").

Every integer dtype (bool, int8..int64, uint8..uint64) and float dtype (float16, float32, float64), native or
big-endian, contiguous or not, at offsets up to the ends of the types: counts exact, and CNR, means and
variances within 1e-9 relative of `fractions.Fraction` arithmetic on the exact pixel values — or status 7
(numeric-range) where that is impossible by construction. Both the NumPy fast path (gpucnr.measure) and the
portable path (measure_batch(fast=False), array_api_strict) are checked against the same reference.
"""

from __future__ import annotations

import math
from fractions import Fraction

import array_api_compat
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import gpucnr
from gpucnr.backend import to_host
from gpucnr.errors import InputError, LabelRangeError
from gpucnr.kernels.batch import measure_batch
from gpucnr.kernels.params import Params

NP = array_api_compat.array_namespace(np.empty(0))
PROFILE = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
REL = 1e-9
TINY = 2.0**-1022  # below: float64 subnormals, whose spacing (2**-1074) bounds what any result can hold
H, W = 20, 24
ROI = (12, 10, 3)  # cx, cy, r: a 6 x 6 square in the middle
OPTIONS = dict(dilation=2, border=2, ddof=1, min_bg=30)
NUMERIC_RANGE = 7

INTS = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
FLOATS = ("float16", "float32", "float64")


# --------------------------------------------------------------------------------------------------------------
# The exact reference
# --------------------------------------------------------------------------------------------------------------


def regions():
    """The pinned geometry: square ROI, complement background (cross dilated twice, 2-px frame removed)."""
    cx, cy, r = ROI
    roi = np.zeros((H, W), bool)
    roi[cy - r : cy + r, cx - r : cx + r] = True
    bg = ~ndimage.binary_dilation(roi, iterations=OPTIONS["dilation"])
    b = OPTIONS["border"]
    bg[:b] = bg[-b:] = False
    bg[:, :b] = bg[:, -b:] = False
    return roi, bg


def exact_values(pixels) -> list[Fraction]:
    if pixels.dtype.kind == "f":
        return [Fraction(float(v)) for v in pixels.tolist()]
    return [Fraction(int(v)) for v in pixels.tolist()]


def exact_region(values: list[Fraction], ddof: int):
    n = len(values)
    mean = sum(values, Fraction(0)) / n if n else None
    var = sum(((v - mean) ** 2 for v in values), Fraction(0)) / (n - ddof) if n > ddof else None
    return n, mean, var


def exact_cell(image) -> dict:
    """Exact n, mean, variance of ROI and background, the status and the exact squared pooled CNR."""
    roi, bg = regions()
    ddof = OPTIONS["ddof"]
    values = exact_values(image[np.ones((H, W), bool)])
    n_r, m_r, v_r = exact_region(exact_values(image[roi]), ddof)
    n_b, m_b, v_b = exact_region(exact_values(image[bg]), ddof)
    spread = max(values) - min(values)
    if image.dtype.kind == "f":
        out_of_range = not math.isfinite(float(image.max()) - float(image.min()))
    else:
        out_of_range = spread >= 2**63
    status, cnr2 = 0, None
    if n_r <= ddof:
        status = 3
    elif n_b <= ddof or n_b < OPTIONS["min_bg"]:
        status = 4
    elif out_of_range:
        status = NUMERIC_RANGE
    elif v_r + v_b == 0:
        status = 5
    else:
        cnr2 = (m_r - m_b) ** 2 / (v_r + v_b)
    return dict(n_roi=n_r, mean_roi=m_r, var_roi=v_r, n_bg=n_b, mean_bg=m_b, var_bg=v_b, status=status, cnr2=cnr2,
                diff=m_r - m_b)


def assert_exact(got: float, exact: Fraction | None, what: str):
    """`got` within REL relative of `exact`, where float64 can hold it: a value beyond float64's largest
    must read as an infinity of its sign, one in the subnormal range within 2 subnormal steps."""
    if exact is None:
        assert math.isnan(got), f"{what}: expected NaN, got {got!r}"
        return
    try:
        nearest = float(exact)
    except OverflowError:
        assert math.isinf(got) and (got > 0) == (exact > 0), f"{what}: {got!r}, exact overflows float64"
        return
    assert math.isfinite(got), f"{what}: {got!r} vs exact {nearest!r}"
    err = abs(Fraction(got) - exact)
    if abs(nearest) < TINY:
        assert err <= 2 * Fraction(2.0**-1074) + REL * abs(exact), f"{what}: {got!r} vs exact {nearest!r}"
        return
    assert err <= REL * abs(exact), f"{what}: {got!r} vs exact {nearest!r}, relative error {float(err / abs(exact))}"


def check(got: dict, images, what: str):
    for i in range(images.shape[0]):
        ref = exact_cell(np.asarray(images[i]))
        w = f"{what} image {i}"
        assert int(got["status"][i, 0]) == ref["status"], f"{w}: status {got['status'][i, 0]} != {ref['status']}"
        assert int(got["n_roi"][i, 0]) == ref["n_roi"] and int(got["n_bg"][i, 0]) == ref["n_bg"], f"{w}: counts"
        if ref["status"] == NUMERIC_RANGE:
            for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr"):
                assert math.isnan(float(got[k][i, 0])), f"{w}: {k} must be NaN with status numeric-range"
            continue
        for k in ("mean_roi", "var_roi", "mean_bg", "var_bg"):
            assert_exact(float(got[k][i, 0]), ref[k], f"{w}: {k}")
        cnr = float(got["cnr"][i, 0])
        if ref["status"] == 0:
            expected = math.sqrt(float(ref["cnr2"]))
            assert abs(cnr - expected) <= REL * expected, f"{w}: cnr {cnr!r} vs exact {expected!r}"
        elif ref["status"] == 5:
            assert (math.isinf(cnr) if ref["diff"] != 0 else math.isnan(cnr)), f"{w}: zero-noise cnr {cnr!r}"


# --------------------------------------------------------------------------------------------------------------
# The three paths
# --------------------------------------------------------------------------------------------------------------


def table(n):
    cx, cy, r = ROI
    return {"image": list(range(n)), "roi": [1] * n, "kind": ["square"] * n, "cx": [cx] * n, "cy": [cy] * n,
            "r": [r] * n}


def run_measure(images):
    ds = gpucnr.measure(images, table(images.shape[0]), backend="numpy", **OPTIONS)
    return {k: ds[k].values for k in ds.data_vars}


def run_batch(xp, images, fast):
    n = images.shape[0]
    cx, cy, r = ROI
    cols = {"image": list(range(n)), "col": [0] * n, "kind": [0] * n, "cx": [cx] * n, "cy": [cy] * n, "r": [r] * n}
    tab = {k: xp.asarray(np.asarray(v, np.int64)) for k, v in cols.items()}
    out = measure_batch(xp, images if xp is NP else xp.asarray(images), roi_ids=xp.asarray(np.array([1], np.int64)),
                        params=Params(**OPTIONS), table=tab, fast=fast)
    return {k: to_host(v) for k, v in out.items()}


def check_all_paths(images, what):
    check(run_measure(images), images, f"measure {what}")
    check(run_batch(NP, images, False), images, f"portable {what}")
    if images.dtype.isnative and images.dtype != np.float16:
        import array_api_strict

        check(run_batch(array_api_strict, np.ascontiguousarray(images), True), images, f"array_api_strict {what}")


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def lesion_mask():
    roi, _ = regions()
    return roi


def int_images(seed, dtype, offset, sigma, contrast, n=2):
    """Integers offset + noise (|noise| <= sigma) and, in the ROI, + contrast * sigma; clipped to the type."""
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype) if dtype != np.bool_ else None
    lo, hi = (0, 1) if info is None else (int(info.min), int(info.max))
    rng = np.random.default_rng(seed)
    roi = lesion_mask()
    out = []
    for _ in range(n):
        noise = rng.integers(-(2**62), 2**62, (H, W), dtype=np.int64)
        # NB: Python integers: sigma up to 2**62 and offsets up to 2**64 - 1 overflow every NumPy dtype.
        vals = [[offset + (int(v) * sigma >> 62) + (contrast * sigma if roi[y, x] else 0) for x, v in enumerate(row)]
                for y, row in enumerate(noise.tolist())]
        out.append([[min(max(v, lo), hi) for v in row] for row in vals])
    if info is None:
        return np.array(out, dtype=object).astype(np.int64).astype(bool)
    return np.array(out, dtype=object).astype(dtype)


def float_images(seed, dtype, offset, scale, contrast, n=2):
    rng = np.random.default_rng(seed)
    roi = lesion_mask()
    img = offset + scale * (rng.standard_normal((n, H, W)) + contrast * roi)
    return img.astype(dtype)


def layout(images, big_endian, contiguous):
    if big_endian and images.dtype.itemsize > 1:
        images = images.astype(images.dtype.newbyteorder(">"))
    if not contiguous:
        wide = np.zeros((*images.shape[:2], 2 * images.shape[2]), images.dtype)
        wide[..., ::2] = images
        images = wide[..., ::2]
    return images


# --------------------------------------------------------------------------------------------------------------
# The property test
# --------------------------------------------------------------------------------------------------------------

INT_OFFSETS = (0, 2**20, 2**40, 2**60, 2**63, 2**64 - 2**12, -(2**62), "min", "max")
INT_SIGMAS = (1, 7, 1000, 2**20, 2**40, 2**61)
FLOAT_CASES = {  # (offset, scale) per dtype, within what the type can hold
    "float64": ((0.0, 1.0), (1e12, 1.0), (1e15, 1.0), (1e300, 1e290), (0.0, 1e300), (-1e300, 1e295), (0.0, 5e-324 * 8),
                (5e-324 * 1000, 5e-324 * 20), (1e308, 1e300), (1.0, 1e-200)),
    "float32": ((0.0, 1.0), (1e6, 1.0), (1e12, 1e6), (0.0, 1e37), (0.0, 2.0**-149 * 8), (1e-30, 1e-38)),
    "float16": ((0.0, 1.0), (1000.0, 3.0), (0.0, 2.0**-24 * 8), (6e4, 200.0)),
}


@st.composite
def exact_case(draw):
    dtype = draw(st.sampled_from(INTS + FLOATS))
    case = {"dtype": dtype, "seed": draw(st.integers(0, 2**31 - 1)), "big": draw(st.booleans()),
            "contiguous": draw(st.booleans()), "contrast": draw(st.sampled_from((0, 3)))}
    if dtype in FLOATS:
        case["offset"], case["scale"] = draw(st.sampled_from(FLOAT_CASES[dtype]))
    else:
        case["offset"] = draw(st.sampled_from(INT_OFFSETS))
        case["sigma"] = draw(st.sampled_from(INT_SIGMAS))
    return case


def make(case):
    dtype = np.dtype(case["dtype"])
    if dtype.kind == "f":
        images = float_images(case["seed"], dtype, case["offset"], case["scale"], case["contrast"])
    else:
        lo, hi = (0, 1) if dtype == np.bool_ else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
        offset = {"min": lo, "max": hi}.get(case["offset"], case["offset"])
        images = int_images(case["seed"], dtype, offset, case["sigma"], case["contrast"])
    return layout(images, case["big"], case["contiguous"])


@settings(max_examples=150, **PROFILE)
@given(case=exact_case())
def test_every_dtype_offset_and_byte_order_against_fractions(case):
    """Hypothesis over dtypes, offsets (0, 2**20, 2**40, 2**60, 2**63, the ends of the type; 1e12, 1e15, 1e300,
    1e308, subnormal scales), byte orders and layouts: both paths equal exact rational arithmetic."""
    check_all_paths(make(case), str(case))


# --------------------------------------------------------------------------------------------------------------
# The red team's cases (issue 10), by name
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [2**40, 2**60, 2**63 - 2**20], ids=["2^40", "2^60", "2^63"])
def test_int64_far_from_zero(offset):
    """int64 above 2**40 (was 2.3e-9 relative) and 2**60 (was 3.8e-4)."""
    check_all_paths(int_images(1, np.int64, offset, 1000, 3), f"int64 at {offset}")


@pytest.mark.parametrize("offset", [2**63, 2**63 + 2**40, 2**64 - 2**16], ids=["2^63", "2^63+2^40", "2^64-2^16"])
def test_uint64_at_and_above_2_63(offset):
    """uint64 at or above 2**63 (was 1.6e-2 .. 1.8e-2 relative)."""
    check_all_paths(int_images(2, np.uint64, offset, 1000, 3), f"uint64 at {offset}")


@pytest.mark.parametrize("offset", [1e12, 1e15])
def test_float64_large_offset_unit_noise(offset):
    """float64 at 1e12 (was 9.1e-5 relative) and 1e15 (was 1.8e-2) with noise 1."""
    check_all_paths(float_images(3, np.float64, offset, 1.0, 3), f"float64 at {offset}")


def test_values_near_1e308():
    """Values near 1e308 (was CNR NaN with status ok, n_valid 1): the CNR is exact, the variance (1e600) reads
    inf — float64 cannot hold it — with status ok."""
    images = float_images(4, np.float64, 1e308, 1e300, 3)
    check_all_paths(images, "float64 near 1e308")
    ds = gpucnr.measure(images, table(2), backend="numpy", **OPTIONS)
    assert (ds.status.values == 0).all() and (ds.n_valid.values == 1).all()
    assert np.isfinite(ds.cnr.values).all() and np.isfinite(ds.cnr_median.values).all()


def test_subnormal_values():
    """Subnormal pixels (was inf with status zero-noise; the true CNR is finite): exact CNR, status ok."""
    rng = np.random.default_rng(5)
    roi = lesion_mask()
    steps = np.rint(rng.normal(40, 6, (2, H, W)) + 20 * roi)
    images = steps * 5e-324
    assert (images > 0).all() and (images < 2.0**-1022).all()
    check_all_paths(images, "subnormal float64")
    ds = gpucnr.measure(images, table(2), backend="numpy", **OPTIONS)
    assert (ds.status.values == 0).all()
    expected = [math.sqrt(float(exact_cell(images[i])["cnr2"])) for i in range(2)]
    np.testing.assert_allclose(ds.cnr.values[:, 0], expected, rtol=REL)


def test_wide_integers_use_exact_limbs():
    """int64 noise of 2**61 and uint32/int32 over their whole range: squares beyond one int64 word."""
    check_all_paths(int_images(6, np.int64, 0, 2**61, 1), "int64 sigma 2**61")
    check_all_paths(int_images(7, np.uint32, 2**31, 2**31, 0), "uint32 full range")
    check_all_paths(int_images(8, np.int32, 0, 2**31, 0), "int32 full range")


def test_one_wide_image_in_a_batch_of_narrow_ones():
    """A batch holding one wide image sums every image with limbs; the narrow images' results are unchanged."""
    narrow = int_images(9, np.int64, 2**40, 1000, 3, n=3)
    wide = int_images(10, np.int64, 0, 2**61, 3, n=1)
    both = np.concatenate([narrow, wide])
    check_all_paths(both, "mixed batch")
    alone = run_measure(narrow)
    mixed = run_measure(both)
    for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr"):
        np.testing.assert_array_equal(mixed[k][:3], alone[k], err_msg=k)


def test_numeric_range_integers():
    """An int64 image spanning more than 2**63 (and a uint64 one spanning 2**64 - 1) has status numeric-range,
    exact counts and NaN moments; the other image of the batch is measured."""
    images = int_images(11, np.int64, 0, 1000, 3)
    images[1, 0, 0] = -(2**63)
    images[1, -1, -1] = 2**63 - 1
    check_all_paths(images, "int64 numeric range")
    u = int_images(12, np.uint64, 2**40, 1000, 3)
    u[0, 0, 0], u[0, 0, 1] = 0, 2**64 - 1
    check_all_paths(u, "uint64 numeric range")
    ds = gpucnr.measure(u, table(2), backend="numpy", **OPTIONS)
    assert ds.status.values[0, 0] == gpucnr.STATUS["numeric-range"] == NUMERIC_RANGE
    assert "7=numeric-range" in ds.attrs["status_codes"]


def test_numeric_range_floats():
    """A float64 image whose spread overflows float64 (-1e308 .. 1e308) has status numeric-range."""
    images = float_images(13, np.float64, 0.0, 1.0, 3)
    images[0, 0, 0], images[0, 0, 1] = -1e308, 1e308
    check_all_paths(images, "float64 numeric range")
    assert run_measure(images)["status"][0, 0] == NUMERIC_RANGE


@pytest.mark.parametrize("dtype", [">u2", ">i4", ">f4", ">f8", "float16", ">f2"])
def test_big_endian_and_float16_are_measured(dtype):
    """Big-endian arrays (was an uncoded Numba TypingError) and float16 (was NotImplementedError)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        images = float_images(14, dtype, 100.0, 2.0, 3)
    else:
        images = int_images(14, dtype.newbyteorder("="), 1000, 20, 3).astype(dtype)
    check_all_paths(images, str(dtype))
    native = run_measure(images.astype(images.dtype.newbyteorder("=")))
    got = run_measure(images)
    for k in ("n_roi", "n_bg", "status", "mean_roi", "var_roi", "mean_bg", "var_bg", "cnr"):
        np.testing.assert_array_equal(got[k], native[k], err_msg=k)


def test_big_endian_labels():
    images = int_images(15, np.uint16, 1000, 20, 3)
    labels = np.zeros(images.shape, ">i4")
    labels[:, 7:13, 9:15] = 3
    ds = gpucnr.measure(images, labels, backend="numpy", **OPTIONS)
    assert ds.roi.values.tolist() == [3]
    check({k: ds[k].values for k in ds.data_vars}, images, "big-endian labels")


def test_uint64_label_beyond_int64_is_a_coded_error():
    """A uint64 label 2**63 + 5 (was ROI id -9223372036854775803) is a coded error; negative ids stay one."""
    images = int_images(16, np.uint16, 1000, 20, 3)
    labels = np.zeros(images.shape, np.uint64)
    labels[0, 7:13, 9:15] = 2**63 + 5
    with pytest.raises(LabelRangeError) as err:
        gpucnr.measure(images, labels, backend="numpy")
    assert err.value.code == "label-range" and isinstance(err.value, InputError)
    labels[0, 7:13, 9:15] = 2**63 - 1  # the largest int64 is an id like any other
    ds = gpucnr.measure(images, labels, backend="numpy", **OPTIONS)
    assert ds.roi.values.tolist() == [2**63 - 1]
    with pytest.raises(InputError, match="negative") as err:
        gpucnr.measure(images, labels.astype(np.int64) * -1, backend="numpy")
    assert err.value.code == "bad-input"


@pytest.mark.parametrize("big", [False, True], ids=["native", "big-endian"])
@pytest.mark.parametrize(("dtype", "offset", "scale"),
                         [(d, o, s) for d, cases in FLOAT_CASES.items() for o, s in cases])
def test_every_float_offset_and_scale(dtype, offset, scale, big):
    """Every float (offset, scale) pair of the property test, deterministically, with and without a lesion."""
    for contrast in (0, 3):
        images = layout(float_images(17, np.dtype(dtype), offset, scale, contrast), big, contiguous=not big)
        check_all_paths(images, f"{dtype} offset {offset} scale {scale} contrast {contrast}")


@pytest.mark.parametrize("offset", INT_OFFSETS, ids=str)
@pytest.mark.parametrize("dtype", INTS)
def test_every_integer_dtype_and_offset(dtype, offset):
    """Every integer dtype at every offset of the property test, with small and wide noise."""
    dtype = np.dtype(dtype)
    lo, hi = (0, 1) if dtype == np.bool_ else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    offset = {"min": lo, "max": hi}.get(offset, offset)
    for sigma in (7, 2**61):
        images = int_images(18, dtype, offset, sigma, 3)
        check_all_paths(images, f"{dtype} offset {offset} sigma {sigma}")


def test_limb_path_for_narrow_dtypes_and_its_pixel_bound(monkeypatch):
    """The limb path and the host finish hold for any integer dtype (forced here by lowering the one-word
    bound); an image needing limbs beyond their pixel bound (2**29, lowered here) gets numeric-range."""
    from gpucnr.kernels import moments

    monkeypatch.setattr(moments, "_NARROW", 1 << 20)
    for dtype, offset in ((np.uint16, 40000), (np.int8, -100), (np.int32, 2**30), (np.uint64, 2**63 + 7)):
        check_all_paths(int_images(19, dtype, offset, 20, 3), f"forced limbs {np.dtype(dtype)}")
    monkeypatch.setattr(moments, "_LIMB_PIXELS", H * W)
    images = int_images(20, np.uint16, 40000, 20, 3)
    assert (run_measure(images)["status"] == NUMERIC_RANGE).all()
    assert (run_batch(NP, images, False)["status"] == NUMERIC_RANGE).all()


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.int32])
def test_padding_of_wide_integers_on_both_paths(dtype):
    """A padding value on a 64-bit image far from zero: both paths exclude the same pixels and agree."""
    images = int_images(21, dtype, 2**62 if dtype != np.int32 else 2**30, 1000, 3)
    pad_value = images[0, 0, 0]
    images[0, :, -3:] = pad_value
    padding = np.array([float(pad_value), np.nan])
    n, (cx, cy, r) = 2, ROI
    cols = {"image": [0, 1], "col": [0, 0], "kind": [0, 0], "cx": [cx] * n, "cy": [cy] * n, "r": [r] * n}
    tab = {k: np.asarray(v, np.int64) for k, v in cols.items()}
    outs = [measure_batch(NP, images, roi_ids=np.array([1], np.int64), params=Params(**OPTIONS), table=tab,
                          padding=padding, fast=fast) for fast in (True, False)]
    for k in ("n_roi", "n_bg", "status", "n_excluded"):
        np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)
    for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr"):
        np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-12, err_msg=k)
    assert outs[0]["n_excluded"][0] >= 3 * H


@pytest.mark.parametrize("background", ["complement", "ring", "complement-all", "label"])
def test_wide_integers_in_every_background_mode(background):
    """Limb sums through every background mode (window parts, the label region, the complement-all union),
    both paths, against the plain reference (float64 two-pass: exact enough for values of 2**61)."""
    from test_oracle import assert_matches, data_scale, run_measure, run_portable, run_reference

    images = int_images(22, np.int64, 0, 2**61, 1, n=3)
    labels = np.zeros(images.shape, np.int32)
    labels[:, 7:13, 9:15] = 1
    labels[:, 3:6, 3:8] = 2
    opts = dict(background=background, footprint="cross", dilation=2, border=2, ring_gap=1, ring_width=3, ddof=1,
                min_bg=5, definition="pooled", signed=False)
    if background == "label":
        labels[:, 14:19, :] = 9
        opts["background_label"] = 9
    case = dict(images=images, labels=labels, table=None, lesions=None, options=opts, padding=None)
    expected = run_reference(case)
    assert (expected[1]["status"] == 0).all()
    assert_matches(run_measure(case), expected, f"measure {background}", data_scale(images))
    assert_matches(run_portable(case), expected, f"portable {background}", data_scale(images))


@pytest.mark.parametrize("power", [-1000, 1000, -1060])
@pytest.mark.parametrize("background", ["complement", "ring", "complement-all", "label"])
def test_float_scaling_in_every_background_mode(background, power):
    """x * 2**power (exact for these values: near 1e-301, 1e301, and subnormal for -1060 where the scaled
    values keep 14 bits) gives the CNR of x in every background mode, on both paths: the power-of-two scale
    of the rule reaches window parts, the label region, the complement-all union and the direct background."""
    from test_oracle import run_measure, run_portable

    rng = np.random.default_rng(23)
    unit = {-1060: 16, -1000: 2**30, 1000: 1}[power]
    base = np.rint(rng.normal(1000.0, 20.0, (2, H, W))) * unit
    base[:, 7:13, 9:15] += 60 * unit
    labels = np.zeros(base.shape, np.int32)
    labels[:, 7:13, 9:15] = 1
    opts = dict(background=background, footprint="cross", dilation=2, border=2, ring_gap=1, ring_width=3, ddof=1,
                min_bg=5, definition="pooled", signed=False)
    if background == "label":
        labels[:, 14:19, :] = 9
        opts["background_label"] = 9
    scaled = np.ldexp(base, power)
    assert np.array_equal(np.ldexp(scaled, -power), base)  # the scaling itself is exact
    runs = {}
    for name, images in (("base", base), ("scaled", scaled)):
        case = dict(images=images, labels=labels, table=None, lesions=None, options=opts, padding=None)
        runs[name] = (run_measure(case)[1], run_portable(case)[1])
    for k in range(2):
        assert (runs["base"][k]["status"] == 0).all() and (runs["scaled"][k]["status"] == 0).all()
        np.testing.assert_allclose(runs["scaled"][k]["cnr"], runs["base"][k]["cnr"], rtol=1e-12)
        # NB: a subnormal mean holds no more than its 2**-1074 steps (2**-14 of the unscaled values here).
        np.testing.assert_allclose(np.ldexp(runs["scaled"][k]["mean_bg"], -power), runs["base"][k]["mean_bg"],
                                   rtol=1e-12, atol=2 * 2.0 ** min(0, -1074 - power))
