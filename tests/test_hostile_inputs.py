"""Hostile inputs and identifiers (issue 11): DICOM native syntaxes carrying encapsulated or oversized pixel data,
mask bombs, file names that forge lines or formulas, ROI names and grouping columns that may identify a patient.
One ingest holds every hostile file (a worker pool costs seconds to start)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicomfactory import png_bomb, write_dicom, write_raster
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate

import gpucnr
from gpucnr.identifiers import refused_name, refused_value
from gpucnr.manifests import read_manifest, with_paths, write_manifest

PIXEL_DATA = 0x7FE00010


def _gray(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 20)).astype(np.uint8)


def _replace_pixels(path: Path, value: bytes, *, undefined: bool = False) -> None:
    ds = pydicom.dcmread(path)
    del ds[PIXEL_DATA]
    ds.add(DataElement(PIXEL_DATA, "OB", value))
    ds.save_as(path, enforce_file_format=True)
    if undefined:
        # NB: pydicom writes a defined length under a native syntax: the undefined length is forged by hand
        raw = path.read_bytes()
        at = raw.rindex(b"\xe0\x7f\x10\x00OB\x00\x00")
        path.write_bytes(raw[: at + 8] + b"\xff\xff\xff\xff" + raw[at + 12 :] + b"\xfe\xff\xdd\xe0" + bytes(4))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    src = root / "src"
    src.mkdir()
    write_raster(src / "ok.png", _gray(1))
    png_bomb(src / "ok_mask.png")  # NB: declares 30000 x 30000 (110 KB): refused by its header, image kept
    write_raster(src / "line\nforged: skipped ok.png", _gray(2))
    write_raster(src / "=1+2.png", _gray(3))
    write_raster(src / "back\\slash.png", _gray(4))
    write_raster(src / "100%.png", _gray(5))
    write_raster(src / os.fsdecode(b"caf\xe9.png"), _gray(6))
    write_raster(src / "caf\\xe9.png", _gray(7))  # NB: spelled with a literal backslash escape
    pixels = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    write_dicom(src / "undefined.dcm", pixels)
    _replace_pixels(src / "undefined.dcm", encapsulate([bytes(64)]), undefined=True)
    write_dicom(src / "items.dcm", pixels)
    _replace_pixels(src / "items.dcm", encapsulate([bytes(16 * 16 * 2)]))
    write_dicom(src / "longer.dcm", pixels)
    _replace_pixels(src / "longer.dcm", pixels.tobytes() + bytes(4))
    write_dicom(src / "padded.dcm", np.arange(15 * 15, dtype=np.uint8).reshape(15, 15))  # NB: one pad byte: fine
    rois = root / "rois.csv"
    rois.write_text("source,roi,kind,cx,cy,r,name\n"
                    "back\\slash.png,1,square,8,8,3,lesion\n"
                    "=1+2.png,1,square,8,8,3,Doe^John\n"
                    "100%25.png,1,square,8,8,3,born 1970-01-02\n")
    handler = _Lines()
    logger = logging.getLogger("gpucnr.ingest")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary = gpucnr.ingest(src, root / "s.zarr", mask_pattern="{stem}_mask.png", rois=rois, workers=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return summary, handler.lines, root


def _problem(summary, source):
    p = summary.problems
    return p[p["source"] == source]


def test_dicom_native_syntax_with_encapsulated_or_longer_pixel_data(hostile):
    summary, _, _ = hostile
    for name, code in (("undefined.dcm", "bad-header"), ("items.dcm", "bad-header"), ("longer.dcm", "declared-size")):
        assert _problem(summary, name)["code"].tolist() == [code], (name, summary.problems)
    assert _problem(summary, "padded.dcm").empty


def test_a_mask_bomb_is_refused_by_its_header_and_keeps_its_image(hostile):
    summary, _, _ = hostile
    rows = _problem(summary, "ok.png")
    assert rows["code"].tolist() == ["mask-shape"], summary.problems
    link = pd.read_csv(summary.linkage, dtype=str, keep_default_na=False)
    assert "ok.png" in set(link["source"])


def test_names_in_the_operator_files(hostile):
    summary, lines, _ = hostile
    link = pd.read_csv(summary.linkage, dtype=str, keep_default_na=False)
    by = dict(zip(link["source"], link["source_encoding"], strict=True))
    assert by["line%0Aforged: skipped ok.png"] == "percent"  # NB: one line, not two
    assert by["caf%E9.png"] == "percent" and by["caf\\xe9.png"] == ""  # NB: never alike
    assert by["100%25.png"] == "percent"
    assert by["'=1+2.png"] == ""  # NB: never a spreadsheet formula; gpucnr's readers drop the one quote
    assert by["back\\slash.png"] == ""
    assert lines and not any("\n" in line or "\r" in line for line in lines)
    raw = summary.linkage.read_bytes()
    assert b"forged: skipped ok.png\n" not in raw.replace(b"%0A", b"")


def test_rows_address_names_with_backslashes_and_percent_and_rois_names_are_screened(hostile):
    summary, _, _ = hostile
    assert (summary.problems["code"] == "roi-no-image").sum() == 0, summary.problems
    stack = gpucnr.open_stack(summary.stack)
    assert len(stack.rois) == 3
    assert sorted(stack.rois["name"].astype(str)) == ["", "", "lesion"]
    assert (summary.problems["code"] == "roi-name").sum() == 2
    assert not summary.problems["reason"].str.contains("Doe|1970").any()


def test_filter_with_paths_reads_the_quoted_name_back(hostile, tmp_path):
    summary, _, _ = hostile
    results = tmp_path / "r.zarr"
    gpucnr.run(summary.stack, results, scheduler="synchronous")
    table = with_paths(gpucnr.manifest(results, threshold=1.5), results)
    assert "=1+2.png" in set(table["source"])
    assert table.loc[table["source"] == "caf%E9.png", "source_encoding"].tolist() == ["percent"]
    out = write_manifest(table, tmp_path / "m.csv")
    assert "'=1+2.png" in out.read_text()
    back, _ = read_manifest(out)
    assert "=1+2.png" in set(back["source"])
    assert os.stat(out).st_mode & 0o777 == 0o600  # NB: it holds source paths


@pytest.mark.parametrize("name", ["PatientNam", "patient_name", "Patient Birth", "MRN", "accession_no",
                                  "home_address", "phone2", "e-mail", "dob", "Surname"])
def test_identifying_column_names(name):
    assert refused_name(name) is not None


@pytest.mark.parametrize("name", ["site", "split", "scanner", "center", "fold"])
def test_plain_column_names(name):
    assert refused_name(name) is None


@pytest.mark.parametrize("value, refused", [("Doe^John", True), ("1234567", True), (1234567, True),
                                            (1234567.0, True), ("2020-01-31", True), ("31/01/2020", True),
                                            ("a@b.org", True), ("site A", False), ("train", False), (12345, False),
                                            (0.1234567, False), (np.nan, False), (None, False)])
def test_values(value, refused):
    assert (refused_value(value) is not None) == refused


def test_resume_keeps_its_grouping_columns_and_refuses_others(tmp_path):
    """A walk finding: `--resume --group-columns OTHER` was silently ignored, and the line that tells how to continue
    left the columns out. A plain resume keeps the columns; naming the same ones resumes; other ones are refused."""
    from gpucnr.results import resume_command

    images = [np.full((16, 16), 10 + k, np.uint16) for k in range(3)]
    rois = {"image": [0, 1, 2], "roi": [1, 1, 1], "kind": ["square"] * 3, "cx": [8] * 3, "cy": [8] * 3,
            "r": [3] * 3}
    meta = pd.DataFrame({"site": ["a", "b", "a"], "split": ["train", "test", "train"]})
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, rois=rois, meta=meta)
    out = tmp_path / "r.zarr"
    first = gpucnr.run(stack, out, scheduler="synchronous", group_columns=["site", "split"])
    assert resume_command(first.attrs, out).endswith("--resume --group-columns site,split --batch 16M")
    for same in (None, ["site", "split"]):
        again = gpucnr.run(stack, out, scheduler="synchronous", resume=True, group_columns=same)
        assert list(again["site"].values) == ["a", "b", "a"]
    for other in (["site"], ["split", "site"], []):
        with pytest.raises(gpucnr.ResultsError) as err:
            gpucnr.run(stack, out, scheduler="synchronous", resume=True, group_columns=other)
        assert err.value.code == "resume-mismatch" and "group_columns" in str(err.value), other


def test_grouping_columns_only_when_named_and_screened(tmp_path):
    images = [np.full((16, 16), 10 + k, np.uint16) for k in range(3)]
    rois = {"image": [0, 1, 2], "roi": [1, 1, 1], "kind": ["square"] * 3, "cx": [8] * 3, "cy": [8] * 3,
            "r": [3] * 3}
    meta = pd.DataFrame({"site": ["a", "b", "a"], "split": ["train", "test", "train"]})
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, rois=rois, meta=meta)
    plain = gpucnr.run(stack, tmp_path / "r1.zarr", scheduler="synchronous")
    assert "site" not in plain.variables and "split" not in plain.variables
    grouped = gpucnr.run(stack, tmp_path / "r2.zarr", scheduler="synchronous", group_columns=["site"])
    assert list(grouped["site"].values) == ["a", "b", "a"] and "split" not in grouped.variables
    with pytest.raises(gpucnr.InputError):
        gpucnr.run(stack, tmp_path / "r3.zarr", group_columns=["nope"])
    for bad in ({"PatientNam": ["x", "y", "z"]}, {"site": ["a", "b", "1234567"]}, {"note": ["", "a@b.org", ""]},
                {"patient_id": ["P1", "P2", "P3"]}):
        with pytest.raises(gpucnr.InputError):
            gpucnr.write_stack(tmp_path / "bad.zarr", images, meta=pd.DataFrame(bad))
        assert not (tmp_path / "bad.zarr").exists()
    keyed = gpucnr.write_stack(tmp_path / "k.zarr", images, meta=pd.DataFrame({"patient_id": ["P1", "P2", "P1"]}),
                               key_file=tmp_path / "k.key")
    ids = keyed.images["patient_id"].astype(str).tolist()
    assert ids[0] == ids[2] != ids[1] and all(len(v) == 20 for v in ids)


def test_roi_names_of_write_stack_and_run_are_screened(tmp_path):
    images = [np.full((16, 16), 10 + k, np.uint16) for k in range(2)]
    rois = pd.DataFrame({"image": [0, 1], "roi": [1, 1], "kind": ["square"] * 2, "cx": [8, 8], "cy": [8, 8],
                         "r": [3, 3], "name": ["Doe^Jane", "lesion"]})
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, rois=rois)
    assert stack.rois["name"].astype(str).tolist() == ["", "lesion"]
    csv = tmp_path / "rois.csv"
    rois.assign(name=["lesion", "seen 2024-01-02"]).to_csv(csv, index=False)
    ds = gpucnr.run(stack, tmp_path / "r.zarr", rois=csv, scheduler="synchronous")
    assert sorted(np.asarray(ds["roi_name"].values).ravel().tolist()) == ["", "lesion"]


@pytest.mark.parametrize("column", ["PatientNam", "patient_name", "DOB", "home_phone"])
def test_ingest_meta_names_follow_the_rule(tmp_path, column):
    from gpucnr.sources.rois import read_meta_csv

    meta = tmp_path / "meta.csv"
    meta.write_text(f"source,site,{column}\na.png,A,x\n")
    with pytest.raises(gpucnr.InputError) as err:
        read_meta_csv(meta, ())
    assert column in str(err.value) and "site" not in str(err.value).split("look like")[0]
