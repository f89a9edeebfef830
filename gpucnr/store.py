"""The image stack on Zarr v3: layout, writing, schema and integrity checks (DESIGN §5)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from gpucnr import chunks, shardfiles
from gpucnr._version import __version__
from gpucnr.backend import to_host
from gpucnr.errors import GpucnrError, InputError, OptionError, ShapeMismatchError, raise_if_exhausted
from gpucnr.roitable import normalize_table
from gpucnr.stackcheck import check_attrs, check_tables, table_frame

__all__ = ["COMPRESSORS", "RESULT_COLUMNS", "Bucket", "Stack", "StackError", "StackWriter", "check_labels",
           "open_stack", "write_stack"]

STACK_FORMAT = 2
#: Formats `open_stack` reads. Format 1 (before December 2026) records no per-chunk checksums: its fingerprint
#: reads them from the shard files, and its readers cannot tell a moved chunk from the recorded one.
READABLE_STACK_FORMATS = (1, 2)
#: Version of `Stack.fingerprint` (DESIGN §10): 2 hashes the pixels and labels through their chunk checksums.
FINGERPRINT_VERSION = 2
#: Compressors a stack may use; each name keeps its exact codec and level for good (a stack records its name, and
#: resuming or fingerprinting an old stack depends on it). docs/performance.md has the measurements.
COMPRESSORS = ("blosc-lz4", "blosc-zstd", "zstd")
#: The compressor of new stacks (issue 18): blosc-lz4 with bit-shuffle encodes ~4x faster than blosc-zstd level 3
#: and decodes ~2x faster, for stacks ~15-20 % larger. Stacks written before it (blosc-zstd, the default until
#: December 2026) keep their own compressor.
DEFAULT_COMPRESSOR = "blosc-lz4"
#: A shard's default size: about 2^22 pixels of its bucket's canvas (DESIGN §10): 1024 images of 64x64, 16 of
#: 512x512, one image of 2048x2048 and beyond. Runs batch whole shards up to ~2^24 pixels.
SHARD_PIXELS = 2**22
#: Binary multiples of pixels in sizes such as ``16M`` (= 2^24 pixels).
_PIXEL_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}
_CRC_ROWS = 2**16
_PENDING_BYTES = 256 * 2**20
_WRITE = {"write_empty_chunks": True}  # NB: a runtime setting in zarr 3, not stored: every writer sets it
#: Per-image columns that results carry as coordinates (DESIGN §10's allow-list): structure, acquisition and
#: pseudonymous ids only — never a free-form `meta` column, which may hold a name or a record number, unless the
#: run names it as a grouping column (`gpucnr.run(group_columns=...)`, screened by `gpucnr.identifiers`).
RESULT_COLUMNS = ("index", "bucket", "position", "valid_h", "valid_w", "slope", "intercept", "padding", "photometric",
                  "source_index", "frame", "modality", "manufacturer", "model", "pixel_spacing", "spacing_y",
                  "spacing_x", "spacing_z", "orientation", "case", "channel", "patient_id", "study_id", "series_id",
                  "instance_id")
_IMAGE_COLUMNS = ("index", "bucket", "position", "valid_h", "valid_w", "slope", "intercept", "padding",
                  "photometric", "source_index")


class SizeError(OptionError):
    """A batch or shard size that is neither a number of images nor of pixels."""

    code = "bad-size"


def parse_size(value, *, what: str = "--batch") -> tuple[str, int]:
    """A batch or shard size as ``("images", n)`` or ``("pixels", n)``.

    Parameters
    ----------
    value : int or str
        An int or a bare number (``"64"``): images, as before December 2026; ``"64i"``: images; ``"16M"``,
        ``"4096K"``, ``"1G"``: pixels in binary multiples (M = 2^20), ``"16777216px"``: pixels.
    what : str
        The option's name, for the message.

    Raises
    ------
    SizeError
        ``bad-size`` for anything else (a fraction, a sign, zero, an unknown suffix).
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer | str):
        raise SizeError(f"{what} takes images (64 or 64i) or pixels (16M = 2^24 px, 16777216px), got {value!r}")
    if not isinstance(value, str):
        kind, n = "images", int(value)
    else:
        text = value.strip()
        number, suffix = text, ""
        for tail in ("px", "i", *_PIXEL_SUFFIXES):
            if text.endswith(tail) and text[: -len(tail)].isdigit():
                number, suffix = text[: -len(tail)], tail
                break
        if not number.isdigit() or not number.isascii():
            raise SizeError(f"{what} takes images (64 or 64i) or pixels (16M = 2^24 px, 16777216px), got {value!r}")
        n = int(number) * _PIXEL_SUFFIXES.get(suffix, 1)
        kind = "images" if suffix in ("", "i") else "pixels"
    if n < 1:
        raise SizeError(f"{what} must be at least one image or one pixel, got {value!r}")
    return kind, n


def format_size(kind: str, n: int) -> str:
    """The canonical spelling of a size `parse_size` reads back: ``64i``, ``16M``, ``12345px``."""
    if kind == "images":
        return f"{n}i"
    for suffix, unit in sorted(_PIXEL_SUFFIXES.items(), key=lambda kv: -kv[1]):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}px"


def shard_images(size: tuple[str, int], canvas) -> int:
    """Images per shard of a bucket of `canvas` (H, W) for a size of `parse_size`: the images given, or as many
    whole images as the pixels hold (at least one)."""
    kind, n = size
    return n if kind == "images" else max(1, n // (int(canvas[0]) * int(canvas[1])))


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

    @property
    def shard(self) -> int:
        """Images per shard of this bucket (its array's own layout; stacks sized by pixels differ per bucket)."""
        shards = getattr(self.images, "shards", None)
        return int(shards[0] if shards else self.images.chunks[0])


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
        """Fingerprint version 2 (DESIGN §10): a hash of the stack's metadata, tables, manifests and, per bucket,
        the crc32c of every image and label chunk — other pixels give another fingerprint, without re-reading
        them."""
        return self._fingerprints()[0]

    def bucket_digests(self) -> dict[str, str]:
        """One digest per bucket (its arrays' layout, manifest and chunk checksums), so that a resume can name
        the bucket that differs."""
        return dict(self._fingerprints()[1])

    def _fingerprints(self):
        if getattr(self, "_fp", None) is None:
            self._fp = fingerprint_v2(self)
        return self._fp

    def normalized_rois(self) -> pd.DataFrame | None:
        """The ROI table as `gpucnr.roitable.normalize_table` returns it (checked when the stack was opened);
        None when the stack has none. Callers must not modify it."""
        if self.rois is None:
            return None
        if self.__dict__.get("_rois_normalized") is None:
            self.__dict__["_rois_normalized"] = normalize_table(self.rois, self.n_images)
        return self.__dict__["_rois_normalized"]

    def checksums(self, bucket: Bucket) -> np.ndarray | None:
        """The crc32c recorded for each (position, images | labels) chunk of `bucket` when it was written, shape
        (n, 2) uint32; None for a format-1 stack, which recorded none."""
        cache = self.__dict__.setdefault("_crcs", {})
        if bucket.name not in cache:
            name = f"buckets/{bucket.name}/checksums"
            if name not in self.group:
                cache[bucket.name] = None
            else:
                arr = self.group[name]
                for c in range(math.ceil(arr.shape[0] / arr.chunks[0]) if arr.shape[0] else 0):
                    key = arr.metadata.encode_chunk_key((c, 0))
                    if not Path(self.path, name, key).exists():
                        raise StackError("missing-chunk", f"{name}: chunk {key} is missing; zarr would read it as "
                                         "zeros")
                try:
                    values = np.asarray(arr[:], np.uint32)
                except Exception as e:  # noqa: BLE001 - zarr raises codec-specific errors for corrupt bytes
                    raise StackError("corrupt-chunk", f"{name} cannot be decoded ({type(e).__name__})") from None
                if values.shape != (bucket.size, 2):
                    raise StackError("stack-schema", f"{name} has shape {values.shape} for {bucket.size} images")
                cache[bucket.name] = values
        return cache[bucket.name]

    def written(self, bucket: Bucket) -> np.ndarray:
        """The written manifest of `bucket`: uint8 per position, 1 once every chunk of that image is on disk. Read
        once per opened stack (the completeness check and the fingerprint both need it)."""
        cache = self.__dict__.setdefault("_written", {})
        if bucket.name not in cache:
            name = f"buckets/{bucket.name}/written"
            cache[bucket.name] = _read_manifest(self.path, name, _array(self.group, name))
        return cache[bucket.name]

    def to_xarray(self, *, labels: bool = False) -> dict[str, Any]:
        """Every bucket as a lazy xarray.DataArray of dims (image, y, x), chunked by whole shards.

        Each chunk is read when computed, through the same checked reader as `run` (`Stack.read`: every chunk's
        crc32c, and the one recorded for its position; a missing chunk is an error, never zeros), by
        `dask.array.map_blocks`; nothing is read here. Coordinates: ``image`` (the global image index), ``y``,
        ``x`` and the per-image table's columns of `RESULT_COLUMNS` along ``image`` (``valid_h``, ``valid_w``,
        ``slope``, ``intercept``, ``padding``, pseudonymous ids, …; no free-form column).

        Parameters
        ----------
        labels : bool
            The label arrays instead of the images (a stack without labels raises ``InputError``).

        Returns
        -------
        dict of str to xarray.DataArray
            Keyed by bucket name (``<H>x<W>-<dtype>``), in the stack's bucket order.

        Examples
        --------
        >>> arrays = open_stack("stack.zarr").to_xarray()           # doctest: +SKIP
        >>> gpucnr.measure(arrays["64x64-uint16"], rois=...)      # doctest: +SKIP
        """
        import dask.array as da
        import xarray as xr

        if labels and not self.has_labels:
            raise InputError(f"{self.path} holds no label arrays")
        out = {}
        table = self.images.set_index("index", drop=False)
        for b in self.buckets:
            arr = b.labels if labels else b.images
            per = int((getattr(arr, "shards", None) or arr.chunks)[0])
            n, height, width = (int(v) for v in arr.shape)
            sizes = tuple(min(per, n - a) for a in range(0, n, per)) or (0,)
            reader = _BlockReader(self, b.name, labels)
            dtype = np.dtype(arr.dtype).newbyteorder("=")
            # NB: map_blocks with chunks given builds one task per shard from block_info alone: no array is
            # embedded in the graph, and a task reads only its own shard.
            kind = "labels" if labels else "images"
            data = da.map_blocks(reader, chunks=(sizes, (height,), (width,)), dtype=dtype,
                                 meta=np.empty((0, 0, 0), dtype), name=f"gpucnr-{kind}-{b.name}-{self.fingerprint()}")
            rows = table.loc[b.offset : b.offset + n - 1]
            coords = {"image": np.arange(b.offset, b.offset + n, dtype=np.int64),
                      "y": np.arange(height, dtype=np.int64), "x": np.arange(width, dtype=np.int64)}
            for col in RESULT_COLUMNS:
                if col in rows.columns and col != "index":
                    coords[col] = ("image", rows[col].to_numpy())
            out[b.name] = xr.DataArray(data, dims=("image", "y", "x"), coords=coords, name=kind,
                                       attrs={"bucket": b.name, "stack": str(self.path)})
        return out

    def read(self, bucket: Bucket, start: int, stop: int, *, labels: bool = True, reuse: bool = False):
        """Images [start, stop) of `bucket` (and their labels), with coded errors for bad chunks: a chunk whose
        checksum is not the one recorded for its position (moved, swapped) is ``stack-damaged``.

        With `reuse`, the arrays are decoded into this thread's scratch buffers, overwritten by its next read
        with `reuse`: for a loop that is done with one batch before it reads the next (`gpucnr.run`'s workers).
        """
        crcs = self.checksums(bucket)
        images = self._read(bucket.images, start, stop, f"buckets/{bucket.name}/images",
                            None if crcs is None else crcs[:, 0], scratch="images" if reuse else None)
        lab = None
        if labels and bucket.labels is not None:
            lab = self._read(bucket.labels, start, stop, f"buckets/{bucket.name}/labels",
                             None if crcs is None else crcs[:, 1], scratch="labels" if reuse else None)
        return images, lab

    def _read(self, array, start, stop, name, expected=None, *, scratch=None):
        reader = _ShardReader.of(self.path, name, array)
        if reader is not None:
            return reader.read(start, stop, expected, scratch=scratch)
        try:
            return np.asarray(array[start:stop])
        except (MemoryError, OSError):
            raise  # NB: the environment's failure, not the data's (DESIGN §10): the driver retries it
        except Exception as e:  # noqa: BLE001 - zarr raises codec-specific errors for corrupt bytes
            raise StackError("corrupt-chunk", f"{name}: chunk(s) of images {start}..{stop - 1} cannot be decoded "
                             f"({type(e).__name__}); the stack is damaged there") from None


class _BlockReader:
    """The `dask.array.map_blocks` function of `Stack.to_xarray`: reads one block of images (or labels) of one
    bucket through `Stack.read`. Pickled (to a distributed worker) as the stack's path, fingerprint and the bucket's
    name; a worker process opens each stack once, without re-checking it (the driver did)."""

    def __init__(self, stack: Stack, bucket: str, labels: bool):
        self._stack, self.path, self.bucket, self.labels = stack, str(Path(stack.path).absolute()), bucket, labels

    def __reduce__(self):
        return (_reopen_reader, (self.path, self._stack.fingerprint(), self.bucket, self.labels))

    def __call__(self, block_info=None):
        start, stop = block_info[None]["array-location"][0]
        stack = self._stack
        bucket = next(b for b in stack.buckets if b.name == self.bucket)
        if not self.labels:
            return stack.read(bucket, start, stop, labels=False)[0]
        # NB: the labels alone, checked like `Stack.read` checks them (against the recorded crc32c column 1).
        crcs = stack.checksums(bucket)
        return stack._read(bucket.labels, start, stop, f"buckets/{bucket.name}/labels",
                           None if crcs is None else crcs[:, 1])


def _read_manifest(root: Path, name: str, arr) -> np.ndarray:
    """A 1-D one-byte array of plain chunks (bytes, then zstd: the written manifest, one chunk per shard), read from
    its chunk files directly; any other layout through zarr. zarr's per-chunk machinery cost ~0.3 ms a chunk, 75 ms
    of every run's start for a stack of 239 shards (issue 17); a missing chunk reads as the fill value, as in zarr."""
    import numcodecs

    folder = Path(root, name)
    layout = _plain_zstd(arr)
    if arr.ndim != 1 or layout is None or layout[1] or np.dtype(arr.dtype).itemsize != 1 or not folder.is_dir():
        return np.asarray(arr[:])
    n, per = int(arr.shape[0]), int(arr.chunks[0])
    out = np.full(n, arr.fill_value, np.dtype(arr.dtype))
    decoder = numcodecs.Zstd()
    for k in range(math.ceil(n / per)):
        key = arr.metadata.encode_chunk_key((k,))
        try:
            raw = Path(folder, key).read_bytes()
        except FileNotFoundError:
            continue
        try:
            chunk = np.frombuffer(decoder.decode(raw), out.dtype)
        except Exception as e:  # noqa: BLE001 - codec libraries raise their own errors for bad streams
            raise StackError("corrupt-chunk", f"{name}: chunk {key} cannot be decoded ({type(e).__name__})") from None
        if chunk.size != per:
            raise StackError("corrupt-chunk", f"{name}: chunk {key} holds {chunk.size} entries, not {per}")
        out[k * per : (k + 1) * per] = chunk[: n - k * per]
    return out


def _plain_zstd(arr) -> tuple[int, bool] | None:
    """(zstd level, crc32c after it) of an unsharded array whose codecs are bytes (little-endian or none), zstd
    without its checksum, and optionally crc32c: the layouts of the written manifest and the chunk checksums, which
    `StackWriter` writes directly (`chunks.array_chunk`); None for any other layout."""
    try:
        codecs = list(arr.metadata.codecs)
    except (AttributeError, TypeError):
        return None
    names = [type(c).__name__ for c in codecs]
    if getattr(arr, "shards", None) or names not in (["BytesCodec", "ZstdCodec"], ["BytesCodec", "ZstdCodec",
                                                                                  "Crc32cCodec"]):
        return None
    if getattr(codecs[0].endian, "value", None) not in (None, "little") or codecs[1].checksum:
        return None
    return int(codecs[1].level), len(codecs) == 3


def _reopen_reader(path: str, fingerprint: str, bucket: str, labels: bool) -> _BlockReader:
    return _BlockReader(_opened(path, fingerprint), bucket, labels)


@functools.lru_cache(maxsize=8)
def _opened(path: str, fingerprint: str) -> Stack:
    """One opened stack per (path, fingerprint) and process: a worker unpickles a reader per task."""
    del fingerprint  # NB: only a cache key: a stack rewritten at the same path is opened afresh
    return open_stack(path, check=False)


def _scratch(name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """This thread's buffer `name` (`shardfiles.scratch`) as an array of `shape` and `dtype`: a fresh 32 MiB batch
    array per batch cost ~8,000 page faults, the largest and least steady cost of a run's reads (issue 17)."""
    nbytes = math.prod(shape) * dtype.itemsize
    return shardfiles.scratch(name, nbytes)[:nbytes].view(dtype).reshape(shape)


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

    def read(self, start: int, stop: int, expected=None, *, scratch: str | None = None) -> np.ndarray:
        """Images [start, stop); `expected` (uint32 per position of the array, optional) are the recorded chunk
        checksums each chunk must carry. With `scratch`, into this thread's buffer of that name (`Stack.read`)."""
        shape, dtype = (stop - start, *self.plane), self.dtype.newbyteorder("=")
        out = np.empty(shape, dtype) if scratch is None else _scratch(scratch, shape, dtype)
        for s in range(start // self.per_shard, (stop - 1) // self.per_shard + 1 if stop > start else 0):
            lo = max(start, s * self.per_shard)
            hi = min(stop, (s + 1) * self.per_shard)
            self._read_shard(s, lo, hi, out[lo - start : hi - start], expected)
        return out

    def _read_shard(self, s: int, lo: int, hi: int, out: np.ndarray, expected=None) -> None:
        key = self.array.metadata.encode_chunk_key((s, 0, 0))
        where = f"{self.name}: chunk {key}"
        # NB: a shard file that cannot be opened (ENOENT from a worker in another folder, EACCES, EIO) is the
        # environment's failure, not the data's: open_stack proved it present, and the driver retries it.
        data = shardfiles.read_whole(Path(self.folder, key))
        index = shardfiles.parse_index(data, self.per_shard)
        if index is None:
            raise StackError("corrupt-chunk", f"{where}: its index is damaged or truncated (images {lo}..{hi - 1})")
        for k in range(lo, hi):
            try:
                chunk = shardfiles.checked_chunk(data, index, k - s * self.per_shard)
            except ValueError:
                raise StackError("corrupt-chunk", f"{where}: image {k} fails its crc32c check") from None
            if chunk is None:
                raise StackError("missing-chunk", f"{where} lacks image {k}; zarr would read it as zeros")
            stored = int.from_bytes(bytes(chunk[-4:]), "little")
            if expected is not None and stored != int(expected[k]):
                raise StackError("stack-damaged", f"{where}: image {k} is not the chunk recorded for its position "
                                 f"(crc32c {stored:08x}, recorded {int(expected[k]):08x}): moved or swapped")
            target = out[k - lo].reshape(-1).view(np.uint8)
            try:
                self._decode(chunk[:-4], target)
            except MemoryError:
                raise  # NB: out of memory inside the decoder is the environment's failure, not the chunk's
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
        self.folder, self.array = folder, array
        self.per_shard = int(array.shards[0])
        self.encoder = chunks.encoder(compressor)

    def write(self, s: int, block) -> list[int]:
        """Shard `s` from `block` (its first images; the rest of the shard is empty): an array of planes, or a
        list of planes and chunks already encoded (`chunks.encode_image`, by ingest's workers). Returns the crc32c
        each chunk ends with, as written (what `chunk_checksums` would read back from the file)."""
        encoded = [item if isinstance(item, bytes) else chunks.encode_plane(item, self.encoder) for item in block]
        parts = shardfiles.assemble(encoded + [None] * (self.per_shard - len(encoded)))
        path = Path(self.folder, self.array.metadata.encode_chunk_key((s, 0, 0)))
        # NB: a reader never sees half a shard; no fsync: the written manifest, written after, decides completeness
        shardfiles.publish(shardfiles.prepare(path, parts, fsync=False), path)
        return [int.from_bytes(chunk[-4:], "little") for chunk in encoded]


def _canvas(shape) -> tuple[int, int]:
    return chunks.canvas(shape)


def _compressors(name: str, itemsize: int):
    if name == "blosc-lz4":
        comp = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize)
    elif name == "blosc-zstd":
        comp = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=itemsize)
    elif name == "zstd":
        comp = ZstdCodec(level=3)
    else:
        raise InputError(f"compressor must be one of {COMPRESSORS}, got {name!r}")
    # NB: crc32c after compression: a flipped byte anywhere in a chunk fails its check on read.
    return [comp, Crc32cCodec()]


def write_stack(path, images, *, labels=None, rois=None, meta=None, shard: int | str | None = None,
                compressor: str = DEFAULT_COMPRESSOR, key_file=None) -> Stack:
    """Write images (and labels, ROI table, per-image metadata) as a gpucnr stack.

    Parameters
    ----------
    path : str or Path
        Where the Zarr group is created (it must not exist).
    images : array (n, H, W), sequence of 2-D arrays, or an iterable of images or batches
        Stored in their native dtype, never resampled: each goes to the bucket of its canvas (shape rounded up
        to a multiple of 64) and dtype, with its valid height and width recorded. An array or a sequence is
        checked whole before anything is written. Any other iterable (a generator, an iterator, a Dask array's
        blocks) is *streamed*: read once, in order, each item a 2-D image or a 3-D batch (k, H, W) of images of
        one shape, and written shard by shard as it comes, so that the whole input is never held (memory: one
        shard per bucket, plus the per-image table's columns). Each image is checked as it is added; an error
        removes the partly written stack.
    labels : array, sequence or iterable of 2-D integer arrays, optional
        One per image, of the image's shape (0 = none); with streamed images, an iterable whose items match the
        images' items one for one (same shapes).
    rois : ROI table, optional
        Columns image (position in `images`), roi, kind, cx, cy, r [, name]; stored against the global index.
    meta : pandas.DataFrame, optional
        One row per input image: extra per-image columns (slope, intercept, padding, photometric override the
        defaults 1, 0, NaN, "MONOCHROME2"). Other columns are screened as DESIGN §10 says
        (`gpucnr.identifiers`): a name or value that may identify a patient is refused. Id columns (patient_id,
        study_id, series_id, instance_id) are stored as keyed pseudonyms: give `key_file`, unless they hold
        pseudonyms already (20 hex digits, as `gpucnr ingest` writes them).
    shard : int or str, optional
        Images per shard (``64``, ``"64i"``) or pixels per shard per bucket (``"4M"`` = 2^22 px, whole images,
        at least one); default about 2^22 pixels (`SHARD_PIXELS`). A run's batches are whole shards.
    compressor : {"blosc-lz4", "blosc-zstd", "zstd"}
        Default `DEFAULT_COMPRESSOR` (blosc-lz4).
    key_file : path, optional
        The pseudonym key for raw id columns in `meta` (created if missing, like ``gpucnr ingest --key-file``).

    Returns
    -------
    Stack

    Examples
    --------
    >>> def phantoms():                                          # doctest: +SKIP
    ...     for k in range(1000):
    ...         yield make_phantom(1000, (64, 64), seed=k).images   # one batch of 1000 images at a time
    >>> write_stack("big.zarr", phantoms(), rois=table)           # doctest: +SKIP
    """
    if _streamed(images):
        return _write_streamed(path, images, labels=labels, rois=rois, meta=meta, shard=shard,
                               compressor=compressor, key_file=key_file)
    planes = _planes(images, "images")
    label_planes = None if labels is None else _planes(labels, "labels")
    if label_planes is not None and len(label_planes) != len(planes):
        raise InputError(f"{len(planes)} images but {len(label_planes)} label arrays")
    n = len(planes)
    meta = _meta_frame(meta, n, key_file)
    rt = _roi_table(rois, n)  # NB: validated before anything is written
    rows = _MetaRows(meta)
    for i, p in enumerate(planes):
        check_labels(p, None if label_planes is None else label_planes[i], f"image {i}")
        _check_row(p, rows[i], i)  # NB: before anything is written
    with StackWriter(path, labels=label_planes is not None, shard=shard, compressor=compressor) as writer:
        for i, p in enumerate(planes):
            writer.add(p, None if label_planes is None else label_planes[i], rows[i])
        return writer.close(rois=rt)


def _streamed(images) -> bool:
    """Whether `images` is an iterable to stream (not an array, a sequence, or anything array-like)."""
    if isinstance(images, np.ndarray | Sequence) or hasattr(images, "__array__"):
        return False
    if hasattr(images, "__cuda_array_interface__") or hasattr(images, "__dlpack__"):
        return False
    return hasattr(images, "__iter__")


def _write_streamed(path, images, *, labels, rois, meta, shard, compressor, key_file) -> Stack:
    """`write_stack` of an iterable: each item (an image or a batch) added as it comes, the stack removed if
    anything fails before it is complete."""
    import shutil

    meta = None if meta is None else _meta_frame(meta, None, key_file)
    rows = None if meta is None else _MetaRows(meta)
    label_items = None if labels is None else iter(labels)
    writer = StackWriter(path, labels=labels is not None, shard=shard, compressor=compressor)
    try:
        with writer:
            for k, item in enumerate(images):
                lab_item = None
                if label_items is not None:
                    lab_item = next(label_items, None)
                    if lab_item is None:
                        raise InputError(f"labels ended before the images (at item {k} of the images)")
                planes = _item_planes(item, "images", k)
                lab_planes = None if lab_item is None else _item_planes(lab_item, "labels", k)
                if lab_planes is not None and len(lab_planes) != len(planes):
                    raise InputError(f"item {k}: {len(planes)} images but {len(lab_planes)} label arrays")
                for j, plane in enumerate(planes):
                    i = writer.n_images
                    if rows is not None and i >= len(rows):
                        raise InputError(f"meta has {len(rows)} rows, but there are more images")
                    writer.add(plane, None if lab_planes is None else lab_planes[j],
                               None if rows is None else rows[i])
            if label_items is not None and next(label_items, None) is not None:
                raise InputError("labels hold more items than the images")
            n = writer.n_images
            if rows is not None and len(rows) != n:
                raise InputError(f"meta has {len(rows)} rows for {n} images")
            return writer.close(rois=_roi_table(rois, n))
    except BaseException:
        writer.abandon()
        shutil.rmtree(path, ignore_errors=True)  # NB: the writer created it (it refuses an existing path)
        raise


def _item_planes(item, what: str, k: int) -> list[np.ndarray]:
    """One streamed item as 2-D planes: a 2-D image, or a 3-D batch of images."""
    arr = to_host(item)
    if arr.ndim not in (2, 3):
        raise InputError(f"{what} item {k} must be a 2-D image or a 3-D batch (k, H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} item {k} has dtype {arr.dtype}; integer or float expected")
    return [arr] if arr.ndim == 2 else list(arr)


def _meta_frame(meta, n: int | None, key_file) -> pd.DataFrame:
    """`meta` as a screened DataFrame of `n` rows (any number when None; no columns when `meta` is None)."""
    meta = pd.DataFrame(index=range(n or 0)) if meta is None else pd.DataFrame(meta).reset_index(drop=True)
    if n is not None and len(meta) != n:
        raise InputError(f"meta has {len(meta)} rows for {n} images")
    return _screen_meta(meta, key_file)


def _roi_table(rois, n: int) -> pd.DataFrame | None:
    if rois is None:
        return None
    from gpucnr.identifiers import blank_roi_names

    return blank_roi_names(normalize_table(rois, n), "write_stack(rois=)")


class _MetaRows:
    """The rows of a meta DataFrame as dicts on request (``DataFrame.to_dict("records")`` one row at a time):
    a column of Python values each, never a million dicts at once."""

    def __init__(self, meta: pd.DataFrame):
        self.columns = {c: meta[c].tolist() for c in meta.columns}
        self.n = len(meta)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {c: v[i] for c, v in self.columns.items()}


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
    shard : int or str, optional
        Images per shard (an int, ``"64"`` or ``"64i"``) or pixels per shard (``"4M"`` = 2^22 px, whole images,
        at least one, per bucket); default about 2^22 pixels per bucket (`SHARD_PIXELS`). A run batches whole
        shards.
    compressor : {"blosc-lz4", "blosc-zstd", "zstd"}
        Default `DEFAULT_COMPRESSOR` (blosc-lz4).
    attrs : dict, optional
        Extra group attributes (e.g. the ingest's counts), written at `close`.
    """

    def __init__(self, path, *, labels: bool = False, shard: int | str | None = None,
                 compressor: str = DEFAULT_COMPRESSOR, attrs: dict | None = None):
        path = Path(path)
        if os.path.lexists(path):  # NB: a symbolic link to nothing is not followed to write a stack where it points
            raise InputError(f"{path} already exists; a stack is never overwritten")
        self.size = _shard_size(shard)
        _compressors(compressor, 1)  # NB: validated before the group exists
        self.path, self.labels, self.shard, self.compressor = path, labels, shard, compressor
        self.attrs = dict(attrs or {})
        self.group = zarr.open_group(str(path), mode="w")
        # NB: shards are compressed and written by one background thread, in order, so the caller (ingest's
        # driver) keeps feeding its decoders meanwhile; a bucket has at most one shard in flight.
        self._io = ThreadPoolExecutor(1, thread_name_prefix="gpucnr-stack-writer")
        self._buckets: dict[tuple, dict] = {}
        self._rows = _Rows()
        self._label_ids: set[int] = set()
        self._expected: dict[tuple, int] = {}
        self._spool_refs: Counter = Counter()  # NB: spooled chunks added, not yet handed to the writer's thread
        self._spool_done: set[str] = set()  # NB: spool files no more chunks will come from
        #: called as ``on_written(bucket name, images of the bucket now on disk)`` after each shard's pixels and
        #: manifest are written (from the writer's thread): ingest journals it, to resume from there
        self.on_written = None

    @classmethod
    def resume(cls, path, *, rows: list[dict], label_ids, labels: bool = False, shard: int | str | None = None,
               compressor: str = DEFAULT_COMPRESSOR, attrs: dict | None = None) -> StackWriter:
        """Continue the stack an interrupted writer left at `path`, keeping the images `rows` describe (the
        per-image rows of the `add` calls to keep, in order; each bucket's positions 0..n-1) and dropping the
        rest: other buckets, shards past them, the tables of an interrupted `close`, half-written shard files.
        The last, partly filled shard of each bucket is read back and will be written again whole, so the result
        equals a writer that was never interrupted. `label_ids` are the labels of the kept images."""
        import shutil

        path = Path(path)
        self = cls.__new__(cls)
        self.path, self.labels, self.shard, self.compressor = path, labels, shard, compressor
        self.size = _shard_size(shard)
        self.attrs = dict(attrs or {})
        self.group = zarr.open_group(str(path), mode="r+")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="gpucnr-stack-writer")
        self._buckets, self._rows, self._label_ids = {}, _Rows(rows), set(label_ids)
        self._expected, self._spool_refs, self._spool_done = {}, Counter(), set()
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
            per = int(images.shards[0])  # NB: the bucket's own shard, as it was written
            first = n // per * per
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
                "inflight": None, "shard": per}
        return self

    def abandon(self) -> None:
        """Stop without closing (an interrupted ingest): the shard being written completes, nothing more is."""
        self._io.shutdown(wait=True)

    @property
    def rows(self) -> _Rows:
        """The per-image rows of the images added so far (bucket, position, valid extent, source index, meta): a
        sequence whose items are dicts, built on request from columns (a million images are not a million
        dicts)."""
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
        _check_row(image, meta or {}, len(self._rows))
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
        if len(b["pending"]) == b["shard"] or b["pending_bytes"] >= _PENDING_BYTES:
            self._flush(b)
        return source

    def add_encoded(self, encoded: dict, meta: dict | None = None) -> int:
        """Add one image whose chunks were encoded elsewhere (`chunks.encode_image`: by ingest's worker
        processes, so that compression runs beside the decoders); as `add` otherwise. Its canvas, compressor and
        label planes must be this stack's."""
        shape, dtype = tuple(encoded["shape"]), np.dtype(encoded["dtype"]).newbyteorder("=")
        i = len(self._rows)
        if len(shape) != 2:
            raise InputError(f"image {i} must be 2-D, got shape {shape}")
        _check_row(np.broadcast_to(np.uint8(0), shape), meta or {}, i)  # NB: the shape alone, no pixels
        box = _canvas(shape)
        blosc = self.compressor.startswith("blosc")
        image = encoded["image"]
        # NB: a chunk spooled by the worker (`shardfiles.spool`) is checked when it is read back, or, put in place
        # whole, by every reader against the crc32c recorded here
        spooled = isinstance(image, shardfiles.Spooled)
        if (dtype.kind not in "iuf" or tuple(encoded["canvas"]) != box or encoded["compressor"] != self.compressor
                or (encoded["labels"] is not None) != self.labels or not (spooled or isinstance(image, bytes))
                # NB: a blosc header holds the uncompressed size (bytes 4..8): the chunk must fill the canvas
                or (blosc and not spooled
                    and int.from_bytes(image[4:8], "little") != box[0] * box[1] * dtype.itemsize)):
            raise InputError(f"image {i}: encoded chunks that do not fit this stack (canvas, compressor or labels)")
        if encoded.get("has_labels") and not self.labels:
            raise InputError("this stack was opened without labels")
        key = (_canvas(shape), dtype.str)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = self._new_bucket(*key)
        self._label_ids.update(int(v) for v in encoded["label_ids"])
        for ref in (image, encoded["labels"]):
            if isinstance(ref, shardfiles.Spooled):
                self._spool_refs[ref.path] += 1
        self._rows.append({"bucket": b["name"], "position": b["count"] + len(b["pending"]), "valid_h": shape[0],
                           "valid_w": shape[1], "source_index": i, **(meta or {})})
        b["pending"].append(encoded)
        b["pending_bytes"] += _pending_bytes(encoded)
        if len(b["pending"]) == b["shard"] or b["pending_bytes"] >= _PENDING_BYTES:
            self._flush(b)
        return i

    @property
    def n_images(self) -> int:
        return len(self._rows)

    def spool_done(self, path: str) -> None:
        """No more chunks will be added from the spool file at `path`: it is removed once the chunks added from it
        are in the stack (renamed into place with it, or read back from it), so that spool files that are not
        whole shards do not pile up on disk."""
        self._spool_done.add(path)
        self._release_spool([])

    def _release_spool(self, entries: list) -> None:
        """The spooled chunks among `entries` (pending images leaving the buffer) are no longer the caller's: spool
        files no chunk is pending from any more, and that are done, are removed by the writer's thread, after the
        writes already queued that read them."""
        for entry in entries:
            if isinstance(entry, dict):
                for ref in (entry["image"], entry["labels"]):
                    if isinstance(ref, shardfiles.Spooled):
                        self._spool_refs[ref.path] -= 1
        for path in [p for p in self._spool_done if self._spool_refs[p] <= 0]:
            self._spool_done.discard(path)
            self._spool_refs.pop(path, None)
            self._io.submit(_remove_spool, path)

    def expect(self, canvas, dtype, n: int) -> None:
        """Say that the bucket of `canvas` and `dtype` will hold about `n` images: its arrays are sized for them
        when it first grows (each resize is four metadata writes through zarr), and cut to what was written at
        `close`."""
        self._expected[_bucket_key(canvas, dtype)] = int(n)

    def next_position(self, canvas, dtype) -> tuple[int, int]:
        """(the position in its bucket the next image of `canvas` and `dtype` would get, that bucket's images per
        shard): what ingest plans its spooled shards from."""
        key = _bucket_key(canvas, dtype)
        b = self._buckets.get(key)
        if b is None:
            return 0, shard_images(self.size, key[0])
        return b["count"] + len(b["pending"]), b["shard"]

    def mark(self) -> tuple:
        """The point `rollback` returns to: the images added so far."""
        return len(self._rows), frozenset(self._label_ids)

    def rollback(self, mark: tuple) -> None:
        """Drop the images added since `mark` (ingest: a volume whose worker died after some of its slices were
        stored), as if they had never been added.

        Pending ones are forgotten; from a bucket whose shards already hold some, those shards are cut as
        `resume` cuts them (the bucket's last kept, partly filled shard read back, to be written again whole; a
        bucket left empty removed), and `on_written` is told each cut bucket's new count *before* its files
        shrink, so that a journal never counts images that are not on disk."""
        import shutil

        n, label_ids = mark
        rows = self._rows
        if n >= len(rows):
            return
        first_dropped: dict[str, int] = {}
        for i in range(n, len(rows)):
            name = rows._names[rows._bucket[i]]
            first_dropped.setdefault(name, int(rows._fixed["position"][i]))
        rows.truncate(n)
        self._label_ids = set(label_ids)
        for key, b in list(self._buckets.items()):
            keep = first_dropped.get(b["name"])
            if keep is None:
                continue
            if keep >= b["count"]:
                self._release_spool(b["pending"][keep - b["count"]:])
                b["pending"] = b["pending"][: keep - b["count"]]
                b["pending_bytes"] = sum(_pending_bytes(p) for p in b["pending"])
                continue
            if b["inflight"] is not None:
                self._wait(b)
                b["inflight"] = None
            self._release_spool(b["pending"])
            per = b["shard"]
            first = keep // per * per
            block = np.asarray(b["images"][first:keep]) if keep > first else None
            lab_block = np.asarray(b["labels"][first:keep]) if b["labels"] is not None and keep > first else None
            if self.on_written is not None:
                self.on_written(b["name"], first)
            if keep == 0:
                del self._buckets[key]
                shutil.rmtree(self.path / "buckets" / b["name"], ignore_errors=True)
                continue
            kept, i, index = [], n - 1, rows._names.index(b["name"])
            while len(kept) < keep - first:  # NB: the bucket's last kept rows, read backwards from the mark
                if rows._bucket[i] == index:
                    kept.append(rows[i])
                i -= 1
            kept.reverse()
            pending = []
            for k, r in enumerate(kept):
                h, w = int(r["valid_h"]), int(r["valid_w"])
                pending.append((block[k, :h, :w], None if lab_block is None else lab_block[k, :h, :w]))
            self._resize(b, first)  # NB: zarr deletes the shard files past it
            b["capacity"] = first  # NB: `_grow` makes room again as the next images come
            b["count"], b["pending"] = first, pending
            b["pending_bytes"] = sum(_pending_bytes(p) for p in pending)

    def _new_bucket(self, canvas, dtype_str) -> dict:
        dtype = np.dtype(dtype_str)
        name = f"{canvas[0]}x{canvas[1]}-{dtype.name}"
        per = shard_images(self.size, canvas)
        images = self.group.create_array(f"buckets/{name}/images", shape=(0, *canvas), dtype=dtype,
                                         chunks=(1, *canvas), shards=(per, *canvas),
                                         compressors=_compressors(self.compressor, dtype.itemsize), fill_value=0,
                                         config=_WRITE, dimension_names=["image", "y", "x"])
        labels = None
        if self.labels:
            labels = self.group.create_array(f"buckets/{name}/labels", shape=(0, *canvas), dtype="int32",
                                             chunks=(1, *canvas), shards=(per, *canvas),
                                             compressors=_compressors(self.compressor, 4), fill_value=0,
                                             config=_WRITE, dimension_names=["image", "y", "x"])
        # NB: every array carries dimension names, so xarray.open_datatree opens the stack (they do not enter the
        # fingerprint: stacks written before keep theirs).
        written = self.group.create_array(f"buckets/{name}/written", shape=(0,), dtype="uint8",
                                          chunks=(per,), fill_value=0, config=_WRITE,
                                          dimension_names=["image"])
        # NB: the crc32c of each image and label chunk, recorded as it is written: readers compare every chunk
        # with the one recorded for its position, and the fingerprint hashes them (DESIGN §10).
        checksums = self.group.create_array(f"buckets/{name}/checksums", shape=(0, 2), dtype="uint32",
                                            chunks=(_CRC_ROWS, 2), fill_value=0, config=_WRITE,
                                            compressors=[ZstdCodec(level=3), Crc32cCodec()],
                                            dimension_names=["image", "array"])
        return {"name": name, "canvas": canvas, "dtype": dtype, "images": images, "labels": labels,
                "written": written, "checksums": checksums, "count": 0, "pending": [], "pending_bytes": 0,
                "inflight": None, "shard": per}

    def _flush(self, b: dict) -> None:
        m = len(b["pending"])
        if not m:
            return
        if b["inflight"] is not None:
            self._wait(b)  # NB: raises the previous shard's write error here, in the caller
        a, z = b["count"], b["count"] + m
        if any(isinstance(p, dict) for p in b["pending"]):
            # NB: chunks encoded by ingest's workers go to the shard file as they are; planes are encoded there
            block = [p["image"] if isinstance(p, dict) else _on_canvas(p[0], b["canvas"], b["dtype"])
                     for p in b["pending"]]
            lab_block = None if not self.labels else [
                p["labels"] if isinstance(p, dict) else _on_canvas(p[1], b["canvas"], np.int32)
                for p in b["pending"]]
        else:
            block = np.zeros((m, *b["canvas"]), b["dtype"])
            lab_block = np.zeros((m, *b["canvas"]), np.int32) if self.labels else None
            for k, (image, labels) in enumerate(b["pending"]):
                h, w = image.shape
                block[k, :h, :w] = image
                if labels is not None:
                    lab_block[k, :h, :w] = labels
        b["inflight"] = self._io.submit(self._write, b, a, z, block, lab_block)
        b["count"] = z
        self._release_spool(b["pending"])
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

    def _grow(self, b: dict, z: int) -> None:
        """Make room for `z` images in a bucket's arrays: they grow by a quarter or more at a time, not shard by
        shard (each resize rewrites four zarr.json files: ~0.3 ms of the driver's CPU per image with 16 images
        per shard, issue 18); `close` cuts them to the images written. Before `close` the group is not a stack
        (`open_stack` refuses it), and a resume cuts the arrays to what it keeps."""
        if z <= b.setdefault("capacity", int(b["written"].shape[0])):
            return
        b["capacity"] = max(z, b["capacity"] + max(b["capacity"] // 4, 4 * b["shard"]),
                            self._expected.get((b["canvas"], b["dtype"].str), 0))
        self._resize(b, b["capacity"])

    @staticmethod
    def _resize(b: dict, n: int) -> None:
        b.pop("folders", None)  # NB: a shrink may remove chunk folders (`_folder`)
        for kind in ("images", "labels", "written", "checksums"):
            if b.get(kind) is not None:
                b[kind].resize((n, *b[kind].shape[1:]))

    def _write(self, b: dict, a: int, z: int, block, lab_block) -> None:
        self._grow(b, z)
        crcs = np.zeros((z - a, 2), np.uint32)
        kinds = (("images", block), ("labels", lab_block))
        runs = {kind: shardfiles.spooled_run(data, b["shard"]) if a % b["shard"] == 0 and isinstance(data, list)
                else None for kind, data in kinds if b[kind] is not None}
        for col, (kind, data) in enumerate(kinds):
            if b[kind] is None:
                continue
            if all(runs.values()):
                # NB: the workers wrote this whole shard's chunks, in order, into one spool file (ingest, issue
                # 18): its index makes it the shard file, renamed into place, and no byte passes through here
                crcs[:, col] = self._place(b, kind, a // b["shard"], runs[kind], data)
                continue
            if isinstance(data, list):
                # NB: spooled chunks that do not make a whole shard file are read back, checked, and stored as sent
                data = [shardfiles.read_spooled(d) if isinstance(d, shardfiles.Spooled) else d for d in data]
            if a % b["shard"] == 0:
                # NB: a shard written from its start is written whole, as a file; a shard continued after an early
                # flush (very large images) is merged by zarr. The chunks' crc32c are those just written (issue
                # 18: not read back from the file).
                crcs[:, col] = _ShardWriter(self.path / f"buckets/{b['name']}/{kind}", b[kind],
                                            self.compressor).write(a // b["shard"], data)
            else:
                if isinstance(data, list):  # NB: a shard continued after an early flush is merged by zarr: planes
                    dtype = b["dtype"] if kind == "images" else np.dtype(np.int32)
                    codec = chunks.encoder(self.compressor)
                    data = np.stack([chunks.decode_chunk(d, b["canvas"], dtype, codec) if isinstance(d, bytes)
                                     else d for d in data])
                b[kind][a:z] = data
                crcs[:, col] = chunk_checksums(self.path / f"buckets/{b['name']}/{kind}", b[kind], a, z)
        self._record(b, "checksums", a, z, crcs)
        # NB: the manifest is written after the pixels: a crash in between leaves an incomplete stack.
        self._record(b, "written", a, z, np.ones(z - a, np.uint8))
        if self.on_written is not None:
            self.on_written(b["name"], z)

    def _place(self, b: dict, kind: str, s: int, path: str, refs: list) -> np.ndarray:
        """Shard `s` of the bucket's array `kind` from the spool file at `path` that holds its chunks in order
        (`shardfiles.spooled_run`): the index appended, the file renamed into place. Returns the chunks'
        crc32c."""
        index = np.full((len(refs), 2), shardfiles.EMPTY, "<u8")
        for k, r in enumerate(refs):
            index[k] = (r.offset, r.nbytes)
        with open(path, "ab") as fh:
            fh.write(shardfiles.with_crc(index.tobytes()))
        dest = Path(self.path, b[kind].path, b[kind].metadata.encode_chunk_key((s, 0, 0)))
        _folder(b, dest.parent)
        os.replace(path, dest)
        return np.array([r.crc for r in refs], np.uint32)

    def _record(self, b: dict, kind: str, a: int, z: int, rows: np.ndarray) -> None:
        """Rows [a, z) of the bucket's per-image array `kind` (the written manifest, the chunk checksums), written as
        whole chunk files, in zarr's encoding, atomically. Through zarr each shard's rows cost 2-7 ms of zarr's
        event loop, the checksums a read-modify-write of a 512 KiB chunk (issue 18). The chunk being filled is
        kept here; rows before `a` that another writer left (a resume) are read once. An array laid out otherwise
        is written through zarr."""
        arr = b[kind]
        level = _plain_zstd(arr)
        if level is None:
            arr[a:z] = rows
            return
        per = int(arr.chunks[0])
        held = b.setdefault("held", {})
        for c in range(a // per, (z - 1) // per + 1):
            start = c * per
            if held.get(kind, (None,))[0] != c:
                block = np.zeros((per, *arr.shape[1:]), np.dtype(arr.dtype))
                if start < a:
                    block[: a - start] = arr[start:a]
                held[kind] = (c, block)
            block = held[kind][1]
            lo, hi = max(a, start), min(z, start + per)
            block[lo - start : hi - start] = rows[lo - a : hi - a]
            key = arr.metadata.encode_chunk_key((c, *(0,) * (arr.ndim - 1)))
            file = Path(self.path, arr.path, key)
            _folder(b, file.parent)
            data = chunks.array_chunk(block, np.dtype(arr.dtype), level=level[0], crc=level[1])
            shardfiles.publish(shardfiles.prepare(file, [data], fsync=False), file)

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
        for b in self._buckets.values():
            if b.get("capacity", b["count"]) != b["count"]:
                self._resize(b, b["count"])  # NB: the room `_grow` made beyond the images written goes
        order = sorted(self._buckets, key=lambda k: (k[0], np.dtype(k[1]).name))
        offset, offsets, names = 0, {}, []
        for key in order:
            b = self._buckets[key]
            offsets[b["name"]] = offset
            names.append(b["name"])
            offset += b["count"]
        table = self._rows.frame()
        table.insert(0, "index", table["bucket"].map(offsets).to_numpy(np.int64) + table["position"].to_numpy(np.int64))
        for col, default in (("slope", 1.0), ("intercept", 0.0), ("padding", np.nan),
                             ("photometric", "MONOCHROME2")):
            table[col] = table[col].fillna(default) if col in table else default
        table = table.sort_values("index").reset_index(drop=True)
        _write_table(Path(self.path), "images", table)
        global_of = np.empty(n, np.int64)
        global_of[table["source_index"].to_numpy(np.int64)] = table["index"].to_numpy(np.int64)
        roi_ids = set()
        if self.labels:
            roi_ids.update(self._label_ids)
        if rt is not None:
            rt["image"] = global_of[rt["image"].to_numpy()]
            _write_table(Path(self.path), "rois", rt[["image", "roi", "kind", "cx", "cy", "r", "name"]])
            roi_ids.update(int(v) for v in rt["roi"])
        # NB: one metadata write (`attrs.update` writes zarr.json once per key): the stack's marker never lands
        # before the attributes it goes with
        self.group.update_attributes({**self.attrs, "gpucnr_stack": STACK_FORMAT, "gpucnr_version": __version__,
                                      "n_images": n, "buckets": names, **self._shard_attrs(),
                                      "compressor": self.compressor, "roi_ids": sorted(roi_ids),
                                      # NB: the labels' own ids, apart from the table's: a run measuring both sources
                                      # names each id's source without reading a label chunk
                                      "label_ids": sorted(self._label_ids) if self.labels else [],
                                      "has_labels": self.labels})
        return open_stack(self.path)

    def _shard_attrs(self) -> dict:
        """``shard`` (images per shard: the one of every bucket, else the largest, as stacks before pixel-sized
        shards recorded it), ``shards`` (per bucket) and ``shard_size`` (the size asked for, `format_size`)."""
        per = {b["name"]: b["shard"] for b in self._buckets.values()}
        kind, n = self.size
        return {"shard": n if kind == "images" else max(per.values(), default=1), "shards": per,
                "shard_size": format_size(kind, n)}


class _Rows(Sequence):
    """The per-image rows of a `StackWriter`, held as columns: the fixed ones (bucket, position, valid_h, valid_w,
    source_index) in int64 arrays, each `meta` key in a list (missing entries NaN, as a DataFrame of the row
    dicts would hold them). Indexing gives the row's dict."""

    _FIXED = ("position", "valid_h", "valid_w", "source_index")

    def __init__(self, rows=()):
        import array

        self._names: list[str] = []
        self._bucket = array.array("i")
        self._fixed = {k: array.array("q") for k in self._FIXED}
        self._meta: dict[str, list] = {}
        for row in rows:
            self.append(row)

    def append(self, row: dict) -> None:
        name = row["bucket"]
        if name not in self._names:
            self._names.append(name)
        n = len(self._bucket)
        self._bucket.append(self._names.index(name))
        fixed, meta = self._fixed, self._meta
        for k in self._FIXED:
            fixed[k].append(int(row[k]))
        added = 0
        for k, v in row.items():
            column = meta.get(k)
            if column is None:
                if k == "bucket" or k in fixed:
                    continue
                column = meta[k] = [np.nan] * n
            column.append(v)
            added += 1
        if added < len(meta):  # NB: a key this row lacks
            for column in meta.values():
                if len(column) == n:
                    column.append(np.nan)

    def truncate(self, n: int) -> None:
        """Keep the first `n` rows."""
        del self._bucket[n:]
        for column in (*self._fixed.values(), *self._meta.values()):
            del column[n:]

    def __len__(self) -> int:
        return len(self._bucket)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        out = {"bucket": self._names[self._bucket[i]], **{k: int(v[i]) for k, v in self._fixed.items()}}
        # NB: a key the row lacked reads as NaN (as `frame` holds it); replayed (ingest's journal) it gives the
        # same frame, a column that only ever held NaN included
        out.update({k: column[i] for k, column in self._meta.items()})
        return out

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (columns bucket, position, valid_h, valid_w, source_index, then meta keys)."""
        names = np.asarray(self._names, dtype=object)
        columns = {"bucket": names[np.frombuffer(self._bucket, np.int32)] if len(self) else np.empty(0, object)}
        columns.update({k: np.frombuffer(v, np.int64).copy() if len(self) else np.empty(0, np.int64)
                        for k, v in self._fixed.items()})
        frame = pd.DataFrame(columns)
        for k, column in self._meta.items():
            frame[k] = pd.Series(column, dtype=None)
        return frame


def _folder(b: dict, folder: Path) -> None:
    """Create a chunk folder of bucket `b` once (a `mkdir` that finds the folder there costs a failed system call and
    an exception, per shard)."""
    made = b.setdefault("folders", set())
    if folder not in made:
        folder.mkdir(parents=True, exist_ok=True)
        made.add(folder)


def _remove_spool(path: str) -> None:
    """Remove a spool file that was read back (one renamed into place is gone already)."""
    Path(path).unlink(missing_ok=True)


def _bucket_key(canvas, dtype) -> tuple:
    """The key of a writer's bucket: (canvas, native dtype string)."""
    return tuple(int(v) for v in canvas), np.dtype(dtype).newbyteorder("=").str


def _pending_bytes(p) -> int:
    """What an image waiting in a bucket's shard buffer counts towards `_PENDING_BYTES`."""
    if isinstance(p, dict):
        # NB: a spooled chunk is on disk, not in memory
        return sum(len(c) for c in (p["image"], p["labels"]) if isinstance(c, bytes))
    return p[0].nbytes


def _shard_size(shard) -> tuple[str, int]:
    return parse_size(f"{SHARD_PIXELS}px" if shard is None else shard, what="shard")


def whole_shards(stack, bucket: str, n: int) -> int:
    """The images of `bucket` (of the stack being written at `stack`) in its whole shards among its first `n`."""
    per = int(zarr.open_group(str(stack), mode="r")[f"buckets/{bucket}/images"].shards[0])
    return n // per * per


_PSEUDONYM = r"[0-9a-f]{20}|"
#: meta columns write_stack interprets itself (never screened as free text)
_OWN_META = ("slope", "intercept", "padding", "photometric")
#: numeric columns of gpucnr's own (enhance's original_index, geometry): their values are indices and
#: measurements, never screened as record numbers (a dataset may hold more than 99999 images)
#: meta columns whose values ingest writes as keyed pseudonyms (carried into a new stack by enhance)
_PSEUDONYM_META = ("case",)
_NUMERIC_META = ("original_index", "frame", "channel", "spacing_y", "spacing_x", "spacing_z", "pixel_spacing")


def _screen_meta(meta: pd.DataFrame, key_file) -> pd.DataFrame:
    """`meta` with raw id columns pseudonymised (`key_file`); a column that may identify a patient is refused."""
    from gpucnr.identifiers import check_columns
    from gpucnr.sources.pseudonyms import ID_COLUMNS, load_or_create_key, pseudonym

    meta = meta.copy()
    for col in (c for c in ID_COLUMNS if c in meta.columns):
        text = meta[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        if text.str.fullmatch(_PSEUDONYM).all():
            meta[col] = text
            continue
        if key_file is None:
            raise InputError(f"meta column {col} holds raw ids: pass key_file= so that they are stored as keyed "
                             "pseudonyms (write_stack has no key of its own)")
        key = load_or_create_key(Path(key_file))
        meta[col] = [pseudonym(key, col.removesuffix("_id"), v) for v in text]
    free = [str(c) for c in meta.columns if c not in ID_COLUMNS and c not in _OWN_META]
    numeric = [c for c in free if c in _NUMERIC_META and pd.api.types.is_numeric_dtype(meta[c])]
    # NB: a `case` column of gpucnr's own pseudonyms (ingest's, carried by enhance) is not free text: 20 hex digits
    # often hold a run of six decimal digits, which the record-number screen would refuse by chance
    own = [c for c in free if c in _PSEUDONYM_META and meta[c].map(_is_pseudonym).all()]
    check_columns(meta.drop(columns=numeric + own), free, "meta")  # NB: names of all, values of the rest
    return meta


def _on_canvas(plane, shape, dtype) -> np.ndarray:
    """`plane` at the top left of a zero canvas of `shape` (None: all zeros)."""
    out = np.zeros(shape, dtype)
    if plane is not None:
        out[: plane.shape[0], : plane.shape[1]] = plane
    return out


def _is_pseudonym(value) -> bool:
    """A missing value, or 20 lower-case hex digits (`gpucnr.sources.pseudonyms.pseudonym`'s form)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return re.fullmatch(_PSEUDONYM, str(value)) is not None


def _check_row(image: np.ndarray, meta: dict, i: int) -> None:
    """What `open_stack` will demand of an image's row, refused before it is written (gpucnr.stackcheck)."""
    if min(image.shape) < 1:
        raise InputError(f"image {i} has shape {image.shape}; an image has at least one row and one column")
    for col in ("slope", "intercept"):
        value = meta.get(col)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # NB: missing: the default (1 or 0) is written
        real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
        if not real or not math.isfinite(float(value)) or (col == "slope" and float(value) == 0):
            raise InputError(f"image {i}: {col} {value!r} is not a finite number" + (" != 0" if col == "slope" else ""))


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


#: A stored text column is kept as integer codes and its distinct values (a coded column: a group holding the
#: arrays ``codes`` and ``values``, attribute ``gpucnr_coded``) when it has at most this share of distinct values:
#: decoding 786,432 ROI names as text took 0.25 s, their codes 3 ms. Stacks written before store text as text and
#: are read as before (their fingerprints unchanged).
CODED_SHARE = 0.5


def _write_table(root: Path, name: str, table: pd.DataFrame) -> None:
    """One 1-D array per column of the stack at `root`, one chunk each, zstd then crc32c (a damaged table must not
    read as data); its dimension is ``image`` for the per-image table (row i = global image i), ``row`` for others.
    A text column with few distinct values is coded (`CODED_SHARE`).

    Zarr builds the arrays in memory, then their files are written here, byte for byte what zarr writes: through the
    folder's store each array's creation cost 3-5 ms of zarr's event loop (existence checks and the parents'
    metadata, each a hop to a thread), ~0.2-0.4 s for the ~45 arrays of an ingest's close; in memory ~1.3 ms."""
    from zarr.storage import MemoryStore

    dim = "image" if name == "images" else "row"
    built: dict = {}
    group = zarr.open_group(MemoryStore(built), mode="w")
    for col in table.columns:
        values = table[col].to_numpy()
        dtype = str if values.dtype.kind in "OUST" else values.dtype
        if dtype is str:
            values = values.astype(str)
            codes, distinct = pd.factorize(values.astype(object), use_na_sentinel=False)
            if len(values) and len(distinct) <= CODED_SHARE * len(values):
                _write_coded(group, f"tables/{name}/{col}", codes, np.asarray(distinct).astype(str), dim)
                continue
        _write_column(group, f"tables/{name}/{col}", values, dtype, dim)
    made: set[Path] = set()
    for key, buffer in sorted(built.items()):
        if not key.startswith("tables/"):
            continue  # NB: the in-memory root's metadata: the stack's own is the one on disk
        file = Path(root, key)
        if key.count("/") <= 2 and key.endswith("/zarr.json") and file.exists():
            continue  # NB: tables/ (and the table's own group, never there before): as zarr, never overwritten
        if file.parent not in made:
            # NB: one by one: folders made in parallel in one parent contend for it (measured slower)
            file.parent.mkdir(parents=True, exist_ok=True)
            made.update((file.parent, *file.parent.parents))
        file.write_bytes(buffer.to_bytes())


def _write_column(group, where: str, values: np.ndarray, dtype, dim: str) -> None:
    arr = group.create_array(where, shape=values.shape, dtype=dtype, chunks=(max(len(values), 1),),
                             compressors=[ZstdCodec(level=3), Crc32cCodec()], config=_WRITE, dimension_names=[dim])
    if len(values):
        arr[:] = values


def _write_coded(group, where: str, codes: np.ndarray, distinct: np.ndarray, dim: str) -> None:
    sub = group.create_group(where, attributes={"gpucnr_coded": 1})
    itype = np.int8 if len(distinct) <= 2**7 else np.int16 if len(distinct) <= 2**15 else np.int32
    _write_column(sub, "codes", codes.astype(itype), itype, dim)
    _write_column(sub, "values", distinct, str, "value")


def _column_array(arr, where: str, root: Path | None, layouts: dict | None = None):
    """The decoded values of one stored column array `arr` (at `where`); with `root`, a missing or damaged chunk is a
    coded error, never fill values. `layouts` gets its `_array_meta` (the fingerprint's, without opening it again)."""
    if layouts is not None:
        layouts[where] = _array_meta(arr)
    if root is not None and arr.shape[0] and not Path(root, arr.path, arr.metadata.encode_chunk_key((0,))).exists():
        raise StackError("missing-chunk", f"{arr.path}: chunk {arr.metadata.encode_chunk_key((0,))} is missing; "
                         "zarr would read it as fill values")
    try:
        return np.asarray(arr[:])
    except Exception as e:  # noqa: BLE001 - zarr raises codec-specific errors for corrupt bytes
        raise_if_exhausted(e)
        raise StackError("corrupt-chunk", f"{arr.path}: its chunk cannot be decoded ({type(e).__name__})") from None


def _coded_column(sub, where: str, root: Path | None, layouts: dict | None = None) -> pd.Categorical:
    """A coded text column (`_write_coded`; the group `sub`, at `where`) as a pandas Categorical, its codes and
    values checked: integer codes, each naming one of the distinct, text values."""
    members = dict(sub.members())
    if sub.attrs.get("gpucnr_coded") != 1 or sorted(members) != ["codes", "values"] or \
            not all(isinstance(v, zarr.Array) for v in members.values()):
        raise StackError("stack-schema", f"{sub.path} is neither a column array nor a coded column (codes, values)")
    parts: dict = {}
    codes = _column_array(members["codes"], "codes", root, parts)
    values = _column_array(members["values"], "values", root, parts)
    if layouts is not None:
        layouts[where] = b"coded" + parts["codes"] + parts["values"]
    if codes.ndim != 1 or values.ndim != 1 or codes.dtype.kind not in "iu" or values.dtype.kind not in "OUT":
        raise StackError("stack-schema", f"{sub.path}: codes {codes.dtype} {codes.shape}, values {values.dtype} "
                         f"{values.shape}; 1-D integer codes of 1-D text values expected")
    if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= len(values)):
        bad = np.flatnonzero((codes < 0) | (codes >= len(values)))[0]
        raise StackError("stack-schema", f"{sub.path}/codes: row {bad} holds code {codes[bad]}, not one of the "
                         f"{len(values)} values")
    distinct = pd.Index(values.astype(object), dtype=object)
    if not distinct.is_unique:
        raise StackError("stack-schema", f"{sub.path}/values holds a value twice")
    return pd.Categorical.from_codes(codes.astype(np.int32, copy=False), dtype=pd.CategoricalDtype(distinct))


def _read_table(group, name: str, root: Path | None = None, layouts: dict | None = None) -> pd.DataFrame | None:
    """A table's columns; with `root`, a missing or damaged column chunk is a coded error, never zeros. A coded
    text column (`_write_coded`) is a pandas Categorical of the same values."""
    if f"tables/{name}" not in group:
        return None
    # NB: one listing that opens each column once (array_keys, group_keys and opening each by name again cost ~1 ms
    # a column of every run's start), the columns then read by threads (each zarr call waits on zarr's event loop);
    # an error is raised for the first failing column, as one by one
    members = dict(group[f"tables/{name}"].members())
    keys = sorted(members)
    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(lambda key: (_coded_column if isinstance(members[key], zarr.Group) else _column_array)(
            members[key], f"tables/{name}/{key}", root, layouts), keys))
    return table_frame(dict(zip(keys, values, strict=True)), f"tables/{name}")


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
    if not os.path.lexists(path):
        raise StackError("stack-schema", f"{path} does not exist (a stack is made by `gpucnr ingest SRC_DIR "
                         f"{path.name}` or gpucnr.write_stack)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - anything zarr raises here means not a readable stack
        raise_if_exhausted(e)  # NB: out of memory or threads is the machine's failure, not the stack's
        if path.is_dir() and not (path / "zarr.json").exists():
            # NB: the first thing a new user tries: `gpucnr run` on the folder of images itself
            raise StackError("stack-schema", f"{path} is a folder, not a gpucnr stack; a folder of images is "
                             f"ingested first: `gpucnr ingest {path} STACK.zarr`, then `gpucnr run STACK.zarr "
                             "RESULTS.zarr`") from None
        raise StackError("stack-schema", f"{path} is not a readable Zarr group ({type(e).__name__})") from None
    attrs = dict(group.attrs)
    if attrs.get("gpucnr_stack") not in READABLE_STACK_FORMATS:
        unfinished = unfinished_stack(path)
        if unfinished:
            raise StackError("stack-incomplete", f"{path}: {unfinished}")
        if "gpucnr_results" in attrs:
            raise StackError("stack-schema", f"{path} are gpucnr results, not a stack: `gpucnr run STACK.zarr "
                             f"RESULTS.zarr` measures a stack; results are read by `gpucnr report|filter|info {path}`")
        raise StackError("stack-schema", f"{path} is not a gpucnr stack (format {attrs.get('gpucnr_stack')!r})")
    check_attrs(attrs)
    layouts: dict = {}  # NB: each table column's layout, for the fingerprint
    images = _read_table(group, "images", path, layouts)
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
    rois = _read_table(group, "rois", path, layouts)
    stack = Stack(path=path, group=group, buckets=buckets, images=images, rois=rois,
                  roi_ids=np.asarray(attrs.get("roi_ids", []), np.int64), shard=int(attrs["shard"]),
                  # NB: a stack that records no compressor predates the choice: blosc-zstd, never today's default
                  compressor=attrs.get("compressor", "blosc-zstd"))
    # NB: before any kernel sees it; the ROI table as checked is kept (a run would normalise it again: 0.5 s a
    # million rows)
    stack.__dict__["_layouts"] = layouts
    stack.__dict__["_rois_normalized"] = check_tables(attrs, images, stack.rois, {b.name: b.images for b in buckets})
    if check:
        _check_complete(group, stack)
    return stack


def journal_path(stack) -> Path:
    """The journal of an ingest in progress, beside its stack (it names source files: an operator's file)."""
    stack = Path(stack)
    return stack.with_name(f"{stack.name}.journal")


def spool_path(stack) -> Path:
    """The folder beside a stack into which an ingest's workers write its shards' chunks (`shardfiles.spool`) before
    `StackWriter` renames them into place; it exists only while an ingest runs."""
    stack = Path(stack)
    return stack.with_name(f"{stack.name}.spool")


def unfinished_stack(path) -> str | None:
    """What a Zarr group that a writer left unfinished is, and what to do with it; None for anything else (a
    finished stack, results, a group that is not gpucnr's, no group at all)."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception:  # noqa: BLE001 - not a Zarr group
        return None
    if "gpucnr_results" in attrs:
        return None
    journal = journal_path(path)
    # NB: the journal is removed last: beside it, even a group with a stack's attributes is an ingest that stopped
    # while closing (its linkage file may be missing)
    if journal.is_file():
        try:
            with open(journal, encoding="utf-8") as fh:
                command = json.loads(fh.readline())["command"]
        except (OSError, ValueError, KeyError, TypeError):
            command = f"gpucnr ingest SRC_DIR {path} ... --resume (with the options it started with)"
        spool = spool_path(path)
        return (f"an interrupted ingest, not a stack yet: continue it with `{command}`, or delete {path.name} "
                f"and {journal.name}" + (f" (and {spool.name}, its workers' spool folder)" if spool.exists() else ""))
    if "gpucnr_stack" in attrs:
        return None
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
        written = stack.written(b)
        if written.shape[0] != b.size:
            raise StackError("stack-schema", f"buckets/{b.name}/written has {written.shape[0]} entries for "
                             f"{b.size} images")
        if stack.group.attrs.get("gpucnr_stack") == STACK_FORMAT:
            stack.checksums(b)  # NB: present, readable and one row per image, or a coded error
        if not written.all():
            first = int(np.flatnonzero(written == 0)[0])
            raise StackError("stack-incomplete", f"buckets/{b.name}: images from position {first} were never "
                             f"completely written (manifest buckets/{b.name}/written)")
        for kind, arr in (("images", b.images), ("labels", b.labels)):
            if arr is None:
                continue
            name = f"buckets/{b.name}/{kind}"
            shard = int(arr.shards[0]) if arr.shards else 1
            shards = range(math.ceil(b.size / shard))
            # NB: the shard indexes read by threads (file system calls release the GIL): one at a time, the
            # 240 shards of 262,144 small images cost 0.1 s of every run's start
            with ThreadPoolExecutor(max_workers=8) as pool:
                found = list(pool.map(lambda s, arr=arr, name=name, shard=shard, size=b.size: _shard_state(
                    Path(stack.path, name, arr.metadata.encode_chunk_key((s, 0, 0))), shard,
                    min((s + 1) * shard, size) - s * shard), shards))
            for s, absent in zip(shards, found, strict=True):
                key = arr.metadata.encode_chunk_key((s, 0, 0))
                first, last = s * shard, min((s + 1) * shard, b.size) - 1
                if absent is False:
                    raise StackError("missing-chunk", f"{name}: chunk {key} (images {first}..{last}) is missing; "
                                     "zarr would read it as zeros")
                if absent is None:
                    raise StackError("corrupt-chunk", f"{name}: chunk {key} (images {first}..{last}) is too short "
                                     "to hold its index: truncated")
                if absent:
                    raise StackError("missing-chunk", f"{name}: chunk {key} lacks the image(s) at "
                                     f"{[first + k for k in absent]}; zarr would read them as zeros")


def _shard_state(file: Path, per_shard: int, used: int) -> list[int] | bool | None:
    """`_absent_inner_chunks` of a shard file; False when the file does not exist."""
    if not file.exists():
        return False
    return _absent_inner_chunks(file, per_shard, used)


def _absent_inner_chunks(file: Path, per_shard: int, used: int) -> list[int] | None:
    """Positions (within the shard) of inner chunks its index marks absent, among the first `used`; None
    if the file cannot even hold its index. The index sits at the end: (offset, nbytes) uint64 pairs, then a
    crc32c (which zarr verifies when it reads the shard). An index that fails its crc32c (a file cut short, whose
    last bytes are then compressed pixels) marks nothing absent: its images fail their reads, one by one."""
    size = 16 * per_shard + 4
    with open(file, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < size:
            return None
        fh.seek(-size, os.SEEK_END)
        tail = fh.read(size)
    if not shardfiles.crc_ok(tail):
        return []
    index = np.frombuffer(tail[:-4], "<u8").reshape(per_shard, 2)
    empty = np.iinfo(np.uint64).max
    return [int(k) for k in np.flatnonzero((index[:used, 0] == empty) & (index[:used, 1] == empty))]


def chunk_checksums(folder: Path, array, start: int, stop: int) -> np.ndarray:
    """The crc32c each inner chunk of images [start, stop) carries in its shard files (uint32; 0 where the index
    marks a chunk absent or a file is missing or too short): read from the indexes and the chunks' last four
    bytes, never by decoding pixels."""
    per_shard = int(array.shards[0]) if array.shards else 1
    out = np.zeros(stop - start, np.uint32)
    size = 16 * per_shard + 4
    for s in range(start // per_shard, (stop - 1) // per_shard + 1 if stop > start else 0):
        key = array.metadata.encode_chunk_key((s, 0, 0))
        try:
            with open(Path(folder, key), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() < size:
                    continue
                fh.seek(-size, os.SEEK_END)
                index = np.frombuffer(fh.read(16 * per_shard), "<u8").reshape(per_shard, 2)
                for k in range(max(start, s * per_shard), min(stop, (s + 1) * per_shard)):
                    offset, nbytes = (int(v) for v in index[k - s * per_shard])
                    if offset == np.iinfo(np.uint64).max or nbytes < 4:
                        continue
                    fh.seek(offset + nbytes - 4)
                    out[k - start] = int.from_bytes(fh.read(4), "little")
        except FileNotFoundError:
            continue
    return out


def fingerprint(path) -> str:
    """`Stack.fingerprint` of the stack at `path` (its completeness unchecked)."""
    return open_stack(path, check=False).fingerprint()


#: Group attributes that define a stack's content; others (an ingest's counts) do not enter its fingerprint.
_FINGERPRINT_ATTRS = ("n_images", "buckets", "shard", "compressor", "roi_ids", "has_labels")


def _array_meta(array) -> bytes:
    """An array's layout as it matters to its values: shape, dtype, chunks, codecs, fill value — not how the
    metadata is spelled (dimension names, attributes, key order)."""
    meta = array.metadata.to_dict()
    kept = {k: meta.get(k) for k in ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "codecs",
                                     "fill_value")}
    return json.dumps(kept, sort_keys=True, default=str).encode()


def _table_digest(table: pd.DataFrame) -> bytes:
    """Per column (sorted by name): its length and the crc32c of its values' little-endian bytes; a categorical
    (coded) column by its codes and its distinct values (utf-8, each after its length)."""
    import google_crc32c

    out = [len(table).to_bytes(8, "little")]
    for col in sorted(table.columns):
        values = table[col]
        if isinstance(values.dtype, pd.CategoricalDtype):
            codes = np.ascontiguousarray(values.cat.codes.to_numpy(), "<i8")
            text = b"".join(len(b).to_bytes(8, "little") + b for b in
                            (str(v).encode() for v in values.cat.categories.tolist()))
            parts = [b"coded", codes.tobytes(), text]
        elif values.dtype.kind in "biuf":
            arr = values.to_numpy()
            parts = [arr.dtype.str.encode(), np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()]
        else:  # NB: text not coded (too many distinct values): each value utf-8, after its length
            parts = [b"text", b"".join(len(b).to_bytes(8, "little") + b for b in
                                       (str(v).encode() for v in values.tolist()))]
        for part in parts:
            out.append(int(google_crc32c.value(part)).to_bytes(4, "little") + len(part).to_bytes(8, "little"))
    return b"".join(out)


def fingerprint_v2(stack: Stack) -> tuple[str, dict[str, str]]:
    """(overall SHA-256, {bucket: SHA-256}) of fingerprint version 2 (DESIGN §10).

    A bucket's digest covers its arrays' layout, its written manifest and the crc32c of every image and label
    chunk (as recorded when written; read from the shard files for a format-1 stack). The overall digest adds
    the stack-defining attributes, the tables (content and layout) and every bucket digest.
    """
    group = stack.group
    buckets = {}
    for b in stack.buckets:
        h = hashlib.sha256(f"bucket {b.name}".encode())
        for kind in ("images", "labels", "written"):
            name = f"buckets/{b.name}/{kind}"
            if name in group:
                h.update(name.encode())
                h.update(_array_meta(group[name]))
        h.update(stack.written(b).tobytes())
        crcs = stack.checksums(b)
        if crcs is None:
            crcs = np.zeros((b.size, 2), np.uint32)
            for col, (kind, arr) in enumerate((("images", b.images), ("labels", b.labels))):
                if arr is not None:
                    crcs[:, col] = chunk_checksums(stack.path / f"buckets/{b.name}/{kind}", arr, 0, b.size)
        h.update(np.ascontiguousarray(crcs, "<u4").tobytes())
        buckets[b.name] = h.hexdigest()
    h = hashlib.sha256(f"gpucnr stack fingerprint {FINGERPRINT_VERSION}".encode())
    attrs = dict(group.attrs)
    h.update(json.dumps({k: attrs.get(k) for k in _FINGERPRINT_ATTRS}, sort_keys=True, default=str).encode())
    for name, table in (("images", stack.images), ("rois", stack.rois)):
        if table is None:
            continue
        h.update(name.encode())
        coded = False
        layouts = stack.__dict__.get("_layouts") or {}
        for col in sorted(table.columns):
            h.update(col.encode())
            where = f"tables/{name}/{col}"
            layout = layouts.get(where)
            if layout is None:
                node = group[where]
                # NB: a coded text column (stacks since issue 17): the layout of its codes and values
                layout = (b"coded" + _array_meta(node["codes"]) + _array_meta(node["values"])
                          if isinstance(node, zarr.Group) else _array_meta(node))
            coded = coded or layout.startswith(b"coded")
            h.update(layout)
        if coded:
            # NB: a table with coded columns (written since issue 17) enters by the crc32c of each column's values
            # as read (codes and distinct values for a coded one), as the pixels do by their chunks' crc32c:
            # pandas' row hashes of 10^6 rows cost 0.1 s of every run's start. Older tables as before.
            h.update(_table_digest(table))
        else:
            h.update(pd.util.hash_pandas_object(table[sorted(table.columns)], index=True).to_numpy().tobytes())
    for name in sorted(buckets):
        h.update(f"{name}={buckets[name]}".encode())
    return h.hexdigest(), buckets
