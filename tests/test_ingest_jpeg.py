"""`gpucnr.ingest` of JPEG images and JPEG masks (issue 14): gray and RGB stored as Pillow decodes them, CMYK
refused, EXIF orientation never applied, a truncated file a coded skip, lossy masks binarised by
``--mask-threshold``. Images are tiny (40x48) and synthetic."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_ingest import ingest

from gpucnr.sources.colour import to_gray


def _jpeg(path, arr, mode=None, **kw) -> np.ndarray:
    """Write `arr` as JPEG and return what Pillow decodes from the file (the reference)."""
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path, "JPEG", quality=90, **kw)
    with Image.open(path) as back:
        return np.asarray(back)


def test_jpeg_gray_rgb_cmyk_exif_truncated(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    gray = _jpeg(src / "gray.jpg", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    rgb = _jpeg(src / "rgb.jpg", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    _jpeg(src / "cmyk.jpg", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), mode="CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6  # NB: "rotate 90 CW to display": never applied
    turned = _jpeg(src / "turned.jpg", rng.integers(0, 255, (40, 48), dtype=np.uint8), exif=exif)
    _jpeg(src / "progressive.jpg", rng.integers(0, 255, (40, 48), dtype=np.uint8), progressive=True)
    data = (src / "gray.jpg").read_bytes()
    (src / "cut.jpg").write_bytes(data[: len(data) // 2])
    done = ingest(src, tmp_path / "s.zarr")
    codes = dict(zip(done.summary.problems["source"], done.summary.problems["code"], strict=True))
    assert codes == {"cmyk.jpg": "unsupported-format", "cut.jpg": "truncated"}
    pixels, _ = done.read(done.index("gray.jpg"))
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, gray)
    pixels, _ = done.read(done.index("rgb.jpg"))
    np.testing.assert_array_equal(pixels, to_gray(rgb, "rec709"))
    pixels, _ = done.read(done.index("turned.jpg"))
    assert pixels.shape == (40, 48)
    np.testing.assert_array_equal(pixels, turned)
    assert set(done.stack.images["format"]) == {"jpeg"}


def test_jpeg_masks_need_a_threshold(tmp_path):
    """A binary mask saved as JPEG holds values around 0 and 255: refused (mask-labels) as anti-aliased, labels
    where it exceeds T with --mask-threshold T."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(6)
    _jpeg(src / "a.jpg", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    disk = np.zeros((40, 48, 3), np.uint8)
    yy, xx = np.mgrid[:40, :48]
    disk[(yy - 20) ** 2 + (xx - 24) ** 2 <= 81] = 255
    decoded = _jpeg(src / "a_mask.jpg", disk)
    refused = ingest(src, tmp_path / "r.zarr", mask_pattern="{stem}_mask.jpg")
    assert refused.summary.problems["code"].tolist() == ["mask-labels"]
    done = ingest(src, tmp_path / "s.zarr", mask_pattern="{stem}_mask.jpg", mask_threshold=127)
    assert done.summary.problems.empty
    _, labels = done.read(done.index("a.jpg"))
    np.testing.assert_array_equal(labels, (decoded.astype(np.float64).mean(axis=-1) > 127).astype(np.int32))
    assert labels.sum() > 200
