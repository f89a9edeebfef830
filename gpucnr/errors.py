"""Coded errors: every failure a user can cause has a stable code and names the image, file or row."""

from __future__ import annotations

__all__ = ["GpucnrError", "InputError", "LabelRangeError", "OptionError", "OptionTypeError", "RoiTableError",
           "ShapeMismatchError"]


class GpucnrError(Exception):
    """Base of gpucnr's errors; ``code`` is stable across releases, the message is for people."""

    code = "error"
    #: The process exit status a command ends with when this error stops it (DESIGN §10: 2 refused or a coded
    #: error, 4 stopped by an environmental failure after partial work).
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(f"[{self.code}] {message}")
        self.reason = message


class InputError(GpucnrError, ValueError):
    """An input array or option that cannot be measured."""

    code = "bad-input"


class ShapeMismatchError(InputError):
    """Images and a label array of different shapes."""

    code = "shape-mismatch"


class LabelRangeError(InputError):
    """A label array holding ids beyond int64 (ROI ids are int64 everywhere: the ``roi`` dimension)."""

    code = "label-range"


class RoiTableError(InputError):
    """An ROI table with a missing column, a non-integer coordinate, an unknown kind or a duplicate."""

    code = "roi-table"


class OptionError(InputError):
    """A measurement option with a value outside its choices or range."""

    code = "bad-option"


class OptionTypeError(OptionError, TypeError):
    """A measurement option of the wrong type (a float dilation, a string for ``signed``)."""
