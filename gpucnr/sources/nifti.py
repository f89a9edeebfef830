"""NIfTI-1 / NIfTI-2 volumes and label maps (nibabel), read inside worker processes.

A volume is reoriented to RAS+ by flips and transposes only (`io_orientation` + `apply_orientation` on the
unscaled data: native dtype, no resampling) and stored as the slices along its third axis, each shown as
radiologists do: ``image[row, col] = vol[I-1-col, J-1-row, k]`` (DESIGN §9). scl_slope / scl_inter become the
image's slope and intercept, as DICOM rescale. A 4-D file gives one channel per volume along its 4th axis.

Nothing read from a header's text fields (descrip, aux_file, db_name, intent_name, extensions) is returned or
quoted: records hold numbers and codes only.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib

import numpy as np

from gpucnr.sources.outcomes import Skip

__all__ = ["GZIP", "affine_mismatch", "decode", "kind", "read_labels", "reorient", "scan", "slice_of"]

GZIP = b"\x1f\x8b"
#: intent codes of files whose 4th/5th axes are not volumes of one quantity (vectors, matrices, meshes, colours)
_REFUSED_INTENTS = {1004: "a general matrix", 1005: "a symmetric matrix", 1006: "a displacement field",
                    1007: "a vector field", 1008: "a point set", 1009: "a triangle mesh", 1010: "quaternions",
                    2003: "RGB vectors", 2004: "RGBA vectors", 2005: "a shape"}
#: stored dtypes of images (64-bit integers only in label maps: the kernels' exact sums need headroom)
_IMAGE_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "f4", "f8"}
_LABEL_DTYPES = _IMAGE_DTYPES | {"u8", "i8"}
#: a declared volume this many times larger than its gzip file is a decompression bomb, not merely too large
_MAX_RATIO = 1000
#: a label map's affine must match its image's within these (translation in mm; the 3x3 part, i.e. direction
#: cosines times spacing)
TRANSLATION_TOL = 1e-3
LINEAR_TOL = 1e-4


def kind(head: bytes) -> str | None:
    """"nifti1" / "nifti2" for the first bytes of a single-file NIfTI (inflated when gzip), "pair" for the header
    of a .hdr/.img pair, else None."""
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        if head[:4] in ((348).to_bytes(4, "little"), (348).to_bytes(4, "big")):
            return "nifti1" if head[344:347] == b"n+1" else "pair"
    if len(head) >= 12 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        if head[:4] in ((540).to_bytes(4, "little"), (540).to_bytes(4, "big")):
            return "nifti2" if head[4:7] == b"n+2" else "pair"
    return None


def gzip_head(path, n: int = 544) -> bytes:
    """The first `n` inflated bytes of a gzip file (bounded: a bomb costs nothing here)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = b""
    with open(path, "rb") as fh:
        while len(out) < n and (chunk := fh.read(4096)):
            out += inflater.decompress(chunk, n - len(out))
            if inflater.eof:
                break
    return out


def _open(path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")  # NB: closed by the caller's `with`


def _header(fh, version: int):
    import nibabel as nib

    klass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        # NB: check=False: nibabel's checks would fix or refuse silently; ours below give codes
        return klass.from_fileobj(fh, check=False)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise Skip("truncated" if isinstance(e, EOFError) else "decode-error",
                   f"the NIfTI header cannot be read ({type(e).__name__})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged header or extension block
        raise Skip("bad-header", f"the NIfTI header cannot be parsed ({type(e).__name__})") from None


def _geometry(hdr, *, labels: bool = False) -> dict:
    """Shape, dtype, orientation and spacing from a header; `Skip` for what gpucnr does not read."""
    from nibabel.orientations import aff2axcodes, io_orientation

    try:
        dim = [int(v) for v in hdr["dim"]]
        dtype = hdr.get_data_dtype()
    except Exception as e:  # noqa: BLE001 - an unknown datatype code
        raise Skip("unsupported-format", f"a NIfTI datatype gpucnr does not read ({type(e).__name__})") from None
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1:ndim + 1]):
        raise Skip("bad-header", "the NIfTI dimensions are out of range")
    shape = dim[1:ndim + 1]
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]  # NB: trailing unit axes (a 3-D volume written as 4-D with one volume) change nothing
    intent = int(hdr["intent_code"])
    if intent in _REFUSED_INTENTS:
        raise Skip("unsupported-format", f"a NIfTI of {_REFUSED_INTENTS[intent]} (intent code {intent}), not "
                   "volumes of one quantity")
    if len(shape) > 4:
        raise Skip("unsupported-format", f"a {len(shape)}-D NIfTI (gpucnr reads 2-D, 3-D and 4-D volumes)")
    if labels and len(shape) == 4:
        raise Skip("mask-shape", "the label map is 4-D; a label map holds one volume")
    shape = shape + [1] * (3 - len(shape))
    allowed = _LABEL_DTYPES if labels else _IMAGE_DTYPES
    if dtype.fields is not None or dtype.kind + str(dtype.itemsize) not in allowed:
        raise Skip("unsupported-format", f"NIfTI voxels of type {dtype.kind}{dtype.itemsize} (complex, RGB, 64-bit "
                   "integer or 128-bit float images are not read)")
    affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    if not np.isfinite(affine).all():
        raise Skip("bad-header", "the NIfTI affine is not finite")
    ornt = io_orientation(affine)
    if not np.isfinite(ornt).all():
        raise Skip("bad-header", "the NIfTI affine is degenerate (an axis without a direction)")
    zooms = [float(z) for z in hdr.get_zooms()[:3]] + [math.nan] * 3
    ras = [math.nan] * 3
    for i in range(3):
        ras[int(ornt[i, 0])] = abs(zooms[i])
    # NB: the RAS+ volume has shape (I, J, K); a slice is J rows x I columns
    ras_shape = [0, 0, 0]
    for i in range(3):
        ras_shape[int(ornt[i, 0])] = shape[i]
    return {"shape": shape, "dtype": dtype.newbyteorder("=").str, "affine": affine.tolist(),
            "ornt": ornt.tolist(), "rows": ras_shape[1], "columns": ras_shape[0], "slices": ras_shape[2],
            "channels": shape[3] if len(shape) == 4 else 1, "spacing_y": ras[1], "spacing_x": ras[0],
            "spacing_z": ras[2], "orientation": "".join(aff2axcodes(affine)),
            "vox_offset": int(hdr["vox_offset"]), "itemsize": dtype.itemsize}


def scan(path, key: bytes, max_bytes: int, max_volume_bytes: int, version: int, gz: bool) -> dict:
    """Header record of a NIfTI file: geometry, dtype, declared sizes and a content hash (duplicates).

    `max_bytes` bounds one slice, `max_volume_bytes` the whole file's voxels (``image-too-large`` from the header,
    before any voxel is read)."""
    del key  # NB: a NIfTI file carries no identifier gpucnr reads; its `case` is keyed by the driver
    size = os.path.getsize(path)
    with _open(path, gz) as fh:
        hdr = _header(fh, version)
    geo = _geometry(hdr)
    voxels = math.prod(geo["shape"])
    declared = voxels * geo["itemsize"]
    plane = geo["rows"] * geo["columns"] * geo["itemsize"]
    header_bytes = 352 if version == 1 else 544
    if geo["vox_offset"] < header_bytes:
        raise Skip("bad-header", f"vox_offset {geo['vox_offset']} points inside the NIfTI header")
    if declared > max_volume_bytes:
        code = "decompression-bomb" if gz and declared > size * _MAX_RATIO else "image-too-large"
        raise Skip(code, f"the volume declares {declared / 2**20:.1f} MiB, beyond --max-volume-mb "
                   f"({max_volume_bytes / 2**20:.0f} MiB)")
    if plane > max_bytes:
        raise Skip("image-too-large", f"a slice declares {plane / 2**20:.1f} MiB, beyond --max-image-mb "
                   f"({max_bytes / 2**20:.0f} MiB)")
    if not gz and size < geo["vox_offset"] + declared:
        raise Skip("truncated", f"the file ends before its voxel data does ({declared} bytes declared from offset "
                   f"{geo['vox_offset']}, {size} bytes on disk)")
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
    return {**geo, "format": "nifti", "version": version, "gzip": gz,
            "frames": geo["channels"] * geo["slices"], "photometric": "MONOCHROME2", "declared_bytes": declared,
            "dedup": digest.hexdigest(), "modality": "", "manufacturer": "", "model": "", "transfer_syntax": ""}


def _read(path, record: dict, *, labels: bool = False):
    """(unscaled voxels as stored, slope, intercept, header geometry) of a NIfTI file, inflated once, straight
    into one buffer of the volume's size (no second copy: the worker's memory is the volume and little more)."""
    if record is None:
        with open(path, "rb") as fh:
            gz = fh.read(2) == GZIP
    else:
        gz = record["gzip"]
    version = record["version"] if record is not None else None
    with _open(path, gz) as fh:
        if version is None:
            k = kind(fh.read(544))
            if k not in ("nifti1", "nifti2"):
                raise Skip("mask-unreadable" if labels else "bad-header", "not a single-file NIfTI")
            version = 1 if k == "nifti1" else 2
            fh.seek(0)
        hdr = _header(fh, version)
    geo = _geometry(hdr, labels=labels)
    if geo["vox_offset"] < (352 if version == 1 else 544):
        raise Skip("bad-header", f"vox_offset {geo['vox_offset']} points inside the NIfTI header")
    try:
        slope, inter = hdr.get_slope_inter()
    except Exception as e:  # noqa: BLE001 - nibabel's HeaderDataError: a valid slope with a non-finite intercept
        raise Skip("decode-error", f"the voxel data cannot be read ({type(e).__name__})") from None
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    if not (math.isfinite(slope) and math.isfinite(inter)) or slope == 0:
        slope, inter = 1.0, 0.0  # NB: as nibabel: no usable scaling means none
    dtype = hdr.get_data_dtype()
    buf = np.empty(math.prod(geo["shape"]) * dtype.itemsize, np.uint8)
    try:
        got = _inflate_into(path, geo["vox_offset"], buf) if gz else _read_into(path, geo["vox_offset"], buf)
    except (EOFError, zlib.error) as e:
        raise Skip("truncated" if isinstance(e, EOFError) else "decode-error",
                   f"the voxel data cannot be inflated ({type(e).__name__})") from None
    if got < buf.size:
        raise Skip("truncated", "the file ends before its voxel data does")
    # NB: NIfTI voxels run with the first axis fastest (Fortran order), as nibabel reads them
    data = np.ndarray(geo["shape"] if len(geo["shape"]) == 4 else geo["shape"][:3], dtype=dtype, buffer=buf,
                      order="F")
    if not data.dtype.isnative:
        data.byteswap(inplace=True)  # NB: in place: never a second copy of the volume
    return data.view(data.dtype.newbyteorder("=")), slope, inter, geo


#: compressed bytes read at a time, and the most inflated bytes one call of zlib returns
_READ_CHUNK = 2**20
_INFLATE_CHUNK = 4 * 2**20


def _inflate_into(path, offset: int, out: np.ndarray) -> int:
    """Inflate a gzip file (all its members, as `gzip` reads them) from inflated byte `offset` into `out`;
    returns the bytes written (fewer when the stream ends first). Python's ``GzipFile.readinto`` of a large
    buffer inflates into a bytes object of its size first, then copies it: twice the volume."""
    view = memoryview(out).cast("B")
    pos, skip, data, ended = 0, offset, b"", False
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as fh:
        while pos < out.size:
            if inflater.eof:
                data = inflater.unused_data or fh.read(_READ_CHUNK)
                if not data.lstrip(b"\0"):
                    break  # NB: the stream's end (or zero padding, which gzip ignores too): the caller sees `pos`
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # NB: another member follows
            elif not data:
                data = fh.read(_READ_CHUNK)
                ended = not data
            # NB: bounded output: what does not fit stays in unconsumed_tail (or in zlib, given b"" next)
            piece = inflater.decompress(data, min(_INFLATE_CHUNK, skip + out.size - pos))
            data = inflater.unconsumed_tail
            if not piece and ended and not inflater.eof:
                raise EOFError("the gzip stream ends inside a member")
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            view[pos:pos + len(piece)] = piece
            pos += len(piece)
    return pos


def _read_into(path, offset: int, out: np.ndarray) -> int:
    """Read an uncompressed file from byte `offset` into `out`; returns the bytes read."""
    view, pos = memoryview(out).cast("B"), 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        while pos < out.size and (n := fh.readinto(view[pos:])):
            pos += n
    return pos


def reorient(data: np.ndarray, ornt) -> np.ndarray:
    """The RAS+ view of `data` (flips and transposes of its first three axes; a view where numpy allows)."""
    from nibabel.orientations import apply_orientation

    return apply_orientation(data, np.asarray(ornt, dtype=np.float64))


def slice_of(ras: np.ndarray, k: int, channel: int | None = None) -> np.ndarray:
    """Slice `k` of a RAS+ volume as shown radiologically: ``image[row, col] = vol[I-1-col, J-1-row, k]``.

    A view: pickling it for the driver copies one slice at a time, so a worker never holds the volume twice."""
    plane = ras[:, :, k] if channel is None else ras[:, :, k, channel]
    return plane[::-1, ::-1].T


def decode(path, record: dict, options: dict) -> list[dict]:
    """Every slice of every channel as {"pixels", "slope", "intercept", "padding", "photometric", "color",
    "channel", "frame"}, channel-major; a slice with NaN/inf voxels under ``--nonfinite skip`` is
    {"skip": (code, reason), "channel", "frame"} instead (the other slices are stored)."""
    data, slope, inter, geo = _read(path, record)
    if geo["shape"] != record["shape"] or geo["dtype"] != record["dtype"]:
        raise Skip("bad-header", "the NIfTI header changed between the scan and the decoding")
    ras = reorient(data, geo["ornt"])
    out = []
    four = ras.ndim == 4
    skip_nonfinite = options.get("nonfinite") == "skip" and ras.dtype.kind == "f"
    for c in range(geo["channels"]):
        for k in range(geo["slices"]):
            image = slice_of(ras, k, c if four else None)
            if skip_nonfinite:
                bad = int((~np.isfinite(image)).sum())
                if bad:
                    out.append({"skip": ("nonfinite", f"{bad} voxel(s) of the slice are NaN or infinite "
                                         "(--nonfinite skip)"), "channel": c, "frame": k})
                    continue
            out.append({"pixels": image, "slope": slope, "intercept": inter, "padding": math.nan,
                        "photometric": "MONOCHROME2", "color": "", "channel": c, "frame": k})
    return out


def affine_mismatch(a, b) -> str | None:
    """Why two affines differ beyond DESIGN's tolerance (translation 1e-3 mm, 3x3 part 1e-4), or None."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dt = float(np.abs(a[:3, 3] - b[:3, 3]).max())
    dl = float(np.abs(a[:3, :3] - b[:3, :3]).max())
    if dt > TRANSLATION_TOL:
        return f"its affine's translation differs from the image's by {dt:.3g} mm (tolerance {TRANSLATION_TOL:g})"
    if dl > LINEAR_TOL:
        return (f"its affine's direction cosines x spacing differ from the image's by {dl:.3g} (tolerance "
                f"{LINEAR_TOL:g})")
    return None


def read_labels(path, record: dict) -> list[np.ndarray]:
    """Integer label planes (int32) of a NIfTI label map for every slice of its image (`record`, repeated per
    channel), reoriented as the image. ``mask-shape`` for another shape or affine, ``mask-labels`` for values
    that are not labels (non-integral, negative, non-finite), ``mask-unreadable`` otherwise."""
    try:
        data, slope, inter, geo = _read(path, None, labels=True)
    except Skip as e:
        if e.code in ("mask-shape", "mask-unreadable"):
            raise
        raise Skip("mask-unreadable", f"the label map cannot be read ({e.code})") from None
    if geo["shape"][:3] != record["shape"][:3]:
        raise Skip("mask-shape", f"the label map is {'x'.join(map(str, geo['shape']))} voxels, the image "
                   f"{'x'.join(map(str, record['shape'][:3]))}")
    why = affine_mismatch(geo["affine"], record["affine"])
    if why is not None:
        raise Skip("mask-shape", f"the label map's {why.removeprefix('its ')}")
    if (slope, inter) != (1.0, 0.0) or data.dtype.kind == "f":
        # NB: scaled or float label maps are labels when every value is a whole number
        values = data.astype(np.float64) * slope + inter
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise Skip("mask-labels", "the label map holds non-integral or non-finite values")
        data = values
    if data.size and data.min() < 0:
        raise Skip("mask-labels", "the label map holds negative values")
    if data.size and data.max() > np.iinfo(np.int32).max:
        raise Skip("mask-labels", "the label map holds values beyond 2**31 - 1")
    if data.dtype.kind not in "iu" or data.dtype.itemsize > 4:
        data = data.astype(np.int32)  # NB: in range (checked above); stored as int32 by the writer anyway
    ras = reorient(data, record["ornt"])
    # NB: views in the label map's own integer dtype (the writer stores int32); the list repeats them per channel
    # and pickle sends each once
    planes = [slice_of(ras, k) for k in range(record["slices"])]
    return planes * record["channels"]
