"""Accuracy against exact rational arithmetic (issue 2, "Accuracy"; DESIGN §4 "Statistics").

The reference moments are computed with Python integers / `fractions.Fraction` over the exact pixel values
(a float is converted with Fraction(float(v)), which is exact), on pixel sets built here from the pinned
geometry: square ROI x in [cx - r, cx + r), y in [cy - r, cy + r); background = every pixel minus the ROI
dilated by the L1 diamond of radius 5 (scipy's cross iterated 5 times) minus a 5-px frame.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage

import gpucnr
from gpucnr.backend import to_host as host
from gpucnr.kernels.batch import measure_batch
from gpucnr.kernels.params import Params

REL = 1e-9  # the oracle tolerance of DESIGN §4
DILATION = 5
BORDER = 5


# --------------------------------------------------------------------------------------------------------------
# Exact reference
# --------------------------------------------------------------------------------------------------------------


def square_mask(shape, cx, cy, r):
    mask = np.zeros(shape, bool)
    mask[max(cy - r, 0) : max(cy + r, 0), max(cx - r, 0) : max(cx + r, 0)] = True
    return mask


def complement_background(roi):
    dilated = ndimage.binary_dilation(roi, iterations=DILATION)  # scipy's cross, iterated: the L1 diamond
    bg = ~dilated
    bg[:BORDER] = False
    bg[-BORDER:] = False
    bg[:, :BORDER] = False
    bg[:, -BORDER:] = False
    return bg


def exact_moments(values: np.ndarray, ddof: int = 1) -> tuple[Fraction, Fraction]:
    """Exact (mean, variance with `ddof`) of the values as rationals.

    Every finite float is m / 2**k exactly, so all values are scaled to integers over one common power of
    two and summed with Python's unbounded integers; no rounding happens anywhere.
    """
    ratios = [Fraction(float(v)).as_integer_ratio() if values.dtype.kind == "f" else (int(v), 1)
              for v in values.ravel().tolist()]
    den = max(d for _, d in ratios)  # a power of two: the others divide it
    ints = [num * (den // d) for num, d in ratios]
    n = len(ints)
    s1 = sum(ints)
    s2 = sum(v * v for v in ints)
    mean = Fraction(s1, n * den)
    var = Fraction(n * s2 - s1 * s1, n * (n - ddof) * den * den)
    return mean, var


def exact_cells(images, rois, ddof=1):
    """Per (image, roi) row: exact mean/var of the ROI and of its complement background."""
    out = []
    for i, cx, cy, r in rois:
        roi = square_mask(images.shape[1:], cx, cy, r)
        bg = complement_background(roi)
        out.append((exact_moments(images[i][roi], ddof), exact_moments(images[i][bg], ddof),
                    int(roi.sum()), int(bg.sum())))
    return out


def assert_close_to_exact(got_mean, got_var, exact, what):
    """Variance within REL relative; mean within REL of the region's scale (|mean| or its std deviation)."""
    mean, var = exact
    assert var > 0
    rel_var = abs(Fraction(float(got_var)) - var) / var
    assert rel_var <= REL, f"{what}: variance {got_var!r} vs exact {float(var)!r}, relative error {float(rel_var):.3g}"
    scale = max(abs(float(mean)), float(var) ** 0.5)
    err_mean = abs(Fraction(float(got_mean)) - mean)
    assert err_mean <= REL * Fraction(scale), (
        f"{what}: mean {got_mean!r} vs exact {float(mean)!r}, error {float(err_mean):.3g} (scale {scale:.3g})"
    )


# --------------------------------------------------------------------------------------------------------------
# The images
# --------------------------------------------------------------------------------------------------------------

# (image, cx, cy, r): several sizes, one ROI touching the top-left corner (clipped), one near the frame.
ROIS = [(0, 40, 40, 6), (1, 20, 50, 3), (2, 4, 3, 8), (3, 60, 66, 10)]
SHAPE = (80, 88)


def uint16_stack():
    """Mean 40000, sigma 2: sums of squares are ~1.6e9 per pixel while the variance is 4."""
    rng = np.random.default_rng(20240601)
    return np.rint(rng.normal(40000.0, 2.0, (4, *SHAPE))).astype(np.uint16)


def float_stack(dtype):
    """Background N(0, 1); the ROI sits 1e4 sigma above it (ROI mean ~1e4, sigma 1)."""
    rng = np.random.default_rng(7)
    images = rng.normal(0.0, 1.0, (4, *SHAPE))
    for i, cx, cy, r in ROIS:
        images[i][square_mask(SHAPE, cx, cy, r)] += 1e4
    return images.astype(dtype)


CASES = {
    "uint16-mean40000-sigma2": uint16_stack,
    "float64-roi-1e4-sigma-up": lambda: float_stack(np.float64),
    "float32-roi-1e4-sigma-up": lambda: float_stack(np.float32),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    images = CASES[request.param]()
    return request.param, images, exact_cells(images, ROIS)


def _batch_table(xp, rois):
    cols = {"image": [t[0] for t in rois], "col": [0] * len(rois), "kind": [0] * len(rois),
            "cx": [t[1] for t in rois], "cy": [t[2] for t in rois], "r": [t[3] for t in rois]}
    return {k: xp.asarray(np.asarray(v, np.int64)) for k, v in cols.items()}


def _check(name, got, exact):
    for row, ((roi_exact, bg_exact, n_roi, n_bg), (i, *_)) in enumerate(zip(exact, ROIS, strict=True)):
        assert int(got["n_roi"][i, 0]) == n_roi, f"{name} row {row}: n_roi"
        assert int(got["n_bg"][i, 0]) == n_bg, f"{name} row {row}: n_bg"
        assert int(got["status"][i, 0]) == 0
        assert_close_to_exact(got["mean_roi"][i, 0], got["var_roi"][i, 0], roi_exact, f"{name} row {row} ROI")
        assert_close_to_exact(got["mean_bg"][i, 0], got["var_bg"][i, 0], bg_exact, f"{name} row {row} background")


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "portable"])
def test_measure_batch_matches_exact_arithmetic(xp, case, fast):
    name, images, exact = case
    out = measure_batch(xp, xp.asarray(images), roi_ids=xp.asarray(np.array([1], np.int64)), params=Params(),
                        table=_batch_table(xp, ROIS), fast=fast)
    got = {k: host(v) for k, v in out.items()}
    _check(f"{name} measure_batch(fast={fast})", got, exact)


def test_measure_matches_exact_arithmetic(xp, case):
    name, images, exact = case
    table = {"image": [t[0] for t in ROIS], "roi": [1] * len(ROIS), "kind": ["square"] * len(ROIS),
             "cx": [t[1] for t in ROIS], "cy": [t[2] for t in ROIS], "r": [t[3] for t in ROIS]}
    ds = gpucnr.measure(xp.asarray(images), table)
    got = {k: ds[k].values for k in ("n_roi", "n_bg", "status", "mean_roi", "var_roi", "mean_bg", "var_bg")}
    _check(f"{name} measure", got, exact)


def test_reference_masks_are_the_pinned_geometry():
    """The exact reference's own pixel sets: 2r x 2r square, 61-px diamond dilation, 5-px frame."""
    roi = square_mask((40, 40), 20, 20, 3)
    assert roi.sum() == 36 and roi[17:23, 17:23].all()
    point = np.zeros((21, 21), bool)
    point[10, 10] = True
    assert ndimage.binary_dilation(point, iterations=DILATION).sum() == 61
    bg = complement_background(np.zeros((40, 40), bool))
    assert bg.sum() == 30 * 30


def test_float32_one_pass_variance_would_fail_the_check():
    """Demonstration that the accuracy check bites: a float32 naive sum of squares (what DESIGN §4 forbids)
    is nowhere near 1e-9 on the uint16 case, and `assert_close_to_exact` rejects it."""
    images = uint16_stack()
    i, cx, cy, r = ROIS[0]
    bg_pixels = images[i][complement_background(square_mask(SHAPE, cx, cy, r))]
    exact_mean, exact_var = exact_moments(bg_pixels)
    x = bg_pixels.astype(np.float32)
    n = np.float32(x.size)
    s1 = np.sum(x, dtype=np.float32)
    s2 = np.sum(x * x, dtype=np.float32)
    naive = (s2 - s1 * s1 / n) / (n - np.float32(1))
    rel = abs(float(naive) - float(exact_var)) / float(exact_var)
    assert rel > 1e-2, f"float32 one-pass variance unexpectedly close: {naive} vs {float(exact_var)}"
    with pytest.raises(AssertionError, match="relative error"):
        assert_close_to_exact(float(s1 / n), float(naive), (exact_mean, exact_var), "float32 naive")
    # ...while float64 two-pass on the same pixels passes: the check is about accuracy, not the data.
    assert_close_to_exact(bg_pixels.mean(), bg_pixels.astype(np.float64).var(ddof=1), (exact_mean, exact_var),
                          "float64 two-pass")


def test_exact_moments_helper():
    """The rational reference itself, on values whose moments are known by hand (incl. non-dyadic floats)."""
    mean, var = exact_moments(np.array([1, 2, 3, 4], np.uint16))
    assert mean == Fraction(5, 2) and var == Fraction(5, 3)
    vals = np.array([0.1, 0.2, 0.3])
    mean, var = exact_moments(vals)
    fr = [Fraction(v) for v in (0.1, 0.2, 0.3)]
    m = sum(fr) / 3
    assert mean == m and var == sum((f - m) ** 2 for f in fr) / 2
