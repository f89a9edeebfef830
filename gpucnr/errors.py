"""Coded errors: every failure a user can cause has a stable code and names the image, file or row."""

from __future__ import annotations

import errno

__all__ = ["EnvironmentFailure", "GpucnrError", "InputError", "Interrupted", "LabelRangeError", "NoticeWarning",
           "OptionError", "OptionTypeError", "RoiTableError", "ShapeMismatchError", "Terminated", "console_text",
           "environment_error", "raise_if_exhausted"]


class GpucnrError(Exception):
    """Base of gpucnr's errors; ``code`` is stable across releases, the message is for people."""

    code = "error"
    #: The process exit status a command ends with when this error stops it (DESIGN §10: 2 refused or a coded
    #: error, 4 stopped by an environmental failure after partial work).
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(f"[{self.code}] {message}")
        self.reason = message


class NoticeWarning(UserWarning):
    """What a command did not do with its inputs and must say (a stack not found, so no figure): one
    ``gpucnr: warning:`` line on stderr from the CLI, a warning in Python."""


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


class EnvironmentFailure(GpucnrError):
    """The machine, not the data: memory, disk, threads or processes ran out (DESIGN §10: exit 4)."""

    code = "environment"
    exit_code = 4


def environment_error(e: BaseException) -> EnvironmentFailure | None:
    """The coded form of an environmental failure that escaped a command (MemoryError, OSError such as ENOSPC or
    EACCES, "can't start new thread"), or None for anything else. The message names the failure, never a file
    name (file names can carry a patient's name)."""
    if isinstance(e, MemoryError):
        return EnvironmentFailure("out of memory (MemoryError); free memory or use smaller batches, then rerun")
    if isinstance(e, RuntimeError) and "can't start new thread" in str(e):
        return EnvironmentFailure("the system refused a new thread (limits on threads or address space: ulimit -u "
                                  "/ -v); raise them or use fewer workers, then rerun")
    if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
        name = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
        why = e.strerror or "no detail"
        return EnvironmentFailure(f"an operating-system error stopped the command ({name}: {why})")
    return None


def raise_if_exhausted(e: BaseException) -> None:
    """Raise the coded `EnvironmentFailure` if `e` is the machine running out (MemoryError, "can't start new
    thread"): for the broad handlers that turn a reader's failure into "damaged data", which it is not."""
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't start new thread" in str(e)):
        raise environment_error(e) from None


def console_text(text: str) -> str:
    """`text` for one console line: control characters (a newline in a path would forge a line) and lone
    surrogates (bytes of a name that is not UTF-8) as ``\\xNN`` escapes."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


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
