"""Degenerate inputs through gpucnr.measure: NaN/inf and a status, never an exception (DESIGN §4)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from reference import measure_reference

import gpucnr

OK, ABSENT, OUTSIDE, ROI_SMALL, BG_SMALL, ZERO_NOISE = 0, 1, 2, 3, 4, 5


def noisy(seed, shape=(1, 40, 44), dtype=np.float64, loc=100.0, scale=10.0):
    rng = np.random.default_rng(seed)
    img = rng.normal(loc, scale, shape)
    if np.dtype(dtype).kind != "f":
        img = np.round(img)
    return img.astype(dtype)


def table(*rows):
    """ROI table columns from (image, roi, kind, cx, cy, r) tuples."""
    cols = ("image", "roi", "kind", "cx", "cy", "r")
    return {c: np.array([row[i] for row in rows]) for i, c in enumerate(cols)}


def test_status_codes_are_the_designs():
    assert gpucnr.STATUS == {"not-computed": -1, "ok": 0, "absent": 1, "roi-outside": 2, "roi-too-small": 3,
                             "background-too-small": 4, "zero-noise": 5, "failed": 6, "numeric-range": 7,
                             "region-not-found": 8, "not-poolable": 9}


# ------------------------------------------------------------------------------------------------ ROI size


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_one_pixel_roi_ddof1_is_roi_too_small(dtype):
    img = noisy(0, dtype=dtype)
    labels = np.zeros(img.shape, np.int32)
    labels[0, 20, 22] = 3
    ds = gpucnr.measure(img, labels, backend="numpy")
    assert ds.roi.values.tolist() == [3]
    assert ds.status.values[0, 0] == ROI_SMALL
    assert ds.n_roi.values[0, 0] == 1
    np.testing.assert_allclose(ds.mean_roi.values[0, 0], float(img[0, 20, 22]), rtol=1e-14)
    assert np.isnan(ds.var_roi.values[0, 0])
    assert np.isnan(ds.cnr.values[0, 0])
    # the background is still reported in full
    yy, xx = np.mgrid[:40, :44]  # the background: outside the L1 diamond of radius 5, inside the frame
    bg = np.abs(yy - 20) + np.abs(xx - 22) > 5
    bg[:5] = bg[-5:] = False
    bg[:, :5] = bg[:, -5:] = False
    values = img[0][bg].astype(np.float64)
    assert ds.n_bg.values[0, 0] == values.size == 30 * 34 - 61
    np.testing.assert_allclose(ds.mean_bg.values[0, 0], values.mean(), rtol=1e-12)
    np.testing.assert_allclose(ds.var_bg.values[0, 0], values.var(ddof=1), rtol=1e-9)
    assert ds.n_valid.values[0] == 0 and np.isnan(ds.cnr_median.values[0])


def test_one_pixel_roi_ddof0_has_zero_variance_and_a_cnr():
    img = noisy(1)
    labels = np.zeros(img.shape, np.int32)
    labels[0, 20, 22] = 1
    ds = gpucnr.measure(img, labels, ddof=0, backend="numpy")
    assert ds.status.values[0, 0] == OK
    assert ds.var_roi.values[0, 0] == 0.0
    expected = abs(img[0, 20, 22] - ds.mean_bg.values[0, 0]) / np.sqrt(ds.var_bg.values[0, 0])
    np.testing.assert_allclose(ds.cnr.values[0, 0], expected, rtol=1e-12)


def test_one_pixel_disk_roi_from_a_table():
    img = noisy(2)
    ds = gpucnr.measure(img, table((0, 1, "disk", 10, 12, 0)), backend="numpy")
    assert ds.status.values[0, 0] == ROI_SMALL
    assert ds.n_roi.values[0, 0] == 1
    np.testing.assert_allclose(ds.mean_roi.values[0, 0], img[0, 12, 10], rtol=1e-14)  # x = column, y = row


def test_square_roi_of_radius_zero_is_empty():
    """select_roi's [c - 0, c + 0) is empty: no ROI pixel, status roi-outside."""
    ds = gpucnr.measure(noisy(3), table((0, 1, "square", 10, 12, 0)), backend="numpy")
    assert ds.status.values[0, 0] == OUTSIDE
    assert ds.n_roi.values[0, 0] == 0


def test_roi_covering_the_image_leaves_no_background():
    img = noisy(4, dtype=np.int16)
    labels = np.ones(img.shape, np.uint8)
    ds = gpucnr.measure(img, labels, backend="numpy")
    assert ds.status.values[0, 0] == BG_SMALL
    assert ds.n_bg.values[0, 0] == 0
    assert np.isnan(ds.mean_bg.values[0, 0]) and np.isnan(ds.var_bg.values[0, 0])
    assert ds.n_roi.values[0, 0] == img.size
    np.testing.assert_allclose(ds.mean_roi.values[0, 0], img.astype(np.float64).mean(), rtol=1e-12)
    np.testing.assert_allclose(ds.var_roi.values[0, 0], img.astype(np.float64).var(ddof=1), rtol=1e-9)
    assert np.isnan(ds.cnr.values[0, 0])


def test_square_roi_larger_than_the_image():
    img = noisy(5)
    ds = gpucnr.measure(img, table((0, 2, "square", 22, 20, 100)), backend="numpy")
    assert ds.status.values[0, 0] == BG_SMALL
    assert ds.n_roi.values[0, 0] == img.size and ds.n_bg.values[0, 0] == 0


@pytest.mark.parametrize("kind,cx,cy", [("square", -20, 10), ("disk", 10, 60), ("square", 49, 0), ("disk", -6, -6)])
def test_roi_fully_outside(kind, cx, cy):
    img = noisy(6)
    ds = gpucnr.measure(img, table((0, 1, kind, cx, cy, 5)), backend="numpy")
    assert ds.status.values[0, 0] == OUTSIDE
    assert ds.n_roi.values[0, 0] == 0
    assert np.isnan(ds.mean_roi.values[0, 0]) and np.isnan(ds.cnr.values[0, 0])


def test_roi_partly_outside_is_clipped():
    img = noisy(7)
    ds = gpucnr.measure(img, table((0, 1, "square", 2, 3, 5)), backend="numpy")  # x in [-3, 7), y in [-2, 8)
    assert ds.n_roi.values[0, 0] == 7 * 8
    np.testing.assert_allclose(ds.mean_roi.values[0, 0], img[0, :8, :7].mean(), rtol=1e-12)


# ------------------------------------------------------------------------------------------------ absent ids


def test_absent_label_ids():
    img = noisy(8, shape=(3, 40, 44), dtype=np.uint8, scale=5)
    labels = np.zeros(img.shape, np.int32)
    labels[0, 10:16, 10:16] = 1
    labels[0, 25:30, 25:31] = 4
    labels[1, 12:18, 20:26] = 4
    # image 2 has no ROI at all
    ds = gpucnr.measure(img, labels, backend="numpy")
    assert ds.roi.values.tolist() == [1, 4]
    expected = np.array([[OK, OK], [ABSENT, OK], [ABSENT, ABSENT]])
    np.testing.assert_array_equal(ds.status.values, expected)
    absent = expected == ABSENT
    assert (ds.n_roi.values[absent] == 0).all() and (ds.n_bg.values[absent] == 0).all()
    for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr"):
        assert np.isnan(ds[k].values[absent]).all(), k
    np.testing.assert_array_equal(ds.n_valid.values, [2, 1, 0])
    assert np.isnan(ds.cnr_median.values[2])


def test_absent_table_ids():
    img = noisy(9, shape=(2, 40, 44))
    ds = gpucnr.measure(img, table((0, 3, "square", 20, 20, 4), (0, 8, "disk", 10, 30, 3), (1, 8, "disk", 30, 12, 3)),
                        backend="numpy")
    assert ds.roi.values.tolist() == [3, 8]
    np.testing.assert_array_equal(ds.status.values, [[OK, OK], [ABSENT, OK]])
    assert ds.n_roi.values[1, 0] == 0
    assert ds.n_roi.values[1, 1] == 29  # the disk of radius 3


def test_label_ids_split_across_batches_are_aligned():
    """Ids that only occur in later images (batches of one image each through Dask) still line up."""
    da = pytest.importorskip("dask.array")
    img = noisy(10, shape=(3, 40, 44), dtype=np.uint16)
    labels = np.zeros(img.shape, np.int16)
    labels[0, 10:16, 10:16] = 2
    labels[2, 10:16, 10:16] = 7
    ds = gpucnr.measure(da.from_array(img, chunks=(1, 40, 44)), labels, backend="numpy")
    assert ds.roi.values.tolist() == [2, 7]
    np.testing.assert_array_equal(ds.status.values, [[OK, ABSENT], [ABSENT, ABSENT], [ABSENT, OK]])


# ------------------------------------------------------------------------------------------------ zero noise


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_constant_image_is_zero_noise_nan(dtype):
    img = np.full((1, 40, 44), 7, dtype)
    labels = np.zeros(img.shape, np.int32)
    labels[0, 15:25, 15:25] = 1
    ds = gpucnr.measure(img, labels, backend="numpy")
    assert ds.status.values[0, 0] == ZERO_NOISE
    assert np.isnan(ds.cnr.values[0, 0])
    np.testing.assert_allclose([ds.mean_roi.values[0, 0], ds.mean_bg.values[0, 0]], [7, 7], rtol=1e-15)
    assert ds.var_roi.values[0, 0] == 0 and ds.var_bg.values[0, 0] == 0
    assert ds.n_valid.values[0] == 0 and np.isnan(ds.cnr_median.values[0])


@pytest.mark.parametrize("definition", ["pooled", "background", "roi", "pooled-mean"])
def test_constant_background_and_constant_roi_is_inf(definition):
    img = np.full((1, 40, 44), 10.0)
    img[0, 15:25, 15:25] = 20.0
    labels = np.zeros(img.shape, np.int32)
    labels[0, 15:25, 15:25] = 1
    ds = gpucnr.measure(img, labels, definition=definition, backend="numpy")
    assert ds.status.values[0, 0] == ZERO_NOISE
    assert ds.cnr.values[0, 0] == np.inf
    assert ds.n_valid.values[0] == 0


def test_signed_zero_noise_keeps_the_sign():
    img = np.full((1, 40, 44), 10.0)
    img[0, 15:25, 15:25] = 3.0
    labels = np.zeros(img.shape, np.int32)
    labels[0, 15:25, 15:25] = 1
    ds = gpucnr.measure(img, labels, signed=True, backend="numpy")
    assert ds.status.values[0, 0] == ZERO_NOISE
    assert ds.cnr.values[0, 0] == -np.inf


def test_zero_noise_in_one_region_only_depends_on_the_definition():
    """Constant ROI on a noisy background: zero noise for definition='roi' only."""
    img = noisy(11)
    img[0, 15:25, 15:25] = 500.0
    labels = np.zeros(img.shape, np.int32)
    labels[0, 15:25, 15:25] = 1
    pooled = gpucnr.measure(img, labels, backend="numpy")
    roi = gpucnr.measure(img, labels, definition="roi", backend="numpy")
    assert pooled.status.values[0, 0] == OK and np.isfinite(pooled.cnr.values[0, 0])
    assert roi.status.values[0, 0] == ZERO_NOISE and roi.cnr.values[0, 0] == np.inf


def test_gcnr_has_no_zero_noise_status():
    img = np.full((1, 40, 44), 10.0)
    img[0, 15:25, 15:25] = 20.0
    labels = np.zeros(img.shape, np.int32)
    labels[0, 15:25, 15:25] = 1
    ds = gpucnr.measure(img, labels, definition="gcnr", backend="numpy")
    assert ds.status.values[0, 0] == OK
    assert ds.cnr.values[0, 0] == 1.0  # disjoint histograms
    same = gpucnr.measure(np.full((1, 40, 44), 10.0), labels, definition="gcnr", backend="numpy")
    assert same.status.values[0, 0] == OK
    assert same.cnr.values[0, 0] == 0.0  # identical histograms


# ------------------------------------------------------------------------------------------------ NaN, inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_pixels_are_excluded_and_counted(bad, dtype):
    img = noisy(12, shape=(2, 40, 44), dtype=dtype)
    labels = np.zeros(img.shape, np.int32)
    labels[:, 15:25, 15:25] = 1
    img[0, 16, 16] = img[0, 20, 21] = bad  # in the ROI
    img[0, 30, 35] = img[0, 8, 9] = img[0, 36, 40] = bad  # background, background, border frame
    img[0, 0, 0] = bad  # the very first pixel
    ds = gpucnr.measure(img, labels, backend="numpy")
    np.testing.assert_array_equal(ds.n_excluded.values, [6, 0])
    assert ds.n_roi.values[0, 0] == 98 and ds.n_roi.values[1, 0] == 100
    roi = img[0, 15:25, 15:25].astype(np.float64)
    roi = roi[np.isfinite(roi)]
    np.testing.assert_allclose(ds.mean_roi.values[0, 0], roi.mean(), rtol=1e-12)
    np.testing.assert_allclose(ds.var_roi.values[0, 0], roi.var(ddof=1), rtol=1e-9)
    assert ds.n_bg.values[0, 0] == ds.n_bg.values[1, 0] - 2
    assert np.isfinite(ds.mean_bg.values).all() and np.isfinite(ds.var_bg.values).all()
    assert (ds.status.values == OK).all()
    _, ref = measure_reference(img, rois=labels)
    np.testing.assert_allclose(ds.mean_bg.values, ref["mean_bg"], rtol=1e-12)
    np.testing.assert_allclose(ds.var_bg.values, ref["var_bg"], rtol=1e-9)
    np.testing.assert_allclose(ds.cnr.values, ref["cnr"], rtol=1e-9)


def test_all_nan_roi_is_roi_too_small():
    """An ROI whose every pixel is NaN has ROI pixels but none usable: n_roi 0, no CNR, no exception."""
    img = noisy(13)
    labels = np.zeros(img.shape, np.int32)
    labels[0, 15:20, 15:20] = 1
    img[0, 15:20, 15:20] = np.nan
    ds = gpucnr.measure(img, labels, backend="numpy")
    assert ds.n_roi.values[0, 0] == 0
    assert ds.n_excluded.values[0] == 25
    assert ds.status.values[0, 0] == ROI_SMALL  # its pixels lie in the image: not roi-outside
    assert np.isnan(ds.mean_roi.values[0, 0]) and np.isnan(ds.cnr.values[0, 0])


def test_integer_images_exclude_nothing():
    img = noisy(14, dtype=np.int16)
    labels = np.zeros(img.shape, np.int32)
    labels[0, 15:25, 15:25] = 1
    assert gpucnr.measure(img, labels, backend="numpy").n_excluded.values.tolist() == [0]


def test_all_nan_image():
    img = np.full((1, 30, 30), np.nan)
    labels = np.zeros(img.shape, np.int32)
    labels[0, 10:15, 10:15] = 1
    ds = gpucnr.measure(img, labels, backend="numpy")
    assert ds.n_excluded.values[0] == 900
    assert ds.n_roi.values[0, 0] == 0 and ds.n_bg.values[0, 0] == 0
    assert ds.status.values[0, 0] == ROI_SMALL
    assert np.isnan(ds.cnr_median.values[0])


# ------------------------------------------------------------------------------------------------ border


@pytest.mark.parametrize("border", [0, 1, 5])
def test_border_zero_keeps_the_frame(border):
    img = noisy(15, shape=(2, 40, 44), dtype=np.uint16)
    labels = np.zeros(img.shape, np.int32)
    labels[:, 15:25, 15:25] = 1
    ds = gpucnr.measure(img, labels, border=border, dilation=0, backend="numpy")
    assert (ds.n_bg.values == (40 - 2 * border) * (44 - 2 * border) - 100).all()
    _, ref = measure_reference(img, rois=labels, border=border, dilation=0)
    np.testing.assert_array_equal(ds.n_bg.values, ref["n_bg"])
    np.testing.assert_allclose(ds.mean_bg.values, ref["mean_bg"], rtol=1e-12)
    np.testing.assert_allclose(ds.var_bg.values, ref["var_bg"], rtol=1e-9)
    np.testing.assert_allclose(ds.cnr.values, ref["cnr"], rtol=1e-9)
    if border == 0:
        everything_else = img[0].astype(np.float64)[labels[0] == 0]
        np.testing.assert_allclose(ds.mean_bg.values[0, 0], everything_else.mean(), rtol=1e-12)


def test_border_zero_with_roi_on_the_edge():
    img = noisy(16, dtype=np.float32)
    ds = gpucnr.measure(img, table((0, 1, "square", 0, 0, 4)), border=0, backend="numpy")  # 4x4 corner
    _, ref = measure_reference(img, table=[dict(image=0, roi=1, kind="square", cx=0, cy=0, r=4)], border=0)
    assert ds.n_roi.values[0, 0] == 16
    np.testing.assert_array_equal(ds.n_bg.values, ref["n_bg"])
    np.testing.assert_allclose(ds.var_bg.values, ref["var_bg"], rtol=1e-9)


def test_border_larger_than_half_the_image():
    img = noisy(17, shape=(1, 20, 20))
    labels = np.zeros(img.shape, np.int32)
    labels[0, 8:12, 8:12] = 1
    ds = gpucnr.measure(img, labels, border=10, backend="numpy")
    assert ds.n_bg.values[0, 0] == 0 and ds.status.values[0, 0] == BG_SMALL
    assert ds.n_roi.values[0, 0] == 16  # the frame only restricts the background


# ------------------------------------------------------------------------------------------------ shapes


def test_shape_mismatch_names_both_shapes():
    img = noisy(18, shape=(2, 30, 31))
    labels = np.zeros((2, 31, 30), np.int32)
    with pytest.raises(gpucnr.ShapeMismatchError) as info:
        gpucnr.measure(img, labels)
    message = str(info.value)
    assert "(2, 30, 31)" in message and "(2, 31, 30)" in message


def test_shape_mismatch_of_labels_keyword():
    img = noisy(19, shape=(2, 30, 30))
    with pytest.raises(gpucnr.ShapeMismatchError) as info:
        gpucnr.measure(img, table((0, 1, "square", 15, 15, 3)), background="label", background_label=9,
                       labels=np.zeros((3, 30, 30), np.int32))
    assert "(2, 30, 30)" in str(info.value) and "(3, 30, 30)" in str(info.value)


def test_shape_mismatch_is_an_input_error():
    assert issubclass(gpucnr.ShapeMismatchError, gpucnr.InputError)
    with pytest.raises(ValueError):
        gpucnr.measure(np.zeros((1, 5, 5)), np.zeros((1, 5, 6), np.int32))


def test_single_2d_image():
    img = noisy(20)[0]
    labels = np.zeros(img.shape, np.int32)
    labels[15:25, 15:25] = 1
    ds = gpucnr.measure(img, labels, backend="numpy")
    assert ds.sizes["image"] == 1 and ds.status.values[0, 0] == OK


# ------------------------------------------------------------------------------------------------ min_bg


@pytest.mark.parametrize("ddof", [0, 1])
def test_min_bg_boundary(ddof):
    img = noisy(21, shape=(1, 20, 20))
    t = table((0, 1, "square", 10, 10, 2))  # 4 x 4 = 16 px
    n_bg = 20 * 20 - 16  # border 0, dilation 0
    at = gpucnr.measure(img, t, border=0, dilation=0, min_bg=n_bg, ddof=ddof, backend="numpy")
    above = gpucnr.measure(img, t, border=0, dilation=0, min_bg=n_bg + 1, ddof=ddof, backend="numpy")
    assert at.n_bg.values[0, 0] == n_bg == above.n_bg.values[0, 0]
    assert at.status.values[0, 0] == OK
    assert above.status.values[0, 0] == BG_SMALL
    assert np.isnan(above.cnr.values[0, 0])
    # the region moments are reported whatever the status
    np.testing.assert_allclose(above.var_bg.values, at.var_bg.values, rtol=0)


def test_background_of_ddof_pixels_is_too_small_even_without_min_bg():
    img = noisy(22, shape=(1, 12, 12))
    labels = np.ones(img.shape, np.int32)
    labels[0, 0, 0] = 0  # a single background pixel
    ds = gpucnr.measure(img, labels, border=0, dilation=0, min_bg=0, ddof=1, backend="numpy")
    assert ds.n_bg.values[0, 0] == 1
    assert ds.status.values[0, 0] == BG_SMALL
    np.testing.assert_allclose(ds.mean_bg.values[0, 0], img[0, 0, 0], rtol=1e-14)
    assert np.isnan(ds.var_bg.values[0, 0])
    ds0 = gpucnr.measure(img, labels, border=0, dilation=0, min_bg=0, ddof=0, backend="numpy")
    assert ds0.status.values[0, 0] == OK and ds0.var_bg.values[0, 0] == 0


def test_status_precedence_outside_before_too_small():
    """A ROI outside the image with a whole image of background removed: roi-outside comes first."""
    img = noisy(23, shape=(1, 12, 12))
    ds = gpucnr.measure(img, table((0, 1, "square", -50, -50, 3)), border=6, backend="numpy")
    assert ds.status.values[0, 0] == OUTSIDE


# ------------------------------------------------------------------------------------------------ median


def test_no_valid_roi_gives_nan_median_without_warning():
    img = np.full((2, 30, 30), 5.0)
    labels = np.zeros(img.shape, np.int32)
    labels[:, 10:15, 10:15] = 1
    labels[1, 20, 20] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = gpucnr.measure(img, labels, backend="numpy")
        ds_outside = gpucnr.measure(img, table((0, 1, "square", -20, -20, 3)), backend="numpy")
        ds_none = gpucnr.measure(img, table((0, 1, "square", 15, 15, 2)), min_bg=10_000, backend="numpy")
    np.testing.assert_array_equal(ds.n_valid.values, [0, 0])
    assert np.isnan(ds.cnr_median.values).all()
    assert ds_outside.n_valid.values.tolist() == [0, 0] and np.isnan(ds_outside.cnr_median.values).all()
    assert ds_none.n_valid.values.tolist() == [0, 0] and np.isnan(ds_none.cnr_median.values).all()


def test_median_of_valid_rois_only():
    img = noisy(24, shape=(1, 60, 60), dtype=np.uint16)
    img[0, 10:20, 10:20] += 30
    img[0, 10:20, 40:50] += 60
    img[0, 40:50, 10:20] += 90
    labels = np.zeros(img.shape, np.int32)
    labels[0, 10:20, 10:20] = 1
    labels[0, 10:20, 40:50] = 2
    labels[0, 40:50, 10:20] = 3
    labels[0, 45, 45] = 4  # one pixel: roi-too-small, left out of the median
    ds = gpucnr.measure(img, labels, background="complement-all", backend="numpy")
    np.testing.assert_array_equal(ds.status.values[0], [OK, OK, OK, ROI_SMALL])
    assert ds.n_valid.values[0] == 3
    assert ds.cnr_median.values[0] == np.median(ds.cnr.values[0, :3])
    ds2 = gpucnr.measure(img, np.where(labels == 3, 0, labels), background="complement-all", backend="numpy")
    assert ds2.n_valid.values[0] == 2
    np.testing.assert_allclose(ds2.cnr_median.values[0], ds2.cnr.values[0, :2].mean(), rtol=1e-15)


def test_negative_labels_are_a_coded_error():
    images = np.ones((3, 20, 20))
    labels = np.zeros((3, 20, 20), np.int32)
    labels[2, 3:5, 3:5] = -2
    with pytest.raises(gpucnr.InputError, match="negative") as err:
        gpucnr.measure(images, labels, backend="numpy")
    assert err.value.code == "bad-input"
    assert "0..2" in str(err.value)
