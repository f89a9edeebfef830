"""Bad input to `gpucnr.ingest`: each broken or hostile file gets its stable code, and the good files beside it
are stored.

Every folder holds two good files (a CT int16 DICOM carrying PHI canaries and a uint8 PNG) plus bad ones. A
worker pool costs seconds to start, so the cases that need no option of their own share one ingest
(`shared`); the others get one ingest per option set. `check` asserts the invariants of DESIGN §8 on each.
"""

from __future__ import annotations

import os
import signal
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicomfactory import (
    canary_strings,
    declared_larger,
    deflate_bomb,
    dicom_without_pixels,
    dicomdir,
    png_bomb,
    truncate,
    unsupported_syntax,
    write_dicom,
    write_raster,
)
from injection import sitecustomize
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

import gpucnr
from gpucnr.sources.outcomes import CODES

WORKERS = 2
GOOD = ("good_ct.dcm", "good.png")
RNG = np.random.default_rng(20240601)
CT = RNG.integers(-1000, 1000, (32, 32)).astype(np.int16)
PNG = RNG.integers(0, 256, (32, 48)).astype(np.uint8)
RGB = RNG.integers(0, 256, (32, 32, 3)).astype(np.uint8)
REC709, BT601 = (0.2125, 0.7154, 0.0721), (0.299, 0.587, 0.114)


def _gray(seed: int, shape=(32, 32)) -> np.ndarray:
    """Distinct uint8 content per file, so that no two rasters are duplicates by bytes."""
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def good_files(src: Path) -> list[str]:
    """The two good files of every folder; returns the CT file's canary strings."""
    ct = write_dicom(src / GOOD[0], CT, canary=True, slope=1.0, intercept=-1024.0)
    write_raster(src / GOOD[1], PNG)
    return canary_strings(ct)


def ingest(src, stack, **kw):
    kw.setdefault("workers", WORKERS)
    return gpucnr.ingest(src, stack, **kw)


class Ingested:
    """One ingest's summary and what the tests compare it with."""

    def __init__(self, summary, canaries):
        self.summary, self.canaries = summary, list(canaries)
        self.linkage = pd.read_csv(summary.linkage, dtype={"source": str}, keep_default_na=False)

    def row(self, source: str, item: str = "file") -> pd.Series:
        """The one problems row of `source` (a path relative to src)."""
        p = self.summary.problems
        rows = p[(p["source"] == source) & (p["item"] == item)]
        assert len(rows) == 1, f"{source}: {len(rows)} rows\n{p.to_string()}"
        return rows.iloc[0]

    def skipped(self, source: str, code: str) -> pd.Series:
        """`source` was not stored, for `code`, with a reason that quotes no identifying value."""
        row = self.row(source)
        assert row["code"] == code, f"{source}: expected {code!r}, got {row['code']!r}: {row['reason']!r}"
        for c in self.canaries:
            assert c not in row["reason"], f"the reason quotes identifying value {c!r}"
        assert source not in set(self.linkage["source"])
        return row

    def stored(self, source: str, frame: int = 0) -> np.ndarray:
        """`source` was stored, with no problem row: its pixels (valid extent) of `frame`."""
        p = self.summary.problems
        assert not (p["source"] == source).any(), p[p["source"] == source].to_string()
        hit = self.linkage[(self.linkage["source"] == source) & (self.linkage["frame"] == frame)]
        assert len(hit) == 1, self.linkage.to_string()
        stack = gpucnr.open_stack(self.summary.stack)
        row = stack.images.set_index("index").loc[int(hit["index"].iloc[0])]
        bucket = next(b for k, b in enumerate(stack.buckets) if row["bucket"] in (k, b.name))
        images, _ = stack.read(bucket, int(row["position"]), int(row["position"]) + 1, labels=False)
        return images[0, : int(row["valid_h"]), : int(row["valid_w"])]

    def stored_labels(self, source: str, frame: int = 0) -> np.ndarray:
        """The labels (valid extent) stored for `frame` of `source`."""
        stack = gpucnr.open_stack(self.summary.stack)
        row = stack.images.set_index("index").loc[self.index(source, frame)]
        bucket = next(b for b in stack.buckets if b.name == row["bucket"])
        _, labels = stack.read(bucket, int(row["position"]), int(row["position"]) + 1)
        return labels[0, : int(row["valid_h"]), : int(row["valid_w"])]

    def index(self, source: str, frame: int = 0) -> int:
        hit = self.linkage[(self.linkage["source"] == source) & (self.linkage["frame"] == frame)]
        return int(hit["index"].iloc[0])


def check(summary, canaries=()) -> Ingested:
    """The invariants of every ingest, and no identifying value in what it wrote into or beside the stack."""
    assert summary.files_in == summary.stored + sum(summary.skipped.values()) + summary.duplicates
    stack = gpucnr.open_stack(summary.stack)
    assert summary.images == stack.n_images
    problems = summary.problems
    assert list(problems.columns) == ["source", "item", "code", "reason", "source_encoding"]
    assert set(problems["code"]) <= set(CODES), set(problems["code"]) - set(CODES)
    files = problems[problems["item"] == "file"]
    assert (files["code"] == "duplicate").sum() == summary.duplicates
    assert files[files["code"] != "duplicate"]["code"].value_counts().to_dict() == summary.skipped
    listed = pd.read_csv(summary.skipped_list, dtype=str, keep_default_na=False)
    assert list(listed.columns) == list(problems.columns)
    assert listed.to_numpy().tolist() == problems.astype(str).to_numpy().tolist()
    done = Ingested(summary, canaries)
    linkage = done.linkage
    assert list(linkage.columns) == ["index", "frame", "source", "file_index", "patient_id", "study_id", "series_id",
                                     "instance_id", "source_encoding", "channel", "case"]
    assert len(linkage) == summary.images  # images = the frames of the stored files
    assert sorted(linkage["index"]) == list(range(summary.images))
    assert linkage["source"].nunique() == summary.stored
    assert set(GOOD) <= set(linkage["source"]), "a good file was not stored"
    texts = [Path(summary.linkage).read_text(encoding="utf-8"), Path(summary.skipped_list).read_text(encoding="utf-8")]
    texts += [str(v) for v in stack.images.to_numpy().ravel()]
    if stack.rois is not None:
        texts += [str(v) for v in stack.rois.to_numpy().ravel()]
    for c in canaries:
        assert not any(c in t for t in texts), f"identifying value {c!r} written into or beside the stack"
    return done


def _tree(root: Path) -> set[str]:
    out = set()
    for folder, dirs, files in os.walk(root):
        out.update(os.path.relpath(os.path.join(folder, n), root) for n in dirs + files)
    return out


def _folder(tmp_path_factory, name: str):
    base = tmp_path_factory.mktemp(name)
    (base / "src").mkdir()
    (base / "out").mkdir()
    return base, base / "src", base / "out" / "stack"


# --- one ingest, default options: the cases that need no option of their own --------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Ingested:
    _, src, stack = _folder(tmp_path_factory, "shared")
    canaries = good_files(src)

    def dicom(name, pixels=CT, **kw):
        path = write_dicom(src / name, pixels, canary=True, **kw)
        canaries.extend(canary_strings(path))
        return path

    (src / "empty.dcm").touch()
    (src / "notes.dcm").write_text("Patient PHI_CANARY_Notes was scanned twice.\n" * 20)
    canaries.append("PHI_CANARY_Notes")
    write_raster(src / "png_inside.dcm", _gray(1, (40, 32)))
    os.mkfifo(src / "pipe.dcm")
    truncate(dicom("cut_meta.dcm"), 150)  # inside the file meta information
    truncate(dicom("cut_header.dcm"), 400)  # inside the data set, in SOPInstanceUID's value
    truncate(dicom("cut_pixels.dcm"), -100)  # inside the pixel data element's value
    for kind in ("SR", "RTPLAN"):
        canaries.extend(canary_strings(dicom_without_pixels(src / f"{kind}.dcm", kind)))
    dicomdir(src / "DICOMDIR")
    canaries.extend(canary_strings(unsupported_syntax(src / "video.dcm")))
    canaries.extend(canary_strings(declared_larger(src / "liar.dcm")))
    dicom("flat.dcm", np.full((1024, 1024), 7, np.uint16), transfer_syntax=DeflatedExplicitVRLittleEndian)
    png_bomb(src / "bomb8.png", bits=8)
    for tag, value in (("nan", np.nan), ("inf", np.inf), ("ninf", -np.inf)):
        write_raster(src / f"nf_{tag}.tiff", _nonfinite(value), fmt="TIFF")
        dicom(f"nf_{tag}.dcm", _nonfinite(value), modality="MR")
    uid = _uid("")
    dicom("dup_a.dcm", CT[::-1], sop_uid=uid)
    dicom("dup_b.dcm", CT[:, ::-1], sop_uid=uid)
    (src / "zz_copy.png").write_bytes((src / "good.png").read_bytes())
    write_dicom(src / os.fsdecode(b"caf\xe9.dcm"), CT.T)
    (src / "link.png").symlink_to(write_raster(src.parent / "elsewhere.png", _gray(2)))
    (src / "gone.dcm").symlink_to(src / "never_was.dcm")
    write_raster(src / "rgb.png", RGB)
    dicom("rgb.dcm", RGB, photometric="RGB", modality="XC")
    write_raster(src / "pal.png", PALETTE_INDICES, palette=PALETTE.ravel().tolist())
    return check(ingest(src, stack), canaries)


def _uid(suffix: str) -> str:
    return f"2.25.{uuid.uuid4().int}{suffix}"


def _nonfinite(value) -> np.ndarray:
    pixels = np.random.default_rng(7).normal(100.0, 5.0, (32, 32)).astype(np.float32)
    pixels[[12, 14, 20], [13, 22, 17]] = value
    return pixels


PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50]], np.uint8)
PALETTE_INDICES = np.random.default_rng(3).integers(0, len(PALETTE), (32, 32)).astype(np.uint8)


def test_good_files_alone(tmp_path_factory):
    """The control: the two good files and nothing else."""
    _, src, stack = _folder(tmp_path_factory, "alone")
    good_files(src)
    summary = ingest(src, stack)
    assert check(summary).summary.problems.empty
    assert (summary.files_in, summary.stored, summary.images) == (2, 2, 2)


def test_shared_counts(shared):
    """Which files were stored (flat.dcm has its own test) and how many duplicates."""
    assert shared.summary.duplicates == 2  # dup_b.dcm, zz_copy.png
    stored = {*GOOD, "png_inside.dcm", "caf%E9.dcm", "dup_a.dcm", "rgb.png", "rgb.dcm", "pal.png"}
    assert set(shared.linkage["source"]) - {"flat.dcm"} == stored, shared.summary.problems.to_string()


def test_zero_bytes(shared):
    shared.skipped("empty.dcm", "empty-file")


def test_text_named_dcm(shared):
    shared.skipped("notes.dcm", "not-an-image")


def test_png_named_dcm_is_stored_as_png(shared):
    """Content decides the format, never the extension."""
    np.testing.assert_array_equal(shared.stored("png_inside.dcm"), _gray(1, (40, 32)))


def test_fifo_is_not_opened(shared):
    """A named pipe blocks whoever opens it for reading: it is not a regular file, and ingest finished."""
    shared.skipped("pipe.dcm", "not-an-image")


def test_truncated_in_file_meta(shared):
    shared.skipped("cut_meta.dcm", "truncated")


def test_truncated_in_header(shared):
    """Cut inside an element of the data set, before Rows: the file ends before its header does."""
    shared.skipped("cut_header.dcm", "truncated")


def test_truncated_in_pixel_data(shared):
    """The pixel data element's own length runs past the end of the file: truncated. (declared-size is a
    complete element that holds less than Rows x Columns call for; see test_declared_size_beyond_data.)"""
    shared.skipped("cut_pixels.dcm", "truncated")


@pytest.mark.parametrize("kind", ["SR", "RTPLAN"])
def test_dicom_without_pixels(shared, kind):
    shared.skipped(f"{kind}.dcm", "no-pixel-data")


def test_dicomdir(shared):
    shared.skipped("DICOMDIR", "no-pixel-data")


def test_unsupported_transfer_syntax(shared):
    row = shared.skipped("video.dcm", "unsupported-transfer-syntax")
    assert "MPEG2" in row["reason"] or "1.2.840.10008.1.2.4.100" in row["reason"], row["reason"]


def test_declared_size_beyond_data(shared):
    shared.skipped("liar.dcm", "declared-size")


def test_deflated_compressible_image_is_no_bomb(shared):
    """A deflated 2 MiB image of one value (a few KB on disk) is far below --max-image-mb (512): decompression-bomb
    means "expands beyond --max-image-mb", not "compresses well"."""
    np.testing.assert_array_equal(shared.stored("flat.dcm"), np.full((1024, 1024), 7, np.uint16))


def test_png_bomb_declared(shared):
    """An 8-bit 30000 x 30000 header (858 MiB declared, beyond 512) over 30 KB of data."""
    shared.skipped("bomb8.png", "decompression-bomb")


@pytest.mark.parametrize("tag", ["nan", "inf", "ninf"])
@pytest.mark.parametrize("ext", ["tiff", "dcm"])
def test_nonfinite_skip(shared, tag, ext):
    row = shared.skipped(f"nf_{tag}.{ext}", "nonfinite")
    assert "3 pixel" in row["reason"], row["reason"]


def test_duplicate_sop_instance(shared):
    """Same SOPInstanceUID, different pixels: the first stored, the second a duplicate naming it."""
    row = shared.skipped("dup_b.dcm", "duplicate")
    assert "dup_a.dcm" in row["reason"]
    np.testing.assert_array_equal(shared.stored("dup_a.dcm"), CT[::-1])


def test_identical_png_bytes(shared):
    row = shared.skipped("zz_copy.png", "duplicate")
    assert "good.png" in row["reason"]


def test_non_utf8_name(shared):
    """A Latin-1 name (b'caf\\xe9.dcm') is stored; its source is percent-encoded, marked so (DESIGN §10)."""
    np.testing.assert_array_equal(shared.stored("caf%E9.dcm"), CT.T)
    row = shared.linkage[shared.linkage["source"] == "caf%E9.dcm"]
    assert row["source_encoding"].tolist() == ["percent"]


def test_symlink_not_followed(shared):
    shared.skipped("link.png", "symlink")


def test_broken_symlink_not_followed(shared):
    shared.skipped("gone.dcm", "symlink")


@pytest.mark.parametrize("name", ["rgb.png", "rgb.dcm"])
def test_colour_rec709_by_default(shared, name):
    got = shared.stored(name)
    assert got.dtype == np.float64
    assert np.array_equal(got, _luma(RGB, *REC709))


def test_palette_png(shared):
    """Indices go through their palette, then rec709."""
    assert np.array_equal(shared.stored("pal.png"), _luma(PALETTE[PALETTE_INDICES], *REC709))


def _luma(rgb: np.ndarray, wr: float, wg: float, wb: float) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return wr * rgb[..., 0] + wg * rgb[..., 1] + wb * rgb[..., 2]


# --- size limits ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits(tmp_path_factory) -> Ingested:
    """--max-image-mb 1: a 2 MiB image, and a deflate bomb (66 KB on disk, 65 MiB inflated) that the test
    process never reads (canary_strings would inflate it)."""
    _, src, stack = _folder(tmp_path_factory, "limits")
    canaries = good_files(src)
    canaries += canary_strings(write_dicom(src / "huge.dcm", np.ones((1024, 1024), np.uint16), canary=True))
    deflate_bomb(src / "bomb.dcm", 64)
    assert (src / "bomb.dcm").stat().st_size < 2**20
    return check(ingest(src, stack, max_image_mb=1), canaries)


def test_image_too_large(limits):
    assert "MiB" in limits.skipped("huge.dcm", "image-too-large")["reason"]


def test_deflate_bomb(limits):
    limits.skipped("bomb.dcm", "decompression-bomb")


@pytest.mark.slow
def test_png_bomb_one_bit(tmp_path_factory):
    """A complete, valid 1-bit 30000 x 30000 PNG of 110 KB: 900 Mpixel, 858 MiB once decoded to uint8, beyond
    the default 512 MiB, from a file 8000 times smaller."""
    _, src, stack = _folder(tmp_path_factory, "bomb1")
    good_files(src)
    png_bomb(src / "bomb1.png", bits=1)
    check(ingest(src, stack)).skipped("bomb1.png", "decompression-bomb")


# --- masks ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Ingested:
    _, src, stack = _folder(tmp_path_factory, "masks")
    good_files(src)
    lesion = np.zeros((32, 48), np.uint8)
    lesion[8:20, 8:20] = 255
    write_raster(src / "ok.png", _gray(10, (32, 48)))
    write_raster(src / "ok_mask.png", lesion)
    write_raster(src / "shape.png", _gray(11, (32, 48)))
    write_raster(src / "shape_mask.png", np.zeros((16, 16), np.uint8))
    antialiased = lesion.copy()
    antialiased[8:20, 7] = 128
    write_raster(src / "aa.png", _gray(12, (32, 48)))
    write_raster(src / "aa_mask.png", antialiased)
    write_raster(src / "colour.png", _gray(13, (32, 48)))
    write_raster(src / "colour_mask.png", np.stack([lesion, np.zeros_like(lesion), lesion // 2], axis=-1))
    return check(ingest(src, stack, mask_pattern="{stem}_mask.png"))


def test_mask_ok_gives_labels(masked):
    """The control of the mask cases: a 0/255 mask is stored as labels 0/1."""
    masked.stored("ok.png")
    stack = gpucnr.open_stack(masked.summary.stack)
    row = stack.images.set_index("index").loc[masked.index("ok.png")]
    bucket = next(b for k, b in enumerate(stack.buckets) if row["bucket"] in (k, b.name))
    _, labels = stack.read(bucket, int(row["position"]), int(row["position"]) + 1)
    expect = np.zeros((32, 48), np.int64)
    expect[8:20, 8:20] = 1
    np.testing.assert_array_equal(labels[0, :32, :48], expect)


def _stored_unlabelled(masked, image: str, code: str) -> pd.Series:
    """A bad mask never loses its image: `image` is stored without labels, and the problems row (item "mask")
    carries `code` and names the mask file."""
    row = masked.row(image, item="mask")
    assert row["code"] == code, f"{image}: expected {code!r}, got {row['code']!r}: {row['reason']!r}"
    assert "_mask.png" in row["reason"], row["reason"]
    assert image in set(masked.linkage["source"]), f"{image} was not stored"
    labels = masked.stored_labels(image)
    assert not labels.any(), f"{image} has labels from a refused mask"
    return row


def test_mask_shape(masked):
    """The problems row names the image and its mask; the reason gives both sizes."""
    row = _stored_unlabelled(masked, "shape.png", "mask-shape")
    assert "16x16" in row["reason"] and "48x32" in row["reason"], row["reason"]


@pytest.mark.parametrize("image", ["aa.png", "colour.png"])
def test_mask_labels(masked, image):
    _stored_unlabelled(masked, image, "mask-labels")


# --- non-finite pixels kept ----------------------------------------------------------------------------------


def test_nonfinite_exclude(tmp_path_factory):
    """Stored as is; the run excludes and counts those pixels."""
    base, src, stack = _folder(tmp_path_factory, "exclude")
    good_files(src)
    write_raster(src / "nf_nan.tiff", _nonfinite(np.nan), fmt="TIFF")
    write_raster(src / "nf_inf.tiff", _nonfinite(np.inf), fmt="TIFF")
    rois = base / "rois.csv"
    rois.write_text("source,frame,roi,kind,cx,cy,r\n" + "".join(f"{s},0,1,square,16,16,3\n" for s in
                                                                   ("nf_nan.tiff", "nf_inf.tiff", "good.png")))
    done = check(ingest(src, stack, nonfinite="exclude", rois=rois))
    for name, value in (("nf_nan.tiff", np.nan), ("nf_inf.tiff", np.inf)):
        got = done.stored(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, _nonfinite(value))  # NB: NaN == NaN here
    results = gpucnr.run(stack, base / "results", workers=1)
    excluded = {s: int(results["n_excluded"].sel(image=done.index(s)).values)
                for s in ("nf_nan.tiff", "nf_inf.tiff", "good.png")}
    assert excluded == {"nf_nan.tiff": 3, "nf_inf.tiff": 3, "good.png": 0}


# --- colour options ------------------------------------------------------------------------------------------


def _colour_folder(tmp_path_factory, name):
    _, src, stack = _folder(tmp_path_factory, name)
    canaries = good_files(src)
    write_raster(src / "rgb.png", RGB)
    canaries += canary_strings(write_dicom(src / "rgb.dcm", RGB, photometric="RGB", modality="XC", canary=True))
    return src, stack, canaries


def test_colour_skip(tmp_path_factory):
    src, stack, canaries = _colour_folder(tmp_path_factory, "colour_skip")
    done = check(ingest(src, stack, color="skip"), canaries)
    for name in ("rgb.png", "rgb.dcm"):
        done.skipped(name, "color")


def test_colour_bt601(tmp_path_factory):
    src, stack, canaries = _colour_folder(tmp_path_factory, "bt601")
    done = check(ingest(src, stack, color="bt601"), canaries)
    for name in ("rgb.png", "rgb.dcm"):
        got = done.stored(name)
        assert got.dtype == np.float64
        assert np.array_equal(got, _luma(RGB, *BT601)), name


# --- links followed ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> Ingested:
    _, src, stack = _folder(tmp_path_factory, "follow")
    good_files(src)
    (src / "link.png").symlink_to(write_raster(src.parent / "elsewhere.png", _gray(20)))
    (src / "sub").mkdir()
    write_raster(src / "sub" / "inner.png", _gray(21))
    (src / "sub" / "loop").symlink_to(src, target_is_directory=True)  # NB: a folder link to its own parent
    (src / "gone.dcm").symlink_to(src / "never_was.dcm")
    return check(ingest(src, stack, follow_symlinks=True))


def test_symlink_followed(followed):
    np.testing.assert_array_equal(followed.stored("link.png"), _gray(20))


def test_symlink_loop(followed):
    """The walk reports the loop, ends, and still stores what is inside the folder."""
    followed.skipped("sub/loop", "symlink-loop")
    np.testing.assert_array_equal(followed.stored("sub/inner.png"), _gray(21))


def test_broken_symlink_followed(followed):
    followed.skipped("gone.dcm", "broken-symlink")


# --- ROI and meta tables, and paths that climb out -----------------------------------------------------------


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """ROI and meta rows naming files outside src, missing files and missing frames; names holding '..'.
    Returns the ingest and the files the ingest created under the test's folder."""
    base, src, stack = _folder(tmp_path_factory, "tables")
    good_files(src)
    write_dicom(src / "a..b.dcm", CT[::-1])
    write_raster(src / "x..png", _gray(30))
    write_raster(base / "outside.png", PNG)  # NB: exists, so only the path rule keeps it out
    rois = base / "rois.csv"
    rois.write_text("source,frame,roi,kind,cx,cy,r\n"
                    "good.png,0,1,square,16,16,3\n"  # line 2
                    "../outside.png,0,1,square,16,16,3\n"  # line 3
                    "missing.png,0,1,square,16,16,3\n"  # line 4
                    "good_ct.dcm,0,1,disk,10,10,2\n"  # line 5
                    "good.png,1,1,square,16,16,3\n"  # line 6: no frame 1
                    "../../etc/passwd,0,1,square,8,8,2\n"  # line 7
                    "a..b.dcm,0,1,square,8,8,2\n")  # line 8
    meta = base / "meta.csv"
    meta.write_text("source,site\n"
                    "good.png,A\n"  # line 2
                    "../rois.csv,B\n"  # line 3
                    "missing.png,C\n"  # line 4
                    "/etc/hostname,D\n"  # line 5
                    "x..png,E\n")  # line 6
    before = _tree(base)
    done = check(ingest(src, stack, rois=rois, meta=meta))
    return done, _tree(base) - before, src


def _lines(done, code: str) -> dict[str, str]:
    p = done.summary.problems
    return dict(zip(p[p["code"] == code]["item"], p[p["code"] == code]["source"], strict=True))


def test_roi_rows_naming_no_image(tables):
    done, _, _ = tables
    assert _lines(done, "roi-no-image") == {"rois line 3": "../outside.png", "rois line 4": "missing.png",
                                            "rois line 6": "good.png", "rois line 7": "../../etc/passwd"}
    rois = gpucnr.open_stack(done.summary.stack).rois
    assert sorted(rois["image"]) == sorted(done.index(s) for s in ("good.png", "good_ct.dcm", "a..b.dcm"))


def test_meta_rows_naming_no_file(tables):
    done, _, _ = tables
    assert _lines(done, "meta-no-image") == {"meta line 3": "../rois.csv", "meta line 4": "missing.png",
                                             "meta line 5": "/etc/hostname"}


def test_nothing_written_outside_the_stack(tables):
    """The only files an ingest creates are the stack and its three siblings; src is untouched."""
    done, new, src = tables
    assert {n for n in new if n != "out/stack" and not n.startswith("out/stack/")} == {
        "out/stack.key", "out/stack.linkage.csv", "out/stack.skipped.csv"}
    assert _tree(src) == {*GOOD, "a..b.dcm", "x..png"}
    np.testing.assert_array_equal(done.stored("a..b.dcm"), CT[::-1])
    np.testing.assert_array_equal(done.stored("x..png"), _gray(30))


def test_roi_csv_without_frame_column(tmp_path_factory):
    """frame is optional in the ROI CSV (source, [frame,] roi, kind, cx, cy, r)."""
    base, src, stack = _folder(tmp_path_factory, "noframe")
    good_files(src)
    rois = base / "rois.csv"
    rois.write_text("source,roi,kind,cx,cy,r\ngood.png,1,square,16,16,3\nmissing.png,1,square,16,16,3\n")
    done = check(ingest(src, stack, rois=rois))
    assert _lines(done, "roi-no-image") == {"rois line 3": "missing.png"}
    assert list(gpucnr.open_stack(stack).rois["image"]) == [done.index("good.png")]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path_factory):
    _, src, stack = _folder(tmp_path_factory, "unreadable")
    canaries = good_files(src)
    bad = write_dicom(src / "locked.dcm", CT[::-1], canary=True)
    canaries += canary_strings(bad)
    bad.chmod(0)
    try:
        check(ingest(src, stack), canaries).skipped("locked.dcm", "unreadable")
    finally:
        bad.chmod(0o600)


# --- decoders that crash or hang -----------------------------------------------------------------------------
# Workers are spawned interpreters that inherit os.environ: a sitecustomize first on PYTHONPATH makes pydicom's
# pixel decoding crash (SIGSEGV) or hang for marked SOP instances, without a hook in gpucnr. The marked files are
# RLE-compressed: uncompressed little-endian ones are read without pydicom's pixel_array (dicom._native_layout).

CRASH, HANG, HOG = ".999001", ".999002", ".999003"

SITECUSTOMIZE = textwrap.dedent('''
    """Test only (gpucnr's test_ingest_bad): pydicom decoding crashes or hangs for marked SOP instances."""
    import os
    import signal
    import time

    _marker = os.environ.get("GPUCNR_TEST_SITE_MARKER")
    if _marker:
        open(os.path.join(_marker, f"loaded-{os.getpid()}"), "w").close()
    try:
        import pydicom.dataset as _dataset
    except ImportError:
        _dataset = None
    if _dataset is not None:
        _original = _dataset.Dataset.pixel_array

        def _pixel_array(self):
            uid = str(self.get("SOPInstanceUID", ""))
            if uid.endswith("%s"):
                os.kill(os.getpid(), signal.SIGSEGV)
            if uid.endswith("%s"):
                time.sleep(float(os.environ.get("GPUCNR_TEST_HANG_S", "3600")))
            if uid.endswith("%s"):
                import numpy

                _hog = numpy.empty(8 * 2**30, numpy.uint8)  # NB: address space only; succeeds without a limit
            return _original.fget(self)

        _dataset.Dataset.pixel_array = property(_pixel_array, doc=_original.__doc__)
''') % (CRASH, HANG, HOG)


@pytest.fixture
def injected(tmp_path, monkeypatch) -> Path:
    """A sitecustomize first on PYTHONPATH; returns the folder where each process that loads it leaves a mark."""
    sitecustomize(tmp_path, monkeypatch, SITECUSTOMIZE)
    marker = tmp_path / "site_loaded"
    marker.mkdir()
    monkeypatch.setenv("GPUCNR_TEST_SITE_MARKER", str(marker))
    monkeypatch.setenv("GPUCNR_TEST_HANG_S", "120")  # NB: ends a hang even if the timeout never fires
    return marker


def _require_injection(marker: Path) -> None:
    if not any(marker.iterdir()):
        pytest.fail("no worker process loaded the test sitecustomize (shadowed by another one, or workers are not "
                    "spawned interpreters): the crash/hang was never injected")


def _injected_skip(tmp_path, injected, name: str, marker: str, code: str, **kw) -> pd.Series:
    """Good files plus `name`, a DICOM whose decoding the test sitecustomize sabotages (`marker`): ingest skips it
    alone, with `code`. RLE-compressed, so that pydicom's pixel_array (the sabotaged call) decodes it."""
    (tmp_path / "src").mkdir()
    canaries = good_files(tmp_path / "src")
    canaries += canary_strings(write_dicom(tmp_path / "src" / name, CT[::-1], sop_uid=_uid(marker), canary=True,
                                           transfer_syntax=RLELossless))
    summary = ingest(tmp_path / "src", tmp_path / "stack", **kw)
    _require_injection(injected)
    return check(summary, canaries).skipped(name, code)


@pytest.mark.slow
def test_decoder_crash(tmp_path, injected):
    row = _injected_skip(tmp_path, injected, "crash.dcm", CRASH, "decoder-crash")
    assert str(-signal.SIGSEGV) in row["reason"], row["reason"]


@pytest.mark.slow
def test_decoder_hang(tmp_path, injected):
    _injected_skip(tmp_path, injected, "hang.dcm", HANG, "decode-timeout", file_timeout=10)


@pytest.mark.slow
def test_decoder_memory_limit(tmp_path, injected):
    """A decode that reserves 8 GiB (more than the per-file budget of 8 x 512 MiB + 1 GiB, less than this
    machine would grant without a limit) fails alone with ``out-of-memory``."""
    _injected_skip(tmp_path, injected, "hog.dcm", HOG, "out-of-memory")
