"""The journal of an ingest in progress, so that `gpucnr ingest ... --resume` continues where it stopped.

One JSON object per line, in a file beside the stack (``STACK.zarr.journal``, readable by its owner only: it
names source files, like the skipped list). The first line says what is being ingested: a SHA-256 of the
sources (the sorted relative path, size and modification time of every file) and the options, and the command
that resumes. Then, in input order, one line per decoded file: what ingest would otherwise keep in memory until
the end (its per-image rows, problems, duplicate key, mask use), and, whenever a shard of a bucket is on disk,
a line ``{"flushed": bucket, "count": n}``, after which the journal is flushed to disk; the last such line of a
bucket holds: it may count fewer images than one before it, when the slices of a volume whose worker died midway
were cut from the stack (format 2; a format-1 journal never has such a line and reads alike). A resume replays
the files whose images all lie in flushed shards, and decodes the rest again. The journal is removed when the
stack is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

__all__ = ["JOURNAL_FORMAT", "Journal", "sources_digest"]

JOURNAL_FORMAT = 2
#: journal formats this version resumes (format 1 had no cut buckets: its counts only grow)
_READ_FORMATS = (1, 2)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def sources_digest(folders: dict, files: dict) -> str:
    """SHA-256 of the sorted (folder, relative path, size, mtime_ns) of every entry walked in `folders` ({"src":
    [`Found`, ...], ...}) and of the table files `files` ({"rois": path, ...}; None for none)."""
    rows = []
    for folder, entries in folders.items():
        for f in entries:
            try:
                st = os.stat(f.path) if f.code is None else os.lstat(f.path)
                rows.append((folder, f.rel, st.st_size, st.st_mtime_ns))
            except OSError:
                rows.append((folder, f.rel, -1, -1))
    for label, path in files.items():
        if path is not None:
            st = os.stat(path)
            rows.append((label, "", st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


class Journal:
    """Append-only journal lines; `flushed` lines come from the stack writer's thread, hence the lock."""

    def __init__(self, path: Path, fh):
        self.path, self._fh, self._lock = Path(path), fh, threading.Lock()

    @classmethod
    def create(cls, path, header: dict, lines=()) -> Journal:
        """A new journal (replacing any) holding `header`, then `lines`; on disk before this returns."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for line in ({"journal": JOURNAL_FORMAT, **header}, *lines):
                fh.write(json.dumps(line, default=_plain) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # NB: a resume that stops while rewriting keeps the previous journal
        return cls(path, open(path, "a", encoding="utf-8"))

    @staticmethod
    def read(path) -> tuple[dict, list[dict], dict[str, int]]:
        """(header, file records in order, {bucket: images on disk}); a torn last line is ignored."""
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        lines = text[: text.rfind("\n") + 1].splitlines()
        if not lines:
            raise ValueError("an empty journal")
        header = json.loads(lines[0])
        if header.get("journal") not in _READ_FORMATS:
            raise ValueError(f"journal format {header.get('journal')!r}")
        records, flushed = [], {}
        for line in lines[1:]:
            entry = json.loads(line)
            if "flushed" in entry:
                # NB: the last count holds: a bucket cut by `StackWriter.rollback` counts fewer than before
                flushed[entry["flushed"]] = int(entry["count"])
            elif entry.get("j") == len(records):
                records.append(entry)
        return header, records, flushed

    def record(self, entry: dict) -> None:
        """One decoded file's record (written through at the next `flushed`)."""
        with self._lock:
            self._fh.write(json.dumps(entry, default=_plain) + "\n")

    def flushed(self, bucket: str, count: int) -> None:
        """A shard of `bucket` is on disk, or the bucket was cut back (`StackWriter.rollback`): its first `count`
        images are kept; the journal goes to disk."""
        with self._lock:
            self._fh.write(json.dumps({"flushed": bucket, "count": int(count)}) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            self._fh.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
