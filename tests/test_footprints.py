"""Structuring elements against known answers (MATLAB's strel, scipy's iterated cross) and the row-run
dilation against scipy.ndimage on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import host
from scipy import ndimage

from gpucnr.kernels.footprints import FOOTPRINTS, footprint_offsets, footprint_rows
from gpucnr.kernels.masks import dilate

# MATLAB's strel('disk', 5) with its documented default n = 4 (the radial approximation by periodic lines,
# Adams 1993): `getnhood(strel('disk', 5))` is this 9x9 octagon of 69 pixels, rows 5,7,9,9,9,9,9,7,5 wide
# (DESIGN §4, issue 2). It is what the article's MATLAB code (imdilate(roi_mask, strel('disk', 5))) dilates
# by. Written out literally here, never computed, so that it checks gpucnr's decomposition independently.
MATLAB_DISK_5 = np.array(
    [
        [0, 0, 1, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 1, 0, 0],
    ],
    dtype=bool,
)


def as_array(offsets) -> np.ndarray:
    """A footprint's offsets as a centred (2R+1, 2R+1) bool array, R = its largest |offset|."""
    radius = max(max(abs(y), abs(x)) for y, x in offsets)
    a = np.zeros((2 * radius + 1, 2 * radius + 1), bool)
    for y, x in offsets:
        a[y + radius, x + radius] = True
    return a


def euclidean_disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r


def independent_footprint(name: str, r: int) -> np.ndarray:
    """The footprint as an array built without gpucnr (matlab-disk only where it is known)."""
    if name == "cross":
        return ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), r) if r else np.ones((1, 1), bool)
    if name == "disk":
        return euclidean_disk(r)
    if name == "square":
        return np.ones((2 * r + 1, 2 * r + 1), bool)
    if r < 3:
        return euclidean_disk(r)
    assert r == 5
    return MATLAB_DISK_5


# ---------------------------------------------------------------------------------------------- footprints


def test_matlab_disk_5_is_matlabs_octagon():
    fp = as_array(footprint_offsets("matlab-disk", 5))
    assert fp.shape == (9, 9)
    np.testing.assert_array_equal(fp, MATLAB_DISK_5)
    assert fp.sum() == 69
    assert fp.sum(axis=1).tolist() == [5, 7, 9, 9, 9, 9, 9, 7, 5]


def test_matlab_disk_5_rows():
    assert footprint_rows(footprint_offsets("matlab-disk", 5)) == (2, 3, 4, 4, 4, 4, 4, 3, 2)


@pytest.mark.parametrize("r", [0, 1, 2])
def test_matlab_disk_small_is_exact_disk(r):
    np.testing.assert_array_equal(as_array(footprint_offsets("matlab-disk", r)), euclidean_disk(r))


@pytest.mark.parametrize("r", range(0, 9))
def test_cross_is_scipy_default_iterated(r):
    expected = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), r) if r else np.ones((1, 1), bool)
    np.testing.assert_array_equal(as_array(footprint_offsets("cross", r)), expected)


@pytest.mark.parametrize("r", range(0, 8))
def test_disk_and_square_shapes(r):
    np.testing.assert_array_equal(as_array(footprint_offsets("disk", r)), euclidean_disk(r))
    np.testing.assert_array_equal(as_array(footprint_offsets("square", r)), np.ones((2 * r + 1,) * 2, bool))


def test_counts_at_radius_5():
    assert len(footprint_offsets("cross", 5)) == 61
    assert len(footprint_offsets("disk", 5)) == 81
    assert len(footprint_offsets("square", 5)) == 121
    assert len(footprint_offsets("matlab-disk", 5)) == 69


@pytest.mark.parametrize("name", FOOTPRINTS)
def test_radius_zero_is_the_origin(name):
    assert footprint_offsets(name, 0) == frozenset({(0, 0)})


@pytest.mark.parametrize("name", FOOTPRINTS)
@pytest.mark.parametrize("r", range(0, 12))
def test_footprints_symmetric_and_one_run_per_row(name, r):
    offsets = footprint_offsets(name, r)
    assert offsets == frozenset((-y, -x) for y, x in offsets)
    rows = footprint_rows(offsets)
    rebuilt = {(dy, dx) for dy, w in zip(range(-(len(rows) // 2), len(rows) // 2 + 1), rows, strict=True)
               for dx in range(-w, w + 1)}
    assert rebuilt == set(offsets)


@pytest.mark.parametrize("r", range(3, 12))
def test_matlab_disk_within_exact_disk_bounds(r):
    """MATLAB's approximation is a convex octagon inside the (2r-1)-wide box and not smaller than the
    disk of radius r - 2 (loose, independent bounds that a wrong decomposition breaks)."""
    fp = as_array(footprint_offsets("matlab-disk", r))
    radius = fp.shape[0] // 2
    assert radius <= r
    inner = euclidean_disk(r - 2)
    pad = radius - (r - 2)
    assert pad >= 0
    assert fp[pad : pad + inner.shape[0], pad : pad + inner.shape[1]][inner].all()
    # convex rows and columns: each one run
    for line in (*fp, *fp.T):
        idx = np.flatnonzero(line)
        assert idx.size == 0 or idx[-1] - idx[0] + 1 == idx.size


def test_bad_names_and_radii():
    with pytest.raises(ValueError):
        footprint_offsets("diamond", 3)
    with pytest.raises(ValueError):
        footprint_offsets("disk", -1)


# ---------------------------------------------------------------------------------------------- dilation


def random_masks(seed, m, h, w, density, margin=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((m, h, w)) < density
    if margin:
        masks[:, :margin] = False
        masks[:, -margin:] = False
        masks[:, :, :margin] = False
        masks[:, :, -margin:] = False
    return masks


def dilate_on(xp, masks, name, r):
    return host(dilate(xp, xp.asarray(masks), footprint_rows(footprint_offsets(name, r))))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("r", [0, 1, 2, 3, 5, 7])
def test_dilate_cross_equals_scipy_iterations(xp, seed, r):
    """`dilate` with the cross of radius r == scipy's binary_dilation(mask, iterations=r), pixels beyond the
    window being False as with scipy's border_value=0 (an iterated dilation of a rectangle loses nothing)."""
    masks = random_masks(seed, 4, 23, 31, 0.03)
    masks[0, 0, 0] = masks[1, -1, -1] = masks[2, 0, -1] = True  # ROIs touching every edge
    got = dilate_on(xp, masks, "cross", r)
    assert got.shape == masks.shape and got.dtype == bool
    for i in range(masks.shape[0]):
        expected = masks[i] if r == 0 else ndimage.binary_dilation(masks[i], iterations=r)
        np.testing.assert_array_equal(got[i], expected, err_msg=f"plane {i}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["disk", "square", "matlab-disk"])
@pytest.mark.parametrize("r", [1, 2, 3, 5, 6])
def test_dilate_equals_scipy_structure(xp, seed, name, r):
    masks = random_masks(seed + 10 * r, 3, 27, 22, 0.02)
    masks[0, 0, 5] = masks[1, 26, 21] = True
    fp = independent_footprint(name, r) if (name != "matlab-disk" or r in (1, 2, 5)) else \
        as_array(footprint_offsets(name, r))
    got = dilate_on(xp, masks, name, r)
    for i in range(masks.shape[0]):
        expected = ndimage.binary_dilation(masks[i], structure=fp, border_value=0)
        np.testing.assert_array_equal(got[i], expected, err_msg=f"{name} r={r} plane {i}")


@pytest.mark.parametrize("name", FOOTPRINTS)
def test_dilate_with_zero_margin_is_full_footprint(xp, name):
    """A single pixel well inside its window dilates to exactly the footprint, on every backend."""
    r = 5
    fp = independent_footprint(name, r)
    size = 2 * r + 7
    masks = np.zeros((2, size, size + 3), bool)
    masks[0, size // 2, size // 2] = True
    masks[1, r + 1, r + 2] = True
    got = dilate_on(xp, masks, name, r)
    for i in range(2):
        (cy,), (cx,) = np.nonzero(masks[i].any(axis=1))[0], np.nonzero(masks[i].any(axis=0))[0]
        expected = np.zeros_like(masks[i])
        k = fp.shape[0] // 2
        expected[cy - k : cy + k + 1, cx - k : cx + k + 1] = fp
        np.testing.assert_array_equal(got[i], expected)
    assert got[0].sum() == {"cross": 61, "disk": 81, "square": 121, "matlab-disk": 69}[name]


def test_dilate_dense_random_masks_with_margin(xp):
    masks = random_masks(7, 5, 30, 30, 0.15, margin=6)
    for name in FOOTPRINTS:
        got = dilate_on(xp, masks, name, 5)
        fp = independent_footprint(name, 5)
        for i in range(masks.shape[0]):
            np.testing.assert_array_equal(got[i], ndimage.binary_dilation(masks[i], structure=fp), err_msg=name)


def test_dilate_empty_and_full(xp):
    empty = np.zeros((2, 9, 11), bool)
    assert not dilate_on(xp, empty, "disk", 3).any()
    full = np.ones((2, 9, 11), bool)
    assert dilate_on(xp, full, "cross", 4).all()
