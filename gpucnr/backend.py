"""The one place that knows NumPy from CuPy: backend resolution, namespaces and device moves."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import array_api_compat
import numpy as np

from gpucnr.errors import GpucnrError, OptionError

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "cupy_available",
    "fast_path",
    "is_cupy",
    "namespace",
    "ndimage_for",
    "resolve_backend",
    "simulated_device",
    "to_backend",
    "to_host",
]

#: Values accepted by every ``backend=`` option.
BACKENDS = ("auto", "numpy", "cupy")


class BackendUnavailableError(GpucnrError, RuntimeError):
    """``backend="cupy"`` was asked for but no CUDA device is usable. gpucnr never falls back silently."""

    code = "backend-unavailable"


def cupy_available() -> bool:
    """True when CuPy imports *and* sees a CUDA device (an importable CuPy without a GPU is not enough).

    NB: never numba.cuda.is_available(), which is true under numba's CUDA simulator."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception:  # noqa: BLE001 - a broken CUDA install raises anything at import; it means no GPU
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - driver errors mean no usable device
        return False


def fast_path(xp) -> str | None:
    """The compiled implementation the kernels use for arrays of namespace `xp`, by name (DESIGN §9).

    Returns
    -------
    str or None
        ``"cuda"`` (numba-cuda device kernels) for CuPy when numba-cuda is installed, and for NumPy in the
        simulator test mode (`simulated_device`); ``"numba-cpu"`` for NumPy when Numba is installed; None (the
        portable array-API path) otherwise.

    Notes
    -----
    Only the name is decided here; `gpucnr.kernels.fastpath` maps it to the kernels' module (the backend
    imports no kernel), and ``fast=False`` in the kernels means that no name is asked for at all.
    """
    # NB: find_spec, not an import: the name is decided without loading the compiler.
    if array_api_compat.is_cupy_namespace(xp) and importlib.util.find_spec("numba_cuda") is not None:
        return "cuda"
    if simulated_device() and (array_api_compat.is_numpy_namespace(xp)
                               or array_api_compat.is_array_api_strict_namespace(xp)):
        return "cuda"
    if array_api_compat.is_numpy_namespace(xp) and importlib.util.find_spec("numba") is not None:
        return "numba-cpu"
    return None


def simulated_device() -> bool:
    """The test mode ``GPUCNR_CUDA_SIM=1``: ``backend="cupy"`` runs the device kernels in numba's CUDA simulator
    on NumPy arrays (NUMBA_ENABLE_CUDASIM=1 must be set before numba.cuda is first imported). It proves the
    kernels' logic on a CPU, not CuPy's; in this mode every NumPy (and array-api-strict: a test counts their host
    reads) batch of the process takes the device kernels ("cuda"), so a test compares it with the NumPy path by
    switching the variable."""
    return os.environ.get("GPUCNR_CUDA_SIM") == "1"


def is_cupy(x: Any) -> bool:
    """True if `x` is a CuPy array (checked without importing CuPy)."""
    return array_api_compat.is_cupy_array(x)


def namespace(*arrays: Any):
    """The array-API namespace of `arrays` (array_api_compat's wrapper for NumPy and CuPy)."""
    return array_api_compat.array_namespace(*arrays)


def ndimage_for(x: Any):
    """The ndimage module for `x`'s array type: cupyx.scipy.ndimage for CuPy arrays, scipy.ndimage otherwise.

    A CuPy array is never handed to SciPy (no silent trip to the CPU): without cupyx the ImportError stands.
    """
    if is_cupy(x):
        return importlib.import_module("cupyx.scipy.ndimage")
    return importlib.import_module("scipy.ndimage")


def resolve_backend(backend: str, data: Any = None) -> str:
    """Decide where a computation runs.

    Parameters
    ----------
    backend : {"auto", "numpy", "cupy"}
        ``auto`` keeps CuPy input on the GPU, keeps other array-API arrays in their own namespace,
        and sends NumPy input to the GPU when one is usable, else runs on NumPy.
    data : array, optional
        The input whose type informs ``auto``.

    Returns
    -------
    str
        ``"numpy"``, ``"cupy"`` or ``"native"`` (run in the input's own array-API namespace).

    Raises
    ------
    BackendUnavailableError
        ``backend="cupy"`` without a usable CUDA device.
    """
    if backend not in BACKENDS:
        raise OptionError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cupy":
        if simulated_device():
            return "cupy"
        if not (is_cupy(data) or cupy_available()):
            raise BackendUnavailableError("backend='cupy' was requested but no CUDA device is available: install "
                                          "the cuda12 or cuda13 extra (pip install 'gpucnr[cuda12]') on a CUDA "
                                          "machine, or use --backend numpy (backend='numpy')")
        return "cupy"
    if backend == "numpy":
        return "numpy"
    if data is not None and is_cupy(data):
        return "cupy"
    if data is not None and not _is_host_numpy(data):
        return "native"
    return "cupy" if cupy_available() else "numpy"


def to_backend(x: Any, backend: str):
    """Move `x` to `backend` explicitly ("numpy", "cupy" or "native" = leave it where it is)."""
    if backend == "native":
        return x
    if backend == "cupy":
        if simulated_device():
            # NB: the simulator's "device" arrays are NumPy arrays (see `simulated_device`).
            return to_host(x)
        import cupy

        return cupy.asarray(x)
    return to_host(x)


def to_host(x: Any) -> np.ndarray:
    """Copy `x` to a NumPy array: ``.get()`` for CuPy, DLPack or the buffer protocol otherwise."""
    if isinstance(x, np.ndarray):
        return x
    if is_cupy(x):
        return x.get()
    if np.isscalar(x):
        return np.asarray(x)
    try:
        return np.from_dlpack(x)
    except (TypeError, AttributeError, RuntimeError, BufferError):
        return np.asarray(x)


def _is_host_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray | np.generic | list | tuple) or np.isscalar(x)
