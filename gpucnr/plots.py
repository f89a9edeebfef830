"""Plots of a CNR audit, as PNG bytes (matplotlib): distribution, groups, the article's figure.

Every function returns the bytes of one PNG, ready to embed (`gpucnr.report`) or to write to a file. Figures are
`matplotlib.figure.Figure` objects rendered straight to PNG, never pyplot's: nothing here needs a display, and
importing this module leaves the user's matplotlib backend and pyplot state alone.
"""

from __future__ import annotations

import functools
import io

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

__all__ = ["DISPLAY_PERCENTILES", "distribution_figure", "group_boxplot", "image_values", "scale_caption",
           "three_panel"]

#: The article's display normalisation: stretch the 1st..99th percentile of the image to the colour map.
DISPLAY_PERCENTILES = (1.0, 99.0)
_MISSING = "(missing)"
_MISSING_TEXT = frozenset({"", "nan", "NaN", "None", "<NA>", "NaT"})
_DPI = 100


def scale_caption(slope: float, intercept: float) -> str:
    """How stored values become modality units, as a caption says it: "stored values x 2 \u2212 100", never
    "x 2 + -100"."""
    sign = "\u2212" if intercept < 0 else "+"
    return f"stored values x {slope:g} {sign} {abs(intercept):g} (modality units)"


def _literal(func):
    """Run a plotting function with every text drawn literally: a group value or a title holding ``$`` (or
    TeX-like markup) is data, never matplotlib mathtext (which would fail on it, or render it as something else)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return func(*args, **kwargs)

    return wrapper


def _png(fig: Figure) -> bytes:
    # NB: a bare Figure renders to PNG through Agg on its own; no pyplot figure manager holds it afterwards.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _subplots(*grid, figsize, layout=None, **kw):
    """pyplot.subplots without pyplot: a bare Figure (its own layout engine) and its axes."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kw)


def image_values(results: xr.Dataset) -> np.ndarray:
    """Per-image CNR of `results`: ``cnr_median`` where the image has a valid ROI (``n_valid > 0``), else NaN."""
    n_valid = np.asarray(results["n_valid"].values).astype(np.int64)
    return np.where(n_valid > 0, np.asarray(results["cnr_median"].values, np.float64), np.nan)


@_literal
def distribution_figure(summary: xr.Dataset, thresholds=None, *, level: str = "image", group: str = "all") -> bytes:
    """Histogram and ECDF of the CNR of one level and group of a `gpucnr.summarize` Dataset.

    Parameters
    ----------
    summary : xarray.Dataset
        Output of `gpucnr.summarize` (uses ``histogram``, ``ecdf``, ``bin_low``, ``bin_high``, ``edge``).
    thresholds : sequence of float, optional
        Drawn as vertical dashed lines on both panels (default: the summary's thresholds).
    level : {"image", "roi"}
    group : str
        A label of the summary's ``group`` coordinate.

    Returns
    -------
    bytes
        A PNG.
    """
    if thresholds is None:
        thresholds = summary.attrs.get("thresholds", [])
    thresholds = [float(t) for t in np.atleast_1d(np.asarray(thresholds, np.float64))]
    sub = summary.sel(level=level, group=group)
    counts = np.asarray(sub["histogram"].values, np.float64)
    low = np.asarray(summary["bin_low"].values, np.float64)
    high = np.asarray(summary["bin_high"].values, np.float64)
    edges = np.asarray(summary["edge"].values, np.float64)
    ecdf = np.asarray(sub["ecdf"].values, np.float64)
    n = int(sub["count"].values)
    what = "image-level CNR (cnr_median per image)" if level == "image" else "ROI-level CNR (every valid ROI)"

    fig, (ax_h, ax_e) = _subplots(1, 2, figsize=(10, 3.8))
    ax_h.bar(low, counts, width=high - low, align="edge", color="0.55", edgecolor="0.3", linewidth=0.4)
    ax_h.set_xlabel("CNR")
    ax_h.set_ylabel("images" if level == "image" else "ROIs")
    ax_h.set_title(f"Histogram, n = {n}")
    if n:
        ax_e.step(edges, ecdf, where="post", color="black")
    else:
        ax_e.text(0.5, 0.5, "no finite value", ha="center", va="center", transform=ax_e.transAxes)
    ax_e.set_ylim(0, 1.02)
    ax_e.set_xlabel("CNR")
    ax_e.set_ylabel("fraction <= CNR")
    ax_e.set_title("ECDF")
    colours = matplotlib.colormaps["tab10"]
    for k, t in enumerate(thresholds):
        for ax in (ax_h, ax_e):
            ax.axvline(t, color=colours(k % 10), linestyle="--", linewidth=1.2, label=f"CNR = {t:g}")
    if thresholds:
        ax_e.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"{what}, group {group}")
    return _png(fig)


def _group_keys(values: np.ndarray) -> np.ndarray:
    out = np.empty(values.size, dtype=object)
    for i, v in enumerate(values.astype(object)):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in _MISSING_TEXT:
            out[i] = _MISSING
        else:
            out[i] = str(v.item() if isinstance(v, np.generic) else v)
    return out


@_literal
def group_boxplot(results: xr.Dataset, by: str | None = None, *, thresholds=(), groups=None) -> bytes:
    """Box plots of the per-image CNR (``cnr_median`` of images with a valid ROI) by the groups of a column.

    Parameters
    ----------
    results : xarray.Dataset
        Results of `gpucnr.run` / `gpucnr.measure` (``cnr_median``, ``n_valid``).
    by : str, optional
        A per-image column (e.g. modality, site); its missing values form the group "(missing)". Without it,
        one box of the whole dataset.
    thresholds : sequence of float
        Drawn as horizontal dashed lines.
    groups : sequence of str, optional
        The group values to draw, in this order (a report draws the largest groups and the outliers; the rest
        goes to its tables); default every group. A group without a finite value gets no slot.

    Returns
    -------
    bytes
        A PNG, at most about 1,100 px wide.
    """
    values = image_values(results)
    if by is None:
        keys = np.full(values.size, "all", dtype=object)
    else:
        if by not in results.variables or results[by].dims != ("image",):
            raise ValueError(f"by={by!r} is not a per-image column of the results")
        keys = _group_keys(np.asarray(results[by].values))
    if groups is None:
        names = sorted({k for k in keys if k != _MISSING}, key=str) + ([_MISSING] if _MISSING in set(keys) else [])
    else:
        names = [str(g) for g in groups]
    data = [values[(keys == name) & np.isfinite(values)] for name in names]
    # NB: no slot for an empty group: it is in the report's tables, with its count
    names, data = [n for n, d in zip(names, data, strict=True) if d.size], [d for d in data if d.size]
    # NB: capped width: a figure wider than a screen is scaled down by the browser until nothing can be read
    fig, ax = _subplots(figsize=(min(11.0, max(4.5, 0.75 * len(names) + 2)), 4))
    positions = np.arange(1, len(names) + 1)
    if names:
        ax.boxplot(data, positions=positions, widths=0.6, showfliers=True)
    else:
        ax.text(0.5, 0.5, "no finite value", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{_short(name)}\n(n={d.size})" for name, d in zip(names, data, strict=True)],
                       rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                       fontsize="small")
    ax.set_xlim(0.4, len(names) + 0.6)
    for t in thresholds:
        ax.axhline(float(t), color="tab:red", linestyle="--", linewidth=0.9)
    ax.set_ylabel("image CNR (cnr_median)")
    ax.set_title(f"Image CNR by {by}" if by else "Image CNR")
    return _png(fig)


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _display(image: np.ndarray) -> np.ndarray:
    """The article's display normalisation (1-99 % percentiles, clipped to [0, 1]); display only."""
    values = np.asarray(image, np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape)
    lo, hi = np.percentile(finite, DISPLAY_PERCENTILES)
    if hi <= lo:
        return np.where(np.isfinite(values), 0.5, 0.0)
    return np.clip(np.nan_to_num((values - lo) / (hi - lo), nan=0.0), 0.0, 1.0)


@_literal
def three_panel(image, roi_mask, bg_mask, title: str = "", *, exclude=None, slope: float = 1.0,
                intercept: float = 0.0, unit: str | None = None) -> bytes:
    """The article's figure: the image with ROI (red) and background (blue), their histograms and box plots.

    Parameters
    ----------
    image : 2-D array
        Stored pixel values (the valid region of one image).
    roi_mask, bg_mask : 2-D bool arrays of the image's shape
    title : str
    exclude : 2-D bool array, optional
        Pixels excluded from the measurement (padding, non-finite); left out of the histograms and box plots.
    slope, intercept : float
        The image's modality rescale: the histograms and box plots show ``stored * slope + intercept``, the
        units of the results' means (HU for CT), as the run applies it to the moments.
    unit : str, optional
        The axis label of those values (default: "stored pixel value" when the rescale is the identity, else
        "value (stored x slope + intercept)").

    Returns
    -------
    bytes
        A PNG. The image panel is normalised to its 1-99 % percentiles for display; the histograms and box
        plots show the values in the results' units (the figure says so).
    """
    image = np.asarray(image)
    roi_mask = np.asarray(roi_mask, bool)
    bg_mask = np.asarray(bg_mask, bool)
    if image.ndim != 2 or roi_mask.shape != image.shape or bg_mask.shape != image.shape:
        raise ValueError(f"image and masks must be 2-D of one shape, got {image.shape}, {roi_mask.shape}, "
                         f"{bg_mask.shape}")
    values = image.astype(np.float64)
    keep = np.isfinite(values)
    if exclude is not None:
        keep &= ~np.asarray(exclude, bool)
    slope, intercept = float(slope), float(intercept)
    identity = slope == 1.0 and intercept == 0.0
    if unit is None:
        unit = "stored pixel value" if identity else "value (stored x slope + intercept)"

    def rescale(v):
        return v * slope + intercept

    roi_values = values[roi_mask & keep]
    bg_values = values[bg_mask & keep]

    fig, (ax_i, ax_h, ax_b) = _subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.1, 1.2, 0.8]},
                                          layout="constrained")
    ax_i.imshow(_display(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    overlay = np.zeros((*image.shape, 4))
    overlay[bg_mask] = (0.1, 0.3, 1.0, 0.25)
    overlay[roi_mask] = (1.0, 0.1, 0.1, 0.45)
    ax_i.imshow(overlay, interpolation="nearest")
    ax_i.set_title("ROI (red), background (blue)", fontsize="small")
    ax_i.set_xticks([])
    ax_i.set_yticks([])

    both = np.concatenate([roi_values, bg_values])
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        if image.dtype.kind in "iub":
            # NB: integer values: bins a whole number of values wide, else equal bins alias (empty, double).
            step = max(1, int(np.ceil((hi - lo + 1) / 60)))
            bins = np.arange(lo - 0.5, hi + step + 0.5, step)
        else:
            bins = np.histogram_bin_edges(both, bins=50, range=(lo, hi if hi > lo else lo + 1))
        # NB: binned on the stored values (whole numbers of them), shown in the results' units
        bins = np.sort(rescale(np.asarray(bins, np.float64)))
        if bg_values.size:
            ax_h.hist(rescale(bg_values), bins=bins, density=True, color="tab:blue", alpha=0.55,
                      label=f"background (n={bg_values.size})")
        if roi_values.size:
            ax_h.hist(rescale(roi_values), bins=bins, density=True, color="tab:red", alpha=0.55,
                      label=f"ROI (n={roi_values.size})")
        ax_h.legend(fontsize="small")
    else:
        ax_h.text(0.5, 0.5, "no pixel", ha="center", va="center", transform=ax_h.transAxes)
    ax_h.set_xlabel(unit)
    ax_h.set_ylabel("density")
    ax_h.set_title("Intensity histograms", fontsize="small")

    groups = [(name, rescale(v)) for name, v in (("ROI", roi_values), ("background", bg_values)) if v.size]
    if groups:
        box = ax_b.boxplot([v for _, v in groups], widths=0.6, showfliers=False, patch_artist=True)
        for patch, (name, _) in zip(box["boxes"], groups, strict=True):
            patch.set_facecolor("tab:red" if name == "ROI" else "tab:blue")
            patch.set_alpha(0.5)
        ax_b.set_xticks(range(1, len(groups) + 1))
        ax_b.set_xticklabels([name for name, _ in groups])
    ax_b.set_ylabel(unit)
    ax_b.set_title("Box plots", fontsize="small")

    fig.suptitle(title)
    where = "the stored pixel values" if identity else scale_caption(slope, intercept)
    fig.supxlabel(f"Histograms and box plots: {where}, as the run measured them; the image is shown with the 1-99 % "
                  "percentile normalisation for display only.", fontsize="small", style="italic")
    return _png(fig)
