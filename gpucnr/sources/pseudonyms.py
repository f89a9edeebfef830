"""Keyed pseudonyms for patient, study, series and instance identifiers (DESIGN §8)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from gpucnr.errors import InputError

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
    if path.exists():
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise InputError(f"key file {path} does not hold {2 * KEY_BYTES} hex digits (a gpucnr key)")
        return key
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex() + "\n")
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
