"""Every subcommand through bad invocations (issue 11): the exit code of DESIGN §10, one line starting
``gpucnr: error [``, never a traceback. Driven through `gpucnr.cli.main` in this process (a subprocess per case
would cost seconds each); one case goes through ``python -m gpucnr`` to check the real entry point."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from dicomfactory import write_raster

import gpucnr
from gpucnr.cli import main
from gpucnr.phantom import make_phantom


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ph = make_phantom(4, (40, 40), seed=1, margin=12, radius=5)
    gpucnr.write_stack(root / "stack.zarr", ph.images, rois=ph.rois, shard=2)
    gpucnr.run(root / "stack.zarr", root / "results.zarr", scheduler="synchronous")
    shutil.copytree(root / "stack.zarr", root / "short.zarr")
    group = zarr.open_group(str(root / "short.zarr"), mode="r+")
    valid = np.asarray(group["tables/images/valid_w"][:])
    del group["tables/images/valid_w"]
    group.create_array("tables/images/valid_w", data=valid[:-1], chunks=(len(valid) - 1,))
    (root / "plain").mkdir()
    (root / "file").write_text("x")
    src = root / "src"
    src.mkdir()
    write_raster(src / "a.png", np.arange(256, dtype=np.uint8).reshape(16, 16))
    (root / "big.csv").write_text("source,roi,kind,cx,cy,r\na.png,1,square,99999999999999999999,4,2\n")
    (root / "dangling.key").symlink_to(root / "nothing")
    return root


def cases(w: Path):
    """(argv, exit code, error code) of each bad invocation; `w` is the world's folder."""
    s, r = str(w / "stack.zarr"), str(w / "results.zarr")
    return [
        (["ingest", str(w / "missing"), str(w / "n1.zarr")], 2, "bad-input"),
        (["ingest", str(w / "src"), s], 2, "bad-input"),
        (["ingest", str(w / "src"), str(w / "n2.zarr"), "--rois", str(w / "big.csv")], 2, "roi-table"),
        (["ingest", str(w / "src"), str(w / "n3.zarr"), "--key-file", str(w / "dangling.key")], 2, "bad-input"),
        (["ingest", str(w / "src"), str(w / "n4.zarr"), "--rois", str(w / "n4.zarr.linkage.csv")], 2,
         "output-overlap"),
        (["run", str(w / "plain"), str(w / "r1.zarr")], 2, "stack-schema"),
        (["run", str(w / "forged\ngpucnr: error [fake] line"), str(w / "r0.zarr")], 2, "stack-schema"),
        (["run", s, f"{s}/r.zarr"], 2, "output-overlap"),
        (["run", s, str(w / "plain"), "--resume"], 2, "results-schema"),
        (["run", str(w / "short.zarr"), str(w / "r2.zarr")], 2, "stack-schema"),
        (["run", s, str(w / "r3.zarr"), "--rois", str(w / "missing.csv")], 2, "bad-input"),
        (["report", r, str(w / "file")], 2, "output-folder"),
        (["report", str(w / "plain"), str(w / "rep")], 2, "results-schema"),
        (["report", r, f"{r}/rep"], 2, "output-overlap"),
        (["filter", r, "--out", str(w / "missing" / "m.csv")], 2, "output-folder"),
        (["filter", r, "--out", str(w / "m.txt")], 2, "bad-input"),
        (["filter", r, "--out", f"{s}/m.csv"], 2, "output-overlap"),
        (["filter", r, "--out", f"{s}.linkage.csv"], 2, "output-overlap"),
        (["enhance", r, "--threshold", "99", "--out", s], 2, "output-overlap"),
        (["enhance", str(w / "plain"), "--out", str(w / "e")], 2, "results-schema"),
        # NB: each method's own parameter: the other one given would have been ignored without a word
        (["enhance", r, "--method", "gaussian", "--size", "5", "--out", str(w / "e1")], 2, "bad-option"),
        (["enhance", r, "--sigma", "2", "--out", str(w / "e2")], 2, "bad-option"),
        (["demo", "--out", str(w / "file"), "-n", "4", "--size", "64"], 2, "output-folder"),
        (["demo", "-n", "4", "--size", "40"], 2, "bad-option"),
        # NB: info of a path that is not there, or not gpucnr's, is a refusal like any other (a new user's walk)
        (["info", str(w / "missing")], 2, "not-found"),
        (["info", str(w / "file")], 2, "not-gpucnr"),
        (["info", str(w / "forged\ngpucnr: error [fake] line")], 2, "not-found"),
        # NB: info's exit codes for a damaged stack are settled by issue 12: no traceback here
        (["info", str(w / "short.zarr")], None, None),
    ]


def check(capsys, argv, status, code):
    got = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, (argv, captured.err)
    errors = [line for line in captured.err.splitlines() if line.startswith("gpucnr: error [")]
    if status is None:
        assert len(errors) <= 1, (argv, captured.err)
        return
    assert got == status, (argv, got, captured.err)
    assert len(errors) == 1 and errors[0].startswith(f"gpucnr: error [{code}]"), (argv, captured.err)
    assert len(captured.err.strip().splitlines()) == 1, (argv, captured.err)  # NB: control characters escaped


def test_every_subcommand_refuses_bad_invocations_with_a_coded_line(world, capsys):
    before = sorted(p.name for p in world.iterdir())
    for argv, status, code in cases(world):
        check(capsys, argv, status, code)
    after = sorted(p.name for p in world.iterdir())
    assert after == before, set(after) ^ set(before)


def test_environmental_failures_are_coded(world, capsys, monkeypatch, tmp_path):
    """MemoryError in the driver and "can't start new thread" (a small ulimit -v): exit 4, one coded line."""
    import gpucnr.pipeline

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(gpucnr.pipeline, "_execute", no_memory)
    check(capsys, ["run", str(world / "stack.zarr"), str(tmp_path / "a.zarr")], 4, "environment")
    monkeypatch.undo()

    def no_thread(*a, **k):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(ThreadPoolExecutor, "submit", no_thread)
    check(capsys, ["run", str(world / "stack.zarr"), str(tmp_path / "b.zarr"), "--scheduler", "threads"], 4,
          "environment")


def test_full_disk_keeps_the_stack_write_code(world, capsys, monkeypatch, tmp_path):
    """The first failure (the shard write: stack-write) is what the operator sees, even when writing the
    skipped-files list fails too on the full disk."""
    import gpucnr.sources.driver
    from gpucnr.store import StackWriter

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(StackWriter, "_write", full)
    monkeypatch.setattr(gpucnr.sources.driver, "write_file", full)
    # NB: a full disk is the environment's failure after partial work: exit 4 (DESIGN §10), --resume continues
    check(capsys, ["ingest", str(world / "src"), str(tmp_path / "s.zarr"), "--workers", "1"], 4, "stack-write")


def test_the_real_entry_point(world, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpucnr", "run", str(world / "plain"), str(tmp_path / "r.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("gpucnr: error [stack-schema]"), proc.stderr
