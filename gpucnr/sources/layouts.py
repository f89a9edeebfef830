"""Training-set layouts recognised without flags: which files are label maps, which images they label, and the
label names of a ``dataset.json``. The one place where layouts are told (by names and folders only: what a
file holds is told by its content, in the workers).

- nnU-Net raw and MSD: ``images<X>/`` beside ``labels<X>/`` (``imagesTr``/``labelsTr``, ``imagesTs``/
  ``labelsTs``...): ``images<X>/case_0000.nii.gz``, ``case_0001``... (channels) or ``case.nii.gz`` (MSD, 4-D) are
  labelled by ``labels<X>/case.nii.gz``; every file under ``labels<X>/`` is a label map. ``imagesTs/`` without a
  labels folder is stored unlabelled.
- BraTS-style folders: a NIfTI named ``<prefix>[_-]seg.nii[.gz]`` labels the other NIfTI files of its folder
  whose names start with ``<prefix>_`` or ``<prefix>-`` (the channels: t1, t1ce, t2, flair...).
- ``dataset.json`` beside ``imagesTr/``: ``"labels"`` as MSD writes it (``{"0": "background", "1": "edema"}``)
  or as nnU-Net v2 does (``{"background": 0, "edema": 1}``); region lists (``"whole tumor": [1, 2, 3]``) are
  ignored, and said so.

AppleDouble files (``._*``) are neither images nor labels here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

__all__ = ["Layout", "detect", "label_names"]

_NII = re.compile(r"^(?P<base>.+?)\.nii(\.gz)?$", re.IGNORECASE)
_CHANNEL = re.compile(r"^(?P<case>.+)_\d{4}$")
_SEG = re.compile(r"^(?P<prefix>.+)[_-]seg\.nii(\.gz)?$", re.IGNORECASE)
_IMAGES = re.compile(r"^images(?P<split>.*)$")
_MAX_JSON = 16 * 2**20


@dataclass
class Layout:
    """What `detect` found: {image source: [label Found]}, the sources that are label maps (not images), the
    label names ({id: name}) and notes for the skipped-files list: (source, item, code, reason)."""

    labels_of: dict = field(default_factory=dict)
    label_sources: set = field(default_factory=set)
    names: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    kinds: list = field(default_factory=list)


def _split(rel: str) -> tuple[str, str]:
    folder, _, name = rel.rpartition("/")
    return folder, name


def _base(name: str) -> str:
    m = _NII.match(name)
    return m.group("base") if m else name.rpartition(".")[0] or name


def detect(found) -> Layout:
    """The layouts among the walked files `found` (`files.Found`; those with a code are ignored)."""
    out = Layout()
    files = [f for f in found if f.code is None and not _split(f.rel)[1].startswith("._")]
    by_folder: dict[str, list] = {}
    for f in files:
        by_folder.setdefault(_split(f.rel)[0], []).append(f)
    labels_dirs = set()
    for folder in sorted(by_folder):
        parent, _, last = folder.rpartition("/")
        m = _IMAGES.match(last)
        if m is None:
            continue
        lab_folder = (f"{parent}/" if parent else "") + f"labels{m.group('split')}"
        if lab_folder not in by_folder:
            continue
        labels_dirs.add(lab_folder)
        if "nnU-Net/MSD" not in out.kinds:
            out.kinds.append("nnU-Net/MSD")
        labels = {_base(_split(f.rel)[1]): f for f in by_folder[lab_folder]}
        used = set()
        for f in by_folder[folder]:
            base = _base(_split(f.rel)[1])
            hit = labels.get(base)
            if hit is None and (c := _CHANNEL.match(base)):
                hit = labels.get(c.group("case"))
            if hit is not None:
                out.labels_of[f.rel] = [hit]
                used.add(hit.rel)
        for f in by_folder[lab_folder]:
            out.label_sources.add(f.rel)
            if f.rel not in used:
                out.notes.append((f.rel, "mask", "mask-no-image", f"no image under {folder}/ has this label map's "
                                  "name (case.nii.gz labels case_0000.nii.gz, case_0001... or case.nii.gz)"))
    for folder, members in sorted(by_folder.items()):
        if folder in labels_dirs:
            continue
        segs = [(f, _SEG.match(_split(f.rel)[1])) for f in members]
        segs = [(f, m.group("prefix")) for f, m in segs if m]
        if not segs:
            continue
        if "BraTS" not in out.kinds:
            out.kinds.append("BraTS")
        seg_rels = {f.rel for f, _ in segs}
        for seg, prefix in segs:
            out.label_sources.add(seg.rel)
            hits = [f for f in members if f.rel not in seg_rels and _NII.match(_split(f.rel)[1])
                    and _split(f.rel)[1].startswith((f"{prefix}_", f"{prefix}-"))]
            for f in hits:
                out.labels_of.setdefault(f.rel, []).append(seg)
            if not hits:
                out.notes.append((seg.rel, "mask", "mask-no-image", "no NIfTI file of its folder shares this label "
                                  "map's prefix (<prefix>[_-]seg.nii.gz labels <prefix>_t1.nii.gz, ...)"))
    return out


def label_names(text: str) -> tuple[dict[int, str], list[str]]:
    """({label id: name}, notes) from the text of a dataset.json: MSD's ``{"0": "background", "1": "edema"}`` or
    nnU-Net v2's ``{"background": 0, "edema": 1}``; region lists and other values are left out, each noted
    (notes never quote a name)."""
    notes: list[str] = []
    try:
        labels = json.loads(text).get("labels")
    except (ValueError, AttributeError):
        return {}, ["dataset.json cannot be read as a JSON object; its label names are not used"]
    if not isinstance(labels, dict):
        return {}, []
    out: dict[int, str] = {}
    regions = 0
    for k, v in labels.items():
        if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", str(k)):
            out[int(k)] = v  # NB: MSD: {"1": "edema"}
        elif isinstance(v, int) and not isinstance(v, bool):
            out[v] = str(k)  # NB: nnU-Net v2: {"edema": 1}
        elif isinstance(v, list):
            regions += 1
        else:
            notes.append("a dataset.json label entry that is neither an id nor a name was ignored")
    if regions:
        notes.append(f"{regions} region label(s) of dataset.json (lists of label ids, e.g. nnU-Net's "
                     "'whole tumor': [1, 2, 3]) were ignored: each label id is measured as its own ROI")
    out.pop(0, None)  # NB: 0 is background, never an ROI
    return out, notes
