"""gpucnr: the contrast-to-noise ratio of every image and ROI of a medical-imaging dataset.

Public API only; importing gpucnr never imports CuPy.
"""

from gpucnr._lazy import lazy_attributes
from gpucnr._version import __version__

# NB: names resolve on first use (PEP 562): `import gpucnr` stays cheap, so the worker processes of
# `gpucnr ingest` and the CLI start without importing Dask, xarray and Numba they may never need.
_WHERE = {
    "BackendUnavailableError": "gpucnr.backend",
    "BACKGROUNDS": "gpucnr.kernels",
    "DEFINITIONS": "gpucnr.kernels",
    "enhance": "gpucnr.enhancement",
    "FOOTPRINTS": "gpucnr.kernels",
    "GpucnrError": "gpucnr.errors",
    "aggregate": "gpucnr.pooling",
    "auto_regions": "gpucnr.arrays",
    "ingest": "gpucnr.sources",
    "IngestSummary": "gpucnr.sources",
    "InputError": "gpucnr.errors",
    "manifest": "gpucnr.manifests",
    "measure": "gpucnr.arrays",
    "open_results": "gpucnr.results",
    "open_stack": "gpucnr.store",
    "Params": "gpucnr.kernels",
    "read_manifest": "gpucnr.manifests",
    "ResultsError": "gpucnr.results",
    "RoiTableError": "gpucnr.errors",
    "run": "gpucnr.pipeline",
    "sample_rois": "gpucnr.roitable",
    "ShapeMismatchError": "gpucnr.errors",
    "StackError": "gpucnr.store",
    "STATUS": "gpucnr.kernels",
    "summarize": "gpucnr.statistics",
    "write_manifest": "gpucnr.manifests",
    "write_stack": "gpucnr.store",
}

__all__ = [
    "BACKGROUNDS",
    "DEFINITIONS",
    "FOOTPRINTS",
    "STATUS",
    "BackendUnavailableError",
    "GpucnrError",
    "IngestSummary",
    "InputError",
    "Params",
    "ResultsError",
    "RoiTableError",
    "ShapeMismatchError",
    "StackError",
    "__version__",
    "aggregate",
    "auto_regions",
    "enhance",
    "ingest",
    "manifest",
    "measure",
    "open_results",
    "open_stack",
    "read_manifest",
    "run",
    "sample_rois",
    "summarize",
    "write_manifest",
    "write_stack",
]


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, globals(), submodules=True)
