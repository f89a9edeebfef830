"""Filtering rules: where a group's CNR is cut — an absolute threshold, a quantile of the group, or a robust z-cut.

A rule is written ``KIND:VALUE`` (``abs:1.5``, ``quantile:0.05``, ``mad:3``) on the command line and in the Python
API alike; `parse_rule` reads it and `Rule.cuts` gives every group's cut value in one pass (`gpucnr.grouping`).
A unit is dropped when its CNR is strictly below its group's cut; a NaN cut drops nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

from gpucnr.errors import OptionError
from gpucnr.grouping import Segments, segments

__all__ = ["DEFAULT_RULE", "MAD_SCALE", "RULE_FORMS", "Rule", "RuleError", "parse_rule"]

#: Makes the MAD a consistent estimator of the standard deviation under normality (1 / Φ⁻¹(0.75)).
MAD_SCALE = 1.4826
#: The accepted forms, as error messages and help texts name them.
RULE_FORMS = ("abs:T (drop CNR < T, T a number; abs:1.5 is the default), quantile:P (0 < P < 1: drop CNR < the "
              "group's P-quantile, numpy's linear method; groups of fewer than 1/P units drop nothing), mad:K (K >= 0: "
              "drop CNR < median - K x 1.4826 x MAD of the group; a MAD of 0 drops nothing)")


class RuleError(OptionError):
    """A filtering rule that is not one of the accepted forms (`RULE_FORMS`)."""

    code = "bad-rule"


@dataclass(frozen=True)
class Rule:
    """One filtering rule.

    Attributes
    ----------
    kind : {"abs", "quantile", "mad"}
    value : float
        T (any number but NaN; ±inf drop all / keep all), P (0 < P < 1) or K (finite, >= 0).
    """

    kind: str
    value: float

    def __str__(self) -> str:
        # NB: repr keeps every digit (0.1 stays "0.1"); a whole number is written without ".0" (mad:3)
        v = self.value
        return f"{self.kind}:{int(v) if math.isfinite(v) and v.is_integer() and abs(v) < 2**53 else v!r}"

    def cuts(self, seg: Segments) -> np.ndarray:
        """The cut of every group: float64 (G,); NaN where the rule drops nothing in the group.

        Parameters
        ----------
        seg : gpucnr.grouping.Segments
            The finite CNR of the usable units (flagged ones left out) grouped by their group code.

        Notes
        -----
        ``abs:T``: T for every group. ``quantile:P``: ``numpy.quantile(group, P, method="linear")``; NaN for a
        group of fewer than 1/P values. ``mad:K``: ``median − K · 1.4826 · MAD`` with ``MAD = median(|x −
        median|)`` (numpy.median: the mean of the two middle values for an even count); NaN for a MAD of 0 (most
        values equal: no spread to cut on) and for an empty group.
        """
        if self.kind == "abs":
            return np.full(seg.n_groups, self.value)
        if self.kind == "quantile":
            cut = seg.quantile([self.value])[:, 0]
            # NB: a 5 % quantile of fewer than 20 values is the minimum or near it: it would drop a unit by
            # construction, not because it is poor.
            return np.where(seg.count < 1.0 / self.value, np.nan, cut)
        centre = seg.median()
        deviation = np.abs(seg.values - centre[seg.codes])
        mad = segments(deviation, seg.codes, seg.n_groups).median()
        with np.errstate(invalid="ignore"):
            cut = centre - self.value * MAD_SCALE * mad
        return np.where(mad > 0, cut, np.nan)


#: What a threshold means when no rule is named: today's absolute 1.5.
DEFAULT_RULE = Rule("abs", 1.5)


def parse_rule(rule) -> Rule:
    """A `Rule` from ``"abs:1.5"``, ``"quantile:0.05"``, ``"mad:3"`` (or a `Rule`, returned as is).

    Raises
    ------
    RuleError
        ``bad-rule``: not a string of one of the accepted forms (`RULE_FORMS`), or a value out of its range.
    """
    if isinstance(rule, Rule):
        return _checked(rule.kind, rule.value, rule)
    if not isinstance(rule, str):
        raise RuleError(f"a rule is text such as 'mad:3', not {type(rule).__name__}; accepted: {RULE_FORMS}")
    kind, sep, text = rule.strip().partition(":")
    kind = kind.strip().lower()
    try:
        value = float(text)
    except ValueError:
        value = None
    if not sep or kind not in ("abs", "quantile", "mad") or value is None:
        raise RuleError(f"{rule!r} is not a rule; accepted: {RULE_FORMS}")
    return _checked(kind, value, rule)


def _checked(kind: str, value, given) -> Rule:
    if kind not in ("abs", "quantile", "mad") or isinstance(value, bool) or not isinstance(value, Real):
        raise RuleError(f"{given!r} is not a rule; accepted: {RULE_FORMS}")
    value = float(value)
    ok = {"abs": not math.isnan(value), "quantile": 0.0 < value < 1.0,
          "mad": math.isfinite(value) and value >= 0.0}[kind]
    if not ok:
        raise RuleError(f"{given!r} is out of range; accepted: {RULE_FORMS}")
    return Rule(kind, value)
