"""What counts as a problem of an ingest (DESIGN §10), and the block that says so at its end.

A problem is an input the user meant to be used that was not: an image-like file that was skipped, a mask
or DICOM SEG that was refused, an ROI or meta row that names no image. Duplicates, links not followed by
choice, ``--color skip``, empty files and non-images are not problems: they are counted, not shouted about.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

__all__ = ["FILE_PROBLEMS", "Group", "is_litter", "is_problem", "problem_groups", "problems_text"]

#: Codes of skipped image-like files that are problems (DESIGN §10); the other skip codes are not.
FILE_PROBLEMS = frozenset({
    "truncated", "bad-header", "missing-attribute", "unsupported-transfer-syntax", "unsupported-format",
    "declared-size", "image-too-large", "decompression-bomb", "decode-error", "decoder-crash", "decode-timeout",
    "out-of-memory", "unreadable", "broken-symlink", "symlink-loop", "nonfinite"})
#: Operating-system litter that is never a problem, whatever its content turns out to be.
_LITTER = ("Thumbs.db", "desktop.ini", ".DS_Store")

#: The likely cause of each code, for people (the skipped list has every row's own reason).
_CAUSES = {
    "truncated": "files cut short (an interrupted copy or download?): compare their sizes with the originals",
    "bad-header": "damaged or cut-short file headers (DICOM, PNG or TIFF)",
    "missing-attribute": "DICOM objects without the attributes that describe their pixels",
    "unsupported-transfer-syntax": "no installed decoder for these compressions (JPEG lossless and JPEG-LS "
                                   "need `pip install gpucnr[jpeg-gpl]`)",
    "unsupported-format": "an image layout gpucnr does not read (see docs/ingest.md)",
    "declared-size": "files that hold fewer pixels than their header declares (damaged or cut short)",
    "image-too-large": "images larger than --max-image-mb: raise it if they are genuine",
    "decompression-bomb": "compressed data that expands beyond --max-image-mb: raise it if the images are genuine",
    "decode-error": "damaged pixel data, or an encoding the decoders cannot read",
    "decoder-crash": "damaged pixel data that crashes a native decoder",
    "decode-timeout": "files slower to decode than --file-timeout: raise it (or a stalled network drive)",
    "out-of-memory": "images that need more memory than --max-image-mb allows a worker",
    "unreadable": "permissions or I/O errors: the files (or folders) cannot be read by this user",
    "broken-symlink": "symbolic links whose targets were moved or deleted",
    "symlink-loop": "symbolic links that lead back into a folder already walked",
    "nonfinite": "NaN or infinite pixels (--nonfinite exclude stores them and leaves those pixels out)",
    "mask-shape": "masks of another size or frame count than their images, or NIfTI label maps of another "
                  "position or orientation (resized, cropped or resampled masks?)",
    "mask-labels": "masks saved with anti-aliasing, JPEG compression or colour: binary masks saved as JPEG "
                   "(e.g. Kvasir-SEG) are read with --mask-threshold T (e.g. 127: 1 where the value exceeds T); "
                   "label maps must be lossless single-channel label images (PNG, TIFF, .npy or NIfTI)",
    "mask-unreadable": "mask files that are not readable images",
    "mask-threshold": "--mask-threshold T lies above the masks' values (their range, or the one value of a binary "
                      "mask): no pixel exceeds it, so the masks label nothing; give a T between the masks' "
                      "background and foreground (e.g. 127 for 0/255 masks), or leave --mask-threshold out for "
                      "lossless binary or label masks",
    "mask-overlap": "two masks (or a mask and a SEG) give one pixel different labels",
    "seg-unreadable": "files that are not readable DICOM SEG objects (or highdicom is not installed)",
    "seg-no-image": "SEG objects of images that are not under SRC_DIR (or were skipped)",
    "dataset-json": "a dataset.json that is not valid JSON (a trailing comma, a cut-short file?): fix it and "
                    "ingest again, or the ROIs have no names",
}


def is_litter(source: str) -> bool:
    """Operating-system litter (AppleDouble ``._*``, Thumbs.db, desktop.ini, .DS_Store): never an input."""
    name = str(source).rpartition("/")[2]
    return name.startswith("._") or name in _LITTER


def is_problem(row: dict) -> bool:
    """Whether one row of the skipped list is a problem (DESIGN §10)."""
    code, item, source = row["code"], row["item"], str(row["source"])
    if item == "file":
        name = source.rpartition("/")[2]
        return code in FILE_PROBLEMS and not name.startswith("._") and name not in _LITTER
    return code not in ("duplicate", "symlink", "empty-file", "not-an-image", "no-pixel-data", "color",
                        "label-regions")


@dataclass
class Group:
    """Problems of one kind: `count` of `total`, by code, with the likely cause."""

    what: str
    count: int
    total: int
    codes: dict
    cause: str

    def line(self) -> str:
        share = 100.0 * self.count / self.total if self.total else 100.0
        codes = ", ".join(f"{c} {n}" for c, n in self.codes.items())
        return f"  {self.what}: {self.count} of {self.total} ({share:.1f} %) [{codes}]; likely cause: {self.cause}"


def problem_groups(problems: list[dict], totals: dict) -> list[Group]:
    """The problems of an ingest, in kinds: files, refused masks, masks without an image, SEG objects, ROI rows,
    meta rows. `totals` holds the denominators: files, frames (slices of the stored files),
    masked (images with a mask or SEG to apply), mask_files,
    seg_files, roi_rows, meta_rows, has_mask_dir (whether masks came from --masks), mask_dir_inside / mask_dir_is_src
    (MASK_DIR inside SRC_DIR / SRC_DIR itself), and KIND_hint: a cause
    found in the data itself (e.g. meta paths relative to a folder above SRC_DIR) that replaces the generic one."""
    kinds = {"files": Counter(), "frames": Counter(), "layout_files": Counter(),
             "masked": Counter(), "mask_files": Counter(), "seg_files": Counter(),
             "roi_rows": Counter(), "meta_rows": Counter()}
    for row in problems:
        if not is_problem(row):
            continue
        item, code = row["item"], row["code"]
        kind = ("files" if item == "file" else "frames" if item.startswith("channel ") else
                "layout_files" if item == "dataset.json" else
                "mask_files" if code == "mask-no-image" else
                "masked" if item == "mask" else "seg_files" if item == "seg" else
                "roi_rows" if item.startswith("rois") else "meta_rows")
        kinds[kind][code] += 1
    mirrored = totals.get("has_mask_dir") and not totals.get("mask_dir_is_src")
    where = ("beside the images (MASK_DIR is SRC_DIR)" if totals.get("mask_dir_is_src") else
             "under MASK_DIR" if mirrored else "beside the images")
    causes = {
        "mask_files": f"the pattern matches these files {where}, but no image has the matching name: check "
                      "{stem} / {name} in --mask-pattern" + (" and that MASK_DIR mirrors SRC_DIR's folders"
                                                             if mirrored else "")
                      + ("; MASK_DIR lies inside SRC_DIR, so the mask of SRC_DIR/images/x.jpg must be "
                         "MASK_DIR/images/x.jpg: for masks/ beside images/ (Kvasir-SEG) leave out --masks (that "
                         "layout is recognised: masks/x.jpg labels images/x.jpg), or give SRC_DIR/images as SRC_DIR"
                         if totals.get("mask_dir_inside") else ""),
        "roi_rows": "the source column must hold paths relative to SRC_DIR (as the skipped list and the linkage "
                    "file write them), with frames the files have",
        "meta_rows": "the source column must hold paths relative to SRC_DIR (as the skipped list and the "
                     "linkage file write them), not to another folder",
    }
    what = {"files": "image files skipped", "frames": "slices of stored volumes skipped",
            "masked": "images whose mask or SEG was refused (stored unlabelled)",
            "mask_files": "mask files matching no image", "seg_files": "DICOM SEG objects not used",
            "layout_files": "dataset.json files (or names in them) not used",
            "roi_rows": "ROI table rows naming no stored image", "meta_rows": "meta table rows naming no file"}
    groups = []
    for kind, codes in kinds.items():
        if not codes:
            continue
        cause = totals.get(f"{kind}_hint") or causes.get(kind) or _cause(codes)
        groups.append(Group(what[kind], sum(codes.values()), max(int(totals.get(kind) or 0), sum(codes.values())),
                            dict(codes.most_common()), cause))
    return groups


def _cause(codes: Counter) -> str:
    """The likely cause of a group's codes: the most frequent code's, or each code's when there are several
    (a tie must not name the cause of one code for the files of another)."""
    if len(codes) == 1:
        code = next(iter(codes))
        return _CAUSES.get(code, code)
    return "; ".join(f"{code}: {_CAUSES.get(code, code)}" for code, _ in codes.most_common())


def problems_text(groups: list[Group], skipped_list) -> str:
    """The block ingest ends with on stderr when it has problems ("" when it has none)."""
    if not groups:
        return ""
    lines = [f"gpucnr: ingest completed with problems; every one is listed, with its reason, in {skipped_list}"]
    lines += [g.line() for g in groups]
    return "\n".join(lines)
