"""Which shard of the stack each file's images will fill, planned from the header scan, so that ingest's workers
write those shards themselves (issue 18).

The driver gives images their places in input order, by bucket, as their files' results come back; the header scan
already says, for the common formats, how many images a file holds and in which bucket (canvas and stored dtype).
From it `SpoolPlan` predicts every image's place. The files of a shard whose every place is predicted to hold an
image of a 2-D file are sent to one worker together, which appends their encoded chunks to that shard's spool
file (`shardfiles.spool`); the stack's writer renames a spool file into place when it holds exactly its shard
(`shardfiles.spooled_run`), and reads its chunks back, checked, otherwise. A prediction that turns out wrong (a file
that fails to decode after a good scan, a duplicate whose first copy failed) therefore costs speed, never
correctness; and the plan follows it: the places of files not yet sent are shifted by what the driver actually did
(`consumed`), so that one bad file spoils the shards in flight, not the rest of the dataset.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import Counter

import numpy as np

from gpucnr.chunks import canvas

__all__ = ["SPOOL_FILE", "SpoolPlan", "predicted_frames"]

#: the names of a spool folder's files (`SpoolPlan.args`): bucket, shard, plan generation, array
SPOOL_FILE = re.compile(r"\d+x\d+-[a-z0-9]+-\d+-\d+\.(images|labels)")

#: stored dtype of a raster page by its Pillow mode (`raster.decode`); colour modes become float64 gray
_RASTER_DTYPES = {"1": "u1", "L": "u1", "LA": "u1", "I;16": "u2", "I;16B": "u2", "I;16L": "u2", "I;16N": "u2",
                  "I": "i4", "F": "f4", "RGB": "f8", "RGBA": "f8", "RGBX": "f8", "P": "f8", "PA": "f8"}
#: ...and of a TIFF page Pillow reads in another dtype than it stores (`raster._tiff_fix`)
_FIXED_DTYPES = {"uint32": "u4", "int8": "i1", "int16": "i2"}


def predicted_frames(rec: dict, options: dict) -> tuple | None:
    """(canvas, dtype string, frames) that decoding the file of header record `rec` will store; None when the record
    does not say (a compressed DICOM, a volume, pages that differ, colour under ``--color skip``)."""
    if rec["format"] == "dicom":
        native = rec.get("native")
        if not native:
            return None
        dtype = native["dtype"]
    elif rec["format"] in ("png", "tiff", "jpeg"):
        modes, fixes = rec.get("modes") or [], rec.get("fixes") or []
        if not modes or len(set(modes)) != 1 or len(set(fixes)) > 1:
            return None
        dtype = _FIXED_DTYPES.get(fixes[0]) if fixes and fixes[0] else _RASTER_DTYPES.get(modes[0])
        if dtype is None or (dtype == "f8" and options["color"] == "skip"):
            return None
    else:
        return None
    return canvas((rec["rows"], rec["columns"])), np.dtype(dtype).newbyteorder("=").str, int(rec["frames"])


class SpoolPlan:
    """The predicted places of the images of an ingest's remaining files, and the spool files they go to.

    Parameters
    ----------
    records : list of dict
        The header records of the files still to decode, in input order.
    writer : StackWriter
        The stack being written (`StackWriter.next_position` says where each bucket stands).
    stored : set
        Duplicate keys of the files already stored (a resumed ingest's).
    options : dict
        The ingest's colour and non-finite options.
    spoolable : list of bool
        Per file, whether its images may be spooled at all (2-D files: a volume's slices stream).
    folder : path
        The spool folder (`store.spool_path`).
    labelled : bool
        Whether the stack has label planes (a second spool file per shard).
    """

    def __init__(self, records: list[dict], writer, stored: set, options: dict, spoolable: list[bool], folder,
                 labelled: bool):
        self.writer, self.folder, self.labelled = writer, str(folder), labelled
        self.key: list = []  # NB: per file: (canvas, dtype) of its bucket, None for a predicted duplicate
        self.at: list[int] = []  # NB: per file: the predicted place of its first image
        self.n: list[int] = []
        self.buckets: dict[tuple, dict] = {}
        seen = set(stored)
        for rec in records:
            dedup = rec.get("dedup")
            if dedup is not None and dedup in seen:
                self.key.append(None)  # NB: a duplicate stores nothing
                self.at.append(0)
                self.n.append(0)
                continue
            if dedup is not None:
                seen.add(dedup)
            predicted = predicted_frames(rec, options)
            if predicted is None:
                break  # NB: where its images go is not known, nor the places of any image after them
            box, dtype, n = predicted
            key = (box, dtype)
            b = self.buckets.get(key)
            if b is None:
                start, per = writer.next_position(box, dtype)
                b = self.buckets[key] = {"per": per, "starts": [], "bad": [0], "end": start, "files": {},
                                         "consumed": start, "delta": 0, "generation": 0, "ok": {}}
            b["files"][len(self.key)] = len(b["starts"])
            b["starts"].append(b["end"])
            b["bad"].append(b["bad"][-1] + (not spoolable[len(self.key)]))
            self.key.append(key)
            self.at.append(b["end"])
            self.n.append(n)
            b["end"] += n
        for (box, dtype), b in self.buckets.items():
            writer.expect(box, dtype, b["end"])  # NB: the bucket's arrays are sized once, not grown shard by shard
        self.left: Counter = Counter()  # NB: files sent with each spool file in use, not consumed yet
        self.bucket_of: dict[str, tuple] = {}  # NB: ...and its bucket
        self.closed: set[str] = set()  # NB: spool files no file will be sent with any more
        self.path_of: dict[int, tuple] = {}

    @property
    def batch(self) -> int:
        """The most images of a planned shard."""
        return max((b["per"] for b in self.buckets.values()), default=1)

    def args(self, i: int) -> dict | None:
        """Where file `i` (of the records) appends its images' chunks as it is sent now: {"images": path, "labels":
        path or None, "slot": the place of its first image in the shard}, or None (its bytes go to the driver)."""
        if i >= len(self.key) or self.key[i] is None:
            return None
        key = self.key[i]
        b = self.buckets[key]
        fi = b["files"][i]
        if b["bad"][fi + 1] != b["bad"][fi]:
            return None
        per, delta = b["per"], b["delta"]
        place = self.at[i] + delta
        s = place // per
        lo = s * per - delta  # NB: the shard's first place, in predicted places
        ok = b["ok"].get(lo)
        if ok is None:
            ok = b["ok"][lo] = self._whole(b, lo, lo + per)
        if not ok:
            return None
        name = os.path.join(self.folder, f"{key[0][0]}x{key[0][1]}-{np.dtype(key[1]).name}-{s}-{b['generation']}")
        paths = (f"{name}.images", f"{name}.labels" if self.labelled else None)
        for p in paths:
            if p is not None:
                self.left[p] += 1
                self.bucket_of[p] = key
        self.path_of[i] = paths
        if self.at[i] + self.n[i] == lo + per:
            self.closed.update(p for p in paths if p is not None)  # NB: the shard's last file
        return {"images": paths[0], "labels": paths[1], "slot": place - s * per}

    @staticmethod
    def _whole(b: dict, lo: int, hi: int) -> bool:
        """Whether predicted places [lo, hi) are exactly the images of spoolable files (none cut by an end)."""
        starts = b["starts"]
        first = bisect.bisect_left(starts, lo)
        if first == len(starts) or starts[first] != lo:
            return False
        last = bisect.bisect_left(starts, hi)
        if (starts[last] if last < len(starts) else b["end"]) != hi:
            return False
        return b["bad"][last] == b["bad"][first]

    def consumed(self, i: int) -> list[str]:
        """File `i` was stored, skipped or found a duplicate: the places of the files not sent yet follow what the
        writer actually did. Returns the spool files that no file will use any more (`StackWriter.spool_done`)."""
        if i < len(self.key) and self.key[i] is not None:
            self.buckets[self.key[i]]["consumed"] = self.at[i] + self.n[i]
        if i < len(self.key):
            for key, b in self.buckets.items():
                actual = self.writer.next_position(*key)[0]
                if actual != b["consumed"] + b["delta"]:
                    # NB: a file did not store what it was predicted to: later places shift; spool files of this
                    # bucket's shards get no more users (those not sent yet get new files)
                    b["delta"] = actual - b["consumed"]
                    b["generation"] += 1
                    self.closed.update(p for p in self.left if self.bucket_of[p] == key)
        done = []
        for p in self.path_of.pop(i, ()):
            if p is not None:
                self.left[p] -= 1
        for p in list(self.left):
            if self.left[p] == 0 and p in self.closed:
                del self.left[p], self.bucket_of[p]
                self.closed.discard(p)
                done.append(p)
        return done
