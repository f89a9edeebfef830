"""GPU check: the kernels on NumPy and CuPy over the same phantoms must agree, and stay on the device.

Run on a machine with a CUDA GPU and the cuda12/cuda13 extra (CuPy and numba-cuda), in one call:

    python scripts/gpu_check.py [--n 256] [--size 512]

It prints a report and exits 0 when every check passed, 1 on any problem, 2 (one line, no traceback) when
there is no usable GPU: nothing was checked.

1. Equality: `measure_batch` on CuPy arrays, through the device kernels ("cuda", gpucnr/kernels/_cuda.py)
   and through the portable path, vs NumPy (fast and portable paths), for label arrays and ROI tables,
   uint16 and float32, every background mode, footprint and definition: counts and status identical,
   moments and CNR within 1e-12 relative.
2. Residency: every array the kernel returns for CuPy input is a CuPy array (nothing went to the host).
3. Launches per batch: the device kernels' launch counter over one batch of each ROI source.
   (Host reads per batch are counted by tests/test_cuda.py on arrays that count them.)
4. gpucnr.measure(backend="cupy") equals backend="numpy".
5. Timing (CUDA events) over an (n, size, size) uint16 device stack (>= 2**26 px by default) with 3 square
   ROIs per image: the device kernels alone (image pass + window pass) and the whole `measure_batch`,
   against ``cupy.sum(stack, dtype=cupy.uint64)`` over the same device array (goal: kernels >= 0.5x).
6. The pipeline: `gpucnr.run` over a Zarr stack with backend="cupy" vs "numpy" (identical counts, moments
   within 1e-12), and where a batch's time goes: decode on the host, host-to-device copy, kernels.
"""

from __future__ import annotations

import argparse
import sys
import time

import array_api_compat
import numpy as np

from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE, measure_batch
from gpucnr.kernels.params import Params
from gpucnr.phantom import make_phantom

EXACT = ("n_roi", "n_bg", "status", "n_valid", "n_excluded")


def compare(ref: dict, got: dict, label: str) -> list[str]:
    """Differences between two kernel outputs (host arrays), as messages."""
    bad = []
    for k in OUTPUT_CELL + OUTPUT_IMAGE:
        a, b = np.asarray(ref[k]), np.asarray(got[k])
        if k in EXACT:
            if not np.array_equal(a, b):
                bad.append(f"{label}: {k} differs in {int(np.sum(a != b))} cells")
        elif not np.allclose(a, b, rtol=1e-12, atol=0, equal_nan=True):
            worst = np.nanmax(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))
            bad.append(f"{label}: {k} max relative difference {worst:.2e}")
    return bad


def cases(seed: int):
    """(name, dtype, rois kind, Params) combinations covering every mode, footprint and definition."""
    for dtype in ("uint16", "float32"):
        for source in ("labels", "table"):
            for background in ("complement", "ring", "complement-all", "label"):
                if background == "label" and source == "table":
                    continue
                for footprint, definition in (("cross", "pooled"), ("matlab-disk", "background"),
                                              ("disk", "gcnr"), ("square", "pooled-mean")):
                    kw = {"background_label": 9} if background == "label" else {}
                    yield (f"{dtype} {source} {background} {footprint} {definition}", dtype, source,
                           Params(background=background, footprint=footprint, definition=definition, **kw))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="images in the timing stack")
    parser.add_argument("--size", type=int, default=512, help="image side of the timing stack")
    args = parser.parse_args(argv)

    try:
        import cupy

        usable = bool(cupy.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - no CuPy or a broken CUDA install: no GPU to check
        print(f"gpu_check: no usable GPU ({type(exc).__name__}: {exc}); nothing was checked. Install the cuda12 or "
              "cuda13 extra on a machine with an NVIDIA GPU.")
        return 2
    if not usable:
        print("gpu_check: CuPy sees no CUDA device; nothing was checked.")
        return 2
    from gpucnr.backend import fast_path
    from gpucnr.kernels import _cuda
    xnp = array_api_compat.array_namespace(np.empty(0))
    xcp = array_api_compat.array_namespace(cupy.empty(0))
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}, CuPy {cupy.__version__}, NumPy {np.__version__}")
    problems: list[str] = []
    if fast_path(xcp) != "cuda":
        problems.append(f"fast_path(cupy) is {fast_path(xcp)!r}, not 'cuda' (is numba-cuda installed?)")

    n_checked = 0
    launches: dict[str, int] = {}
    phantoms = {d: make_phantom(12, (96, 96), lesions=3, radius=7, margin=8, dtype=d, seed=1) for d in
                ("uint16", "float32")}
    for name, dtype, source, params in cases(0):
        ph = phantoms[dtype]
        labels = ph.labels.copy()
        if params.background == "label":
            labels[(labels == 0) & (np.indices(labels.shape)[2] % 3 == 0)] = 9
        ids = np.array([1, 2, 3])
        tables = {
            "image": ph.rois.image.to_numpy(), "col": ph.rois.roi.to_numpy() - 1,
            "kind": np.where(ph.rois.roi.to_numpy() == 2, 1, 0), "cx": ph.rois.cx.to_numpy(),
            "cy": ph.rois.cy.to_numpy(), "r": ph.rois.r.to_numpy() - 2,
        }

        def run(xp, fast, ph=ph, labels=labels, ids=ids, tables=tables, source=source, params=params):
            images = xp.asarray(ph.images)
            kw = {"roi_ids": xp.asarray(ids), "params": params, "fast": fast}
            if source == "labels":
                kw.update(labels=xp.asarray(labels), roi_ids=None)
                if params.background == "label":
                    kw["lesions"] = xp.asarray(labels)
            else:
                kw["table"] = {k: xp.asarray(v.astype(np.int64)) for k, v in tables.items()}
                if params.background == "complement-all":
                    kw["lesions"] = xp.asarray(ph.labels)
            return measure_batch(xp, images, **kw)

        ref = {k: np.asarray(v) for k, v in run(xnp, True).items()}
        portable = {k: np.asarray(v) for k, v in run(xnp, False).items()}
        before = _cuda.LAUNCHES["count"]
        on_device = run(xcp, True)
        launches[name] = _cuda.LAUNCHES["count"] - before
        on_gpu = run(xcp, False)
        for tag, out in (("device kernels", on_device), ("portable", on_gpu)):
            stray = [k for k, v in out.items() if not isinstance(v, cupy.ndarray)]
            if stray:
                problems.append(f"{name} ({tag}): outputs left the device: {stray}")
        problems += compare(ref, portable, f"{name} (numpy portable vs fast)")
        problems += compare(ref, {k: cupy.asnumpy(v) for k, v in on_gpu.items()}, f"{name} (cupy portable vs numpy)")
        problems += compare(ref, {k: cupy.asnumpy(v) for k, v in on_device.items()},
                            f"{name} (cupy device kernels vs numpy)")
        if launches[name] > 12:
            problems.append(f"{name}: {launches[name]} device kernel launches in one batch (at most 12)")
        n_checked += 1
    print(f"equality: {n_checked} configurations, {len(problems)} problems")
    print(f"device kernel launches per batch: {min(launches.values())} to {max(launches.values())}")

    import gpucnr

    ph = phantoms["uint16"]
    a = gpucnr.measure(ph.images, ph.rois, backend="numpy")
    b = gpucnr.measure(ph.images, ph.rois, backend="cupy")
    problems += compare({k: a[k].values for k in OUTPUT_CELL + OUTPUT_IMAGE},
                        {k: b[k].values for k in OUTPUT_CELL + OUTPUT_IMAGE}, "measure cupy vs numpy")
    print(f"measure(backend='cupy') attrs backend = {b.attrs['backend']}")

    # Timing on the device, with CUDA events around each call (after a warm-up).
    big = make_phantom(args.n, (args.size, args.size), lesions=3, radius=25, margin=20, seed=0)
    stack = cupy.asarray(big.images)
    table = {
        "image": cupy.asarray(big.rois.image.to_numpy()), "col": cupy.asarray(big.rois.roi.to_numpy() - 1),
        "kind": cupy.zeros(len(big.rois), dtype=cupy.int64), "cx": cupy.asarray(big.rois.cx.to_numpy()),
        "cy": cupy.asarray(big.rois.cy.to_numpy()), "r": cupy.full(len(big.rois), 5, dtype=cupy.int64),
    }

    def timed(fn, repeat=5):
        fn()
        cupy.cuda.Device().synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        best = np.inf
        for _ in range(repeat):
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return best

    t_sum = timed(lambda: cupy.sum(stack, dtype=cupy.uint64))
    params = Params()
    n_img = stack.shape[0]
    vh = cupy.full(n_img, args.size, dtype=cupy.int64)
    vw = cupy.full(n_img, args.size, dtype=cupy.int64)
    pad = cupy.full(n_img, np.nan)
    shift = cupy.zeros(n_img, dtype=cupy.int64)
    from gpucnr.kernels.batch import _cells

    cells, _, _, _ = _cells(xcp, stack, None, table, cupy.asarray([1, 2, 3]), vh, vw, params, "cuda")
    # NB: the window slots' sizes read once here, so the timed kernels include no host read.
    sizes = [int(v) for v in cupy.asnumpy(_cuda.window_extent(cells)).tolist()]

    def device_kernels():
        _cuda.image_totals(stack, shift, vh, vw, params.border, pad)
        _cuda.window_sums(stack, None, cells, params, shift, vh, vw, pad, sizes=sizes)

    t_device = timed(device_kernels)
    t_kernel = timed(lambda: measure_batch(xcp, stack, roi_ids=cupy.asarray([1, 2, 3]), params=params, table=table))
    t0 = time.perf_counter()
    host = np.asarray(big.images)
    cupy.asarray(host)
    cupy.cuda.Device().synchronize()
    t_h2d = time.perf_counter() - t0
    gbytes = big.images.nbytes / 1e9
    print(f"timing over {args.n} x {args.size}x{args.size} uint16 ({gbytes:.2f} GB) on the device:")
    print(f"  cupy.sum(dtype=uint64): {t_sum * 1e3:.2f} ms ({gbytes / t_sum:.0f} GB/s)")
    print(f"  device kernels (image pass + window pass, 3 square ROIs r=5 per image): {t_device * 1e3:.2f} ms "
          f"({t_sum / t_device:.2f}x the speed of cupy.sum; goal >= 0.5x)")
    print(f"  measure_batch (the whole batch, host reads included): {t_kernel * 1e3:.2f} ms "
          f"({t_sum / t_kernel:.2f}x the speed of cupy.sum)")
    if t_sum / t_device < 0.5:
        print("  NOTE: the device kernels are below the goal of 0.5x cupy.sum")
    print(f"  host->device copy of the stack: {t_h2d * 1e3:.1f} ms")
    problems += pipeline_check(args, xcp, cupy)
    for p in problems:
        print("PROBLEM", p)
    print("gpu_check:", "OK" if not problems else f"{len(problems)} problems")
    return 0 if not problems else 1


def pipeline_check(args, xcp, cupy) -> list[str]:
    """gpucnr.run with backend cupy vs numpy on one stack, and the time split of one batch."""
    import tempfile
    from pathlib import Path

    import gpucnr
    from gpucnr.store import open_stack

    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        ph = make_phantom(args.n, (args.size, args.size), lesions=3, radius=25, margin=20, seed=2)
        gpucnr.write_stack(Path(tmp, "s.zarr"), ph.images, rois=ph.rois.assign(kind="square", r=5), shard=64)
        a = gpucnr.run(Path(tmp, "s.zarr"), Path(tmp, "np.zarr"), backend="numpy").load()
        t0 = time.perf_counter()
        b = gpucnr.run(Path(tmp, "s.zarr"), Path(tmp, "cp.zarr"), backend="cupy").load()
        t_run = time.perf_counter() - t0
        problems += compare({k: a[k].values for k in OUTPUT_CELL + OUTPUT_IMAGE},
                            {k: b[k].values for k in OUTPUT_CELL + OUTPUT_IMAGE}, "run cupy vs numpy")
        stack = open_stack(Path(tmp, "s.zarr"))
        bucket = stack.buckets[0]
        t0 = time.perf_counter()
        host, _ = stack.read(bucket, 0, 64, labels=False)
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        dev = cupy.asarray(host)
        cupy.cuda.Device().synchronize()
        t_h2d = time.perf_counter() - t0
        rows = ph.rois[ph.rois.image < 64]
        table = {"image": cupy.asarray(rows.image.to_numpy()), "col": cupy.asarray(rows.roi.to_numpy() - 1),
                 "kind": cupy.zeros(len(rows), dtype=cupy.int64), "cx": cupy.asarray(rows.cx.to_numpy()),
                 "cy": cupy.asarray(rows.cy.to_numpy()), "r": cupy.full(len(rows), 5, dtype=cupy.int64)}
        measure_batch(xcp, dev, roi_ids=cupy.asarray([1, 2, 3]), params=Params(), table=table)
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        measure_batch(xcp, dev, roi_ids=cupy.asarray([1, 2, 3]), params=Params(), table=table)
        cupy.cuda.Device().synchronize()
        t_kernel = time.perf_counter() - t0
    total = t_decode + t_h2d + t_kernel
    print(f"pipeline: run(backend='cupy') over {args.n} images took {t_run:.2f} s; one 64-image batch:")
    for name, t in (("decode on host", t_decode), ("host->device", t_h2d), ("kernels", t_kernel)):
        print(f"  {name:<16} {t * 1e3:8.2f} ms  ({t / total:5.1%})")
    return problems


if __name__ == "__main__":
    sys.exit(main())
