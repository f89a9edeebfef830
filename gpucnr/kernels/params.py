"""The measurement parameters of DESIGN §4, validated once, recorded in every result."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gpucnr.errors import OptionError, OptionTypeError
from gpucnr.kernels.cnr import DEFINITIONS, FORCED
from gpucnr.kernels.footprints import FOOTPRINTS

__all__ = ["BACKGROUNDS", "Params"]

#: Names accepted by ``background=``.
BACKGROUNDS = ("complement", "ring", "complement-all", "label")


@dataclass(frozen=True)
class Params:
    """How a CNR is measured; the defaults are the article's Python method.

    Attributes
    ----------
    background : {"complement", "ring", "complement-all", "label"}
    footprint : {"cross", "disk", "matlab-disk", "square"}
    dilation : int
        Radius of the ROI dilation removed from the background (complement modes).
    border : int
        Width of the frame of the valid region removed from the background.
    ring_gap, ring_width : int
        background="ring": pixels whose distance from the ROI lies in (gap, gap + width].
    background_label : int or None
        background="label": the label whose pixels are the background (required in that mode).
    min_bg : int
        Fewer background pixels than this give status background-too-small.
    ddof : int
        Delta degrees of freedom of both variances (1: the article's Python, 0: its MATLAB).
    definition : {"pooled", "background", "roi", "pooled-mean", "gcnr", "mriqc", "viqa", "mrqy"}
        A definition that reproduces a peer tool fixes ``ddof`` and ``signed`` whatever was given
        (`gpucnr.kernels.cnr.FORCED`; "viqa" and "mrqy": ddof 0, signed), recorded by `as_attrs`.
    gcnr_bins : "auto" or int
    signed : bool
    """

    background: str = "complement"
    footprint: str = "cross"
    dilation: int = 5
    border: int = 5
    ring_gap: int = 5
    ring_width: int = 10
    background_label: int | None = None
    min_bg: int = 30
    ddof: int = 1
    definition: str = "pooled"
    gcnr_bins: str | int = "auto"
    signed: bool = False

    def __post_init__(self):
        _choice("background", self.background, BACKGROUNDS)
        _choice("footprint", self.footprint, FOOTPRINTS)
        _choice("definition", self.definition, DEFINITIONS)
        for name in ("dilation", "border", "ring_gap", "min_bg", "ddof"):
            _nonneg_int(name, getattr(self, name))
        _nonneg_int("ring_width", self.ring_width)
        if self.ring_width < 1:
            raise OptionError("ring_width must be >= 1")
        if self.background == "label":
            if self.background_label is None:
                raise OptionError("background 'label' needs a background label: --background-label N "
                                  "(background_label=N in Python; there is no default)")
            _int("background_label", self.background_label)
            if self.background_label == 0:
                raise OptionError("background_label must not be 0 (0 means 'no label')")
        if self.gcnr_bins != "auto":
            _int("gcnr_bins", self.gcnr_bins)
            if self.gcnr_bins < 1:
                raise OptionError(f"gcnr_bins must be 'auto' or an integer >= 1, got {self.gcnr_bins!r}")
        if not isinstance(self.signed, bool):
            raise OptionTypeError(f"signed must be True or False, got {self.signed!r}")
        if self.signed and self.definition == "gcnr":
            # NB: accepted and recorded, it changed nothing: gCNR is an overlap of two histograms, in [0, 1]
            raise OptionError("definition 'gcnr' has no sign (the overlap of two histograms, in [0, 1]): leave out "
                              "signed (--signed)")
        # NB: after validation, so that a peer definition overrides only valid options (and says so in as_attrs).
        for name, value in FORCED.get(self.definition, {}).items():
            object.__setattr__(self, name, value)
        # NB: NumPy integers become plain ints, so the parameters serialise as JSON attributes anywhere.
        for name in ("dilation", "border", "ring_gap", "ring_width", "min_bg", "ddof", "background_label",
                     "gcnr_bins"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, int(value))

    @property
    def reach(self) -> int:
        """How far beyond an ROI its background window must reach."""
        if self.background == "complement":
            return self.dilation
        if self.background == "ring":
            return self.ring_gap + self.ring_width
        return 0

    def as_attrs(self) -> dict:
        """The parameters as netCDF/Zarr-safe attributes (None is written as "none"), and, for a definition that
        fixes options, ``definition_forces`` (e.g. "ddof=0 signed=True"): not a parameter, never passed back."""
        attrs = {k: ("none" if v is None else v) for k, v in asdict(self).items()}
        forced = FORCED.get(self.definition)
        if forced:
            attrs["definition_forces"] = " ".join(f"{k}={v}" for k, v in forced.items())
        return attrs


def _choice(name, value, allowed):
    if value not in allowed:
        raise OptionError(f"{name} must be one of {allowed}, got {value!r}")


def _int(name, value):
    if isinstance(value, bool) or (not isinstance(value, int) and not hasattr(value, "__index__")):
        raise OptionTypeError(f"{name} must be an integer, got {value!r}")


def _nonneg_int(name, value):
    _int(name, value)
    if value < 0:
        raise OptionError(f"{name} must be >= 0, got {value}")
