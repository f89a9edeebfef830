"""ROI tables: validation of user tables, and the article's multi-ROI sampling inside lesions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from gpucnr.backend import to_host
from gpucnr.errors import RoiTableError
from gpucnr.kernels.footprints import ball_offsets
from gpucnr.kernels.masks import KIND_DISK, KIND_SQUARE

__all__ = ["KINDS", "MAX_COORDINATE", "normalize_table", "sample_rois"]

#: ROI kinds a table may name, and their kernel codes.
KINDS = {"square": KIND_SQUARE, "disk": KIND_DISK}
_COLUMNS = ("image", "roi", "kind", "cx", "cy", "r")
#: The largest |cx|, |cy| and r an ROI may have: far beyond any image, far from int64 overflow in the kernels'
#: window arithmetic (cy - r, cy + r + 1, areas of windows).
MAX_COORDINATE = 2**31 - 1


def normalize_table(table: Any, n_images: int) -> pd.DataFrame:
    """Check an ROI table and return it as a DataFrame with typed columns.

    Parameters
    ----------
    table : pandas.DataFrame or mapping of column -> 1-D array
        Columns image, roi, kind (square | disk), cx, cy, r (integer pixels) and optionally name.
    n_images : int
        Number of images the table refers to; ``image`` must lie in [0, n_images).

    Returns
    -------
    pandas.DataFrame
        Columns image, roi, cx, cy, r (int64), kind (str), kind_code (int64), name (str, "" if absent).

    Raises
    ------
    RoiTableError
        Naming the column and the first offending row.
    """
    if isinstance(table, pd.DataFrame):
        df = table.reset_index(drop=True)
    elif isinstance(table, Mapping):
        try:
            df = pd.DataFrame({k: to_host(np.asarray(v) if isinstance(v, list | tuple) else v) for k, v in
                               table.items()})
        except ValueError as e:
            raise RoiTableError(f"ROI table columns have different lengths: {e}") from None
    else:
        hint = " (automatic regions: rois='auto', lower case)" if isinstance(table, str) else ""
        raise RoiTableError(f"an ROI table must be a pandas DataFrame or a dict of arrays, got "
                            f"{type(table).__name__}{hint}")
    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        raise RoiTableError(f"ROI table lacks column(s) {missing}; it needs {list(_COLUMNS)} [+ name]")
    cols = {c: _integer_column(df, c) for c in ("image", "roi", "cx", "cy", "r")}
    # NB: validated on plain NumPy columns, then one DataFrame: pandas' per-operation overhead showed up
    # in measure() on small stacks.
    # NB: each distinct spelling normalised once (a million rows hold a handful): string ops per row cost 0.2 s
    index, spellings = _distinct(df["kind"])
    norm = np.char.lower(np.char.strip(np.asarray(spellings).astype(str))) if len(spellings) else np.empty(0, str)
    code = np.array([KINDS.get(v, -1) for v in norm.tolist()], np.int64)[index] if len(norm) else \
        np.zeros(0, np.int64)
    if (code < 0).any():
        row = int(np.flatnonzero(code < 0)[0])
        raise RoiTableError(f"ROI table row {row}: kind {df['kind'].iloc[row]!r} is not one of {list(KINDS)}")
    name = _names(df["name"]) if "name" in df.columns else np.full(len(df), "")
    _check_range(cols, "image", 0, n_images - 1, f"an image index in [0, {n_images})")
    _check_range(cols, "roi", 1, None, "an ROI id >= 1 (0 means 'no ROI')")
    _check_range(cols, "r", 0, MAX_COORDINATE, f"a radius in [0, {MAX_COORDINATE}]")
    for c in ("cx", "cy"):
        _check_range(cols, c, -MAX_COORDINATE, MAX_COORDINATE, f"a pixel coordinate within +-{MAX_COORDINATE}")
    # NB: hashed, not np.unique(axis=0) (a structured sort: 0.3 s for a million rows); the first row that repeats
    # an earlier (image, roi)
    image, roi = cols["image"], cols["roi"]
    span = int(roi.max()) + 1 if len(roi) else 1
    if len(image) and int(image.max()) < 2**62 // span:
        key = image * span + roi
        # NB: a stored table is in (image, roi) order: strictly increasing keys repeat none, no hashing needed
        repeated = np.zeros(len(key), bool) if (np.diff(key) > 0).all() else pd.Series(key).duplicated().to_numpy()
    else:
        repeated = pd.DataFrame({"image": image, "roi": roi}).duplicated().to_numpy()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise RoiTableError(
            f"ROI table row {row}: image {cols['image'][row]} already has an ROI with id {cols['roi'][row]}"
        )
    # NB: the text columns built from their distinct values (pandas' str dtype, as a frame would infer): a
    # per-row conversion cost 0.15 s a million rows; no numeric column is copied into a block
    kind = pd.array(norm.astype(object), dtype="str").take(index) if len(norm) else df["kind"].to_numpy().astype(str)
    return pd.DataFrame({**cols, "kind": kind, "kind_code": code, "name": name}, copy=False)


def _distinct(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(index, distinct values) of `column` as `pandas.factorize` without a missing sentinel gives them; a
    categorical column (a stored table's coded text) gives its codes and categories without hashing its rows."""
    if isinstance(column.dtype, pd.CategoricalDtype) and not column.hasnans:
        return column.cat.codes.to_numpy(), column.cat.categories.to_numpy(object)
    return pd.factorize(column.to_numpy(), use_na_sentinel=False)


def _names(column: pd.Series):
    """``column.fillna("").astype(str)``'s values; when every value is already a str or missing (a stored table),
    built from its distinct values: the conversion through pandas' str dtype cost 0.3 s a million rows."""
    values = column.to_numpy() if not isinstance(column.dtype, pd.CategoricalDtype) else None
    if values is None or values.dtype == object:
        if values is None:
            index, distinct = column.cat.codes.to_numpy(), column.cat.categories.to_numpy(object)
        else:
            index, distinct = pd.factorize(values, use_na_sentinel=True)
        if all(type(v) is str for v in distinct):
            table = np.empty(len(distinct) + 1, object)
            table[:-1] = distinct
            table[-1] = ""
            return pd.array(table, dtype="str").take(index)  # NB: index -1 (missing) picks the trailing ""
    return column.fillna("").astype(str).to_numpy()


def _integer_column(df: pd.DataFrame, col: str) -> np.ndarray:
    values = df[col].to_numpy()
    if values.dtype.kind == "i":
        return values.astype(np.int64)
    if values.dtype.kind == "u":
        big = values > np.iinfo(np.int64).max
        if not big.any():
            return values.astype(np.int64)
        row = int(np.flatnonzero(big)[0])
        raise RoiTableError(f"ROI table row {row}: {col} = {values[row]} is beyond the range of int64")
    try:
        as_float = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        as_float = None
    if as_float is not None:
        # NB: beyond 2**62 the cast to int64 would wrap (and warn): such values are refused, not cast.
        ok = np.isfinite(as_float) & (as_float == np.round(as_float)) & (np.abs(as_float) <= 2.0**62)
        if ok.all():
            return as_float.astype(np.int64)
        row = int(np.flatnonzero(~ok)[0])
    else:
        row = next((i for i, v in enumerate(values) if not _is_integral(v)), 0)
    raise RoiTableError(f"ROI table row {row}: {col} = {values[row]!r} is not an integer pixel value within int64")


def _is_integral(v) -> bool:
    try:
        return float(v) == int(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


def _check_range(cols, col, lo, hi, what):
    v = cols[col]
    bad = (v < lo) | ((v > hi) if hi is not None else False)
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise RoiTableError(f"ROI table row {row}: {col} = {v[row]} is not {what}")


def sample_rois(lesion_masks, *, k: int = 5, r: int = 5, kind: str = "square", seed: int = 0,
                start: int = 0) -> pd.DataFrame:
    """Draw up to `k` ROIs per image inside its lesion: the article's multi-ROI sampling (section 4.1).

    Parameters
    ----------
    lesion_masks : array, shape (H, W) or (n, H, W)
        Lesion masks (bool) or label arrays: an ROI must lie wholly inside one lesion label.
    k : int
        ROIs per image (fewer where fewer centres are admissible; none where the lesion is too small).
    r : int
        ROI radius in pixels (square: [c - r, c + r), 2r wide; disk: Euclidean radius r).
    kind : {"square", "disk"}
    seed : int
        Centres of image i are drawn by ``numpy.random.default_rng((seed, start + i))``, uniformly
        without replacement from its admissible pixels in row-major order, so neither batching nor backend
        changes them.
    start : int
        Global index of the first image (its ``image`` value in the table).

    Returns
    -------
    pandas.DataFrame
        Columns image (global index), roi (1..k, in draw order), kind, cx, cy, r, name (``"sample"``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if k < 0 or r < 0 or (kind == "square" and r < 1):
        raise ValueError(f"need k >= 0 and r >= 1 (square) or r >= 0 (disk), got k={k}, r={r}")
    masks = to_host(lesion_masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"lesion_masks must be (H, W) or (n, H, W), got shape {masks.shape}")
    admissible = _admissible_centres(masks, r, kind)
    rows = []
    for i in range(masks.shape[0]):
        flat = np.flatnonzero(admissible[i])
        rng = np.random.default_rng((seed, start + i))
        take = min(k, flat.size)
        chosen = flat[rng.choice(flat.size, size=take, replace=False)] if take else flat[:0]
        cy, cx = np.divmod(chosen, masks.shape[2])
        for j in range(take):
            rows.append((start + i, j + 1, kind, int(cx[j]), int(cy[j]), r, "sample"))
    return pd.DataFrame(rows, columns=["image", "roi", "kind", "cx", "cy", "r", "name"]).astype(
        {"image": np.int64, "roi": np.int64, "cx": np.int64, "cy": np.int64, "r": np.int64}
    )


def _admissible_centres(masks: np.ndarray, r: int, kind: str) -> np.ndarray:
    """Centres whose whole ROI lies inside the image and inside one (non-zero) lesion label."""
    n, height, width = masks.shape
    out = np.zeros(masks.shape, bool)
    for value in np.unique(masks[masks != 0]):
        inside = masks == value
        if kind == "disk":
            offs = ball_offsets("l2", r)
            fp = np.zeros((1, 2 * r + 1, 2 * r + 1), bool)
            for dy, dx in offs:
                fp[0, dy + r, dx + r] = True
            from scipy import ndimage  # NB: here, not at import: `gpucnr ingest` imports this module (issue 18)

            out |= ndimage.binary_erosion(inside, structure=fp, border_value=0)
            continue
        # Square [c - r, c + r): a 2r x 2r box; integral images give every box sum at once.
        integral = np.zeros((n, height + 1, width + 1), np.int64)
        integral[:, 1:, 1:] = inside.cumsum(1).cumsum(2)
        side = 2 * r
        if side > height or side > width:
            continue
        box = (integral[:, side:, side:] - integral[:, :-side, side:] - integral[:, side:, :-side]
               + integral[:, :-side, :-side])
        # box[y0, x0] covers rows y0..y0+2r-1, so its centre is (y0 + r, x0 + r).
        full = box == side * side
        out[:, r : r + full.shape[1], r : r + full.shape[2]] |= full
    return out
