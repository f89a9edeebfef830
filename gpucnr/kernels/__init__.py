"""Pure, eager array math on one batch of images, written once for NumPy, CuPy and the array API.

No Dask, no Zarr, no files and no NumPy import here (ruff's banned-api rule enforces the last), except
in `_numpy_fast`, the one measured NumPy-specific fast path ("numba-cpu"). Which implementation runs is
named by `gpucnr.backend.fast_path` and looked up in `fastpath`, nowhere else.
"""

from gpucnr.kernels.batch import OUTPUT_CELL, OUTPUT_IMAGE, measure_batch
from gpucnr.kernels.cnr import DEFINITIONS, STATUS
from gpucnr.kernels.footprints import FOOTPRINTS, footprint_offsets
from gpucnr.kernels.params import BACKGROUNDS, Params

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
