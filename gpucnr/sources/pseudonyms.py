"""Keyed pseudonyms for patient, study, series and instance identifiers (DESIGN §8)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from gpucnr.errors import InputError
from gpucnr.outputs import create_file
from gpucnr.sources.files import display_path

__all__ = ["ID_COLUMNS", "KEY_BYTES", "load_or_create_key", "pseudonym"]

#: Pseudonymous id columns, coarsest first: what ingest pseudonymises, and the only per-image columns a manifest
#: copies from the results.
ID_COLUMNS = ("patient_id", "study_id", "series_id", "instance_id")
KEY_BYTES = 32
#: Hex digits kept of the HMAC-SHA256: 80 bits, so a million patients collide with probability ~4e-13.
_DIGITS = 20


def load_or_create_key(path: Path) -> bytes:
    """The key in `path` (64 hex digits), created with owner-only permissions when the file does not exist.

    The key never goes into the stack: whoever holds stack and key could test guesses of a patient id.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        # NB: a link to nothing: creating the key would write wherever the link points
        raise InputError(f"key file {display_path(path)} is a symbolic link to nothing; remove it or point "
                         "--key-file at a key")
    if not os.path.lexists(path):
        key = secrets.token_bytes(KEY_BYTES)
        try:
            if create_file(path, (key.hex() + "\n").encode("ascii"), what="key file"):
                return key
        except OSError as e:
            raise InputError(f"key file {display_path(path)} cannot be created ({e.strerror or type(e).__name__})"
                             ) from None
    try:
        if not path.is_file():
            raise InputError(f"key file {display_path(path)} is not a file")
        st = os.lstat(path)
        if not path.is_symlink() and st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(path, 0o600)  # NB: a key readable by others is made the owner's only (never through a link)
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as e:
        raise InputError(f"key file {display_path(path)} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise InputError(f"key file {display_path(path)} does not hold {2 * KEY_BYTES} hex digits (a gpucnr key)")
    return key


def pseudonym(key: bytes, kind: str, value) -> str:
    """HMAC-SHA256 of (kind, value) under `key`, as 20 hex digits; "" for a missing or empty value.

    `kind` ("patient", "study", ...) keeps equal strings of different kinds apart.
    """
    if value is None:
        return ""
    text = str(value).strip()
    if not text:
        return ""
    return hmac.new(key, f"{kind}\x00{text}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:_DIGITS]
