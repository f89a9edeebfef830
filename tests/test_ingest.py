"""`gpucnr.ingest` beyond pixel decoding: mask files, ROI and meta tables, DICOM SEG, the operator's files beside
the stack, and the `gpucnr ingest / info / filter` command line.

Every ingest is checked for the invariant of DESIGN §8 (files in = stored + skipped + duplicates; images = the
stack's images). Where a stack carries labels, `gpucnr.run` on it must equal `gpucnr.measure` on the same arrays
and labels bit for bit. Images are tiny and synthetic (tests/dicomfactory.py); the mask layouts follow the BUSI
breast-ultrasound dataset (``Dataset_BUSI_with_GT/benign/benign (1).png`` with ``benign (1)_mask.png`` and
``benign (1)_mask_1.png`` beside it, masks 0/255).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicomfactory import write_dicom, write_raster

import gpucnr
from gpucnr.cli import main
from gpucnr.sources.outcomes import CODES

WORKERS = 2
SHAPE = (40, 48)
CELL = ("n_roi", "mean_roi", "var_roi", "n_bg", "mean_bg", "var_bg", "cnr", "status")
IMAGE = ("cnr_median", "n_valid", "n_excluded")
LINKAGE_COLUMNS = ["index", "frame", "source", "file_index", "patient_id", "study_id", "series_id", "instance_id",
                   "source_encoding", "channel", "case"]


# --- helpers ----------------------------------------------------------------------------------------------------


def _disk(cy: int, cx: int, r: int, shape=SHAPE) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _ultrasound(seed: int, lesions=(), shape=SHAPE) -> np.ndarray:
    """A speckled uint8 image with darker (hypoechoic) lesions where the boolean masks `lesions` say."""
    rng = np.random.default_rng(seed)
    img = rng.normal(140, 18, shape)
    for k, m in enumerate(lesions):
        img[m] -= 40 + 10 * k
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@dataclass
class Ingested:
    """One ingest: its summary, opened stack and linkage table."""

    summary: gpucnr.IngestSummary
    stack: gpucnr.store.Stack
    linkage: pd.DataFrame

    def index(self, source: str, frame: int = 0) -> int:
        hit = self.linkage[(self.linkage["source"] == source) & (self.linkage["frame"] == frame)]
        assert len(hit) == 1, (source, frame, self.linkage.to_string())
        return int(hit["index"].iloc[0])

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored pixels and labels (valid extent) of one image."""
        row = self.stack.images.iloc[index]
        assert int(row["index"]) == index
        bucket = next(b for b in self.stack.buckets if b.name == row["bucket"])
        images, labels = self.stack.read(bucket, int(row["position"]), int(row["position"]) + 1)
        h, w = int(row["valid_h"]), int(row["valid_w"])
        return images[0, :h, :w], None if labels is None else labels[0, :h, :w]


def check(summary: gpucnr.IngestSummary) -> Ingested:
    """The invariants of every ingest: the accounting, the problem list and its file, the linkage file."""
    assert summary.files_in == summary.stored + sum(summary.skipped.values()) + summary.duplicates
    stack = gpucnr.open_stack(summary.stack)
    assert summary.images == stack.n_images
    problems = summary.problems
    assert set(problems["code"]) <= set(CODES)
    files = problems[problems["item"] == "file"]
    assert files[files["code"] != "duplicate"]["code"].value_counts().to_dict() == summary.skipped
    others = problems[problems["item"] != "file"]["code"].value_counts().to_dict()
    assert others == summary.other_problems
    listed = pd.read_csv(summary.skipped_list, dtype=str, keep_default_na=False)
    assert listed.to_numpy().tolist() == problems.astype(str).to_numpy().tolist()
    linkage = pd.read_csv(summary.linkage, dtype={"source": str}, keep_default_na=False)
    assert list(linkage.columns) == LINKAGE_COLUMNS
    assert sorted(linkage["index"]) == list(range(summary.images))
    assert linkage["source"].nunique() == summary.stored
    attrs = dict(stack.group.attrs)["ingest"]
    assert (attrs["files_in"], attrs["stored"], attrs["duplicates"], attrs["images"]) == (
        summary.files_in, summary.stored, summary.duplicates, summary.images)
    return Ingested(summary, stack, linkage)


def ingest(src, stack, **kw) -> Ingested:
    kw.setdefault("workers", WORKERS)
    return check(gpucnr.ingest(src, stack, **kw))


def assert_run_equals_measure(done: Ingested, images: dict, labels: dict, results: Path) -> None:
    """`gpucnr.run` on the stack (labels as ROIs) == `gpucnr.measure` on the same arrays and labels, bit for bit.

    `images` and `labels` map a source to its array; all of one shape and dtype, stacked in global-index order.
    """
    order = done.linkage.sort_values("index")["source"].tolist()
    ref = gpucnr.measure(np.stack([images[s] for s in order]), np.stack([labels[s] for s in order]))
    got = gpucnr.run(done.stack.path, results, workers=WORKERS).load()
    np.testing.assert_array_equal(got["roi"], ref["roi"])
    assert (ref["status"] == 0).any()
    for var in (*CELL, *IMAGE):
        np.testing.assert_array_equal(got[var].to_numpy(), ref[var].to_numpy(), err_msg=var)


def no_decoding(monkeypatch) -> None:
    """Make any start of ingest's worker pool a test failure: what follows must fail before decoding."""

    def refuse(*args, **kwargs):
        raise AssertionError("ingest started its worker pool (decoding) before rejecting its input")

    monkeypatch.setattr(sys.modules[gpucnr.ingest.__module__], "IsolatedPool", refuse)


def assert_nothing_written(stack: Path) -> None:
    assert not stack.exists()
    for ext in (".key", ".linkage.csv", ".skipped.csv"):
        assert not stack.with_name(stack.name + ext).exists(), ext


# --- mask files -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    """BUSI layout, masks beside their images (``{stem}_mask.png``): a 0/255 mask, a labelled mask (1, 2, 3),
    an all-zero mask, an image without a mask, and a mask without an image."""
    root = tmp_path_factory.mktemp("busi")
    src = root / "src"
    folder = src / "Dataset_BUSI_with_GT"
    images, labels = {}, {}

    def add(rel: str, img: np.ndarray, mask: np.ndarray | None, lab: np.ndarray | None) -> None:
        write_raster(src / rel, img)
        if mask is not None:
            write_raster((src / rel).with_name(Path(rel).stem + "_mask.png"), mask)
        images[rel], labels[rel] = img, lab if lab is not None else np.zeros(SHAPE, np.int32)

    lesion = _disk(20, 22, 7)
    add("Dataset_BUSI_with_GT/benign/benign (1).png", _ultrasound(1, [lesion]), np.where(lesion, 255, 0).astype(
        np.uint8), lesion.astype(np.int32))
    parts = [_disk(12, 12, 5), _disk(26, 34, 6), _disk(28, 12, 4)]
    labelled = sum((k + 1) * p for k, p in enumerate(parts)).astype(np.int32)
    add("Dataset_BUSI_with_GT/malignant/malignant (1).png", _ultrasound(2, parts), labelled.astype(np.uint8),
        labelled)
    add("Dataset_BUSI_with_GT/normal/normal (1).png", _ultrasound(3), np.zeros(SHAPE, np.uint8), None)
    add("Dataset_BUSI_with_GT/normal/normal (2).png", _ultrasound(4), None, None)
    write_raster(folder / "benign" / "ghost_mask.png", np.where(lesion, 255, 0).astype(np.uint8))
    done = ingest(src, root / "stack", mask_pattern="{stem}_mask.png")
    return {"done": done, "images": images, "labels": labels, "src": src, "root": root}


def test_masks_beside_images(busi):
    """Masks beside their images are labels, not inputs: 0/255 -> label 1, a labelled mask keeps 1, 2, 3, an
    image without a mask is stored unlabelled (and counted), a mask matching no image is reported."""
    done = busi["done"]
    s = done.summary
    assert (s.files_in, s.stored, s.images, s.skipped, s.duplicates) == (4, 4, 4, {}, 0)
    assert (s.masks, s.unlabelled_images) == (3, 1)
    assert done.stack.has_labels
    assert list(done.stack.roi_ids) == [1, 2, 3]
    problems = s.problems
    assert problems[["source", "item", "code"]].values.tolist() == [
        ["Dataset_BUSI_with_GT/benign/ghost_mask.png", "mask", "mask-no-image"]]
    assert s.other_problems == {"mask-no-image": 1}
    for source, want in busi["labels"].items():
        pixels, labels = done.read(done.index(source))
        np.testing.assert_array_equal(pixels, busi["images"][source], strict=True)
        np.testing.assert_array_equal(labels, want, strict=True)


def test_masks_beside_run_equals_measure(busi):
    """The run over the ingested stack equals measure on the original arrays and masks, bit for bit."""
    assert_run_equals_measure(busi["done"], busi["images"], busi["labels"], busi["root"] / "results")


def test_two_masks_per_image_union(tmp_path):
    """``{stem}_mask*.png``: every matching mask of an image is merged; overlapping binary masks give their
    union as label 1."""
    src = tmp_path / "src"
    a, b = _disk(18, 18, 7), _disk(22, 26, 7)  # NB: overlapping
    c = _disk(20, 30, 6)
    images = {"benign (3).png": _ultrasound(5, [a | b]), "malignant (2).png": _ultrasound(6, [c])}
    for name, img in images.items():
        write_raster(src / name, img)
    write_raster(src / "benign (3)_mask.png", np.where(a, 255, 0).astype(np.uint8))
    write_raster(src / "benign (3)_mask_1.png", np.where(b, 255, 0).astype(np.uint8))
    write_raster(src / "malignant (2)_mask.png", np.where(c, 255, 0).astype(np.uint8))
    done = ingest(src, tmp_path / "stack", mask_pattern="{stem}_mask*.png")
    s = done.summary
    assert (s.files_in, s.stored, s.masks, s.unlabelled_images) == (2, 2, 3, 0)
    assert s.problems.empty, s.problems.to_string()
    labels = {"benign (3).png": (a | b).astype(np.int32), "malignant (2).png": c.astype(np.int32)}
    for source, want in labels.items():
        np.testing.assert_array_equal(done.read(done.index(source))[1], want, strict=True)
    assert_run_equals_measure(done, images, labels, tmp_path / "results")


def test_mask_folder_mirrors_subfolders(tmp_path):
    """``masks=DIR`` (pattern ``{stem}.*``): a mask belongs to the image of the same name in the same relative
    folder only; images of one name in two folders get their own masks; a mask whose folder lacks the image is
    reported (item "mask"), even if another folder has an image of that name."""
    src, masks = tmp_path / "src", tmp_path / "masks"
    a, b1, b2 = _disk(20, 20, 8), _disk(12, 14, 5), _disk(28, 34, 6)
    images = {"a/img.png": _ultrasound(7, [a]), "b/img.png": _ultrasound(8, [b1, b2]), "b/extra.png": _ultrasound(9)}
    for rel, img in images.items():
        write_raster(src / rel, img)
    write_raster(masks / "a" / "img.png", np.where(a, 255, 0).astype(np.uint8))
    write_raster(masks / "b" / "img.png", (b1 + 2 * b2).astype(np.uint8))
    write_raster(masks / "a" / "extra.png", np.where(a, 255, 0).astype(np.uint8))
    done = ingest(src, tmp_path / "stack", masks=masks)
    s = done.summary
    assert (s.files_in, s.stored, s.masks, s.unlabelled_images) == (3, 3, 2, 1)
    assert s.problems[["source", "item", "code"]].values.tolist() == [["a/extra.png", "mask", "mask-no-image"]]
    labels = {"a/img.png": a.astype(np.int32), "b/img.png": (b1 + 2 * b2).astype(np.int32),
              "b/extra.png": np.zeros(SHAPE, np.int32)}
    for source, want in labels.items():
        np.testing.assert_array_equal(done.read(done.index(source))[1], want, strict=True)
    assert_run_equals_measure(done, images, labels, tmp_path / "results")


def test_numpy_label_arrays_as_masks(tmp_path):
    """NumPy ``.npy`` label arrays are masks too (told by content): a 2-D label map for a PNG, a (frames, rows,
    cols) stack for a multi-frame DICOM; a pickled object array is refused (``mask-unreadable``) and a plane
    count that differs from the frames is ``mask-shape``, both naming the mask, their images stored unlabelled."""
    src, masks = tmp_path / "src", tmp_path / "masks"
    a, b = _disk(20, 20, 8), _disk(14, 30, 6)
    png = _ultrasound(11, [a, b])
    write_raster(src / "us.png", png)
    masks.mkdir()
    np.save(masks / "us.npy", (a + 3 * b).astype(np.uint16))
    frames = np.stack([_ultrasound(12 + f, [a]).astype(np.uint16) for f in range(3)])
    write_dicom(src / "mf.dcm", frames, modality="US")
    np.save(masks / "mf.npy", np.stack([a * (f + 1) for f in range(3)]).astype(np.int32))
    write_raster(src / "pickled.png", _ultrasound(13))  # NB: other bytes than us.png, or it is a duplicate
    np.save(masks / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    write_raster(src / "short.png", _ultrasound(14))
    np.save(masks / "short.npy", np.stack([a, a]).astype(np.uint8))
    done = ingest(src, tmp_path / "stack", masks=masks, mask_pattern="{stem}.npy")
    s = done.summary
    # NB: a bad mask never loses its image: the image is stored unlabelled and the mask listed (item "mask")
    assert (s.files_in, s.stored, s.skipped, s.unlabelled_images) == (4, 4, {}, 2)
    assert s.other_problems == {"mask-shape": 1, "mask-unreadable": 1}
    rows = s.problems.set_index("source")
    assert (rows.loc[["pickled.png", "short.png"], "item"] == "mask").all()
    assert "pickled.npy" in rows.loc["pickled.png", "reason"] and "short.npy" in rows.loc["short.png", "reason"]
    for source in ("pickled.png", "short.png"):
        assert not done.read(done.index(source))[1].any()
    np.testing.assert_array_equal(done.read(done.index("us.png"))[1], (a + 3 * b).astype(np.int32), strict=True)
    for f in range(3):
        np.testing.assert_array_equal(done.read(done.index("mf.dcm", f))[1], (a * (f + 1)).astype(np.int32),
                                      strict=True)


# --- the operator's files beside the stack ----------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sidecar_files_and_no_source_path_in_stack(busi):
    """Beside the stack: the key (64 hex digits), the linkage file (index -> source) and the skipped-files list,
    all readable by their owner only. The stack itself holds no source path: not in any of its files, not in its
    image table, not in its attributes."""
    done, src = busi["done"], busi["src"]
    stack = done.stack.path
    key = stack.with_name(stack.name + ".key")
    assert done.summary.key_file == key
    text = key.read_text(encoding="ascii").strip()
    assert len(text) == 64 and all(c in "0123456789abcdef" for c in text)
    linkage = stack.with_name(stack.name + ".linkage.csv")
    skipped = stack.with_name(stack.name + ".skipped.csv")
    assert (done.summary.linkage, done.summary.skipped_list) == (linkage, skipped)
    for path in (key, linkage, skipped):
        assert _mode(path) == 0o600, (path.name, oct(_mode(path)))
    assert list(pd.read_csv(linkage).columns) == LINKAGE_COLUMNS
    assert set(done.linkage["source"]) == set(busi["images"])
    needles = ["Dataset_BUSI_with_GT", "benign (1)", "ghost_mask", str(src)]
    for path in stack.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in data, (needle, path)
    cells = [str(v) for v in done.stack.images.to_numpy().ravel()] + [json.dumps(dict(done.stack.group.attrs))]
    for needle in needles:
        assert not any(needle in c for c in cells), needle


# --- ROI table --------------------------------------------------------------------------------------------------

ROI_CSV = """source,frame,roi,kind,cx,cy,r,name
a.png,,1,square,10,10,3,lesion
c.tiff,2,1,disk,16,16,4,
c.tiff,0,2,square,8,8,2,corner
b.dcm,1,1,square,20,20,4,
c.tiff,5,1,square,8,8,2,
missing.png,0,1,square,8,8,2,
"""


def test_roi_csv_against_global_index(tmp_path):
    """ROI rows (source, frame) land on the right image of the stack's global index (three buckets, so the index
    is not the input order), with kind, centre, radius and name kept; rows naming no stored image or frame are
    reported as 'rois line N'. The run over the stack's ROI table equals measure on each image and its rows."""
    src = tmp_path / "src"
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, (32, 40)).astype(np.uint8)
    b = rng.integers(-500, 500, (3, 48, 48)).astype(np.int16)
    c = [rng.integers(0, 4096, (32, 32)).astype(np.uint16) for _ in range(3)]
    write_raster(src / "a.png", a)
    write_dicom(src / "b.dcm", b, modality="OT")
    write_raster(src / "c.tiff", frames=c, fmt="TIFF")
    rois = tmp_path / "rois.csv"
    rois.write_text(ROI_CSV)
    done = ingest(src, tmp_path / "stack", rois=rois)
    s = done.summary
    assert (s.files_in, s.stored, s.images) == (3, 3, 7)
    assert done.index("a.png") != 0, "the test needs a global index that differs from the input order"
    problems = s.problems
    assert problems[["source", "item", "code"]].values.tolist() == [
        ["c.tiff", "rois line 6", "roi-no-image"], ["missing.png", "rois line 7", "roi-no-image"]]
    assert s.other_problems == {"roi-no-image": 2}
    table = gpucnr.open_stack(done.stack.path).rois
    csv = pd.read_csv(rois, dtype=str, keep_default_na=False).iloc[:4]
    assert len(table) == len(csv)
    pixels = {("a.png", 0): a, **{("b.dcm", f): b[f] for f in range(3)}, **{("c.tiff", f): c[f] for f in range(3)}}
    results = gpucnr.run(done.stack.path, tmp_path / "results", workers=WORKERS).load()
    for _, want in csv.iterrows():
        frame = int(want["frame"] or 0)
        image = done.index(want["source"], frame)
        hit = table[(table["image"] == image) & (table["roi"] == int(want["roi"]))]
        assert len(hit) == 1, table.to_string()
        got = hit.iloc[0]
        assert (got["kind"], int(got["cx"]), int(got["cy"]), int(got["r"]), got["name"]) == (
            want["kind"], int(want["cx"]), int(want["cy"]), int(want["r"]), want["name"])
        np.testing.assert_array_equal(done.read(image)[0], pixels[(want["source"], frame)], strict=True)
        rows = table[table["image"] == image].assign(image=0)
        ref = gpucnr.measure(pixels[(want["source"], frame)], rows)
        for var in CELL:
            np.testing.assert_array_equal(results[var].sel(image=image, roi=ref["roi"]), ref[var].isel(image=0),
                                          err_msg=var)


BAD_ROI_CSV = {
    "non-integer cx": ("source,roi,kind,cx,cy,r\na.png,1,square,10,10,3\na.png,2,square,1.5,10,3\n", "line 3"),
    "missing column": ("source,roi,kind,cx,cy\na.png,1,square,10,10\n", "missing column"),
    "kind circle": ("source,roi,kind,cx,cy,r\na.png,1,square,10,10,3\na.png,2,circle,10,10,3\n", "line 3"),
}


@pytest.mark.parametrize("case", list(BAD_ROI_CSV))
def test_malformed_roi_csv_fails_before_decoding(tmp_path, monkeypatch, case):
    """A malformed ROI table is a RoiTableError naming the problem, raised before any worker starts: no stack,
    no key, no linkage or skipped list is left behind."""
    text, where = BAD_ROI_CSV[case]
    src = tmp_path / "src"
    write_raster(src / "a.png", _ultrasound(1))
    rois = tmp_path / "rois.csv"
    rois.write_text(text)
    no_decoding(monkeypatch)
    stack = tmp_path / "stack"
    with pytest.raises(gpucnr.RoiTableError) as err:
        gpucnr.ingest(src, stack, rois=rois, workers=WORKERS)
    assert err.value.code == "roi-table"
    assert where in str(err.value)
    assert_nothing_written(stack)


# --- meta table -------------------------------------------------------------------------------------------------

META_CSV = """source,site,split,patient_id
p1a.png,A,train,PAT-0001
p1b.tiff,A,test,PAT-0001
p2.png,B,train,PAT-0002
missing.png,C,val,PAT-0003
"""


def _meta_source(src: Path) -> None:
    write_raster(src / "p1a.png", _ultrasound(21))
    write_raster(src / "p1b.tiff", frames=[_ultrasound(22).astype(np.uint16), _ultrasound(23).astype(np.uint16)],
                 fmt="TIFF")
    write_raster(src / "p2.png", _ultrasound(24))
    write_raster(src / "nometa.png", _ultrasound(25))


def _per_source(done: Ingested, column: str) -> dict[str, list[str]]:
    table = done.stack.images.set_index("index")
    return {s: [str(table.loc[i, column]) for i in sorted(g["index"])] for s, g in done.linkage.groupby("source")}


def test_meta_csv_joined_and_pseudonymised(tmp_path):
    """--meta columns are joined per file onto every frame (files without a row get ""); patient_id is replaced
    by a keyed pseudonym (never the raw value; one value, one pseudonym; the linkage file agrees); a row naming
    no file is reported. The same key file in another ingest gives the same pseudonyms, another key other ones."""
    src = tmp_path / "src"
    _meta_source(src)
    meta = tmp_path / "meta.csv"
    meta.write_text(META_CSV)
    shared, other = tmp_path / "shared.key", tmp_path / "other.key"
    first = ingest(src, tmp_path / "one", meta=meta, key_file=shared)
    s = first.summary
    assert (s.files_in, s.stored, s.images) == (4, 4, 5)
    assert s.key_file == shared and shared.exists() and not (tmp_path / "one.key").exists()
    assert s.problems[["source", "item", "code"]].values.tolist() == [["missing.png", "meta line 5", "meta-no-image"]]
    assert _per_source(first, "site") == {"p1a.png": ["A"], "p1b.tiff": ["A", "A"], "p2.png": ["B"], "nometa.png": [""]}
    assert _per_source(first, "split") == {"p1a.png": ["train"], "p1b.tiff": ["test", "test"], "p2.png": ["train"],
                                           "nometa.png": [""]}
    ids = _per_source(first, "patient_id")
    p1 = ids["p1a.png"][0]
    assert ids["p1b.tiff"] == [p1, p1]
    assert ids["nometa.png"] == [""]
    assert ids["p2.png"][0] not in ("", p1)
    for pseudo in (p1, ids["p2.png"][0]):
        assert len(pseudo) == 20 and all(c in "0123456789abcdef" for c in pseudo)
    cells = [str(v) for v in first.stack.images.to_numpy().ravel()] + [s.linkage.read_text()]
    assert not any("PAT-000" in c for c in cells), "a raw patient id reached the stack or the linkage file"
    linked = first.linkage.set_index("index")["patient_id"]
    table = first.stack.images.set_index("index")["patient_id"]
    assert all(str(linked[i]) == str(table[i]) for i in table.index)

    again = ingest(src, tmp_path / "two", meta=meta, key_file=shared)
    assert _per_source(again, "patient_id") == ids
    rekeyed = ingest(src, tmp_path / "three", meta=meta, key_file=other)
    new = _per_source(rekeyed, "patient_id")
    assert new["p1b.tiff"] == [new["p1a.png"][0]] * 2
    assert new["p1a.png"][0] != p1 and new["p2.png"][0] != ids["p2.png"][0]


@pytest.mark.parametrize("column", ["slope", "photometric", "index"])
def test_meta_column_clash_fails_up_front(tmp_path, monkeypatch, column):
    """A --meta column that is one of the stack's own (slope, photometric, index, ...) is an InputError before
    any worker starts; nothing is written."""
    src = tmp_path / "src"
    write_raster(src / "a.png", _ultrasound(1))
    meta = tmp_path / "meta.csv"
    meta.write_text(f"source,site,{column}\na.png,A,1\n")
    no_decoding(monkeypatch)
    stack = tmp_path / "stack"
    with pytest.raises(gpucnr.InputError) as err:
        gpucnr.ingest(src, stack, meta=meta, workers=WORKERS)
    assert column in str(err.value) and "site" not in str(err.value)
    assert_nothing_written(stack)


# --- DICOM SEG (highdicom) --------------------------------------------------------------------------------------

#: what highdicom needs of a source image beyond what the factory writes
SEG_SOURCE = {"PatientName": "Doe^Jane", "PatientSex": "O", "PatientBirthDate": "19000101", "StudyDate": "20000101",
              "StudyTime": "000000", "ReferringPhysicianName": "", "StudyID": "1", "AccessionNumber": "1",
              "SeriesNumber": 1, "ImagePositionPatient": [0, 0, 0], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
              "SliceThickness": 1.0}
CT_SHAPE = (32, 40)


def _write_seg(source: Path, masks: list[np.ndarray], out: Path) -> None:
    """A BINARY DICOM SEG of `source` with one segment per mask (segment numbers 1, 2, ...)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=k + 1, segment_label=f"lesion {k + 1}", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for k in range(len(masks))]
    seg = hd.seg.Segmentation(
        source_images=[ds], pixel_array=np.stack(masks, axis=-1)[None], segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=100,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="gpucnr tests",
        manufacturer_model_name="dicomfactory", software_versions="1", device_serial_number="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)


@pytest.fixture(scope="module")
def seg_case(tmp_path_factory):
    """Three CTs under src: ct1 with a two-segment SEG, ct2 with a one-segment SEG, ct3 with none; and a SEG of a
    CT that is not under src."""
    root = tmp_path_factory.mktemp("seg")
    src, segs = root / "src", root / "seg"
    rng = np.random.default_rng(31)
    cts = {name: rng.integers(-100, 100, CT_SHAPE).astype(np.int16) for name in ("ct1.dcm", "ct2.dcm", "ct3.dcm")}
    for name, pixels in cts.items():
        write_dicom(src / name, pixels, extra=SEG_SOURCE)
    elsewhere = write_dicom(root / "elsewhere" / "ct9.dcm", cts["ct1.dcm"], extra=SEG_SOURCE)
    m1, m2, m3 = _disk(8, 10, 4, CT_SHAPE), _disk(22, 28, 6, CT_SHAPE), _disk(16, 20, 9, CT_SHAPE)
    _write_seg(src / "ct1.dcm", [m1, m2], segs / "ct1_seg.dcm")
    _write_seg(src / "ct2.dcm", [m3], segs / "ct2_seg.dcm")
    _write_seg(elsewhere, [m1], segs / "stray_seg.dcm")
    done = ingest(src, root / "stack", seg=segs)
    labels = {"ct1.dcm": (m1 + 2 * m2).astype(np.int32), "ct2.dcm": m3.astype(np.int32),
              "ct3.dcm": np.zeros(CT_SHAPE, np.int32)}
    return {"done": done, "cts": cts, "labels": labels}


def test_seg_segments_become_labels(seg_case):
    """Segment numbers of a DICOM SEG become the labels of the image it references (two segments -> 1 and 2);
    an image no SEG references is stored unlabelled; SEG objects are not inputs."""
    done = seg_case["done"]
    s = done.summary
    assert (s.files_in, s.stored, s.images, s.unlabelled_images) == (3, 3, 3, 1)
    problems = s.problems
    assert problems[problems["source"].isin(["ct1_seg.dcm", "ct2_seg.dcm"])].empty, problems.to_string()
    assert done.stack.has_labels and list(done.stack.roi_ids) == [1, 2]
    for name, want in seg_case["labels"].items():
        pixels, labels = done.read(done.index(name))
        np.testing.assert_array_equal(pixels, seg_case["cts"][name], strict=True)
        np.testing.assert_array_equal(labels, want, strict=True)


def test_seg_referencing_no_ingested_image(seg_case):
    """A SEG whose source image is not among the ingested files labels nothing and is reported: seg-no-image,
    item "seg" (outcomes.CODES: "a DICOM SEG references no stored image")."""
    s = seg_case["done"].summary
    rows = s.problems[s.problems["source"] == "stray_seg.dcm"]
    assert rows[["item", "code"]].values.tolist() == [["seg", "seg-no-image"]], s.problems.to_string()
    assert s.other_problems.get("seg-no-image") == 1


# --- the public name --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["gpucnr.IngestSummary", "from gpucnr.sources.driver import sidecar_paths",
                                   "import gpucnr.sources.driver"])
def test_gpucnr_ingest_is_the_function_whatever_is_touched_first(first):
    """`gpucnr.ingest` (and `gpucnr.sources.ingest`) is the ingest function in a fresh interpreter whatever was
    imported first: the lazy package attributes must never be shadowed by a submodule of the same name."""
    code = (f"import gpucnr\n{first}\nimport gpucnr.sources\n"
            "assert callable(gpucnr.ingest), type(gpucnr.ingest)\n"
            "assert callable(gpucnr.sources.ingest), type(gpucnr.sources.ingest)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- command line -----------------------------------------------------------------------------------------------


def test_cli_ingest_info_filter_with_paths(tmp_path, capsys):
    """`python -m gpucnr ingest` exits 0 with its summary; `gpucnr info` shows the ingest's counts; `gpucnr
    filter --with-paths` adds source and frame, equal to the linkage file's, and without it there is no source
    column; --with-paths on a stack made by write_stack (no linkage file) exits 2 with a coded error."""
    src = tmp_path / "src"
    write_raster(src / "a.png", _ultrasound(41, [_disk(20, 24, 6)]))
    write_raster(src / "b.png", _ultrasound(42, [_disk(18, 20, 6)]))
    write_raster(src / "sub" / "c.tiff", frames=[_ultrasound(43, [_disk(20, 24, 6)]), _ultrasound(44)], fmt="TIFF")
    rois = tmp_path / "rois.csv"
    rois.write_text("source,frame,roi,kind,cx,cy,r\na.png,0,1,disk,24,20,4\nb.png,0,1,disk,20,18,4\n"
                    "sub/c.tiff,0,1,disk,24,20,4\nsub/c.tiff,1,1,disk,24,20,4\n")
    stack = tmp_path / "stack.zarr"
    proc = subprocess.run([sys.executable, "-m", "gpucnr", "ingest", str(src), str(stack), "--workers", "2",
                           "--rois", str(rois)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert "4 image(s) from 3 file(s); 3 file(s) in, 0 skipped, 0 duplicate(s)" in proc.stdout, proc.stdout
    opened = gpucnr.open_stack(stack)
    counts = dict(opened.group.attrs)["ingest"]
    assert counts["files_in"] == counts["stored"] + sum(counts["skipped"].values()) + counts["duplicates"]
    assert counts["images"] == opened.n_images == 4

    assert main(["info", str(stack)]) == 0
    out = capsys.readouterr().out
    assert "ingest: 3 file(s) in = 3 stored + 0 skipped + 0 duplicate(s); 4 image(s) stored" in out, out

    results = tmp_path / "results.zarr"
    assert main(["run", str(stack), str(results), "--workers", "2"]) == 0
    capsys.readouterr()
    with_paths, plain = tmp_path / "m.csv", tmp_path / "plain.csv"
    assert main(["filter", str(results), "--out", str(with_paths), "--with-paths"]) == 0
    assert main(["filter", str(results), "--out", str(plain)]) == 0
    capsys.readouterr()
    table, _ = gpucnr.read_manifest(with_paths)
    linkage = pd.read_csv(stack.with_name("stack.zarr.linkage.csv"), dtype={"source": str}, keep_default_na=False)
    assert len(table) == 4
    merged = table.merge(linkage, left_on="image", right_on="index", suffixes=("", "_link"), validate="one_to_one")
    assert merged["source"].astype(str).tolist() == merged["source_link"].tolist()
    assert merged["frame"].astype(int).tolist() == merged["frame_link"].astype(int).tolist()
    assert set(table["source"]) == {"a.png", "b.png", "sub/c.tiff"}
    bare, _ = gpucnr.read_manifest(plain)
    assert "source" not in bare.columns and "frame" not in bare.columns

    written = tmp_path / "written.zarr"
    gpucnr.write_stack(written, np.stack([_ultrasound(51, [_disk(20, 24, 6)])]),
                       rois={"image": [0], "roi": [1], "kind": ["disk"], "cx": [24], "cy": [20], "r": [4]})
    gpucnr.run(written, tmp_path / "written_results.zarr", workers=1)
    assert main(["filter", str(tmp_path / "written_results.zarr"), "--out", str(tmp_path / "w.csv"),
                 "--with-paths"]) == 2
    err = capsys.readouterr().err
    assert "gpucnr: error [bad-input]" in err and "linkage" in err, err
    assert not (tmp_path / "w.csv").exists()


_DISK_FULL = """
import json, resource, signal, sys
import gpucnr
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    gpucnr.ingest(sys.argv[1], sys.argv[2], workers=2)
except gpucnr.GpucnrError as e:
    print(json.dumps({"code": e.code, "message": str(e)}))
    sys.exit(3)
print("completed")
"""


def test_disk_full_is_a_coded_error_and_keeps_the_skipped_list(tmp_path):
    """A full disk while shards are written (RLIMIT_FSIZE stands in for it: a shard of incompressible images
    passes the limit) is the coded error ``stack-write`` naming the stack, not an OSError from a thread; the
    skipped-files list, with what was learnt about the files, is still written."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(20):
        write_raster(src / f"noise{i:02d}.png", rng.integers(0, 65535, (64, 64), dtype=np.uint16))
    (src / "notes.txt").write_text("not an image")
    stack = tmp_path / "stack.zarr"
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL, str(src), str(stack)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["code"] == "stack-write" and "stack.zarr" in err["message"], err
    listed = pd.read_csv(tmp_path / "stack.zarr.skipped.csv", dtype=str, keep_default_na=False)
    assert listed[["source", "code"]].values.tolist() == [["notes.txt", "not-an-image"]]
    with pytest.raises(gpucnr.StackError):
        gpucnr.open_stack(stack)  # NB: never marked a stack: an interrupted ingest cannot be mistaken for one
