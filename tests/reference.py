"""The plain reference: the article's per-image, per-ROI method, its transposition bug fixed.

Nothing here is vectorised or clever: full-image masks, scipy.ndimage dilations and distance transforms,
numpy's mean/var/histogram/median on the selected pixels. It shares no code with gpucnr's kernels except
the matlab-disk footprint, which tests/test_footprints.py checks against MATLAB's known element.
"""

from __future__ import annotations

import math

import numpy as np
from article import select_roi
from scipy import ndimage

from gpucnr.kernels.footprints import footprint_offsets


def roi_mask(shape, kind, cx, cy, r):
    mask = np.zeros(shape, bool)
    if kind == "square":
        xs, ys = select_roi(np.empty(shape, bool), cx, cy, r)
        # NB: [rows, cols] = [y, x]; the article indexed image[c[1], c[0]] with np.where's (rows, cols)
        mask[ys, xs] = True
    else:
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    return mask


def footprint(name, radius):
    """Structuring element as an array; None for the cross, which is dilated by iteration like the article."""
    if name == "cross":
        return None
    if name == "disk":
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        return xx**2 + yy**2 <= radius**2
    if name == "square":
        return np.ones((2 * radius + 1, 2 * radius + 1), bool)
    fp = np.zeros((2 * radius + 1, 2 * radius + 1), bool)
    for dy, dx in footprint_offsets("matlab-disk", radius):
        fp[dy + radius, dx + radius] = True
    return fp


def dilate(mask, name, radius):
    if radius == 0 or not mask.any():
        return mask.copy()
    if name == "cross":
        return ndimage.binary_dilation(mask, iterations=radius)
    return ndimage.binary_dilation(mask, structure=footprint(name, radius))


def remove_frame(mask, border):
    mask = mask.copy()
    if border > 0:  # NB: mask[-0:] = False would clear everything
        mask[:border] = False
        mask[-border:] = False
        mask[:, :border] = False
        mask[:, -border:] = False
    return mask


def ring(roi, footprint_name, gap, width):
    """Pixels whose distance from the ROI lies in (gap, gap + width], by distance transforms."""
    if not roi.any():
        return np.zeros_like(roi)
    if footprint_name in ("disk", "matlab-disk"):
        dist2 = ndimage.distance_transform_edt(~roi) ** 2
        return (dist2 > gap**2 + 1e-9) & (dist2 <= (gap + width) ** 2 + 1e-9)
    metric = "taxicab" if footprint_name == "cross" else "chessboard"
    dist = ndimage.distance_transform_cdt(~roi, metric=metric)
    return (dist > gap) & (dist <= gap + width)


def gcnr(roi_values, bg_values, bins="auto"):
    n = min(roi_values.size, bg_values.size)
    b = math.ceil(2 * n**0.4) if bins == "auto" else int(bins)
    lo = min(roi_values.min(), bg_values.min())
    hi = max(roi_values.max(), bg_values.max())
    h_roi, _ = np.histogram(roi_values, bins=b, range=(lo, hi))
    h_bg, _ = np.histogram(bg_values, bins=b, range=(lo, hi))
    return 1.0 - np.minimum(h_roi / roi_values.size, h_bg / bg_values.size).sum()


def measure_reference(images, *, rois=None, table=None, lesions=None, background="complement", footprint_name="cross",
                      dilation=5, border=5, ring_gap=5, ring_width=10, background_label=None, min_bg=30, ddof=1,
                      definition="pooled", signed=False, padding=None):
    """Per image and ROI, return dict of (n, L) arrays like gpucnr.measure, computed the plain way.

    `rois` is a label array (n, H, W) or `table` a list of dicts (image, roi, kind, cx, cy, r).
    """
    images = np.asarray(images)
    n = images.shape[0]
    if rois is not None:
        ids = sorted(int(v) for v in np.unique(rois) if v != 0 and v != background_label)
    else:
        ids = sorted({int(t["roi"]) for t in table})
    out = {k: np.full((n, len(ids)), np.nan) for k in ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr")}
    for k in ("n_roi", "n_bg"):
        out[k] = np.zeros((n, len(ids)), np.int64)
    out["status"] = np.ones((n, len(ids)), np.int8)
    out["n_excluded"] = np.zeros(n, np.int64)
    out["cnr_median"] = np.full(n, np.nan)
    out["n_valid"] = np.zeros(n, np.int64)
    for i in range(n):
        img = images[i]
        vals = img.astype(np.float64)
        bad = ~np.isfinite(vals)
        if padding is not None and np.isfinite(padding[i]):
            bad |= vals == padding[i]
        out["n_excluded"][i] = bad.sum()
        masks = {}
        if rois is not None:
            for j, rid in enumerate(ids):
                m = rois[i] == rid
                if m.any():
                    masks[j] = m
        else:
            for t in table:
                if t["image"] == i:
                    masks[ids.index(int(t["roi"]))] = roi_mask(img.shape, t["kind"], t["cx"], t["cy"], t["r"])
        union = None
        if background == "complement-all":
            union = np.zeros(img.shape, bool)
            for m in masks.values():
                union |= m
            if lesions is not None:
                union |= lesions[i] != 0
            if rois is not None:
                union |= rois[i] != 0
        for j, m in masks.items():
            if background == "complement":
                bg = remove_frame(~dilate(m, footprint_name, dilation), border)
            elif background == "complement-all":
                bg = remove_frame(~dilate(union, footprint_name, dilation), border)
            elif background == "ring":
                bg = remove_frame(ring(m, footprint_name, ring_gap, ring_width), border)
            else:
                lab = lesions if lesions is not None else rois
                bg = remove_frame(lab[i] == background_label, border)
            rv = vals[m & ~bad]
            bv = vals[bg & ~bad]
            out["n_roi"][i, j], out["n_bg"][i, j] = rv.size, bv.size
            if rv.size:
                out["mean_roi"][i, j] = rv.mean()
            if bv.size:
                out["mean_bg"][i, j] = bv.mean()
            if rv.size > ddof:
                out["var_roi"][i, j] = rv.var(ddof=ddof)
            if bv.size > ddof:
                out["var_bg"][i, j] = bv.var(ddof=ddof)
            mr, vr, mb, vb = (out[k][i, j] for k in ("mean_roi", "var_roi", "mean_bg", "var_bg"))
            if not m.any():
                status = 2
            elif rv.size <= ddof:
                status = 3
            elif bv.size <= ddof or bv.size < min_bg:
                status = 4
            else:
                status = 0
            cnr = np.nan
            if status == 0:
                if definition == "gcnr":
                    cnr = gcnr(rv, bv)
                else:
                    noise2 = {"pooled": vr + vb, "pooled-mean": (vr + vb) / 2, "background": vb, "roi": vr}[definition]
                    diff = mr - mb
                    if noise2 == 0:
                        status = 5
                        cnr = np.inf if diff != 0 else np.nan
                    else:
                        cnr = abs(diff) / math.sqrt(noise2)
                    if signed and diff < 0:
                        cnr = -cnr
            out["status"][i, j] = status
            out["cnr"][i, j] = cnr
        ok = out["status"][i] == 0
        out["n_valid"][i] = ok.sum()
        if ok.any():
            v = out["cnr"][i][ok]
            out["cnr_median"][i] = np.median(v if signed else np.abs(v))
    return ids, out
