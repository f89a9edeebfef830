"""A stack's tables against its arrays: what the compiled kernels may rely on, checked when a stack is opened.

A stack is data from disk: its tables can be damaged, edited or forged with valid checksums. Everything a
kernel indexes with (valid extents, positions, ROI geometry) is checked here, so that a stack that contradicts
its own arrays is a coded ``stack-schema`` error, never a crash inside compiled code or a misplaced image.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

__all__ = ["check_attrs", "check_label_ids", "check_tables", "table_frame"]

_BUCKET = re.compile(r"(\d+)x(\d+)-([a-z0-9]+)")
_ROI_COLUMNS = ("image", "roi", "kind", "cx", "cy", "r", "name")


def _fail(message: str):
    from gpucnr.store import StackError  # NB: store calls this module; the error class lives there

    return StackError("stack-schema", message)


def table_frame(columns: dict, where: str) -> pd.DataFrame:
    """The columns of a stored table as one DataFrame; columns of unequal lengths (a shortened column) are a
    ``stack-schema`` error naming them, not pandas' uncoded ValueError."""
    lengths = {k: int(np.shape(v)[0]) if np.ndim(v) == 1 else -1 for k, v in columns.items()}
    if any(v < 0 for v in lengths.values()):
        odd = sorted(k for k, v in lengths.items() if v < 0)
        raise _fail(f"{where}: column(s) {odd} are not 1-D arrays")
    if len(set(lengths.values())) > 1:
        common = max(set(lengths.values()), key=list(lengths.values()).count)
        odd = sorted(k for k, v in lengths.items() if v != common)
        raise _fail(f"{where}: columns have unequal lengths ({', '.join(f'{k}: {lengths[k]}' for k in odd)}; "
                    f"the others {common})")
    # NB: zarr returns text as NumPy StringDType; pandas would convert each such column through Arrow and back to
    # object (and copy every numeric column into one block): 0.2 s for 786,000 ROI rows. Converted once to
    # object, the same frame (dtypes, values, hashes) costs half.
    frame = {k: pd.Series(v.astype(object), dtype=object, copy=False) if getattr(v, "dtype", None) is not None
             and v.dtype.kind == "T" else v for k, v in columns.items()}
    return pd.DataFrame(frame, copy=False)


def _integers(table: pd.DataFrame, col: str, where: str) -> np.ndarray:
    values = table[col].to_numpy()
    if not len(values):
        return np.zeros(0, np.int64)  # NB: an empty stack's columns carry no dtype worth checking
    if values.dtype.kind not in "iu":
        raise _fail(f"{where}/{col} has dtype {values.dtype}; integers expected")
    if values.dtype.kind == "u" and len(values) and int(values.max()) > np.iinfo(np.int64).max:
        raise _fail(f"{where}/{col} holds values beyond int64")
    return values.astype(np.int64, copy=False)  # NB: only read by the checks


def _floats(table: pd.DataFrame, col: str, where: str) -> np.ndarray:
    values = table[col].to_numpy()
    if not len(values):
        return np.zeros(0, np.float64)
    if values.dtype.kind not in "iuf":
        raise _fail(f"{where}/{col} has dtype {values.dtype}; numbers expected")
    return values.astype(np.float64, copy=False)  # NB: only read by the checks


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def check_attrs(attrs: dict) -> None:
    """Raise ``stack-schema`` unless the attributes a reader relies on before the tables are well formed: the
    bucket list (unique names ``<H>x<W>-<dtype>``, in the writer's order: canvas, then dtype), ``n_images``,
    ``shard`` and ``roi_ids`` (sorted, unique, >= 1)."""
    names = attrs.get("buckets")
    if not isinstance(names, list) or not all(isinstance(b, str) for b in names):
        raise _fail("the attribute 'buckets' is not a list of bucket names")
    if len(set(names)) != len(names):
        raise _fail(f"the attribute 'buckets' names a bucket twice: {names}")
    keys = []
    for name in names:
        m = _BUCKET.fullmatch(name)
        try:
            dtype = np.dtype(m.group(3)) if m else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.name != m.group(3) or dtype.kind not in "biuf":
            raise _fail(f"bucket {name!r} is not named <H>x<W>-<dtype>")
        keys.append((int(m.group(1)), int(m.group(2)), dtype.name))
    if keys != sorted(keys):
        raise _fail(f"the attribute 'buckets' lists the buckets out of order: {names}")
    for key in ("n_images", "shard"):
        value = attrs.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "shard" else 0):
            raise _fail(f"the attribute {key} ({value!r}) is not a {'positive' if key == 'shard' else 'whole'} "
                        "number")
    raw = attrs.get("roi_ids", [])
    if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        raise _fail("the attribute roi_ids is not a list of integers")
    ids = np.asarray(raw, np.int64) if raw else np.zeros(0, np.int64)
    if len(ids) and (ids.min() < 1 or (np.diff(ids) <= 0).any()):
        raise _fail("the attribute roi_ids must hold sorted, unique ids >= 1")


def check_tables(attrs: dict, images: pd.DataFrame, rois: pd.DataFrame | None, arrays: dict) -> pd.DataFrame | None:
    """Raise ``stack-schema`` unless the tables agree with the attributes (`check_attrs` first) and the arrays.

    Parameters
    ----------
    attrs : dict
        The stack group's attributes.
    images : pandas.DataFrame
        The per-image table as stored.
    rois : pandas.DataFrame or None
        The ROI table as stored.
    arrays : dict
        {bucket name: its images array}, for their shapes and shard sizes (never the pixels).

    Notes
    -----
    Checked: each bucket's array has the canvas its name says and the shard size the stack records for it;
    ``index`` = 0..N-1 in stored order (the order every reader slices by); per row, ``bucket`` and ``position``
    equal what the index says (so positions are unique and in range per bucket); 1 <= valid_h, valid_w <= the
    bucket's canvas; slope finite and != 0, intercept finite; ``source_index`` a permutation of 0..N-1; the ROI
    table's columns, kinds, images, radii and coordinates (`normalize_table`), and its ids: among ``roi_ids``, and
    equal to them when the stack has no labels.
    """
    names = attrs["buckets"]
    n = len(images)
    if attrs["n_images"] != n:
        raise _fail(f"the attribute n_images ({attrs['n_images']}) is not the {n} rows of tables/images")
    for name in names:
        canvas = tuple(int(v) for v in name.split("-")[0].split("x"))
        shape = tuple(int(v) for v in arrays[name].shape)
        if len(shape) != 3 or shape[1:] != canvas:
            raise _fail(f"buckets/{name}/images has shape {shape}; its name says a {canvas[0]}x{canvas[1]} canvas")
        stored = getattr(arrays[name], "shards", None)
        # NB: stacks sized by pixels record each bucket's shard (``shards``); older ones one for all (``shard``)
        per = attrs["shards"].get(name) if isinstance(attrs.get("shards"), dict) else attrs["shard"]
        if stored is not None and int(stored[0]) != per:
            raise _fail(f"buckets/{name}/images has shards of {int(stored[0])} images; the stack says {per}")
    shards = attrs.get("shards")
    if shards is not None:
        values = list(shards.values()) if isinstance(shards, dict) else []
        if (not isinstance(shards, dict) or sorted(shards) != sorted(names)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
                or attrs["shard"] != max(values, default=attrs["shard"])):
            raise _fail(f"the attribute shards ({shards!r}) does not give each bucket a shard size, the largest "
                        f"being the attribute shard ({attrs['shard']})")
    _check_images(images, names, arrays)
    roi_ids = np.asarray(attrs.get("roi_ids", []), np.int64)
    if rois is not None:
        return _check_rois(rois, n, roi_ids, exact=not attrs.get("has_labels"))
    elif not attrs.get("has_labels") and len(roi_ids):
        raise _fail(f"the attribute roi_ids lists {len(roi_ids)} id(s), but the stack has neither labels nor an "
                    "ROI table")


def _check_images(images: pd.DataFrame, names: list, arrays: dict) -> None:
    where = "tables/images"
    n = len(images)
    index = _integers(images, "index", where)
    if not np.array_equal(index, np.arange(n)):
        row = _first(index != np.arange(n))
        raise _fail(f"{where}/index is not 0..{n - 1} in order (row {row} holds {index[row]})")
    sizes = np.array([int(arrays[b].shape[0]) for b in names], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] != n:
        raise _fail(f"the buckets hold {offsets[-1]} images, {where} has {n} rows")
    which = np.repeat(np.arange(len(names)), sizes)
    # NB: compared by distinct value (a stack holds a handful): a per-row conversion to str cost 0.05 s a million
    # rows
    bucket = images["bucket"]
    if isinstance(bucket.dtype, pd.CategoricalDtype) and not bucket.hasnans:
        codes, distinct = bucket.cat.codes.to_numpy(), bucket.cat.categories.to_numpy(object)  # NB: coded text
    else:
        codes, distinct = pd.factorize(bucket.to_numpy(), use_na_sentinel=False)
    spelled = np.asarray(distinct).astype(str) if len(distinct) else np.array([], str)
    number = np.array([names.index(v) if v in names else -1 for v in spelled.tolist()], np.int64)
    found = number[codes] if n else np.zeros(0, np.int64)
    if (found != which).any():
        row = _first(found != which)
        raise _fail(f"{where}/bucket: row {row} says {spelled[codes[row]]!r}; by the bucket list and sizes image "
                    f"{row} is in {np.asarray(names, dtype=str)[which[row]]!r}")
    position = _integers(images, "position", where)
    want = np.arange(n) - offsets[which]
    if (position != want).any():
        row = _first(position != want)
        raise _fail(f"{where}/position: image {row} says position {position[row]} of {spelled[codes[row]]}; it is at "
                    f"{want[row]} (positions must be unique and in order within a bucket)")
    canvas = np.array([[int(arrays[b].shape[1]), int(arrays[b].shape[2])] for b in names], np.int64).reshape(-1, 2)
    for k, col in enumerate(("valid_h", "valid_w")):
        v = _integers(images, col, where)
        limit = canvas[which, k] if n else np.zeros(0, np.int64)
        bad = (v < 1) | (v > limit)
        if bad.any():
            row = _first(bad)
            raise _fail(f"{where}/{col}: image {row} says {v[row]}; it must lie in [1, {limit[row]}] (its canvas)")
    slope = _floats(images, "slope", where)
    bad = ~np.isfinite(slope) | (slope == 0)
    if bad.any():
        raise _fail(f"{where}/slope: image {_first(bad)} has slope {slope[_first(bad)]}; finite and != 0 expected")
    intercept = _floats(images, "intercept", where)
    if not np.isfinite(intercept).all():
        raise _fail(f"{where}/intercept: image {_first(~np.isfinite(intercept))} has a non-finite intercept")
    _floats(images, "padding", where)
    source = _integers(images, "source_index", where)
    # NB: counted, not sorted: each of 0..n-1 exactly once
    if n and (source.min() < 0 or source.max() >= n or (np.bincount(source, minlength=n) != 1).any()):
        raise _fail(f"{where}/source_index is not a permutation of 0..{n - 1}")


def _check_rois(rois: pd.DataFrame, n: int, roi_ids: np.ndarray, *, exact: bool) -> pd.DataFrame:
    from gpucnr.errors import RoiTableError
    from gpucnr.roitable import normalize_table

    where = "tables/rois"
    missing = [c for c in _ROI_COLUMNS if c not in rois.columns]
    if missing:
        raise _fail(f"{where} lacks column(s) {missing}")
    try:
        table = normalize_table(rois, n)
    except RoiTableError as e:
        raise _fail(f"{where}: {e.reason}") from None
    ids = np.unique(table["roi"].to_numpy())
    stray = np.setdiff1d(ids, roi_ids)
    if stray.size:
        raise _fail(f"{where} holds ROI id(s) {stray[:5].tolist()} that the attribute roi_ids lacks")
    if exact and not np.array_equal(ids, roi_ids):
        raise _fail(f"the attribute roi_ids ({roi_ids[:5].tolist()}...) is not the ROI table's ids "
                    f"({ids[:5].tolist()}...), and the stack has no labels")
    return table


def check_label_ids(found, roi_ids, where: str, start: int, stop: int) -> None:
    """``stack-schema`` unless the label values a batch holds (`found`) are among the stack's ``roi_ids``: the
    attribute is the run's ``roi`` dimension, fixed before any pixel is read, so a label outside it would be
    dropped without a word. (Checked as batches are measured: the labels are not read when a stack is opened.)"""
    stray = np.setdiff1d(np.asarray(found, np.int64), np.asarray(roi_ids, np.int64))
    if stray.size:
        raise _fail(f"{where}: images {start}..{stop - 1} hold label(s) {stray[:5].tolist()} that the attribute "
                    "roi_ids lacks")
