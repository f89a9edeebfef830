"""Training-set layouts recognised without flags: which files are label maps, which images they label, the
label and channel names of a ``dataset.json``, and a source folder that is only part of a layout. The one place
where layouts are told (by names and folders only: what a file holds is told by its content, in the workers).

- nnU-Net raw and MSD: ``images<X>/`` beside ``labels<X>/`` (``imagesTr``/``labelsTr``, ``imagesTs``/
  ``labelsTs``...): ``images<X>/case_0000.nii.gz``, ``case_0001``... (channels) or ``case.nii.gz`` (MSD, 4-D) are
  labelled by ``labels<X>/case.nii.gz``; every file under ``labels<X>/`` is a label map. ``imagesTs/`` without a
  labels folder is stored unlabelled.
- Kvasir-SEG style: ``images/`` beside ``masks/``: ``masks/x.jpg`` is the mask of ``images/x.jpg`` (same stem).
- BraTS-style folders: a NIfTI named ``<prefix>[_-]seg.nii[.gz]`` labels the other NIfTI files of its folder
  whose names start with ``<prefix>_`` or ``<prefix>-`` (the channels: t1, t1ce, t2, flair...); the name's
  suffix (t1n, t1c, t2w, t2f, t1, t1ce, t2, flair) is the channel's ``modality``.
- ``dataset.json`` beside ``images<X>/``: ``"labels"`` as MSD writes it (``{"0": "background", "1": "edema"}``)
  or as nnU-Net v2 does (``{"background": 0, "edema": 1}``); region lists (``"whole tumor": [1, 2, 3]``) are
  ignored, and said so. Its channel names (MSD's ``"modality": {"0": "FLAIR"}``, nnU-Net v2's
  ``"channel_names": {"0": "T2"}``) are the ``modality`` of each channel. It is read, not an input file.

AppleDouble files (``._*``) are neither images nor labels here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DatasetJson", "Layout", "detect", "misplaced_source", "read_dataset_json"]

_NII = re.compile(r"^(?P<base>.+?)\.nii(\.gz)?$", re.IGNORECASE)
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SEG = re.compile(r"^(?P<prefix>.+)[_-]seg\.nii(\.gz)?$", re.IGNORECASE)
_IMAGES = re.compile(r"^images(?P<split>.*)$")
_LABELS = re.compile(r"^labels(?P<split>.*)$")
#: BraTS channel suffixes: 2023 (t1n, t1c, t2w, t2f) and 2017-2021 (t1, t1ce, t2, flair)
_BRATS_CHANNELS = ("t1n", "t1c", "t2w", "t2f", "t1ce", "t1", "t2", "flair")
_MAX_JSON = 16 * 2**20
#: the file a layout's root holds: read for its names, never an input
DATASET_JSON = "dataset.json"


@dataclass
class Layout:
    """What `detect` found: {image source: [label Found]}, the sources that are label maps (not images), the
    label names ({id: name}), notes for the skipped-files list: (source, item, code, reason), the layouts' own
    files ({dataset.json source: Found}) and how each image's channel is named (`modality`)."""

    labels_of: dict = field(default_factory=dict)
    label_sources: set = field(default_factory=set)
    names: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    #: {dataset.json source: Found} of the recognised layouts' roots
    json_files: dict = field(default_factory=dict)
    #: {image source: (dataset.json source or None, channel index or None (4-D: the channel axis), name)}
    channel_of: dict = field(default_factory=dict)
    #: {dataset.json source: {channel index: name}}, filled by the driver once it has read them
    channel_names: dict = field(default_factory=dict)

    def modality(self, source: str, channel: int) -> str:
        """The ``modality`` of one channel of an image: its dataset.json channel name or BraTS suffix ("" when
        the layout names none)."""
        json_source, index, name = self.channel_of.get(source, (None, None, ""))
        if json_source is None:
            return name
        return self.channel_names.get(json_source, {}).get(channel if index is None else index, "")


def _split(rel: str) -> tuple[str, str]:
    folder, _, name = rel.rpartition("/")
    return folder, name


def _base(name: str) -> str:
    m = _NII.match(name)
    return m.group("base") if m else name.rpartition(".")[0] or name


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _label_folder(folder: str, by_folder: dict) -> tuple[str, str] | None:
    """(the folder of label maps or masks beside an ``images<X>`` folder, the layout's name), or None."""
    parent, _, last = folder.rpartition("/")
    m = _IMAGES.match(last)
    if m is None:
        return None
    lab = _join(parent, f"labels{m.group('split')}")
    if lab in by_folder:
        return lab, "nnU-Net/MSD"
    if m.group("split") == "" and _join(parent, "masks") in by_folder:
        return _join(parent, "masks"), "Kvasir-SEG (images/ + masks/)"
    return None


def detect(found) -> Layout:
    """The layouts among the walked files `found` (`files.Found`; those with a code are ignored)."""
    out = Layout()
    files = [f for f in found if f.code is None and not _split(f.rel)[1].startswith("._")]
    by_folder: dict[str, list] = {}
    for f in files:
        by_folder.setdefault(_split(f.rel)[0], []).append(f)
    labels_dirs = set()
    for folder in sorted(by_folder):
        parent = folder.rpartition("/")[0]
        pair = _label_folder(folder, by_folder)
        json_rel = _join(parent, DATASET_JSON)
        json_found = next((f for f in by_folder.get(parent, ()) if f.rel == json_rel), None)
        if _IMAGES.match(folder.rpartition("/")[2]) and (pair is not None or json_found is not None):
            # NB: imagesTs/ of a dataset whose dataset.json names its channels: unlabelled, but named
            if json_found is not None:
                out.json_files[json_rel] = json_found
            for f in by_folder[folder]:
                c = _CHANNEL.match(_base(_split(f.rel)[1]))
                out.channel_of[f.rel] = (json_rel if json_found else None, int(c.group("channel")) if c else None, "")
        if pair is None:
            continue
        lab_folder, kind = pair
        labels_dirs.add(lab_folder)
        if kind not in out.kinds:
            out.kinds.append(kind)
        labels = {_base(_split(f.rel)[1]): f for f in by_folder[lab_folder]}
        used = set()
        for f in by_folder[folder]:
            base = _base(_split(f.rel)[1])
            hit = labels.get(base)
            if hit is None and (c := _CHANNEL.match(base)):
                hit = labels.get(c.group("case"))
            elif hit is not None and f.rel in out.channel_of:
                # NB: MSD: case.nii.gz labelled by case.nii.gz is 4-D: its channels are along the 4th axis
                out.channel_of[f.rel] = (out.channel_of[f.rel][0], None, "")
            if hit is not None:
                out.labels_of[f.rel] = [hit]
                used.add(hit.rel)
        for f in by_folder[lab_folder]:
            out.label_sources.add(f.rel)
            if f.rel not in used:
                out.notes.append((f.rel, "mask", "mask-no-image", f"no image under {folder}/ has this label map's "
                                  "name (case.nii.gz labels case_0000.nii.gz, case_0001... or case.nii.gz)"
                                  if kind == "nnU-Net/MSD" else f"no image under {folder}/ has this mask's name"))
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
                suffix = _base(_split(f.rel)[1])[len(prefix) + 1:].lower()
                out.channel_of[f.rel] = (None, None, suffix if suffix in _BRATS_CHANNELS else "")
            if not hits:
                out.notes.append((seg.rel, "mask", "mask-no-image", "no NIfTI file of its folder shares this label "
                                  "map's prefix (<prefix>[_-]seg.nii.gz labels <prefix>_t1.nii.gz, ...)"))
    root_json = next((f for f in by_folder.get("", ()) if f.rel == DATASET_JSON), None)
    if out.kinds and root_json is not None:
        out.json_files.setdefault(DATASET_JSON, root_json)  # NB: a BraTS-style set's label names, at SRC_DIR's root
    return out


def misplaced_source(src) -> tuple[str, str] | None:
    """A source folder that is one part of a layout rather than its root: ("labels", message) for a folder of
    label maps (``labelsTr/`` beside ``imagesTr/``, or ``masks/`` beside ``images/``), which ingest refuses, or
    ("images", message) for ``imagesTr/`` whose labels lie in a sibling folder that will not be read. None
    otherwise. Told by folder names alone."""
    src = Path(src).absolute()
    name, parent = src.name, src.parent

    def sibling(n: str) -> bool:
        return (parent / n).is_dir()

    if (m := _LABELS.match(name)) and sibling(f"images{m.group('split')}"):
        return ("labels", f"{src} looks like the {name} folder of a dataset: it holds label maps, not images "
                f"(they label ../images{m.group('split')}); point ingest at the dataset root {parent}")
    if name == "masks" and sibling("images"):
        return ("labels", f"{src} looks like the masks folder of a dataset: it holds masks, not images (they label "
                f"../images); point ingest at the dataset root {parent}")
    if m := _IMAGES.match(name):
        for lab in (f"labels{m.group('split')}", *(("masks",) if not m.group("split") else ())):
            if sibling(lab):
                return ("images", f"SRC looks like the {name} folder of a dataset; its labels in ../{lab} were not "
                        f"read: point ingest at the dataset root {parent}")
        return None
    # NB: a label folder of another name (segmentations/ beside imagesTr/): its NIfTI files are named as the cases
    # of a sibling images<S>/ folder (case.nii.gz for case_0000.nii.gz)
    mine = {_base(n) for n in _names(src) if _NII.match(n)}
    for other in sorted(_names(parent)):
        if mine and _IMAGES.match(other) and sibling(other):
            cases = set()
            for n in _names(parent / other):
                base = _base(n)
                cases.add(base)
                if c := _CHANNEL.match(base):
                    cases.add(c.group("case"))
            if len(mine & cases) * 2 > len(mine):
                return ("labels", f"{src} looks like the label maps of ../{other}: its NIfTI files are named as "
                        f"the cases of {other}/; label maps are not images: ingest the dataset root {parent} with "
                        f"this folder named labels{_IMAGES.match(other).group('split')} (recognised without flags)")
    return None


def _names(folder: Path) -> list[str]:
    """The entry names of one folder (not recursive; [] when it cannot be listed)."""
    try:
        return [n for n in os.listdir(folder) if not n.startswith("._")]
    except OSError:
        return []


@dataclass
class DatasetJson:
    """What a dataset.json says: label names ({id: name}), channel names ({channel index: name}), notes on
    entries not used, and `error`: why the file cannot be read at all (None when it was)."""

    labels: dict = field(default_factory=dict)
    channels: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    error: str | None = None


def read_dataset_json(data: bytes) -> DatasetJson:
    """The names a dataset.json holds (`DatasetJson`); a file that is not a JSON object (a trailing comma, a
    cut-short file, not UTF-8) has `error` set and no names. Messages never quote a name."""
    if len(data) > _MAX_JSON:
        return DatasetJson(error=f"larger than {_MAX_JSON // 2**20} MiB")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return DatasetJson(error="not UTF-8 text")
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        return DatasetJson(error=f"not valid JSON{where}")
    if not isinstance(doc, dict):
        return DatasetJson(error="not a JSON object")
    names, notes = _labels(doc.get("labels"))
    channels: dict[int, str] = {}
    for key in ("channel_names", "modality"):  # NB: nnU-Net v2's spelling, then MSD's
        value = doc.get(key)
        if isinstance(value, dict):
            for k, v in value.items():
                if re.fullmatch(r"\s*\d+\s*", str(k)) and isinstance(v, str):
                    channels.setdefault(int(k), v.strip())
                else:
                    notes.append(f"a dataset.json {key} entry that is not 'channel index: name' was ignored")
    return DatasetJson(labels=names, channels=channels, notes=notes)


def _labels(labels) -> tuple[dict[int, str], list[str]]:
    notes: list[str] = []
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
