"""The article's own Python functions (../shared/seed/cnr-article.txt, sections 2.2-4.1), verbatim but for
the one bug fixed: np.where returns (rows, cols), which calculate_cnr indexed as (x, y).

Shared by the oracle tests (tests/test_oracle.py) and the benchmark baseline (scripts/bench.py).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation


def select_roi(image, center_x, center_y, radius=10):
    """The article's select_roi, verbatim."""
    x_min = max(0, center_x - radius)
    x_max = min(image.shape[1], center_x + radius)
    y_min = max(0, center_y - radius)
    y_max = min(image.shape[0], center_y + radius)
    xx, yy = np.meshgrid(np.arange(x_min, x_max), np.arange(y_min, y_max))
    return xx.flatten(), yy.flatten()


def create_mask(shape, roi_coords):
    """Not given in the article (multi_roi_cnr calls it): the boolean mask of (xs, ys) coordinates."""
    mask = np.zeros(shape, bool)
    mask[roi_coords[1], roi_coords[0]] = True
    return mask


def get_background(image, roi_mask, border_width=5):
    """The article's get_background, verbatim: returns np.where's (rows, cols)."""
    expanded_roi = binary_dilation(roi_mask, iterations=border_width)
    background_mask = ~expanded_roi
    background_mask[:5] = background_mask[-5:] = False
    background_mask[:, :5] = background_mask[:, -5:] = False
    return np.where(background_mask)


def calculate_cnr(image, roi_coords, bg_coords):
    """The article's calculate_cnr, its bug fixed: bg_coords are np.where's (rows, cols), not (x, y)."""
    roi_values = image[roi_coords[1], roi_coords[0]].astype(float)
    bg_values = image[bg_coords[0], bg_coords[1]].astype(float)  # article: image[bg_coords[1], bg_coords[0]]
    mu_roi = np.mean(roi_values)
    mu_bg = np.mean(bg_values)
    var_roi = np.var(roi_values, ddof=1)
    var_bg = np.var(bg_values, ddof=1)
    return abs(mu_roi - mu_bg) / np.sqrt(var_roi + var_bg)


def multi_roi_cnr(image, centers, radius=5):
    """The article's multi_roi_cnr."""
    cnrs = []
    for cx, cy in centers:
        roi_coords = select_roi(image, cx, cy, radius)
        bg_coords = get_background(image, create_mask(image.shape, roi_coords))
        cnrs.append(calculate_cnr(image, roi_coords, bg_coords))
    return np.median(cnrs)
