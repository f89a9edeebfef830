"""Colour to gray: the luminance weights a user names, in float64, never rounded."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["COLOR_MODES", "to_gray"]

#: weights of R, G, B. rec709 is scikit-image's rgb2gray, i.e. the article's io.imread(..., as_gray=True)
#: (up to the 1/255 scale rgb2gray applies to uint8, which no CNR definition sees).
WEIGHTS = {"rec709": (0.2125, 0.7154, 0.0721), "bt601": (0.299, 0.587, 0.114)}
COLOR_MODES = (*WEIGHTS, "skip")


def to_gray(rgb: np.ndarray, mode: str) -> np.ndarray:
    """(..., 3) colour samples -> float64 luminance wr·R + wg·G + wb·B (alpha, if any, already dropped)."""
    import numpy as np  # NB: here, not at the top: the CLI reads COLOR_MODES without importing NumPy

    wr, wg, wb = WEIGHTS[mode]
    # NB: one channel at a time in float64: never a float64 copy of all three channels of a large image.
    f64 = np.float64
    return wr * rgb[..., 0].astype(f64) + wg * rgb[..., 1].astype(f64) + wb * rgb[..., 2].astype(f64)
