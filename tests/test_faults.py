"""Fault injection (issue 3, "Faults"): kill -9 of `gpucnr run` then --resume, Dask workers dying, disk full.

Every test compares against a clean, uninterrupted run of the same stack, bit for bit (NaN == NaN). CPU only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from signals import SLOWED

import gpucnr
from gpucnr.kernels import STATUS
from gpucnr.phantom import make_phantom

PY = sys.executable
SHARD = 8
WAIT_S = 180  # generous ceiling for anything we poll or wait on (a hang fails the test instead of the job)


# --- data ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A two-bucket stack (203 images 128x128 + 197 images 150x128, shard 8: 51 batches, one results chunk
    shared by the last batch of the first bucket and the first of the second) and a clean run of it."""
    root = tmp_path_factory.mktemp("fault-data")
    a = make_phantom(203, (128, 128), lesions=2, radius=6, seed=11)
    b = make_phantom(197, (150, 128), lesions=2, radius=6, seed=12)
    images = [*a.images, *b.images]
    rois = pd.concat([a.rois, b.rois.assign(image=b.rois["image"] + len(a.images))], ignore_index=True)
    stack = gpucnr.write_stack(root / "stack.zarr", images, rois=rois, shard=SHARD)
    assert [bk.size for bk in stack.buckets] == [203, 197]
    # NB: batches of one shard (the default, 2^24 px, would be two batches)
    ref = gpucnr.run(stack.path, root / "reference.zarr", scheduler="synchronous", backend="numpy",
                     batch=8).load()
    n_batches = int(ref.sizes["batch"])
    assert n_batches == 51 and ref["committed"].values.all()
    assert not ref.attrs["failures"] and not (ref["status"].values == STATUS["failed"]).any()
    return {"stack": stack.path, "ref": ref, "n_batches": n_batches, "root": root}


def _assert_same(ds, ref, *, rows=None, ignore=(), what="results"):
    """Every variable and coordinate of `ref` (but `ignore`) equal in `ds` bit for bit (NaN == NaN); `rows` (a
    boolean mask over ``image``) restricts the image axis; attrs equal except the stack's relative path."""
    assert sorted(ds.variables) == sorted(ref.variables), what
    bad = []
    for name in ref.variables:
        if name in ignore:
            continue
        a, b = np.asarray(ds[name].values), np.asarray(ref[name].values)
        if rows is not None and ds[name].dims and ds[name].dims[0] == "image":
            a, b = a[rows], b[rows]
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"{name}: {a.dtype}{a.shape} != {b.dtype}{b.shape}")
        elif not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            where = np.argwhere(~((a == b) | ((a != a) & (b != b)))) if a.dtype.kind in "fc" else np.argwhere(a != b)
            bad.append(f"{name}: {len(where)} cells differ, first at {where[:3].tolist()}")
    assert not bad, f"{what} differ from a clean run: " + "; ".join(bad)
    if rows is None:
        strip = {"stack_path"}
        assert {k: v for k, v in ds.attrs.items() if k not in strip} == \
            {k: v for k, v in ref.attrs.items() if k not in strip}, what


def _lines(log: Path) -> list[int]:
    """Batch indices the driver logged (complete lines only: the driver may be mid-write)."""
    if not log.exists():
        return []
    text = log.read_text()
    return [int(x) for x in text[: text.rfind("\n") + 1].split()]


def _committed(results: Path) -> np.ndarray:
    return np.flatnonzero(np.asarray(zarr.open_group(str(results), mode="r")["committed"][:]))


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait(timeout=WAIT_S)


# --- 1. kill -9 of `gpucnr run`, then --resume -------------------------------------------------------------
@pytest.mark.parametrize(
    ("point", "scheduler", "resume_scheduler"),
    [
        ("first", ["--scheduler", "synchronous"], ["--scheduler", "synchronous"]),
        # after batch 25, the last of the first bucket: its results chunk also holds rows of batch 26
        ("middle", ["--scheduler", "threads", "--workers", "1"], ["--scheduler", "threads", "--workers", "2"]),
        ("last-but-one", ["--scheduler", "synchronous"], ["--scheduler", "threads", "--workers", "1"]),
    ],
)
def test_kill9_then_resume(data, tmp_path, point, scheduler, resume_scheduler):
    n = data["n_batches"]
    after = {"first": 1, "middle": 26, "last-but-one": n - 1}[point]  # batches written when the kill comes
    results = tmp_path / "results.zarr"
    log1, log2 = tmp_path / "killed.log", tmp_path / "resumed.log"
    args = ["run", str(data["stack"]), str(results), "--backend", "numpy", "--batch", "8"]
    cmd = [PY, "-m", "gpucnr", *args]
    proc = None
    err = tmp_path / "killed.stderr"
    try:
        with open(err, "wb") as fh:  # a file, not a pipe: a full pipe would stall the run we poll
            # NB: batches from `after` on stall in the killed run: the background rewrites take every batch
            # finished since the last one, so without the stall the last two could be committed together and the
            # kill would find nothing to interrupt
            proc = subprocess.Popen([PY, "-c", SLOWED, "600", str(after), *args, *scheduler],
                                    env={**os.environ, "GPUCNR_BATCH_LOG": str(log1)},
                                    stdout=subprocess.DEVNULL, stderr=fh)
        deadline = time.monotonic() + WAIT_S
        while len(_lines(log1)) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert proc.poll() is None, f"gpucnr run ended (rc {proc.returncode}) before {after} batches were written:" \
            f"\n{err.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL
    finally:
        _stop(proc)
    before = set(_committed(results).tolist())
    logged = _lines(log1)
    assert len(logged) >= after and set(logged) <= before, (logged, sorted(before))
    assert len(before) < n, "the kill came after the last batch was committed: nothing was interrupted"

    done = subprocess.run([*cmd, "--resume", *resume_scheduler], env={**os.environ, "GPUCNR_BATCH_LOG": str(log2)},
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _lines(log2)
    assert len(resumed) == len(set(resumed)), f"a batch was written twice by the resumed run: {resumed}"
    assert not set(resumed) & before, f"committed batches computed again: {sorted(set(resumed) & before)}"
    assert set(resumed) | before == set(range(n)), f"never written: {sorted(set(range(n)) - set(resumed) - before)}"
    _assert_same(gpucnr.open_results(results).load(), data["ref"], what=f"kill -9 after {after} batches + resume")


# --- 2 and 3. Dask distributed: workers dying -----------------------------------------------------------------
def _measure_patch(*, delay: float = 0.0, poison: int | None = None):
    """A WorkerPlugin that wraps gpucnr.pipeline.measure_spec in each worker process (restarted ones too):
    sleep `delay` first; a spec holding global image `poison` kills its process (os._exit).

    Defined inside a function so that cloudpickle ships it by value (workers cannot import this test module).
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class MeasurePatch(WorkerPlugin):
        name = "gpucnr-fault-measure-patch"

        def setup(self, worker):
            import gpucnr.pipeline as pipeline

            original = getattr(pipeline, "_fault_original_measure_spec", pipeline.measure_spec)
            pipeline._fault_original_measure_spec = original

            def measure_spec(spec):
                if poison is not None and spec.global_start <= poison < spec.global_start + spec.stop - spec.start:
                    os._exit(1)
                if delay:
                    time.sleep(delay)
                return original(spec)

            pipeline.measure_spec = measure_spec

    return MeasurePatch()


class _Cluster:
    """LocalCluster(2 worker processes x 1 thread) + Client, closed whatever happens."""

    def __enter__(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                    silence_logs=logging.CRITICAL)
        try:
            self.client = Client(self.cluster)
        except BaseException:
            self.cluster.close()
            raise
        return self.client

    def __exit__(self, *exc):
        try:
            self.client.close()
        finally:
            self.cluster.close()


def test_worker_killed_mid_run(data, tmp_path, monkeypatch):
    log = tmp_path / "batches.log"
    monkeypatch.setenv("GPUCNR_BATCH_LOG", str(log))
    state: dict = {}
    stop = threading.Event()

    def killer(pid: int, after: int):
        deadline = time.monotonic() + WAIT_S
        while not stop.is_set() and time.monotonic() < deadline:
            written = len(_lines(log))
            if written >= after:
                state["written"] = written
                os.kill(pid, signal.SIGKILL)
                state["killed"] = pid
                return
            time.sleep(0.002)

    with _Cluster() as client:
        client.register_plugin(_measure_patch(delay=0.1))
        pids = client.run(os.getpid)
        assert len(pids) == 2
        victim = sorted(pids.values())[0]
        thread = threading.Thread(target=killer, args=(victim, 3), daemon=True)
        thread.start()
        try:
            ds = gpucnr.run(data["stack"], tmp_path / "results.zarr", client=client, backend="numpy",
                            batch=8).load()
        finally:
            stop.set()
            thread.join(timeout=WAIT_S)
        after = client.run(os.getpid)
    assert state.get("killed") == victim, "the worker was never killed"
    assert state["written"] < data["n_batches"], "the worker was killed after the run had written everything"
    assert victim not in after.values(), "the killed worker is still there"
    assert ds["committed"].values.all()
    _assert_same(ds, data["ref"], what="a run that lost a worker")


def test_poison_image_kills_every_worker(data, tmp_path):
    import dask

    poison = 8 * 10 + 3  # global image 83, inside batch 10
    ref = data["ref"]
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), _Cluster() as client:
        client.register_plugin(_measure_patch(poison=poison))
        ds = gpucnr.run(data["stack"], tmp_path / "results.zarr", client=client, backend="numpy", batch=8).load()
    assert ds["committed"].values.all()
    status = ds["status"].values
    assert (status[poison] == STATUS["failed"]).all(), f"image {poison} has status {status[poison]}"
    failed_images = sorted({int(i) for i in np.flatnonzero((status == STATUS["failed"]).any(axis=1))})
    listed = sorted({int(f["image"]) for f in ds.attrs["failures"]})
    assert failed_images == [poison], f"images with status 6: {failed_images} (only {poison} kills its worker)"
    assert listed == [poison], f"attrs failures: {ds.attrs['failures']}"
    keep = np.arange(ref.sizes["image"]) != poison
    _assert_same(ds, ref, rows=keep, what="images other than the poisoned one")


# --- 4. disk full while writing results ------------------------------------------------------------------------
_FULL_DISK = r"""
import json, resource, signal, sys
import gpucnr

stack, results, rois, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    gpucnr.run(stack, results, rois=rois, scheduler="synchronous", backend="numpy", batch=8)
except Exception as e:
    chain = []
    while e is not None and len(chain) < 10:
        chain.append({"type": type(e).__name__, "message": str(e), "errno": getattr(e, "errno", None)})
        e = e.__cause__ or e.__context__
    print(json.dumps(chain))
    sys.exit(3)
print("completed")
"""


def test_disk_full_then_resume(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk. The first `k` batches have short ROI names, later ones long random
    names, so the limit lets the template and `k` batches through and the first rewrite of the ``roi_name`` shard
    that holds a long name fails with EFBIG.

    Results format 2 (issue 9) keeps all 64 rows of a variable in one shard file, rewritten whole: the limit is
    the largest file of the clean run but that shard, and the batches committed before the failure are a prefix
    of the first `k` (every one of them, as long as small shards are committed batch by batch)."""
    n, k = 64, 3
    ph = make_phantom(n, (64, 64), lesions=1, radius=4, seed=5)
    stack = gpucnr.write_stack(tmp_path / "stack.zarr", ph.images, shard=SHARD).path
    rng = np.random.default_rng(0)
    # NB: letters only: a name with six digits in a row would be blanked (issue 11's screening of ROI names)
    letters = str.maketrans("0123456789", "ghijklmnop")
    names = ["a"] * (k * SHARD) + [rng.bytes(1500).hex().translate(letters) for _ in range(n - k * SHARD)]
    rois_csv = tmp_path / "rois.csv"
    ph.rois.assign(name=names).to_csv(rois_csv, index=False)
    clean = tmp_path / "clean.zarr"
    ref = gpucnr.run(stack, clean, rois=rois_csv, scheduler="synchronous", backend="numpy", batch=SHARD).load()
    assert ref["committed"].values.all()

    sizes = {f.relative_to(clean).as_posix(): f.stat().st_size for f in clean.rglob("*") if f.is_file()}
    names_shard = sizes.pop("roi_name/c/0/0")
    limit = max(sizes.values())
    assert names_shard > limit, "the test's data no longer makes the long names' shard the largest file"
    results = tmp_path / "results.zarr"
    proc = subprocess.run([PY, "-c", _FULL_DISK, str(stack), str(results), str(rois_csv), str(limit)],
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 3, f"expected the run to fail (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    chain = json.loads(proc.stdout.strip().splitlines()[-1])
    text = " | ".join(f"{c['type']}: {c['message']}" for c in chain)
    assert any(c["errno"] == 27 for c in chain) or "too large" in text.lower() or "space" in text.lower(), \
        f"the error does not say that writing failed: {text}"
    assert chain[0]["type"] == "ResultsError" and "[results-write]" in chain[0]["message"], text
    assert str(results) in chain[0]["message"] and "--resume" in chain[0]["message"], text

    committed = _committed(results)
    assert committed.tolist() == list(range(len(committed))) and len(committed) <= k, \
        f"committed before the failure: {committed.tolist()}"
    ds = gpucnr.open_results(results)
    starts, stops = ds["batch_start"].values, ds["batch_stop"].values
    rows = np.zeros(n, bool)
    for b in committed:
        rows[starts[b]:stops[b]] = True
    part = ds.isel(image=np.flatnonzero(rows)).load()
    _assert_same(part, ref.isel(image=np.flatnonzero(rows)), ignore=("committed", "batch_backend"),
                 what="batches committed before the disk filled")

    again = gpucnr.run(stack, results, rois=rois_csv, scheduler="synchronous", backend="numpy", resume=True).load()
    assert again["committed"].values.all()
    _assert_same(again, ref, what="results resumed after the disk filled")
