"""Automatic regions (``rois="auto"``): air, body and two tissue classes of every image of a batch, on its backend.

For sets with no annotations (DESIGN §9). Per image, on the valid pixels (inside the valid extent, finite, not
the padding value), in display polarity (MONOCHROME1 and a negative slope flip the values, so air is the darkest),
after a 3 x 3 median filter (the classes are found on it; the cells measure the stored values):

1. a 256-bin histogram over [min, max] of the valid (filtered) values, binned as ``numpy.histogram`` bins them, built
   on the backend; Otsu's two-class threshold t0 and the three-class thresholds t1 < t2 on it, exhaustively, the first
   maximum winning ties (as ``skimage.filters.threshold_otsu`` / ``threshold_multiotsu``);
2. the air threshold: t1 when it is the three-class threshold nearer t0 (air | lower tissue | upper tissue), else t2
   (the three classes split the dark side in two: a body of weak internal contrast; the tissue split is then a
   second two-class Otsu over the body's pixels above t2);
3. the body: the largest 4-connected component above the air threshold, its holes filled (lungs and bowel gas stay
   in the body); the air: the pixels at or below the threshold outside the body, with the small bright specks among
   them (components of fewer than ``(2 edge + 1)**2`` pixels, at least 9); larger bright objects outside the body
   (a table, a label) are neither;
4. an image has air when at least ``max(min_bg, ddof + 1)`` air pixels are left after step 6 and the body meets the
   air along at least as many pixels as it meets the image's edge (the array's border, the valid extent, excluded
   pixels); otherwise (cropped X-ray, dermatology, patches) the whole valid image is the body and the tissue split
   is t0;
5. inside the body, three classes: internal air (at or below the air threshold), lower tissue and upper tissue.
   Specks are merged into what surrounds them: internal-air components smaller than the speck size join the lower
   tissue, then upper-tissue components smaller than it join the lower tissue and lower components smaller than it
   join the upper tissue (so noise that crosses a threshold does not truncate the classes' distributions);
6. an `edge` band (default 2 px, L1) is removed from every region wherever it meets a valid pixel of another region,
   so partial-volume edges stay out; the image's own frame is no edge.

`find_regions` returns them as a label array: `REGION_NONE` (0), `REGION_AIR` (1), `REGION_BODY` (2: body pixels in
no tissue class, i.e. internal air and the band between the classes), `REGION_LOWER` (3), `REGION_UPPER` (4); the
body is every label >= 2. `measure_auto` measures two cells with fixed ids: 1 ``foreground`` (the body against the
air) and 2 ``tissue`` (the upper class against the lower), through `measure_batch`'s label background, so counts and
moments are as exact as every other cell's. A region with fewer than ``max(min_bg, ddof + 1)`` pixels is not found:
its cells get status 8 ``region-not-found``.

Masks come from the backend's ndimage (`gpucnr.backend.ndimage_for`: scipy.ndimage, cupyx.scipy.ndimage); arrays of
other array-API namespaces make the round trip through NumPy for those calls only, as SciPy's own dispatch does.
"""

from __future__ import annotations

import math
from dataclasses import replace

import array_api_compat

from gpucnr.backend import is_cupy, ndimage_for, to_host
from gpucnr.errors import OptionError
from gpucnr.kernels.batch import OUTPUT_CELL, measure_batch
from gpucnr.kernels.cnr import STATUS, contrast_to_noise, median_of_valid
from gpucnr.kernels.footprints import footprint_offsets, footprint_rows
from gpucnr.kernels.masks import dilate, excluded_mask
from gpucnr.kernels.params import Params

__all__ = [
    "AUTO_BINS",
    "AUTO_IMAGE",
    "AUTO_ROI_IDS",
    "AUTO_ROI_NAMES",
    "DEFAULT_EDGE",
    "NOISE_SOURCES",
    "REGION_AIR",
    "REGION_BODY",
    "REGION_LOWER",
    "REGION_NONE",
    "REGION_UPPER",
    "check_auto_options",
    "find_regions",
    "histograms",
    "measure_auto",
    "otsu_thresholds",
]

#: Values of the region label arrays.
REGION_NONE, REGION_AIR, REGION_BODY, REGION_LOWER, REGION_UPPER = 0, 1, 2, 3, 4
#: The cells of ``rois="auto"``: fixed ids and names.
AUTO_ROI_IDS = (1, 2)
AUTO_ROI_NAMES = ("foreground", "tissue")
#: Per-image variables of auto results (besides OUTPUT_IMAGE): the air region's moments and ``noise_source`` (an
#: index into NOISE_SOURCES: where the noise term of the tissue cell came from).
AUTO_IMAGE = ("n_air", "mean_air", "var_air", "noise_source")
NOISE_SOURCES = ("tissue", "air+tissue")
AUTO_BINS = 256
DEFAULT_EDGE = 2
#: Images of the three-class search per step: its table is (images, 256, 256) float64.
_OTSU_CHUNK = 32
#: Side of the median filter the classes are found on (measured in docs/choosing.md: the regions then follow the
#: anatomy, not the noise, so a noise ladder changes the pixels' values more than which pixels are measured).
_MEDIAN = 3


def check_auto_options(params: Params, *, auto: bool) -> None:
    """Refuse options that contradict the automatic regions, or need them (coded `OptionError`)."""
    if auto and params.background != Params.background:
        raise OptionError(f"rois='auto' finds its own backgrounds (air, lower tissue): background must stay the "
                          f"default ({Params.background!r}), got {params.background!r}")
    # NB: the shape options of given ROIs mean nothing here; accepted silently they were recorded, then refused by a
    # --resume that left them out (a new user's walk)
    unused = [f"{name}={getattr(params, name)!r}" for name in ("footprint", "dilation", "border", "ring_gap",
                                                               "ring_width", "background_label")
              if auto and getattr(params, name) != getattr(Params, name)]
    if unused:
        raise OptionError(f"rois='auto' has no dilated ROI, frame or ring: leave {', '.join(unused)} at the default")
    if not auto and params.definition == "mriqc":
        raise OptionError("definition 'mriqc' needs the air moments, which only the automatic regions measure: "
                          "use rois='auto' (--rois auto)")


def _edge(edge) -> int:
    if isinstance(edge, bool) or not hasattr(edge, "__index__"):
        raise OptionError(f"edge must be an integer >= 0, got {edge!r}")
    if int(edge) < 0:
        raise OptionError(f"edge must be >= 0, got {edge}")
    return int(edge)


# --- histograms and Otsu -------------------------------------------------------------------------------------
def histograms(xp, values, usable, *, bins: int = AUTO_BINS):
    """Per image, the `bins`-bin histogram of the usable values over their [min, max], as ``numpy.histogram``.

    Parameters
    ----------
    values : float64 array, shape (n, H, W)
    usable : bool array, shape (n, H, W)

    Returns
    -------
    counts : int64 array, shape (n, bins)
    edges : float64 array, shape (n, bins + 1)
        ``numpy.linspace(min, max, bins + 1)`` per image.
    ok : bool array, shape (n,)
        The image has usable values spanning a finite, non-empty range (elsewhere counts are 0).
    """
    n = values.shape[0]
    dev = array_api_compat.device(values)
    f64 = xp.float64
    inf = xp.full_like(values, math.inf)
    lo = xp.min(xp.reshape(xp.where(usable, values, inf), (n, -1)), axis=1) if values.size else xp.full((n,), math.inf)
    hi = xp.max(xp.reshape(xp.where(usable, values, -inf), (n, -1)), axis=1) if values.size else -lo
    span = hi - lo
    ok = xp.isfinite(lo) & xp.isfinite(hi) & xp.isfinite(span) & (span > 0)
    lo = xp.where(ok, lo, xp.zeros_like(lo))
    hi = xp.where(ok, hi, xp.ones_like(hi))
    # NB: numpy.linspace's edges: k * step + start, the last one exactly the stop.
    k = xp.astype(xp.arange(bins + 1, dtype=xp.int64, device=dev), f64)
    step = (hi - lo) / bins
    edges = k[None, :] * step[:, None] + lo[:, None]
    edges = xp.concat([edges[:, :-1], hi[:, None]], axis=1)
    keep = usable & ok[:, None, None]
    flat = xp.reshape(xp.where(keep, values, lo[:, None, None]), (n, -1))
    first, step = lo[:, None], step[:, None]
    # NB: numpy.histogram's rule: ((x - first) / (last - first)) * bins, truncated (x >= first), then corrected by
    # the edges; an inner edge is k * step + first, computed here as linspace computes it (no gather).
    idx = xp.clip(xp.astype(((flat - first) / (hi - lo)[:, None]) * bins, xp.int64), 0, bins - 1)
    idx = xp.where(flat < xp.astype(idx, f64) * step + first, idx - 1, idx)
    nxt = idx + 1
    idx = xp.where((flat >= xp.astype(nxt, f64) * step + first) & (nxt < bins), nxt, idx)
    image = xp.arange(n, dtype=xp.int64, device=dev)[:, None]
    # NB: pixels left out count in a last, discarded bin (no boolean gather of the batch)
    key = xp.where(xp.reshape(keep, (n, -1)), image * bins + idx, xp.asarray(n * bins, dtype=xp.int64, device=dev))
    counts = xp.reshape(_bincount(xp, xp.reshape(key, (-1,)), n * bins + 1)[:-1], (n, bins))
    return counts, edges, ok


def _bincount(xp, keys, size: int):
    """Occurrences of 0..size-1 in the int64 array `keys` (NumPy's and CuPy's bincount, else a sort)."""
    bincount = getattr(xp, "bincount", None)
    if bincount is not None:
        return xp.astype(bincount(keys, minlength=size), xp.int64)
    dev = array_api_compat.device(keys)
    ordered = xp.sort(keys)
    bounds = xp.searchsorted(ordered, xp.arange(size + 1, dtype=xp.int64, device=dev))
    return xp.astype(bounds[1:] - bounds[:-1], xp.int64)


def otsu_thresholds(xp, counts, edges, classes: int):
    """Otsu's thresholds of every histogram: the bin centres after which the classes split.

    Exhaustive over every split into `classes` (2 or 3) classes of consecutive bins; the between-class variance
    is computed in float64 from exact integer sums, and the first maximum (in lexicographic order of the split
    bins) wins, as scikit-image's ``threshold_otsu`` and ``threshold_multiotsu`` choose. A value ``x`` belongs to
    the classes above a threshold ``t`` when ``x > t``.

    Parameters
    ----------
    counts : int64 array, shape (n, B)
    edges : float64 array, shape (n, B + 1)
    classes : {2, 3}

    Returns
    -------
    float64 array, shape (n, classes - 1)
        Ascending thresholds.
    """
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes}")
    n, bins = counts.shape
    dev = array_api_compat.device(counts)
    f64 = xp.float64
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    p = xp.astype(counts, f64)
    k = xp.astype(xp.arange(bins, dtype=xp.int64, device=dev), f64)
    # NB: cumulative sums of counts and of count * bin index: integers, exact in float64 below 2**53.
    weight = xp.cumulative_sum(p, axis=1)
    first = xp.cumulative_sum(p * k[None, :], axis=1)
    total_w, total_s = weight[:, -1:], first[:, -1:]

    def part(w, s):
        # the class's share of the between-class variance, sum(count * value)**2 / count (0 for an empty class)
        safe = xp.where(w > 0, w, xp.ones_like(w))
        return xp.where(w > 0, (s * s) / safe, xp.zeros_like(w))

    if classes == 2:
        # NB: scikit-image's threshold_otsu score, w1 w2 (m1 - m2)**2 over the bin centres, for a split after bins
        # 0 .. B-2 (equal, up to a constant factor and term, to part(low) + part(high)): the same arithmetic, so
        # that near-ties fall the same way.
        w1 = weight[:, :-1]
        w2 = total_w - w1
        safe1 = xp.where(w1 > 0, w1, xp.ones_like(w1))
        safe2 = xp.where(w2 > 0, w2, xp.ones_like(w2))
        c1 = xp.cumulative_sum(p * centres, axis=1)
        m1 = c1[:, :-1] / safe1
        m2 = (c1[:, -1:] - c1[:, :-1]) / safe2
        score = w1 * w2 * (m1 - m2) ** 2
        score = xp.where((w1 > 0) & (w2 > 0), score, xp.full_like(score, -math.inf))
        best = xp.argmax(score, axis=1)
        return xp.take_along_axis(centres, best[:, None], axis=1)
    # Three classes: bins [0, i], [i + 1, j], [j + 1, B - 1] for 0 <= i < j <= B - 2, scored in chunks of images.
    ii = xp.arange(bins, dtype=xp.int64, device=dev)[:, None]
    jj = xp.arange(bins, dtype=xp.int64, device=dev)[None, :]
    legal = (ii < jj) & (jj <= bins - 2)
    out = []
    for a in range(0, n, _OTSU_CHUNK):
        b = min(a + _OTSU_CHUNK, n)
        w, s = weight[a:b, ...], first[a:b, ...]
        tw, ts = total_w[a:b, ...], total_s[a:b, ...]
        low = part(w, s)[:, :, None]
        high = part(tw - w, ts - s)[:, None, :]
        mid = part(w[:, None, :] - w[:, :, None], s[:, None, :] - s[:, :, None])
        score = xp.where(legal[None, :, :], low + mid + high, xp.full_like(mid, -math.inf))
        m = score.shape[0]
        # NB: argmax of the row-major flattening: the first maximum in lexicographic (i, j) order.
        best = xp.argmax(xp.reshape(score, (m, bins * bins)), axis=1)
        pair = xp.stack([best // bins, best % bins], axis=1)
        out.append(xp.take_along_axis(centres[a:b, ...], pair, axis=1))
    if not out:
        return xp.zeros((0, 2), dtype=f64, device=dev)
    return xp.concat(out, axis=0)


# --- ndimage on the backend ----------------------------------------------------------------------------------
def _ndimage(xp, name: str, mask, structure):
    """``ndimage.<name>(mask, structure=...)`` of the backend of `mask` (a round trip through NumPy for
    array-API namespaces SciPy does not take: array-api-strict, ...). Returns arrays of `xp`."""
    nd = ndimage_for(mask)
    native = is_cupy(mask) or array_api_compat.is_numpy_array(mask)
    dev = array_api_compat.device(mask)
    struct = xp.asarray(structure, dtype=xp.bool, device=dev)
    if native:
        out = getattr(nd, name)(mask, structure=struct)
    else:
        out = getattr(nd, name)(to_host(mask), structure=to_host(struct))
    if isinstance(out, tuple):
        lab, count = out
        return (lab if native else xp.asarray(lab, device=dev)), int(count)
    return out if native else xp.asarray(out, device=dev)


#: 4-connectivity within each image plane, none across images.
_PLANE_CROSS = [[[False] * 3] * 3, [[False, True, False], [True, True, True], [False, True, False]], [[False] * 3] * 3]


def _components(xp, mask):
    """4-connected components of each plane of `mask`: int64 labels (0 = none) and their sizes (index = label)."""
    lab, count = _ndimage(xp, "label", mask, _PLANE_CROSS)
    lab = xp.astype(lab, xp.int64)
    sizes = _bincount(xp, xp.reshape(lab, (-1,)), count + 1)
    return lab, sizes, count


def _small(xp, mask, size: int):
    """Pixels of `mask` in components of fewer than `size` pixels."""
    if size <= 1 or not bool(xp.any(mask)):
        return xp.zeros_like(mask)
    lab, sizes, _ = _components(xp, mask)
    return (lab > 0) & (xp.reshape(xp.take(sizes, xp.reshape(lab, (-1,))), mask.shape) < size)


def _median(xp, v, valid):
    """`v` through a `_MEDIAN` x `_MEDIAN` median filter within each plane, invalid pixels first set to their image's
    smallest valid value (so the valid region's edge is not pulled towards an arbitrary fill)."""
    n = v.shape[0]
    inf = xp.full_like(v, math.inf)
    floor = xp.min(xp.reshape(xp.where(valid, v, inf), (n, -1)), axis=1) if v.size else xp.zeros((n,), dtype=v.dtype)
    floor = xp.where(xp.isfinite(floor), floor, xp.zeros_like(floor))
    filled = xp.where(valid, v, floor[:, None, None])
    footprint = [[[False] * _MEDIAN] * _MEDIAN, [[True] * _MEDIAN] * _MEDIAN, [[False] * _MEDIAN] * _MEDIAN]
    nd = ndimage_for(v)
    dev = array_api_compat.device(v)
    if is_cupy(v) or array_api_compat.is_numpy_array(v):
        return nd.median_filter(filled, footprint=xp.asarray(footprint, dtype=xp.bool, device=dev), mode="nearest")
    host = nd.median_filter(to_host(filled), footprint=to_host(xp.asarray(footprint, dtype=xp.bool)), mode="nearest")
    return xp.asarray(host, device=dev)


def _largest(xp, mask):
    """The largest component of each plane of `mask` (ties: the smallest label, the first in raster order)."""
    n, height, width = mask.shape
    dev = array_api_compat.device(mask)
    if not bool(xp.any(mask)):
        return xp.zeros_like(mask)
    lab, sizes, count = _components(xp, mask)
    flat = xp.reshape(lab, (-1,))
    # NB: the image of every label: the position of its first pixel (a sort), or exact weighted counts.
    bincount = getattr(xp, "bincount", None)
    if bincount is not None:
        plane = xp.astype(xp.arange(flat.shape[0], dtype=xp.int64, device=dev) // (height * width), xp.float64)
        sums = bincount(flat, weights=plane, minlength=count + 1)
        image = xp.astype(xp.round(sums / xp.astype(xp.where(sizes > 0, sizes, xp.ones_like(sizes)), xp.float64)),
                          xp.int64)
    else:
        order = xp.argsort(flat, stable=True)
        start = xp.searchsorted(xp.take(flat, order), xp.arange(count + 1, dtype=xp.int64, device=dev))
        first = xp.take(order, xp.clip(start, 0, flat.shape[0] - 1))
        image = first // (height * width)
    ids = xp.arange(1, count + 1, dtype=xp.int64, device=dev)
    size, image = sizes[1:], image[1:]
    # NB: sizes descending (stable: labels ascending among ties), then images ascending (stable).
    by_size = xp.argsort(size, descending=True, stable=True)
    by_image = xp.take(by_size, xp.argsort(xp.take(image, by_size), stable=True))
    ordered_image = xp.take(image, by_image)
    pos = xp.searchsorted(ordered_image, xp.arange(n, dtype=xp.int64, device=dev))
    pos = xp.clip(pos, 0, count - 1)
    winner = xp.where(xp.take(ordered_image, pos) == xp.arange(n, dtype=xp.int64, device=dev),
                      xp.take(ids, xp.take(by_image, pos)), xp.full((n,), -1, dtype=xp.int64, device=dev))
    return lab == winner[:, None, None]


def _band(xp, region, other, rows):
    """`region` less its pixels within the band (footprint `rows`) of any pixel of `other`."""
    if rows is None:
        return region
    return region & ~dilate(xp, other, rows)


def _count(xp, mask):
    return xp.astype(xp.count_nonzero(mask, axis=(1, 2)), xp.int64)


# --- the regions -----------------------------------------------------------------------------------------------
def find_regions(xp, images, *, valid_h=None, valid_w=None, padding=None, polarity=None, slope=None,
                 edge: int = DEFAULT_EDGE, min_bg: int = 30, ddof: int = 1):
    """The automatic regions of every image of a batch (see the module's description).

    Parameters
    ----------
    images : array, shape (n, H, W)
        Stored values (any real dtype).
    valid_h, valid_w : int64 arrays, shape (n,), optional
    padding : float64 array, shape (n,), optional
        Pixel padding value per image (NaN: none).
    polarity, slope : float64 arrays, shape (n,), optional
        Display polarity (-1 for MONOCHROME1) and modality slope: air is the darkest class in display.
    edge : int
        Width (px, L1) of the band removed where regions meet.
    min_bg, ddof : int
        A region is found when it keeps at least ``max(min_bg, ddof + 1)`` pixels.

    Returns
    -------
    labels : int8 array, shape (n, H, W)
        REGION_NONE, REGION_AIR, REGION_BODY, REGION_LOWER, REGION_UPPER.
    found : dict of bool arrays, shape (n,)
        ``air``, ``body``, ``tissue`` (both tissue classes).
    """
    edge = _edge(edge)
    n, height, width = images.shape
    dev = array_api_compat.device(images)
    f64 = xp.float64

    def per_image(a, fill, dtype):
        return xp.full((n,), fill, dtype=dtype, device=dev) if a is None else xp.asarray(a, dtype=dtype, device=dev)

    valid_h = per_image(valid_h, height, xp.int64)
    valid_w = per_image(valid_w, width, xp.int64)
    padding = per_image(padding, math.nan, f64)
    polarity = per_image(polarity, 1.0, f64)
    slope = per_image(slope, 1.0, f64)
    if images.dtype == xp.bool:
        images = xp.astype(images, xp.uint8)
    need = max(int(min_bg), int(ddof) + 1, 1)
    speck = (2 * max(edge, 1) + 1) ** 2
    rows = footprint_rows(footprint_offsets("cross", edge)) if edge > 0 else None

    ys = xp.arange(height, dtype=xp.int64, device=dev)[None, :, None]
    xs = xp.arange(width, dtype=xp.int64, device=dev)[None, None, :]
    valid = (ys < valid_h[:, None, None]) & (xs < valid_w[:, None, None])
    valid = valid & ~excluded_mask(xp, images, padding[:, None, None])
    # NB: display polarity: air is the darkest class once MONOCHROME1 (and a negative slope) are undone.
    direction = polarity * xp.where(slope < 0, -xp.ones_like(slope), xp.ones_like(slope))
    raw = xp.astype(images, f64)
    v = xp.where(valid, raw * direction[:, None, None], xp.zeros_like(raw))
    v = _median(xp, v, valid)

    counts, edges, ok = histograms(xp, v, valid)
    t0 = otsu_thresholds(xp, counts, edges, 2)[:, 0]
    t12 = otsu_thresholds(xp, counts, edges, 3)
    t1, t2 = t12[:, 0], t12[:, 1]
    # NB: t1 is the air threshold when it is the three-class threshold nearer the two-class one; otherwise the three
    # classes split the dark side (air) in two and t2 is the air's edge.
    near1 = xp.abs(t0 - t1) <= xp.abs(t2 - t0)
    t_air = xp.where(near1, t1, t2)
    okv = ok[:, None, None]

    above = v > t_air[:, None, None]
    body = _largest(xp, valid & above & okv)
    body = _ndimage(xp, "binary_fill_holes", body, _PLANE_CROSS) & valid
    outside = valid & ~body
    air = outside & (~above | _small(xp, outside & above, speck)) & okv
    # NB: air surrounds the body: the body must meet the air along at least as many pixels as it meets the image's
    # edge (the array's border, the valid extent, excluded pixels). A dark tissue beside a bright one in a patch or a
    # cropped X-ray touches the frame more than it wraps the body, and is no air.
    one = footprint_rows(footprint_offsets("cross", 1))
    border = (ys == 0) | (ys == height - 1) | (xs == 0) | (xs == width - 1)
    frame = _count(xp, body & (dilate(xp, ~valid, one) | border))
    wrapped = _count(xp, body & dilate(xp, air, one))
    air = _band(xp, air, valid & ~air, rows)
    has_air = ok & (_count(xp, air) >= need) & (wrapped >= frame)
    air = air & has_air[:, None, None]

    # The tissue threshold: t2 (air | lower | upper), or a two-class Otsu over the body's pixels above the air
    # threshold when t2 was the air's edge, or t0 over the whole image when it has no air.
    body = xp.where(has_air[:, None, None], body, valid)
    t_tissue = xp.where(has_air, t2, t0)
    redo = has_air & ~near1
    if bool(xp.any(redo)):
        inner = body & above & redo[:, None, None]
        c_in, e_in, ok_in = histograms(xp, v, inner)
        t_in = otsu_thresholds(xp, c_in, e_in, 2)[:, 0]
        t_tissue = xp.where(redo & ok_in, t_in, t_tissue)
    t_floor = xp.where(has_air, t_air, xp.full_like(t_air, -math.inf))
    upper = body & (v > t_tissue[:, None, None])
    dark = body & ~(v > t_floor[:, None, None])
    # NB: specks join what surrounds them: dark (internal-air) specks the lower tissue, then upper specks the lower
    # tissue and lower specks the upper one (lower = body - upper - dark, so both at once).
    dark = dark & ~_small(xp, dark, speck)
    to_lower = _small(xp, upper, speck)
    to_upper = _small(xp, body & ~upper, speck) & ~dark
    upper = (upper & ~to_lower) | to_upper
    lower = body & ~upper & ~dark

    body_kept = _band(xp, body, valid & ~body, rows)
    lower = _band(xp, lower, valid & ~lower, rows)
    upper = _band(xp, upper, valid & ~upper, rows)
    labels = xp.zeros((n, height, width), dtype=xp.int8, device=dev)
    for mask, value in ((air, REGION_AIR), (body_kept, REGION_BODY), (lower, REGION_LOWER), (upper, REGION_UPPER)):
        labels = xp.where(mask, xp.asarray(value, dtype=xp.int8, device=dev), labels)
    found = {
        "air": has_air,
        "body": ok & (_count(xp, body_kept) >= need),
        "tissue": ok & (_count(xp, lower) >= need) & (_count(xp, upper) >= need),
    }
    return labels, found


# --- measuring them ----------------------------------------------------------------------------------------------
def measure_auto(xp, images, *, params: Params, edge: int = DEFAULT_EDGE, valid_h=None, valid_w=None, slope=None,
                 intercept=None, padding=None, polarity=None, fast: bool = True) -> dict:
    """Find the automatic regions of one batch and measure their two cells (ids `AUTO_ROI_IDS`).

    Cell 1 ``foreground``: ROI the body, background the air. Cell 2 ``tissue``: ROI the upper tissue class,
    background the lower one. Both through `measure_batch` with a label background (exact sums, the batch's
    rescale, exclusions and statuses); `params.background` must be the default (it has no meaning here).

    ``definition="mriqc"``: the tissue cell is ``|mu_upper - mu_lower| / sqrt(var_air + var_upper + var_lower)``
    (MRIQC's CNR) with the image's air variance, or without the air term where the image has no air
    (``noise_source`` "tissue"); the foreground cell's background *is* the air, whose variance enters once:
    ``|mu_body - mu_air| / sqrt(var_air + var_body)`` (the pooled formula).

    Returns
    -------
    dict of arrays
        `OUTPUT_CELL` variables of shape (n, 2), ``cnr_median``, ``n_valid``, ``n_excluded``, the `AUTO_IMAGE`
        variables of shape (n,) (``noise_source`` an int8 index into `NOISE_SOURCES`), and ``roi_ids``.
    """
    check_auto_options(params, auto=True)
    n = images.shape[0]
    dev = array_api_compat.device(images)
    labels, found = find_regions(xp, images, valid_h=valid_h, valid_w=valid_w, padding=padding, polarity=polarity,
                                 slope=slope, edge=edge, min_bg=params.min_bg, ddof=params.ddof)
    mriqc = params.definition == "mriqc"
    base = replace(params, background="label", border=0, background_label=REGION_AIR,
                   definition="pooled" if mriqc else params.definition)
    extra = {"valid_h": valid_h, "valid_w": valid_w, "slope": slope, "intercept": intercept, "padding": padding,
             "polarity": polarity}
    extra = {k: v for k, v in extra.items() if v is not None}
    i8 = xp.int8

    def ids(v):
        return xp.asarray([v], dtype=xp.int64, device=dev)

    def one(roi_mask, roi_id, bg_label, imgs=images, lesions=labels, per=extra):
        rois = xp.where(roi_mask, xp.asarray(roi_id, dtype=i8, device=dev), xp.asarray(0, dtype=i8, device=dev))
        return measure_batch(xp, imgs, roi_ids=ids(roi_id), params=replace(base, background_label=bg_label),
                             labels=rois, lesions=lesions, fast=fast, **per)

    fg = one(labels >= REGION_BODY, AUTO_ROI_IDS[0], REGION_AIR)
    tissue = one(labels == REGION_UPPER, AUTO_ROI_IDS[1], REGION_LOWER)
    out = {k: xp.concat([fg[k], tissue[k]], axis=1) for k in OUTPUT_CELL}
    n_air, mean_air, var_air = fg["n_bg"][:, 0], fg["mean_bg"][:, 0], fg["var_bg"][:, 0]
    # NB: an image of air and no body has no foreground cell to carry the air moments: measured alone (rare).
    lone = xp.nonzero(found["air"] & (_count(xp, labels >= REGION_BODY) == 0))[0]
    if lone.shape[0]:
        sub = {k: xp.take(xp.asarray(v, device=dev), lone, axis=0) for k, v in extra.items()}
        sub_labels = xp.take(labels, lone, axis=0)
        alone = one(sub_labels == REGION_AIR, AUTO_ROI_IDS[0], REGION_AIR, imgs=xp.take(images, lone, axis=0),
                    lesions=sub_labels, per=sub)
        n_air = _put(xp, n_air, lone, alone["n_roi"][:, 0])
        mean_air = _put(xp, mean_air, lone, alone["mean_roi"][:, 0])
        var_air = _put(xp, var_air, lone, alone["var_roi"][:, 0])
    uses_air = found["air"] if mriqc else xp.zeros((n,), dtype=xp.bool, device=dev)
    if mriqc:
        # MRIQC's CNR on the tissue cell: the air variance joins the noise term where the image has air.
        term = xp.where(uses_air, var_air, xp.zeros_like(var_air))
        pol = xp.ones((n,), dtype=xp.float64, device=dev) if polarity is None else xp.asarray(polarity, device=dev)
        value, zero = contrast_to_noise(xp, tissue["mean_roi"][:, 0], tissue["var_roi"][:, 0],
                                        tissue["mean_bg"][:, 0], tissue["var_bg"][:, 0], "mriqc",
                                        signed=params.signed, polarity=pol, var_air=term)
        old = tissue["status"][:, 0]
        status = xp.where((old == STATUS["zero-noise"]) & ~zero, xp.asarray(STATUS["ok"], dtype=i8, device=dev), old)
        out["cnr"] = xp.concat([out["cnr"][:, :1], value[:, None]], axis=1)
        out["status"] = xp.concat([out["status"][:, :1], status[:, None]], axis=1)
    lost = xp.stack([~(found["air"] & found["body"]), ~found["tissue"]], axis=1)
    status = xp.where(lost, xp.asarray(STATUS["region-not-found"], dtype=i8, device=dev), out["status"])
    out["status"] = status
    nan = xp.full_like(out["cnr"], math.nan)
    out["cnr"] = xp.where((status == STATUS["ok"]) | (status == STATUS["zero-noise"]), out["cnr"], nan)
    out["cnr_median"], out["n_valid"] = median_of_valid(xp, out["cnr"], status, signed=params.signed)
    out["n_excluded"] = fg["n_excluded"]
    out["n_air"], out["mean_air"], out["var_air"] = n_air, mean_air, var_air
    out["noise_source"] = xp.astype(uses_air, i8)
    out["roi_ids"] = xp.asarray(list(AUTO_ROI_IDS), dtype=xp.int64, device=dev)
    return out


def _put(xp, values, idx, new):
    """`values` with entries `idx` (sorted, unique) replaced by `new`."""
    m = values.shape[0]
    positions = xp.arange(m, dtype=xp.int64, device=array_api_compat.device(values))
    pos = xp.clip(xp.searchsorted(idx, positions), 0, idx.shape[0] - 1)
    hit = xp.take(idx, pos) == positions
    return xp.where(hit, xp.astype(xp.take(new, pos), values.dtype), values)
