"""gpucnr: the contrast-to-noise ratio of every image and ROI of a medical-imaging dataset.

Public API only; importing gpucnr never imports CuPy.
"""

from gpucnr._version import __version__
from gpucnr.arrays import measure
from gpucnr.backend import BackendUnavailableError
from gpucnr.enhancement import enhance
from gpucnr.errors import GpucnrError, InputError, RoiTableError, ShapeMismatchError
from gpucnr.kernels import BACKGROUNDS, DEFINITIONS, FOOTPRINTS, STATUS, Params
from gpucnr.manifests import manifest, read_manifest, write_manifest
from gpucnr.pipeline import run
from gpucnr.results import ResultsError, open_results
from gpucnr.roitable import sample_rois
from gpucnr.sources import IngestSummary, ingest
from gpucnr.statistics import summarize
from gpucnr.store import StackError, open_stack, write_stack

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
