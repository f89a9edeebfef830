"""Filtering rules (issue 16): abs, quantile and mad cuts per group, against pandas computations written here.

The expected cuts and drops are computed with pandas groupby (median, quantile) on the units a rule may use (usable,
finite), by hand, on results with NaN, flagged and never-computed images, ties, tiny groups and missing group values.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_grouping import messy

import gpucnr
from gpucnr.errors import InputError
from gpucnr.manifests import manifest, read_manifest, write_manifest
from gpucnr.phantom import make_phantom
from gpucnr.rules import Rule, RuleError, parse_rule
from gpucnr.statistics import summarize

MISSING = "(missing)"


def pandas_cuts(cnr, usable, group, rule: str) -> pd.Series:
    """Each group's cut by pandas, from the finite CNR of the usable units; NaN where the rule drops nothing."""
    kind, value = rule.split(":")
    value = float(value)
    frame = pd.DataFrame({"cnr": cnr, "group": group})
    stat = frame[usable & np.isfinite(cnr)]
    groups = pd.Index(sorted(set(group)))
    g = stat.groupby("group")["cnr"]
    if kind == "abs":
        return pd.Series(value, index=groups)
    if kind == "quantile":
        cut = g.quantile(value, interpolation="linear")
        cut[g.size() < 1 / value] = np.nan
        return cut.reindex(groups)
    median = g.median()
    mad = (stat["cnr"] - stat["group"].map(median)).abs().groupby(stat["group"]).median()
    cut = median - value * 1.4826 * mad
    cut[mad == 0] = np.nan
    return cut.reindex(groups)


def group_text(values) -> np.ndarray:
    s = pd.Series(values, dtype=object)
    return s.where(s.notna() & (s != ""), MISSING).astype(str).to_numpy()


def check(m, cnr, usable, group, rule, unit_order):
    """The manifest `m` (rows in `unit_order`) drops exactly the usable units below their group's pandas cut."""
    cut = pandas_cuts(cnr, usable, group, rule)
    unit_cut = pd.Series(group).map(cut).to_numpy(float)
    with np.errstate(invalid="ignore"):
        drop = usable & (cnr < unit_cut)
    m = m.set_index(unit_order[0] if len(unit_order) == 1 else unit_order)
    assert (m["decision"] == "flag").sum() == (~usable).sum()
    got = (m["decision"] == "drop").to_numpy()
    np.testing.assert_array_equal(got, drop)
    no_cut = usable & np.isnan(unit_cut)
    np.testing.assert_array_equal((m["reason"] == "no cut in group").to_numpy(), no_cut)
    # the metadata's cut of each group equals pandas'
    # NB: one by-column here (and at roi level the ROI id after it), or none (the group "all")
    cuts = {"".join(c["group"].values()) or "all": c for c in m.attrs["cuts"]}
    assert set(cuts) == set(cut.index)
    for name, want in cut.items():
        entry = cuts[name]
        if np.isnan(want):
            assert entry["cut"] is None
        else:
            np.testing.assert_allclose(entry["cut"], want, rtol=1e-12)
    return drop


@pytest.mark.parametrize("rule", ["abs:1.25", "quantile:0.05", "quantile:0.3", "mad:1", "mad:3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_image_level_rules_by_group(rule, seed):
    ds = messy(seed=seed)
    m = manifest(ds, rule=rule, by="site", allow_incomplete=True)
    n_valid = ds["n_valid"].values
    cnr = ds["cnr_median"].values
    usable = (n_valid > 0) & ~np.isnan(cnr)
    group = group_text(ds["site"].values)
    check(m, cnr, usable, group, rule, ["image"])
    assert m.attrs["rule"] == rule and m.attrs["by"] == ["site"]
    assert [c["group"]["site"] for c in m.attrs["cuts"]][-1] == MISSING
    # the quantile rule's cut is numpy.quantile of the group, exactly
    if rule.startswith("quantile"):
        p = float(rule.split(":")[1])
        for entry in m.attrs["cuts"]:
            sample = cnr[usable & (group == entry["group"]["site"])]
            if sample.size >= 1 / p:
                assert entry["cut"] == np.quantile(sample, p, method="linear")
                assert entry["units"] == sample.size
                assert entry["dropped"] == (sample < entry["cut"]).sum()


def test_no_by_is_one_group_and_the_default_is_abs_1_5():
    ds = messy(seed=2)
    cnr, n_valid = ds["cnr_median"].values, ds["n_valid"].values
    usable = (n_valid > 0) & ~np.isnan(cnr)
    m = manifest(ds, rule="mad:2", allow_incomplete=True)
    check(m, cnr, usable, np.full(cnr.size, "all"), "mad:2", ["image"])
    assert len(m.attrs["cuts"]) == 1 and m.attrs["cuts"][0]["group"] == {}
    default = manifest(ds, allow_incomplete=True)
    assert default.attrs["rule"] == "abs:1.5" and default.attrs["threshold"] == 1.5
    pd.testing.assert_frame_equal(default, manifest(ds, threshold=1.5, allow_incomplete=True))
    pd.testing.assert_frame_equal(default, manifest(ds, rule="abs:1.5", allow_incomplete=True))


def test_roi_level_rules_use_ok_cells_grouped_by_their_image_and_roi_id():
    # NB: each ROI id is a quantity of its own (rois="auto": foreground and tissue): one id never cuts another
    ds = messy(seed=3)
    m = manifest(ds, rule="quantile:0.1", by="modality", level="roi", allow_incomplete=True)
    n_roi = ds.sizes["roi"]
    cnr = ds["cnr"].values.ravel()
    usable = (ds["status"].values.ravel() == 0) & ~np.isnan(cnr)
    group = np.char.add(np.repeat(group_text(ds["modality"].values), n_roi).astype(str),
                        np.tile(ds["roi"].values.astype(str), ds.sizes["image"]))
    assert {c["group"]["roi"] for c in m.attrs["cuts"]} == {str(r) for r in ds["roi"].values}
    m = m.assign(_order=m["image"] * 100 + m["roi"]).sort_values("_order")
    check(m.drop(columns="_order"), cnr, usable, group, "quantile:0.1", ["image", "roi"])


def test_two_by_columns_group_by_their_combination():
    ds = messy(seed=4)
    cnr, n_valid = ds["cnr_median"].values, ds["n_valid"].values
    usable = (n_valid > 0) & ~np.isnan(cnr)
    group = np.char.add(np.char.add(group_text(ds["modality"].values).astype(str), "|"),
                        group_text(ds["site"].values).astype(str))
    m = manifest(ds, rule="mad:1", by=["modality", "site"], allow_incomplete=True)
    cut = pandas_cuts(cnr, usable, group, "mad:1")
    got = {f"{c['group']['modality']}|{c['group']['site']}": c["cut"] for c in m.attrs["cuts"]}
    assert set(got) == set(cut.index)
    for key, want in cut.items():
        assert (got[key] is None) if np.isnan(want) else np.isclose(got[key], want, rtol=1e-12, atol=0)
    unit_cut = pd.Series(group).map(cut).to_numpy(float)
    with np.errstate(invalid="ignore"):
        drop = usable & (cnr < unit_cut)
    np.testing.assert_array_equal((m.set_index("image")["decision"] == "drop").to_numpy(), drop)


def test_ties_tiny_groups_and_zero_mad_by_hand():
    from test_statistics import results_ds

    # group a: 1, 2, 2, 2, 5 (MAD 0); b: 1, 2, 3, 4 plus a flagged image with a stale low value; c: one image
    cnr = [1.0, 2.0, 2.0, 2.0, 5.0, 1.0, 2.0, 3.0, 4.0, 0.1, 0.5]
    n_valid = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]
    site = ["a"] * 5 + ["b"] * 5 + ["c"]
    ds = results_ds(np.array(cnr)[:, None], np.where(np.array(n_valid)[:, None] > 0, 0, 1), cnr, n_valid, site=site)
    mad = manifest(ds, rule="mad:1", by="site").set_index("image")
    assert (mad.loc[[0, 1, 2, 3, 4], "reason"] == "no cut in group").all()  # MAD 0 drops nothing
    # b: median 2.5, MAD 1 (|1-2.5|, |2-2.5|, |3-2.5|, |4-2.5| -> 1.5, .5, .5, 1.5), cut 2.5 - 1.4826
    assert mad.loc[5, "decision"] == "drop" and mad.loc[6, "decision"] == "keep"
    assert mad.loc[9, "decision"] == "flag"  # the flagged image's stale 0.1 stays out of the statistics
    cuts = {c["group"]["site"]: c for c in mad.attrs["cuts"]}
    assert cuts["b"]["cut"] == 2.5 - 1 * 1.4826 * 1.0 and cuts["b"]["units"] == 4 and cuts["b"]["dropped"] == 1
    assert cuts["a"]["cut"] is None and cuts["c"]["cut"] is None  # c: one value, MAD 0
    q = manifest(ds, rule="quantile:0.25", by="site").set_index("image")
    # a: n = 5 >= 4, quantile index 1 -> 2.0: the tie at 2 is kept (strictly below drops), 1 is dropped
    assert q.loc[0, "decision"] == "drop" and (q.loc[[1, 2, 3, 4], "decision"] == "keep").all()
    # b: n = 4 (the flagged image left out) >= 4, cut 1.75; c: one image < 4, nothing
    assert {c["group"]["site"]: c["cut"] for c in q.attrs["cuts"]} == {"a": 2.0, "b": 1.75, "c": None}
    assert q.loc[10, "reason"] == "no cut in group"
    q3 = manifest(ds, rule="quantile:0.3", by="site")  # 1/0.3 = 3.33: b's 4 units cut, c's 1 not
    assert [c["cut"] is None for c in q3.attrs["cuts"]] == [False, False, True]


def case_results():
    """Measured phantoms in cases of 3 slices (one case of 1), noise rising with the case, modality per case."""
    images, labels = [], []
    for i in range(19):
        p = make_phantom(1, (48, 48), lesions=2, radius=5, margin=6, dtype="uint16", seed=100 + i)
        noise = np.random.default_rng(i).normal(0, 2 + 4 * (i // 3), p.images[0].shape)
        images.append(np.clip(p.images[0] + noise, 0, 65535).astype(np.uint16))
        labels.append(p.labels[0])
    ds = gpucnr.measure(np.stack(images), np.stack(labels), backend="numpy")
    case = np.array([f"c{i // 3}" for i in range(19)], dtype=object)
    modality = np.array(["CT" if (i // 3) % 2 else "MR" for i in range(19)], dtype=object)
    return ds.assign_coords(case=("image", case), modality=("image", modality))


def test_case_level_rules_group_each_case_by_its_first_image():
    ds = case_results()
    pooled = gpucnr.aggregate(ds, by="case")
    names = pooled["case"].values.astype(str)
    cnr = pooled["cnr_median"].values.astype(float)
    usable = (pooled["n_valid"].values > 0) & ~np.isnan(cnr)
    first = {c: i for i, c in reversed(list(enumerate(ds["case"].values)))}
    group = np.array([ds["modality"].values[first[c]] for c in names])
    for rule in ("quantile:0.34", "mad:0.5"):
        m = manifest(ds, rule=rule, by="modality", level="case")
        check(m, cnr, usable, group, rule, ["case"])


def test_summarize_shows_where_each_rule_cuts_as_manifest_does():
    ds = messy(seed=5)
    s = summarize(ds, by="site", rules=("quantile:0.05", "mad:3", "abs:1"))
    assert list(s["rule"].values) == ["quantile:0.05", "mad:3", "abs:1"]
    assert s["rule_cut"].dims == ("level", "group", "rule") and s["rule_n_below"].dims == ("level", "group", "rule")
    for rule in s["rule"].values:
        m = manifest(ds, rule=str(rule), by="site", allow_incomplete=True)
        for entry in m.attrs["cuts"]:
            x = s.sel(level="image", group=f"site={entry['group']['site']}", rule=rule)
            cut = float(x["rule_cut"])
            assert (entry["cut"] is None and np.isnan(cut)) or entry["cut"] == cut
            assert int(x["rule_n_below"]) == entry["dropped"]
        whole = manifest(ds, rule=str(rule), allow_incomplete=True).attrs["cuts"][0]
        x = s.sel(level="image", group="all", rule=rule)
        assert int(x["rule_n_below"]) == whole["dropped"]
    assert s.attrs["rules"] == ["quantile:0.05", "mad:3", "abs:1"]


@pytest.mark.parametrize("bad", ["", "mad", "mad:", "mad:x", "median:3", "quantile:0", "quantile:1", "quantile:1.5",
                                 "mad:-1", "mad:inf", "abs:nan", "abs", 1.5, None, "quantile:nan"])
def test_malformed_rules_are_coded_errors_naming_the_forms(bad):
    with pytest.raises(RuleError, match=r"\[bad-rule\].*abs:T.*quantile:P.*mad:K") as e:
        parse_rule(bad)
    assert e.value.exit_code == 2


def test_rule_text_and_refusals():
    assert str(parse_rule(" MAD:3 ")) == "mad:3" and parse_rule("quantile:0.05") == Rule("quantile", 0.05)
    assert str(parse_rule("abs:-inf")) == "abs:-inf" and str(parse_rule("abs:1.5")) == "abs:1.5"
    ds = messy(seed=0, n=30)
    with pytest.raises(InputError, match="not both"):
        manifest(ds, threshold=1.0, rule="mad:3", allow_incomplete=True)
    with pytest.raises(InputError, match="per-image column"):
        manifest(ds, rule="mad:3", by="nope", allow_incomplete=True)
    with pytest.raises(RuleError):
        manifest(ds, rule="mad:three", allow_incomplete=True)
    with pytest.raises(RuleError):
        summarize(ds, rules=("abs:1", "quantile:2"))


def test_sidecar_records_the_rule_and_every_cut(tmp_path):
    ds = messy(seed=6, n=120)
    m = manifest(ds, rule="mad:3", by="modality", allow_incomplete=True)
    path = write_manifest(m, tmp_path / "keep.csv")
    side = json.loads((tmp_path / "keep.csv.json").read_text())
    assert side["rule"] == "mad:3" and side["by"] == ["modality"] and side["threshold"] is None
    assert [c["group"] for c in side["cuts"]] == [{"modality": v} for v in ("CT", "MR", "XR")]
    assert sum(c["dropped"] for c in side["cuts"]) == (m["decision"] == "drop").sum()
    _, meta = read_manifest(path)
    assert meta["cuts"] == side["cuts"]
    assert "modality" not in pd.read_csv(path).columns  # group values stay in the metadata


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gpucnr", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def measured_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    images, labels = [], []
    for i in range(24):
        p = make_phantom(1, (40, 40), lesions=1, radius=5, margin=6, dtype="uint16", seed=200 + i)
        noise = np.random.default_rng(i).normal(0, 3 + (i % 6) * 4, p.images[0].shape)
        images.append(np.clip(p.images[0] + noise, 0, 65535).astype(np.uint16))
        labels.append(p.labels[0])
    meta = pd.DataFrame({"modality": ["CT" if i % 2 else "MR" for i in range(24)]})
    gpucnr.write_stack(root / "s.zarr", images, labels=labels, meta=meta, shard=8)
    gpucnr.run(root / "s.zarr", root / "r.zarr", scheduler="synchronous", backend="numpy")
    return root


def test_cli_filter_mad_by_modality_end_to_end(measured_stack, tmp_path):
    out = tmp_path / "keep.csv"
    done = _cli("filter", measured_stack / "r.zarr", "--rule", "mad:3", "--by", "modality", "--out", out,
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rule mad:3: 2 group(s)" in done.stdout
    df, meta = read_manifest(out)
    assert meta["rule"] == "mad:3" and meta["by"] == ["modality"]
    ds = gpucnr.open_results(measured_stack / "r.zarr")
    want = manifest(ds, rule="mad:3", by="modality")
    pd.testing.assert_frame_equal(df, want, check_dtype=False)
    assert [c["group"] for c in meta["cuts"]] == [{"modality": "CT"}, {"modality": "MR"}]
    # the old --threshold still works and equals --rule abs:T
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _cli("filter", measured_stack / "r.zarr", "--threshold", "2", "--out", a, cwd=tmp_path).returncode == 0
    assert _cli("filter", measured_stack / "r.zarr", "--rule", "abs:2", "--out", b, cwd=tmp_path).returncode == 0
    pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b))


@pytest.mark.parametrize("args", [("--rule", "mad:three"), ("--rule", "quantile:5"), ("--rule", "median:3"),
                                  ("--threshold", "1", "--rule", "mad:3"), ("--rule", "mad:3", "--by", "nope")])
def test_cli_refuses_malformed_rules_with_exit_2(measured_stack, tmp_path, args, capsys):
    from gpucnr.cli import main

    out = tmp_path / "keep.csv"
    # NB: in process (main returns the exit status): the end-to-end test above runs the real subprocess
    assert main(["filter", str(measured_stack / "r.zarr"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpucnr: error [") and "Traceback" not in err and not out.exists()
    if "mad:3" not in args:
        assert "[bad-rule]" in err and "quantile:P" in err and "mad:K" in err


def test_cli_report_shows_rules_and_refuses_a_malformed_one(measured_stack, tmp_path, capsys):
    from gpucnr.cli import main

    bad = main(["report", str(measured_stack / "r.zarr"), str(tmp_path / "bad"), "--rule", "mad:x"])
    err = capsys.readouterr().err
    assert bad == 2 and "[bad-rule]" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    assert main(["report", str(measured_stack / "r.zarr"), str(tmp_path / "rep"), "--by", "modality", "--rule",
                 "mad:2", "--rule", "quantile:0.1", "--lowest", "0"]) == 0
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Where each rule cuts" in html and "mad:2" in html and "quantile:0.1" in html
    assert "mad:3" not in html  # the rules given replace the default ones


def test_patient_level_rules_group_each_patient_by_its_first_image():
    ds = messy(seed=7, n=240)
    rng = np.random.default_rng(7)
    patient = np.array([f"p{k:03d}" for k in rng.integers(0, 60, ds.sizes["image"])], dtype=object)
    ds = ds.assign_coords(patient_id=("image", patient))
    for rule in ("quantile:0.2", "mad:1"):
        m = manifest(ds, rule=rule, by="modality", level="patient", allow_incomplete=True)
        frame = pd.DataFrame({"patient": patient, "cnr": ds["cnr_median"].values, "n_valid": ds["n_valid"].values,
                              "modality": ds["modality"].values}).reset_index()
        ok = frame["n_valid"] > 0
        per = pd.DataFrame({
            "cnr": frame["cnr"].where(ok).groupby(frame["patient"]).median(),
            "usable": ok.groupby(frame["patient"]).any() & ~(frame["n_valid"] < 0).groupby(frame["patient"]).any(),
            # the group of a patient: the modality of its first image (smallest global index)
            "group": frame.sort_values("index").groupby("patient")["modality"].first(),
        })
        m = m.set_index("patient_id").loc[per.index].reset_index()
        check(m, per["cnr"].to_numpy(), per["usable"].to_numpy(), per["group"].to_numpy(), rule, ["patient_id"])


def test_cli_filter_says_when_a_group_has_no_cut(measured_stack, tmp_path, capsys):
    from gpucnr.cli import main

    # NB: 12 images per modality, fewer than 1/0.05 = 20: the quantile rule judges nothing, and must say so
    assert main(["filter", str(measured_stack / "r.zarr"), "--rule", "quantile:0.05", "--by", "modality",
                 "--out", str(tmp_path / "keep.csv")]) == 0
    assert "2 group(s), 0 with a unit dropped, 2 with no cut" in capsys.readouterr().out
