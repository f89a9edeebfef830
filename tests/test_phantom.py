"""gpucnr.phantom.make_phantom: reproducible synthetic stacks whose analytic CNR the measurement recovers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpucnr
from gpucnr.phantom import make_phantom

N_IMAGES = 48  # >= 32 images: the standard error of the mean CNR error is ~0.01 here


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = make_phantom(4, (128, 128), lesions=2, seed=11)
    b = make_phantom(4, (128, 128), lesions=2, seed=11)
    c = make_phantom(4, (128, 128), lesions=2, seed=12)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.cnr, b.cnr)
    assert a.rois.equals(b.rois)
    assert not np.array_equal(a.images, c.images)
    assert not a.rois[["cx", "cy"]].equals(c.rois[["cx", "cy"]])


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize("lesions", [1, 3])
def test_labels_and_rois_table_describe_the_same_lesions(dtype, lesions):
    radius = 7
    p = make_phantom(6, (128, 140), lesions=lesions, radius=radius, dtype=dtype, seed=3)
    assert p.images.dtype == np.dtype(dtype)
    assert p.images.shape == p.labels.shape == (6, 128, 140)
    assert p.labels.dtype == np.int32
    assert p.cnr.shape == p.contrast.shape == (6, lesions)
    assert len(p.rois) == 6 * lesions
    assert set(p.rois.columns) >= {"image", "roi", "kind", "cx", "cy", "r", "name"}
    assert (p.rois["kind"] == "disk").all() and (p.rois["r"] == radius).all()
    yy, xx = np.mgrid[:128, :140]
    for i in range(6):
        rows = p.rois[p.rois["image"] == i].sort_values("roi")
        assert rows["roi"].tolist() == list(range(1, lesions + 1))
        assert sorted(np.unique(p.labels[i]).tolist()) == list(range(lesions + 1))
        for row in rows.itertuples():
            disk = (xx - row.cx) ** 2 + (yy - row.cy) ** 2 <= row.r**2
            np.testing.assert_array_equal(p.labels[i] == row.roi, disk, err_msg=f"image {i} lesion {row.roi}")
            # the lesion's true mean is background + contrast (checked loosely: the noise is averaged out)
            inside = p.images[i][disk].astype(np.float64).mean()
            outside = p.images[i][p.labels[i] == 0].astype(np.float64).mean()
            se = p.noise * math.sqrt(1 / disk.sum() + 1 / (p.labels[i] == 0).sum())
            assert abs((inside - outside) - p.contrast[i, row.roi - 1]) < 5 * se


def test_analytic_cnr_formula_and_range():
    p = make_phantom(20, lesions=2, cnr=(1.0, 3.0), noise=15.0, dtype="uint16", seed=5)
    eff = math.sqrt(15.0**2 + 1 / 12)
    assert p.noise_effective == pytest.approx(eff, rel=1e-15)
    np.testing.assert_allclose(p.cnr, p.contrast / (eff * math.sqrt(2)), rtol=1e-15)
    assert (p.cnr >= 1.0).all() and (p.cnr <= 3.0).all()
    f = make_phantom(4, dtype="float32", noise=15.0, seed=5)
    assert f.noise_effective == 15.0


def test_labels_and_table_measure_the_same():
    """The label array and the rois table are two spellings of the same ROIs: same counts and moments."""
    p = make_phantom(8, lesions=3, seed=9)
    by_table = gpucnr.measure(p.images, p.rois, background="complement-all", backend="numpy")
    by_labels = gpucnr.measure(p.images, p.labels, background="complement-all", backend="numpy")
    np.testing.assert_array_equal(by_table.roi.values, by_labels.roi.values)
    for k in ("n_roi", "n_bg", "status"):
        np.testing.assert_array_equal(by_table[k].values, by_labels[k].values, err_msg=k)
    for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr"):
        np.testing.assert_allclose(by_table[k].values, by_labels[k].values, rtol=1e-12, err_msg=k)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        make_phantom(2, dtype="int8")
    with pytest.raises(ValueError, match="uint16"):
        make_phantom(2, background=10.0, noise=20.0)
    with pytest.raises(ValueError, match=r"room|place"):
        make_phantom(2, (40, 40), radius=8, margin=20)


def _cnr_error(p, background):
    """Per image, the mean over its lesions of (measured - analytic) CNR, and the measured/analytic ratio."""
    ds = gpucnr.measure(p.images, p.rois, background=background, backend="numpy")
    assert (ds.status.values == 0).all(), ds.status.values
    assert ds.cnr.dims == ("image", "roi") and ds.cnr.shape == p.cnr.shape
    measured = ds.cnr.values
    # NB: lesions of one image share its background, so their errors are averaged per image first and the
    # standard error is taken over independent images.
    per_image = (measured - p.cnr).mean(axis=1)
    se = per_image.std(ddof=1) / math.sqrt(per_image.size)
    return per_image.mean(), se, (measured / p.cnr).mean()


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize(("lesions", "background"), [(1, "complement"), (3, "complement-all"), (3, "ring")])
def test_measured_cnr_matches_analytic(dtype, lesions, background):
    """The measured pooled CNR is an unbiased estimate of the analytic one within its sampling error:
    |mean(measured - analytic)| < 4 SE, SE from the spread of the per-image errors over >= 32 images."""
    p = make_phantom(N_IMAGES, lesions=lesions, dtype=dtype, seed=2024)
    bias, se, _ = _cnr_error(p, background)
    assert 0 < se < 0.05, se  # the SE itself is of the expected size (noise of a ~200-px ROI's mean)
    assert abs(bias) < 4 * se, f"{background}: mean CNR error {bias:.4f} vs 4 SE = {4 * se:.4f}"


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_complement_mode_with_several_lesions_is_biased_low(dtype):
    """The article's complement counts the other lesions as background: their contrast inflates the
    background variance, so the CNR lands well below the analytic value (while complement-all does not)."""
    p = make_phantom(N_IMAGES, lesions=3, dtype=dtype, seed=2024)
    bias, se, ratio = _cnr_error(p, "complement")
    assert bias < -4 * se, f"complement: mean CNR error {bias:.4f} not below -4 SE = {-4 * se:.4f}"
    assert ratio < 0.95
    bias_all, se_all, _ = _cnr_error(p, "complement-all")
    assert abs(bias_all) < 4 * se_all


def test_zero_contrast_phantom_measures_near_zero():
    """A phantom with (almost) no lesion contrast: measured CNR is small, consistent with the analytic ~0."""
    p = make_phantom(N_IMAGES, lesions=1, cnr=(0.0, 1e-9), dtype="float32", seed=8)
    ds = gpucnr.measure(p.images, p.rois, backend="numpy", signed=True)
    signed = ds.cnr.values[:, 0]
    se = signed.std(ddof=1) / math.sqrt(signed.size)
    assert abs(signed.mean()) < 4 * se
