"""Benchmarks of gpucnr.measure, as ratios measured side by side in one run.

    .venv/bin/python scripts/bench.py            # 256 images of 512x512 uint16, 3 ROIs per image
    .venv/bin/python scripts/bench.py --quick    # 64 images

Printed: time per image of gpucnr.measure (threads = CPU count, 2 here) against
  - the article's per-image loop (its Python functions, the transposed background fixed), and
  - the memory ceiling ``stack.sum(dtype=uint64)`` on one thread over the same in-memory stack,
for geometric ROIs (square, r = 5 and r = 20) and label masks, plus the cost of 5 ROIs/image over 1.
Absolute times on a shared machine mean little; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import gpucnr
from gpucnr.phantom import make_phantom
from gpucnr.store import COMPRESSORS, DEFAULT_COMPRESSOR

# NB: the article's code lives once, in tests/article.py, for the oracle tests and this baseline alike.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from article import calculate_cnr, get_background, multi_roi_cnr


def article_labels(image, labels):
    """The article's method with label masks as ROIs (one mask per label value)."""
    cnrs = []
    for value in np.unique(labels[labels != 0]):
        roi = labels == value
        ys, xs = np.nonzero(roi)
        bg_coords = get_background(image, roi)
        cnrs.append(calculate_cnr(image, (xs, ys), bg_coords))
    return np.median(cnrs)


# --- timing ----------------------------------------------------------------------------------------------
def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="kernels", choices=("kernels", "pipeline", "compressors", "memory",
                                                                        "ingest", "ingest-nifti",
                                                                        "ingest-nifti-memory", "groups",
                                                                        "scale", "startup"),
                        help="kernels (gpucnr.measure, default), pipeline (gpucnr.run from Zarr), compressors, "
                             "memory (peak RSS of `gpucnr run`, 4000 vs 500 images), ingest (2000 DICOM "
                             "files of SIZE x SIZE, 500 PNG, 500 TIFF, workers=2, vs plain pydicom and Pillow loops), "
                             "ingest-nifti (100 gzip NIfTI volumes "
                             "of SIZE x SIZE x SIZE/2 int16, workers=2, vs a plain nibabel load-and-sum loop; "
                             "default size 256); ingest-nifti-memory (peak RSS of the driver and of its one worker "
                             "ingesting one 512x512x200 int16 .nii.gz, one twice as deep, and one with a uint8 label "
                             "map, against issue 14's bound); groups (summarize, manifest, aggregate with 5000 groups "
                             "vs none, "
                             "on --n images, default 10^5, in-memory results); scale (write, run, summarize by 10^4 "
                             "sites, filter, report at --scale-n images of 64x64 uint16 against a tenth of them: time "
                             "ratio, peak RSS, files; minutes at 10^6, never part of make test); startup (`import "
                             "gpucnr.cli` and `gpucnr --help` vs `import numpy`)")
    parser.add_argument("--scale-n", type=int, default=100_000, help="scale: the larger N (default 10^5)")
    parser.add_argument("--scale-dir", default=None, help="scale: where the stacks go (default a temporary folder)")
    parser.add_argument("--step-timeout", type=float, default=3600, help="scale: seconds per step before it is "
                        "stopped and reported as such")
    parser.add_argument("--rss-limit-mb", type=int, default=4096, help="scale: a step whose RSS passes this is "
                        "stopped and reported as such (default 4096)")
    parser.add_argument("--n", type=int, default=None, help="images (default 256; pipeline: 1024)")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--reference-images", type=int, default=16, help="images timed with the article's loop")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (best one kept)")
    parser.add_argument("--quick", action="store_true", help="64 images, 3 rounds")
    parser.add_argument("--compressor", default=None,
                        help=f"the new stacks' compressor, one of {', '.join(COMPRESSORS)} (default: gpucnr's default "
                             "for new stacks); ingest-nifti: several, comma-separated, each measured side by side")
    parser.add_argument("--sizes", default=None,
                        help="pipeline: image sides to compare, e.g. 64,256,512,1024 (each a stack of --gb of raw "
                             "pixels, default shards and batches) against the bare read of the same stack")
    parser.add_argument("--gb", type=float, default=2.0, help="pipeline --sizes: raw pixels per size, GB (default 2)")
    args = parser.parse_args(argv)
    if args.compressor is None:
        from gpucnr.store import DEFAULT_COMPRESSOR

        args.compressor = DEFAULT_COMPRESSOR
    unknown = set(args.compressor.split(",")) - set(COMPRESSORS)
    if unknown or ("," in args.compressor and args.part != "ingest-nifti"):
        parser.error(f"--compressor: one of {', '.join(COMPRESSORS)} (several, comma-separated, for ingest-nifti "
                     f"only), got {args.compressor!r}")
    if args.n is None:
        args.n = {"pipeline": 1024, "ingest": 2000, "ingest-nifti": 100, "groups": 100_000}.get(args.part, 256)
    if args.quick:
        args.n, args.repeat = 64, 3
    _byte_compile_gpucnr()
    if args.part == "pipeline" and args.sizes:
        return bench_pipeline_sizes(args)
    {"kernels": bench_kernels, "pipeline": bench_pipeline, "compressors": bench_compressors,
     "memory": bench_memory, "ingest": bench_ingest, "ingest-nifti": bench_ingest_nifti,
     "ingest-nifti-memory": bench_ingest_nifti_memory,
     "groups": bench_groups, "scale": bench_scale, "startup": bench_startup}[args.part](args)


def _byte_compile_gpucnr() -> None:
    """Write gpucnr's bytecode (`__pycache__`) as `pip install` does for an installed package, so that each command
    the bench starts reads it. An editable install never gets it where PYTHONDONTWRITEBYTECODE is set (as on this
    machine): every process, each ingest worker too, would compile gpucnr's modules anew (measured: ~0.5 s of an
    `ingest + run`), which no user of an installed gpucnr pays. Stale bytecode is never used (Python compares the
    source's time stamp), so this is a cache, not a snapshot."""
    import compileall

    if not compileall.compile_dir(Path(gpucnr.__file__).parent, quiet=1):
        # NB: e.g. an install folder this user cannot write to: measured as it is, and said so
        print("(gpucnr's modules could not all be byte-compiled: the timings below include compiling them)")
    elif sys.dont_write_bytecode:
        print("(gpucnr's modules byte-compiled first, as `pip install` leaves them: PYTHONDONTWRITEBYTECODE is set "
              "here, and an editable install would otherwise compile them in every process)")


def bench_kernels(args):
    """gpucnr.measure on an in-memory stack vs the article's loop and the memory ceiling."""
    ph = make_phantom(args.n, (args.size, args.size), lesions=3, radius=25, margin=20, seed=0)
    images, labels = ph.images, ph.labels
    n_ref = min(args.reference_images, args.n)
    centres = [ph.rois[ph.rois.image == i][["cx", "cy"]].to_numpy() for i in range(n_ref)]

    def table(r, per_image=3):
        t = ph.rois[ph.rois.roi <= per_image].copy()
        t["kind"], t["r"] = "square", r
        return t

    def five_rois():
        # Two more square ROIs per image, inside lesion 1 (offsets keep them inside the r = 25 disk).
        base = ph.rois[ph.rois.roi == 1]
        shifts = [(8, 0), (0, 8)]
        extra = [base.assign(roi=k + 4, cx=base.cx + dx, cy=base.cy + dy) for k, (dx, dy) in enumerate(shifts)]
        t = pd.concat([ph.rois, *extra], ignore_index=True)
        t["kind"], t["r"] = "square", 5
        return t

    cases = [
        ("square r=5", table(5), lambda: [multi_roi_cnr(images[i], centres[i], 5) for i in range(n_ref)]),
        ("square r=20", table(20), lambda: [multi_roi_cnr(images[i], centres[i], 20) for i in range(n_ref)]),
        ("label masks", labels, lambda: [article_labels(images[i], labels[i]) for i in range(n_ref)]),
    ]
    one_roi, five = table(5, per_image=1), five_rois()
    gpucnr.measure(images[:2], one_roi[one_roi.image < 2], backend="numpy")  # compile/load the kernels first
    # NB: rounds interleave every measurement, and each keeps its best round: a noisy neighbour on this
    # shared machine then slows a round of everything rather than one side of a ratio.
    timings: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        rnd = {"ceiling": lambda: images.sum(dtype=np.uint64)}
        for name, rois, ref in cases:
            rnd[name] = lambda rois=rois: gpucnr.measure(images, rois, backend="numpy")
            rnd["article " + name] = ref
        rnd["1 ROI"] = lambda: gpucnr.measure(images, one_roi, backend="numpy")
        rnd["5 ROIs"] = lambda: gpucnr.measure(images, five, backend="numpy")
        for key, fn in rnd.items():
            if key.startswith("article") and len(timings.get(key, [])) >= 2:
                continue  # the article's loop is slow and steady: two rounds suffice
            timings.setdefault(key, []).append(best(fn, 1))
    t = {k: min(v) for k, v in timings.items()}
    ceiling = t["ceiling"] / args.n
    rows = [(name, t[name] / args.n, t["article " + name] / n_ref) for name, _, _ in cases]
    one, five = t["1 ROI"], t["5 ROIs"]

    print(f"gpucnr {gpucnr.__version__}; {args.n} images {args.size}x{args.size} uint16, 3 ROIs/image; "
          f"threads={os.cpu_count()}; article loop timed on {n_ref} images")
    print()
    print("| ROIs | gpucnr ms/image | article loop ms/image | speed-up | vs ceiling sum(uint64), 1 thread |")
    print("|---|---:|---:|---:|---:|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours * 1e3:.3f} | {theirs * 1e3:.2f} | {theirs / ours:.0f}x | {ceiling / ours:.2f}x |")
    print()
    print(f"ceiling `stack.sum(dtype=uint64)`: {ceiling * 1e3:.3f} ms/image")
    print(f"cost of 5 ROIs/image / 1 ROI/image (square r=5): {five / one:.2f}")


def _phantom_stack(path, n, size, shard=64, compressor="blosc-lz4"):
    ph = make_phantom(n, (size, size), lesions=3, radius=max(6, size // 20), margin=max(8, size // 25), seed=0)
    rois = ph.rois.assign(kind="square", r=5)
    gpucnr.write_stack(path, ph.images, rois=rois, shard=shard, compressor=compressor)
    return ph


def bench_pipeline(args):
    """gpucnr.run from a Zarr stack (threads=2) vs bare Dask read+decode of the same store and vs the article's
    loop reading the same images."""
    import dask
    import dask.array as da
    import zarr

    with tempfile.TemporaryDirectory() as tmp:
        stack_path = Path(tmp, "stack.zarr")
        ph = _phantom_stack(stack_path, args.n, args.size)
        arr = zarr.open_array(str(stack_path / f"buckets/{args.size}x{args.size}-uint16/images"), mode="r")
        n_ref = min(args.reference_images, args.n)
        centres = [ph.rois[ph.rois.image == i][["cx", "cy"]].to_numpy() for i in range(n_ref)]

        def bare():
            data = da.from_zarr(arr, chunks=arr.shards)
            with dask.config.set(scheduler="threads", num_workers=2):
                data.sum(dtype=np.uint64).compute()

        def ours(k=[0]):  # noqa: B006 - a fresh results path per round
            k[0] += 1
            gpucnr.run(stack_path, Path(tmp, f"results{k[0]}.zarr"), scheduler="threads", workers=2,
                       backend="numpy")

        def article():
            for i in range(n_ref):
                multi_roi_cnr(np.asarray(arr[i]), centres[i], 5)

        ours()  # warm-up: compile the kernels, open the stack once
        times: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for key, fn in (("bare", bare), ("ours", ours)):
                times.setdefault(key, []).append(best(fn, 1))
        times["article"] = [best(article, 1)]
    t_bare, t_ours, t_art = min(times["bare"]) / args.n, min(times["ours"]) / args.n, min(times["article"]) / n_ref
    print(f"gpucnr {gpucnr.__version__}; stack of {args.n} images {args.size}x{args.size} uint16, shard 64, "
          f"blosc-lz4; 3 square ROIs r=5 per image; threads=2")
    print()
    print("| | ms/image | ratio |")
    print("|---|---:|---:|")
    print(f"| bare Dask read+decode (`da.from_zarr(...).sum()`, 2 threads) | {t_bare * 1e3:.3f} | 1 |")
    print(f"| `gpucnr.run` end to end (threads, 2 workers) | {t_ours * 1e3:.3f} | {t_bare / t_ours:.2f}x of bare |")
    print(f"| article loop reading the same images (zarr) | {t_art * 1e3:.2f} | gpucnr {t_art / t_ours:.0f}x faster |")


def _streamed_phantoms(n, size, block_bytes=2**27):
    """`n` phantom images of size x size uint16 and their ROI table (3 square ROIs r=5 each), the images as a
    generator of batches: a block of ~128 MiB of distinct phantoms repeated (decode and compute cost the same per
    image; generating 2 GB of phantoms would take minutes), never all in memory."""
    block = max(1, min(n, block_bytes // (size * size * 2)))
    ph = make_phantom(block, (size, size), lesions=3, radius=max(6, size // 20), margin=max(8, size // 25), seed=0)
    base = ph.rois.assign(kind="square", r=5)
    reps = -(-n // block)
    rois = pd.concat([base.assign(image=base["image"] + k * block) for k in range(reps)], ignore_index=True)
    rois = rois[rois["image"] < n].reset_index(drop=True)

    def images():
        for k in range(reps):
            yield ph.images[: min(block, n - k * block)]

    return images(), rois


def bench_pipeline_sizes(args):
    """`gpucnr run` end to end against the bare read (`Stack.read` over every shard on 2 threads, nothing computed)
    of the same stack, per image size; both measured side by side in interleaved rounds, best round kept. Each size
    is a stack of `--gb` of raw pixels with the default shards (~2^22 px) and batches (~2^24 px). Kernel time is
    what `measure_batch` took during the run (summed over its 2 workers, halved); the fixed cost per batch is
    (run - bare read - kernel time) / batches."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from gpucnr import pipeline

    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    kernel = [0.0, 0.0]  # NB: wall seconds, CPU seconds (of the worker threads that ran measure_batch)
    real = pipeline.measure_batch

    def timed(*a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return real(*a, **k)
        finally:
            kernel[0] += time.perf_counter() - t0
            kernel[1] += time.thread_time() - c0

    def cpu(fn):
        # NB: (wall, CPU of the whole process): on a shared machine the CPU seconds a run spends beyond the read
        # and the kernels are its fixed cost whatever the load, where wall-clock differences drown in it
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - t0, time.process_time() - c0, out

    pipeline.measure_batch = timed
    tmp = Path(tempfile.mkdtemp(prefix="gpucnr-bench-"))
    try:
        for size in sizes:
            n = max(1, int(args.gb * 1e9 // (size * size * 2)))
            stack_path = tmp / f"s{size}.zarr"
            images, rois = _streamed_phantoms(n, size)
            stack = gpucnr.write_stack(stack_path, images, rois=rois,
                                       **({"compressor": args.compressor} if args.compressor else {}))
            # NB: the stack's dirty pages written back before timing: the kernel's writeback of ~1 GB ran beside the
            # first rounds and slowed them unevenly (a 2 GB stack's bare read measured 1.1 GB/s, a 1 GB one 2.4)
            os.sync()
            bucket = stack.buckets[0]

            def bare(stack=stack, bucket=bucket, threads=2, reuse=False):
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda a: stack.read(bucket, a, min(a + bucket.shard, bucket.size), labels=False,
                                                       reuse=reuse), range(0, bucket.size, bucket.shard)))

            def ours(k=[0], stack_path=stack_path):  # noqa: B006 - a fresh results path per round
                k[0] += 1
                out = tmp / f"r{k[0]}.zarr"
                kernel[:] = [0.0, 0.0]
                ds = gpucnr.run(stack_path, out, scheduler="threads", workers=2, backend="numpy")
                batches = ds.sizes["batch"]
                shutil.rmtree(out)
                return batches, kernel[0] / 2, kernel[1]

            ours()  # warm-up: compile the kernels, fill the page cache
            t_bare, t_one, t_run, c_one, c_run, t_reuse = [], [], [], [], [], []
            for _ in range(args.repeat):
                t_bare.append(best(bare, 1))
                t_reuse.append(best(lambda: bare(reuse=True), 1))
                wall, used, _ = cpu(lambda: bare(threads=1))
                t_one.append(wall)
                c_one.append(used)
                wall, used, (batches, t_kernel, c_kernel) = cpu(ours)
                t_run.append((wall, t_kernel))
                c_run.append(used - c_kernel)
            run_best, kernel_best = min(t_run)
            stored = sum(f.stat().st_size for f in stack_path.rglob("*") if f.is_file())
            files = sum(1 for f in stack_path.rglob("*") if f.is_file())
            rows.append((size, n, n * size * size * 2, stored, files, bucket.shard, batches, min(t_bare), min(t_one),
                         run_best, kernel_best, (min(c_run) - min(c_one)) / batches * 1e3, min(t_reuse)))
            shutil.rmtree(stack_path)
    finally:
        pipeline.measure_batch = real
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpucnr {gpucnr.__version__}; phantom stacks of {args.gb:g} GB raw uint16 per size, 3 square ROIs r=5 per "
          f"image, compressor {stack.compressor}, default shards and batches; threads=2; best of {args.repeat} "
          "interleaved rounds")
    print()
    print("| size | images | raw GB | stored GB | files | images/shard | batches | bare read s (2 threads) | "
          "bare read s (1 thread) | bare read s (2 threads, reused buffers) | run s | bare (2 threads) / run | "
          "reused-buffer bare / run | kernel s | fixed ms/batch | fixed CPU ms/batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, n, raw, stored, files, shard, batches, t_bare, t_one, t_run, t_kernel, c_fixed, t_reuse in rows:
        # NB: against the faster of the two bare reads: 2 threads of Stack.read contend for the GIL on small images
        fixed = (t_run - min(t_bare, t_one) - t_kernel) / batches * 1e3
        print(f"| {size}x{size} | {n} | {raw / 1e9:.2f} | {stored / 1e9:.2f} | {files} | {shard} | {batches} | "
              f"{t_bare:.2f} | {t_one:.2f} | {t_reuse:.2f} | {t_run:.2f} | {t_bare / t_run:.2f}x | "
              f"{t_reuse / t_run:.2f}x | {t_kernel:.2f} | {fixed:.1f} | {c_fixed:.1f} |")
    print()
    print("bare read: `Stack.read` over every shard, a fresh array per call (as any caller gets it); with reused "
          "buffers: `Stack.read(..., reuse=True)`, each thread decoding into its own buffer, as the run's workers do "
          "(no page faults, which cost 1-20 us each on this machine and vary tenfold from minute to minute)")
    print("fixed ms/batch: (run - the faster bare read - kernel s) / batches, wall clock; fixed CPU ms/batch: (CPU "
          "seconds of the run - those of its kernels - those of the 1-thread bare read) / batches, best rounds: "
          "what the run costs beyond reading and measuring, whatever else the machine runs")


_SCALE_STEP = r"""
import json, os, sys, threading, time
from pathlib import Path
sys.path.insert(0, {scripts!r})
step, root, n, limit_kb = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) * 1024


def guard():
    # NB: a step that outgrows the limit is stopped before it takes the shared machine's memory
    while True:
        rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
        if rss > limit_kb:
            print(f"stopped: peak RSS over {{limit_kb // 1024}} MB", file=sys.stderr, flush=True)
            os._exit(3)
        time.sleep(0.2)


threading.Thread(target=guard, daemon=True).start()
stack, results = root / "stack.zarr", root / "results.zarr"
import resource
cpu0 = sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
t0 = time.perf_counter()
extra = {{}}
if step == "write":
    import numpy as np, pandas as pd, gpucnr
    from bench import _streamed_phantoms
    # NB: blocks of 8 MiB: make_phantom's float64 intermediates of a 128 MiB block alone peak near 2 GB
    images, rois = _streamed_phantoms(n, 64, block_bytes=2**23)
    rois = rois[rois["roi"] == 1]
    # NB: 10^4 sites (a name screened like any meta column: no run of 6 digits)
    meta = pd.DataFrame({{"site": pd.Series(np.arange(n) % 10_000).map("s{{:04d}}".format)}})
    gpucnr.write_stack(stack, images, rois=rois, meta=meta)
elif step == "summarize":
    import gpucnr
    out = gpucnr.summarize(results, by="site")
    extra["groups"] = int(out.sizes.get("group", 0)) if hasattr(out, "sizes") else None
else:
    from gpucnr.cli import main
    argv = {{"run": ["run", str(stack), str(results), "--group-columns", "site", "--workers", "2",
                    "--backend", "numpy"],
            "filter": ["filter", str(results), "--out", str(root / "manifest.csv")],
            "report": ["report", str(results), str(root / "report")]}}[step]
    rc = main(argv)
    if rc not in (0, 3):
        raise SystemExit(f"{{step}} exited {{rc}}")
elapsed = time.perf_counter() - t0
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
# NB: CPU seconds of the step (all its threads, and any child it waited for): on a shared machine whose load
# changes between the two sizes, their ratio tells linearity where the wall-clock ratio cannot
import resource
cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
          for f in ("ru_utime", "ru_stime"))
print(json.dumps({{"step": step, "s": elapsed, "cpu_s": cpu - cpu0, "rss_mb": hwm / 1024, **extra}}))
"""


def bench_scale(args):
    """The whole flow at `--scale-n` images of 64x64 uint16 and at a tenth of them: each step (streaming
    write_stack, `gpucnr run --group-columns site`, `summarize(by="site")` over 10^4 sites, `gpucnr filter`,
    `gpucnr report`) in its own process, timed, its peak RSS (VmHWM) read; then the time ratio, the stack's and the
    results' file counts and the report's size. One round: minutes at 10^6 on 2 cores."""
    import json
    import shutil
    import subprocess

    steps = ("write", "run", "summarize", "filter", "report")
    code = _SCALE_STEP.format(scripts=str(Path(__file__).resolve().parent))
    table = {}
    base = Path(args.scale_dir) if args.scale_dir else Path(tempfile.mkdtemp(prefix="gpucnr-scale-"))
    for n in (args.scale_n // 10, args.scale_n):
        root = base / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        row = {}
        for step in steps:
            try:
                done = subprocess.run([sys.executable, "-c", code, step, str(root), str(n), str(args.rss_limit_mb)],
                                      capture_output=True, text=True, timeout=args.step_timeout)
                out = done.stdout.strip().splitlines()
                row[step] = json.loads(out[-1]) if done.returncode == 0 and out else {
                    "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
            except subprocess.TimeoutExpired:
                row[step] = {"error": f"stopped after {args.step_timeout:.0f} s"}
            print(n, step, row[step], flush=True)
        files = {name: sum(1 for f in (root / name).rglob("*") if f.is_file())
                 for name in ("stack.zarr", "results.zarr")}
        report = root / "report" / "report.html"
        row["files"] = files
        row["report_mb"] = report.stat().st_size / 2**20 if report.exists() else None
        table[n] = row
        if not args.scale_dir:
            shutil.rmtree(root, ignore_errors=True)
    small, large = args.scale_n // 10, args.scale_n
    print()
    print(f"gpucnr {gpucnr.__version__}; {small} and {large} phantom images of 64x64 uint16, 1 ROI each, 10^4 sites; "
          "each step its own process, workers=2")
    print()
    print(f"| step | s at {small} | s at {large} | ratio (<= 11) | CPU s at {small} | CPU s at {large} | CPU ratio | "
          f"peak RSS MB at {small} | peak RSS MB at {large} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for step in steps:
        a, b = table[small][step], table[large][step]
        if "error" in a or "error" in b:
            print(f"| {step} | {a.get('s', a.get('error'))} | {b.get('s', b.get('error'))} | | | | | | |")
            continue
        print(f"| {step} | {a['s']:.1f} | {b['s']:.1f} | {b['s'] / a['s']:.1f} | {a['cpu_s']:.1f} | "
              f"{b['cpu_s']:.1f} | {b['cpu_s'] / a['cpu_s']:.1f} | {a['rss_mb']:.0f} | {b['rss_mb']:.0f} |")
    for n in (small, large):
        report = table[n]["report_mb"]
        print(f"\nN = {n}: stack files {table[n]['files']['stack.zarr']} (<= 5,000), results files "
              f"{table[n]['files']['results.zarr']} (<= 500), report "
              + (f"{report:.2f} MB (<= 5)" if report is not None else "not written"))


def bench_compressors(args):
    """Write and read speed and size of each compressor a stack may use (`store.COMPRESSORS`), same images: the
    phantoms, and CT-like noise (int16, mean 1000, sd 20: the images of `bench.py ingest`). Write = `write_stack`
    (compression and shard files, one thread); read as a run reads them (`Stack.read`, whole shards) and through
    zarr's own reader."""
    import zarr

    from gpucnr.store import COMPRESSORS

    rng = np.random.default_rng(0)
    noise = rng.normal(1000, 20, (args.n, args.size, args.size)).astype(np.int16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in ("phantom", "noise"):
            for comp in COMPRESSORS:
                path = Path(tmp, f"{data}-{comp}.zarr")
                t0 = time.perf_counter()
                if data == "phantom":
                    _phantom_stack(path, args.n, args.size, compressor=comp)
                else:
                    gpucnr.write_stack(path, noise, shard=64, compressor=comp)
                t_write = time.perf_counter() - t0
                stack = gpucnr.open_stack(path)
                bucket = stack.buckets[0]
                arr = zarr.open_array(str(path / f"buckets/{bucket.name}/images"), mode="r")

                def ours(stack=stack, bucket=bucket):
                    for a in range(0, bucket.size, 64):
                        stack.read(bucket, a, min(a + 64, bucket.size), labels=False)

                def theirs(arr=arr):
                    for a in range(0, arr.shape[0], 64):
                        np.asarray(arr[a : a + 64])

                t_ours = min(best(ours, 1) for _ in range(args.repeat))
                t_zarr = min(best(theirs, 1) for _ in range(args.repeat))
                size = sum(f.stat().st_size for f in path.glob("buckets/*/images/c/**/*") if f.is_file())
                rows.append((data, comp, t_write, t_ours, t_zarr, size))
    raw = args.n * args.size * args.size * 2
    print(f"{args.n} images {args.size}x{args.size} ({raw / 1e6:.0f} MB raw): phantoms (uint16, with labels) and "
          "CT-like noise (int16); written by write_stack (labels included for the phantoms), read shard by shard, "
          "one thread")
    print()
    print("| images | compressor | write s (write_stack) | decode MB/s (Stack.read) | vs zstd | decode MB/s (zarr) | "
          "image chunks MB | compression |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for data, comp, t_write, t_ours, t_zarr, size in rows:
        t_zstd = next(r[3] for r in rows if r[:2] == (data, "zstd"))
        print(f"| {data} | {comp} | {t_write:.2f} | {raw / t_ours / 1e6:.0f} | {t_zstd / t_ours:.2f}x | "
              f"{raw / t_zarr / 1e6:.0f} | {size / 1e6:.1f} | {raw / size:.2f}x |")


def bench_memory(args):
    """Peak RSS of `gpucnr run` over 4000 images / over 500 images (the stack is never materialised)."""
    import subprocess

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (500, 4000):
            stack = Path(tmp, f"s{n}.zarr")
            _phantom_stack(stack, n, 128)
            # NB: VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would report the
            # parent's peak (this script holds the phantom in memory).
            # The driver's results buffers (rows of finished batches not yet in their shard files) are measured
            # by wrapping ResultsWriter.close, which sees their peak.
            code = ("import gpucnr, sys; from gpucnr import results as R; close = R.ResultsWriter.close\n"
                    "def wrapped(self):\n    close(self); print('buffers', self.peak_bytes)\n"
                    "R.ResultsWriter.close = wrapped\n"
                    "gpucnr.run(sys.argv[1], sys.argv[2], workers=2, backend='numpy')\n"
                    "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
            out = subprocess.run([sys.executable, "-c", code, str(stack), str(Path(tmp, f"r{n}.zarr"))],
                                 capture_output=True, text=True, check=True)
            lines = out.stdout.strip().splitlines()
            peaks[n] = (int(lines[-1]) / 1024, int(lines[-2].split()[1]) / 2**20)
    print("| images (128x128 uint16) | peak RSS of `gpucnr run` (MB) | peak results buffers of the driver (MB) |")
    print("|---:|---:|---:|")
    for n, (mb, buffers) in peaks.items():
        print(f"| {n} | {mb:.0f} | {buffers:.2f} |")
    peaks = {n: mb for n, (mb, _) in peaks.items()}
    print()
    print(f"peak RSS 4000 / 500 images: {peaks[4000] / peaks[500]:.2f}")




def _dicom_folder(folder: Path, n: int, size: int) -> int:
    """`n` small CT-like DICOM files (int16, slope/intercept, explicit VR little endian); returns their bytes."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = f"P{i % 50}", generate_uid(), generate_uid()
        ds.Modality, ds.Rows, ds.Columns = "CT", size, size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = rng.normal(1000, 20, (size, size)).astype(np.int16).tobytes()
        path = folder / f"{i // 100:03d}" / f"{i:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def _raster_folder(folder: Path, n: int, size: int, fmt: str) -> int:
    """`n` 16-bit gray PNG or TIFF files (CT-like noise); returns their bytes."""
    from PIL import Image

    rng = np.random.default_rng(1)
    total = 0
    for i in range(n):
        path = folder / f"{i // 100:03d}" / f"{i:05d}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.normal(1000, 20, (size, size)).astype(np.uint16)).save(path, format=fmt)
        total += path.stat().st_size
    return total


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (ingest's workers are waited for)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _floor_shard(job):
    """One shard of `bench ingest`'s floor: read, decode (pydicom, or Pillow for PNG and TIFF), compress (the stack's
    default codec) and write `files` as one file, nothing else. Returns the bytes written."""
    from gpucnr import chunks

    out, files, fmt = job
    codec = chunks.encoder(DEFAULT_COMPRESSOR)
    if fmt == "DICOM":
        import pydicom

        def read(f):
            return pydicom.dcmread(f).pixel_array
    else:
        from PIL import Image

        def read(f):
            with Image.open(f) as im:
                return np.asarray(im)
    parts = [chunks.encode_plane(np.ascontiguousarray(read(f)), codec) for f in files]
    Path(out).write_bytes(b"".join(parts))
    return sum(len(p) for p in parts)


def _ingest_floor(files, folder: Path, fmt: str = "DICOM", per: int = 16) -> None:
    """What any ingest that writes a compressed stack must do at least, on 2 processes (started here, as ingest
    starts its workers): each file read, decoded, compressed and written, `per` images a file. No header checks,
    isolation, pseudonyms, tables, manifest or driver: the cost below which no design can go."""
    import multiprocessing

    folder.mkdir()
    jobs = [(str(folder / str(k)), files[i : i + per], fmt) for k, i in enumerate(range(0, len(files), per))]
    # NB: forked (the cheapest start there is, and its workers are this process's children: their CPU is counted)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        sum(pool.map(_floor_shard, jobs, chunksize=1))


def _recycle(folder: Path, mb: int) -> None:
    """Write and remove `mb` MiB of files, so that the case timed next writes into memory just freed (see
    `_page_cache_calibration`), as on a machine that keeps its free memory."""
    block = b"\1" * (4 * 2**20)
    folder.mkdir()
    for k in range(mb // 4):
        (folder / str(k)).write_bytes(block)
    shutil.rmtree(folder)


def _page_cache_calibration(folder: Path, mb: int = 512) -> tuple[float, float]:
    """Seconds to write (and remove) `mb` MiB of new files into memory this machine has not touched for a while,
    then into memory just freed: on a VM that hands free memory back to its host (here: within ~3 s), the first
    costs ~10x the second, and every ingest pays it for its stack's new pages."""
    times = []
    time.sleep(5)
    for _ in range(2):
        t0 = time.perf_counter()
        _recycle(folder, mb)
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


#: `bench ingest`'s plain loops, each run as a process of its own: `python -c LOOP FOLDER`
_PLAIN_LOOPS = {
    "DICOM": "import sys, pathlib, pydicom\n"
             "for f in sorted(p for p in pathlib.Path(sys.argv[1]).rglob('*') if p.is_file()):\n"
             "    pydicom.dcmread(f).pixel_array",
    "Pillow": "import sys, pathlib, numpy as np\nfrom PIL import Image\n"
              "for f in sorted(p for p in pathlib.Path(sys.argv[1]).rglob('*') if p.is_file()):\n"
              "    with Image.open(f) as im:\n        np.asarray(im)",
}
_FLOOR = ("import sys, pathlib\nsys.path.insert(0, sys.argv[4])\nfrom bench import _ingest_floor\n"
          "files = sorted(p for p in pathlib.Path(sys.argv[1]).rglob('*') if p.is_file())\n"
          "_ingest_floor(files, pathlib.Path(sys.argv[2]), sys.argv[3])")


def _process(argv: list) -> None:
    """Run `argv` as a process of its own (stdout and stderr discarded); an exit status other than 0 or 3 (problems
    that ingest reports) fails the bench."""
    import subprocess

    rc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if rc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(map(str, argv[:4]))}... exited {rc.returncode}: {rc.stderr.decode()[-2000:]}")


def bench_ingest(args):
    """`gpucnr ingest --workers 2` (header scan + decode + compression in isolated worker processes, which write the
    stack's shards) against plain single-process loops over the same, page-cached files, which write nothing:
    ``pydicom.dcmread(f).pixel_array`` for DICOM (2000 files of 512x512 int16 by default), ``np.asarray(
    Image.open(f))`` for PNG and TIFF (a quarter as many files); each format's floor (`_ingest_floor`); and
    `gpucnr ingest` + `gpucnr run` (one square ROI per image) against the plain DICOM loop alone.

    Whole process against whole process, as issue 18 measures: every case is a command of its own (``python -c
    LOOP``, ``python -m gpucnr ingest``...), its interpreter's start and imports included. Wall time is the ratio
    the issue sets (2 workers against one process); CPU seconds (the process and its workers) say what the ratio
    would be on an idle machine. One more row runs the plain DICOM loop inside this benchmark's own process: on this
    VM a fresh process pays a page fault for most 512 KiB buffers it allocates (glibc hands them out fresh), and the
    loop inside a process whose heap is warm runs about twice as fast: both are shown, so neither is mistaken for
    the other.

    On this VM, memory the host took back (free for ~3 s) costs 10-30x as much to write into as memory just freed
    (printed first): each case's outputs are removed as soon as it is timed, and each case runs right after as many
    bytes as the DICOM stack holds were written and removed."""
    import pydicom

    size, n = args.size, args.n
    n_raster = max(1, n // 4)
    py = sys.executable
    scripts = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"DICOM": Path(tmp, "dicom"), "PNG": Path(tmp, "png"), "TIFF": Path(tmp, "tiff")}
        nbytes = {"DICOM": _dicom_folder(folders["DICOM"], n, size)}
        for fmt in ("PNG", "TIFF"):
            nbytes[fmt] = _raster_folder(folders[fmt], n_raster, size, fmt)
        files = {k: sorted(p for p in v.rglob("*") if p.is_file()) for k, v in folders.items()}
        rois = Path(tmp, "rois.csv")
        c = size // 2
        rois.write_text("source,roi,kind,cx,cy,r\n" + "".join(
            f"{f.relative_to(folders['DICOM']).as_posix()},1,square,{c},{c},{max(2, size // 25)}\n"
            for f in files["DICOM"]))
        fresh_s, recycled_s = _page_cache_calibration(Path(tmp, "calibration"))
        outputs = Path(tmp, "out")
        stack, results = outputs / "stack.zarr", outputs / "results.zarr"

        def plain_here():
            for f in files["DICOM"]:
                pydicom.dcmread(f).pixel_array  # noqa: B018 - the decode is the point

        def plain(fmt):
            _process([py, "-c", _PLAIN_LOOPS["DICOM" if fmt == "DICOM" else "Pillow"], folders[fmt]])

        def floor(fmt):
            _process([py, "-c", _FLOOR, folders[fmt], outputs / "floor", fmt, scripts])

        def ours(fmt):
            _process([py, "-m", "gpucnr", "ingest", folders[fmt], stack, "--workers", "2"])

        parts: list[tuple[float, float]] = []  # NB: (ingest, run) wall seconds of each `ingest + run` round

        def ours_and_run():
            t0 = time.perf_counter()
            _process([py, "-m", "gpucnr", "ingest", folders["DICOM"], stack, "--workers", "2", "--rois", rois])
            t1 = time.perf_counter()
            _process([py, "-m", "gpucnr", "run", stack, results, "--workers", "2", "--backend", "numpy",
                      "--scheduler", "threads"])
            parts.append((t1 - t0, time.perf_counter() - t1))

        cases = {"plain DICOM": lambda: plain("DICOM"), "plain DICOM here": plain_here,
                 "floor DICOM": lambda: floor("DICOM"), "ingest DICOM": lambda: ours("DICOM"),
                 "plain PNG": lambda: plain("PNG"), "floor PNG": lambda: floor("PNG"),
                 "ingest PNG": lambda: ours("PNG"),
                 "plain TIFF": lambda: plain("TIFF"), "floor TIFF": lambda: floor("TIFF"),
                 "ingest TIFF": lambda: ours("TIFF"), "ingest + run DICOM": ours_and_run}
        for fmt in folders:
            plain(fmt)  # NB: warms the page cache for every measurement
        plain_here()
        wall: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for _ in range(max(1, min(args.repeat, 3))):
            for key, fn in cases.items():
                _recycle(Path(tmp, "recycle"), int(nbytes["DICOM"] / 2**20 * 0.75))
                outputs.mkdir()
                c0, t0 = _cpu(), time.perf_counter()
                fn()
                wall.setdefault(key, []).append(time.perf_counter() - t0)
                cpu.setdefault(key, []).append(_cpu() - c0)
                shutil.rmtree(outputs)  # NB: the stack and the side files beside it
    t = {k: min(v) for k, v in wall.items()}
    u = {k: min(v) for k, v in cpu.items()}
    print(f"gpucnr {gpucnr.__version__}; {n} DICOM files of {size}x{size} int16 ({nbytes['DICOM'] / 2**20:.0f} MiB, "
          f"explicit VR LE), {n_raster} PNG and {n_raster} TIFF files of {size}x{size} uint16; workers=2; best of "
          f"{len(wall['plain DICOM'])} interleaved rounds; every case a process of its own (its start included)")
    print(f"writing 512 MiB of new files: {fresh_s:.2f} s into memory untouched for 5 s, {recycled_s:.2f} s into "
          "memory just freed; every case below runs right after 3/4 of the DICOM folder's size was written and "
          "removed (recycled memory), and its outputs are removed after it")
    print()
    print("| | files | wall s | files/s | ratio (wall) | CPU s | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    floor_label = "floor: 2 processes that only read, decode, compress and write (no checks, isolation, tables)"
    rows = [("plain loop `pydicom.dcmread(f).pixel_array` (`python -c`, writes nothing)", "plain DICOM",
             "plain DICOM", n),
            ("the same loop inside this (warm) process, for reference", "plain DICOM here", "plain DICOM", n),
            (floor_label, "floor DICOM", "plain DICOM", n),
            ("`gpucnr ingest` DICOM (scan + decode + compress + stack + linkage)", "ingest DICOM", "plain DICOM", n),
            ("`gpucnr ingest` + `gpucnr run` DICOM (1 square ROI per image)", "ingest + run DICOM", "plain DICOM", n),
            ("plain loop `np.asarray(Image.open(f))` PNG", "plain PNG", "plain PNG", n_raster),
            (floor_label, "floor PNG", "plain PNG", n_raster),
            ("`gpucnr ingest` PNG", "ingest PNG", "plain PNG", n_raster),
            ("plain loop `np.asarray(Image.open(f))` TIFF", "plain TIFF", "plain TIFF", n_raster),
            (floor_label, "floor TIFF", "plain TIFF", n_raster),
            ("`gpucnr ingest` TIFF", "ingest TIFF", "plain TIFF", n_raster)]
    for label, key, base, count in rows:
        print(f"| {label} | {count} | {t[key]:.2f} | {count / t[key]:.0f} | {t[base] / t[key]:.2f}x | {u[key]:.2f} | "
              f"{u[base] / u[key]:.2f}x |")
    print()
    print("`ingest + run` rounds, ingest s / run s: " + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in parts))
    print("targets (issue 18): ingest >= 0.7x its plain loop (DICOM, PNG, TIFF); ingest + run >= 0.5x the plain DICOM "
          "loop; ratio (CPU) = plain CPU / (process + workers CPU): above 0.5 means 2 idle cores would beat the loop")


def bench_ingest_nifti(args):
    """`gpucnr ingest` of gzip NIfTI volumes (workers=2: each volume inflated once, reoriented, sliced into the
    stack) vs the plain loop ``nibabel.load(f).get_fdata().sum()`` over the same files (which writes nothing)."""
    import nibabel as nib

    size = args.size if args.size != 512 else 256
    shape = (size, size, max(1, size // 2))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src")
        src.mkdir()
        rng = np.random.default_rng(0)
        nbytes = 0
        for i in range(args.n):
            vol = rng.normal(1000, 20, shape).astype(np.int16)
            path = src / f"case_{i:04d}.nii.gz"
            nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.5, 1.0])), str(path))
            nbytes += path.stat().st_size
        files = sorted(src.glob("*.nii.gz"))

        def plain():
            for f in files:
                nib.load(f).get_fdata().sum()

        def ours(compressor, k=[0]):  # noqa: B006 - a fresh stack per round
            k[0] += 1
            gpucnr.ingest(src, Path(tmp, f"stack{k[0]}.zarr"), workers=2, compressor=compressor)
            shutil.rmtree(Path(tmp, f"stack{k[0]}.zarr"))

        plain()  # NB: warms the page cache for both, and imports nibabel
        _ = gpucnr.ingest  # NB: imports the driver (pandas, zarr) outside the timing too, as nibabel is
        compressors = args.compressor.split(",")
        runs = [("plain", plain)] + [(c, lambda c=c: ours(c)) for c in compressors]
        times: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        # NB: interleaved rounds, the best kept; CPU seconds (this process and its waited-for workers) too: the
        # machine is shared, and CPU is what load does not change much
        for _ in range(max(1, min(args.repeat, 3))):
            for key, fn in runs:
                c0, t0 = _cpu(), time.perf_counter()
                fn()
                times.setdefault(key, []).append(time.perf_counter() - t0)
                cpu.setdefault(key, []).append(_cpu() - c0)
    mb = nbytes / 2**20
    print(f"gpucnr {gpucnr.__version__}; {args.n} gzip NIfTI volumes of {'x'.join(map(str, shape))} int16 "
          f"({mb:.1f} MiB on disk); best of {len(times['plain'])} interleaved rounds")
    print()
    print("| | s | volumes/s | ratio | CPU s | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    t_plain, c_plain = min(times["plain"]), min(cpu["plain"])
    print(f"| plain loop `nibabel.load(f).get_fdata().sum()` (1 process, writes nothing) | {t_plain:.2f} | "
          f"{args.n / t_plain:.2f} | 1 | {c_plain:.2f} | 1 |")
    for c in compressors:
        t, u = min(times[c]), min(cpu[c])
        print(f"| `gpucnr.ingest(..., workers=2, compressor={c!r})` (scan + decode + stack + linkage) | {t:.2f} | "
              f"{args.n / t:.2f} | {t_plain / t:.2f}x | {u:.2f} | {c_plain / u:.2f}x |")
    print()
    print("target (issue 14): ingest >= 0.8x the plain loop; ratio (CPU) = plain CPU / (driver + workers CPU): 2 idle "
          "cores give ingest at most 2x its CPU ratio in wall time")


#: run in a fresh interpreter per volume: ingest with one worker; the worker's VmHWM is read just before the
#: pool kills it, the driver's at the end (VmHWM, not ru_maxrss: see bench_memory)
_NIFTI_MEMORY = """
import sys
import gpucnr
from gpucnr.sources import workers

def hwm(pid="self"):
    with open(f"/proc/{pid}/status") as fh:
        return [int(line.split()[1]) for line in fh if line.startswith("VmHWM")][0]

peak = [0]
stop = workers.IsolatedPool._stop

def _stop(slot):
    try:
        peak[0] = max(peak[0], hwm(slot["proc"].pid))
    except (OSError, IndexError):
        pass
    stop(slot)

workers.IsolatedPool._stop = staticmethod(_stop)
gpucnr.ingest(sys.argv[1], sys.argv[2], workers=1, compressor=sys.argv[3])
print(peak[0], hwm())
"""


def bench_ingest_nifti_memory(args):
    """Peak RSS of one worker and of the driver ingesting one gzip NIfTI volume (issue 14's bound: worker <= 1.2 x
    (image + label volume in their file dtypes) + 200 MB; the driver's does not grow with the volume's size)."""
    import subprocess

    import nibabel as nib

    cases = [("512x512x8 int16 (start-up reference)", (512, 512, 8), False),
             ("512x512x200 int16", (512, 512, 200), False),
             ("512x512x400 int16 (2x)", (512, 512, 400), False),
             ("512x512x200 int16 + uint8 label map", (512, 512, 200), True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for n, (label, shape, labelled) in enumerate(cases):
            src = Path(tmp, f"case{n}", "imagesTr")
            src.mkdir(parents=True)
            vol = rng.normal(1000, 20, shape).astype(np.int16)
            affine = np.diag([0.8, 0.8, 1.5, 1.0])
            nib.save(nib.Nifti1Image(vol, affine), str(src / "v.nii.gz"))
            volume_mb = vol.nbytes / 2**20
            del vol
            if labelled:
                (src.parent / "labelsTr").mkdir()
                lab = np.zeros(shape, np.uint8)
                lab[100:300, 150:350, :] = 1
                nib.save(nib.Nifti1Image(lab, affine), str(src.parent / "labelsTr" / "v.nii.gz"))
                volume_mb += lab.nbytes / 2**20
                del lab
            done = subprocess.run([sys.executable, "-c", _NIFTI_MEMORY, str(src.parent if labelled else src),
                                   str(Path(tmp, f"s{n}.zarr")), args.compressor],
                                  capture_output=True, text=True, check=True)
            worker_kb, driver_kb = (int(v) for v in done.stdout.split()[-2:])
            rows.append((label, volume_mb, worker_kb / 1024, 1.2 * volume_mb + 200, driver_kb / 1024))
    print(f"gpucnr {gpucnr.__version__}; one volume per ingest, workers=1, compressor={args.compressor}")
    print()
    print("| volume | image + labels MiB | worker peak RSS MiB | bound 1.2 x volume + 200 | driver peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for label, mb, worker, bound, driver in rows:
        print(f"| {label} | {mb:.0f} | {worker:.0f} | {bound:.0f} | {driver:.0f} |")


def bench_startup(args):
    """Start-up of the command line against `import numpy`, each in a fresh interpreter, interleaved rounds:
    the import alone (``-X importtime``'s cumulative microseconds of the top module) and the whole process (wall
    time of ``python -c ...``, interpreter start-up included)."""
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cases = {"import numpy": "import numpy", "import gpucnr.cli": "import gpucnr.cli",
             "gpucnr --help": "import sys; sys.argv = ['gpucnr', '--help']; import runpy; "
                              "runpy.run_module('gpucnr', run_name='__main__')",
             "python -c pass": "pass"}
    imports: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    for _ in range(max(args.repeat, 5)):
        for name, code in cases.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], capture_output=True, env=env)
            walls.setdefault(name, []).append(time.perf_counter() - t0)
            top = code.split()[1] if code.startswith("import ") and ";" not in code else None
            if top:
                err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                                     text=True, env=env).stderr
                # NB: the last line naming the module itself is its cumulative import time (children included)
                line = [ln for ln in err.splitlines() if ln.rstrip().endswith(f"| {top}")][-1]
                imports.setdefault(name, []).append(int(line.split("|")[1]) / 1e6)
    imp = {k: min(v) for k, v in imports.items()}
    wall = {k: min(v) for k, v in walls.items()}
    base = wall["python -c pass"]
    print(f"gpucnr {gpucnr.__version__}; best of {len(walls['import numpy'])} interleaved rounds, a fresh interpreter "
          "each")
    print()
    print("| | import (ms, -X importtime) | vs import numpy | process (ms) | process − `python -c pass` (ms) | "
          "vs import numpy |")
    print("|---|---:|---:|---:|---:|---:|")
    n_proc = wall["import numpy"] - base
    for name in ("import numpy", "import gpucnr.cli", "gpucnr --help"):
        i = imp.get(name)
        cols = f"{i * 1e3:.1f} | {i / imp['import numpy']:.2f}x" if i is not None else "– | –"
        print(f"| {name} | {cols} | {wall[name] * 1e3:.0f} | {(wall[name] - base) * 1e3:.0f} | "
              f"{(wall[name] - base) / n_proc:.2f}x |")
    print(f"| python -c pass | – | – | {base * 1e3:.0f} | 0 | – |")

def _grouped_results(n: int, groups: int, seed: int = 0):
    """In-memory results of `n` images and 3 ROIs (the moments `aggregate` pools, the CNR `summarize` and `manifest`
    read) with a per-image column ``site`` of `groups` values, ``one`` of a single value, and ``case`` (8 images
    each)."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    shape = (n, 3)
    n_roi = rng.integers(20, 200, shape)
    n_bg = rng.integers(500, 5000, shape)
    mean_roi, mean_bg = rng.normal(300, 30, shape), rng.normal(100, 10, shape)
    var_roi, var_bg = rng.gamma(4, 100, shape), rng.gamma(4, 100, shape)
    cnr = np.abs(mean_roi - mean_bg) / np.sqrt(var_roi + var_bg)
    status = np.where(rng.random(shape) < 0.05, 4, 0).astype(np.int8)
    ok = status == 0
    with np.errstate(all="ignore"):
        median = np.nanmedian(np.where(ok, cnr, np.nan), axis=1)
    site = np.array([f"site{k:05d}" for k in range(groups)], dtype=object)[rng.integers(0, groups, n)]
    cell = ("image", "roi")
    return xr.Dataset(
        {"n_roi": (cell, n_roi), "mean_roi": (cell, mean_roi), "var_roi": (cell, var_roi), "n_bg": (cell, n_bg),
         "mean_bg": (cell, mean_bg), "var_bg": (cell, var_bg), "cnr": (cell, np.where(ok, cnr, np.nan)),
         "status": (cell, status), "cnr_median": (("image",), median),
         "n_valid": (("image",), ok.sum(axis=1).astype(np.int64)), "n_excluded": (("image",), np.zeros(n, np.int64))},
        coords={"image": np.arange(n), "roi": [1, 2, 3], "site": ("image", site),
                "one": ("image", np.full(n, "all", dtype=object)),
                "case": ("image", np.array([f"c{k // 8:07d}" for k in range(n)], dtype=object))},
        attrs={"ddof": 1, "min_bg": 30, "definition": "pooled"},
    )


def bench_groups(args):
    """summarize, manifest and aggregate with 5,000 groups against the same call without groups (issue 17: one pass,
    no per-group masks), side by side on the same in-memory results."""
    from gpucnr.manifests import manifest
    from gpucnr.pooling import aggregate
    from gpucnr.statistics import summarize

    groups = 5000
    ds = _grouped_results(args.n, groups)
    # NB: the case level of summarize pools cases (aggregate): left out, so both sides time the same work
    ds_plain = ds.drop_vars("case")
    calls = {
        "summarize": (lambda: summarize(ds_plain), lambda: summarize(ds_plain, by="site")),
        "manifest (mad:3)": (lambda: manifest(ds_plain, rule="mad:3"),
                             lambda: manifest(ds_plain, rule="mad:3", by="site")),
        "aggregate": (lambda: aggregate(ds, by="one"), lambda: aggregate(ds, by="site")),
    }
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeat):
        for name, pair in calls.items():
            for k, fn in enumerate(pair):
                times.setdefault((name, k), []).append(best(fn, 1))
    print(f"gpucnr {gpucnr.__version__}; in-memory results of {args.n} images x 3 ROIs; {groups} groups "
          f"(column site) vs none; best of {args.repeat} interleaved rounds")
    print()
    print("| call | no groups (s) | 5000 groups (s) | ratio |")
    print("|---|---:|---:|---:|")
    for name in calls:
        a, b = min(times[name, 0]), min(times[name, 1])
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
