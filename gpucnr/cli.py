"""The `gpucnr` command line (also `python -m gpucnr`): argument parsing only, no logic."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

from gpucnr._version import __version__
from gpucnr.errors import GpucnrError, Interrupted, Terminated, console_text, environment_error
from gpucnr.kernels.cnr import DEFINITIONS
from gpucnr.kernels.footprints import FOOTPRINTS
from gpucnr.kernels.params import BACKGROUNDS
from gpucnr.sources.colour import COLOR_MODES

# NB: every import above is plain Python (no NumPy, Zarr, pandas, SciPy, Dask, xarray, Matplotlib, Numba):
# `gpucnr --help` starts at once, and each command imports what it needs when it runs (issue 18; tested in
# tests/test_cli_startup.py). gpucnr.store imports Zarr, so its compressor names are repeated here, and the test
# checks that they are store.COMPRESSORS.
_COMPRESSORS = ("blosc-lz4", "blosc-zstd", "zstd")

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text: str) -> str:
    from gpucnr.store import SizeError, parse_size

    try:
        parse_size(text, what="--shard")
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _bins(text: str):
    return text if text == "auto" else _positive_int(text)


def _measurement_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement (as gpucnr.measure; defaults = the article's Python method)")
    g.add_argument("--background", choices=BACKGROUNDS, default="complement")
    g.add_argument("--footprint", choices=FOOTPRINTS, default="cross")
    g.add_argument("--dilation", type=_nonneg_int, default=5)
    g.add_argument("--border", type=_nonneg_int, default=5)
    g.add_argument("--ring-gap", type=_nonneg_int, default=5)
    g.add_argument("--ring-width", type=_positive_int, default=10)
    g.add_argument("--background-label", type=int, default=None)
    g.add_argument("--min-bg", type=_nonneg_int, default=30)
    g.add_argument("--ddof", type=_nonneg_int, default=None, help="default 1 (viqa and mrqy: 0)")
    g.add_argument("--definition", choices=DEFINITIONS, default="pooled",
                   help="viqa and mrqy reproduce vIQA's and MRQy/RadQy's CNRs; they set --ddof 0 --signed")
    g.add_argument("--gcnr-bins", type=_bins, default="auto")
    g.add_argument("--signed", action="store_true")


def _allow_incomplete(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-incomplete", action="store_true",
                   help="use results an interrupted run left incomplete (refused otherwise: `gpucnr run --resume` "
                        "completes them); missing images are flagged not-computed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpucnr", description="Contrast-to-noise ratio of every image of a dataset.")
    parser.add_argument("--version", action="version", version=f"gpucnr {__version__}")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                        help="messages of gpucnr's own loggers on stderr (default warning)")
    sub = parser.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="DICOM / PNG / TIFF / JPEG / NIfTI files (+ masks, SEG, ROI CSV) -> a stack")
    ing.add_argument("src", type=Path, help="SRC_DIR, walked recursively; formats are told by content")
    ing.add_argument("stack", type=Path, help="STACK.zarr to create (key, linkage and skipped lists go beside it)")
    ing.add_argument("--masks", type=Path, default=None, help="MASK_DIR mirroring SRC_DIR (pattern {stem}.*)")
    ing.add_argument("--mask-pattern", default=None,
                     help="mask file names, e.g. '{stem}_mask.png' or '{stem}_mask*.png' (several per image)")
    ing.add_argument("--seg", type=Path, default=None, help="folder of DICOM SEG objects (extra: seg)")
    ing.add_argument("--rois", type=Path, default=None,
                     help="ROI CSV: source, [frame,] roi, kind (square|disk), cx, cy, r [, name]")
    ing.add_argument("--meta", type=Path, default=None, help="CSV: source + per-image columns (site, split, ...)")
    ing.add_argument("--color", choices=COLOR_MODES, default="rec709",
                     help="colour to gray: rec709 (default; the article's rgb2gray), bt601, or skip")
    ing.add_argument("--nonfinite", choices=("skip", "exclude"), default="skip",
                     help="images with NaN/inf pixels: skip (default) or store them (the kernels exclude them)")
    ing.add_argument("--key-file", type=Path, default=None,
                     help="pseudonym key shared across stacks (created if missing; default: STACK.zarr.key)")
    ing.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: CPUs)")
    ing.add_argument("--max-image-mb", type=float, default=512,
                     help="largest declared image (one slice of a volume), MiB (default 512)")
    ing.add_argument("--max-volume-mb", type=float, default=4096,
                     help="largest declared NIfTI volume (all slices and channels), MiB (default 4096)")
    ing.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                     help="binarise mask files: 1 where the value exceeds T (lossy JPEG masks)")
    ing.add_argument("--file-timeout", type=float, default=120, help="seconds per file before it is skipped")
    ing.add_argument("--shard", type=_size, default=None,
                     help="shard size per bucket: pixels (4M = 2^22 px, the default) or images (64i, or a "
                          "bare 64); a run batches whole shards")
    ing.add_argument("--compressor", choices=_COMPRESSORS, default=None,
                     help="codec of a new stack (default blosc-lz4); a resumed ingest keeps its stack's (another is "
                          "refused)")
    ing.add_argument("--follow-symlinks", action="store_true")
    ing.add_argument("--progress", action="store_true", help="progress line on stderr")
    ing.add_argument("--resume", action="store_true",
                     help="continue an interrupted ingest of STACK.zarr (same sources and options)")

    demo = sub.add_parser("demo", help="phantom dataset with known CNR -> stack -> run -> summary table")
    demo.add_argument("--out", type=Path, default=None,
                      help="leave DIR/stack.zarr and DIR/results.zarr (default: measure in memory)")
    demo.add_argument("-n", type=_positive_int, default=2000, help="number of phantom images (default 2000)")
    demo.add_argument("--size", type=_positive_int, default=128, help="image side in pixels (default 128)")
    demo.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    demo.add_argument("--threshold", type=float, default=1.5, help="CNR below which an image is dropped")
    demo.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="measure every image of a stack into resumable results")
    run.add_argument("stack", type=Path, help="STACK.zarr (gpucnr.write_stack / gpucnr ingest)")
    run.add_argument("results", type=Path, help="RESULTS.zarr to create (or continue with --resume)")
    run.add_argument("--rois", default=None, metavar="CSV|auto",
                     help="CSV with columns image (global index), roi, kind, cx, cy, r [, name], or the ingest's "
                     "table: source [, channel] [, frame], roi, kind, cx, cy, r [, name] (sources matched through "
                     "the linkage file); or the keyword auto: the automatic regions of every image (air, body, two "
                     "tissue classes; cells 1 foreground and 2 tissue; the stack's labels and ROI table are not "
                     "read). A file named auto is ./auto")
    run.add_argument("--roi-source", choices=("auto", "labels", "table", "both"), default=None,
                     help="ROIs from the labels (masks), the ROI table, or both; auto (default): every source the "
                     "stack has, in one run. Not with --rois auto")
    run.add_argument("--edge", type=_nonneg_int, default=2,
                     help="with --rois auto: width (px) of the band removed where two regions meet (default 2)")
    run.add_argument("--linkage", type=Path, default=None,
                     help="linkage file for an ingest-style --rois table (default: STACK.zarr.linkage.csv)")
    run.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    run.add_argument("--scheduler", default="threads",
                     help="threads (default) | processes | synchronous | ADDRESS of a Dask distributed scheduler")
    run.add_argument("--workers", type=_positive_int, default=None, help="local pool size (default: CPUs)")
    run.add_argument("--batch", default=None,
                     help="batch size per bucket, in pixels (16M = 2^24 px: the smallest whole number of shards "
                          "holding that many) or images (64i, or a bare 64; rounded to a multiple of the shard); "
                          "default 16M; a --resume without it continues the results' own")
    run.add_argument("--resume", action="store_true", help="skip committed batches of existing results")
    run.add_argument("--progress", action="store_true", help="progress bar on stderr")
    run.add_argument("--group-columns", type=_names, default=None,
                     help="per-image columns to copy into the results for grouping, e.g. site,split (screened: "
                     "identifying names and values are refused)")
    _measurement_options(run)

    rep = sub.add_parser("report", help="one self-contained HTML report of a dataset's CNR")
    rep.add_argument("results", type=Path, help="RESULTS.zarr")
    rep.add_argument("out_dir", type=Path, help="folder for report.html")
    rep.add_argument("--thresholds", type=_floats, default=(1.0, 1.5, 2.0, 3.0), help="e.g. 1.0,1.5,2.0,3.0")
    rep.add_argument("--primary", type=float, default=1.5, help="the threshold the report leads with")
    rep.add_argument("--by", type=_names, default=None,
                     help="per-image columns to group by, e.g. modality,site (a meta column such as site is in the "
                     "results only if `gpucnr run --group-columns` named it)")
    rep.add_argument("--rule", action="append", default=None,
                     help="a filtering rule whose cut per group the thresholds section shows (repeat for several): "
                     "abs:T, quantile:P, mad:K (default: quantile:0.05 and mad:3)")
    rep.add_argument("--stack", type=Path, default=None, help="the stack, if not where the results say")
    rep.add_argument("--lowest", type=_nonneg_int, default=12, help="images in the lowest-CNR gallery")
    rep.add_argument("--open", action="store_true", help="open the report in a browser")
    _allow_incomplete(rep)

    filt = sub.add_parser("filter", help="keep/drop/flag manifest for training, from results")
    filt.add_argument("results", type=Path, help="RESULTS.zarr")
    filt.add_argument("--threshold", type=float, default=None,
                      help="drop below this CNR: the same as --rule abs:T (default: abs:1.5)")
    filt.add_argument("--rule", default=None,
                      help="where each group is cut: abs:T (drop CNR < T; default abs:1.5), quantile:P (drop CNR < "
                      "the group's P-quantile; groups of fewer than 1/P units drop nothing), mad:K (drop CNR < "
                      "median - K x 1.4826 x MAD; a MAD of 0 drops nothing); flagged units stay out of the statistics")
    filt.add_argument("--by", type=_names, default=None,
                      help="per-image columns whose values define the groups of --rule, e.g. modality or "
                      "modality,site (default: one group); the cut of each group goes to the manifest's metadata")
    filt.add_argument("--level", choices=("image", "roi", "case", "series", "study", "patient"), default="image",
                      help="unit of a row; case: decided on the pooled CNR of the case's cells (gpucnr.aggregate)")
    filt.add_argument("--with-paths", action="store_true",
                      help="join source paths from the stack's linkage file (stacks made by `gpucnr ingest`)")
    filt.add_argument("--stack", type=Path, default=None, help="the stack, if not where the results say")
    filt.add_argument("--out", type=Path, required=True, help="manifest.csv or manifest.parquet")
    _allow_incomplete(filt)

    enh = sub.add_parser("enhance", help="the article's low-CNR hook: enhance images below a threshold, re-measure")
    enh.add_argument("results", type=Path, help="RESULTS.zarr")
    enh.add_argument("--threshold", type=float, default=None, help="enhance below this CNR (default 1.5)")
    enh.add_argument("--rule", default=None,
                     help="instead of --threshold: enhance what `gpucnr filter --rule RULE` drops (abs:T, quantile:P, "
                     "mad:K)")
    enh.add_argument("--by", type=_names, default=None, help="per-image columns whose groups --rule cuts apart")
    enh.add_argument("--method", choices=("median", "gaussian"), default="median")
    enh.add_argument("--size", type=_positive_int, default=None, help="median window (pixels, default 3)")
    enh.add_argument("--sigma", type=float, default=None, help="Gaussian sigma (pixels, default 1)")
    enh.add_argument("--stack", type=Path, default=None, help="the stack, if not where the results say")
    enh.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    enh.add_argument("--out", type=Path, required=True,
                     help="folder for enhanced.zarr and its results.zarr")
    _allow_incomplete(enh)

    info = sub.add_parser("info", help="contents, completeness and parameters of a stack or results")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--verify", action="store_true",
                      help="read and decode every chunk: results (and check committed rows), or a stack's images and "
                           "labels (each against the checksum recorded for its position)")
    return parser


class _LevelFormatter(logging.Formatter):
    """`logging.Formatter` with ``%(level)s``: the record's level name in lower case."""

    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


def _logging(level: str) -> None:
    """gpucnr's loggers only: a reader library's log lines (pydicom's quote header values) never reach stderr."""
    logger = logging.getLogger("gpucnr")
    logger.setLevel(level.upper())
    ours = [h for h in logger.handlers if getattr(h, "_gpucnr", False)]
    for h in ours:
        if h.stream is not sys.stderr:
            # NB: main() called again in one process (tests, notebooks): today's stderr. Not setStream, which
            # flushes the old stream (closed by then)
            h.stream = sys.stderr
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        # NB: the same shape as the commands' own lines ("gpucnr: warning: ..."), whatever logged it
        handler.setFormatter(_LevelFormatter("gpucnr: %(level)s: %(message)s"))
        handler._gpucnr = True
        logger.addHandler(handler)
    logger.propagate = False


def _exists(path) -> bool:
    """Whether something is at `path` (None: nothing)."""
    return path is not None and os.path.lexists(path)


#: set by `gpucnr.__main__`: this process is the `gpucnr` command's own (see `_imported`)
FREEZE_AFTER_IMPORTS = False


def _imported() -> None:
    """A command's modules are imported. In the `gpucnr` process (not a notebook or a test calling `main`), the
    objects they made are moved out of the cycle collector's sight: they live until the process ends, and each
    full collection walked all of them (~0.2 s of a `gpucnr run` of 2000 images here, issue 18)."""
    if FREEZE_AFTER_IMPORTS:
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (DESIGN §10): 0 done, 2 refused or a coded error, 3 completed with
    problems (listed on stderr), 4 stopped by the environment, 130 / 143 interrupted by SIGINT / SIGTERM (one
    line: what was done, how to continue), 141 when stdout's reader went away (``gpucnr info X | head``).
    Never a traceback for a user's mistake, a signal or a broken pipe."""
    try:
        args = build_parser().parse_args(argv)
        _logging(args.log_level)
    except KeyboardInterrupt:
        # NB: Ctrl-C while the options are parsed (the parser imports a command's option names): nothing began
        from gpucnr.__main__ import STARTING

        print(STARTING, file=sys.stderr)
        return 130
    previous = _on_sigterm()
    try:
        return _dispatch(args)
    except Interrupted as e:
        print(f"gpucnr: interrupted ({e.signal}): {console_text(e.reason)}", file=sys.stderr)
        return e.exit_code
    except GpucnrError as e:
        print(f"gpucnr: error {console_text(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        # NB: a command that had written nothing worth continuing: say so in one line, no traceback.
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        # NB: a command whose work was complete when the signal came (printing its summary) has nothing to continue
        done = getattr(args, "completed", None) or {
                "report": "no report was written (report.html is written whole, at the end); run the same "
                          "command again",
                "filter": "no manifest was written (it is written whole, at the end); run the same command again",
                # NB: a run interrupted after its last commit (or before its first) ends here: say where to look
                "run": f"`gpucnr info {getattr(args, 'results', 'RESULTS')}` says what is committed; the same "
                       "command with --resume continues" if _exists(getattr(args, "results", None))
                       # NB: the results are created whole (`create_results`): none yet, nothing to resume
                       else "stopped before any result was written; run the same command again",
                "ingest": f"`gpucnr info {getattr(args, 'stack', 'STACK')}` says what was stored; the same command "
                          "with --resume continues an interrupted ingest" if _exists(getattr(args, "stack", None))
                          # NB: stopped while walking the folders: there is no stack to ask about
                          else "stopped before anything was stored; run the same command again"}.get(
                    args.command, f"`gpucnr {args.command}` stopped before it had written anything to continue "
                                  "from; run the same command again")
        print(f"gpucnr: interrupted ({name}): {console_text(done)}", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    except BrokenPipeError:
        # NB: the reader of stdout went away; Python would complain again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (MemoryError, OSError, RuntimeError) as e:
        coded = environment_error(e)  # NB: the machine's failure, coded; anything else is a bug and keeps its trace
        if coded is None:
            raise
        # NB: zarr's event loop reports its own failed tasks (with tracebacks) when they are collected: not here
        logging.getLogger("asyncio").disabled = True
        print(f"gpucnr: error {console_text(coded)}", file=sys.stderr)
        return coded.exit_code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm():
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) like Ctrl-C does; returns the handler it replaced (None
    outside the main thread, where Python cannot install one)."""
    def handler(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _said_run(args, ds, started: float) -> int:
    """`gpucnr run`'s summary and its exit status, from the results `ds` it returned."""
    import numpy as np

    from gpucnr.demo import summary_table

    # NB: the summary reads cnr_median and the committed flags, never the whole results (10^6 images x ids)
    print(summary_table(ds, title="gpucnr run"), flush=True)
    where = console_text(str(args.results))
    pasted = console_text(shlex.quote(str(args.results)))  # NB: in a command to paste, a path with spaces is quoted
    print(f"results in {where} ({time.perf_counter() - started:.1f} s); next: `gpucnr filter {pasted} --out "
          f"keep.csv`, `gpucnr report {pasted} REPORT_DIR`", flush=True)
    unmatched = len(ds.attrs.get("rois_unmatched", []))
    if unmatched:
        # NB: a --rois row naming no image is a problem (DESIGN §10), as at ingest; the warning listed them
        print(f"gpucnr: run completed with problems: {unmatched} --rois row(s) named no image of the stack "
              "[roi-no-image] (listed above); they were not measured", file=sys.stderr)
    failed = _failed_images(ds)
    if failed:
        print(f"gpucnr: run completed with problems: {failed} of {ds.sizes['image']} image(s) failed "
              f"({100.0 * failed / max(ds.sizes['image'], 1):.1f} %, status 6 'failed'); `gpucnr info "
              f"{args.results} --json` lists them with their reasons (failures); likely cause: damaged chunks "
              "of the stack, or images that kill the process measuring them", file=sys.stderr)
        return 3
    if unmatched:
        return 3
    valid = int(np.isfinite(ds["cnr_median"].to_numpy()).sum())
    if ds.sizes["image"] and not valid:
        # NB: a run with nothing measured is a near-total failure, not a success with one count line
        print(f"gpucnr: run completed with problems: none of the {ds.sizes['image']} image(s) has a valid ROI "
              f"(every image flagged); likely cause: no ROI reached the stack (masks empty at --mask-threshold, "
              f"no --rois rows for these images) or every ROI too small or outside its image: `gpucnr info "
              f"{args.stack}` shows the ROI ids, `gpucnr report` the statuses", file=sys.stderr)
        return 3
    return 0


def _failed_images(ds) -> int:
    """Images of a run with status 6 ("failed") in any ROI column, or listed among its failures."""
    from gpucnr.kernels.cnr import STATUS

    listed = {int(f["image"]) for f in ds.attrs.get("failures", [])}
    status = ds["status"].to_numpy()
    if status.ndim == 2 and status.shape[1]:
        listed.update(int(i) for i in ds["image"].to_numpy()[(status == STATUS["failed"]).any(axis=1)])
    return len(listed)


@contextlib.contextmanager
def _said_warnings():
    """gpucnr's own warnings of a command (`NoticeWarning`: an empty grouping column, a stack not found) as one
    `gpucnr: warning:` line each on stderr; any other warning is shown as Python would."""
    from gpucnr.errors import NoticeWarning

    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NoticeWarning)
            yield
    finally:
        said = set()
        for w in caught:
            if not issubclass(w.category, NoticeWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            elif str(w.message) not in said:
                said.add(str(w.message))
                print(f"gpucnr: warning: {console_text(str(w.message))}", file=sys.stderr)


def _dispatch(args) -> int:
    if args.command == "ingest":
        from gpucnr.sources import ingest

        _imported()
        summary = ingest(args.src, args.stack, masks=args.masks, mask_pattern=args.mask_pattern, seg=args.seg,
                         rois=args.rois, meta=args.meta, color=args.color, nonfinite=args.nonfinite,
                         key_file=args.key_file, workers=args.workers, max_image_mb=args.max_image_mb,
                         max_volume_mb=args.max_volume_mb, mask_threshold=args.mask_threshold,
                         follow_symlinks=args.follow_symlinks, progress=args.progress,
                         file_timeout=args.file_timeout, shard=args.shard, compressor=args.compressor,
                         resume=args.resume)
        args.completed = (f"the ingest was complete: `gpucnr info {args.stack}` shows what was stored (nothing to "
                          "resume)")
        print(summary.text(), flush=True)
        problems = summary.problems_text()
        if problems:
            print(problems, file=sys.stderr)
        for line in summary.warnings:
            # NB: not a problem of the inputs read (exit status unchanged), but what was not read must be said
            print(f"gpucnr: warning: {console_text(line)}", file=sys.stderr)
        if summary.images == 0:
            print(f"gpucnr: error [no-image] no image was stored, so no stack was kept; the skipped list "
                  f"{console_text(summary.skipped_list)} says why, file by file", file=sys.stderr)
            return 2
        return 3 if problems else 0
    if args.command == "demo":
        from gpucnr.demo import run_demo

        _, text = run_demo(args.n, args.size, out=args.out, backend=args.backend, seed=args.seed,
                           threshold=args.threshold)
        print(text)
    elif args.command == "run":
        from gpucnr.errors import OptionError
        from gpucnr.kernels.cnr import FORCED
        from gpucnr.pipeline import measure_into
        from gpucnr.results import open_results

        _imported()
        options = {k: getattr(args, k) for k in ("background", "footprint", "dilation", "border", "ring_gap",
                                                 "ring_width", "background_label", "min_bg", "ddof",
                                                 "definition", "gcnr_bins", "signed")}
        forced = FORCED.get(args.definition, {}).get("ddof")
        if args.ddof is not None and forced is not None and args.ddof != forced:
            # NB: the definition would replace it without a word (it reproduces a tool that uses its own ddof)
            raise OptionError(f"--definition {args.definition} measures with ddof {forced}, as the tool it reproduces; "
                              f"--ddof {args.ddof} cannot apply: leave it out")
        options["ddof"] = 1 if args.ddof is None else args.ddof
        if args.resume and not os.path.lexists(args.results):
            # NB: by design (a script may always pass --resume), but a typo in the path must not pass unseen
            print(f"gpucnr: warning: {console_text(str(args.results))} does not exist: --resume starts new results "
                  "there", file=sys.stderr)
        # NB: the keyword auto is the automatic regions; any other text (./auto too) is the path of a table
        auto = args.rois == "auto"
        if auto and args.roi_source is not None:
            print(f"gpucnr: error [bad-option] --rois auto measures the automatic regions only; --roi-source "
                  f"{args.roi_source} cannot be combined with it", file=sys.stderr)
            return 2
        started = time.perf_counter()
        path = measure_into(args.stack, args.results,
                            rois="auto" if auto else None if args.rois is None else Path(args.rois),
                            backend=args.backend, scheduler=args.scheduler, workers=args.workers, batch=args.batch,
                            resume=args.resume, progress=args.progress, group_columns=args.group_columns,
                            roi_source=args.roi_source or "auto", linkage=args.linkage, edge=args.edge, **options)
        # NB: from here on the run is complete: a signal while its results are opened and summarised must not say
        # that there is something to continue
        args.completed = (f"the run was complete: `gpucnr info {args.results}` shows its summary (nothing to "
                          "resume)")
        # NB: the summary reads a few small arrays of the results: read without Dask (its import and a graph per
        # variable cost ~0.3 s, more than the reads)
        return _said_run(args, open_results(path, dask=False), started)
    elif args.command == "report":
        from gpucnr.report import write_report

        with _said_warnings():
            path = write_report(args.results, args.out_dir, thresholds=args.thresholds, primary=args.primary,
                                by=args.by, stack=args.stack, lowest=args.lowest,
                                allow_incomplete=args.allow_incomplete, **({"rules": args.rule} if args.rule else {}))
        print(f"report: {path}")
        if args.open:
            import webbrowser

            if not webbrowser.open(path.resolve().as_uri()):
                print("gpucnr: warning: no web browser could be started here (--open): open the file above yourself",
                      file=sys.stderr)
    elif args.command == "filter":
        from gpucnr.manifests import manifest, manifest_inputs, units, with_paths, write_manifest

        # NB: manifest warns of its decisions itself (DecisionWarning: a rule dropping most, all or none, a majority
        # of flags); said once here, as a `gpucnr: warning:` line each, whatever the exit status (a decision is 0)
        with _said_warnings():
            table = manifest(args.results, threshold=args.threshold, level=args.level, rule=args.rule, by=args.by,
                             allow_incomplete=args.allow_incomplete)
        if args.with_paths:
            table = with_paths(table, args.results, args.stack)
        path = write_manifest(table, args.out, inputs=manifest_inputs(args.results, args.stack))
        counts = table["decision"].value_counts().to_dict()
        side = f" (provenance: {path.name}.json)" if path.suffix.lower() == ".csv" else ""
        print(f"{path}: {len(table)} {units(args.level)}: " + ", ".join(f"{k} {counts.get(k, 0)}"
                                                                   for k in ("keep", "drop", "flag")) + side)
        cut = [c for c in table.attrs.get("cuts", []) if c["dropped"]]
        # NB: a group the rule cannot cut (too small for the quantile, MAD 0) must not read as a clean group
        uncut = [c for c in table.attrs.get("cuts", []) if c["cut"] is None and c["units"]]
        if args.by or table.attrs["rule"].split(":")[0] != "abs":
            print(f"rule {table.attrs['rule']}: {len(table.attrs['cuts'])} group(s), {len(cut)} with a unit dropped"
                  + (f", {len(uncut)} with no cut (too few units or no spread: nothing there is judged)"
                     if uncut else "")
                  + f" (each group's cut: {path.name}{'.json' if path.suffix.lower() == '.csv' else ' metadata'})")
    elif args.command == "enhance":
        from gpucnr.enhancement import enhance
        from gpucnr.errors import OptionError

        # NB: each method has its own parameter: the other one given would be ignored without a word
        other = ("--sigma", "--size") if args.method == "median" else ("--size", "--sigma")
        if getattr(args, other[0].lstrip("-")) is not None:
            raise OptionError(f"{other[0]} is not a parameter of --method {args.method} (it takes {other[1]})")
        ds = enhance(args.results, args.out, threshold=args.threshold, method=args.method,
                     size=3 if args.size is None else args.size, sigma=1.0 if args.sigma is None else args.sigma,
                     stack=args.stack, backend=args.backend,
                     allow_incomplete=args.allow_incomplete, rule=args.rule, by=args.by)
        rule = ds.attrs["rule"]
        what = f"below {ds.attrs['threshold']:g}" if rule.startswith("abs:") else f"dropped by {rule}"
        if not ds.sizes["image"]:
            print(f"no image {what}: nothing was enhanced and nothing written to {args.out}")
            return 0
        print(f"{ds.sizes['image']} image(s) {what} enhanced ({args.method}) into "
              f"{args.out / 'enhanced.zarr'}, re-measured into {args.out / 'results.zarr'}")
        if ds.sizes["image"]:
            print(f"CNR before: median {float(ds.cnr_before.median()):.3f}; after: median "
                  f"{float(ds.cnr_after.median()):.3f}")
        print(ds.attrs.get("note", ""))
    elif args.command == "info":
        from gpucnr.info import describe

        report = describe(args.path, verify=args.verify)
        if report["kind"] == "unknown":
            # NB: nothing to describe is a refusal, said as every command's are (stderr, coded, exit 2); --json still
            # gives a script its object on stdout
            if args.json:
                print(json.dumps(report, indent=2, default=str))
            print(f"gpucnr: error [{report['code']}] {console_text(report['text'])}", file=sys.stderr)
            return 2
        print(json.dumps(report, indent=2, default=str) if args.json else report["text"])
        return int(report.get("exit_code", 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
