"""Shard files in zarr's sharding layout: checksummed chunks, an index with its own checksum, durable rewrites.

The layout (zarr v3 `sharding_indexed`, index at the end): the encoded inner chunks one after another, each ending
in the little-endian crc32c of the rest of it, then the index — one (offset, nbytes) pair of little-endian uint64
per inner chunk in C order, ``EMPTY`` for an absent chunk — and the index's own crc32c. zarr reads these files;
gpucnr writes and checks them directly because zarr's per-chunk machinery costs more than the bytes
(docs/performance.md) and because a damaged chunk must be named, not raised deep inside a Dask compute.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import numpy as np

__all__ = ["EMPTY", "TEMP_SUFFIX", "Spooled", "assemble", "checked_chunk", "crc_ok", "parse_index", "prepare",
           "publish", "read_spooled", "read_whole", "remove_leftovers", "scratch", "spool", "spooled_run",
           "sync_folder", "with_crc", "write_durably"]

EMPTY = np.iinfo(np.uint64).max
#: Suffix of a shard file being written; readers never look at such a file and ``--resume`` removes leftovers.
TEMP_SUFFIX = ".partial"


_SCRATCH = threading.local()


def scratch(name: str, nbytes: int) -> np.ndarray:
    """This thread's byte buffer `name` (uint8), at least `nbytes` long: grown as needed, never shrunk, valid until
    this thread's next call for `name`. A fresh buffer per shard or batch cost a page fault per 4 KiB, and page
    faults here cost 1-65 us each, varying tenfold from one minute to the next (issue 17)."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1), np.uint8)
        setattr(_SCRATCH, name, buf)
    return buf


def read_whole(path) -> memoryview:
    """The bytes of the file at `path`, read into this thread's `scratch` buffer ``"file"``: valid until this
    thread's next call."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        # NB: one byte beyond the size fstat gave, so that a file that grew meanwhile is noticed
        view = memoryview(scratch("file", size + 1))
        got = 0
        while got <= size:
            n = fh.readinto(view[got : size + 1])
            if not n:
                break
            got += n
        if got > size:
            return memoryview(Path(path).read_bytes())  # NB: it grew while read: as it is now, whole
        return view[:got]


def _crc(data) -> int:
    import google_crc32c

    return int(google_crc32c.value(bytes(data)))


def with_crc(payload) -> bytes:
    """`payload` followed by its little-endian crc32c."""
    payload = bytes(payload)
    return payload + _crc(payload).to_bytes(4, "little")


def crc_ok(data) -> bool:
    """True if the last 4 bytes of `data` are the little-endian crc32c of the rest."""
    return len(data) >= 4 and _crc(data[:-4]) == int.from_bytes(bytes(data[-4:]), "little")


def parse_index(data, n_inner: int) -> np.ndarray | None:
    """The (n_inner, 2) index of a shard file's bytes, or None when the file is too short for it or the index
    fails its checksum."""
    size = 16 * n_inner + 4
    if len(data) < size or not crc_ok(data[-size:]):
        return None
    return np.frombuffer(bytes(data[-size:-4]), "<u8").reshape(n_inner, 2)


def checked_chunk(data, index: np.ndarray, k: int):
    """Inner chunk `k` of a shard, its crc32c included, ``None`` if the index marks it absent; raises ValueError
    when it lies outside the file or fails its checksum."""
    offset, nbytes = (int(v) for v in index[k])
    if offset == EMPTY and nbytes == EMPTY:
        return None
    chunk = data[offset : offset + nbytes]
    if nbytes < 4 or len(chunk) != nbytes or not crc_ok(chunk):
        raise ValueError(f"inner chunk {k} fails its crc32c check")
    return chunk


def assemble(chunks: list) -> list[bytes]:
    """The parts of a shard file from its encoded inner chunks (each already ending in its crc32c; None =
    absent): the chunks, then the checksummed index."""
    index = np.full((len(chunks), 2), EMPTY, "<u8")
    offset, parts = 0, []
    for k, chunk in enumerate(chunks):
        if chunk is None:
            continue
        index[k] = (offset, len(chunk))
        offset += len(chunk)
        parts.append(chunk)
    parts.append(with_crc(index.tobytes()))
    return parts


class Spooled:
    """Where an encoded inner chunk lies in a spool file (`spool`): its file, offset, size, crc32c (its last 4
    bytes) and the slot of the shard it was written for. Plain data: it travels from ingest's workers to the
    driver in place of the chunk's bytes; one whose write failed travels as those bytes (``failed``)."""

    __slots__ = ("crc", "failed", "nbytes", "offset", "path", "slot")

    def __init__(self, path: str, offset: int, nbytes: int, crc: int, slot: int):
        self.path, self.offset, self.nbytes, self.crc, self.slot = path, offset, nbytes, crc, slot
        self.failed: bytes | None = None

    def __reduce__(self):
        if self.failed is not None:
            return bytes, (self.failed,)  # NB: sent as the chunk itself, as without a spool (`flush_spool`)
        if self.offset < 0:
            raise RuntimeError("a spooled chunk was sent before it was written (flush_spool)")
        return Spooled, (self.path, self.offset, self.nbytes, self.crc, self.slot)

    def __repr__(self):
        return f"Spooled({self.path!r}, {self.offset}, {self.nbytes}, slot {self.slot})"


#: chunks `spool` holds in this process until `flush_spool` writes them: (where each will lie, its bytes)
_held: list[tuple[Spooled, bytes]] = []
#: the most buffers of one writev (Linux's IOV_MAX)
_IOV_MAX = 1024


def spool(path: str, chunk: bytes, slot: int) -> Spooled:
    """Hold an encoded inner chunk (crc32c last) that `flush_spool` appends to the spool file `path`, created if
    missing; the `Spooled` returned says where it lies once written. The chunks of several images go out in one
    write: into memory the kernel has to find afresh (on this VM 10-30x dearer than memory just freed), one write
    of a shard's ~5 MiB cost ~25 % less per byte than a write (and an open and a close) per ~300 KB chunk
    (issue 18)."""
    ref = Spooled(path, -1, len(chunk), int.from_bytes(chunk[-4:], "little"), slot)
    _held.append((ref, chunk))
    return ref


def held_bytes() -> int:
    """Bytes `spool` holds, not written yet."""
    return sum(ref.nbytes for ref, _ in _held)


def flush_spool() -> None:
    """Append the held chunks to their spool files, in the order held, and set each `Spooled`'s offset. Several
    processes append to one spool file (an ingest's workers fill one shard): O_APPEND places each write, whole, at
    the end whatever the others do, and the file offset after it tells where it went. A chunk that cannot be
    written (the file cannot be opened, a write fails or is cut short; every later chunk of that file too) is sent
    as its bytes, as before spooling (`Spooled.failed`)."""
    by_path: dict[str, list] = {}
    for ref, chunk in _held:
        by_path.setdefault(ref.path, []).append((ref, chunk))
    _held.clear()
    for path, items in by_path.items():
        try:
            # NB: the mode every file of the stack gets (the umask decides); the spool folder is its owner's only
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            fd = None
        try:
            for k in range(0, len(items), _IOV_MAX):
                group = items[k : k + _IOV_MAX]
                total = sum(len(chunk) for _, chunk in group)
                try:
                    if fd is None or os.writev(fd, [chunk for _, chunk in group]) != total:
                        # NB: another process may have appended after the part written: the rest cannot follow it
                        raise OSError("not written whole")
                    offset = os.lseek(fd, 0, os.SEEK_CUR) - total
                except OSError:
                    for ref, chunk in items[k:]:
                        ref.failed = chunk
                    break
                for ref, chunk in group:
                    ref.offset = offset
                    offset += len(chunk)
        finally:
            if fd is not None:
                os.close(fd)


def spooled_run(refs: list, n_inner: int) -> str | None:
    """The spool file that holds exactly `refs` (a whole shard's inner chunks, in slot order 0..n_inner-1) and
    nothing else, which then becomes that shard by appending its index and a rename; None when it does not (a chunk
    of another file or slot, a gap, more bytes: a worker that died mid-write, a plan an earlier file did not
    follow). The chunks may lie in the file in any order (two workers append to it as their files finish): the
    index says where each is, and readers go by it."""
    if len(refs) != n_inner or not all(isinstance(r, Spooled) for r in refs):
        return None
    path = refs[0].path
    if any(r.path != path or r.slot != k for k, r in enumerate(refs)):
        return None
    offset = 0
    for r in sorted(refs, key=lambda r: r.offset):
        if r.offset != offset:
            return None
        offset += r.nbytes
    try:
        return path if os.stat(path).st_size == offset else None
    except OSError:
        return None


def read_spooled(ref: Spooled) -> bytes:
    """The chunk `ref` names, read back from its spool file and checked (its size and its crc32c, against the
    chunk's own and the one the worker reported); OSError when it is not what was written."""
    with open(ref.path, "rb", buffering=0) as fh:
        data = os.pread(fh.fileno(), ref.nbytes, ref.offset)
    if len(data) != ref.nbytes or not crc_ok(data) or int.from_bytes(data[-4:], "little") != ref.crc:
        raise OSError(f"a spooled chunk of {os.path.basename(ref.path)} is not what was written")
    return data


def prepare(path: Path, parts: list, *, fsync: bool = True) -> Path:
    """Write `parts` to a new temporary file beside `path` and fsync it; `publish` puts it in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            for part in parts:
                fh.write(part)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish(tmp: Path, path: Path) -> None:
    """Rename a prepared file over `path` (atomic: a reader sees the old file or the new one)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that the renames in it survive a crash of the machine."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, parts: list, *, fsync: bool = True) -> None:
    """Write a file whole: a temporary file in the same folder, fsync, rename over `path`, fsync the folder.

    A reader, and a process killed at any moment, sees either the old file or the new one, never half of one.
    """
    publish(prepare(path, parts, fsync=fsync), path)
    if fsync:
        sync_folder(path.parent)


def remove_leftovers(root: Path) -> int:
    """Remove the temporary files a killed writer left under `root`; returns how many."""
    n = 0
    for tmp in Path(root).rglob(f"*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink()
            n += 1
    return n
