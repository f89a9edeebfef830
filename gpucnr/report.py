"""One self-contained HTML report of a CNR audit: summary, plots, thresholds by group, the lowest-CNR gallery.

The report is a single ``report.html``: every image is embedded as a ``data:image/png;base64`` URI, its
stylesheet is inline, it has no script and no external reference, so it opens offline. All text is escaped.
It shows the global image index and the pseudonymous id columns (`gpucnr.manifests.ID_COLUMNS`) only.

The gallery's masks are recomputed on the host, the plain way (full-image masks, scipy.ndimage), from the
run's parameters (results attributes): ROIs from the stack's ROI table (square, disk) or its labels;
backgrounds ``complement`` (ROI dilated by the footprint ``dilation`` times / with radius ``dilation``, its
complement), ``complement-all`` (the same around the union of the image's ROIs and labels), ``ring``
(distance transforms: L1 for cross, L-infinity for square, Euclidean for the disks) and ``label``; the
border frame of the valid region and excluded pixels (non-finite, padding value) are removed; for results of
``rois="auto"``, the automatic regions found again as the run found them (body against air, upper tissue class
against the lower). They are for display: the CNR values come from the results, never from these masks.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

from gpucnr._version import __version__
from gpucnr.errors import GpucnrError, InputError, NoticeWarning
from gpucnr.kernels.footprints import footprint_offsets
from gpucnr.manifests import ID_COLUMNS
from gpucnr.outputs import OutputError, make_folder, refuse_overlap, write_file
from gpucnr.plots import distribution_figure, group_boxplot, image_values, three_panel
from gpucnr.results import require_complete
from gpucnr.statistics import DEFAULT_RULES, QUANTILES, summarize

__all__ = ["lowest_images", "roi_and_background", "write_report"]

_PARAMETERS = ("background", "footprint", "dilation", "border", "ring_gap", "ring_width", "background_label",
               "min_bg", "ddof", "definition", "gcnr_bins", "signed")
#: Groups drawn in a report's box plot (the largest ones, then the outliers); every group is in its tables.
MAX_GROUPS_DRAWN = 12
#: Tables longer than this are collapsed (a <details> the reader opens), so the page stays readable at 400 groups.
_OPEN_ROWS = 30
_CSS = """
body{font-family:sans-serif;margin:2em auto;padding:0 1em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;max-width:100%}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:right;overflow-wrap:anywhere}
details{margin:0.5em 0 1.5em}summary{cursor:pointer;color:#035}
th{background:#eee}td.l,th.l{text-align:left}
tr.primary td{font-weight:bold}
img{max-width:100%}
figure{margin:1em 0;border-top:1px solid #ddd;padding-top:0.5em}
.note{color:#555;font-style:italic}
"""


def write_report(results, out_dir, *, thresholds=(1.0, 1.5, 2.0, 3.0), primary: float = 1.5, by=None, stack=None,
                 lowest: int = 12, rois=None, allow_incomplete: bool = False, rules=DEFAULT_RULES) -> Path:
    """Write ``report.html`` (self-contained) for a results store.

    Parameters
    ----------
    results : xarray.Dataset or str or os.PathLike
        Results of `gpucnr.run` (or their path). The stack is found through the ``stack_path`` attribute,
        relative to the folder that holds the results (``results.encoding["source"]`` for an opened store).
    out_dir : str or os.PathLike
        Created if needed; ``report.html`` is written in it (overwritten).
    thresholds : sequence of float
        CNR thresholds of the threshold tables and plots.
    primary : float
        The threshold the summary highlights (the article's 1.5); added to `thresholds` if missing.
    by : str or sequence of str, optional
        Per-image columns to group by (box plots, threshold tables, outlier flags): the results' allow-listed
        columns (modality, ...) and the grouping columns their run named (``run(group_columns=["site"])``).
        Group values are drawn literally (a ``$`` is never matplotlib mathtext).
    stack : str, os.PathLike or gpucnr.store.Stack, optional
        The stack, when it is not where the results say (or the results are an in-memory Dataset).
    lowest : int
        Size of the gallery: the images with the smallest finite image CNR, each as the article's figure.
    rois : pandas.DataFrame, optional
        The ROI table given to `gpucnr.run(rois=...)`, when it is not the stack's own.
    allow_incomplete : bool
        Report on results that an interrupted run left incomplete; without it they are refused
        (``results-incomplete``, `gpucnr.results.require_complete`).
    rules : sequence of str
        Filtering rules (``"quantile:0.05"``, ``"mad:3"``, ``"abs:1.5"``; `gpucnr.manifest`'s ``rule``) whose cut
        the thresholds section shows for the whole set and every group, with what each drops.

    Returns
    -------
    pathlib.Path
        The path of ``report.html``.
    """
    ds, source = _open(results)
    out = Path(out_dir)
    refuse_overlap([("results", source), ("stack", _stack_path(ds, source, stack))], [("report", out / "report.html")],
                   into=[("report folder", out)])
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError("output-folder", f"the report folder {out} exists and is not a folder")
    require_complete(ds, allow_incomplete=allow_incomplete, command="report", results_path=source)
    thresholds = sorted({float(t) for t in np.atleast_1d(np.asarray(thresholds, np.float64))} | {float(primary)})
    columns = [] if by is None else [by] if isinstance(by, str) else list(by)
    ds = ds.load()
    summary = summarize(ds, thresholds, columns or None, rules=rules)
    values = image_values(ds)

    one_roi = _one_roi_per_image(ds)
    shown = _shown_groups(summary, columns)
    parts = [_summary_section(ds, summary, primary, one_roi), _distribution_section(summary, thresholds, one_roi),
             _groups_section(ds, summary, columns, thresholds, primary, shown),
             _thresholds_section(summary, primary, one_roi, shown),
             _lowest_section(ds, values, source, stack, int(lowest), rois),
             _parameters_section(ds, source)]
    title = "gpucnr CNR report"
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    make_folder(out, "report folder")
    try:
        return write_file(out / "report.html", lambda fh: fh.write(doc), what="report")
    except OSError as e:
        raise OutputError("output-write", f"{out / 'report.html'} could not be written ({e.strerror or e})") from None


# --- sections ----------------------------------------------------------------------------------------------------


def _one_roi_per_image(ds) -> bool:
    """Every image has at most one valid ROI: the ROI level repeats the image level, and is not shown twice."""
    n_valid = np.asarray(ds["n_valid"].values)
    return ds.sizes.get("roi", 0) <= 1 or not n_valid.size or int(n_valid.max()) <= 1


def _shown_groups(summary, columns) -> dict:
    """Per grouping column, the group values a box plot draws: the `MAX_GROUPS_DRAWN` largest groups with a finite
    value, and the outliers (image level) beyond them; the rest is in the tables."""
    out = {}
    by = np.asarray(summary["group_by"].values).astype(str)
    value = np.asarray(summary["group_value"].values).astype(object).astype(str)
    img = summary.sel(level="image")
    count = np.asarray(img["count"].values)
    size = np.asarray(summary["n_images"].values)
    outlier = np.asarray(img["outlier"].values, bool)
    for col in columns:
        idx = [i for i in np.flatnonzero(by == col) if count[i] > 0]
        idx.sort(key=lambda i: (-size[i], value[i]))
        chosen = idx[:MAX_GROUPS_DRAWN]
        chosen += [i for i in idx[MAX_GROUPS_DRAWN:] if outlier[i]][:MAX_GROUPS_DRAWN // 2]
        out[col] = [value[i] for i in chosen]
    return out


def _collapsible(header: str, rows: list[str], label: str) -> str:
    """A table, collapsed into a <details> the reader opens when it has more than `_OPEN_ROWS` rows."""
    table = f"<table>{header}{''.join(rows)}</table>"
    if len(rows) <= _OPEN_ROWS:
        return table
    return f"<details><summary>{_e(label)} ({len(rows)} rows)</summary>{table}</details>"


def _summary_section(ds, summary, primary, one_roi=False) -> str:
    rows = []
    s = summary.sel(group="all")
    rows.append(("images", int(s["n_images"].values), ""))
    rows.append(("images never computed", int(s["n_not_computed"].values), ""))
    rows.append(("images without a valid ROI", int(s["n_no_valid_roi"].sel(level="image").values), ""))
    rows.append(("ROI slots per image", int(ds.sizes.get("roi", 0)), ""))
    img, roi = s.sel(level="image"), s.sel(level="roi")
    rows.append(("finite values", int(img["count"].values), int(roi["count"].values)))
    rows.append(("mean CNR", _f(img["mean"].values), _f(roi["mean"].values)))
    for q in QUANTILES:
        rows.append((f"{q:.0%} quantile", _f(img["quantiles"].sel(quantile=q).values),
                     _f(roi["quantiles"].sel(quantile=q).values)))
    frac = []
    for level in ("image", "roi"):
        x = s.sel(level=level, threshold=primary)
        frac.append(f"{_f(x['fraction_below'].values)} [{_f(x['fraction_below_low'].values)}, "
                    f"{_f(x['fraction_below_high'].values)}] ({int(x['n_below'].values)})")
    rows.append((f"fraction below CNR {primary:g} [95 % Wilson] (count)", *frac))
    if "case" in summary["level"].values:
        c = s.sel(level="case", threshold=primary)
        value = (f"{_f(c['fraction_below'].values)} [{_f(c['fraction_below_low'].values)}, "
                 f"{_f(c['fraction_below_high'].values)}] ({int(c['n_below'].values)} of {int(c['count'].values)})")
        rows.append((f"cases below CNR {primary:g}, pooled CNR (gpucnr.aggregate) [95 % Wilson]", value, ""))
    if one_roi:
        # NB: one ROI per image: the ROI level is the image level, shown once
        body = "".join(f"<tr><td class=\"l\">{_e(a)}</td><td>{_e(b)}</td></tr>" for a, b, _ in rows)
        return ("<section id=\"summary\"><h2>Summary</h2>"
                "<p>One value per image: the CNR of its ROI (each image has at most one valid ROI, so the ROI level "
                "is the image level). Images without a valid ROI are counted, not dropped.</p>"
                f"<table><tr><th class=\"l\"></th><th>image level</th></tr>{body}</table></section>")
    body = "".join(f"<tr><td class=\"l\">{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td></tr>" for a, b, c in rows)
    return ("<section id=\"summary\"><h2>Summary</h2>"
            "<p>Image level: one value per image, its median CNR over its valid ROIs (images without a valid ROI "
            "are counted, not dropped). ROI level: every valid (image, ROI) cell.</p>"
            "<table><tr><th class=\"l\"></th><th>image level</th><th>ROI level</th></tr>"
            f"{body}</table></section>")


def _distribution_section(summary, thresholds, one_roi=False) -> str:
    image = _img(distribution_figure(summary, thresholds, level="image"), "Histogram and ECDF of image CNR")
    roi = "" if one_roi else (
        f"<figure>{_img(distribution_figure(summary, thresholds, level='roi'), 'Histogram and ECDF of ROI CNR')}"
        "<figcaption>ROI-level CNR.</figcaption></figure>")
    return ("<section id=\"distribution\"><h2>Distribution</h2>"
            f"<figure>{image}<figcaption>Image-level CNR; dashed lines: thresholds.</figcaption></figure>"
            f"{roi}</section>")


def _groups_section(ds, summary, columns, thresholds, primary, shown=None) -> str:
    shown = shown or {}
    figures = []
    for col in columns or [None]:
        groups = shown.get(col)
        png = group_boxplot(ds, col, thresholds=[primary], groups=groups)
        caption = f"Image CNR by {col}" if col else "Image CNR (no grouping column given)"
        n_groups = int((np.asarray(summary["group_by"].values).astype(str) == str(col)).sum()) if col else 0
        if col and groups is not None and len(groups) < n_groups:
            caption += (f": the {len(groups)} largest groups and outliers of {n_groups} (the table below has every "
                        "group)")
        figures.append(f"<figure>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption></figure>")
    rows = []
    # NB: "all" first, then the largest groups: the groups a reader looks for first
    size = np.asarray(summary["n_images"].values)
    order = sorted(range(summary.sizes["group"]), key=lambda i: (i != 0, -size[i], i))
    for g in summary["group"].values[order]:
        s = summary.sel(group=g, level="image")
        rows.append("<tr>" + "".join([
            f"<td class=\"l\">{_e(g)}</td>", f"<td>{int(s['n_images'].values)}</td>",
            f"<td>{int(s['count'].values)}</td>", f"<td>{_e(_f(s['quantiles'].sel(quantile=0.5).values))}</td>",
            f"<td>{_e(_f(s['outlier_score'].values))}</td>",
            f"<td>{'yes' if bool(s['outlier'].values) else ''}</td>"]) + "</tr>")
    table = _collapsible("<tr><th class=\"l\">group</th><th>images</th><th>finite</th><th>median CNR</th>"
                         "<th>outlier score</th><th>outlier</th></tr>", rows, "Every group, largest first")
    return (f"<section id=\"groups\"><h2>Groups</h2>{''.join(figures)}"
            f"<p>Outlier rule: {_e(summary.attrs.get('outlier_rule', ''))}.</p>{table}</section>")


def _thresholds_section(summary, primary, one_roi=False, shown=None) -> str:
    tables = []
    by = np.asarray(summary["group_by"].values).astype(str)
    value = np.asarray(summary["group_value"].values).astype(object).astype(str)
    labels = summary["group"].values
    size = np.asarray(summary["n_images"].values)
    order = sorted(range(len(labels)), key=lambda i: (i != 0, -size[i], i))
    drawn = {(c, v) for c, vs in (shown or {}).items() for v in vs}
    levels = ["image"] if one_roi else ["image", "roi"]
    if "case" in summary["level"].values:
        levels.append("case")  # NB: one pooled CNR per case (gpucnr.aggregate), counted in its first image's group
    for level in levels:
        rows, main = [], []
        for i in order:
            g = labels[i]
            for t in summary["threshold"].values:
                s = summary.sel(group=g, level=level, threshold=t)
                cls = " class=\"primary\"" if float(t) == float(primary) else ""
                rows.append(f"<tr{cls}><td class=\"l\">{_e(g)}</td><td>{_e(f'{float(t):g}')}</td>"
                            f"<td>{int(s['n_below'].values)}</td><td>{int(s['count'].values)}</td>"
                            f"<td>{_e(_f(s['fraction_below'].values))}</td>"
                            f"<td>{_e(_f(s['fraction_below_low'].values))} - "
                            f"{_e(_f(s['fraction_below_high'].values))}</td></tr>")
                if i == 0 or (by[i], value[i]) in drawn:
                    main.append(rows[-1])
        header = ("<tr><th class=\"l\">group</th><th>threshold</th><th>below</th><th>finite</th>"
                  "<th>fraction below</th><th>95 % Wilson interval</th></tr>")
        tables.append(_level_table("h3", level, header, rows, main))
    return ("<section id=\"thresholds\"><h2>Thresholds</h2><p>Fraction of finite CNR values strictly below each "
            f"threshold, by group; the primary threshold ({_e(f'{primary:g}')}) is in bold.</p>"
            + "".join(tables) + _rules_tables(summary, levels, order, drawn, by, value) + "</section>")


def _level_table(tag: str, level: str, header: str, rows: list[str], main: list[str]) -> str:
    """One level's table under its heading; past `_OPEN_ROWS` rows only `main` stays open (the whole dataset and the
    groups the box plots draw) and every group is one click away."""
    body = f"<table>{header}{''.join(rows)}</table>"
    if len(rows) > _OPEN_ROWS:
        body = (f"<table>{header}{''.join(main)}</table><details><summary>Every group ({len(rows)} rows)"
                f"</summary><table>{header}{''.join(rows)}</table></details>")
    return f"<{tag}>{_e(level.upper() if level == 'roi' else level.capitalize())} level</{tag}>{body}"


def _rules_tables(summary, levels, order, drawn, by, value) -> str:
    """Where each filtering rule cuts: per level, group and rule, the cut and how many finite values fall below it
    (what `gpucnr filter --rule R --by COLUMN` drops at the image level)."""
    if not summary.sizes.get("rule", 0):
        return ""
    labels = summary["group"].values
    rules = [str(r) for r in summary["rule"].values]
    cut = summary["rule_cut"].values
    below = summary["rule_n_below"].values
    count = summary["count"].values
    level_names = [str(v) for v in summary["level"].values]
    tables = []
    for level in levels:
        li = level_names.index(level)
        rows, main = [], []
        for i in order:
            for ri, rule in enumerate(rules):
                c, k, n = float(cut[li, i, ri]), int(below[li, i, ri]), int(count[li, i])
                where = "no cut" if np.isnan(c) else _f(c)
                frac = _f(k / n) if n else "-"
                rows.append(f"<tr><td class=\"l\">{_e(labels[i])}</td><td class=\"l\">{_e(rule)}</td>"
                            f"<td>{_e(where)}</td><td>{k}</td><td>{n}</td><td>{_e(frac)}</td></tr>")
                if i == 0 or (by[i], value[i]) in drawn:
                    main.append(rows[-1])
        header = ("<tr><th class=\"l\">group</th><th class=\"l\">rule</th><th>cut</th><th>dropped</th>"
                  "<th>finite</th><th>fraction dropped</th></tr>")
        tables.append(_level_table("h4", level, header, rows, main))
    return ("<h3 id=\"rules\">Where each rule cuts</h3><p>Each group's own cut (quantile:P: the group's P-quantile, "
            "none below 1/P values; mad:K: median &minus; K &times; 1.4826 &times; MAD, none when the MAD is 0; abs:T: "
            "T) and the finite values strictly below it: what <code>gpucnr filter --rule RULE --by COLUMN</code> "
            "drops at the same level.</p>" + "".join(tables))


def _lowest_section(ds, values, source, stack, lowest, rois) -> str:
    picks = lowest_images(values, lowest)
    head = (f"<section id=\"lowest\"><h2>Lowest CNR</h2><p>The {len(picks)} image(s) with the smallest finite "
            "image CNR (of the "
            f"{int(np.isfinite(values).sum())} with a value). Each figure shows the ROI whose CNR is nearest the "
            "image's median; masks recomputed from the run's parameters, for display.</p>")
    ids = _id_columns(ds)
    listing = "".join(
        f"<tr><td>{i}</td><td>{_e(_f(values[i]))}</td><td class=\"l\">{_e(_valid_rois(ds, i))}</td>"
        + "".join(f"<td class=\"l\">{_e(ds[c].values[i])}</td>" for c in ids) + "</tr>" for i in picks)
    table = ("<table><tr><th>image</th><th>CNR (median)</th><th class=\"l\">valid ROIs (id name: CNR)</th>"
             + "".join(f"<th class=\"l\">{_e(c)}</th>" for c in ids) + f"</tr>{listing}</table>")
    opened, why = _find_stack(ds, source, stack)
    if opened is None:
        return head + f"<p class=\"note\">{_e(why)}</p>{table}</section>"
    figures = []
    for i in picks:
        caption = f"image {i}, image CNR {_f(values[i])}"
        try:
            roi_id, cnr, image, roi_mask, bg_mask, exclude = _image_masks(ds, opened, i, rois)
            name = _roi_name(ds, i, roi_id)
            caption += f"; ROI {roi_id}{f' ({name})' if name else ''}: CNR {_f(cnr)}"
            row = opened.images.loc[opened.images["index"] == i].iloc[0]
            # NB: the histograms in the results' units (HU for CT): the run applies slope and intercept
            png = three_panel(image, roi_mask, bg_mask, caption, exclude=exclude, slope=float(row["slope"]),
                              intercept=float(row["intercept"]))
            body = _img(png, caption)
        except (GpucnrError, ValueError, KeyError, IndexError, OSError) as e:
            # NB: a shard file that cannot be read (deleted, unreadable) is named by its error, never its path
            why = f"its stack chunk cannot be read ({e.strerror or type(e).__name__})" if isinstance(e, OSError) else e
            body = f"<p class=\"note\">{_e(f'cannot draw image {i}: {why}')}</p>"
            warnings.warn(f"the report cannot draw image {i}: {why}", NoticeWarning, stacklevel=2)
        figures.append(f"<figure class=\"lowest\" data-image=\"{i}\">{body}<figcaption>{_e(caption)}"
                       "</figcaption></figure>")
    return head + table + "".join(figures) + "</section>"


def _roi_name(ds, image: int, roi_id: int) -> str:
    if "roi_name" not in ds.variables:
        return ""
    col = int(np.searchsorted(np.asarray(ds["roi"].values), roi_id))
    return str(np.asarray(ds["roi_name"].values, dtype=object)[image, col])


def _valid_rois(ds, image: int) -> str:
    """The valid ROIs of an image, ``id name: CNR`` (names as the ROI table gave them; labels have none)."""
    status = np.asarray(ds["status"].values[image])
    cnr = np.asarray(ds["cnr"].values[image], np.float64)
    names = (np.asarray(ds["roi_name"].values, dtype=object)[image] if "roi_name" in ds.variables
             else [""] * status.size)
    ids = np.asarray(ds["roi"].values)
    return ", ".join(f"{int(ids[j])}{' ' + str(names[j]) if str(names[j]) else ''}: {_f(cnr[j])}"
                     for j in np.flatnonzero(status == 0))


def _parameters_section(ds, source) -> str:
    a = ds.attrs
    params = [(k, a.get(k, "")) for k in _PARAMETERS]
    failures = a.get("failures", []) or []
    prov = [("gpucnr version (report)", __version__), ("gpucnr version (run)", a.get("gpucnr_version", "")),
            ("backend", a.get("backend", "")), ("stack fingerprint", a.get("stack_fingerprint", "")),
            ("stack path (relative to the results)", a.get("stack_path", "")),
            ("ROI source", a.get("roi_source", "")), ("ROI table fingerprint", a.get("rois_fingerprint", "")),
            ("batch", a.get("batch", "")), ("failed images", len(failures)),
            ("results", os.path.basename(str(source)) if source else "(in memory)"),
            ("report date (UTC)", _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat())]

    def table(rows):
        return "<table>" + "".join(f"<tr><th class=\"l\">{_e(k)}</th><td class=\"l\">{_e(v)}</td></tr>"
                                   for k, v in rows) + "</table>"

    return ("<section id=\"parameters\"><h2>Parameters and provenance</h2><h3>Measurement parameters</h3>"
            f"{table(params)}<p>Status codes: {_e(a.get('status_codes', ''))}</p><h3>Provenance</h3>"
            f"{table(prov)}</section>")


# --- the gallery's pixels and masks ----------------------------------------------------------------------------


def lowest_images(values, n: int) -> list[int]:
    """Global indices of the `n` smallest finite values (ties by index), smallest first."""
    values = np.asarray(values, np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(values[finite], kind="stable")]
    return [int(i) for i in order[: max(n, 0)]]


def _open(results):
    if isinstance(results, str | os.PathLike):
        from gpucnr.results import open_results

        return open_results(results), Path(results)
    if not isinstance(results, xr.Dataset):
        raise InputError(f"results must be an xarray.Dataset or a path, not {type(results).__name__}")
    source = results.encoding.get("source")
    return results, Path(source) if source else None


def _stack_path(ds, source, stack):
    """Where the stack a report reads is (for the overlap check), or None."""
    from gpucnr.store import Stack

    if isinstance(stack, Stack):
        return stack.path
    if stack is not None:
        return Path(stack)
    if source is not None and ds.attrs.get("stack_path"):
        return Path(source).resolve().parent / str(ds.attrs["stack_path"])
    return None


def _find_stack(ds, source, stack):
    from gpucnr.store import Stack, open_stack

    if isinstance(stack, Stack):
        opened = stack
    else:
        if stack is not None:
            where = Path(stack)
        elif source is not None and ds.attrs.get("stack_path"):
            where = Path(source).resolve().parent / str(ds.attrs["stack_path"])
        else:
            return _no_stack("The stack was not found: the results are not on disk and no stack was given; no "
                             "figure can be drawn.")
        if not where.exists():
            return _no_stack(f"The stack was not found (looked for {where.name!r} next to the results); give it "
                             "with --stack (stack= in Python) to draw the figures.")
        try:
            opened = open_stack(where, check=False)
        except GpucnrError as e:
            return _no_stack(f"The stack was not found or cannot be opened ({e}); no figure can be drawn.")
    expected = ds.attrs.get("stack_fingerprint")
    if expected and opened.fingerprint() != expected:
        return _no_stack(f"The stack was found ({opened.path}) but its fingerprint differs from the one the results "
                         "record; it is not the measured stack, so no figure is drawn.")
    return opened, ""


def _no_stack(why: str):
    """(no stack, `why`): said in the report and as a warning (a `gpucnr: warning:` line from the CLI)."""
    warnings.warn(why, NoticeWarning, stacklevel=3)
    return None, why


def _id_columns(ds) -> list[str]:
    return [c for c in ID_COLUMNS if c in ds.variables and ds[c].dims == ("image",)]


def _image_masks(ds, stack, index: int, rois):
    """(roi id, its CNR, image, ROI mask, background mask, excluded) of image `index`, on its valid region."""
    row = stack.images.loc[stack.images["index"] == index].iloc[0]
    bucket = next(b for b in stack.buckets if b.name == row["bucket"])
    pos = int(row["position"])
    images, labels = stack.read(bucket, pos, pos + 1, labels=True)
    h, w = int(row["valid_h"]), int(row["valid_w"])
    image = np.asarray(images[0])[:h, :w]
    lab = None if labels is None else np.asarray(labels[0])[:h, :w]

    status = np.asarray(ds["status"].values[index])
    cnr = np.asarray(ds["cnr"].values[index], np.float64)
    ok = np.flatnonzero((status == 0) & np.isfinite(cnr))
    if ok.size == 0:
        raise ValueError("no valid ROI")
    median = float(ds["cnr_median"].values[index])
    signed = bool(ds.attrs.get("signed", False))
    own = cnr[ok] if signed else np.abs(cnr[ok])
    # NB: the ROI nearest the image's median; a tie (two ROIs: both equally far) goes to the lower CNR.
    j = int(ok[np.lexsort((own, np.abs(own - median)))[0]])
    roi_id = int(ds["roi"].values[j])

    a = ds.attrs
    values = image.astype(np.float64)
    exclude = ~np.isfinite(values)
    padding = row.get("padding", np.nan)
    if padding is not None and np.isfinite(float(padding)):
        exclude |= values == float(padding)
    if a.get("roi_source") == "auto":
        roi_mask, bg_mask = _auto_masks(images[:1], row, a, roi_id)
        return roi_id, float(cnr[j]), image, roi_mask[:h, :w], bg_mask[:h, :w] & ~exclude, exclude
    table = _roi_table(stack, rois) if a.get("roi_source", "table") in ("table", "both") else None
    if table is None and lab is None:
        raise ValueError("neither an ROI table nor labels to rebuild the ROI")
    roi_mask, union = _roi_masks(table, lab, index, roi_id, (h, w), a)
    if lab is not None:
        union |= lab != 0
    bg_mask = roi_and_background(roi_mask, a, union=union, labels=lab)
    return roi_id, float(cnr[j]), image, roi_mask, bg_mask & ~exclude, exclude


def _auto_masks(images, row, attrs, roi_id: int):
    """ROI and background of an automatic cell (rois="auto"), the regions found again as the run found them
    (`gpucnr.kernels.regions.find_regions` on NumPy, the image's valid extent, padding, polarity and slope, the
    run's edge, min_bg and ddof): cell 1 the body against the air, cell 2 the upper tissue class against the lower."""
    import array_api_compat

    from gpucnr.kernels.regions import AUTO_ROI_IDS, REGION_AIR, REGION_BODY, REGION_LOWER, REGION_UPPER, find_regions

    def one(v, dtype):
        return np.asarray([v], dtype)

    photometric = str(row.get("photometric", "MONOCHROME2"))
    labels, _ = find_regions(array_api_compat.array_namespace(images), np.asarray(images),
                             valid_h=one(row["valid_h"], np.int64), valid_w=one(row["valid_w"], np.int64),
                             padding=one(row.get("padding", np.nan), np.float64),
                             polarity=one(-1.0 if photometric == "MONOCHROME1" else 1.0, np.float64),
                             slope=one(row.get("slope", 1.0), np.float64), edge=int(attrs.get("edge", 2)),
                             min_bg=int(attrs.get("min_bg", 30)), ddof=int(attrs.get("ddof", 1)))
    labels = np.asarray(labels)[0]
    if roi_id == AUTO_ROI_IDS[0]:
        return labels >= REGION_BODY, labels == REGION_AIR
    return labels == REGION_UPPER, labels == REGION_LOWER


def _roi_table(stack, rois):
    table = rois if rois is not None else stack.rois
    if table is None or not len(table):
        return None
    return pd.DataFrame(table)


def _roi_masks(table, lab, index, roi_id, shape, attrs):
    union = np.zeros(shape, bool)
    if table is not None:
        rows = table.loc[table["image"].astype(np.int64) == index]
        mask = None
        for _, r in rows.iterrows():
            m = _shape_mask(shape, str(r["kind"]).strip().lower(), int(r["cx"]), int(r["cy"]), int(r["r"]))
            union |= m
            if int(r["roi"]) == roi_id:
                mask = m
        if mask is not None:
            return mask, union
        if lab is None or attrs.get("roi_source") != "both":
            raise ValueError(f"ROI {roi_id} of image {index} is not in the ROI table")
    # NB: roi_source "both": a cell the table does not have is the labels' (the run refused ids from both)
    background_label = attrs.get("background_label")
    union |= (lab != 0) & (lab != background_label) if isinstance(background_label, int) else lab != 0
    return lab == roi_id, union


def _shape_mask(shape, kind, cx, cy, r):
    """A table ROI: square [c - r, c + r) clipped to the image, or the Euclidean disk of radius r."""
    mask = np.zeros(shape, bool)
    if kind == "square":
        mask[max(0, cy - r): max(0, cy + r), max(0, cx - r): max(0, cx + r)] = True
        return mask
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _dilate(mask, footprint, radius):
    if radius <= 0 or not mask.any():
        return mask.copy()
    if footprint == "cross":
        return ndimage.binary_dilation(mask, iterations=radius)
    fp = np.zeros((2 * radius + 1, 2 * radius + 1), bool)
    for dy, dx in footprint_offsets(footprint, radius):
        fp[dy + radius, dx + radius] = True
    return ndimage.binary_dilation(mask, structure=fp)


def _remove_frame(mask, border):
    mask = mask.copy()
    if border > 0:  # NB: mask[-0:] would clear everything
        mask[:border] = False
        mask[-border:] = False
        mask[:, :border] = False
        mask[:, -border:] = False
    return mask


def roi_and_background(roi_mask, params, *, union=None, labels=None) -> np.ndarray:
    """The background mask of one ROI, the plain way, from the run's parameters (results attributes).

    Parameters
    ----------
    roi_mask : 2-D bool array (the image's valid region)
    params : mapping
        ``background``, ``footprint``, ``dilation``, ``border``, ``ring_gap``, ``ring_width``,
        ``background_label`` as in the results' attributes.
    union : 2-D bool array, optional
        background="complement-all": every ROI and lesion of the image.
    labels : 2-D int array, optional
        background="label": the image's labels.
    """
    roi_mask = np.asarray(roi_mask, bool)
    mode = params.get("background", "complement")
    footprint = params.get("footprint", "cross")
    border = int(params.get("border", 5))
    if mode == "complement":
        bg = ~_dilate(roi_mask, footprint, int(params.get("dilation", 5)))
    elif mode == "complement-all":
        base = roi_mask if union is None else (union | roi_mask)
        bg = ~_dilate(base, footprint, int(params.get("dilation", 5)))
    elif mode == "ring":
        gap, width = int(params.get("ring_gap", 5)), int(params.get("ring_width", 10))
        if not roi_mask.any():
            bg = np.zeros_like(roi_mask)
        elif footprint in ("disk", "matlab-disk"):
            d2 = ndimage.distance_transform_edt(~roi_mask) ** 2
            bg = (d2 > gap**2 + 1e-9) & (d2 <= (gap + width) ** 2 + 1e-9)
        else:
            d = ndimage.distance_transform_cdt(~roi_mask, metric="taxicab" if footprint == "cross" else "chessboard")
            bg = (d > gap) & (d <= gap + width)
    elif mode == "label":
        if labels is None:
            raise ValueError("background='label' needs the image's labels")
        bg = np.asarray(labels) == int(params["background_label"])
    else:
        raise ValueError(f"unknown background {mode!r}")
    return _remove_frame(bg, border)


# --- HTML helpers --------------------------------------------------------------------------------------------


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _f(value) -> str:
    v = float(np.asarray(value))
    if np.isnan(v):
        return "n/a"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">"
