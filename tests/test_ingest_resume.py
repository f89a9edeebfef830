"""`gpucnr ingest --resume` (issue 12): an ingest interrupted by Ctrl-C, or killed with kill -9 during an early shard
flush, continues from its journal, and the result equals an uninterrupted ingest: the same images and labels,
tables, operator files and fingerprint. Until then `info` and `run` say what the half-written stack is.

The data mix what the journal must carry: two buckets (two sizes) interleaved in input order, masks beside the
images (one refused), a meta and an ROI table, a truncated file and a duplicate.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicomfactory import write_raster
from signals import interrupt_when
from test_exit_codes import _children_of_mark

import gpucnr

N = 96
SHARD = 4
WAIT_S = 120


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpucnr", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    src = root / "src"
    rng = np.random.default_rng(7)
    for i in range(N):
        shape = (40, 48) if i % 3 else (70, 60)  # NB: two buckets, interleaved
        img = rng.normal(120, 15, shape)
        img[10:20, 12:24] += 40
        write_raster(src / f"s{i // 10}" / f"img{i:03d}.png", np.clip(img, 0, 255).astype(np.uint8))
        if i % 5 == 0:
            mask = np.zeros(shape if i != 10 else (8, 8), np.uint8)  # NB: image 10's mask is refused
            mask[10:20, 12:24] = 255
            write_raster(src / f"s{i // 10}" / f"img{i:03d}_mask.png", mask)
    (src / "s0" / "copy.png").write_bytes((src / "s0" / "img001.png").read_bytes())  # a duplicate
    (src / "s9" / "cut.png").write_bytes((src / "s0" / "img002.png").read_bytes()[:60])  # truncated
    (root / "meta.csv").write_text("source,site\n" + "".join(f"s{i // 10}/img{i:03d}.png,site{i % 2}\n"
                                                              for i in range(0, N, 7)) + "elsewhere/x.png,b\n")
    (root / "rois.csv").write_text("source,roi,kind,cx,cy,r\n" + "".join(
        f"s{i // 10}/img{i:03d}.png,{1 + i % 2},disk,18,15,4\n" for i in range(1, N, 4)))
    options = ["--mask-pattern", "{stem}_mask.png", "--meta", root / "meta.csv", "--rois", root / "rois.csv",
               "--shard", SHARD, "--workers", 1,
               # NB: one key for the reference and the resumed stacks: every image's `case` is a keyed pseudonym
               "--key-file", root / "shared.key"]
    ref = root / "ref" / "stack.zarr"  # NB: the stacks' names are in their attributes: the same name, elsewhere
    ref.parent.mkdir()
    proc = cli("ingest", src, ref, *options)
    assert proc.returncode == 3, proc.stderr  # NB: the refused mask, the truncated file, the meta row: problems
    return {"root": root, "src": src, "options": options, "ref": ref, "stdout": proc.stdout, "stderr": proc.stderr}


def _journal(stack: Path) -> Path:
    return stack.with_name(stack.name + ".journal")


def _start_and_stop(cmd: list, stack: Path, sig: int, flushes: int, log: Path) -> int:
    """Run `gpucnr ingest ...`; send `sig` once the journal records `flushes` shards on disk; its exit status.
    Its worker processes must be gone afterwards."""
    mark = f"gpucnr-resume-{os.getpid()}-{time.monotonic_ns()}"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gpucnr", *map(str, cmd)], stdout=subprocess.DEVNULL,
                                stderr=fh, env={**os.environ, "GPUCNR_MARK": mark}, start_new_session=True)
    journal = _journal(stack)
    rc = interrupt_when(proc, lambda: journal.exists() and journal.read_text().count('"flushed"') >= flushes, sig,
                        timeout=WAIT_S, what=log.read_text)
    if sig != signal.SIGKILL:  # NB: workers of a killed driver notice when they next read from it
        time.sleep(0.5)
        assert not _children_of_mark(mark), "worker processes outlived the interrupted ingest"
    return rc


def _assert_same_as_reference(stack: Path, ref: Path) -> None:
    """Images, labels, tables, attributes, fingerprint and the operator's files equal the uninterrupted ingest's."""
    got, want = gpucnr.open_stack(stack), gpucnr.open_stack(ref)
    assert got.fingerprint() == want.fingerprint()
    pd.testing.assert_frame_equal(got.images, want.images)
    pd.testing.assert_frame_equal(got.rois, want.rois)
    assert dict(got.group.attrs) == dict(want.group.attrs)
    for a, b in zip(got.buckets, want.buckets, strict=True):
        assert a.name == b.name
        images, labels = got.read(a, 0, a.size)
        ref_images, ref_labels = want.read(b, 0, b.size)
        np.testing.assert_array_equal(images, ref_images, strict=True)
        np.testing.assert_array_equal(labels, ref_labels, strict=True)
    for ext in (".linkage.csv", ".skipped.csv"):
        assert stack.with_name(stack.name + ext).read_text() == ref.with_name(ref.name + ext).read_text(), ext
    assert not _journal(stack).exists() and not list(stack.parent.glob(f"{stack.name}*.partial"))
    assert not list(stack.rglob("*.partial"))
    assert not stack.with_name(stack.name + ".spool").exists(), "the workers' spool folder outlived the ingest"


def test_interrupted_ingest_says_so_and_resumes(dataset, tmp_path):
    """Ctrl-C during decoding: one line (what was done, the --resume command), exit 130; `info` and `run` on the
    half-written stack name the command and exit 2; a resume with another option is refused (2); the resumed
    ingest ends as an uninterrupted one, with the same problems block and exit status."""
    src = dataset["src"]
    stack = tmp_path / "stack.zarr"
    cmd = ["ingest", src, stack, *dataset["options"]]
    rc = _start_and_stop(cmd, stack, signal.SIGINT, 3, tmp_path / "int.log")
    err = (tmp_path / "int.log").read_text()
    assert rc == 130, err
    assert err.startswith("gpucnr: interrupted (SIGINT): ") and err.count("\n") == 1, err
    assert "files decoded" in err and "image(s) kept on disk" in err and "Traceback" not in err, err
    command = err.split("continue with `")[1].split("`")[0]
    assert command.startswith("gpucnr ingest ") and command.endswith(" --resume") and "--shard 4" in command

    info = cli("info", stack)
    assert info.returncode == 2 and "an interrupted ingest" in info.stdout and command in info.stdout, info.stdout
    run = cli("run", stack, tmp_path / "results.zarr")
    assert run.returncode == 2 and "an interrupted ingest" in run.stderr and command in run.stderr, run.stderr
    other = cli(*cmd, "--resume", "--color", "bt601")
    assert other.returncode == 2 and "[resume-mismatch]" in other.stderr and "color" in other.stderr, other.stderr
    # NB: without the --key-file it was started with: the message gives the command that has it
    at = cmd.index("--key-file")
    nokey = cli(*cmd[:at], *cmd[at + 2:], "--resume")
    assert nokey.returncode == 2 and "continue it with that command" in nokey.stderr, nokey.stderr
    assert "--key-file" in nokey.stderr.split("it was started as")[1], nokey.stderr

    # NB: the command as printed, split by a shell (it quotes the mask pattern)
    done = subprocess.run(command.replace("gpucnr", f"{shlex.quote(sys.executable)} -m gpucnr", 1), shell=True,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert done.stdout.replace(str(stack), "S") == dataset["stdout"].replace(str(dataset["ref"]), "S")
    assert done.stderr.replace(str(stack), "S") == dataset["stderr"].replace(str(dataset["ref"]), "S")
    _assert_same_as_reference(stack, dataset["ref"])
    assert cli("info", stack).returncode == 0


def test_kill9_during_an_early_flush_then_resume(dataset, tmp_path):
    """kill -9 as the first shard is journaled, then the leftovers of a crash mid-write (a half-written shard
    file, a torn journal line): --resume discards them and the stack equals the uninterrupted one."""
    stack = tmp_path / "stack.zarr"
    cmd = ["ingest", dataset["src"], stack, *dataset["options"]]
    assert _start_and_stop(cmd, stack, signal.SIGKILL, 1, tmp_path / "kill.log") == -signal.SIGKILL
    shards = sorted(p for p in (stack / "buckets").rglob("c/*/0/0"))
    assert shards, "a shard was on disk when the ingest was killed"
    (shards[0].parent / "0.partial").write_bytes(b"half a shard")
    with open(_journal(stack), "a") as fh:
        fh.write('{"j": 999, "problems": [')  # NB: a line torn by the crash
    # NB: the spool files the workers were writing when the driver died (and a stray one): never part of the stack
    spool = stack.with_name(stack.name + ".spool")
    spool.mkdir(exist_ok=True)
    (spool / "40x48-uint8-3-0.images").write_bytes(b"chunks of a shard never placed")
    done = cli(*cmd, "--resume")
    assert done.returncode == 3, done.stderr
    _assert_same_as_reference(stack, dataset["ref"])


def test_stack_writer_resume_rewrites_partly_kept_shards(tmp_path):
    """`StackWriter.resume` keeping images that end mid-shard in both buckets (read back, written again whole),
    dropping a shard written past them and a bucket the kept images never reached: the stack equals one written
    in one go."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40, 48) if i % 3 else (70, 60), dtype=np.uint8) for i in range(22)]
    images += [rng.normal(size=(30, 30))]  # NB: a float64 bucket, only after the cut
    labels = [(im > 200).astype(np.int32) * (1 + i % 2) for i, im in enumerate(images)]
    want = gpucnr.write_stack(tmp_path / "ref" / "s.zarr", images, labels=labels, shard=SHARD)
    path = tmp_path / "s.zarr"
    writer = gpucnr.store.StackWriter(path, labels=True, shard=SHARD)
    for im, lab in zip(images, labels, strict=True):
        writer.add(im, lab)
    for b in writer._buckets.values():
        writer._flush(b)  # NB: everything on disk, as if the crash came just before close
    writer.abandon()
    keep = 13  # NB: 5 images of the 128x64 bucket (a shard and one more) and 8 of the 64x64 one (two shards)
    rows = [dict(r) for r in writer.rows[:keep]]
    assert {r["bucket"] for r in rows} == {"64x64-uint8", "128x64-uint8"}
    assert any((max(int(r["position"]) for r in rows if r["bucket"] == b) + 1) % SHARD for b in
               ("64x64-uint8", "128x64-uint8")), "the cut falls mid-shard"
    ids = {int(v) for lab in labels[:keep] for v in np.unique(lab) if v}
    resumed = gpucnr.store.StackWriter.resume(path, rows=rows, label_ids=ids, labels=True, shard=SHARD)
    for im, lab in zip(images[keep:], labels[keep:], strict=True):
        resumed.add(im, lab)
    got = resumed.close()
    assert got.fingerprint() == gpucnr.open_stack(want.path).fingerprint()
    for a, b in zip(got.buckets, want.buckets, strict=True):
        for x, y in zip(got.read(a, 0, a.size), want.read(b, 0, b.size), strict=True):
            np.testing.assert_array_equal(x, y, strict=True)


def test_resume_of_an_ingest_interrupted_while_finishing(dataset, tmp_path):
    """Stopped after the stack was closed but before the linkage file and the journal's removal (simulated by
    putting back the journal of a finished ingest): --resume finishes it, equal to the reference; without a
    journal, --resume on a complete stack is refused."""
    stack = tmp_path / "stack.zarr"
    cmd = ["ingest", dataset["src"], stack, *dataset["options"]]
    journal = _journal(stack)
    keep = tmp_path / "journal.copy"
    mark = "import shutil, sys, gpucnr.sources.journal as j\n" \
           "j.Journal.remove = lambda self: (self.close(), shutil.copy(self.path, sys.argv[1]), self.path.unlink())\n" \
           "from gpucnr.cli import main\nsys.exit(main(sys.argv[2:]))\n"
    proc = subprocess.run([sys.executable, "-c", mark, keep, *map(str, cmd)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3 and keep.exists(), proc.stderr
    refused = cli(*cmd, "--resume")
    assert refused.returncode == 2 and "is a complete stack: there is nothing to resume" in refused.stderr
    keep.rename(journal)
    stack.with_name(stack.name + ".linkage.csv").unlink()
    done = cli(*cmd, "--resume")
    assert done.returncode == 3, done.stderr
    _assert_same_as_reference(stack, dataset["ref"])


def test_resume_keeps_the_compressor_the_ingest_started_with(dataset, tmp_path):
    """New stacks default to blosc-lz4 (issue 18); an ingest started with blosc-zstd (the default before it, whose
    resume command named no compressor) resumes with blosc-zstd, not today's default, and ends byte for byte as
    an uninterrupted blosc-zstd ingest."""
    options = [*dataset["options"], "--compressor", "blosc-zstd"]
    ref = tmp_path / "ref" / "stack.zarr"
    ref.parent.mkdir()
    assert cli("ingest", dataset["src"], ref, *options).returncode == 3
    stack = tmp_path / "stack.zarr"
    journal, keep = _journal(stack), tmp_path / "journal.copy"
    mark = "import shutil, sys, gpucnr.sources.journal as j\n" \
           "j.Journal.remove = lambda self: (self.close(), shutil.copy(self.path, sys.argv[1]), self.path.unlink())\n" \
           "from gpucnr.cli import main\nsys.exit(main(sys.argv[2:]))\n"
    proc = subprocess.run([sys.executable, "-c", mark, keep, "ingest", dataset["src"], stack, *map(str, options)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and keep.exists(), proc.stderr
    keep.rename(journal)
    stack.with_name(stack.name + ".linkage.csv").unlink()
    done = cli("ingest", dataset["src"], stack, *dataset["options"], "--resume")  # NB: no --compressor
    assert done.returncode == 3, done.stderr
    assert gpucnr.open_stack(stack).compressor == "blosc-zstd"
    _assert_same_as_reference(stack, ref)
    assert gpucnr.open_stack(dataset["ref"]).compressor == "blosc-lz4"  # NB: the default of a new ingest
