"""The decode pass reads little-endian, uncompressed, monochrome DICOM pixels straight from the file (no second
parse of the header): for every such file it must give exactly what pydicom's path gives — dtype, values,
rescale per frame, padding and display polarity — and files outside that layout must take pydicom's path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfactory import write_dicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from gpucnr.sources import dicom

KEY = b"k" * 32
OPTIONS = {"color": "rec709", "nonfinite": "skip"}
RNG = np.random.default_rng(7)


def _same(path: Path) -> dict:
    """Scan `path`, decode it through the native path and through pydicom's, and compare every field."""
    record = dicom.scan(path, KEY, 2**30)
    assert record["native"] is not None, "expected the native layout"
    fast = dicom.decode(path, record, OPTIONS)
    slow = dicom.decode(path, {**record, "native": None}, OPTIONS)
    assert len(fast) == len(slow) == record["frames"]
    for f, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert a["pixels"].dtype == b["pixels"].dtype and a["pixels"].dtype.isnative, (f, a["pixels"].dtype)
        np.testing.assert_array_equal(a["pixels"], b["pixels"], err_msg=f"frame {f}")
        for k in ("slope", "intercept", "photometric", "color"):
            assert a[k] == b[k], (f, k, a[k], b[k])
        assert (math.isnan(a["padding"]) and math.isnan(b["padding"])) or a["padding"] == b["padding"]
    return record


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "rtdose.dcm",
                                  "rtdose_1frame.dcm"])
def test_real_files(name):
    path = Path(get_testdata_file(name, download=False))
    _same(path)


CASES = {
    "uint8": dict(pixels=RNG.integers(0, 256, (24, 20)).astype(np.uint8)),
    "int16 rescale padding": dict(pixels=RNG.integers(-3000, 3000, (24, 20)).astype(np.int16), slope=0.5,
                                  intercept=-1024, padding=-2000),
    "uint16 implicit MONOCHROME1": dict(pixels=RNG.integers(0, 65536, (24, 20)).astype(np.uint16),
                                        photometric="MONOCHROME1", transfer_syntax=ImplicitVRLittleEndian),
    "int32 multi-frame": dict(pixels=RNG.integers(-2**31, 2**31 - 1, (3, 16, 12)).astype(np.int32)),
    "uint32": dict(pixels=RNG.integers(0, 2**32 - 1, (16, 12), dtype=np.uint64).astype(np.uint32)),
    "odd size uint8 frames": dict(pixels=RNG.integers(0, 256, (3, 5, 7)).astype(np.uint8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_files(case, tmp_path):
    _same(write_dicom(tmp_path / "x.dcm", **CASES[case]))


def test_inverse_presentation_and_us_padding_in_signed_data(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", RNG.integers(-2000, 2000, (16, 16)).astype(np.int16))
    ds = pydicom.dcmread(path)
    ds.add_new("PixelPaddingValue", "US", 63536)
    ds.PresentationLUTShape = "INVERSE"
    ds.save_as(path)
    record = _same(path)
    assert record["native"]["padding"] == -2000 and record["native"]["photometric"] == "MONOCHROME1"


@pytest.mark.parametrize("kw", [dict(transfer_syntax=ExplicitVRBigEndian), dict(transfer_syntax=RLELossless),
                                dict(pixels=np.zeros((8, 8, 3), np.uint8), photometric="RGB"),
                                dict(pixels=np.zeros((8, 8), np.float32)),
                                dict(modality_lut=np.arange(4096, dtype=np.uint16))])
def test_other_layouts_go_through_pydicom(kw, tmp_path):
    """Big endian, compressed, colour, float pixel data and a modality LUT are pydicom's to decode."""
    kw = {"pixels": RNG.integers(0, 4096, (8, 8)).astype(np.uint16), **kw}
    path = write_dicom(tmp_path / "x.dcm", **kw)
    assert dicom.scan(path, KEY, 2**30)["native"] is None


def test_bits_stored_below_bits_allocated_go_through_pydicom(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", RNG.integers(0, 4096, (8, 8)).astype(np.uint16),
                       transfer_syntax=ExplicitVRLittleEndian)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path)
    assert dicom.scan(path, KEY, 2**30)["native"] is None
