"""PHI canaries through the whole command line: no identifying DICOM value ever leaves the source files, and
source file names reach only the operator's files.

A folder of DICOM files (CT int16 with rescale, MR uint16, a multi-frame, an RGB ultrasound, one with truncated
pixel data, one duplicate SOP instance) plus a PNG, every identifying attribute set to ``PHI_CANARY_<Keyword>``
(or a distinctive date/time) and every folder and file named ``PHI_CANARY_FILENAME_<n>``, goes through
``gpucnr --log-level debug`` ingest, info, run, report, filter (with and without ``--with-paths``) and two
failing runs. Then every output file (raw bytes, decompressed Zarr arrays and attributes, Parquet values,
images embedded in the report), every stdout/stderr and the text of in-process exceptions are searched.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import hmac
import json
import re
import shutil
import struct
import subprocess
import sys
import traceback
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
import zarr
from dicomfactory import CANARY_VALUES, canary_strings, truncate, write_dicom, write_raster
from pydicom.uid import ImplicitVRLittleEndian

import gpucnr
from gpucnr.sources import sidecar_paths

FILENAME = "PHI_CANARY_FILENAME"
#: a tag canary is PHI_CANARY_ followed by anything but FILENAME (catches truncated SH values too)
TAG_RE = re.compile(rb"PHI_CANARY_(?!FILENAME)")
NAME_RE = re.compile(rb"PHI_CANARY_FILENAME")
def pseudonym(key: bytes, kind: str, value: str) -> str:
    """The documented construction (docs/ingest.md), computed here rather than by the code under test:
    HMAC-SHA256 of "kind NUL value" under the key, first 20 hex digits."""
    return hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()[:20]


#: the --meta CSV's patient_id column: an id column, pseudonymised like a DICOM PatientID
META_PATIENT = "PHI_CANARY_MetaPatientID"
SIZE = 64
RNG = np.random.default_rng(20240611)


def _noisy(dtype, base: int, spread: int, shape=(SIZE, SIZE)) -> np.ndarray:
    """Noise around `base` with a brighter square in the middle (the ROI), so every CNR is finite."""
    img = RNG.normal(base, spread, shape)
    img[..., 26:38, 26:38] += 4 * spread
    info = np.iinfo(dtype)
    return np.clip(np.round(img), info.min, info.max).astype(dtype)


def _name(n: int, ext: str = "dcm") -> str:
    return f"{FILENAME}_{n}/{FILENAME}_{n}.{ext}"


#: identifying text a NIfTI header (descrip, aux_file, db_name, intent_name, an ecode-2 DICOM extension) and a JPEG
#: (EXIF owner, dates and GPS, COM and XMP segments) carry
VOLUME_CANARIES = ["PHI_CANARY_NiftiDescrip", "PHI_CANARY_AuxFile", "PHI_CANARY_DbNam", "PHI_CANARY_Inte",
                   "PHI_CANARY_NiftiDicomExt", "PHI_CANARY_JpegOwner", "PHI_CANARY_JpegComment",
                   "PHI_CANARY_JpegXmp", "1987:06:05 04:03:02"]


def _phi_nifti(path: Path) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    vol = np.stack([_noisy(np.int16, 300, 20).T[:, ::-1]] * 2, axis=-1)
    img = nib.Nifti1Image(vol, np.diag([0.7, 0.7, 3.0, 1.0]))
    hdr = img.header
    hdr["descrip"] = b"PHI_CANARY_NiftiDescrip"
    hdr["aux_file"] = b"PHI_CANARY_AuxFile"
    hdr["db_name"] = b"PHI_CANARY_DbNam"
    hdr.set_intent("estimate", name="PHI_CANARY_Inte")
    hdr.extensions.append(nib.nifti1.Nifti1Extension(2, b"PatientName=PHI_CANARY_NiftiDicomExt\x00" * 2))
    nib.save(img, str(path))


def _phi_jpeg(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x013B] = "PHI_CANARY_JpegOwner"  # NB: Artist
    exif[0x0132] = "1987:06:05 04:03:02"  # NB: DateTime
    exif[0x0112] = 6  # NB: Orientation "rotate 90": never applied
    gps = exif.get_ifd(0x8825)
    gps[2] = (52.0, 31.0, 12.0)
    gps[1] = "N"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><dc:creator>PHI_CANARY_JpegXmp</dc:creator></x:xmpmeta>'
    Image.fromarray(_noisy(np.uint8, 90, 9)).save(path, "JPEG", quality=95, exif=exif,
                                                   comment=b"PHI_CANARY_JpegComment", xmp=xmp)


def build_dataset(root: Path) -> dict:
    """The canary folder, its ROI and meta CSVs; returns the paths and every identifying value written."""
    src = root / "src"
    ct = write_dicom(src / _name(0), _noisy(np.int16, -200, 40), canary=True, slope=1.0, intercept=-1024.0)
    write_dicom(src / _name(1), _noisy(np.uint16, 800, 60), canary=True, modality="MR",
                transfer_syntax=ImplicitVRLittleEndian)
    write_dicom(src / _name(2), _noisy(np.uint16, 500, 30, (3, SIZE, SIZE)), canary=True, modality="MR")
    rgb = np.repeat(_noisy(np.uint8, 80, 10)[..., None], 3, axis=-1)
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 5, 0, 255)
    write_dicom(src / _name(3), rgb, photometric="RGB", modality="US", canary=True)
    broken = write_dicom(src / _name(4), _noisy(np.int16, 0, 50), canary=True)
    truncate(broken, -1000)  # NB: ends inside its pixel data
    head = pydicom.dcmread(ct, stop_before_pixels=True)
    ct_uid = str(head.SOPInstanceUID)
    write_dicom(src / _name(5), _noisy(np.int16, 0, 50), canary=True, sop_uid=ct_uid)  # a duplicate instance
    write_raster(src / _name(6, "png"), _noisy(np.uint8, 60, 8))
    _phi_nifti(src / _name(7, "nii.gz"))
    _phi_jpeg(src / _name(8, "jpg"))
    tags = set(CANARY_VALUES) | {META_PATIENT} | set(VOLUME_CANARIES)
    for path in sorted(src.rglob("*.dcm")):
        tags.update(canary_strings(path))
    rois = root / "rois.csv"
    rows = [(_name(0), 0), (_name(1), 0), (_name(2), 0), (_name(2), 2), (_name(3), 0), (_name(4), 0),
            (_name(6, "png"), 0), (_name(99), 0)]
    with open(rois, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "frame", "roi", "kind", "cx", "cy", "r", "name"])
        for source, frame in rows:
            w.writerow([source, frame, 1, "square", 32, 32, 6, "lesion"])
            w.writerow([source, frame, 2, "disk", 20, 44, 4, "muscle"])
    meta = root / "meta.csv"
    with open(meta, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "site", "patient_id"])
        for n, ext in ((0, "dcm"), (1, "dcm"), (2, "dcm"), (3, "dcm"), (6, "png"), (7, "nii.gz"), (8, "jpg"),
                       (98, "dcm")):
            w.writerow([_name(n, ext), "siteA" if n % 2 else "siteB", f"{META_PATIENT}_{n}"])
    uids = {t for t in tags if re.fullmatch(r"[0-9.]+", t) and t.count(".") > 2}
    return {"src": src, "rois": rois, "meta": meta, "tags": sorted(tags), "uids": uids, "ct_uid": ct_uid,
            "ct_study": str(head.StudyInstanceUID)}


def sidecars(stack: Path) -> dict[str, Path]:
    """`gpucnr.sources.sidecar_paths`, checked against the names the stack's ``ingest`` attributes record."""
    side = sidecar_paths(stack)
    attrs = dict(zarr.open_group(str(stack), mode="r").attrs)["ingest"]
    assert (side["linkage"].name, side["skipped"].name) == (attrs["linkage"], attrs["skipped_list"])
    return side


def cli(*args, ok: bool = True, rc: int | None = None) -> dict:
    """``python -m gpucnr --log-level debug ARGS`` in a subprocess; its exit code, stdout and stderr (`rc`: the
    exit status expected, e.g. 3 for a command that completed with problems)."""
    proc = subprocess.run([sys.executable, "-m", "gpucnr", "--log-level", "debug", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if rc is not None:
        assert proc.returncode == rc, f"gpucnr {' '.join(map(str, args))}: {proc.returncode}\n{proc.stderr}"
    elif ok:
        assert proc.returncode == 0, f"gpucnr {' '.join(map(str, args))} failed:\n{proc.stderr}"
    else:
        assert proc.returncode != 0, f"gpucnr {' '.join(map(str, args))} should have failed"
        assert proc.stderr.strip(), "a failing command says why on stderr"
    return {"args": [str(a) for a in args], "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def _tag_leaks(data: bytes, tags: list[str]) -> list[str]:
    """Identifying values (tag canaries, dates, raw UIDs) found in `data`."""
    found = [t for t in tags if t.encode() in data]
    m = TAG_RE.search(data)
    if m:
        found.append(data[m.start():m.start() + 40].decode("latin-1"))
    return found


def _embedded(data: bytes) -> list[bytes]:
    """The decoded payloads of ``data:...;base64,`` URIs (images in the self-contained report), and the inflated
    text of their compressed PNG text chunks (zTXt, iTXt)."""
    out = []
    for m in re.finditer(rb"data:[\w/+.-]+;base64,([A-Za-z0-9+/=]+)", data):
        payload = base64.b64decode(m.group(1))
        out.append(payload)
        pos = 8 if payload.startswith(b"\x89PNG\r\n\x1a\n") else len(payload)
        while pos + 8 <= len(payload):
            length, kind = struct.unpack(">I4s", payload[pos:pos + 8])
            body = payload[pos + 8:pos + 8 + length]
            if kind in (b"zTXt", b"iTXt"):
                head, _, rest = body.partition(b"\0")
                compressed = rest[1:] if kind == b"zTXt" else rest[2:].split(b"\0", 2)[-1]
                if kind == b"zTXt" or rest[:1] == b"\1":
                    out.append(head + b" " + zlib.decompress(compressed))
            pos += 12 + length
    return out


def _zarr_texts(path: Path) -> list[tuple[str, bytes]]:
    """(where, bytes) of every decompressed array and every attribute set of a Zarr group, recursively."""
    out = []

    def visit(group, prefix):
        out.append((f"{prefix}@attrs", json.dumps(dict(group.attrs), default=str).encode()))
        for name, arr in group.arrays():
            values = np.asarray(arr[...])
            where = f"{prefix}/{name}"
            out.append((f"{where}@attrs", json.dumps(dict(arr.attrs), default=str).encode()))
            if values.dtype.kind in "OUST":
                out.append((where, "\n".join(map(str, values.ravel())).encode("utf-8", "surrogateescape")))
            else:
                out.append((where, values.tobytes()))
        for name, sub in group.groups():
            visit(sub, f"{prefix}/{name}")

    visit(zarr.open_group(str(path), mode="r"), path.name)
    return out


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory):
    """Ingest, info, run, report, filter and failing runs of the canary folder, all at debug log level."""
    root = tmp_path_factory.mktemp("phi")
    data = build_dataset(root)
    out = root / "out"
    out.mkdir()
    stack, results = out / "stack.zarr", out / "results.zarr"
    calls = {
        # NB: 3: the truncated file and the ROI / meta rows naming no image are problems (DESIGN §10)
        "ingest": cli("ingest", data["src"], stack, "--rois", data["rois"], "--meta", data["meta"], "--workers", 2,
                      rc=3),
        "info stack": cli("info", stack),
        "info stack json": cli("info", stack, "--json"),
        "run": cli("run", stack, results, "--backend", "numpy", "--workers", 2, "--group-columns", "site"),
        "info results": cli("info", results, "--json"),
        "report": cli("report", results, out / "report", "--by", "modality,site"),
        "filter": cli("filter", results, "--out", out / "m.csv"),
        "filter parquet": cli("filter", results, "--level", "patient", "--out", out / "m.parquet"),
        "filter roi": cli("filter", results, "--level", "roi", "--out", out / "m_roi.csv"),
        "filter paths": cli("filter", results, "--with-paths", "--out", out / "m_paths.csv"),
        "run existing": cli("run", stack, results, "--backend", "numpy", ok=False),
    }
    damaged = out / "damaged.zarr"
    shutil.copytree(stack, damaged)
    chunks = sorted(p for p in (damaged / "buckets").rglob("*") if p.is_file() and "/c/" in p.as_posix())
    assert chunks, "the stack has chunk files to delete"
    chunks[0].unlink()
    calls["run damaged"] = cli("run", damaged, out / "results_damaged.zarr", "--backend", "numpy", ok=False)
    calls["info damaged"] = cli("info", damaged, rc=3)
    return {**data, "root": root, "out": out, "stack": stack, "results": results, "calls": calls}


def test_ingest_outcome(phi_run):
    """The canary folder ingests as designed: four DICOM files, the PNG, the JPEG and the 2-slice NIfTI stored (10
    images), the truncated one skipped, the duplicate recognised; ids in the stack are HMAC pseudonyms under the
    stack's key."""
    summary = phi_run["calls"]["ingest"]["stdout"]
    assert "10 image(s) from 7 file(s); 9 file(s) in, 1 skipped, 1 duplicate(s)" in summary, summary
    stack = gpucnr.open_stack(phi_run["stack"])
    assert stack.n_images == 10
    for canary in VOLUME_CANARIES:
        blob = (phi_run["src"] / _name(8, "jpg")).read_bytes() + gzip.decompress(
            (phi_run["src"] / _name(7, "nii.gz")).read_bytes())
        assert canary.encode() in blob, f"the canary {canary} is in the input"
    key = bytes.fromhex(sidecars(phi_run["stack"])["key"].read_text().strip())
    assert pseudonym(key, "study", phi_run["ct_study"]) in set(stack.images["study_id"])
    for col in ("patient_id", "study_id", "series_id", "instance_id"):
        assert stack.images[col].astype(str).str.fullmatch(r"[0-9a-f]{20}|").all(), col
    assert set(stack.images["site"]) == {"siteA", "siteB"}
    ct_rows = stack.images["file_index"] == 0
    assert (stack.images["patient_id"][ct_rows] == pseudonym(key, "patient", f"{META_PATIENT}_0")).all()
    skipped = pd.read_csv(sidecars(phi_run["stack"])["skipped"], dtype=str, keep_default_na=False)
    assert set(skipped["code"]) == {"truncated", "duplicate", "roi-no-image", "meta-no-image"}, skipped
    ct_bytes = (phi_run["src"] / _name(0)).read_bytes()
    assert all(t.encode() in ct_bytes for t in CANARY_VALUES), "the canaries are in the input"
    assert len(phi_run["uids"]) >= 4 * 5 and phi_run["ct_uid"] in phi_run["uids"], "so are the raw UIDs"
    ds = gpucnr.open_results(phi_run["results"])
    assert int(ds["committed"].sum()) == ds["committed"].size
    assert (ds["status"].values == 0).sum() >= 7, "every image gets CNRs from the stack's ROI table"


def test_no_identifier_in_any_output_file(phi_run):
    """No tag canary, date or raw UID in any byte of any file written (stack, sidecars, results, report, manifests,
    the damaged copy); file-name canaries only in the linkage file, the skipped-files list and the manifest made
    with ``--with-paths``."""
    src, tags = phi_run["src"], phi_run["tags"]
    side = sidecars(phi_run["stack"])
    may_name = {side["linkage"], side["skipped"], phi_run["out"] / "m_paths.csv"}
    leaks, named = [], set()
    files = [p for p in phi_run["out"].rglob("*") if p.is_file()]
    assert len(files) > 20
    assert _embedded((phi_run["out"] / "report" / "report.html").read_bytes()), "the report embeds its figures"
    for path in files:
        data = path.read_bytes()
        for where, blob in [("bytes", data)] + [(f"embedded #{i}", b) for i, b in enumerate(_embedded(data))]:
            leaks += [f"{path.relative_to(phi_run['root'])} ({where}): {t!r}" for t in _tag_leaks(blob, tags)]
            if NAME_RE.search(blob):
                named.add(path)
    assert not leaks, "identifying values written to output files:\n" + "\n".join(leaks)
    assert named == may_name, ("source file names written outside the operator's files: "
                               f"{sorted(str(p) for p in named - may_name)}; expected in {sorted(map(str, may_name))}")
    assert not any(src.as_posix() in p.read_text(errors="replace") for p in files if p.suffix in (".csv", ".html"))


def test_no_identifier_in_decompressed_stores(phi_run):
    """Zarr chunks are compressed: every array and attribute of the stack and the results, decompressed, and every
    value of the Parquet manifest, hold no tag canary, raw UID or file name."""
    tags = phi_run["tags"]
    leaks = []
    for store in (phi_run["stack"], phi_run["results"]):
        for where, blob in _zarr_texts(store):
            leaks += [f"{where}: {t!r}" for t in _tag_leaks(blob, tags)]
            if NAME_RE.search(blob):
                leaks.append(f"{where}: a source file name")
    stack = gpucnr.open_stack(phi_run["stack"])
    ds = gpucnr.open_results(phi_run["results"])
    texts = {"stack images": stack.images.astype(str).to_csv(), "stack rois": stack.rois.astype(str).to_csv(),
             "results attrs": json.dumps(ds.attrs, default=str)}
    for name, var in ds.variables.items():
        texts[f"results {name}"] = "\n".join(map(str, np.asarray(var.values).ravel())) + json.dumps(
            var.attrs, default=str)
    table = pq.read_table(phi_run["out"] / "m.parquet")
    texts["m.parquet"] = table.to_pandas().astype(str).to_csv() + str(table.schema.metadata)
    for where, text in texts.items():
        blob = text.encode("utf-8", "surrogateescape")
        leaks += [f"{where}: {t!r}" for t in _tag_leaks(blob, tags)]
        if NAME_RE.search(blob):
            leaks.append(f"{where}: a source file name")
    assert not leaks, "identifying values in the stores:\n" + "\n".join(leaks)


def test_no_identifier_on_the_console(phi_run):
    """stdout and stderr of every command, the failing runs included, hold no tag canary or raw UID; a file name
    appears only in the ingest's stderr, on a line about that file."""
    tags = phi_run["tags"]
    leaks = []
    line_about = re.compile(rf"^gpucnr: (debug|info|warning): ({FILENAME}_\d+/)?{FILENAME}_\d+\.\w+: ")
    for name, call in phi_run["calls"].items():
        for stream in ("stdout", "stderr"):
            text = call[stream]
            leaks += [f"gpucnr {name} {stream}: {t!r}" for t in _tag_leaks(text.encode(), tags)]
            for line in text.splitlines():
                if FILENAME in line and not (name == "ingest" and stream == "stderr" and line_about.match(line)):
                    leaks.append(f"gpucnr {name} {stream}: a file name outside a message about it: {line!r}")
    assert not leaks, "identifying values on the console:\n" + "\n".join(leaks)
    ingest_err = phi_run["calls"]["ingest"]["stderr"]
    assert f"{_name(4)}: file truncated" in ingest_err, "the operator is told which file was skipped"
    assert "error" in phi_run["calls"]["run existing"]["stderr"]
    assert "error" in phi_run["calls"]["run damaged"]["stderr"]


def _exception_text(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


def test_no_identifier_in_exception_text(phi_run, tmp_path):
    """Errors raised in-process by `gpucnr.ingest` (the stack exists; ROI CSVs whose bad cell holds a canary, with and
    without the optional frame column; a meta CSV listing a canary-named file twice) and by `gpucnr.run` (results
    exist; a chunk is missing) are coded `GpucnrError`s that never quote a table value, a tag canary or a source
    file name."""
    src, tags = phi_run["src"], phi_run["tags"]
    tables = {
        "bad_cx.csv": f"source,roi,kind,cx,cy,r\n{_name(0)},1,square,32,32,6\n"
                      f"{_name(1)},1,square,PHI_CANARY_PatientName,32,6\n",
        "bad_kind.csv": f"source,frame,roi,kind,cx,cy,r\n{_name(0)},0,1,PHI_CANARY_PatientID,32,32,6\n",
        "bad_kind_no_frame.csv": f"source,roi,kind,cx,cy,r\n{_name(0)},1,PHI_CANARY_PatientID,32,32,6\n",
        "bad_meta.csv": f"source,site\n{_name(0)},PHI_CANARY_InstitutionName\n{_name(0)},x\n",
    }
    for name, text in tables.items():
        (tmp_path / name).write_text(text)
    ingests = {
        "stack exists": {"stack": phi_run["stack"]},
        "ROI CSV, cx not an integer": {"stack": tmp_path / "a.zarr", "rois": tmp_path / "bad_cx.csv"},
        "ROI CSV, bad kind": {"stack": tmp_path / "b.zarr", "rois": tmp_path / "bad_kind.csv"},
        "ROI CSV without frame, bad kind": {"stack": tmp_path / "c.zarr", "rois": tmp_path / "bad_kind_no_frame.csv"},
        "meta CSV, a source twice": {"stack": tmp_path / "d.zarr", "meta": tmp_path / "bad_meta.csv"},
    }
    cases = {f"ingest, {name}": (gpucnr.ingest, (src,), {"workers": 1, **kw}) for name, kw in ingests.items()}
    cases["run, results exist"] = (gpucnr.run, (phi_run["stack"], phi_run["results"]), {"backend": "numpy"})
    cases["run, a chunk missing"] = (gpucnr.run, (phi_run["out"] / "damaged.zarr", tmp_path / "r.zarr"),
                                     {"backend": "numpy"})
    problems = []
    for name, (func, args, kw) in cases.items():
        try:
            func(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - every exception's text is checked, coded or not
            text = _exception_text(exc)
            if not isinstance(exc, gpucnr.GpucnrError):
                problems.append(f"{name}: raised {type(exc).__name__} ({exc}), not a coded GpucnrError")
            problems += [f"{name}: {t!r} in {str(exc)!r}" for t in _tag_leaks(text.encode(), tags)]
            if FILENAME in text:
                problems.append(f"{name}: a source file name in {str(exc)!r}")
        else:
            problems.append(f"{name}: did not fail")
    assert not problems, "exceptions raised in-process:\n" + "\n".join(problems)
