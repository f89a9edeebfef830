"""Issue 13: errors that suggest the next step."""

from __future__ import annotations

import numpy as np
import pytest

import gpucnr
import gpucnr.backend
from gpucnr.cli import main
from gpucnr.phantom import make_phantom


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("guide")
    ph = make_phantom(4, (64, 64), lesions=1, seed=2)
    gpucnr.write_stack(root / "s.zarr", ph.images, rois=ph.rois, shard=2)
    gpucnr.run(root / "s.zarr", root / "r.zarr", backend="numpy", scheduler="synchronous")
    other = make_phantom(4, (64, 64), lesions=1, seed=3)
    gpucnr.write_stack(root / "other.zarr", other.images, rois=other.rois, shard=2)
    (root / "raw").mkdir()
    (root / "raw" / "a.dcm").write_bytes(b"\0" * 200)
    return root


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "{w}/raw", "{w}/x.zarr"], "`gpucnr ingest {w}/raw STACK.zarr`"),
    (["run", "{w}/r.zarr", "{w}/x.zarr"], "are gpucnr results, not a stack"),
    (["run", "{w}/nothing.zarr", "{w}/x.zarr"], "does not exist"),
    (["run", "{w}/s.zarr", "{w}/r.zarr"], "{w}/r.zarr exists; the same command with --resume continues it"),
    # NB: a --resume that would be refused is not advised
    (["run", "{w}/s.zarr", "{w}/r.zarr", "--ddof", "0"], "{w}/r.zarr exists, computed with other parameters: ddof=1 "
     "(now 0); choose another results path, or remove it (or resume with the parameters they were computed with)"),
    (["run", "{w}/other.zarr", "{w}/r.zarr"], "{w}/r.zarr exists, computed from another stack: choose another "
     "results path, or remove it"),
    (["run", "{w}/s.zarr", "{w}/raw"], "{w}/raw exists and is not gpucnr results: choose another results path"),
])
def test_run_says_what_to_do_next(world, capsys, argv, expected):
    assert main([a.format(w=world) for a in argv]) == 2
    err = capsys.readouterr().err
    assert expected.format(w=world) in err and len(err.strip().splitlines()) == 1, err
    assert "resume=True (" not in err


def test_cupy_without_a_gpu_names_the_extra(world, capsys, monkeypatch):
    monkeypatch.setattr(gpucnr.backend, "cupy_available", lambda: False)
    assert main(["run", str(world / "s.zarr"), str(world / "y.zarr"), "--backend", "cupy"]) == 2
    err = capsys.readouterr().err
    assert "cuda12" in err and "--backend numpy" in err


def test_measure_of_images_of_many_sizes_points_to_a_stack():
    with pytest.raises(gpucnr.InputError, match="write_stack") as info:
        gpucnr.measure([np.zeros((10, 10), np.uint16), np.zeros((12, 10), np.uint16)],
                       np.zeros((2, 10, 10), np.int32))
    assert "(10, 10), (12, 10)" in str(info.value) and "gpucnr.run" in str(info.value)


def test_ingest_and_run_draw_one_kind_of_progress_bar(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "raw").mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / "raw" / f"{i}.png")
    assert main(["ingest", str(tmp_path / "raw"), str(tmp_path / "s.zarr"), "--workers", "1", "--progress"]) == 0
    err = capsys.readouterr().err
    # NB: tqdm's bar: count of the total, [elapsed<left, rate]
    assert "scan: 100%" in err and "decode: 100%" in err and "3/3 [" in err, err
    assert "file/s]" in err or "s/file]" in err, err  # NB: the rate, whichever way round tqdm shows it


def test_resume_mismatch_says_what_continues_them(world, tmp_path, capsys):
    """--resume with other parameters names them and says what continues the results (which then works); with
    another stack, it says to run into a new folder or resume with the stack they came from."""
    import shutil

    results = tmp_path / "r.zarr"
    shutil.copytree(world / "r.zarr", results)
    shutil.copytree(world / "s.zarr", tmp_path / "s.zarr")  # NB: results name their stack relative to themselves
    assert main(["run", str(tmp_path / "s.zarr"), str(results), "--resume", "--ddof", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpucnr: error [resume-mismatch]") and "ddof=1 (now 0)" in err, err
    assert err.rstrip().endswith("; resume with the parameters they were computed with, or run into a new results "
                                 "folder"), err
    assert main(["run", str(tmp_path / "s.zarr"), str(results), "--resume", "--ddof", "1"]) == 0
    capsys.readouterr()

    assert main(["run", str(world / "other.zarr"), str(results), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was computed from a different stack" in err and "run this stack into a new results folder" in err, err


def test_a_signal_after_the_run_is_complete_says_so(world, tmp_path, monkeypatch, capsys):
    """SIGTERM once the last batch is committed (while the results are opened for the summary): exit 143, and the
    line says the run is complete, not that something is left to continue."""
    from gpucnr import results
    from gpucnr.errors import Terminated

    def stop(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(results, "open_results", stop)
    out = tmp_path / "r.zarr"
    assert main(["run", str(world / "s.zarr"), str(out), "--backend", "numpy", "--scheduler", "synchronous"]) == 143
    err = capsys.readouterr().err
    assert err == (f"gpucnr: interrupted (SIGTERM): the run was complete: `gpucnr info {out}` shows its summary "
                   "(nothing to resume)\n"), err
    monkeypatch.undo()
    assert gpucnr.open_results(out).committed.all()


def test_resume_command_names_the_rois_table(tmp_path, capsys):
    """Results measured with --rois TABLE.csv: the resume command a message prints gives the table again (the
    results keep its fingerprint, not its rows), and that command completes them; a table given in memory gets a
    placeholder, as it has no path."""
    import shlex

    import numpy as np

    from gpucnr.results import resume_command, uncommit

    ph = make_phantom(8, (64, 64), lesions=1, seed=2)
    gpucnr.write_stack(tmp_path / "s.zarr", ph.images, shard=2)  # NB: no table of its own, no labels
    (tmp_path / "my tables").mkdir()
    table = tmp_path / "my tables" / "rois.csv"
    ph.rois.to_csv(table, index=False)
    results = tmp_path / "r.zarr"
    assert main(["run", str(tmp_path / "s.zarr"), str(results), "--rois", str(table), "--batch", "2",
                 "--backend", "numpy", "--scheduler", "synchronous"]) == 0
    committed = gpucnr.open_results(results).committed.to_numpy().astype(np.int8)
    committed[1] = 0
    uncommit(results, committed, [1])  # NB: as a run interrupted before batch 1 was committed leaves them
    capsys.readouterr()
    assert main(["filter", str(results), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert "[results-incomplete]" in err and f"--rois {shlex.quote(str(table))}" in err, err
    argv = shlex.split(err.split("`")[1])[1:]
    assert main(argv) == 0
    assert gpucnr.open_results(results).committed.to_numpy().all()

    gpucnr.run(tmp_path / "s.zarr", tmp_path / "m.zarr", rois=ph.rois, backend="numpy", scheduler="synchronous")
    attrs = dict(gpucnr.open_results(tmp_path / "m.zarr").attrs)
    assert " --rois ROIS.csv" in resume_command(attrs, tmp_path / "m.zarr")
    attrs = dict(gpucnr.open_results(results).attrs)
    assert " --rois" not in resume_command({k: v for k, v in attrs.items() if k != "rois_table"}, results)


def test_a_run_stopped_while_creating_its_results_leaves_none(world, tmp_path, monkeypatch, capsys):
    """SIGTERM while the results' template is written: exit 143, a line that says nothing was written, and no
    results folder (half a template would be neither new nor gpucnr results, and every command would refuse it);
    the same command then runs. What a killed run left beside it is removed."""
    from gpucnr import results
    from gpucnr.errors import Terminated

    out = tmp_path / "my results.zarr"
    killed = tmp_path / f".{out.name}.0123abcd{gpucnr.shardfiles.TEMP_SUFFIX}"
    (killed / "image").mkdir(parents=True)  # NB: as `kill -9` during the template leaves it
    argv = ["run", str(world / "s.zarr"), str(out), "--backend", "numpy", "--scheduler", "synchronous"]
    coord = results._coord
    calls = []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Terminated()
        return coord(*args, **kwargs)

    monkeypatch.setattr(results, "_coord", stop)
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert err == ("gpucnr: interrupted (SIGTERM): stopped before any result was written; run the same command "
                   "again\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    monkeypatch.undo()
    assert main(argv) == 0
    # NB: the next step, pasted as printed, works for a path with a space
    line = capsys.readouterr().out.splitlines()[-1]
    assert f"`gpucnr filter '{out}' --out keep.csv`" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
