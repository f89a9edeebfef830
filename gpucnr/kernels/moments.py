"""Per (image, region) counts and shifted sums: exact for integer images, mergeable, and their moments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat

from gpucnr.kernels.masks import excluded_mask, is_exact_integer

_GRID = 32

__all__ = [
    "Sums",
    "accumulator_dtype",
    "image_shift",
    "image_totals",
    "is_exact_integer",
    "masked_sums",
    "moments",
    "shifted",
    "two_pass",
]


@dataclass
class Sums:
    """Counts and sums of d = x - c over one region per entry (arrays of one shape).

    For exact-integer images ``s1`` and ``s2`` are int64 and exact; otherwise float64. Sums of two
    disjoint regions add, and a sub-region subtracts, which is how background = image totals minus
    window sums is formed.
    """

    n: Any
    s1: Any
    s2: Any

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)

    def __sub__(self, other: Sums) -> Sums:
        return Sums(self.n - other.n, self.s1 - other.s1, self.s2 - other.s2)


def accumulator_dtype(xp, dtype):
    """int64 for exact-integer images, float64 for float and >= 32-bit integer images."""
    return xp.int64 if is_exact_integer(xp, dtype) else xp.float64


def shifted(xp, values, shift):
    """``values - shift`` in the accumulator dtype (`shift` broadcasts against `values`)."""
    acc = accumulator_dtype(xp, values.dtype)
    if acc == xp.float64 and not xp.isdtype(values.dtype, "real floating"):
        # NB: >= 32-bit integers go through float64; the array API does not mix int and float operands.
        values = xp.astype(values, acc)
    # NB: otherwise one op: type promotion widens the values to the shift's accumulator dtype.
    return values - xp.astype(shift, acc)


def image_shift(xp, images, valid_h, valid_w, padding):
    """The shift c subtracted from every pixel of an image before its sums.

    Integer images (exact sums): the first usable pixel of the valid region in row-major order — with a
    border frame that pixel lies in the frame (row 0), never in a lesion; any integer keeps the sums exact,
    this one keeps them small. Float images: the mean of the usable pixels of a 32 x 32 grid spread over
    the valid region. NB: this departs from DESIGN §4 (which names the frame pixel for floats too) because a
    frame pixel can sit far from the background — air at -1000 HU around a body at 0 HU — and a shift far
    from the data costs float sums their accuracy; the grid mean sits within the data's spread.

    Returns
    -------
    array, shape (n,)
        int64 for exact-integer images, float64 otherwise; 0 for an image with no usable pixel.
    """
    n, height, width = images.shape
    acc = accumulator_dtype(xp, images.dtype)
    if acc == xp.float64:
        # NB: a 32 x 32 grid spread over each image's own valid region: the same pixels whatever the canvas
        # or the batch, so the shift (and with it every float sum) does not depend on either.
        k = xp.arange(_GRID, dtype=xp.int64)
        ys = (k[None, :] * valid_h[:, None]) // _GRID
        xs = (k[None, :] * valid_w[:, None]) // _GRID
        lin = (xp.arange(n, dtype=xp.int64) * (height * width))[:, None, None] + ys[:, :, None] * width + xs[:, None, :]
        grid = xp.reshape(xp.take(xp.reshape(images, (-1,)), xp.reshape(lin, (-1,))), (n, _GRID, _GRID))
        inside = (ys < valid_h[:, None])[:, :, None] & (xs < valid_w[:, None])[:, None, :]
        good = inside & ~excluded_mask(xp, grid, padding[:, None, None])
        values = xp.where(good, xp.astype(grid, acc), xp.zeros((), dtype=acc))
        count = xp.sum(xp.astype(good, acc), axis=(1, 2))
        total = xp.sum(values, axis=(1, 2))
        return xp.where(count > 0, total / xp.where(count > 0, count, xp.ones_like(count)), xp.zeros_like(count))
    row = images[:, 0, :]
    cols = xp.arange(width, dtype=xp.int64)[None, :]
    good = (cols < valid_w[:, None]) & (valid_h[:, None] > 0) & ~excluded_mask(xp, row, padding[:, None])
    first = xp.argmax(xp.astype(good, xp.int8), axis=1)
    shift = xp.astype(xp.take_along_axis(row, first[:, None], axis=1)[:, 0], acc)
    found = xp.any(good, axis=1)
    if not bool(xp.all(found)):
        # NB: rare (row 0 all padding): search the whole valid region of every image once.
        ys = xp.arange(height, dtype=xp.int64)[None, :, None]
        inside = (ys < valid_h[:, None, None]) & (cols[:, None, :] < valid_w[:, None, None])
        good = inside & ~excluded_mask(xp, images, padding[:, None, None])
        flat_good = xp.reshape(good, (n, -1))
        first = xp.argmax(xp.astype(flat_good, xp.int8), axis=1)
        full = xp.astype(xp.take_along_axis(xp.reshape(images, (n, -1)), first[:, None], axis=1)[:, 0], acc)
        zero = xp.zeros_like(full)
        shift = xp.where(found, shift, xp.where(xp.any(flat_good, axis=1), full, zero))
    return shift


def masked_sums(xp, d, mask, axes=(-2, -1)) -> Sums:
    """Counts and sums of `d` and `d`**2 over `mask` (exact in int64 for integer `d`).

    Float sums on NumPy go through `_numpy_fast.masked_float_sums`: row by row in row-major order, so they
    do not depend on how much padding surrounds the pixels (a window's size, an image's canvas, the other
    images of a batch) — a pairwise sum regroups its terms when the array grows.
    """
    if (array_api_compat.is_numpy_namespace(xp) and xp.isdtype(d.dtype, "real floating")
            and tuple(axes) in ((-2, -1), (d.ndim - 2, d.ndim - 1)) and d.ndim >= 2):
        from gpucnr.kernels import _numpy_fast

        n, s1, s2 = _numpy_fast.masked_float_sums(d, mask)
        return Sums(n=n, s1=s1, s2=s2)
    dm = xp.where(mask, d, xp.zeros((), dtype=d.dtype))
    return Sums(
        n=xp.astype(xp.count_nonzero(mask, axis=axes), xp.int64),
        s1=xp.sum(dm, axis=axes),
        s2=xp.sum(dm * dm, axis=axes),
    )


def image_totals(xp, images, shift, valid_h, valid_w, border: int, padding, region=None, *, fast=True):
    """One pass over every image: sums over the interior (valid region minus the border frame).

    Parameters
    ----------
    images : array, shape (n, H, W)
    shift : array, shape (n,)
        From `image_shift`.
    valid_h, valid_w : int64 arrays, shape (n,)
    border : int
        Width of the frame removed from the background (DESIGN §4); 0 removes nothing.
    padding : float64 array, shape (n,)
        Padding value per image, NaN for none.
    region : bool array, shape (n, H, W), optional
        Further restrict the sums to these pixels (background="label").
    fast : bool
        Allow the NumPy fast path (`gpucnr.kernels._numpy_fast`) for NumPy arrays; tests turn it off to
        check the portable path on the same data.

    Returns
    -------
    totals : Sums, shape (n,)
        Over the interior pixels that are not excluded (and lie in `region`), of x - `shift` — except for
        float images with a `region` (the whole label background): two-pass, of x - (shift + centre).
    centre : float64 array, shape (n,), or None
        That centre, for float images with a `region`; else None.
    n_excluded : int64 array, shape (n,)
        Excluded pixels (not finite, or padding) in the whole valid region.
    """
    if fast and region is None and array_api_compat.is_numpy_namespace(xp):
        from gpucnr.kernels import _numpy_fast

        totals, n_excluded = _numpy_fast.image_totals(images, shift, valid_h, valid_w, border, padding)
        return totals, None, n_excluded
    _, height, width = images.shape
    ys = xp.arange(height, dtype=xp.int64)[None, :, None]
    xs = xp.arange(width, dtype=xp.int64)[None, None, :]
    vh = valid_h[:, None, None]
    vw = valid_w[:, None, None]
    inside = (ys < vh) & (xs < vw)
    interior = (ys >= border) & (ys < vh - border) & (xs >= border) & (xs < vw - border)
    bad = excluded_mask(xp, images, padding[:, None, None])
    n_excluded = xp.sum(xp.astype(bad & inside, xp.int64), axis=(1, 2))
    keep = interior & ~bad
    if region is not None:
        keep = keep & region
    d = shifted(xp, images, shift[:, None, None])
    totals = masked_sums(xp, d, keep, axes=(1, 2))
    if region is None or is_exact_integer(xp, images.dtype):
        return totals, None, n_excluded
    totals, centre = two_pass(xp, d, keep, totals, axes=(1, 2))
    return totals, centre, n_excluded


def two_pass(xp, d, mask, sums: Sums, axes=(-2, -1)):
    """Float data: sums about the region's own mean, given first-pass `sums` of `d` over `mask`.

    A region summed around a shift far from its own values (a background sharing its image with a bright
    lesion) loses float accuracy to cancellation in ``s2 - s1**2 / n``; summing again around its mean does
    not. Returns ``(sums, centre)``: sums of ``d - centre`` over `mask`, and ``centre`` (shape of sums.n).
    """
    nf = xp.astype(sums.n, xp.float64)
    centre = sums.s1 / xp.where(sums.n > 0, nf, xp.ones_like(nf))
    shape = centre.shape + (1,) * len(axes)
    return masked_sums(xp, d - xp.reshape(centre, shape), mask, axes=axes), centre


def moments(xp, sums: Sums, shift, ddof: int, *, exact: bool):
    """Mean and variance (float64) of each region from its shifted sums.

    For exact (int64) sums the data are re-centred on the integer q nearest the mean first, exactly,
    so the final float64 expression has no cancellation: relative error of a few ulp whatever the
    offset of the data. For float sums the caller guarantees the sums are well conditioned (two-pass
    ROI moments; ill-conditioned background cells are recomputed directly).

    Returns
    -------
    n, mean, var : arrays
        ``mean`` is NaN where n = 0 and ``var`` NaN where n <= ddof.
    """
    n = sums.n
    nf = xp.astype(n, xp.float64)
    one = xp.ones_like(nf)
    safe_n = xp.where(n > 0, nf, one)
    if exact:
        q = xp.astype(xp.round(xp.astype(sums.s1, xp.float64) / safe_n), xp.int64)
        s1 = sums.s1 - n * q
        s2 = sums.s2 - 2 * q * sums.s1 + n * q * q
        s1f = xp.astype(s1, xp.float64)
        mean_d = xp.astype(q, xp.float64) + s1f / safe_n
        m2 = xp.astype(s2, xp.float64) - s1f * (s1f / safe_n)
    else:
        mean_d = sums.s1 / safe_n
        m2 = sums.s2 - sums.s1 * mean_d
    nan = xp.full_like(nf, float("nan"))
    # NB: m2 can round a hair below zero for (near-)constant float data; a variance is never negative.
    m2 = xp.where(m2 < 0, xp.zeros_like(m2), m2)
    dof = nf - ddof
    var = xp.where(n > ddof, m2 / xp.where(dof > 0, dof, one), nan)
    mean = xp.where(n > 0, xp.astype(shift, xp.float64) + mean_d, nan)
    return n, mean, var
