"""Reads into reused buffers (issue 17): a run's worker decodes each batch into its thread's scratch buffers and
reads shard files into one reused byte buffer, so that a batch costs no page faults. What must hold: the bytes and
pixels are exactly those of a fresh read, a smaller read after a larger one never returns leftovers, and nothing a
batch's measurement returns is a view of the buffers the next batch overwrites."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import gpucnr
from gpucnr import pipeline, shardfiles
from gpucnr import results as results_module
from gpucnr.phantom import make_phantom
from gpucnr.store import open_stack


@pytest.mark.parametrize("sizes", [(0, 5, 1), (3_000_000, 17, 0, 4096), (1, 2, 3)])
def test_read_whole_returns_each_file_exactly(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    for k, size in enumerate(sizes):
        path = tmp_path / f"f{k}"
        path.write_bytes(rng.bytes(size))
        got = shardfiles.read_whole(path)
        assert bytes(got) == path.read_bytes(), f"file {k} of {size} bytes"


def test_read_whole_buffers_are_per_thread(tmp_path):
    """Two threads reading different files at once each get their own file's bytes."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a" * 100_000)
    b.write_bytes(b"b" * 50_000)
    seen = {}
    barrier = threading.Barrier(2)

    def read(path):
        view = shardfiles.read_whole(path)
        barrier.wait()  # NB: both buffers filled before either is checked
        seen[path.name] = bytes(view)

    threads = [threading.Thread(target=read, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": a.read_bytes(), "b": b.read_bytes()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("buffers")
    ph = make_phantom(24, (96, 112), lesions=2, radius=5, seed=5)
    return gpucnr.write_stack(root / "stack.zarr", ph.images, labels=ph.labels, shard=4), ph


def test_reused_reads_equal_fresh_reads(stack):
    st, ph = stack
    st = open_stack(st.path)
    bucket = st.buckets[0]
    # NB: large, then smaller, then spanning shards: each reused read is the fresh read of the same range
    for start, stop in [(0, 24), (5, 7), (3, 13), (23, 24), (0, 24)]:
        fresh_images, fresh_labels = st.read(bucket, start, stop)
        images, labels = st.read(bucket, start, stop, reuse=True)
        assert images.shape == fresh_images.shape and labels.shape == fresh_labels.shape
        np.testing.assert_array_equal(images, fresh_images)
        np.testing.assert_array_equal(labels, fresh_labels)
        np.testing.assert_array_equal(images[:, : ph.images.shape[1], : ph.images.shape[2]],
                                      ph.images[start:stop])


def test_a_reused_read_overwrites_the_last_one(stack):
    """The contract the run relies on, shown: the next reused read in the thread writes over the last one's array
    (so a caller must be done with it), and a fresh read never does."""
    st, _ = stack
    st = open_stack(st.path)
    bucket = st.buckets[0]
    first, _ = st.read(bucket, 0, 4, reuse=True)
    kept = first.copy()
    fresh, _ = st.read(bucket, 8, 12)
    np.testing.assert_array_equal(first, kept)
    second, _ = st.read(bucket, 8, 12, reuse=True)
    assert np.shares_memory(first, second)
    np.testing.assert_array_equal(first, fresh)


@pytest.mark.parametrize("kw", [{}, {"roi_source": "labels"}, {"background": "complement-all"}, {"rois": "auto"}],
                         ids=["both-sources", "labels", "complement-all", "auto"])
def test_nothing_a_batch_returns_is_a_view_of_the_read_buffers(stack, tmp_path, monkeypatch, kw):
    st, ph = stack
    table = ph.rois.assign(roi=ph.rois["roi"] + 100, kind="square", r=3)
    rois = None if kw.get("rois") or kw.get("roi_source") else table
    read, measured = [], []
    real_read, real_measure = type(st).read, pipeline.measure_spec

    def recording_read(self, *a, **k):
        out = real_read(self, *a, **k)
        read.append([v for v in out if v is not None])
        return out

    def recording_measure(spec):
        out = real_measure(spec)
        measured.append(out)
        return out

    monkeypatch.setattr(type(st), "read", recording_read)
    monkeypatch.setattr(pipeline, "measure_spec", recording_measure)
    ds = gpucnr.run(st.path, tmp_path / "r.zarr", scheduler="threads", workers=2, backend="numpy", batch="4i",
                    **({"rois": rois} if rois is not None else {}), **kw)
    assert ds.sizes["batch"] == 6 and len(measured) == 6
    buffers = [a for arrays in read for a in arrays]
    assert buffers
    for out in measured:
        for name, value in out.items():
            if isinstance(value, np.ndarray):
                assert not any(np.shares_memory(value, b) for b in buffers), f"{name} is a view of a read buffer"
    ref = gpucnr.run(st.path, tmp_path / "ref.zarr", scheduler="synchronous", backend="numpy", batch="4i",
                     **({"rois": rois} if rois is not None else {}), **kw)
    for name in ref.data_vars:
        a, b = ds[name].values, ref[name].values
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


def test_commits_never_strand_a_batch_behind_a_slow_disk(stack, tmp_path, monkeypatch):
    """A rewrite slower than the batches (a loaded disk) takes every batch finished meanwhile in its next turn:
    fewer rewrites than batches, every batch committed once, in order of the rewrites, the results those of a
    clean run."""
    st, _ = stack
    real, real_put = results_module.ResultsWriter._flush, results_module.ResultsWriter.put
    turns, puts, all_put = [], [], threading.Event()

    def slow(self, items):
        if not turns:
            all_put.wait(60)  # NB: the first rewrite outlasts every batch, whatever the machine's load
        real(self, items)
        turns.append(sorted(it[0] for it in items))

    def put(self, batch, *a, **k):
        real_put(self, batch, *a, **k)
        puts.append(batch)
        if len(puts) == 6:
            all_put.set()

    monkeypatch.setattr(results_module.ResultsWriter, "_flush", slow)
    monkeypatch.setattr(results_module.ResultsWriter, "put", put)
    log = tmp_path / "batches.log"
    monkeypatch.setenv("GPUCNR_BATCH_LOG", str(log))
    ds = gpucnr.run(st.path, tmp_path / "r.zarr", scheduler="threads", workers=2, backend="numpy", batch="4i")
    n = ds.sizes["batch"]
    assert n == 6 and sorted(b for turn in turns for b in turn) == list(range(n))
    # NB: the first rewrite (its batches taken as its thread started: the first, or a few) is held until all six
    # are put: one more rewrite takes every other batch, none is left behind
    assert len(turns) <= 2 and sorted(b for turn in turns for b in turn) == sorted(puts), turns
    assert [int(v) for v in log.read_text().split()] == [b for turn in turns for b in turn]
    assert ds["committed"].values.all()
    monkeypatch.setattr(results_module.ResultsWriter, "_flush", real)
    monkeypatch.setattr(results_module.ResultsWriter, "put", real_put)
    ref = gpucnr.run(st.path, tmp_path / "ref.zarr", scheduler="synchronous", backend="numpy", batch="4i")
    for name in ref.data_vars:
        a, b = ds[name].values, ref[name].values
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
