"""gpucnr.aggregate (issue 15): one CNR per group from pooled moments, against the union of the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import gpucnr
from gpucnr.kernels import STATUS
from gpucnr.pooling import pool_moments

SLICES, CASES, SIZE = 4, 3, 48


def volumes(seed: int):
    """CASES cases of SLICES slices: lesion 1 on some slices only (absent elsewhere), lesion 2 tiny on one slice
    (roi-too-small there with ddof 1), integer-valued float noise with a per-case offset."""
    rng = np.random.default_rng(seed)
    n = SLICES * CASES
    images = rng.normal(100, 7, (n, SIZE, SIZE)).round() + np.repeat(rng.normal(0, 30, CASES), SLICES)[:, None, None]
    labels = np.zeros((n, SIZE, SIZE), np.int32)
    for i in range(n):
        if i % SLICES != 3:  # lesion 1 absent from every case's last slice
            y, x, r = int(rng.integers(14, 30)), int(rng.integers(14, 30)), int(rng.integers(3, 7))
            labels[i, y - r : y + r, x - r : x + r] = 1
            images[i][labels[i] == 1] += rng.normal(15, 3)
    labels[1, 40, 40] = 2  # one pixel: roi-too-small for ddof 1, a valid 1-pixel ROI for ddof 0
    labels[5, 39:42, 39:42] = 2
    case = np.repeat([f"case{k}" for k in range(CASES)], SLICES)
    return images, labels, case


def background(label_plane):
    """The article's complement background of one slice: not the ROI dilated by the 5-step cross, not the frame."""
    bg = ~ndimage.binary_dilation(label_plane, iterations=5)
    bg[:5], bg[-5:], bg[:, :5], bg[:, -5:] = False, False, False, False
    return bg


def union_reference(images, labels, case, name, roi, ddof):
    """Moments of the union of the group's ROI pixels and of its slices' backgrounds where the ROI is present."""
    rois, bgs = [], []
    for i in np.flatnonzero(case == name):
        mask = labels[i] == roi
        if mask.any():
            rois.append(images[i][mask])
            bgs.append(images[i][background(mask)])
    a, b = np.concatenate(rois), np.concatenate(bgs)
    return a, b, abs(a.mean() - b.mean()) / np.sqrt(a.var(ddof=ddof) + b.var(ddof=ddof))


@pytest.mark.parametrize("ddof", [0, 1])
def test_aggregate_equals_the_union_of_the_pixels(ddof):
    images, labels, case = volumes(3)
    ds = gpucnr.measure(images, labels, ddof=ddof, min_bg=5, backend="numpy").assign_coords(case=("image", case))
    out = gpucnr.aggregate(ds, by="case")
    assert out["cnr"].dims == ("case", "roi") and list(out["case"].values) == ["case0", "case1", "case2"]
    assert out["n_images"].values.tolist() == [SLICES] * CASES
    for name in out["case"].values:
        a, b, want = union_reference(images, labels, case, name, 1, ddof)
        got = out.sel(case=name, roi=1)
        assert int(got["n_roi"]) == a.size and int(got["n_bg"]) == b.size
        np.testing.assert_allclose(float(got["mean_roi"]), a.mean(), rtol=1e-12)
        np.testing.assert_allclose(float(got["var_bg"]), b.var(ddof=ddof), rtol=1e-9)
        np.testing.assert_allclose(float(got["cnr"]), want, rtol=1e-9)
        assert int(got["status"]) == STATUS["ok"]
    # lesion 2: one pixel on case0's slice 1 (with ddof 1 too small alone, pooled with nothing else in case0)
    tiny = out.sel(case="case0", roi=2)
    assert int(tiny["n_roi"]) == 1
    assert int(tiny["status"]) == (STATUS["roi-too-small"] if ddof == 1 else STATUS["ok"])
    assert int(out.sel(case="case2", roi=2)["status"]) == STATUS["absent"]
    a, b, want = union_reference(images, labels, case, "case1", 2, ddof)
    np.testing.assert_allclose(float(out.sel(case="case1", roi=2)["cnr"]), want, rtol=1e-9)


def test_pooling_is_associative_and_blocks_do_not_matter(monkeypatch):
    rng = np.random.default_rng(1)
    parts = [rng.normal(50, 9, int(k)) for k in rng.integers(1, 40, 7)]

    def moments(x):
        return np.int64(x.size), x.mean(), ((x - x.mean()) ** 2).sum()

    left = moments(parts[0])
    for p in parts[1:]:
        left = pool_moments(*left, *moments(p))
    right = moments(parts[-1])
    for p in reversed(parts[:-1]):
        right = pool_moments(*moments(p), *right)
    whole = moments(np.concatenate(parts))
    for got in (left, right):
        assert int(got[0]) == whole[0]
        np.testing.assert_allclose(got[1:], whole[1:], rtol=1e-12)
    assert pool_moments(0, np.nan, 0.0, *whole)[1] == whole[1]  # an empty side contributes nothing

    images, labels, case = volumes(5)
    ds = gpucnr.measure(images, labels, min_bg=5, backend="numpy").assign_coords(case=("image", case))
    ref = gpucnr.aggregate(ds, by="case")
    import gpucnr.pooling as module

    monkeypatch.setattr(module, "_BLOCK", 5)  # blocks that split cases
    split = gpucnr.aggregate(ds, by="case")
    for name in ("n_roi", "n_bg", "status"):
        np.testing.assert_array_equal(split[name].values, ref[name].values)
    np.testing.assert_allclose(split["cnr"].values, ref["cnr"].values, rtol=1e-12, equal_nan=True)


def test_statuses_of_groups_and_refusals():
    images, labels, case = volumes(7)
    ds = gpucnr.measure(images, labels, min_bg=5, backend="numpy").assign_coords(case=("image", case))
    status = ds["status"].values.copy()
    status[0, 0] = STATUS["failed"]
    status[4, 0] = STATUS["not-computed"]
    out = gpucnr.aggregate(ds.assign(status=(("image", "roi"), status)), by="case")
    assert int(out.sel(case="case0", roi=1)["status"]) == STATUS["failed"]
    assert int(out.sel(case="case1", roi=1)["status"]) == STATUS["not-computed"]
    assert int(out.sel(case="case2", roi=1)["status"]) == STATUS["ok"]
    gcnr = gpucnr.measure(images, labels, min_bg=5, definition="gcnr", backend="numpy")
    pooled = gpucnr.aggregate(gcnr.assign_coords(case=("image", case)), by="case")
    assert (pooled.sel(roi=1)["status"].values == STATUS["not-poolable"]).all()
    with pytest.raises(gpucnr.InputError, match="ddof"):
        gpucnr.aggregate(gpucnr.measure(images, labels, ddof=2, backend="numpy").assign_coords(
            case=("image", case)), by="case")
    with pytest.raises(gpucnr.InputError, match="not a per-image column"):
        gpucnr.aggregate(ds, by="site")
    # NB: a column no image has a value of (PNG results by patient_id) was an empty result, without a word
    with pytest.raises(gpucnr.InputError, match="no image of these results has a value of 'patient_id'"):
        gpucnr.aggregate(ds.assign_coords(patient_id=("image", [""] * ds.sizes["image"])), by="patient_id")


def test_aggregate_of_run_results_by_a_named_group_column(tmp_path):
    import pandas as pd

    images, labels, case = volumes(9)
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels, meta=pd.DataFrame({"site": case}),
                               shard=4)
    gpucnr.run(stack, tmp_path / "r.zarr", min_bg=5, group_columns=["site"], backend="numpy")
    out = gpucnr.aggregate(tmp_path / "r.zarr", by="site")
    direct = gpucnr.aggregate(gpucnr.measure(images, labels, min_bg=5, backend="numpy").assign_coords(
        site=("image", case)), by="site")
    np.testing.assert_array_equal(out["n_roi"].values, direct["n_roi"].values)
    np.testing.assert_allclose(out["cnr"].values, direct["cnr"].values, rtol=1e-12, equal_nan=True)


def test_manifest_at_case_level_decides_on_the_pooled_cnr(tmp_path, capsys):
    import pandas as pd

    from gpucnr.cli import main

    images, labels, case = volumes(11)
    ds = gpucnr.measure(images, labels, min_bg=5, backend="numpy").assign_coords(case=("image", case))
    pooled = gpucnr.aggregate(ds, by="case")
    threshold = float(np.sort(pooled["cnr_median"].values)[1])  # the middle case sits exactly on it: kept
    df = gpucnr.manifest(ds, threshold=threshold, level="case")
    assert df["case"].tolist() == ["case0", "case1", "case2"]
    want = np.where(pooled["cnr_median"].values < threshold, "drop", "keep")
    assert df["decision"].tolist() == want.tolist() and (df["decision"] == "keep").sum() == 2
    np.testing.assert_array_equal(df["cnr"].to_numpy(), pooled["cnr_median"].values)
    assert df["n_images"].tolist() == [SLICES] * CASES
    assert df["images"].iloc[1] == " ".join(str(i) for i in range(SLICES, 2 * SLICES))

    status = ds["status"].values.copy()
    status[SLICES, 0] = STATUS["not-computed"]
    blank = case.copy()
    blank[-1] = ""
    odd = ds.assign(status=(("image", "roi"), status)).assign_coords(case=("image", blank))
    df = gpucnr.manifest(odd, threshold=threshold, level="case", allow_incomplete=True)
    assert df.set_index("images").loc[str(CASES * SLICES - 1), "reason"] == "missing case"
    assert df.set_index("case").loc["case1", "reason"] == "not-computed"

    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels, meta=pd.DataFrame({"case": case}),
                               shard=4)
    gpucnr.run(stack, tmp_path / "r.zarr", min_bg=5, backend="numpy")
    capsys.readouterr()
    assert main(["filter", str(tmp_path / "r.zarr"), "--level", "case", "--threshold", str(threshold),
                 "--out", str(tmp_path / "keep.csv")]) == 0
    table = pd.read_csv(tmp_path / "keep.csv")
    assert table["decision"].tolist() == want.tolist()
    with pytest.raises(gpucnr.InputError, match="case"):
        gpucnr.manifest(ds.drop_vars("case"), level="case")


def test_summarize_gains_the_case_level_when_results_have_cases():
    images, labels, case = volumes(13)
    ds = gpucnr.measure(images, labels, min_bg=5, backend="numpy")
    assert list(gpucnr.summarize(ds)["level"].values) == ["image", "roi"]
    with_case = ds.assign_coords(case=("image", case), site=("image", np.where(case == "case2", "b", "a")))
    summary = gpucnr.summarize(with_case, by="site")
    assert list(summary["level"].values) == ["image", "roi", "case"]
    pooled = gpucnr.aggregate(with_case, by="case")["cnr_median"].values
    got = summary.sel(level="case")
    assert got["count"].sel(group="all").item() == CASES
    np.testing.assert_allclose(got["mean"].sel(group="all").item(), pooled.mean(), rtol=1e-12)
    assert got["count"].sel(group="site=a").item() == 2 and got["count"].sel(group="site=b").item() == 1


def test_the_report_shows_the_case_level(tmp_path):
    import pandas as pd

    images, labels, case = volumes(17)
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels, meta=pd.DataFrame({"case": case}),
                               shard=4)
    gpucnr.run(stack, tmp_path / "r.zarr", min_bg=5, backend="numpy")
    from gpucnr.report import write_report

    html = write_report(tmp_path / "r.zarr", tmp_path / "report").read_text()
    assert "Case level" in html and "pooled CNR" in html
