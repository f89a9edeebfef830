"""`gpucnr.ingest`: a folder of DICOM / PNG / TIFF files (+ masks, DICOM SEG, ROI and meta tables) -> a stack.

Two passes over the files, both in isolated worker processes (`workers.IsolatedPool`): a header scan
(format by content, pseudonymous ids, declared sizes, duplicates), then decoding, in input order, straight
into a `StackWriter`. Every file in ends up stored, skipped with a code, or a duplicate; the reasons and
the paths go to the operator's files beside the stack, never into the stack itself. What each decoded file
became is journaled beside the stack (`journal.Journal`), so that an interrupted ingest resumes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import shlex
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from gpucnr.errors import InputError, Interrupted, OptionError
from gpucnr.identifiers import refused_value
from gpucnr.outputs import OutputError, csv_text, refuse_overlap, write_file
from gpucnr.progress import Progress
from gpucnr.sources.colour import COLOR_MODES
from gpucnr.sources.files import display_path, walk
from gpucnr.sources.journal import Journal, sources_digest
from gpucnr.sources.layouts import DATASET_JSON, Layout, detect, misplaced_source, read_dataset_json
from gpucnr.sources.problems import is_litter, problem_groups, problems_text
from gpucnr.sources.pseudonyms import ID_COLUMNS, load_or_create_key, pseudonym
from gpucnr.sources.rois import MaskMatcher, match_source, read_meta_csv, read_roi_csv
from gpucnr.sources.spoolplan import SPOOL_FILE, SpoolPlan
from gpucnr.sources.workers import IsolatedPool, Part, TaskFailure
from gpucnr.store import DEFAULT_COMPRESSOR, StackWriter, journal_path, spool_path, whole_shards

__all__ = ["IngestSummary", "ingest", "sidecar_paths"]

log = logging.getLogger("gpucnr.ingest")

#: per-image columns that ingest writes; a --meta column may not reuse them
IMAGE_COLUMNS = ("index", "bucket", "position", "valid_h", "valid_w", "slope", "intercept", "padding",
                 "photometric", "source_index", "frame", "rows", "columns", "format", "color", "modality",
                 "manufacturer", "model", "spacing_y", "spacing_x", "spacing_z", "orientation", "case", "channel",
                 "file_index", *ID_COLUMNS)
_PROBLEM_COLUMNS = ["source", "item", "code", "reason", "source_encoding"]
_TASKS = "gpucnr.sources.tasks:run"
#: decoded bytes the driver may hold for files still waiting on an earlier one
_IN_FLIGHT = 2**31
#: files per message to a worker (header scans; decodes of files that declare at most `_BATCH_BYTES`): one round
#: trip for several small files (~0.3 ms of CPU each, driver and worker, issue 18); a worker that dies on such a
#: message has its files tried again one by one, so that a crash is still the crash of one file
_BATCH = 8
#: the most files of one planned shard sent to a worker in one message (`spoolplan.SpoolPlan`): a whole default
#: shard of the smallest canvas (2^22 px / 64x64); a larger shard's files go in several messages, maybe to two
#: workers, whose chunks then lie in the spool file in the order they came (the shard index says where each is)
_SHARD_BATCH = 1024
_BATCH_BYTES = 4 * 2**20


def sidecar_paths(stack) -> dict[str, Path]:
    """The operator's files beside a stack: the pseudonym key, the linkage file (image -> source path) and
    the skipped-files list. They sit outside the stack so that sharing a stack never shares them."""
    stack = Path(stack)
    paths = {k: stack.with_name(f"{stack.name}.{k}{ext}") for k, ext in
             (("key", ""), ("linkage", ".csv"), ("skipped", ".csv"))}
    paths["journal"] = journal_path(stack)  # NB: while an ingest is in progress only
    return paths


@dataclass
class IngestSummary:
    """What `ingest` did. files_in == stored + sum(skipped.values()) + duplicates, and images == the frames of
    the stored files - skipped_frames, always."""

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
    #: images stored without a label plane (no mask, label map or SEG, or one that was refused)
    unlabelled_images: int = 0
    #: images with neither labels nor an ROI-table row: nothing to measure but ``rois="auto"``
    bare_images: int = 0
    other_problems: dict[str, int] = field(default_factory=dict)
    #: slices of stored volumes that were not stored (``--nonfinite skip`` decides per slice)
    skipped_frames: int = 0
    #: the denominators of the problems block and causes found in the data (see `problems.problem_groups`)
    totals: dict = field(default_factory=dict)
    #: lines for the end of `gpucnr ingest` that are not problems of its inputs (e.g. SRC is a layout's imagesTr)
    warnings: list = field(default_factory=list)
    #: whether the images were expected to carry labels that were not read (the "images without labels" line)
    labels_expected: bool = False

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
        if self.skipped_frames:
            lines.append(f"  frames of stored files skipped (listed by source, channel and frame): "
                         f"{self.skipped_frames}")
        if self.masks or self.totals.get("mask_files") or self.labels_expected:
            lines.append(f"  mask files used: {self.masks}; images with neither a mask nor an ROI-table row: "
                         f"{self.bare_images}")
        kept = [f"{what}: {path}" for what, path in (("skipped-files list", self.skipped_list),
                                                    ("linkage file", self.linkage)) if Path(path).exists()]
        if kept:
            lines.append("  " + "; ".join(kept))
        return "\n".join(lines)


def ingest(src, stack, *, masks=None, mask_pattern: str | None = None, seg=None, rois=None, meta=None,
           color: str = "rec709", nonfinite: str = "skip", key_file=None, workers: int | None = None,
           max_image_mb: float = 512, max_volume_mb: float = 4096, mask_threshold: float | None = None,
           follow_symlinks: bool = False, progress: bool = False,
           file_timeout: float = 120.0, shard: int | str | None = None, compressor: str | None = None,
           resume: bool = False) -> IngestSummary:
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
        Images with NaN/inf pixels: skip with a code, or store them (the kernels exclude those pixels). Decided
        per slice of a volume: a skipped slice is listed by (source, channel, frame), its volume's other slices
        are stored.
    key_file : path, optional
        Pseudonym key to use (created if missing), to share pseudonyms across stacks.
    workers : int, optional
        Worker processes (default: CPUs).
    max_image_mb : float
        The most MiB a file's declared pixels may take (one slice of a NIfTI volume); also bounds each worker's
        memory.
    max_volume_mb : float
        The most MiB a NIfTI file's declared voxels may take (all its slices and channels), refused from its
        header before any voxel is read.
    mask_threshold : float, optional
        Binarise every mask file: 1 where its value (the mean of its colour channels) exceeds this, else 0 — for
        masks saved as lossy JPEG (e.g. Kvasir-SEG), which the anti-aliasing rule refuses otherwise.
    follow_symlinks : bool
    progress : bool
        A progress line on stderr.
    file_timeout : float
        Seconds one file may take to scan or decode before its worker is killed.
    shard, compressor
        As `write_stack`. Without `compressor`, a new stack gets `store.DEFAULT_COMPRESSOR` and a resumed one the
        compressor it was started with (its journal's).
    resume : bool
        Continue the ingest that was interrupted while writing `stack` (from its journal, ``<stack>.journal``)
        instead of refusing an existing stack; the sources and options must be those it started with
        (``resume-mismatch`` otherwise). The result equals an uninterrupted ingest. Without a stack at `stack`,
        a new ingest starts.

    Returns
    -------
    IngestSummary
        With the problems of DESIGN §10 by kind (`IngestSummary.problem_groups`, `problems_text`).

    Raises
    ------
    InputError
        A refusal before anything is written: a missing folder, an existing stack (without `resume`), a
        `mask_pattern` (or `masks` folder) that matches no file, a malformed ROI or meta table.
    ResumeError
        ``resume-mismatch``: a resume with other sources, options or key, or of a stack that cannot be resumed.
    gpucnr.errors.Interrupted
        Ctrl-C or SIGTERM (a KeyboardInterrupt): worker processes are stopped, the journal keeps what was done,
        and the message says how to continue.
    """
    src, stack = Path(src), Path(stack)
    if color not in COLOR_MODES:
        raise OptionError(f"color must be one of {COLOR_MODES}, got {color!r}")
    if nonfinite not in ("skip", "exclude"):
        raise OptionError(f"nonfinite must be skip or exclude, got {nonfinite!r}")
    if not max_image_mb > 0 or not file_timeout > 0 or not max_volume_mb > 0:
        raise OptionError("max_image_mb, max_volume_mb and file_timeout must be > 0")
    if mask_threshold is not None and not np.isfinite(mask_threshold):
        raise OptionError("mask_threshold must be a finite number")
    if not src.is_dir():
        raise InputError(f"source folder {display_path(src)} does not exist or is not a folder")
    # NB: a symbolic link, even to nothing, is not followed to create a stack there
    if os.path.lexists(stack) and not resume:
        raise InputError(f"{display_path(stack)} already exists; ingest never overwrites a stack (--resume "
                         "continues an interrupted ingest)")
    if not stack.absolute().parent.is_dir():
        raise InputError(f"the folder of {display_path(stack)} does not exist")
    for name, folder in (("masks", masks), ("seg", seg)):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"--{name} {display_path(folder)} is not a folder")
    side = sidecar_paths(stack)
    _clear_spool(spool_path(stack))  # NB: a killed ingest's spool files; something else there is refused now
    if compressor is None:
        compressor = _started_compressor(side["journal"]) if resume and stack.exists() else DEFAULT_COMPRESSOR
    # NB: a stack (and its side files) may lie inside SRC_DIR, MASK_DIR or SEG_DIR, which never walk it; no input
    # may be an output, nor lie inside one
    refuse_overlap([("source folder", src), ("mask folder", masks), ("SEG folder", seg), ("ROI table", rois),
                    ("meta table", meta), ("key file", key_file)],
                   [("stack", stack), ("linkage file", side["linkage"]), ("skipped-files list", side["skipped"]),
                    ("key file", None if key_file is not None else side["key"])],
                   inside_inputs_ok=(src, masks, seg))
    roi_table = None if rois is None else read_roi_csv(rois)  # NB: malformed tables fail before any decoding
    meta_table = None if meta is None else read_meta_csv(meta, [c for c in IMAGE_COLUMNS if c not in ID_COLUMNS])
    key_path = Path(key_file) if key_file is not None else side["key"]
    # NB: the CPUs this process may use (containers, taskset), where the OS says; else all of them
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    max_bytes = int(max_image_mb * 2**20)
    options = {"color": color, "nonfinite": nonfinite, "mask_threshold": mask_threshold}

    # NB: a file may use 8 x --max-image-mb + 1 GiB; a volume asks for more by its declared size (tasks.py). The
    # workers' interpreters start now, while the folders are walked (~0.25 s of CPU each, issue 18); a refusal
    # stops them.
    with IsolatedPool(_TASKS, workers=workers, timeout=file_timeout, memory_mb=_memory_mb(max_image_mb, max_volume_mb),
                      task_memory_mb=_memory_mb(max_image_mb)).start() as pool:
        # NB: mask and SEG folders may sit inside SRC_DIR: their files are not images of the dataset
        exclude = [p for p in (rois, meta, key_path, stack, masks, seg, *side.values(), side["journal"],
                               Path(f"{side['journal']}.partial"), spool_path(stack)) if p is not None]
        job = _Ingest(stack=stack, side=side, key=None, key_path=key_path, options=options, max_bytes=max_bytes,
                      progress=progress, roi_table=roi_table, meta_table=meta_table,
                      max_volume_bytes=int(max_volume_mb * 2**20))
        job.find(src, masks, mask_pattern, follow_symlinks, exclude)
        if not job.found and not (resume and stack.exists()):
            # NB: before the key is created: a refusal leaves nothing behind
            raise NoImageError(f"the source folder {display_path(src)} holds no file (AppleDouble and other "
                               "operating-system litter are not counted); nothing was written")
        settings = {"src": src, "masks": masks, "mask_pattern": mask_pattern, "seg": seg, "rois": rois, "meta": meta,
                    "color": color, "nonfinite": nonfinite, "key_file": key_file, "max_image_mb": max_image_mb,
                    "max_volume_mb": max_volume_mb, "mask_threshold": mask_threshold,
                    "file_timeout": file_timeout, "follow_symlinks": follow_symlinks, "shard": shard,
                    "compressor": compressor}
        walked = {**job.walked, "seg": [] if seg is None else walk(seg, follow_symlinks=follow_symlinks)}
        job.header = {"sources": sources_digest(walked, {"rois": rois, "meta": meta}),
                      "options": _journal_options(settings), "command": _resume_command(stack, settings)}
        resuming = resume and stack.exists()
        if resuming and not key_path.is_file():
            started = _started_command(side["journal"])
            raise ResumeError(f"{display_path(stack)} cannot be resumed without its pseudonym key {key_path.name} "
                              "(another key would give its images other pseudonyms); " + (
                                  f"it was started as `{started}`: continue it with that command" if started and
                                  started != job.header["command"] else "delete the stack and ingest again"))
        # NB: after every refusal of a new ingest (a refused ingest writes nothing); a resume reads the existing key
        new_key = not key_path.exists()
        job.key = load_or_create_key(key_path)
        # NB: a resume under another key would mix pseudonyms; the journal holds a digest of it, never the key
        job.header["options"]["key"] = hashlib.sha256(b"gpucnr journal key\0" + job.key).hexdigest()
        job.resumed = _resume_point(stack, side["journal"], job.header) if resuming else None
        try:
            job.scan(pool, seg, follow_symlinks)
            summary = job.decode(pool, shard=shard, compressor=compressor, has_labels=job.matcher is not None or
                                 seg is not None or bool(job.layout.labels_of))
        except KeyboardInterrupt as e:
            job.meter.done()  # NB: the progress line ends before the interruption's line
            raise Interrupted(job.interrupted(), e) from None
    summary.warnings, summary.labels_expected = list(job.warnings), job.labels_expected
    if job.labels_expected and not summary.masks:
        summary.unlabelled_images = summary.images
    if summary.images == 0 and not resuming:
        # NB: a stack of no image is of no use and would block the same command once the folder is right: this
        # call's own outputs go (a key it created too), all but the skipped list, which says why file by file
        shutil.rmtree(stack, ignore_errors=True)
        side["linkage"].unlink(missing_ok=True)
        if new_key:
            key_path.unlink(missing_ok=True)
    return summary


def _clear_spool(folder: Path) -> None:
    """Remove the spool folder beside a stack (what an interrupted ingest left, or this one's): its spool files and
    the folder. A symbolic link at its name is removed, never followed; anything else there (a file, a folder holding
    other files) is refused, never deleted (``output-path``)."""
    if os.path.islink(folder):
        folder.unlink()
        return
    if not os.path.lexists(folder):
        return
    entries = list(os.scandir(folder)) if folder.is_dir() else None
    if entries is None or any(not (e.is_file(follow_symlinks=False) and SPOOL_FILE.fullmatch(e.name))
                              for e in entries):
        raise OutputError("output-path", f"{display_path(folder)} is in the way of the spool folder ingest writes "
                          "beside the stack, and holds something else than spool files; move it away")
    for e in entries:
        os.unlink(e.path)
    folder.rmdir()


def _journal_options(settings: dict) -> dict:
    """The options that decide what an ingest stores (not --workers, --progress), comparable across runs:
    paths absolute, and the pseudonym key by its SHA-256 (a resume with another key would mix pseudonyms)."""
    out = {}
    for name, value in settings.items():
        out[name] = os.path.abspath(value) if isinstance(value, str | os.PathLike) and name not in (
            "mask_pattern", "color", "nonfinite", "compressor") else value
    return out


def _resume_command(stack: Path, settings: dict) -> str:
    """The command line that continues this ingest: its arguments as given, the options that differ from the
    defaults, and --resume."""
    defaults = {"color": "rec709", "nonfinite": "skip", "max_image_mb": 512, "max_volume_mb": 4096,
                "file_timeout": 120, "shard": None,
                "compressor": DEFAULT_COMPRESSOR, "follow_symlinks": False}
    words = ["gpucnr", "ingest", display_path(settings["src"]), display_path(stack)]
    for name, value in settings.items():
        if name == "src" or value is None or defaults.get(name, None) == value:
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, display_path(value) if isinstance(value, Path) else
                                               f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(shlex.quote(w) for w in [*words, "--resume"])


class NoImageError(InputError):
    """`gpucnr ingest` of a source folder that holds no file at all: refused before anything is written."""

    code = "no-image"


def _started_command(journal: Path) -> str | None:
    """The resume command an interrupted ingest's journal records (with its --key-file), or None."""
    try:
        old, _, _ = Journal.read(journal)
        command = old.get("command")
    except (OSError, ValueError, AttributeError):
        return None
    return command if isinstance(command, str) else None


def _started_compressor(journal: Path) -> str:
    """The compressor an interrupted ingest was started with (its journal's options): a resume without
    --compressor continues with it, whatever today's default (an ingest started before the default changed
    printed a resume command without the option). The default when the journal does not say; `_resume_point`
    then refuses an unreadable journal with its own message."""
    try:
        old, _, _ = Journal.read(journal)
        name = old.get("options", {}).get("compressor")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) else DEFAULT_COMPRESSOR


class ResumeError(InputError):
    """`gpucnr ingest --resume` that cannot continue: other sources or options, no journal, a finished stack."""

    code = "resume-mismatch"


def _resume_point(stack: Path, journal: Path, header: dict) -> dict:
    """The journal of the interrupted ingest to continue, checked against this one's sources and options."""
    try:
        attrs = dict(zarr.open_group(str(stack), mode="r").attrs)
    except Exception:  # noqa: BLE001 - not a Zarr group: not something ingest left
        attrs = {}
    if "gpucnr_stack" in attrs and not journal.is_file():
        raise ResumeError(f"{display_path(stack)} is a complete stack: there is nothing to resume")
    # NB: a stack with its journal still beside it was interrupted while finishing (after its tables, before its
    # linkage file): the resume replays every file and closes it again
    try:
        old, records, flushed = Journal.read(journal)
    except (OSError, ValueError) as e:
        raise ResumeError(f"{display_path(stack)} cannot be resumed: its journal {journal.name} is missing or "
                          f"unreadable ({type(e).__name__}); delete {stack.name} and ingest again") from None
    changed = sorted(k for k in {*old.get("options", {}), *header["options"]}
                     if old.get("options", {}).get(k) != header["options"].get(k))
    if changed:
        raise ResumeError(f"{display_path(stack)} was started with other options: "
                          + ", ".join(f"{k}={old['options'].get(k)!r} (now {header['options'].get(k)!r})"
                                      for k in changed) + f"; continue it with `{old.get('command')}`")
    if old.get("sources") != header["sources"]:
        raise ResumeError(f"the source files changed since {display_path(stack)} was started (files added, removed "
                          f"or modified, by size or time); delete {stack.name} and {journal.name} and ingest again")
    return {"records": records, "flushed": flushed}


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
        self.layout = Layout()
        self.label_names: dict[int, str] = {}
        self.warnings: list[str] = []
        self.labels_expected = False
        self.meter = Progress(self.progress, unit="file")

    def problem(self, source: str, item: str, code: str, reason: str, encoding: str | None = None) -> None:
        # NB: a walked file's name holds "%" only when percent-encoded (files.source_name); a table row's text is
        # given with encoding ""
        encoding = ("percent" if "%" in source else "") if encoding is None else encoding
        self.problems.append({"source": source, "item": item, "code": code, "reason": reason,
                              "source_encoding": encoding})
        log.info("%s: %s %s: %s", display_path(source), item, code, display_path(reason))  # NB: the path is needed

    def find(self, src: Path, masks, mask_pattern, follow_symlinks: bool, exclude) -> None:
        """Walk the source (and mask) folders; mask files beside their images are not inputs."""
        self.exclude = exclude
        found = walk(src, follow_symlinks=follow_symlinks, exclude=exclude)
        self.walked = {"src": found}
        # NB: operating-system litter (AppleDouble ._*, Thumbs.db...) is neither an input nor listed (DESIGN §10)
        found = [f for f in found if not is_litter(f.rel)]
        if masks is None and mask_pattern is None:
            misplaced = misplaced_source(src)
            if misplaced is not None and misplaced[0] == "labels":
                # NB: label maps stored as images would be measured as images: refused before anything is written
                raise InputError(f"{misplaced[1]}; nothing was written")
            if misplaced is not None:
                self.warnings.append(misplaced[1])
                self.labels_expected = True
        if masks is not None or mask_pattern is not None:
            self.matcher = MaskMatcher(mask_pattern or "{stem}.*", None if masks is None else Path(masks))
            self.mask_dir = masks is not None
            # NB: MASK_DIR inside SRC_DIR (kvasir/masks for kvasir/) mirrors SRC_DIR only if it repeats its folders;
            # MASK_DIR = SRC_DIR holds its masks beside their images
            self.mask_is_src = masks is not None and Path(masks).resolve() == Path(src).resolve()
            self.mask_inside = (masks is not None and not self.mask_is_src
                                and Path(masks).resolve().is_relative_to(Path(src).resolve()))
            if masks is None or self.mask_is_src:
                is_mask = [f.code is None and self.matcher.key(f.rel.rpartition("/")[2]) is not None for f in found]
                mask_files = [f for f, m in zip(found, is_mask, strict=True) if m]
                if mask_pattern is None and mask_files:
                    # NB: --masks SRC_DIR without a pattern: the default '{stem}.*' takes every image for its own mask
                    raise InputError(f"--masks {display_path(masks)} is the image folder itself: give --mask-pattern "
                                     "to tell the masks from the images (e.g. '{stem}_mask.png' for 'case.png' and "
                                     "'case_mask.png'); nothing was written")
                _refuse_own_masks(self.matcher, mask_files)
                self.mask_index = self.matcher.index(mask_files)
                # NB: files matched as masks are masks, not inputs (beside their images, or in MASK_DIR = SRC_DIR)
                found = [f for f, m in zip(found, is_mask, strict=True) if not m]
                if self.mask_is_src:
                    self.walked["masks"] = self.walked["src"]
            else:
                self.walked["masks"] = walk(masks, follow_symlinks=follow_symlinks, exclude=exclude)
                self.mask_index = self.matcher.index(self.walked["masks"])
                rel = Path(masks).resolve().relative_to(Path(src).resolve()).as_posix() if self.mask_inside else "."
                if rel != ".":
                    self.mask_base = _sibling_base(found, self.mask_index, self.matcher, rel)
            if not self.mask_index:
                # NB: a typo such as {stem}-mask.png for {stem}_mask.png would store every mask as an image
                # (beside them) or label nothing: refused before anything is written.
                where = (f"under --masks {display_path(masks)}" if masks is not None
                         else f"beside the images under {display_path(src)}")
                raise InputError(f"--mask-pattern {self.matcher.pattern!r} matches no file {where}; nothing was "
                                 "written. Check it against one mask file's name (e.g. '{stem}_mask.png' for "
                                 "'case.png' and 'case_mask.png')")
            if found and not _paired(found, self.mask_index, self.matcher, getattr(self, "mask_base", None)):
                # NB: every mask would be listed as mask-no-image and every image stored unlabelled: refused before
                # anything is written, as a pattern that matches no file is
                n = sum(len(v) for v in self.mask_index.values())
                where = (f"under --masks {display_path(masks)}" if masks is not None
                         else f"beside the images under {display_path(src)}")
                raise InputError(f"--mask-pattern {self.matcher.pattern!r} matches {n} mask file(s) {where}, but "
                                 "none of them is the mask of an image by the names (the text the pattern puts "
                                 "around {stem} must surround an image's name without its extension: "
                                 "'{stem}_mask.png' pairs 'case_mask.png' with 'case.png'); nothing was written")
        else:
            # NB: without --masks / --mask-pattern, label maps of known layouts (nnU-Net, MSD, BraTS) label their
            # images and are not images themselves
            self.layout = detect(found)
            # NB: a layout's dataset.json is read for its names (`_dataset_json`), not counted as a skipped file
            found = [f for f in found if f.rel not in self.layout.label_sources and f.rel not in
                     self.layout.json_files]
        self.found = found
        for f in found:
            if f.code is not None:
                self.skipped[f.code] += 1
                self.problem(f.rel, "file", f.code, f.reason)
        for source, item, code, reason in self.layout.notes:
            self.problem(source, item, code, reason)
        self._dataset_json()

    def _dataset_json(self) -> None:
        """Label and channel names from the dataset.json files of the recognised layouts (screened like any
        per-image value). One that cannot be read is a problem (``dataset-json``): its names are not used."""
        for rel, f in sorted(self.layout.json_files.items()):
            try:
                with open(f.path, "rb") as fh:
                    data = fh.read(2**24 + 1)
            except OSError as e:
                self.problem(rel, DATASET_JSON, "dataset-json", f"cannot be read ({e.strerror or type(e).__name__});"
                             " its label and channel names are not used")
                continue
            read = read_dataset_json(data)
            if read.error is not None:
                self.problem(rel, DATASET_JSON, "dataset-json", f"cannot be read: {read.error}; its label and "
                             "channel names are not used (the label maps are measured, with blank ROI names)")
                continue
            for note in read.notes:
                self.problem(rel, DATASET_JSON, "label-regions", note)
            channels = {}
            for k, name in sorted(read.channels.items()):
                if refused_value(name) is not None:
                    self.problem(rel, DATASET_JSON, "roi-name", f"the name of channel {k} may identify a patient; "
                                 "its modality is stored blank")
                    name = ""
                channels[k] = name
            self.layout.channel_names[rel] = channels
            if not self.layout.labels_of:
                continue
            for k, name in sorted(read.labels.items()):
                if refused_value(name) is not None:
                    self.problem(rel, DATASET_JSON, "roi-name", f"the name of label {k} may identify a "
                                 "patient; it is stored blank")
                    name = ""
                if self.label_names.get(k, name) != name:
                    name = ""  # NB: two dataset.json files that disagree: no name rather than a wrong one
                self.label_names[k] = name

    def scan(self, pool: IsolatedPool, seg, follow_symlinks: bool) -> None:
        """Pass 1: headers of every candidate file, SEG references, mask matching."""
        candidates = [(k, f) for k, f in enumerate(self.found) if f.code is None]
        self.meter.stage("scan", len(candidates))
        headers = pool.imap((("scan_file", str(f.path), self.key, self.max_bytes, self.max_volume_bytes)
                             for _, f in candidates),
                            on_done=self.meter.tick, batch=_BATCH)
        kept = []
        for (k, f), rec in zip(candidates, headers, strict=True):
            if isinstance(rec, TaskFailure):
                self.skipped[rec.code] += 1
                self.problem(f.rel, "file", rec.code, rec.reason)
                continue
            kept.append((k, f, rec))
        self._dedup_keys(pool, kept)
        seg_refs, seg_rel = self._scan_segs(pool, seg, follow_symlinks, self.exclude)
        used: set = set()
        self.tasks = []
        for k, f, rec in kept:
            mask_files = []
            if self.matcher is not None:
                folder, _, name = f.rel.rpartition("/")
                base = getattr(self, "mask_base", None)
                if base is not None and (folder == base or folder.startswith(f"{base}/")):
                    folder = folder[len(base) + 1:]  # NB: MASK_DIR mirrors its sibling folder (kvasir/images)
                mask_files = self.mask_index.get((folder, self.matcher.image_key(name)), [])
                used.update(m.rel for m in mask_files)
            else:
                mask_files = self.layout.labels_of.get(f.rel, [])
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

    @staticmethod
    def _dedup_keys(pool: IsolatedPool, kept: list) -> None:
        """The duplicate key (``dedup``) of each raster file: the SHA-256 of its bytes where another file has the
        same cheap key (`raster.probe`: size and sampled blocks), hashed by the workers; else its cheap key, which
        no other file has, so it is the duplicate of none (as its SHA-256 would be). Decided from every scanned
        file, so a resume (which scans again) gives each file the key it had."""
        groups: dict[str, list[dict]] = {}
        for _, _, rec in kept:
            if rec.get("dedup_probe") is not None:
                groups.setdefault(rec["dedup_probe"], []).append(rec)
        shared = [(f, rec) for _, f, rec in kept if len(groups.get(rec.get("dedup_probe"), ())) > 1]
        digests = pool.imap((("hash_file", str(f.path)) for f, _ in shared), batch=_BATCH)
        for (f, rec), digest in zip(shared, digests, strict=True):
            # NB: a file that cannot be hashed now is nobody's duplicate; its decode says what is wrong with it
            rec["dedup"] = f"unhashed:{f.rel}" if isinstance(digest, TaskFailure) else digest
        for probe, recs in groups.items():
            if len(recs) == 1:
                recs[0]["dedup"] = f"probe:{probe}"

    def _scan_segs(self, pool: IsolatedPool, seg, follow_symlinks: bool, exclude=()) -> tuple[dict, dict]:
        """({pseudonymous instance id: paths of the DICOM SEG objects that label it}, {readable SEG path: its
        relative path})."""
        refs: dict[str, set[str]] = {}
        rels: dict[str, str] = {}
        if seg is None:
            return refs, rels
        files = walk(seg, follow_symlinks=follow_symlinks, exclude=exclude)
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
        """Pass 2: decode in input order straight into the stack, journaling each file (`journal`); then the
        tables, the linkage file and the skipped-files list. A resumed ingest replays the journal's files whose
        images are on disk and decodes the others."""
        sources = {f.rel for f in self.found}
        meta_rows = _meta_rows(self.meta_table, self.key, sources, self.problem)
        # NB: duplicates are decided here, in input order, against what was *stored*: a first copy that fails to
        # decode must not make a good second copy a "duplicate" (both are decoded; duplicates are rare).
        self.stored_as: dict[str, str] = {}
        self.link_rows: list[dict] = []
        self.frame_of: dict[tuple[str, int], int] = {}
        self.stored = self.unlabelled = self.masked = self.skipped_frames = 0
        self.labelled_by: set[str] = set()
        self.bare_rows: set[int] = set()  # NB: images stored without a label plane, by input position
        start, journal, writer = self._open(has_labels, shard, compressor)
        spool = spool_path(self.stack)
        try:
            self.meter.stage("decode", len(self.tasks), done=start)
            todo = self.tasks[start:]
            # NB: the workers compress each image into the stack's chunks (in parallel) and, where the plan says
            # which shard a file's images will fill, append them to that shard's spool file themselves; the
            # driver's writer renames a spool file that holds a whole shard into place (else the bytes come here)
            plan = SpoolPlan([t[2] for t in todo], writer, set(self.stored_as), self.options,
                             # NB: any 2-D file (a large one fills a shard alone); a volume's slices stream
                             [t[2]["format"] != "nifti" for t in todo], spool, has_labels) if SPOOL else None
            if plan is not None and plan.buckets:
                spool.mkdir(mode=0o700)
            else:
                plan = None
            # NB: each task's spool file, decided as `imap` takes the task; its cost and its message group, which
            # `imap` reads right after (same order), follow from it (`_groups` pops it)
            sent: dict[int, dict | None] = {}

            def messages():
                # NB: a file's spool file is decided as it is sent, after the files before it that the driver has
                # already stored (the plan follows what they did)
                for i, t in enumerate(todo):
                    sent[i] = None if plan is None else plan.args(i)
                    yield (*t[4], {"compressor": compressor, "labelled": has_labels, "spool": sent[i]})

            # NB: decoded results wait in the driver until the files before them are done: their bytes in flight
            # are bounded (x3: colour and LUT images become float64), as well as their number; a spooled file's
            # result holds no pixels.
            # A volume's slices come as parts (`workers.Part`), stored as they arrive: the driver never holds a
            # volume (the pool holds parts of later ones up to its part budget, whatever their size).
            outs = pool.imap(messages(), costs=(0 if sent[i] else _in_flight_cost(t[2]) for i, t in enumerate(todo)),
                             budget=max(2 * self.max_bytes, _IN_FLIGHT), on_done=self.meter.tick, parts=True,
                             # NB: a planned shard's files go to one worker together: two appending to one spool
                             # file at once contend for its lock
                             batch=max(_BATCH, min(_SHARD_BATCH, 0 if plan is None else plan.batch)),
                             batchable=_groups(todo, sent))
            j, state = start, None
            for out in outs:
                if isinstance(out, Part):
                    state = state or self._begin(j, writer)
                    self._store(j, state, out.items, meta_rows, writer)
                    continue
                record = self._decoded(j, out, meta_rows, writer, state)
                journal.record(record)
                self._apply(record)
                for path in () if plan is None else plan.consumed(j - start):
                    writer.spool_done(path)
                j, state = j + 1, None
                self.decoded = j
            table = _roi_rows(self.roi_table, self.frame_of, sources, self.problem)
            bare = len(self.bare_rows - (set() if table is None else {int(i) for i in table["image"]}))
            other = dict(sorted(Counter(p["code"] for p in self.problems if p["item"] != "file").items()))
            writer.attrs["ingest"] = {
                "files_in": len(self.found), "stored": self.stored, "skipped": dict(sorted(self.skipped.items())),
                "duplicates": self.duplicates, "images": writer.n_images, "skipped_frames": self.skipped_frames,
                "mask_files": len(self.labelled_by),
                "unlabelled_images": self.unlabelled, "bare_images": bare, "other_problems": other, **self.options,
                "max_image_mb": self.max_bytes / 2**20, "max_volume_mb": self.max_volume_bytes / 2**20,
                "linkage": self.side["linkage"].name,
                "skipped_list": self.side["skipped"].name, "layouts": self.layout.kinds,
            }
            if self.label_names:
                writer.attrs["label_names"] = {str(k): v for k, v in sorted(self.label_names.items())}
            opened = writer.close(rois=table)
            _clear_spool(spool)  # NB: spool files of shards that were not placed whole
        except BaseException:
            writer.abandon()  # NB: the shard being written completes and is journaled: a resume keeps it
            journal.close()
            with contextlib.suppress(Exception):
                _clear_spool(spool)
            # NB: the list is kept even if the run fails, but a second failure writing it (a full disk) must not
            # mask the first, coded one
            with contextlib.suppress(Exception):
                _write_csv(self.side["skipped"], self.problems, _PROBLEM_COLUMNS)
            raise
        _write_csv(self.side["skipped"], self.problems, _PROBLEM_COLUMNS)
        index_of = dict(zip(opened.images["source_index"].to_numpy(), opened.images["index"].to_numpy(),
                            strict=True))
        link_rows = [dict(r) for r in self.link_rows]
        for r in link_rows:
            r["index"] = int(index_of[r.pop("source_index")])
        link_rows.sort(key=lambda r: r["index"])
        _write_csv(self.side["linkage"], link_rows, ["index", "frame", "source", "file_index", *ID_COLUMNS,
                                                     "source_encoding", "channel", "case"])
        journal.remove()  # NB: last: until the linkage file is written, the ingest is not complete
        self.meter.done()
        summary = IngestSummary(
            stack=self.stack, files_in=len(self.found), stored=self.stored, skipped=dict(sorted(self.skipped.items())),
            duplicates=self.duplicates, images=opened.n_images,
            problems=pd.DataFrame(self.problems, columns=_PROBLEM_COLUMNS), linkage=self.side["linkage"],
            skipped_list=self.side["skipped"], key_file=self.key_path, masks=len(self.labelled_by),
            unlabelled_images=self.unlabelled, bare_images=bare, other_problems=other,
            skipped_frames=self.skipped_frames,
            totals={"files": len(self.found), "frames": opened.n_images + self.skipped_frames,
                    "masked": self.masked, "seg_files": self.seg_files,
                    "mask_files": sum(len(v) for v in self.mask_index.values()) + len(self.layout.label_sources),
                    "layout_files": len(self.layout.json_files),
                    "has_mask_dir": self.mask_dir, "mask_dir_inside": getattr(self, "mask_inside", False),
                    "mask_dir_is_src": getattr(self, "mask_is_src", False),
                    "roi_rows": 0 if self.roi_table is None else len(self.roi_table),
                    "meta_rows": 0 if self.meta_table is None else len(self.meta_table),
                    "meta_rows_hint": _path_hint(self.meta_table, sources),
                    "roi_rows_hint": _path_hint(self.roi_table, sources)})
        if summary.files_in != summary.stored + sum(summary.skipped.values()) + summary.duplicates:
            raise AssertionError("ingest lost track of a file")  # NB: the invariant of DESIGN §8, checked always
        return summary

    def _open(self, has_labels: bool, shard: int, compressor: str):
        """(the first task to decode, the journal, the stack writer): a new stack, or the interrupted one with
        the journal's files replayed up to the first one with an image that is not on disk."""
        if self.resumed is None:
            self.decoded = 0
            journal = Journal.create(self.side["journal"], self.header)  # NB: before the stack: it names it
            writer = StackWriter(self.stack, labels=has_labels, shard=shard, compressor=compressor)
            writer.on_written = journal.flushed
            return 0, journal, writer
        records, flushed = self.resumed["records"], self.resumed["flushed"]
        start = len(records)
        for j, record in enumerate(records):
            if any(int(fr["row"]["position"]) >= flushed.get(fr["row"]["bucket"], 0) for fr in record["frames"]):
                start = j
                break
        kept = records[:start]
        for record in kept:
            self._apply(record)
        rows = [fr["row"] for record in kept for fr in record["frames"]]
        labels = {v for record in kept for fr in record["frames"] for v in fr["labels"]}
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["bucket"]] = int(row["position"]) + 1
        # NB: the journal is rewritten with what is kept, so that one interrupted twice resumes alike
        shards = [{"flushed": b, "count": whole_shards(self.stack, b, n)} for b, n in counts.items()]
        journal = Journal.create(self.side["journal"], self.header, [*kept, *shards])
        writer = StackWriter.resume(self.stack, rows=rows, label_ids=labels, labels=has_labels, shard=shard,
                                    compressor=compressor)
        writer.on_written = journal.flushed
        self.decoded = start
        return start, journal, writer

    def _begin(self, j: int, writer: StackWriter) -> dict:
        """The state of file `j` while its frames are stored: its journal record so far, the problems of its
        frames, and the writer's mark to return to if its worker dies before it is done."""
        rec = self.tasks[j][2]
        record = {"j": j, "problems": [], "skip": None, "dup": False, "dedup": None, "masked": False,
                  "labelled_by": [], "unlabelled": 0, "frames": [], "skipped_frames": 0}
        # NB: duplicates are known from the scan: a duplicate's frames are not stored as they come
        dup = rec.get("dedup") is not None and rec["dedup"] in self.stored_as
        return {"record": record, "frame_problems": [], "mark": writer.mark(), "dup": dup}

    def _problem(self, j: int, problems: list, item: str, code: str, reason: str) -> None:
        f = self.tasks[j][1]
        problems.append({"source": f.rel, "item": item, "code": code, "reason": reason,
                         "source_encoding": f.encoding})
        # NB: an operator message: the path is needed (its control characters escaped)
        log.info("%s: %s %s: %s", display_path(f.rel), item, code, display_path(reason))

    def _store(self, j: int, state: dict, frames: list, meta_rows: dict, writer: StackWriter,
               labels: list | None = None) -> None:
        """Store frames of file `j` as they come (all of a 2-D file's at once, a volume's slices part by part)."""
        if state["dup"]:
            return
        k, f, rec = self.tasks[j][:3]
        record = state["record"]
        for pos, entry in enumerate(frames):
            channel, frame = int(entry.get("channel", 0)), int(entry.get("frame", pos))
            if "skip" in entry:
                # NB: one slice of a volume (--nonfinite skip): listed by (source, channel, frame), the rest stored
                code, reason = entry["skip"]
                self._problem(j, state["frame_problems"], f"channel {channel} frame {frame}", code, reason)
                record["skipped_frames"] += 1
                continue
            encoded = entry.pop("encoded", None)
            pixels = None if encoded is not None else entry.pop("pixels")
            row = _image_row(rec, entry, frame, k, pixels.shape if encoded is None else encoded["shape"])
            row["channel"] = channel
            row["case"] = self._case(rec, f.rel, channel)
            row["modality"] = row["modality"] or self.layout.modality(f.rel, channel)  # NB: dataset.json, BraTS
            row.update(meta_rows.get(f.rel, {}))
            if encoded is not None:
                # NB: compressed by the worker (tasks.decode_file): the writer stores its chunks as they are
                if writer.labels and not encoded["has_labels"]:
                    record["unlabelled"] += 1
                source_index = writer.add_encoded(encoded, row)
                record["frames"].append({"row": writer.rows[source_index], "labels": list(encoded["label_ids"]),
                                         "bare": not (writer.labels and encoded["has_labels"])})
                continue
            plane = entry.pop("label", None) if labels is None else labels[pos]
            if writer.labels and plane is None:
                record["unlabelled"] += 1
            source_index = writer.add(pixels, plane, row)
            ids = [] if plane is None else [int(v) for v in np.unique(plane) if v != 0]
            record["frames"].append({"row": writer.rows[source_index], "labels": ids,
                                     "bare": not writer.labels or plane is None})

    def _decoded(self, j: int, out, meta_rows: dict, writer: StackWriter, state: dict | None = None) -> dict:
        """What one decoded file became (`out`: its result, after the parts `_store` stored into `state`): the
        journal record. A file whose worker failed after some of its slices were stored has them taken back."""
        rec, mask_rels, task = self.tasks[j][2:]
        state = state or self._begin(j, writer)
        record = state["record"]

        def problem(item: str, code: str, reason: str) -> None:
            self._problem(j, record["problems"], item, code, reason)

        if isinstance(out, TaskFailure):
            # NB: a volume whose worker died midway: its stored slices are cut from the stack, none is counted
            writer.rollback(state["mark"])
            record.update(frames=[], unlabelled=0, skipped_frames=0)
            record["skip"] = out.code
            reason = out.reason
            if out.code.startswith("mask") and mask_rels:
                reason += f" (mask: {', '.join(mask_rels)})"  # NB: the operator's list names both files
            problem("file", out.code, reason)
            return record
        dedup = rec.get("dedup")
        if state["dup"]:
            record["dup"] = True
            what = "SOP instance" if rec["format"] == "dicom" else "bytes"
            problem("file", "duplicate", f"the same {what} as {self.stored_as[dedup]}, stored before it")
            return record
        record["dedup"] = dedup
        record["masked"] = bool(mask_rels or task[5])
        if out.get("mask_problem"):
            code, reason = out["mask_problem"]
            # NB: the image is stored (unlabelled): a bad mask must not lose the case; the list names both
            problem("mask", code, f"{reason} (mask: {', '.join(mask_rels) or 'DICOM SEG'}); the image is stored "
                    "without labels")
        else:
            record["labelled_by"] = list(mask_rels)  # NB: "mask files used" = masks that labelled a stored image
        self._store(j, state, out["frames"], meta_rows, writer, out["labels"])
        record["problems"] += state["frame_problems"]
        return record

    def _case(self, rec: dict, rel: str, channel: int) -> str:
        """The image's `case` (DESIGN §9): a DICOM series by its pseudonymous id, a NIfTI volume by a pseudonym
        of its file and channel, any other file by a pseudonym of its name."""
        if rec["format"] == "dicom" and rec.get("series_id"):
            return rec["series_id"]
        if rec["format"] == "nifti":
            return pseudonym(self.key, "case", f"{rel}\0{channel}")
        return pseudonym(self.key, "case", rel)

    def _apply(self, record: dict) -> None:
        """Count one file's record (decoded now, or replayed from the journal)."""
        k, f = self.tasks[record["j"]][:2]
        self.problems.extend(record["problems"])
        if record["skip"] is not None:
            self.skipped[record["skip"]] += 1
            return
        if record["dup"]:
            self.duplicates += 1
            return
        if record["dedup"] is not None:
            self.stored_as[record["dedup"]] = f.rel
        self.stored += 1
        self.masked += record["masked"]
        self.unlabelled += record["unlabelled"]
        self.labelled_by.update(record["labelled_by"])
        self.skipped_frames += record.get("skipped_frames", 0)
        for fr in record["frames"]:
            row = fr["row"]
            if fr.get("bare", not fr["labels"]):  # NB: a journal of an older gpucnr has no "bare"
                self.bare_rows.add(int(row["source_index"]))
            frame, channel = int(row["frame"]), int(row.get("channel", 0))
            if channel == 0:
                # NB: ROI table rows name (source, frame): the first channel of a 4-D volume
                self.frame_of[(f.rel, frame)] = int(row["source_index"])
            self.link_rows.append({"source_index": int(row["source_index"]), "frame": frame, "source": f.rel,
                                   "file_index": k, **{c: row.get(c, "") for c in ID_COLUMNS},
                                   "source_encoding": f.encoding, "channel": channel, "case": row.get("case", "")})

    def interrupted(self) -> str:
        """What an interrupted ingest did and how to continue it (the line `gpucnr ingest` ends with)."""
        if self.resumed is None and not hasattr(self, "decoded"):
            return (f"stopped while reading headers, before anything was stored; nothing was written but the key "
                    f"({self.key_path.name}); run the same command again")
        try:
            _, _, flushed = Journal.read(self.side["journal"])
        except (OSError, ValueError):
            flushed = {}
        done = (f"{self.decoded} of {len(self.tasks)} files decoded" if hasattr(self, "decoded") else
                "stopped while reading headers")
        return (f"{done}, {sum(flushed.values())} image(s) kept on disk in {display_path(self.stack)}; continue "
                f"with `{self.header['command']}` (or delete {display_path(self.stack)} and "
                f"{display_path(self.side['journal'])})")


def _refuse_own_masks(matcher: MaskMatcher, mask_files) -> None:
    """Refuse a --mask-pattern that names a file as its own mask (``{stem}*.png`` matches ``case.png`` for the stem
    ``case``): it matches the images' names too, and would take every image for a mask. The example file is named
    on a warning line about it (file names reach the console only on lines about that file, DESIGN §8)."""
    for f in mask_files:
        name = f.rel.rpartition("/")[2]
        if matcher.key(name) == matcher.image_key(name):
            log.warning("%s: --mask-pattern %r matches this file as its own mask", display_path(f.rel),
                        matcher.pattern)
            raise InputError(f"--mask-pattern {matcher.pattern!r} matches image files as their own masks (e.g. the "
                             "file named on the line above): it matches the images' names too, so every image "
                             "would be taken for a mask; nothing was written. The text after {stem} must tell "
                             "masks from images (e.g. '{stem}_mask.png' for 'case.png' and 'case_mask.png', or "
                             "'{stem}_mask*.png' for several masks per image)")


def _sibling_base(found, mask_index: dict, matcher: MaskMatcher, masks_rel: str) -> str | None:
    """For a MASK_DIR inside SRC_DIR that mirrors none of SRC_DIR's images: the sibling folder it mirrors instead
    (``images`` for ``kvasir/masks`` beside ``kvasir/images``: ``masks/x.jpg`` is the mask of ``images/x.jpg``),
    the one whose images it matches most; None when it mirrors SRC_DIR itself (the documented rule) or nothing."""

    def hits(base: str | None) -> int:
        return _paired(found, mask_index, matcher, base)

    if hits(None):
        return None
    parent = masks_rel.rpartition("/")[0]
    prefix = f"{parent}/" if parent else ""
    siblings = {f.rel[len(prefix):].split("/", 1)[0] for f in found if f.rel.startswith(prefix) and "/" in
                f.rel[len(prefix):]}
    best = max(((hits(prefix + s), prefix + s) for s in sorted(siblings)), default=(0, None))
    return best[1] if best[0] else None


def _paired(found, mask_index: dict, matcher: MaskMatcher, base: str | None) -> int:
    """How many of the files `found` have a mask in `mask_index` by their names (`base`: the folder under SRC_DIR
    that MASK_DIR mirrors, as `_sibling_base` finds it; None: SRC_DIR itself)."""
    n = 0
    for f in found:
        folder, _, name = f.rel.rpartition("/")
        if base is not None:
            if folder != base and not folder.startswith(f"{base}/"):
                continue
            folder = folder[len(base) + 1:]
        n += (folder, matcher.image_key(name)) in mask_index
    return n


def _memory_mb(max_image_mb: float, max_volume_mb: float = 0) -> int:
    """A worker's memory budget: the largest allowed image several times over (decoded, converted to float64,
    pickled for the driver), or the largest allowed volume three times (as stored, its slices, pickled), plus
    room for the decoders themselves."""
    return int(max(8 * max_image_mb, 3 * max_volume_mb) + 1024)


def _batchable(rec: dict) -> bool:
    """Whether a file's decode may share a message with others (`IsolatedPool.imap`'s `batch`): a small 2-D file,
    never a volume (its slices are streamed)."""
    return rec["format"] != "nifti" and rec["declared_bytes"] <= _BATCH_BYTES


def _groups(todo: list, sent: dict):
    """`IsolatedPool.imap`'s `batchable` of the decode pass, read as each task is sent: a spooled file's spool file
    (a planned shard's files share a message), else up to `_BATCH` consecutive small 2-D files, else False."""
    k = 0
    for i, t in enumerate(todo):
        spool = sent.pop(i)
        if spool is not None:
            yield spool["images"]
        elif _batchable(t[2]):
            yield ("bytes", k // _BATCH)
            k += 1
        else:
            yield False


def _in_flight_cost(rec: dict) -> int:
    """Bytes a decoded file may hold in the driver while files before it are not done: x3 as colour and LUT images
    become float64; none for a volume, whose slices wait as parts within the pool's part budget."""
    return 0 if rec["format"] == "nifti" else 3 * rec["declared_bytes"]


#: whether ingest's workers write the shards the driver can plan (`spoolplan.SpoolPlan`); off, every byte passes
#: through the driver (the tests compare the two)
SPOOL = True


def _image_row(rec: dict, entry: dict, frame: int, file_index: int, shape) -> dict:
    row = {c: rec.get(c, "") for c in ("format", "modality", "manufacturer", "model", *ID_COLUMNS)}
    row.update({"frame": frame, "rows": int(shape[0]), "columns": int(shape[1]), "file_index": file_index,
                "spacing_y": float(rec.get("spacing_y", np.nan)), "spacing_x": float(rec.get("spacing_x", np.nan)),
                "spacing_z": float(rec.get("spacing_z", np.nan)), "orientation": rec.get("orientation", ""),
                "slope": float(entry["slope"]), "intercept": float(entry["intercept"]),
                "padding": float(entry["padding"]), "photometric": entry["photometric"], "color": entry["color"]})
    return row


def _path_hint(table, sources: set[str]) -> str | None:
    """Why most rows of a --meta / --rois table name no file under SRC_DIR, when their paths say so: absolute
    or climbing out, relative to a folder above or below SRC_DIR, or another case. Never quotes a path (they
    can hold names)."""
    if table is None or not len(table):
        return None
    keys = [k if isinstance(k, str) else None for k in table["_key"]]
    missed = [k for k in keys if k is None or k not in sources]
    if len(missed) * 2 < len(keys):
        return None
    if all(k is None for k in missed):
        return "the source column holds absolute paths or paths with '..'; they must be relative to SRC_DIR"
    missed = [k for k in missed if k is not None]

    def most(hits: int) -> bool:
        return hits * 2 >= len(missed)

    for cut in (1, 2, 3):
        if most(sum(k.split("/", cut)[-1] in sources for k in missed if k.count("/") >= cut)):
            return (f"the paths seem relative to the folder {cut} level(s) above SRC_DIR: drop their first {cut} "
                    "folder(s), or pass that folder as SRC_DIR")
    tails = {s.split("/", n)[-1] for s in sources for n in (1, 2, 3) if s.count("/") >= n}
    if most(sum(k in tails for k in missed)):
        return ("the paths seem relative to a folder inside SRC_DIR: write them from SRC_DIR itself, or pass "
                "that folder as SRC_DIR")
    lower = {s.lower() for s in sources}
    if most(sum(k.lower() in lower for k in missed)):
        return "the paths differ from the files' names in upper / lower case (paths are case-sensitive)"
    return None


def _meta_rows(table, key: bytes, sources: set[str], problem) -> dict[str, dict]:
    """{source: {column: value}} from the --meta CSV; id columns pseudonymised, rows naming no file recorded."""
    if table is None:
        return {}
    columns = [c for c in table.columns if c not in ("source", "_line", "_key", "_literal")]
    out = {}
    for row in table.to_dict("records"):
        source = match_source(row, sources)
        if source is None or source not in sources:
            problem(display_path(row["source"]), f"meta line {row['_line']}", "meta-no-image",
                    "this --meta row names no file under SRC_DIR" + (" (a path outside it)" if source is None
                                                                     else ""), "")
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
        key = match_source(row, sources)
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
                    f"this ROI row names no stored image: {why}", "")
            continue
        name = row["name"]
        why = refused_value(name)
        if why is not None:
            # NB: the ROI is measured all the same; its name (never quoted) stays out of the stack and results
            problem(display_path(row["source"]), f"rois line {row['_line']}", "roi-name",
                    f"the ROI name holds {why}; it is stored blank", "")
            name = ""
        hit.append({"image": where, "roi": row["roi"], "kind": row["kind"], "cx": row["cx"], "cy": row["cy"],
                    "r": row["r"], "name": name})
    return pd.DataFrame(hit, columns=["image", "roi", "kind", "cx", "cy", "r", "name"])


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """An operator file (it holds source paths): readable by its owner only, whatever was there before (written
    beside it and renamed into place: a symbolic link planted at its name is replaced, never followed)."""

    def fill(fh):
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: csv_text(v) for k, v in r.items()} for r in rows)

    try:
        write_file(path, fill, what="operator file", private=True)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise OutputError("output-write", f"{display_path(path)} could not be written ({why})") from None
