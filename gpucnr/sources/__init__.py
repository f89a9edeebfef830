"""Files -> stack: DICOM (dicom.py), PNG/TIFF (raster.py), masks, DICOM SEG and ROI tables (rois.py),
driven by `gpucnr.ingest` (driver.py) in crash-isolated worker processes (workers.py)."""

from gpucnr._lazy import lazy_attributes

__all__ = ["CODES", "IngestSummary", "ingest", "sidecar_paths"]

# NB: resolved on first use, so a worker process importing gpucnr.sources.tasks never imports the driver
# (zarr, xarray) it does not need.
_WHERE = {"CODES": "gpucnr.sources.outcomes", "IngestSummary": "gpucnr.sources.driver",
          "ingest": "gpucnr.sources.driver", "sidecar_paths": "gpucnr.sources.driver"}


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, globals())
