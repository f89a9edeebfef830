"""The keep/drop manifest: one decision per image, ROI, series, study or patient, for a training loader's join.

A manifest is a pandas.DataFrame built from results (DESIGN §6) by `manifest`, written by `write_manifest` as a plain
CSV (``pandas.read_csv`` opens it as it is) with its provenance in a JSON sidecar (``keep.csv.json``), or as Parquet
(provenance in the file's key-value metadata), and read back by `read_manifest` (which also reads the CSVs with a
leading ``# `` comment block that gpucnr wrote before December 2026).

Only the pseudonymous id columns (``patient_id``, ``study_id``, ``series_id``, ``instance_id``) and the global
image index identify a row: no other per-image column of the results, no ROI name, no failure message ever
enters a manifest (DESIGN §8), and `write_manifest` refuses a frame with any other column.
"""

from __future__ import annotations

import json
import math
import warnings
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from gpucnr._version import __version__
from gpucnr.errors import InputError, NoticeWarning
from gpucnr.grouping import segments
from gpucnr.kernels.cnr import STATUS
from gpucnr.outputs import OutputError, csv_text, csv_untext, refuse_overlap, write_file, write_path
from gpucnr.results import open_results, require_complete, results_stack
from gpucnr.rules import DEFAULT_RULE, Rule, parse_rule
from gpucnr.sources.pseudonyms import ID_COLUMNS

__all__ = ["COLUMNS", "ID_COLUMNS", "LEVELS", "PATH_COLUMNS", "REASONS", "DecisionWarning", "decision_warnings",
           "manifest", "manifest_inputs", "manifest_sidecar", "read_manifest", "with_paths", "write_manifest"]

#: Units a manifest can decide on, finest first.
LEVELS = ("image", "roi", "case", "series", "study", "patient")
_LEVEL_ID = {"series": "series_id", "study": "study_id", "patient": "patient_id"}

KEEP, DROP, FLAG = "keep", "drop", "flag"
BELOW = "cnr below threshold"
AT_OR_ABOVE = "cnr at or above threshold"
#: The reasons of a drop and a keep under a rule whose cut is a statistic of the unit's group (quantile, mad):
#: what was compared is the group's cut, not a threshold the user named (``{rule}``: ``mad:3``).
GROUP_BELOW = "cnr below its group's cut ({rule})"
GROUP_AT_OR_ABOVE = "cnr at or above its group's cut ({rule})"
NO_VALID = "no valid roi"
NOT_COMPUTED = "not-computed"
#: A usable unit kept because its group's rule sets no cut (a quantile of a group too small, a MAD of 0).
NO_CUT = "no cut in group"
#: Reasons other than these (and `GROUP_BELOW` / `GROUP_AT_OR_ABOVE` with the rule filled in) are a status name of
#: `gpucnr.STATUS` (roi level) or ``missing <id column>``.
REASONS = (BELOW, AT_OR_ABOVE, NO_VALID, NO_CUT)

#: Every column a manifest may have; `write_manifest` refuses any other (DESIGN §8: pseudonymous ids only).
# NB: `case` is a pseudonym too (a keyed id of the volume file and channel, or the series id)
COLUMNS = (*ID_COLUMNS, "case", "image", "roi", "roi_name", "images", "n_images", "n_valid_images", "decision",
           "reason", "cnr", "status", "n_valid")
_INT_COLUMNS = ("image", "roi", "status", "n_valid", "n_images", "n_valid_images")
_STR_COLUMNS = (*ID_COLUMNS, "case", "roi_name", "images", "decision", "reason")
# NB: what an absent id becomes once a stack table's NaN / None went through ``astype(str)`` on the way to the
# results; all of them read as "" in a manifest, and an image with no id is never merged into one group.
_MISSING_ID = ("", "nan", "NaN", "None", "<NA>")
_STATUS_NAME = {code: name for name, code in STATUS.items()}
_FORMAT = 2
_MAGIC = "# gpucnr manifest"
_PARQUET_KEY = b"gpucnr_manifest"


def manifest(results, threshold: float | None = None, level: str = "image", *, rule=None, by=None,
             allow_incomplete: bool = False) -> pd.DataFrame:
    """Decide keep / drop / flag for every unit of `level`, from the CNR of a run and a rule applied per group.

    Parameters
    ----------
    results : xarray.Dataset, str or Path
        Results of `gpucnr.run` (a path is opened with `gpucnr.open_results`), or a Dataset of the same layout:
        ``cnr_median`` and ``n_valid`` along ``image`` (image and group levels), ``cnr`` and ``status`` along
        (``image``, ``roi``) (roi level), the global image index as the ``image`` coordinate, and optional
        pseudonymous id coordinates along ``image``.
    threshold : float, optional
        Minimum acceptable CNR: the same as ``rule="abs:<threshold>"`` (kept for compatibility; give `threshold`
        or `rule`, not both). A unit is dropped when its CNR is strictly below it, so a CNR equal to the
        threshold is kept. NaN is refused; +-inf are allowed (drop all / keep all measured units).
    level : {"image", "roi", "case", "series", "study", "patient"}
        The unit of a row.

        - ``image``: the CNR is ``cnr_median``; flag (reason ``"no valid roi"``) when ``n_valid == 0``, flag
          (``"failed"``) when the image could not be processed (status 6 in every cell), flag
          (``"not-computed"``) when the row was never written (``n_valid < 0``, an interrupted run).
        - ``roi``: one row per (image, roi) cell of the results grid, including cells whose ROI is absent from
          the image; the CNR is the cell's ``cnr`` (as stored: absolute unless the run was ``signed``); a cell
          whose status is not ok is flagged with the status name of `gpucnr.STATUS` (``"absent"``,
          ``"zero-noise"``, ``"failed"``, ...).
        - ``case``: one row per value of the results' ``case`` column (a NIfTI volume and channel, a DICOM series,
          a 2-D file), decided on the *pooled* CNR of `gpucnr.aggregate` (the moments of all the case's cells
          pooled per ROI id, then the median over its valid ROI ids): ``cnr`` is that value, ``n_valid`` the
          number of valid ROI ids; flag ``"no valid roi"`` when none, ``"not-computed"`` when a cell of the case
          was never computed; an image without a case gets its own row, flagged ``"missing case"``.
        - ``series`` / ``study`` / ``patient``: a unit is keyed by its id *and the coarser ids present*
          (a series by patient_id, study_id, series_id), so an id reused under two patients makes two units.
          Its CNR is ``numpy.median`` of its images' ``cnr_median`` over the images with a valid ROI; flag
          ``"no valid roi"`` when none has one, ``"not-computed"`` when any image's row was never written
          (the decision could still change). An image whose id of that level is missing (empty) gets its own
          row, flagged ``"missing <column>"``, instead of being merged with other id-less images.
    rule : str or gpucnr.rules.Rule, optional
        Where each group is cut, as text (the command line's ``--rule``); default ``"abs:1.5"``:

        - ``"abs:T"``: drop CNR < T (T any number but NaN), the same for every group;
        - ``"quantile:P"`` (0 < P < 1): drop CNR < ``numpy.quantile(group, P, method="linear")``; a group of fewer
          than 1/P units drops nothing;
        - ``"mad:K"`` (K >= 0): drop CNR < median − K · 1.4826 · MAD (MAD = median |CNR − median|, numpy's
          median); a group whose MAD is 0 drops nothing.

        A group's statistics use the finite CNR of its usable units only (flagged units — no valid ROI, failed,
        not computed, non-ok cells — are left out). A usable unit of a group with no cut is kept with reason
        ``"no cut in group"``.
    by : str or sequence of str, optional
        Per-image columns of the results (``modality``, ``site``...) whose combined values define the groups; a
        missing value is its own value ``"(missing)"``. No `by`: one group, the whole set. A roi row belongs to
        its image's group *and its ROI id* (each id is cut on its own values: ``rois="auto"``'s ``tissue`` cell
        never by its ``foreground`` cell's); a case, series, study or patient to the group of its first image
        (smallest global index).
    allow_incomplete : bool
        Decide on results that an interrupted run left incomplete (their missing images are flagged
        ``"not-computed"``); without it they are refused (`gpucnr.results.require_complete`). ``df.attrs``
        records it (``allow_incomplete``), with the number of images never computed (``not_computed_images``).

    Returns
    -------
    pandas.DataFrame
        One row per unit, columns in this order:

        - the pseudonymous ids present among ``patient_id, study_id, series_id, instance_id`` (strings; a
          missing id is ""); at series/study/patient level only the unit's key ids;
        - ``image`` (int, global image index) at image and roi level, plus ``roi`` (int, ROI id) at roi level;
          at series/study/patient level instead ``images`` (the unit's global image indices, ascending, joined
          by single spaces: ``df["images"].str.split().explode().astype(int)`` gives one row per image),
          ``n_images`` and ``n_valid_images`` (images with a valid ROI);
        - ``decision`` ("keep", "drop", "flag"), ``reason`` (stable text, see above; for drop and keep under an
          ``abs`` rule ``"cnr below threshold"`` or ``"cnr at or above threshold"``, under a quantile or mad rule
          ``"cnr below its group's cut (mad:3)"`` or ``"cnr at or above its group's cut (mad:3)"`` (the rule as
          written in ``attrs["rule"]``); ``"no cut in group"`` for a keep where the rule sets none), ``cnr``
          (float, the CNR that decided; NaN exactly when the decision is flag);
        - ``n_valid`` (image level) or ``status`` (roi level).

        Rows are sorted by the ids present (coarsest first), then by the global image index (the first one for
        a group) and the ROI id: the order does not depend on the storage order of the results. ``df.attrs``
        holds the metadata that `write_manifest` writes: ``manifest_format``, ``rule`` (e.g. ``"mad:3"``),
        ``threshold`` (T of an ``abs`` rule, else None), ``by`` (list of columns), ``cuts`` (one entry per group,
        in the order of its values: ``group`` {column: value as text}, ``cut`` (None where the rule drops nothing),
        ``units`` (finite CNR of usable units in the group's statistics), ``dropped``), ``level``,
        ``gpucnr_version`` (of the manifest's writer), ``run`` (every attribute of the results but ``failures``,
        whose messages name files). Group values are per-image columns of the results, which are screened at
        run time (DESIGN §10); they go to the metadata only, never to a row.

    Warns
    -----
    DecisionWarning
        A `gpucnr.errors.NoticeWarning` for each line of `decision_warnings`: a rule that drops more than half of
        the units it judged (or all of them), flagged units that are the majority, a quantile or mad rule that
        drops nothing (every cut below its group's smallest CNR, or below 0, which an unsigned CNR never is).
        The decisions are made all the same; `gpucnr filter` prints each as a ``gpucnr: warning:`` line.

    Raises
    ------
    InputError
        An unknown level, a threshold that is not a real number, both `threshold` and `rule`, a `by` that is
        not a per-image column, results without the variables the level needs, or a series/study/patient
        level whose id column the results do not have or hold for no image (add it to the stack's ``meta``).
    RuleError
        ``bad-rule``: `rule` is not one of the accepted forms (`gpucnr.rules.RULE_FORMS`).
    ResultsError
        ``results-incomplete``: images never computed and not `allow_incomplete`.
    """
    if level not in LEVELS:
        raise InputError(f"level must be one of {LEVELS}, got {level!r}")
    if threshold is not None and rule is not None:
        raise InputError(f"give threshold or rule, not both (threshold={threshold!r} is rule 'abs:{threshold}')")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or math.isnan(threshold):
            raise InputError(f"threshold must be a real number (not NaN), got {threshold!r}")
        rule = Rule("abs", float(threshold))
    rule = DEFAULT_RULE if rule is None else parse_rule(rule)
    columns = _by_columns(by)
    ds = results if isinstance(results, xr.Dataset) else open_results(results)
    decide = _Decider(rule, ds, columns)
    from gpucnr.statistics import warn_empty_columns  # NB: where _Decider imports it from too

    warn_empty_columns(ds, columns, command="filter --by")
    missing = require_complete(ds, allow_incomplete=allow_incomplete, command="filter",
                               results_path=None if isinstance(results, xr.Dataset) else results)
    ids = [c for c in ID_COLUMNS if c in ds.variables]
    if level in _LEVEL_ID and _LEVEL_ID[level] not in ids:
        raise InputError(f"level {level!r} needs the per-image column {_LEVEL_ID[level]!r}, which these results "
                         "do not have (write the stack with it in meta)")
    for col in ids:
        if ds[col].dims != ("image",):
            raise InputError(f"{col!r} must lie along the image dimension, not {ds[col].dims}")
    id_values = {col: _id_strings(ds[col].values) for col in ids}
    if level in _LEVEL_ID and len(image_ids := id_values[_LEVEL_ID[level]]) and (image_ids == "").all():
        # NB: every unit would be one flagged image ("missing ..."): a manifest of nothing but flags, exit 0
        raise InputError(f"level {level!r} needs {_LEVEL_ID[level]!r}, which no image of these results has (PNG, "
                         "TIFF, JPEG and NIfTI files carry none; give it with `gpucnr ingest --meta`, or use --level "
                         "image or case)")
    image = np.asarray(ds["image"].values, np.int64)
    if level == "roi":
        df = _roi_rows(ds, id_values, image, decide)
    elif level == "case":
        df = _case_rows(ds, image, decide)
    else:
        _require(ds, ("cnr_median", "n_valid"), ("image",))
        frame = pd.DataFrame({**id_values, "image": image,
                              "cnr": np.asarray(ds["cnr_median"].values, np.float64),
                              "n_valid": np.asarray(ds["n_valid"].values, np.int64),
                              "failed": _failed_images(ds)})
        df = _image_rows(frame, ids, decide) if level == "image" else _group_rows(frame, ids, level, decide)
    df.attrs = {"manifest_format": _FORMAT, "rule": str(rule),
                "threshold": rule.value if rule.kind == "abs" else None, "by": columns, "cuts": decide.table,
                "level": level, "gpucnr_version": __version__,
                "allow_incomplete": bool(allow_incomplete), "not_computed_images": missing,
                "run": {str(k): _plain(v) for k, v in ds.attrs.items() if k != "failures"}}
    # NB: a decision, not a failure: said as a warning (the CLI's `gpucnr: warning:` lines), never raised
    for line in decision_warnings(df, level):
        warnings.warn(line, DecisionWarning, stacklevel=2)
    return df


def _failed_images(ds: xr.Dataset) -> np.ndarray:
    """Images whose every cell is status 6 (failed: the image could not be processed)."""
    if "status" not in ds.variables or ds["status"].ndim != 2 or not ds.sizes.get("roi", 0):
        return np.zeros(ds.sizes["image"], bool)
    return (np.asarray(ds["status"].values) == STATUS["failed"]).all(axis=1)


def _require(ds: xr.Dataset, names, dims) -> None:
    for name in names:
        if name not in ds.variables:
            raise InputError(f"the results have no {name!r} variable (are they gpucnr results?)")
        if ds[name].dims != dims:
            raise InputError(f"{name!r} must have dims {dims}, not {ds[name].dims}")


def _id_strings(values) -> pd.Series:
    """Ids as strings, every spelling of "absent" as ""."""
    s = pd.Series(np.asarray(values).astype(object))
    missing = s.isna() | s.astype(str).isin(_MISSING_ID)
    return s.astype(str).where(~missing, "").astype(str)


def _by_columns(by) -> list[str]:
    if by is None:
        return []
    columns = [by] if isinstance(by, str) else list(by) if isinstance(by, list | tuple) else None
    if not columns or not all(isinstance(c, str) and c for c in columns) or len(set(columns)) != len(columns):
        raise InputError(f"by must be a column name or a list of distinct column names, got {by!r}")
    return columns


class _Decider:
    """Applies a rule per group: the groups of the results' images by the `by` columns, each group's cut computed in
    one pass over the usable units (`gpucnr.grouping`), and the table of cuts for the manifest's metadata."""

    def __init__(self, rule: Rule, ds: xr.Dataset, columns: list[str]):
        from gpucnr.statistics import column_codes, not_a_column

        self.rule, self.columns, self.table = rule, columns, []
        n = ds.sizes["image"]
        per_column = []
        for name in columns:
            if name not in ds.variables or ds[name].dims != ("image",):
                raise InputError(not_a_column(ds, name))
            per_column.append(column_codes(ds[name].values))
        if per_column:
            # NB: the groups are the value combinations present, ordered as the columns' values are
            # (one flat code per combination, unique in 1-D: the C order of the codes is that order)
            dims = [len(values) for _, values in per_column]
            stacked = np.stack([codes for codes, _ in per_column], axis=1)
            if math.prod(dims) < 2**62:
                present, inverse = np.unique(np.ravel_multi_index(stacked.T, dims), return_inverse=True)
                keys = np.stack(np.unravel_index(present, dims), axis=1)
            else:  # NB: too many combinations for one int64 code: unique rows (slower, same order)
                keys, inverse = np.unique(stacked, axis=0, return_inverse=True)
            self.codes = inverse.reshape(-1).astype(np.int64)
            self.labels = [{c: per_column[j][1][k] for j, (c, k) in enumerate(zip(columns, key, strict=True))}
                           for key in keys.tolist()]
        else:
            self.codes, self.labels = np.zeros(n, np.int64), [{}]

    def __call__(self, cnr, usable, flag_reason, owner, *, roi=None, roi_ids=None):
        """decision, reason and deciding CNR of units with CNR `cnr` (float (U,)), `usable` (bool (U,)), the reason
        of the unusable ones, and `owner` (int (U,)): the position of the image whose group the unit is in.

        `roi` (int (U,), positions in `roi_ids`) splits every group by ROI id: at roi level each id is a quantity
        of its own (``rois="auto"``'s foreground and tissue cells; a lesion and an organ), so one id's values
        never set another's cut."""
        cnr = np.asarray(cnr, np.float64)
        usable = np.asarray(usable, bool)
        group = self.codes[np.asarray(owner, np.int64)] if len(owner) else np.zeros(0, np.int64)
        if roi is not None:
            width = len(roi_ids)
            group = group * width + np.asarray(roi, np.int64)
            self.labels = [{**label, "roi": str(int(r))} for label in self.labels for r in roi_ids]
        stat = usable & np.isfinite(cnr)  # NB: flagged units stay out of the group statistics
        seg = segments(cnr[stat], group[stat], len(self.labels))
        cut = self.rule.cuts(seg)
        unit_cut = cut[group]
        below = usable & (cnr < unit_cut)
        decision = np.where(usable, np.where(below, DROP, KEEP), FLAG)
        # NB: a quantile or mad cut is the group's own statistic: "threshold" would read as a number the user chose
        low, high = ((BELOW, AT_OR_ABOVE) if self.rule.kind == "abs" else
                     (GROUP_BELOW.format(rule=self.rule), GROUP_AT_OR_ABOVE.format(rule=self.rule)))
        kept = np.where(np.isnan(unit_cut), NO_CUT, high)
        reason = np.where(usable, np.where(below, low, kept), flag_reason)
        dropped = np.bincount(group[below], minlength=len(self.labels))
        self.table = [{"group": label, "cut": None if math.isnan(c) else float(c), "units": int(k), "dropped": int(d)}
                      for label, c, k, d in zip(self.labels, cut.tolist(), seg.count.tolist(), dropped.tolist(),
                                                strict=True)]
        # NB: a flagged unit was not decided by a CNR; NaN says so even where a partial value exists.
        return decision, reason, np.where(usable, cnr, np.nan)


def _finish(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    for col in _INT_COLUMNS:
        if col in df:
            df[col] = df[col].astype(np.int64)
    for col in _STR_COLUMNS:
        if col in df:
            df[col] = df[col].astype(str)
    df["cnr"] = df["cnr"].astype(np.float64)
    # NB: stable multi-key sort on keys that are unique per row: the order is total and storage-independent.
    return df.sort_values(order, kind="stable").reset_index(drop=True)


def _image_rows(frame: pd.DataFrame, ids: list[str], decide: _Decider) -> pd.DataFrame:
    cnr = frame["cnr"].to_numpy()
    n_valid = frame["n_valid"].to_numpy()
    usable = (n_valid > 0) & ~np.isnan(cnr)
    # NB: an image that could not be processed says so ("failed", status 6), not "no valid roi"
    why = np.where(n_valid < 0, NOT_COMPUTED, np.where(frame["failed"].to_numpy(), "failed", NO_VALID))
    decision, reason, value = decide(cnr, usable, why, np.arange(len(frame)))
    df = pd.DataFrame({**{c: frame[c] for c in ids}, "image": frame["image"], "decision": decision,
                       "reason": reason, "cnr": value, "n_valid": n_valid})
    return _finish(df, [*ids, "image"])


def _roi_rows(ds: xr.Dataset, id_values: dict, image: np.ndarray, decide: _Decider) -> pd.DataFrame:
    _require(ds, ("cnr", "status"), ("image", "roi"))
    cnr = np.asarray(ds["cnr"].values, np.float64)
    status = np.asarray(ds["status"].values, np.int64)
    n, n_roi = cnr.shape
    roi = np.asarray(ds["roi"].values, np.int64)
    cnr, status = cnr.ravel(), status.ravel()
    usable = (status == STATUS["ok"]) & ~np.isnan(cnr)
    # NB: names looked up once per distinct code, not once per cell (a roi-level manifest can have millions).
    codes, inverse = np.unique(status, return_inverse=True)
    names = np.array([_STATUS_NAME.get(int(c), f"status {int(c)}") for c in codes], dtype=object)[inverse]
    decision, reason, value = decide(cnr, usable, np.where(status == STATUS["ok"], NO_VALID, names),
                                     np.repeat(np.arange(n), n_roi), roi=np.tile(np.arange(n_roi), n), roi_ids=roi)
    # NB: the ROI's name (a dataset.json label name, an ROI table's name; screened when the run wrote it), "" when
    # it has none, so that a roi-level row says what it measured (per cell: a table's names differ by image)
    dims = ds["roi_name"].dims if "roi_name" in ds.variables else None
    raw = (np.asarray(ds["roi_name"].values, dtype=object).ravel() if dims == ("image", "roi") else
           np.tile(np.asarray(ds["roi_name"].values, dtype=object), n) if dims == ("roi",) else
           np.full(n * n_roi, "", dtype=object))
    where, distinct = pd.factorize(raw, use_na_sentinel=True)  # NB: text made once per distinct name
    text = np.array([*("" if str(v) in _MISSING_ID else str(v) for v in distinct), ""], dtype=object)
    names = text[where]  # NB: a missing name's code -1 picks the trailing ""
    df = pd.DataFrame({**{c: np.repeat(v.to_numpy(dtype=object), n_roi) for c, v in id_values.items()},
                       "image": np.repeat(image, n_roi), "roi": np.tile(roi, n), "roi_name": names,
                       "decision": decision, "reason": reason, "cnr": value, "status": status})
    return _finish(df, [*id_values, "image", "roi"])


def _case_rows(ds: xr.Dataset, image: np.ndarray, decide: _Decider) -> pd.DataFrame:
    """One row per case, decided on the pooled CNR (`gpucnr.aggregate`)."""
    from gpucnr.pooling import aggregate

    if "case" not in ds.coords and "case" not in ds.data_vars:
        raise InputError("level 'case' needs the per-image column 'case' (NIfTI volumes and DICOM series have one "
                         "after `gpucnr ingest`), which these results do not have")
    pooled = aggregate(ds, by="case")
    case = _id_strings(ds["case"].values).to_numpy()
    frame = pd.DataFrame({"case": case, "image": image}).sort_values("image", kind="stable")
    lost = frame["case"] == ""
    grouped = frame[~lost].groupby("case", sort=True)["image"]
    # NB: a case is in the group of its first image (smallest global index), keyed as aggregate names its cases
    # (str of the value: a text "None" left by a Zarr round trip is a case there)
    keyed = pd.DataFrame({"key": [str(v) for v in np.asarray(ds["case"].values).tolist()], "image": image,
                          "pos": np.arange(image.size)}).sort_values("image", kind="stable")
    first_pos = keyed.groupby("key", sort=False)["pos"].first()
    names = pooled["case"].values.astype(str)
    status = np.asarray(pooled["status"].values).reshape(len(names), -1)
    not_computed = (status == STATUS["not-computed"]).any(axis=1)
    n_valid = np.asarray(pooled["n_valid"].values, np.int64)
    cnr = np.asarray(pooled["cnr_median"].values, np.float64)
    usable = (n_valid > 0) & ~not_computed & ~np.isnan(cnr)
    decision, reason, value = decide(cnr, usable, np.where(not_computed, NOT_COMPUTED, NO_VALID),
                                     first_pos.reindex(names).to_numpy(np.int64))
    images = grouped.agg(lambda v: " ".join(map(str, v))).reindex(names)
    df = pd.DataFrame({"case": names, "images": images.to_numpy(), "n_images": pooled["n_images"].values,
                       "first": grouped.min().reindex(names).to_numpy(), "decision": decision, "reason": reason,
                       "cnr": value, "n_valid": n_valid})
    if lost.any():
        alone = frame[lost]
        df = pd.concat([df, pd.DataFrame({"case": "", "images": alone["image"].astype(str), "n_images": 1,
                                          "first": alone["image"], "decision": FLAG, "reason": "missing case",
                                          "cnr": np.nan, "n_valid": 0})], ignore_index=True)
    df = _finish(df, ["case", "first"])
    return df[["case", "images", "n_images", "decision", "reason", "cnr", "n_valid"]]


def _group_rows(frame: pd.DataFrame, ids: list[str], level: str, decide: _Decider) -> pd.DataFrame:
    col = _LEVEL_ID[level]
    key = [c for c in ID_COLUMNS[: ID_COLUMNS.index(col) + 1] if c in ids]
    frame = frame.assign(pos=np.arange(len(frame))).sort_values("image", kind="stable")
    usable = (frame["n_valid"] > 0) & frame["cnr"].notna()
    lost = frame[col] == ""
    rows = []
    grouped = frame[~lost]
    if len(grouped):
        ok = usable[~lost]
        # NB: one groupby (one factorisation of the keys) for every column of the units
        work = grouped.assign(_ok=ok, _not_computed=grouped["n_valid"] < 0, _value=grouped["cnr"].where(ok),
                              _text=grouped["image"].astype(str))
        agg = work.groupby(key, sort=True).agg(
            images=("_text", " ".join), n_images=("image", "size"), n_valid_images=("_ok", "sum"),
            first=("image", "min"),
            # NB: the position of the first image, whose group (`by` columns) the unit is in
            pos=("pos", "first"), not_computed=("_not_computed", "any"),
            # NB: pandas' group median skips NaN and averages the two middle values, as numpy.median does.
            cnr=("_value", "median"),
        ).reset_index()
        cnr = agg["cnr"].to_numpy(np.float64)
        valid = agg["n_valid_images"].to_numpy() > 0
        not_computed = agg["not_computed"].to_numpy(bool)
        # NB: an unwritten image could still move the median, so the unit waits ("not-computed") whatever the rest.
        flag_reason = np.where(not_computed, NOT_COMPUTED, NO_VALID)
        agg["decision"], agg["reason"], agg["cnr"] = decide(cnr, valid & ~not_computed, flag_reason,
                                                            agg["pos"].to_numpy(np.int64))
        rows.append(agg)
    if lost.any():
        alone = frame[lost]
        rows.append(pd.DataFrame({**{k: alone[k] for k in key}, "images": alone["image"].astype(str),
                                  "n_images": 1, "n_valid_images": usable[lost].astype(np.int64),
                                  "first": alone["image"], "decision": FLAG, "reason": f"missing {col}",
                                  "cnr": np.nan}))
    columns = [*key, "images", "n_images", "n_valid_images", "decision", "reason", "cnr"]
    if not rows:
        return _finish(pd.DataFrame({c: pd.Series(dtype=object) for c in columns}), key)
    df = pd.concat(rows, ignore_index=True)
    df = _finish(df, [*key, "first"])
    return df[columns]


def _plain(value):
    """A JSON-able copy of an attribute (numpy scalars and arrays become Python values)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def units(level: str) -> str:
    """The name of a manifest's units in a count ("image(s)", "series", "study/studies")."""
    return {"series": "series", "study": "study/studies"}.get(level, f"{level}(s)")


class DecisionWarning(NoticeWarning):
    """What a manifest's decisions need said (`decision_warnings`): a rule that drops most or all units, or none
    where it was meant to cut, and flagged units that are the majority. The manifest is made all the same."""


def decision_warnings(df: pd.DataFrame, level: str = "image") -> list[str]:
    """What `manifest` warns about its decisions (one line each; `gpucnr filter` prints them): a rule that drops
    more than half of the units it judged (kept + dropped; flagged units were not judged), or all of them; a
    quantile or mad rule that drops nothing (`_no_drop_warning`); and flagged units that are the majority, with
    their reasons."""
    decision = df["decision"].astype(str).to_numpy()
    keep, drop, flag = ((decision == d).sum() for d in (KEEP, DROP, FLAG))
    judged, total, out = int(keep + drop), len(df), []
    rule = df.attrs.get("rule", "?")
    unjudged = f"; {flag} flagged one(s) were not judged" if flag else ""
    if judged and drop == judged:
        out.append(f"rule {rule} drops all {drop} {units(level)} it judged{f' ({unjudged[2:]})' if flag else ''}: "
                   "nothing is left to train on. Check the background mode and the rule: docs/choosing.md and the "
                   "report's threshold table")
    elif drop * 2 > judged:
        out.append(f"rule {rule} drops {drop} of the {judged} {units(level)} it judged "
                   f"({100.0 * drop / judged:.1f} %{unjudged}): more than half. "
                   "Before training on what is left, check the background mode and the rule: docs/choosing.md "
                   "and the report's threshold table")
    if judged and not drop:
        line = _no_drop_warning(df, level)
        if line:
            out.append(line)
    if flag * 2 > total:
        reasons = pd.Series(df["reason"].astype(str).to_numpy()[decision == FLAG]).value_counts()
        why = ", ".join(f"{r} {n}" for r, n in reasons.items())
        hint = ""
        if reasons.index[0] in (NO_VALID, _STATUS_NAME.get(STATUS.get("absent"))):
            hint = (": most have no ROI (a volume's slices outside its label map have none, as do images without "
                    "a mask); --level case decides once per volume, on all its slices")
        out.append(f"{flag} of {total} {units(level)} ({100.0 * flag / total:.1f} %) are flagged, neither kept nor "
                   f"dropped ({why}){hint}")
    return out


def _no_drop_warning(df: pd.DataFrame, level: str) -> str | None:
    """The line for a quantile or mad rule that judged units and dropped none: its cuts (the groups' own
    statistics, not a number the user chose) all lie below the groups' smallest CNR, or it set none. None for an
    ``abs`` rule (its threshold is the user's choice: abs:-inf keeps all on purpose)."""
    rule = str(df.attrs.get("rule", ""))
    if rule.partition(":")[0] not in ("quantile", "mad"):
        return None
    groups = [c for c in df.attrs.get("cuts", []) if c.get("units")]
    cuts = np.array([c["cut"] for c in groups if c.get("cut") is not None], np.float64)
    no_cut = len(groups) - cuts.size
    where = f"{len(groups)} group(s)" if len(groups) != 1 else "the one group"
    if not cuts.size:
        return (f"rule {rule} drops nothing: it sets no cut in {where} (fewer units than the quantile needs, or a MAD "
                f"of 0): every unit it judged is kept as {NO_CUT!r}")
    span = f"{cuts.min():.4g}" if cuts.size == 1 else f"from {cuts.min():.4g} to {cuts.max():.4g}"
    unsigned = df.attrs.get("run", {}).get("signed") in (False, 0)
    negative = int((cuts < 0).sum())
    if unsigned and negative == cuts.size:
        why = (f"every cut ({span}) is below 0, which an unsigned CNR never is, so this rule cannot drop anything "
               "here")
        if rule.startswith("mad:"):
            why += (f" (the spread within the groups is so wide that median - {rule.partition(':')[2]} x 1.4826 x "
                    "MAD < 0)")
    else:
        why = f"every cut ({span}) is at or below its group's smallest CNR"
        if unsigned and negative:
            why += f" ({negative} of the {cuts.size} cut(s) below 0, which an unsigned CNR never is)"
    rest = f"; {no_cut} group(s) have no cut" if no_cut else ""
    return (f"rule {rule} drops nothing in {where}: {why}{rest}. Every unit it judged is kept; to cut the low tail "
            "use abs:T or another rule: docs/choosing.md and the report's threshold table")


def _metadata(df: pd.DataFrame) -> dict:
    meta = dict(df.attrs)
    missing = [k for k in ("manifest_format", "threshold", "level", "gpucnr_version", "run") if k not in meta]
    if missing:
        raise InputError(f"the frame has no manifest metadata {missing} in df.attrs: make it with gpucnr.manifest")
    return _plain(meta)


#: columns that `with_paths` adds: the operator's link back to the files, never written without asking
PATH_COLUMNS = ("source", "channel", "frame", "source_encoding", "sources")


def with_paths(df: pd.DataFrame, results_path, stack=None) -> pd.DataFrame:
    """`df` (from `manifest`) joined with the linkage file that `gpucnr ingest` wrote beside the stack.

    Image and ROI rows get ``source`` (the file's path relative to the ingest's SRC_DIR), ``channel`` (a 4-D NIfTI
    volume's channel; 0 for others) and ``frame``; group
    rows get ``sources`` (a JSON list, in the order of ``images``). Source paths can carry names: this is
    only ever done on explicit request (`gpucnr filter --with-paths`).

    Raises
    ------
    InputError
        The stack cannot be located, is not the one the results were computed from, or has no linkage file (it
        was not made by `gpucnr ingest`).
    """
    from gpucnr.sources.driver import sidecar_paths

    # NB: a stack ingested again at the same path has another linkage file: joining it would give rows the paths
    # of other files, so the stack must be the one the results were computed from (its fingerprint)
    stack = results_stack(open_results(results_path), results_path, stack).path
    linkage = sidecar_paths(stack)["linkage"]
    if not linkage.exists():
        raise InputError(f"{stack} has no linkage file ({linkage.name}): only stacks made by `gpucnr ingest` "
                         "link images back to files")
    link = pd.read_csv(linkage, dtype={"source": str}, keep_default_na=False).set_index("index")
    link["source"] = link["source"].map(csv_untext)
    out = df.copy()
    if "image" in out.columns:
        found = out["image"].isin(link.index)
        out["source"] = np.where(found, link["source"].reindex(out["image"]).to_numpy(), "")
        out["frame"] = np.where(found, link["frame"].reindex(out["image"]).to_numpy(), -1)
        if "channel" in link.columns:
            # NB: images are keyed by (source, channel, frame) (DESIGN §10): a 4-D NIfTI file's channels share
            # source and frame, so without it the rows of its channels could not be told apart
            channel = pd.to_numeric(link["channel"], errors="coerce").fillna(0).astype(np.int64)
            out["channel"] = np.where(found, channel.reindex(out["image"]).to_numpy(), -1)
        if "source_encoding" in link.columns:  # NB: "percent" for a name written percent-encoded (DESIGN §10)
            out["source_encoding"] = np.where(found, link["source_encoding"].reindex(out["image"]).to_numpy(), "")
    else:
        out["sources"] = [json.dumps([str(link["source"].get(int(i), "")) for i in str(v).split()])
                          for v in out["images"]]
    out.attrs = dict(df.attrs)
    return out


def manifest_inputs(results, stack=None) -> list[tuple[str, Path]]:
    """What `gpucnr filter` reads or must not overwrite: the results, their stack (given, or where the results
    say) and the operator's files beside it; pass them to `write_manifest` as ``inputs``."""
    from gpucnr.sources.driver import sidecar_paths

    results = Path(results)
    if stack is None:
        try:
            attrs = json.loads(Path(results, "zarr.json").read_bytes()).get("attributes", {})
            stack = results.resolve().parent / str(attrs["stack_path"]) if attrs.get("stack_path") else None
        except (OSError, ValueError, AttributeError):
            stack = None
    out = [("results", results)]
    if stack is not None:
        out.append(("stack", Path(stack)))
        out += [(f"stack's {k} file", p) for k, p in sidecar_paths(stack).items()]
    return out


def write_manifest(df: pd.DataFrame, path, *, inputs=()) -> Path:
    """Write a manifest as CSV or Parquet, chosen by the suffix of `path`, with its metadata.

    Parameters
    ----------
    df : pandas.DataFrame
        A frame from `manifest` (or a row subset of it: pandas keeps ``df.attrs`` through selections). Its
        ``attrs`` are the metadata: rule, threshold, groups and their cuts, level, gpucnr version, the run's
        parameters.
    path : str or Path
        ``.csv``: the table with a header row and nothing else, so that a plain ``pandas.read_csv(path)`` (or a
        spreadsheet) opens it; the metadata goes, as JSON, to the sidecar ``<path>.json`` (``keep.csv`` ->
        ``keep.csv.json``: ``manifest_format``, ``rule``, ``threshold``, ``by``, ``cuts``, ``level``,
        ``gpucnr_version``, ``run``; see `manifest`).
        ``.parquet`` / ``.pq``: the table, with the metadata as JSON under the key ``gpucnr_manifest`` of the
        file's key-value metadata (needs pyarrow). Each file is written beside its final name and renamed into
        place, so a reader never sees half a manifest.

    inputs : iterable of (label, path)
        What the manifest may not be or lie inside (`manifest_inputs`); checked after resolving links.

    Returns
    -------
    Path

    Raises
    ------
    InputError
        An unknown suffix, a frame without manifest metadata, a column that is not a manifest column (only
        pseudonymous ids may identify a row, DESIGN §8), or a Parquet path without pyarrow installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise InputError(f"a manifest is written as .csv or .parquet, not {path.suffix or 'no suffix'!r}")
    foreign = [c for c in df.columns if c not in COLUMNS + PATH_COLUMNS]
    if foreign:
        raise InputError(f"not manifest columns: {foreign}; a manifest carries the pseudonymous ids only")
    meta = _metadata(df)
    outputs = [("manifest", path)] + ([("manifest sidecar", manifest_sidecar(path))] if suffix == ".csv" else [])
    refuse_overlap(inputs, outputs)
    # NB: a manifest with source paths is as private as the linkage file it joined
    private = any(c in df.columns for c in ("source", "sources"))
    try:
        if suffix == ".csv":
            # NB: the sidecar first: a manifest never stands without its provenance
            write_file(manifest_sidecar(path), lambda fh: fh.write(json.dumps(meta, indent=1) + "\n"),
                       what="manifest sidecar", private=private)

            def fill(fh):
                # NB: floats are written with repr precision by default, so values round-trip exactly; text cells
                # are kept from spreadsheet formulas (outputs.csv_text)
                safe = df.copy()
                for c in safe.columns:
                    if pd.api.types.is_object_dtype(safe[c]) or pd.api.types.is_string_dtype(safe[c]):
                        safe[c] = safe[c].map(csv_text)
                safe.to_csv(fh, index=False, lineterminator="\n")

            return write_file(path, fill, what="manifest", private=private)
        pa, pq = _pyarrow()
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               _PARQUET_KEY: json.dumps(meta).encode()})
        return write_path(path, lambda tmp: pq.write_table(table, tmp), what="manifest", private=private)
    except OSError as e:
        raise OutputError("output-write", f"the manifest {path} could not be written ({e.strerror or e})") from None


def manifest_sidecar(path) -> Path:
    """The JSON file beside a CSV manifest that holds its metadata: ``keep.csv`` -> ``keep.csv.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("a Parquet manifest needs pyarrow, which is not installed: pip install pyarrow "
                         "(or use a .csv path)") from None
    return pa, pq


def read_manifest(path) -> tuple[pd.DataFrame, dict]:
    """Read a manifest written by `write_manifest`.

    Parameters
    ----------
    path : str or Path
        A ``.csv`` manifest with its ``.csv.json`` sidecar, a ``.parquet`` / ``.pq`` one, or a ``.csv`` that
        gpucnr wrote before December 2026 (metadata in a leading ``# `` comment block).

    Returns
    -------
    df : pandas.DataFrame
        The table, with the dtypes `manifest` gives (ids and ``images`` as strings, a missing id as "",
        integer indices, float CNR with NaN for flags); ``df.attrs`` is set to the metadata, so it can be
        written again.
    metadata : dict
        ``manifest_format``, ``threshold``, ``level``, ``gpucnr_version`` and ``run`` (the run's parameters);
        ``rule``, ``by`` and ``cuts`` in manifests written since issue 16 (older ones: an ``abs`` rule, no groups).

    Raises
    ------
    InputError
        A file that is not a gpucnr manifest, an unknown suffix, or Parquet without pyarrow.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        meta, header = _csv_metadata(path)
        # NB: ids are text even when they look like numbers ("007", "1e5"), and "" is a missing id, not NaN.
        df = pd.read_csv(path, skiprows=header, keep_default_na=False, na_values={"cnr": ["", "nan", "NaN"]},
                         dtype={**dict.fromkeys(_STR_COLUMNS, str), **dict.fromkeys(_INT_COLUMNS, np.int64),
                                "cnr": np.float64})
        for c in df.columns:
            if pd.api.types.is_object_dtype(df[c]) or pd.api.types.is_string_dtype(df[c]):
                df[c] = df[c].map(csv_untext)
    elif suffix in (".parquet", ".pq"):
        _, pq = _pyarrow()
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(_PARQUET_KEY)
        if raw is None:
            raise InputError(f"{path} is not a gpucnr manifest (no {_PARQUET_KEY.decode()!r} metadata)")
        meta = json.loads(raw)
        df = table.to_pandas()
    else:
        raise InputError(f"a manifest is read from .csv or .parquet, not {path.suffix or 'no suffix'!r}")
    df.attrs = meta
    return df, meta


def _csv_metadata(path: Path) -> tuple[dict, int]:
    """A CSV manifest's metadata and the number of lines before its header: the sidecar's (format 2), or the
    leading comment block of a manifest written before December 2026."""
    with open(path, encoding="utf-8", newline="") as fh:
        first = fh.readline()
    if not first.startswith("#"):
        side = manifest_sidecar(path)
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path} is not a gpucnr manifest: it has no sidecar {side.name} (the threshold, level "
                             "and run parameters; pandas.read_csv reads the table alone)") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{side} cannot be read as a manifest's metadata ({type(e).__name__})") from None
        if not isinstance(meta, dict) or "manifest_format" not in meta:
            raise InputError(f"{side} is not the metadata of a gpucnr manifest")
        meta.setdefault("run", {})
        return meta, 0
    meta: dict = {"run": {}}
    header = 0
    with open(path, encoding="utf-8", newline="") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            header += 1
            text = line.rstrip("\n")
            if header == 1:
                if text != _MAGIC:
                    raise InputError(f"{path} is not a gpucnr manifest (no {_MAGIC!r} first line)")
                continue
            key, value = _parse_comment(text[2:])
            if key.startswith("run."):
                meta["run"][key[4:]] = value
            else:
                meta[key] = value
    return meta, header


def _parse_comment(text: str) -> tuple[str, object]:
    if text.startswith('"'):
        key, end = json.JSONDecoder().raw_decode(text)
        rest = text[end:]
    else:
        key, sep, rest = text.partition(":")
        rest = sep + rest
    return key, json.loads(rest.removeprefix(": "))
