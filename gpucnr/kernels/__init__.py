"""Pure, eager array math on one batch of images, written once for NumPy, CuPy and the array API.

No Dask, no Zarr, no files and no NumPy import here (ruff's banned-api rule enforces the last), except
in `_numpy_fast`, the one measured NumPy-specific fast path ("numba-cpu"). Which implementation runs is
named by `gpucnr.backend.fast_path` and looked up in `fastpath`, nowhere else.
"""

from gpucnr._lazy import lazy_attributes

# NB: names resolve on first use (PEP 562): the CLI reads the option names of `cnr`, `footprints` and `params`
# (plain Python) without `batch` pulling in NumPy, SciPy and the array backends (issue 18: `gpucnr --help`).
_WHERE = {
    "BACKGROUNDS": "gpucnr.kernels.params",
    "DEFINITIONS": "gpucnr.kernels.cnr",
    "FOOTPRINTS": "gpucnr.kernels.footprints",
    "OUTPUT_CELL": "gpucnr.kernels.batch",
    "OUTPUT_IMAGE": "gpucnr.kernels.batch",
    "STATUS": "gpucnr.kernels.cnr",
    "Params": "gpucnr.kernels.params",
    "footprint_offsets": "gpucnr.kernels.footprints",
    "measure_batch": "gpucnr.kernels.batch",
}

__all__ = [
    "BACKGROUNDS",
    "DEFINITIONS",
    "FOOTPRINTS",
    "OUTPUT_CELL",
    "OUTPUT_IMAGE",
    "STATUS",
    "Params",
    "footprint_offsets",
    "measure_batch",
]


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, globals())
