"""The plots and the self-contained HTML report: sections, embedded PNGs, no external reference, the gallery."""

from __future__ import annotations

import base64
import html as html_lib
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from reference import dilate, remove_frame

import gpucnr
from gpucnr.phantom import make_phantom
from gpucnr.plots import distribution_figure, group_boxplot, three_panel
from gpucnr.report import _image_masks, lowest_images, roi_and_background, write_report
from gpucnr.sources.pseudonyms import load_or_create_key, pseudonym
from gpucnr.store import _write_table

SECTIONS = ("summary", "distribution", "groups", "thresholds", "lowest", "parameters")
PNG = b"\x89PNG\r\n\x1a\n"
LOWEST = 5


class _Parsed(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self.figures, self.tags = [], [], [], []
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "figure" and "lowest" in (a.get("class") or "").split():
            self.figures.append(int(a["data-image"]))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Parsed:
    p = _Parsed()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def _expected_lowest(results, n):
    values = np.where(results["n_valid"].values > 0, results["cnr_median"].values.astype(float), np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    return [int(i) for i in finite[np.argsort(values[finite], kind="stable")][:n]]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    ph = make_phantom(n=14, shape=(96, 96), lesions=2, cnr=(0.3, 3.5), seed=3)
    meta = pd.DataFrame({
        "site": ["A", "B", "<b>&x"] * 4 + [None, "A"],
        "patient_id": [f"P{i // 2:03d}" for i in range(14)],
    })
    gpucnr.write_stack(root / "stack", ph.images, labels=ph.labels, rois=ph.rois, meta=meta, shard=8,
                       key_file=root / "stack.key")
    # NB: write_stack refuses an identifying column (issue 11); a stack may still hold one (an unscreened --meta)
    _write_table(root / "stack", "images",
                 pd.DataFrame({"patient_name": [f"Doe^Secret{i}" for i in range(14)]}))
    results = gpucnr.run(root / "stack", root / "res.zarr", scheduler="synchronous", group_columns=["site"],
                         roi_source="table")  # NB: the labels are the lesions of the table's ROIs (same ids)
    report = write_report(root / "res.zarr", root / "out", by="site", lowest=LOWEST)
    return root, results, report


@pytest.fixture(scope="module")
def parsed(made):
    return _parse(made[2])


def test_sections_present(parsed):
    assert [s for s in parsed.sections if s in SECTIONS] == list(SECTIONS)


def test_every_image_is_an_embedded_png(parsed):
    # 2 distributions + 1 group box plot + the gallery
    assert len(parsed.imgs) == 3 + LOWEST
    for src in parsed.imgs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG) and len(data) > 5000


def test_no_external_reference(made, parsed):
    html = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", made[2].read_text(encoding="utf-8"))
    for bad in ("http://", "https://", 'src="/', "<script", "<link", "@import", "url("):
        assert bad not in html.lower(), bad
    assert "script" not in parsed.tags and "link" not in parsed.tags


def test_gallery_shows_the_lowest_images(made, parsed):
    _, results, _ = made
    expected = _expected_lowest(results, LOWEST)
    assert len(expected) == LOWEST
    assert parsed.figures == expected
    text = " ".join(parsed.text)
    for i in expected:
        assert f"image {i}," in text


def test_text_is_escaped_and_no_patient_name(made, parsed):
    html = made[2].read_text(encoding="utf-8")
    assert "site=&lt;b&gt;&amp;x" in html and "<b>&x" not in html
    assert "Secret" not in html  # a non-pseudonymous per-image column never reaches the report
    key = load_or_create_key(made[0] / "stack.key")
    assert pseudonym(key, "patient", "P000") in html  # the pseudonymous id is shown in the gallery's listing
    assert made[1].attrs["stack_fingerprint"] in html


def test_gallery_masks_match_the_measurement(made):
    root, results, _ = made
    stack = gpucnr.open_stack(root / "stack")
    ds = results.load()
    for i in _expected_lowest(ds, LOWEST):
        roi_id, cnr, image, roi, bg, exclude = _image_masks(ds, stack, i, None)
        j = list(ds["roi"].values).index(roi_id)
        assert roi.sum() == ds["n_roi"].values[i, j]
        assert bg.sum() == ds["n_bg"].values[i, j]
        assert cnr == pytest.approx(ds["cnr"].values[i, j])
        assert image.shape == (96, 96) and not exclude.any()


def test_complement_cross_matches_the_reference():
    roi = np.zeros((40, 50), bool)
    roi[10:16, 20:27] = True
    params = {"background": "complement", "footprint": "cross", "dilation": 4, "border": 3}
    expected = remove_frame(~dilate(roi, "cross", 4), 3)
    np.testing.assert_array_equal(roi_and_background(roi, params), expected)
    params["footprint"] = "square"
    assert roi_and_background(roi, params).sum() < expected.sum()


def test_lowest_images_skips_nan_and_orders():
    assert lowest_images([3.0, np.nan, 1.0, np.inf, 2.0, 1.0], 3) == [2, 5, 4]
    assert lowest_images([np.nan], 4) == []


def test_explicit_stack_and_missing_stack(made, tmp_path):
    root, results, _ = made
    moved = tmp_path / "elsewhere" / "res.zarr"
    shutil.copytree(root / "res.zarr", moved)
    lost = _parse(write_report(moved, tmp_path / "lost", lowest=3))
    assert list(SECTIONS) == [s for s in lost.sections if s in SECTIONS]
    assert lost.figures == []
    assert len(lost.imgs) == 3
    assert "stack was not found" in " ".join(lost.text)
    found = _parse(write_report(moved, tmp_path / "found", lowest=3, stack=root / "stack"))
    assert found.figures == _expected_lowest(results, 3)
    assert "stack was not found" not in " ".join(found.text)


def test_label_rois_and_gallery_larger_than_dataset(tmp_path):
    ph = make_phantom(n=4, shape=(64, 64), lesions=1, seed=5)
    images = ph.images.copy()
    stack = gpucnr.write_stack(tmp_path / "stack", images, labels=ph.labels, shard=4)
    results = gpucnr.run(stack, tmp_path / "res.zarr", scheduler="synchronous", footprint="disk", dilation=3)
    assert results.attrs["roi_source"] == "labels"
    report = _parse(write_report(results, tmp_path / "out", lowest=50, stack=stack))
    assert sorted(report.figures) == list(range(4))
    ds = results.load()
    for i in range(4):
        _, _, _, roi, bg, _ = _image_masks(ds, stack, i, None)
        assert roi.sum() == ds["n_roi"].values[i, 0] and bg.sum() == ds["n_bg"].values[i, 0]


def test_plots_are_non_empty_pngs(made):
    _, results, _ = made
    ds = results.load()
    summary = gpucnr.summarize(ds, (1.0, 1.5), by="site")
    for png in (distribution_figure(summary, [1.5]), distribution_figure(summary, level="roi", group="site=A"),
                group_boxplot(ds, "site"), group_boxplot(ds)):
        assert png.startswith(PNG) and len(png) > 5000
    image = np.random.default_rng(0).normal(100, 5, (40, 40))
    roi = np.zeros((40, 40), bool)
    roi[15:25, 15:25] = True
    png = three_panel(image, roi, ~roi, "t")
    assert png.startswith(PNG) and len(png) > 5000
    with pytest.raises(ValueError):
        three_panel(image, roi[:10], ~roi, "t")
    with pytest.raises(ValueError):
        group_boxplot(ds, "no_such_column")


def test_thresholds_section_shows_where_each_rule_cuts(made):
    _, results, report = made
    html = report.read_text(encoding="utf-8")
    section = html[html.index('<h3 id="rules">'):html.index("</section>", html.index('<h3 id="rules">'))]
    rows = re.findall(r"<tr><td class=\"l\">([^<]*)</td><td class=\"l\">([^<]*)</td><td>([^<]*)</td><td>(\d+)</td>"
                      r"<td>(\d+)</td>", section)
    s = gpucnr.summarize(results, by="site", rules=("quantile:0.05", "mad:3"))
    image_rows = [(html_lib.unescape(g), *rest) for g, *rest in rows[: len(s["group"]) * 2]]  # image level first
    assert {(g, r) for g, r, *_ in image_rows} == {(str(g), r) for g in s["group"].values for r in ("quantile:0.05",
                                                                                                   "mad:3")}
    for g, rule, cut, dropped, finite in image_rows:
        x = s.sel(level="image", group=g, rule=rule)
        assert int(dropped) == int(x["rule_n_below"]) and int(finite) == int(x["count"])
        assert (cut == "no cut") == bool(np.isnan(float(x["rule_cut"])))
    # 14 images: a 5 % quantile needs 20 values, so it never cuts here
    assert all(cut == "no cut" for _, rule, cut, *_ in image_rows if rule == "quantile:0.05")
    assert any(cut != "no cut" for _, rule, cut, *_ in image_rows if rule == "mad:3")
