"""The results store (format 2): per (image, roi) measurements on Zarr, sharded and checksummed, written whole
shard by whole shard by the driver, checked on every open, read as xarray (DESIGN §6, §10)."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from gpucnr import chunks, shardfiles
from gpucnr._version import __version__
from gpucnr.errors import GpucnrError, InputError
from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE

__all__ = ["EXTRA_VARIABLES", "RESULTS_FORMAT", "ResultsError", "ResultsWriter", "create_results", "open_results",
           "row_variables", "verify_results"]

RESULTS_FORMAT = 2
#: Formats `open_results` reads; only the current one can be resumed.
READABLE_FORMATS = (1, 2)
_WRITE = {"write_empty_chunks": True}
_INTEGER = {"n_roi": "int64", "n_bg": "int64", "status": "int8", "n_valid": "int64", "n_excluded": "int64"}
#: Per-row variables, in the order a batch writes them.
ROW_VARIABLES = (*OUTPUT_CELL, "roi_name", *OUTPUT_IMAGE)
#: Per-image variables only some runs write (rois="auto": the air moments and the noise source), with their dtype
#: (str: variable-length text); a store lists those it has in its ``extra_variables`` attribute, so results written
#: before them read and resume as they are.
EXTRA_VARIABLES = {"n_air": "int64", "mean_air": "float64", "var_air": "float64", "noise_source": str}
#: Per-batch variables the driver writes after the rows they cover: the backend that computed the batch, then
#: its committed flag (the only truth for --resume).
BATCH_VARIABLES = ("batch_backend", "committed")
BACKEND_CODES = {"numpy": 0, "cupy": 1}
# NB: an inner chunk holds ~2^16 cells (512 KiB of float64) and a shard 32 of them (16 MiB uncompressed per
# variable, DESIGN §10): 10^6 images x 1 ROI id make one shard file per variable.
_CELLS_PER_CHUNK = 2**16
_CHUNKS_PER_SHARD = 32
# Finished batches are rewritten into the shards by one background thread, each turn taking every batch finished
# since the last; a turn starts once the time since the last one ended is _FLUSH_COST_RATIO times its cost (at most
# _FLUSH_MAX_S); past _MAX_PENDING_BYTES of buffered rows the driver waits for the rewrites.
_FLUSH_COST_RATIO = 3.0
_FLUSH_MAX_S = 30.0
_MAX_PENDING_BYTES = 256 * 2**20


class ResultsError(GpucnrError):
    """Results that cannot be opened, are damaged, or cannot be resumed with this input or these parameters."""

    code = "results"

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


# --- layout ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Var:
    """One sharded variable: its folder, dtype, fill, rows per inner chunk and per shard, ROI columns (0: 1-D)."""

    name: str
    folder: Path
    dtype: np.dtype | None  # None: variable-length UTF-8 strings
    fill: object
    n_rows: int
    cols: int  # columns of an inner chunk (1 when the results have no ROI id); 0 for a 1-D variable
    width: int  # columns of the array (ROI ids)
    rows: int
    shard_rows: int
    array: object

    @property
    def n_inner(self) -> int:
        return self.shard_rows // self.rows

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_rows / self.shard_rows)

    def file(self, s: int) -> Path:
        key = (s, 0) if self.cols else (s,)
        return self.folder / self.array.metadata.encode_chunk_key(key)

    def shape(self) -> tuple:
        return (self.rows, self.cols) if self.cols else (self.rows,)

    def filled(self) -> np.ndarray:
        return np.full(self.shape(), self.fill, dtype=object if self.dtype is None else self.dtype)

    def encode(self, block: np.ndarray) -> bytes:
        import numcodecs

        if self.dtype is None:
            raw = numcodecs.VLenUTF8().encode(np.asarray(block, dtype=object))
        else:
            raw = np.ascontiguousarray(block, dtype=self.dtype.newbyteorder("<")).tobytes()
        return shardfiles.with_crc(numcodecs.Zstd(level=3).encode(raw))

    def decode(self, payload) -> np.ndarray:
        """One inner chunk; ValueError for a stream of the wrong size."""
        import numcodecs

        raw = numcodecs.Zstd().decode(bytes(payload))
        if self.dtype is None:
            out = numcodecs.VLenUTF8().decode(raw)
            if out.size != math.prod(self.shape()):
                raise ValueError(f"the chunk holds {out.size} strings, expected {math.prod(self.shape())}")
            return out.reshape(self.shape())
        want = math.prod(self.shape()) * self.dtype.itemsize
        if len(raw) != want:
            raise ValueError(f"the chunk decodes to {len(raw)} bytes, expected {want}")
        return np.frombuffer(raw, self.dtype.newbyteorder("<")).astype(self.dtype).reshape(self.shape())

    def used_inner(self, s: int) -> int:
        """Inner chunks of shard `s` that hold rows of the array (zarr stores no chunk past its end)."""
        return math.ceil(min(self.shard_rows, self.n_rows - s * self.shard_rows) / self.rows)


def _layout(n_rows: int, cols: int) -> tuple[int, int]:
    """(rows per inner chunk, rows per shard): ~2^16 cells a chunk, but never more rows than the array has (zarr
    stores a whole chunk even at the array's end)."""
    rows = max(1, min(_CELLS_PER_CHUNK // max(cols, 1), n_rows))
    return rows, rows * _CHUNKS_PER_SHARD


def _var(group, root: Path, name: str, arr=None) -> _Var:
    """The layout of a format-2 variable, read from its metadata (or `arr`, as just created) and checked to be the
    one gpucnr writes."""
    arr = group[name] if arr is None else arr
    try:
        (sharding,) = arr.metadata.codecs
        inner = [type(c).__name__ for c in sharding.codecs]
        index = [type(c).__name__ for c in sharding.index_codecs]
        ok = (inner[1:] == ["ZstdCodec", "Crc32cCodec"] and index == ["BytesCodec", "Crc32cCodec"]
              and sharding.index_location.value == "end" and arr.chunks[1:] == tuple(max(v, 1) for v in arr.shape[1:])
              and arr.shards[0] % arr.chunks[0] == 0)
    except (AttributeError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise ResultsError("results-schema", f"{root}: {name} is not laid out as gpucnr results (format 2)")
    string = np.dtype(arr.dtype).kind not in "biuf"
    return _Var(name=name, folder=root / name, dtype=None if string else np.dtype(arr.dtype),
                fill="" if string else arr.fill_value, n_rows=int(arr.shape[0]),
                cols=int(arr.chunks[1]) if arr.ndim == 2 else 0, width=int(arr.shape[1]) if arr.ndim == 2 else 0,
                rows=int(arr.chunks[0]),
                shard_rows=int(arr.shards[0]), array=arr)


def _write_shard(var: _Var, s: int, blocks: dict) -> None:
    """Rewrite shard `s` of `var` whole and durably (see `_shard_parts`)."""
    shardfiles.write_durably(var.file(s), _shard_parts(var, s, blocks))


def _shard_parts(var: _Var, s: int, blocks: dict, guard=None) -> list[bytes]:
    """The bytes of shard `s` of `var`: inner chunks in `blocks` (k -> array) encoded anew, every other one copied
    as it is on disk (or filled when it is absent or fails its check, after `guard(var, lo, hi)` allowed it)."""
    old, index = None, None
    if blocks.keys() != set(range(var.used_inner(s))):
        try:
            old = memoryview(var.file(s).read_bytes())
            index = shardfiles.parse_index(old, var.n_inner)
        except FileNotFoundError:
            pass
    chunks = []
    for k in range(var.n_inner):
        if k >= var.used_inner(s):
            chunks.append(None)
        elif k in blocks:
            chunks.append(var.encode(blocks[k]))
        else:
            chunks.append(_old_chunk(var, old, index, k, s, guard))
    return shardfiles.assemble(chunks)


def _prepare_shard(var: _Var, s: int, blocks: dict, guard=None) -> tuple[Path, Path]:
    path = var.file(s)
    return shardfiles.prepare(path, _shard_parts(var, s, blocks, guard)), path


def _chunk_rows(var: _Var, s: int, k: int) -> tuple[int, int]:
    lo = s * var.shard_rows + k * var.rows
    return lo, min(lo + var.rows, var.n_rows)


def _old_chunk(var: _Var, old, index, k: int, s: int = 0, guard=None) -> bytes:
    if index is not None:
        try:
            chunk = shardfiles.checked_chunk(old, index, k)
        except ValueError:
            chunk = None
        if chunk is not None:
            return bytes(chunk)
    # NB: a chunk that is absent or damaged may be filled only where no committed row lies (--resume uncommitted
    # the batches of the damage it found); `guard` refuses otherwise
    if guard is not None:
        guard(var, *_chunk_rows(var, s, k))
    return var.encode(var.filled())


def _read_block(var: _Var, s: int, k: int, cache: dict, guard=None) -> np.ndarray:
    """Inner chunk k of shard s as an array; fill values when it is absent or fails its check (after `guard`)."""
    if s not in cache:
        try:
            data = memoryview(var.file(s).read_bytes())
            cache[s] = (data, shardfiles.parse_index(data, var.n_inner))
        except FileNotFoundError:
            cache[s] = (None, None)
    data, index = cache[s]
    if index is not None:
        try:
            chunk = shardfiles.checked_chunk(data, index, k)
            if chunk is not None:
                block = var.decode(chunk[:-4])
                return block.copy() if not block.flags.writeable else block
        except ValueError:
            pass
    if guard is not None:
        guard(var, *_chunk_rows(var, s, k))
    return var.filled()


# --- creation ----------------------------------------------------------------------------------------------
def row_variables(attrs) -> tuple[str, ...]:
    """The per-row variables of a results store: `ROW_VARIABLES` and the extra ones its attributes list."""
    return (*ROW_VARIABLES, *(str(k) for k in (attrs.get("extra_variables") or ()) if str(k) in EXTRA_VARIABLES))


def create_results(path, *, n_images: int, roi_ids, image_table: pd.DataFrame, batches, attrs: dict,
                   roi_coords: dict | None = None, extra_variables=None):
    """Write the template: every variable sharded and filled with NaN (floats), -1 (integers) or "" (names),
    every shard file present, nothing committed.

    Parameters
    ----------
    path : str or Path
    n_images : int
    roi_ids : int array, shape (L,)
    image_table : pandas.DataFrame
        Per-image columns stored as coordinates along ``image`` (the stack's table, pseudonymous columns only).
    batches : list of (start, stop)
        Global image ranges of the batches; ``committed`` and ``batch_backend`` have one entry per batch.
    attrs : dict
        Parameters and provenance.
    roi_coords : dict of name -> array of shape (L,), optional
        Coordinates along ``roi`` (``roi_source``: where each id came from).
    extra_variables : sequence of str, optional
        Per-image variables of `EXTRA_VARIABLES` this run writes too (recorded in ``extra_variables``).

    Returns
    -------
    zarr.Group
        The results at `path`. They are written in a folder beside it, then renamed into place whole: a run stopped
        while the template is written (a signal, ``kill -9``, a full disk) leaves no folder at `path` that is
        neither new nor gpucnr results, which no command would accept.
    """
    final = Path(path)
    for old in final.parent.glob(f".{final.name}.*{shardfiles.TEMP_SUFFIX}"):
        shutil.rmtree(old, ignore_errors=True)  # NB: what a killed run left while it wrote its template here
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{shardfiles.TEMP_SUFFIX}")
    try:
        _write_template(tmp, n_images=n_images, roi_ids=roi_ids, image_table=image_table, batches=batches,
                        attrs=attrs, roi_coords=roi_coords, extra_variables=extra_variables)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shardfiles.sync_folder(final.parent)
    return zarr.open_group(str(final), mode="r+")


def _write_template(path: Path, *, n_images, roi_ids, image_table, batches, attrs, roi_coords, extra_variables):
    """`create_results`' template, written at `path`."""
    group = zarr.open_group(str(path), mode="w")
    n_ids = len(roi_ids)
    cols = max(n_ids, 1)
    rows, shard_rows = _layout(n_images, cols)
    extra = list(extra_variables or ())
    unknown = [k for k in extra if k not in EXTRA_VARIABLES]
    if unknown:
        raise ValueError(f"not extra results variables: {unknown}")
    arrays = {}  # NB: name -> create_array's arguments
    for name in (*ROW_VARIABLES, *extra):
        two_d = name in (*OUTPUT_CELL, "roi_name")
        if name == "roi_name" or EXTRA_VARIABLES.get(name) is str:
            dtype, fill = str, None
        elif name in EXTRA_VARIABLES:
            dtype = EXTRA_VARIABLES[name]
            fill = -1 if dtype != "float64" else np.nan
        else:
            dtype = _INTEGER.get(name, "float64")
            fill = -1 if dtype != "float64" else np.nan
        r, sr = (rows, shard_rows) if two_d else _layout(n_images, 1)
        arrays[name] = dict(shape=(n_images, n_ids) if two_d else (n_images,), dtype=dtype,
                            chunks=(r, cols) if two_d else (r,), shards=(sr, cols) if two_d else (sr,),
                            fill_value=fill, dimension_names=["image", "roi"] if two_d else ["image"])
    bounds = np.asarray(batches, np.int64).reshape(-1, 2)
    r, sr = _layout(len(bounds), 1)
    for name in BATCH_VARIABLES:
        arrays[name] = dict(shape=(len(bounds),), dtype="int8", chunks=(r,), shards=(sr,),
                            fill_value=0 if name == "committed" else -1, dimension_names=["batch"])
    roi_coords = dict(roi_coords or {})
    coords = [("image", np.arange(n_images, dtype=np.int64), "image"), ("roi", np.asarray(roi_ids, np.int64), "roi"),
              *((col, image_table[col].to_numpy(), "image") for col in image_table.columns if col != "index"),
              *((col, values, "roi") for col, values in roi_coords.items()),
              ("batch_start", bounds[:, 0], "batch"), ("batch_stop", bounds[:, 1], "batch")]
    # NB: the ~40 arrays created by threads: each zarr call waits on zarr's event loop and its file writes (~3 ms),
    # ~0.1 s of every run's start one at a time (issue 17). Each writes only its own folder.
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="gpucnr-template") as pool:
        made = pool.map(lambda item: group.create_array(item[0], **item[1], config=_WRITE, compressors=[
            ZstdCodec(level=3), Crc32cCodec()]), arrays.items())
        written = pool.map(lambda c: _coord(group, *c, path), coords)
        created = dict(zip(arrays, made, strict=True))
        list(written)
    # NB: in one metadata write: `attrs.update` writes zarr.json once per key (30 writes, ~20 ms of a run's start)
    group.update_attributes({"gpucnr_results": RESULTS_FORMAT, "gpucnr_version": __version__, **attrs,
                             **({"extra_variables": extra} if extra else {}),
                             "batch_backend_codes": BACKEND_CODES,
                             "coordinates": " ".join([*(c for c in image_table.columns if c != "index"),
                                                      *roi_coords])})
    # NB: every shard file exists from the start, so a missing one is damage, never "not computed yet".
    files = []
    for name in (*ROW_VARIABLES, *extra, *BATCH_VARIABLES):
        var = _var(group, path, name, created[name])
        filled = var.encode(var.filled())  # NB: every filled inner chunk encodes to the same bytes
        files += [(var.file(s), shardfiles.assemble([filled if k < var.used_inner(s) else None
                                                     for k in range(var.n_inner)]))
                  for s in range(var.n_shards)]
    # NB: written and fsynced in parallel (the disk commits concurrent fsyncs together: one at a time cost
    # 0.3 s of a run's start), each renamed into place, then the folders fsynced: as durable as one by one
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="gpucnr-template") as pool:
        prepared = list(pool.map(lambda f: (shardfiles.prepare(*f), f[0]), files))
        for tmp, file in prepared:
            shardfiles.publish(tmp, file)
        list(pool.map(shardfiles.sync_folder, sorted({file.parent for _, file in prepared})))


def _coord(group, name, values, dim, root: Path | None = None):
    """A coordinate: one chunk, zstd then crc32c (a damaged coordinate must not read as data). With `root` (the
    group's folder), its chunk is encoded here, to the bytes zarr's codecs write (`chunks.array_chunk`)."""
    values = np.asarray(values)
    if values.dtype.kind in "OUST":
        text = values.dtype.kind == "U" or (values.dtype.kind == "O" and pd.api.types.infer_dtype(
            values, skipna=False) == "string")
        # NB: as NumPy StringDType, not fixed-width str: zarr encodes it in half the time, to the same bytes
        dtype, values = str, values if text and root is not None else values.astype(np.dtypes.StringDType())
    else:
        text, dtype = False, values.dtype
    arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=(max(len(values), 1),),
                             compressors=[ZstdCodec(level=3), Crc32cCodec()], dimension_names=[dim],
                             config=_WRITE)
    if not values.size:
        return
    if root is not None and (text or dtype.kind in "biuf"):
        # NB: zarr's own encoding cost ~50 ms per coordinate of 244,000 strings, 10 ms of numbers: a run's start
        file = Path(root, name, arr.metadata.encode_chunk_key((0,)))
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(chunks.array_chunk(values, dtype))  # NB: as zarr wrote it, not fsynced (as before)
    else:
        arr[:] = values


def _coordinate_check(root: Path, name: str) -> bool:
    """Whether coordinate `name` is laid out as `_coord` writes it and its chunk reads back: present, its crc32c
    right, decoding to its shape. Raises (any exception) where zarr's read would; False when the layout is another
    one (the caller reads it through zarr)."""
    import numcodecs

    meta = json.loads(Path(root, name, "zarr.json").read_bytes())
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    shape = meta.get("shape")
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    keys = meta.get("chunk_key_encoding", {})
    string = meta.get("data_type") == "string"
    try:
        itemsize = 0 if string else np.dtype(meta["data_type"]).itemsize
        number = string or np.dtype(meta["data_type"]).kind in "biuf"
    except (KeyError, TypeError, ValueError):
        return False
    if (not number or meta.get("node_type") != "array" or not isinstance(shape, list) or len(shape) != 1
            or grid != [max(shape[0], 1)]
            or keys.get("name") != "default" or keys.get("configuration", {}).get("separator") != "/"
            or codecs != ["vlen-utf8" if string else "bytes", "zstd", "crc32c"]
            or meta["codecs"][1].get("configuration", {}).get("checksum")
            or (not string and meta["codecs"][0].get("configuration", {}).get("endian", "little") != "little")):
        return False
    if not shape[0]:
        return True
    data = Path(root, name, "c", "0").read_bytes()
    if not shardfiles.crc_ok(data):
        raise ValueError("its chunk fails its crc32c check")
    raw = numcodecs.Zstd().decode(data[:-4])
    n = len(numcodecs.VLenUTF8().decode(raw)) if string else len(raw) // itemsize
    if n != shape[0] or (not string and len(raw) % itemsize):
        raise ValueError(f"its chunk decodes to {n} values, not {shape[0]}")
    return True


# --- writing -----------------------------------------------------------------------------------------------
class ResultsWriter:
    """The driver's writer: buffers finished batches, rewrites the shards that hold them whole (temporary file,
    fsync, rename) in one background thread, and only then writes their ``batch_backend`` and ``committed``
    entries the same way. A crash loses only batches not yet committed.

    Parameters
    ----------
    path : Path
        Format-2 results (`create_results`).
    committed : int8 array, shape (n_batches,)
        The flags as they stand (a resume passes those it verified).
    on_commit : callable, optional
        Called (in the writer's thread) with the batch indices each flush committed, in order.
    """

    def __init__(self, path, *, committed: np.ndarray, backends: np.ndarray | None = None, on_commit=None):
        self.path = Path(path)
        group = zarr.open_group(str(self.path), mode="r")
        self.rows = row_variables(group.attrs)
        self.vars = {name: _var(group, self.path, name) for name in (*self.rows, *BATCH_VARIABLES)}
        self.committed = np.asarray(committed, np.int8).copy()
        self.starts = np.asarray(group["batch_start"][:], np.int64)
        self.stops = np.asarray(group["batch_stop"][:], np.int64)
        self.backends = (np.full(self.committed.shape, -1, np.int8) if backends is None
                         else np.asarray(backends, np.int8).copy())
        self.on_commit = on_commit
        self._pending: list = []
        self._pending_bytes = 0
        self.peak_bytes = 0
        self._thread: threading.Thread | None = None
        self._running = False
        self._closing = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._last_end = time.monotonic()
        self._last_cost = 0.0
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gpucnr-results")

    def put(self, batch: int, start: int, stop: int, rows: dict, backend: str) -> None:
        """Buffer the rows [start, stop) of one finished batch (every name of `row_variables`)."""
        self._raise()
        item = (batch, start, stop, {k: np.asarray(rows[k]) for k in self.rows}, BACKEND_CODES.get(backend, -1))
        with self._lock:
            self._pending.append(item)
            self._pending_bytes += sum(v.nbytes for v in item[3].values())
            self.peak_bytes = max(self.peak_bytes, self._pending_bytes)
            if not self._running:
                self._spawn()
            full = self._pending_bytes > _MAX_PENDING_BYTES
        if full:
            # NB: the rewrites fall behind the batches: wait for them rather than buffer more rows
            self._wake.set()
            self._join()
            self._raise()

    def close(self) -> None:
        """Write everything buffered and wait for it; raises the first write error."""
        try:
            self._closing = True
            self._wake.set()
            self._join()
            if self._pending and self._error is None:
                with self._lock:
                    self._spawn()
                self._join()
        finally:
            self._pool.shutdown(wait=True)
        self._raise()

    def _spawn(self) -> None:
        # NB: under self._lock, with no rewrite thread running
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="gpucnr-results-flush", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # The one rewrite thread: it runs while batches are pending, each turn taking every batch finished so far.
        # A turn starts once the time since the last one ended is _FLUSH_COST_RATIO times what that one cost (at
        # once when buffered rows pass _MAX_PENDING_BYTES, or when closing), so rewrites take at most about a
        # quarter of the run whatever the disk: per batch, small results cost ~10 ms of CPU and ~20 ms of fsyncs
        # to rewrite, which starved the workers of a 2-core machine when done in the driver's thread (0.57x of
        # the bare read at 512x512, issue 17). `put` and the exit test below hold the same lock: a batch put while
        # a turn runs is taken by the next one, never stranded.
        while True:
            with self._lock:
                if not self._pending or self._error is not None:
                    self._running = False
                    return
            wait = min(_FLUSH_COST_RATIO * self._last_cost, _FLUSH_MAX_S) - (time.monotonic() - self._last_end)
            if wait > 0 and not self._closing:
                self._wake.wait(wait)
            with self._lock:
                items, self._pending, self._pending_bytes = self._pending, [], 0
                if not self._closing:
                    self._wake.clear()
            self._flush_guarded(items)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _flush_guarded(self, items) -> None:
        begin = time.monotonic()
        try:
            self._flush(items)
        except OSError as e:
            # NB: a full disk (or a quota): the batches committed so far stay readable and --resume redoes the
            # rest; say so instead of ending in a bare EFBIG/ENOSPC traceback.
            error = write_error(self.path, e)
            error.__cause__ = e
            self._error = error
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread by _raise
            self._error = e
        self._last_end = time.monotonic()
        # NB: smoothed, so that one slow fsync does not hold the next rewrites back for long
        self._last_cost = 0.7 * self._last_cost + 0.3 * (self._last_end - begin)

    def _flush(self, items) -> None:
        # Rows first: every shard that holds them written to a temporary file and fsynced (in parallel: the disk
        # commits concurrent fsyncs together), renamed into place, folders fsynced; then the same for the batches'
        # backend and committed entries. A crash at any point loses only batches whose flags are not yet renamed.
        batches = [it[0] for it in items]
        guard = self._guard(batches)
        jobs = [(var, s, blocks, guard) for var in (self.vars[n] for n in self.rows)
                for s, blocks in self._blocks(var, items, guard).items()]
        for batch, *_, code in items:
            self.backends[batch] = code
        self._publish(jobs)
        self._publish(self._batch_jobs("batch_backend", self.backends, batches))
        self.committed[batches] = 1
        self._publish(self._batch_jobs("committed", self.committed, batches))
        if self.on_commit is not None:
            self.on_commit(sorted(batches))

    def _publish(self, jobs) -> None:
        prepared = list(self._pool.map(lambda job: _prepare_shard(*job), jobs))
        for tmp, path in prepared:
            shardfiles.publish(tmp, path)
        list(self._pool.map(shardfiles.sync_folder, sorted({path.parent for _, path in prepared})))

    def _guard(self, batches):
        """A check for chunks found absent or damaged while writing: filling one is refused when it holds rows of
        a committed batch other than `batches` (damage that appeared after the run, or its resume, checked)."""

        def guard(var: _Var, lo: int, hi: int) -> None:
            keep = self.committed.astype(bool)
            keep[batches] = False
            # NB: batches cover the images in order, contiguously: one flag per batch repeated over its rows
            rows = np.repeat(keep, self.stops - self.starts)
            if rows[lo:hi].any():
                raise ResultsError("results-damaged", f"the results {self.path}: {var.name} rows {lo}..{hi - 1} of "
                                   "committed batches were found damaged while rows beside them were written; "
                                   "nothing was written over them: the same run with --resume recomputes them")

        return guard

    def _blocks(self, var: _Var, items, guard=None) -> dict:
        """{shard: {inner chunk: block}} of the chunks these rows touch, read-modify-written in memory."""
        shards: dict = {}
        cache: dict = {}
        for _, start, stop, rows, _ in items:
            values = rows[var.name]
            row = start
            while row < stop:
                s, within = divmod(row, var.shard_rows)
                k = within // var.rows
                chunk_lo = s * var.shard_rows + k * var.rows
                hi = min(stop, chunk_lo + var.rows)
                blocks = shards.setdefault(s, {})
                if k not in blocks:
                    blocks[k] = _read_block(var, s, k, cache, guard)
                part = values[row - start : hi - start]
                if var.cols:
                    blocks[k][row - chunk_lo : hi - chunk_lo, : var.width] = part
                else:
                    blocks[k][row - chunk_lo : hi - chunk_lo] = part
                row = hi
        return shards

    def _batch_jobs(self, name: str, values: np.ndarray, batches) -> list:
        var = self.vars[name]
        return [(var, s, _whole_shard(var, values, s)) for s in sorted({b // var.shard_rows for b in batches})]


def write_error(path, e: OSError) -> ResultsError:
    """The coded error of a results write that failed (a full disk, a quota): what was committed stays readable
    and --resume redoes the rest; said so instead of a bare EFBIG/ENOSPC traceback."""
    return ResultsError("results-write", f"could not write to {path}: {e.strerror or e}; committed batches are "
                        "intact, rerun with --resume when there is room")


def uncommit(path, committed: np.ndarray, batches) -> None:
    """Write `committed` (int8 flags, those of `batches` cleared) durably, before any of their rows is rewritten."""
    var = _var(zarr.open_group(str(path), mode="r"), Path(path), "committed")
    for s in sorted({int(b) // var.shard_rows for b in batches}):
        _write_shard(var, s, _whole_shard(var, np.asarray(committed, np.int8), s))


def _whole_shard(var: _Var, values: np.ndarray, s: int) -> dict:
    """Every inner chunk of shard `s` of a per-batch variable, from the whole array `values` held in memory."""
    blocks = {}
    for k in range(var.used_inner(s)):
        lo = s * var.shard_rows + k * var.rows
        block = var.filled()
        part = values[lo : lo + var.rows]
        block[: len(part)] = part
        blocks[k] = block
    return blocks


# --- checking and reading ----------------------------------------------------------------------------------
def verify_results(path, *, decode: bool = False) -> dict:
    """Check format-2 results without believing them: every shard file present, every index and every inner
    chunk's crc32c, the committed flags, and no committed row left unset. With `decode`, every chunk is also
    decoded (a checksum-valid stream of the wrong size is damage) and committed rows are checked for
    consistency (status codes known, ok cells finite, ``n_valid`` = ok cells, ``cnr_median`` finite iff
    ``n_valid`` > 0).

    Returns
    -------
    dict
        ``committed`` (int8 flags as read; a batch in a damaged flag chunk reads 0), ``backends``,
        ``damaged`` (list of {"array", "batches", "reason"}: ``batches`` is None when the damage cannot be tied to
        batches, as for a coordinate) and ``damaged_batches`` (sorted batch indices).
    """
    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    damaged = []
    coordinates = str(group.attrs.get("coordinates", "")).split()
    row_names = row_variables(group.attrs)
    # NB: the arrays the results must have, found by name (a deleted zarr.json hides an array from a listing)
    for name in sorted({*_listed(group), "image", "roi", "batch_start", "batch_stop", *coordinates}):
        if name in row_names or name in BATCH_VARIABLES:
            continue
        try:
            # NB: checked directly where it is laid out as gpucnr writes it: zarr's read of each coordinate (its
            # metadata, its event loop, its decoding to NumPy strings) cost 0.2 s of every run's end
            if not _coordinate_check(path, name):
                np.asarray(group[name][:])
        except Exception as e:  # noqa: BLE001 - zarr raises codec-specific errors for damaged bytes
            damaged.append({"array": name, "batches": None, "reason": f"cannot be read ({type(e).__name__})"})
    for name in (*row_names, *BATCH_VARIABLES):
        try:
            group[name]
        except Exception as e:  # noqa: BLE001 - a missing or unreadable zarr.json: KeyError, JSONDecodeError
            damaged.append({"array": name, "batches": None,
                            "reason": f"its metadata (zarr.json) is missing or unreadable ({type(e).__name__})"})
    if any(d["batches"] is None and d["array"] in (*row_names, *BATCH_VARIABLES, "batch_start", "batch_stop")
           for d in damaged):
        # NB: without an array's layout, or the batch table, nothing can be tied to batches or checked further
        return {"committed": None, "backends": None, "damaged": damaged, "damaged_batches": []}
    try:
        starts = np.asarray(group["batch_start"][:], np.int64)
        stops = np.asarray(group["batch_stop"][:], np.int64)
    except Exception:  # noqa: BLE001 - already listed above
        raise ResultsError("results-damaged", f"{path}: the batch table cannot be read; rerun") from None
    n_batches = len(starts)

    def batches_of(lo: int, hi: int) -> list[int]:
        return [int(b) for b in np.flatnonzero((starts < hi) & (stops > lo))]

    flags = {}
    for name in BATCH_VARIABLES:
        var = _var(group, path, name)
        values, bad = _scan(var, decode=True)
        for lo, hi, reason in bad:
            damaged.append({"array": name, "batches": list(range(lo, min(hi, n_batches))), "reason": reason})
            values[lo:hi] = 0 if name == "committed" else -1
        flags[name] = values.astype(np.int8)
    committed = flags["committed"]
    status = None
    for name in row_names:
        var = _var(group, path, name)
        values, bad = _scan(var, decode=decode or name == "status")
        for lo, hi, reason in bad:
            damaged.append({"array": name, "batches": batches_of(lo, hi), "reason": reason})
        if name == "status":
            status = values
        if decode and name in ("cnr", "n_valid", "cnr_median"):
            flags[name] = values
    rows = np.zeros(len(status), bool)
    for b in np.flatnonzero(committed):
        rows[starts[b] : stops[b]] = True
    unset = rows & (status.reshape(len(status), -1) < 0).any(axis=1)
    for b in sorted({int(np.searchsorted(stops, i, side="right")) for i in np.flatnonzero(unset)}):
        damaged.append({"array": "status", "batches": [b], "reason": "a committed batch has cells never computed"})
    if decode:
        # NB: rows of batches already found damaged are not judged again: their values read as fill
        for b in {b for d in damaged for b in (d["batches"] or [])}:
            rows[starts[b] : stops[b]] = False
        damaged += _inconsistent(status, flags, rows, starts, stops)
    bad_batches = sorted({b for d in damaged for b in (d["batches"] or [])})
    return {"committed": committed, "backends": flags["batch_backend"], "damaged": damaged,
            "damaged_batches": bad_batches}


def _listed(group) -> list[str]:
    try:
        return list(group.array_keys())
    except Exception:  # noqa: BLE001 - an unreadable member's metadata: checked by name above
        return []


def _scan(var: _Var, *, decode: bool):
    """(values or None, [(row_lo, row_hi, reason)]) of every shard and inner chunk of `var`."""
    values = None
    if decode:
        values = np.full((var.n_rows, var.width) if var.cols else (var.n_rows,), var.fill,
                         dtype=object if var.dtype is None else var.dtype)
    bad = []
    for s in range(var.n_shards):
        base = s * var.shard_rows
        end = min(base + var.shard_rows, var.n_rows)
        try:
            data = memoryview(var.file(s).read_bytes())
        except FileNotFoundError:
            bad.append((base, end, f"shard file {var.file(s).name} of rows {base}..{end - 1} is missing"))
            continue
        index = shardfiles.parse_index(data, var.n_inner)
        if index is None:
            bad.append((base, end, f"the index of rows {base}..{end - 1} is damaged or truncated"))
            continue
        for k in range(var.used_inner(s)):
            lo = base + k * var.rows
            hi = min(lo + var.rows, var.n_rows)
            try:
                chunk = shardfiles.checked_chunk(data, index, k)
                if chunk is None:
                    raise ValueError("the chunk is missing from its shard")
                if decode:
                    block = var.decode(chunk[:-4])[: hi - lo]
                    values[lo:hi] = block[:, : var.width] if var.cols else block
            except ValueError as e:
                bad.append((lo, hi, f"rows {lo}..{hi - 1}: {e}"))
    return values, bad


def _inconsistent(status, flags, rows, starts, stops) -> list[dict]:
    """Committed rows whose values contradict each other (each check cheap, each a sign of tampering)."""
    from gpucnr.kernels.cnr import STATUS

    cnr, n_valid, median = flags["cnr"], flags["n_valid"], flags["cnr_median"]
    st = status.reshape(len(status), -1)
    ok = st == STATUS["ok"]
    bad = ~np.isin(st, list(STATUS.values())).all(axis=1)
    bad |= (ok & np.isnan(cnr.reshape(st.shape))).any(axis=1)
    bad |= n_valid != ok.sum(axis=1)
    bad |= np.isnan(median) != (n_valid == 0)
    images = np.flatnonzero(bad & rows)
    by_batch: dict[int, list[int]] = {}
    for i in images:
        by_batch.setdefault(int(np.searchsorted(stops, i, side="right")), []).append(int(i))
    return [{"array": "status/cnr/n_valid/cnr_median", "batches": [b],
             "reason": f"{len(ims)} image(s) whose values contradict each other (first: image {ims[0]})"}
            for b, ims in sorted(by_batch.items())]


def damage_where(d: dict) -> str:
    """Where one damage lies: "whole array", "batch 3", "batches 0..5"."""
    if d["batches"] is None:
        return "whole array"
    if len(d["batches"]) == 1:
        return f"batch {d['batches'][0]}"
    return f"batches {d['batches'][0]}..{d['batches'][-1]}"


def damage_text(path, damaged: list[dict], *, limit: int = 5) -> str:
    """One line naming the damaged arrays and batches."""
    parts = [f"{d['array']} ({damage_where(d)}): {d['reason']}" for d in damaged[:limit]]
    more = f" (+{len(damaged) - limit} more)" if len(damaged) > limit else ""
    return f"the results {path} are damaged: " + "; ".join(parts) + more


def repair_hint(path, damaged: list[dict], attrs) -> str:
    """What to do: the exact `--resume` command when batches can be recomputed, else a new run."""
    if any(d["batches"] is None for d in damaged):
        return "this cannot be recomputed by batch: rerun into a new results folder"
    return f"`{resume_command(dict(attrs), path)}` recomputes the damaged batches"


def results_format(path) -> int | None:
    """The results format recorded at `path`, or None if it is not gpucnr results."""
    try:
        attrs = zarr.open_group(str(path), mode="r").attrs
    except Exception:  # noqa: BLE001 - anything zarr raises here means not readable results
        return None
    value = attrs.get("gpucnr_results")
    return value if value in READABLE_FORMATS else None


def open_results(path, *, dask: bool = True) -> xr.Dataset:
    """Open results as an xarray.Dataset (lazy; Dask-backed unless ``dask=False``), after checking them.

    Every shard index and every chunk's crc32c is checked here, eagerly, before anything is read (format 2),
    and committed batches must hold computed rows: a damaged store raises ``results-damaged`` naming the array
    and the batch, instead of a codec error deep inside a later Dask compute. Unwritten rows read as NaN
    (floats) and -1 (integers); ``committed`` says which batches are complete. Format-1 results (unchecksummed)
    are read as they are.

    Parameters
    ----------
    path : str or Path
    dask : bool
        False: each variable is read lazily, but whole, the first time it is used (xarray's lazily indexed arrays,
        no Dask): for a command that reads a few small arrays, as ``gpucnr run``'s summary does, importing Dask and
        building a graph per variable cost more (~0.3 s) than the reads.

    Raises
    ------
    ResultsError
        ``results-schema`` (not gpucnr results), ``results-damaged``.
    """
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - anything zarr raises here means not readable results
        raise ResultsError("results-schema", f"{path} is not a readable Zarr group ({type(e).__name__})") from None
    fmt = group.attrs.get("gpucnr_results")
    if fmt not in READABLE_FORMATS:
        if "gpucnr_stack" in group.attrs:
            raise ResultsError("results-schema", f"{path} is a gpucnr stack (images), not results: measure it with "
                               f"`gpucnr run {path} RESULTS.zarr`, then give RESULTS.zarr to this command")
        raise ResultsError("results-schema", f"{path} are not gpucnr results")
    if fmt == RESULTS_FORMAT:
        report = verify_results(path)
        if report["damaged"]:
            raise ResultsError("results-damaged", damage_text(path, report["damaged"]) + "; "
                               + repair_hint(path, report["damaged"], group.attrs))
    try:
        ds = xr.open_zarr(str(path), consolidated=False, mask_and_scale=False, **({} if dask else {"chunks": None}))
    except Exception as e:  # noqa: BLE001 - format 1 has no check of its own: any unreadable member is damage
        raise ResultsError("results-damaged", f"the results {path} cannot be read ({type(e).__name__}); rerun into "
                           "a new results folder") from None
    coords = [c for c in str(ds.attrs.get("coordinates", "")).split() if c in ds]
    extra = [c for c in ("batch_start", "batch_stop", "batch_backend") if c in ds]
    return ds.set_coords([*coords, *extra])


def results_stack(ds: xr.Dataset, results_path, stack=None):
    """The stack the results were computed from: `stack` (a path or an opened `Stack`), else the results'
    ``stack_path`` attribute relative to their folder; its fingerprint must be the one the results record.

    Raises
    ------
    InputError
        No stack given and none recorded, or a stack that is not the results' (another fingerprint).
    """
    from gpucnr.store import Stack, open_stack

    if stack is None:
        if results_path is None or "stack_path" not in ds.attrs:
            raise InputError("cannot locate the stack of these results: give it with --stack STACK.zarr (stack= in "
                             "Python)")
        stack = Path(results_path).resolve().parent / str(ds.attrs["stack_path"])
        if not os.path.lexists(stack):
            # NB: results copied or moved away from their stack: say how to point at it
            raise InputError(f"the stack these results were computed from is not where they record it ({stack}): "
                             "give it with --stack STACK.zarr (stack= in Python)")
    stack = stack if isinstance(stack, Stack) else open_stack(stack)
    expected = ds.attrs.get("stack_fingerprint")
    if expected is not None and stack.fingerprint() != expected:
        raise InputError(f"{stack.path} is not the stack these results were computed from (fingerprint "
                         f"{stack.fingerprint()[:12]} != {str(expected)[:12]})")
    return stack


def stack_relative(stack_path, results_path) -> str:
    """The stack's path (or a --rois table's) relative to the results' folder, so that they can move together."""
    return os.path.relpath(Path(stack_path).resolve(), Path(results_path).resolve().parent)


def require_complete(ds: xr.Dataset, *, allow_incomplete: bool, command: str, results_path=None) -> int:
    """Refuse results that an interrupted run left incomplete, unless `allow_incomplete`; the number of images
    never computed.

    `filter`, `report` and `enhance` call this first: a manifest of incomplete results flags a third of the data
    "not-computed", and a training loader joining on ``keep`` silently loses it. Incomplete means a ``committed``
    flag that is not set (results on disk), else rows never written (``n_valid`` -1, or status -1 cells: a
    Dataset made by hand).

    Raises
    ------
    ResultsError
        ``results-incomplete``, naming what is missing and the ``gpucnr run ... --resume`` that completes it.
    """
    if "committed" in ds.variables and "batch_start" in ds.variables:
        flags = np.asarray(ds["committed"].values) != 0
        starts, stops = np.asarray(ds["batch_start"].values), np.asarray(ds["batch_stop"].values)
        missing = int((stops - starts)[~flags].sum())
        what = f"{int((~flags).sum())} of {flags.size} batches ({missing} of {ds.sizes['image']} images)"
    elif "n_valid" in ds.variables:
        missing = int((np.asarray(ds["n_valid"].values) < 0).sum())
        what = f"{missing} of {ds.sizes['image']} images"
    elif "status" in ds.variables:
        status = np.asarray(ds["status"].values)
        missing = int((status < 0).reshape(status.shape[0], -1).any(axis=1).sum())
        what = f"{missing} of {ds.sizes['image']} images"
    else:
        return 0
    if missing and not allow_incomplete:
        where = "RESULTS" if results_path is None else str(results_path)
        raise ResultsError("results-incomplete", f"{where}: {what} were never computed (an interrupted run). "
                           f"Complete them with `{resume_command(ds.attrs, results_path)}`, or pass "
                           "--allow-incomplete "
                           f"(allow_incomplete=True) to {command} what there is, the missing images flagged "
                           "not-computed")
    return missing


def resume_command(attrs, results_path=None) -> str:
    """The `gpucnr run ... --resume` that continues the results whose attributes are `attrs`: the stack (from
    ``stack_path``, relative to the results' folder), the results, and the options a resume must repeat (the
    measurement options that differ from the defaults, the --rois table given, and the batch size)."""
    def beside(relative) -> str:  # NB: a path the results record relative to their folder (`stack_relative`)
        return shlex.quote(os.path.normpath(Path(results_path).parent / str(relative)))

    where = "RESULTS" if results_path is None else shlex.quote(str(results_path))
    stack = "STACK" if results_path is None or "stack_path" not in attrs else beside(attrs["stack_path"])
    table = attrs.get("rois_table")
    rois = ""
    if isinstance(table, str):
        # NB: the --rois table is fingerprinted, not stored: a resume must be given it again. A table given in
        # memory (Python) has no path to name.
        rois = " --rois " + ("ROIS.csv" if not table or results_path is None else beside(table))
    return f"gpucnr run {stack} {where} --resume{rois}{_run_options(attrs)}"


def _run_options(attrs) -> str:
    from gpucnr.kernels.params import Params

    out = ""
    for name, default in Params().as_attrs().items():
        value = attrs.get(name, default)
        if value == default or isinstance(value, np.ndarray):
            continue
        flag = "--" + name.replace("_", "-")
        out += f" {flag}" if value is True else "" if value is False else f" {flag} {value}"
    source = attrs.get("roi_source_option", "auto")
    if attrs.get("roi_source") == "auto":
        out += " --rois auto"  # NB: the automatic regions, and their edge band when it is not the default
        edge = attrs.get("edge", 2)
        out += f" --edge {int(edge)}" if isinstance(edge, int | np.integer) and edge != 2 else ""
    elif source in ("labels", "table", "both"):
        out += f" --roi-source {source}"  # NB: the sources are compared on --resume, as the parameters
    groups = attrs.get("group_columns")
    if isinstance(groups, list | tuple) and groups:
        out += " --group-columns " + shlex.quote(",".join(str(g) for g in groups))  # NB: a plain --resume keeps them
    batch = attrs.get("batch")
    # NB: the batch plan is compared on --resume; the stored size (images, as a number before December 2026, or
    # `format_size`'s spelling) reproduces it, and a resume without --batch takes it from the results anyway
    if isinstance(batch, int | np.integer) and not isinstance(batch, bool):
        return out + f" --batch {int(batch)}"
    return out + (f" --batch {batch}" if isinstance(batch, str) and batch else "")
