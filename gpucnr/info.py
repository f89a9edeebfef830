"""`gpucnr info`: what a stack or a results store holds, whether it is complete, with which parameters."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from gpucnr.errors import GpucnrError
from gpucnr.kernels.cnr import STATUS
from gpucnr.kernels.params import Params
from gpucnr.results import (
    RESULTS_FORMAT,
    damage_text,
    damage_where,
    repair_hint,
    results_format,
    resume_command,
    verify_results,
)
from gpucnr.store import open_stack, unfinished_stack

__all__ = ["describe"]


def describe(path, *, verify: bool = False) -> dict:
    """A report on `path` (a stack or results): a dict of facts, with a human-readable ``text`` entry and the
    ``exit_code`` the command ends with.

    A damaged stack or damaged results are reported, not raised: ``complete`` is False and ``problem`` (stacks)
    or ``damaged`` (results: array, batches, reason) says what is wrong. Results are checked through their
    shard indexes and chunk checksums; with `verify`, every chunk is decoded too.
    ``exit_code`` is the status `gpucnr info` ends with (DESIGN §10): 0 a complete stack or complete, undamaged
    results, 3 damaged or incomplete ones, 2 a stack an interrupted ingest left (not a stack yet) or a path that
    is neither a stack nor results (``kind`` "unknown", with the error's ``code``: ``not-found`` when nothing is
    there, ``not-gpucnr`` otherwise).
    """
    path = Path(path)
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - not a Zarr group: say so below
        attrs = {}
    unfinished = unfinished_stack(path)
    if unfinished:
        return {"kind": "unfinished-stack", "path": str(path), "complete": False, "problem": unfinished,
                "text": f"{path}: {unfinished}", "exit_code": 2}
    if "gpucnr_stack" in attrs:
        return _stack(path, verify)
    if "gpucnr_results" in attrs:
        return _results(path, verify)
    # NB: a typo in the path is the likeliest cause: said as such, not as a folder of the wrong kind. A refusal:
    # the CLI says it as every command's coded error (`gpucnr: error [code] ...` on stderr), with ``code``
    if not os.path.lexists(path):
        code, text = "not-found", (f"{path} does not exist (info reads a stack, made by `gpucnr ingest`, or results, "
                                   "made by `gpucnr run`)")
    else:
        code, text = "not-gpucnr", f"{path} is neither a gpucnr stack nor gpucnr results"
    return {"kind": "unknown", "path": str(path), "exit_code": 2, "code": code, "text": text}


def _stack(path: Path, verify: bool = False) -> dict:
    problem = None
    try:
        stack = open_stack(path)
    except GpucnrError as e:
        problem = str(e)
        try:
            stack = open_stack(path, check=False)
        except GpucnrError:
            # NB: damaged beyond reading its layout: report what is wrong rather than raise.
            return {"kind": "stack", "path": str(path), "complete": False, "problem": problem,
                    "text": f"stack {path}: cannot be read — {problem}", "exit_code": 3}
    buckets = [{"name": b.name, "images": b.size, "first_index": b.offset, "labels": b.labels is not None,
                "shard": b.shard} for b in stack.buckets]
    report = {
        "kind": "stack", "path": str(path), "images": stack.n_images, "buckets": buckets, "shard": stack.shard,
        "compressor": stack.compressor, "roi_ids": [int(v) for v in stack.roi_ids],
        "roi_table_rows": 0 if stack.rois is None else len(stack.rois),
        "image_columns": list(stack.images.columns), "complete": problem is None, "problem": problem,
        "fingerprint": _fingerprint(stack), "exit_code": 0 if problem is None else 3,
    }
    shard = stack.group.attrs.get("shard_size", stack.shard)
    lines = [f"stack {path}: {stack.n_images} images in {len(buckets)} bucket(s), shard {shard}, "
             f"compressor {stack.compressor}"]
    lines += [f"  {b['name']}: {b['images']} image(s) (global index {b['first_index']}..."
              f"{b['first_index'] + b['images'] - 1}){', labels' if b['labels'] else ''}" for b in buckets]
    lines.append(f"  ROI ids {report['roi_ids']}; ROI table rows {report['roi_table_rows']}")
    lines.append(f"  per-image columns: {', '.join(report['image_columns'])}")
    ingest = dict(stack.group.attrs).get("ingest")
    if ingest:
        # NB: counts only: the paths of skipped files live in the operator's list beside the stack
        report["ingest"] = ingest
        skipped = ingest.get("skipped", {})
        lines.append(f"  ingest: {ingest['files_in']} file(s) in = {ingest['stored']} stored + "
                     f"{sum(skipped.values())} skipped + {ingest['duplicates']} duplicate(s); "
                     f"{ingest['images']} image(s) stored" + (
                         f" = frames of the stored files - {ingest['skipped_frames']} skipped frame(s) (listed by "
                         "source, channel and frame)" if ingest.get("skipped_frames") else ""))
        lines += [f"    skipped {code}: {n}" for code, n in skipped.items()]
        lines += [f"    {code}: {n}" for code, n in ingest.get("other_problems", {}).items()]
    lines.append(f"  complete: {'yes' if problem is None else 'NO — ' + problem}")
    if verify and problem is None:
        report["damaged"] = _read_every_chunk(stack)
        report["verified"] = True
        report["exit_code"] = 3 if report["damaged"] else 0
        lines.append(f"  checked: every image and label chunk read and decoded (--verify): "
                     f"{len(report['damaged'])} damaged")
        lines += [f"    {d}" for d in report["damaged"][:20]]
    lines.append(f"  fingerprint {str(report['fingerprint'])[:16]}")
    report["text"] = "\n".join(lines)
    return report


def _read_every_chunk(stack) -> list[str]:
    """Read every shard of every bucket through the checked reader; the coded error of each that fails (a chunk
    that fails its checksum, decodes to the wrong size, or is not the one recorded for its position)."""
    from gpucnr.store import StackError

    damaged = []
    for b in stack.buckets:
        for lo in range(0, b.size, b.shard):
            hi = min(lo + b.shard, b.size)
            try:
                stack.read(b, lo, hi, labels=True)
            except StackError as e:
                damaged.append(str(e))
    return damaged


def _fingerprint(stack) -> str | None:
    """The stack's fingerprint, or None when the damage that `problem` names keeps it from being computed."""
    try:
        return stack.fingerprint()
    except GpucnrError:
        return None


def _results(path: Path, verify: bool = False) -> dict:
    fmt = results_format(path)
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    damaged = []
    try:
        if fmt == RESULTS_FORMAT:
            check = verify_results(path, decode=verify)
            damaged = check["damaged"]
            committed = check["committed"]
        else:
            committed = np.asarray(zarr.open_group(str(path), mode="r")["committed"][:])
        ds = xr.open_zarr(str(path), consolidated=False, mask_and_scale=False) if committed is not None else None
    except Exception as e:  # noqa: BLE001 - unreadable metadata or batch table: reported, never raised
        damaged = damaged or [{"array": "results", "batches": None, "reason": f"cannot be read ({type(e).__name__})"}]
        committed, ds = None, None
    if ds is None:
        report = {"kind": "results", "path": str(path), "format": fmt, "complete": False, "damaged": damaged,
                  "damaged_batches": [], "exit_code": 3}
        report["text"] = "\n".join([f"results {path}: DAMAGED beyond a batch — {damage_text(path, damaged)}",
                                     f"  {repair_hint(path, damaged, attrs)}"])
        return report
    status = ds["status"].to_numpy() if not damaged else np.asarray([], np.int8)
    names = {v: k for k, v in STATUS.items()}
    counts = {names.get(int(v), str(v)): int(c) for v, c in zip(*np.unique(status, return_counts=True), strict=True)}
    params = {k: ds.attrs.get(k) for k in Params().as_attrs()}
    failures = list(ds.attrs.get("failures", []))
    complete = bool(committed.all())
    failed = len({int(f["image"]) for f in failures})
    report = {
        "kind": "results", "path": str(path), "format": fmt, "images": ds.sizes["image"],
        "roi_ids": [int(v) for v in ds.roi.values], "roi_source": ds.attrs.get("roi_source"),
        "batches": int(committed.size),
        "committed": int(committed.sum()), "complete": complete, "verified": verify and fmt == RESULTS_FORMAT,
        "damaged": damaged, "damaged_batches": sorted({b for d in damaged for b in (d["batches"] or [])}),
        "status_counts": counts, "parameters": params, "backend": ds.attrs.get("backend"),
        "stack_path": ds.attrs.get("stack_path"), "stack_fingerprint": ds.attrs.get("stack_fingerprint"),
        "gpucnr_version": ds.attrs.get("gpucnr_version"), "failures": failures,
        # NB: DESIGN §10: damaged or incomplete results, and images that failed (status 6), are problems (exit 3)
        "exit_code": 3 if damaged or not complete or failed else 0,
    }
    source = {"both": "labels and ROI table", "auto": f"automatic regions, edge {attrs.get('edge', 2)} px"}.get(
        report["roi_source"], report["roi_source"])
    resume = resume_command(attrs, path)
    lines = [f"results {path}: {report['images']} images x {len(report['roi_ids'])} ROI id(s) {report['roi_ids']}"
             + (f" (ROIs from the {source})" if source else ""),
             f"  batches committed: {report['committed']}/{report['batches']}"
             f"{'' if report['complete'] else f' (incomplete: `{resume}` continues)'}"]
    if damaged:
        lines.append(f"  DAMAGED: {len(report['damaged_batches'])} batch(es) {_ranges(report['damaged_batches'])}; "
                     f"{repair_hint(path, damaged, attrs)}")
        lines += [f"    {d['array']} ({damage_where(d)}): {d['reason']}" for d in damaged[:20]]
        if len(damaged) > 20:
            lines.append(f"    ... {len(damaged) - 20} more (--json lists all)")
    else:
        lines.append("  cells by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines += [f"  checked: {'every chunk decoded (--verify)' if report['verified'] else 'indexes and checksums'}"
              if fmt == RESULTS_FORMAT else "  format 1: no checksums to check (rerun to get format 2)",
              f"  failed images: {failed}" + (" (a problem: `gpucnr info RESULTS --json` lists them with their "
                                             "reasons)" if failed else ""),
              "  parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()),
              f"  backend {report['backend']}; gpucnr {report['gpucnr_version']}",
              f"  stack {report['stack_path']} (fingerprint {str(report['stack_fingerprint'])[:16]})"]
    report["text"] = "\n".join(lines)
    return report


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> "1..3, 7"."""
    out, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(out)
