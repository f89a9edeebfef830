"""gpucnr.enhance, the article's low-CNR hook: denoise the images below a CNR threshold and re-measure them."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from gpucnr.backend import ndimage_for, resolve_backend, to_backend, to_host
from gpucnr.errors import InputError, Interrupted, OptionError, OptionTypeError
from gpucnr.kernels.params import Params
from gpucnr.manifests import DROP, DecisionWarning, manifest
from gpucnr.outputs import make_folder, refuse_overlap
from gpucnr.pipeline import run, table_fingerprint
from gpucnr.results import open_results, require_complete, results_stack
from gpucnr.roitable import normalize_table
from gpucnr.store import RESULT_COLUMNS, Stack, write_stack

__all__ = ["METHODS", "NOTE", "enhance"]

#: Enhancements `enhance` knows, by name.
METHODS = ("median", "gaussian")
#: Stored with every enhancement report: a higher CNR after denoising is not more information.
NOTE = ("Denoising averages neighbouring pixels: it correlates the noise and lowers the per-pixel variance, so it "
        "raises the measured CNR without adding information about the lesion (the image carries no more "
        "detectability than before, and fine structure may be lost). cnr_after is not comparable with cnr_before "
        "as a quality measure.")
_VARIABLES = ("cnr_before", "cnr_after", "delta")
#: Structural per-image columns of a stack that `write_stack` recomputes for the new stack.
_STRUCTURAL = ("index", "bucket", "position", "valid_h", "valid_w", "source_index")


def enhance(results, out, *, threshold: float | None = None, method: str = "median", size: int = 3,
            sigma: float = 1.0, stack=None, backend: str = "auto", allow_incomplete: bool = False, rule=None,
            by=None) -> xr.Dataset:
    """Enhance the images whose CNR is below `threshold`, write them as a new stack and re-measure them.

    Parameters
    ----------
    results : str, Path or xarray.Dataset
        Results of `gpucnr.run`. A Dataset needs ``stack=`` (its folder is unknown).
    out : str or Path
        Folder (created if needed) that receives ``enhanced.zarr`` (the stack) and ``results.zarr`` (its run);
        neither may exist.
    threshold : float, optional
        Images whose ``cnr_median`` is strictly below it are enhanced: exactly the ``"drop"`` decisions of
        ``gpucnr.manifest(results, threshold, level="image")`` (flagged images, without a valid ROI or never
        computed, are not enhanced). Default 1.5 when no `rule` is given.
    rule, by : optional
        Instead of `threshold`: the images that ``gpucnr.manifest(results, level="image", rule=rule, by=by)``
        drops (``"quantile:0.05"``, ``"mad:3"``, ``"abs:1.5"``; `by` the per-image columns of the groups).
    method : {"median", "gaussian"}
        ``median``: ``scipy.ndimage.median_filter(size=size)``; ``gaussian``:
        ``scipy.ndimage.gaussian_filter(sigma=sigma)`` (their ``cupyx.scipy.ndimage`` namesakes on the GPU),
        default boundary mode ``"reflect"``, applied to each image's valid region only (never the canvas
        padding of the stack).
    size : int
        Median window (pixels, >= 1).
    sigma : float
        Gaussian standard deviation (pixels, finite and > 0).
    stack : str, Path or Stack, optional
        The stack the results were computed from. Default: the results' ``stack_path`` attribute, relative to
        the results' folder. Its fingerprint must match the results'.
    backend : {"auto", "numpy", "cupy"}
        Where the filters and the re-measurement run. ``"cupy"`` without a usable GPU raises
        `gpucnr.BackendUnavailableError`; there is no silent CPU fallback.
    allow_incomplete : bool
        Enhance among the images of results that an interrupted run left incomplete (the others are not
        enhanced); without it such results are refused (``results-incomplete``).

    Returns
    -------
    xarray.Dataset
        Along ``image`` (the original global index, ascending): ``cnr_before`` and ``cnr_after`` (the
        ``cnr_median`` of the original run and of the re-measurement) and ``delta`` = after - before;
        coordinate ``enhanced_index`` (the image's global index in ``enhanced.zarr``). ``attrs`` hold
        ``method``, its parameter (``size`` or ``sigma``), ``rule`` (e.g. ``"abs:1.5"``), ``threshold`` (T of an
        ``abs`` rule, NaN for another), ``dtype``, ``backend``, the
        measurement parameters of both runs under their results-attribute names (``background``,
        ``footprint``, ... : identical in both), ``enhanced_stack`` and ``enhanced_results`` (paths; ``"none"``
        when nothing was enhanced) and ``note`` (see `NOTE`). No image below the threshold: the same
        variables with an empty ``image`` dimension, and nothing is written.

    Raises
    ------
    OptionError
        An unknown method, a size that is not an integer >= 1, a sigma that is not finite and > 0, a threshold
        that is not a real number.
    InputError
        Results without a stack path and no ``stack=``, a stack that is not the results' (fingerprint), a run
        whose ROI table was given with ``rois=`` instead of stored in the stack, or outputs that exist.

    Notes
    -----
    Pixels are converted to float64 (raw stored values; slope, intercept, padding and photometric are carried
    over to the new stack unchanged, as the kernels apply them to the moments), filtered in float64 and stored
    as **float64**: a filtered value is never rounded back to the source's integer dtype (that would quantise
    the Gaussian output and bias the variance the CNR depends on), and float32 would round Gaussian outputs.
    The median of integer inputs is an integer and is stored exactly. Pixels equal to an image's padding value
    are restored to it after filtering so the re-measurement still excludes them; their neighbours, however,
    mix in the padding value, and a non-finite pixel spreads through a Gaussian window.
    """
    method, param = _check_options(method, size, sigma, 1.5 if threshold is None else threshold)
    where = resolve_backend(backend)
    ds, results_path = (results, None) if isinstance(results, xr.Dataset) else (open_results(results), results)
    require_complete(ds, allow_incomplete=allow_incomplete, command="enhance", results_path=results_path)
    stack = results_stack(ds, results_path, stack)
    out = Path(out)
    refuse_overlap([("results", results_path), ("stack", stack.path)],
                   [("enhanced stack", out / "enhanced.zarr"), ("enhanced results", out / "results.zarr")],
                   into=[("output folder", out)])
    params = _run_params(ds.attrs)
    with warnings.catch_warnings():
        # NB: "drops more than half ... before training" speaks of a training set; enhance chooses what to enhance
        # and says itself when it chose nothing
        warnings.simplefilter("ignore", DecisionWarning)
        decisions = manifest(ds, threshold, level="image", rule=rule, by=by, allow_incomplete=allow_incomplete)
    chosen = np.sort(decisions.loc[decisions["decision"] == DROP, "image"].to_numpy(np.int64))
    cut = decisions.attrs["threshold"]
    attrs = {"method": method, **param, "rule": decisions.attrs["rule"],
             "threshold": float("nan") if cut is None else float(cut), "dtype": "float64", "backend": where,
             "note": NOTE, **params.as_attrs(), "enhanced_stack": "none", "enhanced_results": "none"}
    if not len(chosen):
        empty = {v: ("image", np.empty(0, np.float64)) for v in _VARIABLES}
        return xr.Dataset(empty, coords={"image": np.empty(0, np.int64),
                                         "enhanced_index": ("image", np.empty(0, np.int64))}, attrs=attrs)
    stack_out, results_out = out / "enhanced.zarr", out / "results.zarr"
    for path in (stack_out, results_out):
        if os.path.lexists(path):
            raise InputError(f"{path} already exists; enhance does not overwrite")
    rois = _roi_rows(stack, ds.attrs, chosen)
    try:
        images, labels = _filtered(stack, chosen, method, param, where)
        make_folder(out)
        new = write_stack(stack_out, images, labels=labels, rois=rois, meta=_meta(stack, chosen),
                          shard=stack.group.attrs.get("shard_size", stack.shard), compressor=stack.compressor)
        # NB: the same ROI sources as the original run (an attribute "labels", "table" or "both"); "both" when
        # none of the chosen images has a table row (each was chosen by its label cells) is its labels alone: the
        # new stack has no ROI table to measure
        source = str(ds.attrs.get("roi_source", "auto"))
        if source == "both" and (rois is None or not len(rois)):
            source = "labels"
        # NB: and the original run's batch size (images or pixels, as it was given)
        batch = ds.attrs.get("batch")
        batch = batch if isinstance(batch, int | str) and not isinstance(batch, bool) else None
        if source == "auto" and "edge" in ds.attrs:
            # NB: rois="auto" results: the automatic regions of the enhanced images, found again
            after = run(new, results_out, backend=where, rois="auto", edge=int(ds.attrs["edge"]), batch=batch,
                        **_as_kwargs(params))
        else:
            after = run(new, results_out, backend=where, roi_source=source if source in ("labels", "table", "both")
                        else "auto", batch=batch, **_as_kwargs(params))
    except BaseException as e:
        # NB: both outputs are this call's own (neither existed): half of them is of no use, and would make the
        # same command refuse to start again; a refused command (exit 2) has written nothing
        for path in (results_out, stack_out):
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):  # NB: Interrupted (run's) too
            raise Interrupted(f"{len(chosen)} image(s) were being enhanced into {out}; the partial outputs were "
                              "removed: run the same command again", e) from None
        raise
    new_table = new.images.sort_values("index")
    original = new_table["original_index"].to_numpy(np.int64)
    cnr_after = pd.Series(np.asarray(after["cnr_median"].values, np.float64)[new_table["index"].to_numpy()],
                          index=original).loc[chosen].to_numpy()
    enhanced_index = pd.Series(new_table["index"].to_numpy(np.int64), index=original).loc[chosen].to_numpy()
    before = ds["cnr_median"].sel(image=chosen).values.astype(np.float64)
    attrs.update(enhanced_stack=str(stack_out), enhanced_results=str(results_out))
    return xr.Dataset({"cnr_before": ("image", before), "cnr_after": ("image", cnr_after),
                       "delta": ("image", cnr_after - before)},
                      coords={"image": chosen, "enhanced_index": ("image", enhanced_index)}, attrs=attrs)


def _check_options(method, size, sigma, threshold) -> tuple[str, dict]:
    if method not in METHODS:
        raise OptionError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or math.isnan(threshold):
        raise OptionError(f"threshold must be a real number (not NaN), got {threshold!r}")
    if method == "median":
        if isinstance(size, bool) or not isinstance(size, Integral):
            raise OptionTypeError(f"size must be an integer, got {size!r}")
        if size < 1:
            raise OptionError(f"size must be >= 1, got {size}")
        return method, {"size": int(size)}
    if isinstance(sigma, bool) or not isinstance(sigma, Real):
        raise OptionTypeError(f"sigma must be a real number, got {sigma!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise OptionError(f"sigma must be finite and > 0, got {sigma}")
    return method, {"sigma": float(sigma)}


def _run_params(attrs) -> Params:
    """The original run's measurement parameters, from the results' attributes (None was stored as "none")."""
    missing = [k for k in Params().as_attrs() if k not in attrs]
    if missing:
        raise InputError(f"the results lack the run parameters {missing}")
    return Params(**{k: (None if attrs[k] == "none" else attrs[k]) for k in Params().as_attrs()})


def _as_kwargs(params: Params) -> dict:
    # NB: only the parameters; as_attrs also records what a definition forced (definition_forces)
    fields = Params().as_attrs()
    return {k: (None if v == "none" else v) for k, v in params.as_attrs().items() if k in fields}


def _roi_rows(stack: Stack, attrs, chosen: np.ndarray) -> pd.DataFrame | None:
    """The stack's ROI rows of the chosen images, re-indexed to their position in the new stack."""
    source = attrs.get("roi_source")
    table = None
    if stack.rois is not None and len(stack.rois):
        table = normalize_table(stack.rois, stack.n_images)
    if source in ("table", "both") and (table is None or table_fingerprint(table) != attrs.get("rois_fingerprint")):
        # NB: run(rois=...) does not store its table; re-measuring without it would measure other ROIs.
        raise InputError("these results were measured with an ROI table passed to run(rois=...), not the "
                         "stack's; write the stack with that table to enhance it")
    if table is None:
        return None
    rows = table[table["image"].isin(chosen)].copy()
    rows["image"] = np.searchsorted(chosen, rows["image"].to_numpy())
    return rows[["image", "roi", "kind", "cx", "cy", "r", "name"]].reset_index(drop=True)


def _meta(stack: Stack, chosen: np.ndarray) -> pd.DataFrame:
    """Per-image meta of the new stack: ``original_index`` plus the source's non-structural columns of the results'
    allow-list (`gpucnr.store.RESULT_COLUMNS`)."""
    table = stack.images.set_index("index").loc[chosen].reset_index()
    # NB: the allow-list of DESIGN §10 only: a free-text meta column of the source never reaches the new stack
    meta = table[[c for c in table.columns if c not in _STRUCTURAL and c in RESULT_COLUMNS]].copy()
    meta.insert(0, "original_index", chosen)
    return meta.reset_index(drop=True)


def _filter(plane: np.ndarray, method: str, param: dict, where: str, padding: float) -> np.ndarray:
    """One image's valid region, filtered in float64 on `where`; padding pixels keep their value."""
    # NB: float64 before filtering: integer input would make the Gaussian round to the input dtype.
    x = to_backend(np.ascontiguousarray(plane, np.float64), where)
    nd = ndimage_for(x)
    y = nd.median_filter(x, size=param["size"]) if method == "median" else nd.gaussian_filter(x, sigma=param["sigma"])
    y = to_host(y)
    if math.isfinite(padding):
        y = np.where(plane == padding, plane.astype(np.float64), y)
    return y


def _filtered(stack: Stack, chosen: np.ndarray, method: str, param: dict, where: str):
    """The chosen images' valid regions, filtered (float64), and their labels (or None), in `chosen` order."""
    info = stack.images.set_index("index").loc[chosen]
    buckets = {b.name: b for b in stack.buckets}
    images, labels = [], [] if stack.has_labels else None
    for row in info.itertuples():
        pos = int(row.position)
        img, lab = stack.read(buckets[row.bucket], pos, pos + 1, labels=stack.has_labels)
        h, w = int(row.valid_h), int(row.valid_w)
        images.append(_filter(img[0, :h, :w], method, param, where, float(row.padding)))
        if labels is not None:
            labels.append(np.asarray(lab[0, :h, :w]))
    return images, labels
