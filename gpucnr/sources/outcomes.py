"""The stable reason codes of ingest: why a file, mask or table row was not stored."""

from __future__ import annotations

__all__ = ["CODES", "Skip"]

#: code -> what it means. Codes are stable: tests, scripts and the skipped-files list rely on them.
CODES = {
    "empty-file": "the file has zero bytes",
    "unreadable": "the file cannot be opened or read (permissions, I/O error)",
    "not-an-image": "the content is neither DICOM Part 10 (preamble + 'DICM'), PNG nor TIFF (extensions are ignored)",
    "truncated": "the file ends before its header or pixel data does",
    "bad-header": "the DICOM header cannot be parsed",
    "no-pixel-data": "a DICOM object without pixel data (SR, RT plan, DICOMDIR, ...)",
    "missing-attribute": "an attribute needed to read the pixels is missing or invalid (rows, columns, bits, ...)",
    "unsupported-transfer-syntax": "no installed decoder handles the file's transfer syntax",
    "unsupported-format": "an image layout gpucnr does not read (e.g. a raster mode, a photometric interpretation)",
    "declared-size": "the header declares more pixel data than the file holds",
    "image-too-large": "the declared image size exceeds --max-image-mb",
    "decompression-bomb": "the compressed data expands beyond --max-image-mb",
    "decode-error": "the decoder failed on the pixel data",
    "decoder-crash": "the process decoding the file died (a crash in a native decoder)",
    "decode-timeout": "decoding took longer than the per-file time limit",
    "out-of-memory": "decoding exceeded the per-file memory limit",
    "segmentation": "a DICOM SEG object among the images: labels of other images (give its folder with --seg)",
    "color": "a colour image with --color skip",
    "nonfinite": "NaN or infinite pixels with --nonfinite skip",
    "duplicate": "the same DICOM SOP instance (or the same raster bytes) as a file stored before it",
    "symlink": "a symbolic link, not followed without --follow-symlinks",
    "broken-symlink": "a symbolic link to nothing",
    "symlink-loop": "a directory reached again through a symbolic link",
    "mask-unreadable": "the image's mask file cannot be read as an image",
    "mask-shape": "the mask's size (or frame count) differs from the image's",
    "mask-labels": "the mask holds values that are not labels (colour, fractions, negatives, anti-aliasing)",
    "mask-overlap": "two mask files give different labels to one pixel",
    "mask-threshold": "--mask-threshold lies above the mask's values (its range, or a binary mask's one value): the "
                      "mask would label nothing",
    "seg-unreadable": "a DICOM SEG file cannot be read (or highdicom is not installed)",
    "seg-no-image": "a DICOM SEG references no stored image",
    "mask-no-image": "a mask file whose name matches no image",
    "roi-no-image": "an ROI table row names no stored image (or a frame it does not have)",
    "meta-no-image": "a --meta row names no file under SRC_DIR",
    "label-regions": "dataset.json label entries not used as names (region lists such as 'whole tumor': [1, 2, 3])",
    "dataset-json": "a layout's dataset.json that cannot be read (not JSON, not UTF-8): its label and channel names "
                    "are not used",
    "roi-name": "an ROI name that may identify a patient (DESIGN §10's value rule); the ROI is kept, its name blanked",
}


class Skip(Exception):
    """Raised inside a source reader: the file is not stored, for `code` (one of CODES), with a `reason` that
    holds no value read from the file (no DICOM value, no file name)."""

    def __init__(self, code: str, reason: str):
        assert code in CODES, code
        self.code, self.reason = code, reason
        super().__init__(f"{code}: {reason}")
