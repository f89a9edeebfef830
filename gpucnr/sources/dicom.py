"""DICOM files (pydicom 3): header scan and pixel decoding, run inside worker processes.

The header scan reads up to the pixel data (`stop_before_pixels`, never `force`); decoding returns each
frame's stored values in their native dtype with its modality slope and intercept, padding value and
photometric interpretation (DESIGN §4–5). Nothing read from a file goes into a reason text: reasons name
codes, counts and standard transfer-syntax names only.
"""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np

from gpucnr.sources.colour import to_gray
from gpucnr.sources.outcomes import Skip
from gpucnr.sources.pseudonyms import pseudonym

__all__ = ["decode", "scan"]

_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", _DEFLATED}
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
#: a declared image this many times larger than its file is a decompression bomb rather than merely too large
_MAX_RATIO = 100
#: what a data set may hold beyond its pixels (header, overlays, private data) when deflated data are inflated
_HEADER_ALLOWANCE = 16 * 2**20


def _ts_name(uid) -> str:
    """The standard name of a transfer syntax, or a neutral phrase for a UID no standard defines (a crafted
    file could carry any text there)."""
    from pydicom._uid_dict import UID_dictionary

    entry = UID_dictionary.get(str(uid))
    return f"'{entry[0]}' ({uid})" if entry else "a transfer syntax no standard defines"


def _text(value, limit: int = 64) -> str:
    """A short printable ASCII form of a descriptive header value (modality, manufacturer, model)."""
    if value is None:
        return ""
    text = "".join(c for c in str(value) if 32 <= ord(c) < 127).strip()
    return text[:limit]


def _classify(e: BaseException) -> Skip:
    from pydicom.errors import InvalidDicomError

    if isinstance(e, Skip):
        return e
    if isinstance(e, MemoryError):
        return Skip("out-of-memory", "the header needs more memory than the per-file limit")
    if isinstance(e, InvalidDicomError):
        return Skip("not-an-image", "not a DICOM Part 10 file (no 'DICM' prefix or no file meta information)")
    if isinstance(e, (EOFError, struct.error)) or "end of file" in str(e).lower():
        return Skip("truncated", "the file ends inside its DICOM header")
    return Skip("bad-header", f"the DICOM header cannot be parsed ({type(e).__name__})")


def _inflate_check(path, max_bytes: int) -> None:
    """Inflate a deflated file's data set in bounded steps: a bomb is caught before pydicom inflates it whole."""
    from pydicom.filereader import read_preamble

    size = os.path.getsize(path)
    limit = max_bytes + _HEADER_ALLOWANCE
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        from pydicom.filereader import _read_file_meta_info

        _read_file_meta_info(fh)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := fh.read(2**16):
            try:
                total += len(inflater.decompress(chunk, limit + 1 - total))
            except zlib.error:
                raise Skip("decode-error", "the deflated data set is not a valid deflate stream") from None
            if total > limit or inflater.unconsumed_tail:
                raise Skip("decompression-bomb", f"the deflated data set expands beyond {limit / 2**20:.0f} MiB "
                           f"(--max-image-mb plus {_HEADER_ALLOWANCE // 2**20} MiB; {size} bytes on disk)")


def _functional(ds, frame: int, seq: str, attr: str):
    """An attribute from the per-frame, then the shared functional groups of an enhanced multi-frame object."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        fg = ds.get(groups)
        if fg and len(fg) > index:
            item = fg[index].get(seq)
            if item and attr in item[0]:
                return item[0][attr].value
    return None


def _spacing(ds) -> tuple[float, float]:
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or _functional(ds, 0, "PixelMeasuresSequence",
                                                                                     "PixelSpacing")
    try:
        y, x = (float(v) for v in value)
        return (y, x) if math.isfinite(y) and math.isfinite(x) else (math.nan, math.nan)
    except (TypeError, ValueError):
        return (math.nan, math.nan)


def _int(ds, keyword: str, default=None) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Skip("missing-attribute", f"{keyword} is missing or not a number") from None


def scan(path, key: bytes, max_bytes: int) -> dict:
    """Header record of a DICOM file: geometry, pixel format, pseudonymous ids, descriptive columns.

    Raises `Skip` for files that cannot be images: not Part 10, truncated header, no pixel data, an
    undecodable transfer syntax, a declared size beyond the data or beyond `max_bytes`.
    """
    import pydicom
    from pydicom.uid import UID

    size = os.path.getsize(path)
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        ts = UID(str(meta.get("TransferSyntaxUID", "")).strip())
        if not ts:
            group = meta.get("FileMetaInformationGroupLength")
            if group is None or 144 + int(group) > size:
                raise Skip("truncated", "the file ends inside its file meta information")
            raise Skip("bad-header", "the file meta information has no transfer syntax")
        if ts == _DEFLATED:
            _inflate_check(path, max_bytes)
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pos = fh.tell()
            head = fh.read(20)  # NB: the pixel data element's header and the first bytes of its value
            complete = not head and _ends_complete(ds, fh, size)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for bad bytes; each becomes a code
        raise _classify(e) from None
    try:
        return _record(ds, meta, ts, head, pos, size, key, max_bytes, complete=complete)
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom converts values lazily: a bad value raises only when read
        raise Skip("bad-header", f"a header attribute cannot be read ({type(e).__name__})") from None


def _record(ds, meta, ts, head: bytes, pos: int, size: int, key: bytes, max_bytes: int, *,
            complete: bool = False) -> dict:
    """The header record of `scan` from the data set read up to its pixel data; `complete`: the file ends exactly
    where its data set's last element does (`_ends_complete`)."""
    pixel = _pixel_element(head, ts) if ts != _DEFLATED else "deflated"
    if pixel is None:
        # NB: pydicom stops quietly at the end of a file: an image whose file ends inside an element, before its
        # pixel data, is truncated; one whose data set ends whole has no pixel data (e.g. the element was deleted)
        geometry = ds.get("Rows") is not None and ds.get("Columns") is not None
        if geometry or _image_class(meta, ds):
            # NB: a file cut exactly between two elements reads the same, so this stays a problem (exit 3), with a
            # reason that names both causes; an image without its pixels is never "not an image"
            if complete and geometry:
                raise Skip("missing-attribute", "an image object (it has rows and columns) whose data set ends "
                           "without a pixel data element: the element was removed, or the file was cut short "
                           "right before it")
            raise Skip("truncated", "an image object whose file ends before its pixel data")
        raise Skip("no-pixel-data", "a DICOM object without pixel data (not an image)")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1) if ds.get("NumberOfFrames") not in (None, "") else 1
    samples = _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated")
    if rows < 1 or cols < 1 or frames < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise Skip("missing-attribute", "rows, columns, frames, samples per pixel or bits allocated out of range")
    photometric = _text(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in _GRAY + _COLOUR:
        raise Skip("unsupported-format", "a photometric interpretation gpucnr does not read")
    declared = math.ceil(rows * cols * frames * samples * bits / 8)
    if photometric == "YBR_FULL_422" and ts in _NATIVE:
        declared = declared * 2 // 3  # NB: native 4:2:2 holds two samples per pixel, not three
    if ds.get("SOPClassUID") == _SEG_CLASS or meta.get("MediaStorageSOPClassUID") == _SEG_CLASS:
        raise Skip("segmentation", "a DICOM SEG object: labels of other images, not an image (give its folder "
                   "with --seg)")
    if declared > max_bytes:
        code = "decompression-bomb" if declared > size * _MAX_RATIO and ts not in _NATIVE else "image-too-large"
        raise Skip(code, f"the image declares {declared / 2**20:.1f} MiB, beyond the limit of "
                   f"{max_bytes / 2**20:.0f} MiB")
    if pixel == "encapsulated" and ts in _NATIVE:
        # NB: pydicom would return the item tags and fragments of the stream as pixels
        raise Skip("bad-header", f"encapsulated pixel data (undefined length) under the native transfer syntax "
                   f"{_ts_name(ts)}")
    if isinstance(pixel, int):  # native pixel data of known length
        if _holds_items(head, ts, pixel):
            raise Skip("bad-header", f"the pixel data holds an encapsulated stream (items) under the native "
                       f"transfer syntax {_ts_name(ts)}")
        if pixel < declared and not (bits == 1 and pixel >= declared - 1):
            raise Skip("declared-size", f"the header declares {declared} bytes of pixels, the pixel data element "
                       f"holds {pixel}")
        if pixel > declared + 1:  # NB: one pad byte makes an odd length even; more is not this image's data
            raise Skip("declared-size", f"the header declares {declared} bytes of pixels, the pixel data element "
                       f"holds {pixel}, more than one pad byte beyond")
        if size - pos - (12 if ts != "1.2.840.10008.1.2" else 8) < declared:
            raise Skip("truncated", f"the file ends inside its pixel data ({declared} bytes declared)")
    elif pixel == "encapsulated":
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(ts)
            available = decoder.is_available
            # NB: Pillow, the one decoder of a plain install for JPEG extended, decodes 8-bit samples only: a
            # 12-bit JPEG extended file would fail to decode; it is the transfer syntax that is unsupported
            if (available and ts == "1.2.840.10008.1.2.4.51" and set(decoder.available_plugins) <= {"pillow"}
                    and (_int(ds, "BitsStored") or bits) > 8):
                available = False
        except NotImplementedError:
            available = False
        if not available:
            raise Skip("unsupported-transfer-syntax", f"no installed decoder for {_ts_name(ts)}"
                       + ("; JPEG extended/lossless and JPEG-LS need the jpeg-gpl extra" if ts.startswith(
                           "1.2.840.10008.1.2.4.") else ""))
    spacing = _spacing(ds)
    instance = str(ds.get("SOPInstanceUID", "")).strip()
    native = _native_layout(ds, ts, pixel, head, pos, photometric, samples, bits, frames)
    return {
        "native": native,
        "format": "dicom", "transfer_syntax": str(ts), "rows": rows, "columns": cols, "frames": frames,
        "samples": samples, "photometric": photometric, "declared_bytes": declared,
        "modality": _text(ds.get("Modality")), "manufacturer": _text(ds.get("Manufacturer")),
        "model": _text(ds.get("ManufacturerModelName")), "spacing_y": spacing[0], "spacing_x": spacing[1],
        "patient_id": pseudonym(key, "patient", ds.get("PatientID")),
        "study_id": pseudonym(key, "study", ds.get("StudyInstanceUID")),
        "series_id": pseudonym(key, "series", ds.get("SeriesInstanceUID")),
        "instance_id": pseudonym(key, "instance", instance),
        "dedup": pseudonym(key, "instance", instance) if instance else None,
    }


def _native_layout(ds, ts, pixel, head: bytes, pos: int, photometric: str, samples: int, bits: int,
                   frames: int) -> dict | None:
    """Where and how the pixels of a little-endian, uncompressed, monochrome image lie in its file, with every
    attribute decoding needs, so that the decode pass reads them with NumPy alone (no second parse of the
    header); None for anything else, which pydicom decodes. The tests check both paths give the same values."""
    implicit = ts == "1.2.840.10008.1.2"
    if ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") or not isinstance(pixel, int):
        return None
    if head[:4] != b"\xe0\x7f\x10\x00" or (not implicit and head[4:6] not in (b"OB", b"OW")):
        return None  # NB: only (7FE0,0010) Pixel Data; float pixel data goes through pydicom
    if samples != 1 or photometric not in _GRAY or bits not in (8, 16, 32):
        return None
    if _int(ds, "BitsStored", bits) != bits or "ModalityLUTSequence" in ds or "PixelPaddingRangeLimit" in ds:
        return None  # NB: high bits to mask or sign-extend, a LUT, a padding range: pydicom's semantics apply
    signed = _int(ds, "PixelRepresentation", 0) == 1
    padding = _stored_value(ds, "PixelPaddingValue")
    return {"offset": pos + (8 if implicit else 12), "dtype": f"<{'i' if signed else 'u'}{bits // 8}",
            "rescale": [_rescale(ds, f) for f in range(frames)], "padding": padding,
            "photometric": _display_polarity(ds, photometric)}


def _decode_native(path, record: dict) -> list[dict]:
    """The frames of a file `_native_layout` described, read straight from its bytes."""
    layout = record["native"]
    count = record["rows"] * record["columns"] * record["frames"]
    arr = np.fromfile(path, dtype=layout["dtype"], count=count, offset=layout["offset"])
    if arr.size < count:
        raise Skip("truncated", "the pixel data is shorter than the image it declares")
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(record["frames"], record["rows"],
                                                                       record["columns"])
    padding = math.nan if layout["padding"] is None else float(layout["padding"])
    return [{"pixels": np.ascontiguousarray(arr[f]), "slope": a, "intercept": b, "padding": padding,
             "photometric": layout["photometric"], "color": ""} for f, (a, b) in enumerate(layout["rescale"])]


def _display_polarity(ds, photometric: str) -> str:
    """The display polarity that signed CNR follows: an INVERSE Presentation LUT Shape displays MONOCHROME2 data
    as MONOCHROME1 (and the reverse); the stored values stay as they are."""
    if photometric in _GRAY and str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        return "MONOCHROME1" if photometric == "MONOCHROME2" else "MONOCHROME2"
    return photometric


def _ends_complete(ds, fh, size: int) -> bool:
    """Whether the data set's last element ends exactly at the end of the file (pydicom drops an element cut short
    without a word): a defined length reaching `size`, or a sequence of undefined length whose delimitation item
    is the file's last 8 bytes. Read before any value of `ds` is converted (raw elements keep their offsets)."""
    if not len(ds):
        return False
    raw = ds.get_item(max(ds.keys()))
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if tell is None or length is None:
        return False
    if length != 0xFFFFFFFF:
        return tell + length == size
    fh.seek(max(size - 8, 0))
    return fh.read(8) in (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")


def _image_class(meta, ds) -> bool:
    """Whether the SOP class is one that carries pixel data (an image storage class, SEG, ...)."""
    from pydicom._uid_dict import UID_dictionary

    for uid in (meta.get("MediaStorageSOPClassUID"), ds.get("SOPClassUID")):
        entry = UID_dictionary.get(str(uid or "").strip())
        if entry and entry[1] == "SOP Class" and any(w in entry[0] for w in ("Image Storage", "Segmentation Storage",
                                                                              "Parametric Map Storage")):
            return True
    return False


def _holds_items(head: bytes, ts, length: int) -> bool:
    """Whether native pixel data of defined `length` starts like an encapsulated stream: an item tag (FFFE,E000)
    whose own length fits in the element (the Basic Offset Table, then fragments)."""
    start = 8 if ts == "1.2.840.10008.1.2" else 12
    value = head[start : start + 8]
    if len(value) < 8 or length < 8:
        return False
    order = ">" if ts == "1.2.840.10008.1.2.2" else "<"
    group, elem, item = struct.unpack(order + "HHI", value)
    return (group, elem) == (0xFFFE, 0xE000) and item % 2 == 0 and item <= length - 8


def _pixel_element(head: bytes, ts) -> int | str | None:
    """What follows the header: the native pixel data's length, "encapsulated", or None (no pixel data)."""
    if len(head) < 8:
        return None
    little = ts != "1.2.840.10008.1.2.2"
    order = "<" if little else ">"
    group, elem = struct.unpack(order + "HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        return None
    if ts == "1.2.840.10008.1.2":  # implicit VR: 4-byte length right after the tag
        length = struct.unpack("<I", head[4:8])[0]
    else:
        if len(head) < 12:
            return None
        length = struct.unpack(order + "I", head[8:12])[0]
    return "encapsulated" if length == 0xFFFFFFFF else length


def decode(path, record: dict, options: dict) -> list[dict]:
    """Every frame of a DICOM file: [{"pixels": 2-D array, "slope", "intercept", "padding", "photometric",
    "color"}], stored values in native byte order.

    `options`: color ("rec709" | "bt601" | "skip"), nonfinite ("skip" | "exclude").
    """
    if record.get("native"):
        return _decode_native(path, record)
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # noqa: BLE001 - see _classify
        raise _classify(e) from None
    try:
        arr = ds.pixel_array  # NB: YBR is converted to RGB, J2K sign mismatches corrected (pydicom 3 defaults)
    except (MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - decoders raise anything on bad bytes, Rust ones a BaseException
        text = str(e).lower()
        if "less than expected" in text or "end of" in text or "truncat" in text:
            raise Skip("truncated", "the pixel data is shorter than the image it declares") from None
        raise Skip("decode-error", f"the pixel data cannot be decoded ({type(e).__name__}; transfer syntax "
                   f"{_ts_name(record['transfer_syntax'])})") from None
    frames, rows, cols = record["frames"], record["rows"], record["columns"]
    photometric = record["photometric"]
    colour = photometric in _COLOUR
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:  # noqa: BLE001 - a broken palette is a decode error of this file
            raise Skip("decode-error", f"the palette cannot be applied ({type(e).__name__})") from None
    arr = np.asarray(arr)
    arr = arr.reshape((frames, rows, cols, 3) if colour else (frames, rows, cols))
    if arr.dtype.byteorder not in "=|":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if colour and options["color"] == "skip":
        raise Skip("color", "a colour image (--color skip)")
    if arr.dtype.kind == "f" and options["nonfinite"] == "skip" and not np.isfinite(arr).all():
        raise Skip("nonfinite", f"{int((~np.isfinite(arr)).sum())} pixel(s) are NaN or infinite (--nonfinite skip)")
    padding = _stored_value(ds, "PixelPaddingValue")
    limit = _stored_value(ds, "PixelPaddingRangeLimit")
    photometric = _display_polarity(ds, photometric)
    lut = "ModalityLUTSequence" in ds and not colour
    out = []
    for f in range(frames):
        pixels = arr[f]
        entry = {"slope": 1.0, "intercept": 0.0, "padding": math.nan, "color": "",
                 "photometric": photometric if photometric in _GRAY else "MONOCHROME2"}
        if colour:
            pixels = to_gray(pixels, options["color"])
            entry["color"] = options["color"]
        elif lut or limit is not None:
            # NB: float64 holds every integer of <= 32 bits exactly: the only change is the LUT's own mapping,
            # and padded pixels (a range here, which the kernels' single padding value cannot express) -> NaN.
            mask = None
            if padding is not None:
                lo, hi = sorted((int(padding), int(limit if limit is not None else padding)))
                mask = (pixels >= lo) & (pixels <= hi)
            pixels = apply_modality_lut(pixels, ds).astype(np.float64) if lut else pixels.astype(np.float64)
            if mask is not None:
                pixels[mask] = np.nan
            if not lut:
                entry["slope"], entry["intercept"] = _rescale(ds, f)
        else:
            entry["slope"], entry["intercept"] = _rescale(ds, f)
            if padding is not None:
                entry["padding"] = float(padding)
        entry["pixels"] = np.ascontiguousarray(pixels)
        out.append(entry)
    return out


def _stored_value(ds, keyword: str) -> int | None:
    """A padding value in the stored values' domain: some writers use US for signed data (63536 for -2000)."""
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        value, bits, signed = int(value), int(ds.get("BitsAllocated", 16)), int(ds.get("PixelRepresentation", 0))
    except (TypeError, ValueError):
        raise Skip("missing-attribute", f"{keyword} is not a number") from None
    if signed == 1 and value >= 2 ** (bits - 1):
        value -= 2**bits
    return value


def _rescale(ds, frame: int) -> tuple[float, float]:
    slope = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    slope = ds.get("RescaleSlope", 1) if slope is None else slope
    intercept = ds.get("RescaleIntercept", 0) if intercept is None else intercept
    try:
        a, b = float(slope if slope not in (None, "") else 1), float(intercept if intercept not in (None, "") else 0)
    except (TypeError, ValueError):
        raise Skip("missing-attribute", "the rescale slope or intercept is not a number") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a == 0:
        raise Skip("missing-attribute", "the rescale slope is zero or the slope/intercept not finite")
    return a, b
