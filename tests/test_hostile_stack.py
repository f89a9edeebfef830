"""Stacks whose tables contradict their arrays (issue 11): a coded ``stack-schema`` error, never a crash in compiled
code, a misplaced image or pandas' uncoded ValueError. Each stack is forged with valid checksums (through zarr)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import gpucnr
from gpucnr.kernels.batch import measure_batch
from gpucnr.kernels.params import Params
from gpucnr.phantom import make_phantom

N, SIZE, SHARD = 8, 40, 4
BUCKET = "64x64-uint16"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A small stack with labels and an ROI table, and one with an ROI table only (two buckets)."""
    root = tmp_path_factory.mktemp("hostile")
    ph = make_phantom(N, (SIZE, SIZE), seed=5, margin=12, radius=5)
    gpucnr.write_stack(root / "labels.zarr", ph.images, labels=ph.labels, rois=ph.rois, shard=SHARD)
    images = [*ph.images[:5], np.zeros((70, 30), np.uint16) + ph.images[5][:1, :1], *ph.images[6:]]
    images[5][5:25, 5:25] = ph.images[5][5:25, 5:25]
    gpucnr.write_stack(root / "table.zarr", images, rois=ph.rois, shard=SHARD)
    return root


def copy(clean, tmp_path, name="labels.zarr") -> Path:
    dst = tmp_path / name
    shutil.copytree(clean / name, dst)
    return dst


def set_column(stack: Path, table: str, col: str, values) -> None:
    """Rewrite one table column in place, with a valid checksum (what a forger does)."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        values = values.astype(np.dtypes.StringDType())  # NB: zarr's specified string type, as the writer's
    group = zarr.open_group(str(stack), mode="r+")
    old = group[f"tables/{table}/{col}"]
    if isinstance(old, zarr.Group):
        old = old["values"]  # NB: a coded text column is replaced by a text column (both are read)
    elif old.shape == values.shape and old.dtype == values.dtype:
        old[:] = values
        return
    compressors = old.compressors
    del group[f"tables/{table}/{col}"]
    arr = group.create_array(f"tables/{table}/{col}", shape=values.shape, dtype=values.dtype,
                             chunks=(max(len(values), 1),), compressors=compressors,
                             config={"write_empty_chunks": True})
    if len(values):
        arr[:] = values


def column(stack: Path, table: str, col: str) -> np.ndarray:
    node = zarr.open(str(stack / f"tables/{table}/{col}"), mode="r")
    if isinstance(node, zarr.Group):  # NB: a coded text column: its values by code
        return np.asarray(node["values"][:])[np.asarray(node["codes"][:])]
    return np.asarray(node[:])


def set_attrs(stack: Path, **attrs) -> None:
    zarr.open_group(str(stack), mode="r+").attrs.update(attrs)


def schema_error(stack: Path, *words: str) -> str:
    with pytest.raises(gpucnr.StackError) as info:
        gpucnr.open_stack(stack)
    assert info.value.code == "stack-schema", str(info.value)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    return str(info.value)


def test_clean_stacks_open(clean):
    for name in ("labels.zarr", "table.zarr"):
        assert gpucnr.open_stack(clean / name).n_images == N


@pytest.mark.parametrize("col, value, words", [
    ("valid_h", 65, ("valid_h", "[1, 64]")),
    ("valid_h", 0, ("valid_h",)),
    ("valid_w", -3, ("valid_w",)),
    ("slope", 0.0, ("slope",)),
    ("slope", np.nan, ("slope",)),
    ("intercept", np.inf, ("intercept",)),
])
def test_per_image_values_out_of_range(clean, tmp_path, col, value, words):
    stack = copy(clean, tmp_path)
    v = column(stack, "images", col)
    v[3] = value
    set_column(stack, "images", col, v)
    schema_error(stack, *words)


def test_swapped_positions_and_index(clean, tmp_path):
    stack = copy(clean, tmp_path)
    pos = column(stack, "images", "position")
    set_column(stack, "images", "position", pos[[1, 0, *range(2, N)]])
    schema_error(stack, "position")
    stack = copy(clean, tmp_path / "b")
    idx = column(stack, "images", "index")
    set_column(stack, "images", "index", idx[[1, 0, *range(2, N)]])
    schema_error(stack, "index")
    stack = copy(clean, tmp_path / "c")
    src = column(stack, "images", "source_index")
    src[2] = src[3]
    set_column(stack, "images", "source_index", src)
    schema_error(stack, "source_index")


def test_reordered_or_renamed_buckets(clean, tmp_path):
    stack = copy(clean, tmp_path, "table.zarr")
    names = list(zarr.open_group(str(stack)).attrs["buckets"])
    assert len(names) == 2
    set_attrs(stack, buckets=names[::-1])
    schema_error(stack, "out of order")
    stack = copy(clean, tmp_path / "b", "table.zarr")
    buckets = np.asarray(column(stack, "images", "bucket").tolist())
    set_column(stack, "images", "bucket", np.where(buckets == names[0], names[1], names[0]))
    schema_error(stack, "bucket")
    for bad in (["../x-uint8"], [names[0], names[0]], "64x64-uint16", [f"{names[0]}x"], ["64x64-object"]):
        stack = copy(clean, tmp_path / f"c{len(os.listdir(tmp_path))}", "table.zarr")
        set_attrs(stack, buckets=bad)
        schema_error(stack)


@pytest.mark.parametrize("attrs", [{"n_images": "8"}, {"shard": 0}, {"shard": 3}, {"roi_ids": [2, 1]},
                                   {"roi_ids": [0, 1]}, {"roi_ids": ["a"]}, {"roi_ids": [1, 99]}])
def test_bad_attributes(clean, tmp_path, attrs):
    stack = copy(clean, tmp_path, "table.zarr")
    set_attrs(stack, **attrs)
    schema_error(stack)


@pytest.mark.parametrize("col, value", [("image", N), ("image", -1), ("r", -1), ("kind", "hexagon"),
                                        ("cx", 2**40), ("roi", 7)])
def test_roi_table_contradicts_the_stack(clean, tmp_path, col, value):
    stack = copy(clean, tmp_path, "table.zarr")
    v = column(stack, "rois", col)
    v = v.astype(object if v.dtype.kind in "OUT" else v.dtype)
    v[1] = value
    set_column(stack, "rois", col, v.astype(str) if col == "kind" else v)
    schema_error(stack, "rois" if col != "roi" else "roi_ids")


def test_shortened_column_is_coded(clean, tmp_path):
    for table, col in (("images", "valid_w"), ("rois", "cy")):
        stack = copy(clean, tmp_path / table)
        set_column(stack, table, col, column(stack, table, col)[:-1])
        schema_error(stack, col, "unequal")


def test_labels_with_ids_beyond_roi_ids_stop_the_run(clean, tmp_path):
    """roi_ids must equal the labels' ids: a label the attribute lacks is refused when its batch is measured."""
    stack = copy(clean, tmp_path)
    group = zarr.open_group(str(stack), mode="r+")
    set_attrs(stack, roi_ids=[])
    del group["tables/rois"]
    with pytest.raises(gpucnr.StackError) as info:
        gpucnr.run(stack, tmp_path / "r.zarr", scheduler="synchronous")
    assert info.value.code == "stack-schema" and "roi_ids" in str(info.value)


def test_write_stack_refuses_what_open_stack_would(tmp_path):
    img = np.ones((8, 8), np.uint16)
    for kw in ({"meta": {"slope": [0.0]}}, {"meta": {"intercept": [np.nan + 1j]}}, {"meta": {"slope": [np.inf]}}):
        with pytest.raises(gpucnr.GpucnrError):
            gpucnr.write_stack(tmp_path / "s.zarr", [img], **kw)
        assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(gpucnr.GpucnrError):
        gpucnr.write_stack(tmp_path / "e.zarr", [np.ones((0, 5), np.uint16)])


def _batch(**kw):
    xp = pytest.importorskip("array_api_compat").array_namespace(np.empty(0))
    images = np.full((2, 16, 16), 100, np.uint16)
    args = {"roi_ids": np.array([1], np.int64), "params": Params(min_bg=1), "valid_h": np.array([16, 16]),
            "valid_w": np.array([16, 16]),
            "table": {k: np.array(v, np.int64) for k, v in {"image": [0, 1], "col": [0, 0], "kind": [0, 1],
                                                              "cx": [8, 8], "cy": [8, 8], "r": [2, 2]}.items()}}
    for k, v in kw.items():
        if k in ("image", "col", "kind", "cx", "cy", "r"):
            args["table"] = {**args["table"], k: np.array(v, np.int64)}
        else:
            args[k] = v
    return measure_batch(xp, images, **args)


@pytest.mark.parametrize("kw", [
    {"valid_h": np.array([17, 16])}, {"valid_h": np.array([0, 16])}, {"valid_w": np.array([16])},
    {"slope": np.array([0.0, 1.0])}, {"slope": np.array([np.nan, 1.0])},
    {"image": [0, 2]}, {"image": [-1, 0]}, {"col": [0, 1]}, {"kind": [0, 7]}, {"r": [-1, 2]},
    {"cx": [2**62, 8]}, {"roi_ids": np.array([2, 1])}, {"labels": np.ones((2, 16, 15), np.int32), "table": None},
    {"labels": np.full((2, 16, 16), -1, np.int32), "table": None, "roi_ids": None},
])
def test_measure_batch_entry_refuses_inconsistent_inputs(kw):
    with pytest.raises(gpucnr.InputError):
        _batch(**kw)


def test_measure_batch_entry_accepts_the_good_batch():
    out = _batch()
    assert out["status"].shape == (2, 1)


def test_boundscheck_is_on_in_the_suite():
    """The compiled kernels run with Numba's bounds checks in the test suite (tests/conftest.py), compiled into a
    cache of their own (Numba's cache key ignores the flag): a kernel called past the entry checks with extents
    beyond its image raises IndexError instead of reading outside the array."""
    import numba

    from gpucnr.kernels import _numpy_fast

    assert numba.config.BOUNDSCHECK == 1
    assert "boundscheck" in os.environ["NUMBA_CACHE_DIR"]
    images = np.zeros((1, 4, 4), np.uint16)
    one = np.ones(1, np.int64)
    with pytest.raises(IndexError):
        _numpy_fast.image_range(images, 9 * one, 9 * one, np.full(1, np.nan))


def test_forged_negative_labels_stop_the_run_as_stack_schema(clean, tmp_path):
    """Label pixels are read only when a batch is measured: a forged negative label (valid checksum) is refused
    at measure_batch's entry, and the run reports the stack, not an image."""
    stack = copy(clean, tmp_path)
    labels = zarr.open_array(str(stack / f"buckets/{BUCKET}/labels"), mode="r+",
                             config={"write_empty_chunks": True})
    labels[2, 0, 0] = -5
    # NB: a forger who also rewrites the recorded checksum (else the reader refuses the chunk as stack-damaged)
    from gpucnr.store import chunk_checksums

    crcs = zarr.open_array(str(stack / f"buckets/{BUCKET}/checksums"), mode="r+")
    crcs[2, 1] = chunk_checksums(stack / f"buckets/{BUCKET}/labels", labels, 2, 3)[0]
    del zarr.open_group(str(stack), mode="r+")["tables/rois"]  # NB: the labels are the ROIs
    with pytest.raises(gpucnr.StackError) as info:
        gpucnr.run(stack, tmp_path / "r.zarr", scheduler="synchronous")
    assert info.value.code == "stack-schema" and "negative" in str(info.value)
