"""Local worker processes end with the process that started them (a parent killed by SIGKILL cannot tell them), and
never see the terminal's Ctrl-C, which is the driver's to handle."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from multiprocessing.context import SpawnContext, SpawnProcess

__all__ = ["QUIET_SPAWN", "quiet_resource_tracker", "quiet_worker", "watch_parent"]

#: Seconds between two looks at the parent.
_PERIOD = 1.0


def watch_parent() -> None:
    """Start a daemon thread that ends this process as soon as its parent is gone (its parent id changes: the
    orphan is adopted by init or a subreaper). Used as the ``initializer`` of `gpucnr run`'s local process pool,
    whose workers would otherwise outlive a driver killed by SIGKILL, holding memory and GPU contexts; a Dask
    cluster's workers are the cluster's business and never get it."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(_PERIOD)
            if os.getppid() != parent:
                os._exit(1)  # NB: no cleanup to run: the driver that would read our results is gone

    threading.Thread(target=watch, name="gpucnr-parent-watch", daemon=True).start()


class _QuietSpawnProcess(SpawnProcess):
    """A spawned process born with SIGINT blocked.

    Ctrl-C goes to the terminal's whole process group. A worker still importing (spawn re-imports gpucnr, pandas,
    numba: seconds under load) would die of KeyboardInterrupt with a traceback on the user's terminal before its
    initializer could ignore SIGINT — and the pool, broken, made the driver's shutdown slow or stuck. The mask is
    inherited through fork and exec, so the child never receives SIGINT; the parent blocks it only while starting
    the child, and a Ctrl-C in that moment stays pending and reaches the driver right after (never lost).
    """

    def start(self):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _QuietSpawnContext(SpawnContext):
    Process = _QuietSpawnProcess


#: The multiprocessing context of gpucnr's local worker pools: spawn, workers deaf to Ctrl-C from birth.
QUIET_SPAWN = _QuietSpawnContext()


def quiet_worker() -> None:
    """In a worker of `QUIET_SPAWN`: ignore SIGINT for good, then unblock it (the driver stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def quiet_resource_tracker() -> None:
    """Call before a local pool's first queue: the resource tracker that multiprocessing starts then (with this
    interpreter's ``-W`` options) will not print its "leaked semaphore objects to clean up at shutdown" warning.
    Workers terminated when the run is interrupted leave it semaphores it then removes itself: the warning was noise
    under the driver's one line (DESIGN §10), and it names nothing the user can act on."""
    option = "ignore:resource_tracker:UserWarning"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)
