"""Fuzzing `gpucnr.ingest`: thousands of byte-mutated copies of valid DICOM, PNG and TIFF files, one ingest.

The bases are small valid files: synthetic DICOM under every transfer syntax the factory writes (explicit and
implicit VR little endian, big endian, deflated, RLE, JPEG 2000; gray, multi-frame, RGB, float), pydicom's bundled
test files that ship in its wheel, and PNG/TIFF files. Each copy gets its own SOPInstanceUID first (so the copies
are not duplicates of one another and every surviving copy reaches the decoders), then 1 to 3 seeded mutations:
bit flips, overwritten runs, truncation, a duplicated or deleted chunk, a length field set to 0xFFFFFFFF. File
names record the base and the mutations; `recipe` rebuilds any copy from its number.
"""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from dicomfactory import write_dicom, write_raster
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

import gpucnr
from gpucnr.kernels import STATUS
from gpucnr.sources.outcomes import CODES

SEED = 20240612
N_MUTANTS = 2000
WORKERS = 2
MAX_BYTES = 40 * 1024
#: pydicom's test files that ship in its wheel (never downloaded); all under 40 KB
PYDICOM_FILES = ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm", "SC_rgb_small_odd.dcm",
                 "SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm")
_DEFLATED = DeflatedExplicitVRLittleEndian.encode()
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT")
_SHORT_VRS = (b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS",
              b"ST", b"TM", b"UI", b"UL", b"US")
_GROUPS = (0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028, 0x7FE0)


def bases(folder: Path) -> dict[str, bytes]:
    """The valid files every mutant starts from, name -> bytes."""
    rng = np.random.default_rng(SEED)
    gray16 = rng.integers(0, 4000, (48, 48)).astype(np.uint16)
    ct = rng.integers(-1000, 1000, (48, 48)).astype(np.int16)
    frames = rng.integers(0, 256, (3, 32, 32)).astype(np.uint8)
    rgb = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    made = {
        "ct_explicit": dict(pixels=ct, slope=1.0, intercept=-1024.0, canary=True),
        "mr_implicit": dict(pixels=gray16, modality="MR", transfer_syntax=ImplicitVRLittleEndian),
        "ct_bigendian": dict(pixels=ct[:32, :32], transfer_syntax=ExplicitVRBigEndian),
        "mr_deflated": dict(pixels=gray16, modality="MR", transfer_syntax=DeflatedExplicitVRLittleEndian),
        "mr_rle": dict(pixels=gray16, modality="MR", transfer_syntax=RLELossless),
        "mr_j2k": dict(pixels=gray16, modality="MR", transfer_syntax=JPEG2000Lossless),
        "multiframe": dict(pixels=frames, modality="OT"),
        "us_rgb": dict(pixels=rgb, photometric="RGB", modality="US"),
        "pm_float": dict(pixels=rng.normal(0, 1, (24, 24)).astype(np.float32), modality="OT"),
    }
    out = {}
    for i, (name, kw) in enumerate(made.items()):
        # NB: fixed UIDs, so the bases and therefore every mutant are the same bytes on every run
        uids = [f"1.2.826.0.1.3680043.8.498.{SEED}.{i + 1}.{part}.100000" for part in range(1, 5)]
        out[name] = write_dicom(folder / f"{name}.dcm", kw.pop("pixels"), sop_uid=uids[0], study_uid=uids[1],
                                series_uid=uids[2], extra={"FrameOfReferenceUID": uids[3]}, **kw).read_bytes()
    for name in PYDICOM_FILES:
        path = get_testdata_file(name, download=False)
        assert path is not None, f"{name} ships in pydicom's wheel"
        out[Path(name).stem] = Path(path).read_bytes()
    out["png_gray8"] = write_raster(folder / "g8.png", rng.integers(0, 256, (48, 48)).astype(np.uint8)).read_bytes()
    out["png_gray16"] = write_raster(folder / "g16.png", gray16).read_bytes()
    out["png_rgb"] = write_raster(folder / "rgb.png", rgb).read_bytes()
    out["tiff_gray16"] = write_raster(folder / "g16.tif", gray16, fmt="TIFF").read_bytes()
    out["tiff_float"] = write_raster(folder / "f.tif", rng.normal(0, 1, (32, 32)).astype(np.float32),
                                     fmt="TIFF").read_bytes()
    out["tiff_pages"] = write_raster(folder / "p.tif", fmt="TIFF", frames=list(frames)).read_bytes()
    too_big = {k: len(v) for k, v in out.items() if len(v) > MAX_BYTES}
    assert not too_big, f"base files over {MAX_BYTES} bytes: {too_big}"
    return out


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def with_new_uid(data: bytes, k: int) -> bytes:
    """A DICOM file with its SOPInstanceUID (file meta and data set) replaced by a unique one of the same length,
    so that every copy is an instance of its own; deflated data sets are inflated, edited and deflated again."""
    old = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID).encode()
    new = old[:-6] + f"{k:06d}".encode()  # NB: same length, so no length field changes
    if data.find(_DEFLATED) < 0:
        return data.replace(old, new)
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    body = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS).replace(old, new)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = data[:meta_end].replace(old, new) + packer.compress(body) + packer.flush()
    return out + (b"\0" if len(out) % 2 else b"")


def _length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of length fields: DICOM element headers (explicit and implicit VR), PNG chunk lengths, the
    first TIFF directory's entry counts."""
    fields = []
    if _is_dicom(data):
        for vr in _LONG_VRS:
            fields += [(m.start() + 4, 4) for m in re.finditer(re.escape(vr) + b"\x00\x00", data) if m.start() >= 136]
        for vr in _SHORT_VRS:
            fields += [(m.start() + 2, 2) for m in re.finditer(re.escape(vr), data) if m.start() >= 136]
        for group in _GROUPS:
            for order in ("<H", ">H"):
                fields += [(m.start() + 4, 4) for m in re.finditer(re.escape(struct.pack(order, group)), data)
                           if m.start() >= 132 and m.start() % 2 == 0]
    elif data.startswith(b"\x89PNG"):
        pos = 8
        while pos + 8 <= len(data):
            fields.append((pos, 4))
            pos += 12 + struct.unpack(">I", data[pos:pos + 4])[0]
    elif data[:2] in (b"II", b"MM") and len(data) >= 8:
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack(order + "I", data[4:8])[0]
        fields.append((4, 4))
        if ifd + 2 <= len(data):
            n = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
            fields += [(ifd + 2 + 12 * i + 4, 4) for i in range(n) if ifd + 2 + 12 * i + 12 <= len(data)]
            fields += [(ifd + 2 + 12 * i + 8, 4) for i in range(n) if ifd + 2 + 12 * i + 12 <= len(data)]
    return [(o, w) for o, w in fields if o + w <= len(data)]


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    """1 to 3 random mutations of `data`; returns the bytes and the names of the mutations applied."""
    buf = bytearray(data)
    names = []
    for _ in range(int(rng.integers(1, 4))):
        op = str(rng.choice(["flip", "overwrite", "truncate", "duplicate", "delete", "length"],
                            p=[0.25, 0.2, 0.15, 0.1, 0.1, 0.2]))
        n = len(buf)
        if n < 2:
            break
        if op == "flip":
            for pos in rng.integers(0, n, int(rng.integers(1, 9))):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == "overwrite":
            start, length = int(rng.integers(0, n)), int(rng.integers(1, 65))
            fill = rng.choice([b"\x00", b"\xff", None])
            run = bytes(rng.integers(0, 256, length, dtype=np.uint8)) if fill is None else fill * length
            buf[start:start + length] = run[: n - start]
        elif op == "truncate":
            del buf[int(rng.integers(0, n)):]
        elif op == "duplicate":
            start, length = int(rng.integers(0, n)), int(rng.integers(1, 1025))
            at = int(rng.integers(0, n))
            buf[at:at] = buf[start:start + length]
        elif op == "delete":
            start, length = int(rng.integers(0, n)), int(rng.integers(1, 1025))
            del buf[start:start + length]
        else:
            fields = _length_fields(bytes(buf))
            if fields:
                offset, width = fields[int(rng.integers(0, len(fields)))]
                buf[offset:offset + width] = b"\xff" * width
            else:
                op = "length-none"
        names.append(op)
    return bytes(buf[:MAX_BYTES + 1024]), names


def recipe(k: int, base_bytes: dict[str, bytes]) -> tuple[str, bytes, list[str]]:
    """Mutant number `k`: (base name, bytes, mutations), the same on every run."""
    rng = np.random.default_rng([SEED, k])
    names = sorted(base_bytes)
    base = names[int(rng.integers(0, len(names)))]
    data = base_bytes[base]
    if _is_dicom(data):
        data = with_new_uid(data, k)
    data, ops = mutate(data, rng)
    return base, data, ops


def test_fuzzed_files_are_all_accounted_for(tmp_path):
    """≥ 2,000 mutated files (plus the intact bases) in one folder, one ingest with 2 workers: no exception, every
    file stored, skipped with a stable code or a duplicate, the problem list and the summary agree, the stack opens
    with as many images as the summary says; then a run measures every stored image (a CNR or a status)."""
    src = tmp_path / "src"
    src.mkdir()
    base_bytes = bases(tmp_path / "bases")
    for j, (name, data) in enumerate(base_bytes.items()):
        # NB: pydicom's files share instances (MR_small_* are copies of one): intact bases need their own UIDs too
        (src / f"base_{name}.bin").write_bytes(with_new_uid(data, N_MUTANTS + j) if _is_dicom(data) else data)
    for k in range(N_MUTANTS):
        base, data, ops = recipe(k, base_bytes)
        (src / f"m{k:04d}_{base}_{'+'.join(ops)}.bin").write_bytes(data)
    n_files = len(base_bytes) + N_MUTANTS

    t0 = time.perf_counter()
    summary = gpucnr.ingest(src, tmp_path / "stack.zarr", workers=WORKERS, file_timeout=20)
    ingest_s = time.perf_counter() - t0

    assert summary.files_in == n_files
    assert summary.files_in == summary.stored + sum(summary.skipped.values()) + summary.duplicates
    problems = summary.problems
    assert set(summary.skipped) <= set(CODES), set(summary.skipped) - set(CODES)
    assert set(problems["code"]) <= set(CODES), set(problems["code"]) - set(CODES)
    files = problems[problems["item"] == "file"]
    assert len(files) == sum(summary.skipped.values()) + summary.duplicates
    assert files["source"].is_unique
    assert (files["code"] == "duplicate").sum() == summary.duplicates
    assert files[files["code"] != "duplicate"]["code"].value_counts().to_dict() == summary.skipped
    assert (files["reason"].str.len() > 0).all(), "every skip says why"
    # NB: every failure mode these mutants reach is named by the readers themselves: none falls through to the
    # worker's catch-all, and none kills a worker (Rust decoders' panics are BaseExceptions, handled as errors)
    catch_all = files[files["reason"].str.startswith("the reader failed")]
    assert catch_all.empty, catch_all.to_string()
    assert "decoder-crash" not in summary.skipped, files[files["code"] == "decoder-crash"].to_string()
    assert not files["reason"].str.contains("PHI_CANARY", regex=False).any(), "a reason quotes a header value"
    stack = gpucnr.open_stack(summary.stack)
    assert summary.images == stack.n_images
    linkage = pd.read_csv(summary.linkage, dtype={"source": str}, keep_default_na=False)
    assert len(linkage) == summary.images and linkage["source"].nunique() == summary.stored
    stored, skipped = set(linkage["source"]), set(files["source"])
    assert not stored & skipped
    assert stored | skipped == {p.name for p in src.iterdir()}, "a file neither stored nor skipped"
    intact = {f"base_{name}.bin" for name in base_bytes}
    assert intact <= stored, f"intact base files not stored: {sorted(intact - stored)}"

    valid = stack.images.sort_values("index")
    h, w = valid["valid_h"].to_numpy(np.int64), valid["valid_w"].to_numpy(np.int64)
    rois = pd.DataFrame({"image": valid["index"].to_numpy(np.int64), "roi": 1, "kind": "square", "cx": w // 2,
                         "cy": h // 2, "r": np.maximum(np.minimum(h, w) // 6, 1)})
    t1 = time.perf_counter()
    ds = gpucnr.run(stack, tmp_path / "results.zarr", rois=rois, backend="numpy", workers=WORKERS).load()
    run_s = time.perf_counter() - t1
    assert ds.sizes["image"] == summary.images
    assert bool(ds["committed"].all())
    status = ds["status"].to_numpy()
    assert set(np.unique(status)) <= set(STATUS.values()) - {STATUS["not-computed"]}, np.unique(status)
    # NB: diagnostics for `pytest -s`: worker deaths and failures only the pool's last-resort handler caught
    last_resort = files[files["reason"].str.startswith("the reader failed")]
    print(f"\nfuzz: {n_files} files, ingest {ingest_s:.1f} s, run {run_s:.1f} s; stored {summary.stored} "
          f"({summary.images} images), duplicates {summary.duplicates}, skipped {summary.skipped}; "
          f"cells by status {dict(zip(*np.unique(status, return_counts=True), strict=True))}; "
          f"last-resort reasons: {last_resort['reason'].value_counts().to_dict()}")
