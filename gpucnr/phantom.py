"""Synthetic image stacks with analytic CNR: disk lesions of known mean on a flat background, Gaussian noise; and
bodies in air made of two tissues (`make_body_phantom`), for the automatic regions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["BodyPhantom", "Phantom", "make_body_phantom", "make_phantom"]


@dataclass
class Phantom:
    """A phantom stack and its ground truth.

    Attributes
    ----------
    images : ndarray, shape (n, H, W)
        uint16 (rounded) or float32 pixel values.
    labels : int32 ndarray, shape (n, H, W)
        Lesion k of every image has label k (1-based); 0 is background.
    rois : pandas.DataFrame
        One disk ROI per lesion, at its centre with its radius (columns image, roi, kind, cx, cy, r, name).
    contrast : float64 ndarray, shape (n, k)
        Lesion mean minus background mean, in pixel units.
    noise : float
        Standard deviation of the Gaussian noise added to every pixel.
    noise_effective : float
        The pixel standard deviation including rounding (sqrt(noise**2 + 1/12) for integer images).
    cnr : float64 ndarray, shape (n, k)
        Analytic pooled CNR of each lesion against the flat background: contrast / (noise_effective sqrt(2)).
    """

    images: np.ndarray
    labels: np.ndarray
    rois: pd.DataFrame
    contrast: np.ndarray
    background: float
    noise: float
    noise_effective: float
    cnr: np.ndarray


def make_phantom(
    n: int = 16,
    shape: tuple[int, int] = (128, 128),
    *,
    lesions: int = 1,
    radius: int = 8,
    cnr: tuple[float, float] = (0.5, 4.0),
    background: float = 1000.0,
    noise: float = 20.0,
    dtype: str = "uint16",
    margin: int = 20,
    seed: int = 0,
) -> Phantom:
    """Make `n` images with `lesions` disk lesions each, whose pooled CNR is drawn uniformly from `cnr`.

    Parameters
    ----------
    n : int
        Number of images.
    shape : (int, int)
        Image height and width.
    lesions : int
        Lesions per image; they never overlap and keep `margin` px from each other and the edge, so
        dilations, rings and the border frame of the defaults stay clear of other lesions.
    radius : int
        Lesion radius (Euclidean disk).
    cnr : (float, float)
        Range of the analytic pooled CNR per lesion.
    background, noise : float
        Background mean and noise standard deviation (pixel units).
    dtype : {"uint16", "float32"}
        Integer images are rounded, which adds 1/12 to the pixel variance (accounted in ``cnr``).
    margin : int
        Minimum gap (px) between a lesion and the image edge or another lesion.
    seed : int
        Seed of numpy's default_rng; same seed, same phantom.

    Returns
    -------
    Phantom
    """
    if dtype not in ("uint16", "float32"):
        raise ValueError(f"dtype must be 'uint16' or 'float32', got {dtype!r}")
    rng = np.random.default_rng(seed)
    height, width = shape
    eff = math.sqrt(noise**2 + 1 / 12) if dtype == "uint16" else float(noise)
    target = rng.uniform(cnr[0], cnr[1], (n, lesions))
    contrast = target * eff * math.sqrt(2)
    if dtype == "uint16" and (background - 6 * noise < 0 or background + contrast.max() + 6 * noise > 65535):
        raise ValueError("background, contrast and noise must keep uint16 values within [0, 65535]")
    centres = _place(rng, n, lesions, radius, margin, height, width)
    yy, xx = np.mgrid[:height, :width]
    labels = np.zeros((n, height, width), np.int32)
    clean = np.full((n, height, width), background, np.float64)
    for k in range(lesions):
        cy, cx = centres[:, k, 0], centres[:, k, 1]
        disk = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2 <= radius**2
        labels[disk] = k + 1
        clean += disk * contrast[:, k, None, None]
    noisy = clean + rng.normal(0.0, noise, clean.shape)
    images = np.rint(noisy).astype(np.uint16) if dtype == "uint16" else noisy.astype(np.float32)
    rois = pd.DataFrame(
        {
            "image": np.repeat(np.arange(n), lesions),
            "roi": np.tile(np.arange(1, lesions + 1), n),
            "kind": "disk",
            "cx": centres[:, :, 1].ravel(),
            "cy": centres[:, :, 0].ravel(),
            "r": radius,
            "name": "lesion",
        }
    )
    return Phantom(images=images, labels=labels, rois=rois, contrast=contrast, background=background,
                   noise=noise, noise_effective=eff, cnr=contrast / (eff * math.sqrt(2)))


def _place(rng, n, lesions, radius, margin, height, width) -> np.ndarray:
    """Centres (n, lesions, 2) as (y, x), by rejection sampling: disjoint, `margin` from edges and each other."""
    lo = radius + margin
    if height - lo <= lo or width - lo <= lo:
        raise ValueError(f"a {height}x{width} image has no room for a lesion of radius {radius} with margin {margin}")
    out = np.zeros((n, lesions, 2), np.int64)
    spacing = 2 * radius + margin
    for i in range(n):
        placed: list[tuple[int, int]] = []
        # NB: greedy placement can paint itself into a corner; start the image afresh a few times.
        for _ in range(100 * lesions):
            placed = []
            for _ in range(200):
                if len(placed) == lesions:
                    break
                y, x = int(rng.integers(lo, height - lo)), int(rng.integers(lo, width - lo))
                if all((y - py) ** 2 + (x - px) ** 2 >= spacing**2 for py, px in placed):
                    placed.append((y, x))
            if len(placed) == lesions:
                break
        if len(placed) < lesions:
            raise ValueError(f"could not place {lesions} lesions of radius {radius} in a {height}x{width} image")
        out[i] = placed
    return out


#: Region values of `BodyPhantom.regions`: the values `gpucnr.auto_regions` gives the same regions.
AIR, LOWER, UPPER = 1, 3, 4


@dataclass
class BodyPhantom:
    """Bodies of two tissues in air, with their ground truth (`make_body_phantom`).

    Attributes
    ----------
    images : ndarray, shape (n, H, W)
        float32 or uint16 (rounded) pixel values.
    regions : int8 ndarray, shape (n, H, W)
        The true regions, valued as `gpucnr.auto_regions` values them: 1 air, 3 lower tissue, 4 upper tissue
        (the body is 3 and 4; images made with ``air=False`` have no 1).
    air, lower : float
        Mean of the air and of the lower tissue (pixel units).
    contrast : float64 ndarray, shape (n,)
        Upper minus lower tissue mean.
    noise : float64 ndarray, shape (n,)
        Standard deviation of the Gaussian noise of every pixel of each image.
    noise_effective : float64 ndarray, shape (n,)
        Including rounding: sqrt(noise**2 + 1/12) for integer images.
    tissue_cnr : float64 ndarray, shape (n,)
        Analytic pooled CNR of the upper tissue against the lower: contrast / (noise_effective sqrt(2)).
    mriqc_cnr : float64 ndarray, shape (n,)
        Analytic MRIQC CNR (air, lower and upper of equal noise): contrast / (noise_effective sqrt(3)); without
        air, the pooled value.
    """

    images: np.ndarray
    regions: np.ndarray
    air: float
    lower: float
    contrast: np.ndarray
    noise: np.ndarray
    noise_effective: np.ndarray
    tissue_cnr: np.ndarray
    mriqc_cnr: np.ndarray

    def foreground_cnr(self, region_mask=None) -> np.ndarray:
        """Analytic pooled CNR of the body against the air of each image, over `region_mask` (default: the true
        regions): the body is a mixture of the two tissues, so its variance is the noise's plus the mixture's."""
        regions = self.regions if region_mask is None else np.where(region_mask, self.regions, 0)
        out = np.full(len(self.images), np.nan)
        for i in range(len(self.images)):
            n_l = int((regions[i] == LOWER).sum())
            n_u = int((regions[i] == UPPER).sum())
            if not (regions[i] == AIR).any() or n_l + n_u == 0:
                continue
            p = n_u / (n_l + n_u)
            mean_body = self.lower + p * self.contrast[i]
            var_body = self.noise_effective[i] ** 2 + p * (1 - p) * self.contrast[i] ** 2
            out[i] = abs(mean_body - self.air) / math.sqrt(var_body + self.noise_effective[i] ** 2)
        return out


def make_body_phantom(
    n: int = 16,
    shape: tuple[int, int] = (128, 128),
    *,
    tissue_cnr=(3.0, 10.0),
    noise=20.0,
    air: float = 100.0,
    lower: float = 1000.0,
    body_contrast: float | None = None,
    with_air: bool = True,
    same_anatomy: bool = False,
    dtype: str = "float32",
    seed: int = 0,
) -> BodyPhantom:
    """Make `n` images of an elliptic body in air, of a lower tissue with an elliptic upper tissue inside it.

    Parameters
    ----------
    n : int
    shape : (int, int)
        Image height and width (at least 32 each).
    tissue_cnr : float or (float, float)
        The analytic pooled CNR of the upper tissue against the lower: one value for every image, or a range
        drawn uniformly per image.
    noise : float or array of shape (n,)
        Gaussian noise standard deviation of every pixel (air and tissues alike); an array gives each image its
        own (with `body_contrast`, a noise ladder).
    air, lower : float
        Mean of the air and of the lower tissue.
    body_contrast : float, optional
        Upper minus lower tissue mean, the same for every image: then ``tissue_cnr`` is ignored and the CNR
        follows from `noise` (a noise ladder with a fixed anatomy). Default: from `tissue_cnr`.
    with_air : bool
        False: the image is a patch cut across the boundary of the two tissues (a straight boundary through the
        patch, each tissue along part of the frame), with no air.
    same_anatomy : bool
        One geometry for every image (a noise ladder of one anatomy), else one per image.
    dtype : {"float32", "uint16"}
    seed : int
        Seed of numpy's default_rng (geometry and noise).

    Returns
    -------
    BodyPhantom
    """
    if dtype not in ("uint16", "float32"):
        raise ValueError(f"dtype must be 'uint16' or 'float32', got {dtype!r}")
    height, width = shape
    if height < 32 or width < 32:
        raise ValueError(f"a body phantom needs at least 32 x 32 pixels, got {height} x {width}")
    rng = np.random.default_rng(seed)
    noise = np.broadcast_to(np.asarray(noise, np.float64), (n,)).copy()
    eff = np.sqrt(noise**2 + 1 / 12) if dtype == "uint16" else noise.copy()
    if body_contrast is not None:
        contrast = np.full(n, float(body_contrast))
    else:
        lo, hi = (tissue_cnr, tissue_cnr) if np.isscalar(tissue_cnr) else tissue_cnr
        contrast = rng.uniform(lo, hi, n) * eff * math.sqrt(2)
    yy, xx = np.mgrid[:height, :width]
    regions = np.zeros((n, height, width), np.int8)
    clean = np.empty((n, height, width), np.float64)
    for i in range(n):
        if i == 0 or not same_anatomy:
            geometry = _body_geometry(rng, yy, xx, with_air)
        body, inner = geometry
        regions[i] = np.where(inner, UPPER, np.where(body, LOWER, AIR))
        clean[i] = np.where(inner, lower + contrast[i], np.where(body, lower, air))
    noisy = clean + rng.normal(0.0, 1.0, clean.shape) * noise[:, None, None]
    if dtype == "uint16":
        if noisy.min() < 0 or noisy.max() > 65535:
            raise ValueError("air, tissue levels and noise must keep uint16 values within [0, 65535]")
        images = np.rint(noisy).astype(np.uint16)
    else:
        images = noisy.astype(np.float32)
    tissue = contrast / (eff * math.sqrt(2))
    mriqc = contrast / (eff * math.sqrt(3)) if with_air else tissue.copy()
    return BodyPhantom(images=images, regions=regions, air=float(air), lower=float(lower), contrast=contrast,
                       noise=noise, noise_effective=eff, tissue_cnr=tissue, mriqc_cnr=mriqc)


def _body_geometry(rng, yy, xx, with_air: bool):
    """(body, upper tissue) masks: an ellipse in air with an ellipse inside it, or a patch split by a line."""
    height, width = yy.shape
    if not with_air:
        # NB: a straight boundary through the patch, the upper tissue on 30-60 % of it
        angle = rng.uniform(0, 2 * math.pi)
        d = (yy - height / 2) * math.sin(angle) + (xx - width / 2) * math.cos(angle)
        cut = np.quantile(d, rng.uniform(0.4, 0.7))
        return np.ones((height, width), bool), d > cut
    cy = height / 2 + rng.uniform(-0.04, 0.04) * height
    cx = width / 2 + rng.uniform(-0.04, 0.04) * width
    ay, ax = rng.uniform(0.32, 0.40) * height, rng.uniform(0.30, 0.40) * width
    body = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1
    # NB: the upper tissue inside the body, off centre, clear of the body's edge
    iy = cy + rng.uniform(-0.1, 0.1) * ay
    ix = cx + rng.uniform(-0.15, 0.15) * ax
    by, bx = rng.uniform(0.35, 0.5) * ay, rng.uniform(0.35, 0.5) * ax
    return body, body & (((yy - iy) / by) ** 2 + ((xx - ix) / bx) ** 2 <= 1)
