"""Issue 13: the report at dataset scale (40 and 400 groups), rendered by headless Chromium at a 1,280-px viewport:
at most 25,000 CSS px tall, no element wider than the viewport, no console error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import gpucnr
from gpucnr.phantom import make_phantom
from gpucnr.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
         "--v=0", "--window-size=1280,1000", "--hide-scrollbars"]
#: Measured after load and written into the DOM, which --dump-dom prints (the report itself has no script).
PROBE = """<script>window.addEventListener("load", () => {
  const w = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > w + 1)
    .map(e => e.tagName + "." + (e.className || "") + ":" + Math.round(e.getBoundingClientRect().right));
  const out = {height: document.documentElement.scrollHeight, width: w, wide: wide.slice(0, 5)};
  document.body.setAttribute("data-probe", JSON.stringify(out));
});</script>"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """800 small phantom images with a site column of 40 or 400 values (some sites with several times the
    images of others), measured once."""
    root = tmp_path_factory.mktemp("scale")
    n = 800
    ph = make_phantom(n, (40, 40), lesions=1, radius=4, margin=4, cnr=(0.3, 4.0), seed=7)
    rng = np.random.default_rng(1)
    meta = pd.DataFrame({"site40": [f"site-{k:02d}" for k in rng.zipf(1.3, n) % 40],
                         "site400": [f"hospital-{k:03d}"
                                     for k in np.r_[np.arange(400), rng.integers(0, 400, n - 400)]]})
    stack = gpucnr.write_stack(root / "s.zarr", ph.images, rois=ph.rois, meta=meta, shard=100)
    gpucnr.run(stack, root / "r.zarr", backend="numpy", group_columns=["site40", "site400"])
    return root


def _render(report, tmp_path) -> tuple[dict, list[str]]:
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           probed.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, done.stdout[:500]
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line.upper()]
    return probe, console


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("column", ["site40", "site400"])
def test_report_reads_at_dataset_scale(measured, tmp_path, column):
    report = write_report(measured / "r.zarr", tmp_path / "rep", by=[column], lowest=12)
    text = report.read_text()
    # the box plot draws the largest groups (and outliers), the tables every group
    assert text.count("<img") == 1 + 1 + 12  # one distribution figure (one ROI per image), the box plot, gallery
    assert f"largest groups and outliers of {column[4:]} (the table below has every group)" in text
    assert "ROI-level CNR" not in text  # one ROI per image: the ROI level is not shown twice
    assert "lesion: " in text  # ROI names in the gallery's table
    probe, console = _render(report, tmp_path)
    print(column, probe)
    assert probe["width"] <= 1280
    assert probe["height"] <= 25_000, probe
    assert not probe["wide"], probe
    assert not console, console
