"""ROIs for ingested images: mask files matched by name, DICOM SEG (highdicom), ROI and meta CSV tables.

Matching by name and reading the CSVs happen in the driver; mask pixels and SEG objects are read inside the
worker that decodes their image (`read_masks`, `read_seg`), so a hostile mask costs one file too.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from gpucnr.errors import InputError, RoiTableError
from gpucnr.sources.outcomes import Skip
from gpucnr.sources.pseudonyms import ID_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

# NB: pandas, gpucnr.identifiers and gpucnr.roitable (SciPy) are imported by the table readers, which run in the
# driver: the worker processes import this module for its mask readers and start faster without them (issue 18).

__all__ = ["MaskMatcher", "match_source", "read_masks", "read_meta_csv", "read_roi_csv", "read_seg"]

#: the most distinct nonzero values a label mask may hold; more looks like an anti-aliased or lossy mask
MAX_LABELS = 255
_ROI_COLUMNS = ("source", "roi", "kind", "cx", "cy", "r")
_COLUMN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")


@dataclass
class MaskMatcher:
    """Which mask files belong to which image, by name.

    `pattern` uses ``{stem}`` (the image's name without its last suffix), ``{name}`` (the full name) and
    ``*`` (any text); e.g. ``{stem}_mask.png`` or ``{stem}_mask*.png`` (several masks per image). Masks are
    looked for in the image's own folder, or with `mask_dir` in the same relative folder under it.
    """

    pattern: str
    mask_dir: Path | None = None

    def __post_init__(self):
        if "/" in self.pattern or "\\" in self.pattern:
            raise InputError(f"--mask-pattern {self.pattern!r} must be a file name pattern, without a folder")
        if "{stem}" not in self.pattern and "{name}" not in self.pattern:
            raise InputError(f"--mask-pattern {self.pattern!r} needs {{stem}} or {{name}}")
        parts = re.split(r"(\{stem\}|\{name\}|\*)", self.pattern)
        regex = "".join({"{stem}": "(?P<key>.+)", "{name}": "(?P<key>.+)", "*": ".*?"}.get(p, re.escape(p))
                        for p in parts)
        self._regex = re.compile(f"^{regex}$", re.DOTALL)
        self._by_name = "{name}" in self.pattern

    def key(self, name: str) -> str | None:
        """The image key a file name matches as a mask, or None when it is not a mask name."""
        m = self._regex.match(name)
        return m.group("key") if m else None

    def image_key(self, name: str) -> str:
        return name if self._by_name else PurePosixPath(name).stem if "." in name else name

    def index(self, files) -> dict[tuple[str, str], list]:
        """{(relative folder, image key): [mask entries]} for the `walk` entries of the mask folder."""
        out: dict[tuple[str, str], list] = {}
        for f in files:
            if f.code is not None:
                continue
            folder, _, name = f.rel.rpartition("/")
            k = self.key(name)
            if k is not None:
                out.setdefault((folder, k), []).append(f)
        return out


def _labels(mode: str, arr: np.ndarray, what: str) -> np.ndarray:
    """A mask page -> int32 labels: binary masks (one nonzero value of 1, 255 or 65535) -> 1, label maps as is."""
    if arr.ndim == 3:
        if mode in ("LA", "PA"):
            arr = arr[..., 0]
        elif (arr[..., :3] == arr[..., :1]).all():
            arr = arr[..., 0]
        else:
            raise Skip("mask-labels", f"{what} is a colour image; a mask holds one label per pixel")
    if arr.dtype == bool:
        return arr.astype(np.int32)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise Skip("mask-labels", f"{what} holds fractional or non-finite values")
    values = np.unique(arr)
    nonzero = values[values != 0]
    if nonzero.size and nonzero.min() < 0:
        raise Skip("mask-labels", f"{what} holds negative values")
    if nonzero.size and nonzero.max() > np.iinfo(np.int32).max:
        raise Skip("mask-labels", f"{what} holds values beyond 2**31 - 1")
    if nonzero.size == 1 and nonzero[0] in (1, 255, 65535):
        return (arr != 0).astype(np.int32)
    if nonzero.size > 1 and nonzero.max() in (255, 65535) and mode in ("L", "I;16", "I;16B", "I;16L", "RGB"):
        raise Skip("mask-labels", f"{what} mixes {int(nonzero.max())} with {nonzero.size - 1} other value(s): an "
                   "anti-aliased or lossy-compressed binary mask?")
    if nonzero.size > MAX_LABELS:
        raise Skip("mask-labels", f"{what} holds {nonzero.size} distinct values (at most {MAX_LABELS} labels)")
    return arr.astype(np.int32)


def _is_npy(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(6) == b"\x93NUMPY"


def _npy_pages(path, shapes) -> list[tuple[str, np.ndarray, None]]:
    """A NumPy label array (.npy, never pickled objects): (rows, cols), or (frames, rows, cols) for one label
    plane per frame; its declared shape is checked against the image's frames (`shapes`) before it is read."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as e:  # noqa: BLE001 - a damaged or pickled .npy
        raise Skip("mask-unreadable", f"not a readable NumPy array ({type(e).__name__})") from None
    if arr.ndim not in (2, 3) or arr.dtype.kind not in "biuf":
        raise Skip("mask-labels", f"a NumPy mask must be a 2-D or 3-D array of numbers, got {arr.ndim}-D "
                   f"{arr.dtype.kind}")
    declared = [tuple(arr.shape)] if arr.ndim == 2 else [tuple(arr.shape[1:])] * arr.shape[0]
    if declared != [tuple(s) for s in shapes]:
        raise Skip("mask-shape", f"is an array of shape {'x'.join(str(v) for v in arr.shape)}; the image has "
                   f"{len(shapes)} frame(s) of {shapes[0][0]}x{shapes[0][1]}")
    planes = [np.asarray(arr)] if arr.ndim == 2 else [np.asarray(p) for p in arr]
    return [("npy", p, None) for p in planes]


def _threshold(arr: np.ndarray, threshold: float) -> np.ndarray:
    """A mask page binarised: 1 where its gray value (the mean of its colour channels) exceeds `threshold`."""
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64).mean(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return (arr > threshold).astype(np.int32)


def read_masks(paths: list, shapes: list[tuple[int, int]], *, threshold: float | None = None) -> list[np.ndarray]:
    """Labels (int32, one per frame) from the mask files of one image, merged; `shapes` are the frames'.

    Mask files are PNG/TIFF images or NumPy ``.npy`` label arrays (told by content). Each holds one page (or
    array plane) per frame (or one page for all frames of a single-frame image). Raises `Skip`
    with ``mask-unreadable``, ``mask-shape``, ``mask-labels`` or ``mask-overlap``. With `threshold`
    (``--mask-threshold``: lossy JPEG masks) every mask is binarised, 1 where its value exceeds it; a mask
    it empties because it lies above the mask's values is ``mask-threshold`` (`_threshold_above`).
    """
    from gpucnr.sources.raster import read_pages

    merged = [np.zeros(s, np.int32) for s in shapes]
    for k, path in enumerate(paths):
        what = f"mask file {k + 1} of {len(paths)}" if len(paths) > 1 else "the mask"
        try:
            pages = _npy_pages(path, shapes) if _is_npy(path) else read_pages(path, expect=shapes)
        except Skip as e:
            if e.code == "mask-shape":
                raise Skip("mask-shape", f"{what} {e.reason}") from None
            raise Skip("mask-unreadable", f"{what} cannot be read ({e.code})") from None
        if len(pages) != len(shapes):
            raise Skip("mask-shape", f"{what} has {len(pages)} page(s), the image {len(shapes)} frame(s)")
        hit = False
        for f, (mode, arr, _) in enumerate(pages):
            labels = _labels(mode, arr, what) if threshold is None else _threshold(arr, threshold)
            hit = hit or threshold is None or bool(labels.any())
            if labels.shape != shapes[f]:
                raise Skip("mask-shape", f"{what} is {labels.shape[1]}x{labels.shape[0]} px, the image "
                           f"{shapes[f][1]}x{shapes[f][0]} px" + (f" (frame {f})" if len(shapes) > 1 else ""))
            clash = (merged[f] != 0) & (labels != 0) & (merged[f] != labels)
            if clash.any():
                raise Skip("mask-overlap", f"{int(clash.sum())} pixel(s) get different labels from two mask files")
            np.maximum(merged[f], labels, out=merged[f])
        if not hit:
            _threshold_above(pages, threshold, what)
    return merged


def _threshold_above(pages, threshold: float, what: str) -> None:
    """Raise ``mask-threshold`` for a mask no pixel of which exceeds `threshold` because the threshold lies above
    its values: at or above the largest value its type holds (8-bit masks and 300), or at or above the one value
    of a binary mask (0/1 masks and 127). An all-zero mask (an image without a lesion) is a problem only
    under a threshold beyond its type's range."""
    dtype = pages[0][1].dtype
    top = 1 if dtype.kind == "b" else np.iinfo(dtype).max if dtype.kind in "iu" else None
    if top is not None and threshold >= top:
        raise Skip("mask-threshold", f"--mask-threshold {threshold:g} is at or above the largest value {what} can "
                   f"hold ({top}: {dtype.itemsize * 8 if dtype.kind != 'b' else 1}-bit): no pixel exceeds it")
    values = np.unique(np.concatenate([np.unique(arr) for _, arr, _ in pages]))
    nonzero = values[values != 0]
    if nonzero.size == 1:
        raise Skip("mask-threshold", f"--mask-threshold {threshold:g} is at or above the one nonzero value of "
                   f"{what} ({nonzero[0]:g}): no pixel exceeds it")


@functools.lru_cache(maxsize=2)
def _segmentation(path: str, _mtime_ns: int):
    """A DICOM SEG and the SOP instances it references, parsed once per worker (a SEG of a 500-slice series is
    asked for by 500 images); keyed by modification time too, so an edited file is parsed again."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
    return seg, frozenset(str(ins[2]) for ins in seg.get_source_image_uids())


def read_seg(paths: list, sop_instance_uid: str, shapes: list[tuple[int, int]]) -> list[np.ndarray] | None:
    """Labels (segment numbers) that the DICOM SEG files in `paths` give the frames of one source instance;
    None when none of them references it."""
    try:
        import highdicom  # noqa: F401 - only to say clearly when the extra is missing
    except ImportError:
        raise Skip("seg-unreadable", "reading DICOM SEG needs highdicom (pip install gpucnr[seg])") from None
    merged = None
    for path in paths:
        try:
            seg, refs = _segmentation(path, os.stat(path).st_mtime_ns)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - highdicom/pydicom raise many types on bad objects
            raise Skip("seg-unreadable", f"a DICOM SEG cannot be read ({type(e).__name__})") from None
        if sop_instance_uid not in refs:
            continue
        try:
            if len(shapes) == 1:
                vol = seg.get_pixels_by_source_instance([sop_instance_uid], combine_segments=True,
                                                        skip_overlap_checks=False)
            else:
                vol = seg.get_pixels_by_source_frame(sop_instance_uid, list(range(1, len(shapes) + 1)),
                                                     combine_segments=True, allow_missing_frames=True)
        except Exception as e:  # noqa: BLE001 - overlapping segments, missing frames, bad geometry
            raise Skip("seg-unreadable", f"the DICOM SEG's frames for this image cannot be read "
                       f"({type(e).__name__})") from None
        vol = np.asarray(vol)
        if vol.shape[0] != len(shapes) or any(vol.shape[1:3] != s for s in shapes):
            raise Skip("mask-shape", f"the DICOM SEG gives {vol.shape[0]} frame(s) of {vol.shape[2]}x{vol.shape[1]} "
                       f"px for an image of {len(shapes)} frame(s) of {shapes[0][1]}x{shapes[0][0]} px")
        layer = [vol[f].astype(np.int32) for f in range(len(shapes))]
        if merged is None:
            merged = layer
        else:
            for f in range(len(shapes)):
                if ((merged[f] != 0) & (layer[f] != 0) & (merged[f] != layer[f])).any():
                    raise Skip("mask-overlap", "two DICOM SEG objects give one pixel different segments")
                np.maximum(merged[f], layer[f], out=merged[f])
    return merged


def _safe_source(text: str, backslash: bool = True) -> str | None:
    """A dataset-relative POSIX path, or None if it is absolute or climbs out of the folder; `backslash`: ``\\``
    read as a folder separator (a path written on Windows), else as a character of the name."""
    text = str(text).strip()
    text = text.replace("\\", "/") if backslash else text
    if not text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def match_source(row: dict, sources) -> str | None:
    """The source (a walked file's name) an ROI or meta row names: its literal text when a file has that name (a
    name may hold a backslash), else the text with backslashes read as separators; None when outside SRC_DIR."""
    literal = row.get("_literal")
    if isinstance(literal, str) and literal in sources:
        return literal
    key = row.get("_key")
    return key if isinstance(key, str) else None  # NB: pandas turns None into NaN


def read_roi_csv(path) -> pd.DataFrame:
    """The ROI CSV (columns source, [frame,] roi, kind, cx, cy, r [, name]) validated up front, before any
    decoding: a malformed table fails at once (`RoiTableError` naming the line); rows are matched to images
    after ingest. Adds ``_line`` (1-based, the header is line 1) and ``_key`` (the safe source path, or None)."""
    import pandas as pd

    from gpucnr.roitable import MAX_COORDINATE

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas parser errors of many kinds
        raise RoiTableError(f"{path.name}: cannot be read as CSV ({type(e).__name__})") from None
    missing = [c for c in _ROI_COLUMNS if c not in table.columns]
    if missing:
        raise RoiTableError(f"{path.name}: missing column(s) {missing}; expected source, [frame,] roi, kind, cx, "
                            "cy, r [, name]")
    table = table.copy()
    table["_line"] = np.arange(2, len(table) + 2)
    ints = ["roi", "cx", "cy", "r"] + (["frame"] if "frame" in table else [])
    for col in ints:
        bad = ~table[col].str.strip().str.fullmatch(r"[+-]?\d+")
        if col == "frame":
            bad &= table[col].str.strip() != ""
        if bad.any():
            line = int(table["_line"][bad].iloc[0])
            raise RoiTableError(f"{path.name} line {line}: column {col} must hold an integer (pixels, 0-based)")
        # NB: integers beyond int64 are refused here, not left to overflow in a cast
        big = table[col].str.strip().map(lambda v: v != "" and not -(2**63) <= int(v) < 2**63)
        if big.any():
            line = int(table["_line"][big].iloc[0])
            raise RoiTableError(f"{path.name} line {line}: column {col} holds an integer beyond the range of int64")
    table["frame"] = table["frame"].str.strip().replace("", "0").astype(np.int64) if "frame" in table else 0
    for col in ("roi", "cx", "cy", "r"):
        table[col] = table[col].str.strip().astype(np.int64)
    kinds = table["kind"].str.strip().str.lower()
    if (~kinds.isin(["square", "disk"])).any():
        line = int(table["_line"][~kinds.isin(["square", "disk"])].iloc[0])
        raise RoiTableError(f"{path.name} line {line}: kind must be square or disk")
    table["kind"] = kinds
    if (table["r"] < 1).any() or (table["roi"] < 1).any() or (table["frame"] < 0).any():
        line = int(table["_line"][(table["r"] < 1) | (table["roi"] < 1) | (table["frame"] < 0)].iloc[0])
        raise RoiTableError(f"{path.name} line {line}: r and roi must be >= 1, frame >= 0")
    coords = table[["cx", "cy", "r"]]
    far = ((coords < -MAX_COORDINATE) | (coords > MAX_COORDINATE)).any(axis=1)
    if far.any():
        raise RoiTableError(f"{path.name} line {int(table['_line'][far].iloc[0])}: cx, cy and r must lie within "
                            f"+-{MAX_COORDINATE} pixels")
    if "name" not in table:
        table["name"] = ""
    table["_key"] = [_safe_source(s) for s in table["source"]]
    # NB: a name holding a backslash is addressed literally when such a file exists (see `match_source`)
    table["_literal"] = [_safe_source(s, backslash=False) for s in table["source"]]
    return table


def read_meta_csv(path, reserved) -> pd.DataFrame:
    """The --meta CSV: a ``source`` column (path relative to SRC_DIR) and per-image columns joined at ingest.
    Columns that clash with the stack's own (`reserved`) are refused up front."""
    import pandas as pd

    from gpucnr.identifiers import refused_name

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas parser errors of many kinds
        raise InputError(f"{path.name}: cannot be read as CSV ({type(e).__name__})") from None
    if "source" not in table.columns:
        raise InputError(f"{path.name}: needs a source column (paths relative to SRC_DIR)")
    clash = sorted(set(table.columns) & set(reserved))
    if clash:
        raise InputError(f"{path.name}: column(s) {clash} are the stack's own; rename them")
    # NB: a column name becomes an array path in the stack: plain names only, never a path from the input
    odd = [c for c in table.columns if not _COLUMN.fullmatch(c)]
    if odd:
        raise InputError(f"{path.name}: column names must be letters, digits, '_', '.', '-' (starting with a letter, "
                         f"digit or '_'); {len(odd)} are not")
    # NB: DESIGN §10's rule (gpucnr.identifiers), not an exact match: "PatientNam" is refused too
    named = [c for c in table.columns if c not in ID_COLUMNS and c != "source" and refused_name(c) is not None]
    if named:
        raise InputError(f"{path.name}: column(s) {named} look like identifying data (names, birth dates, record "
                         "numbers) or raw ids; a stack holds pseudonymous ids only: name id columns patient_id, "
                         "study_id, series_id or instance_id and they are pseudonymised")
    table = table.copy()
    table["_line"] = np.arange(2, len(table) + 2)
    table["_key"] = [_safe_source(s) for s in table["source"]]
    # NB: a name holding a backslash is addressed literally when such a file exists (see `match_source`)
    table["_literal"] = [_safe_source(s, backslash=False) for s in table["source"]]
    dup = table["_key"].notna() & table["_key"].duplicated(keep=False)
    if dup.any():
        raise InputError(f"{path.name} line {int(table['_line'][dup].iloc[0])}: a source listed twice")
    return table
