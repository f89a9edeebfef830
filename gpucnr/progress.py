"""One progress bar for `gpucnr ingest` and `gpucnr run` (tqdm): count, rate and time left, on stderr."""

from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    """A progress bar on stderr, in stages (ingest: "scan" then "decode" files; run: batches), or nothing at all.

    Parameters
    ----------
    on : bool
        Draw it (``--progress``); off, every method does nothing and tqdm is not imported.
    unit : str
        What is counted ("file", "batch"): the bar shows ``done/total``, the rate in units per second and
        the time left.
    """

    def __init__(self, on: bool, *, unit: str = "it"):
        self.on, self.unit, self._bar = on, unit, None

    def stage(self, name: str, total: int, done: int = 0) -> None:
        """Start a bar for `total` units, `done` of them already done (a resume); ends the previous one."""
        if not self.on:
            return
        from tqdm import tqdm

        self.done()
        # NB: the rate and the time left count from here: units done before (a resume) do not inflate the rate
        self._bar = tqdm(total=total, initial=done, desc=name, unit=self.unit, file=sys.stderr,
                         dynamic_ncols=True, mininterval=0.2, smoothing=0.1, leave=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def tick(self) -> None:
        self.update(1)

    def done(self) -> None:
        """End the bar (its line stays on the terminal)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
