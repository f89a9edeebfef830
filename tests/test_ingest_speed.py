"""Ingest at the speed of decoding (issue 18): what the faster paths must keep. Chunks encoded in the worker
processes are the chunks the stack writer would have written; results travel from the workers with their large
bytes out of band, and a worker that dies mid-message is still a crash of its file; the workers import no table
library. (Speed itself is measured by `scripts/bench.py ingest`, never asserted here.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

import numpy as np
import pytest
import zarr

import gpucnr
from gpucnr import chunks
from gpucnr.sources.workers import receive, send
from gpucnr.store import COMPRESSORS, StackWriter


def _images(rng):
    """Images of several dtypes, shapes (on and off the 64-px canvas) and byte orders, with and without labels."""
    out = []
    for k, (shape, dtype) in enumerate([((64, 64), np.int16), ((70, 33), np.uint16), ((5, 130), ">i2"),
                                        ((64, 128), np.float32), ((31, 31), np.float64), ((100, 100), np.uint8),
                                        ((3, 4), bool), ((64, 64), np.int16)]):
        img = (rng.normal(100, 20, shape) if np.dtype(dtype).kind == "f" else rng.integers(0, 200, shape))
        img = img.astype(dtype)
        labels = None if k % 3 == 2 else rng.integers(0, 4, shape).astype(np.int32 if k % 2 else np.uint8)
        out.append((img, labels))
    return out


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_chunks_encoded_in_workers_are_the_writers_own(tmp_path, compressor):
    """A stack written from `chunks.encode_image` (as ingest's workers do) equals one written from the arrays:
    the same shard files byte for byte, checksums, tables, label ids and fingerprint; zarr reads it."""
    rng = np.random.default_rng(0)
    images = _images(rng)
    paths = {}
    for how in ("arrays", "encoded", "mixed"):
        path = paths[how] = tmp_path / f"{how}.zarr"
        with StackWriter(path, labels=True, shard=3, compressor=compressor) as w:
            for k, (img, labels) in enumerate(images):
                meta = {"slope": 1.0 + k, "intercept": -k}
                if how == "arrays" or (how == "mixed" and k % 2):
                    w.add(img, labels, meta)
                else:
                    enc = chunks.encode_image(img, labels, compressor=compressor, labelled=True)
                    # NB: what crosses the pipe is compressed: fewer bytes than the image on its canvas
                    assert len(enc["image"]) < np.prod(chunks.canvas(img.shape)) * img.dtype.itemsize
                    w.add_encoded(enc, meta)
            w.close()
    stacks = {how: gpucnr.open_stack(p) for how, p in paths.items()}
    ref = stacks["arrays"]
    for how in ("encoded", "mixed"):
        s = stacks[how]
        assert s.fingerprint() == ref.fingerprint(), how
        assert s.group.attrs["label_ids"] == ref.group.attrs["label_ids"] == [1, 2, 3]
        for b in ref.buckets:
            a_files = sorted((paths["arrays"] / "buckets" / b.name).rglob("*"))
            e_files = sorted((paths[how] / "buckets" / b.name).rglob("*"))
            assert [p.relative_to(paths["arrays"]) for p in a_files] == [p.relative_to(paths[how]) for p in e_files]
            for pa, pe in zip(a_files, e_files, strict=True):
                if pa.is_file():
                    assert pa.read_bytes() == pe.read_bytes(), (how, pa.name)
    # NB: and the pixels are the images (zarr's own reader, not gpucnr's)
    table = ref.images.sort_values("source_index")
    for (img, labels), (_, row) in zip(images, table.iterrows(), strict=True):
        arr = zarr.open_array(str(paths["encoded"] / "buckets" / row["bucket"] / "images"), mode="r")
        lab = zarr.open_array(str(paths["encoded"] / "buckets" / row["bucket"] / "labels"), mode="r")
        h, w = img.shape
        got = np.asarray(arr[int(row["position"])])
        np.testing.assert_array_equal(got[:h, :w], img.astype(img.dtype.newbyteorder("=")))
        assert not got[h:].any() and not got[:, w:].any()
        np.testing.assert_array_equal(np.asarray(lab[int(row["position"])])[:h, :w],
                                      0 if labels is None else labels)


def test_encoded_chunks_of_a_shard_flushed_early_are_merged_by_zarr(tmp_path, monkeypatch):
    """A bucket whose pending bytes pass the writer's limit is flushed before its shard is full, and the rest of the
    shard is merged through zarr: encoded chunks are decoded back for that path; the pixels are the same."""
    import gpucnr.store as store

    monkeypatch.setattr(store, "_PENDING_BYTES", 1)  # NB: every image flushes its shard early
    rng = np.random.default_rng(5)
    images = [(rng.integers(0, 3000, (70, 90)).astype(np.uint16), rng.integers(0, 3, (70, 90)).astype(np.int32))
              for _ in range(5)]
    with StackWriter(tmp_path / "s.zarr", labels=True, shard=4, compressor="blosc-zstd") as w:
        for k, (img, labels) in enumerate(images):
            if k % 2:
                w.add(img, labels, {})
            else:
                w.add_encoded(chunks.encode_image(img, labels, compressor="blosc-zstd", labelled=True), {})
        w.close()
    stack = gpucnr.open_stack(tmp_path / "s.zarr")
    (bucket,) = stack.buckets
    pixels, labels = stack.read(bucket, 0, 5)
    for k, (img, lab) in enumerate(images):
        np.testing.assert_array_equal(np.asarray(pixels[k])[:70, :90], img)
        np.testing.assert_array_equal(np.asarray(labels[k])[:70, :90], lab)


def test_encoded_chunks_that_do_not_fit_the_stack_are_refused(tmp_path):
    img = np.arange(64 * 64, dtype=np.int16).reshape(64, 64)
    with StackWriter(tmp_path / "s.zarr", labels=False, shard=4, compressor="blosc-zstd") as w:
        for bad in (chunks.encode_image(img, None, compressor="zstd", labelled=False),
                    chunks.encode_image(img, img.astype(np.int32), compressor="blosc-zstd", labelled=True),
                    {**chunks.encode_image(img, None, compressor="blosc-zstd", labelled=False), "canvas": (128, 64)},
                    {**chunks.encode_image(img, None, compressor="blosc-zstd", labelled=False), "shape": (64, 65)}):
            with pytest.raises(gpucnr.InputError):
                w.add_encoded(bad, {})
        assert w.n_images == 0
    with pytest.raises(ValueError):
        chunks.encode_image(img, img[:10].astype(np.int32), compressor="zstd", labelled=True)
    with pytest.raises(ValueError):
        chunks.encode_image(img, -img.astype(np.int32), compressor="zstd", labelled=True)


def _pair():
    a, b = socket.socketpair()
    return Connection(a.detach()), Connection(b.detach())


def test_messages_carry_large_bytes_out_of_band():
    worker, driver = _pair()
    big = os.urandom(300_000)
    message = ("ok", {"frames": [{"encoded": {"image": big, "labels": big[:40_000], "small": b"x" * 10}}],
                      "n": 3, "arr": np.arange(5)})
    # NB: from another thread, as from a worker process: a socket holds less than one message
    sender = threading.Thread(target=lambda: (send(worker, message), send(worker, "ready")))
    sender.start()
    got = receive(driver)
    enc = got[1]["frames"][0]["encoded"]
    assert type(enc["image"]) is bytes and enc["image"] == big and enc["labels"] == big[:40_000]
    assert enc["small"] == b"x" * 10 and got[1]["n"] == 3
    np.testing.assert_array_equal(got[1]["arr"], np.arange(5))
    assert receive(driver) == "ready"
    sender.join()


def test_a_message_cut_short_is_an_end_of_file():
    """A worker that dies between the pickle and its buffers: the driver reads EOF (-> decoder-crash), never a
    short chunk."""
    worker, driver = _pair()
    big = os.urandom(100_000)
    import io
    import pickle
    import struct

    out = io.BytesIO()
    pickle.Pickler(out, protocol=5).dump(("ok", b"head"))
    worker.send_bytes(struct.pack("<IQ", 1, len(big)) + out.getbuffer())
    os.write(worker.fileno(), big[:1000])  # NB: fits in the socket's buffer: the rest never comes
    worker.close()
    with pytest.raises(EOFError):
        receive(driver)


def test_workers_import_no_table_or_array_libraries():
    """A worker process imports the decoders it needs, not pandas, SciPy, Zarr or Dask (start-up time, and the
    memory limit is measured after its imports)."""
    code = "import gpucnr.sources.tasks, json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = set(json.loads(proc.stdout))
    assert "numpy" in modules
    assert not modules & {"pandas", "scipy", "zarr", "dask", "xarray", "numba", "matplotlib"}


def test_a_worker_reading_rasters_does_not_import_pydicom(tmp_path):
    """pydicom (~0.1 s of a worker's start) is imported, and its validation turned off, when a DICOM file comes,
    not for a folder of PNG files; the silencing of readers' warnings and logs is there from the first file."""
    from PIL import Image

    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(tmp_path / "a.png")
    code = ("import json, logging, sys, warnings\n"
            "from gpucnr.sources import tasks\n"
            "rec = tasks.scan_file(sys.argv[1], b'k' * 32, 2**20)\n"
            "tasks.decode_file(sys.argv[1], rec, {'color': 'rec709', 'nonfinite': 'skip'}, [], [])\n"
            "quiet = logging.getLogger('pydicom').disabled and warnings.filters[0][0] == 'ignore'\n"
            "print(json.dumps(['pydicom' in sys.modules, quiet]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, True]
    dicom = ("import sys\nfrom pydicom import config\nfrom gpucnr.sources import tasks\n"
             "tasks._silence(dicom=True)\nprint(config.settings.reading_validation_mode == config.IGNORE)\n")
    proc = subprocess.run([sys.executable, "-c", dicom], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr
