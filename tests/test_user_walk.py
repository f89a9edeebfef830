"""A new user's walk (README only) found these; each is a regression test."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

import gpucnr
from gpucnr.cli import main
from gpucnr.kernels import STATUS
from gpucnr.phantom import make_phantom


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    ph = make_phantom(24, (64, 64), lesions=1, radius=4, seed=2)
    stack = gpucnr.write_stack(root / "stack.zarr", ph.images, rois=ph.rois, shard=8)
    gpucnr.run(stack, root / "results.zarr", backend="numpy")
    return root


def _copy(run_dir, tmp_path):
    for name in ("stack.zarr", "results.zarr"):
        shutil.copytree(run_dir / name, tmp_path / name)
    return tmp_path / "stack.zarr", tmp_path / "results.zarr"


def _coded(capsys, argv, code):
    capsys.readouterr()
    assert main(argv) == code, argv
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_results_array_metadata_lost_is_results_damaged(run_dir, tmp_path, capsys, damage):
    stack, results = _copy(run_dir, tmp_path)
    meta = results / "cnr" / "zarr.json"
    if damage == "deleted":
        meta.unlink()
    else:
        meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(gpucnr.ResultsError, match="results-damaged") as err:
        gpucnr.open_results(results)
    assert "cnr" in str(err.value) and "new results folder" in str(err.value)
    assert "DAMAGED" in _coded(capsys, ["info", str(results)], 3).out
    err = _coded(capsys, ["filter", str(results), "--out", str(tmp_path / "k.csv")], 2).err
    assert err.startswith("gpucnr: error [results-damaged]")
    assert _coded(capsys, ["run", str(stack), str(results), "--resume"], 2).err.startswith(
        "gpucnr: error [results-damaged]")


def test_a_scheduler_typo_is_refused_before_anything_is_written(run_dir, tmp_path, capsys):
    err = _coded(capsys, ["run", str(run_dir / "stack.zarr"), str(tmp_path / "r.zarr"), "--scheduler", "bogus"], 2).err
    assert "[bad-input] cannot reach a Dask scheduler at 'bogus'" in err
    assert not (tmp_path / "r.zarr").exists()


def test_a_scheduler_that_cannot_be_reached_is_not_left_as_the_default_client(run_dir, tmp_path, capsys):
    """A client that failed to connect stayed registered as the process's default until the garbage collector found
    it; any later Dask compute in the process (a notebook's, the next test's) waited on it forever."""
    import gc

    distributed = pytest.importorskip("distributed")
    gc.disable()  # NB: what left it there was the collector not having run yet
    try:
        _coded(capsys, ["run", str(run_dir / "stack.zarr"), str(tmp_path / "r.zarr"), "--scheduler", "bogus"], 2)
        with pytest.raises(ValueError):
            distributed.default_client()
    finally:
        gc.enable()


def test_damage_messages_give_the_exact_resume_command(run_dir, tmp_path, capsys):
    stack, results = _copy(run_dir, tmp_path)
    shard = next(p for p in (results / "cnr_median" / "c").rglob("*") if p.is_file())
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    err = _coded(capsys, ["filter", str(results), "--out", str(tmp_path / "k.csv")], 2).err
    assert f"gpucnr run {stack} {results} --resume" in err


def test_demo_never_replaces_an_ingested_stack(run_dir, tmp_path, capsys):
    stack, _ = _copy(run_dir, tmp_path)
    (tmp_path / "stack.zarr.linkage.csv").write_text("index,frame,source\n")
    err = _coded(capsys, ["demo", "--out", str(tmp_path), "-n", "4", "--size", "64"], 2).err
    assert "[output-exists]" in err and "ingested stack" in err
    assert gpucnr.open_stack(stack).n_images == 24


def test_info_verify_reads_every_stack_chunk(run_dir, tmp_path, capsys):
    stack, _ = _copy(run_dir, tmp_path)
    assert "0 damaged" in _coded(capsys, ["info", str(stack), "--verify"], 0).out
    shard = next(p for p in (stack / "buckets" / "64x64-uint16" / "images" / "c").rglob("*") if p.is_file())
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0xFF
    shard.write_bytes(bytes(raw))
    out = _coded(capsys, ["info", str(stack), "--verify"], 3).out
    assert "1 damaged" in out and "corrupt-chunk" in out


def test_a_journal_beside_a_stack_is_an_interrupted_ingest(run_dir, tmp_path, capsys):
    stack, _ = _copy(run_dir, tmp_path)
    (tmp_path / "stack.zarr.journal").write_text('{"command": "gpucnr ingest SRC stack.zarr --resume"}\n')
    assert "interrupted ingest" in _coded(capsys, ["info", str(stack)], 2).out
    err = _coded(capsys, ["run", str(stack), str(tmp_path / "r2.zarr")], 2).err
    assert "[stack-incomplete]" in err and "--resume" in err


def test_failed_images_are_failed_in_the_manifest_and_a_problem_for_info(run_dir, tmp_path, capsys):
    ds = gpucnr.open_results(run_dir / "results.zarr").load()
    status = ds["status"].values.copy()
    status[3] = STATUS["failed"]
    n_valid = ds["n_valid"].values.copy()
    n_valid[3] = 0
    broken = ds.assign(status=(("image", "roi"), status), n_valid=(("image",), n_valid))
    df = gpucnr.manifest(broken, threshold=1.5)
    assert df.set_index("image").loc[3, "reason"] == "failed"
    _, results = _copy(run_dir, tmp_path)
    group = zarr.open_group(str(results), mode="r+")
    group.attrs["failures"] = [{"image": 3, "code": "corrupt-chunk", "reason": "test"}]
    assert "failed images: 1 (a problem" in _coded(capsys, ["info", str(results)], 3).out


def test_ingest_walks_past_stores_and_side_files_and_keeps_nothing_of_an_empty_folder(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _coded(capsys, ["ingest", str(src), str(tmp_path / "e.zarr")], 2)
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "e.zarr.key").exists()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(src / f"img{k}.png")
    _coded(capsys, ["ingest", str(src), str(src / "inside.zarr")], 0)
    assert (src / "inside.zarr.linkage.csv").exists()
    out = _coded(capsys, ["ingest", str(src), str(tmp_path / "other.zarr")], 0).out
    assert gpucnr.open_stack(tmp_path / "other.zarr").n_images == 3
    assert "3 file(s) in" in out


def test_a_12_bit_jpeg_extended_file_without_its_decoder_is_an_unsupported_transfer_syntax(tmp_path, monkeypatch):
    """A plain install decodes JPEG extended with Pillow, 8-bit only: pydicom's 12-bit JPEG-lossy.dcm is skipped
    as unsupported-transfer-syntax (pointing to the jpeg-gpl extra), not as a decode-error."""
    import pydicom.pixels
    from pydicom.data import get_testdata_file

    from gpucnr.sources import dicom

    real = pydicom.pixels.get_decoder

    class PillowOnly:
        def __init__(self, decoder):
            self.is_available, self.available_plugins = decoder.is_available, ("pillow",)

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: PillowOnly(real(ts)))
    with pytest.raises(dicom.Skip) as skip:
        dicom.scan(get_testdata_file("JPEG-lossy.dcm"), b"k" * 32, 2**30)
    assert skip.value.code == "unsupported-transfer-syntax" and "jpeg-gpl" in str(skip.value)


# --- the walk of 2026-12-05 ----------------------------------------------------------------------------------
def test_by_a_column_the_run_did_not_keep_says_how_to_keep_it(run_dir, tmp_path, capsys):
    """`filter --by site` where `site` is the stack's but the run did not keep it: the error names
    `--group-columns` (it only listed the results' columns)."""
    results = run_dir / "results.zarr"
    err = _coded(capsys, ["filter", str(results), "--by", "site", "--rule", "mad:3", "--out",
                          str(tmp_path / "m.csv")], 2).err
    assert "by='site' is not a per-image column" in err and "--group-columns NAME" in err
    with pytest.raises(gpucnr.InputError, match="--group-columns NAME"):
        gpucnr.summarize(results, by="site")


def test_enhance_of_results_moved_from_their_stack_names_the_stack_option(run_dir, tmp_path, capsys):
    shutil.copytree(run_dir / "results.zarr", tmp_path / "results.zarr")
    err = _coded(capsys, ["enhance", str(tmp_path / "results.zarr"), "--out", str(tmp_path / "e")], 2).err
    assert "is not where they record it" in err and "--stack STACK.zarr" in err
    assert not (tmp_path / "e").exists()


def test_enhance_that_chooses_nothing_says_nothing_was_written(run_dir, tmp_path, capsys):
    out = _coded(capsys, ["enhance", str(run_dir / "results.zarr"), "--threshold", "0.001", "--out",
                          str(tmp_path / "e"), "--backend", "numpy"], 0).out
    assert out.startswith(f"no image below 0.001: nothing was enhanced and nothing written to {tmp_path / 'e'}")
    assert not (tmp_path / "e").exists()


def test_a_ddof_the_definition_would_replace_is_refused(run_dir, tmp_path, capsys):
    """`--ddof 2 --definition viqa` was recorded as ddof 0 without a word: refused; the definition's own ddof, or
    none, is accepted."""
    argv = ["run", str(run_dir / "stack.zarr"), str(tmp_path / "r.zarr"), "--backend", "numpy", "--definition", "viqa"]
    err = _coded(capsys, [*argv, "--ddof", "2"], 2).err
    assert "[bad-option] --definition viqa measures with ddof 0" in err and not (tmp_path / "r.zarr").exists()
    _coded(capsys, [*argv, "--ddof", "0"], 0)
    assert gpucnr.open_results(tmp_path / "r.zarr").attrs["ddof"] == 0


def test_gcnr_has_no_sign_and_no_cnr_cut(run_dir, tmp_path, capsys):
    with pytest.raises(gpucnr.InputError, match="no sign"):
        gpucnr.measure(make_phantom(1, (64, 64), lesions=1, radius=4).images, np.zeros((1, 64, 64), np.int32),
                       definition="gcnr", signed=True)
    out = _coded(capsys, ["run", str(run_dir / "stack.zarr"), str(tmp_path / "g.zarr"), "--backend", "numpy",
                          "--definition", "gcnr"], 0).out
    assert "gCNR lies in [0, 1]" in out and "below 1.5" not in out


def test_a_run_where_no_image_has_a_valid_roi_is_a_problem(tmp_path, capsys):
    """Every image flagged (here: ROIs far outside the images) was exit 0 with a count line: now exit 3 and a
    line on stderr saying so and where to look."""
    ph = make_phantom(4, (64, 64), lesions=1, radius=4, seed=1)
    stack = gpucnr.write_stack(tmp_path / "s.zarr", ph.images, rois=ph.rois.assign(cx=500, cy=500))
    err = _coded(capsys, ["run", str(stack.path), str(tmp_path / "r.zarr"), "--backend", "numpy"], 3).err
    assert "none of the 4 image(s) has a valid ROI" in err


def test_resume_into_a_missing_results_folder_says_it_starts_anew(run_dir, tmp_path, capsys):
    captured = _coded(capsys, ["run", str(run_dir / "stack.zarr"), str(tmp_path / "typo.zarr"), "--resume",
                               "--backend", "numpy"], 0)
    assert captured.err.startswith(f"gpucnr: warning: {tmp_path / 'typo.zarr'} does not exist: --resume starts new")
    assert gpucnr.open_results(tmp_path / "typo.zarr")["committed"].values.all()


def test_report_says_on_stderr_when_it_draws_no_figure(run_dir, tmp_path, capsys):
    """A report of results whose stack was replaced (or moved away) said so only inside the HTML (or in a log line
    of another format): one `gpucnr: warning:` line now, exit 0 (the report is written)."""
    shutil.copytree(run_dir / "results.zarr", tmp_path / "results.zarr")
    other = make_phantom(3, (64, 64), lesions=1, radius=4, seed=9)
    gpucnr.write_stack(tmp_path / "stack.zarr", other.images, rois=other.rois)
    err = _coded(capsys, ["report", str(tmp_path / "results.zarr"), str(tmp_path / "rep")], 0).err
    assert err.startswith("gpucnr: warning: The stack was found") and "fingerprint differs" in err, err
    shutil.rmtree(tmp_path / "stack.zarr")
    err = _coded(capsys, ["report", str(tmp_path / "results.zarr"), str(tmp_path / "rep2")], 0).err
    assert err.startswith("gpucnr: warning: The stack was not found") and "--stack" in err, err


def test_filter_says_each_decision_warning_once_and_exits_0(run_dir, tmp_path, capsys):
    # NB: manifest warns itself now (the Python API too); the CLI must not say it a second time
    out = _coded(capsys, ["filter", str(run_dir / "results.zarr"), "--threshold", "1e9", "--out",
                          str(tmp_path / "k.csv")], 0)
    assert out.err.count("drops all 24 image(s) it judged") == 1, out.err
    assert out.err.startswith("gpucnr: warning: rule abs:1000000000 drops all 24 image(s) it judged: nothing is left")
    # a mad cut far below 0 (K huge) on an unsigned CNR: the rule cannot drop anything, and says so
    out = _coded(capsys, ["filter", str(run_dir / "results.zarr"), "--rule", "mad:1000", "--out",
                          str(tmp_path / "m.csv")], 0)
    assert out.err.count("gpucnr: warning: rule mad:1000 drops nothing in the one group: every cut") == 1, out.err
    assert "which an unsigned CNR never is, so this rule cannot drop anything here" in out.err
    assert set(pd.read_csv(tmp_path / "m.csv")["reason"]) == {"cnr at or above its group's cut (mad:1000)"}


def test_ingest_meta_codes_of_6_digits_are_refused_at_run_with_the_way_out(tmp_path, capsys):
    # NB: ingest stores --meta values as they are; the run that groups by the column screens them (DESIGN §10)
    (tmp_path / "raw").mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 40 * i + 10, np.uint8)).save(tmp_path / "raw" / f"{i}.png")
    (tmp_path / "meta.csv").write_text("source,site\n0.png,100042\n1.png,100043\n")
    _coded(capsys, ["ingest", str(tmp_path / "raw"), str(tmp_path / "s.zarr"), "--meta", str(tmp_path / "meta.csv"),
                    "--workers", "1"], 0)
    err = _coded(capsys, ["run", str(tmp_path / "s.zarr"), str(tmp_path / "r.zarr"), "--group-columns", "site",
                          "--backend", "numpy"], 2).err
    assert err.startswith("gpucnr: error [identifying-column]") and "recode them without 6 digits in a row" in err
    assert "100042" not in err


def test_a_by_typo_lists_the_same_groupable_columns_in_filter_and_report(run_dir, tmp_path, capsys):
    # NB: filter listed the run's outputs (cnr_median, n_valid, n_excluded) as columns, report the image index
    results = str(run_dir / "results.zarr")
    said = []
    for argv in (["filter", results, "--by", "buckett", "--out", str(tmp_path / "k.csv")],
                 ["report", results, str(tmp_path / "rep"), "--by", "buckett"]):
        err = _coded(capsys, argv, 2).err
        assert err.startswith("gpucnr: error [bad-input] by='buckett' is not a per-image column of the results; "
                              "did you mean 'bucket'? Columns to group by: "), err
        said.append(err.split("Columns to group by: ")[1].split(";")[0].split(", "))
    assert said[0] == said[1] and "bucket" in said[0], said
    assert not {"image", "cnr_median", "n_valid", "n_excluded"} & set(said[0]), said


def test_run_says_where_the_results_are_and_how_a_batch_in_images_was_rounded(run_dir, tmp_path, capsys):
    """A walk on 100,000 images: `--batch 64i` became 1,024 images per batch without a word, and the run's summary
    said neither where the results went nor how long it took."""
    out = _coded(capsys, ["run", str(run_dir / "stack.zarr"), str(tmp_path / "r.zarr"), "--batch", "3i"], 0).out
    assert "(--batch 3i rounded to whole shards: 8 images per batch)" in out
    assert f"results in {tmp_path / 'r.zarr'} (" in out and f"gpucnr filter {tmp_path / 'r.zarr'} --out" in out
    out = _coded(capsys, ["run", str(run_dir / "stack.zarr"), str(tmp_path / "r2.zarr"), "--batch", "16i"], 0).out
    assert "rounded to whole shards" not in out  # NB: 16 images are two whole shards of 8
