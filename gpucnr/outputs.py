"""Where a command may write: never inside what it reads, never through a planted symbolic link.

`refuse_overlap` compares real paths (symbolic links and ``..`` resolved) before anything is written;
`write_file` writes a file beside its final name through ``mkstemp`` and renames it into place, so a reader never
sees half a file, a symbolic link planted at the final name is replaced (never followed), and a stale file's
permissions are never inherited.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from gpucnr.errors import GpucnrError

__all__ = ["OutputError", "create_file", "csv_text", "csv_untext", "make_folder", "refuse_overlap", "require_results",
           "write_file", "write_path"]


class OutputError(GpucnrError):
    """An output that would land inside an input (or contain one), or that cannot be written safely."""

    code = "output-path"

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


def _enclosing_store(path: str) -> str | None:
    """The nearest folder strictly above `path` that is a gpucnr stack or results, or None."""
    for parent in Path(path).parents:
        meta = parent / "zarr.json"
        try:
            attrs = json.loads(meta.read_bytes()).get("attributes", {}) if meta.is_file() else {}
        except (OSError, ValueError, AttributeError):
            attrs = {}
        if isinstance(attrs, dict) and ("gpucnr_stack" in attrs or "gpucnr_results" in attrs):
            return str(parent)
    return None


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def refuse_overlap(inputs, outputs, *, into=(), inside_inputs_ok=()) -> None:
    """``output-overlap`` if an output is, or lies inside, an input, or an input lies inside an output.

    Parameters
    ----------
    inputs : iterable of (label, path)
        What the command reads (None paths are skipped): stacks, results, tables, folders.
    outputs : iterable of (label, path)
        What the command creates or replaces: folders it owns whole (a stack, results) or files.
    into : iterable of (label, path)
        Existing or new folders the command writes into (a report's folder): they may hold inputs, but may not
        be, or lie inside, one.
    inside_inputs_ok : iterable of paths
        Input folders an output may lie inside (``gpucnr ingest`` writes a stack inside SRC_DIR and never walks
        it); an output may still never *be* one of them.
    """
    for label, p in outputs:
        if p is not None and os.path.islink(p) and not os.path.exists(p):
            # NB: a link to nothing would be followed to create the output wherever it points
            raise OutputError("output-overlap", f"the {label} {p} is a symbolic link to nothing; refused before "
                              "writing anything")
    ins = [(label, _real(p)) for label, p in inputs if p is not None]
    outs = [(label, _real(p)) for label, p in outputs if p is not None]
    for olabel, out in [*outs, *((label, _real(p)) for label, p in into if p is not None)]:
        store = _enclosing_store(out)
        if store is not None:
            # NB: even one the command does not read: writing there changes its fingerprint, orphans its results
            raise OutputError("output-overlap", f"the {olabel} would lie inside the gpucnr store {store}; refused "
                              "before writing anything")
    allowed = {_real(p) for p in inside_inputs_ok if p is not None}
    for olabel, out in ((label, _real(p)) for label, p in into if p is not None):
        for ilabel, inp in ins:
            if _within(out, inp):
                raise OutputError("output-overlap", f"the {olabel} would be, or lie inside, the {ilabel} ({inp}); "
                                  "refused before writing anything")
    for olabel, out in outs:
        for ilabel, inp in ins:
            if out == inp:
                raise OutputError("output-overlap", f"the {olabel} would be the {ilabel} ({inp}); refused before "
                                  "writing anything")
            if _within(out, inp) and inp not in allowed:
                raise OutputError("output-overlap", f"the {olabel} would lie inside the {ilabel} ({inp}); refused "
                                  "before writing anything")
            if _within(inp, out):
                raise OutputError("output-overlap", f"the {ilabel} lies inside the {olabel} ({out}); refused before "
                                  "writing anything")


def require_results(path) -> None:
    """``results-schema`` unless `path`, when it exists, is a gpucnr results group (what ``--resume`` continues):
    a plain folder or a stack is never written into as results."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    try:
        meta = json.loads(Path(path, "zarr.json").read_bytes())
        ok = isinstance(meta, dict) and meta.get("node_type") == "group" and "gpucnr_results" in meta.get(
            "attributes", {})
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise OutputError("results-schema", f"{path} is not gpucnr results; --resume continues results that "
                          "`gpucnr run` wrote")


def make_folder(path, what: str = "output folder") -> Path:
    """`path` as a folder, created with its parents if needed; a file (or anything else) there is a coded error."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError("output-folder", f"the {what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError("output-folder", f"the {what} {path} cannot be created ({e.strerror or type(e).__name__})"
                          ) from None
    return path


def _folder(path: Path, what: str) -> Path:
    folder = path.absolute().parent
    if not folder.is_dir():
        raise OutputError("output-folder", f"the folder of the {what} {path} does not exist")
    if path.is_dir() and not path.is_symlink():
        raise OutputError("output-folder", f"the {what} {path} is a folder")
    return folder


def write_file(path, fill: Callable, *, what: str = "file", private: bool = False, binary: bool = False) -> Path:
    """Write `path` whole: ``fill(fh)`` writes into a temporary file in the same folder, which is flushed, given
    its permissions (0600 when `private`, else 0666 less the umask) and renamed over `path`.

    A symbolic link at `path` is replaced, never followed; a failure leaves `path` as it was and no temporary
    file behind.
    """

    def into(tmp: str) -> None:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())

    return write_path(path, into, what=what, private=private)


def write_path(path, fill: Callable[[str], None], *, what: str = "file", private: bool = False) -> Path:
    """As `write_file`, for writers that take a file name (``fill(tmp_path)``), e.g. Parquet."""
    path = Path(path)
    folder = _folder(path, what)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        fill(tmp)
        os.chmod(tmp, 0o600 if private else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def create_file(path, data: bytes, *, what: str = "file") -> bool:
    """Create `path` holding `data`, readable by its owner only, unless something is there already (a file or a
    symbolic link, dangling or not: never followed, never replaced). Returns False when it was there."""
    path = Path(path)
    folder = _folder(path, what)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # NB: atomic and never clobbers: two ingests sharing one new key agree on it
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _umask() -> int:
    """The process umask, read where Linux shows it (setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: A spreadsheet reads a cell beginning with one of these as a formula (DESIGN §10).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value):
    """A cell of a CSV file a person may open in a spreadsheet: text beginning with ``= + - @``, tab or carriage
    return gets one leading ``'`` (never run as a formula), text beginning with ``'`` one more; anything that
    is not text (numbers) is returned as is."""
    if isinstance(value, str) and value.startswith((*_FORMULA, "'")):
        return "'" + value
    return value


def csv_untext(value):
    """What `csv_text` was given: one leading ``'`` removed from text."""
    if isinstance(value, str) and value.startswith("'"):
        return value[1:]
    return value
