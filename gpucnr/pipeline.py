"""gpucnr.run: a stack on Zarr, batch by batch through the kernels, into resumable results (DESIGN §6-§7)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from gpucnr.arrays import STATUS_LEGEND, align_columns
from gpucnr.backend import namespace, resolve_backend, to_backend, to_host
from gpucnr.errors import InputError, Interrupted
from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE, measure_batch
from gpucnr.kernels.cnr import STATUS
from gpucnr.kernels.params import Params
from gpucnr.results import ResultsError, create_results, open_results, resume_command, stack_relative, write_rows
from gpucnr.roitable import normalize_table
from gpucnr.store import RESULT_COLUMNS, Stack, StackError, open_stack

__all__ = ["SCHEDULERS", "plan_batches", "run", "table_fingerprint"]

#: Local schedulers; anything else given as ``scheduler`` is the address of a Dask distributed scheduler.
SCHEDULERS = ("threads", "processes", "synchronous")
_FLOAT_FILL = {k: np.nan for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr", "cnr_median")}


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


def plan_batches(stack: Stack, batch: int | None) -> tuple[int, list[tuple[str, int, int, int]]]:
    """Batches of whole images of one bucket: ``(size, [(bucket, start, stop, global_start), ...])``.

    `batch` defaults to the stack's shard size; other values are rounded to a multiple of it (at least one
    shard), so a batch never splits a shard.
    """
    shard = stack.shard
    size = shard if batch is None else max(shard, round(batch / shard) * shard)
    plan = []
    for b in stack.buckets:
        for start in range(0, b.size, size):
            plan.append((b.name, start, min(start + size, b.size), b.offset + start))
    return size, plan


def run(stack, results, *, client=None, scheduler: str = "threads", workers: int | None = None,
        batch: int | None = None, resume: bool = False, progress: bool = False, rois=None, backend: str = "auto",
        **options) -> xr.Dataset:
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
    batch : int, optional
        Images per batch (default the stack's shard; rounded to a multiple of it).
    resume : bool
        Skip committed batches of existing results; refuses a different stack (fingerprint) or parameters.
    progress : bool
        A progress bar on stderr.
    rois : ROI table or CSV path, optional
        Columns image (global index), roi, kind, cx, cy, r [, name]. Default: the stack's ROI table, else its
        labels.
    backend : {"auto", "numpy", "cupy"}
    **options
        The measurement options of `gpucnr.measure` (background, footprint, dilation, ...).

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
    stack = stack if isinstance(stack, Stack) else open_stack(stack)
    params = Params(**options)
    where = resolve_backend(backend)
    table, use_labels = _roi_source(stack, rois)
    if table is None and not use_labels:
        raise InputError(f"{stack.path} has neither an ROI table nor labels; pass rois=")
    use_lesions = stack.has_labels and params.background in ("label", "complement-all")
    if params.background == "label" and not stack.has_labels:
        raise InputError("background='label' needs a stack with labels")
    roi_ids = _roi_ids(stack, table, use_labels, params)
    size, plan = plan_batches(stack, batch)
    fingerprint = stack.fingerprint()
    attrs = {**params.as_attrs(), "backend": where, "stack_path": stack_relative(stack.path, results),
             "stack_fingerprint": fingerprint, "batch": size, "roi_source": "table" if table is not None else "labels",
             "rois_fingerprint": table_fingerprint(table), "status_codes": STATUS_LEGEND, "failures": []}
    group = _open_or_create(Path(results), stack, roi_ids, size, plan, attrs, resume)
    committed = np.asarray(group["committed"][:])
    names = _names(table, roi_ids, stack.n_images)
    specs = []
    if table is not None:
        # NB: sorted once, each batch's rows are a slice: no scan of the whole table per batch.
        table = table.sort_values("image", kind="stable").reset_index(drop=True)
        image_col = table["image"].to_numpy()
    for index, (bucket, start, stop, g0) in enumerate(plan):
        if committed[index]:
            continue
        rows = None
        if table is not None:
            lo, hi = np.searchsorted(image_col, [g0, g0 + stop - start])
            rows = {k: np.asarray(v) for k, v in _kernel_table(table.iloc[lo:hi], roi_ids, g0).items()}
        specs.append(BatchSpec(index=index, stack=str(stack.path), fingerprint=fingerprint, bucket=bucket,
                               start=start, stop=stop, global_start=g0, params=params,
                               roi_ids=tuple(int(v) for v in roi_ids), table=rows, use_labels=use_labels,
                               use_lesions=use_lesions, backend=where))
    bar = _Progress(len(plan), int(committed.sum())) if progress else None
    log = os.environ.get("GPUCNR_BATCH_LOG")

    def finish(spec: BatchSpec, out: dict):
        g0 = spec.global_start
        g1 = g0 + spec.stop - spec.start
        try:
            old = list(group.attrs.get("failures", []))
            kept = [f for f in old if not g0 <= int(f["image"]) < g1]
            if out.get("failures") or len(kept) != len(old):
                # NB: this batch's entries replace any a crashed attempt left: a resume never duplicates them.
                group.attrs["failures"] = kept + list(out.get("failures", []))
            write_rows(group, g0, g1, out, names[g0:g1], spec.index)
        except OSError as e:
            # NB: a full disk (or a quota) while writing: the batches committed so far stay readable, and
            # --resume redoes this one; say so instead of ending in a bare EFBIG/ENOSPC traceback.
            raise ResultsError("results-write", f"could not write batch {spec.index} (images {g0}..{g1 - 1}) to "
                               f"{results}: {e.strerror or e}; committed batches are intact, rerun with "
                               "--resume when there is room") from e
        if log:
            with open(log, "a") as fh:
                fh.write(f"{spec.index}\n")
        if bar:
            bar.step()

    try:
        _execute(specs, finish, client=client, scheduler=scheduler, workers=workers)
    except KeyboardInterrupt as e:
        # NB: Ctrl-C / SIGTERM: the pool is stopped (_drain); committed batches stay, --resume does the rest
        if bar:
            bar.close()
        done = int(np.asarray(group["committed"][:]).sum())
        raise Interrupted(f"{done} of {len(plan)} batches are committed in {results}; continue with "
                          f"`{resume_command(dict(group.attrs), results)}`", e) from None
    if bar:
        bar.close()
    return open_results(results)


def _roi_source(stack: Stack, rois):
    """The ROI table (global image indices) or None, and whether labels are the ROIs."""
    if rois is not None:
        if isinstance(rois, str | Path):
            try:
                rois = pd.read_csv(rois)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read the ROI table {rois}: {e}") from None
        return normalize_table(rois, stack.n_images), False
    if stack.rois is not None and len(stack.rois):
        return normalize_table(stack.rois, stack.n_images), False
    return None, stack.has_labels


def _roi_ids(stack, table, use_labels, params) -> np.ndarray:
    if table is not None:
        return np.unique(table["roi"].to_numpy()).astype(np.int64)
    ids = stack.roi_ids
    if params.background == "label":
        ids = ids[ids != params.background_label]
    return ids.astype(np.int64)


def table_fingerprint(table) -> str:
    """SHA-256 of the normalised ROI table (or "labels"), so a resume cannot mix two tables."""
    if table is None:
        return "labels"
    cols = table[["image", "roi", "kind", "cx", "cy", "r", "name"]].sort_values(["image", "roi"])
    return hashlib.sha256(pd.util.hash_pandas_object(cols, index=False).to_numpy().tobytes()).hexdigest()


def _kernel_table(rows: pd.DataFrame, roi_ids, g0: int) -> dict:
    return {"image": rows["image"].to_numpy() - g0, "col": np.searchsorted(roi_ids, rows["roi"].to_numpy()),
            "kind": rows["kind_code"].to_numpy(), "cx": rows["cx"].to_numpy(), "cy": rows["cy"].to_numpy(),
            "r": rows["r"].to_numpy()}


def _names(table, roi_ids, n) -> np.ndarray:
    names = np.full((n, len(roi_ids)), "", dtype=object)
    if table is not None and len(table):
        names[table["image"].to_numpy(), np.searchsorted(roi_ids, table["roi"].to_numpy())] = table["name"].to_numpy()
    return names.astype(str)


def _open_or_create(path: Path, stack: Stack, roi_ids, size, plan, attrs, resume):
    if path.exists():
        if not resume:
            raise ResultsError("results-exist", f"{path} exists; pass resume=True (--resume) to continue it, or "
                               "remove it")
        group = zarr.open_group(str(path), mode="r+")
        old = dict(group.attrs)
        if old.get("stack_fingerprint") != attrs["stack_fingerprint"]:
            raise ResultsError("resume-mismatch", f"{path} was computed from a different stack (fingerprint "
                               f"{str(old.get('stack_fingerprint'))[:12]} != {attrs['stack_fingerprint'][:12]})")
        changed = [k for k in (*Params().as_attrs(), "batch", "roi_source", "rois_fingerprint")
                   if old.get(k) != attrs[k]]
        if changed:
            raise ResultsError("resume-mismatch", f"{path} was computed with other parameters: "
                               + ", ".join(f"{k}={old.get(k)!r} (now {attrs[k]!r})" for k in changed))
        if list(np.asarray(group["roi"][:])) != list(roi_ids):
            raise ResultsError("resume-mismatch", f"{path} has other ROI ids")
        return group
    # NB: an allow-list, not "everything but": `meta` may carry names or record numbers (DESIGN §6, §8).
    table = stack.images[[c for c in stack.images.columns if c in RESULT_COLUMNS]]
    return create_results(path, n_images=stack.n_images, roi_ids=roi_ids, image_table=table, chunk=stack.shard,
                          batches=[(g0, g0 + stop - start) for _, start, stop, g0 in plan], attrs=attrs)


# --- execution ---------------------------------------------------------------------------------------------
def _execute(specs, finish, *, client, scheduler, workers):
    if client is None and scheduler not in SCHEDULERS:
        from distributed import Client

        with Client(scheduler) as remote:
            return _execute_distributed(specs, finish, remote)
    if client is not None:
        return _execute_distributed(specs, finish, client)
    if scheduler == "synchronous":
        for spec in specs:
            finish(spec, measure_spec(spec))
        return None
    workers = workers or os.cpu_count() or 1
    if scheduler == "threads":
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return _drain(pool, specs, finish, workers)
    ctx = multiprocessing.get_context("spawn")
    queue = list(specs)
    while queue:
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_sigint) as pool:
                _drain(pool, queue, finish, workers)
            queue = []
        except _PoolBroken as broken:
            # A worker process died; every batch in flight is a suspect (the pool cannot say which one killed
            # it). Each suspect runs alone in a fresh process; one that kills it again is rerun one image per
            # process, and an image that still kills its process gets status 6. Then the rest goes on.
            for spec in broken.suspects:
                out = _isolated(spec, ctx)
                if out is None:
                    out = _concat([_isolated(s, ctx) or failed_rows(s, "worker-died", "the worker process died "
                                                                     "while measuring this image")
                                   for s in _per_image(spec)])
                finish(spec, out)
            queue = broken.queue
    return None


class _PoolBroken(Exception):
    def __init__(self, suspects, queue):
        super().__init__("a worker process died")
        self.suspects, self.queue = suspects, queue


def _drain(pool, specs, finish, workers):
    """Keep at most 2 x workers batches in flight; finish each as it completes (the driver writes)."""
    queue = list(specs)
    flying = {}
    try:
        while queue or flying:
            while queue and len(flying) < 2 * workers:
                spec = queue.pop(0)
                flying[pool.submit(measure_spec, spec)] = spec
            done, _ = wait(list(flying), return_when=FIRST_COMPLETED)
            for fut in done:
                spec = flying.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool:
                    raise _PoolBroken([spec, *flying.values()], queue) from None
                finish(spec, out)
    except KeyboardInterrupt:
        # NB: Ctrl-C / SIGTERM: queued batches are cancelled and worker processes stopped now, not after the
        # batches in flight (threads cannot be stopped: each finishes the batch it is on, unwritten).
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        raise


def _ignore_sigint() -> None:
    """Process workers leave Ctrl-C (sent to the whole terminal's process group) to the driver, which stops them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _per_image(spec: BatchSpec):
    for k in range(spec.start, spec.stop):
        rows = None
        if spec.table is not None:
            sel = spec.table["image"] == k - spec.start
            rows = {c: v[sel] - (k - spec.start if c == "image" else 0) for c, v in spec.table.items()}
        yield replace(spec, start=k, stop=k + 1, global_start=spec.global_start + k - spec.start, table=rows)


def _isolated(spec: BatchSpec, ctx):
    """Run one spec alone in a fresh process; None if the process died."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_ignore_sigint) as pool:
            return pool.submit(measure_spec, spec).result()
    except BrokenProcessPool:
        return None


def _concat(parts: list[dict]) -> dict:
    out = {k: np.concatenate([p[k] for p in parts]) for k in (*OUTPUT_CELL, *OUTPUT_IMAGE)}
    out["failures"] = [f for p in parts for f in p.get("failures", [])]
    return out


def _execute_distributed(specs, finish, client):
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    futures = {client.submit(measure_spec, spec, pure=False, retries=1): spec for spec in specs}
    for fut in as_completed(list(futures)):
        spec = futures[fut]
        try:
            out = fut.result()
        except (KilledWorker, FutureCancelledError):
            # The batch killed every worker it touched: rerun it one image per task; an image that kills
            # its workers too is a per-image failure (status 6), the rest of the dataset keeps its results.
            singles = list(_per_image(spec))
            subs = [client.submit(measure_spec, s, pure=False) for s in singles]
            parts = []
            for sub in subs:
                try:
                    parts.append(sub.result())
                except (KilledWorker, FutureCancelledError):
                    parts.append(None)
            for k, single in enumerate(singles):
                if parts[k] is not None:
                    continue
                # NB: a worker's death makes every task it held a suspect, so an image that only shared a
                # worker with the killer can fail too: each such image is tried again alone, in turn.
                try:
                    parts[k] = client.submit(measure_spec, single, pure=False).result()
                except (KilledWorker, FutureCancelledError):
                    parts[k] = failed_rows(single, "worker-died", "every worker that measured this image died")
            out = _concat(parts)
        finish(spec, out)


# --- the task ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _stack(path: str, fingerprint: str) -> Stack:
    """The stack opened once per process; keyed by its fingerprint too, so a stack rewritten at the same path
    is opened afresh."""
    stack = open_stack(path, check=False)
    if stack.fingerprint() != fingerprint:
        raise StackError("stack-changed", f"{path} changed since the run started (fingerprint)")
    return stack


def measure_spec(spec: BatchSpec) -> dict:
    """Read one batch, measure it, return small host arrays and its per-image failures: an image whose
    chunk cannot be read gets status 6 (failed) and a failure entry; the rest of the batch its results."""
    try:
        return _measure(spec)
    except StackError as e:
        if e.code == "stack-changed":
            raise
        if spec.stop - spec.start == 1:
            return failed_rows(spec, e.code, e.reason)
    parts = []
    for single in _per_image(spec):
        try:
            parts.append(_measure(single))
        except StackError as e:
            parts.append(failed_rows(single, e.code, e.reason))
    return _concat(parts)


def _measure(spec: BatchSpec) -> dict:
    stack = _stack(spec.stack, spec.fingerprint)
    bucket = next(b for b in stack.buckets if b.name == spec.bucket)
    info = stack.images.iloc[spec.global_start : spec.global_start + spec.stop - spec.start]
    images, labels = stack.read(bucket, spec.start, spec.stop, labels=spec.use_labels or spec.use_lesions)
    where = spec.backend
    images = to_backend(images, where)
    xp = namespace(images)
    labels = None if labels is None else to_backend(labels, where)
    roi_ids = xp.asarray(np.asarray(spec.roi_ids, np.int64))
    table = None
    if spec.table is not None:
        table = {k: xp.asarray(np.asarray(v, np.int64)) for k, v in spec.table.items()}
    polarity = np.where(info["photometric"].astype(str).to_numpy() == "MONOCHROME1", -1.0, 1.0)
    out = measure_batch(
        xp, images, roi_ids=None if spec.use_labels else roi_ids, params=spec.params,
        labels=labels if spec.use_labels else None, table=table,
        lesions=labels if spec.use_lesions else None,
        valid_h=info["valid_h"].to_numpy(np.int64), valid_w=info["valid_w"].to_numpy(np.int64),
        slope=info["slope"].to_numpy(np.float64), intercept=info["intercept"].to_numpy(np.float64),
        padding=info["padding"].to_numpy(np.float64), polarity=polarity,
    )
    host = {k: to_host(v) for k, v in out.items()}
    if spec.use_labels:
        host = align_columns(host, np.asarray(spec.roi_ids, np.int64))
    host["failures"] = []
    return host


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
    out["failures"] = [{"image": spec.global_start + k, "code": code, "reason": reason} for k in range(n)]
    return out


class _Progress:
    """A plain progress bar on stderr (works the same with local schedulers and a distributed client)."""

    def __init__(self, total: int, done: int):
        self.total, self.done = total, done
        self._draw()

    def step(self):
        self.done += 1
        self._draw()

    def _draw(self):
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} batches")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")
