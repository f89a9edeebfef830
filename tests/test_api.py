"""The public API: gpucnr.__all__, measure's options and attributes, backends, the roi dimension, errors."""

from __future__ import annotations

import subprocess
import sys

import dask.array as da
import numpy as np
import pytest

import gpucnr
from gpucnr.backend import cupy_available

OPTIONS = ("background", "footprint", "dilation", "border", "ring_gap", "ring_width", "background_label", "min_bg",
           "ddof", "definition", "gcnr_bins", "signed")


def stack(n=2, h=40, w=44, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.normal(100.0, 5.0, (n, h, w)).astype(dtype)


def table(**extra):
    t = {"image": [0, 1], "roi": [1, 1], "kind": ["square", "disk"], "cx": [20, 22], "cy": [18, 20], "r": [4, 5]}
    t.update(extra)
    return t


# --------------------------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------------------------


def test_all_names_exist():
    assert len(gpucnr.__all__) == len(set(gpucnr.__all__))
    for name in gpucnr.__all__:
        assert hasattr(gpucnr, name), name
    for name in ("measure", "sample_rois", "InputError", "RoiTableError", "BackendUnavailableError", "Params",
                 "STATUS", "__version__"):
        assert name in gpucnr.__all__, name
    assert gpucnr.STATUS["ok"] == 0 and gpucnr.STATUS["absent"] == 1
    assert issubclass(gpucnr.RoiTableError, gpucnr.InputError)
    assert issubclass(gpucnr.InputError, gpucnr.GpucnrError) and issubclass(gpucnr.InputError, ValueError)
    assert issubclass(gpucnr.BackendUnavailableError, gpucnr.GpucnrError)


def test_import_does_not_import_cupy():
    code = "import gpucnr, sys; assert 'cupy' not in sys.modules, 'cupy imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------------------------
# Options and attributes
# --------------------------------------------------------------------------------------------------------------


def test_defaults_recorded_in_attrs():
    ds = gpucnr.measure(stack(), table())
    expected = {"background": "complement", "footprint": "cross", "dilation": 5, "border": 5, "ring_gap": 5,
                "ring_width": 10, "background_label": "none", "min_bg": 30, "ddof": 1, "definition": "pooled",
                "gcnr_bins": "auto", "signed": False}
    for k, v in expected.items():
        assert ds.attrs[k] == v, k
    assert ds.attrs["gpucnr_version"] == gpucnr.__version__
    assert isinstance(ds.attrs["backend"], str) and ds.attrs["backend"]


def test_every_option_recorded_in_attrs():
    labels = np.zeros((2, 40, 44), np.int32)
    labels[:, 15:25, 15:25] = 1
    labels[:, 30:, :] = 9
    kw = {"background": "label", "footprint": "matlab-disk", "dilation": 3, "border": 2, "ring_gap": 4,
          "ring_width": 7, "background_label": 9, "min_bg": 12, "ddof": 0, "definition": "roi", "gcnr_bins": 17,
          "signed": True}
    ds = gpucnr.measure(stack(), labels, backend="numpy", **kw)
    for k, v in kw.items():
        assert ds.attrs[k] == v, k
    assert ds.attrs["backend"] == "numpy"
    assert ds.attrs["gpucnr_version"] == gpucnr.__version__
    assert set(OPTIONS) <= set(ds.attrs)
    assert ds.roi.values.tolist() == [1]  # the background label is never an ROI
    assert (ds.status.values == 0).all()


@pytest.mark.skipif(cupy_available(), reason="a GPU is usable here: auto may pick cupy")
def test_auto_backend_on_numpy_input_without_gpu_is_numpy():
    """backend="auto" on NumPy input resolves like gpucnr.backend.resolve_backend: GPU if usable, else NumPy,
    and the results record which one ran."""
    ds = gpucnr.measure(stack(), table())
    assert ds.attrs["backend"] == "numpy"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("background", "nope"),
        ("footprint", "circle"),
        ("definition", "snr"),
        ("dilation", -1),
        ("border", -2),
        ("ring_gap", -1),
        ("ring_width", 0),
        ("min_bg", -5),
        ("ddof", -1),
        ("gcnr_bins", 0),
        ("gcnr_bins", "many"),
        ("dilation", 2.5),
        ("signed", "yes"),
        ("backend", "gpu"),
    ],
)
def test_invalid_option_raises_naming_it(option, value):
    with pytest.raises((ValueError, TypeError), match=option):
        gpucnr.measure(stack(), table(), **{option: value})


def test_invalid_option_values_are_value_errors():
    """Wrong values of the right type are ValueErrors (a wrong type may be a TypeError)."""
    for option, value in [("background", "nope"), ("footprint", "x"), ("definition", "x"), ("dilation", -1),
                          ("ring_width", 0), ("ddof", -1), ("gcnr_bins", 0), ("backend", "gpu")]:
        with pytest.raises(ValueError, match=option):
            gpucnr.measure(stack(), table(), **{option: value})


def test_label_background_needs_its_label():
    with pytest.raises(ValueError, match="background_label"):
        gpucnr.measure(stack(), np.ones((2, 40, 44), np.int32), background="label")
    with pytest.raises(ValueError, match="background_label"):
        gpucnr.measure(stack(), np.ones((2, 40, 44), np.int32), background="label", background_label=0)


@pytest.mark.skipif(cupy_available(), reason="a GPU is usable here")
def test_cupy_backend_without_gpu_raises():
    with pytest.raises(gpucnr.BackendUnavailableError) as info:
        gpucnr.measure(stack(), table(), backend="cupy")
    assert info.value.code == "backend-unavailable"


# --------------------------------------------------------------------------------------------------------------
# Shapes, the roi dimension, names
# --------------------------------------------------------------------------------------------------------------


def test_roi_dimension_is_sorted_union_with_absent_cells():
    t = {"image": [0, 0, 1, 2], "roi": [7, 2, 3, 7], "kind": ["square"] * 4, "cx": [10, 25, 20, 30],
         "cy": [12, 26, 20, 20], "r": [3, 3, 4, 2]}
    ds = gpucnr.measure(stack(3), t, min_bg=10)
    assert ds.roi.values.tolist() == [2, 3, 7]
    assert ds.image.values.tolist() == [0, 1, 2]
    present = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1]], bool)
    status = ds.status.values
    assert (status[~present] == gpucnr.STATUS["absent"]).all()
    assert (status[present] == gpucnr.STATUS["ok"]).all()
    assert (ds.n_roi.values[~present] == 0).all()
    assert np.isnan(ds.cnr.values[~present]).all() and np.isnan(ds.mean_roi.values[~present]).all()
    assert ds.n_valid.values.tolist() == [2, 1, 1]
    assert ds.n_roi.sel(image=0, roi=7).item() == 36 and ds.n_roi.sel(image=2, roi=7).item() == 16


@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask-one-image-chunks"])
def test_roi_dimension_from_label_arrays_across_batches(lazy):
    """Label ids differ per image (and per Dask block): the roi dim is their sorted union, others absent."""
    labels = np.zeros((3, 40, 44), np.int32)
    labels[0, 10:16, 10:16] = 4
    labels[0, 25:30, 25:31] = 1
    labels[1, 12:20, 14:22] = 9
    labels[2, 20:26, 20:26] = 4
    images = stack(3)
    if lazy:
        images, labels = da.from_array(images, chunks=(1, 40, 44)), da.from_array(labels, chunks=(1, 40, 44))
    ds = gpucnr.measure(images, labels)
    assert ds.roi.values.tolist() == [1, 4, 9]
    expected = np.array([[0, 0, 1], [1, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(ds.status.values, expected)
    assert ds.n_roi.values.tolist() == [[30, 36, 0], [0, 0, 64], [0, 36, 0]]


def test_name_column_becomes_roi_name():
    t = {"image": [0, 0, 1], "roi": [1, 2, 2], "kind": ["square", "disk", "square"], "cx": [12, 28, 20],
         "cy": [12, 26, 20], "r": [3, 4, 4], "name": ["lesion", "liver", "liver"]}
    ds = gpucnr.measure(stack(), t, min_bg=10)
    assert ds.roi_name.dims == ("image", "roi")
    assert ds.roi_name.values.tolist() == [["lesion", "liver"], ["", "liver"]]
    no_names = gpucnr.measure(stack(), table())
    assert (no_names.roi_name.values == "").all()


def test_2d_image_gives_one_image():
    img = stack(1)[0]
    t = {"image": [0], "roi": [1], "kind": ["square"], "cx": [20], "cy": [20], "r": [4]}
    ds = gpucnr.measure(img, t)
    assert ds.sizes["image"] == 1 and ds.sizes["roi"] == 1
    assert ds.status.values.shape == (1, 1) and ds.status.item() == 0
    labels = np.zeros(img.shape, np.int32)
    labels[16:24, 16:24] = 1
    by_labels = gpucnr.measure(img, labels)
    assert by_labels.sizes["image"] == 1
    assert by_labels.var_roi.item() == pytest.approx(ds.var_roi.item(), rel=1e-12)


def test_output_variables_and_dims():
    ds = gpucnr.measure(stack(), table())
    for k in ("n_roi", "mean_roi", "var_roi", "n_bg", "mean_bg", "var_bg", "cnr", "status", "roi_name"):
        assert ds[k].dims == ("image", "roi"), k
    for k in ("cnr_median", "n_valid", "n_excluded"):
        assert ds[k].dims == ("image",), k
    for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr", "cnr_median"):
        assert ds[k].dtype == np.float64, k


# --------------------------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("background", ["complement", "ring"])
def test_labels_with_complement_or_ring_is_an_input_error(background):
    labels = np.zeros((2, 40, 44), np.int32)
    with pytest.raises(gpucnr.InputError, match="labels"):
        gpucnr.measure(stack(), table(), labels=labels, background=background)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(gpucnr.ShapeMismatchError) as info:
        gpucnr.measure(stack(), np.zeros((2, 40, 40), np.int32))
    msg = str(info.value)
    assert "(2, 40, 44)" in msg and "(2, 40, 40)" in msg


def test_bad_image_shapes_and_dtypes():
    with pytest.raises(gpucnr.InputError, match="shape"):
        gpucnr.measure(np.zeros((1, 2, 8, 8)), table())
    with pytest.raises(gpucnr.InputError, match="dtype"):
        gpucnr.measure(np.zeros((2, 8, 8), complex), table())
    with pytest.raises(gpucnr.InputError, match="integer"):
        gpucnr.measure(stack(), np.zeros((2, 40, 44), np.float32))


# --------------------------------------------------------------------------------------------------------------
# No ROI at all: an empty roi dimension, never an exception (DESIGN §4 "degenerate inputs")
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("background", ["complement", "ring", "complement-all"])
def test_label_array_without_any_roi(background):
    ds = gpucnr.measure(stack(), np.zeros((2, 40, 44), np.int32), background=background)
    assert ds.sizes["roi"] == 0 and ds.sizes["image"] == 2
    assert ds.n_valid.values.tolist() == [0, 0] and np.isnan(ds.cnr_median.values).all()


@pytest.mark.parametrize("background", ["complement", "ring", "complement-all"])
def test_dask_block_without_any_roi(background):
    """One Dask block (image 1) has no label: the other images are still measured."""
    labels = np.zeros((2, 40, 44), np.int32)
    labels[0, 15:25, 15:25] = 1
    ds = gpucnr.measure(da.from_array(stack(), chunks=(1, 40, 44)), da.from_array(labels, chunks=(1, 40, 44)),
                        background=background)
    assert ds.roi.values.tolist() == [1]
    assert ds.status.values.tolist() == [[0], [1]]
