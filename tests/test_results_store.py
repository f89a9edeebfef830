"""Results you can believe after any fault (issue 9): results format 2 (sharded, checksummed, checked on every open,
repaired by --resume), fingerprint version 2 (pixels and labels through the recorded chunk checksums), and failures
of the environment kept apart from failures of the data (retried, then exit 4, never an image's status).

The red team's cases, each against a clean run of the same stack (bit for bit, NaN == NaN).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

import gpucnr
from gpucnr import shardfiles
from gpucnr.cli import main
from gpucnr.kernels import STATUS
from gpucnr.phantom import make_phantom
from gpucnr.results import ResultsError, verify_results

PY = sys.executable
SHARD = 8
N = 48  # 6 batches
WAIT_S = 180


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("results-store")
    ph = make_phantom(N, (96, 96), lesions=2, radius=5, seed=21)
    stack = gpucnr.write_stack(root / "stack.zarr", ph.images, labels=ph.labels, shard=SHARD)
    # NB: batches of one shard (the default, 2^24 px, would be one batch): the damage tests need several
    ref = gpucnr.run(stack.path, root / "clean.zarr", scheduler="synchronous", backend="numpy", batch=SHARD).load()
    assert ref["committed"].values.all() and ref.sizes["batch"] == N // SHARD
    return {"stack": stack.path, "clean": root / "clean.zarr", "ref": ref}


def _copy(data, tmp_path) -> Path:
    results = tmp_path / "results.zarr"
    shutil.copytree(data["clean"], results)
    # NB: the copy sits beside another folder than the stack: give it the stack's path relative to its folder
    group = zarr.open_group(str(results), mode="r+")
    group.attrs["stack_path"] = os.path.relpath(data["stack"], tmp_path)
    return results


def _same(ds, ref, *, what="results"):
    for name in ref.variables:
        a, b = np.asarray(ds[name].values), np.asarray(ref[name].values)
        equal = np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        assert equal, f"{what}: {name} differs from a clean run"


def _shard(results: Path, name: str) -> Path:
    files = sorted(p for p in (results / name / "c").rglob("*") if p.is_file())
    assert len(files) == 1, files  # 48 images: one shard file per variable
    return files[0]


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _resume(data, results, **kw):
    return gpucnr.run(data["stack"], results, resume=True, scheduler="synchronous", backend="numpy", **kw).load()


def _refused_everywhere(results: Path, capsys, *words):
    """open_results and every command that reads results refuse them with the coded results-damaged; info
    lists the damage and exits 3."""
    for dask in (True, False):
        with pytest.raises(ResultsError) as err:
            gpucnr.open_results(results, dask=dask)
        assert err.value.code == "results-damaged", str(err.value)
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    out = results.parent / "out"
    for argv in (["filter", str(results), "--out", str(out / "m.csv")], ["report", str(results), str(out / "r")],
                 ["enhance", str(results), "--out", str(out / "e")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.startswith("gpucnr: error [results-damaged]"), argv
    for fn in (gpucnr.summarize, lambda r: gpucnr.manifest(r, threshold=1.5)):
        with pytest.raises(ResultsError, match="results-damaged"):
            fn(results)
    capsys.readouterr()
    assert main(["info", str(results)]) == 3
    assert "DAMAGED" in capsys.readouterr().out


def test_results_opened_without_dask_hold_the_same_values(data):
    """``dask=False`` (what `gpucnr run`'s summary reads): no variable is a Dask array, every value is the same."""
    ds = gpucnr.open_results(data["clean"], dask=False)
    assert all(v.chunks is None for v in ds.variables.values())
    assert not any(type(v.data).__module__.startswith("dask") for v in ds.variables.values())
    _same(ds, data["ref"], what="results opened without Dask")
    assert ds.attrs == data["ref"].attrs
    assert all(gpucnr.open_results(data["clean"])[name].chunks is not None for name in ("cnr", "status"))


# --- damaged results: refused, listed, recomputed -------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnr", "cnr_median", "status", "roi_name"])
def test_a_flipped_bit_in_a_results_chunk(data, tmp_path, capsys, name):
    """One flipped bit turned a CNR of 2.87 into 189093.89 in format 1: now every read refuses it, naming the
    array and the batch, and --resume recomputes exactly the damaged batches."""
    results = _copy(data, tmp_path)
    _flip(_shard(results, name), 3)  # inside the first inner chunk: every batch's rows
    _refused_everywhere(results, capsys, name, "batch")
    report = verify_results(results)
    assert report["damaged_batches"] == list(range(N // SHARD))
    _same(_resume(data, results), data["ref"], what=f"{name} flipped, then --resume")


@pytest.mark.parametrize("name", ["cnr", "cnr_median", "committed"])
def test_a_deleted_results_shard(data, tmp_path, capsys, name):
    """A deleted chunk read as NaN with status ok while info said complete (format 1)."""
    results = _copy(data, tmp_path)
    _shard(results, name).unlink()
    _refused_everywhere(results, capsys, name, "missing")
    _same(_resume(data, results), data["ref"], what=f"{name} deleted, then --resume")


def test_a_committed_batch_reset_to_the_template(data, tmp_path, capsys):
    """Rows of a committed batch rewritten as NaN / -1 through zarr (valid checksums): never read as results."""
    results = _copy(data, tmp_path)
    group = zarr.open_group(str(results), mode="r+")
    for name in ("n_roi", "n_bg", "status", "n_valid", "n_excluded"):
        group[name][16:24] = -1
    for name in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr", "cnr_median"):
        group[name][16:24] = np.nan
    _refused_everywhere(results, capsys, "batch 2")
    assert verify_results(results)["damaged_batches"] == [2]
    _same(_resume(data, results), data["ref"], what="a reset batch, then --resume")


def test_verify_decodes_what_the_checksums_cannot_prove(data, tmp_path, capsys):
    """A checksum-valid stream of the wrong size, and rows that contradict each other: info passes them (it checks
    indexes and checksums), info --verify lists them, --resume recomputes them."""
    results = _copy(data, tmp_path)
    zarr.open_group(str(results), mode="r+")["cnr"][8:9] = np.nan  # batch 1: status ok with no CNR
    capsys.readouterr()
    assert main(["info", str(results)]) == 0
    assert main(["info", str(results), "--verify"]) == 3
    out = capsys.readouterr().out
    assert "DAMAGED: 1 batch(es) 1;" in out and "contradict" in out
    _same(_resume(data, results), data["ref"], what="contradicting rows, then --resume")

    var = _shard(results, "n_valid")
    import numcodecs

    short = shardfiles.with_crc(numcodecs.Zstd(level=3).encode(np.zeros(3, "<i8").tobytes()))
    var.write_bytes(b"".join(shardfiles.assemble([short] + [None] * 31)))
    assert main(["info", str(results)]) == 0
    assert main(["info", str(results), "--verify"]) == 3
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "n_valid" in out and "decodes to 24 bytes" in out
    _same(_resume(data, results), data["ref"], what="a wrong-size stream, then --resume")


def test_resume_removes_leftover_temporary_files_and_readers_ignore_them(data, tmp_path):
    results = _copy(data, tmp_path)
    leftover = _shard(results, "cnr").with_name("0." + "f" * 32 + shardfiles.TEMP_SUFFIX)
    leftover.write_bytes(b"half a shard")
    _same(gpucnr.open_results(results).load(), data["ref"], what="results beside a leftover temporary file")
    _resume(data, results)
    assert not leftover.exists()


def test_results_make_a_few_files_whatever_the_image_count(tmp_path):
    """~0.2 files per image in format 1; now one shard file per variable up to ~2^21 rows."""
    counts = []
    for n in (16, 640):
        ph = make_phantom(n, (64, 64), lesions=1, radius=3, seed=1)
        stack = gpucnr.write_stack(tmp_path / f"s{n}.zarr", ph.images, labels=ph.labels, shard=8)
        gpucnr.run(stack, tmp_path / f"r{n}.zarr", backend="numpy", batch=SHARD)
        counts.append(sum(1 for p in (tmp_path / f"r{n}.zarr").rglob("*") if p.is_file()))
    assert counts[0] == counts[1], counts


def test_format_1_results_stay_readable_and_resume_says_rerun(data, tmp_path):
    old = tmp_path / "old.zarr"
    ds = data["ref"].copy()
    for v in ds.variables.values():
        v.encoding = {}
    ds.attrs["gpucnr_results"] = 1
    ds.to_zarr(old, consolidated=False)
    back = gpucnr.open_results(old).load()
    np.testing.assert_array_equal(back["cnr"].values, data["ref"]["cnr"].values)
    with pytest.raises(ResultsError) as err:
        gpucnr.run(data["stack"], old, resume=True, backend="numpy")
    assert err.value.code == "resume-format" and "rerun" in str(err.value)


def test_a_version_1_fingerprint_is_refused_by_resume(data, tmp_path):
    results = _copy(data, tmp_path)
    zarr.open_group(str(results), mode="r+").attrs["stack_fingerprint_version"] = 1
    with pytest.raises(ResultsError) as err:
        _resume(data, results)
    assert err.value.code == "resume-mismatch" and "version-1" in str(err.value)


# --- fingerprint version 2: the re-ingested PNG ----------------------------------------------------------------
def test_resume_refuses_a_reingested_png_naming_the_bucket(tmp_path):
    """A corrected PNG re-ingested under the same name kept its stale CNR (2.906 kept, 0.049 true) in format 1."""
    src = tmp_path / "src"
    src.mkdir()
    ph = make_phantom(6, (64, 64), lesions=1, radius=5, seed=4)
    for k, image in enumerate(ph.images):
        Image.fromarray(image.astype(np.uint16)).save(src / f"img{k}.png")
        Image.fromarray((ph.labels[k] > 0).astype(np.uint8) * 255).save(src / f"img{k}_mask.png")
    stack = tmp_path / "stack.zarr"
    gpucnr.ingest(src, stack, mask_pattern="{stem}_mask.png", workers=1)
    results = tmp_path / "results.zarr"
    gpucnr.run(stack, results, backend="numpy", scheduler="synchronous", batch=SHARD)
    corrected = ph.images[3].astype(np.uint16)
    corrected[10:20, 10:20] += 500
    Image.fromarray(corrected).save(src / "img3.png")
    shutil.rmtree(stack)
    for side in tmp_path.glob("stack.zarr.*"):
        if side.suffix != ".key":
            side.unlink()
    gpucnr.ingest(src, stack, mask_pattern="{stem}_mask.png", workers=1, key_file=tmp_path / "stack.zarr.key")
    with pytest.raises(ResultsError) as err:
        gpucnr.run(stack, results, resume=True, backend="numpy")
    assert err.value.code == "resume-mismatch"
    assert "64x64-uint16" in str(err.value), str(err.value)


# --- environmental failures: retried, then exit 4, never an image's status -----------------------------------
def test_a_decoder_memory_error_stops_the_run_with_exit_4_and_resume_completes_it(data, tmp_path, monkeypatch,
                                                                                 capsys):
    """Out of memory inside the decoder was recorded as corrupt-chunk on an intact stack (format 1)."""
    from gpucnr import store

    def failing_read(self, s, lo, hi, out, expected=None):
        # every read of images 24..31 (batch 3) runs out of memory inside the decoder, whichever thread asks
        if lo >= 24 and hi <= 32 and self.name.endswith("/images"):
            raise MemoryError()
        return real_read(self, s, lo, hi, out, expected)

    real_read = store._ShardReader._read_shard
    monkeypatch.setattr(store._ShardReader, "_read_shard", failing_read)
    results = tmp_path / "results.zarr"
    capsys.readouterr()
    code = main(["run", str(data["stack"]), str(results), "--backend", "numpy", "--scheduler", "threads",
                 "--workers", "2", "--batch", str(SHARD)])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "[run-environment]" in err and "MemoryError" in err and "--resume" in err
    group = zarr.open_group(str(results), mode="r")
    committed = np.asarray(group["committed"][:])
    assert committed[3] == 0
    assert (np.asarray(group["status"][24:32]) == -1).all(), "an environmental failure became a status"
    assert not group.attrs["failures"]
    monkeypatch.undo()
    _same(_resume(data, results), data["ref"], what="a MemoryError stop, then --resume")


def test_a_dask_worker_in_another_folder_measures_the_same_stack(data, tmp_path, monkeypatch):
    """Workers started in another folder got a relative stack path: 300 images status 6, exit 0 (format 1)."""
    from distributed import Client, LocalCluster

    monkeypatch.chdir(data["stack"].parent)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.CRITICAL)
    try:
        with Client(cluster) as client:
            client.run(os.chdir, str(elsewhere))
            assert set(client.run(os.getcwd).values()) == {str(elsewhere)}
            ds = gpucnr.run(Path(data["stack"].name), tmp_path / "results.zarr", client=client,
                            backend="numpy", batch=SHARD).load()
    finally:
        cluster.close()
    assert not (ds["status"].values == STATUS["failed"]).any()
    _same(ds, data["ref"], what="a run on a worker in another folder")


# --- kill -9 during a shard rewrite ---------------------------------------------------------------------------
_SLOW_PUBLISH = r"""
import sys, time
from pathlib import Path
import gpucnr
from gpucnr import shardfiles

stack, results, marker, nth = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
real = shardfiles.publish
calls = [0]

def publish(tmp, path):
    calls[0] += 1
    if calls[0] == nth:
        marker.write_text(str(tmp))
        time.sleep(600)  # killed here: the temporary file is written, the shard not yet replaced
    return real(tmp, path)

shardfiles.publish = publish
# NB: batches after the first take 0.5 s: the background rewrites take every batch finished since the last one, and
# this test needs batch 0 alone in the first rewrite and batch 1 alone in the second
import gpucnr.pipeline as pipeline
measure = pipeline.measure_spec

def slowed(spec):
    if spec.index >= 1:
        time.sleep(0.5)
    return measure(spec)

pipeline.measure_spec = slowed
gpucnr.run(stack, results, scheduler="synchronous", backend="numpy", batch=8)
"""


def test_kill9_during_a_shard_rewrite_then_resume(data, tmp_path):
    results = tmp_path / "results.zarr"
    marker = tmp_path / "marker"
    # the template and then each batch publish 12 row shards and 2 batch arrays: call 34 is a row shard of batch 1
    proc = subprocess.Popen([PY, "-c", _SLOW_PUBLISH, str(data["stack"]), str(results), str(marker), "34"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_S
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), "the run never reached the shard rewrite"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert Path(marker.read_text()).exists(), "the killed rewrite left no temporary file"
    before = np.asarray(zarr.open_group(str(results), mode="r")["committed"][:])
    assert before.tolist() == [1, 0, 0, 0, 0, 0]
    ds = gpucnr.open_results(results)  # what was committed reads back, the leftover is ignored
    assert ds["committed"].values.sum() == before.sum()
    done = subprocess.run([PY, "-m", "gpucnr", "run", str(data["stack"]), str(results), "--resume", "--backend",
                           "numpy"], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(results.rglob(f"*{shardfiles.TEMP_SUFFIX}"))
    _same(gpucnr.open_results(results).load(), data["ref"], what="kill -9 during a shard rewrite, then --resume")


def test_buffered_background_commits_give_the_same_results(data, tmp_path, monkeypatch):
    """Results are rewritten in a background thread, several batches a time when they come faster than the
    rewrites: the results, the commit log and the committed flags are those of a clean run."""
    log = tmp_path / "batches.log"
    monkeypatch.setenv("GPUCNR_BATCH_LOG", str(log))
    ds = gpucnr.run(data["stack"], tmp_path / "results.zarr", scheduler="threads", workers=2, backend="numpy",
                    batch=SHARD).load()
    _same(ds, data["ref"], what="background commits")
    assert sorted(int(v) for v in log.read_text().split()) == list(range(N // SHARD))


def test_a_resume_clears_the_flags_of_damaged_batches_on_disk_before_rewriting_rows(data, tmp_path, monkeypatch):
    """Review finding: the first rewrite fills a damaged chunk; a resume cut off right after it must not leave the
    chunk's other batches committed over fill values."""
    from gpucnr import results as results_module

    results = _copy(data, tmp_path)
    _flip(_shard(results, "cnr"), 3)
    real = results_module.ResultsWriter._batch_jobs

    def no_flags(self, name, values, batches):
        if name == "committed":
            raise OSError(28, "No space left on device")
        return real(self, name, values, batches)

    monkeypatch.setattr(results_module.ResultsWriter, "_batch_jobs", no_flags)
    with pytest.raises(ResultsError, match="results-write"):
        _resume(data, results)
    monkeypatch.undo()
    flags = np.asarray(zarr.open_group(str(results), mode="r")["committed"][:])
    assert not flags.any(), f"batches left committed over rewritten rows: {flags}"
    _same(_resume(data, results), data["ref"], what="a resume cut off, then resumed again")


def test_damage_met_while_writing_next_to_committed_rows_stops_the_run(data, tmp_path, monkeypatch):
    """Review finding: a chunk found damaged during a run is never filled over rows of committed batches."""
    from gpucnr import results as results_module

    results = _copy(data, tmp_path)
    group = zarr.open_group(str(results), mode="r+")
    flags = np.asarray(group["committed"][:])
    flags[-1] = 0
    group["committed"][:] = flags  # the last batch to do; its rows share the (only) cnr chunk with the others
    _flip(_shard(results, "cnr"), 3)
    monkeypatch.setattr(results_module, "verify_results", lambda path, decode=False: {
        "committed": flags, "backends": np.zeros_like(flags), "damaged": [], "damaged_batches": []})
    import gpucnr.pipeline as pipeline

    monkeypatch.setattr(pipeline, "verify_results", results_module.verify_results)
    with pytest.raises(ResultsError, match="results-damaged"):
        gpucnr.run(data["stack"], results, resume=True, scheduler="synchronous", backend="numpy")
