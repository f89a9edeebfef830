"""Per (image, region) counts and shifted sums: exact for integer images, mergeable, and their moments."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat

from gpucnr.backend import to_host
from gpucnr.kernels.fastpath import kernel
from gpucnr.kernels.masks import excluded_mask, is_exact_integer, is_narrow_integer
from gpucnr.kernels.sums import Sums

_GRID = 32
# Limbs of 16 bits: |d| < 2**63 splits into three unsigned limbs and a signed top one; every per-pixel
# coefficient of d**2 is below 2**34, so each sums exactly in int64 over regions of fewer than 2**29 pixels.
_LIMB = 16
_LIMB_MASK = (1 << _LIMB) - 1
_LIMB_PIXELS = 1 << 29
# One int64 word holds every sum of an image exactly when (pixels) * max|x - c|**2 stays below this.
_NARROW = 1 << 62
# Float images: |x - c| is scaled by a power of two into [2**-1, 2**_FLOAT_HIGH] when it lies outside
# [2**-_FLOAT_HIGH, 2**_FLOAT_HIGH], so squares and their sums neither overflow nor underflow.
_FLOAT_HIGH = 480
_MAX_SCALE_EXP = 1000

__all__ = [
    "NumericPlan",
    "Sums",
    "accumulator_dtype",
    "float_moments",
    "image_range",
    "image_shift",
    "image_totals",
    "integer_difference",
    "integer_moments",
    "is_exact_integer",
    "limbs_value",
    "masked_sums",
    "narrow_from_limbs",
    "plan_numerics",
    "shifted",
    "two_pass",
]


@dataclass
class NumericPlan:
    """How the values of one batch are summed exactly (docs/accuracy.md, "Exact arithmetic at the edges").

    Attributes
    ----------
    out_of_range : bool array, shape (n,)
        Images that cannot be measured exactly by construction (status numeric-range): an integer spread
        max - min of 2**63 or more, a float spread that overflows float64.
    scale, inv_scale : float64 arrays, shape (n,), or None
        Float images: the power of two 2**e multiplying x - c, and 2**-e (None for integer images).
    wide : list of bool (host)
        Integer images whose sums need limbs (pixels * max|x - c|**2 >= 2**62).
    shift : list of int (host) or None
        The exact shift of each integer image (uint64 values as such), for the wide images' final step.
    """

    out_of_range: Any
    scale: Any
    inv_scale: Any
    wide: list
    shift: list | None

    exponents: list | None = None
    #: Some image of the batch is out of range (known on the host when the plan is made: no device read).
    any_out_of_range: bool = True
    #: The caller's `also` values (ints), when the plan read them with its own values (one transfer); else None.
    also: list | None = None

    @property
    def limbs(self) -> bool:
        return any(self.wide)

    @property
    def scaled(self) -> bool:
        """Some float image of the batch is scaled (its x - c multiplied by a power of two other than 1)."""
        return bool(self.exponents) and any(e != 0 for e in self.exponents)


def accumulator_dtype(xp, dtype):
    """int64 for integer images, float64 for float images."""
    return xp.int64 if is_exact_integer(xp, dtype) else xp.float64


def shifted(xp, values, shift, scale=None):
    """``(values - shift) * scale`` in the accumulator dtype (`shift`, `scale` broadcast against `values`).

    Integers: both sides go to int64 first. NB: uint64 values (and shifts) above 2**63 wrap there, alike, so
    the difference is exact, modulo 2**64, whenever |x - c| < 2**63 (which `plan_numerics` checks); the
    array API's int64 arithmetic wraps too, so sums formed from it are exact whenever their value fits.
    """
    if is_exact_integer(xp, values.dtype):
        return xp.astype(values, xp.int64) - xp.astype(shift, xp.int64)
    if values.dtype != xp.float64:
        values = xp.astype(values, xp.float64)
    d = values - xp.astype(shift, xp.float64)
    return d if scale is None else d * scale


def _grid(xp, images, valid_h, valid_w, padding):
    """A 32 x 32 grid spread over each image's own valid region: the same pixels whatever the canvas or the
    batch. Returns the grid values (n, 1024) in the images' dtype and which of them are usable."""
    n, height, width = images.shape
    k = xp.arange(_GRID, dtype=xp.int64)
    ys = (k[None, :] * valid_h[:, None]) // _GRID
    xs = (k[None, :] * valid_w[:, None]) // _GRID
    lin = xp.arange(n, dtype=xp.int64)[:, None, None] * (height * width) + ys[:, :, None] * width + xs[:, None, :]
    grid = xp.reshape(xp.take(xp.reshape(images, (-1,)), xp.reshape(lin, (-1,))), (n, _GRID * _GRID))
    inside = xp.reshape((ys < valid_h[:, None])[:, :, None] & (xs < valid_w[:, None])[:, None, :],
                        (n, _GRID * _GRID))
    # NB: 1024 values per image: comparing them all costs less than a device read to skip the comparison.
    return grid, inside & ~excluded_mask(xp, grid, padding[:, None], look=False)


def _extreme(xp, dtype, high: bool):
    if xp.isdtype(dtype, "real floating"):
        return xp.asarray(math.inf if high else -math.inf, dtype=dtype)
    info = xp.iinfo(dtype)
    return xp.asarray(info.max if high else info.min, dtype=dtype)


def image_shift(xp, images, valid_h, valid_w, padding, *, impl=None):
    """The shift c subtracted from every pixel of an image before its sums: the (lower) median of the usable
    pixels of a 32 x 32 grid spread over the valid region, computed in the images' own dtype — a value of
    the image itself, so |x - c| never exceeds the image's spread, and one near the bulk of its pixels.

    NB: DESIGN §4 names the first pixel of the border frame; that pixel can sit far from the background
    (air at -1000 HU around a body at 0 HU), and a shift far from the data costs float sums their accuracy.

    impl : str, optional
        The implementation named by `gpucnr.backend.fast_path` (None: the portable path).

    Returns
    -------
    array, shape (n,)
        int64 for integer images (uint64 shifts above 2**63 wrapped, see `shifted`), float64 otherwise;
        0 for an image with no usable grid pixel.
    """
    compiled = kernel(impl, "grid_median")
    if compiled is not None:
        return compiled(images, valid_h, valid_w, padding)
    if images.dtype == xp.bool:
        images = xp.astype(images, xp.uint8)
    grid, good = _grid(xp, images, valid_h, valid_w, padding)
    # NB: unusable grid pixels become the dtype's largest value and sort last; the k usable ones come first.
    ordered = xp.sort(xp.where(good, grid, _extreme(xp, images.dtype, True)), axis=1)
    count = xp.sum(xp.astype(good, xp.int64), axis=1)
    pos = xp.clip((count - 1) // 2, 0, None)
    median = xp.astype(xp.take_along_axis(ordered, pos[:, None], axis=1)[:, 0], accumulator_dtype(xp, images.dtype))
    return xp.where(count > 0, median, xp.zeros_like(median))


def image_range(xp, images, valid_h, valid_w, padding):
    """Smallest and largest usable value of each image, in its own dtype, and whether it has any.

    Returns ``(lo, hi, found)``, arrays of shape (n,).
    """
    _, height, width = images.shape
    ys = xp.arange(height, dtype=xp.int64)[None, :, None]
    xs = xp.arange(width, dtype=xp.int64)[None, None, :]
    inside = (ys < valid_h[:, None, None]) & (xs < valid_w[:, None, None])
    good = inside & ~excluded_mask(xp, images, padding[:, None, None])
    lo = xp.min(xp.where(good, images, _extreme(xp, images.dtype, True)), axis=(1, 2))
    hi = xp.max(xp.where(good, images, _extreme(xp, images.dtype, False)), axis=(1, 2))
    return lo, hi, xp.any(good, axis=(1, 2))


def plan_numerics(xp, images, shift, valid_h, valid_w, padding, *, impl=None, known_range=None,
                  extents=None, also=None) -> NumericPlan:
    """Decide, per image, how its sums stay exact (docs/accuracy.md, "Exact arithmetic at the edges").

    Integer images of at most 16 bits need no look at their values. Wider integer images and float images
    cost one pass for their range (or none: `known_range`, ``(lo, hi, found)`` from the NumPy image pass):
    its spread decides numeric-range, and max |x - c| decides between one int64 word and limbs (integers) or
    the power of two that scales x - c (floats). `extents`: ``(valid_h, valid_w)`` as host lists, when the
    caller has read them already (no device read for them here). `also`: a 1-D int64 device array of small
    integers (|v| < 2**53) the caller needs on the host; where the plan reads the device (float images) it
    reads them in the same transfer, as `NumericPlan.also`.
    """
    n = images.shape[0]
    dev = array_api_compat.device(images)
    if extents is None:
        # NB: one host read for both extents (on a GPU, one synchronisation).
        extents = to_host(xp.stack([xp.astype(valid_h, xp.int64), xp.astype(valid_w, xp.int64)])).tolist()
    pixels = [h * w for h, w in zip(extents[0], extents[1], strict=True)]
    none = xp.zeros((n,), dtype=xp.bool, device=dev)
    if is_narrow_integer(xp, images.dtype):
        wide = [p * (_LIMB_MASK * _LIMB_MASK) >= _NARROW for p in pixels]
        if any(wide):
            # NB: images of 2**30 pixels or more; limb sums are exact below 2**29 pixels, so those are out of range.
            out = [w and p >= _LIMB_PIXELS for w, p in zip(wide, pixels, strict=True)]
            wide = [w and not o for w, o in zip(wide, out, strict=True)]
            return NumericPlan(xp.asarray(out, dtype=xp.bool, device=dev), None, None, wide,
                               [int(v) for v in to_host(shift).tolist()], any_out_of_range=any(out))
        return NumericPlan(none, None, None, wide, None, any_out_of_range=False)
    if known_range is not None:
        lo, hi, found = known_range
    elif kernel(impl, "image_range") is not None:
        lo, hi, found = kernel(impl, "image_range")(images, valid_h, valid_w, padding)
    else:
        lo, hi, found = image_range(xp, images, valid_h, valid_w, padding)
    if is_exact_integer(xp, images.dtype):
        found_h = [bool(v) for v in to_host(found).tolist()]
        # NB: Python integers on the host (n values): spreads and squares of 64-bit values overflow int64.
        wrap = 1 << 64 if images.dtype == xp.uint64 else None
        c = [v % wrap if wrap else v for v in (int(v) for v in to_host(shift).tolist())]
        lo_h = [int(v) for v in to_host(lo).tolist()]
        hi_h = [int(v) for v in to_host(hi).tolist()]
        out = [f and h - low >= 1 << 63 for f, low, h in zip(found_h, lo_h, hi_h, strict=True)]
        wide = [f and not o and p * max(h - ci, ci - low) ** 2 >= _NARROW
                for f, o, p, ci, low, h in zip(found_h, out, pixels, c, lo_h, hi_h, strict=True)]
        # NB: limb sums are exact over fewer than 2**29 pixels; a wide image of more is out of range.
        out = [o or (w and p >= _LIMB_PIXELS) for o, w, p in zip(out, wide, pixels, strict=True)]
        wide = [w and p < _LIMB_PIXELS for w, p in zip(wide, pixels, strict=True)]
        return NumericPlan(xp.asarray(out, dtype=xp.bool, device=dev), None, None, wide, c, any_out_of_range=any(out))
    # NB: one host read for the four per-image values (float64 holds each of them exactly).
    f64 = xp.float64
    values = xp.concat([xp.astype(v, f64) for v in (found, shift, lo, hi)]
                       + ([] if also is None else [xp.astype(also, f64)]))
    read = to_host(values).tolist()
    found_f, c, lo_h, hi_h = (read[k * n: (k + 1) * n] for k in range(4))
    extra = None if also is None else [int(v) for v in read[4 * n:]]
    found_h = [bool(v) for v in found_f]
    out, exps = [], []
    for f, ci, low, h in zip(found_h, c, lo_h, hi_h, strict=True):
        spread = h - low if f else 0.0
        out.append(f and not math.isfinite(spread))
        reach = max(h - ci, ci - low) if f and math.isfinite(spread) else 0.0
        exps.append(_scale_exponent(reach))
    scale = xp.asarray([math.ldexp(1.0, e) for e in exps], dtype=xp.float64, device=dev)
    inv = xp.asarray([math.ldexp(1.0, -e) for e in exps], dtype=xp.float64, device=dev)
    return NumericPlan(xp.asarray(out, dtype=xp.bool, device=dev), scale, inv, [False] * n, None, exps,
                       any_out_of_range=any(out), also=extra)


def _scale_exponent(reach: float) -> int:
    """The e of 2**e scaling max |x - c| = `reach` into [2**-1, 2**480]; 0 when it already lies within
    [2**-480, 2**480] (ordinary data keeps its bits untouched)."""
    if not (reach > 0 and math.isfinite(reach)):
        return 0
    _, exp = math.frexp(reach)  # reach < 2**exp
    if exp > _FLOAT_HIGH:
        return _FLOAT_HIGH - exp
    if exp < -_FLOAT_HIGH:
        return min(-exp, _MAX_SCALE_EXP)
    return 0


def masked_sums(xp, d, mask, axes=(-2, -1), *, limbs=False, impl=None) -> Sums:
    """Counts and sums of `d` and `d`**2 over `mask` (exact in int64 for integer `d`).

    Float sums through a compiled implementation (`impl`, e.g. "numba-cpu"'s `masked_float_sums`) run row by
    row in row-major order, so they do not depend on how much padding surrounds the pixels (a window's size, an
    image's canvas, the other images of a batch) — a pairwise sum regroups its terms when the array grows. The
    portable path sums with ``xp.sum`` (within rounding of the same value).

    limbs : bool
        Integer `d`: sums as 16-bit limb sums along a trailing axis (see `Sums`), exact for any |d| < 2**63.
    impl : str, optional
        The implementation named by `gpucnr.backend.fast_path` (None: the portable path).
    """
    compiled = kernel(impl, "masked_float_sums")
    if (compiled is not None and xp.isdtype(d.dtype, "real floating")
            and tuple(axes) in ((-2, -1), (d.ndim - 2, d.ndim - 1)) and d.ndim >= 2):
        n, s1, s2 = compiled(d, mask)
        return Sums(n=n, s1=s1, s2=s2)
    dm = xp.where(mask, d, xp.zeros((), dtype=d.dtype))
    n = xp.astype(xp.count_nonzero(mask, axis=axes), xp.int64)
    if not limbs:
        return Sums(n=n, s1=xp.sum(dm, axis=axes), s2=xp.sum(dm * dm, axis=axes))
    # NB: d = a0 + a1 2**16 + a2 2**32 + a3 2**48 with a0..a2 in [0, 2**16) and a3 signed (arithmetic shift);
    # d**2 = sum_k 2**(16 k) sum_{i+j=k} a_i a_j: seven coefficients, each below 2**34 per pixel.
    a = [(dm >> (_LIMB * i)) & _LIMB_MASK for i in range(3)] + [dm >> (3 * _LIMB)]
    s1 = xp.stack([xp.sum(v, axis=axes) for v in a], axis=-1)
    terms = []
    for k in range(7):
        pairs = [(i, k - i) for i in range(4) if 0 <= k - i <= 3 and i <= k - i]
        total = None
        for i, j in pairs:
            prod = a[i] * a[j] if i == j else 2 * (a[i] * a[j])
            total = prod if total is None else total + prod
        terms.append(xp.sum(total, axis=axes))
    return Sums(n=n, s1=s1, s2=xp.stack(terms, axis=-1))


def limbs_value(limb_sums) -> list[int]:
    """Host Python integers from limb sums (rows of a 2-D array: sum of limb k times 2**(16 k))."""
    return [sum(int(v) << (_LIMB * k) for k, v in enumerate(row)) for row in to_host(limb_sums).tolist()]


def narrow_from_limbs(xp, sums: Sums) -> Sums:
    """The int64 words of limb sums, modulo 2**64: exact wherever the value fits in int64 (the narrow images
    of a batch that holds a wide one); the others are recomputed from the limbs on the host."""

    def word(a):
        out = a[..., 0]
        for k in range(1, min(a.shape[-1], 4)):
            # NB: int64 products wrap; the limbs of 2**64 and above vanish modulo 2**64.
            out = out + a[..., k] * (1 << (_LIMB * k))
        return out

    return Sums(sums.n, word(sums.s1), word(sums.s2))


def image_totals(xp, images, shift, valid_h, valid_w, border: int, padding, region=None, *, impl=None, scale=None,
                 limbs=False):
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
    impl : str, optional
        The implementation named by `gpucnr.backend.fast_path` (None: the portable path; tests compare both
        on the same data).
    scale : float64 array, shape (n,), optional
        Float images: the power of two multiplying x - shift (`NumericPlan.scale`).
    limbs : bool
        Integer images: limb sums (`NumericPlan.limbs`); the portable path computes them.

    Returns
    -------
    totals : Sums, shape (n,)
        Over the interior pixels that are not excluded (and lie in `region`), of x - `shift` — except for
        float images with a `region` (the whole label background): two-pass, of x - (shift + centre).
    centre : float64 array, shape (n,), or None
        That centre (scaled units), for float images with a `region`; else None.
    n_excluded : int64 array, shape (n,)
        Excluded pixels (not finite, or padding) in the whole valid region.
    """
    compiled = None if region is not None or limbs else kernel(impl, "image_totals")
    if compiled is not None:
        totals, n_excluded = compiled(images, shift, valid_h, valid_w, border, padding, scale)
        return totals, None, n_excluded
    _, height, width = images.shape
    ys = xp.arange(height, dtype=xp.int64)[None, :, None]
    xs = xp.arange(width, dtype=xp.int64)[None, None, :]
    vh = valid_h[:, None, None]
    vw = valid_w[:, None, None]
    inside = (ys < vh) & (xs < vw)
    interior = (ys >= border) & (ys < vh - border) & (xs >= border) & (xs < vw - border)
    # NB: on a device (impl "cuda") the padding comparison runs whatever the values: one element-wise operation
    # costs less than the host read that would skip it.
    bad = excluded_mask(xp, images, padding[:, None, None], look=impl != "cuda")
    n_excluded = xp.sum(xp.astype(bad & inside, xp.int64), axis=(1, 2))
    keep = interior & ~bad
    if region is not None:
        keep = keep & region
    d = shifted(xp, images, shift[:, None, None], None if scale is None else scale[:, None, None])
    totals = masked_sums(xp, d, keep, axes=(1, 2), limbs=limbs, impl=impl)
    if region is None or is_exact_integer(xp, images.dtype):
        return totals, None, n_excluded
    totals, centre = two_pass(xp, d, keep, totals, axes=(1, 2), impl=impl)
    return totals, centre, n_excluded


def two_pass(xp, d, mask, sums: Sums, axes=(-2, -1), *, impl=None):
    """Float data: sums about the region's own mean, given first-pass `sums` of `d` over `mask`.

    A region summed around a shift far from its own values (a background sharing its image with a bright
    lesion) loses float accuracy to cancellation in ``s2 - s1**2 / n``; summing again around its mean does
    not. Returns ``(sums, centre)``: sums of ``d - centre`` over `mask`, and ``centre`` (shape of sums.n).
    """
    nf = xp.astype(sums.n, xp.float64)
    centre = sums.s1 / xp.where(sums.n > 0, nf, xp.ones_like(nf))
    shape = centre.shape + (1,) * len(axes)
    return masked_sums(xp, d - xp.reshape(centre, shape), mask, axes=axes, impl=impl), centre


def float_moments(xp, sums: Sums, centre, ddof: int):
    """Float images: mean of d (relative to the image's shift) and variance, in the image's scaled units.

    `sums` are of d - `centre` (two-pass regions; 0 elsewhere); the caller guarantees they are well
    conditioned (two-pass ROI moments; ill-conditioned background cells are recomputed directly).

    Returns
    -------
    n, mean_d, var : arrays
        ``mean_d`` is NaN where n = 0 and ``var`` NaN where n <= ddof.
    """
    n = sums.n
    nf = xp.astype(n, xp.float64)
    one = xp.ones_like(nf)
    safe_n = xp.where(n > 0, nf, one)
    mean_d = sums.s1 / safe_n
    m2 = sums.s2 - sums.s1 * mean_d
    nan = xp.full_like(nf, math.nan)
    # NB: m2 can round a hair below zero for (near-)constant float data; a variance is never negative.
    m2 = xp.where(m2 < 0, xp.zeros_like(m2), m2)
    dof = nf - ddof
    var = xp.where(n > ddof, m2 / xp.where(dof > 0, dof, one), nan)
    return n, xp.where(n > 0, centre + mean_d, nan), var


def integer_moments(xp, sums: Sums, shift, ddof: int, *, unsigned64: bool):
    """Integer images (int64 words): mean and variance (float64) from exact shifted sums.

    The data are re-centred on the integer q nearest the mean of d first, exactly, so the final float64
    expression has no cancellation: a relative error of a few ulp whatever the offset of the data. The
    mean is float(c + q) + s1'/n, c + q formed exactly in int64 (it is a value within the data's range).

    Returns
    -------
    n, mean, var, q, s1q : arrays
        ``mean`` NaN where n = 0, ``var`` NaN where n <= ddof; ``q`` and ``s1q`` = sum of (d - q), for
        `integer_difference`.
    """
    n = sums.n
    nf = xp.astype(n, xp.float64)
    one = xp.ones_like(nf)
    safe_n = xp.where(n > 0, nf, one)
    q = xp.astype(xp.round(xp.astype(sums.s1, xp.float64) / safe_n), xp.int64)
    s1 = sums.s1 - n * q
    s2 = sums.s2 - 2 * q * sums.s1 + n * q * q
    s1f = xp.astype(s1, xp.float64)
    m2 = xp.astype(s2, xp.float64) - s1f * (s1f / safe_n)
    m2 = xp.where(m2 < 0, xp.zeros_like(m2), m2)
    nan = xp.full_like(nf, math.nan)
    dof = nf - ddof
    var = xp.where(n > ddof, m2 / xp.where(dof > 0, dof, one), nan)
    whole = xp.astype(shift, xp.int64) + q
    base = xp.astype(whole, xp.float64)
    if unsigned64:
        # NB: a uint64 value of 2**63 or more is held as its int64 wrap, 2**64 below it.
        base = xp.where(whole < 0, base + 2.0**64, base)
    mean = xp.where(n > 0, base + s1f / safe_n, nan)
    return n, mean, var, q, s1


def integer_difference(xp, n_a, q_a, s1q_a, n_b, q_b, s1q_b):
    """mean_a - mean_b of two regions of one integer image, from `integer_moments`' q and s1q, without
    the cancellation of subtracting two rounded means: (q_a - q_b) + s1q_a / n_a - s1q_b / n_b formed over
    the common denominator n_a n_b, exactly in int64 when |q_a - q_b| <= 2 (regions below 2**29 pixels)."""
    one = xp.ones_like(n_a)
    na = xp.where(n_a > 0, n_a, one)
    nb = xp.where(n_b > 0, n_b, one)
    qd = q_a - q_b
    g = s1q_a * nb - s1q_b * na
    den = na * nb
    near = xp.abs(qd) <= 2
    num = xp.where(near, qd, xp.zeros_like(qd)) * den + g
    fden = xp.astype(den, xp.float64)
    close = xp.astype(num, xp.float64) / fden
    far = xp.astype(qd, xp.float64) + xp.astype(g, xp.float64) / fden
    return xp.where(near, close, far)
