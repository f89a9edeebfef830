"""Regression tests of `gpucnr.ingest` for what a review read found: a case lost to an early duplicate, mask and
SEG folders taken for images, pixel values Pillow would change, native YBR 4:2:2, signed padding written as
US, inverse presentation, input names used as array paths, deep folder trees, and a linkage file joined
to results of another stack."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicomfactory import truncate, write_dicom, write_raster
from PIL import Image, TiffImagePlugin
from test_ingest import SEG_SOURCE, _write_seg, ingest

import gpucnr
from gpucnr.cli import main


def _pixels(done, source: str, frame: int = 0) -> tuple[np.ndarray, pd.Series]:
    """Stored pixels (valid extent) and per-image row of one image of an ingest."""
    index = done.index(source, frame)
    return done.read(index)[0], done.stack.images.iloc[index]


def _png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_first_copy_that_fails_does_not_make_the_good_copy_a_duplicate(tmp_path):
    """Two files of one SOP instance: the first (in input order) is truncated inside its RLE pixel data, the
    second intact. The second is stored, the first skipped; nothing is called a duplicate. Then with both
    intact, the second is the duplicate of the first."""
    src = tmp_path / "src"
    pixels = np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) % 700
    uid = pydicom.uid.generate_uid()
    write_dicom(src / "a.dcm", pixels, transfer_syntax=pydicom.uid.RLELossless, sop_uid=uid)
    write_dicom(src / "b.dcm", pixels, transfer_syntax=pydicom.uid.RLELossless, sop_uid=uid)
    truncate(src / "a.dcm", (src / "a.dcm").stat().st_size - 300)
    done = ingest(src, tmp_path / "one.zarr")
    s = done.summary
    assert (s.stored, s.duplicates, sum(s.skipped.values())) == (1, 0, 1), s.problems.to_string()
    assert list(done.linkage["source"]) == ["b.dcm"]
    np.testing.assert_array_equal(_pixels(done, "b.dcm")[0], pixels)
    write_dicom(src / "a.dcm", pixels, transfer_syntax=pydicom.uid.RLELossless, sop_uid=uid)
    s = ingest(src, tmp_path / "two.zarr").summary
    assert (s.stored, s.duplicates) == (1, 1)
    row = s.problems.iloc[0]
    assert (row["source"], row["code"]) == ("b.dcm", "duplicate") and "a.dcm" in row["reason"]


def test_mask_and_seg_folders_inside_src_are_not_images(tmp_path):
    """`--masks SRC/masks` and `--seg SRC/seg` inside SRC_DIR: their files are not inputs; a DICOM SEG lying
    among the images without --seg is skipped as ``segmentation``, never stored as a 1-bit image."""
    src = tmp_path / "src"
    img = (np.arange(32 * 32).reshape(32, 32) % 200).astype(np.uint8)
    write_raster(src / "case.png", img)
    write_raster(src / "masks" / "case.png", np.where(img > 100, 255, 0).astype(np.uint8))
    ct = write_dicom(src / "ct.dcm", np.full((32, 32), 40, np.int16), extra=SEG_SOURCE)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    _write_seg(ct, [mask], src / "seg" / "seg.dcm")
    _write_seg(ct, [mask], src / "stray_seg.dcm")
    done = ingest(src, tmp_path / "stack.zarr", masks=src / "masks", mask_pattern="{stem}.png", seg=src / "seg")
    s = done.summary
    assert sorted(done.linkage["source"]) == ["case.png", "ct.dcm"]
    assert s.skipped == {"segmentation": 1}
    assert s.problems[s.problems["item"] == "file"]["source"].tolist() == ["stray_seg.dcm"]


def test_rasters_pillow_would_change_are_refused_or_recovered(tmp_path):
    """A 16-bit RGB PNG (Pillow reads it as 8-bit) is ``unsupported-format``, never stored with altered values;
    an int8 TIFF (SampleFormat 2), which Pillow reads as uint8, is stored as the int8 values it holds."""
    src = tmp_path / "src"
    src.mkdir()
    _png16_rgb(src / "rgb16.png", np.full((8, 8, 3), 1000, np.uint16))
    raw = np.array([[0, 255], [128, 127]], np.uint8)
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[339] = 2
    Image.fromarray(raw, "L").save(src / "int8.tif", tiffinfo=info)
    done = ingest(src, tmp_path / "stack.zarr")
    assert done.summary.skipped == {"unsupported-format": 1}
    got, _ = _pixels(done, "int8.tif")
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, raw.view(np.int8))


def test_native_ybr_full_422_is_stored(tmp_path):
    """Uncompressed YBR_FULL_422 holds two samples per pixel: it is stored (gray of pydicom's RGB), not refused
    for a declared size it never had."""
    from pydicom.data import get_testdata_file

    src = tmp_path / "src"
    src.mkdir()
    path = Path(get_testdata_file("SC_ybr_full_422_uncompressed.dcm", download=False))
    (src / "ybr.dcm").write_bytes(path.read_bytes())
    done = ingest(src, tmp_path / "stack.zarr")
    assert done.summary.stored == 1, done.summary.problems.to_string()
    got, row = _pixels(done, "ybr.dcm")
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
    np.testing.assert_array_equal(got, 0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2])
    assert row["color"] == "rec709"


def test_signed_padding_written_as_us_and_inverse_presentation(tmp_path):
    """Pixel Padding Value 63536 (US) in an int16 image means -2000: those pixels are excluded by the run; an
    INVERSE Presentation LUT Shape records the display polarity MONOCHROME1 (stored values untouched)."""
    src = tmp_path / "src"
    img = np.full((48, 48), 40, np.int16)
    img[:, :6] = -2000
    img[20:28, 20:28] = 90
    path = write_dicom(src / "ct.dcm", img)
    ds = pydicom.dcmread(path)
    ds.add_new("PixelPaddingValue", "US", 63536)
    ds.PresentationLUTShape = "INVERSE"
    ds.save_as(path)
    rois = tmp_path / "rois.csv"
    rois.write_text("source,roi,kind,cx,cy,r\nct.dcm,1,square,24,24,4\n")
    got, row = _pixels(ingest(src, tmp_path / "stack.zarr", rois=rois), "ct.dcm")
    np.testing.assert_array_equal(got, img)
    assert row["padding"] == -2000.0 and row["photometric"] == "MONOCHROME1"
    res = gpucnr.run(tmp_path / "stack.zarr", tmp_path / "results.zarr", workers=1)
    assert int(res["n_excluded"].values[0]) == 48 * 6


@pytest.mark.parametrize("column", ["..", "a/b", "PatientName", "Patient's Birth Date", "PatientID"])
def test_meta_columns_that_are_paths_or_identifiers_are_refused(tmp_path, column):
    """A --meta column name becomes an array path in the stack: names like '..' or 'a/b' are refused up front,
    as are names of identifying data and raw id columns (only patient_id, ... are allowed: pseudonymised)."""
    src = tmp_path / "src"
    write_raster(src / "a.png", np.zeros((8, 8), np.uint8))
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"source": ["a.png"], column: ["x"]}).to_csv(meta, index=False)
    with pytest.raises(gpucnr.InputError):
        gpucnr.ingest(src, tmp_path / "stack.zarr", meta=meta, workers=1)
    assert not (tmp_path / "stack.zarr").exists()


def test_deep_folder_tree_is_walked_without_recursion(tmp_path, monkeypatch):
    """A tree deeper than Python's recursion limit (lowered here to 100 for a 300-deep tree) is walked: the walk
    keeps its own stack of folders."""
    import os
    import sys

    from gpucnr.sources.files import walk

    deep = tmp_path / "src"
    deep.mkdir()
    monkeypatch.chdir(deep)  # NB: restores the working folder afterwards
    for _ in range(300):
        os.mkdir("d")
        os.chdir("d")
    Path("x.png").write_bytes(b"not really")
    os.chdir(tmp_path)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100)
    try:
        found = walk(tmp_path / "src")
    finally:
        sys.setrecursionlimit(limit)
    assert [f.rel for f in found] == ["d/" * 300 + "x.png"]


def test_with_paths_refuses_another_stack_at_the_same_path(tmp_path, capsys):
    """Results of a stack that was since ingested again at the same path: `filter --with-paths` would join the
    new linkage file (other files) to the old rows, so it is a coded error."""
    import shutil

    src = tmp_path / "src"
    write_raster(src / "a.png", (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    rois = tmp_path / "rois.csv"
    rois.write_text("source,roi,kind,cx,cy,r\na.png,1,square,32,32,4\n")
    stack, results = tmp_path / "stack.zarr", tmp_path / "results.zarr"
    ingest(src, stack, rois=rois)
    gpucnr.run(stack, results, workers=1)
    assert main(["filter", str(results), "--with-paths", "--out", str(tmp_path / "m.csv")]) == 0
    shutil.rmtree(stack)
    write_raster(src / "b.png", np.zeros((64, 64), np.uint8))
    ingest(src, stack, rois=rois)
    assert main(["filter", str(results), "--with-paths", "--out", str(tmp_path / "m2.csv")]) == 2
    assert "not the stack these results were computed from" in capsys.readouterr().err
