"""How far gpucnr's background modes and CNR definitions land from a known truth.

Part 1 measures phantoms whose pooled CNR is known analytically (``gpucnr.phantom.make_phantom``: disk
lesions on a flat background, Gaussian noise, uint16) with every background mode, and reports the relative
error ``measured / analytic - 1``; ROIs are either the lesion disks themselves or the article's square
ROIs sampled inside the lesions (``gpucnr.sample_rois``) summarised per image by ``cnr_median``.
Part 2 shows what drives the bias of the article's ``complement`` mode: how much of its background is
other lesions, and how contrasted they are; a two-component mixture model predicts it.
Part 3 measures the generalised CNR (gCNR) and the pooled CNR of region pairs with known distributions,
for ROIs of 4 to 1024 pixels.

Everything is seeded; the script prints Markdown tables (docs/accuracy.md holds a copy).

Usage::

    .venv/bin/python scripts/accuracy.py
"""

from __future__ import annotations

import math
import platform
import time

import numpy as np
import pandas as pd
from scipy.special import ndtr

import gpucnr
from gpucnr.phantom import Phantom, make_phantom

SEED = 2024
LEVELS = (0.5, 1.0, 2.0, 4.0, 8.0)  # analytic pooled CNR levels of the phantoms
SHAPE = (256, 256)
LESIONS = 3
RADIUS = 16  # part 1 lesion radius: large enough for the article's 10x10 sampled squares
PER_LEVEL = 48  # images per CNR level (part 1: 240 images, 720 lesions)
GEOMETRY_RADII = (8, 16, 24, 32)  # part 2: lesion radii, i.e. how much of the image is lesion
GEOMETRY_PER_LEVEL = 24
BOOTSTRAP = 2000
NOISE = 20.0
BG_LABEL = 9  # background label of the label-mode array; lesions keep 1..LESIONS
MODES = (  # (background, footprint); the footprint only shapes dilations and ring distances
    ("complement", "cross"),
    ("complement", "matlab-disk"),
    ("ring", "cross"),
    ("ring", "matlab-disk"),
    ("complement-all", "cross"),
    ("complement-all", "matlab-disk"),
    ("label", "cross"),
)
GCNR_SIZES = (4, 16, 64, 256, 1024)  # ROI pixels = (2r)^2 for square ROIs of r = 1, 2, 4, 8, 16
GCNR_SHIFTS = (0.0, 1.0, 2.0)  # ROI ~ N(d, 1) against background ~ N(0, 1)
GCNR_REPLICATES = 400
GCNR_LARGE_BG = 64 * 64


# ---------------------------------------------------------------------------------------------- helpers


def level_phantoms(n: int, radius: int, seed: int) -> list[Phantom]:
    """One phantom per CNR level, all from the same seed.

    make_phantom draws the CNR, then the centres, then the noise from one generator, so with the same seed
    every level shares its geometry and its noise and differs only inside the lesions. That lets
    `mixed_set` give each lesion its own level exactly; the assertions catch any change of that order.
    """
    out = [make_phantom(n, SHAPE, lesions=LESIONS, radius=radius, cnr=(lv, lv), noise=NOISE, seed=seed)
           for lv in LEVELS]
    for p in out[1:]:
        assert np.array_equal(p.labels, out[0].labels), "levels of one seed must share their geometry"
        assert np.array_equal(p.images[p.labels == 0], out[0].images[out[0].labels == 0]), "and their noise"
    return out


def concat(phantoms: list[Phantom]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, np.ndarray, np.ndarray]:
    """Stack phantoms into one set: images, labels, lesion ROI table, analytic CNR (n, k), contrast (n, k)."""
    tables, offset = [], 0
    for p in phantoms:
        t = p.rois.copy()
        t["image"] += offset
        tables.append(t)
        offset += p.images.shape[0]
    return (np.concatenate([p.images for p in phantoms]), np.concatenate([p.labels for p in phantoms]),
            pd.concat(tables, ignore_index=True), np.concatenate([p.cnr for p in phantoms]),
            np.concatenate([p.contrast for p in phantoms]))


def same_level_set(n: int, radius: int, seed: int):
    """All lesions of an image share one CNR level; each level has its own seed (independent noise)."""
    return concat([make_phantom(n, SHAPE, lesions=LESIONS, radius=radius, cnr=(lv, lv), noise=NOISE, seed=seed + j)
                   for j, lv in enumerate(LEVELS)])


def mixed_set(n: int, radius: int, seed: int):
    """Each lesion gets a level drawn independently, so faint lesions share images with bright ones."""
    levels = level_phantoms(len(LEVELS) * n, radius, seed)
    rng = np.random.default_rng((seed, 1))
    choice = rng.integers(0, len(LEVELS), (len(LEVELS) * n, LESIONS))
    labels = levels[0].labels
    # Per pixel, the level of the lesion it belongs to (background pixels are equal in every level).
    lesion_level = np.take_along_axis(choice, np.maximum(labels - 1, 0).reshape(labels.shape[0], -1), 1)
    lesion_level = lesion_level.reshape(labels.shape)
    stacked = np.stack([p.images for p in levels])
    images = np.take_along_axis(stacked, lesion_level[None], 0)[0]
    pick = np.arange(choice.shape[0])[:, None], np.arange(LESIONS)[None]
    cnr = np.stack([p.cnr for p in levels])[choice, *pick]
    contrast = np.stack([p.contrast for p in levels])[choice, *pick]
    return images, labels, levels[0].rois, cnr, contrast


def bootstrap(values: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[float, float, float]]:
    """Median and mean with 95 % percentile-bootstrap intervals."""
    idx = rng.integers(0, values.size, (BOOTSTRAP, values.size))
    resampled = values[idx]
    out = {}
    for name, stat in (("median", np.median), ("mean", np.mean)):
        boots = stat(resampled, axis=1)
        out[name] = (float(stat(values)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))
    return out


def pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def pct_ci(est: tuple[float, float, float]) -> str:
    return f"{pct(est[0])} [{100 * est[1]:+.1f}, {100 * est[2]:+.1f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def mode_kwargs(mode: str, footprint: str, labels: np.ndarray, sampled: bool) -> dict:
    """Keyword arguments of gpucnr.measure for one background mode."""
    kw: dict = {"background": mode, "footprint": footprint}
    if mode == "label":
        # Background pixels get their own label; lesions keep theirs, so they are never background.
        kw.update(labels=np.where(labels == 0, BG_LABEL, labels).astype(np.int32), background_label=BG_LABEL)
    elif mode == "complement-all" and sampled:
        # A sampled square is only part of its lesion: removing the whole lesions needs the label array.
        kw["labels"] = labels
    return kw


# ---------------------------------------------------------------------------------------------- part 1


def part1(rng: np.random.Generator) -> str:
    images, labels, lesion_rois, truth, _ = same_level_set(PER_LEVEL, RADIUS, SEED)
    sampled = gpucnr.sample_rois(labels, k=5, r=5, kind="square", seed=SEED)
    # All lesions of an image share a level, so the truth of any ROI sampled in image i is truth[i, 0].
    level_of_lesion = np.broadcast_to(np.repeat(np.arange(len(LEVELS)), PER_LEVEL)[:, None], truth.shape)
    level_of_image = level_of_lesion[:, 0]
    rows = []
    for source in ("lesion disk", "sampled squares (cnr_median)"):
        for mode, footprint in MODES:
            is_sampled = source.startswith("sampled")
            rois = sampled if is_sampled else lesion_rois
            ds = gpucnr.measure(images, rois, ddof=1, **mode_kwargs(mode, footprint, labels, is_sampled))
            if is_sampled:
                measured = ds.cnr_median.values
                ok = ds.n_valid.values > 0
                err, lvl = measured[ok] / truth[ok, 0] - 1, level_of_image[ok]
                # ROI ids beyond an image's draws are absent by construction, not failures.
                status = ds.status.values
                bad = int(((status != gpucnr.STATUS["ok"]) & (status != gpucnr.STATUS["absent"])).sum())
            else:
                # ROI ids 1..3 of the table are the lesions 1..3 of make_phantom, in that order.
                ok = ds.status.values == gpucnr.STATUS["ok"]
                err, lvl = ds.cnr.values[ok] / truth[ok] - 1, level_of_lesion[ok]
                bad = int((~ok).sum())
            est = bootstrap(err, rng)
            per_level = [pct(float(np.median(err[lvl == j]))) for j in range(len(LEVELS))]
            rows.append([source, mode, footprint if mode != "label" else "(n/a)", str(err.size),
                         pct_ci(est["median"]), pct_ci(est["mean"]), *per_level, str(bad)])
    header = ["ROI", "background", "footprint", "n", "median err [95 % CI]", "mean err [95 % CI]",
              *[f"median @CNR {lv:g}" for lv in LEVELS], "non-ok cells"]
    n_img, n_roi = images.shape[0], len(sampled)
    return (f"### Table 1: relative error measured/analytic − 1 by background mode\n\n"
            f"{n_img} uint16 images {SHAPE[0]}×{SHAPE[1]}, {LESIONS} disk lesions of radius {RADIUS} each "
            f"(all lesions of an image at one CNR level; {PER_LEVEL} images per level), background 1000, "
            f"σ {NOISE:g}; defaults dilation 5, border 5, ring gap 5 / width 10, ddof 1, pooled CNR. "
            f"Sampled squares: `sample_rois(labels, k=5, r=5, seed={SEED})` = {n_roi} squares of 10×10 px; "
            f"n counts lesions (disk rows) or images (sampled rows). 95 % CI: percentile bootstrap, "
            f"{BOOTSTRAP} resamples.\n\n" + table(header, rows))


# ---------------------------------------------------------------------------------------------- part 2


def lesion_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel count of every lesion, shape (n, LESIONS)."""
    flat = labels.reshape(labels.shape[0], -1)
    return np.stack([(flat == k + 1).sum(1) for k in range(LESIONS)], 1).astype(np.float64)


def mixture_prediction(area: np.ndarray, contrast: np.ndarray, n_bg: np.ndarray, sigma: float) -> np.ndarray:
    """Pooled CNR that the complement mode should return, from a two-component view of its background.

    The complement background of lesion k is flat background plus every other lesion j (all lie well inside
    it: make_phantom keeps 20 px between lesions and from the edge, more than dilation and border). With
    shares p_j = area_j / n_bg and contrasts D_j, its mean moves by m = sum p_j D_j and its variance becomes
    sigma^2 + sum p_j D_j^2 - m^2; the pooled CNR is then |D_k - m| / sqrt(2 sigma^2 + sum p_j D_j^2 - m^2).
    """
    pred = np.empty_like(contrast)
    for k in range(LESIONS):
        others = [j for j in range(LESIONS) if j != k]
        p = area[:, others] / n_bg[:, k, None]
        d = contrast[:, others]
        m = (p * d).sum(1)
        pred[:, k] = np.abs(contrast[:, k] - m) / np.sqrt(2 * sigma**2 + (p * d**2).sum(1) - m**2)
    return pred


def part2() -> str:
    rows = []
    sigma = math.sqrt(NOISE**2 + 1 / 12)  # make_phantom's effective σ of a rounded uint16 pixel
    for radius in GEOMETRY_RADII:
        for arrangement, build in (("same level", same_level_set), ("mixed levels", mixed_set)):
            images, labels, rois, truth, contrast = build(GEOMETRY_PER_LEVEL, radius, SEED + 100 + radius)
            ds = gpucnr.measure(images, rois)  # the article's defaults: complement, cross, dilation 5, border 5
            ok = ds.status.values == gpucnr.STATUS["ok"]
            err = ds.cnr.values / truth - 1
            area, n_bg = lesion_areas(labels), ds.n_bg.values.astype(np.float64)
            pred = mixture_prediction(area, contrast, n_bg, sigma) / truth - 1
            share = float(np.mean((area.sum(1, keepdims=True) - area) / n_bg))  # other lesions / background
            cells = []
            for lv in LEVELS:
                sel = ok & np.isclose(truth, lv)
                cells.append(f"{pct(float(np.median(err[sel])))} ({pct(float(np.median(pred[sel])))})")
            rows.append([str(radius), f"{100 * share:.1f} %", arrangement, str(int(ok.sum())),
                         pct(float(np.median(err[ok]))), *cells])
    header = ["lesion radius", "other lesions' share of bg (mean)", "CNR per lesion", "n", "median err",
              *[f"@CNR {lv:g} measured (predicted)" for lv in LEVELS]]
    return ("### Table 2: what drives the bias of `complement` (the article's default; cross footprint)\n\n"
            f"Same phantoms as Table 1 but {GEOMETRY_PER_LEVEL * len(LEVELS)} images per row and lesion radius "
            "varied. *same level*: all lesions of an image have one CNR; *mixed levels*: each lesion's level "
            "is drawn independently from the five, so faint lesions share images with bright ones. "
            "Predicted = the mixture model of `mixture_prediction` (background = flat background + the other "
            "lesions in proportion to their area), no fitted parameter.\n\n" + table(header, rows))


# ---------------------------------------------------------------------------------------------- part 3


def gcnr_stack(rng: np.random.Generator):
    """Images of N(0, 1) noise with one square ROI shifted by d, and two labelled background regions.

    Layout of every 80×120 image (a 5-px frame stays unused, as the border rule removes it anyway):
    label 8 = a 64×64 block (rows 5-68, cols 5-68), the large background; the ROI = the square
    [cx - r, cx + r) × [cy - r, cy + r) anchored at row 5, col 74; label 9 = a square of the ROI's size at
    row 42, col 74, the equal-size background. The ROI is a table row, so labels 8 and 9 are never ROIs.
    """
    setups = [(s, d) for s in GCNR_SIZES for d in GCNR_SHIFTS]
    n = len(setups) * GCNR_REPLICATES
    images = rng.standard_normal((n, 80, 120), dtype=np.float32)
    labels = np.zeros(images.shape, np.int32)
    labels[:, 5:69, 5:69] = 8
    size = np.repeat([s for s, _ in setups], GCNR_REPLICATES)
    shift = np.repeat([d for _, d in setups], GCNR_REPLICATES)
    r = (np.sqrt(size) // 2).astype(np.int64)
    for s in GCNR_SIZES:
        sel = size == s
        side = math.isqrt(s)
        images[sel, 5 : 5 + side, 74 : 74 + side] += shift[sel, None, None].astype(np.float32)
        labels[np.ix_(sel, range(42, 42 + side), range(74, 74 + side))] = 9
    rois = pd.DataFrame({"image": np.arange(n), "roi": 1, "kind": "square", "cx": 74 + r, "cy": 5 + r, "r": r})
    return images, labels, rois, size, shift


def part3(rng: np.random.Generator) -> str:
    images, labels, rois, size, shift = gcnr_stack(rng)
    true_gcnr = {d: 2 * float(ndtr(d / 2)) - 1 for d in GCNR_SHIFTS}  # 1 - overlap of N(0,1) and N(d,1)
    true_pooled = {d: d / math.sqrt(2) for d in GCNR_SHIFTS}
    results = {}
    for bg_name, bg_label in (("equal size (label 9)", 9), (f"{GCNR_LARGE_BG} px (label 8)", 8)):
        for definition in ("gcnr", "pooled"):
            # min_bg=0: the equal-size backgrounds of 4 and 16 px are below the default minimum of 30.
            ds = gpucnr.measure(images, rois, background="label", labels=labels, background_label=bg_label,
                                definition=definition, min_bg=0)
            assert (ds.status.values == gpucnr.STATUS["ok"]).all()
            assert np.array_equal(ds.n_roi.values[:, 0], size)
            results[bg_name, definition] = ds.cnr.values[:, 0]
    out = []
    for definition, truth, title in (("gcnr", true_gcnr, "gCNR (`definition=\"gcnr\"`, `gcnr_bins=\"auto\"`)"),
                                     ("pooled", true_pooled, "pooled CNR (`definition=\"pooled\"`)")):
        rows = []
        for s in GCNR_SIZES:
            bins = math.ceil(2 * s**0.4)
            for bg_name in (k for k, dfn in results if dfn == definition):
                values = results[bg_name, definition]
                cells = []
                for d in GCNR_SHIFTS:
                    v = values[(size == s) & (shift == d)]
                    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
                    cells.append(f"{v.mean():.3f} ± {half:.3f} ({v.mean() - truth[d]:+.3f})")
                rows.append([str(s), str(bins), bg_name, *cells])
        header = ["ROI px", "auto bins", "background", *[f"d={d:g}: truth {truth[d]:.3f}" for d in GCNR_SHIFTS]]
        if definition == "pooled":  # bins mean nothing to a moment definition
            header.pop(1)
            rows = [[r[0], *r[2:]] for r in rows]
        out.append(f"#### {title}\n\n" + table(header, rows))
    return ("### Table 3: gCNR and pooled CNR of small regions with known distributions\n\n"
            f"Float32 images; ROI pixels ~ N(d, 1), background pixels ~ N(0, 1), independent. Square ROI of "
            f"4-1024 px; background by `background=\"label\"`, either a region of the ROI's own size or a "
            f"{GCNR_LARGE_BG}-px block. {GCNR_REPLICATES} independent images per cell. Cells: mean measured "
            "± 95 % CI half-width (normal, 1.96 SE), then (mean − truth). True gCNR = 2Φ(d/2) − 1; true pooled "
            "CNR = d/√2.\n\n" + "\n\n".join(out))


def main() -> None:
    t0 = time.perf_counter()
    rng = np.random.default_rng(SEED)
    print(f"gpucnr {gpucnr.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
          f"seed {SEED}\n")
    times = []
    for part in (lambda: part1(rng), part2, lambda: part3(rng)):
        t = time.perf_counter()
        print(part(), end="\n\n")
        times.append(time.perf_counter() - t)
    print(f"(ran in {time.perf_counter() - t0:.0f} s: parts {', '.join(f'{t:.0f} s' for t in times)})")


if __name__ == "__main__":
    main()
