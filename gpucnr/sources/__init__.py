"""Files -> stack: DICOM (dicom.py), PNG/TIFF (raster.py), masks, DICOM SEG and ROI tables (rois.py),
driven by `gpucnr.ingest` (ingest.py) in crash-isolated worker processes (workers.py)."""

from gpucnr.sources.ingest import IngestSummary, ingest, sidecar_paths
from gpucnr.sources.outcomes import CODES

__all__ = ["CODES", "IngestSummary", "ingest", "sidecar_paths"]
