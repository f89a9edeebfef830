"""The results store: per (image, roi) measurements on Zarr, written region by region, read as xarray (DESIGN §6)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from gpucnr._version import __version__
from gpucnr.errors import GpucnrError, InputError
from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE

__all__ = ["RESULTS_FORMAT", "ResultsError", "create_results", "open_results", "write_rows"]

RESULTS_FORMAT = 1
_WRITE = {"write_empty_chunks": True}
_INTEGER = {"n_roi": "int64", "n_bg": "int64", "status": "int8", "n_valid": "int64", "n_excluded": "int64"}


class ResultsError(GpucnrError):
    """Results that cannot be opened, or resumed with a different input or different parameters."""

    code = "results"

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def create_results(path, *, n_images: int, roi_ids, image_table: pd.DataFrame, chunk: int, batches, attrs: dict):
    """Write the template: every variable filled with NaN (floats) or -1 (integers), nothing committed.

    Parameters
    ----------
    path : str or Path
    n_images : int
    roi_ids : int array, shape (L,)
    image_table : pandas.DataFrame
        Per-image columns stored as coordinates along ``image`` (the stack's table, pseudonymous columns only).
    chunk : int
        Rows per chunk along ``image`` (the stack's shard size; a chunk may hold rows of two batches, which is
        why only the driver writes).
    batches : list of (start, stop)
        Global image ranges of the batches; ``committed`` has one flag per batch.
    attrs : dict
        Parameters and provenance.
    """
    group = zarr.open_group(str(path), mode="w")
    n_ids = len(roi_ids)
    for name in OUTPUT_CELL:
        dtype = _INTEGER.get(name, "float64")
        group.create_array(name, shape=(n_images, n_ids), dtype=dtype, chunks=(chunk, max(n_ids, 1)),
                           fill_value=-1 if dtype != "float64" else np.nan, dimension_names=["image", "roi"],
                           config=_WRITE)
    group.create_array("roi_name", shape=(n_images, n_ids), dtype=str, chunks=(chunk, max(n_ids, 1)),
                       dimension_names=["image", "roi"], config=_WRITE)
    for name in OUTPUT_IMAGE:
        dtype = _INTEGER.get(name, "float64")
        group.create_array(name, shape=(n_images,), dtype=dtype, chunks=(chunk,),
                           fill_value=-1 if dtype != "float64" else np.nan, dimension_names=["image"],
                           config=_WRITE)
    _coord(group, "image", np.arange(n_images, dtype=np.int64), "image")
    _coord(group, "roi", np.asarray(roi_ids, np.int64), "roi")
    for col in image_table.columns:
        if col != "index":
            _coord(group, col, image_table[col].to_numpy(), "image")
    bounds = np.asarray(batches, np.int64).reshape(-1, 2)
    _coord(group, "batch_start", bounds[:, 0], "batch")
    _coord(group, "batch_stop", bounds[:, 1], "batch")
    group.create_array("committed", shape=(len(bounds),), dtype="int8", chunks=(1,), fill_value=0,
                       dimension_names=["batch"], config=_WRITE)
    group.attrs.update({"gpucnr_results": RESULTS_FORMAT, "gpucnr_version": __version__, **attrs,
                        "coordinates": " ".join(c for c in image_table.columns if c != "index")})
    return group


def _coord(group, name, values, dim):
    values = np.asarray(values)
    if values.dtype.kind in "OUST":
        arr = group.create_array(name, shape=values.shape, dtype=str, chunks=(max(len(values), 1),),
                                 dimension_names=[dim], config=_WRITE)
        values = values.astype(str)
    else:
        arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(max(len(values), 1),),
                                 dimension_names=[dim], config=_WRITE)
    if values.size:
        arr[:] = values


def write_rows(group, start: int, stop: int, values: dict, names: np.ndarray, batch: int) -> None:
    """Write rows [start, stop) of every variable, then (and only then) the batch's committed flag."""
    parts = [(name, values[name]) for name in (*OUTPUT_CELL, *OUTPUT_IMAGE)] + [("roi_name", names)]
    # NB: the variables are independent; writing them concurrently overlaps zarr's per-call overhead.
    list(_writer().map(lambda item: group[item[0]].__setitem__(slice(start, stop), item[1]), parts))
    # NB: the flag comes last: a crash before it leaves the batch uncommitted, and --resume redoes it.
    group["committed"][batch] = 1


_POOL: ThreadPoolExecutor | None = None


def _writer() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gpucnr-write")
    return _POOL


def open_results(path) -> xr.Dataset:
    """Open results as an xarray.Dataset (lazy, Dask-backed), checking that they are gpucnr results.

    Unwritten rows read as NaN (floats) and -1 (integers); ``committed`` says which batches are complete.
    """
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - anything zarr raises here means not readable results
        raise ResultsError("results-schema", f"{path} is not a readable Zarr group ({type(e).__name__})") from None
    if group.attrs.get("gpucnr_results") != RESULTS_FORMAT:
        raise ResultsError("results-schema", f"{path} are not gpucnr results")
    ds = xr.open_zarr(str(path), consolidated=False, mask_and_scale=False)
    coords = [c for c in str(ds.attrs.get("coordinates", "")).split() if c in ds]
    ds = ds.set_coords([*coords, "batch_start", "batch_stop"])
    return ds


def results_stack(ds: xr.Dataset, results_path, stack=None):
    """The stack the results were computed from: `stack` (a path or an opened `Stack`), else the results'
    ``stack_path`` attribute relative to their folder; its fingerprint must be the one the results record.

    Raises
    ------
    InputError
        No stack given and none recorded, or a stack that is not the results' (another fingerprint).
    """
    from gpucnr.store import Stack, open_stack

    if stack is None:
        if results_path is None or "stack_path" not in ds.attrs:
            raise InputError("cannot locate the stack of these results; pass stack=")
        stack = Path(results_path).resolve().parent / str(ds.attrs["stack_path"])
    stack = stack if isinstance(stack, Stack) else open_stack(stack)
    expected = ds.attrs.get("stack_fingerprint")
    if expected is not None and stack.fingerprint() != expected:
        raise InputError(f"{stack.path} is not the stack these results were computed from (fingerprint "
                         f"{stack.fingerprint()[:12]} != {str(expected)[:12]})")
    return stack


def stack_relative(stack_path, results_path) -> str:
    """The stack's path relative to the results' folder (so the pair can move together)."""
    return os.path.relpath(Path(stack_path).resolve(), Path(results_path).resolve().parent)


def require_complete(ds: xr.Dataset, *, allow_incomplete: bool, command: str, results_path=None) -> int:
    """Refuse results that an interrupted run left incomplete, unless `allow_incomplete`; the number of images
    never computed.

    `filter`, `report` and `enhance` call this first: a manifest of incomplete results flags a third of the data
    "not-computed", and a training loader joining on ``keep`` silently loses it. Incomplete means a ``committed``
    flag that is not set (results on disk), else rows never written (``n_valid`` -1, or status -1 cells: a
    Dataset made by hand).

    Raises
    ------
    ResultsError
        ``results-incomplete``, naming what is missing and the ``gpucnr run ... --resume`` that completes it.
    """
    if "committed" in ds.variables and "batch_start" in ds.variables:
        flags = np.asarray(ds["committed"].values) != 0
        starts, stops = np.asarray(ds["batch_start"].values), np.asarray(ds["batch_stop"].values)
        missing = int((stops - starts)[~flags].sum())
        what = f"{int((~flags).sum())} of {flags.size} batches ({missing} of {ds.sizes['image']} images)"
    elif "n_valid" in ds.variables:
        missing = int((np.asarray(ds["n_valid"].values) < 0).sum())
        what = f"{missing} of {ds.sizes['image']} images"
    elif "status" in ds.variables:
        status = np.asarray(ds["status"].values)
        missing = int((status < 0).reshape(status.shape[0], -1).any(axis=1).sum())
        what = f"{missing} of {ds.sizes['image']} images"
    else:
        return 0
    if missing and not allow_incomplete:
        where = "RESULTS" if results_path is None else str(results_path)
        raise ResultsError("results-incomplete", f"{where}: {what} were never computed (an interrupted run). "
                           f"Complete them with `{resume_command(ds.attrs, results_path)}`, or pass "
                           "--allow-incomplete "
                           f"(allow_incomplete=True) to {command} what there is, the missing images flagged "
                           "not-computed")
    return missing


def resume_command(attrs, results_path=None) -> str:
    """The `gpucnr run ... --resume` that continues the results whose attributes are `attrs`: the stack (from
    ``stack_path``, relative to the results' folder), the results, and the options a resume must repeat (the
    measurement options that differ from the defaults, and the batch size)."""
    where = "RESULTS" if results_path is None else str(results_path)
    stack = "STACK"
    if results_path is not None and "stack_path" in attrs:
        stack = os.path.normpath(Path(results_path).parent / str(attrs["stack_path"]))
    return f"gpucnr run {stack} {where} --resume{_run_options(attrs)}"


def _run_options(attrs) -> str:
    from gpucnr.kernels.params import Params

    out = ""
    for name, default in Params().as_attrs().items():
        value = attrs.get(name, default)
        if value == default or isinstance(value, np.ndarray):
            continue
        flag = "--" + name.replace("_", "-")
        out += f" {flag}" if value is True else "" if value is False else f" {flag} {value}"
    batch = attrs.get("batch")
    # NB: the batch size is compared on --resume too; the stored (rounded) size reproduces itself
    return out + (f" --batch {int(batch)}" if isinstance(batch, int | np.integer) else "")
