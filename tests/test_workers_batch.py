"""Several files per worker message (issue 18): one round trip for a batch of small tasks, and a crash or an overrun
inside a batch still pinned to its one task (its batch is tried again, one task per message); raster duplicates told
by a cheap key first, by the SHA-256 of all their bytes only where cheap keys agree.

The pool's tasks live in a small module written for the test and put on the children's PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import gpucnr
from gpucnr.sources import driver, raster
from gpucnr.sources.workers import IsolatedPool, TaskFailure

TASKS = '''
import os
import signal
import time


def run(x, action=""):
    if action == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "hang":
        time.sleep(60)
    if action == "fail":
        raise ValueError("a reader error")
    return {"x": x, "pid": os.getpid()}
'''


@pytest.fixture
def tasks_target(tmp_path, monkeypatch) -> str:
    (tmp_path / "batch_task.py").write_text(TASKS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return "batch_task:run"


def test_a_batch_runs_in_one_child_and_keeps_the_task_order(tasks_target):
    with IsolatedPool(tasks_target, workers=2, timeout=60) as pool:
        out = list(pool.imap([(k,) for k in range(40)], batch=8))
        alone = list(pool.imap([(k,) for k in range(5)]))
    assert [o["x"] for o in out] == list(range(40))
    # NB: the first 8 tasks went in one message to one child
    assert len({o["pid"] for o in out[:8]}) == 1
    assert [o["x"] for o in alone] == list(range(5))


def test_a_crash_inside_a_batch_is_pinned_to_its_task(tasks_target):
    tasks = [(k, "crash" if k == 5 else "fail" if k == 9 else "") for k in range(20)]
    with IsolatedPool(tasks_target, workers=2, timeout=60) as pool:
        out = list(pool.imap(tasks, batch=8))
    assert isinstance(out[5], TaskFailure) and out[5].code == "decoder-crash", out[5]
    assert str(-11) in out[5].reason
    assert isinstance(out[9], TaskFailure) and out[9].code == "decode-error"
    assert [o["x"] for k, o in enumerate(out) if k not in (5, 9)] == [k for k in range(20) if k not in (5, 9)]


def test_an_overrun_inside_a_batch_is_pinned_to_its_task(tasks_target):
    tasks = [(k, "hang" if k == 2 else "") for k in range(6)]
    with IsolatedPool(tasks_target, workers=1, timeout=2) as pool:
        out = list(pool.imap(tasks, batch=4))
    assert isinstance(out[2], TaskFailure) and out[2].code == "decode-timeout", out[2]
    assert [o["x"] for k, o in enumerate(out) if k != 2] == [0, 1, 3, 4, 5]


def test_tasks_not_batchable_go_alone(tasks_target):
    with IsolatedPool(tasks_target, workers=1, timeout=60) as pool:
        out = list(pool.imap([(k, "crash" if k == 1 else "") for k in range(4)], batch=4,
                             batchable=[True, False, True, True]))
    # NB: the crashing task was alone in its message: no retry was needed to pin it
    assert isinstance(out[1], TaskFailure) and out[1].code == "decoder-crash"
    assert [o["x"] for k, o in enumerate(out) if k != 1] == [0, 2, 3]


def _tiff(path, pixels) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path, format="TIFF")


def test_raster_duplicates_by_probe_then_by_all_bytes(tmp_path, monkeypatch):
    """Byte-identical rasters are duplicates; a file with the same size and the same sampled blocks (the cheap
    key) but one other byte is not; only files whose cheap keys agree are hashed whole."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    base = rng.integers(0, 4000, (256, 256)).astype(np.uint16)
    _tiff(src / "a.tif", base)
    shutil.copy(src / "a.tif", src / "b.tif")
    data = bytearray((src / "a.tif").read_bytes())
    size = len(data)
    sampled = {(size - raster._PROBE_BLOCK) * k // (raster._PROBE_BLOCKS - 1) for k in range(raster._PROBE_BLOCKS)}
    spot = next(p for p in range(size // 3, size) if all(not (o <= p < o + raster._PROBE_BLOCK) for o in sampled))
    data[spot] ^= 0xFF
    (src / "c.tif").write_bytes(bytes(data))
    assert raster.probe(src / "c.tif", size) == raster.probe(src / "a.tif", size)
    _tiff(src / "d.tif", base[::-1].copy())  # NB: its own cheap key: never hashed whole
    hashed = []
    original = driver.IsolatedPool.imap

    def spy(self, tasks, **kw):
        tasks = list(tasks)
        hashed.extend(os.path.basename(t[1]) for t in tasks if t[0] == "hash_file")
        return original(self, tasks, **kw)

    monkeypatch.setattr(driver.IsolatedPool, "imap", spy)
    summary = gpucnr.ingest(src, tmp_path / "stack.zarr", workers=2)
    assert (summary.files_in, summary.stored, summary.duplicates) == (4, 3, 1)
    dup = summary.problems[summary.problems["code"] == "duplicate"]
    assert list(dup["source"]) == ["b.tif"] and "a.tif" in dup["reason"].iloc[0]
    assert sorted(hashed) == ["a.tif", "b.tif", "c.tif"]


def test_a_reply_that_cannot_be_packed_is_its_tasks_failure_not_the_childs():
    from multiprocessing.connection import Pipe

    from gpucnr.sources import workers

    ours, theirs = Pipe()
    try:
        # NB: packed after the task (replies wait for their spool writes): a reply that cannot be pickled becomes
        # the failure of that task, as a failure inside it would, and the next reply goes as usual
        workers._write(theirs, workers._packed(workers, ("ok", lambda: 0)))
        workers._write(theirs, workers._packed(workers, ("ok", {"n": 1})))
        assert workers.receive(ours) == ("skip", "decode-error", "the reader failed (AttributeError while sending)")
        assert workers.receive(ours) == ("ok", {"n": 1})
    finally:
        ours.close()
        theirs.close()
