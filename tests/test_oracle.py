"""Oracle tests: gpucnr against the plain per-image, per-ROI reference (tests/reference.py) on random inputs,
through both the NumPy fast path (gpucnr.measure) and the portable path (measure_batch(fast=False)), and
against a faithful port of the article's own Python and MATLAB functions."""

from __future__ import annotations

import numpy as np
import pytest
from article import calculate_cnr, create_mask, get_background, multi_roi_cnr, select_roi
from cases import BACKGROUNDS, BG_LABEL, COUNTS, DEFINITIONS, DTYPES, FLOATS, FOOTPRINTS, NP
from reference import measure_reference, roi_mask
from scipy.ndimage import binary_dilation
from test_footprints import MATLAB_DISK_5

import gpucnr
from gpucnr.kernels.batch import measure_batch
from gpucnr.kernels.params import Params

# ------------------------------------------------------------------------------------------ random inputs


def random_images(rng, dtype, n, h, w):
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        img = rng.integers(0, 256, (n, h, w))
    elif dtype == np.uint16:
        lo = int(rng.choice([0, 30000]))
        img = rng.integers(lo, lo + int(rng.choice([50, 5000, 35000])), (n, h, w))
    elif dtype == np.int16:
        img = rng.integers(-32768, 32768, (n, h, w)) if rng.random() < 0.3 else rng.integers(-300, 300, (n, h, w))
    else:
        loc = float(rng.choice([0.0, 100.0, 1e4]))
        img = rng.normal(loc, float(rng.choice([0.5, 10.0])), (n, h, w))
        if rng.random() < 0.5:  # non-finite pixels, some in row 0 (where the shift is taken)
            bad = rng.random((n, h, w)) < 0.03
            bad[0, 0, : w // 2] = True
            img[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
    return img.astype(dtype)


def random_labels(rng, n, h, w, background):
    labels = np.zeros((n, h, w), rng.choice([np.int32, np.uint8, np.int64]))
    ids = rng.choice([1, 2, 3, 5, 12], size=int(rng.integers(1, 4)), replace=False)
    for i in range(n):
        for rid in ids:
            if rng.random() < 0.2:
                continue  # this id is absent from this image
            if rng.random() < 0.7:  # a rectangle, possibly touching the edges
                y, x = int(rng.integers(-2, h)), int(rng.integers(-2, w))
                hh, ww = (int(v) for v in rng.integers(1, 10, 2))
                labels[i, max(y, 0) : y + hh, max(x, 0) : x + ww] = rid
            else:  # scattered pixels
                labels[i][rng.random((h, w)) < 0.02] = rid
        if background == "label":
            labels[i][(labels[i] == 0) & (rng.random((h, w)) < 0.6)] = BG_LABEL
    return labels


def random_table(rng, n, h, w):
    rows = []
    for i in range(n):
        for rid in (1, 2, 4, 7):
            if rng.random() < 0.25:
                continue
            where = rng.random()
            if where < 0.1:  # wholly outside
                cx, cy = int(rng.choice([-20, w + 20])), int(rng.integers(0, h))
            elif where < 0.3:  # near or across an edge
                cx, cy = int(rng.choice([rng.integers(-6, 3), rng.integers(w - 3, w + 6)])), int(rng.integers(0, h))
            else:
                cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
            rows.append(dict(image=i, roi=rid, kind=str(rng.choice(["square", "disk"])), cx=cx, cy=cy,
                             r=int(rng.integers(0, 9))))
    if not rows:
        rows.append(dict(image=0, roi=1, kind="square", cx=w // 2, cy=h // 2, r=3))
    return rows


def random_lesions(rng, n, h, w):
    les = np.zeros((n, h, w), np.int16)
    for i in range(n):
        if rng.random() < 0.7:
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            les[i, y : y + int(rng.integers(2, 12)), x : x + int(rng.integers(2, 12))] = int(rng.integers(1, 4))
    return les


def lesion_mask(labels, table, lesions, shape):
    mask = np.zeros(shape, bool)
    if labels is not None:
        mask |= (labels != 0) & (labels != BG_LABEL)
    if table is not None:
        for t in table:
            mask[t["image"]] |= roi_mask(shape[1:], t["kind"], t["cx"], t["cy"], t["r"])
    if lesions is not None:
        mask |= (lesions != 0) & (lesions != BG_LABEL)
    return mask


def add_contrast(rng, images, mask):
    out = images.astype(np.float64)
    if images.dtype.kind == "f":
        finite = out[np.isfinite(out)]
        out[mask] += 1e4 * float(finite.std()) * float(rng.choice([1, -1]))
        return out.astype(images.dtype)
    info = np.iinfo(images.dtype)
    out[mask] += (info.max - info.min) / 3 * float(rng.choice([1, -1]))
    return np.clip(out, info.min, info.max).astype(images.dtype)


def make_case(seed, footprint, background, n=3, size=(24, 48)):
    """One random case: images, ROIs (labels or table), options for measure and for the reference."""
    rng = np.random.default_rng([seed, FOOTPRINTS.index(footprint), BACKGROUNDS.index(background)])
    dtype = DTYPES[seed % len(DTYPES)]
    h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
    images = random_images(rng, dtype, n, h, w)
    definition = DEFINITIONS[(seed + FOOTPRINTS.index(footprint)) % len(DEFINITIONS)]
    options = dict(background=background, footprint=footprint, dilation=int(rng.integers(0, 6)),
                   border=int(rng.integers(0, 6)), ddof=int(rng.integers(0, 2)), definition=definition,
                   min_bg=int(rng.choice([0, 5, 30])), signed=bool(definition != "gcnr" and rng.random() < 0.25))
    if background == "ring":
        options.update(ring_gap=int(rng.integers(0, 5)), ring_width=int(rng.integers(1, 7)))
    if background == "label":
        options["background_label"] = BG_LABEL
    labels = table = lesions = None
    if rng.random() < 0.5:
        labels = random_labels(rng, n, h, w, background)
    else:
        table = random_table(rng, n, h, w)
        if background == "label":
            lesions = random_labels(rng, n, h, w, "label")
        elif background == "complement-all" and rng.random() < 0.6:
            lesions = random_lesions(rng, n, h, w)
    if rng.random() < 0.4:  # bright lesions, for floats 10^4 sigma above the background (ill-conditioned sums)
        images = add_contrast(rng, images, lesion_mask(labels, table, lesions, (n, h, w)))
    padding = None
    if rng.random() < 0.5:  # a per-image padding value, for the kernel path (measure has no padding option)
        padding = np.full(n, np.nan)
        padding[0] = float(images[0, 1, 1]) if np.isfinite(images[0, 1, 1]) else 0.0
        images[0, :, -3:] = padding[0]  # a padded strip, like a DICOM's
        padding[-1] = float(images[-1, h // 2, w // 2]) if np.isfinite(images[-1, h // 2, w // 2]) else 0.0
        images[-1, :2, :] = padding[-1]  # row 0 all padding: the shift has to look further
    return dict(images=images, labels=labels, table=table, lesions=lesions, options=options, padding=padding)


# ------------------------------------------------------------------------------------------ the two paths


def table_columns(table):
    return {k: np.array([t[k] for t in table]) for k in ("image", "roi", "kind", "cx", "cy", "r")}


def run_measure(case):
    opts = dict(case["options"])
    rois = case["labels"] if case["labels"] is not None else table_columns(case["table"])
    ds = gpucnr.measure(case["images"], rois, labels=case["lesions"], backend="numpy", **opts)
    out = {k: ds[k].values for k in (*COUNTS, *FLOATS)}
    return [int(v) for v in ds.roi.values], out


def run_portable(case, padding=None):
    """measure_batch on NumPy with every fast path off."""
    images = case["images"]
    params = Params(**case["options"])
    labels, table, roi_ids = case["labels"], None, None
    lesions = case["lesions"]
    if labels is not None and params.background == "label":
        lesions = labels
    if case["table"] is not None:
        cols = table_columns(case["table"])
        roi_ids = np.unique(cols["roi"]).astype(np.int64)
        table = {
            "image": cols["image"],
            "col": np.searchsorted(roi_ids, cols["roi"]),
            "kind": (cols["kind"] == "disk").astype(np.int64),
            "cx": cols["cx"], "cy": cols["cy"], "r": cols["r"],
        }
        table = {k: np.asarray(v, np.int64) for k, v in table.items()}
    out = measure_batch(NP, images, roi_ids=roi_ids, params=params, labels=labels, table=table, lesions=lesions,
                        padding=padding, fast=False)
    return [int(v) for v in out["roi_ids"]], out


def run_reference(case, padding=None):
    o = case["options"]
    kw = dict(background=o["background"], footprint_name=o["footprint"], dilation=o["dilation"],
              border=o["border"], ring_gap=o.get("ring_gap", 5), ring_width=o.get("ring_width", 10),
              background_label=o.get("background_label"), min_bg=o["min_bg"], ddof=o["ddof"],
              definition=o["definition"], signed=o["signed"], lesions=case["lesions"], padding=padding)
    if case["labels"] is not None:
        return measure_reference(case["images"], rois=case["labels"], **kw)
    return measure_reference(case["images"], table=case["table"], **kw)


def assert_matches(got, expected, what, scale, definition="pooled"):
    """Counts and status exactly; floats within rtol 1e-9 (NaN patterns equal).

    Besides rtol 1e-9, an absolute floor at the rounding level of the data (1e-13 of its largest value,
    `scale`): a true variance of 0 (two equal pixels) may come out as 0 or as 1e-33, and a CNR whose two
    means nearly cancel (|mr - mb| ~ 1e-3 with means ~ 1e4) is only as exact as that difference.
    """
    got_ids, out = got
    ids, ref = expected
    assert got_ids == ids, f"{what}: roi ids {got_ids} != {ids}"
    for k in COUNTS:
        np.testing.assert_array_equal(np.asarray(out[k]), ref[k], err_msg=f"{what}: {k}")
    eps = scale * 1e-13
    with np.errstate(divide="ignore", invalid="ignore"):
        noise2 = {"pooled": ref["var_roi"] + ref["var_bg"], "pooled-mean": (ref["var_roi"] + ref["var_bg"]) / 2,
                  "background": ref["var_bg"], "roi": ref["var_roi"]}.get(definition)
        cnr_atol = 0.0 if noise2 is None else np.nan_to_num(4 * eps / np.sqrt(noise2), nan=0.0, posinf=0.0)
    atols = {"mean_roi": eps, "mean_bg": eps, "var_roi": eps**2, "var_bg": eps**2, "cnr": cnr_atol}
    for k in FLOATS:
        a, b = np.asarray(out[k], np.float64), ref[k]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN pattern of {k}")
        both = ~np.isnan(b)
        atol = np.broadcast_to(atols.get(k, 0.0), b.shape)[both]
        with np.errstate(invalid="ignore"):  # inf - inf: equal infinities pass through ==
            close = (a[both] == b[both]) | (np.abs(a[both] - b[both]) <= 1e-9 * np.abs(b[both]) + atol)
        assert close.all(), f"{what}: {k}\n got {a[both][~close]}\n expected {b[both][~close]}"


def data_scale(images):
    v = np.abs(images.astype(np.float64))
    return float(v[np.isfinite(v)].max())


def check_case(case):
    what = f"{case['images'].dtype} {case['options']} table={case['table'] is not None}"
    scale = data_scale(case["images"])
    expected = run_reference(case)
    definition = case["options"]["definition"]
    assert_matches(run_measure(case), expected, "measure " + what, scale, definition)
    assert_matches(run_portable(case), expected, "portable " + what, scale, definition)
    if case["padding"] is not None:
        assert_matches(run_portable(case, case["padding"]), run_reference(case, case["padding"]),
                       f"portable padding={case['padding']} " + what, scale, definition)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("footprint", FOOTPRINTS)
def test_random_against_reference(footprint, background, seed):
    check_case(make_case(seed, footprint, background))


@pytest.mark.parametrize("definition", DEFINITIONS)
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_definition_ddof(dtype, ddof, definition):
    """The full dtype x ddof x definition grid on the article's geometry (complement, cross)."""
    rng = np.random.default_rng([DTYPES.index(dtype), ddof, DEFINITIONS.index(definition)])
    case = make_case(0, "cross", "complement")
    h, w = case["images"].shape[1:]
    case["images"] = random_images(rng, dtype, 3, h, w)
    case["padding"] = None
    case["options"].update(ddof=ddof, definition=definition, min_bg=5)
    check_case(case)


@pytest.mark.parametrize("border", range(6))
@pytest.mark.parametrize("dilation", range(6))
def test_every_border_and_dilation(border, dilation):
    rng = np.random.default_rng([border, dilation])
    fp = FOOTPRINTS[(border + dilation) % 4]
    case = make_case(border * 6 + dilation, fp, BACKGROUNDS[border % 4])
    case["options"].update(border=border, dilation=dilation)
    case["options"]["ddof"] = int(rng.integers(0, 2))
    check_case(case)


@pytest.mark.parametrize("seed", range(3))
def test_portable_path_on_array_api_strict(seed):
    """measure on array-api-strict input (portable kernels only) against the reference."""
    xps = pytest.importorskip("array_api_strict")
    case = make_case(seed, FOOTPRINTS[seed], BACKGROUNDS[seed])
    expected = run_reference(case)
    rois = xps.asarray(case["labels"]) if case["labels"] is not None else table_columns(case["table"])
    lesions = None if case["lesions"] is None else xps.asarray(case["lesions"])
    ds = gpucnr.measure(xps.asarray(case["images"]), rois, labels=lesions, **case["options"])
    assert_matches(([int(v) for v in ds.roi.values], {k: ds[k].values for k in (*COUNTS, *FLOATS)}), expected,
                   "array_api_strict", data_scale(case["images"]), case["options"]["definition"])


@pytest.mark.parametrize("layout", ["bright-corner", "bright-lesion"])
@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_float_background_far_from_bright_pixels(background, dtype, layout):
    """Float images with pixels 10^5 sigma away from the background: a bright corner pixel (row 0, a burnt-in
    marker) or a bright lesion covering a third of the image (the issue's "ROI 10^4 sigma above its
    background"). Every background mode must still give the background variance to 1e-9 relative
    (DESIGN §4): whatever the per-image shift, the background sums must not cancel catastrophically."""
    rng = np.random.default_rng(11)
    img = rng.normal(100.0, 1.0, (2, 40, 44))
    labels = np.zeros(img.shape, np.int32)
    labels[:, 5:35, 5:10] = BG_LABEL
    if layout == "bright-corner":
        img[:, 0, 0] = 1e5
        labels[:, 15:25, 15:25] = 1
    else:
        labels[:, 12:28, 20:36] = 1
        img[:, 10:30, 18:38] += 1e5  # the lesion and a 2-px rim around it (inside the dilated ROI)
    img = img.astype(dtype)
    opts = dict(background=background, footprint="cross", dilation=5, border=5, ring_gap=5, ring_width=10,
                ddof=1, definition="pooled", min_bg=30, signed=False)
    if background == "label":
        opts["background_label"] = BG_LABEL
    case = dict(images=img, labels=labels, table=None, lesions=None, options=opts, padding=None)
    expected = run_reference(case)
    assert (expected[1]["status"] == 0).all()
    assert_matches(run_measure(case), expected, "measure", 100.0)
    assert_matches(run_portable(case), expected, "portable", 100.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5, 25))
@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("footprint", FOOTPRINTS)
def test_random_against_reference_sweep(footprint, background, seed):
    check_case(make_case(seed, footprint, background, n=4, size=(30, 90)))


# ------------------------------------------------------------------------ the article's own functions


def calculate_cnr_matlab(img, roi_mask):
    """The article's MATLAB calculate_cnr_matlab, ported: imdilate by strel('disk', 5) (MATLAB's octagon),
    a hard-coded 5-px frame, var(., 1)."""
    bg_mask = ~binary_dilation(roi_mask, structure=MATLAB_DISK_5)
    bg_mask[np.r_[0:5, -5:0], :] = False
    bg_mask[:, np.r_[0:5, -5:0]] = False
    roi_values = img[roi_mask].astype(np.float64)
    bg_values = img[bg_mask].astype(np.float64)
    return abs(roi_values.mean() - bg_values.mean()) / np.sqrt(roi_values.var(ddof=0) + bg_values.var(ddof=0))


def lesion_images(seed, dtype, n=3, h=61, w=83):
    """Non-square images (the transposition bug would matter, or crash) with a bright off-centre lesion."""
    rng = np.random.default_rng(seed)
    img = rng.normal(1000.0, 40.0, (n, h, w))
    centres = []
    for i in range(n):
        cy, cx = int(rng.integers(15, h - 15)), int(rng.integers(15, w - 30))
        yy, xx = np.mgrid[:h, :w]
        img[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 12**2] += 60.0 * (i + 1)
        centres.append((cx, cy))
    return img.astype(dtype), centres


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_article_python_port(dtype):
    images, centres = lesion_images(1, dtype)
    table = {"image": np.arange(3), "roi": np.ones(3, int), "kind": ["square"] * 3,
             "cx": np.array([c[0] for c in centres]), "cy": np.array([c[1] for c in centres]), "r": np.full(3, 10)}
    ds = gpucnr.measure(images, table, backend="numpy")
    for i, (cx, cy) in enumerate(centres):
        roi = select_roi(images[i], cx, cy)
        bg = get_background(images[i], create_mask(images[i].shape, roi))
        expected = calculate_cnr(images[i], roi, bg)
        assert ds.status.values[i, 0] == 0
        assert ds.n_roi.values[i, 0] == 400
        assert ds.n_bg.values[i, 0] == bg[0].size
        np.testing.assert_allclose(ds.cnr.values[i, 0], expected, rtol=1e-9)
        # the transposed (buggy) reading would not give this value: the test can tell them apart
        rows, cols = bg
        inside = (cols < images.shape[1]) & (rows < images.shape[2])
        buggy_values = images[i][cols[inside], rows[inside]].astype(float)
        assert not np.isclose(buggy_values.mean(), ds.mean_bg.values[i, 0], rtol=1e-9)


def test_article_multi_roi_port():
    images, centres = lesion_images(2, np.uint16)
    rng = np.random.default_rng(5)
    rows, expected, counts = [], [], []
    for i, (cx, cy) in enumerate(centres):
        pts = [(cx + int(dx), cy + int(dy)) for dx, dy in rng.integers(-5, 6, (5, 2))]
        pts = list(dict.fromkeys(pts))
        rows += [dict(image=i, roi=j + 1, kind="square", cx=x, cy=y, r=5) for j, (x, y) in enumerate(pts)]
        expected.append(multi_roi_cnr(images[i], pts, radius=5))
        counts.append(len(pts))
    ds = gpucnr.measure(images, table_columns(rows), backend="numpy")
    np.testing.assert_array_equal(ds.n_valid.values, counts)
    np.testing.assert_allclose(ds.cnr_median.values, expected, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64], ids=lambda d: np.dtype(d).name)
def test_article_matlab_port(dtype):
    images, centres = lesion_images(3, np.float64)
    if np.dtype(dtype).kind != "f":
        images = np.clip(images / 10, 0, 255).astype(dtype)
    table = {"image": np.arange(3), "roi": np.full(3, 2), "kind": ["square"] * 3,
             "cx": np.array([c[0] for c in centres]), "cy": np.array([c[1] for c in centres]), "r": np.full(3, 8)}
    ds = gpucnr.measure(images, table, footprint="matlab-disk", ddof=0, backend="numpy")
    for i, (cx, cy) in enumerate(centres):
        mask = create_mask(images[i].shape, select_roi(images[i], cx, cy, 8))
        np.testing.assert_allclose(ds.cnr.values[i, 0], calculate_cnr_matlab(images[i], mask), rtol=1e-9)


@pytest.mark.parametrize("ids", [(1, 2, 3), (70_000, 1_000_003, 5), (255, 7, 128)], ids=["small", "large", "uint8"])
def test_label_values_of_every_range(ids):
    """Label ids of every range: the NumPy path tables small ids directly and sorts ids >= 2**16 (portable
    path); both must find the same boxes, ids and moments as the reference."""
    rng = np.random.default_rng(sum(ids))
    dtype = np.uint8 if max(ids) < 256 else np.int64
    images = random_images(rng, np.uint16, 3, 40, 44)
    labels = np.zeros(images.shape, dtype)
    for i in range(3):
        for k, rid in enumerate(ids):
            if i == 1 and k == 2:
                continue  # absent from image 1
            y, x = 4 + 11 * k, 5 + 3 * i + 9 * k
            labels[i, y : y + 6, x : x + 7] = rid
    expected = measure_reference(images, rois=labels)
    ds = gpucnr.measure(images, labels, backend="numpy")
    got = ([int(v) for v in ds.roi.values], {k: ds[k].values for k in (*COUNTS, *FLOATS)})
    assert_matches(got, expected, f"labels {ids}", data_scale(images))
    case = {"images": images, "labels": labels, "table": None, "lesions": None, "padding": None,
            "options": dict(background="complement", footprint="cross", dilation=5, border=5, ddof=1, min_bg=30,
                            definition="pooled", signed=False)}
    assert_matches(run_portable(case), expected, f"portable labels {ids}", data_scale(images))
