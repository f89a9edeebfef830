"""The stack as xarray / Dask (DESIGN §9, issue 19): `Stack.to_xarray` reads lazily through the checked shard
reader, stacks and results open with `xarray.open_datatree`, and `measure` takes the Dask stack as it is."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import gpucnr
from gpucnr.phantom import make_phantom
from gpucnr.store import fingerprint

N, SIZE, SHARD = 40, 64, 16
BUCKET = f"{SIZE}x{SIZE}-uint16"


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(N, (SIZE, SIZE), seed=5, margin=14, radius=6)


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory, phantom):
    path = tmp_path_factory.mktemp("xr") / "s.zarr"
    gpucnr.write_stack(path, phantom.images, labels=phantom.labels, shard=SHARD)
    return path


def _strip_dimension_names(path: Path) -> int:
    """Make a stack look like one written before issue 19: no array carries dimension names."""
    count = 0
    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array" and "dimension_names" in doc:
            doc.pop("dimension_names")
            meta.write_text(json.dumps(doc))
            count += 1
    return count


def test_to_xarray_is_lazy_shard_chunked_and_equals_the_reader(stack_path, phantom, monkeypatch):
    stack = gpucnr.open_stack(stack_path)
    reads = []
    from gpucnr.store import Stack

    original = Stack.read

    def counting(self, bucket, start, stop, **kw):
        reads.append((start, stop))
        return original(self, bucket, start, stop, **kw)

    monkeypatch.setattr(Stack, "read", counting)
    arrays = stack.to_xarray()
    # NB: laziness: neither the conversion nor xarray operations on the result read a pixel until asked.
    view = (arrays[BUCKET][2:30].astype("float64") * 2).mean(dim=("y", "x"))
    assert reads == []
    assert view.shape == (28,)
    view.compute(scheduler="sync")
    assert sorted(reads) == [(0, 16), (16, 32)]
    reads.clear()
    assert list(arrays) == [BUCKET]
    images = arrays[BUCKET]
    assert images.dims == ("image", "y", "x")
    assert isinstance(images.data, da.Array)
    assert images.data.chunks == ((16, 16, 8), (SIZE,), (SIZE,))
    assert isinstance(images.data._meta, np.ndarray) and images.dtype == np.uint16
    np.testing.assert_array_equal(images["image"], np.arange(N))
    np.testing.assert_array_equal(images["valid_h"], np.full(N, SIZE))
    assert "slope" in images.coords and "source_index" in images.coords
    # NB: one task per shard, and none of them embeds an array: the graph stays small whatever the stack.
    graph = images.data.__dask_graph__()
    assert len(graph) == 3
    assert len(pickle.dumps(dict(graph))) < 20_000
    np.testing.assert_array_equal(images[5:30].values, stack.read(stack.buckets[0], 5, 30)[0])
    np.testing.assert_array_equal(images.values, phantom.images)
    labels = stack.to_xarray(labels=True)[BUCKET]
    np.testing.assert_array_equal(labels.values, phantom.labels)


def test_to_xarray_reads_through_the_checked_reader(tmp_path, phantom):
    """A chunk rewritten in place (valid crc32c, not the recorded one) fails the computation, as in `run`."""
    path = tmp_path / "s.zarr"
    gpucnr.write_stack(path, phantom.images, labels=phantom.labels, shard=SHARD)
    arrays = gpucnr.open_stack(path).to_xarray()
    arr = zarr.open_array(str(path / f"buckets/{BUCKET}/images"), mode="r+", config={"write_empty_chunks": True})
    arr[17, :4, :4] = 7
    images = arrays[BUCKET]
    np.testing.assert_array_equal(images[:16].values, phantom.images[:16])  # other shards still read
    with pytest.raises(gpucnr.StackError) as info:
        images[16:32].compute()
    assert info.value.code == "stack-damaged" and "image 17" in str(info.value)


def test_block_reader_pickles_as_a_path(stack_path):
    """What a distributed worker receives: the stack's path and the bucket, reopened there."""
    stack = gpucnr.open_stack(stack_path)
    data = stack.to_xarray()[BUCKET].data
    payload = pickle.dumps(data)
    assert len(payload) < 50_000
    again = pickle.loads(payload)
    np.testing.assert_array_equal(again[:3].compute(scheduler="sync"), stack.read(stack.buckets[0], 0, 3)[0])


def test_open_datatree_opens_stacks_and_results(tmp_path, stack_path, phantom):
    tree = xr.open_datatree(stack_path, engine="zarr", consolidated=False)
    bucket = tree[f"buckets/{BUCKET}"]
    assert bucket["images"].dims == ("image", "y", "x")
    assert bucket["written"].dims == ("image",) and bucket["checksums"].dims[0] == "image"
    assert tree["tables/images"]["valid_h"].dims == ("image",)
    results = tmp_path / "r.zarr"
    gpucnr.run(stack_path, results, scheduler="synchronous")
    rtree = xr.open_datatree(results, engine="zarr", consolidated=False)
    assert rtree["cnr"].dims == ("image", "roi")


def test_older_stacks_keep_their_fingerprint_and_stay_readable(tmp_path, phantom):
    """Stacks written before dimension names were added: same fingerprint (v2 ignores how metadata is spelled),
    and they open, read and convert to xarray as before."""
    path = tmp_path / "s.zarr"
    stack = gpucnr.write_stack(path, phantom.images, labels=phantom.labels, rois=phantom.rois, shard=SHARD)
    base = stack.fingerprint()
    assert _strip_dimension_names(path) > 5
    assert fingerprint(path) == base
    old = gpucnr.open_stack(path)
    assert old.fingerprint() == base
    np.testing.assert_array_equal(old.to_xarray()[BUCKET][:4].values, phantom.images[:4])


# ------------------------------------------------------------------------------------------ measure on Dask


@pytest.fixture(scope="module")
def odd_stack(tmp_path_factory, phantom):
    """A stack whose images are not all of the canvas (valid extents matter) and have a rescale."""
    images = [im if i % 3 else im[: SIZE - 5, : SIZE - 3] for i, im in enumerate(phantom.images)]
    labels = [lab if i % 3 else lab[: SIZE - 5, : SIZE - 3] for i, lab in enumerate(phantom.labels)]
    import pandas as pd

    meta = pd.DataFrame({"slope": np.linspace(0.5, 2.0, N), "intercept": np.linspace(-100, 100, N)})
    path = tmp_path_factory.mktemp("odd") / "s.zarr"
    gpucnr.write_stack(path, images, labels=labels, shard=SHARD, meta=meta)
    return path


def _same(got: xr.Dataset, expected: xr.Dataset):
    for k in ("n_roi", "n_bg", "status", "n_valid", "n_excluded"):
        np.testing.assert_array_equal(got[k].values, expected[k].values, err_msg=k)
    for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr", "cnr_median"):
        np.testing.assert_allclose(got[k].values, expected[k].values, rtol=1e-12, equal_nan=True, err_msg=k)


def test_measure_of_the_dask_stack_equals_run(tmp_path, odd_stack):
    stack = gpucnr.open_stack(odd_stack)
    expected = gpucnr.run(odd_stack, tmp_path / "r.zarr", scheduler="synchronous", border=3, dilation=3)
    images, labels = stack.to_xarray()[BUCKET], stack.to_xarray(labels=True)[BUCKET]
    got = gpucnr.measure(images, labels, border=3, dilation=3)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["roi"], expected["roi"])
    _same(got, expected.load())
    assert (got["status"].values == 0).any()


def test_measure_coalesces_chunks_and_reads_each_block_once(monkeypatch):
    """One-image chunks are merged to >= 2**24 pixels per task; each block is read once, never the whole
    array at once, and building the graph computes nothing (laziness)."""
    import gpucnr.arrays as arrays

    monkeypatch.setattr(arrays, "_PIXELS_PER_BATCH", 8 * 48 * 48)  # NB: 8 images per batch, small here
    ph = make_phantom(20, (48, 48), seed=9, margin=12, radius=5)
    sizes = []

    def block(x):
        sizes.append(x.shape[0])
        return x

    lazy = da.from_array(ph.images, chunks=(1, 48, 48)).map_blocks(block, meta=np.empty((0, 0, 0), ph.images.dtype))
    labels = da.from_array(ph.labels, chunks=(1, 48, 48))
    assert sizes == []
    with dask.config.set(scheduler="sync"):
        got = gpucnr.measure(lazy, labels, backend="numpy")
    assert sorted(sizes) == [1] * 20  # every one-image block read once ...
    assert arrays._coalesced((1,) * 20, 48 * 48) == (8, 8, 4)  # ... into three batches
    _same(got, gpucnr.measure(ph.images, ph.labels, backend="numpy"))


def test_measure_tasks_carry_only_their_rows_of_the_roi_table(monkeypatch, phantom):
    import gpucnr.arrays as arrays

    seen = []
    original = arrays._one_batch

    def spy(images, labels, lesions, table, start, stop, *rest):
        seen.append((start, stop, None if table is None else table["image"].to_numpy()))
        return original(images, labels, lesions, table, start, stop, *rest)

    monkeypatch.setattr(arrays, "_one_batch", spy)
    monkeypatch.setattr(arrays, "_PIXELS_PER_BATCH", 10 * SIZE * SIZE)
    lazy = da.from_array(phantom.images, chunks=(4, SIZE, SIZE))
    with dask.config.set(scheduler="sync"):
        got = gpucnr.measure(lazy, phantom.rois, backend="numpy")
    assert len(seen) == 4
    for start, stop, rows in seen:
        assert rows.size and ((rows >= start) & (rows < stop)).all()
    _same(got, gpucnr.measure(phantom.images, phantom.rois, backend="numpy"))


def test_measure_dask_meta_and_backend(stack_path):
    """dask-image's check: the chunks' type (`_meta`) decides where the kernels run, and it is what the
    results report; NumPy chunks stay on NumPy with backend="auto" when no GPU is usable."""
    from gpucnr.backend import cupy_available

    images = gpucnr.open_stack(stack_path).to_xarray()[BUCKET]
    assert type(images.data._meta) is np.ndarray
    got = gpucnr.measure(images[:8], gpucnr.open_stack(stack_path).to_xarray(labels=True)[BUCKET][:8],
                         backend="numpy")
    assert got.attrs["backend"] == "numpy"
    if cupy_available():
        import cupy

        on_gpu = images.data[:8].map_blocks(cupy.asarray, meta=cupy.empty((0, 0, 0), images.dtype))
        assert isinstance(on_gpu._meta, cupy.ndarray)
        labels = gpucnr.open_stack(stack_path).to_xarray(labels=True)[BUCKET].data[:8]
        res = gpucnr.measure(on_gpu, labels.map_blocks(cupy.asarray, meta=cupy.empty((0, 0, 0), np.int32)))
        assert res.attrs["backend"] == "cupy"
        _same(res, got)


def test_measure_uses_the_active_distributed_client(stack_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import gpucnr.arrays as arrays

    calls = []
    original = arrays._run_on_client
    monkeypatch.setattr(arrays, "_run_on_client", lambda *a: calls.append(a) or original(*a))
    stack = gpucnr.open_stack(stack_path)
    images, labels = stack.to_xarray()[BUCKET], stack.to_xarray(labels=True)[BUCKET]
    expected = gpucnr.measure(images, labels, backend="numpy")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        got = gpucnr.measure(images, labels, backend="numpy")
        assert calls and calls[0][0] is client
        assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.transition_log)) > 0
    assert len(calls) == 1  # NB: without the client, the local scheduler again
    _same(got, expected)
