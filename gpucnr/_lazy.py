"""Package attributes resolved on first use (PEP 562), so that importing a package imports none of its heavy
modules: `gpucnr --help` reads option names without NumPy, Zarr or pandas (issue 18), and an ingest worker
imports `gpucnr.sources.tasks` without the driver. Plain Python: it imports nothing but importlib."""

from __future__ import annotations

import importlib

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, where: dict[str, str], namespace: dict, *, submodules: bool = False):
    """The module-level ``__getattr__`` and ``__dir__`` of `package`.

    Parameters
    ----------
    package : str
        The package's name (for the error message and its submodules).
    where : dict
        Public name -> the module defining it; imported on first access, then kept in `namespace`.
    namespace : dict
        The package's ``globals()`` (its ``__all__`` lists the public names).
    submodules : bool
        Any other name is tried as a submodule ``package.name``, as an eagerly imported package would have them.
    """

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            namespace[name] = value
            return value
        if submodules:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError:
                pass
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
