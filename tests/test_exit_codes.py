"""Loud partial success (issue 12): exit codes of DESIGN §10 and the problems block, driven as a user drives the
command line (a subprocess per command; the cases of a user's first day with real files: a mask pattern with a
typo, meta and ROI tables whose paths are relative to another folder, masks of the wrong size).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dicomfactory import write_raster
from signals import SLOWED, interrupt_when

import gpucnr
from gpucnr.phantom import make_phantom

SHAPE = (40, 48)


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpucnr", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _images(src: Path, n: int, *, masks: str | None = None, mask_shape=SHAPE) -> None:
    rng = np.random.default_rng(n)
    for i in range(n):
        img = rng.normal(120, 15, SHAPE)
        img[12:24, 14:30] += 40
        write_raster(src / f"case{i}.png", np.clip(img, 0, 255).astype(np.uint8))
        if masks:
            mask = np.zeros(mask_shape, np.uint8)
            mask[12:24, 14:30] = 255
            write_raster(src / masks.format(stem=f"case{i}"), mask)


def _nothing_beside(stack: Path) -> None:
    assert not stack.exists()
    for ext in (".key", ".linkage.csv", ".skipped.csv", ".journal"):
        assert not stack.with_name(stack.name + ext).exists(), ext


def test_ingest_exit_codes_and_problems_block(tmp_path):
    """A mask pattern matching no file is refused before anything is written (2); masks all refused, meta and ROI
    rows all unmatched: the stack is written, stdout has the counts, stderr the problems block (what, how many of
    how many, the percentage, the skipped list, a likely cause) and the status is 3; "mask files used" counts
    only masks that labelled an image; an ingest that stores no image exits 2; clean data exits 0 with nothing
    on stderr."""
    src = tmp_path / "src"
    _images(src, 4, masks="{stem}_mask.png", mask_shape=(30, 30))  # NB: resized masks: every one refused
    (tmp_path / "meta.csv").write_text("source,site\n" + "".join(f"data/src/case{i}.png,a\n" for i in range(4)))
    (tmp_path / "rois.csv").write_text("source,roi,kind,cx,cy,r\n/abs/case0.png,1,disk,20,18,4\n"
                                       "missing.png,1,disk,20,18,4\n")

    typo = tmp_path / "typo.zarr"
    proc = cli("ingest", src, typo, "--mask-pattern", "{stem}-mask.png", "--workers", 2)
    assert proc.returncode == 2, proc.stderr
    assert "matches no file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    _nothing_beside(typo)
    masks = tmp_path / "masks"
    masks.mkdir()
    proc = cli("ingest", src, typo, "--masks", masks, "--workers", 2)
    assert proc.returncode == 2 and "matches no file under --masks" in proc.stderr, proc.stderr
    _nothing_beside(typo)
    # NB: a pattern that matches every mask but pairs none with an image (it reads their stems as 'se0', ...)
    proc = cli("ingest", src, typo, "--mask-pattern", "ca{stem}_mask.png", "--workers", 2)
    assert proc.returncode == 2 and "matches 4 mask file(s)" in proc.stderr and "none of them" in proc.stderr, (
        proc.stderr)
    _nothing_beside(typo)

    stack = tmp_path / "stack.zarr"
    proc = cli("ingest", src, stack, "--mask-pattern", "{stem}_mask.png", "--meta", tmp_path / "meta.csv",
                  "--rois", tmp_path / "rois.csv", "--workers", 2)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "4 image(s) from 4 file(s)" in proc.stdout
    assert "mask files used: 0; images with neither a mask nor an ROI-table row: 4" in proc.stdout, proc.stdout
    err = proc.stderr
    assert "Traceback" not in err
    assert f"listed, with its reason, in {stack}.skipped.csv" in err, err
    assert "images whose mask or SEG was refused (stored unlabelled): 4 of 4 (100.0 %) [mask-shape 4]" in err, err
    assert ("meta table rows naming no file: 4 of 4 (100.0 %) [meta-no-image 4]; likely cause: the paths seem "
            "relative to the folder 2 level(s) above SRC_DIR: drop their first 2 folder(s)") in err, err
    assert "ROI table rows naming no stored image: 2 of 2 (100.0 %) [roi-no-image 2]" in err, err

    proc = cli("info", stack)
    assert proc.returncode == 0, proc.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    (empty / "cut.png").write_bytes((src / "case0.png").read_bytes()[:40])
    proc = cli("ingest", empty, tmp_path / "none.zarr", "--workers", 1)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "image files skipped: 1 of 2 (50.0 %) [bad-header 1]; likely cause: damaged" in proc.stderr, proc.stderr
    assert "[no-image] no image was stored" in proc.stderr

    clean = tmp_path / "clean"
    _images(clean, 2)
    (clean / "._case0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # NB: litter is never a problem
    proc = cli("ingest", clean, tmp_path / "clean.zarr", "--workers", 1)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

    proc = cli("info", tmp_path / "meta.csv")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("gpucnr: error [not-gpucnr] ") and "neither a gpucnr stack nor gpucnr results" in \
        proc.stderr, proc.stderr
    proc = cli("info", tmp_path / "no-such.zarr")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith(f"gpucnr: error [not-found] {tmp_path / 'no-such.zarr'} does not exist"), proc.stderr


def _children_of_mark(mark: str) -> list[int]:
    """Processes still alive whose environment carries `mark` (the workers of a command started with it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _interrupt_after(cmd: list, log: Path, tmp_path: Path, sig: int, *, batches: int = 1, slow: float = 0.0):
    """Start `gpucnr ...cmd`, send `sig` once `batches` batches are logged; (exit status, stderr, leftovers). With
    `slow`, each batch first sleeps that long (threads scheduler): work is left when the signal lands."""
    mark = f"gpucnr-test-{os.getpid()}-{sig}-{time.monotonic_ns()}"
    err = tmp_path / f"{sig}.stderr"
    start = [sys.executable, "-c", SLOWED, str(slow), "0"] if slow else [sys.executable, "-m", "gpucnr"]
    with open(err, "wb") as fh:  # NB: a file, not a pipe: a full pipe would stall the process we poll
        proc = subprocess.Popen([*start, *map(str, cmd)], stdout=subprocess.DEVNULL,
                                stderr=fh, env={**os.environ, "GPUCNR_BATCH_LOG": str(log), "GPUCNR_MARK": mark},
                                start_new_session=True)
    rc = interrupt_when(proc, lambda: log.exists() and log.read_text().count("\n") >= batches, sig, timeout=120,
                        what=err.read_text)
    time.sleep(0.5)
    return rc, err.read_text(), _children_of_mark(mark)


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory):
    """A stack of 160 phantom images in shards of 4: 40 batches, each slow enough to interrupt."""
    root = tmp_path_factory.mktemp("slow")
    ph = make_phantom(160, (96, 96), lesions=2, radius=6, seed=3)
    return gpucnr.write_stack(root / "stack.zarr", ph.images, rois=ph.rois, shard=4).path


@pytest.fixture(scope="module")
def slow_results(slow_stack, tmp_path_factory):
    """Complete results of `slow_stack` (read only by the tests that use them)."""
    results = tmp_path_factory.mktemp("slow-results") / "r.zarr"
    gpucnr.run(slow_stack, results, backend="numpy", workers=2, batch=4)
    return results


def test_run_interrupted_then_refused_then_resumed(slow_stack, tmp_path):
    """SIGINT, then SIGTERM, in `gpucnr run`: one line (what was done, the --resume command), no traceback, exit
    130 / 143, no worker process left; `filter`, `report` and `enhance` then refuse the incomplete results
    (``results-incomplete``, naming the --resume command) unless --allow-incomplete, which the manifest records;
    the run resumed completes them; a threshold that drops all the images is said on stderr."""
    results = tmp_path / "results.zarr"
    # NB: batches of one shard: the default (2^24 px) would make this stack one batch
    cmd = ["run", slow_stack, results, "--backend", "numpy", "--background", "ring", "--batch", "4"]
    rc, err, left = _interrupt_after([*cmd, "--scheduler", "processes", "--workers", 2], tmp_path / "a.log",
                                     tmp_path, signal.SIGINT)
    assert rc == 130 and not left, (rc, left, err)
    assert err.startswith("gpucnr: interrupted (SIGINT): ") and err.count("\n") == 1, err
    resume = f"gpucnr run {slow_stack} {results} --resume --background ring --batch 4i"
    assert f"of 40 batches are committed in {results}; continue with `{resume}`" in err, err
    rc, err, left = _interrupt_after([*cmd, "--resume", "--workers", 2], tmp_path / "b.log", tmp_path,
                                     signal.SIGTERM, batches=2, slow=0.2)
    assert rc == 143 and not left and err.startswith("gpucnr: interrupted (SIGTERM): "), (rc, left, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err

    for command in (["filter", results, "--out", tmp_path / "m.csv"], ["report", results, tmp_path / "rep"],
                    ["enhance", results, "--out", tmp_path / "enh"]):
        proc = cli(*command)
        assert proc.returncode == 2, proc.stderr
        assert "[results-incomplete]" in proc.stderr and f"`{resume}`" in proc.stderr, proc.stderr
        assert "--allow-incomplete" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "rep").exists() and not (tmp_path / "enh").exists()
    proc = cli("filter", results, "--out", tmp_path / "m.csv", "--allow-incomplete")
    assert proc.returncode == 0, proc.stderr
    table, meta = gpucnr.read_manifest(tmp_path / "m.csv")
    flagged = int((table["reason"] == "not-computed").sum())
    assert meta["allow_incomplete"] is True and meta["not_computed_images"] == flagged > 0, meta

    proc = cli(*shlex.split(resume)[1:])
    assert proc.returncode == 0, proc.stderr
    proc = cli("filter", results, "--out", tmp_path / "m.csv", "--threshold", 1e9)
    assert proc.returncode == 0, proc.stderr
    assert "drops all 160 image(s) it judged: nothing is left to train on" in proc.stderr, proc.stderr
    assert "docs/choosing.md" in proc.stderr, proc.stderr
    table, meta = gpucnr.read_manifest(tmp_path / "m.csv")
    assert meta["allow_incomplete"] is False and meta["not_computed_images"] == 0


def test_ctrl_c_while_the_workers_start_is_one_line(slow_stack, tmp_path):
    """Ctrl-C as soon as the pool's worker processes exist (still importing: seconds under load): no worker's
    KeyboardInterrupt traceback, no leaked-semaphore warning, exit 130 with one line, no worker left. The workers
    are born with SIGINT blocked and are terminated, not waited for."""
    mark = f"gpucnr-test-{os.getpid()}-start-{time.monotonic_ns()}"
    err = tmp_path / "start.stderr"
    cmd = ["run", slow_stack, tmp_path / "r.zarr", "--backend", "numpy", "--batch", "4", "--scheduler", "processes",
           "--workers", "2"]
    with open(err, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gpucnr", *map(str, cmd)], stdout=subprocess.DEVNULL,
                                stderr=fh, env={**os.environ, "GPUCNR_MARK": mark}, start_new_session=True)
    # NB: the resource tracker and the workers carry the mark besides the driver; 0.5 s later the workers are
    # importing (Python's own handlers installed), where a Ctrl-C used to raise KeyboardInterrupt in them
    started = []

    def importing():
        if not started and len(_children_of_mark(mark)) >= 4:
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 0.5

    rc = interrupt_when(proc, importing, signal.SIGINT, timeout=120, what=err.read_text)
    time.sleep(0.5)
    text = err.read_text()
    assert rc == 130 and text.startswith("gpucnr: interrupted (SIGINT): ") and text.count("\n") == 1, (rc, text)
    assert not _children_of_mark(mark)


def test_broken_pipe_is_quiet(slow_stack):
    """`gpucnr info X | head`: the reader goes away; no traceback, no "Exception ignored", status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "gpucnr", "info", slow_stack, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # NB: before the command writes: its first write meets a closed pipe
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_run_with_failed_images_exits_3(tmp_path):
    """An image whose chunk fails its checksum gets status 6; the run completes, says how many of how many
    images failed and where they are listed, and exits 3."""
    ph = make_phantom(8, (64, 64), lesions=1, radius=5, seed=5)
    stack = gpucnr.write_stack(tmp_path / "s.zarr", ph.images, rois=ph.rois, shard=4).path
    shard = next((stack / "buckets").rglob("images/c/0/0/0"))
    data = bytearray(shard.read_bytes())
    offset, nbytes = np.frombuffer(bytes(data[-(16 * 4 + 4):-4]), "<u8").reshape(4, 2)[1]
    data[int(offset + nbytes // 2)] ^= 0xFF  # NB: image 1 fails its crc32c
    shard.write_bytes(bytes(data))
    proc = cli("run", stack, tmp_path / "r.zarr", "--backend", "numpy", "--workers", 1)
    assert proc.returncode == 3, proc.stderr
    assert "run completed with problems: 1 of 8 image(s) failed (12.5 %, status 6 'failed')" in proc.stderr
    assert f"gpucnr info {tmp_path / 'r.zarr'} --json" in proc.stderr and "Traceback" not in proc.stderr


def test_enhance_interrupted_removes_its_partial_outputs(slow_results, tmp_path):
    """SIGTERM while enhance re-measures: exit 143, one line, and neither half-written output is left behind
    (the same command then starts afresh)."""
    results = slow_results
    out = tmp_path / "enh"
    rc, err, left = _interrupt_after(["enhance", results, "--threshold", 1e9, "--out", out, "--backend", "numpy"],
                                     tmp_path / "e.log", tmp_path, signal.SIGTERM, slow=0.2)
    assert rc == 143 and not left, (rc, err, left)
    assert err.startswith("gpucnr: interrupted (SIGTERM): 160 image(s) were being enhanced") and err.count("\n") == 1
    assert not (out / "enhanced.zarr").exists() and not (out / "results.zarr").exists()


def test_report_interrupted_writes_nothing(slow_results, tmp_path, monkeypatch, capsys):
    """SIGTERM (its handler raises `Terminated`) while the report is being drawn: one line, exit 143, no
    report.html (not half of one). In-process: a report has no step to wait for from outside."""
    from gpucnr import report
    from gpucnr.cli import main
    from gpucnr.errors import Terminated

    results = slow_results

    def stop(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(report, "_lowest_section", stop)
    assert main(["report", str(results), str(tmp_path / "rep")]) == 143
    err = capsys.readouterr().err
    assert err == ("gpucnr: interrupted (SIGTERM): no report was written (report.html is written whole, at the "
                   "end); run the same command again\n"), err
    assert not list(tmp_path.glob("rep/report.html*"))


def test_likely_cause_of_unmatched_table_paths():
    """The problems block's cause for --meta / --rois rows that name no file, read from the paths themselves
    (never quoting one): absolute or climbing out, a folder too many or too few, another case."""
    import pandas as pd

    from gpucnr.sources.driver import _path_hint
    from gpucnr.sources.rois import _safe_source

    sources = {"benign/a.png", "benign/b.png", "malignant/c.png"}

    def hint(paths):
        return _path_hint(pd.DataFrame({"_key": [_safe_source(p) for p in paths]}), sources)

    assert "absolute paths or paths with '..'" in hint(["/data/benign/a.png", "../x/b.png"])
    assert "1 level(s) above SRC_DIR" in hint(["busi/benign/a.png", "busi/benign/b.png", "busi/malignant/c.png"])
    assert "a folder inside SRC_DIR" in hint(["a.png", "b.png", "c.png"])
    assert "upper / lower case" in hint(["Benign/A.png", "benign/B.png"])
    assert hint(["benign/a.png", "benign/b.png", "gone.png"]) is None  # NB: most rows match: each row's own reason


def test_ctrl_c_after_the_work_is_done_says_nothing_is_left(tmp_path, monkeypatch, capsys):
    """Ctrl-C while a completed ingest prints its summary: exit 130, and the one line says the stack is complete
    (no `--resume` to suggest: a resume of a complete stack is refused). In-process, the signal stood for by a
    KeyboardInterrupt raised from the summary's text."""
    from gpucnr.cli import main
    from gpucnr.sources.driver import IngestSummary

    src = tmp_path / "src"
    _images(src, 2)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(IngestSummary, "text", interrupted)
    stack = tmp_path / "s.zarr"
    assert main(["ingest", str(src), str(stack)]) == 130
    err = capsys.readouterr().err
    assert err == (f"gpucnr: interrupted (SIGINT): the ingest was complete: `gpucnr info {stack}` shows what was "
                   "stored (nothing to resume)\n"), err
    assert gpucnr.open_stack(stack).n_images == 2


def test_ctrl_c_while_the_command_imports_is_one_line():
    """SIGINT while `gpucnr` still imports its modules (a fraction of a second; more under load): one line, exit
    130, no traceback. The signal is stood for by an import hook that raises KeyboardInterrupt when gpucnr.cli is
    imported, in a fresh Python running the command's entry point."""
    code = ("import sys\n"
            "class Stop:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'gpucnr.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Stop())\n"
            "from gpucnr.__main__ import main\n"
            "sys.exit(main())\n")
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "gpucnr: interrupted (SIGINT) while starting: nothing was done; run the same command again\n"


def test_ctrl_c_while_the_options_are_parsed_is_one_line(monkeypatch, capsys):
    """SIGINT while the command line is parsed (before any command runs): the same one line and exit 130 as while
    importing, no traceback. The signal is stood for by a KeyboardInterrupt raised from the parser."""
    import argparse

    from gpucnr.cli import main

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    assert main(["info", "x.zarr"]) == 130
    assert capsys.readouterr().err == ("gpucnr: interrupted (SIGINT) while starting: nothing was done; run the same "
                                       "command again\n")
