"""The keep/drop manifest (issue 5): rules at every level, ordering, CSV/Parquet round trips, the join with the
stack's per-image table, and the refusals (missing id column, foreign columns, Parquet without pyarrow).

The rules are checked on small result Datasets made by hand with xarray, whose expected decisions are written
out row by row; the join runs the real pipeline on a phantom stored in two buckets, so that the global image
index differs from the input position and only a join on the global index lines the ids up.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import gpucnr
from gpucnr.errors import NoticeWarning
from gpucnr.manifests import COLUMNS, manifest, read_manifest, write_manifest
from gpucnr.phantom import make_phantom
from gpucnr.store import _write_table

NAN = np.nan
ATTRS = {"background": "complement", "footprint": "cross", "dilation": 5, "border": 5, "ddof": 1,
         "definition": "pooled", "signed": False, "stack_path": "s.zarr", "stack_fingerprint": "f00d",
         "gpucnr_version": "0.0.run", "batch": np.int64(4),
         "failures": [{"image": 3, "code": "decode", "reason": "Doe_John/IM0001.dcm"}]}


def results(cnr_median, n_valid, *, image=None, cnr=None, status=None, roi=None, **ids) -> xr.Dataset:
    """A results-shaped Dataset: per-image cnr_median/n_valid, optional (image, roi) cells, ids as coordinates."""
    n = len(cnr_median)
    data = {"cnr_median": ("image", np.asarray(cnr_median, np.float64)),
            "n_valid": ("image", np.asarray(n_valid, np.int64))}
    coords = {"image": np.arange(100, 100 + n) if image is None else np.asarray(image)}
    if cnr is not None:
        data["cnr"] = (("image", "roi"), np.asarray(cnr, np.float64))
        data["status"] = (("image", "roi"), np.asarray(status, np.int8))
        coords["roi"] = np.asarray(roi)
    coords.update({k: ("image", np.asarray(v)) for k, v in ids.items()})
    return xr.Dataset(data, coords=coords, attrs=dict(ATTRS))


def rows(df: pd.DataFrame, *columns) -> list[tuple]:
    """The frame's rows as plain tuples (NaN as None, so that equal rows compare equal)."""
    out = []
    for rec in df[list(columns)].itertuples(index=False):
        out.append(tuple(None if isinstance(v, float) and np.isnan(v) else v for v in rec))
    return out


# --------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------


def test_image_rules():
    # NB: image 5 is inconsistent on purpose (a value but n_valid 0): n_valid, not the value, says "no valid roi"
    ds = results([2.0, 1.5, np.nextafter(1.5, 0), NAN, NAN, np.inf, 0.0, 5.0], [2, 1, 3, 0, -1, 1, 1, 0],
                 image=[7, 3, 9, 1, 4, 0, 12, 5])
    m = manifest(ds, allow_incomplete=True, threshold=1.5)
    assert list(m.columns) == ["image", "decision", "reason", "cnr", "n_valid"]
    assert rows(m, "image", "decision", "reason", "cnr", "n_valid") == [
        (0, "keep", "cnr at or above threshold", np.inf, 1),
        (1, "flag", "no valid roi", None, 0),
        (3, "keep", "cnr at or above threshold", 1.5, 1),  # equality keeps: drop is strictly below
        (4, "flag", "not-computed", None, -1),
        (5, "flag", "no valid roi", None, 0),
        (7, "keep", "cnr at or above threshold", 2.0, 2),
        (9, "drop", "cnr below threshold", np.nextafter(1.5, 0), 3),
        (12, "drop", "cnr below threshold", 0.0, 1),
    ]
    assert m.attrs["threshold"] == 1.5 and m.attrs["level"] == "image"
    assert m.attrs["gpucnr_version"] == gpucnr.__version__
    assert m.attrs["run"]["background"] == "complement" and m.attrs["run"]["batch"] == 4
    assert m.attrs["run"]["gpucnr_version"] == "0.0.run"
    assert "failures" not in m.attrs["run"]


def test_image_rules_follow_the_threshold():
    ds = results([1.0, 2.0, 3.0], [1, 1, 1])
    assert list(manifest(ds, threshold=2.0)["decision"]) == ["drop", "keep", "keep"]
    assert list(manifest(ds, threshold=3.5)["decision"]) == ["drop", "drop", "drop"]
    assert list(manifest(ds, threshold=-np.inf)["decision"]) == ["keep", "keep", "keep"]


def test_roi_rules():
    ok, absent, zero, failed, nc = (gpucnr.STATUS[k] for k in ("ok", "absent", "zero-noise", "failed",
                                                             "not-computed"))
    # NB: image 14's first cell is inconsistent on purpose (ok but NaN): a NaN CNR never keeps or drops
    ds = results([1.75, 1.0, NAN, NAN, 1.5], [2, 1, 0, -1, 1], image=[10, 11, 12, 13, 14], roi=[3, 7],
                 cnr=[[2.0, 1.5], [1.0, NAN], [np.inf, 0.5], [NAN, NAN], [NAN, 1.5]],
                 status=[[ok, ok], [ok, absent], [zero, failed], [nc, nc], [ok, ok]],
                 patient_id=["p", "p", "q", "q", "q"], instance_id=["i0", "i1", "i2", "i3", "i4"])
    m = manifest(ds, allow_incomplete=True, threshold=1.5, level="roi")
    assert list(m.columns) == ["patient_id", "instance_id", "image", "roi", "roi_name", "decision", "reason", "cnr",
                               "status"]
    assert rows(m, "patient_id", "instance_id", "image", "roi", "decision", "reason", "cnr", "status") == [
        ("p", "i0", 10, 3, "keep", "cnr at or above threshold", 2.0, ok),
        ("p", "i0", 10, 7, "keep", "cnr at or above threshold", 1.5, ok),
        ("p", "i1", 11, 3, "drop", "cnr below threshold", 1.0, ok),
        ("p", "i1", 11, 7, "flag", "absent", None, absent),
        # NB: a zero-noise cell stores inf; the status, not the value, decides
        ("q", "i2", 12, 3, "flag", "zero-noise", None, zero),
        ("q", "i2", 12, 7, "flag", "failed", None, failed),
        ("q", "i3", 13, 3, "flag", "not-computed", None, nc),
        ("q", "i3", 13, 7, "flag", "not-computed", None, nc),
        ("q", "i4", 14, 3, "flag", "no valid roi", None, ok),
        ("q", "i4", 14, 7, "keep", "cnr at or above threshold", 1.5, ok),
    ]


# Eleven images: patients p1, p2, p3, p4 (and one without a patient id), studies, series (series "s1" is reused
# under two studies: two distinct units), one image never written (n_valid -1).
GROUPED = {
    "cnr_median": [1.0, 2.0, 4.0, 1.5, NAN, NAN, 1.2, 1.6, 9.0, 1.0, 0.1],
    "n_valid":    [1,   2,   1,   1,   0,   0,   3,   1,   -1,  2,   1],
    "image":      [0,   1,   2,   3,   4,   5,   6,   7,   8,   9,   10],
    "patient_id": ["p1", "p1", "p1", "p2", "p2", "p3", "p4", "p4", "p5", "p5", ""],
    "study_id":   ["a",  "a",  "b",  "c",  "c",  "d",  "e",  "f",  "g",  "g",  "h"],
    "series_id":  ["s1", "s1", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s7", "s8"],
}


def grouped(**drop) -> xr.Dataset:
    g = {k: v for k, v in GROUPED.items() if k not in drop}
    return results(g.pop("cnr_median"), g.pop("n_valid"), **g)


def test_patient_rules():
    m = manifest(grouped(), allow_incomplete=True, threshold=1.5, level="patient")
    assert list(m.columns) == ["patient_id", "images", "n_images", "n_valid_images", "decision", "reason", "cnr"]
    assert rows(m, *m.columns) == [
        ("", "10", 1, 1, "flag", "missing patient_id", None),  # never merged with other id-less images
        ("p1", "0 1 2", 3, 3, "keep", "cnr at or above threshold", 2.0),  # median of 1, 2, 4
        ("p2", "3 4", 2, 1, "keep", "cnr at or above threshold", 1.5),  # NaN image ignored; equality keeps
        ("p3", "5", 1, 0, "flag", "no valid roi", None),
        ("p4", "6 7", 2, 2, "drop", "cnr below threshold", np.median([1.2, 1.6])),  # the two middle values' mean
        ("p5", "8 9", 2, 1, "flag", "not-computed", None),  # image 8 unwritten: the median could still change
    ]


def test_group_cnr_equal_to_the_threshold_is_kept():
    m = manifest(grouped(), allow_incomplete=True, threshold=float(np.median([1.2, 1.6])),
                 level="patient").set_index("patient_id")
    assert m.loc["p4", "decision"] == "keep" and m.loc["p4", "reason"] == "cnr at or above threshold"
    assert m.loc["p1", "decision"] == "keep"
    above = manifest(grouped(), allow_incomplete=True, threshold=2.0001, level="patient").set_index("patient_id")
    assert above.loc["p1", "decision"] == "drop"


def test_study_rules():
    m = manifest(grouped(), allow_incomplete=True, threshold=1.5, level="study")
    assert list(m.columns) == ["patient_id", "study_id", "images", "n_images", "n_valid_images", "decision",
                               "reason", "cnr"]
    assert rows(m, *m.columns) == [
        ("", "h", "10", 1, 1, "drop", "cnr below threshold", 0.1),
        ("p1", "a", "0 1", 2, 2, "keep", "cnr at or above threshold", 1.5),
        ("p1", "b", "2", 1, 1, "keep", "cnr at or above threshold", 4.0),
        ("p2", "c", "3 4", 2, 1, "keep", "cnr at or above threshold", 1.5),
        ("p3", "d", "5", 1, 0, "flag", "no valid roi", None),
        ("p4", "e", "6", 1, 1, "drop", "cnr below threshold", 1.2),
        ("p4", "f", "7", 1, 1, "keep", "cnr at or above threshold", 1.6),
        ("p5", "g", "8 9", 2, 1, "flag", "not-computed", None),
    ]


def test_series_rules():
    m = manifest(grouped(), allow_incomplete=True, threshold=1.5, level="series")
    assert list(m.columns) == ["patient_id", "study_id", "series_id", "images", "n_images", "n_valid_images",
                               "decision", "reason", "cnr"]
    got = rows(m, "patient_id", "study_id", "series_id", "images", "decision", "cnr")
    assert got == [
        ("", "h", "s8", "10", "drop", 0.1),
        ("p1", "a", "s1", "0 1", "keep", 1.5),  # "s1" under study a ...
        ("p1", "b", "s1", "2", "keep", 4.0),  # ... and under study b: two units
        ("p2", "c", "s2", "3", "keep", 1.5),
        ("p2", "c", "s3", "4", "flag", None),
        ("p3", "d", "s4", "5", "flag", None),
        ("p4", "e", "s5", "6", "drop", 1.2),
        ("p4", "f", "s6", "7", "keep", 1.6),
        ("p5", "g", "s7", "8 9", "flag", None),
    ]


def test_group_key_is_the_id_alone_without_coarser_ids():
    m = manifest(grouped(patient_id=True, study_id=True), threshold=1.5, level="series",
                 allow_incomplete=True)
    assert list(m.columns[:2]) == ["series_id", "images"]
    assert rows(m, "series_id", "images", "cnr") == [
        ("s1", "0 1 2", 2.0), ("s2", "3", 1.5), ("s3", "4", None), ("s4", "5", None), ("s5", "6", 1.2),
        ("s6", "7", 1.6), ("s7", "8 9", None), ("s8", "10", 0.1)]


def test_group_median_uses_images_with_a_valid_roi_only():
    ds = results([5.0, 1.0, 1.2], [0, 1, 1], patient_id=["p", "p", "p"])
    m = manifest(ds, threshold=1.5, level="patient")
    assert rows(m, "images", "n_images", "n_valid_images", "decision", "cnr") == [("100 101 102", 3, 2, "drop", 1.1)]


@pytest.mark.parametrize("level", ["patient", "study", "series"])
def test_a_level_whose_id_no_image_has_is_refused(level):
    """PNG, TIFF, JPEG and NIfTI carry no ids: every unit would be a flagged image ("missing patient_id"), a
    manifest of flags only that exited 0. Refused instead, saying where ids come from; the image level goes on."""
    col = {"patient": "patient_id", "study": "study_id", "series": "series_id"}[level]
    ds = results([1.0, 2.0], [1, 1], **{col: np.array(["", "nan"], dtype=object)})
    with pytest.raises(gpucnr.InputError, match=f"needs '{col}', which no image of these results has.*--meta"):
        manifest(ds, threshold=1.5, level=level)
    assert manifest(ds, threshold=1.5)["decision"].tolist() == ["drop", "keep"]


def test_absent_ids_are_empty_and_never_grouped():
    ds = results([1.0, 2.0, 3.0, 4.0, 5.0], [1, 1, 1, 1, 1],
                 patient_id=np.array(["nan", "None", "", "p", "<NA>"], dtype=object))
    m = manifest(ds, threshold=1.5)
    assert m["patient_id"].tolist() == ["", "", "", "", "p"]
    assert m["image"].tolist() == [100, 101, 102, 104, 103]
    p = manifest(ds, threshold=1.5, level="patient")
    assert rows(p, "patient_id", "images", "decision", "reason") == [
        ("", "100", "flag", "missing patient_id"), ("", "101", "flag", "missing patient_id"),
        ("", "102", "flag", "missing patient_id"), ("", "104", "flag", "missing patient_id"),
        ("p", "103", "keep", "cnr at or above threshold")]


@pytest.mark.parametrize("level", ["image", "roi", "patient"])
def test_no_images(level):
    ds = results([], [], cnr=np.zeros((0, 2)), status=np.zeros((0, 2)), roi=[1, 2], patient_id=np.array([], str))
    m = manifest(ds, allow_incomplete=True, level=level)
    assert len(m) == 0
    assert "decision" in m.columns and "cnr" in m.columns


@pytest.mark.parametrize("level", ["image", "roi", "series", "study", "patient"])
def test_cnr_is_nan_exactly_for_flags(level):
    ds = grouped()
    ds["cnr"] = (("image", "roi"), np.column_stack([ds.cnr_median.values, ds.cnr_median.values]))
    ds["status"] = (("image", "roi"), np.where(np.isnan(ds.cnr.values), 1, 0).astype(np.int8))
    ds = ds.assign_coords(roi=[1, 2])
    m = manifest(ds, allow_incomplete=True, level=level)
    assert (m["decision"] == "flag").tolist() == m["cnr"].isna().tolist()
    assert set(m["decision"]) == {"keep", "drop", "flag"}


# --------------------------------------------------------------------------------------------------------------
# Ordering
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["image", "roi", "series", "study", "patient"])
def test_ordering_does_not_depend_on_storage_order(level):
    ds = grouped()
    ds["cnr"] = (("image", "roi"), np.column_stack([ds.cnr_median.values, ds.cnr_median.values + 1]))
    ds["status"] = (("image", "roi"), np.zeros(ds.cnr.shape, np.int8))
    ds = ds.assign_coords(roi=[4, 2])
    perm = np.random.default_rng(1).permutation(ds.sizes["image"])
    assert not np.array_equal(perm, np.sort(perm))
    first = manifest(ds, allow_incomplete=True, level=level)
    shuffled = manifest(ds.isel(image=perm, roi=[1, 0]), level=level, allow_incomplete=True)
    pd.testing.assert_frame_equal(first, shuffled)
    # NB: the order is by the ids present (coarsest first), then the global index (and the ROI id)
    keys = [c for c in ("patient_id", "study_id", "series_id") if c in first.columns]
    if level in ("image", "roi"):
        keys += ["image"] + (["roi"] if level == "roi" else [])
        expect = first.sort_values(keys).reset_index(drop=True)
    else:
        first_image = first["images"].str.split().str[0].astype(int)
        expect = first.assign(_f=first_image).sort_values([*keys, "_f"]).drop(columns="_f").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, expect)
    assert first["patient_id"].tolist() == sorted(first["patient_id"].tolist())


# --------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "column"), [("series", "series_id"), ("study", "study_id"),
                                               ("patient", "patient_id")])
def test_level_without_its_id_column_is_an_error(level, column):
    ds = grouped(**{column: True})
    with pytest.raises(gpucnr.InputError, match=column):
        manifest(ds, allow_incomplete=True, level=level)


def test_bad_level_threshold_and_variables():
    ds = results([1.0], [1])
    with pytest.raises(gpucnr.InputError, match="level"):
        manifest(ds, level="slice")
    for bad in (NAN, "1.5", True):
        with pytest.raises(gpucnr.InputError, match="threshold"):
            manifest(ds, threshold=bad)
    # NB: threshold=None is the default since rules came (issue 16): the rule abs:1.5
    assert manifest(ds, threshold=None).attrs["rule"] == "abs:1.5"
    with pytest.raises(gpucnr.InputError, match="'cnr'"):
        manifest(ds, level="roi")
    with pytest.raises(gpucnr.InputError, match="cnr_median"):
        manifest(ds.drop_vars("cnr_median"))


def test_write_refuses_foreign_columns_and_frames_without_metadata(tmp_path):
    m = manifest(results([1.0, 2.0], [1, 1], patient_id=["p", "q"]))
    with pytest.raises(gpucnr.InputError, match="patient_name"):
        write_manifest(m.assign(patient_name=["Doe^John", "Roe^Jane"]), tmp_path / "m.csv")
    with pytest.raises(gpucnr.InputError, match=r"gpucnr\.manifest"):
        write_manifest(pd.DataFrame({"image": [0], "decision": ["keep"]}), tmp_path / "m.csv")
    with pytest.raises(gpucnr.InputError, match=r"\.txt"):
        write_manifest(m, tmp_path / "m.txt")
    assert not list(tmp_path.iterdir())


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    m = manifest(results([1.0], [1]))
    # NB: None in sys.modules makes `import pyarrow` raise ImportError, whether or not it is installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(gpucnr.InputError, match="pip install pyarrow"):
        write_manifest(m, tmp_path / "m.parquet")
    with pytest.raises(gpucnr.InputError, match="pyarrow"):
        read_manifest(tmp_path / "m.parquet")


def test_read_refuses_other_csv(tmp_path):
    (tmp_path / "x.csv").write_text("image,decision\n0,keep\n")
    with pytest.raises(gpucnr.InputError, match="not a gpucnr manifest"):
        read_manifest(tmp_path / "x.csv")


# --------------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------------


def tricky() -> xr.Dataset:
    """Ids that a CSV reader would turn into numbers or NaN, and odd attributes."""
    ds = results([2.0, 1.0, NAN, 1 / 3], [1, 1, 0, 2], roi=[1, 2],
                 cnr=[[2.0, 3.0], [1.0, NAN], [NAN, NAN], [1 / 3, 1 / 7]], status=[[0, 0], [0, 1], [4, 4], [0, 0]],
                 patient_id=["007", "1e5", "", "NaN"], study_id=["1", "2", "3", "4"])
    ds.attrs.update({"weird key: with colon": "x\ny", "nested": {"a": [1, 2.5, None]}, "nan_attr": NAN})
    return ds


@pytest.mark.parametrize("level", ["image", "roi", "study", "patient"])
def test_csv_round_trip(tmp_path, level):
    m = manifest(tricky(), threshold=1.5, level=level)
    path = write_manifest(m, tmp_path / "m.csv")
    text = path.read_text()
    # issue 13: a plain CSV that pandas opens as it is; the provenance is in the sidecar m.csv.json
    assert not any(line.startswith("#") for line in text.splitlines())
    plain = pd.read_csv(path)
    assert list(plain.columns) == list(m.columns) and len(plain) == len(m)
    side = json.loads((tmp_path / "m.csv.json").read_text())
    assert side["threshold"] == 1.5 and side["level"] == level and side["gpucnr_version"] == gpucnr.__version__
    assert side["run"]["background"] == "complement" and side["run"]["dilation"] == 5
    both = text + (tmp_path / "m.csv.json").read_text()
    assert "Doe_John" not in both and "failures" not in both  # failure messages name files: never written
    df, meta = read_manifest(path)
    pd.testing.assert_frame_equal(df, m)
    assert meta == df.attrs
    assert {k: v for k, v in meta.items() if k != "run"} == {k: v for k, v in m.attrs.items() if k != "run"}
    run = dict(meta["run"])
    assert np.isnan(run.pop("nan_attr")) and np.isnan(m.attrs["run"]["nan_attr"])
    assert run == {k: v for k, v in m.attrs["run"].items() if k != "nan_attr"}
    assert run["weird key: with colon"] == "x\ny" and run["nested"] == {"a": [1, 2.5, None]}
    # a read manifest writes again, byte for byte
    assert write_manifest(df, tmp_path / "again.csv").read_text() == text
    assert (tmp_path / "again.csv.json").read_text() == (tmp_path / "m.csv.json").read_text()


def _old_csv(m: pd.DataFrame, path) -> None:
    """A manifest as gpucnr wrote it before issue 13: a ``# `` comment block, then the table."""
    meta = m.attrs
    lines = ["# gpucnr manifest", *(f"# {k}: {json.dumps(v)}" for k, v in meta.items() if k != "run"),
             *(f"# {k if k.isidentifier() else json.dumps(k)}: {json.dumps(v)}"
               for k, v in (("run." + k, v) for k, v in meta["run"].items()))]
    with open(path, "w", newline="") as fh:
        fh.write("\n".join(lines) + "\n")
        m.to_csv(fh, index=False, lineterminator="\n")


def test_old_commented_csv_still_reads_and_a_lost_sidecar_is_named(tmp_path):
    m = manifest(tricky(), threshold=1.5, level="image")
    m.attrs["run"] = {k: v for k, v in m.attrs["run"].items() if k not in ("weird key: with colon", "nan_attr")}
    _old_csv(m, tmp_path / "old.csv")
    df, meta = read_manifest(tmp_path / "old.csv")
    pd.testing.assert_frame_equal(df, m)
    assert meta["threshold"] == 1.5 and meta["run"]["background"] == "complement"
    write_manifest(m, tmp_path / "new.csv")
    (tmp_path / "new.csv.json").unlink()
    with pytest.raises(gpucnr.InputError, match=r"new\.csv\.json"):
        read_manifest(tmp_path / "new.csv")


@pytest.mark.parametrize("level", ["image", "roi", "study", "patient"])
def test_parquet_round_trip(tmp_path, level):
    pytest.importorskip("pyarrow", reason="pyarrow is not installed: Parquet manifests need it")
    import pyarrow.parquet as pq

    m = manifest(tricky(), threshold=1.5, level=level)
    path = write_manifest(m, tmp_path / "m.parquet")
    assert b"gpucnr_manifest" in pq.read_schema(path).metadata
    df, meta = read_manifest(path)
    pd.testing.assert_frame_equal(df, m)
    assert meta["threshold"] == 1.5 and meta["level"] == level and meta["gpucnr_version"] == gpucnr.__version__
    assert meta["run"]["background"] == "complement" and "failures" not in meta["run"]
    assert meta["run"]["nested"] == {"a": [1, 2.5, None]}


# --------------------------------------------------------------------------------------------------------------
# The join with the stack's per-image table
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A stack in two buckets (global index != input position) with ids and a free-form name column, measured."""
    root = tmp_path_factory.mktemp("manifest")
    a = make_phantom(5, (64, 64), lesions=2, radius=5, margin=6, dtype="uint16", seed=3)
    b = make_phantom(4, (50, 70), lesions=2, radius=5, margin=6, dtype="uint16", seed=4)
    images = [x for pair in zip(a.images, b.images, strict=False) for x in pair] + [a.images[4]]
    labels = [x for pair in zip(a.labels, b.labels, strict=False) for x in pair] + [a.labels[4]]
    n = len(images)
    meta = pd.DataFrame({"patient_id": [f"P{k % 3}" for k in range(n)], "study_id": [f"S{k % 4}" for k in range(n)],
                         "series_id": [f"R{k}" for k in range(n)]})
    gpucnr.write_stack(root / "s.zarr", images, labels=labels, meta=meta, shard=4, key_file=root / "k.key")
    # NB: write_stack refuses an identifying column (issue 11); a stack may still hold one (an unscreened --meta)
    _write_table(root / "s.zarr", "images",
                 pd.DataFrame({"patient_name": [f"Doe^{k}" for k in range(n)]}))
    stack = gpucnr.open_stack(root / "s.zarr")
    gpucnr.run(stack, root / "r.zarr", scheduler="synchronous", backend="numpy")
    return root


def test_join_with_the_stack_table(measured, tmp_path):
    table = gpucnr.open_stack(measured / "s.zarr").images
    ds = gpucnr.open_results(measured / "r.zarr")
    assert not np.array_equal(table["index"], table["source_index"])  # the join is not the identity
    threshold = float(np.median(ds.cnr_median.values))
    m = manifest(measured / "r.zarr", threshold=threshold)
    pd.testing.assert_frame_equal(m, manifest(ds, threshold=threshold))
    assert set(m["decision"]) == {"keep", "drop"}
    assert set(m.columns) <= set(COLUMNS)
    joined = m.merge(table, left_on="image", right_on="index", suffixes=("", "_stack"), validate="1:1")
    assert len(joined) == len(table) == len(m)
    for col in ("patient_id", "study_id", "series_id"):
        assert (joined[col] == joined[f"{col}_stack"]).all(), col
    by_index = ds.cnr_median.to_series()
    assert (joined["cnr"].to_numpy() == by_index.loc[joined["image"]].to_numpy()).all()
    assert ((joined["cnr"] < threshold) == (joined["decision"] == "drop")).all()

    # patient level: each patient's images, exploded, are exactly the stack's images of that patient
    p = manifest(measured / "r.zarr", threshold=threshold, level="patient")
    exploded = p.assign(image=p["images"].str.split()).explode("image").astype({"image": np.int64})
    back = exploded.merge(table, left_on="image", right_on="index", suffixes=("", "_stack"), validate="1:1")
    assert sorted(back["image"]) == sorted(table["index"])
    assert (back["patient_id"] == back["patient_id_stack"]).all()
    for pid, rows_ in back.groupby("patient_id"):
        expect = np.median(by_index.loc[rows_["image"]])
        assert p.set_index("patient_id").loc[pid, "cnr"] == expect

    # the free-form name column of the stack's meta never reaches a manifest or its file
    for level in ("image", "roi", "series", "study", "patient"):
        text = write_manifest(manifest(ds, threshold=threshold, level=level), tmp_path / f"{level}.csv").read_text()
        assert "Doe^" not in text and "patient_name" not in text


# --------------------------------------------------------------------------------------------------------------
# What the decisions need said (a new user's walk: 100,000 images, 1,000 sites)
# --------------------------------------------------------------------------------------------------------------


def _sites(spread: float) -> xr.Dataset:
    """Two sites of six images: CNR 1..6 scaled about its median by `spread` (wide: every mad:3 cut below 0)."""
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    values = np.concatenate([3.5 + (base - 3.5) * spread, 4.0 + (base - 3.5) * spread])
    return results(np.clip(values, 0.0, None), np.ones(12), site=np.repeat(["a", "b"], 6).astype(object))


def test_a_relative_rule_names_the_group_cut_in_its_reasons():
    m = manifest(_sites(1.0), rule="quantile:0.2", by="site")
    assert set(m["reason"]) == {"cnr below its group's cut (quantile:0.2)", "cnr at or above its group's cut "
                                "(quantile:0.2)"}
    m = manifest(_sites(1.0), threshold=1.5, by="site")
    assert set(m["reason"]) == {"cnr below threshold", "cnr at or above threshold"}


def test_a_mad_rule_whose_cuts_are_all_below_zero_says_it_cannot_drop():
    with pytest.warns(NoticeWarning) as caught:
        m = manifest(_sites(1.0), rule="mad:3", by="site")
    assert (m["decision"] == "keep").all()
    assert [c["cut"] < 0 for c in m.attrs["cuts"]] == [True, True]
    text = [str(w.message) for w in caught]
    assert len(text) == 1 and "rule mad:3 drops nothing in 2 group(s)" in text[0], text
    assert "below 0, which an unsigned CNR never is, so this rule cannot drop anything" in text[0], text
    # NB: a rule that drops something, or an abs rule (its threshold is the user's), says nothing of the kind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manifest(_sites(1.0), rule="mad:0.5", by="site")
        manifest(_sites(1.0), threshold=-1.0)
    with pytest.warns(NoticeWarning, match="sets no cut in 2 group"):
        manifest(_sites(1.0), rule="quantile:0.1", by="site")


def test_the_python_api_warns_a_rule_that_drops_most_or_all():
    with pytest.warns(NoticeWarning, match=r"rule abs:100 drops all 12 image\(s\) it judged: nothing is left"):
        m = manifest(_sites(1.0), threshold=100)
    assert (m["decision"] == "drop").all()
    with pytest.warns(NoticeWarning, match=r"drops 7 of the 12 image\(s\) it judged \(58.3 %\): more than half"):
        manifest(_sites(1.0), threshold=4.5)
