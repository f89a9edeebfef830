"""Finding the files of a source folder: deterministic order, symbolic links, names that are not UTF-8."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Found", "display_path", "source_name", "walk"]

#: C0 and C1 control characters and DEL: never printed raw (a newline in a name would forge a log line).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: kept as they are in a percent-encoded name: printable ASCII but "%"
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


@dataclass(frozen=True)
class Found:
    """One entry under the source folder: a regular file (``code`` None) or one that is skipped."""

    path: Path  # NB: absolute, as the OS gives it (may hold surrogate escapes)
    rel: str  # dataset-relative, POSIX separators, printable: see `source_name`
    code: str | None = None
    reason: str = ""
    encoding: str = ""  # "percent" when `rel` is percent-encoded


def display_path(path) -> str:
    """A printable form of a path for messages: bytes that are not UTF-8 become \\xNN escapes and control
    characters \\xNN escapes too, never an exception."""
    text = os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def source_name(rel) -> tuple[str, str]:
    """A dataset-relative name as written in the operator's files, and its ``source_encoding``.

    A name that is valid UTF-8 without ``%`` or control characters is written as is (encoding ""); any other is
    percent-encoded byte by byte (encoding "percent"; ``/`` kept), so a non-UTF-8 name and one spelled with a
    literal escape never read alike, and no name holds a line break. Decode with
    ``urllib.parse.unquote_to_bytes``.
    """
    raw = os.fsencode(os.fspath(rel))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "%" not in text and not _CONTROL.search(text):
        return text, ""
    return urllib.parse.quote_from_bytes(raw, safe=_SAFE), "percent"


def walk(root, *, follow_symlinks: bool = False, exclude=()) -> list[Found]:
    """Every file under `root`, sorted by path bytes (so input order never depends on the file system).

    Symbolic links are skipped with code ``symlink`` unless `follow_symlinks`; followed, a link to nothing is
    ``broken-symlink`` and a directory reached twice (a loop, or two links to one folder) is ``symlink-loop``.
    Files in `exclude` (absolute paths: the ROI table, the meta table) are not inputs.
    """
    root = Path(os.path.abspath(root))
    excluded = {os.path.abspath(p) for p in exclude}
    real_root = os.path.realpath(root)
    for p in exclude:
        # NB: the same file named through a symbolic link (or `..`): excluded by where it really is under root
        rel_real = os.path.relpath(os.path.realpath(p), real_root)
        if rel_real != os.pardir and not rel_real.startswith(os.pardir + os.sep):
            excluded.add(os.path.normpath(os.path.join(root, rel_real)))
    out: list[Found] = []
    seen_dirs = {_ident(root)}

    def found(p: Path, code: str | None = None, reason: str = "") -> Found:
        text, encoding = source_name(p.relative_to(root).as_posix())
        return Found(p, text, code, reason, encoding)

    def listing(folder: Path):
        try:
            return iter(sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name)))
        except OSError as e:
            out.append(found(folder, "unreadable", f"folder cannot be listed ({type(e).__name__})"))
            return iter(())

    # NB: an explicit stack of folder listings, not recursion: a deep tree must not exhaust Python's stack
    pending = [listing(root)]
    while pending:
        entry = next(pending[-1], None)
        if entry is None:
            pending.pop()
            continue
        path = Path(entry.path)
        if os.path.abspath(path) in excluded:
            continue
        try:
            is_link = entry.is_symlink()
            if is_link and not follow_symlinks:
                out.append(found(path, "symlink", "symbolic link not followed (--follow-symlinks)"))
                continue
            try:
                st = os.stat(path)  # NB: follows the link
            except FileNotFoundError:
                out.append(found(path, "broken-symlink", "symbolic link to nothing"))
                continue
            except OSError as e:
                code = "symlink-loop" if is_link and e.errno == errno.ELOOP else "unreadable"
                out.append(found(path, code, f"cannot be examined ({type(e).__name__})"))
                continue
        except OSError as e:
            out.append(found(path, "unreadable", f"cannot be examined ({type(e).__name__})"))
            continue
        if stat.S_ISDIR(st.st_mode):
            if _gpucnr_store(path) or _side_folder(path):
                continue  # NB: a stack or results an earlier ingest or run left inside SRC_DIR: never an input
            ident = (st.st_dev, st.st_ino)
            if ident in seen_dirs:
                out.append(found(path, "symlink-loop", "a folder reached a second time through a "
                                 "symbolic link"))
                continue
            seen_dirs.add(ident)
            pending.append(listing(path))
        elif stat.S_ISREG(st.st_mode):
            if _side_file(path):
                continue  # NB: a stack's key, linkage, skipped list or journal: gpucnr's own output, not an input
            out.append(found(path))
        else:
            out.append(found(path, "not-an-image", "not a regular file (device, pipe or socket)"))
    return out


#: The suffixes of the files gpucnr writes beside a stack (`sidecar_paths`): outputs, never inputs.
_SIDE_SUFFIXES = (".key", ".linkage.csv", ".skipped.csv", ".journal")


def _side_file(path: Path) -> bool:
    """True for a file beside a folder it names that is a Zarr group: a stack's key, linkage, skipped list or
    journal (an interrupted ingest's stack may not carry gpucnr's attributes yet)."""
    for suffix in _SIDE_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            if (path.with_name(path.name[: -len(suffix)]) / "zarr.json").is_file():
                return True
    return False


def _side_folder(folder: Path) -> bool:
    """True for the spool folder an ingest writes beside its stack (`store.spool_path`), left by one interrupted."""
    name = folder.name
    return name.endswith(".spool") and len(name) > 6 and (folder.with_name(name[:-6]) / "zarr.json").is_file()


def _gpucnr_store(folder: Path) -> bool:
    """True for a Zarr group whose attributes make it a gpucnr stack or results (its metadata says so)."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_bytes()[: 2**20]).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and ("gpucnr_stack" in attrs or "gpucnr_results" in attrs)


def _ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)
