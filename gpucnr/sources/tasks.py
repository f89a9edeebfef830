"""What a worker process does with one file: sniff its format, scan its header, decode its frames.

These run in `workers.IsolatedPool` children; everything they return is plain data (no value read from a
file except through a pseudonym or a sanitised descriptive field).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
import zlib

import numpy as np

from gpucnr import chunks
from gpucnr.shardfiles import flush_spool, held_bytes
from gpucnr.shardfiles import spool as spool_chunk
from gpucnr.sources import dicom, nifti, raster
from gpucnr.sources.outcomes import Skip
from gpucnr.sources.pseudonyms import pseudonym
from gpucnr.sources.rois import read_masks, read_seg
from gpucnr.sources.workers import Streamed, allow_memory

__all__ = ["decode_file", "flush", "hash_file", "held_bytes", "run", "scan_file", "scan_seg", "sniff"]

#: what the worker's loop calls (`workers._child`): decodes hold their spool writes, which go out together
flush = flush_spool

_quiet = _quiet_dicom = False


def _silence(dicom: bool = False) -> None:
    """Readers warn and log with header values in the text (pydicom's validation, Pillow's decoders): a worker
    prints none of it, so no identifier reaches the operator's console through a child's stderr. `dicom`: a
    DICOM file (or SEG) is about to be read: pydicom's validation is turned off first. pydicom is imported only
    then, so that a worker ingesting PNG or TIFF does not spend ~0.1 s of CPU importing it (issue 18)."""
    global _quiet, _quiet_dicom
    if not _quiet:
        warnings.simplefilter("ignore")
        for name in ("pydicom", "PIL", "highdicom", "pylibjpeg"):
            logging.getLogger(name).disabled = True
        _quiet = True
    if dicom and not _quiet_dicom:
        try:
            from pydicom import config

            config.settings.reading_validation_mode = config.IGNORE
        except ImportError:
            pass
        _quiet_dicom = True


def sniff(path) -> str:
    """"dicom", "png", "tiff", "jpeg", "nifti1" or "nifti2" (gzip or not) from the first bytes; never from the
    extension."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(544)
    except OSError as e:
        raise Skip("unreadable", f"the file cannot be read ({type(e).__name__})") from None
    if not head:
        raise Skip("empty-file", "the file has zero bytes")
    if head[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in raster.MAGIC.items():
        if head.startswith(magic):
            return fmt
    named = os.path.basename(os.fsdecode(path)).lower()
    if head.startswith(nifti.GZIP):
        try:
            head = nifti.gzip_head(path)
        except (OSError, EOFError, zlib.error) as e:
            # NB: the name only chooses between a problem and a non-image: the format is the content's
            code = "decode-error" if named.endswith((".nii.gz", ".gz")) else "not-an-image"
            raise Skip(code, f"a gzip stream that cannot be inflated ({type(e).__name__})") from None
        gz = True
    else:
        gz = False
    k = nifti.kind(head)
    if k in ("nifti1", "nifti2"):
        return k + (".gz" if gz else "")
    if k == "pair":
        raise Skip("unsupported-format", "a NIfTI / Analyze header of a .hdr/.img pair (convert it to .nii)")
    if head.startswith(b"NRRD"):
        raise Skip("unsupported-format", "an NRRD file (.nrrd): not read yet; convert it to NIfTI")
    if head.lstrip().startswith((b"ObjectType", b"NDims")) or named.endswith((".mha", ".mhd")):
        raise Skip("unsupported-format", "a MetaImage file (.mha/.mhd): not read yet; convert it to NIfTI")
    if gz and named.endswith((".nii.gz", ".nii")):
        raise Skip("bad-header", "a gzip file named as NIfTI whose content is not a NIfTI header")
    raise Skip("not-an-image", "neither DICOM Part 10, PNG, TIFF, JPEG nor NIfTI by content")


def scan_file(path, key: bytes, max_bytes: int, max_volume_bytes: int | None = None) -> dict:
    """Header record of one file (see dicom.scan / raster.scan / nifti.scan)."""
    _silence()
    fmt = sniff(path)
    _silence(dicom=fmt == "dicom")
    try:
        if fmt.startswith("nifti"):
            return nifti.scan(path, key, max_bytes, max_volume_bytes or 4096 * 2**20, 1 if fmt[5] == "1" else 2,
                              fmt.endswith(".gz"))
        return dicom.scan(path, key, max_bytes) if fmt == "dicom" else raster.scan(path, key, max_bytes)
    except OSError as e:
        raise Skip("unreadable", f"the file cannot be read ({type(e).__name__})") from None


def decode_file(path, record: dict, options: dict, masks: list, segs: list, encode: dict | None = None) -> dict:
    """Frames of one file, with labels from its mask files or DICOM SEG objects when it has any.

    Returns {"frames": [per-frame dicts of dicom.decode / raster.decode], "labels": list of int32 arrays or None}.
    With `encode` ({"compressor": ..., "labelled": bool}, the stack's), each frame's pixels and label plane come
    back as the stack's encoded chunks instead (``frame["encoded"]``, `gpucnr.chunks.encode_image`; ``labels`` is
    then None): compression runs here, in parallel, and the driver only writes bytes.
    """
    _silence(dicom=record["format"] == "dicom" or bool(segs))
    try:
        if record["format"] == "dicom":
            frames = dicom.decode(path, record, options)
        elif record["format"] == "nifti":
            # NB: the volume as stored (inflated through a buffer of its size), its label map, parts in flight
            allow_memory(3 * record["declared_bytes"] / 2**20 + 1024)
            frames = nifti.decode(path, record, options)
        else:
            frames = raster.decode(path, record, options)
    except OSError as e:
        raise Skip("unreadable", f"the file cannot be read ({type(e).__name__})") from None
    shapes = [f["pixels"].shape if "pixels" in f else (record["rows"], record["columns"]) for f in frames]
    labels, problem = None, None
    try:
        if record["format"] == "nifti":
            labels = _volume_labels(record, masks, segs)
        else:
            labels = _image_labels(path, record, shapes, masks, segs, options.get("mask_threshold"))
    except Skip as e:
        problem = (e.code, e.reason)  # NB: the image is still stored, unlabelled; the driver lists the problem
    except MemoryError:
        # NB: a mask must never cost its image: past the shape checks, only a hostile stream gets here
        problem = ("mask-unreadable", "reading the mask exceeded the per-file memory limit")
    if record["format"] == "nifti":
        # NB: a volume's slices (and label planes) stay views of it and go to the driver a few at a time
        if labels is not None:
            for f, plane in zip(frames, labels, strict=True):
                f["label"] = plane
        prepare = None if encode is None else functools.partial(_encode_frame, encode)
        return Streamed({"frames": frames, "labels": None, "mask_problem": problem}, "frames", _frame_bytes,
                        prepare)
    if encode is not None:
        spool, slot = encode.get("spool"), 0
        for pos, f in enumerate(frames):
            if "pixels" in f:
                f["label"] = None if labels is None else labels[pos]
                _encode_frame(encode, f)
                if spool is not None:
                    _spool_frame(spool, slot, f["encoded"])
                    slot += 1
        return {"frames": frames, "labels": None, "mask_problem": problem}
    for f in frames:
        f["pixels"] = np.ascontiguousarray(f["pixels"])
    return {"frames": frames, "labels": labels, "mask_problem": problem}


_codecs: dict = {}


def _encode_frame(encode: dict, frame: dict) -> dict:
    """A frame's pixels (and ``label`` plane) as the stack's chunks, in place: ``frame["encoded"]``."""
    if "pixels" not in frame:
        return frame  # NB: a skipped slice carries no pixels
    compressor = encode["compressor"]
    codec = _codecs.get(compressor)
    if codec is None:
        import numcodecs

        numcodecs.blosc.use_threads = False  # NB: the worker processes are the parallelism; blosc threads would
        codec = _codecs[compressor] = chunks.encoder(compressor)  # compete with them for the same cores
    try:
        frame["encoded"] = chunks.encode_image(frame.pop("pixels"), frame.pop("label", None), compressor=compressor,
                                               labelled=encode["labelled"], codec=codec)
    except ValueError as e:
        raise Skip("decode-error", f"the decoded image cannot be stored ({e})") from None
    return frame


def _spool_frame(spool: dict, slot: int, encoded: dict) -> None:
    """A frame's chunks appended to the spool files of the shard the driver planned for it (``spool``: {"images":
    path, "labels": path or None, "slot": the file's first slot in the shard}), in place of their bytes: the
    driver's writer then renames a spool file that holds a whole shard into place, and the pixels never pass
    through the driver (issue 18). The writes wait for the worker's loop to `flush` them, several images at once;
    what cannot be written is sent as bytes, as without a plan."""
    for kind, key in (("images", "image"), ("labels", "labels")):
        if spool.get(kind) is not None and isinstance(encoded[key], bytes):
            encoded[key] = spool_chunk(spool[kind], encoded[key], spool["slot"] + slot)


def _frame_bytes(frame: dict) -> int:
    if "encoded" in frame:
        return len(frame["encoded"]["image"]) + len(frame["encoded"]["labels"] or b"")
    return sum(frame[k].nbytes for k in ("pixels", "label") if frame.get(k) is not None)


def _volume_labels(record: dict, masks: list, segs: list):
    """Labels of a NIfTI volume's slices (every channel) from its one label map (None without one)."""
    if segs:
        raise Skip("seg-unreadable", "DICOM SEG objects label DICOM images only")
    if not masks:
        return None
    if len(masks) > 1:
        raise Skip("mask-overlap", f"{len(masks)} label maps match one volume; give it one")
    return nifti.read_labels(masks[0], record)


def _image_labels(path, record: dict, shapes, masks: list, segs: list, threshold=None):
    """Labels of an image's frames from its mask files and DICOM SEG objects (None when it has neither)."""
    labels = read_masks(masks, shapes, threshold=threshold) if masks else None
    if segs:
        if record["format"] != "dicom":
            raise Skip("seg-unreadable", "DICOM SEG objects label DICOM images only")
        import pydicom

        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get(
            "SOPInstanceUID", ""))
        seg = read_seg(segs, uid, shapes)
        if seg is not None:
            if labels is not None:
                raise Skip("mask-overlap", "the image has both mask files and a DICOM SEG")
            labels = seg
    return labels


def scan_seg(path, key: bytes) -> list[str]:
    """Pseudonymous instance ids of the source images a DICOM SEG references."""
    _silence(dicom=True)
    if sniff(path) != "dicom":
        raise Skip("seg-unreadable", "not a DICOM file")
    try:
        import highdicom as hd
        import pydicom
    except ImportError:
        raise Skip("seg-unreadable", "reading DICOM SEG needs highdicom (pip install gpucnr[seg])") from None
    try:
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
        return sorted({pseudonym(key, "instance", str(ins[2])) for ins in seg.get_source_image_uids()})
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - not a SEG, or a damaged one
        raise Skip("seg-unreadable", f"not a readable DICOM SEG ({type(e).__name__})") from None


def hash_file(path) -> str:
    """SHA-256 of a raster file's bytes: its duplicate key, when its cheap key (`raster.probe`) is another's too."""
    try:
        return raster.full_digest(path)
    except OSError as e:
        raise Skip("unreadable", f"the file cannot be read ({type(e).__name__})") from None


def run(task: str, *args):
    """The one entry point of a worker: ``run("scan_file" | "scan_seg" | "decode_file" | "hash_file", *args)``, so
    one pool of processes serves every pass of an ingest."""
    return {"scan_file": scan_file, "scan_seg": scan_seg, "decode_file": decode_file,
            "hash_file": hash_file}[task](*args)
