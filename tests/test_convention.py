"""One API convention (scikit-image's, STYLE.md): data positional, every option keyword-only, numpydoc with
References for the definitions; and no global side effect at import (issue 19)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import gpucnr

# NB: the data each public function takes positionally; everything else must be keyword-only.
DATA = {
    "measure": ("images", "rois"),
    "run": ("stack", "results"),
    "write_stack": ("path", "images"),
    "open_stack": ("path",),
    "open_results": ("path",),
    "enhance": ("results", "out"),
    "ingest": ("src", "stack"),
    "sample_rois": ("lesion_masks",),
    "read_manifest": ("path",),
}


@pytest.mark.parametrize("name", sorted(DATA))
def test_data_positional_options_keyword_only(name):
    params = inspect.signature(getattr(gpucnr, name)).parameters.values()
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    assert positional == DATA[name]
    assert not any(p.kind is p.VAR_KEYWORD for p in params), f"{name} hides its options in **kwargs"


def test_run_lists_the_measurement_options_of_measure():
    measure = inspect.signature(gpucnr.measure).parameters
    run = inspect.signature(gpucnr.run).parameters
    for name in set(measure) - {"images", "rois", "labels"}:
        assert name in run, name
        assert run[name].default == measure[name].default, name


def test_measure_cites_its_definitions():
    doc = gpucnr.measure.__doc__
    for section in ("Parameters", "Returns", "Notes", "References"):
        assert f"\n    {section}\n    ---" in doc, section
    assert "Rodriguez-Molares" in doc and "TUFFC" in doc


def test_stack_to_xarray_follows_the_convention():
    from gpucnr.store import Stack

    params = list(inspect.signature(Stack.to_xarray).parameters.values())
    assert [p.name for p in params] == ["self", "labels"] and params[1].kind is params[1].KEYWORD_ONLY
    assert "Returns\n        -------" in Stack.to_xarray.__doc__


def test_importing_gpucnr_changes_no_global_state():
    """Importing the plots (and the report that uses them) keeps the user's matplotlib backend and imports no
    pyplot; the figures still render."""
    code = (
        "import sys, matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "import gpucnr, gpucnr.plots, gpucnr.kernels.batch\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "import numpy as np\n"
        "img = np.random.default_rng(0).normal(100, 5, (40, 40)); roi = np.zeros((40, 40), bool)\n"
        "roi[15:25, 15:25] = True\n"
        "png = gpucnr.plots.three_panel(img, roi, ~roi, 'x')\n"
        "assert png.startswith(bytes([0x89]) + b'PNG')\n"
        "assert matplotlib.get_backend() == before and 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {"MPLBACKEND": "svg", "PYTHONPATH": ":".join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_layering_and_no_compiled_code_until_asked():
    """backend imports no kernel; the kernels import no compiled code until an implementation is asked for (the
    moments <-> _numpy_fast circle is gone); the compiled module imports on its own."""
    code = (
        "import sys\n"
        "import gpucnr.backend\n"
        "assert not [m for m in sys.modules if m.startswith('gpucnr.kernels')]\n"
        "import gpucnr.kernels.batch, gpucnr.kernels.moments, gpucnr.arrays\n"
        "assert 'numba' not in sys.modules and 'gpucnr.kernels._numpy_fast' not in sys.modules\n"
    )
    env = {"PYTHONPATH": ":".join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    subprocess.run([sys.executable, "-c", "import gpucnr.kernels._numpy_fast"], check=True, env=env, timeout=120)
