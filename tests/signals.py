"""Interrupting a `gpucnr` subprocess as a terminal does (shared by the exit-code and ingest-resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

#: `gpucnr ARGS...` as `python -c SLOWED DELAY FROM ARGS...`: every batch of index FROM or more sleeps DELAY s before it
#: is measured (threads and synchronous schedulers: the patch lives in this process). Results are rewritten in the
#: background, every batch finished meanwhile at once, so a fast run can be complete by the time a test's signal
#: lands: the tests that need work left to interrupt slow their batches down.
SLOWED = ("import sys, time\n"
          "import gpucnr.pipeline as pipeline\n"
          "real, delay, start = pipeline.measure_spec, float(sys.argv.pop(1)), int(sys.argv.pop(1))\n"
          "def slowed(spec):\n"
          "    if spec.index >= start:\n"
          "        time.sleep(delay)\n"
          "    return real(spec)\n"
          "pipeline.measure_spec = slowed\n"
          "from gpucnr.__main__ import main\n"
          "sys.exit(main())\n")


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
