"""`IsolatedPool.imap(..., parts=True)`: a streamed result's items reach the caller as they come (issue 14).

The tasks live in a small module written for the test and put on the children's PYTHONPATH: each streams `n`
items of `size` bytes, one per message, and may sleep first or kill its process after some items.
"""

from __future__ import annotations

import os

import pytest

from gpucnr.sources.workers import IsolatedPool, Part, TaskFailure

STREAMER = '''
import os
import time

from gpucnr.sources import workers


def run(n, size, die_at=-1, sleep=0.0):
    time.sleep(sleep)
    workers._PART_BYTES = 1  # NB: one item per message

    def prepare(k):
        if k == die_at:
            os._exit(3)
        return bytes([k]) * size

    return workers.Streamed({"items": list(range(n)), "n": n}, "items", len, prepare)
'''


@pytest.fixture
def streamer(tmp_path, monkeypatch) -> str:
    (tmp_path / "streamer_task.py").write_text(STREAMER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return "streamer_task:run"


def _by_task(events) -> list[tuple[list, object]]:
    """[(items of the task's parts, its result)] from imap's flat sequence."""
    out, items = [], []
    for e in events:
        if isinstance(e, Part):
            items += e.items
        else:
            out.append((items, e))
            items = []
    assert not items, "parts after the last result"
    return out


def test_parts_come_in_task_order_and_a_crash_ends_its_task(streamer):
    with IsolatedPool(streamer, workers=2, timeout=60) as pool:
        tasks = _by_task(pool.imap([(3, 10), (4, 10, 2), (2, 10)], parts=True))
        gathered = list(pool.imap([(3, 10)]))
    (a, head_a), (b, fail_b), (c, head_c) = tasks
    assert a == [bytes([k]) * 10 for k in range(3)] and head_a == {"items": [], "n": 3}
    assert isinstance(fail_b, TaskFailure) and fail_b.code == "decoder-crash"
    assert b == [bytes([k]) * 10 for k in range(len(b))] and len(b) <= 2  # NB: the caller undoes these
    assert c == [bytes([k]) * 10 for k in range(2)] and head_c == {"items": [], "n": 2}
    assert gathered == [{"items": [bytes([k]) * 10 for k in range(3)], "n": 3}]  # NB: without parts, as before


def test_parts_of_later_tasks_wait_within_the_budget(streamer):
    """While the first task sleeps, a later one streams 60 items of 10 kB: the pool reads no more of them than
    the part budget (its worker waits on its socket, and is not timed out for it), then passes them all on."""
    with IsolatedPool(streamer, workers=2, timeout=60) as pool:
        # NB: the first child queues tasks 0 and 1, the second task 2
        tasks = _by_task(pool.imap([(1, 10, -1, 2.0), (1, 10), (60, 10_000)], parts=True, part_budget=30_000))
        peak = pool.peak_part_bytes
    assert tasks[2][0] == [bytes([k]) * 10_000 for k in range(60)]
    assert 30_000 <= peak <= 30_000 + 2 * 11_000, peak
