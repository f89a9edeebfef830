"""Ingest's workers write the shards the driver can plan (issue 18): each planned shard's chunks are appended to a
spool file beside the stack, which the writer renames into place when it holds exactly that shard, and reads back
(checked) otherwise. Whatever the plan meets — duplicates, a file that fails after a good scan, an unpredictable
file, several buckets, multi-frame files, masks, a worker that dies mid-shard — the stack must equal the one
written with every byte passing through the driver."""

from __future__ import annotations

import os
import pickle
import textwrap
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicomfactory import write_dicom, write_raster
from injection import sitecustomize
from pydicom.uid import RLELossless

import gpucnr
from gpucnr import shardfiles, store
from gpucnr.outputs import OutputError
from gpucnr.sources import driver, spoolplan, tasks

KEY = b"k" * 32
RNG = np.random.default_rng(18)


def _corrupt_png(path: Path, side: int = 64) -> Path:
    """A PNG whose header reads fine and whose pixel stream does not (the scan passes, the decode fails)."""
    write_raster(path, RNG.integers(0, 256, (side, side)).astype(np.uint8))
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 4
    n = int.from_bytes(data[at - 8 : at - 4], "big")
    data[at : at + min(n, 40)] = bytes(b ^ 0x5A for b in data[at : at + min(n, 40)])
    # NB: the chunk's own crc is made right again: only the zlib stream inside is wrong
    data[at + n : at + n + 4] = zlib.crc32(data[at - 4 : at + n]).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def _mixed(src: Path) -> None:
    """Files of several buckets, with the cases a plan can miss."""
    for k in range(10):
        write_dicom(src / "a" / f"{k:02d}.dcm", RNG.integers(-1000, 1000, (64, 64)).astype(np.int16),
                    sop_uid=f"1.2.3.{k}")
    write_dicom(src / "a" / "03b.dcm", RNG.integers(-1000, 1000, (64, 64)).astype(np.int16), sop_uid="1.2.3.3")
    for k in range(6):
        write_raster(src / "b" / f"{k:02d}.png", RNG.integers(0, 256, (64, 64)).astype(np.uint8))
    _corrupt_png(src / "b" / "02x.png")
    for k in range(5):
        write_raster(src / "c" / f"{k:02d}.png", RNG.integers(0, 65536, (100, 80)).astype(np.uint16))
    for k in range(2):
        write_raster(src / "d" / f"{k:02d}.png", RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8))
    write_dicom(src / "e" / "multi.dcm", RNG.integers(0, 4000, (3, 64, 64)).astype(np.uint16))
    for k in range(9):
        write_raster(src / "f" / f"{k:02d}.png", RNG.integers(0, 256, (64, 64)).astype(np.uint8))
    write_dicom(src / "z" / "rle.dcm", RNG.integers(0, 4000, (64, 64)).astype(np.uint16), transfer_syntax=RLELossless)


@pytest.fixture
def counted(monkeypatch) -> Counter:
    """How many shards the writer put in place from spool files, and how many spooled chunks it read back."""
    seen: Counter = Counter()
    place, read = store.StackWriter._place, shardfiles.read_spooled

    def counting_place(*a, **k):
        seen["placed"] += 1
        return place(*a, **k)

    def counting_read(*a, **k):
        seen["read back"] += 1
        return read(*a, **k)

    monkeypatch.setattr(store.StackWriter, "_place", counting_place)
    monkeypatch.setattr(shardfiles, "read_spooled", counting_read)
    return seen


def _both(tmp_path: Path, src: Path, monkeypatch, **kw) -> tuple:
    """The same ingest with the workers' spool files and without: (summary, stack) of each."""
    out = []
    for spool in (True, False):
        monkeypatch.setattr(driver, "SPOOL", spool)
        stack = tmp_path / f"stack-{spool}.zarr"
        summary = gpucnr.ingest(src, stack, key_file=tmp_path / "shared.key", workers=2, **kw)
        assert not store.spool_path(stack).exists(), "the spool folder outlived its ingest"
        out.append((summary, gpucnr.open_stack(stack)))
    return out


def _assert_same(a: tuple, b: tuple) -> None:
    (sa, ta), (sb, tb) = a, b
    assert ta.fingerprint() == tb.fingerprint()
    pd.testing.assert_frame_equal(ta.images, tb.images)
    assert (sa.stored, sa.skipped, sa.duplicates, sa.images) == (sb.stored, sb.skipped, sb.duplicates, sb.images)
    assert Path(sa.linkage).read_text() == Path(sb.linkage).read_text()
    assert Path(sa.skipped_list).read_text() == Path(sb.skipped_list).read_text()
    assert [b.name for b in ta.buckets] == [b.name for b in tb.buckets]
    for x, y in zip(ta.buckets, tb.buckets, strict=True):
        (ix, lx), (iy, ly) = ta.read(x, 0, x.size), tb.read(y, 0, y.size)
        np.testing.assert_array_equal(ix, iy)
        assert (lx is None) == (ly is None)
        if lx is not None:
            np.testing.assert_array_equal(lx, ly)


def test_spooled_stack_equals_the_unspooled_one(tmp_path, monkeypatch, counted):
    src = tmp_path / "src"
    _mixed(src)
    spooled, plain = _both(tmp_path, src, monkeypatch, shard=4)
    _assert_same(spooled, plain)
    summary = spooled[0]
    assert summary.duplicates == 1 and summary.skipped == {"decode-error": 1}, (summary.skipped, summary.duplicates)
    # NB: both paths ran: whole shards renamed into place (2 of int16, 1 of the 100x80 PNGs), and the shards the
    # failed PNG shifted read back
    assert counted["placed"] >= 3 and counted["read back"] >= 1, counted


def test_the_plan_follows_a_file_that_failed(tmp_path, monkeypatch, counted):
    """A file that fails after a good scan shifts the places of every image after it: the shards already sent
    are read back (and their spool files removed as soon as they are), the files sent after the driver stored it
    are planned anew and written whole by the workers."""
    removed = []
    remove = store._remove_spool
    monkeypatch.setattr(store, "_remove_spool", lambda path: (removed.append(os.path.exists(path)), remove(path)))
    src = tmp_path / "src"
    for k in range(240):
        write_raster(src / f"{k:03d}.png", RNG.integers(0, 256, (8, 8)).astype(np.uint8))
    _corrupt_png(src / "005x.png", 8)
    spooled, plain = _both(tmp_path, src, monkeypatch, shard=4)
    _assert_same(spooled, plain)
    assert spooled[0].skipped == {"decode-error": 1}
    # NB: at most the files in flight (36 here: (2 x 8 + 2) per worker) are read back, not the 235 after the bad one
    assert counted["placed"] >= 40 and counted["read back"] <= 64, counted
    assert sum(removed) >= 2, "spool files read back were left on disk until the end"


def test_spooled_labels(tmp_path, monkeypatch, counted):
    src = tmp_path / "src"
    for k in range(12):
        image = RNG.integers(0, 256, (64, 64)).astype(np.uint8)
        write_raster(src / f"{k:02d}.png", image)
        mask = np.zeros((64, 64), np.uint8)
        mask[10 + k : 30 + k, 12:40] = 1 + k % 3
        if k != 5:  # NB: one image without a mask: its label plane is zeros
            write_raster(src / f"{k:02d}_mask.png", mask)
    spooled, plain = _both(tmp_path, src, monkeypatch, shard=4, mask_pattern="{stem}_mask.png")
    _assert_same(spooled, plain)
    stack = spooled[1]
    assert stack.has_labels and any(int(stack.read(b, 0, b.size)[1].max()) for b in stack.buckets)
    assert counted["placed"] >= 3 * 2 and counted["read back"] == 0, counted  # NB: images and labels, 3 shards


SITECUSTOMIZE = textwrap.dedent('''
    """Test only (gpucnr's test_ingest_spool): the worker dies right after spooling a marked file's chunk."""
    import os
    import signal

    if os.environ.get("GPUCNR_TEST_SPOOL_CRASH"):
        from gpucnr.sources import tasks as _tasks

        _decode = _tasks.decode_file

        def decode_file(path, *args, **kwargs):
            out = _decode(path, *args, **kwargs)
            if os.path.basename(path) == os.environ["GPUCNR_TEST_SPOOL_CRASH"]:
                os.kill(os.getpid(), signal.SIGSEGV)
            return out

        _tasks.decode_file = decode_file
''')


@pytest.mark.slow
def test_a_worker_that_dies_mid_shard(tmp_path, monkeypatch, counted):
    """The worker dies after appending one file's chunk to a planned shard's spool file, before answering: that
    file is ``decoder-crash``, the shard's other files are decoded again, and the spool file, which now holds a
    chunk of no image, is read back, never renamed into place."""
    sitecustomize(tmp_path, monkeypatch, SITECUSTOMIZE)
    monkeypatch.setenv("GPUCNR_TEST_SPOOL_CRASH", "13.png")
    src = tmp_path / "src"
    for k in range(24):
        write_raster(src / f"{k:02d}.png", RNG.integers(0, 256, (64, 64)).astype(np.uint8))
    spooled, plain = _both(tmp_path, src, monkeypatch, shard=8)
    _assert_same(spooled, plain)
    assert spooled[0].skipped == {"decoder-crash": 1} and spooled[0].images == 23
    assert counted["placed"] >= 1 and counted["read back"] >= 1, counted


def _ref(path: str, offset: int, chunk: bytes, slot: int) -> shardfiles.Spooled:
    return shardfiles.Spooled(path, offset, len(chunk), int.from_bytes(chunk[-4:], "little"), slot)


def test_a_spool_file_is_a_shard_only_when_it_holds_exactly_its_chunks(tmp_path):
    chunks = [shardfiles.with_crc(bytes([k]) * (10 + k)) for k in range(3)]
    path = str(tmp_path / "s.images")
    refs = [shardfiles.spool(path, c, k) for k, c in enumerate(chunks)]
    assert all(isinstance(r, shardfiles.Spooled) for r in refs)
    assert shardfiles.held_bytes() == sum(map(len, chunks)) and not os.path.exists(path)  # NB: held, not written
    shardfiles.flush_spool()
    assert shardfiles.held_bytes() == 0
    assert shardfiles.spooled_run(refs, 3) == path
    assert shardfiles.spooled_run(refs[:2], 2) is None  # NB: the file holds more than these
    assert shardfiles.spooled_run(refs, 4) is None  # NB: not the whole shard
    assert shardfiles.spooled_run([refs[1], refs[0], refs[2]], 3) is None  # NB: slots out of order
    # NB: chunks in the file in another order than their slots: the index says where each is
    other = str(tmp_path / "t.images")
    swapped = [shardfiles.spool(other, chunks[k], k) for k in (1, 0, 2)]
    shardfiles.flush_spool()
    assert shardfiles.spooled_run([swapped[1], swapped[0], swapped[2]], 3) == other
    with open(path, "ab") as fh:
        fh.write(b"x")  # NB: a worker that died mid-write
    assert shardfiles.spooled_run(refs, 3) is None
    assert [shardfiles.read_spooled(r) for r in refs] == chunks
    fake = _ref(path, refs[1].offset, chunks[1], 1)
    fake.crc ^= 1
    with pytest.raises(OSError):
        shardfiles.read_spooled(fake)  # NB: not the crc32c the worker reported
    data = bytearray(Path(path).read_bytes())
    data[refs[2].offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(OSError):
        shardfiles.read_spooled(refs[2])  # NB: changed on disk since it was written


def test_a_spool_write_that_fails_sends_the_bytes(tmp_path):
    chunk = shardfiles.with_crc(b"abc")
    ref = shardfiles.spool(str(tmp_path / "missing" / "s.images"), chunk, 0)
    with pytest.raises(RuntimeError):
        pickle.dumps(ref)  # NB: a chunk's place is sent only once it is written
    shardfiles.flush_spool()
    assert ref.failed == chunk and pickle.loads(pickle.dumps(ref)) == chunk


def test_held_chunks_go_out_in_one_write_per_spool_file_in_the_order_held(tmp_path):
    chunks = [shardfiles.with_crc(bytes([k]) * (100 + k)) for k in range(5)]
    a, b = str(tmp_path / "a.images"), str(tmp_path / "b.images")
    Path(a).write_bytes(b"earlier")  # NB: what another worker appended before
    refs = [shardfiles.spool(a if k % 2 else b, c, k) for k, c in enumerate(chunks)]
    shardfiles.flush_spool()
    sent = [pickle.loads(pickle.dumps(r)) for r in refs]
    assert all(isinstance(r, shardfiles.Spooled) and r.failed is None for r in sent)
    n = [len(c) for c in chunks]
    assert [r.offset for r in sent] == [0, 7, n[0], 7 + n[1], n[0] + n[2]]
    assert [shardfiles.read_spooled(r) for r in sent] == chunks
    assert os.path.getsize(a) == 7 + n[1] + n[3] and os.path.getsize(b) == n[0] + n[2] + n[4]


@pytest.mark.parametrize("name,write", [
    ("int16.dcm", lambda p: write_dicom(p, RNG.integers(-9, 9, (70, 50)).astype(np.int16))),
    ("uint8.dcm", lambda p: write_dicom(p, RNG.integers(0, 9, (64, 64)).astype(np.uint8))),
    ("frames.dcm", lambda p: write_dicom(p, RNG.integers(0, 9, (3, 20, 30)).astype(np.uint16))),
    ("gray.png", lambda p: write_raster(p, RNG.integers(0, 9, (33, 65)).astype(np.uint8))),
    ("gray16.png", lambda p: write_raster(p, RNG.integers(0, 9, (33, 65)).astype(np.uint16))),
    ("rgb.png", lambda p: write_raster(p, RNG.integers(0, 9, (40, 40, 3)).astype(np.uint8))),
    ("rgba.png", lambda p: write_raster(p, RNG.integers(0, 9, (40, 40, 4)).astype(np.uint8))),
    ("palette.png", lambda p: write_raster(p, RNG.integers(0, 3, (40, 40)).astype(np.uint8),
                                           palette=list(range(9)))),
    ("gray16.tiff", lambda p: write_raster(p, RNG.integers(0, 9, (20, 20)).astype(np.uint16), fmt="TIFF")),
    ("float.tiff", lambda p: write_raster(p, RNG.random((20, 20)).astype(np.float32), fmt="TIFF")),
    ("pages.tiff", lambda p: write_raster(p, fmt="TIFF", frames=[RNG.integers(0, 9, (20, 20)).astype(np.uint8)] * 2)),
])
def test_the_plan_predicts_what_the_decode_stores(tmp_path, name, write):
    """The bucket and frame count `_spool_plan` predicts from a header record are those the decode gives (a wrong
    guess would only cost speed; this keeps the common formats on the fast path)."""
    path = tmp_path / name
    write(path)
    options = {"color": "rec709", "nonfinite": "skip", "mask_threshold": None}
    record = tasks.scan_file(str(path), KEY, 2**30)
    out = tasks.decode_file(str(path), record, options, [], [])
    frames = [f["pixels"] for f in out["frames"]]
    actual = (gpucnr.chunks.canvas(frames[0].shape), frames[0].dtype.newbyteorder("=").str, len(frames))
    assert spoolplan.predicted_frames(record, options) == actual


def test_a_spool_folder_left_inside_src_dir_is_not_an_input(tmp_path):
    """An ingest killed with its stack inside SRC_DIR leaves `<stack>.spool` there: a later ingest of SRC_DIR does
    not take its files for images (as it skips the stack itself and the files beside it)."""
    src = tmp_path / "src"
    for k in range(3):
        write_raster(src / f"{k}.png", RNG.integers(0, 256, (16, 16)).astype(np.uint8))
    first = gpucnr.ingest(src, src / "old.zarr", workers=1)
    assert first.files_in == 3
    spool = store.spool_path(src / "old.zarr")
    spool.mkdir()
    (spool / "16x16-uint8-0-0.images").write_bytes(b"x" * 100)
    again = gpucnr.ingest(src, tmp_path / "new.zarr", workers=1)
    assert again.files_in == 3 and not again.skipped, again.skipped


def test_something_else_at_the_spool_folder_is_refused_never_deleted(tmp_path):
    src = tmp_path / "src"
    write_raster(src / "a.png", RNG.integers(0, 256, (16, 16)).astype(np.uint8))
    stack = tmp_path / "stack.zarr"
    spool = store.spool_path(stack)
    spool.mkdir()
    (spool / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="spool folder") as e:
        gpucnr.ingest(src, stack, workers=1)
    assert e.value.code == "output-path" and (spool / "notes.txt").read_text() == "mine" and not stack.exists()
    (spool / "notes.txt").unlink()
    spool.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "16x16-uint8-0-0.images").write_bytes(b"kept")
    spool.symlink_to(elsewhere)  # NB: a link planted at its name is removed, not followed
    gpucnr.ingest(src, stack, workers=1)
    assert (elsewhere / "16x16-uint8-0-0.images").read_bytes() == b"kept" and not os.path.lexists(spool)


def test_one_image_per_shard(tmp_path, monkeypatch, counted):
    """Large images fill a shard alone (2^22 px per shard by default): each file's worker writes its own shard."""
    src = tmp_path / "src"
    for k in range(6):
        write_dicom(src / f"{k}.dcm", RNG.integers(-1000, 1000, (48, 40)).astype(np.int16), sop_uid=f"1.2.9.{k}")
    spooled, plain = _both(tmp_path, src, monkeypatch, shard=1)
    _assert_same(spooled, plain)
    assert counted["placed"] == 6 and counted["read back"] == 0, counted


def test_placed_shards_get_the_mode_of_the_stack_s_other_files(tmp_path, monkeypatch, counted):
    """A shard renamed from a spool file is readable as any file zarr wrote (a stack shared with a group)."""
    src = tmp_path / "src"
    for k in range(8):
        write_raster(src / f"{k}.png", RNG.integers(0, 256, (16, 16)).astype(np.uint8))
    old = os.umask(0o022)
    try:
        gpucnr.ingest(src, tmp_path / "stack.zarr", workers=1, shard=4)
    finally:
        os.umask(old)
    assert counted["placed"] == 2
    shards = [p for p in (tmp_path / "stack.zarr" / "buckets").rglob("*") if p.is_file() and p.parent.name == "0"
              and "images" in p.parts]
    modes = {oct(p.stat().st_mode & 0o777) for p in shards}
    assert modes == {oct((tmp_path / "stack.zarr" / "zarr.json").stat().st_mode & 0o777)} == {"0o644"}, modes
