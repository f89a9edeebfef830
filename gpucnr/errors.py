"""Coded errors: every failure a user can cause has a stable code and names the image, file or row."""

from __future__ import annotations

__all__ = ["GpucnrError", "InputError", "Interrupted", "OptionError", "OptionTypeError", "RoiTableError",
           "ShapeMismatchError", "Terminated"]


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


class RoiTableError(InputError):
    """An ROI table with a missing column, a non-integer coordinate, an unknown kind or a duplicate."""

    code = "roi-table"


class OptionError(InputError):
    """A measurement option with a value outside its choices or range."""

    code = "bad-option"


class OptionTypeError(OptionError, TypeError):
    """A measurement option of the wrong type (a float dilation, a string for ``signed``)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (the command line installs the handler), so that one
    ``except KeyboardInterrupt`` stops cleanly on either."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a command after it had written something: the message says what was done and
    how to continue. Exit status 130 (SIGINT) or 143 (SIGTERM), DESIGN §10. A KeyboardInterrupt still, so that
    an ``except Exception`` in a caller never swallows it."""

    code = "interrupted"

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.reason = message
        if isinstance(cause, Interrupted):
            self.signal = cause.signal  # NB: an interruption of an inner step (enhance's run) told again
        else:
            self.signal = "SIGTERM" if isinstance(cause, Terminated) else "SIGINT"
        self.exit_code = 143 if self.signal == "SIGTERM" else 130
