"""Synthetic image stacks with analytic CNR: disk lesions of known mean on a flat background, Gaussian noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Phantom", "make_phantom"]


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
