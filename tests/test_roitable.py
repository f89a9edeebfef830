"""ROI tables: gpucnr.roitable.normalize_table (validation) and sample_rois (the article's multi-ROI sampling)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import gpucnr
from gpucnr.roitable import normalize_table, sample_rois

GOOD = {
    "image": [0, 0, 1],
    "roi": [1, 2, 1],
    "kind": ["square", "disk", "square"],
    "cx": [10, 20, 30],
    "cy": [11, 21, 31],
    "r": [3, 4, 5],
}


def _table(**changes):
    t = {k: list(v) for k, v in GOOD.items()}
    for col, (row, value) in changes.items():
        t[col][row] = value
    return t


# --------------------------------------------------------------------------------------------------------------
# normalize_table
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_frame", [False, True], ids=["dict", "DataFrame"])
def test_normalize_accepts_dict_and_dataframe(as_frame):
    src = pd.DataFrame(GOOD) if as_frame else {k: np.asarray(v) for k, v in GOOD.items()}
    out = normalize_table(src, 2)
    assert isinstance(out, pd.DataFrame)
    for col in ("image", "roi", "cx", "cy", "r", "kind_code"):
        assert out[col].dtype == np.int64, col
        assert out[col].tolist() == (GOOD[col] if col != "kind_code" else [0, 1, 0]), col
    assert out["kind"].tolist() == GOOD["kind"]
    assert out["name"].tolist() == ["", "", ""]


def test_names_by_distinct_value_equal_the_row_wise_conversion():
    # NB: names are converted per distinct value when all are str or missing; anything else row-wise as before
    cases = [["a", None, "b", np.nan, "", pd.NA, "a"], [1, "x", None, 2.5], ["only"] * 4, []]
    for names in cases:
        t = pd.DataFrame({"image": np.arange(len(names)), "roi": 1, "kind": "square", "cx": 1, "cy": 1, "r": 1,
                          "name": pd.Series(names, dtype=object)})
        out = normalize_table(t, max(len(names), 1))["name"].tolist()
        assert out == pd.Series(names, dtype=object).fillna("").astype(str).tolist()
        assert all(type(v) is str for v in out)


def test_normalize_keeps_names_and_reads_lists_and_odd_case_kinds():
    t = dict(GOOD, name=["lesion", None, "liver"], kind=[" Square", "DISK", "square"])
    out = normalize_table(t, 2)
    assert out["name"].tolist() == ["lesion", "", "liver"]
    assert out["kind"].tolist() == ["square", "disk", "square"]


def test_normalize_accepts_a_dataframe_with_a_non_default_index():
    df = pd.DataFrame(GOOD, index=[7, 3, 5])
    out = normalize_table(df, 2)
    assert out["cx"].tolist() == GOOD["cx"]


def test_integral_floats_are_accepted():
    t = dict(GOOD, cx=[10.0, 20.0, 30.0], r=np.array([3.0, 4.0, 5.0], np.float32))
    out = normalize_table(t, 2)
    assert out["cx"].dtype == np.int64 and out["cx"].tolist() == [10, 20, 30]
    assert out["r"].tolist() == [3, 4, 5]


def _expect_error(table, n_images, row, column):
    with pytest.raises(gpucnr.RoiTableError) as info:
        normalize_table(table, n_images)
    err = info.value
    assert err.code == "roi-table"
    assert isinstance(err, ValueError) and isinstance(err, gpucnr.InputError)
    msg = str(err)
    assert msg.startswith("[roi-table]")
    if row is not None:
        assert re.search(rf"\brow {row}\b", msg), msg
    assert re.search(rf"\b{column}\b", msg), msg
    return msg


@pytest.mark.parametrize("column", ["image", "roi", "kind", "cx", "cy", "r"])
def test_missing_column(column):
    t = {k: v for k, v in GOOD.items() if k != column}
    msg = _expect_error(t, 2, None, column)
    assert f"[{column!r}]" in msg, msg  # the missing one, not just the list of required columns


@pytest.mark.parametrize(
    ("changes", "row", "column"),
    [
        ({"cx": (2, 2.5)}, 2, "cx"),
        ({"cy": (1, 7.25)}, 1, "cy"),
        ({"r": (1, float("nan"))}, 1, "r"),
        ({"cx": (0, float("nan"))}, 0, "cx"),
        ({"cy": (2, float("inf"))}, 2, "cy"),
        ({"cx": (1, "ten")}, 1, "cx"),
        ({"kind": (1, "circle")}, 1, "kind"),
        ({"roi": (2, 0)}, 2, "roi"),
        ({"roi": (1, -3)}, 1, "roi"),
        ({"image": (2, 2)}, 2, "image"),
        ({"image": (1, -1)}, 1, "image"),
        ({"r": (0, -1)}, 0, "r"),
        ({"roi": (2, 1), "image": (2, 0)}, 2, "image"),  # duplicate (image 0, roi 1)
    ],
    ids=["cx-2.5", "cy-frac", "r-nan", "cx-nan", "cy-inf", "cx-str", "kind", "roi-0", "roi-neg", "image-high",
         "image-neg", "r-neg", "duplicate"],
)
def test_bad_values_name_row_and_column(changes, row, column):
    _expect_error(_table(**changes), 2, row, column)


def test_duplicate_message_names_image_and_roi():
    msg = _expect_error(_table(roi=(1, 1)), 2, 1, "image")
    assert "id 1" in msg


def test_unequal_column_lengths_and_wrong_type():
    t = {k: list(v) for k, v in GOOD.items()}
    t["cx"] = t["cx"][:2]
    with pytest.raises(gpucnr.RoiTableError):
        normalize_table(t, 2)
    with pytest.raises(gpucnr.RoiTableError, match="DataFrame"):
        normalize_table([1, 2, 3], 2)


def test_measure_reports_the_table_error():
    with pytest.raises(gpucnr.RoiTableError, match=r"row 2.*cx"):
        gpucnr.measure(np.zeros((2, 40, 40), np.uint8), _table(cx=(2, 2.5)))
    with pytest.raises(gpucnr.RoiTableError, match=r"row 0.*image"):
        gpucnr.measure(np.zeros((40, 40), np.uint8), _table(image=(0, 1)))


def test_radius_zero_disk_is_valid():
    out = normalize_table(_table(r=(1, 0)), 2)
    assert out["r"].tolist() == [3, 0, 5]


# --------------------------------------------------------------------------------------------------------------
# sample_rois
# --------------------------------------------------------------------------------------------------------------


def lesion_stack() -> np.ndarray:
    """Label arrays: disks of several radii, two abutting labels, an irregular blob, a too-small lesion,
    a lesion at the image edge, and an empty image."""
    h, w = 48, 56
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((6, h, w), np.int32)
    out[0][(yy - 24) ** 2 + (xx - 28) ** 2 <= 12**2] = 1
    out[1][(yy - 20) ** 2 + (xx - 20) ** 2 <= 9**2] = 1
    out[1][10:30, 30:50] = 2  # abuts/overlaps label 1's disk: a square may not span both labels
    rng = np.random.default_rng(4)
    blob = np.zeros((h, w), bool)
    for _ in range(6):
        cy, cx, r = rng.integers(12, 36), rng.integers(12, 44), rng.integers(4, 9)
        blob |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    out[2][blob] = 3
    out[3][(yy - 20) ** 2 + (xx - 20) ** 2 <= 3**2] = 1  # radius 3: no 10x10 square and no r=5 disk fits
    out[4][:14, :16] = 1  # at the image corner
    return out  # out[5] is empty


def roi_pixels(shape, kind, cx, cy, r):
    """(ys, xs) of the ROI, unclipped (so a centre near the edge shows its out-of-image pixels)."""
    if kind == "square":
        ys, xs = np.mgrid[cy - r : cy + r, cx - r : cx + r]
    else:
        ys, xs = np.mgrid[cy - r : cy + r + 1, cx - r : cx + r + 1]
        keep = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        ys, xs = ys[keep], xs[keep]
    return ys.ravel(), xs.ravel()


def inside_one_label(labels2d, kind, cx, cy, r) -> bool:
    ys, xs = roi_pixels(labels2d.shape, kind, cx, cy, r)
    h, w = labels2d.shape
    if ys.min() < 0 or xs.min() < 0 or ys.max() >= h or xs.max() >= w:
        return False
    vals = labels2d[ys, xs]
    return bool(vals[0] != 0 and (vals == vals[0]).all())


def brute_force_admissible(labels2d, kind, r) -> set[tuple[int, int]]:
    h, w = labels2d.shape
    return {(cx, cy) for cy in range(h) for cx in range(w) if inside_one_label(labels2d, kind, cx, cy, r)}


@pytest.mark.parametrize(("kind", "r"), [("square", 5), ("square", 2), ("disk", 5), ("disk", 3)])
def test_every_sampled_roi_lies_inside_one_lesion(kind, r):
    labels = lesion_stack()
    table = sample_rois(labels, k=8, r=r, kind=kind, seed=1)
    assert list(table.columns) == ["image", "roi", "kind", "cx", "cy", "r", "name"]
    for row in table.itertuples():
        assert inside_one_label(labels[row.image], kind, row.cx, row.cy, row.r), row


@pytest.mark.parametrize(("kind", "r"), [("square", 5), ("square", 1), ("disk", 5), ("disk", 0)])
def test_admissible_centres_are_exactly_the_brute_force_set(kind, r):
    """With k larger than any admissible set, every admissible centre is drawn once: the sampler's
    admissible set equals an exhaustive per-pixel check (no centre missing, none extra)."""
    labels = lesion_stack()
    table = sample_rois(labels, k=10_000, r=r, kind=kind, seed=0)
    for i in range(labels.shape[0]):
        rows = table[table["image"] == i]
        got = set(zip(rows["cx"].tolist(), rows["cy"].tolist(), strict=True))
        assert len(got) == len(rows), f"image {i}: a centre drawn twice"
        assert got == brute_force_admissible(labels[i], kind, r), f"image {i}"


def test_at_most_k_per_image_distinct_centres_and_ids():
    labels = lesion_stack()
    table = sample_rois(labels, k=5, r=5, kind="square", seed=3)
    counts = table.groupby("image").size()
    assert counts.max() <= 5
    assert counts.get(0) == 5 and counts.get(2) == 5
    assert 3 not in counts.index and 5 not in counts.index  # too small a lesion, no lesion: no ROI
    for _, rows in table.groupby("image"):
        assert rows["roi"].tolist() == list(range(1, len(rows) + 1))
        assert not rows.duplicated(["cx", "cy"]).any()
    assert (table["name"] == "sample").all() and (table["kind"] == "square").all() and (table["r"] == 5).all()
    assert sample_rois(labels, k=0, r=5, seed=3).empty


def test_bool_masks_and_2d_input():
    labels = lesion_stack()
    as_bool = sample_rois(labels[0] != 0, k=4, r=4, seed=2)
    as_int = sample_rois(labels[:1], k=4, r=4, seed=2)
    pd.testing.assert_frame_equal(as_bool, as_int)
    assert (as_bool["image"] == 0).all() and len(as_bool) == 4


def test_same_seed_same_rois_other_seed_other_rois():
    labels = lesion_stack()
    a = sample_rois(labels, k=5, r=3, seed=42)
    b = sample_rois(labels, k=5, r=3, seed=42)
    c = sample_rois(labels, k=5, r=3, seed=43)
    pd.testing.assert_frame_equal(a, b)
    assert not a[["cx", "cy"]].equals(c[["cx", "cy"]])


def test_seeded_per_global_image_index():
    """Image i is drawn with (seed, start + i): a subset sampled with `start` gives the whole stack's ROIs,
    and an image's ROIs do not depend on its neighbours."""
    labels = lesion_stack()
    whole = sample_rois(labels, k=5, r=3, seed=7)
    for start, stop in [(1, 3), (2, 6), (4, 5)]:
        part = sample_rois(labels[start:stop], k=5, r=3, seed=7, start=start)
        expected = whole[(whole["image"] >= start) & (whole["image"] < stop)].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, expected)
    # the same lesion at another global index draws other centres
    moved = sample_rois(labels[:1], k=5, r=3, seed=7, start=9)
    assert (moved["image"] == 9).all()
    assert not moved[["cx", "cy"]].equals(whole[whole["image"] == 0][["cx", "cy"]].reset_index(drop=True))


def test_draws_without_replacement_exhaust_a_small_lesion():
    """A lesion with exactly 3 admissible centres and k = 5 gives those 3, each once."""
    labels = np.zeros((1, 30, 30), np.int32)
    labels[0, 10:18, 10:16] = 1  # 8 rows x 6 cols; a 6x6 square (r=3) fits at 3 row offsets, 1 column
    table = sample_rois(labels, k=5, r=3, seed=0)
    assert sorted(zip(table["cy"], table["cx"], strict=True)) == [(13, 13), (14, 13), (15, 13)]


def test_draws_are_spread_over_the_admissible_centres():
    """Over many seeds, every admissible centre of a small lesion gets drawn (uniform, not a fixed few)."""
    labels = np.zeros((1, 30, 30), np.int32)
    labels[0, 5:17, 5:17] = 1  # 12 x 12: 7 x 7 = 49 admissible centres for r = 3
    counts = {}
    for seed in range(300):
        t = sample_rois(labels, k=2, r=3, seed=seed)
        for c in zip(t["cx"], t["cy"], strict=True):
            counts[c] = counts.get(c, 0) + 1
    assert len(counts) == 49  # 600 draws, 12.2 expected per centre: P(one never drawn) ~ 2e-4
    assert max(counts.values()) < 35


def test_bad_sampling_arguments():
    labels = lesion_stack()
    with pytest.raises(ValueError, match="kind"):
        sample_rois(labels, kind="circle")
    with pytest.raises(ValueError):
        sample_rois(labels, r=0, kind="square")
    with pytest.raises(ValueError):
        sample_rois(labels, k=-1)
    with pytest.raises(ValueError, match="shape"):
        sample_rois(np.zeros((2, 2, 2, 2), np.int32))


@pytest.mark.parametrize("kind", ["square", "disk"])
def test_sampled_table_works_with_measure(kind):
    labels = lesion_stack()
    rng = np.random.default_rng(0)
    images = rng.normal(100.0, 5.0, labels.shape) + 40.0 * (labels != 0)
    r = 4
    table = sample_rois(labels, k=5, r=r, kind=kind, seed=0)
    ds = gpucnr.measure(images, table, background="complement-all", labels=labels, min_bg=10)
    assert ds.sizes["image"] == labels.shape[0]
    assert ds.roi.values.tolist() == sorted(set(table["roi"]))
    assert (ds.roi_name.values[ds.status.values != 1] == "sample").all()
    expected_n = 4 * r * r if kind == "square" else int(sum(dx * dx + dy * dy <= r * r for dx in range(-r, r + 1)
                                                            for dy in range(-r, r + 1)))
    for row in table.itertuples():
        cell = ds.sel(image=row.image, roi=row.roi)
        assert int(cell.n_roi) == expected_n
        # the ROI lies in the lesion (mean ~140), its background outside every lesion (mean ~100)
        assert abs(float(cell.mean_roi) - 140.0) < 5.0 and abs(float(cell.mean_bg) - 100.0) < 2.0
        assert int(cell.status) == 0
    # images without any sampled ROI have no valid cell
    assert ds.n_valid.values[5] == 0 and np.isnan(ds.cnr_median.values[5])
