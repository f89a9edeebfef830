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


def test_to_xarray_is_lazy_shard_chunked_and_equals_the_reader(stack_path, phantom):
    stack = gpucnr.open_stack(stack_path)
    with dask.config.set(scheduler="sync"):
        arrays = stack.to_xarray()
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
