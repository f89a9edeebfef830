"""gpucnr next to the tools users know: RadQy and MRQy (and vIQA with --with-viqa), on one DICOM folder.

Never a dependency of gpucnr and never run in CI: the peers live in a virtual environment of their own, which this
script builds (RadQy and MRQy need ``pydicom<3`` and ``pandas<3``; vIQA pulls ``numpy<2`` and torch, so it gets a
second one). RadQy 2025.3.2 crashes at its first participant (``NameError: functions``: ``main`` builds the
metric list as a local, ``IQM`` reads it as a global); the script pins that version and adds ``functions`` to
``main``'s ``global`` line, after checking the file's sha256, so that any other file is refused rather than patched.

What it measures, written to docs/peers.md (``--out``):

1. Agreement of ``definition="mrqy"`` with MRQy's and RadQy's CNR on every image: gpucnr measured on MRQy's own
   regions (its Otsu-and-convex-hull foreground as the ROI, the rest as the background), and on gpucnr's regions.
2. Noise response: per source image, Spearman's rho of each tool's CNR against the added noise (a CNR that tracks
   image quality falls as noise rises: rho = -1).
3. Whole-process images/s: RadQy's and MRQy's command lines on a folder of 512x512 files, and gpucnr ingest + run
   on the same folder (and on ``--speed-files`` files).

The DICOM folder is ``--src`` (flat folder of single-frame monochrome ``.dcm`` files), or by default a noise
ladder written as new DICOM files from pydicom's bundled CT_small.dcm, MR_small.dcm and examples_overlay.dcm.
gpucnr's own regions are ``--rois auto`` when this gpucnr has it (``gpucnr.auto_regions``), else a two-class Otsu
mask written by this script (foreground = label 1, the rest = label 2, measured with ``--background label``).

Usage (from the repository root, with gpucnr's environment)::

    .venv/bin/python scripts/peers.py                      # builds /tmp/gpucnr-peers-venv on first use
    .venv/bin/python scripts/peers.py --src DICOM_DIR --with-viqa
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.uid import generate_uid
from scipy.stats import spearmanr

import gpucnr

RADQY = "radqy==2025.3.2"
MRQY = "mrqy==0.0.3"
VIQA = "viqa==3.0.1"
PEER_PINS = (RADQY, MRQY, "pydicom<3", "pandas<3", "SimpleITK")
#: sha256 of radqy/radqy.py in radqy 2025.3.2 as published, and the one line patched.
RADQY_SHA256 = "9d6198f2ffe64bd5a860cf156c6e59c07728cb9803b6e049a48e13c7a5416fac"
# NB: the published file has CRLF line ends; hashed and patched as bytes
RADQY_LINE = (b"    global save_masks_flag, sample_size, middle_size, scan_type, fname_outdir, overwrite_flag, "
              b"headers\r\n")
RADQY_FIXED = RADQY_LINE[:-2] + b", functions\r\n"
SOURCES = ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm")
#: Added Gaussian noise, as fractions of each source's 1-99 % value range.
LADDER = (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
SEED = 16

# The peers' side: runs in their environment, writes one CSV row per file and MRQy's foreground masks.
PEER_HELPER = '''
import sys, csv, numpy as np, pydicom
from PIL import Image
from mrqy import QCF
from radqy import radqy
files, out_csv, mask_dir = sys.argv[1].split("\\n"), sys.argv[2], sys.argv[3]
with open(out_csv, "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["file", "mrqy_cnr", "radqy_cnr", "hull_pixels"])
    for f in files:
        img = pydicom.dcmread(f).pixel_array.astype(np.int64)  # as MRQy's and RadQy's volume readers do
        F, B, c, fg, bg = QCF.foreground(img, None, None, 0)
        value = QCF.cnr(F, B, c, fg, bg)
        _, radqy_value = radqy.func16(*radqy.IQM.foreground(None, img))
        # their region as a mask file for gpucnr: 1 = foreground (convex hull), 2 = the rest
        Image.fromarray(np.where(c, 1, 2).astype(np.uint8)).save(f"{mask_dir}/{f.rsplit('/', 1)[1][:-4]}.png")
        w.writerow([f.rsplit("/", 1)[1], value, radqy_value, int(np.sum(c))])
'''

VIQA_HELPER = '''
import sys, csv, numpy as np, pydicom
from viqa.nr_metrics.cnr import contrast_to_noise_ratio
files, out_csv = sys.argv[1].split("\\n"), sys.argv[2]
with open(out_csv, "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["file", "viqa_cnr"])
    for f in files:
        img = pydicom.dcmread(f).pixel_array.astype(np.float64)
        try:  # vIQA's own automatic regions (thresholds, largest region)
            value = contrast_to_noise_ratio(img, None, None, None, auto_center=True)
        except Exception as e:  # noqa: BLE001 -- recorded, the comparison goes on
            value = float("nan")
            print(f"viqa: {f}: {type(e).__name__}: {e}", file=sys.stderr)
        w.writerow([f.rsplit("/", 1)[1], value])
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, help="a flat folder of single-frame monochrome .dcm files (default: a noise "
                                            "ladder from pydicom's bundled files)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpucnr-peers"))
    p.add_argument("--venv", type=Path, default=Path("/tmp/gpucnr-peers-venv"))
    p.add_argument("--with-viqa", action="store_true", help="also vIQA (its own environment: numpy<2, torch)")
    p.add_argument("--torch", default="torch", help="the torch requirement of vIQA's environment, e.g. "
                                                    "'torch==2.13.0+cpu' for a CPU wheel at hand (default: PyPI's)")
    p.add_argument("--speed-files", type=int, default=2000, help="512x512 files for gpucnr's images/s")
    p.add_argument("--peer-speed-files", type=int, default=60,
                   help="of those, how many the peers' CLIs run on (at most 71: MRQy runs t-SNE with perplexity 30 "
                        "from 6 patients on, and fails below 31)")
    p.add_argument("--out", type=Path, default=Path("docs/peers.md"))
    args = p.parse_args(argv)
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    python = ensure_venv(args.venv, [*PEER_PINS])
    radqy_file = patch_radqy(python)
    viqa_python = ensure_venv(Path(str(args.venv) + "-viqa"), [args.torch, VIQA, "pydicom<3"]) if args.with_viqa \
        else None

    ladder = args.src if args.src else make_ladder(work / "ladder")
    files = sorted(str(f) for f in Path(ladder).glob("*.dcm"))
    print(f"{len(files)} files in {ladder}", flush=True)

    # 1-2. per image: the peers' values and their regions, gpucnr on their regions and on its own
    peer = run_peer_helper(python, files, work)
    if viqa_python is not None:
        peer = peer.merge(run_helper(viqa_python, VIQA_HELPER, files, work / "viqa.csv"), on="file")
    radqy_cli = run_radqy_cli(python, ladder, work / "radqy-ladder")
    peer = peer.merge(radqy_cli, on="file", how="left")
    theirs = gpucnr_on_masks(ladder, work / "masks-theirs", work / "theirs", ["mrqy"])
    own_regions = "auto" if hasattr(gpucnr, "auto_regions") else "otsu"
    ours = gpucnr_own(ladder, work, own_regions, ["mrqy", "pooled", "viqa"])
    table = peer.merge(theirs.add_prefix("theirs_").rename(columns={"theirs_file": "file"}), on="file")
    table = table.merge(ours.add_prefix("own_").rename(columns={"own_file": "file"}), on="file")
    table["source"] = table["file"].str.rsplit("_", n=1).str[0]
    table["noise"] = table["file"].map(noise_of(ladder))

    # 3. whole-process speed
    speed_dir = make_speed_set(work / "speed", args.speed_files)
    subset = make_subset(speed_dir, work / "speed-subset", args.peer_speed_files)
    load = os.getloadavg()[1]
    speed = {
        "RadQy (CLI)": time_radqy(python, subset, work / "radqy-speed"),
        "MRQy (CLI)": time_mrqy(python, subset, work / "mrqy-speed"),
        "gpucnr ingest + run": time_gpucnr(subset, work / "g-subset", own_regions),
    }
    big = time_gpucnr(speed_dir, work / "g-speed", own_regions)
    # NB: the machine's 5-minute load average before and after: timings on shared cores mean little without it
    load = (load, os.getloadavg()[1])
    write_report(args, table, speed, big, own_regions, radqy_file, load)
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------ environments


def ensure_venv(venv: Path, pins: list[str]) -> Path:
    """A virtual environment with `pins` installed (pip, PyPI); reused when it already has them."""
    python = venv / "bin" / "python"
    stamp = venv / "gpucnr-peers.json"
    if stamp.exists() and json.loads(stamp.read_text()) == pins:
        return python
    # NB: RadQy requires Python < 3.12: the interpreter running this script is used when it qualifies
    base = sys.executable if sys.version_info < (3, 12) else shutil.which("python3.11") or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    stamp.write_text(json.dumps(pins))
    return python


def patch_radqy(python: Path) -> str:
    """Add `functions` to RadQy's main() global line, refusing any file but the published 2025.3.2 one."""
    where = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('radqy').origin)"],
                           check=True, capture_output=True, text=True).stdout.strip()
    path = Path(where).parent / "radqy.py"
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest == RADQY_SHA256:
        assert data.count(RADQY_LINE) == 1
        path.write_bytes(data.replace(RADQY_LINE, RADQY_FIXED))
        return f"patched (sha256 {RADQY_SHA256[:12]}… checked first)"
    if RADQY_FIXED not in data or hashlib.sha256(data.replace(RADQY_FIXED, RADQY_LINE)).hexdigest() != RADQY_SHA256:
        sys.exit(f"refusing to patch {path}: sha256 {digest} is not RadQy 2025.3.2's {RADQY_SHA256}")
    return f"patched (sha256 {RADQY_SHA256[:12]}… checked first)"


# ------------------------------------------------------------------------------------------ data


def bundled(name: str) -> Path:
    """One of pydicom's bundled test files (never downloaded)."""
    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def write_like(ds, pixels: np.ndarray, path: Path, *, patient: str, number: int, series: str) -> None:
    """A copy of `ds` holding `pixels` (its stored dtype), new SOP instance, the given patient and series."""
    out = ds.copy()
    out.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
    out.Rows, out.Columns = pixels.shape
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.SeriesInstanceUID = series
    out.PatientID = out.PatientName = patient
    out.InstanceNumber = number
    for tag in ("SliceThickness", "PixelSpacing"):  # NB: MRQy's reader formats them without a guard
        if tag not in out:
            setattr(out, tag, [1.0, 1.0] if tag == "PixelSpacing" else 1.0)
    out.save_as(path, enforce_file_format=True)


def stored_range(ds) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def make_ladder(folder: Path) -> Path:
    """Each bundled source with Gaussian noise of LADDER x its 1-99 % range added, as new DICOM files named
    ``{source}_{step}.dcm``; one patient and series per source, the step as its instance number."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    for name in SOURCES:
        ds = pydicom.dcmread(bundled(name))
        img = ds.pixel_array.astype(np.float64)
        lo, hi = stored_range(ds)
        spread = float(np.percentile(img, 99) - np.percentile(img, 1))
        series = generate_uid()
        for step, level in enumerate(LADDER):
            noisy = np.clip(np.rint(img + rng.normal(0.0, level * spread, img.shape)), lo, hi)
            write_like(ds, noisy, folder / f"{Path(name).stem}_{step}.dcm", patient=Path(name).stem,
                       number=step + 1, series=series)
    return folder


def noise_of(folder) -> dict:
    """file name -> the noise step (its instance number - 1), read from the files."""
    return {f.name: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) - 1
            for f in Path(folder).glob("*.dcm")}


def make_speed_set(folder: Path, count: int) -> Path:
    """`count` 512x512 CT files: CT_small resampled (nearest) to 512x512 with fresh noise each, 12 per patient."""
    from scipy.ndimage import zoom

    folder.mkdir(parents=True)
    rng = np.random.default_rng(SEED + 1)
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    img = ds.pixel_array.astype(np.float64)
    big = zoom(img, (512 / img.shape[0], 512 / img.shape[1]), order=0)
    lo, hi = stored_range(ds)
    spread = float(np.percentile(img, 99) - np.percentile(img, 1))
    series = {}
    for k in range(count):
        patient = f"speed{k // 12:04d}"
        series.setdefault(patient, generate_uid())
        noisy = np.clip(np.rint(big + rng.normal(0.0, 0.02 * spread, big.shape)), lo, hi)
        write_like(ds, noisy, folder / f"s{k:05d}.dcm", patient=patient, number=k % 12 + 1, series=series[patient])
    return folder


def make_subset(src: Path, folder: Path, count: int) -> Path:
    """The first `count` files, one subfolder per patient: MRQy's grouping by PatientID assumes a patient's files
    come one after another in os.walk's (directory) order, which a flat folder does not keep; with folders it
    takes the folder as the patient (-r True)."""
    for k, f in enumerate(sorted(src.glob("*.dcm"))[:count]):
        patient = folder / f"speed{k // 12:04d}"
        patient.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, patient / f.name)
    return folder


def otsu_masks(folder: Path, mask_dir: Path) -> None:
    """gpucnr's regions when it has no ``--rois auto``: label 1 = above Otsu's threshold (skimage), 2 = the rest."""
    from PIL import Image
    from skimage.filters import threshold_otsu

    for f in sorted(folder.rglob("*.dcm")):
        img = pydicom.dcmread(f).pixel_array
        out = mask_dir / f.relative_to(folder).with_suffix(".png")  # NB: ingest's --masks mirrors the folders
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(img > threshold_otsu(img), 1, 2).astype(np.uint8)).save(out)


# ------------------------------------------------------------------------------------------ the peers


def run_helper(python: Path, code: str, files: list[str], out_csv: Path, *extra: str) -> pd.DataFrame:
    script = out_csv.with_name(out_csv.stem + "_helper.py")  # NB: never a package's name (viqa.py)
    script.write_text(textwrap.dedent(code))
    subprocess.run([str(python), str(script), "\n".join(files), str(out_csv), *extra], check=True)
    return pd.read_csv(out_csv)


def run_peer_helper(python: Path, files: list[str], work: Path) -> pd.DataFrame:
    (work / "masks-theirs").mkdir()
    return run_helper(python, PEER_HELPER, files, work / "peers.csv", str(work / "masks-theirs"))


def radqy_cwd(cwd: Path, python: Path) -> None:
    """RadQy opens its tag list from the working directory: copy the package's there."""
    cwd.mkdir(parents=True, exist_ok=True)
    where = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('radqy').origin)"],
                           check=True, capture_output=True, text=True).stdout.strip()
    for name in ("MRI_TAGS.yaml", "CT_TAGS.yaml"):
        shutil.copy(Path(where).parent / name, cwd / name)


def run_radqy_cli(python: Path, folder, cwd: Path) -> pd.DataFrame:
    """RadQy's command line (default -t MRI: stored values) on the folder, one run per modality (its results.tsv
    gets one column per tag found, so files with other tag sets in one run break its own reading of it); its CNR
    per participant = per file."""
    groups: dict[str, list[Path]] = {}
    for f in sorted(Path(folder).glob("*.dcm")):
        groups.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).get("Modality", "OT")), []).append(f)
    parts = []
    for k, (modality, files) in enumerate(sorted(groups.items())):
        inputs = cwd / f"in-{k}"
        inputs.mkdir(parents=True)
        for f in files:
            shutil.copy(f, inputs / f.name)
        radqy_cwd(cwd / f"run-{k}", python)
        subprocess.run([str(python.parent / "radqy"), "out", str(inputs.resolve())], cwd=cwd / f"run-{k}", check=True,
                       stdout=subprocess.DEVNULL)
        iqm = pd.read_csv(cwd / f"run-{k}" / "UserInterface" / "Data" / "out" / "IQM.csv")
        # NB: a participant is "{file stem}_{PatientID}"
        stems = {f.stem: f.name for f in files}
        ident = iqm[iqm.columns[0]].astype(str)
        file = ident.map(lambda v, stems=stems: next((stems[s] for s in stems if v.startswith(s + "_")), None))
        parts.append(pd.DataFrame({"file": file, "radqy_cli_cnr": pd.to_numeric(iqm["CNR"], errors="coerce")}))
        print(f"RadQy: {len(files)} {modality} file(s)", flush=True)
    return pd.concat(parts, ignore_index=True)


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_radqy(python: Path, folder: Path, cwd: Path) -> tuple[int, float]:
    radqy_cwd(cwd, python)
    return len(list(folder.rglob("*.dcm"))), timed([str(python.parent / "radqy"), "out", str(folder.resolve())], cwd)


def time_mrqy(python: Path, folder: Path, cwd: Path) -> tuple[int, float]:
    cwd.mkdir(parents=True)
    return len(list(folder.rglob("*.dcm"))), timed([str(python), "-m", "mrqy.QC", "out", str(folder.resolve()),
                                                    "-r", "True"], cwd)


# ------------------------------------------------------------------------------------------ gpucnr


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gpucnr", *args], check=True, stdout=subprocess.DEVNULL)


def per_file(stack: Path, results: Path, definitions: list[str], prefix: str = "") -> pd.DataFrame:
    """Per source file, the first ROI's CNR and status of each definition's results."""
    link = pd.read_csv(str(stack) + ".linkage.csv")
    out = pd.DataFrame({"file": link["source"].map(lambda s: Path(str(s).lstrip("'")).name),
                        "image": link["index"].astype(np.int64)})
    for d in definitions:
        ds = gpucnr.open_results(results.with_name(f"{results.name}-{d}.zarr"))
        cnr = ds["cnr"].isel(roi=0).to_series()
        status = ds["status"].isel(roi=0).to_series()
        out[f"{prefix}{d}"] = out["image"].map(cnr)
        out[f"{prefix}{d}_status"] = out["image"].map(status)
    return out.drop(columns="image")


def gpucnr_on_masks(folder, mask_dir: Path, work: Path, definitions: list[str]) -> pd.DataFrame:
    """gpucnr on label masks: ROI = label 1, background = label 2 (no frame removed, as MRQy)."""
    work.mkdir(parents=True, exist_ok=True)
    stack = work / "stack.zarr"
    cli("ingest", str(folder), str(stack), "--masks", str(mask_dir))
    for d in definitions:
        cli("run", str(stack), str(work / f"r-{d}.zarr"), "--background", "label", "--background-label", "2",
            "--border", "0", "--min-bg", "1", "--definition", d, "--backend", "numpy")
    return per_file(stack, work / "r", definitions)


def gpucnr_own(folder, work: Path, regions: str, definitions: list[str]) -> pd.DataFrame:
    if regions == "otsu":
        otsu_masks(Path(folder), work / "masks-otsu")
        return gpucnr_on_masks(folder, work / "masks-otsu", work / "own", definitions)
    own = work / "own"
    own.mkdir(parents=True)
    cli("ingest", str(folder), str(own / "stack.zarr"))
    for d in definitions:
        cli("run", str(own / "stack.zarr"), str(own / f"r-{d}.zarr"), "--rois", "auto", "--definition", d,
            "--backend", "numpy")
    return per_file(own / "stack.zarr", own / "r", definitions)


def time_gpucnr(folder: Path, work: Path, regions: str) -> tuple[int, float]:
    """Wall time of `gpucnr ingest` + `gpucnr run --definition mrqy` (Otsu masks, if used, written before)."""
    work.mkdir(parents=True)
    n = len(list(folder.rglob("*.dcm")))
    if regions == "otsu":
        otsu_masks(folder, work / "masks")
        ingest = ["ingest", str(folder), str(work / "s.zarr"), "--masks", str(work / "masks")]
        run = ["run", str(work / "s.zarr"), str(work / "r.zarr"), "--background", "label", "--background-label",
               "2", "--border", "0", "--min-bg", "1"]
    else:
        ingest = ["ingest", str(folder), str(work / "s.zarr")]
        run = ["run", str(work / "s.zarr"), str(work / "r.zarr"), "--rois", "auto"]
    start = time.perf_counter()
    cli(*ingest)
    cli(*run, "--definition", "mrqy", "--backend", "numpy")
    return n, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the report


def rho(table: pd.DataFrame, column: str) -> dict:
    """Spearman's rho of `column` against the noise step, per source (NaN values left out)."""
    out = {}
    for source, g in table.groupby("source"):
        g = g[~np.isnan(g[column].astype(float))]  # NB: +-inf (zero noise) ranks as the extreme it is
        out[source] = float(spearmanr(g["noise"], g[column]).statistic) if len(g) >= 3 else float("nan")
    return out


def write_report(args, table, speed, big, regions, radqy_file, load) -> None:
    own = ("`--rois auto`, cell 1 `foreground` (the body against the air)" if regions == "auto"
           else "a two-class Otsu mask (label 1 above the threshold, 2 below)")
    table = table.sort_values(["source", "noise"]).reset_index(drop=True)
    ours, mrqy = table["theirs_mrqy"].to_numpy(float), table["mrqy_cnr"].to_numpy(float)
    finite = np.isfinite(ours) & np.isfinite(mrqy)
    # NB: infinities of one sign and NaN where MRQy has them (ours == mrqy holds for equal infinities)
    same_pattern = bool(((ours == mrqy) | finite | (np.isnan(ours) & np.isnan(mrqy))).all())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(table["theirs_mrqy"] / table["mrqy_cnr"] - 1)[finite]
        rel_radqy = np.abs(table["theirs_mrqy"] / table["radqy_cli_cnr"] - 1)[finite]
    lines = [
        "# gpucnr next to RadQy, MRQy and vIQA",
        "",
        "Written by `scripts/peers.py` (not a dependency, not run in CI). Command:",
        "",
        "```",
        "/work/main/.venv/bin/python scripts/peers.py" + ("" if args.src is None else f" --src {args.src}")
        + (f" --with-viqa --torch '{args.torch}'" if args.with_viqa else "") + f" --speed-files {args.speed_files}"
        + f" --peer-speed-files {args.peer_speed_files}",
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}; "
        f"gpucnr {gpucnr.__version__} on NumPy. Peers: {RADQY} (its `NameError: functions` line {radqy_file}), "
        f"{MRQY}, pydicom<3, pandas<3" + (f", {VIQA}" if args.with_viqa else "") + ".",
        "",
        "Data: " + (f"`{args.src}`." if args.src else
                    f"pydicom's bundled {', '.join(SOURCES)}, each with Gaussian noise of "
                    f"{', '.join(f'{v:g}' for v in LADDER)} x its 1-99 % value range added "
                    f"(steps 0-{len(LADDER) - 1}), "
                    "written as new DICOM files (stored values, the source's dtype and rescale)."),
        "",
        "## 1. `definition=\"mrqy\"` against MRQy's and RadQy's CNR",
        "",
        "`theirs`: gpucnr `--definition mrqy` on MRQy's own regions (its `foreground()`: Otsu of the image and of "
        "its equalised histogram, convex hull; ROI = the hull, background = the rest, `--background label "
        "--border 0`). `own`: gpucnr on its own regions, " + own + ". MRQy = `mrqy.QCF.cnr` on `QCF.foreground` "
        "(MRQy's command line averages slices 1.. of a patient's volume, skipping slice 0, so its table has no "
        "per-image value); RadQy = the CNR column of its command line's IQM.csv (one participant per file, "
        "`-t MRI`: stored values; its denominator has + 1e-6).",
        "",
        f"Largest relative difference of gpucnr on their regions, over the {int(finite.sum())} of {len(table)} "
        f"images where both are finite: {np.nanmax(rel):.2e} to MRQy, {np.nanmax(rel_radqy):.2e} to RadQy's table. "
        f"Infinities and NaN in the same images as MRQy: {'yes' if same_pattern else 'NO'} (a constant background "
        "patch: gpucnr status 5 zero-noise, CNR +-inf, or NaN when the patches are equal too; RadQy's + 1e-6 turns "
        "these into about 1e9 and 0).",
        "",
        "| file | noise step | MRQy | RadQy (CLI) | gpucnr mrqy, their regions | gpucnr mrqy, own regions |"
        " gpucnr pooled, own regions |" + (" vIQA (auto regions) | gpucnr viqa, own regions |" if args.with_viqa
                                           else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if args.with_viqa else ""),
    ]
    for _, r in table.iterrows():
        row = (f"| {r['file']} | {r['noise']} | {r['mrqy_cnr']:.4f} | {r['radqy_cli_cnr']:.4f} | "
               f"{r['theirs_mrqy']:.4f} | {r['own_mrqy']:.4f} | {r['own_pooled']:.4f} |")
        if args.with_viqa:
            row += f" {r['viqa_cnr']:.4f} | {r['own_viqa']:.4f} |"
        lines.append(row)
    columns = [("MRQy", "mrqy_cnr"), ("RadQy (CLI)", "radqy_cli_cnr"), ("gpucnr mrqy, their regions", "theirs_mrqy"),
               ("gpucnr mrqy, own regions", "own_mrqy"), ("gpucnr pooled, own regions", "own_pooled"),
               ("gpucnr viqa, own regions", "own_viqa")]
    if args.with_viqa:
        columns.insert(2, ("vIQA (auto regions)", "viqa_cnr"))
    rhos = {name: rho(table, col) for name, col in columns}
    sources = sorted(table["source"].unique())
    lines += [
        "",
        "## 2. Noise response",
        "",
        "Spearman's rho of each CNR against the noise step, per source image (-1: the CNR falls at every step; a "
        "quality signal should be near -1).",
        "",
        "| CNR | " + " | ".join(sources) + " |",
        "|---|" + "---|" * len(sources),
    ]
    for name, values in rhos.items():
        lines.append(f"| {name} | " + " | ".join(f"{values.get(s, float('nan')):+.2f}" for s in sources) + " |")
    lines += [
        "",
        "## 3. Whole-process images/s",
        "",
        "Command lines from DICOM files to a table, wall time, on 512x512 CT files (CT_small resampled, fresh "
        "noise each; 12 files per patient). RadQy and MRQy include what their command lines always do (PNG "
        "thumbnails, MRQy's per-metric re-segmentation); gpucnr is `gpucnr ingest` + `gpucnr run --definition "
        "mrqy` on NumPy" + (" with `--rois auto`." if regions == "auto" else
                            ", with the Otsu mask files given to ingest (writing them is not timed)."),
        "",
        f"5-minute load average of the machine: {load[0]:.1f} before, {load[1]:.1f} after.",
        "",
        "| tool | files | seconds | images/s |",
        "|---|---|---|---|",
    ]
    for name, (n, seconds) in speed.items():
        lines.append(f"| {name} | {n} | {seconds:.1f} | {n / seconds:.1f} |")
    lines.append(f"| gpucnr ingest + run | {big[0]} | {big[1]:.1f} | {big[0] / big[1]:.1f} |")
    lines += [
        "",
        "## Notes",
        "",
        "- `definition=\"mrqy\"` keeps MRQy's quirks (gpucnr/kernels/patches.py): the patch is the 5x5 block "
        "above-left of the region's first maximum (their `np.pad(img, 5)` with a half-width of 2), regions are "
        "zero-filled so an all-negative region's maximum is a 0 outside it, values are stored values; "
        "`ddof=0, signed=True` are forced.",
        "- RadQy's `-t CT` subtracts each slice's minimum before measuring; gpucnr's `mrqy` does not (MRQy never "
        "does). The `+ 1e-6` in RadQy's denominator is the only other difference between the two.",
        "- A patch statistic is 25 pixels next to one extreme pixel: its noise response is what section 2 shows.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
