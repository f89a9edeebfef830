"""`gpucnr.ingest` of NIfTI volumes and label maps (issue 14), against an independent NumPy reference.

The reference (`_ras`, `_radiological`) reorients a volume from its affine by the largest entry of each column of
the 3x3 part (flip where it is negative, then transpose) and cuts ``image[row, col] = vol[I-1-col, J-1-row, k]``
with explicit index arrays: the rule of DESIGN §9 written without nibabel's orientation code. Volumes are small
(16x12x5) and random; nibabel only writes them.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from injection import sitecustomize
from test_ingest import CELL, IMAGE, WORKERS, ingest

import gpucnr

SHAPE = (16, 12, 5)


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def _affine(linear, origin=(-30.0, 12.5, 7.0)) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = origin
    return out


SPACING = np.diag([0.8, 0.9, 2.5])
#: name -> (3x3 part of the affine, stored dtype, slope, intercept, 4th axis length or None)
CASES = {
    "ras": (SPACING, np.int16, 2.5, -10.0, None),
    "las": (np.diag([-1.0, 1, 1]) @ SPACING, np.uint8, 1.0, 0.0, None),
    "lps": (np.diag([-1.0, -1, 1]) @ SPACING, np.uint16, 0.5, 3.0, None),
    "oblique": (_rotation(12, -8) @ SPACING, np.float32, 2.0, 1.0, None),
    # voxel axes (S, L, P): a permutation as well as flips
    "sal": (np.array([[0, -0.9, 0], [0, 0, -2.5], [0.8, 0, 0]]), np.int32, 1.0, 0.0, None),
    "four": (np.diag([-1.0, -1, 1]) @ SPACING, np.float64, 1.5, -2.0, 2),
    "u8scaled": (SPACING, np.uint8, 0.25, 100.0, None),
}


def _ras(vol: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Independent reference: the RAS+ array of `vol` (flips and transposes of its first three axes)."""
    linear = affine[:3, :3]
    world = np.argmax(np.abs(linear), axis=0)  # NB: the world axis each voxel axis runs closest to
    assert sorted(world) == [0, 1, 2]
    out = vol
    for i in range(3):
        if linear[world[i], i] < 0:
            out = out[(slice(None),) * i + (slice(None, None, -1),)]
    order = [int(np.flatnonzero(world == j)[0]) for j in range(3)]
    return np.transpose(out, order + list(range(3, vol.ndim)))


def _radiological(ras: np.ndarray, k: int) -> np.ndarray:
    """image[row, col] = vol[I-1-col, J-1-row, k], by index arrays."""
    n_i, n_j = ras.shape[:2]
    rows, cols = np.meshgrid(np.arange(n_j), np.arange(n_i), indexing="ij")
    return ras[n_i - 1 - cols, n_j - 1 - rows, k]


def _volume(rng, dtype, shape) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 20, shape).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -2000), min(info.max, 4000)
    return rng.integers(lo, hi, shape, endpoint=True).astype(dtype)


def _labels(rng, shape) -> np.ndarray:
    lab = np.zeros(shape[:3], np.uint8)
    lab[4:9, 3:8, :] = 1
    lab[11:14, 6:10, 1:4] = 2
    return lab


def _save(img, path) -> None:
    nib.save(img, str(path))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """imagesTr/ and labelsTr/ (MSD names), each case of CASES with a label map (uint8; float32 for one)."""
    root = tmp_path_factory.mktemp("nifti")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(14)
    truth = {}
    for n, (name, (linear, dtype, slope, inter, channels)) in enumerate(CASES.items()):
        shape = SHAPE + ((channels,) if channels else ())
        vol = _volume(rng, dtype, shape)
        affine = _affine(linear)
        img = nib.Nifti1Image(vol, affine) if n % 2 == 0 else nib.Nifti2Image(vol, affine)
        img.header.set_data_dtype(dtype)
        img.header.set_slope_inter(slope, inter)
        ext = ".nii" if name == "las" else ".nii.gz"
        _save(img, root / "imagesTr" / f"{name}{ext}")
        lab = _labels(rng, SHAPE)
        lab_dtype = np.float32 if name == "oblique" else np.uint8
        limg = nib.Nifti1Image(lab.astype(lab_dtype), affine)
        limg.header.set_data_dtype(lab_dtype)
        _save(limg, root / "labelsTr" / f"{name}{ext}")
        truth[f"{name}{ext}"] = (vol, lab, affine, slope, inter)
    return root, truth


@pytest.fixture(scope="module")
def ingested(volumes, tmp_path_factory):
    root, _ = volumes
    out = tmp_path_factory.mktemp("nifti_out")
    return ingest(root / "imagesTr", out / "s.zarr", masks=root / "labelsTr")


def test_every_slice_equals_the_reference(volumes, ingested):
    """Each stored slice (native dtype, slope and intercept as the header's scl_*) and its labels equal the
    independent reference of DESIGN §9's rule, for RAS, LAS, LPS, oblique, permuted and 4-D volumes."""
    _, truth = volumes
    summary = ingested.summary
    assert summary.skipped == {} and summary.stored == len(CASES)
    assert summary.images == sum(_ras(v, a).shape[2] * (v.shape[3] if v.ndim == 4 else 1)
                                 for v, _, a, *_ in truth.values())
    link = ingested.linkage
    assert {"channel", "case"} <= set(link.columns)
    images = ingested.stack.images
    for source, (vol, lab, affine, slope, inter) in truth.items():
        ras, ras_lab = _ras(vol, affine), _ras(lab, affine)
        channels = vol.shape[3] if vol.ndim == 4 else 1
        mine = link[link["source"] == source]
        assert len(mine) == channels * ras.shape[2]
        assert mine["case"].nunique() == channels
        for c in range(channels):
            for k in range(ras.shape[2]):
                hit = mine[(mine["channel"] == c) & (mine["frame"] == k)]
                index = int(hit["index"].iloc[0])
                pixels, labels = ingested.read(index)
                want = _radiological(ras[..., c] if vol.ndim == 4 else ras, k)
                assert pixels.dtype == vol.dtype
                np.testing.assert_array_equal(pixels, want, err_msg=f"{source} c{c} k{k}")
                np.testing.assert_array_equal(labels, _radiological(ras_lab, k), err_msg=f"{source} labels")
                row = images.iloc[index]
                assert (float(row["slope"]), float(row["intercept"])) == (slope, inter)
                assert int(row["channel"]) == c and int(row["frame"]) == k
                assert row["case"] == hit["case"].iloc[0]
    row = images.iloc[ingested.index("sal.nii.gz", 0)]
    # NB: voxel axes (S, L, P) with spacing (0.8, 0.9, 2.5): RAS+ axes come from voxel axes 1, 2, 0
    assert row["orientation"] == "SLP"
    assert (row["spacing_x"], row["spacing_y"], row["spacing_z"]) == pytest.approx((0.9, 2.5, 0.8))
    assert images.iloc[ingested.index("las.nii", 0)]["orientation"] == "LAS"
    assert images.iloc[ingested.index("oblique.nii.gz", 0)]["orientation"] == "RAS"


def test_run_equals_measure_on_reference_slices(volumes, ingested, tmp_path):
    """`gpucnr.run` on the stack == `gpucnr.measure` on the reference slices rescaled (slope * stored +
    intercept, float64), to 1e-9 relative."""
    _, truth = volumes
    small = {"dilation": 1, "border": 1, "min_bg": 5}  # NB: 16x12 slices
    got = gpucnr.run(ingested.stack.path, tmp_path / "r.zarr", workers=WORKERS, **small).load()
    order = ingested.linkage.sort_values("index")
    pix, labs = [], []
    for _, r in order.iterrows():
        vol, lab, affine, slope, inter = truth[r["source"]]
        ras = _ras(vol, affine)
        ras = ras[..., int(r["channel"])] if vol.ndim == 4 else ras
        pix.append(slope * _radiological(ras, int(r["frame"])).astype(np.float64) + inter)
        labs.append(_radiological(_ras(lab, affine), int(r["frame"])).astype(np.int32))
    for shape in {p.shape for p in pix}:
        sel = [i for i, p in enumerate(pix) if p.shape == shape]
        ref = gpucnr.measure(np.stack([pix[i] for i in sel]), np.stack([labs[i] for i in sel]), **small)
        sub = got.isel(image=sel)
        assert (ref["status"] == 0).any()
        np.testing.assert_array_equal(sub["status"].to_numpy(), ref["status"].to_numpy())
        for var in (*CELL, *IMAGE):
            if var == "status":
                continue
            np.testing.assert_allclose(sub[var].to_numpy(), ref[var].to_numpy(), rtol=1e-9, atol=1e-12,
                                       err_msg=var)


def test_nonfinite_is_decided_per_slice(tmp_path):
    """A NaN voxel skips its slice only (listed by source, channel and frame); images stored = frames of the
    stored files - skipped frames; --nonfinite exclude stores it."""
    src = tmp_path / "src"
    src.mkdir()
    vol = np.random.default_rng(1).normal(0, 1, SHAPE).astype(np.float32)
    vol[3, 4, 2] = np.nan
    _save(nib.Nifti1Image(vol, _affine(SPACING)), src / "nan.nii.gz")
    done = ingest(src, tmp_path / "s.zarr")
    s = done.summary
    assert (s.stored, s.images, s.skipped_frames) == (1, SHAPE[2] - 1, 1)
    rows = s.problems[s.problems["code"] == "nonfinite"]
    assert rows[["source", "item"]].to_numpy().tolist() == [["nan.nii.gz", "channel 0 frame 2"]]
    assert sorted(done.linkage["frame"]) == [0, 1, 3, 4]
    assert "slices of stored volumes skipped" in s.problems_text()
    assert dict(done.stack.group.attrs)["ingest"]["skipped_frames"] == 1
    kept = ingest(src, tmp_path / "t.zarr", nonfinite="exclude")
    assert kept.summary.images == SHAPE[2]


def test_label_map_of_another_affine_or_shape_is_listed(tmp_path):
    """A label map whose affine differs beyond tolerance, or whose shape differs, leaves its image stored
    unlabelled and is listed (mask-shape); one within 1e-4 labels it; a non-integral float map is mask-labels."""
    src, lab = tmp_path / "imagesTr", tmp_path / "labelsTr"
    src.mkdir()
    lab.mkdir()
    rng = np.random.default_rng(2)
    affine = _affine(SPACING)
    labels = _labels(rng, SHAPE)
    for name, lab_affine, lab_arr in (
            ("near", affine + 5e-5, labels),
            ("moved", affine + np.pad(np.full((3, 1), 0.01), ((0, 1), (3, 0))), labels),
            ("shape", affine, labels[:, :, :4]),
            ("frac", affine, labels.astype(np.float32) / 3)):
        _save(nib.Nifti1Image(_volume(rng, np.int16, SHAPE), affine), src / f"{name}.nii.gz")
        _save(nib.Nifti1Image(lab_arr, lab_affine), lab / f"{name}.nii.gz")
    done = ingest(src, tmp_path / "s.zarr", masks=lab)
    s = done.summary
    assert s.stored == 4 and s.unlabelled_images == 3 * SHAPE[2]
    codes = dict(zip(s.problems["source"], s.problems["code"], strict=True))
    assert codes == {"moved.nii.gz": "mask-shape", "shape.nii.gz": "mask-shape", "frac.nii.gz": "mask-labels"}
    _, plane = done.read(done.index("near.nii.gz", 2))
    assert plane.any()


def test_bad_inputs_are_coded_skips(tmp_path):
    """Each a coded skip with the rest stored: truncated .nii.gz, a gzip of garbage, a vox_offset beyond the
    file, dims declaring 10^12 voxels, a 5-D and a vector-intent NIfTI, a volume over --max-volume-mb, NRRD and
    MetaImage files."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    good = nib.Nifti1Image(_volume(rng, np.int16, SHAPE), _affine(SPACING))
    _save(good, src / "good.nii.gz")
    _save(good, src / "full.nii")
    raw = gzip.compress(good.to_bytes())
    (src / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (src / "garbage.nii.gz").write_bytes(gzip.compress(rng.bytes(2000)))
    data = bytearray(good.to_bytes())
    data[108:112] = np.float32(10**6).tobytes()  # NB: vox_offset beyond the end of the file
    (src / "offset.nii").write_bytes(bytes(data))
    huge = bytearray(good.to_bytes()[:352])
    huge[40:56] = np.array([3, 10**4, 10**4, 10**4, 1, 1, 1, 1], "<i2").tobytes()
    (src / "huge.nii").write_bytes(bytes(huge))
    _save(nib.Nifti1Image(rng.normal(size=(4, 4, 3, 1, 2)).astype(np.float32), np.eye(4)), src / "five.nii.gz")
    vec = nib.Nifti1Image(rng.normal(size=(4, 4, 3, 1, 3)).astype(np.float32), np.eye(4))
    vec.header.set_intent("vector")
    _save(vec, src / "vector.nii.gz")
    _save(nib.Nifti1Image(np.zeros((64, 64, 40), np.float64), np.eye(4)), src / "big.nii.gz")
    (src / "x.nrrd").write_bytes(b"NRRD0004\ntype: short\n")
    (src / "y.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    done = ingest(src, tmp_path / "s.zarr", max_volume_mb=1)
    codes = dict(zip(done.summary.problems["source"], done.summary.problems["code"], strict=True))
    assert codes == {"truncated.nii.gz": "truncated", "garbage.nii.gz": "bad-header", "offset.nii": "truncated",
                     "huge.nii": "image-too-large", "five.nii.gz": "unsupported-format",
                     "vector.nii.gz": "unsupported-format", "big.nii.gz": "image-too-large",
                     "x.nrrd": "unsupported-format", "y.mha": "unsupported-format"}
    assert done.summary.stored == 2 and done.summary.images == 2 * SHAPE[2]
    reasons = dict(zip(done.summary.problems["source"], done.summary.problems["reason"], strict=True))
    assert "NRRD" in reasons["x.nrrd"] and "MetaImage" in reasons["y.mha"]
    assert "--max-volume-mb" in reasons["big.nii.gz"]


def test_summary_counts_and_case_of_2d_files(tmp_path):
    """Every image has a case: a 2-D file's is a pseudonym of its name, distinct per file."""
    from dicomfactory import write_raster

    src = tmp_path / "src"
    src.mkdir()
    for n in range(2):
        write_raster(src / f"im{n}.png", np.full((8, 9), n, np.uint8))
    done = ingest(src, tmp_path / "s.zarr")
    cases = done.stack.images["case"].tolist()
    assert len(set(cases)) == 2 and all(len(c) == 20 for c in cases)
    assert pd.isna(done.stack.images["spacing_z"]).all()
    json.dumps(dict(done.stack.group.attrs)["ingest"])


# --- layouts ----------------------------------------------------------------------------------------------------


def _nii(path, arr, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(nib.Nifti1Image(arr, _affine(SPACING) if affine is None else affine), path)


def test_layouts_are_recognised_without_flags(tmp_path):
    """nnU-Net raw (two channels), MSD (4-D), imagesTs, BraTS 2023 hyphenated names, a label file without an
    image, dataset.json in both spellings and AppleDouble files: labels found by the layout alone, label names
    into roi_name, region lists ignored and said so."""
    rng = np.random.default_rng(4)
    lab = _labels(rng, SHAPE)
    nn = tmp_path / "src" / "Dataset001_Tumour"
    for case in ("a", "b"):
        for ch in range(2):
            _nii(nn / "imagesTr" / f"{case}_{ch:04d}.nii.gz", _volume(rng, np.int16, SHAPE))
        _nii(nn / "labelsTr" / f"{case}.nii.gz", lab)
    _nii(nn / "labelsTr" / "orphan.nii.gz", lab)
    _nii(nn / "imagesTs" / "c_0000.nii.gz", _volume(rng, np.int16, SHAPE))
    (nn / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (nn / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "edema": 1, "enhancing": 2,
                                                            "whole tumor": [1, 2]}}))
    msd = tmp_path / "src" / "Task01_BrainTumour"
    _nii(msd / "imagesTr" / "m.nii.gz", _volume(rng, np.float32, (*SHAPE, 3)))
    _nii(msd / "labelsTr" / "m.nii.gz", lab)
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "edema", "2": "enhancing"}}))
    brats = tmp_path / "src" / "BraTS-GLI-00000-000"
    for seq in ("t1c", "t2f"):
        _nii(brats / f"BraTS-GLI-00000-000-{seq}.nii.gz", _volume(rng, np.int16, SHAPE))
    _nii(brats / "BraTS-GLI-00000-000-seg.nii.gz", lab)
    done = ingest(tmp_path / "src", tmp_path / "s.zarr")
    s = done.summary
    n = SHAPE[2]
    # NB: 4 nnU-Net channel files + 1 test file + 1 MSD file + 2 BraTS channels; the AppleDouble file is litter
    # and the two dataset.json are read: neither is an input file, counted or listed
    assert (s.stored, s.images) == (8, (4 + 1 + 3 + 2) * n)
    assert s.skipped == {} and s.files_in == 8
    assert not s.problems["source"].str.contains("._a_0000", regex=False).any()
    assert s.masks == 4 and s.unlabelled_images == n  # NB: imagesTs
    codes = s.problems[s.problems["item"] != "file"][["source", "code"]].to_numpy().tolist()
    assert ["Dataset001_Tumour/labelsTr/orphan.nii.gz", "mask-no-image"] in codes
    assert ["Dataset001_Tumour/dataset.json", "label-regions"] in codes
    stack = done.stack
    assert dict(stack.group.attrs)["label_names"] == {"1": "edema", "2": "enhancing"}
    _, plane = done.read(done.index("Dataset001_Tumour/imagesTr/b_0001.nii.gz", 2))
    assert set(np.unique(plane)) == {0, 1, 2}
    m = done.linkage[done.linkage["source"] == "Task01_BrainTumour/imagesTr/m.nii.gz"]
    assert sorted(set(m["channel"])) == [0, 1, 2] and m["case"].nunique() == 3
    _, plane = done.read(done.index("BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz", 1))
    assert plane.any()
    res = gpucnr.run(stack.path, tmp_path / "r.zarr", workers=WORKERS, dilation=1, border=1, min_bg=5).load()
    assert set(np.unique(res["roi_name"].to_numpy())) == {"edema", "enhancing"}


def test_resume_of_an_interrupted_volume_ingest(tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) after two volumes, with shards of 4 slices on disk mid-volume: --resume re-reads the
    partly stored volume and ends with the stack, linkage and skipped list of an uninterrupted ingest."""
    import gpucnr.sources.journal as journal
    from gpucnr.errors import Interrupted

    src = tmp_path / "src"
    rng = np.random.default_rng(7)
    for n in range(4):
        _nii(src / f"v{n}.nii.gz", _volume(rng, np.int16, SHAPE))
    key = tmp_path / "k.key"
    (tmp_path / "ref").mkdir()
    ref = ingest(src, tmp_path / "ref" / "s.zarr", shard=4, key_file=key)
    seen = []
    original = journal.Journal.record

    def record(self, entry):
        original(self, entry)
        seen.append(entry)
        if len(seen) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(journal.Journal, "record", record)
    stack = tmp_path / "s.zarr"
    with pytest.raises(Interrupted):
        gpucnr.ingest(src, stack, shard=4, key_file=key, workers=WORKERS)
    monkeypatch.setattr(journal.Journal, "record", original)
    done = ingest(src, stack, shard=4, key_file=key, resume=True)
    assert done.stack.fingerprint() == ref.stack.fingerprint()
    pd.testing.assert_frame_equal(done.stack.images, ref.stack.images)
    for ext in (".linkage.csv", ".skipped.csv"):
        assert (stack.with_name(stack.name + ext).read_text()
                == ref.summary.stack.with_name(ref.summary.stack.name + ext).read_text())


def test_with_paths_names_the_channel_of_a_4d_volume(tmp_path):
    """`gpucnr filter --with-paths` on a 4-D volume: its channels share source and frame; the `channel` column tells
    their rows apart, as the linkage file does (issue 14, DESIGN §10: images are keyed by (source, channel, frame))."""
    from gpucnr.manifests import with_paths

    rng = np.random.default_rng(3)
    src = tmp_path / "Task02_Heart"
    vol = np.stack([_volume(rng, np.int16, SHAPE) for _ in range(2)], axis=-1)
    _nii(src / "imagesTr" / "h.nii.gz", vol)
    _nii(src / "labelsTr" / "h.nii.gz", _labels(rng, SHAPE))
    done = ingest(src, tmp_path / "s.zarr")
    results = tmp_path / "r.zarr"
    gpucnr.run(done.stack.path, results, workers=WORKERS, dilation=1, border=1, min_bg=5)
    table = with_paths(gpucnr.manifest(results, threshold=1.5), results)
    assert len(table) == 2 * SHAPE[2]
    link = done.linkage.set_index("index")
    assert (table["channel"].to_numpy() == link.loc[table["image"], "channel"].to_numpy()).all()
    assert sorted(table["channel"].unique()) == [0, 1]
    assert not table.duplicated(["source", "channel", "frame"]).any()
    written = gpucnr.write_manifest(table, tmp_path / "m.csv")  # NB: a manifest column, written and read back
    back, _ = gpucnr.read_manifest(written)
    assert back["channel"].astype(int).tolist() == table["channel"].tolist()


# A sitecustomize first on the workers' PYTHONPATH (as test_ingest_bad's decoder crashes): each slice of a volume
# travels as a part of its own, and the worker decoding a file whose name holds "crash" kills itself (SIGKILL)
# after sending three of them.
_KILL_MIDWAY = '''
import os
import signal

if os.environ.get("GPUCNR_TEST_KILL_MIDWAY"):
    from gpucnr.sources import tasks as _tasks
    from gpucnr.sources import workers as _workers

    _workers._PART_BYTES = 1
    _decode, _send, _sent = _tasks.decode_file, _workers.send, [None]

    def decode_file(path, *args):
        _sent[0] = 0 if "crash" in os.path.basename(str(path)) else None
        return _decode(path, *args)

    def send(conn, message):
        if _sent[0] is not None and message[0] == "part":
            if _sent[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            _sent[0] += 1
        _send(conn, message)

    _tasks.decode_file, _workers.send = decode_file, send
'''


def test_volume_whose_worker_dies_midway_is_taken_back(tmp_path, monkeypatch):
    """A worker killed after three slices of a volume went to the stack (shards of 2 slices, so some are on disk):
    the volume is listed as decoder-crash, its stored slices are cut from the stack, the accounting holds, and the
    stack equals one where that file was never an image; interrupted after it, --resume ends alike."""

    import gpucnr.sources.journal as journal
    from gpucnr.errors import Interrupted

    rng = np.random.default_rng(11)
    src, ref_src = tmp_path / "src", tmp_path / "ref_src"
    for name in ("a.nii.gz", "b_crash.nii.gz", "c.nii.gz"):
        _nii(src / name, _volume(rng, np.int16, SHAPE))
        ref_src.mkdir(exist_ok=True)
        (ref_src / name).write_bytes((src / name).read_bytes())
    (ref_src / "b_crash.nii.gz").write_bytes(gzip.compress(b"not a NIfTI file" * 40))  # NB: same names, same order
    sitecustomize(tmp_path, monkeypatch, _KILL_MIDWAY)
    monkeypatch.setenv("GPUCNR_TEST_KILL_MIDWAY", "1")
    key = tmp_path / "k.key"
    (tmp_path / "ref").mkdir()
    ref = ingest(ref_src, tmp_path / "ref" / "s.zarr", shard=2, key_file=key)
    (tmp_path / "one").mkdir()
    done = ingest(src, tmp_path / "one" / "s.zarr", shard=2, key_file=key)
    row = done.summary.problems.set_index("source").loc["b_crash.nii.gz"]
    assert row["code"] == "decoder-crash" and "-9" in row["reason"], row["reason"]
    assert done.summary.stored == 2 and done.summary.images == 2 * SHAPE[2]
    assert done.stack.fingerprint() == ref.stack.fingerprint()
    pd.testing.assert_frame_equal(done.stack.images, ref.stack.images)
    pd.testing.assert_frame_equal(done.linkage, ref.linkage)

    seen, original = [], journal.Journal.record

    def record(self, entry):
        original(self, entry)
        seen.append(entry)
        if entry["skip"] == "decoder-crash":
            raise KeyboardInterrupt  # NB: the journal holds the cut bucket and the crash's record

    monkeypatch.setattr(journal.Journal, "record", record)
    stack = tmp_path / "s.zarr"
    with pytest.raises(Interrupted):
        gpucnr.ingest(src, stack, shard=2, key_file=key, workers=WORKERS)
    monkeypatch.setattr(journal.Journal, "record", original)
    assert seen[-1]["skip"] == "decoder-crash"
    counts = [json.loads(line)["count"] for line in stack.with_name("s.zarr.journal").read_text().splitlines()
              if '"flushed"' in line]
    assert any(b < a for a, b in itertools.pairwise(counts)), counts  # NB: slices on disk were cut, not just pending
    resumed = ingest(src, stack, shard=2, key_file=key, resume=True)
    assert resumed.stack.fingerprint() == ref.stack.fingerprint()
    assert resumed.summary.skipped == {"decoder-crash": 1}
