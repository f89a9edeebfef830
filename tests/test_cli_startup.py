"""A command line that starts at once (issue 18): `gpucnr --help` and `import gpucnr.cli` import no heavy library;
each command imports what it needs when it runs. Checked through sys.modules of a fresh interpreter (not a timing:
`scripts/bench.py startup` measures the time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: What a command line must not import before a command runs (NumPy: the budget is 3 × its import time).
HEAVY = ("numpy", "zarr", "pandas", "scipy", "dask", "xarray", "matplotlib", "numba", "numcodecs", "pydicom", "nibabel",
         "PIL", "cupy", "distributed")

# NB: runs `python -m gpucnr ARGS` in this interpreter (runpy), then reports the top-level packages it imported.
_PROBE = """
import json, runpy, sys
sys.argv = ["gpucnr", *json.loads(sys.argv[1])]
code = None
try:
    runpy.run_module("gpucnr", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules}), "all": sorted(sys.modules)}))
"""


def _probe(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(modules) -> list[str]:
    return sorted(set(modules) & set(HEAVY))


def test_import_cli_imports_no_heavy_library():
    code = "import gpucnr.cli, json, sys; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = {m.split(".")[0] for m in json.loads(proc.stdout)}
    assert "gpucnr" in modules
    assert _heavy(modules) == []


def _commands() -> list[str]:
    from gpucnr.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


# NB: every subcommand the parser has, so one added later is covered too
@pytest.mark.parametrize("args", [("--help",), ("--version",), *((c, "--help") for c in _commands())], ids=" ".join)
def test_help_imports_no_heavy_library(args):
    out = _probe(*args)
    assert out["code"] == 0
    assert _heavy(out["modules"]) == []


def test_a_command_imports_what_it_needs_when_it_runs(tmp_path):
    """The probe sees imports: `info` on a missing path is a coded error after its module (and Zarr) loaded."""
    out = _probe("info", str(tmp_path / "missing.zarr"))
    assert out["code"] == 2
    assert "zarr" in out["modules"]


def test_run_summarises_its_results_without_dask(tmp_path):
    """`gpucnr run` with a local scheduler reads its summary's few arrays without Dask arrays (dask.array's import and
    one graph per variable cost ~0.3 s, more than the reads): only a Dask scheduler or a caller's Dataset needs them."""
    import gpucnr
    from gpucnr.phantom import make_phantom

    ph = make_phantom(4, (64, 64), lesions=1, radius=4, seed=3)
    gpucnr.write_stack(tmp_path / "s.zarr", ph.images, labels=ph.labels)
    out = _probe("run", str(tmp_path / "s.zarr"), str(tmp_path / "r.zarr"), "--backend", "numpy", "--workers", "1")
    assert out["code"] == 0
    # NB: xarray itself imports dask.base where Dask is installed (to recognise Dask arrays): not ours to avoid
    assert not [m for m in out["all"] if m.startswith(("dask.array", "distributed"))]


def test_cli_choices_are_the_library_names():
    """The CLI repeats the stack's compressor names (gpucnr.store imports Zarr); every option's choices must be the
    library's own."""
    from gpucnr.cli import build_parser
    from gpucnr.kernels import BACKGROUNDS, DEFINITIONS, FOOTPRINTS
    from gpucnr.sources.colour import COLOR_MODES
    from gpucnr.store import COMPRESSORS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = {(name, a.dest): tuple(a.choices) for name, p in sub.choices.items() for a in p._actions if a.choices}
    assert choices[("ingest", "compressor")] == tuple(COMPRESSORS)
    assert choices[("ingest", "color")] == tuple(COLOR_MODES)
    for command in ("run",):
        assert choices[(command, "background")] == tuple(BACKGROUNDS)
        assert choices[(command, "footprint")] == tuple(FOOTPRINTS)
        assert choices[(command, "definition")] == tuple(DEFINITIONS)


def test_bench_script_parses_its_options():
    """scripts/bench.py builds its option parser (two engineers each added a --compressor once: argparse refused
    the script whole, and nothing in the suite ran it) and refuses an unknown compressor in one line."""
    bench = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    ok = subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--compressor" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, str(bench), "pipeline", "--compressor", "lz5"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("got 'lz5'"), bad.stderr


_FROZEN = """
import gc, json, sys
import gpucnr.pipeline
seen = []

def run(*args, **kwargs):
    seen.append(gc.get_freeze_count())
    raise SystemExit(0)

gpucnr.pipeline.measure_into = run
import gpucnr.__main__
sys.argv = ["gpucnr", "run", "a.zarr", "b.zarr"]
try:
    gpucnr.__main__.main()
except SystemExit:
    pass
print(json.dumps(seen))
"""


def test_the_gpucnr_process_freezes_what_its_imports_made_and_main_in_a_caller_does_not(tmp_path):
    import gc

    from gpucnr import cli

    # NB: the `gpucnr` process moves its imports' objects out of the collector's sight before the command runs
    proc = subprocess.run([sys.executable, "-c", _FROZEN], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])[0] > 1000
    # NB: ...but a notebook or a test calling `main` keeps its collector as it was
    before = gc.get_freeze_count()
    assert cli.main(["run", str(tmp_path / "missing.zarr"), str(tmp_path / "r.zarr")]) == 2
    assert gc.get_freeze_count() == before
