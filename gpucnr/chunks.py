"""A stack's image chunks, encoded where the pixels are: the one definition of an inner chunk's bytes.

An inner chunk of a stack (DESIGN §5) is one image on its bucket's canvas (its shape rounded up to 64 px, zeros
beyond its valid extent), little-endian, compressed (blosc-lz4 or blosc-zstd with bit-shuffle, or zstd), then its
crc32c.
`StackWriter` writes such chunks, and `gpucnr ingest`'s worker processes encode them too (`encode_image`), so
that compression runs in parallel beside the decoders instead of in the driver alone (issue 18). NumPy and
numcodecs only: worker processes import this without Zarr.
"""

from __future__ import annotations

import math

import numpy as np

from gpucnr.shardfiles import with_crc

__all__ = ["CANVAS", "array_chunk", "canvas", "decode_chunk", "encode_image", "encode_plane", "encoder"]

#: canvas granularity: an image's bucket has its shape rounded up to a multiple of this
CANVAS = 64


def canvas(shape) -> tuple[int, int]:
    """The canvas of an image shape: each side rounded up to a multiple of `CANVAS`."""
    return tuple(int(math.ceil(s / CANVAS) * CANVAS) for s in shape)


def encoder(compressor: str):
    """The numcodecs codec of a stack's `compressor` ("blosc-lz4", "blosc-zstd" or "zstd"), as zarr's codecs in
    the stack's metadata describe it (`store._compressors`: blosc with bit-shuffle, lz4 level 5 or zstd level 3;
    plain zstd level 3)."""
    import numcodecs

    if compressor == "blosc-lz4":
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    if compressor == "blosc-zstd":
        return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    if compressor == "zstd":
        return numcodecs.Zstd(level=3)
    raise ValueError(f"compressor must be blosc-lz4, blosc-zstd or zstd, got {compressor!r}")


def encode_plane(plane: np.ndarray, codec) -> bytes:
    """One inner chunk: `plane` (already on its canvas) little-endian, encoded, then its crc32c."""
    little = np.ascontiguousarray(plane, dtype=plane.dtype.newbyteorder("<"))
    return with_crc(codec.encode(little))


def _on_canvas(plane: np.ndarray, shape: tuple[int, int], dtype) -> np.ndarray:
    if plane.shape == shape and plane.dtype == dtype:
        return plane
    out = np.zeros(shape, dtype)
    out[: plane.shape[0], : plane.shape[1]] = plane
    return out


def encode_image(image: np.ndarray, labels: np.ndarray | None, *, compressor: str, labelled: bool,
                 codec=None) -> dict:
    """An image (and its label plane) as the chunks `StackWriter.add_encoded` stores: a plain dict that pickles
    small (the compressed bytes, not the pixels).

    Parameters
    ----------
    image : 2-D array
        Integer, float or bool (stored as uint8), native byte order.
    labels : 2-D integer array or None
        Its labels (stored int32); None gives a plane of zeros when `labelled`.
    compressor : {"blosc-lz4", "blosc-zstd", "zstd"}
    labelled : bool
        Whether the stack has label planes.
    codec : optional
        `encoder(compressor)`, to reuse one.

    Returns
    -------
    dict
        shape, dtype (native), canvas, compressor, image (chunk bytes), labels (chunk bytes or None), label_ids
        (sorted nonzero label values), has_labels (whether `labels` was given).
    """
    if image.ndim != 2 or image.dtype.kind not in "biuf" or min(image.shape) < 1:
        raise ValueError(f"an image must be a non-empty 2-D integer or float array, got {image.shape} {image.dtype}")
    if image.dtype == bool:
        image = image.astype(np.uint8)
    dtype = image.dtype.newbyteorder("=")
    codec = codec or encoder(compressor)
    box = canvas(image.shape)
    out = {"shape": tuple(int(v) for v in image.shape), "dtype": dtype.str, "canvas": box, "compressor": compressor,
           "image": encode_plane(_on_canvas(image, box, dtype), codec), "labels": None, "label_ids": [],
           "has_labels": labels is not None}
    if labels is not None:
        if not labelled:
            raise ValueError("labels given for a stack without label planes")
        if labels.shape != image.shape or labels.dtype.kind not in "iub":
            raise ValueError(f"labels of shape {labels.shape} and dtype {labels.dtype} for an image of shape "
                             f"{image.shape}")
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) > np.iinfo(np.int32).max):
            raise ValueError("labels must lie in [0, 2**31 - 1] (they are stored as int32)")
        out["label_ids"] = [int(v) for v in np.unique(labels) if v != 0]
    if labelled:
        plane = np.zeros(box, np.int32)
        if labels is not None:
            plane[: labels.shape[0], : labels.shape[1]] = labels
        out["labels"] = encode_plane(plane, codec)
    return out


def decode_chunk(chunk: bytes, shape: tuple[int, int], dtype, codec) -> np.ndarray:
    """The plane of an inner chunk (`encode_plane`'s bytes, crc32c last; checked by the caller)."""
    raw = codec.decode(chunk[:-4])
    return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(np.dtype(dtype))


def array_chunk(values: np.ndarray, dtype, *, level: int = 3, crc: bool = True) -> bytes:
    """One whole chunk of a plain (unsharded) zarr array as zarr's codecs encode it: bytes little-endian in C order
    (vlen-utf8 for ``dtype`` str), then zstd at `level` without its own checksum, then, with `crc`, the crc32c
    codec. numcodecs, which zarr's codecs call: the bytes are zarr's (tests read them back through zarr)."""
    import numcodecs

    if dtype is str:
        raw = numcodecs.VLenUTF8().encode(np.asarray(values, dtype=object))
    else:
        raw = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    out = numcodecs.Zstd(level=level).encode(raw)
    return with_crc(out) if crc else bytes(out)
