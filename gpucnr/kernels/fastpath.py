"""The kernels' one switch between a compiled implementation and the portable array-API path.

`gpucnr.backend.fast_path` names the implementation for a namespace (DESIGN §9); this module maps that name
to the module holding it, imported only when asked for, so that the portable path (``fast=False``, or a
namespace without one) never imports compiled code.
"""

from __future__ import annotations

import importlib

from gpucnr.backend import fast_path

__all__ = ["implementation", "kernel"]

#: Implementation name (from `gpucnr.backend.fast_path`) -> the module of its kernels: Numba's CPU loops for
#: NumPy, numba-cuda device kernels for CuPy (and for NumPy under numba's CUDA simulator, a test mode).
_MODULES = {"numba-cpu": "gpucnr.kernels._numpy_fast", "cuda": "gpucnr.kernels._cuda"}


def implementation(xp, *, fast: bool = True) -> str | None:
    """The implementation the kernels use for arrays of `xp`: `fast_path`'s name, or None (portable) when
    `fast` is False."""
    return fast_path(xp) if fast else None


def kernel(impl: str | None, name: str):
    """The compiled function `name` of implementation `impl`, or None when `impl` is None or has no such
    function (the caller then takes the portable path)."""
    if impl is None:
        return None
    return getattr(importlib.import_module(_MODULES[impl]), name, None)
