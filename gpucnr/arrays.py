"""gpucnr.measure: CNR of in-memory (NumPy, CuPy, array-API) or Dask image stacks, as an xarray Dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import dask
import dask.array as da
import numpy as np
import xarray as xr

from gpucnr._version import __version__
from gpucnr.backend import namespace, resolve_backend, to_backend, to_host
from gpucnr.errors import InputError, ShapeMismatchError
from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE, measure_batch
from gpucnr.kernels.cnr import STATUS
from gpucnr.kernels.params import Params
from gpucnr.roitable import normalize_table

__all__ = ["STATUS_LEGEND", "align_columns", "measure", "results_dataset"]

#: Human-readable status codes, stored in every result's attributes.
STATUS_LEGEND = ", ".join(f"{v}={k}" for k, v in sorted(STATUS.items(), key=lambda kv: kv[1]))

# Pixels per batch when the caller gives no batching (NumPy/array-API input): 64 images of 512 x 512.
# Per-batch overhead (a few hundred small array operations) favours large batches (measured: 4-image
# batches ran 2.5x slower than 64-image ones); the portable path's temporaries (a few 8-byte copies of the
# batch, ~0.5 GB) bound it from above.
_PIXELS_PER_BATCH = 1 << 24


def measure(
    images,
    rois,
    *,
    background: str = "complement",
    footprint: str = "cross",
    dilation: int = 5,
    border: int = 5,
    ring_gap: int = 5,
    ring_width: int = 10,
    labels=None,
    background_label: int | None = None,
    min_bg: int = 30,
    ddof: int = 1,
    definition: str = "pooled",
    gcnr_bins: str | int = "auto",
    signed: bool = False,
    backend: str = "auto",
) -> xr.Dataset:
    """Measure the CNR of every (image, ROI) of a stack.

    Parameters
    ----------
    images : array, shape (H, W) or (n, H, W)
        NumPy, CuPy, Dask or any array-API array, integer or float. A Dask array is rechunked to whole
        images and processed block by block (never materialised whole).
    rois : int array of the shape of `images`, or ROI table
        A label array (0 = none, k >= 1 = ROI id k) or a table (pandas DataFrame or dict of arrays) with
        columns image, roi, kind (square | disk), cx, cy, r (integer pixels) and optionally name.
    background : {"complement", "ring", "complement-all", "label"}
        How the background of an ROI is chosen (DESIGN §4). ``complement`` is the article's.
    footprint : {"cross", "disk", "matlab-disk", "square"}
        Structuring element of the dilation (``cross`` iterated = the article's Python; ``matlab-disk``
        = its MATLAB ``strel('disk', 5)``).
    dilation, border, ring_gap, ring_width : int
        Dilation radius, width of the image frame left out of the background, ring geometry.
    labels : int array of the shape of `images`, optional
        background="label": where the background label is looked up (defaults to `rois` when that is a
        label array); background="complement-all" with an ROI table: lesions removed (dilated) too.
    background_label : int, optional
        The label of the background pixels (background="label" only; required there).
    min_bg : int
        Backgrounds with fewer pixels get status background-too-small.
    ddof : int
        Delta degrees of freedom of the variances (1: article's Python; 0: its MATLAB).
    definition : {"pooled", "background", "roi", "pooled-mean", "gcnr"}
    gcnr_bins : "auto" or int
    signed : bool
        Keep the sign of mean_roi - mean_bg.
    backend : {"auto", "numpy", "cupy"}
        Where the kernels run. "cupy" without a GPU raises; nothing falls back silently.

    Returns
    -------
    xarray.Dataset
        Dims (image, roi). Variables n_roi, mean_roi, var_roi, n_bg, mean_bg, var_bg, cnr, status,
        roi_name of dims (image, roi); cnr_median, n_valid, n_excluded of dims (image,). Every option
        is recorded in ``attrs``.
    """
    params = Params(background=background, footprint=footprint, dilation=dilation, border=border,
                    ring_gap=ring_gap, ring_width=ring_width, background_label=background_label,
                    min_bg=min_bg, ddof=ddof, definition=definition, gcnr_bins=gcnr_bins, signed=signed)
    stack = _as_stack(images, "images")
    # NB: a Dask array runs where its chunks live (its _meta tells NumPy from CuPy).
    where = resolve_backend(backend, stack.data._meta if stack.lazy else stack.data)
    roi_labels, table = _as_rois(rois, stack)
    lesions = None if labels is None else _as_stack(labels, "labels")
    if lesions is not None:
        _check_same_shape(stack, lesions, "labels")
        if params.background not in ("label", "complement-all"):
            raise InputError(f"labels= is used by background='label' or 'complement-all', not {params.background!r}")
        if params.background == "complement-all" and roi_labels is not None:
            raise InputError("complement-all with a label array removes all its labels already; drop labels=")
    if params.background == "label" and lesions is None:
        if roi_labels is None:
            raise InputError("background='label' with an ROI table needs labels= (the background label array)")
        lesions = roi_labels
    # NB: a table fixes the ROI ids up front; a label array's ids are found batch by batch (no extra pass
    # over the labels) and the batches' columns are aligned on their union afterwards.
    roi_ids = None if table is None else np.unique(table["roi"].to_numpy()).astype(np.int64)
    parts = _run_batches(stack, roi_labels, lesions, table, roi_ids, params, where)
    roi_ids, values = _merge_batches(parts)
    names = _roi_names(table, roi_ids, stack.shape[0])
    return results_dataset(values, np.arange(stack.shape[0]), roi_ids, names, params,
                           backend=_backend_name(where, stack),
                           extra_attrs={"labels": "none" if labels is None else "given"})


def results_dataset(values: dict, image_index, roi_ids, names, params: Params, *, backend: str,
                    extra_attrs: dict | None = None) -> xr.Dataset:
    """Assemble kernel outputs (host arrays) into the results Dataset of DESIGN §6."""
    cell = ("image", "roi")
    data = {k: (cell, values[k]) for k in OUTPUT_CELL}
    data.update({k: (("image",), values[k]) for k in OUTPUT_IMAGE})
    data["roi_name"] = (cell, names)
    ds = xr.Dataset(data, coords={"image": np.asarray(image_index, np.int64), "roi": np.asarray(roi_ids, np.int64)})
    ds.attrs.update(params.as_attrs())
    ds.attrs.update({"backend": backend, "gpucnr_version": __version__, "status_codes": STATUS_LEGEND})
    if extra_attrs:
        ds.attrs.update(extra_attrs)
    return ds


@dataclass
class _Stack:
    """An (n, H, W) input that knows whether it is Dask."""

    data: Any
    lazy: bool

    @property
    def shape(self):
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype


def _as_stack(a, what: str) -> _Stack:
    lazy = isinstance(a, da.Array)
    if not lazy and not array_api_compat.is_array_api_obj(a):
        if isinstance(a, list | tuple) and len({np.shape(p) for p in a}) > 1:
            shapes = sorted({tuple(np.shape(p)) for p in a})
            raise InputError(f"{what} are of different sizes ({', '.join(map(str, shapes[:4]))}"
                             f"{' ...' if len(shapes) > 4 else ''}); measure() takes images of one size. For images "
                             "of many sizes, write them as a stack (gpucnr.write_stack(path, images, ...), which keeps "
                             "each size) and measure it with gpucnr.run(path, results)")
        a = np.asarray(a)
    if a.ndim == 2:
        a = a[None, ...]
    if a.ndim != 3:
        raise InputError(f"{what} must be (H, W) or (n, H, W), got shape {tuple(a.shape)}")
    kind = np.dtype(str(a.dtype).split(".")[-1]).kind if not lazy else a.dtype.kind
    if kind not in "biuf":
        raise InputError(f"{what} must be integer, boolean or float, got dtype {a.dtype}")
    if kind == "b":
        a = a.astype(np.uint8) if lazy else namespace(a).astype(a, namespace(a).uint8)
    return _Stack(a, lazy)


def _check_same_shape(stack: _Stack, other: _Stack, what: str) -> None:
    if other.shape != stack.shape:
        raise ShapeMismatchError(f"images have shape {stack.shape} but {what} have shape {other.shape}")


def _as_rois(rois, stack: _Stack):
    """Split `rois` into a label stack or a normalised table."""
    is_array = isinstance(rois, da.Array) or array_api_compat.is_array_api_obj(rois)
    if is_array:
        labels = _as_stack(rois, "ROI labels")
        _check_same_shape(stack, labels, "ROI labels")
        kind = labels.dtype.kind if labels.lazy else np.dtype(str(labels.dtype).split(".")[-1]).kind
        if kind not in "iub":
            raise InputError(f"an ROI label array must be integer, got dtype {labels.dtype}")
        return labels, None
    return None, normalize_table(rois, stack.shape[0])


def align_columns(out: dict, roi_ids: np.ndarray) -> dict:
    """A batch's (image, roi) outputs, found for the ids ``out["roi_ids"]``, placed on the columns `roi_ids`
    (a superset): the other columns hold what an absent ROI holds (n 0, status absent, NaN)."""
    found = np.asarray(out["roi_ids"])
    if np.array_equal(found, roi_ids):
        return out
    cols = np.searchsorted(roi_ids, found)
    # NB: an id outside `roi_ids` has no column to go to (cannot happen with a union, guarded all the same).
    keep = (cols < len(roi_ids)) & (np.asarray(roi_ids)[np.clip(cols, 0, max(len(roi_ids) - 1, 0))] == found)
    aligned = dict(out, roi_ids=np.asarray(roi_ids))
    for k in OUTPUT_CELL:
        fill = {"n_roi": 0, "n_bg": 0, "status": STATUS["absent"]}.get(k, np.nan)
        full = np.full((out[k].shape[0], len(roi_ids)), fill, dtype=out[k].dtype)
        full[:, cols[keep]] = out[k][:, keep]
        aligned[k] = full
    return aligned


def _merge_batches(parts: list[dict]):
    """Concatenate batch outputs along images, aligning their ROI columns on the union of their ids."""
    roi_ids = np.unique(np.concatenate([p["roi_ids"] for p in parts])).astype(np.int64)
    parts = [align_columns(p, roi_ids) for p in parts]
    values = {k: np.concatenate([p[k] for p in parts]) for k in OUTPUT_CELL + OUTPUT_IMAGE}
    return roi_ids, values


def _roi_names(table, roi_ids, n: int) -> np.ndarray:
    names = np.full((n, roi_ids.size), "", dtype=object)
    if table is not None and len(table):
        col = np.searchsorted(roi_ids, table["roi"].to_numpy())
        names[table["image"].to_numpy(), col] = table["name"].to_numpy()
    return names.astype(str)


def _batch_size(stack: _Stack) -> int:
    return max(1, _PIXELS_PER_BATCH // max(1, stack.shape[1] * stack.shape[2]))


def _blocks(stack: _Stack, size: int):
    """Yield (start, stop) of consecutive whole-image blocks: Dask's own chunks, else `size` images."""
    if stack.lazy:
        bounds = np.cumsum((0, *stack.data.chunks[0]))
    else:
        bounds = np.unique(np.r_[np.arange(0, stack.shape[0], size), stack.shape[0]])
    yield from zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)


def _run_batches(stack, roi_labels, lesions, table, roi_ids, params, where):
    size = _batch_size(stack)
    if stack.lazy:
        # NB: whole images per block; other lazy inputs follow the images' image chunks.
        chunks = (stack.data.chunks[0], stack.shape[1], stack.shape[2])
        stack = _Stack(stack.data.rechunk(chunks), True)
        roi_labels = _rechunk_like(roi_labels, chunks)
        lesions = _rechunk_like(lesions, chunks)
    spans = list(_blocks(stack, size))
    if table is not None:
        table = table.sort_values("image", kind="stable")
    if not stack.lazy:
        # NB: one batch after another; within a batch the NumPy path spreads its image pass over threads.
        return [_one_batch(stack.data[a:b, ...], _slice(roi_labels, a, b), _slice(lesions, a, b), table, a, b,
                           roi_ids, params, where) for a, b in spans]
    # Dask input: a few blocks at a time through the scheduler, so memory stays bounded by that window.
    tasks = [
        dask.delayed(_one_batch)(stack.data[a:b, ...], _slice(roi_labels, a, b), _slice(lesions, a, b), table, a, b,
                                 roi_ids, params, where)
        for a, b in spans
    ]
    window = max(2, 2 * (dask.config.get("num_workers", None) or 2))
    out = []
    for i in range(0, len(tasks), window):
        out.extend(dask.compute(*tasks[i : i + window]))
    return out


def _rechunk_like(other: _Stack | None, chunks):
    if other is None:
        return None
    data = other.data if other.lazy else da.from_array(other.data, chunks=chunks)
    return _Stack(data.rechunk(chunks), True)


def _slice(s: _Stack | None, a: int, b: int):
    return None if s is None else s.data[a:b, ...]


def _one_batch(images, labels, lesions, table, start, stop, roi_ids, params, where) -> dict:
    """Measure images [start, stop): move to the backend, run the kernels, return host arrays."""
    images = to_backend(images, where)
    xp = namespace(images)
    labels = _alongside(labels, images, xp, where)
    lesions = _alongside(lesions, images, xp, where)
    for name, lab in (("ROI labels", labels), ("labels", lesions)):
        # NB: unsigned labels cannot be negative; signed ones cost one comparison pass to check.
        if lab is not None and xp.isdtype(lab.dtype, "signed integer") and lab.size and int(xp.min(lab)) < 0:
            raise InputError(f"{name} of images {start}..{stop - 1} hold negative values; labels are >= 0 "
                             "(0 = no ROI)")
    batch_table = None
    if table is not None:
        lo, hi = np.searchsorted(table["image"].to_numpy(), [start, stop])
        rows = table.iloc[lo:hi]
        cols = np.searchsorted(roi_ids, rows["roi"].to_numpy())
        batch_table = {
            "image": rows["image"].to_numpy() - start,
            "col": cols,
            "kind": rows["kind_code"].to_numpy(),
            "cx": rows["cx"].to_numpy(),
            "cy": rows["cy"].to_numpy(),
            "r": rows["r"].to_numpy(),
        }
        batch_table = {k: xp.asarray(np.asarray(v, np.int64), device=array_api_compat.device(images))
                       for k, v in batch_table.items()}
    ids = None if roi_ids is None else xp.asarray(roi_ids, device=array_api_compat.device(images))
    out = measure_batch(xp, images, roi_ids=ids, params=params, labels=labels, table=batch_table,
                        lesions=lesions)
    return {k: to_host(v) for k, v in out.items()}


def _alongside(a, images, xp, where):
    """`a` moved where `images` are, explicitly (a NumPy label array beside array-API images, say)."""
    if a is None:
        return None
    a = to_backend(a, where)
    if where == "native" and namespace(a) is not xp:
        a = xp.asarray(to_host(a), device=array_api_compat.device(images))
    return a


def _backend_name(where: str, stack: _Stack) -> str:
    if where != "native":
        return where
    return array_api_compat.array_namespace(stack.data).__name__
