"""Outputs (issue 11): nothing is written inside what a command reads, side files never follow a planted symbolic
link nor keep a stale mode, local workers die with their driver, and report labels are drawn literally."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicomfactory import write_raster

import gpucnr
from gpucnr.outputs import OutputError
from gpucnr.phantom import make_phantom
from gpucnr.report import write_report
from gpucnr.sources.driver import sidecar_paths


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A stack (with a `$` in a group column) and its results."""
    root = tmp_path_factory.mktemp("outputs")
    ph = make_phantom(6, (40, 40), seed=2, margin=12, radius=5)
    meta = pd.DataFrame({"site": ["a$b", "$x_{$", "a$b", "c", "c", "$x_{$"]})
    stack = gpucnr.write_stack(root / "stack.zarr", ph.images, labels=ph.labels, meta=meta, shard=3)
    gpucnr.run(stack, root / "results.zarr", scheduler="synchronous", group_columns=["site"])
    return root


def tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def refused(call, code="output-overlap"):
    with pytest.raises(gpucnr.GpucnrError) as info:
        call()
    assert info.value.code == code, str(info.value)
    return info.value


def test_run_enhance_report_filter_never_write_inside_their_inputs(made, tmp_path):
    stack, results = made / "stack.zarr", made / "results.zarr"
    before = tree(stack), tree(results)
    refused(lambda: gpucnr.run(stack, stack / "r.zarr"))
    refused(lambda: gpucnr.run(stack, made / "stack.zarr/../stack.zarr"))
    link = tmp_path / "link"
    link.symlink_to(stack)
    refused(lambda: gpucnr.run(stack, link / "r.zarr"))  # NB: real paths are compared
    (tmp_path / "dangling.zarr").symlink_to(tmp_path / "elsewhere")
    refused(lambda: gpucnr.run(stack, tmp_path / "dangling.zarr"))
    assert not (tmp_path / "elsewhere").exists()
    from gpucnr.enhancement import enhance

    other = gpucnr.write_stack(tmp_path / "other.zarr", [np.ones((8, 8), np.uint16)])
    refused(lambda: gpucnr.run(stack, other.path / "r.zarr"))  # NB: inside any gpucnr store, read or not
    from gpucnr.demo import run_demo

    refused(lambda: run_demo(4, 64, out=stack / "demo"))
    refused(lambda: enhance(results, stack, threshold=99))
    refused(lambda: enhance(results, results / "x", threshold=99))
    refused(lambda: write_report(results, results / "rep"))
    refused(lambda: write_report(results, stack))
    from gpucnr.manifests import manifest_inputs, write_manifest

    table = gpucnr.manifest(results, threshold=1.5)
    refused(lambda: write_manifest(table, stack / "m.csv", inputs=manifest_inputs(results)))
    refused(lambda: write_manifest(table, sidecar_paths(stack)["linkage"], inputs=manifest_inputs(results)))
    refused(lambda: write_manifest(table, tmp_path / "nowhere" / "m.csv"), "output-folder")
    (tmp_path / "file").write_text("x")
    refused(lambda: write_report(results, tmp_path / "file"), "output-folder")
    assert (tree(stack), tree(results)) == before


def test_run_resume_into_a_plain_folder_is_refused(made, tmp_path):
    (tmp_path / "plain").mkdir()
    refused(lambda: gpucnr.run(made / "stack.zarr", tmp_path / "plain", resume=True), "results-schema")
    assert os.listdir(tmp_path / "plain") == []


def test_report_draws_dollar_labels_literally(made, tmp_path):
    path = write_report(made / "results.zarr", tmp_path / "rep", by=["site"], lowest=2)
    text = path.read_text()
    assert "$x_{$" in text


def _planted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_raster(src / "a.png", np.arange(64 * 40, dtype=np.uint16).reshape(64, 40) % 251)
    stack = tmp_path / "s.zarr"
    side = sidecar_paths(stack)
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    side["skipped"].symlink_to(outside)
    side["linkage"].write_text("stale")
    os.chmod(side["linkage"], 0o644)
    side["key"].write_text("ab" * 32 + "\n")  # NB: a reused key left readable by others
    os.chmod(side["key"], 0o644)
    return src, stack, side, outside


def test_side_files_replace_planted_links_and_stale_modes(tmp_path):
    src, stack, side, outside = _planted(tmp_path)
    gpucnr.ingest(src, stack, workers=1, rois=None)
    assert outside.read_text() == "precious"
    for k in ("key", "linkage", "skipped"):
        st = os.lstat(side[k])
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (k, oct(st.st_mode))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_ingest_refusals_before_writing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_raster(src / "a.png", np.zeros((8, 8), np.uint8))
    key = tmp_path / "k.key"
    key.symlink_to(tmp_path / "nothing")
    err = refused(lambda: gpucnr.ingest(src, tmp_path / "s.zarr", key_file=key, workers=1), "bad-input")
    assert "symbolic link" in str(err)
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "s.zarr").exists()
    rois = sidecar_paths(tmp_path / "t.zarr")["linkage"]
    rois.write_text("source,roi,kind,cx,cy,r\na.png,1,square,4,4,2\n")
    refused(lambda: gpucnr.ingest(src, tmp_path / "t.zarr", rois=rois, workers=1))
    (tmp_path / "dangling.zarr").symlink_to(tmp_path / "elsewhere")
    refused(lambda: gpucnr.ingest(src, tmp_path / "dangling.zarr", workers=1), "bad-input")
    assert not (tmp_path / "elsewhere").exists()


def test_a_stack_inside_src_is_not_walked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_raster(src / "a.png", np.arange(100, dtype=np.uint8).reshape(10, 10))
    summary = gpucnr.ingest(src, src / "s.zarr", workers=1)
    assert summary.files_in == 1 and summary.stored == 1


def test_pool_workers_die_with_a_killed_driver(tmp_path):
    """A `--scheduler processes` worker watches its parent: kill -9 of the driver, and the worker exits too."""
    psutil = pytest.importorskip("psutil")
    script = textwrap.dedent("""
        import multiprocessing, os, sys, time
        from concurrent.futures import ProcessPoolExecutor
        from gpucnr.lifeline import watch_parent
        if __name__ == "__main__":
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=watch_parent)
            print(pool.submit(os.getpid).result(), flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = psutil.Process(int(proc.stdout.readline()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        if alive:
            worker.kill()
        assert not alive, "the pool worker outlived its killed driver"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_output_error_is_coded():
    assert issubclass(OutputError, gpucnr.GpucnrError)
