"""Mask matching as a new user met it (a messy folder of 16-bit PNGs with `{stem}_mask.png` beside them): a pattern
that matches the images themselves, `--masks` given SRC_DIR itself, a `--mask-threshold` above the masks' range, the
summary's count of images without labels, and a DICOM image object whose pixel data was deleted.

Every command runs in-process (`gpucnr.cli.main`); images are tiny.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfactory import write_dicom, write_raster
from test_ingest import WORKERS

from gpucnr.cli import main
from gpucnr.sources.dicom import scan
from gpucnr.sources.outcomes import Skip

SHAPE = (24, 32)


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _folder(src: Path, stems=("p01", "p02"), *, mask_value=255, mask_dtype=np.uint8, ghost=False) -> Path:
    rng = np.random.default_rng(0)
    for stem in stems:
        img = rng.integers(1000, 3000, SHAPE).astype(np.uint16)  # NB: 16-bit PNG images
        write_raster(src / f"{stem}.png", img)
        mask = np.zeros(SHAPE, mask_dtype)
        mask[6:14, 8:20] = mask_value
        write_raster(src / f"{stem}_mask.png", mask)
    if ghost:
        mask = np.zeros(SHAPE, np.uint8)
        mask[2:4, 2:4] = 255
        write_raster(src / "ghost_mask.png", mask)
    return src


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _nothing_written(tmp_path: Path, name: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name)) == [], list(tmp_path.iterdir())


# --- 1: a pattern that makes an image its own mask ----------------------------------------------------------------


def test_pattern_matching_the_images_themselves_is_refused(tmp_path, capsys):
    """`{stem}*.png` matches p01.png as the mask of p01.png: refused before anything is written (exit 2), naming the
    pattern, one example file and why, instead of every PNG image being taken for a mask."""
    src = _folder(tmp_path / "src", ghost=True)
    rc, out, err = _cli(capsys, "ingest", src, tmp_path / "s9.zarr", "--mask-pattern", "{stem}*.png",
                        "--workers", WORKERS)
    assert rc == 2, out + err
    assert "[bad-input]" in err and "'{stem}*.png'" in err and "gpucnr: warning: ghost_mask.png: " in err, err
    assert "its own mask" in err and "nothing was written" in err, err
    _nothing_written(tmp_path, "s9.zarr")
    # NB: --masks SRC_DIR without a pattern (the default {stem}.* makes every image its own mask): the message says
    # what the user did, not a pattern they never typed
    rc, out, err = _cli(capsys, "ingest", src, tmp_path / "s10.zarr", "--masks", src, "--workers", WORKERS)
    assert rc == 2 and "is the image folder itself: give --mask-pattern" in err and "{stem}.*" not in err, out + err
    _nothing_written(tmp_path, "s10.zarr")


# --- 2: --masks SRC_DIR ---------------------------------------------------------------------------------------------


def test_mask_dir_that_is_src_dir_keeps_masks_out_of_the_inputs(tmp_path, capsys):
    """MASK_DIR = SRC_DIR: the files the pattern matches are masks, not inputs (neither stored nor counted), and the
    orphan mask's hint does not say that MASK_DIR lies inside SRC_DIR."""
    src = _folder(tmp_path / "src", ghost=True)
    stack = tmp_path / "s4.zarr"
    rc, out, err = _cli(capsys, "ingest", src, stack, "--masks", src, "--mask-pattern", "{stem}_mask.png",
                        "--workers", WORKERS)
    assert rc == 3, out + err
    assert "2 image(s) from 2 file(s); 2 file(s) in" in out and "mask files used: 2;" in out, out
    linked = {r["source"] for r in _rows(Path(f"{stack}.linkage.csv"))}
    assert linked == {"p01.png", "p02.png"}, linked
    assert "mask files matching no image: 1 of 3" in err, err
    assert "lies inside SRC_DIR" not in err and "MASK_DIR is SRC_DIR" in err, err
    skipped = _rows(Path(f"{stack}.skipped.csv"))
    assert [(r["source"], r["code"]) for r in skipped] == [("ghost_mask.png", "mask-no-image")], skipped


# --- 3: --mask-threshold above the masks' range -----------------------------------------------------------------


@pytest.mark.parametrize(("value", "threshold"), [(255, 300), (1, 127)])
def test_threshold_above_the_masks_values_is_a_problem(tmp_path, capsys, value, threshold):
    """8-bit masks and --mask-threshold 300 (or 0/1 masks and 127): no pixel exceeds the threshold, every mask would
    label nothing. The masks are listed (mask-threshold), the problems block says how many of how many and why,
    and the command exits 3."""
    src = _folder(tmp_path / "src", mask_value=value)
    stack = tmp_path / "s.zarr"
    rc, out, err = _cli(capsys, "ingest", src, stack, "--mask-pattern", "{stem}_mask.png", "--mask-threshold",
                        threshold, "--workers", WORKERS)
    assert rc == 3, out + err
    assert "2 image(s) from 2 file(s)" in out, out
    assert "images whose mask or SEG was refused (stored unlabelled): 2 of 2 (100.0 %) [mask-threshold 2]" in err, err
    assert "--mask-threshold" in err and "above" in err, err
    rows = _rows(Path(f"{stack}.skipped.csv"))
    assert sorted((r["source"], r["item"], r["code"]) for r in rows) == [
        ("p01.png", "mask", "mask-threshold"), ("p02.png", "mask", "mask-threshold")], rows
    assert f"--mask-threshold {threshold:g}" in rows[0]["reason"] and "p01_mask.png" in rows[0]["reason"], rows


def test_threshold_within_the_masks_values_is_no_problem(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    rc, out, err = _cli(capsys, "ingest", src, tmp_path / "s.zarr", "--mask-pattern", "{stem}_mask.png",
                        "--mask-threshold", 127, "--workers", WORKERS)
    assert rc == 0 and err == "" and "mask files used: 2;" in out, out + err


# --- 4: the summary's count of images without labels ----------------------------------------------------------


def test_images_with_roi_rows_are_not_counted_as_unlabelled(tmp_path, capsys):
    """p01 has a mask, p02 an ROI-table row, p03 neither: one image has neither a mask nor an ROI-table row."""
    src = _folder(tmp_path / "src", stems=("p01",))
    rng = np.random.default_rng(1)
    for stem in ("p02", "p03"):
        write_raster(src / f"{stem}.png", rng.integers(1000, 3000, SHAPE).astype(np.uint16))
    rois = tmp_path / "rois.csv"
    rois.write_text("source,roi,kind,cx,cy,r\np02.png,1,disk,10,10,3\np02.png,2,square,20,12,3\n")
    rc, out, err = _cli(capsys, "ingest", src, tmp_path / "s.zarr", "--mask-pattern", "{stem}_mask.png",
                        "--rois", rois, "--workers", WORKERS)
    assert rc == 0, out + err
    assert "mask files used: 1; images with neither a mask nor an ROI-table row: 1" in out, out
    assert "without labels" not in out, out


# --- 5: a DICOM image object without its pixel data -----------------------------------------------------------


def test_dicom_image_whose_pixel_data_was_deleted_is_missing_attribute(tmp_path):
    """A CT object saved without its PixelData element ends complete: missing-attribute (a problem: it may also be
    a file cut right before the element), not "truncated" inside an element and never "not an image"
    (no-pixel-data, not a problem); a file cut inside an element of its data set is still truncated."""
    path = write_dicom(tmp_path / "ct.dcm", np.arange(64, dtype=np.int16).reshape(8, 8))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(Skip) as e:
        scan(tmp_path / "nopix.dcm", b"k" * 32, 2**26)
    assert e.value.code == "missing-attribute" and "without a pixel data element" in e.value.reason, e.value.reason
    data = (tmp_path / "nopix.dcm").read_bytes()
    for cut in (len(data) - 3, len(data) - 9):  # NB: inside the last element's value, inside its header
        (tmp_path / "cut.dcm").write_bytes(data[:cut])
        with pytest.raises(Skip) as e:
            scan(tmp_path / "cut.dcm", b"k" * 32, 2**26)
        assert e.value.code == "truncated", (cut, e.value.code, e.value.reason)
