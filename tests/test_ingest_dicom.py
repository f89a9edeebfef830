"""`gpucnr.ingest` on real DICOM files: pydicom's bundled test images, and synthetic ones for what they lack.

Provenance: the real files are the test files shipped in the pydicom wheel (``pydicom/data/test_files``):
CT_small (GE CT, rescale intercept -1024, pixel padding value -2000), MR_small and its copies under other transfer
syntaxes (RLE, JPEG-LS lossless, JPEG 2000 lossless, big endian, implicit VR, a padded copy), the examples_*
ultrasound files (RGB, YBR_FULL_422 JPEG multi-frame, JPEG 2000 YBR_RCT, palette colour), the JPEG2000 and
JPGExtended NM bone scans and the deflated image_dfl. The reference for every pixel is
``pydicom.dcmread(f).pixel_array`` in the same environment; colour is reduced with the rec709 weights of
scikit-image's rgb2gray in float64, palette images after ``pydicom.pixels.apply_color_lut``.

One ingest of all of them (plus synthetic files from tests/dicomfactory.py) is shared by the module; the MR_small
copies share one SOPInstanceUID, so in that folder all but MR_small.dcm are duplicates, and each copy is also
ingested into a stack of its own to compare pixels and CNR across transfer syntaxes.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicomfactory import write_dicom
from pydicom.pixels import apply_color_lut, apply_modality_lut

import gpucnr

WORKERS = 2
#: pydicom's bundled files, listed from the wheel (never get_testdata_file: it goes to the network for a miss)
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REAL = ("CT_small.dcm", "MR_small.dcm", "examples_jpeg2k.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm",
        "examples_palette.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "image_dfl.dcm")
#: lossless copies of MR_small.dcm (one SOPInstanceUID for all of them)
MR_COPIES = ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
             "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm")
#: MR_small with 128 bytes of pixel data beyond its image: refused as declared-size (issue 11: more than one pad
#: byte beyond the declared size is not the image's data)
PADDED = "MR_small_padded.dcm"
SYNTHETIC = ("ct_half.dcm", "lut.dcm", "pad.dcm", "pad_range.dcm", "mono1.dcm", "multi.dcm")
REC709 = (0.2125, 0.7154, 0.0721)
PADDING = -2000
CELL = ("n_roi", "mean_roi", "var_roi", "n_bg", "mean_bg", "var_bg", "cnr", "status")


def _disk(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _write_synthetic(folder: Path) -> None:
    """What the bundled files lack: a slope of 0.5, a modality LUT, padding pixels, a padding range, MONOCHROME1
    and a plain multi-frame image."""
    rng = np.random.default_rng(20240611)
    ct = rng.normal(1100, 40, (48, 56))
    ct[_disk(ct.shape, 20, 24, 7)] += 150
    write_dicom(folder / "ct_half.dcm", np.round(ct).astype(np.int16), slope=0.5, intercept=-1024.0)
    lut = np.arange(256) ** 2 // 3 + 5  # NB: not affine, so a stored value that skipped the LUT shows
    write_dicom(folder / "lut.dcm", rng.integers(0, 256, (40, 40)).astype(np.uint16), modality_lut=lut)
    pad = np.round(rng.normal(30, 10, (64, 64)))
    pad[_disk(pad.shape, 20, 20, 5)] += 40
    pad[40:56, 40:56] = PADDING  # NB: inside the background of the ROI at (20, 20): it would swamp its variance
    write_dicom(folder / "pad.dcm", pad.astype(np.int16), slope=1.0, intercept=-1024.0, padding=PADDING)
    ranged = rng.integers(-1000, 1000, (32, 32)).astype(np.int16)
    ranged[:6, :] = rng.integers(PADDING, PADDING + 11, (6, 32))
    write_dicom(folder / "pad_range.dcm", ranged, slope=2.0, intercept=-10.0, padding=PADDING,
                padding_limit=PADDING + 10)
    mono = rng.normal(3000, 50, (48, 48))
    mono[_disk(mono.shape, 24, 24, 6)] -= 300  # NB: darker stored values = brighter on a MONOCHROME1 display
    write_dicom(folder / "mono1.dcm", np.round(mono).astype(np.uint16), photometric="MONOCHROME1", modality="DX")
    write_dicom(folder / "multi.dcm", rng.integers(0, 4096, (3, 32, 40)).astype(np.uint16), modality="OT")


@dataclass
class Ingested:
    """One ingest: its summary, source folder, opened stack and linkage table."""

    summary: gpucnr.IngestSummary
    src: Path
    stack: gpucnr.store.Stack
    linkage: pd.DataFrame

    def indices(self, source: str) -> list[int]:
        """Global indices of the frames of `source`, in frame order."""
        rows = self.linkage[self.linkage["source"] == source].sort_values("frame")
        assert list(rows["frame"]) == list(range(len(rows))), rows
        return [int(i) for i in rows["index"]]

    def row(self, index: int) -> pd.Series:
        row = self.stack.images.iloc[index]
        assert int(row["index"]) == index
        return row

    def pixels(self, index: int) -> np.ndarray:
        """The stored pixels (valid extent) of one image."""
        row = self.row(index)
        bucket = next(b for b in self.stack.buckets if b.name == row["bucket"])
        images, _ = self.stack.read(bucket, int(row["position"]), int(row["position"]) + 1, labels=False)
        return images[0, : int(row["valid_h"]), : int(row["valid_w"])]


def ingest(src: Path, stack: Path, **kw) -> Ingested:
    """Ingest and check the accounting invariant of every ingest (DESIGN §8)."""
    summary = gpucnr.ingest(src, stack, workers=WORKERS, **kw)
    assert summary.files_in == summary.stored + sum(summary.skipped.values()) + summary.duplicates
    opened = gpucnr.open_stack(stack)
    assert summary.images == opened.n_images
    linkage = pd.read_csv(summary.linkage, dtype={"source": str}, keep_default_na=False)
    assert sorted(linkage["index"]) == list(range(summary.images))
    return Ingested(summary, src, opened, linkage)


def expected(path) -> tuple[list[np.ndarray], dict]:
    """What ingest must store for a DICOM file, from pydicom alone: the frames and the per-image columns."""
    ds = pydicom.dcmread(path)
    photometric = str(ds.PhotometricInterpretation)
    n, rows, cols = int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns)
    arr = ds.pixel_array
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        rgb = arr.reshape(n, rows, cols, 3)
        r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
        gray = REC709[0] * r + REC709[1] * g + REC709[2] * b
        return list(gray), {"slope": 1.0, "intercept": 0.0, "padding": math.nan, "photometric": "MONOCHROME2",
                            "color": "rec709"}
    arr = arr.reshape(n, rows, cols)
    arr = arr.astype(arr.dtype.newbyteorder("="))
    columns = {"slope": float(ds.get("RescaleSlope", 1)), "intercept": float(ds.get("RescaleIntercept", 0)),
               "padding": math.nan, "photometric": photometric, "color": ""}
    padding, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    if "ModalityLUTSequence" in ds:
        assert padding is None  # NB: none of the files here combines a LUT with padding
        return list(apply_modality_lut(arr, ds).astype(np.float64)), {**columns, "slope": 1.0, "intercept": 0.0}
    if limit is not None:
        lo, hi = sorted((int(padding), int(limit)))
        values = arr.astype(np.float64)
        values[(arr >= lo) & (arr <= hi)] = np.nan
        return list(values), columns
    if padding is not None:
        columns["padding"] = float(padding)
    return list(arr), columns


def _source_path(dataset: Ingested, source: str) -> Path:
    return dataset.src / source


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Ingested:
    """The real files, the MR_small copies (duplicates here) and the synthetic files, in one stack."""
    root = tmp_path_factory.mktemp("dicom")
    src = root / "src"
    (src / "real").mkdir(parents=True)
    for name in (*REAL, *MR_COPIES, PADDED):
        shutil.copyfile(TEST_FILES / name, src / "real" / name)
    _write_synthetic(src / "synthetic")
    return ingest(src, root / "stack")


def _sources() -> list[str]:
    return [f"real/{n}" for n in REAL] + [f"synthetic/{n}" for n in SYNTHETIC]


def _ct_table() -> pd.DataFrame:
    """Fixed ROIs of CT_small (128 x 128): soft tissue and the brighter structures around it."""
    return pd.DataFrame({"roi": [1, 2, 3], "kind": ["square", "disk", "square"], "cx": [64, 40, 90],
                         "cy": [64, 80, 40], "r": [6, 5, 4]})


def _mr_table(mr: np.ndarray) -> pd.DataFrame:
    """ROIs drawn by gpucnr.sample_rois inside the brighter half of MR_small (image 0)."""
    table = gpucnr.sample_rois(mr > np.median(mr), k=3, r=3, kind="square", seed=0)
    assert len(table) == 3
    return table


SYNTHETIC_ROIS = {
    "synthetic/ct_half.dcm": {"roi": [1, 2], "kind": ["disk", "square"], "cx": [24, 42], "cy": [20, 34], "r": [5, 4]},
    "synthetic/pad.dcm": {"roi": [1], "kind": ["disk"], "cx": [20], "cy": [20], "r": [4]},
    "synthetic/mono1.dcm": {"roi": [1], "kind": ["disk"], "cx": [24], "cy": [24], "r": [5]},
}


def _table(dataset: Ingested) -> pd.DataFrame:
    """The ROI table of the module's runs, against the stack's global index."""
    parts = [_ct_table().assign(image=dataset.indices("real/CT_small.dcm")[0])]
    mr = pydicom.dcmread(TEST_FILES / "MR_small.dcm").pixel_array
    parts.append(_mr_table(mr).assign(image=dataset.indices("real/MR_small.dcm")[0]))
    for source, rows in SYNTHETIC_ROIS.items():
        parts.append(pd.DataFrame(rows).assign(image=dataset.indices(source)[0]))
    return pd.concat(parts, ignore_index=True)[["image", "roi", "kind", "cx", "cy", "r"]]


@pytest.fixture(scope="module")
def results(dataset, tmp_path_factory):
    """gpucnr.run over the module's stack with `_table`, unsigned and signed."""
    root = tmp_path_factory.mktemp("results")
    table = _table(dataset)
    plain = gpucnr.run(dataset.stack.path, root / "plain", rois=table, workers=WORKERS).load()
    signed = gpucnr.run(dataset.stack.path, root / "signed", rois=table, workers=WORKERS, signed=True).load()
    return {"plain": plain, "signed": signed, "table": table}


# --- the shared stack --------------------------------------------------------------------------------------------


def test_accounting_and_duplicate_copies(dataset):
    """Every file is stored, except the MR_small copies: duplicates of MR_small.dcm (the first in byte order),
    each listed with the file it duplicates; images = the frames of the stored files."""
    s = dataset.summary
    assert s.files_in == len(REAL) + len(MR_COPIES) + len(SYNTHETIC) + 1
    assert (s.stored, s.skipped, s.duplicates) == (len(REAL) + len(SYNTHETIC), {"declared-size": 1}, len(MR_COPIES))
    problems = s.problems[s.problems["code"] != "declared-size"]
    assert s.problems[s.problems["code"] == "declared-size"]["source"].tolist() == [f"real/{PADDED}"]
    assert sorted(problems["source"]) == sorted(f"real/{n}" for n in MR_COPIES), problems.to_string()
    assert set(problems["item"]) == {"file"} and set(problems["code"]) == {"duplicate"}
    assert all("real/MR_small.dcm" in reason for reason in problems["reason"])
    frames = sum(int(pydicom.dcmread(_source_path(dataset, src), stop_before_pixels=True).get("NumberOfFrames")
                     or 1) for src in _sources())
    assert s.images == frames == dataset.stack.n_images
    assert set(dataset.linkage["source"]) == set(_sources())


@pytest.mark.parametrize("source", _sources())
def test_stored_frames_equal_pydicom(dataset, source):
    """Each frame is pydicom's pixel_array exactly: gray in its own dtype in native byte order, colour as float64
    rec709 luminance of pydicom's RGB (palette through apply_color_lut), a modality LUT as float64
    apply_modality_lut, a padding range as NaN."""
    frames, _ = expected(_source_path(dataset, source))
    indices = dataset.indices(source)
    assert len(indices) == len(frames)
    for index, want in zip(indices, frames, strict=True):
        got = dataset.pixels(index)
        assert got.dtype.isnative
        assert got.dtype == want.dtype, (source, got.dtype, want.dtype)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want, strict=True)  # NB: NaN == NaN here (the padding range)


@pytest.mark.parametrize("source", _sources())
def test_columns_equal_header(dataset, source):
    """slope, intercept, padding and photometric of every frame are the header's (rescale defaults 1 and 0, no
    padding = NaN); colour images are MONOCHROME2 luminance with their colour mode recorded; a modality LUT,
    already applied, leaves slope 1 and intercept 0."""
    _, want = expected(_source_path(dataset, source))
    for index in dataset.indices(source):
        row = dataset.row(index)
        assert float(row["slope"]) == want["slope"]
        assert float(row["intercept"]) == want["intercept"]
        assert (math.isnan(row["padding"]) and math.isnan(want["padding"])) or row["padding"] == want["padding"]
        assert row["photometric"] == want["photometric"]
        assert row["color"] == want["color"]
        assert row["format"] == "dicom"


def test_ct_small_header_columns(dataset):
    """The one real file with a rescale and a padding value: intercept -1024 and padding -2000, as in its header."""
    row = dataset.row(dataset.indices("real/CT_small.dcm")[0])
    assert (row["slope"], row["intercept"], row["padding"], row["modality"]) == (1.0, -1024.0, -2000.0, "CT")


def test_multiframe(dataset):
    """Multi-frame files give one image per frame: frame column 0..n-1 (image table and linkage agree), the
    frames consecutive in the global index, and single-frame files frame 0."""
    for source, n in (("real/examples_ybr_color.dcm", 30), ("synthetic/multi.dcm", 3)):
        indices = dataset.indices(source)
        assert len(indices) == n
        assert indices == list(range(indices[0], indices[0] + n))
        assert [int(dataset.row(i)["frame"]) for i in indices] == list(range(n))
        assert len({int(dataset.row(i)["file_index"]) for i in indices}) == 1
    for single in ("real/CT_small.dcm", "real/MR_small.dcm"):
        assert int(dataset.row(dataset.indices(single)[0])["frame"]) == 0


def test_modality_lut_applied(dataset):
    """A ModalityLUTSequence is applied at ingest: float64 values of pydicom's apply_modality_lut, not the stored
    integers, with slope 1 and intercept 0 so the run does not rescale again."""
    ds = pydicom.dcmread(dataset.src / "synthetic/lut.dcm")
    index = dataset.indices("synthetic/lut.dcm")[0]
    got = dataset.pixels(index)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, apply_modality_lut(ds.pixel_array, ds).astype(np.float64))
    assert not np.array_equal(got, ds.pixel_array.astype(np.float64))
    assert (dataset.row(index)["slope"], dataset.row(index)["intercept"]) == (1.0, 0.0)


def test_monochrome1_recorded_not_inverted(dataset, results):
    """MONOCHROME1 is recorded as photometric and stored as is (never inverted); only the sign of a signed CNR
    follows the display polarity: the run's signed CNR is minus measure's on the stored values."""
    index = dataset.indices("synthetic/mono1.dcm")[0]
    raw = pydicom.dcmread(dataset.src / "synthetic/mono1.dcm").pixel_array
    np.testing.assert_array_equal(dataset.pixels(index), raw, strict=True)
    assert dataset.row(index)["photometric"] == "MONOCHROME1"
    table = pd.DataFrame(SYNTHETIC_ROIS["synthetic/mono1.dcm"]).assign(image=0)
    ref = gpucnr.measure(raw, table, signed=True)
    got = results["signed"]["cnr"].sel(image=index, roi=1).item()
    want = ref["cnr"].sel(image=0, roi=1).item()
    assert want < 0  # NB: the lesion's stored values are lower than the background's
    assert got == -want
    assert results["plain"]["cnr"].sel(image=index, roi=1).item() == abs(want)


# --- CNR: stored integers with slope/intercept == measure on rescaled float64 ------------------------------------


def _rescaled(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _compare(results: dict, index: int, reference, rtol: float = 1e-12) -> None:
    """The run's cells of image `index` against measure's image 0 on the ROI ids measure saw."""
    ids = reference["roi"].to_numpy()
    got = results["plain"].sel(image=index, roi=ids)
    want = reference.isel(image=0)
    np.testing.assert_array_equal(got["status"], want["status"])
    assert (want["status"] == 0).all(), want["status"].values
    for var in ("n_roi", "n_bg"):
        np.testing.assert_array_equal(got[var], want[var])
    for var in ("cnr", "mean_roi", "var_roi", "mean_bg", "var_bg"):
        np.testing.assert_allclose(got[var], want[var], rtol=rtol, atol=0, err_msg=var)


@pytest.mark.parametrize(("source", "slope", "intercept"), [("real/CT_small.dcm", 1.0, -1024.0),
                                                             ("synthetic/ct_half.dcm", 0.5, -1024.0)])
def test_cnr_of_stored_integers_equals_rescaled_measure(dataset, results, source, slope, intercept):
    """The run measures the stored int16 values and applies slope/intercept to the moments; measure on the
    float64 rescaled pixels gives the same CNR (and means/variances in modality units) to 1e-12 relative."""
    index = dataset.indices(source)[0]
    row = dataset.row(index)
    assert (row["slope"], row["intercept"]) == (slope, intercept)
    assert dataset.pixels(index).dtype == np.int16
    table = results["table"]
    rows = table[table["image"] == index].assign(image=0)
    reference = gpucnr.measure(_rescaled(dataset.src / source), rows)
    _compare(results, index, reference)
    assert results["plain"]["n_excluded"].sel(image=index).item() == 0


def test_padding_value_pixels_excluded(dataset, results):
    """Pixels equal to PixelPaddingValue stay stored as integers but the run leaves them out of every region
    (n_excluded counts them): the CNR equals measure on the rescaled pixels with those pixels set to NaN."""
    source = "synthetic/pad.dcm"
    index = dataset.indices(source)[0]
    raw = pydicom.dcmread(dataset.src / source).pixel_array
    padded = raw == PADDING
    assert dataset.row(index)["padding"] == PADDING
    np.testing.assert_array_equal(dataset.pixels(index), raw, strict=True)
    assert results["plain"]["n_excluded"].sel(image=index).item() == padded.sum() == 256
    values = _rescaled(dataset.src / source)
    rows = pd.DataFrame(SYNTHETIC_ROIS[source]).assign(image=0)
    unmasked = gpucnr.measure(values, rows)
    values[padded] = np.nan
    reference = gpucnr.measure(values, rows)
    assert reference["n_excluded"].item() == 256
    _compare(results, index, reference)
    # NB: the padded block lies in the ROI's background: had it been measured, the CNR would differ
    assert not np.isclose(unmasked["cnr"].item(), reference["cnr"].item(), rtol=1e-3)


# --- the lossless MR_small copies, each in its own stack ----------------------------------------------------------


@pytest.fixture(scope="module")
def mr_reference(dataset, results):
    """MR_small.dcm's stored pixels and its run cells (ROIs from sample_rois) in the shared stack."""
    index = dataset.indices("real/MR_small.dcm")[0]
    cells = results["plain"].sel(image=index)
    ids = results["table"].loc[results["table"]["image"] == index, "roi"].to_numpy()
    assert (cells["status"].sel(roi=ids) == 0).all()
    return {"pixels": dataset.pixels(index), "row": dataset.row(index), "cells": cells.sel(roi=ids), "ids": ids}


@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding:UserWarning")  # NB: pydicom on the padded copy
@pytest.mark.parametrize("name", MR_COPIES)
def test_lossless_copy_identical_pixels_and_cnr(tmp_path, mr_reference, name):
    """A lossless copy of MR_small (RLE, JPEG-LS, JPEG 2000, big endian, implicit VR), ingested alone:
    its pixels are pydicom's for that file and bit-identical (values, dtype int16, native order) to MR_small's,
    its columns the same, and the run with the same ROI table gives bit-identical cells."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(TEST_FILES / name, src / name)
    copy = ingest(src, tmp_path / "stack")
    assert (copy.summary.files_in, copy.summary.stored, copy.summary.images) == (1, 1, 1)
    frames, _ = expected(src / name)
    got = copy.pixels(0)
    np.testing.assert_array_equal(got, frames[0], strict=True)
    np.testing.assert_array_equal(got, mr_reference["pixels"], strict=True)
    assert got.dtype == np.dtype("int16") and got.dtype.isnative
    for col in ("slope", "intercept", "photometric", "color", "rows", "columns"):
        assert copy.row(0)[col] == mr_reference["row"][col], col
    assert math.isnan(copy.row(0)["padding"])
    table = _mr_table(pydicom.dcmread(TEST_FILES / "MR_small.dcm").pixel_array)
    cells = gpucnr.run(copy.stack.path, tmp_path / "results", rois=table, workers=WORKERS).load().sel(image=0)
    for var in CELL:
        np.testing.assert_array_equal(cells[var].sel(roi=mr_reference["ids"]), mr_reference["cells"][var],
                                      err_msg=var)
