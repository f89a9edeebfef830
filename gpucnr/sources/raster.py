"""PNG, TIFF and JPEG images and mask files (Pillow), read inside worker processes.

Gray images keep their stored values and dtype; colour goes through `colour.to_gray`; palette images are
expanded through their palette first. Multi-page TIFFs give one image per page. JPEG: baseline and progressive
8-bit (gray, RGB; CMYK is refused as ``unsupported-format``), its EXIF orientation never applied (masks are not
rotated either); nothing of its EXIF, COM or XMP segments is read.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np

from gpucnr.sources.colour import to_gray
from gpucnr.sources.outcomes import Skip

__all__ = ["MAGIC", "decode", "full_digest", "probe", "read_pages", "scan"]

MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"II*\x00": "tiff", b"MM\x00*": "tiff", b"\xff\xd8\xff": "jpeg"}
#: Pillow mode -> bits per pixel once decoded (1-bit pages decode to a byte per pixel), for the declared size
#: (checked before any page is decoded)
_BITS = {"1": 8, "L": 8, "P": 8, "LA": 16, "PA": 16, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32,
         "F": 32, "RGB": 24, "RGBA": 32, "RGBX": 32, "CMYK": 32, "YCbCr": 24, "LAB": 24, "HSV": 24}
_GRAY = ("1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_MAX_RATIO = 100


def _open(path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # NB: the size check below is ours, in bytes, against --max-image-mb
    try:
        return Image.open(path)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise Skip("bad-header" if not isinstance(e, EOFError) else "truncated",
                   f"the image header cannot be read ({type(e).__name__})") from None


def _pages(im):
    n = getattr(im, "n_frames", 1) or 1
    for i in range(n):
        if i:
            im.seek(i)
        yield im


def scan(path, key: bytes, max_bytes: int) -> dict:
    """Header record of a PNG/TIFF: pages, sizes, mode, declared bytes and a content hash (duplicates)."""
    size = os.path.getsize(path)
    with _open(path) as im:
        fmt = (im.format or "").lower()
        declared, shapes, modes, fixes = 0, [], [], []
        if fmt == "png":
            _check_png(path)
        try:
            for page in _pages(im):
                w, h = page.size
                mode = page.mode
                if mode not in _BITS:
                    raise Skip("unsupported-format", f"the raster mode {mode!r} is not read")
                fixes.append(_tiff_fix(page) if fmt == "tiff" else None)
                declared += math.ceil(w * h * _BITS[mode] / 8)
                shapes.append((h, w))
                modes.append(mode)
        except Skip:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged page directory
            raise Skip("bad-header", f"the page directory cannot be read ({type(e).__name__})") from None
    if declared > max_bytes:
        code = "decompression-bomb" if declared > size * _MAX_RATIO else "image-too-large"
        raise Skip(code, f"the image declares {declared / 2**20:.1f} MiB ({size} bytes on disk), beyond the limit "
                   f"of {max_bytes / 2**20:.0f} MiB")
    return {"format": fmt, "frames": len(shapes), "rows": shapes[0][0], "columns": shapes[0][1],
            "photometric": "MONOCHROME2", "modes": modes, "fixes": fixes, "declared_bytes": declared,
            "dedup": None, "dedup_probe": probe(path, size),
            "modality": "", "manufacturer": "", "model": "", "spacing_y": math.nan, "spacing_x": math.nan,
            "transfer_syntax": ""}


#: bytes per sampled block of `probe`, and blocks
_PROBE_BLOCK, _PROBE_BLOCKS = 4096, 16


def probe(path, size: int) -> str:
    """A cheap key of a file's bytes for duplicate detection: SHA-256 of its size and of 16 blocks of 4 KiB spread
    evenly over it (the whole file when it is shorter). Files with different keys differ; files with equal keys
    are compared by the SHA-256 of all their bytes (`full_digest`, asked for by the driver only for them): hashing
    every raster whole cost ~0.3 ms of CPU per 512x512 16-bit file, most of a TIFF's scan (issue 18)."""
    digest = hashlib.sha256(b"gpucnr probe\0" + size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        if size <= _PROBE_BLOCK * _PROBE_BLOCKS:
            digest.update(fh.read(size))
        else:
            for k in range(_PROBE_BLOCKS):
                fh.seek((size - _PROBE_BLOCK) * k // (_PROBE_BLOCKS - 1))
                digest.update(fh.read(_PROBE_BLOCK))
    return digest.hexdigest()


def full_digest(path) -> str:
    """SHA-256 of a file's bytes (the duplicate key of a raster whose `probe` another file shares)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_png(path) -> None:
    """Refuse what Pillow would read lossily: 16-bit colour and 16-bit gray+alpha PNGs become 8-bit."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 4, 6):
        raise Skip("unsupported-format", "a 16-bit colour or gray+alpha PNG (it would be read as 8-bit)")


def _tiff_fix(page) -> str | None:
    """How to recover a TIFF page's stored values from what Pillow returns, from its BitsPerSample (258),
    SamplesPerPixel (277) and SampleFormat (339) tags; `Skip` for layouts Pillow reads lossily."""
    tags = page.tag_v2
    bits = tags.get(258, (1,))
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    samples = int(tags.get(277, 1))
    form = tags.get(339, 1)
    form = form[0] if isinstance(form, tuple) else int(form)
    if samples >= 3 and bits > 8:
        raise Skip("unsupported-format", f"a {bits}-bit colour TIFF (it would be read as 8-bit)")
    if form == 3 and bits > 32:
        raise Skip("unsupported-format", "a 64-bit float TIFF (it would be read as 32-bit)")
    if samples == 1 and page.mode == "I" and bits == 32 and form == 1:
        return "uint32"  # NB: Pillow reads uint32 as int32: the same bits, viewed unsigned
    if samples == 1 and page.mode == "L" and bits == 8 and form == 2:
        return "int8"
    if samples == 1 and page.mode in ("I", "I;16S") and bits == 16 and form == 2:
        return "int16"  # NB: Pillow widens int16 to int32; the values fit back exactly
    return None


def read_pages(path, expect=None) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(mode, array, rgb) of every page, decoded: palette pages give their index array and their RGB expansion.

    `expect`: the (rows, columns) each page must have (a mask's, its image's frames): a page count or a declared
    size that differs is ``mask-shape`` before anything is decoded, so a mask declaring a huge canvas costs no
    memory (its image's own size was checked against --max-image-mb)."""
    out = []
    with _open(path) as im:
        if expect is not None and (getattr(im, "n_frames", 1) or 1) != len(expect):
            raise Skip("mask-shape", f"has {getattr(im, 'n_frames', 1)} page(s), the image {len(expect)} frame(s)")
        try:
            for k, page in enumerate(_pages(im)):
                if expect is not None and (page.size[1], page.size[0]) != tuple(expect[k]):
                    raise Skip("mask-shape", f"declares {page.size[0]}x{page.size[1]} px, the image "
                               f"{expect[k][1]}x{expect[k][0]} px" + (f" (frame {k})" if len(expect) > 1 else ""))
                page.load()
                rgb = np.asarray(page.convert("RGB")) if page.mode in ("P", "PA") else None
                out.append((page.mode, np.asarray(page), rgb))
        except (MemoryError, Skip):
            raise
        except Exception as e:  # noqa: BLE001 - libpng/libtiff errors on bad bytes
            truncated = isinstance(e, (EOFError, OSError)) and "truncated" in str(e).lower()
            raise Skip("truncated" if truncated else "decode-error",
                       f"the pixel data cannot be decoded ({type(e).__name__})") from None
    return out


def decode(path, record: dict, options: dict) -> list[dict]:
    """Every page as {"pixels", "slope", "intercept", "padding", "photometric", "color"} (see dicom.decode)."""
    out = []
    fixes = record.get("fixes") or []
    for k, (mode, arr, rgb) in enumerate(read_pages(path)):
        fix = fixes[k] if k < len(fixes) else None
        if fix == "uint32":
            arr = arr.astype(np.int32, copy=False).view(np.uint32)
        elif fix == "int8":
            arr = arr.view(np.int8)
        elif fix == "int16":
            arr = arr.astype(np.int16)
        color = ""
        if rgb is not None:
            arr, mode = rgb, "RGB"
        if mode in ("LA",):
            arr = arr[..., 0]
        elif mode in ("RGB", "RGBA", "RGBX"):
            if options["color"] == "skip":
                raise Skip("color", "a colour image (--color skip)")
            arr = to_gray(arr[..., :3], options["color"])
            color = options["color"]
        elif mode not in _GRAY:
            raise Skip("unsupported-format", f"the raster mode {mode!r} is not read")
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        if arr.dtype.byteorder not in "=|":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype.kind == "f" and options["nonfinite"] == "skip" and not np.isfinite(arr).all():
            raise Skip("nonfinite", f"{int((~np.isfinite(arr)).sum())} pixel(s) are NaN or infinite "
                       "(--nonfinite skip)")
        out.append({"pixels": np.ascontiguousarray(arr), "slope": 1.0, "intercept": 0.0, "padding": math.nan,
                    "photometric": "MONOCHROME2", "color": color})
    return out
