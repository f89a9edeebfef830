"""What a worker process does with one file: sniff its format, scan its header, decode its frames.

These run in `workers.IsolatedPool` children; everything they return is plain data (no value read from a
file except through a pseudonym or a sanitised descriptive field).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from gpucnr.sources import dicom, raster
from gpucnr.sources.outcomes import Skip
from gpucnr.sources.pseudonyms import pseudonym
from gpucnr.sources.rois import read_masks, read_seg

__all__ = ["decode_file", "run", "scan_file", "scan_seg", "sniff"]

_quiet = False


def _silence() -> None:
    """Readers warn and log with header values in the text (pydicom's validation, Pillow's decoders): a worker
    prints none of it, so no identifier reaches the operator's console through a child's stderr."""
    global _quiet
    if _quiet:
        return
    warnings.simplefilter("ignore")
    for name in ("pydicom", "PIL", "highdicom", "pylibjpeg"):
        logging.getLogger(name).disabled = True
    try:
        from pydicom import config

        config.settings.reading_validation_mode = config.IGNORE
    except ImportError:
        pass
    _quiet = True


def sniff(path) -> str:
    """"dicom", "png" or "tiff" from the first bytes; never from the extension."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as e:
        raise Skip("unreadable", f"the file cannot be read ({type(e).__name__})") from None
    if not head:
        raise Skip("empty-file", "the file has zero bytes")
    if head[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in raster.MAGIC.items():
        if head.startswith(magic):
            return fmt
    raise Skip("not-an-image", "neither DICOM Part 10 (preamble + 'DICM'), PNG nor TIFF by content")


def scan_file(path, key: bytes, max_bytes: int) -> dict:
    """Header record of one file (see dicom.scan / raster.scan)."""
    _silence()
    fmt = sniff(path)
    try:
        return dicom.scan(path, key, max_bytes) if fmt == "dicom" else raster.scan(path, key, max_bytes)
    except OSError as e:
        raise Skip("unreadable", f"the file cannot be read ({type(e).__name__})") from None


def decode_file(path, record: dict, options: dict, masks: list, segs: list) -> dict:
    """Frames of one file, with labels from its mask files or DICOM SEG objects when it has any.

    Returns {"frames": [per-frame dicts of dicom.decode / raster.decode], "labels": list of int32 arrays or None}.
    """
    _silence()
    try:
        if record["format"] == "dicom":
            frames = dicom.decode(path, record, options)
        else:
            frames = raster.decode(path, record, options)
    except OSError as e:
        raise Skip("unreadable", f"the file cannot be read ({type(e).__name__})") from None
    shapes = [f["pixels"].shape for f in frames]
    labels, problem = None, None
    try:
        labels = _image_labels(path, record, shapes, masks, segs)
    except Skip as e:
        problem = (e.code, e.reason)  # NB: the image is still stored, unlabelled; the driver lists the problem
    except MemoryError:
        # NB: a mask must never cost its image: past the shape checks, only a hostile stream gets here
        problem = ("mask-unreadable", "reading the mask exceeded the per-file memory limit")
    for f in frames:
        f["pixels"] = np.ascontiguousarray(f["pixels"])
    return {"frames": frames, "labels": labels, "mask_problem": problem}


def _image_labels(path, record: dict, shapes, masks: list, segs: list):
    """Labels of an image's frames from its mask files and DICOM SEG objects (None when it has neither)."""
    labels = read_masks(masks, shapes) if masks else None
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
    _silence()
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


def run(task: str, *args):
    """The one entry point of a worker: ``run("scan_file" | "scan_seg" | "decode_file", *args)``, so one pool
    of processes serves every pass of an ingest."""
    return {"scan_file": scan_file, "scan_seg": scan_seg, "decode_file": decode_file}[task](*args)
