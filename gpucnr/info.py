"""`gpucnr info`: what a stack or a results store holds, whether it is complete, with which parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from gpucnr.errors import GpucnrError
from gpucnr.kernels.cnr import STATUS
from gpucnr.kernels.params import Params
from gpucnr.results import open_results
from gpucnr.store import open_stack, unfinished_stack

__all__ = ["describe"]


def describe(path) -> dict:
    """A report on `path` (a stack or results): a dict of facts, with a human-readable ``text`` entry.

    A damaged stack is reported, not raised: ``complete`` is False and ``problem`` names the error.
    ``exit_code`` is the status `gpucnr info` ends with (DESIGN §10): 0 a complete stack, 3 a damaged one, 2 a
    stack an interrupted ingest left (not a stack yet) or a path that is neither a stack nor results.
    """
    path = Path(path)
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - not a Zarr group: say so below
        attrs = {}
    if "gpucnr_stack" in attrs:
        return _stack(path)
    if "gpucnr_results" in attrs:
        return _results(path)
    unfinished = unfinished_stack(path)
    if unfinished:
        return {"kind": "unfinished-stack", "path": str(path), "complete": False, "problem": unfinished,
                "text": f"{path}: {unfinished}", "exit_code": 2}
    report = {"kind": "unknown", "path": str(path), "exit_code": 2}
    report["text"] = f"{path}: neither a gpucnr stack nor gpucnr results"
    return report


def _stack(path: Path) -> dict:
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
    buckets = [{"name": b.name, "images": b.size, "first_index": b.offset, "labels": b.labels is not None}
               for b in stack.buckets]
    report = {
        "kind": "stack", "path": str(path), "images": stack.n_images, "buckets": buckets, "shard": stack.shard,
        "compressor": stack.compressor, "roi_ids": [int(v) for v in stack.roi_ids],
        "roi_table_rows": 0 if stack.rois is None else len(stack.rois),
        "image_columns": list(stack.images.columns), "complete": problem is None, "problem": problem,
        "fingerprint": stack.fingerprint(), "exit_code": 0 if problem is None else 3,
    }
    lines = [f"stack {path}: {stack.n_images} images in {len(buckets)} bucket(s), shard {stack.shard}, "
             f"compressor {stack.compressor}"]
    lines += [f"  {b['name']}: {b['images']} images (global index {b['first_index']}..."
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
                     f"{ingest['images']} image(s) stored")
        lines += [f"    skipped {code}: {n}" for code, n in skipped.items()]
        lines += [f"    {code}: {n}" for code, n in ingest.get("other_problems", {}).items()]
    lines.append(f"  complete: {'yes' if problem is None else 'NO — ' + problem}")
    lines.append(f"  fingerprint {report['fingerprint'][:16]}")
    report["text"] = "\n".join(lines)
    return report


def _results(path: Path) -> dict:
    ds = open_results(path)
    committed = ds["committed"].to_numpy()
    status = ds["status"].to_numpy()
    names = {v: k for k, v in STATUS.items()}
    counts = {names.get(int(v), str(v)): int(c) for v, c in zip(*np.unique(status, return_counts=True), strict=True)}
    params = {k: ds.attrs.get(k) for k in Params().as_attrs()}
    failures = list(ds.attrs.get("failures", []))
    report = {
        "kind": "results", "path": str(path), "images": ds.sizes["image"], "roi_ids": [int(v) for v in ds.roi.values],
        "batches": int(committed.size), "committed": int(committed.sum()), "complete": bool(committed.all()),
        "status_counts": counts, "parameters": params, "backend": ds.attrs.get("backend"),
        "stack_path": ds.attrs.get("stack_path"), "stack_fingerprint": ds.attrs.get("stack_fingerprint"),
        "gpucnr_version": ds.attrs.get("gpucnr_version"), "failures": failures,
    }
    lines = [f"results {path}: {report['images']} images x {len(report['roi_ids'])} ROI id(s) {report['roi_ids']}",
             f"  batches committed: {report['committed']}/{report['batches']}"
             f"{'' if report['complete'] else ' (incomplete: gpucnr run --resume continues)'}",
             "  cells by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             f"  failed images: {len(failures)}",
             "  parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()),
             f"  backend {report['backend']}; gpucnr {report['gpucnr_version']}",
             f"  stack {report['stack_path']} (fingerprint {str(report['stack_fingerprint'])[:16]})"]
    report["text"] = "\n".join(lines)
    return report
