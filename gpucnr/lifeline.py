"""Local worker processes end with the process that started them (a parent killed by SIGKILL cannot tell them)."""

from __future__ import annotations

import os
import threading
import time

__all__ = ["watch_parent"]

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
