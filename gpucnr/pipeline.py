"""gpucnr.run: a stack on Zarr, batch by batch through the kernels, into resumable results (DESIGN §6-§7)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from gpucnr import shardfiles
from gpucnr.arrays import STATUS_LEGEND, align_columns, auto_host, check_edge, is_auto
from gpucnr.backend import namespace, resolve_backend, to_backend, to_host
from gpucnr.errors import EnvironmentFailure, InputError, Interrupted
from gpucnr.identifiers import blank_roi_names, check_columns
from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE, measure_batch
from gpucnr.kernels.cnr import STATUS, median_of_valid
from gpucnr.kernels.masks import KIND_DISK
from gpucnr.kernels.params import Params
from gpucnr.kernels.regions import (
    AUTO_IMAGE,
    AUTO_ROI_IDS,
    AUTO_ROI_NAMES,
    DEFAULT_EDGE,
    check_auto_options,
    measure_auto,
)
from gpucnr.lifeline import QUIET_SPAWN, quiet_resource_tracker, quiet_worker, watch_parent
from gpucnr.outputs import refuse_overlap, require_results
from gpucnr.progress import Progress
from gpucnr.results import (
    RESULTS_FORMAT,
    ResultsError,
    ResultsWriter,
    create_results,
    damage_text,
    open_results,
    results_format,
    resume_command,
    stack_relative,
    uncommit,
    verify_results,
    write_error,
)
from gpucnr.roitable import normalize_table
from gpucnr.stackcheck import check_label_ids
from gpucnr.store import (
    FINGERPRINT_VERSION,
    RESULT_COLUMNS,
    Stack,
    StackError,
    format_size,
    open_stack,
    parse_size,
    unfinished_stack,
)

__all__ = ["BATCH_PIXELS", "SCHEDULERS", "RunEnvironmentError", "measure_into", "plan_batches", "run",
           "table_fingerprint"]

#: Local schedulers; anything else given as ``scheduler`` is the address of a Dask distributed scheduler.
SCHEDULERS = ("threads", "processes", "synchronous")
logger = logging.getLogger("gpucnr.run")
_FLOAT_FILL = {k: np.nan for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr", "cnr_median")}
#: Seconds the driver waits on its workers at a time before it looks for a signal (Ctrl-C, SIGTERM).
_POLL_S = 0.2
#: Stack errors that prove the data damaged (DESIGN §10): a chunk's checksum or index fails, a checksum-valid
#: stream decodes to the wrong size, a chunk is not the one recorded for its position. They become the image's
#: status 6; every other failure of a batch is the environment's.
DATA_ERRORS = ("corrupt-chunk", "missing-chunk", "stack-damaged")
#: How many times a batch that failed for an environmental reason is tried again before the run stops.
ENVIRONMENT_RETRIES = 2


class RunEnvironmentError(EnvironmentFailure, RuntimeError):
    """The run stopped because of its environment (memory, files, threads, a worker that cannot open the stack),
    not its data: nothing was recorded against any image, and ``--resume`` continues once it is fixed."""

    code = "run-environment"


@dataclass(frozen=True)
class BatchSpec:
    """One batch: images [start, stop) of one bucket; everything a worker needs, picklable."""

    index: int
    stack: str
    fingerprint: str
    bucket: str
    start: int
    stop: int
    global_start: int
    params: Params
    roi_ids: tuple
    table: dict | None
    use_labels: bool
    use_lesions: bool
    backend: str
    #: rois="auto": the edge band of the automatic regions (None: the stack's ROIs)
    auto_edge: int | None = None


#: A batch's default size: the smallest whole number of shards holding at least 2^24 pixels (DESIGN §9, §10).
BATCH_PIXELS = 2**24


def plan_batches(stack: Stack, batch: int | str | None = None) -> tuple[dict[str, int],
                                                                      list[tuple[str, int, int, int]]]:
    """Batches of whole shards of one bucket: ``({bucket: images per batch}, [(bucket, start, stop,
    global_start), ...])``.

    Parameters
    ----------
    stack : Stack
    batch : int or str, optional
        Images (an int, ``"64"`` or ``"64i"``: rounded to the nearest multiple of the bucket's shard, at least one
        shard) or pixels (``"16M"`` = 2^24 px, ``"16777216px"``: the smallest whole number of shards holding at
        least that many pixels of the bucket's canvas). Default: ``16M`` (`BATCH_PIXELS`). Never more shards than
        the bucket has.

    Raises
    ------
    gpucnr.store.SizeError
        ``bad-size``: `batch` is neither images nor pixels.
    """
    kind, n = parse_size(f"{BATCH_PIXELS}px" if batch is None else batch)
    sizes, plan = {}, []
    for b in stack.buckets:
        shard = b.shard
        if kind == "images":
            shards = max(1, round(n / shard))
        else:
            shards = max(1, math.ceil(n / (shard * _canvas_pixels(b))))
        size = min(shards, max(1, math.ceil(b.size / shard))) * shard
        sizes[b.name] = size
        for start in range(0, b.size, size):
            plan.append((b.name, start, min(start + size, b.size), b.offset + start))
    return sizes, plan


def _canvas_pixels(bucket) -> int:
    return int(bucket.images.shape[1]) * int(bucket.images.shape[2])


def run(stack, results, *, background: str = "complement", footprint: str = "cross", dilation: int = 5,
        border: int = 5, ring_gap: int = 5, ring_width: int = 10, background_label: int | None = None,
        min_bg: int = 30, ddof: int = 1, definition: str = "pooled", gcnr_bins: str | int = "auto",
        signed: bool = False, client=None, scheduler: str = "threads", workers: int | None = None,
        batch: int | None = None, resume: bool = False, progress: bool = False, rois=None, backend: str = "auto",
        group_columns=None, roi_source: str = "auto", linkage=None, edge: int = DEFAULT_EDGE) -> xr.Dataset:
    """Measure every image of a stack into a results store, batch by batch, resumably.

    Parameters
    ----------
    stack : str, Path or Stack
        The stack (`gpucnr.write_stack`); opening it checks its schema and completeness.
    results : str or Path
        Where the results go. A template is written first (NaN / -1 everywhere); each finished batch's rows,
        then its ``committed`` flag. Only this process writes.
    client : dask.distributed.Client, optional
        Run batches as futures on its cluster (also: ``scheduler`` = a scheduler address).
    scheduler : {"threads", "processes", "synchronous"} or address
        Local pool of per-batch computations (bounded: 2 x workers in flight), or a distributed scheduler.
    workers : int, optional
        Local pool size (default: the CPU count).
    batch : int or str, optional
        Images per batch (``64``, ``"64i"``: rounded to a multiple of the bucket's shard) or pixels (``"16M"`` =
        2^24 px: the smallest whole number of shards holding at least that many); default ``16M`` per bucket
        (`plan_batches`). The plan is stored per bucket and compared on `resume`; a resume without `batch`
        continues with the one the results were started with.
    resume : bool
        Skip committed batches of existing results; refuses a different stack (fingerprint) or parameters.
    progress : bool
        A progress bar on stderr.
    rois : ROI table, CSV path or "auto", optional
        Columns image (global index), roi, kind, cx, cy, r [, name]; or the table `gpucnr ingest --rois` reads
        (source [, channel] [, frame], roi, kind, cx, cy, r [, name]), its sources matched to images through the
        stack's linkage file (rows that match no image are listed in a warning and left out). It replaces the
        stack's own ROI table. Default: the stack's ROI table. The string ``"auto"`` (a keyword: ``Path("auto")``
        is a file) measures only the automatic regions of every image (`gpucnr.measure`'s ``rois="auto"``: cells
        1 ``foreground`` and 2 ``tissue``, per-image ``n_air``, ``mean_air``, ``var_air``, ``noise_source``;
        ``roi_source`` "auto" in the attributes): the stack's labels and ROI table are not read, `roi_source` must be
        left as it is, and only the default `background` is legal.
    roi_source : {"auto", "labels", "table", "both"}
        Where the ROIs come from: ``auto`` (default) measures every source the stack has, its labels and the ROI
        table, in one run (``both`` requires both); ``labels`` or ``table`` measures one of them. Ids keep their
        values; an image with the same id from both sources is refused (``roi-id-clash``). The ``roi_source``
        coordinate along ``roi`` says where each id came from (labels, table or both).
    linkage : str or Path, optional
        The linkage file that maps an ingest-style `rois` table's sources to images (default: the one beside
        the stack, ``STACK.zarr.linkage.csv``); read only for such a table.
    backend : {"auto", "numpy", "cupy"}
    edge : int
        rois="auto": width (px) of the band removed where two automatic regions meet (default 2).
    group_columns : sequence of str, optional
        Per-image columns of the stack beyond the allow-list (`gpucnr.store.RESULT_COLUMNS`) to copy into the
        results for grouping (e.g. ``["site", "split"]``); names and values are screened (DESIGN §10,
        `gpucnr.identifiers`): a column that may identify a patient is refused.
    background, footprint, dilation, border, ring_gap, ring_width, background_label, min_bg, ddof, definition, \
gcnr_bins, signed
        The measurement options, as `gpucnr.measure` takes them (DESIGN §4; recorded in the results' attributes).

    Returns
    -------
    xarray.Dataset
        `gpucnr.open_results(results)`.

    Raises
    ------
    gpucnr.errors.Interrupted
        Ctrl-C or SIGTERM (a KeyboardInterrupt): the pool is stopped; the message names the batches committed and
        the ``gpucnr run ... --resume`` that continues.
    """
    # NB: every parameter passed on as it came (locals() here holds exactly them)
    return open_results(measure_into(**locals()))


def measure_into(stack, results, *, background: str = "complement", footprint: str = "cross",
                 dilation: int = 5, border: int = 5, ring_gap: int = 5, ring_width: int = 10,
                 background_label: int | None = None, min_bg: int = 30, ddof: int = 1, definition: str = "pooled",
                 gcnr_bins: str | int = "auto", signed: bool = False, client=None, scheduler: str = "threads",
                 workers: int | None = None, batch: int | None = None, resume: bool = False, progress: bool = False,
                 rois=None, backend: str = "auto", group_columns=None, roi_source: str = "auto", linkage=None,
                 edge: int = DEFAULT_EDGE) -> Path:
    """`run` without opening the results: measure `stack` into `results` and return the results' path.

    For a caller that reads a few small arrays of the results (``gpucnr run``'s summary) and would rather not pay
    for a Dask-backed dataset (`gpucnr.open_results` with ``dask=False``). Parameters and errors: `run`.
    """
    if not isinstance(stack, Stack):
        unfinished = unfinished_stack(stack)
        if unfinished:
            raise StackError("stack-incomplete", f"{stack}: {unfinished}")
        stack = open_stack(stack)
    auto = is_auto(rois)
    refuse_overlap([("stack", stack.path), ("ROI table", rois if isinstance(rois, str | Path) and not auto else None)],
                   [("results", results)])
    if resume:
        require_results(results)
    groups = _group_columns(stack, group_columns)
    params = Params(background=background, footprint=footprint, dilation=dilation, border=border,
                    ring_gap=ring_gap, ring_width=ring_width, background_label=background_label, min_bg=min_bg,
                    ddof=ddof, definition=definition, gcnr_bins=gcnr_bins, signed=signed)
    check_auto_options(params, auto=auto)
    edge = check_edge(edge, auto=auto)
    where = resolve_backend(backend)
    if auto:
        if roi_source != "auto":
            raise InputError(f"--rois auto measures the automatic regions only: --roi-source {roi_source} "
                             "(roi_source=) cannot be combined with it")
        table, use_labels, unmatched = None, False, []
        use_lesions = False
        roi_ids, sources = np.asarray(AUTO_ROI_IDS, np.int64), np.asarray(["auto"] * len(AUTO_ROI_IDS))
    else:
        table, use_labels, unmatched = _roi_source(stack, rois, roi_source, linkage)
        use_lesions = stack.has_labels and params.background in ("label", "complement-all")
        if params.background == "label" and not stack.has_labels:
            raise InputError("background='label' needs a stack with labels")
        roi_ids, sources = _roi_ids(stack, table, use_labels, params)
    batch = _batch_option(results, batch, resume)
    sizes, plan = plan_batches(stack, batch)
    if table is not None and use_labels:
        _refuse_clash(stack, table, params)
    fingerprint = stack.fingerprint()
    attrs = {**params.as_attrs(), "backend": where, "stack_path": stack_relative(stack.path, results),
             "stack_fingerprint": fingerprint, "stack_fingerprint_version": FINGERPRINT_VERSION,
             "stack_buckets": stack.bucket_digests(), "batch": _batch_text(batch),
             "plan": _plan_attrs(stack, sizes, plan),
             "roi_source": ("auto" if auto else "both" if table is not None and use_labels
                            else "table" if table is not None else "labels"),
             "roi_source_option": roi_source, "rois_fingerprint": "auto" if auto else table_fingerprint(table),
             "status_codes": STATUS_LEGEND, "failures": [], "rois_unmatched": unmatched,
             "group_columns": groups, **({"edge": edge} if auto else {}),
             # NB: where the --rois table was (relative to the results' folder, as the stack), so that the resume
             # command a message prints names it; "" for a table given in memory, None for none given
             "rois_table": (None if auto or rois is None else stack_relative(rois, results)
                            if isinstance(rois, str | Path) else "")}
    # NB: a scheduler address is reached before anything is written: a typo is refused, not a template left behind
    remote = _connect(scheduler) if client is None and scheduler not in SCHEDULERS else None
    client = client if remote is None else remote
    try:
        group, committed, backends = _open_or_create(Path(results), stack, roi_ids, plan, attrs, resume, sources,
                                                     extra=AUTO_IMAGE if auto else (),
                                                     same_groups=group_columns is not None)
    except BaseException:
        if remote is not None:
            remote.close()
        raise
    # NB: label ids named by the dataset.json ingest read; a table's own names win for its cells. Built batch by
    # batch (`_Names`): a dense (images, ids) array of strings would be the largest thing a big run holds.
    if auto:
        names = _Names(None, roi_ids, base=AUTO_ROI_NAMES)
    else:
        names = _Names(table, roi_ids, stack.group.attrs.get("label_names") if use_labels else None)
    # NB: absolute: a Dask worker started in another folder must open the same stack (DESIGN §10).
    stack_path = str(Path(stack.path).resolve())
    specs = []
    if table is not None:
        # NB: sorted once, each batch's rows are a slice: no scan of the whole table per batch (a stored table is
        # in image order already)
        image_col = table["image"].to_numpy()
        if (np.diff(image_col) < 0).any():
            table = table.sort_values("image", kind="stable").reset_index(drop=True)
            image_col = table["image"].to_numpy()
        # NB: each batch's rows sliced from NumPy columns: a DataFrame slice per batch cost ~1 ms of the driver
        columns = {k: table[k].to_numpy() for k in ("image", "roi", "kind_code", "cx", "cy", "r")}
    for index, (bucket, start, stop, g0) in enumerate(plan):
        if committed[index]:
            continue
        rows = None
        if table is not None:
            lo, hi = np.searchsorted(image_col, [g0, g0 + stop - start])
            rows = _kernel_table(columns, lo, hi, roi_ids, g0)
        specs.append(BatchSpec(index=index, stack=stack_path, fingerprint=fingerprint, bucket=bucket,
                               start=start, stop=stop, global_start=g0, params=params,
                               roi_ids=tuple(int(v) for v in roi_ids), table=rows, use_labels=use_labels,
                               use_lesions=use_lesions, backend=where, auto_edge=edge if auto else None))
    bar = Progress(progress, unit="batch")
    bar.stage("run", len(plan), done=int(committed.sum()))
    log = os.environ.get("GPUCNR_BATCH_LOG")

    def committed_now(batches):
        # NB: called once the batches' rows and flags are on disk: the log (the fault tests' clock) and the bar
        # never run ahead of what a crash would keep.
        if log:
            with open(log, "a") as fh:
                fh.write("".join(f"{b}\n" for b in batches))
        bar.update(len(batches))

    writer = ResultsWriter(results, committed=committed, backends=backends, on_commit=committed_now)

    def finish(spec: BatchSpec, out: dict):
        g0 = spec.global_start
        g1 = g0 + spec.stop - spec.start
        try:
            old = list(group.attrs.get("failures", []))
            kept = [f for f in old if not g0 <= int(f["image"]) < g1]
            if out.get("failures") or len(kept) != len(old):
                # NB: this batch's entries replace any a crashed attempt left: a resume never duplicates them.
                group.attrs["failures"] = kept + list(out.get("failures", []))
        except OSError as e:
            raise write_error(results, e) from e
        writer.put(spec.index, g0, g1, {**out, "roi_name": names.rows(g0, g1)}, spec.backend)

    interrupted = None
    _LENT[(stack_path, fingerprint)] = stack
    try:
        _execute(specs, finish, client=client, scheduler=scheduler, workers=workers)
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        _LENT.pop((stack_path, fingerprint), None)
        # NB: whatever stopped the run, every batch computed so far is written and committed.
        try:
            writer.close()
        finally:
            bar.done()
            if remote is not None:
                remote.close()
    if interrupted is not None:
        # NB: Ctrl-C / SIGTERM: the pool is stopped (_drain); committed batches stay, --resume does the rest
        raise Interrupted(f"{int(writer.committed.sum())} of {len(plan)} batches are committed in {results}; "
                          f"continue with `{resume_command(dict(group.attrs), results)}`", interrupted) from None
    return Path(results)


def _plan_attrs(stack: Stack, sizes: dict, plan) -> dict:
    """The batch plan per bucket, stored with the results and compared on --resume."""
    out = {b.name: {"images_per_batch": sizes[b.name], "batches": 0} for b in stack.buckets}
    for bucket, *_ in plan:
        out[bucket]["batches"] += 1
    return out


def _batch_text(batch) -> str:
    """`batch` as stored in the results' ``batch`` attribute: `format_size` of the size asked for."""
    return format_size(*parse_size(f"{BATCH_PIXELS}px" if batch is None else batch))


def _batch_option(results, batch, resume: bool):
    """The batch size of this run: `batch` (checked now, before anything is written), or, for a resume that names
    none, the one the results were started with (their stored ``batch``: a resume continues the same plan)."""
    if batch is not None:
        parse_size(batch)
        return batch
    if resume and Path(results).exists():
        try:
            stored = zarr.open_group(str(results), mode="r").attrs.get("batch")
        except Exception:  # noqa: BLE001 - not readable results: _resume refuses them with its own reason
            return None
        # NB: results before December 2026 stored images per batch as a number; parse_size reads both spellings
        if isinstance(stored, int | str) and not isinstance(stored, bool):
            with contextlib.suppress(InputError):
                parse_size(stored)
                return stored
    return None


def _group_columns(stack: Stack, names) -> list[str]:
    """The grouping columns a run copies into its results: named, present in the stack, screened."""
    names = [names] if isinstance(names, str) else list(names or ())
    missing = [c for c in names if c not in stack.images.columns]
    if missing:
        raise InputError(f"group column(s) {missing} are not per-image columns of {stack.path}")
    extra = [c for c in dict.fromkeys(names) if c not in RESULT_COLUMNS]
    check_columns(stack.images, extra, f"{stack.path} tables/images")
    return extra


#: Where a run's ROIs may come from (`run(roi_source=...)`, `gpucnr run --roi-source`).
ROI_SOURCES = ("auto", "labels", "table", "both")


class RoiIdClashError(InputError):
    """An image has the same ROI id from its labels and from the ROI table (DESIGN §4: an id means one thing)."""

    code = "roi-id-clash"


def _roi_source(stack: Stack, rois, choice: str = "auto", linkage=None):
    """The ROI table (global image indices) or None, whether the labels are ROIs too, and the lines of an
    ingest-style table that named no image."""
    if choice not in ROI_SOURCES:
        raise InputError(f"roi_source must be one of {ROI_SOURCES}, got {choice!r}")
    table, unmatched = None, []
    if rois is not None:
        if choice == "labels":
            raise InputError("an ROI table was given (--rois) with --roi-source labels; leave out one of them")
        if isinstance(rois, str | Path):
            rois = _read_rois_csv(rois)
        if _ingest_style(rois):
            rois = _link_rois(stack, rois, linkage)
            unmatched = list(rois.attrs.get("unmatched_lines", []))
        table = blank_roi_names(normalize_table(rois, stack.n_images), "the ROI table of run(rois=)")
    elif stack.rois is not None and len(stack.rois) and choice != "labels":
        table = blank_roi_names(stack.normalized_rois(), f"{stack.path} tables/rois")
    use_labels = stack.has_labels and choice != "table"
    if choice == "auto" and table is not None and not len(_label_ids(stack, None)):
        use_labels = False  # NB: a label array with no ROI in it (masks that matched nothing) adds no source
    if choice in ("table", "both") and table is None:
        raise InputError(f"--roi-source {choice}: {stack.path} has no ROI table; pass one with --rois (rois=)")
    if choice in ("labels", "both") and not stack.has_labels:
        raise InputError(f"--roi-source {choice}: {stack.path} has no labels (masks); use --roi-source table")
    if table is None and not use_labels:
        raise InputError(f"{stack.path} has neither an ROI table nor labels; pass one with --rois (rois=), "
                         "ingest masks with `gpucnr ingest --masks`, or measure without annotations with --rois auto "
                         "(rois='auto': automatic regions of every image)")
    return table, use_labels, unmatched


def _read_rois_csv(path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"source": str}, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the ROI table {path}: {e}") from None


def _ingest_style(rois) -> bool:
    """An ROI table keyed by source file (as `gpucnr ingest --rois` reads) rather than by global image index."""
    columns = rois.columns if isinstance(rois, pd.DataFrame) else list(rois)
    return "source" in columns and "image" not in columns


def _link_rois(stack: Stack, rois, linkage=None) -> pd.DataFrame:
    """An ingest-style ROI table (source [, channel] [, frame], roi, kind, cx, cy, r [, name]) with its sources
    mapped to global image indices through the linkage file (read here on explicit request: the table names
    files). Only the index enters the results; rows that name no image are listed in a warning, as at ingest."""
    from gpucnr.outputs import csv_untext
    from gpucnr.sources.driver import sidecar_paths

    path = Path(linkage) if linkage is not None else sidecar_paths(stack.path)["linkage"]
    if not path.exists():
        raise InputError(f"an ROI table with a source column needs the linkage file of the stack to find its "
                         f"images; {path} does not exist (stacks made by `gpucnr ingest` have one; else pass "
                         "--linkage PATH, or give the table an image column: the global index `gpucnr info` shows)")
    try:
        link = pd.read_csv(path, dtype={"source": str}, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the linkage file {path}: {e}") from None
    if not {"index", "source"} <= set(link.columns):
        raise InputError(f"{path} is not a linkage file (columns index, frame, source, ...)")
    df = pd.DataFrame(rois).reset_index(drop=True).copy()
    keys = ["source", *(c for c in ("channel", "frame") if c in link.columns)]
    link = link.assign(source=link["source"].map(csv_untext))
    for c in keys[1:]:
        link[c] = pd.to_numeric(link[c], errors="coerce").fillna(0).astype(np.int64)
        df[c] = (pd.to_numeric(df[c].replace("", 0), errors="coerce") if c in df.columns else 0)
    df["source"] = df["source"].astype(str).str.strip().map(csv_untext)
    bad = df[keys[1:]].isna().any(axis=1) if len(keys) > 1 else pd.Series(False, index=df.index)
    df.loc[bad, keys[1:]] = -1
    for c in keys[1:]:
        df[c] = df[c].astype(np.int64)
    index = pd.MultiIndex.from_frame(link[keys])
    pos = index.get_indexer(pd.MultiIndex.from_frame(df[keys]))
    if stack.n_images and len(link) and int(link["index"].max()) >= stack.n_images:
        raise InputError(f"{path} names images beyond the {stack.n_images} of {stack.path}: it is the linkage file "
                         "of another stack")
    missing = pos < 0
    if missing.any():
        lines = [int(i) + 2 for i in np.flatnonzero(missing)]
        shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
        print(f"gpucnr: warning: {len(lines)} of {len(df)} ROI row(s) name no image of {stack.path} "
              f"[roi-no-image]: line(s) {shown} of the ROI table; they are left out (sources are paths relative "
              "to the ingest's SRC_DIR, as in the linkage file)", file=sys.stderr)
    out = df.loc[~missing].drop(columns=[c for c in ("source", "channel", "frame", "source_encoding")
                                          if c in df.columns])
    out.insert(0, "image", link["index"].to_numpy(np.int64)[pos[~missing]])
    out = out.reset_index(drop=True)
    out.attrs["unmatched_lines"] = [int(i) + 2 for i in np.flatnonzero(missing)]
    return out


def _label_ids(stack: Stack, params) -> np.ndarray:
    """The ids of the stack's labels: recorded apart from the ROI table's since December 2026 (``label_ids``);
    older stacks record only the union."""
    # NB: within roi_ids, which the stack's checks and each batch's (check_label_ids) hold the labels to
    ids = np.intersect1d(np.asarray(stack.group.attrs.get("label_ids", stack.roi_ids), np.int64), stack.roi_ids)
    if params is not None and params.background == "label":
        ids = ids[ids != params.background_label]
    return ids


def _roi_ids(stack, table, use_labels, params) -> tuple[np.ndarray, np.ndarray]:
    """The ``roi`` dimension (sorted union of the sources' ids) and where each id came from."""
    from_table = np.unique(table["roi"].to_numpy()).astype(np.int64) if table is not None else np.empty(0, np.int64)
    from_labels = _label_ids(stack, params) if use_labels else np.empty(0, np.int64)
    ids = np.union1d(from_table, from_labels).astype(np.int64)
    in_t, in_l = np.isin(ids, from_table), np.isin(ids, from_labels)
    sources = np.where(in_t & in_l, "both", np.where(in_t, "table", "labels"))
    return ids, sources


def _refuse_clash(stack: Stack, table: pd.DataFrame, params) -> None:
    """`RoiIdClashError` if an image has an id both in its labels and in the ROI table. Only the labels of images
    whose table ids are label ids of the stack are read (nothing else of the stack)."""
    rows = table[np.isin(table["roi"].to_numpy(), _label_ids(stack, params))]
    if not len(rows):
        return
    info = stack.images.set_index("index")
    buckets = {b.name: b for b in stack.buckets}
    clashes = []
    for image, ids in rows.groupby("image")["roi"]:
        row = info.loc[int(image)]
        try:
            _, lab = stack.read(buckets[row["bucket"]], int(row["position"]), int(row["position"]) + 1, labels=True)
        except StackError as e:
            if e.code not in DATA_ERRORS:
                raise
            continue  # NB: a damaged chunk is the image's failure (status 6), found and recorded by its batch
        found = np.intersect1d(np.unique(lab[0, : int(row["valid_h"]), : int(row["valid_w"])]), ids.to_numpy())
        clashes += [(int(image), int(v)) for v in found]
        if len(clashes) >= 5:
            break
    if clashes:
        shown = ", ".join(f"image {i} roi {r}" for i, r in clashes[:5]) + (" ..." if len(clashes) >= 5 else "")
        raise RoiIdClashError(f"the labels and the ROI table both give an ROI id to one image ({shown}); "
                              "an id must mean one ROI: choose one source with --roi-source labels or --roi-source "
                              "table (run(roi_source=...)), or renumber the table's ids")


def table_fingerprint(table) -> str:
    """SHA-256 of the normalised ROI table (or "labels"), so a resume cannot mix two tables."""
    if table is None:
        return "labels"
    cols = table[["image", "roi", "kind", "cx", "cy", "r", "name"]].sort_values(["image", "roi"])
    return hashlib.sha256(pd.util.hash_pandas_object(cols, index=False).to_numpy().tobytes()).hexdigest()


def _kernel_table(columns: dict, lo: int, hi: int, roi_ids, g0: int) -> dict:
    """Rows [lo, hi) of the ROI table as the kernels take them: image within the batch, ROI column, kind code."""
    return {"image": columns["image"][lo:hi] - g0, "col": np.searchsorted(roi_ids, columns["roi"][lo:hi]),
            "kind": columns["kind_code"][lo:hi], "cx": columns["cx"][lo:hi], "cy": columns["cy"][lo:hi],
            "r": columns["r"][lo:hi]}


class _Names:
    """``roi_name(image, roi)`` of a run, one batch of rows at a time: each id's label name (the names ingest read
    from a dataset.json), overridden by the ROI table's own name for its cells. Names are held as codes into
    their distinct values: a batch's block is one fancy index, no Python string per row."""

    def __init__(self, table, roi_ids, label_names=None, *, base=None):
        # NB: labels as ROIs: the names ingest read from a dataset.json; `base`: one name per id (automatic regions)
        base = (list(base) if base is not None else
                [(label_names or {}).get(str(int(roi)), "") for roi in roi_ids])
        self.base = np.arange(len(base), dtype=np.int64)
        if table is not None and len(table):
            image = table["image"].to_numpy()
            order = None if (np.diff(image) >= 0).all() else np.argsort(image, kind="stable")
            codes, distinct = pd.factorize(table["name"], use_na_sentinel=False)
            self.image = image if order is None else image[order]
            roi = table["roi"].to_numpy()
            self.col = np.searchsorted(roi_ids, roi if order is None else roi[order])
            self.code = (codes if order is None else codes[order]).astype(np.int64) + len(base)
            self.values = np.array([*base, *np.asarray(distinct, dtype=object).tolist()], dtype=str)
        else:
            self.image = None
            self.values = np.array(base, dtype=str)

    def rows(self, g0: int, g1: int) -> np.ndarray:
        """The names of images [g0, g1): str array of shape (g1 - g0, ids)."""
        out = np.tile(self.base, (g1 - g0, 1))
        if self.image is not None:
            lo, hi = np.searchsorted(self.image, [g0, g1])
            out[self.image[lo:hi] - g0, self.col[lo:hi]] = self.code[lo:hi]
        return self.values[out] if len(self.values) else np.zeros(out.shape, str)


def _open_or_create(path: Path, stack: Stack, roi_ids, plan, attrs, resume, sources=None, extra=(), *,
                    same_groups: bool = False):
    """The results group, its committed flags and batch backends: new, or (resume) checked against this run and
    verified, its damaged batches uncommitted so that they are recomputed. With `same_groups` (the grouping columns
    were named), a resume refuses results that copied other ones."""
    if path.exists():
        if not resume:
            raise ResultsError("results-exist", _exists_text(path, attrs))
        return _resume(path, attrs, roi_ids, same_groups=same_groups)
    # NB: an allow-list, not "everything but": `meta` may carry names or record numbers (DESIGN §6, §8).
    table = stack.images[[c for c in stack.images.columns if c in RESULT_COLUMNS or c in attrs["group_columns"]]]
    group = create_results(path, n_images=stack.n_images, roi_ids=roi_ids, image_table=table,
                           batches=[(g0, g0 + stop - start) for _, start, stop, g0 in plan], attrs=attrs,
                           roi_coords=None if sources is None else {"roi_source": sources}, extra_variables=extra)
    n = len(plan)
    return group, np.zeros(n, np.int8), np.full(n, -1, np.int8)


def _exists_text(path: Path, attrs: dict) -> str:
    """What to do about a results path that exists, for a run whose attributes are `attrs`: continue those results
    (when this run measures as they were measured), or choose another path."""
    if results_format(path) is None:
        return f"{path} exists and is not gpucnr results: choose another results path"
    # NB: only read to advise; a resume checks the results before it trusts them
    old = dict(zarr.open_group(str(path), mode="r").attrs)
    other = "choose another results path, or remove it"
    if (old.get("stack_fingerprint_version") == FINGERPRINT_VERSION
            and old.get("stack_fingerprint") != attrs["stack_fingerprint"]):
        return f"{path} exists, computed from another stack: {other}"
    changed = _changed_parameters(old, attrs)
    if changed:
        return (f"{path} exists, computed with other parameters: {_parameters_text(old, attrs, changed)}; {other} "
                "(or resume with the parameters they were computed with)")
    # NB: the command as typed, not one rebuilt from the results' attributes (`resume_command`): it names what the
    # user meant to measure
    return f"{path} exists; the same command with --resume continues it (in Python: resume=True); or {other}"


def _changed_parameters(old: dict, attrs: dict) -> list[str]:
    """The measurement parameters (and ROI sources) of results `old` that differ from a run's `attrs`."""
    return [k for k in (*Params().as_attrs(), "roi_source", "rois_fingerprint", "edge") if old.get(k) != attrs.get(k)]


def _parameters_text(old: dict, attrs: dict, changed: list[str]) -> str:
    """`changed` parameters as "name=value in the results (now value in this run)"."""
    return ", ".join(f"{k}={old.get(k)!r} (now {attrs.get(k)!r})" for k in changed)


def _plan_text(entry) -> str:
    if not isinstance(entry, dict):
        return "absent"
    return f"{entry.get('batches')} batch(es) of {entry.get('images_per_batch')} images"


def _resume(path: Path, attrs: dict, roi_ids, *, same_groups: bool = False):
    fmt = results_format(path)
    if fmt is None:
        raise ResultsError("results-schema", f"{path} exists and is not gpucnr results; nothing to resume")
    if fmt != RESULTS_FORMAT:
        raise ResultsError("resume-format", f"{path} are results format {fmt}, written before checksummed results; "
                           "they stay readable, but cannot be resumed: rerun into a new results folder")
    group = zarr.open_group(str(path), mode="r+")
    old = dict(group.attrs)
    if old.get("stack_fingerprint_version") != FINGERPRINT_VERSION:
        raise ResultsError("resume-mismatch", f"{path} recorded a version-{old.get('stack_fingerprint_version', 1)} "
                           "stack fingerprint, which ignores pixels: rerun into a new results folder")
    if old.get("stack_fingerprint") != attrs["stack_fingerprint"]:
        before, now = old.get("stack_buckets") or {}, attrs["stack_buckets"]
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        what = (f"bucket(s) {', '.join(differ)} hold other pixels, labels or images" if differ
                else "its tables or metadata differ")
        raise ResultsError("resume-mismatch", f"{path} was computed from a different stack: {what} (fingerprint "
                           f"{str(old.get('stack_fingerprint'))[:12]} != {attrs['stack_fingerprint'][:12]}); run "
                           "this stack into a new results folder, or resume with the stack they were computed from")
    changed = _changed_parameters(old, attrs)
    if same_groups and list(old.get("group_columns") or []) != list(attrs["group_columns"]):
        # NB: only when named: a plain --resume keeps the columns the run started with (its results hold them)
        changed.append("group_columns")
    if old.get("plan") != attrs["plan"]:
        # NB: compared per bucket, so the message names the buckets whose batches would differ (the spelling of
        # --batch may differ: 64 and 64i, or a pixel size giving the same shards, plan alike)
        before, now = old.get("plan") or {}, attrs["plan"]
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ResultsError("resume-mismatch", f"{path} was computed with another batch plan (--batch "
                           f"{old.get('batch')!r}, now {attrs['batch']!r}): bucket(s) "
                           + ", ".join(f"{k} {_plan_text(before.get(k))} (now {_plan_text(now.get(k))})"
                                       for k in differ)
                           + "; resume without --batch, or with the one it started with")
    if changed:
        raise ResultsError("resume-mismatch", f"{path} was computed with other parameters: "
                           + _parameters_text(old, attrs, changed)
                           + "; resume with the parameters they were computed with, or run into a new results folder")
    removed = shardfiles.remove_leftovers(path)
    if removed:
        logger.info("%s: removed %d temporary file(s) a killed run left", path, removed)
    report = verify_results(path, decode=True)
    untied = [d for d in report["damaged"] if d["batches"] is None]
    if untied:
        raise ResultsError("results-damaged", damage_text(path, untied) + "; this cannot be recomputed by batch: "
                           "rerun into a new results folder")
    if list(np.asarray(group["roi"][:])) != list(roi_ids):
        raise ResultsError("resume-mismatch", f"{path} has other ROI ids")
    committed = report["committed"].copy()
    if report["damaged_batches"]:
        logger.warning(damage_text(path, report["damaged"]) + "; recomputing those batches")
        committed[report["damaged_batches"]] = 0
        # NB: on disk before any row is rewritten: a rewrite fills a damaged chunk, and a resume cut off after it
        # must not leave the other batches of that chunk committed over fill values
        uncommit(path, committed, report["damaged_batches"])
    return group, committed, report["backends"]


# --- execution ---------------------------------------------------------------------------------------------
def _connect(address: str):
    """A client of the Dask scheduler at `address`, or a coded refusal naming it (a typo, a scheduler not
    running, the distributed extra missing)."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError(f"--scheduler {address!r} is neither {', '.join(SCHEDULERS)} nor usable as the address of "
                         "a Dask scheduler without the distributed extra (pip install 'gpucnr[distributed]')") from None
    try:
        # NB: not the process's default client: one that fails to connect stays registered as the default until the
        # garbage collector finds it, and a later Dask compute in the same process (a notebook's, a test's) waited
        # on it forever; the run uses its client by name
        return Client(address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        raise InputError(f"cannot reach a Dask scheduler at {address!r} ({type(e).__name__}: {e or 'no detail'}); "
                         f"--scheduler takes {', '.join(SCHEDULERS)} or the address of a running scheduler "
                         "(e.g. tcp://127.0.0.1:8786)") from None


def _execute(specs, finish, *, client, scheduler, workers):
    attempts = _Attempts()
    if client is not None:
        return _execute_distributed(specs, finish, client, attempts)
    if scheduler == "synchronous":
        for spec in specs:
            while True:
                try:
                    out = measure_spec(spec)
                    break
                except Exception as e:  # noqa: BLE001 - classified (refusal or environment) by _Attempts
                    attempts.failed(spec, e)
            finish(spec, out)
        return None
    workers = workers or os.cpu_count() or 1
    if scheduler == "threads":
        with ThreadPoolExecutor(max_workers=workers, initializer=_one_batch_per_core, initargs=(workers,)) as pool:
            return _drain(pool, specs, finish, workers, attempts)
    ctx = QUIET_SPAWN
    quiet_resource_tracker()
    queue = list(specs)
    while queue:
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(workers,)) as pool:
                _drain(pool, queue, finish, workers, attempts)
            queue = []
        except _PoolBroken as broken:
            # A worker process died; every batch in flight is a suspect (the pool cannot say which one killed
            # it). Each suspect runs alone in a fresh process; one that kills it again is rerun one image per
            # process, and an image that still kills its process gets status 6. Then the rest goes on.
            for spec in broken.suspects:
                out = _isolated(spec, ctx, attempts)
                if out is None:
                    out = _concat([_isolated(s, ctx, attempts) or failed_rows(s, "worker-died", "the worker process "
                                                                              "died while measuring this image")
                                   for s in _per_image(spec)])
                finish(spec, out)
            queue = broken.queue
    return None


class _Attempts:
    """Counts a batch's environmental failures: the first ENVIRONMENT_RETRIES are tried again, the next stops the
    run with `RunEnvironmentError` (never a status: the data is not at fault). A coded refusal (the stack changed
    under the run) and a results-write error stop it at once, as they are."""

    def __init__(self):
        self.counts: dict[tuple, int] = {}

    def failed(self, spec: BatchSpec, error: BaseException) -> None:
        """Return to try `spec` again; raise to stop the run."""
        if isinstance(error, ResultsError) or (isinstance(error, StackError)
                                               and error.code in ("stack-changed", "stack-schema")):
            raise error  # NB: the stack's or the results', not an image's and not the environment's
        # NB: a batch and each of its single-image reruns are counted apart
        key = (spec.index, spec.global_start, spec.stop - spec.start)
        n = self.counts[key] = self.counts.get(key, 0) + 1
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        logger.warning("batch %d (images %d..%d): %s (attempt %d)", spec.index, spec.global_start,
                       spec.global_start + spec.stop - spec.start - 1, what, n)
        if n > ENVIRONMENT_RETRIES:
            raise RunEnvironmentError(
                f"batch {spec.index} (images {spec.global_start}..{spec.global_start + spec.stop - spec.start - 1}) "
                f"failed {n} times for a reason outside the data ({what}); the run stopped, every batch finished "
                "before is committed: fix the cause, then `gpucnr run STACK RESULTS --resume` continues") from error


class _PoolBroken(Exception):
    def __init__(self, suspects, queue):
        super().__init__("a worker process died")
        self.suspects, self.queue = suspects, queue


def _drain(pool, specs, finish, workers, attempts: _Attempts):
    """Keep at most 2 x workers batches in flight; finish each as it completes (the driver writes). A batch that
    failed for an environmental reason goes back to the front of the queue; when the run must stop, the batches
    still in flight are waited for and kept."""
    queue = list(specs)
    flying = {}
    try:
        while queue or flying:
            while queue and len(flying) < 2 * workers:
                spec = queue.pop(0)
                flying[pool.submit(measure_spec, spec)] = spec
            # NB: a timeout, so the main thread wakes to take Ctrl-C / SIGTERM: the kernel may deliver the signal to
            # another thread of the driver, which does not end this thread's futex wait — Ctrl-C then waited for
            # the next batch to finish (seconds; stuck while a worker was still starting)
            done, _ = wait(list(flying), timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for fut in done:
                spec = flying.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool:
                    raise _PoolBroken([spec, *flying.values()], queue) from None
                except Exception as e:  # noqa: BLE001 - classified (refusal or environment) by _Attempts
                    try:
                        attempts.failed(spec, e)
                    except BaseException:
                        _keep_finished(flying, finish)
                        raise
                    queue.insert(0, spec)
                    continue
                finish(spec, out)
    except KeyboardInterrupt:
        # NB: Ctrl-C / SIGTERM: queued batches are cancelled and worker processes stopped now, not after the
        # batches in flight (threads cannot be stopped: each finishes the batch it is on, unwritten).
        # NB: the processes are listed before shutdown(), which forgets them (its `_processes` becomes None): taken
        # after it, none was terminated and Ctrl-C waited for workers still starting to finish their imports
        procs = list((getattr(pool, "_processes", None) or {}).values())
        manager = getattr(pool, "_executor_manager_thread", None)
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
        if manager is not None:
            # NB: the pool's manager thread sees its workers gone and releases the queues' semaphores; leaving
            # before it does made the resource tracker print a "leaked semaphore" warning under the one line
            manager.join(timeout=5)
        raise


def _worker_init(workers: int = 1) -> None:
    """A local pool's worker process: it exits with its parent (`watch_parent`), and leaves Ctrl-C (sent to the
    whole terminal's process group) to the driver, which stops it."""
    watch_parent()
    quiet_worker()
    _one_batch_per_core(workers)


def _one_batch_per_core(workers: int) -> None:
    """A worker (thread or process) of a local pool of `workers`: with two or more, the pool spreads batches over
    the cores already, so this worker's compiled loops run on its own thread. Measured (20,000 images of 64x64, 2
    cores): splitting every batch again over a shared pool of the same cores made the run 1.65x slower."""
    if workers > 1:
        from gpucnr.kernels._numpy_fast import set_thread_limit

        set_thread_limit(1)


def _keep_finished(flying: dict, finish) -> None:
    """The run stops: wait for the batches in flight and keep those that succeeded (nothing computed is lost)."""
    for fut in list(flying):
        fut.cancel()
    for fut, spec in flying.items():
        if fut.cancelled():
            continue
        try:
            out = fut.result()
        except BaseException:  # noqa: BLE001 - the run is stopping for another reason already
            continue
        finish(spec, out)


def _per_image(spec: BatchSpec):
    for k in range(spec.start, spec.stop):
        rows = None
        if spec.table is not None:
            sel = spec.table["image"] == k - spec.start
            rows = {c: v[sel] - (k - spec.start if c == "image" else 0) for c, v in spec.table.items()}
        yield replace(spec, start=k, stop=k + 1, global_start=spec.global_start + k - spec.start, table=rows)


def _isolated(spec: BatchSpec, ctx, attempts: _Attempts):
    """Run one spec alone in a fresh process; None if the process died."""
    while True:
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init) as pool:
                fut = pool.submit(measure_spec, spec)
                while not wait([fut], timeout=_POLL_S).done:
                    pass  # NB: wakes to take a signal, as in _drain
                return fut.result()
        except BrokenProcessPool:
            return None
        except Exception as e:  # noqa: BLE001 - classified (refusal or environment) by _Attempts
            attempts.failed(spec, e)


def _concat(parts: list[dict]) -> dict:
    names = (*OUTPUT_CELL, *OUTPUT_IMAGE, *(AUTO_IMAGE if all(k in parts[0] for k in AUTO_IMAGE) else ()))
    out = {k: np.concatenate([p[k] for p in parts]) for k in names}
    out["failures"] = [f for p in parts for f in p.get("failures", [])]
    return out


def _execute_distributed(specs, finish, client, attempts: _Attempts):
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    futures = {client.submit(measure_spec, spec, pure=False): spec for spec in specs}
    pending = as_completed(list(futures))
    for fut in pending:
        spec = futures.pop(fut)
        try:
            out = fut.result()
        except (KilledWorker, FutureCancelledError):
            # The batch killed every worker it touched: rerun it one image per task; an image that kills
            # its workers too is a per-image failure (status 6), the rest of the dataset keeps its results.
            out = _concat(_singles_distributed(spec, client, attempts))
        except Exception as e:  # noqa: BLE001 - classified (refusal or environment) by _Attempts
            try:
                attempts.failed(spec, e)
            except BaseException:
                # NB: the run stops: batches already finished are kept (nothing computed is lost), the rest cancelled
                for other, other_spec in list(futures.items()):
                    if other.status == "finished":
                        with contextlib.suppress(Exception):
                            finish(other_spec, other.result())
                client.cancel(list(futures))
                raise
            again = client.submit(measure_spec, spec, pure=False)
            futures[again] = spec
            pending.add(again)
            continue
        finish(spec, out)


def _singles_distributed(spec: BatchSpec, client, attempts: _Attempts) -> list[dict]:
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    singles = list(_per_image(spec))
    subs = [client.submit(measure_spec, s, pure=False) for s in singles]
    parts = []
    for sub in subs:
        try:
            parts.append(sub.result())
        except (KilledWorker, FutureCancelledError):
            parts.append(None)
    for k, single in enumerate(singles):
        # NB: a worker's death makes every task it held a suspect, so an image that only shared a worker with
        # the killer can fail too: each such image is tried again alone, in turn.
        while parts[k] is None:
            try:
                parts[k] = client.submit(measure_spec, single, pure=False).result()
            except (KilledWorker, FutureCancelledError):
                parts[k] = failed_rows(single, "worker-died", "every worker that measured this image died")
            except Exception as e:  # noqa: BLE001 - classified (refusal or environment) by _Attempts
                attempts.failed(single, e)
    return parts


# --- the task ----------------------------------------------------------------------------------------------
#: Stacks a driver opened, lent to the workers of its own process (threads, synchronous) by (path, fingerprint):
#: a worker opening its own copy held the per-image and ROI tables twice more (measured: +1.3 GB a worker at 10^6
#: images), since both threads' first batches opened it at once.
_LENT: dict[tuple[str, str], Stack] = {}
_OPEN_LOCK = threading.Lock()


def _stack(path: str, fingerprint: str) -> Stack:
    """The stack opened once per process (the driver's own when it runs in this process); keyed by its
    fingerprint too, so a stack rewritten at the same path is opened afresh."""
    lent = _LENT.get((path, fingerprint))
    if lent is not None:
        return lent
    with _OPEN_LOCK:  # NB: two threads' first batches would each open a copy
        return _open_for_worker(path, fingerprint)


@lru_cache(maxsize=4)
def _open_for_worker(path: str, fingerprint: str) -> Stack:
    try:
        stack = open_stack(path, check=False)
    except StackError as e:
        # NB: the driver opened and checked this stack: a worker that cannot is the environment's failure
        raise RuntimeError(f"this worker cannot open the stack {path}: {e.reason}") from None
    if stack.fingerprint() != fingerprint:
        raise StackError("stack-changed", f"{path} changed since the run started (fingerprint)")
    return stack


def measure_spec(spec: BatchSpec) -> dict:
    """Read one batch, measure it, return small host arrays and its per-image failures: an image whose
    chunk cannot be read gets status 6 (failed) and a failure entry; the rest of the batch its results."""
    try:
        return _measure_checked(spec)
    except StackError as e:
        if e.code not in DATA_ERRORS:
            raise  # NB: not the data's fault: the driver retries the batch, then stops the run
        if spec.stop - spec.start == 1:
            return failed_rows(spec, e.code, e.reason)
    parts = []
    for single in _per_image(spec):
        try:
            parts.append(_measure_checked(single))
        except StackError as e:
            if e.code not in DATA_ERRORS:
                raise
            parts.append(failed_rows(single, e.code, e.reason))
    return _concat(parts)


def _measure_checked(spec: BatchSpec) -> dict:
    try:
        return _measure(spec)
    except InputError as e:
        # NB: everything measure_batch's entry checks comes from the stack here (the ROI table was validated)
        raise StackError("stack-schema", f"buckets/{spec.bucket}, images {spec.start}..{spec.stop - 1}: "
                         f"{e.reason}") from None


def _measure(spec: BatchSpec) -> dict:
    stack = _stack(spec.stack, spec.fingerprint)
    bucket = next(b for b in stack.buckets if b.name == spec.bucket)
    info = _image_columns(stack, spec.global_start, spec.global_start + spec.stop - spec.start)
    auto = spec.auto_edge is not None
    # NB: into this thread's scratch buffers (no page faults per batch): nothing this function returns is a
    # view of them (tests/test_read_buffers.py), and the thread reads its next batch only after it returns
    images, labels = stack.read(bucket, spec.start, spec.stop,
                                labels=not auto and (spec.use_labels or spec.use_lesions), reuse=True)
    where = spec.backend
    ids = np.asarray(spec.roi_ids, np.int64)
    both = spec.use_labels and spec.table is not None
    rows = None if spec.table is None else {k: np.asarray(v, np.int64) for k, v in spec.table.items()}
    lesions = labels if spec.use_lesions else None
    if both and spec.params.background == "complement-all" and len(rows["image"]):
        # NB: complement-all removes every ROI of both sources: the label cells' union gets the table's ROIs as
        # lesions (the table cells' union has the labels as lesions already)
        lesions_of_labels = _with_table_rois(labels, rows, ids, info)
    else:
        lesions_of_labels = lesions
    images = to_backend(images, where)
    xp = namespace(images)
    common = {"params": spec.params, **info}

    def device(a):
        return None if a is None else to_backend(a, where)

    if auto:
        out = measure_auto(xp, images, edge=spec.auto_edge, **common)
        host = auto_host({k: to_host(v) for k, v in out.items()})
        host["failures"] = []
        return host
    parts = []
    if spec.use_labels:
        out = measure_batch(xp, images, roi_ids=None, labels=device(labels), lesions=device(lesions_of_labels),
                            **common)
        host = {k: to_host(v) for k, v in out.items()}
        check_label_ids(host["roi_ids"], spec.roi_ids, f"buckets/{spec.bucket}/labels", spec.start, spec.stop)
        parts.append(align_columns(host, ids))
    if rows is not None and (not both or len(rows["image"])):
        table = {k: xp.asarray(v) for k, v in rows.items()}
        out = measure_batch(xp, images, roi_ids=xp.asarray(ids), table=table, lesions=device(lesions), **common)
        parts.append({k: to_host(v) for k, v in out.items()})
    host = parts[0] if len(parts) == 1 else _merge_sources(parts[0], parts[1], spec)
    host["failures"] = []
    return host


def _image_columns(stack: Stack, g0: int, g1: int) -> dict:
    """The per-image inputs of the kernels for images [g0, g1): slices of NumPy columns made once per opened
    stack (pandas' slicing and conversions per batch cost ~1 ms of each batch)."""
    columns = stack.__dict__.get("_kernel_columns")
    if columns is None:
        images = stack.images
        photometric = images["photometric"]
        if isinstance(photometric.dtype, pd.CategoricalDtype):  # NB: coded text: compared by distinct value
            mono1 = np.asarray(photometric.cat.categories.astype(str) == "MONOCHROME1")
            flip = mono1[photometric.cat.codes.to_numpy()] & (photometric.cat.codes.to_numpy() >= 0)
        else:
            flip = photometric.astype(str).to_numpy() == "MONOCHROME1"
        columns = {"valid_h": images["valid_h"].to_numpy(np.int64), "valid_w": images["valid_w"].to_numpy(np.int64),
                   "slope": images["slope"].to_numpy(np.float64),
                   "intercept": images["intercept"].to_numpy(np.float64),
                   "padding": images["padding"].to_numpy(np.float64), "polarity": np.where(flip, -1.0, 1.0)}
        stack.__dict__["_kernel_columns"] = columns  # NB: two threads may both build it: the same values
    return {k: v[g0:g1] for k, v in columns.items()}


def _with_table_rois(labels: np.ndarray, rows: dict, ids: np.ndarray, info: dict) -> np.ndarray:
    """`labels` with the table's ROIs drawn where they hold 0 (value: the ROI id), within each valid extent:
    square x in [cx - r, cx + r), y in [cy - r, cy + r); disk (x - cx)^2 + (y - cy)^2 <= r^2 (DESIGN §4)."""
    out = np.array(labels, copy=True)
    vh, vw = info["valid_h"], info["valid_w"]
    for i, col, kind, cx, cy, r in zip(rows["image"], rows["col"], rows["kind"], rows["cx"], rows["cy"], rows["r"],
                                       strict=True):
        disk = int(kind) == KIND_DISK
        y0, y1 = max(cy - r, 0), min(cy + r + disk, vh[i])
        x0, x1 = max(cx - r, 0), min(cx + r + disk, vw[i])
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        shape = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if disk else np.ones((y1 - y0, x1 - x0), bool)
        window = out[i, y0:y1, x0:x1]
        window[shape & (window == 0)] = ids[col]
    return out


def _merge_sources(by_labels: dict, by_table: dict, spec: BatchSpec) -> dict:
    """One batch's cells from its labels and from the ROI table, on the same columns; each cell comes from the one
    source that has it (the run refused images where both do), and cnr_median is over both."""
    absent = STATUS["absent"]
    from_table = by_table["status"] != absent
    clash = from_table & (by_labels["status"] != absent)
    if clash.any():
        # NB: checked before the run started; a stack that changed under it could still get here
        image, col = (int(v[0]) for v in np.nonzero(clash))
        raise RoiIdClashError(f"image {spec.global_start + image} has ROI id {spec.roi_ids[col]} in its labels and "
                              "in the ROI table; choose one with --roi-source labels or --roi-source table")
    out = {k: np.where(from_table, by_table[k], by_labels[k]) for k in OUTPUT_CELL}
    out["cnr_median"], out["n_valid"] = median_of_valid(namespace(out["cnr"]), out["cnr"], out["status"],
                                                        signed=spec.params.signed)
    out["n_excluded"] = by_labels["n_excluded"]
    out["roi_ids"] = by_table["roi_ids"]
    return {k: to_host(v) for k, v in out.items()}


def failed_rows(spec: BatchSpec, code: str, reason: str) -> dict:
    """Rows of images that could not be processed: status 6 (failed) in every ROI column."""
    n = spec.stop - spec.start
    n_ids = len(spec.roi_ids)
    out = {k: np.full((n, n_ids), _FLOAT_FILL.get(k, -1), dtype=np.float64 if k in _FLOAT_FILL else np.int64)
           for k in OUTPUT_CELL}
    out["status"] = np.full((n, n_ids), STATUS["failed"], np.int8)
    out["cnr_median"] = np.full(n, np.nan)
    out["n_valid"] = np.zeros(n, np.int64)
    out["n_excluded"] = np.full(n, -1, np.int64)
    if spec.auto_edge is not None:
        out.update({"n_air": np.full(n, -1, np.int64), "mean_air": np.full(n, np.nan), "var_air": np.full(n, np.nan),
                    "noise_source": np.full(n, "", dtype=object).astype(str)})
    out["failures"] = [{"image": spec.global_start + k, "code": code, "reason": reason} for k in range(n)]
    return out
