"""The image stack on Zarr v3: layout, writing, schema and integrity checks (DESIGN §5)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from gpucnr._version import __version__
from gpucnr.backend import to_host
from gpucnr.errors import GpucnrError, InputError, ShapeMismatchError
from gpucnr.roitable import normalize_table

__all__ = ["COMPRESSORS", "RESULT_COLUMNS", "Bucket", "Stack", "StackError", "StackWriter", "check_labels",
           "open_stack", "write_stack"]

STACK_FORMAT = 1
#: Compressors a stack may use (docs/performance.md has the measurement behind the default).
COMPRESSORS = ("blosc-zstd", "zstd")
_CANVAS = 64
_PENDING_BYTES = 256 * 2**20
_WRITE = {"write_empty_chunks": True}  # NB: a runtime setting in zarr 3, not stored: every writer sets it
#: Per-image columns that results carry as coordinates: structure, acquisition and pseudonymous ids only —
#: never a free-form `meta` column, which may hold a name or a record number.
RESULT_COLUMNS = ("index", "bucket", "position", "valid_h", "valid_w", "photometric", "source_index", "frame",
                  "modality", "manufacturer", "model", "pixel_spacing", "site", "split", "patient_id", "study_id",
                  "series_id", "instance_id")
_IMAGE_COLUMNS = ("index", "bucket", "position", "valid_h", "valid_w", "slope", "intercept", "padding",
                  "photometric", "source_index")


class StackError(GpucnrError):
    """A stack that cannot be read as data: missing, corrupt or inconsistent. The message names the array
    and the chunk."""

    code = "stack"

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class Bucket:
    """Images of one (canvas, dtype): ``images`` (n, H, W), optional ``labels`` of the same shape."""

    name: str
    offset: int
    images: Any
    labels: Any

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Stack:
    """An opened stack (see `open_stack`)."""

    path: Path
    group: Any
    buckets: list[Bucket]
    images: pd.DataFrame
    rois: pd.DataFrame | None
    roi_ids: np.ndarray
    shard: int
    compressor: str

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def has_labels(self) -> bool:
        return any(b.labels is not None for b in self.buckets)

    def fingerprint(self) -> str:
        """Hash of the stack's metadata, tables and manifest — never of its pixels (DESIGN §6)."""
        return fingerprint(self.path, tables={"images": self.images, "rois": self.rois})

    def read(self, bucket: Bucket, start: int, stop: int, *, labels: bool = True):
        """Images [start, stop) of `bucket` (and their labels), with coded errors for bad chunks."""
        images = self._read(bucket.images, start, stop, f"buckets/{bucket.name}/images")
        lab = None
        if labels and bucket.labels is not None:
            lab = self._read(bucket.labels, start, stop, f"buckets/{bucket.name}/labels")
        return images, lab

    def _read(self, array, start, stop, name):
        reader = _ShardReader.of(self.path, name, array)
        if reader is not None:
            return reader.read(start, stop)
        try:
            return np.asarray(array[start:stop])
        except Exception as e:  # noqa: BLE001 - zarr raises codec-specific errors for corrupt bytes
            raise StackError("corrupt-chunk", f"{name}: chunk(s) of images {start}..{stop - 1} cannot be decoded "
                             f"({type(e).__name__}); the stack is damaged there") from None


class _ShardReader:
    """Reads whole shards of a stack array from local files and decodes their image chunks directly.

    The layout is the one `write_stack` writes (sharding; inner chunk = one image; bytes little-endian, then
    blosc or zstd, then crc32c; index at the end with its own crc32c), read with numcodecs, whose decoders
    release the GIL. Measured against zarr's own reader on the same shards in scripts/bench.py: zarr's
    per-chunk async machinery cost more than the decoding itself. Arrays with any other layout, or not on
    a local disk, return None from `of` and are read through zarr.
    """

    def __init__(self, folder: Path, name: str, array, decoder):
        self.folder, self.name, self.array, self.decoder = folder, name, array, decoder
        self.per_shard = int(array.shards[0])
        self.plane = tuple(int(v) for v in array.shape[1:])
        self.dtype = np.dtype(array.dtype).newbyteorder("<")

    @classmethod
    def of(cls, root: Path, name: str, array):
        import numcodecs

        folder = Path(root, name)
        if sys.byteorder != "little":
            return None  # NB: decoding in place assumes the stored little-endian order is the native one
        try:
            (sharding,) = array.metadata.codecs
            inner = list(sharding.codecs)
            index = list(sharding.index_codecs)
        except (AttributeError, TypeError, ValueError):
            return None
        if not folder.is_dir() or len(inner) != 3 or sharding.index_location.value != "end":
            return None
        # NB: one-byte dtypes carry no endianness (None).
        if type(inner[0]).__name__ != "BytesCodec" or getattr(inner[0].endian, "value", None) not in (None, "little"):
            return None
        if type(inner[2]).__name__ != "Crc32cCodec" or [type(c).__name__ for c in index] != ["BytesCodec",
                                                                                             "Crc32cCodec"]:
            return None
        comp = inner[1]
        if type(comp).__name__ == "BloscCodec":
            decoder = numcodecs.Blosc()
        elif type(comp).__name__ == "ZstdCodec":
            decoder = numcodecs.Zstd()
        else:
            return None
        return cls(folder, name, array, decoder)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.plane), self.dtype.newbyteorder("="))
        for s in range(start // self.per_shard, (stop - 1) // self.per_shard + 1 if stop > start else 0):
            lo = max(start, s * self.per_shard)
            hi = min(stop, (s + 1) * self.per_shard)
            self._read_shard(s, lo, hi, out[lo - start : hi - start])
        return out

    def _read_shard(self, s: int, lo: int, hi: int, out: np.ndarray) -> None:
        import google_crc32c

        key = self.array.metadata.encode_chunk_key((s, 0, 0))
        where = f"{self.name}: chunk {key}"
        try:
            data = memoryview(Path(self.folder, key).read_bytes())
        except FileNotFoundError:
            raise StackError("missing-chunk", f"{where} (images {lo}..{hi - 1}) is missing") from None
        size = 16 * self.per_shard + 4
        if len(data) < size or not _crc_ok(google_crc32c, data[-size:]):
            raise StackError("corrupt-chunk", f"{where}: its index is damaged or truncated (images {lo}..{hi - 1})")
        index = np.frombuffer(data[-size:-4], "<u8").reshape(self.per_shard, 2)
        empty = np.iinfo(np.uint64).max
        for k in range(lo, hi):
            offset, nbytes = (int(v) for v in index[k - s * self.per_shard])
            if offset == empty:
                raise StackError("missing-chunk", f"{where} lacks image {k}; zarr would read it as zeros")
            chunk = data[offset : offset + nbytes]
            if len(chunk) != nbytes or nbytes < 4 or not _crc_ok(google_crc32c, chunk):
                raise StackError("corrupt-chunk", f"{where}: image {k} fails its crc32c check")
            target = out[k - lo].reshape(-1).view(np.uint8)
            try:
                self._decode(chunk[:-4], target)
            except Exception as e:  # noqa: BLE001 - codec libraries raise their own errors for bad streams
                raise StackError("corrupt-chunk", f"{where}: image {k} cannot be decoded "
                                 f"({type(e).__name__}: {e})") from None

    def _decode(self, payload, target: np.ndarray) -> None:
        """Decode one chunk into `target` (the image's bytes), refusing a stream of another size."""
        import numcodecs

        if isinstance(self.decoder, numcodecs.Blosc):
            # NB: a blosc header holds the uncompressed size in bytes 4..8 (little-endian uint32).
            nbytes = int.from_bytes(payload[4:8], "little") if len(payload) >= 16 else -1
            if nbytes != target.size:
                raise ValueError(f"the stream holds {nbytes} bytes, the image {target.size}")
            # NB: straight into the output plane (little-endian = native here): no extra copy.
            self.decoder.decode(payload, out=target)
            return
        raw = self.decoder.decode(payload)
        if len(raw) != target.size:
            raise ValueError(f"the stream holds {len(raw)} bytes, the image {target.size}")
        target[:] = np.frombuffer(raw, np.uint8)


class _ShardWriter:
    """Writes whole shards of a new stack array as files, in the layout zarr writes and `_ShardReader` reads
    (inner chunk = one image: bytes little-endian, then blosc or zstd, then a little-endian crc32c; then the index
    of (offset, nbytes) uint64 pairs, empty = 2**64 - 1, with its own crc32c). zarr's own write path spent ~1 ms
    per image in its per-chunk machinery, several times the compression itself (docs/performance.md); the tests
    read these shards back through zarr."""

    def __init__(self, folder: Path, array, compressor: str):
        import numcodecs

        self.folder, self.array = folder, array
        self.per_shard = int(array.shards[0])
        self.encoder = (numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
                        if compressor == "blosc-zstd" else numcodecs.Zstd(level=3))

    def write(self, s: int, block: np.ndarray) -> None:
        """Shard `s` from `block` (its first images; the rest of the shard is empty)."""
        import google_crc32c

        chunks, index, offset = [], np.full((self.per_shard, 2), np.iinfo(np.uint64).max, "<u8"), 0
        little = block.astype(block.dtype.newbyteorder("<"), copy=False)
        for k in range(len(little)):
            data = bytes(self.encoder.encode(np.ascontiguousarray(little[k])))
            data += int(google_crc32c.value(data)).to_bytes(4, "little")
            chunks.append(data)
            index[k] = (offset, len(data))
            offset += len(data)
        raw = index.tobytes()
        chunks.append(raw + int(google_crc32c.value(raw)).to_bytes(4, "little"))
        path = Path(self.folder, self.array.metadata.encode_chunk_key((s, 0, 0)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as fh:
            for c in chunks:
                fh.write(c)
        os.replace(tmp, path)  # NB: a reader never sees half a shard


def _crc_ok(crc, data) -> bool:
    """True if the last 4 bytes of `data` are the little-endian crc32c of the rest."""
    return int(crc.value(bytes(data[:-4]))) == int.from_bytes(bytes(data[-4:]), "little")


def _canvas(shape) -> tuple[int, int]:
    return tuple(int(math.ceil(s / _CANVAS) * _CANVAS) for s in shape)


def _compressors(name: str, itemsize: int):
    if name == "blosc-zstd":
        comp = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=itemsize)
    elif name == "zstd":
        comp = ZstdCodec(level=3)
    else:
        raise InputError(f"compressor must be one of {COMPRESSORS}, got {name!r}")
    # NB: crc32c after compression: a flipped byte anywhere in a chunk fails its check on read.
    return [comp, Crc32cCodec()]


def write_stack(path, images, *, labels=None, rois=None, meta=None, shard: int = 64,
                compressor: str = "blosc-zstd") -> Stack:
    """Write images (and labels, ROI table, per-image metadata) as a gpucnr stack.

    Parameters
    ----------
    path : str or Path
        Where the Zarr group is created (it must not exist).
    images : array (n, H, W) or sequence of 2-D arrays of any sizes and dtypes
        Stored in their native dtype, never resampled: each goes to the bucket of its canvas (shape rounded up
        to a multiple of 64) and dtype, with its valid height and width recorded.
    labels : array or sequence of 2-D integer arrays, optional
        One per image, of the image's shape (0 = none).
    rois : ROI table, optional
        Columns image (position in `images`), roi, kind, cx, cy, r [, name]; stored against the global index.
    meta : pandas.DataFrame, optional
        One row per input image: extra per-image columns (slope, intercept, padding, photometric override the
        defaults 1, 0, NaN, "MONOCHROME2").
    shard : int
        Images per shard = per batch of a run.
    compressor : {"blosc-zstd", "zstd"}

    Returns
    -------
    Stack
    """
    planes = _planes(images, "images")
    label_planes = None if labels is None else _planes(labels, "labels")
    if label_planes is not None and len(label_planes) != len(planes):
        raise InputError(f"{len(planes)} images but {len(label_planes)} label arrays")
    n = len(planes)
    meta = pd.DataFrame(index=range(n)) if meta is None else pd.DataFrame(meta).reset_index(drop=True)
    if len(meta) != n:
        raise InputError(f"meta has {len(meta)} rows for {n} images")
    rt = None if rois is None else normalize_table(rois, n)  # NB: validated before anything is written
    for i, p in enumerate(planes):
        check_labels(p, None if label_planes is None else label_planes[i], f"image {i}")
    rows = meta.to_dict("records")
    with StackWriter(path, labels=label_planes is not None, shard=shard, compressor=compressor) as writer:
        for i, p in enumerate(planes):
            writer.add(p, None if label_planes is None else label_planes[i], rows[i])
        return writer.close(rois=rt)


def check_labels(image: np.ndarray, labels: np.ndarray | None, what: str) -> None:
    """A coded error unless `labels` fits `image`: same shape, integer, within [0, 2**31 - 1] (stored int32)."""
    if labels is None:
        return
    if image.shape != labels.shape:
        raise ShapeMismatchError(f"{what} has shape {image.shape} but its labels have shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise InputError(f"labels of {what} must be integer, got {labels.dtype}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > np.iinfo(np.int32).max):
        raise InputError(f"labels of {what} must lie in [0, 2**31 - 1] (they are stored as int32)")


class StackWriter:
    """Writes a stack one image at a time, in bounded memory: one shard buffer per bucket.

    Images go to the bucket of their (canvas, native dtype) in the order they are added; a bucket's arrays grow
    by one shard at a time, and its written-manifest entries are set after the shard's pixels. `close` writes
    the per-image table (bucket-major global index, input order within a bucket) and the ROI table, whose
    ``image`` column holds the input position (the order of `add` calls); only then is the group marked a
    stack, so an interrupted writer leaves a group that `open_stack` refuses.

    Parameters
    ----------
    path : str or Path
        The Zarr group to create; it must not exist.
    labels : bool
        Whether every image has a label plane (images added without one get zeros).
    shard : int
        Images per shard (= per batch of a run).
    compressor : {"blosc-zstd", "zstd"}
    attrs : dict, optional
        Extra group attributes (e.g. the ingest's counts), written at `close`.
    """

    def __init__(self, path, *, labels: bool = False, shard: int = 64, compressor: str = "blosc-zstd",
                 attrs: dict | None = None):
        path = Path(path)
        if path.exists():
            raise InputError(f"{path} already exists; a stack is never overwritten")
        if shard < 1:
            raise InputError(f"shard must be >= 1, got {shard}")
        _compressors(compressor, 1)  # NB: validated before the group exists
        self.path, self.labels, self.shard, self.compressor = path, labels, shard, compressor
        self.attrs = dict(attrs or {})
        self.group = zarr.open_group(str(path), mode="w")
        # NB: shards are compressed and written by one background thread, in order, so the caller (ingest's
        # driver) keeps feeding its decoders meanwhile; a bucket has at most one shard in flight.
        self._io = ThreadPoolExecutor(1, thread_name_prefix="gpucnr-stack-writer")
        self._buckets: dict[tuple, dict] = {}
        self._rows: list[dict] = []
        self._label_ids: set[int] = set()
        #: called as ``on_written(bucket name, images of the bucket now on disk)`` after each shard's pixels and
        #: manifest are written (from the writer's thread): ingest journals it, to resume from there
        self.on_written = None

    @classmethod
    def resume(cls, path, *, rows: list[dict], label_ids, labels: bool = False, shard: int = 64,
               compressor: str = "blosc-zstd", attrs: dict | None = None) -> StackWriter:
        """Continue the stack an interrupted writer left at `path`, keeping the images `rows` describe (the
        per-image rows of the `add` calls to keep, in order; each bucket's positions 0..n-1) and dropping the
        rest: other buckets, shards past them, the tables of an interrupted `close`, half-written shard files.
        The last, partly filled shard of each bucket is read back and will be written again whole, so the result
        equals a writer that was never interrupted. `label_ids` are the labels of the kept images."""
        import shutil

        path = Path(path)
        self = cls.__new__(cls)
        self.path, self.labels, self.shard, self.compressor = path, labels, shard, compressor
        self.attrs = dict(attrs or {})
        self.group = zarr.open_group(str(path), mode="r+")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="gpucnr-stack-writer")
        self._buckets, self._rows, self._label_ids = {}, list(rows), set(label_ids)
        self.on_written = None
        counts: dict[str, int] = {}
        for row in self._rows:
            counts[row["bucket"]] = max(counts.get(row["bucket"], 0), int(row["position"]) + 1)
        shutil.rmtree(path / "tables", ignore_errors=True)
        for folder in sorted((path / "buckets").glob("*")) if (path / "buckets").is_dir() else ():
            if folder.is_dir() and folder.name not in counts:
                shutil.rmtree(folder)
        for leftover in path.rglob("*.partial"):
            leftover.unlink()  # NB: a shard file half written when the writer stopped
        for name, n in counts.items():
            images = self.group[f"buckets/{name}/images"]
            lab = self.group[f"buckets/{name}/labels"] if labels else None
            canvas, dtype = tuple(int(v) for v in images.shape[1:]), np.dtype(images.dtype).newbyteorder("=")
            first = n // shard * shard
            kept = [r for r in self._rows if r["bucket"] == name and int(r["position"]) >= first]
            kept.sort(key=lambda r: int(r["position"]))
            block = np.asarray(images[first:n]) if n > first else None
            lab_block = np.asarray(lab[first:n]) if lab is not None and n > first else None
            pending = []
            for k, r in enumerate(kept):
                h, w = int(r["valid_h"]), int(r["valid_w"])
                pending.append((block[k, :h, :w], None if lab_block is None else lab_block[k, :h, :w]))
            for arr in (images, lab):
                if arr is not None:
                    arr.resize((first, *canvas))  # NB: zarr deletes the shard files past it
            written = self.group[f"buckets/{name}/written"]
            written.resize((first,))
            # NB: per-image arrays beside the manifest (the chunk checksums of stack format 2) are cut alike
            extra = {key: self.group[f"buckets/{name}/{key}"] for key in ("checksums",)
                     if f"buckets/{name}/{key}" in self.group}
            for arr in extra.values():
                arr.resize((first, *arr.shape[1:]))
            self._buckets[(canvas, dtype.str)] = {
                "name": name, "canvas": canvas, "dtype": dtype, "images": images, "labels": lab, "written": written,
                **extra, "count": first, "pending": pending, "pending_bytes": sum(p[0].nbytes for p in pending),
                "inflight": None}
        return self

    def abandon(self) -> None:
        """Stop without closing (an interrupted ingest): the shard being written completes, nothing more is."""
        self._io.shutdown(wait=True)

    @property
    def rows(self) -> list[dict]:
        """The per-image rows of the images added so far (bucket, position, valid extent, source index, meta)."""
        return self._rows

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._io.shutdown(wait=True)
        return False

    def add(self, image: np.ndarray, labels: np.ndarray | None = None, meta: dict | None = None) -> int:
        """Add one 2-D image (stored as is, native byte order) with its labels and per-image columns;
        returns its input position."""
        if image.ndim != 2 or image.dtype.kind not in "biuf":
            raise InputError(f"image {len(self._rows)} must be a 2-D integer or float array, got shape "
                             f"{image.shape} and dtype {image.dtype}")
        if image.dtype == bool:
            image = image.astype(np.uint8)
        if labels is not None and not self.labels:
            raise InputError("this stack was opened without labels")
        check_labels(image, labels, f"image {len(self._rows)}")
        dtype = image.dtype.newbyteorder("=")
        key = (_canvas(image.shape), dtype.str)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = self._new_bucket(*key)
        h, w = image.shape
        if labels is not None:
            self._label_ids.update(int(v) for v in np.unique(labels) if v != 0)
        source = len(self._rows)
        self._rows.append({"bucket": b["name"], "position": b["count"] + len(b["pending"]), "valid_h": h,
                           "valid_w": w, "source_index": source, **(meta or {})})
        b["pending"].append((image, labels))
        b["pending_bytes"] += image.nbytes
        # NB: a shard is written when full, or earlier (zarr then rewrites it in place) once its pending images
        # pass _PENDING_BYTES: a bucket of very large images must not hold a whole shard of them in memory.
        if len(b["pending"]) == self.shard or b["pending_bytes"] >= _PENDING_BYTES:
            self._flush(b)
        return source

    @property
    def n_images(self) -> int:
        return len(self._rows)

    def _new_bucket(self, canvas, dtype_str) -> dict:
        dtype = np.dtype(dtype_str)
        name = f"{canvas[0]}x{canvas[1]}-{dtype.name}"
        images = self.group.create_array(f"buckets/{name}/images", shape=(0, *canvas), dtype=dtype,
                                         chunks=(1, *canvas), shards=(self.shard, *canvas),
                                         compressors=_compressors(self.compressor, dtype.itemsize), fill_value=0,
                                         config=_WRITE, dimension_names=["image", "y", "x"])
        labels = None
        if self.labels:
            labels = self.group.create_array(f"buckets/{name}/labels", shape=(0, *canvas), dtype="int32",
                                             chunks=(1, *canvas), shards=(self.shard, *canvas),
                                             compressors=_compressors(self.compressor, 4), fill_value=0,
                                             config=_WRITE, dimension_names=["image", "y", "x"])
        written = self.group.create_array(f"buckets/{name}/written", shape=(0,), dtype="uint8",
                                          chunks=(self.shard,), fill_value=0, config=_WRITE)
        return {"name": name, "canvas": canvas, "dtype": dtype, "images": images, "labels": labels,
                "written": written, "count": 0, "pending": [], "pending_bytes": 0, "inflight": None}

    def _flush(self, b: dict) -> None:
        m = len(b["pending"])
        if not m:
            return
        if b["inflight"] is not None:
            self._wait(b)  # NB: raises the previous shard's write error here, in the caller
        a, z = b["count"], b["count"] + m
        block = np.zeros((m, *b["canvas"]), b["dtype"])
        lab_block = np.zeros((m, *b["canvas"]), np.int32) if self.labels else None
        for k, (image, labels) in enumerate(b["pending"]):
            h, w = image.shape
            block[k, :h, :w] = image
            if labels is not None:
                lab_block[k, :h, :w] = labels
        b["inflight"] = self._io.submit(self._write, b, a, z, block, lab_block)
        b["count"] = z
        b["pending"], b["pending_bytes"] = [], 0

    def _wait(self, b: dict) -> None:
        try:
            b["inflight"].result()
        except OSError as e:
            why = e.strerror or type(e).__name__
            error = StackError("stack-write", f"{self.path}: writing bucket {b['name']} failed ({why}); the stack "
                               "is incomplete (an ingest continues with --resume once there is room)")
            error.exit_code = 4  # NB: the environment's failure, after partial work (DESIGN §10)
            raise error from None

    def _write(self, b: dict, a: int, z: int, block, lab_block) -> None:
        for kind, data in (("images", block), ("labels", lab_block)):
            if b[kind] is None:
                continue
            b[kind].resize((z, *b["canvas"]))
            if a % self.shard == 0:
                # NB: a shard written from its start is written whole, as a file; a shard continued after an early
                # flush (very large images) is merged by zarr.
                _ShardWriter(self.path / f"buckets/{b['name']}/{kind}", b[kind], self.compressor).write(
                    a // self.shard, data)
            else:
                b[kind][a:z] = data
        # NB: the manifest is written after the pixels: a crash in between leaves an incomplete stack.
        b["written"].resize((z,))
        b["written"][a:z] = 1
        if self.on_written is not None:
            self.on_written(b["name"], z)

    def close(self, rois=None) -> Stack:
        """Flush every bucket, write the tables and attributes; returns the opened stack.

        `rois` is an ROI table whose ``image`` column holds input positions (the order of `add` calls).
        """
        n = len(self._rows)
        rt = None if rois is None else normalize_table(rois, n)
        for b in self._buckets.values():
            self._flush(b)
        for b in self._buckets.values():
            if b["inflight"] is not None:
                self._wait(b)
        self._io.shutdown(wait=True)
        order = sorted(self._buckets, key=lambda k: (k[0], np.dtype(k[1]).name))
        offset, offsets, names = 0, {}, []
        for key in order:
            b = self._buckets[key]
            offsets[b["name"]] = offset
            names.append(b["name"])
            offset += b["count"]
        table = pd.DataFrame(self._rows) if n else pd.DataFrame(
            columns=["bucket", "position", "valid_h", "valid_w", "source_index"])
        table.insert(0, "index", [offsets[r["bucket"]] + r["position"] for r in self._rows])
        for col, default in (("slope", 1.0), ("intercept", 0.0), ("padding", np.nan),
                             ("photometric", "MONOCHROME2")):
            table[col] = table[col].fillna(default) if col in table else default
        table = table.sort_values("index").reset_index(drop=True)
        _write_table(self.group, "images", table)
        global_of = np.empty(n, np.int64)
        global_of[table["source_index"].to_numpy(np.int64)] = table["index"].to_numpy(np.int64)
        roi_ids = set()
        if self.labels:
            roi_ids.update(self._label_ids)
        if rt is not None:
            rt["image"] = global_of[rt["image"].to_numpy()]
            _write_table(self.group, "rois", rt[["image", "roi", "kind", "cx", "cy", "r", "name"]])
            roi_ids.update(int(v) for v in rt["roi"])
        self.group.attrs.update({**self.attrs, "gpucnr_stack": STACK_FORMAT, "gpucnr_version": __version__,
                                 "n_images": n, "buckets": names, "shard": self.shard,
                                 "compressor": self.compressor, "roi_ids": sorted(roi_ids),
                                 "has_labels": self.labels})
        return open_stack(self.path)


def _planes(images, what) -> list[np.ndarray]:
    if isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        planes = [to_host(p) for p in images]
    else:
        arr = to_host(images)
        planes = [arr] if arr.ndim == 2 else list(arr)
    for i, p in enumerate(planes):
        if p.ndim != 2:
            raise InputError(f"{what} {i} must be 2-D, got shape {p.shape}")
        if p.dtype.kind not in "biuf":
            raise InputError(f"{what} {i} has dtype {p.dtype}; integer or float expected")
    return [p.astype(np.uint8) if p.dtype == bool else p for p in planes]


def _write_table(group, name: str, table: pd.DataFrame) -> None:
    """One 1-D array per column, one chunk each, zstd then crc32c (a damaged table must not read as data)."""
    for col in table.columns:
        values = table[col].to_numpy()
        dtype = str if values.dtype.kind in "OUST" else values.dtype
        if dtype is str:
            values = values.astype(str)
        arr = group.create_array(f"tables/{name}/{col}", shape=values.shape, dtype=dtype,
                                 chunks=(max(len(values), 1),), compressors=[ZstdCodec(level=3), Crc32cCodec()],
                                 config=_WRITE)
        if len(values):
            arr[:] = values


def _read_table(group, name: str, root: Path | None = None) -> pd.DataFrame | None:
    """A table's columns; with `root`, a missing or damaged column chunk is a coded error, never zeros."""
    if f"tables/{name}" not in group:
        return None
    sub = group[f"tables/{name}"]
    columns = {}
    for key in sorted(sub.array_keys()):
        arr = sub[key]
        where = f"tables/{name}/{key}"
        if root is not None and arr.shape[0] and not Path(root, where, arr.metadata.encode_chunk_key((0,))).exists():
            raise StackError("missing-chunk", f"{where}: chunk {arr.metadata.encode_chunk_key((0,))} is missing; "
                             "zarr would read it as fill values")
        try:
            columns[key] = np.asarray(arr[:])
        except Exception as e:  # noqa: BLE001 - zarr raises codec-specific errors for corrupt bytes
            raise StackError("corrupt-chunk", f"{where}: its chunk cannot be decoded ({type(e).__name__})") from None
    return pd.DataFrame(columns)


def open_stack(path, *, check: bool = True) -> Stack:
    """Open a stack and validate its schema and completeness.

    Raises
    ------
    StackError
        ``stack-schema`` (not a stack, missing arrays or columns, wrong dtype, label shape mismatch),
        ``stack-incomplete`` (the manifest says images were never written), ``missing-chunk`` (a chunk the
        manifest says was written is absent: zarr would read it as zeros), ``corrupt-chunk`` (a shard index
        that cannot be read). Each names the array and the chunk.
    """
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - anything zarr raises here means not a readable stack
        raise StackError("stack-schema", f"{path} is not a readable Zarr group ({type(e).__name__})") from None
    attrs = dict(group.attrs)
    if attrs.get("gpucnr_stack") != STACK_FORMAT:
        unfinished = unfinished_stack(path)
        if unfinished:
            raise StackError("stack-incomplete", f"{path}: {unfinished}")
        raise StackError("stack-schema", f"{path} is not a gpucnr stack (format {attrs.get('gpucnr_stack')!r})")
    images = _read_table(group, "images", path)
    if images is None or any(c not in images.columns for c in _IMAGE_COLUMNS):
        raise StackError("stack-schema", f"{path}: tables/images lacks columns of {_IMAGE_COLUMNS}")
    buckets = []
    offset = 0
    for name in attrs["buckets"]:
        arr = _array(group, f"buckets/{name}/images")
        lab = _array(group, f"buckets/{name}/labels") if attrs.get("has_labels") else None
        expect_dtype = np.dtype(name.split("-", 1)[1])
        if arr.dtype != expect_dtype:
            raise StackError("stack-schema", f"buckets/{name}/images has dtype {arr.dtype}, its bucket says "
                             f"{expect_dtype}")
        if lab is not None and (lab.shape != arr.shape or np.dtype(lab.dtype).kind not in "iu"):
            raise StackError("stack-schema", f"buckets/{name}/labels has shape {lab.shape} and dtype {lab.dtype}; "
                             f"images have shape {arr.shape}")
        buckets.append(Bucket(name=name, offset=offset, images=arr, labels=lab))
        offset += int(arr.shape[0])
    if offset != len(images) or offset != attrs.get("n_images"):
        raise StackError("stack-schema", f"{path}: buckets hold {offset} images, tables/images {len(images)}")
    stack = Stack(path=path, group=group, buckets=buckets, images=images, rois=_read_table(group, "rois", path),
                  roi_ids=np.asarray(attrs.get("roi_ids", []), np.int64), shard=int(attrs["shard"]),
                  compressor=attrs.get("compressor", "blosc-zstd"))
    if check:
        _check_complete(group, stack)
    return stack


def journal_path(stack) -> Path:
    """The journal of an ingest in progress, beside its stack (it names source files: an operator's file)."""
    stack = Path(stack)
    return stack.with_name(f"{stack.name}.journal")


def unfinished_stack(path) -> str | None:
    """What a Zarr group that a writer left unfinished is, and what to do with it; None for anything else (a
    finished stack, results, a group that is not gpucnr's, no group at all)."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception:  # noqa: BLE001 - not a Zarr group
        return None
    if "gpucnr_stack" in attrs or "gpucnr_results" in attrs:
        return None
    journal = journal_path(path)
    if journal.is_file():
        try:
            with open(journal, encoding="utf-8") as fh:
                command = json.loads(fh.readline())["command"]
        except (OSError, ValueError, KeyError, TypeError):
            command = f"gpucnr ingest SRC_DIR {path} ... --resume (with the options it started with)"
        return (f"an interrupted ingest, not a stack yet: continue it with `{command}`, or delete {path.name} "
                f"and {journal.name}")
    if "buckets" in group or (not attrs and not list(group.keys())):
        return (f"an unfinished stack (an interrupted write, without a journal to continue from): delete "
                f"{path.name} and write it again")
    return None


def _array(group, name):
    try:
        return group[name]
    except KeyError:
        raise StackError("stack-schema", f"array {name} is missing") from None


def _check_complete(group, stack: Stack) -> None:
    """Every image the manifest says was written has its chunks, for images and labels alike."""
    for b in stack.buckets:
        written = np.asarray(_array(group, f"buckets/{b.name}/written")[:])
        if written.shape[0] != b.size:
            raise StackError("stack-schema", f"buckets/{b.name}/written has {written.shape[0]} entries for "
                             f"{b.size} images")
        if not written.all():
            first = int(np.flatnonzero(written == 0)[0])
            raise StackError("stack-incomplete", f"buckets/{b.name}: images from position {first} were never "
                             f"completely written (manifest buckets/{b.name}/written)")
        for kind, arr in (("images", b.images), ("labels", b.labels)):
            if arr is None:
                continue
            name = f"buckets/{b.name}/{kind}"
            shard = int(arr.shards[0]) if arr.shards else 1
            for s in range(math.ceil(b.size / shard)):
                key = arr.metadata.encode_chunk_key((s, 0, 0))
                file = Path(stack.path, name, key)
                first, last = s * shard, min((s + 1) * shard, b.size) - 1
                if not file.exists():
                    raise StackError("missing-chunk", f"{name}: chunk {key} (images {first}..{last}) is missing; "
                                     "zarr would read it as zeros")
                absent = _absent_inner_chunks(file, shard, last - first + 1)
                if absent is None:
                    raise StackError("corrupt-chunk", f"{name}: chunk {key} (images {first}..{last}) is too short "
                                     "to hold its index: truncated")
                if absent:
                    raise StackError("missing-chunk", f"{name}: chunk {key} lacks the image(s) at "
                                     f"{[first + k for k in absent]}; zarr would read them as zeros")


def _absent_inner_chunks(file: Path, per_shard: int, used: int) -> list[int] | None:
    """Positions (within the shard) of inner chunks its index marks absent, among the first `used`; None
    if the file cannot even hold its index. The index sits at the end: (offset, nbytes) uint64 pairs, then a
    crc32c (which zarr verifies when it reads the shard)."""
    size = 16 * per_shard + 4
    with open(file, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < size:
            return None
        fh.seek(-size, os.SEEK_END)
        index = np.frombuffer(fh.read(16 * per_shard), "<u8").reshape(per_shard, 2)
    empty = np.iinfo(np.uint64).max
    return [int(k) for k in np.flatnonzero((index[:used, 0] == empty) & (index[:used, 1] == empty))]


def fingerprint(path, *, tables: dict | None = None) -> str:
    """SHA-256 of a stack's metadata (every zarr.json), its tables and its manifests; never its pixels.

    `tables` may pass the tables already read (as `Stack` does), to save reading them again.
    """
    path = Path(path)
    h = hashlib.sha256()
    for meta in sorted(path.rglob("zarr.json")):
        rel = meta.relative_to(path).as_posix()
        h.update(rel.encode())
        h.update(json.dumps(json.loads(meta.read_bytes()), sort_keys=True).encode())
    group = zarr.open_group(str(path), mode="r")
    for name in ("images", "rois"):
        table = tables[name] if tables is not None else _read_table(group, name)
        if table is not None:
            h.update(pd.util.hash_pandas_object(table, index=True).to_numpy().tobytes())
    for b in group.attrs.get("buckets", []):
        h.update(np.asarray(group[f"buckets/{b}/written"][:]).tobytes())
    return h.hexdigest()
