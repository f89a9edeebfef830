"""Coded text columns of a stack's tables (issue 17): a text column with few distinct values is stored as integer
codes and its distinct values; it reads as the same values, its codes and values are checked before they are
believed, and stacks written before (text as text) read as before, their fingerprints unchanged."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

import gpucnr
from gpucnr import store
from gpucnr.phantom import make_phantom
from gpucnr.pipeline import table_fingerprint
from gpucnr.roitable import normalize_table

#: The fingerprint of `_write` with text stored as text, computed by gpucnr before coded columns existed (main of
#: 2026-12-05). It changes only if the phantom or the stack's pixels do, never with how tables are read.
OLD_FINGERPRINT = "e642d4d2241093e0b1fe2d9501e8452eb7f20a19967d84e258f000b1d505529c"


def _write(path, monkeypatch=None, *, old: bool = False):
    ph = make_phantom(6, (32, 32), seed=3, margin=10, radius=4)
    rois = ph.rois.assign(kind=np.where(ph.rois["roi"] % 2 == 0, "disk", "square"), r=3)
    rois["name"] = np.where(rois["roi"] == 1, "lesion", "")
    meta = pd.DataFrame({"site": ["a", "b", "a", "b", "a", "b"]})
    if old:
        monkeypatch.setattr(store, "CODED_SHARE", -1)  # NB: every text column as text: the layout before
    # NB: blosc-zstd, the default compressor when OLD_FINGERPRINT was computed (blosc-lz4 since issue 18)
    stack = gpucnr.write_stack(path, ph.images, labels=ph.labels, rois=rois, meta=meta, shard=4,
                               **({"compressor": "blosc-zstd"} if old else {}))
    if old:
        monkeypatch.undo()
    return stack, rois, meta


def _node(path, where):
    return zarr.open_group(str(path), mode="r")[where]


def test_text_columns_are_coded_and_read_as_the_same_values(tmp_path):
    stack, rois, meta = _write(tmp_path / "s.zarr")
    for where in ("tables/rois/kind", "tables/rois/name", "tables/images/bucket", "tables/images/photometric",
                  "tables/images/site"):
        assert isinstance(_node(tmp_path / "s.zarr", where), zarr.Group), where
    assert isinstance(_node(tmp_path / "s.zarr", "tables/rois/cx"), zarr.Array)
    got = stack.rois.sort_values(["image", "roi"]).reset_index(drop=True)
    want = rois.sort_values(["image", "roi"]).reset_index(drop=True)
    for col in ("kind", "name"):
        assert got[col].astype(str).tolist() == want[col].tolist()
    assert stack.images["site"].astype(str).tolist() == meta["site"].tolist()
    assert stack.images["bucket"].astype(str).tolist() == ["64x64-uint16"] * 6


def test_older_layout_reads_as_before_with_its_fingerprint(tmp_path, monkeypatch):
    old, _, _ = _write(tmp_path / "old.zarr", monkeypatch, old=True)
    assert isinstance(_node(tmp_path / "old.zarr", "tables/rois/name"), zarr.Array)
    assert old.fingerprint() == OLD_FINGERPRINT
    assert gpucnr.open_stack(tmp_path / "old.zarr").fingerprint() == OLD_FINGERPRINT
    assert old.rois["kind"].dtype == object  # NB: the old path: text columns as object, as before
    new, _, _ = _write(tmp_path / "new.zarr")
    assert new.fingerprint() != OLD_FINGERPRINT  # NB: another layout (codes), the same content
    # the same tables, checked and normalised the same: a run measures the same ROIs under the same names
    a, b = old.normalized_rois(), new.normalized_rois()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, normalize_table(old.rois.astype({"kind": str, "name": str}), 6))
    assert table_fingerprint(a) == table_fingerprint(b)
    for col in old.images.columns:
        assert old.images[col].astype(str).tolist() == new.images[col].astype(str).tolist(), col


def test_a_run_of_a_coded_stack_equals_the_run_of_its_older_layout(tmp_path, monkeypatch):
    _write(tmp_path / "old.zarr", monkeypatch, old=True)
    _write(tmp_path / "new.zarr")
    runs = [gpucnr.run(tmp_path / f"{k}.zarr", tmp_path / f"r{k}.zarr", scheduler="synchronous", backend="numpy",
                       group_columns=["site"], roi_source="table") for k in ("old", "new")]
    for name in ("cnr", "status", "roi_name", "cnr_median", "bucket", "photometric", "site"):
        np.testing.assert_array_equal(runs[0][name].values, runs[1][name].values, err_msg=name)
    assert runs[0].attrs["rois_fingerprint"] == runs[1].attrs["rois_fingerprint"]


def _forge(path, where, part, values):
    """Rewrite one array of a coded column, with a valid checksum (what a forger does)."""
    group = zarr.open_group(str(path), mode="r+")
    old = group[f"{where}/{part}"]
    values = np.asarray(values)
    if values.dtype.kind == "U":
        values = values.astype(np.dtypes.StringDType())
    compressors = old.compressors
    del group[f"{where}/{part}"]
    arr = group.create_array(f"{where}/{part}", shape=values.shape, dtype=values.dtype,
                             chunks=(max(len(values), 1),), compressors=compressors,
                             config={"write_empty_chunks": True})
    arr[:] = values


@pytest.mark.parametrize("part, change, words", [
    ("codes", lambda v: np.where(np.arange(len(v)) == 2, 7, v), "code 7"),
    ("codes", lambda v: np.where(np.arange(len(v)) == 2, -1, v), "code -1"),
    ("codes", lambda v: v.astype(np.float64), "integer codes"),
    ("values", lambda v: np.array(["lesion", "lesion"]), "twice"),
    ("values", lambda v: np.array([1, 2], np.int64), "text values"),
])
def test_forged_coded_columns_are_refused(tmp_path, part, change, words):
    path = tmp_path / "s.zarr"
    _write(path)
    where = "tables/rois/name"
    _forge(path, where, part, change(np.asarray(_node(path, f"{where}/{part}")[:])))
    with pytest.raises(gpucnr.StackError) as info:
        gpucnr.open_stack(path)
    assert info.value.code == "stack-schema", str(info.value)
    assert words in str(info.value) and where in str(info.value)


def test_a_coded_column_missing_its_chunk_or_arrays_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    _write(path)
    shutil.copytree(path, tmp_path / "t.zarr")
    (path / "tables/rois/kind/codes/c/0").unlink()
    with pytest.raises(gpucnr.StackError) as info:
        gpucnr.open_stack(path)
    assert info.value.code == "missing-chunk" and "tables/rois/kind/codes" in str(info.value)
    shutil.rmtree(tmp_path / "t.zarr/tables/images/bucket/values")
    with pytest.raises(gpucnr.StackError) as info:
        gpucnr.open_stack(tmp_path / "t.zarr")
    assert info.value.code == "stack-schema" and "tables/images/bucket" in str(info.value)


def test_a_coded_table_changed_changes_the_fingerprint(tmp_path):
    path = tmp_path / "s.zarr"
    stack, _, _ = _write(path)
    before = stack.fingerprint()
    assert gpucnr.open_stack(path).fingerprint() == before  # NB: reopened: the same
    codes = np.asarray(_node(path, "tables/images/site/codes")[:])
    assert set(codes.tolist()) == {0, 1}
    _forge(path, "tables/images/site", "codes", 1 - codes)  # NB: sites swapped between images, valid codes
    assert gpucnr.open_stack(path).fingerprint() != before
    _forge(path, "tables/images/site", "codes", codes)
    assert gpucnr.open_stack(path).fingerprint() == before
    _forge(path, "tables/images/site", "values", np.array(["b", "a"]))
    assert gpucnr.open_stack(path).fingerprint() != before


def test_roi_name_blocks_by_code_equal_a_per_cell_reference():
    from gpucnr.pipeline import _Names

    rng = np.random.default_rng(0)
    n, ids = 40, np.array([1, 2, 5, 9])
    table = pd.DataFrame({"image": rng.integers(0, n, 60), "roi": rng.choice(ids, 60), "kind": "square", "cx": 5,
                          "cy": 5, "r": 1, "name": rng.choice(["", "a", "b c", "é"], 60)})
    table = normalize_table(table.drop_duplicates(["image", "roi"]).sample(frac=1, random_state=1), n)
    labels = {"2": "liver", "9": "x"}
    names = _Names(table, ids, labels)
    want = np.array([[labels.get(str(i), "") for i in ids]] * n, dtype=object)
    for image, roi, name in zip(table["image"], table["roi"], table["name"], strict=True):
        want[image, np.searchsorted(ids, roi)] = name
    for g0, g1 in ((0, n), (7, 19), (5, 5)):
        got = names.rows(g0, g1)
        assert got.dtype.kind == "U" and got.tolist() == want[g0:g1].tolist()
    assert _Names(None, ids, base=["p", "q", "r", "s"]).rows(0, 2).tolist() == [["p", "q", "r", "s"]] * 2


def test_table_files_are_the_bytes_zarr_writes(tmp_path):
    """`_write_table` builds the arrays in a memory store and writes their files itself (issue 18: through the
    folder's store each array cost 3-5 ms): every file must be the one zarr writes for the same column, and a table
    added beside another keeps the group metadata already there."""
    from pathlib import Path

    n = 50
    table = pd.DataFrame({"index": np.arange(n), "x": np.linspace(0, 1, n), "modality": ["CT"] * n,
                          "uid": [f"u{i}" for i in range(n)], "empty": [""] * n, "flag": np.zeros(n, bool)})
    ours, ref = tmp_path / "ours.zarr", tmp_path / "ref.zarr"
    for root in (ours, ref):
        zarr.open_group(str(root), mode="w", attributes={"kept": 1})
    store._write_table(ours, "images", table)
    store._write_table(ours, "rois", table[["index", "modality"]])
    group = zarr.open_group(str(ref), mode="r+")
    for name, cols in (("images", table.columns), ("rois", ["index", "modality"])):
        dim = "image" if name == "images" else "row"
        for col in cols:
            where, values = f"tables/{name}/{col}", table[col].to_numpy()
            if col in ("modality", "empty"):  # NB: one distinct value in 50: coded (`CODED_SHARE`)
                store._write_coded(group, where, np.zeros(n, np.int64), np.asarray([values[0]]).astype(str), dim)
            else:
                store._write_column(group, where, values.astype(str) if values.dtype == object else values,
                                    str if values.dtype == object else values.dtype, dim)

    def files(root: Path) -> dict:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    got, want = files(ours), files(ref)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    assert zarr.open_group(str(ours), mode="r").attrs["kept"] == 1
    read = store._read_table(zarr.open_group(str(ours), mode="r"), "images", ours)
    assert read["uid"].tolist() == table["uid"].tolist() and read["modality"].astype(str).tolist() == ["CT"] * n
