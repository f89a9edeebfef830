"""Constants shared by the oracle and backend tests: the grid of inputs and options they sweep."""

from __future__ import annotations

import array_api_compat
import numpy as np

DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
FOOTPRINTS = ("cross", "disk", "matlab-disk", "square")
BACKGROUNDS = ("complement", "ring", "complement-all", "label")
DEFINITIONS = ("pooled", "background", "roi", "pooled-mean", "gcnr")
COUNTS = ("n_roi", "n_bg", "status", "n_valid", "n_excluded")
FLOATS = ("mean_roi", "var_roi", "mean_bg", "var_bg", "cnr", "cnr_median")
BG_LABEL = 9
NP = array_api_compat.array_namespace(np.empty(0))
