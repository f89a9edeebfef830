"""What a new user of the NIfTI / JPEG layouts is told (the walk of issue 14): a source folder that is one part of
a layout, Kvasir-SEG's images/ + masks/, channel names as ``modality``, a malformed dataset.json, filter's warnings
on volumes and empty grouping columns, and the messages that named the wrong thing.

Volumes are tiny (16x12x4) and written by nibabel; every command runs in-process (`gpucnr.cli.main`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dicomfactory import write_raster
from test_ingest import WORKERS, ingest

import gpucnr
from gpucnr.cli import main
from gpucnr.sources.driver import _Ingest, sidecar_paths
from gpucnr.sources.problems import problem_groups

SHAPE = (16, 12, 4)


def _nii(path: Path, arr, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), path)


def _labels() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:9, 3:8, 1] = 1
    lab[10:14, 6:10, 1] = 2
    return lab


def _nnunet(root: Path, *, cases=("a", "b"), channels=("T1", "T2"), dataset_json=None) -> Path:
    rng = np.random.default_rng(0)
    for case in cases:
        for ch in range(len(channels)):
            _nii(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz", rng.integers(0, 500, SHAPE).astype(np.int16))
        _nii(root / "labelsTr" / f"{case}.nii.gz", _labels())
    text = dataset_json if dataset_json is not None else json.dumps(
        {"channel_names": {str(k): v for k, v in enumerate(channels)},
         "labels": {"background": 0, "tumour": 1, "edema": 2}})
    (root / "dataset.json").write_text(text)
    return root


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- A: a source folder that is one part of a layout -------------------------------------------------------------


def test_imagesTr_as_source_says_its_labels_were_not_read(tmp_path, capsys):
    root = _nnunet(tmp_path / "Dataset001_X")
    rc, out, err = _cli(capsys, "ingest", root / "imagesTr", tmp_path / "s.zarr", "--workers", WORKERS)
    assert rc == 0, err
    assert ("SRC looks like the imagesTr folder of a dataset; its labels in ../labelsTr were not read: point "
            "ingest at the dataset root") in err
    assert f"images with neither a mask nor an ROI-table row: {4 * SHAPE[2]}" in out


def test_labelsTr_as_source_is_refused_and_writes_nothing(tmp_path, capsys):
    root = _nnunet(tmp_path / "Dataset001_X")
    rc, _, err = _cli(capsys, "ingest", root / "labelsTr", tmp_path / "s.zarr", "--workers", WORKERS)
    assert rc == 2 and "looks like the labelsTr folder" in err and "dataset root" in err, err
    # NB: label maps under another name, told by their names: the cases of the sibling imagesTr/
    (root / "labelsTr").rename(root / "segmentations")
    rc, _, err = _cli(capsys, "ingest", root / "segmentations", tmp_path / "s.zarr", "--workers", WORKERS)
    assert rc == 2 and "looks like the label maps of ../imagesTr" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_X"]


def test_kvasir_images_and_masks_are_a_layout(tmp_path, capsys):
    """images/ + masks/ with the same stems: masks label their images without flags; JPEG masks are refused by
    the anti-aliasing rule with a cause that names --mask-threshold, and read with it."""
    rng = np.random.default_rng(1)
    src = tmp_path / "kvasir"
    yy, xx = np.mgrid[:40, :48]
    for k in range(2):
        m = (yy - 20) ** 2 + (xx - 20 - 4 * k) ** 2 < 100
        img = np.clip(rng.normal(100, 10, (40, 48)) + 40 * m, 0, 255).astype(np.uint8)
        write_raster(src / "images" / f"c{k}.png", img)
        write_raster(src / "masks" / f"c{k}.png", (m * 255).astype(np.uint8))
    done = ingest(src, tmp_path / "s.zarr")
    assert (done.summary.stored, done.summary.masks, done.summary.unlabelled_images) == (2, 2, 0)
    assert "Kvasir-SEG (images/ + masks/)" in dict(done.stack.group.attrs)["ingest"]["layouts"]

    from PIL import Image

    jpg = tmp_path / "kvasir_jpg"
    for k in range(2):
        m = (yy - 20) ** 2 + (xx - 20 - 4 * k) ** 2 < 100
        (jpg / "images").mkdir(parents=True, exist_ok=True)
        (jpg / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rng.normal(100, 10, (40, 48)), 0, 255).astype(np.uint8)).save(
            jpg / "images" / f"c{k}.jpg", quality=90)
        Image.fromarray((m * 255).astype(np.uint8)).save(jpg / "masks" / f"c{k}.jpg", quality=75)
    rc, out, err = _cli(capsys, "ingest", jpg, tmp_path / "j.zarr", "--workers", WORKERS)
    assert rc == 3 and "[mask-labels 2]" in err and "--mask-threshold T" in err, err
    rc, out, err = _cli(capsys, "ingest", jpg, tmp_path / "j2.zarr", "--workers", WORKERS, "--mask-threshold", 127)
    assert rc == 0 and "mask files used: 2; images with neither a mask nor an ROI-table row: 0" in out, out + err
    # NB: --masks inside SRC_DIR beside images/: masks/x.jpg labels images/x.jpg, and is not an image
    rc, out, err = _cli(capsys, "ingest", jpg, tmp_path / "j3.zarr", "--workers", WORKERS, "--masks", jpg / "masks",
                        "--mask-threshold", 127)
    assert rc == 0 and "2 image(s) from 2 file(s)" in out and "mask files used: 2;" in out, out + err


# --- C, D, F: dataset.json, modality, litter ----------------------------------------------------------------------


def test_modality_from_layouts(tmp_path):
    """nnU-Net v2's channel_names, MSD's modality (4-D channels) and BraTS file-name suffixes fill ``modality``;
    the dataset.json and AppleDouble files are neither counted nor listed."""
    rng = np.random.default_rng(2)
    _nnunet(tmp_path / "src" / "Dataset001_X", cases=("a",), channels=("T1", "T2"))
    (tmp_path / "src" / "Dataset001_X" / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    msd = tmp_path / "src" / "Task01_X"
    _nii(msd / "imagesTr" / "m.nii.gz", rng.normal(100, 10, (*SHAPE, 3)).astype(np.float32))
    _nii(msd / "labelsTr" / "m.nii.gz", _labels())
    (msd / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"},
                                                  "labels": {"0": "background", "1": "edema", "2": "tumour"}}))
    brats = tmp_path / "src" / "BraTS-GLI-00001-000"
    for seq in ("t1n", "t2f"):
        _nii(brats / f"BraTS-GLI-00001-000-{seq}.nii.gz", rng.integers(0, 500, SHAPE).astype(np.int16))
    _nii(brats / "BraTS-GLI-00001-000-seg.nii.gz", _labels())
    done = ingest(tmp_path / "src", tmp_path / "s.zarr")
    s = done.summary
    assert s.skipped == {} and s.files_in == 5 and s.problems.empty
    rows = done.stack.images.merge(done.linkage[["index", "source"]], on="index")
    got = rows.groupby(["source", "channel"])["modality"].unique().map(list).to_dict()
    assert got == {("BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz", 0): ["t1n"],
                   ("BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz", 0): ["t2f"],
                   ("Dataset001_X/imagesTr/a_0000.nii.gz", 0): ["T1"],
                   ("Dataset001_X/imagesTr/a_0001.nii.gz", 0): ["T2"],
                   ("Task01_X/imagesTr/m.nii.gz", 0): ["FLAIR"], ("Task01_X/imagesTr/m.nii.gz", 1): ["T1w"],
                   ("Task01_X/imagesTr/m.nii.gz", 2): ["T2w"]}


def test_malformed_dataset_json_is_a_problem(tmp_path, capsys):
    """A trailing comma: exit 3 with its own code, listed with the reason; the labels are still measured."""
    root = _nnunet(tmp_path / "DJ", dataset_json='{"labels": {"background": 0, "tumour": 1, "edema": 2,}}')
    rc, out, err = _cli(capsys, "ingest", root, tmp_path / "s.zarr", "--workers", WORKERS)
    assert rc == 3, out + err
    assert "[dataset-json 1]" in err and "not-an-image" not in out
    listed = pd.read_csv(tmp_path / "s.zarr.skipped.csv", dtype=str, keep_default_na=False)
    row = listed[listed["code"] == "dataset-json"]
    assert row["source"].tolist() == ["dataset.json"] and "not valid JSON" in row["reason"].iloc[0]
    assert "label-regions" not in set(listed["code"])


def test_refused_masks_of_two_kinds_name_each_cause(tmp_path):
    """A label map that is not NIfTI (mask-unreadable) and one moved by 60 mm (mask-shape), two images each: each
    code keeps its cause (the tie named mask-unreadable's for both), and the reason reads "the label map's affine's
    translation"."""
    root = _nnunet(tmp_path / "B")
    (root / "labelsTr" / "a.nii.gz").write_bytes(b"not a NIfTI file" * 30)
    moved = np.diag([1.0, 1.0, 2.0, 1.0])
    moved[:3, 3] = 60
    _nii(root / "labelsTr" / "b.nii.gz", _labels(), moved)
    s = ingest(root, tmp_path / "s.zarr").summary
    group = next(g for g in s.problem_groups() if g.what.startswith("images whose mask"))
    assert set(group.codes) == {"mask-unreadable", "mask-shape"}
    assert "mask-shape: masks of another size" in group.cause and "position or orientation" in group.cause
    reasons = s.problems[s.problems["code"] == "mask-shape"]["reason"]
    assert reasons.str.startswith("the label map's affine's translation differs").all(), reasons.tolist()


def test_empty_source_leaves_nothing_behind(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "._x.png").write_bytes(b"\x00\x05\x16\x07")
    rc, _, err = _cli(capsys, "ingest", tmp_path / "empty", tmp_path / "s.zarr", "--workers", WORKERS)
    assert rc == 2 and "[no-image]" in err and "holds no file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_interruption_line_names_the_paths_of_its_command(tmp_path):
    stack = Path("out") / "i5.zarr"
    job = _Ingest(stack=stack, side=sidecar_paths(stack), key_path=Path("out/i5.zarr.key"), resumed=None,
                  header={"command": "gpucnr ingest data out/i5.zarr --resume"}, progress=False)
    job.decoded, job.tasks = 4, [None] * 16
    line = job.interrupted()
    assert "out/i5.zarr --resume" in line and "(or delete out/i5.zarr and out/i5.zarr.journal)" in line, line


def test_mask_no_image_cause_reads_under_mask_dir():
    rows = [{"source": "m.png", "item": "mask", "code": "mask-no-image", "reason": ""}]
    cause = problem_groups(rows, {"has_mask_dir": True, "mask_files": 1})[0].cause
    assert "the pattern matches these files under MASK_DIR," in cause and "leave out --masks" not in cause
    cause = problem_groups(rows, {"has_mask_dir": True, "mask_files": 1, "mask_dir_inside": True})[0].cause
    assert "MASK_DIR lies inside SRC_DIR" in cause and "leave out --masks" in cause


# --- run, report, filter ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """An nnU-Net set ingested and run: most slices hold no ROI (flagged), modality filled."""
    tmp = tmp_path_factory.mktemp("vol")
    root = _nnunet(tmp / "Dataset001_X")
    stack = ingest(root, tmp / "s.zarr").stack
    res = tmp / "r.zarr"
    gpucnr.run(stack.path, res, workers=WORKERS, dilation=1, border=1, min_bg=5)
    return tmp, stack, res


def test_filter_warns_on_judged_units_and_flag_majority(volumes, tmp_path, capsys):
    _, _, res = volumes
    rc, _, err = _cli(capsys, "filter", res, "--out", tmp_path / "k.csv", "--rule", "abs:1000")
    assert rc == 0
    table = pd.read_csv(tmp_path / "k.csv")
    counts = table["decision"].value_counts().to_dict()
    assert counts["flag"] * 2 > len(table) and counts.get("keep", 0) == 0
    # NB: the old denominator (all rows, flags included) never reached "more than half" here
    judged = f"drops all {counts['drop']} image(s) it judged ({counts['flag']} flagged one(s) were not judged)"
    assert judged in err, err
    assert f"{counts['flag']} of {len(table)} image(s)" in err and "no valid roi" in err and "--level case" in err


def test_roi_manifest_has_roi_name(volumes, tmp_path):
    _, _, res = volumes
    table = gpucnr.manifest(res, level="roi")
    assert "roi_name" in table and set(table["roi_name"]) == {"tumour", "edema"}
    path = gpucnr.write_manifest(table, tmp_path / "roi.csv")
    back, _ = gpucnr.read_manifest(path)
    assert back["roi_name"].tolist() == table["roi_name"].tolist()


def test_grouping_by_an_empty_column_is_said(volumes, tmp_path, capsys):
    from gpucnr.statistics import EmptyColumnWarning

    _, _, res = volumes
    ds = gpucnr.open_results(res)
    assert set(ds["modality"].values) == {"T1", "T2"}
    with warnings.catch_warnings():
        # NB: a filled column: no EmptyColumnWarning (the decisions' own warnings, DecisionWarning, may come)
        warnings.simplefilter("error", EmptyColumnWarning)
        gpucnr.manifest(res, by="modality")
    with pytest.warns(EmptyColumnWarning, match="every value of the column 'manufacturer'"):
        gpucnr.manifest(res, by="manufacturer")
    with pytest.warns(EmptyColumnWarning, match="'manufacturer' is empty"):
        gpucnr.summarize(res, by="manufacturer")
    rc, _, err = _cli(capsys, "filter", res, "--out", tmp_path / "k.csv", "--by", "manufacturer")
    assert rc == 0 and "gpucnr: warning: filter --by manufacturer: every value" in err, err


def test_messages_name_the_right_thing(volumes, tmp_path, capsys):
    from gpucnr.plots import scale_caption

    assert scale_caption(2.0, -100.0) == "stored values x 2 \u2212 100 (modality units)"
    assert scale_caption(2.0, 100.0) == "stored values x 2 + 100 (modality units)"
    _, stack, _ = volumes
    rc, _, err = _cli(capsys, "report", stack.path, tmp_path / "rep")
    assert rc == 2 and "is a gpucnr stack (images), not results" in err and "gpucnr run" in err, err
    plain = gpucnr.write_stack(tmp_path / "plain.zarr", np.random.default_rng(3).normal(100, 5, (2, 20, 20)))
    with pytest.raises(gpucnr.InputError, match="--rois auto"):
        gpucnr.run(plain.path, tmp_path / "r.zarr", workers=1)
