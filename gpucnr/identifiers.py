"""Screening of free-text per-image columns and ROI names (DESIGN §10): what may look like a patient identifier
never reaches results, reports or manifests.

A column *name* is refused when its normalised form (lower case, letters and digits) equals a deny-listed keyword,
is a prefix (>= 6 characters) of one, or contains name, birth, mrn, accession, address or phone. A *value* is
refused when it contains ``^`` (the DICOM person-name separator), a run of >= 6 digits, a date or an e-mail
address.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gpucnr.errors import InputError

__all__ = ["DENY", "IdentifyingError", "blank_roi_names", "check_columns", "refused_name", "refused_value"]

#: Keywords (normalised) of identifying attributes: DICOM PS3.15 Annex E's and common aliases.
DENY = frozenset({
    "name", "patientname", "patientsname", "firstname", "lastname", "surname", "givenname", "familyname",
    "birthdate", "patientbirthdate", "patientsbirthdate", "dob", "dateofbirth", "birthtime", "accession",
    "accessionnumber", "mrn", "medicalrecordnumber", "address", "patientaddress", "phone", "telephone",
    "email", "ssn", "socialsecuritynumber", "otherpatientids", "patientid", "studyid", "seriesid", "instanceid",
    "studyinstanceuid", "seriesinstanceuid", "sopinstanceuid", "referringphysicianname", "institutionname",
    "operatorsname", "performingphysicianname", "insuranceplanidentification", "medicalalerts", "zipcode",
    "postcode", "nhsnumber", "healthcardnumber", "passportnumber", "driverslicense",
})
_CONTAINS = ("name", "birth", "mrn", "accession", "address", "phone")
_DIGITS = re.compile(r"\d{6,}")
_DATE = re.compile(r"\b(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})\b")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class IdentifyingError(InputError):
    """A per-image column (or its values) that may identify a patient, named where it was refused."""

    code = "identifying-column"


def refused_name(name: str) -> str | None:
    """Why a column name is refused (a short phrase), or None when it may be copied."""
    norm = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if not norm:
        return "it has no letter or digit"
    if norm in DENY:
        return "it is an identifying attribute's name"
    if len(norm) >= 6 and any(k.startswith(norm) for k in DENY):
        return "it abbreviates an identifying attribute's name"
    hit = next((w for w in _CONTAINS if w in norm), None)
    if hit:
        return f"it contains {hit!r}"
    return None


#: Why a value is refused (`refused_value`), never quoting it
_CARET, _RECORD, _A_DATE, _AN_EMAIL = ("a '^' (a DICOM person name)", "a run of 6 or more digits (a record number?)",
                                       "a date", "an e-mail address")
#: The way out of each value refusal, for a column whose values are not what the screen fears (a site code)
_WAY_OUT = {
    _RECORD: "if its values are codes, not record numbers (a site or scanner code), recode them without 6 digits in "
             "a row, e.g. with a lookup you keep (123456 -> 'site-12'): a prefix is not enough ('site-123456' is "
             "refused too); patient, study, series and instance ids go in the columns patient_id, study_id, "
             "series_id, instance_id, which are stored as keyed pseudonyms",
    _CARET: "a person's name never reaches a stack: leave the column out",
    _A_DATE: "if the time matters, keep a coarser value without a full date (the year, a period label such as "
             "'2021H1')",
    _AN_EMAIL: "leave the column out",
}


def refused_value(value) -> str | None:
    """Why a value is refused (never quoting it), or None. Missing values and fractional floats pass (a
    measurement such as 0.1234567 is not a record number); integers, whole floats and text are screened."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float | np.floating):
        if not np.isfinite(value) or value != np.round(value):
            return None
        value = int(value)
    text = str(value)
    if "^" in text:
        return _CARET
    if _DIGITS.search(text):
        return _RECORD
    if _DATE.search(text):
        return _A_DATE
    if _EMAIL.search(text):
        return _AN_EMAIL
    return None


def check_columns(table: pd.DataFrame, names, where: str) -> None:
    """`IdentifyingError` unless every column in `names` has an acceptable name and only acceptable values; the
    message names the column and the first refused row, never the value."""
    for name in names:
        why = refused_name(name)
        if why is not None:
            raise IdentifyingError(f"{where}: column {name!r} is refused: {why} (DESIGN §10: identifying columns "
                                   "never reach results)")
        if name not in table.columns:
            continue
        # NB: each distinct value screened once (a million images of 10^4 sites are 10^4 regex searches)
        column = table[name]
        for value in column.unique():  # NB: a coded (categorical) column's distinct values without its rows
            why = refused_value(value)
            if why is not None:
                row = int(np.flatnonzero((column == value).to_numpy())[0])
                # NB: the refusal stays (DESIGN §10), but it says how to pass a column that identifies nobody
                raise IdentifyingError(f"{where}: column {name!r} is refused: row {row} holds {why}; {_WAY_OUT[why]}")


def blank_roi_names(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """`table` (an ROI table with a ``name`` column) with every name the value rule refuses blanked; each blanked
    row is listed on the ``gpucnr`` logger (row number only, never the name). The ROIs themselves are kept."""
    if "name" not in table.columns or not len(table):
        return table
    names = table["name"]
    bad = [v for v in names.unique() if isinstance(v, str) and refused_value(v)]  # NB: no per-row Python string
    if not bad:
        return table
    refused = np.flatnonzero(names.isin(bad).to_numpy()).tolist()
    if not refused:
        return table
    import logging

    out = table.copy()
    col = out.columns.get_loc("name")
    out.iloc[refused, col] = ""
    logging.getLogger("gpucnr").warning("%s: %d ROI name(s) that may identify a patient were blanked (rows %s)",
                                        where, len(refused), ", ".join(map(str, refused[:10])))
    return out
