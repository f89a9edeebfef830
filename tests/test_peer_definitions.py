"""Definitions that reproduce peer tools (vIQA, MRQy/RadQy) on gpucnr's pixel sets, against references written
here from the tools' own source: random images and label masks or ROI tables, every background mode, padding,
non-finite pixels and valid extents, on every array namespace; statuses on degenerate inputs; the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from cases import BACKGROUNDS, BG_LABEL, DTYPES, FOOTPRINTS, NP
from conftest import host
from reference import dilate, remove_frame, ring
from reference import roi_mask as table_roi_mask
from test_backends import make_batch, run_kernel

import gpucnr
from gpucnr.kernels.cnr import STATUS
from gpucnr.kernels.params import Params

# ------------------------------------------------------------------------------------------ plain regions


def cell_regions(batch, params, roi_ids):
    """Every present (image, col) cell's pixel sets the plain way: {(i, j): (values, roi, bg)} on the image's valid
    extent (``values`` float64 stored values; ``roi``, ``bg`` bool masks of the pixels entering the statistics),
    with the status-deciding counts; built from tests/reference.py's helpers, sharing no code with the kernels."""
    images = batch["images"]
    n, height, width = images.shape
    vh = batch.get("valid_h", np.full(n, height))
    vw = batch.get("valid_w", np.full(n, width))
    padding = batch.get("padding")
    out = {}
    for i in range(n):
        h, w = int(vh[i]), int(vw[i])
        vals = images[i, :h, :w].astype(np.float64)
        bad = ~np.isfinite(vals)
        if padding is not None and np.isfinite(padding[i]):
            bad |= vals == padding[i]
        masks = {}
        if batch["labels"] is not None:
            lab = batch["labels"][i, :h, :w]
            for j, rid in enumerate(roi_ids):
                if (lab == rid).any():
                    masks[j] = lab == rid
        else:
            t = batch["table"]
            for row in range(len(t["image"])):
                if int(t["image"][row]) == i:
                    kind = "disk" if int(t["kind"][row]) == 1 else "square"
                    masks[int(t["col"][row])] = table_roi_mask((h, w), kind, int(t["cx"][row]), int(t["cy"][row]),
                                                               int(t["r"][row]))
        union = np.zeros((h, w), bool)
        for m in masks.values():
            union |= m
        if batch["labels"] is not None:
            union |= batch["labels"][i, :h, :w] != 0
        if batch["lesions"] is not None and params.background == "complement-all":
            union |= batch["lesions"][i, :h, :w] != 0
        for j, m in masks.items():
            if params.background == "complement":
                bg = ~dilate(m, params.footprint, params.dilation)
            elif params.background == "complement-all":
                bg = ~dilate(union, params.footprint, params.dilation)
            elif params.background == "ring":
                bg = ring(m, params.footprint, params.ring_gap, params.ring_width)
            else:
                bg = batch["lesions"][i, :h, :w] == params.background_label
            out[i, j] = (vals, m & ~bad, remove_frame(bg, params.border) & ~bad, int(m.sum()))
    return out


def plain_status(inside, n_roi, n_bg, zero_noise, *, ddof, min_bg):
    """DESIGN §4's order: roi-outside, roi-too-small, background-too-small, zero-noise, ok."""
    if inside == 0:
        return STATUS["roi-outside"]
    if n_roi <= ddof:
        return STATUS["roi-too-small"]
    if n_bg <= ddof or n_bg < min_bg:
        return STATUS["background-too-small"]
    return STATUS["zero-noise"] if zero_noise else STATUS["ok"]


def assert_against(out, expected, what):
    """Status exactly; CNR within 1e-9 relative (equal infinities, NaN patterns equal)."""
    np.testing.assert_array_equal(host(out["status"]), expected["status"], err_msg=f"{what}: status")
    got, want = host(out["cnr"]), expected["cnr"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern of cnr")
    both = ~np.isnan(want)
    with np.errstate(invalid="ignore"):
        close = (got[both] == want[both]) | (np.abs(got[both] - want[both]) <= 1e-9 * np.abs(want[both]))
    assert close.all(), f"{what}: cnr\n got {got[both][~close]}\n expected {want[both][~close]}"


# ------------------------------------------------------------------------------------------ vIQA


def viqa_cnr(signal, background):
    """vIQA 3.0.1, viqa/nr_metrics/cnr.py, contrast_to_noise_ratio (its last lines, verbatim):

        if np.std(background) == 0:
            cnr_val = 0
        else:
            cnr_val = (np.mean(signal) - np.mean(background)) / np.std(background)

    gpucnr keeps its own zero-noise status there instead of vIQA's 0 (None is returned for that case)."""
    if np.std(background) == 0:
        return None
    return (np.mean(signal) - np.mean(background)) / np.std(background)


def viqa_expected(batch, params, roi_ids):
    n, n_ids = batch["images"].shape[0], len(roi_ids)
    slope = batch.get("slope", np.ones(n))
    intercept = batch.get("intercept", np.zeros(n))
    status = np.full((n, n_ids), STATUS["absent"], np.int8)
    cnr = np.full((n, n_ids), np.nan)
    for (i, j), (vals, roi, bg, inside) in cell_regions(batch, params, roi_ids).items():
        # NB: vIQA sees whatever array it is given; gpucnr's moments are in modality units.
        units = vals * slope[i] + intercept[i]
        value = viqa_cnr(units[roi], units[bg]) if roi.any() and bg.any() else np.nan
        zero = value is None
        status[i, j] = plain_status(inside, int(roi.sum()), int(bg.sum()), zero, ddof=0, min_bg=params.min_bg)
        if status[i, j] == STATUS["ok"]:
            cnr[i, j] = value
        elif zero:
            diff = np.mean(units[roi]) - np.mean(units[bg])
            cnr[i, j] = np.nan if diff == 0 else np.copysign(np.inf, diff)
    return dict(status=status, cnr=cnr)


VIQA_CASES = [(seed, dtype, background, seed % 2 == 1)
              for seed, (dtype, background) in enumerate((d, b) for d in DTYPES for b in BACKGROUNDS)]


def case_id(case):
    seed, dtype, background, use_table = case
    return f"{seed}-{np.dtype(dtype).name}-{background}-{'table' if use_table else 'labels'}"


def random_params(seed, background, definition):
    rng = np.random.default_rng(seed + 2000)
    opts = dict(background=background, footprint=FOOTPRINTS[seed % 4], definition=definition,
                dilation=int(rng.integers(0, 6)), border=int(rng.integers(0, 6)), min_bg=int(rng.choice([1, 5, 30])),
                ring_gap=int(rng.integers(0, 4)), ring_width=int(rng.integers(1, 8)),
                # NB: the options a peer definition overrides, given at random: they must not matter
                ddof=int(rng.integers(0, 3)), signed=bool(rng.random() < 0.5))
    if background == "label":
        opts["background_label"] = BG_LABEL
    return Params(**opts)


@pytest.mark.parametrize("case", VIQA_CASES, ids=case_id)
def test_viqa_against_its_formula(xp, case):
    seed, dtype, background, use_table = case
    batch = make_batch(seed, dtype, background, use_table, extras=seed % 2 == 0)
    params = random_params(seed, background, "viqa")
    assert (params.ddof, params.signed) == (0, True)
    out = run_kernel(xp, batch, params, fast=False)
    expected = viqa_expected(batch, params, host(out["roi_ids"]).tolist())
    assert_against(out, expected, f"{xp.__name__} portable {params}")
    assert_against(run_kernel(xp, batch, params, fast=True), expected, f"{xp.__name__} fast {params}")
    assert (expected["status"] == 0).any() and (expected["cnr"] < 0).any() and (expected["cnr"] > 0).any()


def test_viqa_forces_ddof_and_sign_and_records_it():
    rng = np.random.default_rng(5)
    images = rng.normal(100.0, 3.0, (3, 40, 40))
    labels = np.zeros(images.shape, np.int32)
    labels[:, 12:20, 12:20] = 1
    images[labels == 1] -= 10.0  # a dark ROI: negative vIQA CNR
    plain = gpucnr.measure(images, labels, definition="background", ddof=0, signed=True, backend="numpy")
    for kw in ({}, {"ddof": 1, "signed": False}, {"ddof": 2}):
        ds = gpucnr.measure(images, labels, definition="viqa", backend="numpy", **kw)
        assert (ds.attrs["ddof"], ds.attrs["signed"], ds.attrs["definition_forces"]) == (0, True,
                                                                                        "ddof=0 signed=True")
        np.testing.assert_allclose(ds["var_bg"].values, plain["var_bg"].values, rtol=1e-12)
        np.testing.assert_allclose(ds["cnr"].values, plain["cnr"].values, rtol=1e-12)
        assert (ds["cnr"].values < 0).all()
        np.testing.assert_allclose(ds["cnr_median"].values, ds["cnr"].values[:, 0], rtol=0)
    assert "definition_forces" not in gpucnr.measure(images, labels, backend="numpy").attrs


def test_viqa_ignores_display_polarity_but_keeps_the_slope_sign():
    """vIQA sees an array's own values: MONOCHROME1 does not flip its sign (a signed gpucnr CNR does); a negative
    modality slope does, as it would in the values vIQA is given."""
    rng = np.random.default_rng(6)
    images = rng.normal(100.0, 3.0, (2, 40, 40))
    labels = np.zeros(images.shape, np.int32)
    labels[:, 12:20, 12:20] = 1
    images[labels == 1] += 10.0
    batch = dict(images=images, roi_ids=None, labels=labels, table=None, lesions=None)
    params = Params(definition="viqa")
    flat = run_kernel(NP, batch, params)
    inverted = NP.asarray(np.array([-1.0, -1.0]))
    from gpucnr.kernels.batch import measure_batch

    flipped = measure_batch(NP, images, roi_ids=None, params=params, labels=labels, polarity=inverted)
    np.testing.assert_array_equal(flipped["cnr"], flat["cnr"])
    assert (flat["cnr"] > 0).all()
    negative = measure_batch(NP, images, roi_ids=None, params=params, labels=labels, slope=np.array([-2.0, -2.0]))
    np.testing.assert_allclose(negative["cnr"], -flat["cnr"], rtol=1e-12)



# ------------------------------------------------------------------------------------------ MRQy / RadQy


def mrqy_patch(img, patch_size):
    """MRQy 0.0.3, mrqy/QCF.py, patch() verbatim (RadQy 2025.3.2's radqy/radqy.py has the same function)."""
    h = int(np.floor(patch_size / 2))
    U = np.pad(img, pad_width=5, mode="constant")
    [a, b] = np.where(img == np.max(img))
    a = a[0]
    b = b[0]
    return U[a : a + 2 * h + 1, b : b + 2 * h + 1]


def mrqy_cnr(F, B):
    """MRQy 0.0.3, mrqy/QCF.py, cnr(F, B, c, f, b) verbatim; F = mask * img and B = (1 - mask) * img there."""
    fore_patch = mrqy_patch(F, 5)
    back_patch = mrqy_patch(B, 5)
    return np.nanmean(fore_patch - back_patch) / np.nanstd(back_patch)


def mrqy_expected(batch, params, roi_ids):
    n, n_ids = batch["images"].shape[0], len(roi_ids)
    status = np.full((n, n_ids), STATUS["absent"], np.int8)
    cnr = np.full((n, n_ids), np.nan)
    for (i, j), (vals, roi, bg, inside) in cell_regions(batch, params, roi_ids).items():
        # NB: their F and B: the stored values in the region, zeros elsewhere (np.where: no 0 * NaN)
        F, B = np.where(roi, vals, 0.0), np.where(bg, vals, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = mrqy_cnr(F, B)
        zero = np.nanstd(mrqy_patch(B, 5)) == 0
        status[i, j] = plain_status(inside, int(roi.sum()), int(bg.sum()), zero, ddof=0, min_bg=params.min_bg)
        if status[i, j] in (STATUS["ok"], STATUS["zero-noise"]):
            cnr[i, j] = value
    return dict(status=status, cnr=cnr)


@pytest.mark.parametrize("case", VIQA_CASES, ids=case_id)
def test_mrqy_against_its_source(xp, case):
    seed, dtype, background, use_table = case
    batch = make_batch(seed + 50, dtype, background, use_table, extras=seed % 2 == 1)
    params = random_params(seed + 50, background, "mrqy")
    assert (params.ddof, params.signed) == (0, True)
    out = run_kernel(xp, batch, params, fast=False)
    expected = mrqy_expected(batch, params, host(out["roi_ids"]).tolist())
    assert_against(out, expected, f"{xp.__name__} portable {params}")
    assert_against(run_kernel(xp, batch, params, fast=True), expected, f"{xp.__name__} fast {params}")
    assert (expected["status"] == 0).any()


def test_mrqy_small_chunks_equal_one_chunk(monkeypatch):
    """Cells processed a few at a time (the memory bound) give the values of one pass."""
    from gpucnr.kernels import patches

    batch = make_batch(3, np.float32, "complement-all", True, extras=True)
    params = Params(background="complement-all", definition="mrqy", min_bg=5)
    whole = run_kernel(NP, batch, params)
    monkeypatch.setattr(patches, "_CHUNK_PIXELS", 1)
    np.testing.assert_array_equal(run_kernel(NP, batch, params)["cnr"], whole["cnr"])


def quirk_image():
    """One 20x24 image whose ROI (label 1) has a tie for its maximum and whose background has a known maximum."""
    img = np.full((1, 20, 24), 10, np.int16)
    img[0, 1::2, ::3] = 4  # texture, so the patches are not constant
    labels = np.zeros(img.shape, np.int32)
    labels[0, 8:14, 9:15] = 1
    img[0, 10, 12] = img[0, 12, 10] = 90  # a tie in the ROI: row-major first is (10, 12)
    img[0, 16, 20] = 70  # the background's maximum
    return img, labels


def test_mrqy_quirks_by_hand():
    """The patch is the 5x5 block above-left of the first maximum (their pad of 5 with h = 2), zeros outside the
    region, ddof 0: checked against numbers written out by hand."""
    img, labels = quirk_image()
    ds = gpucnr.measure(img, labels, definition="mrqy", dilation=0, border=0, backend="numpy")
    vals = img[0].astype(np.float64)
    roi = labels[0] == 1
    p_f = np.where(roi, vals, 0)[5:10, 7:12]  # rows 10-5..10-1, cols 12-5..12-1
    p_b = np.where(~roi, vals, 0)[11:16, 15:20]
    assert p_f[-1, -1] == 10 and p_f[0, 0] == 0  # the block holds ROI pixels and zeros, not the maximum itself
    expected = (p_f - p_b).mean() / p_b.std()
    np.testing.assert_allclose(float(ds["cnr"][0, 0]), expected, rtol=1e-12)
    assert ds.attrs["definition_forces"] == "ddof=0 signed=True"


def test_mrqy_statuses_on_degenerate_inputs():
    img, labels = quirk_image()
    ids_img = np.concatenate([img] * 4)
    lab = np.concatenate([labels] * 4)
    ids_img[1] = 7  # constant image: background patch constant -> zero-noise, and equal patches -> NaN
    ids_img[2, :, :] = -5  # all negative: their maximum of F is 0, at the first pixel outside the ROI
    ids_img[2, 1::2, ::3] = -9
    lab[3] = 0
    lab[3, 0, 0] = 1  # a 1-pixel ROI in the corner: measured (ddof 0), its patch all padding
    ds = gpucnr.measure(ids_img, lab, definition="mrqy", dilation=0, border=0, min_bg=30, backend="numpy")
    status = ds["status"].values[:, 0].tolist()
    assert status == [STATUS["ok"], STATUS["zero-noise"], STATUS["ok"], STATUS["ok"]]
    assert np.isnan(ds["cnr"].values[1, 0])
    # image 2: F's maximum is 0 at (0, 0) (outside the ROI), its patch all padding; B's is 0 at the ROI's first
    # pixel (8, 9), its patch the background above-left of it
    roi = lab[2] == 1
    p_b = np.where(~roi, ids_img[2], 0)[3:8, 4:9].astype(np.float64)
    np.testing.assert_allclose(float(ds["cnr"][2, 0]), -p_b.mean() / p_b.std(), rtol=1e-12)
    F, B = np.where(roi, ids_img[2], 0), np.where(~roi, ids_img[2], 0)
    np.testing.assert_allclose(float(ds["cnr"][2, 0]), mrqy_cnr(F, B), rtol=1e-12)
    # image 3: the corner ROI's patch is all padding, B's maximum is the first 10 at (0, 1)
    F, B = np.where(lab[3] == 1, ids_img[3], 0), np.where(lab[3] != 1, ids_img[3], 0)
    np.testing.assert_allclose(float(ds["cnr"][3, 0]), mrqy_cnr(F, B), rtol=1e-12)
    small = gpucnr.measure(ids_img[:1], labels, definition="mrqy", dilation=0, border=0, min_bg=10_000,
                           backend="numpy")
    assert int(small["status"][0, 0]) == STATUS["background-too-small"] and np.isnan(float(small["cnr"][0, 0]))
    outside = gpucnr.measure(ids_img[:1], {"image": [0], "roi": [1], "kind": ["square"], "cx": [-40], "cy": [5],
                                           "r": [3]}, definition="mrqy", backend="numpy")
    assert int(outside["status"][0, 0]) == STATUS["roi-outside"]
    nan_roi = ids_img[:1].astype(np.float64)
    nan_roi[labels == 1] = np.nan
    gone = gpucnr.measure(nan_roi, labels, definition="mrqy", backend="numpy")
    assert int(gone["status"][0, 0]) == STATUS["roi-too-small"]


def test_mrqy_is_not_poolable():
    img, labels = quirk_image()
    ds = gpucnr.measure(np.concatenate([img] * 4), np.concatenate([labels] * 4), definition="mrqy", dilation=0,
                        border=0, backend="numpy")
    assert (ds["status"].values == STATUS["ok"]).all()
    out = gpucnr.aggregate(ds.assign_coords(case=("image", ["a", "a", "b", "b"])), by="case")
    assert (out["status"].values == STATUS["not-poolable"]).all() and np.isnan(out["cnr"].values).all()


def test_viqa_aggregates_over_mixed_polarity_into_the_union_formula():
    """aggregate pools vIQA's moments (ddof 0) into (mu_r - mu_b) / sigma_b of the union of the group's pixels,
    and, its sign not following the display, pools MONOCHROME1 with MONOCHROME2 images (a signed gpucnr CNR is
    refused there)."""
    rng = np.random.default_rng(8)
    images = rng.normal(50.0, 4.0, (4, 36, 36))
    labels = np.zeros(images.shape, np.int32)
    labels[:, 10:18, 12:22] = 1
    images[labels == 1] += 6.0
    ds = gpucnr.measure(images, labels, definition="viqa", border=0, dilation=0, backend="numpy")
    ds = ds.assign_coords(case=("image", ["a", "a", "b", "b"]),
                          photometric=("image", ["MONOCHROME1", "MONOCHROME2"] * 2))
    out = gpucnr.aggregate(ds, by="case")
    for name, rows in (("a", [0, 1]), ("b", [2, 3])):
        roi = images[rows][labels[rows] == 1]
        bg = images[rows][labels[rows] == 0]
        np.testing.assert_allclose(float(out.sel(case=name, roi=1)["cnr"]), viqa_cnr(roi, bg), rtol=1e-10)
    with pytest.raises(gpucnr.InputError, match="MONOCHROME1"):
        gpucnr.aggregate(gpucnr.measure(images, labels, signed=True, backend="numpy").assign_coords(
            case=("image", ["a", "a", "b", "b"]), photometric=("image", ["MONOCHROME1", "MONOCHROME2"] * 2)), by="case")


def test_viqa_results_enhance_with_the_forced_options(tmp_path):
    """enhance re-measures with the run's parameters; the recorded definition_forces is not one of them."""
    rng = np.random.default_rng(9)
    images = rng.normal(50.0, 4.0, (4, 40, 40)).astype(np.float32)
    labels = np.zeros(images.shape, np.int32)
    labels[:, 12:20, 12:20] = 1
    images[:, 12:20, 12:20] += np.array([1.0, 8.0, 2.0, 9.0], np.float32)[:, None, None]
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels)
    gpucnr.run(stack, tmp_path / "r.zarr", definition="viqa", ddof=1, backend="numpy")
    out = gpucnr.enhance(tmp_path / "r.zarr", tmp_path / "enh", threshold=1.5, method="median", size=3,
                         backend="numpy")
    assert out.sizes["image"] == 2 and out.attrs["ddof"] == 0 and out.attrs["definition_forces"] == "ddof=0 signed=True"
    after = gpucnr.open_results(tmp_path / "enh" / "results.zarr")
    assert (after.attrs["definition"], after.attrs["ddof"], after.attrs["signed"]) == ("viqa", 0, True)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("definition", ["mrqy", "viqa"])
def test_cli_run_with_a_peer_definition(tmp_path, capsys, definition):
    """`gpucnr run --definition mrqy|viqa` on a stack: the results equal gpucnr.measure's on the same pixels and
    record the forced options; `filter` reads them. A `--ddof` other than the definition's is refused (it was
    replaced without a word)."""
    from gpucnr.cli import main

    batch = make_batch(21, np.uint16, "complement", False)
    images, labels = batch["images"], batch["labels"]
    stack = gpucnr.write_stack(tmp_path / "s.zarr", images, labels=labels, shard=2)
    argv = ["run", str(stack.path), str(tmp_path / "r.zarr"), "--definition", definition, "--min-bg", "5",
            "--backend", "numpy"]
    assert main([*argv, "--ddof", "1"]) == 2
    assert f"--definition {definition} measures with ddof 0" in capsys.readouterr().err
    assert main(argv) == 0
    ds = gpucnr.open_results(tmp_path / "r.zarr")
    assert (ds.attrs["definition"], ds.attrs["ddof"], ds.attrs["signed"]) == (definition, 0, True)
    assert ds.attrs["definition_forces"] == "ddof=0 signed=True"
    ref = gpucnr.measure(images, labels, definition=definition, min_bg=5, backend="numpy")
    np.testing.assert_array_equal(ds["status"].values, ref["status"].values)
    np.testing.assert_allclose(ds["cnr"].values, ref["cnr"].values, rtol=1e-12, equal_nan=True)
    assert (ds["status"].values == 0).any()
    params = Params(definition=definition, min_bg=5)
    expected = (mrqy_expected if definition == "mrqy" else viqa_expected)(batch, params, ds.roi.values.tolist())
    assert_against({"status": ds["status"].values, "cnr": ds["cnr"].values}, expected, "cli")
    capsys.readouterr()
    assert main(["filter", str(tmp_path / "r.zarr"), "--threshold", "0", "--out", str(tmp_path / "keep.csv")]) == 0
    assert (tmp_path / "keep.csv").stat().st_size > 0


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_peer_definitions_on_the_automatic_regions(dtype):
    """With rois="auto" the peer definitions measure the automatic regions' pixel sets: cell 1 the body (labels >= 2)
    against the air (1), cell 2 the upper tissue (4) against the lower (3), as gpucnr.auto_regions returns them;
    images without air get region-not-found on cell 1."""
    from gpucnr.phantom import make_body_phantom

    ph = make_body_phantom(4, (64, 72), tissue_cnr=(2.0, 8.0), noise=20.0, dtype=dtype, seed=3)
    images = np.concatenate([ph.images, make_body_phantom(1, (64, 72), with_air=False, dtype=dtype,
                                                          seed=4).images])
    regions = np.asarray(gpucnr.auto_regions(images, backend="numpy"))
    mrqy = gpucnr.measure(images, "auto", definition="mrqy", backend="numpy")
    viqa = gpucnr.measure(images, "auto", definition="viqa", backend="numpy")
    assert mrqy.attrs["definition_forces"] == viqa.attrs["definition_forces"] == "ddof=0 signed=True"
    for i in range(images.shape[0]):
        vals = images[i].astype(np.float64)
        for j, (roi, bg) in enumerate(((regions[i] >= 2, regions[i] == 1), (regions[i] == 4, regions[i] == 3))):
            status = int(mrqy["status"][i, j])
            if not bg.any():
                assert status == int(viqa["status"][i, j]) == STATUS["region-not-found"]
                continue
            assert int(viqa["status"][i, j]) == STATUS["ok"], (i, j)
            np.testing.assert_allclose(float(viqa["cnr"][i, j]), viqa_cnr(vals[roi], vals[bg]), rtol=1e-9)
            F, B = np.where(roi, vals, 0.0), np.where(bg, vals, 0.0)
            # NB: a background maximum at the region's top-left rim puts MRQy's patch outside it: all zeros
            constant = np.std(mrqy_patch(B, 5)) == 0
            assert status == (STATUS["zero-noise"] if constant else STATUS["ok"]), (i, j)
            with np.errstate(divide="ignore", invalid="ignore"):
                np.testing.assert_allclose(float(mrqy["cnr"][i, j]), mrqy_cnr(F, B), rtol=1e-9)
    assert int(mrqy["status"][4, 0]) == STATUS["region-not-found"]
