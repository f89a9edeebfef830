"""gpucnr.measure: CNR of in-memory (NumPy, CuPy, array-API) or Dask image stacks, as an xarray Dataset."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import xarray as xr

from gpucnr._version import __version__
from gpucnr.backend import namespace, resolve_backend, to_backend, to_host
from gpucnr.errors import InputError, LabelRangeError, OptionError, OptionTypeError, ShapeMismatchError
from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE, measure_batch
from gpucnr.kernels.cnr import STATUS
from gpucnr.kernels.params import Params
from gpucnr.kernels.regions import (
    AUTO_IMAGE,
    AUTO_ROI_IDS,
    AUTO_ROI_NAMES,
    DEFAULT_EDGE,
    NOISE_SOURCES,
    check_auto_options,
    find_regions,
    measure_auto,
)
from gpucnr.roitable import normalize_table

__all__ = ["STATUS_LEGEND", "align_columns", "auto_regions", "is_auto", "measure", "results_dataset"]

#: Human-readable status codes, stored in every result's attributes.
STATUS_LEGEND = ", ".join(f"{v}={k}" for k, v in sorted(STATUS.items(), key=lambda kv: kv[1]))

# Pixels per batch when the caller gives no batching (NumPy/array-API input): 64 images of 512 x 512.
# Per-batch overhead (a few hundred small array operations) favours large batches (measured: 4-image
# batches ran 2.5x slower than 64-image ones); the portable path's temporaries (a few 8-byte copies of the
# batch, ~0.5 GB) bound it from above.
_PIXELS_PER_BATCH = 1 << 24
_INT64_MAX = (1 << 63) - 1


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
    edge: int = DEFAULT_EDGE,
) -> xr.Dataset:
    """Measure the CNR of every (image, ROI) of a stack.

    Parameters
    ----------
    images : array, shape (H, W) or (n, H, W)
        NumPy, CuPy, Dask or any array-API array, integer or float, or an xarray.DataArray of one of them. A Dask
        array is rechunked to whole images, its consecutive chunks merged to at least 2**24 pixels, and processed
        block by block (never materialised whole), through the active ``dask.distributed`` client if there is
        one (futures, a bounded number in flight), else the local scheduler. A DataArray of dims (image, y, x)
        such as `gpucnr.Stack.to_xarray` returns lends its per-image coordinates ``valid_h``, ``valid_w``,
        ``slope``, ``intercept``, ``padding`` and ``photometric`` to the measurement, as `gpucnr.run` takes them
        from the stack, and its ``image`` coordinate to the results.
    rois : int array of the shape of `images`, ROI table, or "auto"
        A label array (0 = none, k >= 1 = ROI id k) or a table (pandas DataFrame or dict of arrays) with
        columns image, roi, kind (square | disk), cx, cy, r (integer pixels) and optionally name. ``"auto"``:
        the automatic regions of every image (`gpucnr.auto_regions`; DESIGN §9): two cells with fixed ids,
        1 ``foreground`` (the body against the air) and 2 ``tissue`` (the upper tissue class against the lower),
        and per image the air moments ``n_air``, ``mean_air``, ``var_air`` and ``noise_source``. Only the
        default `background` is legal with it (its backgrounds are the air and the lower class; `footprint`,
        `dilation`, `border` and the ring options do not apply), and `labels` is refused.
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
    definition : {"pooled", "background", "roi", "pooled-mean", "gcnr", "mriqc", "viqa", "mrqy"}
        ``mriqc`` (rois="auto" only): MRIQC's |μ1 − μ2| / √(σ_air² + σ1² + σ2²) on the tissue cell, with the
        image's air variance (without it where the image has no air: ``noise_source`` "tissue"); the foreground
        cell, whose background is the air, counts the air variance once (the pooled formula).
        "viqa" reproduces vIQA's CNR, ``(mu_r - mu_b) / sigma_b`` with the population standard deviation and
        the sign of the difference (in modality units, never flipped by the display polarity). "mrqy" reproduces
        MRQy's and RadQy's, ``mean(P_r - P_b) / std(P_b)`` over their 5x5 patches next to the maximum of each
        region's zero-filled image, on stored values (quirks kept: `gpucnr.kernels.patches`). Both set
        ``ddof=0, signed=True`` whatever was given, recorded in the attribute ``definition_forces``.
    gcnr_bins : "auto" or int
    signed : bool
        Keep the sign of mean_roi - mean_bg.
    backend : {"auto", "numpy", "cupy"}
        Where the kernels run. "cupy" without a GPU raises; nothing falls back silently.
    edge : int
        rois="auto" only: width (px) of the band removed where two automatic regions meet (default 2).

    Returns
    -------
    xarray.Dataset
        Dims (image, roi). Variables n_roi, mean_roi, var_roi, n_bg, mean_bg, var_bg, cnr, status,
        roi_name of dims (image, roi); cnr_median, n_valid, n_excluded of dims (image,) (and, for rois="auto",
        n_air, mean_air, var_air, noise_source). Every option is recorded in ``attrs``.

    Notes
    -----
    The default definition is the article's [1]_, :math:`|\\mu_r - \\mu_b| / \\sqrt{\\sigma_r^2 + \\sigma_b^2}`
    with the ROI r and its background b chosen as its ``select_roi`` and ``get_background`` do (square ROI,
    background = the ROI dilated and a 5-px frame removed; ``ddof=1`` as its Python, 0 as its MATLAB).
    ``definition="gcnr"`` is the generalised CNR of Rodriguez-Molares et al. [2]_, [3]_,
    :math:`1 - \\sum_k \\min(p_r(k), p_b(k))` over a common binning of the two regions' values. Means and
    variances are exact for integer images and shifted two-pass float64 otherwise (docs/accuracy.md).

    References
    ----------
    .. [1] The CNR article gpucnr reproduces (the project's seed text, ``shared/seed/cnr-article.txt``):
       CNR = |μ1 − μ2| / √(σ1² + σ2²), its ``select_roi``, ``get_background``, ``calculate_cnr`` and MATLAB
       ``calculate_cnr_matlab``, and the multi-ROI median of its section 4.1.
    .. [2] A. Rodriguez-Molares, O. M. H. Rindal, J. D'hooge, S.-E. Måsøy, A. Austeng and H. Torp, "The
       generalized contrast-to-noise ratio," 2018 IEEE International Ultrasonics Symposium (IUS), 2018.
    .. [3] A. Rodriguez-Molares et al., "The generalized contrast-to-noise ratio: a formal definition for lesion
       detectability," IEEE Trans. Ultrason. Ferroelectr. Freq. Control 67(4), 745-759 (2020),
       doi:10.1109/TUFFC.2019.2956855.

    Examples
    --------
    >>> import gpucnr
    >>> from gpucnr.phantom import make_phantom
    >>> ph = make_phantom(4, (96, 96), seed=0)
    >>> ds = gpucnr.measure(ph.images, ph.labels, backend="numpy")
    >>> ds["cnr"].dims
    ('image', 'roi')
    """
    params = Params(background=background, footprint=footprint, dilation=dilation, border=border,
                    ring_gap=ring_gap, ring_width=ring_width, background_label=background_label,
                    min_bg=min_bg, ddof=ddof, definition=definition, gcnr_bins=gcnr_bins, signed=signed)
    auto = is_auto(rois)
    check_auto_options(params, auto=auto)
    edge = check_edge(edge, auto=auto)
    per_image, index = _per_image(images)
    stack = _as_stack(images, "images")
    # NB: a Dask array runs where its chunks live (its _meta tells NumPy from CuPy).
    where = resolve_backend(backend, stack.data._meta if stack.lazy else stack.data)
    if auto:
        if labels is not None:
            raise InputError("rois='auto' finds its own regions and backgrounds: drop labels=")
        parts = _run_batches(stack, None, None, None, None, params, where, per_image, auto=edge)
        values = {k: np.concatenate([p[k] for p in parts]) for k in (*OUTPUT_CELL, *OUTPUT_IMAGE, *AUTO_IMAGE)}
        names = np.tile(np.asarray(AUTO_ROI_NAMES, dtype=str), (stack.shape[0], 1))
        return results_dataset(values, np.arange(stack.shape[0]) if index is None else index,
                               np.asarray(AUTO_ROI_IDS, np.int64), names, params, backend=_backend_name(where, stack),
                               extra_attrs={"labels": "none", "roi_source": "auto", "edge": edge})
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
    parts = _run_batches(stack, roi_labels, lesions, table, roi_ids, params, where, per_image)
    roi_ids, values = _merge_batches(parts)
    names = _roi_names(table, roi_ids, stack.shape[0])
    return results_dataset(values, np.arange(stack.shape[0]) if index is None else index, roi_ids, names, params,
                           backend=_backend_name(where, stack),
                           extra_attrs={"labels": "none" if labels is None else "given"})


def results_dataset(values: dict, image_index, roi_ids, names, params: Params, *, backend: str,
                    extra_attrs: dict | None = None) -> xr.Dataset:
    """Assemble kernel outputs (host arrays) into the results Dataset of DESIGN §6."""
    cell = ("image", "roi")
    data = {k: (cell, values[k]) for k in OUTPUT_CELL}
    data.update({k: (("image",), values[k]) for k in (*OUTPUT_IMAGE, *AUTO_IMAGE) if k in values})
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
    if isinstance(a, xr.DataArray):
        # NB: its data as it is (a Dask array stays lazy); `_per_image` reads its per-image coordinates.
        a = a.data
    lazy = array_api_compat.is_dask_array(a)
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
    a = _native(a)
    return _Stack(a, lazy)


def _native(a):
    """NumPy or Dask input in native byte order, float16 as float32: both conversions are exact, and the
    compiled kernels (and CuPy) take neither a big-endian nor a half-precision array."""
    dtype = getattr(a, "dtype", None)
    if not isinstance(dtype, np.dtype):
        return a
    if dtype == np.float16:
        return a.astype(np.float32)
    if not dtype.isnative:
        return a.astype(dtype.newbyteorder("="))
    return a


def _check_same_shape(stack: _Stack, other: _Stack, what: str) -> None:
    if other.shape != stack.shape:
        raise ShapeMismatchError(f"images have shape {stack.shape} but {what} have shape {other.shape}")


def _as_rois(rois, stack: _Stack):
    """Split `rois` into a label stack or a normalised table."""
    if isinstance(rois, xr.DataArray):
        rois = rois.data
    is_array = array_api_compat.is_dask_array(rois) or array_api_compat.is_array_api_obj(rois)
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


#: Per-image coordinates of an xarray input (`gpucnr.Stack.to_xarray`'s) that the kernels use, as `gpucnr.run`
#: uses the stack's per-image table.
_PER_IMAGE = ("valid_h", "valid_w", "slope", "intercept", "padding")


def _per_image(images):
    """From an xarray.DataArray of dims (image, y, x): its per-image coordinates that the kernels take (valid
    extent, rescale, padding, polarity from ``photometric``; host arrays) and its ``image`` coordinate (the global
    image index, kept as the results' ``image``). ``(None, None)`` for other inputs."""
    if not isinstance(images, xr.DataArray) or images.ndim != 3:
        return None, None
    coords = images.coords
    out = {}
    for name, dtype in zip(_PER_IMAGE, (np.int64, np.int64, np.float64, np.float64, np.float64), strict=True):
        if name in coords and coords[name].dims == (images.dims[0],):
            out[name] = np.asarray(coords[name].values, dtype)
    if "photometric" in coords and coords["photometric"].dims == (images.dims[0],):
        out["polarity"] = np.where(np.asarray(coords["photometric"].values).astype(str) == "MONOCHROME1", -1.0, 1.0)
    index = None
    if images.dims[0] in coords and np.asarray(coords[images.dims[0]].values).dtype.kind in "iu":
        index = np.asarray(coords[images.dims[0]].values, np.int64)
    return out or None, index


def _batch_size(stack: _Stack) -> int:
    return max(1, _PIXELS_PER_BATCH // max(1, stack.shape[1] * stack.shape[2]))


def _coalesced(chunks, plane: int) -> tuple[int, ...]:
    """Consecutive image chunks merged until each holds at least 2**24 pixels (the last one may hold fewer):
    never split, so a chunk of whole shards (`Stack.to_xarray`) stays whole within its batch.

    NB: one-image chunks (``dask.array.from_zarr`` of a stack) cost the kernels' per-batch overhead once per
    image: measured 70x slower than in memory on 512 images of 128**2 before they were merged (issue 19).
    """
    out, acc = [], 0
    for c in chunks:
        acc += int(c)
        if acc * plane >= _PIXELS_PER_BATCH:
            out.append(acc)
            acc = 0
    if acc or not out:
        out.append(acc)
    return tuple(out)


def _active_client():
    """The distributed client of this context (``with Client(...)``, ``get_client()``), or None."""
    if "distributed" not in sys.modules:
        return None  # NB: no client without the module (and its import costs `gpucnr run` ~0.16 s)
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def _blocks(stack: _Stack, size: int):
    """Yield (start, stop) of consecutive whole-image blocks: Dask's own chunks, else `size` images."""
    if stack.lazy:
        bounds = np.cumsum((0, *stack.data.chunks[0]))
    else:
        bounds = np.unique(np.r_[np.arange(0, stack.shape[0], size), stack.shape[0]])
    yield from zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)


def _run_batches(stack, roi_labels, lesions, table, roi_ids, params, where, per_image=None, auto=None):
    size = _batch_size(stack)
    if stack.lazy:
        # NB: whole images per block, consecutive blocks merged to >= 2**24 pixels; other lazy inputs follow.
        chunks = (_coalesced(stack.data.chunks[0], stack.shape[1] * stack.shape[2]), stack.shape[1], stack.shape[2])
        stack = _Stack(stack.data.rechunk(chunks), True)
        roi_labels = _rechunk_like(roi_labels, chunks)
        lesions = _rechunk_like(lesions, chunks)
    spans = list(_blocks(stack, size))
    if table is not None:
        table = table.sort_values("image", kind="stable")
    if not stack.lazy:
        # NB: one batch after another; within a batch the NumPy path spreads its image pass over threads.
        return [_one_batch(stack.data[a:b, ...], _slice(roi_labels, a, b), _slice(lesions, a, b),
                           _rows(table, a, b), a, b, roi_ids, params, where, _span(per_image, a, b), auto)
                for a, b in spans]
    # Dask input: one task per block; each carries only its own rows of the ROI table.
    import dask

    tasks = [
        dask.delayed(_one_batch, pure=True)(stack.data[a:b, ...], _slice(roi_labels, a, b), _slice(lesions, a, b),
                                            _rows(table, a, b), a, b, roi_ids, params, where, _span(per_image, a, b),
                                            auto)
        for a, b in spans
    ]
    window = max(2, 2 * (dask.config.get("num_workers", None) or 2))
    client = _active_client()
    if client is not None:
        return _run_on_client(client, tasks, window)
    # NB: a few blocks at a time through the local scheduler, so memory stays bounded by that window.
    out = []
    for i in range(0, len(tasks), window):
        out.extend(dask.compute(*tasks[i : i + window]))
    return out


def _run_on_client(client, tasks, window: int) -> list[dict]:
    """The tasks as futures of the active distributed client, at most `window` in flight (as `gpucnr.run` does):
    results come back through `as_completed` and are put in block order."""
    from distributed import as_completed

    window = max(window, 2 * sum(client.nthreads().values()))
    out: list[dict | None] = [None] * len(tasks)
    todo = iter(enumerate(tasks))
    position = {}

    def submit():
        for i, task in todo:
            fut = client.compute(task)
            position[fut] = i
            return fut
        return None

    first = [f for f in (submit() for _ in range(window)) if f is not None]
    pending = as_completed(first)
    try:
        for fut in pending:
            out[position.pop(fut)] = fut.result()
            nxt = submit()
            if nxt is not None:
                pending.add(nxt)
    except BaseException:
        # NB: a failed block (or Ctrl-C) ends the call: the blocks still in flight are not left running.
        client.cancel(list(position))
        raise
    return out


def _span(per_image, start: int, stop: int):
    return None if per_image is None else {k: v[start:stop] for k, v in per_image.items()}


def _rows(table, start: int, stop: int):
    """The rows of a sorted ROI table that belong to images [start, stop) (global image numbers kept)."""
    if table is None:
        return None
    lo, hi = np.searchsorted(table["image"].to_numpy(), [start, stop])
    return table.iloc[lo:hi]


def _rechunk_like(other: _Stack | None, chunks):
    if other is None:
        return None
    import dask.array as da

    data = other.data if other.lazy else da.from_array(other.data, chunks=chunks)
    return _Stack(data.rechunk(chunks), True)


def _slice(s: _Stack | None, a: int, b: int):
    return None if s is None else s.data[a:b, ...]


def _one_batch(images, labels, lesions, table, start, stop, roi_ids, params, where, per_image=None,
               auto=None) -> dict:
    """Measure images [start, stop): move to the backend, run the kernels, return host arrays. `auto`: the edge of
    the automatic regions (rois="auto"), else None."""
    images = to_backend(images, where)
    xp = namespace(images)
    if auto is not None:
        extras = {k: xp.asarray(v, device=array_api_compat.device(images)) for k, v in (per_image or {}).items()}
        return auto_host({k: to_host(v) for k, v in measure_auto(xp, images, params=params, edge=auto,
                                                                  **extras).items()})
    labels = _alongside(labels, images, xp, where)
    lesions = _alongside(lesions, images, xp, where)
    for name, lab in (("ROI labels", labels), ("labels", lesions)):
        # NB: unsigned labels cannot be negative; signed ones cost one comparison pass to check.
        if lab is not None and xp.isdtype(lab.dtype, "signed integer") and lab.size and int(xp.min(lab)) < 0:
            raise InputError(f"{name} of images {start}..{stop - 1} hold negative values; labels are >= 0 "
                             "(0 = no ROI)")
        # NB: ROI ids are int64 (the roi dimension); a uint64 id above 2**63 - 1 would wrap to a negative one.
        if lab is not None and lab.dtype == xp.uint64 and lab.size and int(xp.max(lab)) > _INT64_MAX:
            raise LabelRangeError(f"{name} of images {start}..{stop - 1} hold ids above 2**63 - 1 "
                                  f"(largest {int(xp.max(lab))}); ROI ids must fit in int64")
    batch_table = None
    if table is not None:
        rows = _rows(table, start, stop)
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
    extras = {k: xp.asarray(v, device=array_api_compat.device(images)) for k, v in (per_image or {}).items()}
    out = measure_batch(xp, images, roi_ids=ids, params=params, labels=labels, table=batch_table,
                        lesions=lesions, **extras)
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


def is_auto(rois) -> bool:
    """True for the keyword ``"auto"`` (the automatic regions); a path such as ``Path("auto")`` names a file."""
    return isinstance(rois, str) and rois == "auto"


def check_edge(edge, *, auto: bool) -> int:
    """The `edge` option as an int: >= 0, and other than the default only with the automatic regions."""
    if isinstance(edge, bool) or not isinstance(edge, int | np.integer):
        raise OptionTypeError(f"edge must be an integer, got {edge!r}")
    if edge < 0:
        raise OptionError(f"edge must be >= 0, got {edge}")
    if not auto and edge != DEFAULT_EDGE:
        raise OptionError("edge applies to the automatic regions only (rois='auto', --rois auto)")
    return int(edge)


def auto_host(out: dict) -> dict:
    """Host outputs of `measure_auto` with ``noise_source`` as text (`NOISE_SOURCES`)."""
    out = dict(out)
    out["noise_source"] = np.asarray(NOISE_SOURCES, dtype=object)[np.asarray(out["noise_source"], np.int64)].astype(str)
    return out


def auto_regions(images, *, edge: int = DEFAULT_EDGE, min_bg: int = 30, ddof: int = 1, backend: str = "auto"):
    """The automatic regions of every image, as `gpucnr.measure(images, "auto")` finds and measures them.

    Parameters
    ----------
    images : array, shape (H, W) or (n, H, W)
        As `gpucnr.measure` takes them: NumPy, CuPy, Dask or array-API arrays, or an xarray.DataArray whose
        per-image coordinates (``valid_h``, ``valid_w``, ``padding``, ``slope``, ``photometric``:
        `gpucnr.Stack.to_xarray`) tell the valid extent, the padding value and the display polarity.
    edge : int
        Width (px, L1) of the band removed wherever two regions meet (default 2).
    min_bg, ddof : int
        A region is found when it keeps at least ``max(min_bg, ddof + 1)`` pixels (as `gpucnr.measure`).
    backend : {"auto", "numpy", "cupy"}

    Returns
    -------
    int8 array, shape (n, H, W)
        In the input's array type (a Dask array stays lazy, chunked by whole images; an xarray.DataArray gives
        its data's type): 0 none (invalid pixels, the edge band, bright objects outside the body), 1 air (outside
        the body), 2 body in no tissue class (internal air such as lungs, the band between the classes),
        3 the lower tissue class, 4 the upper tissue class. The body (cell ``foreground``'s ROI) is every value
        >= 2; cell ``tissue`` is 4 against 3. An image without air has no 1 (it is all body); a region
        that was not found keeps its pixels but its cells get status 8 ``region-not-found``.

    Notes
    -----
    Per image, on its backend: a 256-bin histogram over [min, max] of the valid values in display polarity, after a
    3 x 3 median filter (the classes are found on the filtered values; the cells measure the stored ones);
    Otsu's two- and three-class thresholds (exhaustive, ties to the first maximum as scikit-image); the body as the
    largest 4-connected component above the air threshold with its holes filled; specks merged into what surrounds
    them; the `edge` band removed where regions meet (`gpucnr.kernels.regions`). docs/choosing.md measures how the
    tissue CNR follows noise, and its bias when the classes overlap.

    Examples
    --------
    >>> import gpucnr
    >>> from gpucnr.phantom import make_body_phantom
    >>> ph = make_body_phantom(2, (96, 96), seed=0)
    >>> regions = gpucnr.auto_regions(ph.images, backend="numpy")
    >>> sorted(int(v) for v in np.unique(regions))
    [0, 1, 2, 3, 4]
    """
    edge = check_edge(edge, auto=True)
    Params(min_bg=min_bg, ddof=ddof)  # NB: validated as measure() validates them
    per_image, _ = _per_image(images)
    stack = _as_stack(images, "images")
    where = resolve_backend(backend, stack.data._meta if stack.lazy else stack.data)

    def block(data, per):
        data = to_backend(data, where)
        xp = namespace(data)
        dev = array_api_compat.device(data)
        extras = {k: xp.asarray(v, device=dev) for k, v in (per or {}).items()
                  if k in ("valid_h", "valid_w", "padding", "polarity", "slope")}
        labels, _ = find_regions(xp, data, edge=edge, min_bg=min_bg, ddof=ddof, **extras)
        return labels

    if not stack.lazy:
        size = _batch_size(stack)
        parts = [block(stack.data[a:b, ...], _span(per_image, a, b)) for a, b in _blocks(stack, size)]
        if not parts:
            return np.zeros(stack.shape, np.int8)
        xp = namespace(parts[0])
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
    import dask
    import dask.array as da

    data = stack.data.rechunk((stack.data.chunks[0], stack.shape[1], stack.shape[2]))
    bounds = np.cumsum((0, *data.chunks[0]))
    blocks = [da.from_delayed(dask.delayed(block, pure=True)(data[a:b, ...], _span(per_image, a, b)),
                              shape=(b - a, stack.shape[1], stack.shape[2]), dtype=np.int8,
                              meta=data._meta.astype(np.int8))
              for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]
    return da.concatenate(blocks, axis=0) if blocks else data.astype(np.int8)
