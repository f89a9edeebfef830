"""Loud partial success (issue 12): exit codes of DESIGN §10 and the problems block, driven as a user drives the
command line (a subprocess per command; the cases of a user's first day with real files: a mask pattern with a
typo, meta and ROI tables whose paths are relative to another folder, masks of the wrong size).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from dicomfactory import write_raster

SHAPE = (40, 48)


def gpucnr(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpucnr", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _images(src: Path, n: int, *, masks: str | None = None, mask_shape=SHAPE) -> None:
    rng = np.random.default_rng(n)
    for i in range(n):
        img = rng.normal(120, 15, SHAPE)
        img[12:24, 14:30] += 40
        write_raster(src / f"case{i}.png", np.clip(img, 0, 255).astype(np.uint8))
        if masks:
            mask = np.zeros(mask_shape, np.uint8)
            mask[12:24, 14:30] = 255
            write_raster(src / masks.format(stem=f"case{i}"), mask)


def _nothing_beside(stack: Path) -> None:
    assert not stack.exists()
    for ext in (".key", ".linkage.csv", ".skipped.csv", ".journal"):
        assert not stack.with_name(stack.name + ext).exists(), ext


def test_ingest_exit_codes_and_problems_block(tmp_path):
    """A mask pattern matching no file is refused before anything is written (2); masks all refused, meta and ROI
    rows all unmatched: the stack is written, stdout has the counts, stderr the problems block (what, how many of
    how many, the percentage, the skipped list, a likely cause) and the status is 3; "mask files used" counts
    only masks that labelled an image; an ingest that stores no image exits 2; clean data exits 0 with nothing
    on stderr."""
    src = tmp_path / "src"
    _images(src, 4, masks="{stem}_mask.png", mask_shape=(30, 30))  # NB: resized masks: every one refused
    (tmp_path / "meta.csv").write_text("source,site\n" + "".join(f"data/src/case{i}.png,a\n" for i in range(4)))
    (tmp_path / "rois.csv").write_text("source,roi,kind,cx,cy,r\n/abs/case0.png,1,disk,20,18,4\n"
                                       "missing.png,1,disk,20,18,4\n")

    typo = tmp_path / "typo.zarr"
    proc = gpucnr("ingest", src, typo, "--mask-pattern", "{stem}-mask.png", "--workers", 2)
    assert proc.returncode == 2, proc.stderr
    assert "matches no file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    _nothing_beside(typo)
    masks = tmp_path / "masks"
    masks.mkdir()
    proc = gpucnr("ingest", src, typo, "--masks", masks, "--workers", 2)
    assert proc.returncode == 2 and "matches no file under --masks" in proc.stderr, proc.stderr
    _nothing_beside(typo)

    stack = tmp_path / "stack.zarr"
    proc = gpucnr("ingest", src, stack, "--mask-pattern", "{stem}_mask.png", "--meta", tmp_path / "meta.csv",
                  "--rois", tmp_path / "rois.csv", "--workers", 2)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "4 image(s) from 4 file(s)" in proc.stdout
    assert "mask files used: 0; images without labels: 4" in proc.stdout, proc.stdout
    err = proc.stderr
    assert "Traceback" not in err
    assert f"listed, with its reason, in {stack}.skipped.csv" in err, err
    assert "images whose mask or SEG was refused (stored unlabelled): 4 of 4 (100.0 %) [mask-shape 4]" in err, err
    assert "meta table rows naming no file: 4 of 4 (100.0 %) [meta-no-image 4]; likely cause: the source" in err
    assert "ROI table rows naming no stored image: 2 of 2 (100.0 %) [roi-no-image 2]" in err, err

    proc = gpucnr("info", stack)
    assert proc.returncode == 0, proc.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    (empty / "cut.png").write_bytes((src / "case0.png").read_bytes()[:40])
    proc = gpucnr("ingest", empty, tmp_path / "none.zarr", "--workers", 1)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "image files skipped: 1 of 2 (50.0 %) [bad-header 1]; likely cause: damaged" in proc.stderr, proc.stderr
    assert "[no-image] no image was stored" in proc.stderr

    clean = tmp_path / "clean"
    _images(clean, 2)
    (clean / "._case0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # NB: litter is never a problem
    proc = gpucnr("ingest", clean, tmp_path / "clean.zarr", "--workers", 1)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

    proc = gpucnr("info", tmp_path / "meta.csv")
    assert proc.returncode == 2 and "neither a gpucnr stack nor gpucnr results" in proc.stdout
