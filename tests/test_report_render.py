"""The HTML report rendered once by headless Chromium (Debian's `chromium`, which .ci/run installs): it must load
offline, build the expected DOM and log no console error."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import gpucnr
from gpucnr.phantom import make_phantom
from gpucnr.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
         "--v=0"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_renders_offline_without_console_errors(tmp_path):
    ph = make_phantom(10, (64, 64), lesions=1, radius=6, margin=8, seed=2)
    stack = gpucnr.write_stack(tmp_path / "s.zarr", ph.images, rois=ph.rois, shard=4)
    gpucnr.run(stack, tmp_path / "r.zarr", backend="numpy")
    report = write_report(tmp_path / "r.zarr", tmp_path / "rep", lowest=4)
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           report.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    for section in ("summary", "distribution", "groups", "thresholds", "lowest", "parameters"):
        assert f'id="{section}"' in dom, section
    # NB: one ROI per image: one distribution figure (issue 13: the ROI level is the image level), the box plot
    assert dom.count("<img") == report.read_text().count("<img") >= 4 + 2
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line.upper()]
    assert not console, console
