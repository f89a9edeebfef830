"""The stack on Zarr v3 (DESIGN §5): layout, round trip, fingerprint, and every integrity fault as a coded error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pandas as pd
import pytest
import zarr

import gpucnr
from gpucnr.errors import InputError
from gpucnr.phantom import make_phantom
from gpucnr.store import COMPRESSORS, chunk_checksums, fingerprint

N, SIZE, SHARD = 40, 96, 16
BUCKET = "128x128-uint16"
IMAGES = f"buckets/{BUCKET}/images"
LABELS = f"buckets/{BUCKET}/labels"
WRITTEN = f"buckets/{BUCKET}/written"
EMPTY = 2**64 - 1  # a shard index entry for a chunk that is not there


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(N, (SIZE, SIZE), seed=3)


def write(path, ph, **kw):
    kw.setdefault("labels", ph.labels)
    kw.setdefault("rois", ph.rois)
    kw.setdefault("shard", SHARD)
    return gpucnr.write_stack(path, ph.images, **kw)


def shard_file(stack_path, array: str, s: int) -> Path:
    arr = zarr.open_array(str(Path(stack_path, array)), mode="r")
    return Path(stack_path, array, arr.metadata.encode_chunk_key((s, 0, 0)))


def shard_key(stack_path, array: str, s: int) -> str:
    return shard_file(stack_path, array, s).relative_to(Path(stack_path, array)).as_posix()


def shard_index(data: bytes, n_chunks: int = SHARD) -> np.ndarray:
    """(offset, nbytes) of each inner chunk: the shard index at the end of the shard (bytes + crc32c)."""
    size = n_chunks * 16
    raw = data[-(size + 4) : -4]
    assert np.uint32(google_crc32c.value(raw)) == np.frombuffer(data[-4:], "<u4")[0]
    return np.frombuffer(raw, "<u8").reshape(n_chunks, 2).copy()


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def set_entries(stack_path, array: str, index, value) -> None:
    arr = zarr.open_array(str(Path(stack_path, array)), mode="r+", config={"write_empty_chunks": True})
    arr[index] = value


def expect_error(code: str, call, *names: str) -> gpucnr.StackError:
    with pytest.raises(gpucnr.StackError) as info:
        call()
    err = info.value
    assert err.code == code, str(err)
    for name in names:
        assert name in str(err), (name, str(err))
    return err


# --------------------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------------------


def mixed_images():
    """Images of several sizes and dtypes, in an order that is not bucket order."""
    rng = np.random.default_rng(7)
    specs = [((96, 96), "uint16"), ((100, 70), "uint8"), ((64, 64), "int16"), ((130, 65), "float32"),
             ((96, 96), "uint16"), ((33, 120), "uint8"), ((128, 128), "uint16"), ((1, 1), "int16"),
             ((65, 64), "float32"), ((90, 100), "uint16"), ((64, 64), "int16")]
    images = []
    for (h, w), dtype in specs:
        if dtype == "float32":
            images.append(rng.normal(0.0, 1000.0, (h, w)).astype(np.float32))
        else:
            info = np.iinfo(dtype)
            images.append(rng.integers(info.min, info.max, (h, w), endpoint=True).astype(dtype))
    return images


def canvas(shape):
    return tuple(-(-s // 64) * 64 for s in shape)


def test_buckets_by_canvas_and_dtype_and_pixels_read_back(tmp_path):
    images = mixed_images()
    st = gpucnr.write_stack(tmp_path / "s.zarr", images, shard=4)
    keys = {(canvas(a.shape), a.dtype.name) for a in images}
    assert {b.name for b in st.buckets} == {f"{c[0]}x{c[1]}-{d}" for c, d in keys}
    assert len(st.buckets) == len(keys) == 6
    assert st.n_images == len(images)
    table = st.images
    for b in st.buckets:
        (h, w), dtype = b.name.split("-")[0].split("x"), b.name.split("-", 1)[1]
        assert b.images.shape[1:] == (int(h), int(w))
        assert b.images.dtype == np.dtype(dtype)  # native dtype, never converted
        rows = table[table["bucket"] == b.name].sort_values("index")
        assert rows["index"].tolist() == list(range(b.offset, b.offset + b.size))
        assert rows["position"].tolist() == list(range(b.size))
        pixels, labels = st.read(b, 0, b.size)
        assert labels is None
        assert pixels.dtype == np.dtype(dtype)
        for k, (_, row) in enumerate(rows.iterrows()):
            src = images[int(row["source_index"])]
            assert (int(row["valid_h"]), int(row["valid_w"])) == src.shape  # never resampled
            assert canvas(src.shape) == b.images.shape[1:]
            np.testing.assert_array_equal(pixels[k, : src.shape[0], : src.shape[1]], src)
            assert not pixels[k, src.shape[0] :].any() and not pixels[k, :, src.shape[1] :].any()


def test_global_index_is_bucket_major_and_source_index_maps_back(tmp_path):
    images = mixed_images()
    st = gpucnr.write_stack(tmp_path / "s.zarr", images, shard=4)
    table = st.images
    assert table["index"].tolist() == list(range(len(images)))
    assert sorted(table["source_index"].tolist()) == list(range(len(images)))
    # Bucket-major: each bucket is one contiguous slice of the global index, buckets follow one another.
    offset = 0
    for b in st.buckets:
        assert b.offset == offset
        rows = table.iloc[b.offset : b.offset + b.size]
        assert (rows["bucket"] == b.name).all()
        # Input order within a bucket.
        assert rows["source_index"].is_monotonic_increasing
        offset += b.size
    assert offset == len(images)
    # Reopened, the same table.
    again = gpucnr.open_stack(tmp_path / "s.zarr")
    pd.testing.assert_frame_equal(again.images, table)
    # Bucket order is deterministic: canvas, then dtype name; the input order does not matter.
    assert [b.name for b in st.buckets] == ["64x64-int16", "64x128-uint8", "128x64-float32", "128x128-uint16",
                                           "128x128-uint8", "192x128-float32"]
    assert table["source_index"].tolist() == [2, 7, 10, 5, 8, 0, 4, 6, 9, 1, 3]


def test_labels_round_trip(tmp_path, phantom):
    st = write(tmp_path / "s.zarr", phantom)
    assert st.has_labels and len(st.buckets) == 1
    b = st.buckets[0]
    assert b.labels.shape == b.images.shape and np.dtype(b.labels.dtype).kind in "iu"
    images, labels = st.read(b, 0, b.size)
    np.testing.assert_array_equal(images[:, :SIZE, :SIZE], phantom.images)
    np.testing.assert_array_equal(labels[:, :SIZE, :SIZE], phantom.labels)
    assert not labels[:, SIZE:].any() and not labels[:, :, SIZE:].any()
    _, none = st.read(b, 0, 4, labels=False)
    assert none is None


def test_labels_of_mixed_sizes_follow_their_images(tmp_path):
    images = mixed_images()
    labels = [np.arange(a.size, dtype=np.int32).reshape(a.shape) % 5 for a in images]
    labels[3] = (labels[3] > 2).astype(bool)  # boolean labels are integer enough
    st = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels, shard=4)
    for b in st.buckets:
        _, lab = st.read(b, 0, b.size)
        for k in range(b.size):
            row = st.images.iloc[b.offset + k]
            src = labels[int(row["source_index"])]
            np.testing.assert_array_equal(lab[k, : src.shape[0], : src.shape[1]], src.astype(np.int32))
    assert st.roi_ids.tolist() == [1, 2, 3, 4]


def test_roi_table_stored_against_global_index(tmp_path):
    rng = np.random.default_rng(1)
    # Input order A (96x96 uint16), B (64x64 uint8), C (96x96 uint16): B's bucket comes first.
    images = [rng.integers(0, 1000, (96, 96)).astype(np.uint16), rng.integers(0, 200, (64, 64)).astype(np.uint8),
              rng.integers(0, 1000, (96, 96)).astype(np.uint16)]
    rois = pd.DataFrame({"image": [0, 2, 1, 0], "roi": [2, 2, 5, 7], "kind": ["disk", "square", "disk", "disk"],
                         "cx": [40, 41, 30, 50], "cy": [42, 43, 31, 51], "r": [5, 6, 4, 3],
                         "name": ["a", "c", "b", "a2"]})
    labels = [np.zeros(a.shape, np.int32) for a in images]
    labels[0][10:20, 10:20] = 3
    labels[1][5:9, 5:9] = 2
    st = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels, rois=rois, shard=4)
    global_of = dict(zip(st.images["source_index"], st.images["index"], strict=True))
    assert global_of == {1: 0, 0: 1, 2: 2}
    stored = gpucnr.open_stack(tmp_path / "s.zarr").rois
    assert stored is not None and len(stored) == len(rois)
    got = {(int(r.image), int(r.roi)): (str(r.kind), int(r.cx), int(r.cy), int(r.r), str(r.name))
           for r in stored.itertuples()}
    want = {(global_of[int(r.image)], int(r.roi)): (r.kind, r.cx, r.cy, r.r, r.name) for r in rois.itertuples()}
    assert got == want
    # roi_ids: the union of the label ids {2, 3} and the table ids {2, 5, 7}, known before any pixel is read.
    assert st.roi_ids.tolist() == [2, 3, 5, 7]
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["roi_ids"] == [2, 3, 5, 7]


def test_meta_columns_land_in_the_per_image_table(tmp_path):
    images = mixed_images()
    n = len(images)
    meta = pd.DataFrame({"modality": [["CT", "MR", "CR", "DX"][i % 4] for i in range(n)],
                         "slope": np.linspace(0.5, 2.5, n), "intercept": -np.arange(n, dtype=float) * 10,
                         "photometric": ["MONOCHROME1" if i % 3 == 0 else "MONOCHROME2" for i in range(n)],
                         "site": [f"S{i:03d}" for i in range(n)]},  # NB: "patient" would be refused (DESIGN §10)
                        index=np.arange(100, 100 + n))  # any index: rows are taken in input order
    st = gpucnr.write_stack(tmp_path / "s.zarr", images, meta=meta, shard=4)
    table = gpucnr.open_stack(tmp_path / "s.zarr").images
    src = table["source_index"].to_numpy()
    for col in ("modality", "photometric", "site"):
        assert table[col].astype(str).tolist() == meta[col].to_numpy()[src].tolist(), col
    np.testing.assert_array_equal(table["slope"].to_numpy(np.float64), meta["slope"].to_numpy()[src])
    np.testing.assert_array_equal(table["intercept"].to_numpy(np.float64), meta["intercept"].to_numpy()[src])
    assert np.isnan(table["padding"].to_numpy(np.float64)).all()  # the default
    assert st.n_images == n


def test_case_pseudonyms_are_not_screened_as_record_numbers(tmp_path, phantom):
    # NB: ingest's case pseudonyms are 20 hex digits, which often hold a run of six decimal digits; enhance carries
    # them into its new stack, which refused them by chance (a new user's walk)
    from gpucnr.identifiers import IdentifyingError

    n = phantom.images.shape[0]
    own = ["f46452a4b759162983e1", ""] * (n // 2) + [""] * (n % 2)
    gpucnr.write_stack(tmp_path / "a.zarr", phantom.images, meta=pd.DataFrame({"case": own}))
    assert gpucnr.open_stack(tmp_path / "a.zarr").images["case"].astype(str).tolist()[:1] == [own[0]]
    theirs = ["case 1234567"] + [""] * (n - 1)  # free text: still screened
    with pytest.raises(IdentifyingError, match="case"):
        gpucnr.write_stack(tmp_path / "b.zarr", phantom.images, meta=pd.DataFrame({"case": theirs}))


def test_a_refused_meta_value_says_the_way_out(tmp_path, phantom):
    # NB: a new user's walk: site codes of 6 digits were refused as record numbers, with no word of what to do
    from gpucnr.identifiers import IdentifyingError

    n = phantom.images.shape[0]
    codes = [str(100042 + i % 3) for i in range(n)]
    with pytest.raises(IdentifyingError, match="identifying-column") as err:
        gpucnr.write_stack(tmp_path / "a.zarr", phantom.images, meta=pd.DataFrame({"site": codes}))
    text = str(err.value)
    assert "column 'site' is refused: row 0 holds a run of 6 or more digits" in text
    assert "recode them without 6 digits in a row" in text and "a prefix is not enough" in text
    assert "patient_id" in text and "100042" not in text  # NB: the value is never quoted
    gpucnr.write_stack(tmp_path / "b.zarr", phantom.images,
                       meta=pd.DataFrame({"site": [f"site-{i % 3}" for i in range(n)]}))
    with pytest.raises(IdentifyingError, match=r"holds a date; if the time matters, keep a coarser value"):
        gpucnr.write_stack(tmp_path / "c.zarr", phantom.images, meta=pd.DataFrame({"when": ["2021-03-04"] * n}))


def test_meta_defaults(tmp_path, phantom):
    st = write(tmp_path / "s.zarr", phantom, labels=None, rois=None)
    t = st.images
    assert (t["slope"] == 1.0).all() and (t["intercept"] == 0.0).all()
    assert t["padding"].isna().all() and (t["photometric"].astype(str) == "MONOCHROME2").all()
    assert t["source_index"].tolist() == list(range(N))  # one bucket: global index = input order
    assert st.rois is None and st.roi_ids.tolist() == [] and not st.has_labels


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_shard_grid_codecs_and_compressor(tmp_path, phantom, compressor):
    path = tmp_path / "s.zarr"
    st = write(path, phantom, compressor=compressor)
    assert st.shard == SHARD and st.compressor == compressor
    for arr in (st.buckets[0].images, st.buckets[0].labels):
        assert arr.chunks == (1, 128, 128)  # inner chunk = one image
        assert arr.shards == (SHARD, 128, 128)  # shard = one batch
        meta = json.loads(Path(path, arr.path, "zarr.json").read_text())
        sharding = meta["codecs"][0]
        assert sharding["name"] == "sharding_indexed"
        inner = [c["name"] for c in sharding["configuration"]["codecs"]]
        assert inner[-1] == "crc32c"
        assert ("blosc" if compressor.startswith("blosc") else "zstd") in inner
        # NB: a name means one codec and level for good: old stacks resume and fingerprint as they were written
        assert sharding["configuration"]["codecs"][1]["configuration"] == _CODECS[compressor](arr.dtype.itemsize)
    files = sorted(p.relative_to(path / IMAGES).as_posix() for p in (path / IMAGES).rglob("*") if p.is_file()
                   and p.name != "zarr.json")
    assert files == [f"c/{s}/0/0" for s in range(-(-N // SHARD))]
    assert zarr.open_group(str(path), mode="r").attrs["compressor"] == compressor
    # The manifest: one flag per image, chunked by shard, all written.
    written = zarr.open_array(str(path / WRITTEN), mode="r")
    assert written.shape == (N,) and written.chunks == (SHARD,) and np.asarray(written[:]).all()


_CODECS = {"blosc-lz4": lambda size: {"typesize": size, "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle",
                                       "blocksize": 0},
           "blosc-zstd": lambda size: {"typesize": size, "cname": "zstd", "clevel": 3, "shuffle": "bitshuffle",
                                       "blocksize": 0},
           "zstd": lambda size: {"level": 3, "checksum": False}}


def test_new_stacks_default_to_blosc_lz4_and_old_ones_keep_theirs(tmp_path, phantom):
    """New stacks are blosc-lz4 (issue 18: ~4x cheaper to write than blosc-zstd); a stack that records no
    compressor predates the choice and reads as blosc-zstd, the default it was written with."""
    st = write(tmp_path / "new.zarr", phantom)
    assert st.compressor == "blosc-lz4" == gpucnr.store.DEFAULT_COMPRESSOR
    old = write(tmp_path / "old.zarr", phantom, compressor="blosc-zstd")
    group = zarr.open_group(str(old.path), mode="r+")
    attrs = dict(group.attrs)
    del attrs["compressor"]
    group.attrs.put(attrs)
    assert gpucnr.open_stack(old.path, check=False).compressor == "blosc-zstd"


def test_unknown_compressor_is_an_input_error(tmp_path, phantom):
    with pytest.raises(gpucnr.InputError, match="compressor"):
        write(tmp_path / "s.zarr", phantom, compressor="lz4")


def test_all_zero_images_keep_their_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    images = np.zeros((N, SIZE, SIZE), np.uint16)
    labels = np.zeros((N, SIZE, SIZE), np.int32)
    st = gpucnr.write_stack(path, images, labels=labels, shard=SHARD)
    for array in (IMAGES, LABELS):
        for s in range(3):
            data = shard_file(path, array, s).read_bytes()
            index = shard_index(data)
            stored = min(SHARD, N - s * SHARD)
            # write_empty_chunks: every image's chunk is in its shard, even an all-zero one.
            assert (index[:stored] != EMPTY).all(), (array, s, index)
    st = gpucnr.open_stack(path)  # the completeness check passes
    pixels, lab = st.read(st.buckets[0], 0, N)
    assert not pixels.any() and not lab.any()


def test_write_stack_refuses_an_existing_path(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    st = write(path, phantom)
    before = st.fingerprint()
    with pytest.raises(gpucnr.InputError, match="exists"):
        write(path, phantom, rois=None)
    assert gpucnr.open_stack(path).fingerprint() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(gpucnr.InputError, match="exists"):
        write(empty, phantom)
    assert list(empty.iterdir()) == []


def test_mixed_byte_orders_of_one_dtype_share_a_bucket(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 60000, (96, 96)).astype("<u2")
    b = rng.integers(0, 60000, (96, 96)).astype(">u2")
    st = gpucnr.write_stack(tmp_path / "s.zarr", [a, b], shard=4)
    assert [x.name for x in st.buckets] == [BUCKET]
    pixels, _ = st.read(st.buckets[0], 0, 2)
    np.testing.assert_array_equal(pixels[0, :96, :96], a)
    np.testing.assert_array_equal(pixels[1, :96, :96], b)


@pytest.mark.parametrize("case", ["3d-plane", "label-shape", "float-labels", "label-count", "meta-rows",
                                  "complex", "4d-array"])
def test_input_errors(tmp_path, case):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 100, (40, 50)).astype(np.uint16), rng.integers(0, 100, (70, 30)).astype(np.uint16)]
    labels = [np.zeros(a.shape, np.int32) for a in images]
    meta = None
    if case == "3d-plane":
        images[1] = np.zeros((2, 70, 30), np.uint16)
    elif case == "label-shape":
        labels[1] = np.zeros((70, 31), np.int32)
    elif case == "float-labels":
        labels[0] = labels[0].astype(np.float32)
    elif case == "label-count":
        labels = labels[:1]
    elif case == "meta-rows":
        meta = pd.DataFrame({"modality": ["CT"] * 3})
    elif case == "complex":
        images[0] = images[0].astype(np.complex64)
    elif case == "4d-array":
        images = np.zeros((2, 1, 40, 50), np.uint16)
        labels = None
    path = tmp_path / "s.zarr"
    with pytest.raises(gpucnr.InputError) as info:
        gpucnr.write_stack(path, images, labels=labels, meta=meta)
    assert info.value.code in ("bad-input", "shape-mismatch")
    if case in ("3d-plane", "label-shape"):
        assert "1" in info.value.reason  # names the offending image
    assert not path.exists()  # nothing written


def test_bad_roi_table_leaves_nothing_on_disk(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    bad = phantom.rois.assign(kind="triangle")
    with pytest.raises(gpucnr.RoiTableError):
        write(path, phantom, rois=bad)
    # An invalid input must not leave a half-written stack that blocks the next write_stack at this path.
    assert not path.exists()
    write(path, phantom)


# --------------------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------------------


def test_fingerprint_stable_across_reopen_and_move(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    st = write(path, phantom)
    fp = st.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert gpucnr.open_stack(path).fingerprint() == fp == fingerprint(path)
    shutil.copytree(path, tmp_path / "moved.zarr")
    assert gpucnr.open_stack(tmp_path / "moved.zarr").fingerprint() == fp


def test_fingerprint_follows_pixels_and_labels_bucket_by_bucket(tmp_path, phantom):
    """Fingerprint version 2 (issue 9): other pixels or labels give another fingerprint, and the bucket digests
    name the bucket that differs; only the recorded chunk checksums are read, never the pixels."""
    a = write(tmp_path / "a.zarr", phantom)
    other = make_phantom(N, (SIZE, SIZE), seed=3, background=1500.0, noise=35.0)
    np.testing.assert_array_equal(other.labels, phantom.labels)
    b = gpucnr.write_stack(tmp_path / "b.zarr", other.images, labels=phantom.labels, rois=phantom.rois, shard=SHARD)
    assert a.fingerprint() != b.fingerprint()
    assert a.bucket_digests().keys() == b.bucket_digests().keys() == {BUCKET}
    assert a.bucket_digests()[BUCKET] != b.bucket_digests()[BUCKET]
    one = phantom.images.copy()
    one[17, 3, 4] += 1  # one pixel of one image
    c = gpucnr.write_stack(tmp_path / "c.zarr", one, labels=phantom.labels, rois=phantom.rois, shard=SHARD)
    assert c.fingerprint() != a.fingerprint()
    labels = phantom.labels.copy()
    labels[5, 0, 0] = 1  # one label pixel
    assert write(tmp_path / "d.zarr", phantom, labels=labels).fingerprint() != a.fingerprint()
    assert write(tmp_path / "e.zarr", phantom).fingerprint() == a.fingerprint()


def test_fingerprint_ignores_how_metadata_is_spelled(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    base = write(path, phantom).fingerprint()
    edit_json(path / WRITTEN / "zarr.json", lambda m: m.update(dimension_names=["image"]))
    edit_json(path / IMAGES / "zarr.json", lambda m: m.pop("dimension_names"))
    edit_json(path / "zarr.json", lambda m: m["attributes"].update(note="added later"))
    assert fingerprint(path) == base


def test_pixels_changed_in_place_are_stack_damaged_on_read(tmp_path, phantom):
    """zarr rewrites the chunk with a valid crc32c, but not the one recorded for the position."""
    path = tmp_path / "s.zarr"
    base = write(path, phantom).fingerprint()
    set_entries(path, IMAGES, (slice(0, 3), slice(0, 10), slice(0, 10)), 7)
    stack = gpucnr.open_stack(path)
    assert stack.fingerprint() == base  # the recorded checksums did not change ...
    err = expect_error("stack-damaged", lambda: stack.read(stack.buckets[0], 0, 4), IMAGES)
    assert "image 0" in str(err)  # ... and the reader refuses the chunk that is not the recorded one


def test_swapped_image_shards_are_stack_damaged(tmp_path, phantom):
    """Two shards swapped on disk: each chunk's own checksum is valid, its position's is not (issue 9)."""
    path = tmp_path / "s.zarr"
    stack = write(path, phantom)
    first, second = shard_file(path, IMAGES, 0), shard_file(path, IMAGES, 1)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    stack = gpucnr.open_stack(path)
    expect_error("stack-damaged", lambda: stack.read(stack.buckets[0], 0, SHARD), IMAGES)
    expect_error("stack-damaged", lambda: stack.read(stack.buckets[0], SHARD, 2 * SHARD), IMAGES)


def test_fingerprint_changes_with_tables_and_manifest(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    base = write(path, phantom).fingerprint()
    set_entries(path, "tables/images/slope", 5, 2.0)
    assert fingerprint(path) != base
    set_entries(path, "tables/images/slope", 5, 1.0)
    assert fingerprint(path) == base  # the hash is of the content, nothing else
    set_entries(path, "tables/rois/cx", 0, int(phantom.rois["cx"][0]) + 1)
    assert fingerprint(path) != base
    set_entries(path, "tables/rois/cx", 0, int(phantom.rois["cx"][0]))
    assert fingerprint(path) == base
    set_entries(path, WRITTEN, 3, 0)
    assert fingerprint(path) != base
    set_entries(path, WRITTEN, 3, 1)
    assert fingerprint(path) == base
    edit_json(path / "zarr.json", lambda m: m["attributes"].update(roi_ids=[1, 2]))
    assert fingerprint(path) != base


def test_fingerprint_differs_with_metadata(tmp_path, phantom):
    a = write(tmp_path / "a.zarr", phantom).fingerprint()
    meta = pd.DataFrame({"slope": np.full(N, 1.0), "intercept": np.zeros(N)})
    meta.loc[7, "intercept"] = -1024.0
    assert write(tmp_path / "b.zarr", phantom, meta=meta).fingerprint() != a
    assert write(tmp_path / "c.zarr", phantom, shard=8).fingerprint() != a


# --------------------------------------------------------------------------------------------------------------
# Integrity: every fault a coded error naming the array and chunk, never data read as zeros
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("array", [IMAGES, LABELS])
def test_missing_shard_is_an_error_at_open(tmp_path, phantom, array):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    key = shard_key(path, array, 1)
    assert key == "c/1/0/0"
    shard_file(path, array, 1).unlink()
    expect_error("missing-chunk", lambda: gpucnr.open_stack(path), array, key)
    # The run refuses too (before any results are written).
    expect_error("missing-chunk", lambda: gpucnr.run(path, tmp_path / "r.zarr", scheduler="synchronous"), array)
    assert not (tmp_path / "r.zarr").exists()


def test_missing_last_partial_shard(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    shard_file(path, IMAGES, 2).unlink()
    err = expect_error("missing-chunk", lambda: gpucnr.open_stack(path), IMAGES, "c/2/0/0")
    assert f"{2 * SHARD}..{N - 1}" in str(err)  # the images it held


def test_missing_inner_chunk_is_not_read_as_zeros(tmp_path, phantom):
    """A shard whose index (valid crc32c) says one image's chunk is absent: zarr reads that image as zeros."""
    path = tmp_path / "s.zarr"
    write(path, phantom)
    f = shard_file(path, IMAGES, 1)
    data = bytearray(f.read_bytes())
    index = shard_index(bytes(data))
    index[4] = EMPTY  # image 20's chunk
    raw = index.astype("<u8").tobytes()
    data[-(len(raw) + 4) :] = raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()
    f.write_bytes(bytes(data))
    try:
        st = gpucnr.open_stack(path)
    except gpucnr.StackError as e:
        assert e.code == "missing-chunk" and IMAGES in str(e), str(e)
        return
    expect_error("missing-chunk", lambda: st.read(st.buckets[0], SHARD, 2 * SHARD), IMAGES)


def flip_byte(path, chunk: int) -> int:
    """Flip a byte in the middle of inner chunk `chunk` of shard 1; returns the global index of its image."""
    f = shard_file(path, IMAGES, 1)
    data = bytearray(f.read_bytes())
    offset, nbytes = shard_index(bytes(data))[chunk]
    data[int(offset + nbytes // 2)] ^= 0xFF
    f.write_bytes(bytes(data))
    return SHARD + chunk


def truncate(path, chunk: int) -> list[int]:
    """Cut shard 1 in half (its index, at the end, is lost): every image of the shard is undecodable."""
    f = shard_file(path, IMAGES, 1)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return list(range(SHARD, 2 * SHARD))


def test_flipped_byte_is_a_corrupt_chunk_on_read(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    image = flip_byte(path, 5)
    st = gpucnr.open_stack(path)  # the shard is there; its bytes are checked when read
    b = st.buckets[0]
    err = expect_error("corrupt-chunk", lambda: st.read(b, SHARD, 2 * SHARD), IMAGES)
    assert "c/1/0/0" in str(err) or f"{SHARD}..{2 * SHARD - 1}" in str(err)
    expect_error("corrupt-chunk", lambda: st.read(b, image, image + 1), IMAGES, f"image {image}")
    expect_error("corrupt-chunk", lambda: st.read(b, 0, N), IMAGES)
    # The rest of the shard and the other shards still read as data.
    good, _ = st.read(b, image + 1, 2 * SHARD)
    np.testing.assert_array_equal(good[:, :SIZE, :SIZE], phantom.images[image + 1 : 2 * SHARD])
    good, _ = st.read(b, 0, SHARD)
    np.testing.assert_array_equal(good[:, :SIZE, :SIZE], phantom.images[:SHARD])


def test_flipped_shard_index_is_a_corrupt_chunk(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    f = shard_file(path, LABELS, 0)
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01
    f.write_bytes(bytes(data))
    st = gpucnr.open_stack(path)
    expect_error("corrupt-chunk", lambda: st.read(st.buckets[0], 0, SHARD), LABELS)
    expect_error("corrupt-chunk", lambda: st.read(st.buckets[0], 3, 4), LABELS)
    images, labels = st.read(st.buckets[0], 3, 4, labels=False)
    assert labels is None and np.array_equal(images[0, :SIZE, :SIZE], phantom.images[3])


def test_truncated_shard_is_a_corrupt_chunk_on_read(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    truncate(path, 0)
    st = gpucnr.open_stack(path)
    b = st.buckets[0]
    for start in range(SHARD, 2 * SHARD, 5):
        expect_error("corrupt-chunk", lambda s=start: st.read(b, s, s + 1), IMAGES)
    good, _ = st.read(b, 2 * SHARD, N)
    np.testing.assert_array_equal(good[:, :SIZE, :SIZE], phantom.images[2 * SHARD :])


@pytest.fixture(scope="module")
def clean_results(tmp_path_factory, phantom):
    base = tmp_path_factory.mktemp("clean")
    write(base / "s.zarr", phantom)
    return gpucnr.run(base / "s.zarr", base / "r.zarr", scheduler="synchronous", roi_source="table").load()


@pytest.mark.parametrize(("damage", "scheduler"), [(flip_byte, "synchronous"), (flip_byte, "threads"),
                                                   (truncate, "synchronous")])
def test_run_over_a_damaged_shard_fails_only_its_images(tmp_path, phantom, clean_results, damage, scheduler):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    bad = damage(path, 9)
    bad = [bad] if isinstance(bad, int) else bad
    ds = gpucnr.run(path, tmp_path / "r.zarr", scheduler=scheduler, workers=2, roi_source="table").load()
    failed = gpucnr.STATUS["failed"]
    status = ds["status"].to_numpy()
    assert sorted(np.flatnonzero((status == failed).any(axis=1)).tolist()) == bad
    assert (status[bad] == failed).all()
    assert np.isnan(ds["cnr"].to_numpy()[bad]).all() and np.isnan(ds["cnr_median"].to_numpy()[bad]).all()
    assert (ds["n_valid"].to_numpy()[bad] == 0).all()
    # Every other image: its normal results, bit for bit.
    good = np.setdiff1d(np.arange(N), bad)
    for name in ("n_roi", "mean_roi", "var_roi", "n_bg", "mean_bg", "var_bg", "cnr", "status", "cnr_median",
                 "n_valid", "n_excluded"):
        np.testing.assert_array_equal(ds[name].to_numpy()[good], clean_results[name].to_numpy()[good], err_msg=name)
    assert (status[good] != failed).all() and ds["committed"].to_numpy().all()
    failures = ds.attrs["failures"]
    assert sorted(int(f["image"]) for f in failures) == bad
    for f in failures:
        assert f["code"] == "corrupt-chunk" and IMAGES in f["reason"], f
    assert ds.attrs["stack_fingerprint"] == clean_results.attrs["stack_fingerprint"]


# --- schema ---------------------------------------------------------------------------------------------------


def test_wrong_dtype_is_a_schema_error(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    edit_json(path / IMAGES / "zarr.json", lambda m: m.update(data_type="int16"))
    err = expect_error("stack-schema", lambda: gpucnr.open_stack(path), IMAGES)
    assert "int16" in str(err) and "uint16" in str(err)
    expect_error("stack-schema", lambda: gpucnr.run(path, tmp_path / "r.zarr"), IMAGES)


@pytest.mark.parametrize("change", ["shape", "dtype", "missing"])
def test_labels_that_do_not_match_the_images(tmp_path, phantom, change):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    if change == "shape":
        edit_json(path / LABELS / "zarr.json", lambda m: m.update(shape=[N, 128, 64]))
    elif change == "dtype":
        edit_json(path / LABELS / "zarr.json", lambda m: m.update(data_type="float32", fill_value=0.0))
    else:
        shutil.rmtree(path / LABELS)
    expect_error("stack-schema", lambda: gpucnr.open_stack(path), LABELS)


def test_labels_array_of_another_image_count(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    shutil.rmtree(path / LABELS)
    group = zarr.open_group(str(path), mode="r+")
    group.create_array(LABELS, shape=(N - 1, 128, 128), dtype="int32", chunks=(1, 128, 128),
                       shards=(SHARD, 128, 128), fill_value=0, config={"write_empty_chunks": True})
    group[LABELS][:] = 0
    err = expect_error("stack-schema", lambda: gpucnr.open_stack(path), LABELS)
    assert str(N - 1) in str(err)


def test_manifest_not_written_is_incomplete(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    set_entries(path, WRITTEN, 21, 0)
    err = expect_error("stack-incomplete", lambda: gpucnr.open_stack(path), f"buckets/{BUCKET}", "21")
    assert WRITTEN in str(err), str(err)  # names the manifest array
    expect_error("stack-incomplete", lambda: gpucnr.run(path, tmp_path / "r.zarr"))
    assert not (tmp_path / "r.zarr").exists()


def test_missing_manifest_chunk_is_incomplete(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    (path / WRITTEN / "c" / "2").unlink()  # zarr reads it as fill_value 0: never written
    expect_error("stack-incomplete", lambda: gpucnr.open_stack(path), f"buckets/{BUCKET}", str(2 * SHARD))


def test_manifest_read_from_its_files_equals_zarr(tmp_path, phantom):
    """The manifest is read from its chunk files (not through zarr, issue 17): the same values, entries unwritten
    in any chunk included, and a missing chunk reads as 0 as zarr reads it."""
    from gpucnr.store import _read_manifest

    path = tmp_path / "s.zarr"
    write(path, phantom)
    set_entries(path, WRITTEN, [1, SHARD + 3, N - 1], 0)
    (path / WRITTEN / "c" / "2").unlink()
    arr = zarr.open_array(str(path / WRITTEN), mode="r")
    got = _read_manifest(path, WRITTEN, arr)
    np.testing.assert_array_equal(got, np.asarray(arr[:]))
    expected = np.ones(N, np.uint8)
    expected[[1, SHARD + 3, N - 1]] = 0
    expected[2 * arr.chunks[0] : 3 * arr.chunks[0]] = 0
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other size"])
def test_damaged_manifest_chunk_is_a_coded_error(tmp_path, phantom, damage):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    chunk = path / WRITTEN / "c" / "1"
    if damage == "garbage":
        chunk.write_bytes(b"not zstd at all")
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-3])
    else:
        import numcodecs

        chunk.write_bytes(numcodecs.Zstd(level=0).encode(np.ones(SHARD + 1, np.uint8).tobytes()))
    expect_error("corrupt-chunk", lambda: gpucnr.open_stack(path), WRITTEN, "c/1")


def test_manifest_of_another_length(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    edit_json(path / WRITTEN / "zarr.json", lambda m: m.update(shape=[N - 1]))
    expect_error("stack-schema", lambda: gpucnr.open_stack(path), WRITTEN)


def test_not_a_stack(tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("x", shape=(4,), dtype="uint8")
    expect_error("stack-schema", lambda: gpucnr.open_stack(plain), str(plain))
    expect_error("stack-schema", lambda: gpucnr.open_stack(tmp_path / "nowhere.zarr"), "nowhere.zarr")
    (tmp_path / "file.zarr").write_text("not zarr")
    expect_error("stack-schema", lambda: gpucnr.open_stack(tmp_path / "file.zarr"))


def test_missing_table_column_or_array(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    shutil.rmtree(path / "tables/images/valid_h")
    expect_error("stack-schema", lambda: gpucnr.open_stack(path), "tables/images")
    path2 = tmp_path / "t.zarr"
    write(path2, phantom)
    shutil.rmtree(path2 / IMAGES)
    expect_error("stack-schema", lambda: gpucnr.open_stack(path2), IMAGES)


# --- the stack's tables are checked like its pixels (review finding: they were read unchecked) ------------
def test_missing_table_chunk_is_an_error_not_zeros(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    (path / "tables/images/valid_h/c/0").unlink()
    expect_error("missing-chunk", lambda: gpucnr.open_stack(path), "tables/images/valid_h")


def test_flipped_byte_in_a_table_is_a_corrupt_chunk(tmp_path, phantom):
    path = tmp_path / "s.zarr"
    write(path, phantom)
    f = path / "tables/rois/cx/c/0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    expect_error("corrupt-chunk", lambda: gpucnr.open_stack(path), "tables/rois/cx")


def test_labels_beyond_int32_are_refused(tmp_path):
    images = np.zeros((1, 8, 8), np.uint16)
    labels = np.zeros((1, 8, 8), np.uint32)
    labels[0, 2, 2] = 2**31 + 5
    with pytest.raises(gpucnr.InputError, match="int32"):
        gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_shards_written_as_files_read_back_through_zarr(tmp_path, compressor, monkeypatch):
    """The stack writer writes whole shards as files itself (zarr's write path was the bottleneck): zarr must read
    them back exactly, for every dtype width, a partial last shard, labels, and a shard continued after an early
    flush (the pending-bytes limit, lowered here, that keeps very large images from filling memory)."""
    import zarr

    import gpucnr.store as store

    monkeypatch.setattr(store, "_PENDING_BYTES", 3 * 70 * 70 * 8)  # NB: float64 70x70 images flush every 3
    rng = np.random.default_rng(3)
    images = ([rng.integers(0, 256, (40, 50)).astype(np.uint8) for _ in range(11)]
              + [rng.integers(-3000, 3000, (64, 64)).astype(np.int16) for _ in range(5)]
              + [rng.normal(0, 1, (70, 70)) for _ in range(10)])
    labels = [(im > np.median(im)).astype(np.int32) * (k % 3) for k, im in enumerate(images)]
    st = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels, shard=4, compressor=compressor)
    for b in st.buckets:
        members = st.images[st.images["bucket"] == b.name].sort_values("position")["source_index"].to_numpy()
        for kind, planes in (("images", images), ("labels", labels)):
            got = zarr.open_array(str(st.path / f"buckets/{b.name}/{kind}"), mode="r")[:]
            assert got.shape[0] == len(members)
            for pos, i in enumerate(members):
                h, w = planes[i].shape
                np.testing.assert_array_equal(got[pos, :h, :w], planes[i], err_msg=f"{b.name} {kind} {pos}")
                assert not got[pos, h:, :].any() and not got[pos, :, w:].any()


# --------------------------------------------------------------------------------------------------------------
# Streaming write_stack (issue 17)
# --------------------------------------------------------------------------------------------------------------


def _streaming_case(n=40):
    from gpucnr.phantom import make_phantom

    ph = make_phantom(n, (48, 48), lesions=2, radius=5, margin=8, seed=3)
    odd = [np.asarray(ph.images[k, : 40 + k % 3, : 30 + k % 5]) for k in range(n)]  # several shapes, two buckets
    lab = [np.asarray(ph.labels[k, : 40 + k % 3, : 30 + k % 5]) for k in range(n)]
    meta = pd.DataFrame({"site": [f"s{k % 3}" for k in range(n)], "slope": np.linspace(1, 2, n)})
    rois = ph.rois[ph.rois.roi == 1].assign(kind="square", r=2, cx=10, cy=10)
    return odd, lab, meta, rois


def test_streaming_write_stack_equals_the_in_memory_one(tmp_path):
    """A generator of images (and one of batches) gives the stack the in-memory call gives: same fingerprint
    (tables, manifests, every chunk's checksum), same arrays, and the generator is read exactly once."""
    odd, lab, meta, rois = _streaming_case()
    ref = gpucnr.write_stack(tmp_path / "ref.zarr", odd, labels=lab, rois=rois, meta=meta, shard=8)
    seen = []

    def images():
        for k, image in enumerate(odd):
            seen.append(k)
            yield image

    got = gpucnr.write_stack(tmp_path / "gen.zarr", images(), labels=iter(lab), rois=rois, meta=meta, shard=8)
    assert seen == list(range(len(odd)))
    assert got.fingerprint() == ref.fingerprint()
    pd.testing.assert_frame_equal(got.images, ref.images)
    for a, b in zip(got.buckets, ref.buckets, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(got.read(a, 0, a.size)[0], ref.read(b, 0, b.size)[0])
        np.testing.assert_array_equal(got.read(a, 0, a.size)[1], ref.read(b, 0, b.size)[1])
    # batches (k, H, W) of one shape at a time stream alike
    square = np.stack([np.pad(im, ((0, 48 - im.shape[0]), (0, 48 - im.shape[1]))) for im in odd])
    flat = gpucnr.write_stack(tmp_path / "flat.zarr", square, rois=rois)
    batched = gpucnr.write_stack(tmp_path / "batched.zarr", (square[k : k + 7] for k in range(0, len(odd), 7)),
                                 rois=rois)
    assert batched.fingerprint() == flat.fingerprint()


def test_streaming_write_stack_never_holds_the_whole_input(tmp_path):
    """Images of 64x64 uint16 streamed one at a time, shards of 32 images: the writer holds about one shard, so the
    peak of traced allocations does not grow with the input (1024 images, 8 MiB, against 256)."""
    import tracemalloc

    def peak(n):
        def images():
            rng = np.random.default_rng(0)
            for _ in range(n):
                yield rng.integers(0, 4096, (64, 64), dtype=np.uint16)

        gpucnr.write_stack(tmp_path / f"warm{n}.zarr", images(), shard=32)  # NB: imports and caches first
        tracemalloc.start()
        try:
            gpucnr.write_stack(tmp_path / f"s{n}.zarr", images(), shard=32)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(256), peak(1024)
    assert large - small < 1024 * 64 * 64 * 2 / 8, (small, large)  # NB: holding the input would add 6 MiB
    stack = gpucnr.open_stack(tmp_path / "s1024.zarr")
    assert stack.n_images == 1024 and stack.buckets[0].shard == 32


def test_a_failing_stream_leaves_no_stack(tmp_path):
    def images():
        yield np.zeros((8, 8), np.uint16)
        yield np.zeros((2, 8, 8, 3), np.uint16)  # not an image nor a batch

    with pytest.raises(InputError, match="item 1"):
        gpucnr.write_stack(tmp_path / "s.zarr", images())
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(InputError, match="labels ended"):
        gpucnr.write_stack(tmp_path / "t.zarr", iter([np.zeros((8, 8), np.uint16)] * 2),
                           labels=iter([np.zeros((8, 8), np.int32)]))
    assert not (tmp_path / "t.zarr").exists()


def test_shards_sized_by_pixels_per_bucket(tmp_path):
    """The default shard holds about 2^22 px of each bucket's canvas; a size in images is the same for all."""
    images = [np.zeros((64, 64), np.uint16)] * 3 + [np.zeros((1000, 1000), np.uint8)] * 2
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images)
    assert {b.name: b.shard for b in stack.buckets} == {"64x64-uint16": 1024, "1024x1024-uint8": 4}
    assert stack.group.attrs["shard_size"] == "4M"
    small = gpucnr.write_stack(tmp_path / "t.zarr", images, shard="16K")
    assert {b.name: b.shard for b in small.buckets} == {"64x64-uint16": 4, "1024x1024-uint8": 1}
    same = gpucnr.write_stack(tmp_path / "u.zarr", images, shard="2i")
    assert {b.shard for b in same.buckets} == {2} and same.shard == 2


def test_manifest_and_checksum_chunks_are_zarrs_bytes(tmp_path):
    """`StackWriter` writes the written manifest and the chunk checksums as chunk files itself (issue 18: through
    zarr each shard cost a read-modify-write of a 512 KiB checksum chunk): every file is the one zarr writes for
    the same values, and reads back through zarr as what was recorded."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 999, (70, 90)).astype(np.uint16) for _ in range(50)]
    images += [rng.integers(0, 999, (30, 30)).astype(np.uint16) for _ in range(7)]
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, shard=8)
    for b in stack.buckets:
        for name in ("written", "checksums"):
            ours = zarr.open_array(str(tmp_path / f"s.zarr/buckets/{b.name}/{name}"), mode="r")
            again = zarr.open_group(str(tmp_path / "z.zarr"), mode="a").create_array(
                f"{b.name}-{name}", shape=ours.shape, dtype=ours.dtype, chunks=ours.chunks,
                compressors=ours.compressors, fill_value=ours.fill_value, config={"write_empty_chunks": True})
            again[:] = ours[:]
            files = sorted(f.relative_to(tmp_path / f"s.zarr/buckets/{b.name}/{name}")
                           for f in (tmp_path / f"s.zarr/buckets/{b.name}/{name}/c").rglob("*") if f.is_file())
            assert len(files) == -(-b.size // ours.chunks[0])
            for rel in files:
                assert (tmp_path / f"s.zarr/buckets/{b.name}/{name}" / rel).read_bytes() == \
                    (tmp_path / f"z.zarr/{b.name}-{name}" / rel).read_bytes(), (b.name, name, rel)
        assert np.asarray(stack.written(b)).all()
        crcs = stack.checksums(b)
        np.testing.assert_array_equal(crcs[:, 0], chunk_checksums(tmp_path / f"s.zarr/buckets/{b.name}/images",
                                                                  b.images, 0, b.size))
