"""The demo: a phantom dataset with known CNR, measured by gpucnr.measure, summarised as a table."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from gpucnr.arrays import measure
from gpucnr.errors import OptionError
from gpucnr.outputs import OutputError, make_folder, refuse_overlap
from gpucnr.phantom import make_phantom
from gpucnr.store import parse_size

__all__ = ["run_demo", "summary_table"]


def run_demo(n: int = 2000, size: int = 128, *, out=None, backend: str = "auto", seed: int = 0,
             threshold: float = 1.5):
    """A phantom of `n` images (one lesion each, analytic CNR uniform in [0.5, 4]) through the whole flow.

    With `out`, the phantom is written as ``out/stack.zarr`` and measured by `gpucnr.run` into
    ``out/results.zarr`` (both replaced if a previous demo left them); without, it is measured in memory by
    `gpucnr.measure`.

    Returns
    -------
    ds : xarray.Dataset
        The results (the article's method: complement background, cross footprint, ddof 1).
    text : str
        A summary table for the terminal.
    """
    try:
        ph = make_phantom(n, (size, size), lesions=1, radius=max(4, size // 16), seed=seed)
    except ValueError as e:
        raise OptionError(f"no phantom of this size: {e}") from None
    t0 = time.perf_counter()
    if out is None:
        ds = measure(ph.images, ph.rois, backend=backend)
        truth = ph.cnr[:, 0]
    else:
        from gpucnr.pipeline import run
        from gpucnr.store import write_stack

        refuse_overlap([], [("demo stack", Path(out) / "stack.zarr"), ("demo results", Path(out) / "results.zarr")],
                       into=[("demo folder", out)])
        out = make_folder(out, "demo folder")
        replaced = [name for name in ("stack.zarr", "results.zarr") if _remove_previous(out / name)]
        stack = write_stack(out / "stack.zarr", ph.images, rois=ph.rois)
        ds = run(stack, out / "results.zarr", backend=backend).load()
        truth = ph.cnr[ds["source_index"].to_numpy(), 0]
    elapsed = time.perf_counter() - t0
    text = summary_table(ds, truth=truth, threshold=threshold, elapsed=elapsed)
    if out is not None:
        text += f"\n\nstack:   {out / 'stack.zarr'}\nresults: {out / 'results.zarr'}"
        if replaced:
            # NB: a previous demo's outputs are replaced by design; said, so that it is never a surprise
            text += f"\n(replaced the previous demo's {' and '.join(replaced)} in {out})"
    return ds, text


def _remove_previous(path: Path) -> bool:
    """Remove a stack or results a previous demo left, and nothing else; True if there was one."""
    if not os.path.lexists(path):
        return False
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs) if path.is_dir() and not path.is_symlink() else {}
    except Exception:  # noqa: BLE001 - not a readable Zarr group: not ours to remove
        attrs = {}
    if "gpucnr_stack" not in attrs and "gpucnr_results" not in attrs:
        raise OutputError("output-exists", f"{path} exists and is not a gpucnr stack or results (or is a symbolic "
                          "link); not replacing it")
    # NB: an ingested stack (its counts, or its key / linkage / skipped files beside it) is a user's data, never a
    # previous demo's: replacing it would leave its linkage file to be joined to phantom results
    beside = sorted(p.name for p in path.parent.glob(f"{path.name}.*"))
    if "gpucnr_results" in attrs and attrs.get("stack_path") != "stack.zarr":
        raise OutputError("output-exists", f"{path} are results of another stack ({attrs.get('stack_path')}), not a "
                          "previous demo's; not replacing them: choose another --out")
    if "ingest" in attrs or beside:
        raise OutputError("output-exists", f"{path} is an ingested stack ({', '.join(beside) or 'ingest counts'}), "
                          "not a previous demo's; not replacing it: choose another --out")
    shutil.rmtree(path)
    return True


def summary_table(ds: xr.Dataset, *, truth=None, threshold: float = 1.5, elapsed: float | None = None,
                  title: str = "gpucnr demo") -> str:
    """A plain-text summary of per-image CNR (``cnr_median``): distribution and share below `threshold`; `title`
    heads it (``gpucnr run`` passes its own name)."""
    cnr = ds["cnr_median"].to_numpy()
    valid = np.isfinite(cnr)
    q = np.quantile(cnr[valid], [0.05, 0.25, 0.5, 0.75, 0.95]) if valid.any() else [np.nan] * 5
    below = int(np.sum(cnr[valid] < threshold))
    lines = [
        f"{title}: {ds.sizes['image']} images, {ds.sizes['roi']} ROI id(s), backend {ds.attrs['backend']}, "
        f"background {ds.attrs['background']}, footprint {ds.attrs['footprint']}, ddof {ds.attrs['ddof']}",
        "",
        f"{'statistic':<28}{'value':>12}",
        f"{'-' * 40}",
        f"{'images with a valid ROI':<28}{int(valid.sum()):>12d}",
        f"{'images without (flagged)':<28}{int((~valid).sum()):>12d}",
        f"{'CNR mean':<28}{np.mean(cnr[valid]) if valid.any() else np.nan:>12.3f}",
    ]
    for p, v in zip((5, 25, 50, 75, 95), q, strict=True):
        lines.append(f"{f'CNR {p}th percentile':<28}{v:>12.3f}")
    if ds.attrs.get("definition") == "gcnr":
        # NB: gCNR is an overlap in [0, 1]: every image lies "below 1.5", which says nothing
        lines.append("(gCNR lies in [0, 1]: the CNR cut of 1.5 does not apply; choose one with `gpucnr filter "
                     "--rule`, e.g. quantile:0.1)")
    else:
        lines.append(f"{f'below {threshold} (drop)':<28}{below:>7d} ({below / max(valid.sum(), 1):5.1%})")
    if truth is not None:
        rel = cnr[valid] / np.asarray(truth)[valid] - 1
        lines.append(f"{'median |measured/true - 1|':<28}{np.median(np.abs(rel)):>12.3%}")
        lines.append("  (how far the measured CNR lies from the phantom's known CNR, image by image: the median "
                     "relative difference; a few % is the bias of the background mode, see docs/accuracy.md)")
    if "committed" in ds.variables:
        # NB: a run's own count, from its committed flags (one per batch), not from reading every row
        done = f"{int((ds['committed'].to_numpy() != 0).sum())} of {ds.sizes['batch']}"
        lines.append(f"{'batches committed':<28}{done:>12}")
        asked, plan = ds.attrs.get("batch"), ds.attrs.get("plan")
        try:
            kind, n = parse_size(asked)
        except OptionError:
            kind, n = None, 0  # NB: results without a readable batch size: nothing to say about it
        per = sorted({int(v["images_per_batch"]) for v in plan.values()}) if isinstance(plan, dict) else []
        if kind == "images" and per and per != [n]:
            # NB: batches are whole shards: a smaller --batch in images is rounded up, which a user sizing memory
            # or a resume would not guess
            lines.append(f"  (--batch {asked} rounded to whole shards: {'/'.join(map(str, per))} images per batch)")
    if elapsed is not None:
        lines.append(f"{'time':<28}{elapsed:>10.2f} s ({ds.sizes['image'] / elapsed:,.0f} images/s)")
        # NB: Numba compiles the kernels on first use and caches them on disk: a first run is several times slower
        lines.append("  (write and measure; the first run after an install also compiles the kernels, cached "
                     "for later runs)")
    return "\n".join(lines)
