"""The measured tables of docs/choosing.md: how each background mode and the automatic regions follow noise on real
images, and Otsu's bias when tissue classes overlap (phantoms).

    python scripts/choosing.py            # prints the tables as Markdown (about a minute on one core)

Real images: pydicom's and nibabel's bundled test files (no download). Each image gets a noise ladder: Gaussian noise
of standard deviation sigma = f x (p99 - p1) of its stored values, f in LADDER, added to the float64 image (fixed
seed). Per image and method, the Spearman rank correlation of the CNR against sigma over the ladder: -1 means the CNR
falls at every step, as a quality signal must. Background modes are measured on fixed square ROIs (one at the image
centre, the CNR reported; one a quarter width to its right, which complement-all removes too); ``auto`` is
`gpucnr.measure(images, "auto")`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import array_api_compat
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpucnr
from gpucnr.kernels.regions import histograms, otsu_thresholds
from gpucnr.phantom import make_body_phantom

XP = array_api_compat.array_namespace(np.empty(0))

LADDER = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)
TRUE_CNR = (10.0, 5.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.7, 0.5)


def real_images() -> list[tuple[str, np.ndarray]]:
    """(name, 2-D stored values) of the bundled test images used here."""
    import nibabel
    import pydicom

    root = Path(pydicom.__file__).parent / "data" / "test_files"
    out = []
    # NB: image_dfl.dcm, a synthetic test pattern, is left out: not anatomy
    for name in ("CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "examples_overlay.dcm", "JPEG2000.dcm"):
        ds = pydicom.dcmread(root / name)
        what = f"{name} ({ds.get('Modality', '?')} {ds.Rows}x{ds.Columns})"
        out.append((what, np.asarray(ds.pixel_array, np.float64)))
    nib_root = Path(nibabel.__file__).parent / "tests" / "data"
    vol = np.asarray(nibabel.load(nib_root / "anatomical.nii").dataobj, np.float64)
    k = vol.shape[2] // 2
    out.append((f"anatomical.nii (MR slice {k}, {vol.shape[0]}x{vol.shape[1]})", vol[:, :, k]))
    return out


def ladder(image: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.percentile(image, [1, 99])
    sigma = np.asarray(LADDER) * (hi - lo)
    rng = np.random.default_rng(seed)
    return np.stack([image + rng.normal(0.0, s, image.shape) if s else image for s in sigma]), sigma


def fixed_rois(shape, n: int) -> pd.DataFrame:
    h, w = shape
    r = max(3, min(h, w) // 12)
    rows = []
    for i in range(n):
        rows.append((i, 1, "square", w // 2, h // 2, r))
        rows.append((i, 2, "square", min(w // 2 + w // 4, w - r - 1), h // 2, r))
    return pd.DataFrame(rows, columns=["image", "roi", "kind", "cx", "cy", "r"])


def rho(sigma, cnr) -> str:
    cnr = np.asarray(cnr, np.float64)
    ok = np.isfinite(cnr)
    if ok.sum() < len(cnr):
        return f"n/a ({len(cnr) - ok.sum()} invalid)"
    value = spearmanr(sigma, cnr).statistic
    return "n/a (constant)" if not np.isfinite(value) else f"{value:+.2f}"


def noise_table() -> str:
    methods = ("complement", "ring", "complement-all", "auto tissue", "auto foreground", "auto image",
               "auto tissue, mriqc")
    lines = ["| image | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    values = []
    for name, image in real_images():
        stack, sigma = ladder(image)
        table = fixed_rois(image.shape, len(stack))
        row = []
        for mode in ("complement", "ring", "complement-all"):
            ds = gpucnr.measure(stack, table, background=mode, backend="numpy")
            row.append(rho(sigma, ds["cnr"].sel(roi=1).values))
        auto = gpucnr.measure(stack, "auto", backend="numpy")
        mriqc = gpucnr.measure(stack, "auto", definition="mriqc", backend="numpy")
        row += [rho(sigma, auto["cnr"].sel(roi=2).values), rho(sigma, auto["cnr"].sel(roi=1).values),
                rho(sigma, auto["cnr_median"].values), rho(sigma, mriqc["cnr"].sel(roi=2).values)]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
        values.append((name, ds["cnr"].sel(roi=1).values, auto["cnr"].sel(roi=2).values, auto["status"].values))
    detail = ["", "CNR along each ladder (complement, ROI 1 / auto tissue):", ""]
    for name, comp, tissue, status in values:
        detail.append(f"- {name}: complement " + ", ".join(f"{v:.3g}" for v in comp) + "; auto tissue "
                      + ", ".join(f"{v:.3g}" if s == 0 else f"status {s}" for v, s in zip(tissue, status[:, 1],
                                                                                         strict=True)))
    return "\n".join(lines + detail)


def bias_table(n: int = 4, size: int = 256) -> str:
    lines = ["| true tissue CNR | auto tissue CNR (mean) | bias, auto | bias, thresholds alone |",
             "|---|---|---|---|"]
    for cnr in TRUE_CNR:
        ph = make_body_phantom(n, (size, size), tissue_cnr=cnr, seed=int(cnr * 100))
        ds = gpucnr.measure(ph.images, "auto", backend="numpy")
        got = ds["cnr"].sel(roi=2).values
        ok = ds["status"].sel(roi=2).values == 0
        auto = float(np.mean(got[ok] / ph.tissue_cnr[ok])) - 1 if ok.any() else math.nan
        # the same phantoms, the body's pixels split at their two-class Otsu threshold, no spatial clean-up
        plain = []
        for i in range(n):
            body = ph.images[i][ph.regions[i] >= 3].astype(np.float64)
            t = otsu_thresholds(XP, *_hist(body), 2)[0, 0]
            a, b = body[body > t], body[body <= t]
            plain.append(abs(a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) + b.var(ddof=1)) / ph.tissue_cnr[i] - 1)
        mean_cnr = float(np.mean(got[ok])) if ok.any() else math.nan
        lines.append(f"| {cnr:g} | {mean_cnr:.3f} ({ok.sum()}/{n} found) | {100 * auto:+.1f} % | "
                     f"{100 * float(np.mean(plain)):+.1f} % |")
    return "\n".join(lines)


def _hist(values):
    counts, edges, _ = histograms(XP, values[None, None, :], np.ones((1, 1, values.size), bool))
    return counts, edges


def main() -> None:
    print("## Noise response on real images (Spearman of CNR against sigma)\n")
    print(noise_table())
    print("\n## Otsu's bias when the tissue classes overlap (256 x 256 phantoms, 4 per row)\n")
    print(bias_table())


if __name__ == "__main__":
    main()
