"""Shared fixtures: the array namespaces every kernel test runs on."""

from __future__ import annotations

import os
import tempfile

# NB: before anything imports numba. The compiled kernels run with bounds checks in the suite (an index out of
# range is an IndexError, never a silent read or a segfault), and from a cache of their own: Numba's cache key
# ignores the boundscheck flag, so kernels cached without checks would otherwise be loaded unchecked.
os.environ["NUMBA_BOUNDSCHECK"] = "1"
os.environ["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"gpucnr-numba-boundscheck-{os.getuid()}")


def _device_visible() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - no CuPy, or a broken CUDA install: no device
        return False


# NB: before numba.cuda is first imported (it reads this once). Without a GPU the device kernels run in numba's CUDA
# simulator (tests/test_cuda.py switches GPUCNR_CUDA_SIM=1 per test); on a GPU runner they run on the device.
if os.environ.get("GPUCNR_REQUIRE_GPU") != "1" and not _device_visible():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import array_api_compat  # noqa: E402 - after the environment above
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gpucnr.backend import cupy_available, to_host  # noqa: E402

NAMESPACES = ("numpy", "array_api_strict", "cupy")


def _namespace(name: str):
    if name == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    if name == "array_api_strict":
        import array_api_strict

        return array_api_strict
    if not cupy_available():
        if os.environ.get("GPUCNR_REQUIRE_GPU") == "1":
            pytest.fail("GPUCNR_REQUIRE_GPU=1 but CuPy sees no CUDA device")
        pytest.skip("no CUDA device (set GPUCNR_REQUIRE_GPU=1 to make this a failure)")
    import array_api_compat.cupy as cupy_namespace

    return cupy_namespace


@pytest.fixture(params=NAMESPACES)
def xp(request):
    """An array-API namespace: numpy (array_api_compat's), array_api_strict, cupy when a GPU is usable."""
    return _namespace(request.param)


@pytest.fixture
def gpu_xp():
    """CuPy's namespace; skipped without a GPU unless GPUCNR_REQUIRE_GPU=1."""
    return _namespace("cupy")


def host(a) -> np.ndarray:
    """Any backend's array as a NumPy array (explicit copy from the device)."""
    return to_host(a)
