"""`gpucnr.ingest`: a folder of DICOM / PNG / TIFF files (+ masks, DICOM SEG, ROI and meta tables) -> a stack.

Two passes over the files, both in isolated worker processes (`workers.IsolatedPool`): a header scan
(format by content, pseudonymous ids, declared sizes, duplicates), then decoding, in input order, straight
into a `StackWriter`. Every file in ends up stored, skipped with a code, or a duplicate; the reasons and
the paths go to the operator's files beside the stack, never into the stack itself.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gpucnr.errors import InputError, OptionError
from gpucnr.sources.colour import COLOR_MODES
from gpucnr.sources.files import display_path, walk
from gpucnr.sources.problems import problem_groups, problems_text
from gpucnr.sources.pseudonyms import ID_COLUMNS, load_or_create_key, pseudonym
from gpucnr.sources.rois import MaskMatcher, read_meta_csv, read_roi_csv
from gpucnr.sources.workers import IsolatedPool, TaskFailure
from gpucnr.store import StackWriter

__all__ = ["IngestSummary", "ingest", "sidecar_paths"]

log = logging.getLogger("gpucnr.ingest")

#: per-image columns that ingest writes; a --meta column may not reuse them
IMAGE_COLUMNS = ("index", "bucket", "position", "valid_h", "valid_w", "slope", "intercept", "padding",
                 "photometric", "source_index", "frame", "rows", "columns", "format", "color", "modality",
                 "manufacturer", "model", "spacing_y", "spacing_x", "file_index", *ID_COLUMNS)
_PROBLEM_COLUMNS = ["source", "item", "code", "reason"]
_TASKS = "gpucnr.sources.tasks:run"
#: decoded bytes the driver may hold for files still waiting on an earlier one
_IN_FLIGHT = 2**31


def sidecar_paths(stack) -> dict[str, Path]:
    """The operator's files beside a stack: the pseudonym key, the linkage file (image -> source path) and
    the skipped-files list. They sit outside the stack so that sharing a stack never shares them."""
    stack = Path(stack)
    return {k: stack.with_name(f"{stack.name}.{k}{ext}") for k, ext in
            (("key", ""), ("linkage", ".csv"), ("skipped", ".csv"))}


@dataclass
class IngestSummary:
    """What `ingest` did. files_in == stored + sum(skipped.values()) + duplicates, and images == the frames of
    the stored files, always."""

    stack: Path
    files_in: int
    stored: int
    skipped: dict[str, int]
    duplicates: int
    images: int
    problems: pd.DataFrame
    linkage: Path
    skipped_list: Path
    key_file: Path
    masks: int = 0
    unlabelled_images: int = 0
    other_problems: dict[str, int] = field(default_factory=dict)
    #: the denominators of the problems block (see `problems.problem_groups`)
    totals: dict[str, int] = field(default_factory=dict)

    def problem_groups(self) -> list:
        """The problems of this ingest by kind (DESIGN §10); empty when it has none."""
        return problem_groups(self.problems.to_dict("records"), self.totals)

    def problems_text(self) -> str:
        """The block `gpucnr ingest` ends with on stderr, exit status 3 ("" when there is no problem)."""
        return problems_text(self.problem_groups(), self.skipped_list)

    def text(self) -> str:
        lines = [f"{self.stack}: {self.images} image(s) from {self.stored} file(s); {self.files_in} file(s) in, "
                 f"{sum(self.skipped.values())} skipped, {self.duplicates} duplicate(s)"]
        lines += [f"  skipped {code}: {n}" for code, n in sorted(self.skipped.items())]
        lines += [f"  {code}: {n}" for code, n in sorted(self.other_problems.items())]
        if self.masks or self.totals.get("mask_files"):
            lines.append(f"  mask files used: {self.masks}; images without labels: {self.unlabelled_images}")
        lines.append(f"  skipped-files list: {self.skipped_list}; linkage file: {self.linkage}")
        return "\n".join(lines)


def ingest(src, stack, *, masks=None, mask_pattern: str | None = None, seg=None, rois=None, meta=None,
           color: str = "rec709", nonfinite: str = "skip", key_file=None, workers: int | None = None,
           max_image_mb: float = 512, follow_symlinks: bool = False, progress: bool = False,
           file_timeout: float = 120.0, shard: int = 64, compressor: str = "blosc-zstd") -> IngestSummary:
    """Ingest a folder of DICOM, PNG and TIFF files into a new stack.

    Parameters
    ----------
    src : path
        The source folder, walked recursively; formats are told by content, never by extension.
    stack : path
        The stack to create (must not exist). Beside it: ``<stack>.key`` (unless `key_file`),
        ``<stack>.linkage.csv`` and ``<stack>.skipped.csv``, readable by their owner only.
    masks : path, optional
        Folder of mask files mirroring `src` (pattern default ``{stem}.*``).
    mask_pattern : str, optional
        Mask file names, e.g. ``{stem}_mask.png``; without `masks` the masks sit beside their images (and
        are not images themselves). See `rois.MaskMatcher`.
    seg : path, optional
        Folder of DICOM SEG objects (extra ``seg``): segment numbers become labels of the images they reference.
    rois : path, optional
        ROI CSV: source (path relative to `src`), [frame,] roi, kind (square|disk), cx, cy, r [, name].
    meta : path, optional
        CSV with a source column and per-image columns (site, split, ...); id columns (patient_id, ...) are
        pseudonymised like DICOM ids.
    color : {"rec709", "bt601", "skip"}
        Colour to gray (float64): rec709 = scikit-image's rgb2gray, as the article; skip = skip with a code.
    nonfinite : {"skip", "exclude"}
        Images with NaN/inf pixels: skip with a code, or store them (the kernels exclude those pixels).
    key_file : path, optional
        Pseudonym key to use (created if missing), to share pseudonyms across stacks.
    workers : int, optional
        Worker processes (default: CPUs).
    max_image_mb : float
        The most MiB a file's declared pixels may take; also bounds each worker's memory.
    follow_symlinks : bool
    progress : bool
        A progress line on stderr.
    file_timeout : float
        Seconds one file may take to scan or decode before its worker is killed.
    shard, compressor
        As `write_stack`.

    Returns
    -------
    IngestSummary
    """
    src, stack = Path(src), Path(stack)
    if color not in COLOR_MODES:
        raise OptionError(f"color must be one of {COLOR_MODES}, got {color!r}")
    if nonfinite not in ("skip", "exclude"):
        raise OptionError(f"nonfinite must be skip or exclude, got {nonfinite!r}")
    if not max_image_mb > 0 or not file_timeout > 0:
        raise OptionError("max_image_mb and file_timeout must be > 0")
    if not src.is_dir():
        raise InputError(f"source folder {display_path(src)} does not exist or is not a folder")
    if stack.exists():
        raise InputError(f"{display_path(stack)} already exists; ingest never overwrites a stack")
    if not stack.absolute().parent.is_dir():
        raise InputError(f"the folder of {display_path(stack)} does not exist")
    for name, folder in (("masks", masks), ("seg", seg)):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"--{name} {display_path(folder)} is not a folder")
    side = sidecar_paths(stack)
    roi_table = None if rois is None else read_roi_csv(rois)  # NB: malformed tables fail before any decoding
    meta_table = None if meta is None else read_meta_csv(meta, [c for c in IMAGE_COLUMNS if c not in ID_COLUMNS])
    key_path = Path(key_file) if key_file is not None else side["key"]
    # NB: the CPUs this process may use (containers, taskset), where the OS says; else all of them
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    max_bytes = int(max_image_mb * 2**20)
    options = {"color": color, "nonfinite": nonfinite}

    # NB: mask and SEG folders may sit inside SRC_DIR: their files are not images of the dataset
    exclude = [p for p in (rois, meta, key_path, stack, masks, seg, *side.values()) if p is not None]
    job = _Ingest(stack=stack, side=side, key=None, key_path=key_path, options=options, max_bytes=max_bytes,
                  progress=progress, roi_table=roi_table, meta_table=meta_table)
    job.find(src, masks, mask_pattern, follow_symlinks, exclude)
    job.key = load_or_create_key(key_path)  # NB: after every refusal: a refused ingest writes nothing
    with IsolatedPool(_TASKS, workers=workers, timeout=file_timeout, memory_mb=_memory_mb(max_image_mb)) as pool:
        job.scan(pool, seg, follow_symlinks)
        return job.decode(pool, shard=shard, compressor=compressor, has_labels=job.matcher is not None or
                          seg is not None)


class _Ingest:
    """The state of one ingest: what was found, what each file became, and the operator's problem list."""

    def __init__(self, **settings):
        self.__dict__.update(settings)
        self.problems: list[dict] = []
        self.skipped: Counter = Counter()
        self.duplicates = 0
        self.matcher: MaskMatcher | None = None
        self.mask_index: dict = {}
        self.mask_dir = False
        self.seg_files = 0
        self.meter = _Progress(self.progress)

    def problem(self, source: str, item: str, code: str, reason: str) -> None:
        self.problems.append({"source": source, "item": item, "code": code, "reason": reason})
        log.info("%s: %s %s: %s", source, item, code, reason)  # NB: an operator message: the path is needed

    def find(self, src: Path, masks, mask_pattern, follow_symlinks: bool, exclude) -> None:
        """Walk the source (and mask) folders; mask files beside their images are not inputs."""
        found = walk(src, follow_symlinks=follow_symlinks, exclude=exclude)
        if masks is not None or mask_pattern is not None:
            self.matcher = MaskMatcher(mask_pattern or "{stem}.*", None if masks is None else Path(masks))
            self.mask_dir = masks is not None
            if masks is None:
                is_mask = [f.code is None and self.matcher.key(f.rel.rpartition("/")[2]) is not None for f in found]
                self.mask_index = self.matcher.index([f for f, m in zip(found, is_mask, strict=True) if m])
                found = [f for f, m in zip(found, is_mask, strict=True) if not m]
            else:
                self.mask_index = self.matcher.index(walk(masks, follow_symlinks=follow_symlinks))
            if not self.mask_index:
                # NB: a typo such as {stem}-mask.png for {stem}_mask.png would store every mask as an image
                # (beside them) or label nothing: refused before anything is written.
                where = (f"under --masks {display_path(masks)}" if masks is not None
                         else f"beside the images under {display_path(src)}")
                raise InputError(f"--mask-pattern {self.matcher.pattern!r} matches no file {where}; nothing was "
                                 "written. Check it against one mask file's name (e.g. '{stem}_mask.png' for "
                                 "'case.png' and 'case_mask.png')")
        self.found = found
        for f in found:
            if f.code is not None:
                self.skipped[f.code] += 1
                self.problem(f.rel, "file", f.code, f.reason)

    def scan(self, pool: IsolatedPool, seg, follow_symlinks: bool) -> None:
        """Pass 1: headers of every candidate file, SEG references, mask matching."""
        candidates = [(k, f) for k, f in enumerate(self.found) if f.code is None]
        self.meter.stage("scan", len(candidates))
        headers = pool.imap((("scan_file", str(f.path), self.key, self.max_bytes) for _, f in candidates),
                            on_done=self.meter.tick)
        kept = []
        for (k, f), rec in zip(candidates, headers, strict=True):
            if isinstance(rec, TaskFailure):
                self.skipped[rec.code] += 1
                self.problem(f.rel, "file", rec.code, rec.reason)
                continue
            kept.append((k, f, rec))
        seg_refs, seg_rel = self._scan_segs(pool, seg, follow_symlinks)
        used: set = set()
        self.tasks = []
        for k, f, rec in kept:
            mask_files = []
            if self.matcher is not None:
                folder, _, name = f.rel.rpartition("/")
                mask_files = self.mask_index.get((folder, self.matcher.image_key(name)), [])
                used.update(m.rel for m in mask_files)
            segs = sorted(seg_refs.get(rec.get("instance_id"), ())) if rec["format"] == "dicom" else []
            self.tasks.append((k, f, rec, [m.rel for m in mask_files],
                               ("decode_file", str(f.path), rec, self.options, [str(m.path) for m in mask_files],
                                segs)))
        matched = {p for _, _, rec in kept if rec["format"] == "dicom" for p in seg_refs.get(rec["instance_id"], ())}
        for path, rel in seg_rel.items():
            if path not in matched:
                self.problem(rel, "seg", "seg-no-image", "the DICOM SEG references no image of SRC_DIR that was "
                             "scanned without error")
        for _, entries in sorted(self.mask_index.items()):
            for m in entries:
                if m.rel not in used:
                    self.problem(m.rel, "mask", "mask-no-image", "no image file matches this mask's name")

    def _scan_segs(self, pool: IsolatedPool, seg, follow_symlinks: bool) -> tuple[dict, dict]:
        """({pseudonymous instance id: paths of the DICOM SEG objects that label it}, {readable SEG path: its
        relative path})."""
        refs: dict[str, set[str]] = {}
        rels: dict[str, str] = {}
        if seg is None:
            return refs, rels
        files = walk(seg, follow_symlinks=follow_symlinks)
        self.seg_files = len(files)
        for f in files:
            if f.code is not None:
                self.problem(f.rel, "seg", f.code, f.reason)
        good = [f for f in files if f.code is None]
        for f, out in zip(good, pool.imap(("scan_seg", str(f.path), self.key) for f in good), strict=True):
            if isinstance(out, TaskFailure):
                self.problem(f.rel, "seg", "seg-unreadable", out.reason)
                continue
            rels[str(f.path)] = f.rel
            for ref in out:
                refs.setdefault(ref, set()).add(str(f.path))
        return refs, rels

    def decode(self, pool: IsolatedPool, *, shard: int, compressor: str, has_labels: bool) -> IngestSummary:
        """Pass 2: decode in input order straight into the stack; then the tables, the linkage file and the
        skipped-files list."""
        sources = {f.rel for f in self.found}
        meta_rows = _meta_rows(self.meta_table, self.key, sources, self.problem)
        stored = unlabelled = masked = 0
        labelled_by: set[str] = set()
        # NB: duplicates are decided here, in input order, against what was *stored*: a first copy that fails to
        # decode must not make a good second copy a "duplicate" (both are decoded; duplicates are rare).
        stored_as: dict[str, str] = {}
        link_rows: list[dict] = []
        frame_of: dict[tuple[str, int], int] = {}
        writer = StackWriter(self.stack, labels=has_labels, shard=shard, compressor=compressor)
        try:
            self.meter.stage("decode", len(self.tasks))
            # NB: decoded results wait in the driver until the files before them are done: their bytes in flight
            # are bounded (x3: colour and LUT images become float64), as well as their number.
            outs = pool.imap((t[4] for t in self.tasks), costs=(3 * t[2]["declared_bytes"] for t in self.tasks),
                             budget=max(2 * self.max_bytes, _IN_FLIGHT), on_done=self.meter.tick)
            for (k, f, rec, mask_rels, task), out in zip(self.tasks, outs, strict=True):
                if isinstance(out, TaskFailure):
                    self.skipped[out.code] += 1
                    reason = out.reason
                    if out.code.startswith("mask") and mask_rels:
                        reason += f" (mask: {', '.join(mask_rels)})"  # NB: the operator's list names both files
                    self.problem(f.rel, "file", out.code, reason)
                    continue
                dedup = rec.get("dedup")
                if dedup is not None and dedup in stored_as:
                    self.duplicates += 1
                    what = "SOP instance" if rec["format"] == "dicom" else "bytes"
                    self.problem(f.rel, "file", "duplicate", f"the same {what} as {stored_as[dedup]}, stored before it")
                    continue
                if dedup is not None:
                    stored_as[dedup] = f.rel
                if mask_rels or task[5]:
                    masked += 1
                if out.get("mask_problem"):
                    code, reason = out["mask_problem"]
                    # NB: the image is stored (unlabelled): a bad mask must not lose the case; the list names both
                    self.problem(f.rel, "mask", code, f"{reason} (mask: {', '.join(mask_rels) or 'DICOM SEG'}); the "
                                 "image is stored without labels")
                else:
                    labelled_by.update(mask_rels)  # NB: "mask files used" = masks that labelled a stored image
                stored += 1
                labels = out["labels"]
                if has_labels and labels is None:
                    unlabelled += len(out["frames"])
                for frame, entry in enumerate(out["frames"]):
                    pixels = entry.pop("pixels")
                    row = _image_row(rec, entry, frame, k, pixels.shape)
                    row.update(meta_rows.get(f.rel, {}))
                    source_index = writer.add(pixels, None if labels is None else labels[frame], row)
                    frame_of[(f.rel, frame)] = source_index
                    link_rows.append({"source_index": source_index, "frame": frame, "source": f.rel,
                                      "file_index": k, **{c: row.get(c, "") for c in ID_COLUMNS}})
            table = _roi_rows(self.roi_table, frame_of, sources, self.problem)
            other = dict(sorted(Counter(p["code"] for p in self.problems if p["item"] != "file").items()))
            writer.attrs["ingest"] = {
                "files_in": len(self.found), "stored": stored, "skipped": dict(sorted(self.skipped.items())),
                "duplicates": self.duplicates, "images": writer.n_images, "mask_files": len(labelled_by),
                "unlabelled_images": unlabelled, "other_problems": other, **self.options,
                "max_image_mb": self.max_bytes / 2**20, "linkage": self.side["linkage"].name,
                "skipped_list": self.side["skipped"].name,
            }
            opened = writer.close(rois=table)
        finally:
            _write_csv(self.side["skipped"], self.problems, _PROBLEM_COLUMNS)  # NB: kept even if the run fails
        index_of = dict(zip(opened.images["source_index"].to_numpy(), opened.images["index"].to_numpy(),
                            strict=True))
        for r in link_rows:
            r["index"] = int(index_of[r.pop("source_index")])
        link_rows.sort(key=lambda r: r["index"])
        _write_csv(self.side["linkage"], link_rows, ["index", "frame", "source", "file_index", *ID_COLUMNS])
        self.meter.done()
        summary = IngestSummary(
            stack=self.stack, files_in=len(self.found), stored=stored, skipped=dict(sorted(self.skipped.items())),
            duplicates=self.duplicates, images=opened.n_images,
            problems=pd.DataFrame(self.problems, columns=_PROBLEM_COLUMNS), linkage=self.side["linkage"],
            skipped_list=self.side["skipped"], key_file=self.key_path, masks=len(labelled_by),
            unlabelled_images=unlabelled, other_problems=other,
            totals={"files": len(self.found), "masked": masked, "seg_files": self.seg_files,
                    "mask_files": sum(len(v) for v in self.mask_index.values()), "has_mask_dir": self.mask_dir,
                    "roi_rows": 0 if self.roi_table is None else len(self.roi_table),
                    "meta_rows": 0 if self.meta_table is None else len(self.meta_table)})
        if summary.files_in != summary.stored + sum(summary.skipped.values()) + summary.duplicates:
            raise AssertionError("ingest lost track of a file")  # NB: the invariant of DESIGN §8, checked always
        return summary


def _memory_mb(max_image_mb: float) -> int:
    """A worker's memory budget: the largest allowed image several times over (decoded, converted to float64,
    pickled for the driver) plus room for the decoders themselves."""
    return int(8 * max_image_mb + 1024)


def _image_row(rec: dict, entry: dict, frame: int, file_index: int, shape) -> dict:
    row = {c: rec.get(c, "") for c in ("format", "modality", "manufacturer", "model", *ID_COLUMNS)}
    row.update({"frame": frame, "rows": int(shape[0]), "columns": int(shape[1]), "file_index": file_index,
                "spacing_y": float(rec.get("spacing_y", np.nan)), "spacing_x": float(rec.get("spacing_x", np.nan)),
                "slope": float(entry["slope"]), "intercept": float(entry["intercept"]),
                "padding": float(entry["padding"]), "photometric": entry["photometric"], "color": entry["color"]})
    return row


def _meta_rows(table, key: bytes, sources: set[str], problem) -> dict[str, dict]:
    """{source: {column: value}} from the --meta CSV; id columns pseudonymised, rows naming no file recorded."""
    if table is None:
        return {}
    columns = [c for c in table.columns if c not in ("source", "_line", "_key")]
    out = {}
    for row in table.to_dict("records"):
        source = row["_key"] if isinstance(row["_key"], str) else None  # NB: pandas turns None into NaN
        if source is None or source not in sources:
            problem(display_path(row["source"]), f"meta line {row['_line']}", "meta-no-image",
                    "this --meta row names no file under SRC_DIR" + (" (a path outside it)" if source is None
                                                                     else ""))
            continue
        out[source] = {c: pseudonym(key, c.removesuffix("_id"), row[c]) if c in ID_COLUMNS else row[c]
                           for c in columns}
    if out:
        # NB: every image gets every column: files without a meta row get "" (missing), not a ragged table.
        blank = dict.fromkeys(columns, "")
        for s in sources - out.keys():
            out[s] = blank
    return out


def _roi_rows(table, frame_of: dict, sources: set[str], problem) -> pd.DataFrame | None:
    """The ROI table against input positions; rows naming no stored image (or frame) are recorded."""
    if table is None:
        return None
    hit = []
    stored = {s for s, _ in frame_of}
    for row in table.to_dict("records"):
        key = row["_key"] if isinstance(row["_key"], str) else None  # NB: pandas turns None into NaN
        where = frame_of.get((key, int(row["frame"]))) if key is not None else None
        if where is None:
            if key is None:
                why = "a path outside SRC_DIR"
            elif key not in sources:
                why = "no such file under SRC_DIR"
            elif key in stored:
                why = f"the file has no frame {row['frame']}"
            else:
                why = "the file was not stored (see its own entry)"
            problem(display_path(row["source"]), f"rois line {row['_line']}", "roi-no-image",
                    f"this ROI row names no stored image: {why}")
            continue
        hit.append({"image": where, "roi": row["roi"], "kind": row["kind"], "cx": row["cx"], "cy": row["cy"],
                    "r": row["r"], "name": row["name"]})
    return pd.DataFrame(hit, columns=["image", "roi", "kind", "cx", "cy", "r", "name"])


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """An operator file (it holds source paths): created readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


class _Progress:
    """One progress line on stderr, updated in place (only with progress=True)."""

    def __init__(self, on: bool):
        self.on, self.total, self.n, self.name = on, 0, 0, ""

    def stage(self, name: str, total: int) -> None:
        if self.on and self.name:
            print(file=sys.stderr)
        self.name, self.n, self.total = name, 0, total
        self._show()

    def tick(self) -> None:
        self.n += 1
        if self.on and (self.n == self.total or self.n % 50 == 0):
            self._show()

    def _show(self) -> None:
        if self.on:
            print(f"\r{self.name}: {self.n}/{self.total} files", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.on:
            print(file=sys.stderr)


