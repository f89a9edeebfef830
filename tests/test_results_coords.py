"""Results coordinates encoded and checked by gpucnr itself (issue 17: zarr's own encoding and read of each
coordinate cost 0.2-0.5 s of a run): the same bytes zarr writes, read back by zarr and xarray, and damage found."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from gpucnr.results import _coord, _coordinate_check

VALUES = {
    "int64": np.arange(-3, 1000, dtype=np.int64),
    "float64": np.array([0.5, np.nan, -np.inf, 1e300], np.float64),
    "int8": np.array([-1, 0, 5], np.int8),
    "uint16": np.array([1, 65535], np.uint16),
    "text": np.array(["64x64-uint16", "MONOCHROME1", "", "é"] * 50, dtype=object),
    "fixed": np.array(["a", "bc"]),
    "empty": np.zeros(0, np.int64),
}


@pytest.mark.parametrize("kind", list(VALUES))
def test_coordinates_are_the_bytes_zarr_writes(tmp_path, kind):
    values = VALUES[kind]
    ours, theirs = (zarr.open_group(str(tmp_path / name), mode="w") for name in ("ours", "theirs"))
    _coord(ours, "c", values, "image", tmp_path / "ours")
    _coord(theirs, "c", values, "image")  # NB: without a folder: through zarr, as before
    files = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours/c").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs/c").rglob("*")
                           if p.is_file())
    for f in files:
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f
    got = np.asarray(zarr.open_group(str(tmp_path / "ours"), mode="r")["c"][:])
    assert [str(v) for v in got.tolist()] == [str(v) for v in np.asarray(values).tolist()]
    assert _coordinate_check(tmp_path / "ours", "c") is True


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_coordinate_chunk_is_found(tmp_path, damage):
    group = zarr.open_group(str(tmp_path / "r"), mode="w")
    _coord(group, "c", VALUES["text"], "image", tmp_path / "r")
    chunk = tmp_path / "r/c/c/0"
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[:-9]))
    else:
        chunk.unlink()
    with pytest.raises((ValueError, OSError)):
        _coordinate_check(tmp_path / "r", "c")


def test_another_layout_is_left_to_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "r"), mode="w")
    group.create_array("c", data=np.arange(10), chunks=(5,))
    assert _coordinate_check(tmp_path / "r", "c") is False
