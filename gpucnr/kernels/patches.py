"""MRQy's CNR (``definition="mrqy"``): 5x5 patches taken near the maximum of each region, as MRQy and RadQy do.

MRQy (``mrqy/QCF.py``, 0.0.3) and RadQy (``radqy/radqy.py``, 2025.3.2) compute, per slice,

    F = foreground mask * image,  B = (1 - foreground mask) * image      (zeros outside each region)
    cnr = mean(patch(F) - patch(B)) / std(patch(B))                        (numpy std: ddof 0)

    def patch(img, patch_size):                  # patch_size = 5, so h = 2
        h = int(np.floor(patch_size / 2))
        U = np.pad(img, pad_width=5, mode='constant')
        [a, b] = np.where(img == np.max(img))
        a = a[0]; b = b[0]
        return U[a:a+2*h+1, b:b+2*h+1]

Here F and B are the cell's ROI and background pixel sets (excluded and out-of-extent pixels are not in them). The
quirks are theirs, kept on purpose so that numbers continue theirs:

- the maximum is over the whole zero-filled image: a region whose values are all negative has maximum 0, found at
  the first pixel outside it;
- ties go to the first maximum in row-major order (``np.where(...)[0]``);
- the image is padded by 5 but the patch is ``U[a:a+5, b:b+5]``, i.e. image rows a-5..a-1 and columns b-5..b-1: the
  5x5 block diagonally above-left of the maximum, which does not contain it, with zeros beyond the image's top and
  left edges;
- values are the stored ones (MRQy reads ``pixel_array``; no modality slope), so the value is not affine invariant;
  RadQy's ``-t CT`` subtracts the slice minimum first and adds 1e-6 to the denominator, which this does not do.
"""

from __future__ import annotations

import math

import array_api_compat

from gpucnr.kernels.masks import (
    Cells,
    base_mask,
    dilate,
    gather_window,
    roi_mask,
    union_masks,
    window_footprints,
)

__all__ = ["PATCH", "mrqy"]

#: The side of MRQy's patch and the padding its ``patch()`` uses (which puts the patch above-left of the maximum).
PATCH, _PAD = 5, 5

#: Whole-image pixels held per chunk of cells (each cell needs its own full-image masks: the maximum of a
#: background is anywhere in the image). About 60 bytes a pixel are live at once, so ~250 MB at this size.
_CHUNK_PIXELS = 1 << 22


def mrqy(xp, images, labels, lesions, cells: Cells, grid, params, valid_h, valid_w, padding, roi_ids):
    """MRQy's CNR of every present cell.

    Parameters
    ----------
    images : array, shape (n, H, W)
    labels, lesions : int arrays of shape (n, H, W) or None
        As `gpucnr.kernels.batch.measure_batch` takes them.
    cells : Cells, m entries
    grid : int64 array, shape (n * L,)
        Cell index of each (image, col), -1 where absent.
    params : Params
    valid_h, valid_w : int64 arrays, shape (n,)
    padding : float64 array, shape (n,)
    roi_ids : int64 array, shape (L,)

    Returns
    -------
    cnr : float64 array, shape (m,)
        ``mean(P_F - P_B) / std(P_B)`` (signed); +-inf where std(P_B) = 0 and the mean differs from 0, NaN where
        both are 0.
    zero_noise : bool array, shape (m,)
        std(P_B) == 0: the background patch is constant (status zero-noise).
    """
    _, height, width = images.shape
    m = cells.image.shape[0]
    dev = array_api_compat.device(images)
    if m == 0:
        return xp.zeros((0,), dtype=xp.float64, device=dev), xp.zeros((0,), dtype=xp.bool, device=dev)
    per_chunk = max(1, _CHUNK_PIXELS // max(height * width, 1))
    values, zeros = [], []
    for start in range(0, m, per_chunk):
        idx = xp.arange(start, min(start + per_chunk, m), dtype=xp.int64, device=dev)
        roi, bg, vals, usable = _regions(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w,
                                         padding, roi_ids, idx)
        p_f = _patch(xp, vals, roi, usable)
        p_b = _patch(xp, vals, bg, usable)
        # NB: numpy's mean and std (ddof 0, two-pass) over the 25 pixels, as np.nanmean / np.nanstd (no NaN here)
        diff = xp.mean(p_f - p_b, axis=1)
        centred = p_b - xp.mean(p_b, axis=1)[:, None]
        var = xp.mean(centred * centred, axis=1)
        zero = var == 0
        one = xp.ones_like(var)
        value = diff / xp.sqrt(xp.where(zero, one, var))
        inf = xp.where(diff < 0, xp.full_like(var, -math.inf), xp.full_like(var, math.inf))
        value = xp.where(zero, xp.where(diff != 0, inf, xp.full_like(var, math.nan)), value)
        values.append(value)
        zeros.append(zero)
    return xp.concat(values), xp.concat(zeros)


def _regions(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding, roi_ids, idx):
    """Whole-image masks of cells `idx`: ROI pixels, background pixels (both minus excluded pixels), the values
    as float64 and the valid extent, all shape (k, H, W)."""
    _, height, width = images.shape
    sub = cells.take(xp, idx)
    zero = xp.zeros_like(idx)
    # NB: the cells' own geometry (kind, cx, cy, r = label value) over a window that is the whole canvas
    whole = Cells(image=sub.image, col=sub.col, kind=sub.kind, cx=sub.cx, cy=sub.cy, r=sub.r,
                  y0=zero, y1=zero, x0=zero, x1=zero)
    win = gather_window(xp, images, labels, whole, 0, height, width, valid_h, valid_w)
    roi = roi_mask(xp, whole, win)
    base, bad = base_mask(xp, win, whole, valid_h, valid_w, params.border, padding)
    pixels = roi if bad is None else roi & ~bad
    outer, inner = window_footprints(params)
    # NB: the ROI dilated is its geometry (excluded pixels included), as the moments' windows dilate it
    if params.background == "complement":
        bg = base & ~dilate(xp, roi, outer)
    elif params.background == "ring":
        bg = base & dilate(xp, roi, outer) & ~dilate(xp, roi, inner)
    elif params.background == "label":
        les = gather_window(xp, lesions, None, whole, 0, height, width, valid_h, valid_w)
        bg = base & (xp.astype(les.values, xp.int64) == params.background_label)
    else:  # complement-all: the image's ROI union (and lesions), dilated
        n = images.shape[0]
        full = (xp.zeros((n,), dtype=xp.int64), xp.full((n,), height, dtype=xp.int64),
                xp.zeros((n,), dtype=xp.int64), xp.full((n,), width, dtype=xp.int64))
        _, dilated, _ = union_masks(xp, images, labels, lesions, cells, grid, params, valid_h, valid_w, padding,
                                    sub.image, full, roi_ids)
        d = params.dilation
        bg = base & ~dilated[:, d : d + height, d : d + width]
    return pixels, bg, xp.astype(win.values, xp.float64), win.inside


def _patch(xp, vals, region, usable):
    """MRQy's ``patch(region * image, 5)`` of each plane, flattened: shape (k, 25)."""
    k, height, width = vals.shape
    filled = xp.where(region, vals, xp.zeros_like(vals))
    # NB: beyond the valid extent is beyond MRQy's image: never its maximum
    filled = xp.reshape(xp.where(usable, filled, xp.full_like(vals, -math.inf)), (k, height * width))
    # NB: argmax returns the first maximum in row-major order, as np.where(img == np.max(img))[..][0]
    at = xp.argmax(filled, axis=1)
    a, b = at // width, at % width
    steps = xp.arange(PATCH, dtype=xp.int64, device=array_api_compat.device(vals)) - _PAD
    rows = a[:, None, None] + steps[None, :, None]
    cols = b[:, None, None] + steps[None, None, :]
    # NB: rows < a < valid_h and cols < b < valid_w, so only the top and left edges pad (with zeros)
    inside = xp.reshape((rows >= 0) & (cols >= 0), (k, PATCH * PATCH))
    lin = xp.reshape(xp.clip(rows, 0, None) * width + xp.clip(cols, 0, None), (k, PATCH * PATCH))
    picked = xp.take_along_axis(filled, lin, axis=1)
    return xp.where(inside, picked, xp.zeros_like(picked))
