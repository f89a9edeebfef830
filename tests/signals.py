"""Interrupting a `gpucnr` subprocess as a terminal does (shared by the exit-code and ingest-resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def interrupt_when(proc: subprocess.Popen, ready, sig: int, *, timeout: float, what) -> int:
    """Poll `ready()` until it holds (or `timeout` s), then send `sig` as a terminal would — Ctrl-C to the whole
    foreground process group, SIGTERM to the driver — and return the exit status. Fails with `what()` (the
    process's stderr) when it ended before it could be interrupted; kills it whatever happens."""
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                break
            time.sleep(0.001)
        assert proc.poll() is None, f"ended before it could be interrupted:\n{what()}"
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
