"""Faults injected into gpucnr's worker processes without a hook in gpucnr: a sitecustomize module first on the
children's PYTHONPATH (each worker is a fresh interpreter, which imports it at start)."""

from __future__ import annotations

import os
from pathlib import Path


def sitecustomize(tmp_path: Path, monkeypatch, source: str) -> Path:
    """Put a sitecustomize.py holding `source` first on PYTHONPATH for the processes this test starts; returns its
    folder."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return site
