"""The `traindyn` command line and the demo it runs."""

import subprocess
import sys

import numpy as np
import pytest
from traindyn.dynamics import storage
from traindyn.dynamics.cli import build_parser, main

from tests.helpers import child_env


def test_help_explains_every_subcommand(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "analyze", "theory", "info"):
        assert command in text
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--help"])
    assert "RankMe" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "traindyn.dynamics.cli", "info"],
                         capture_output=True, text=True, check=True).stdout
    assert "rankme" in out and "alpha_req" in out


def test_theory_linear_writes_a_dataset(tmp_path):
    path = tmp_path / "as.nc"
    assert main(["theory", "linear", "--load-ratio", "2", "--t-max", "1e4", "--points", "5",
                 "--out", str(path)]) == 0
    ds = storage.load(path)
    # at t = 1e4 the test error has reached σ²α/(α−1) = 0.25·2 = 0.5 (hand formula)
    np.testing.assert_allclose(ds.test_error.isel(time=-1).values, 0.5, rtol=1e-6)


def test_quick_demo_writes_results_and_figures(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--threads", "1", "--out",
                 str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "with 1 torch thread " in printed
    for name in ("digits.nc", "linear_teacher.nc", "linear_theory.nc", "digits_geometry.png",
                 "linear_teacher.png"):
        assert (tmp_path / name).exists(), name
        assert name in printed
    digits = storage.load(tmp_path / "digits.nc")
    assert digits.sizes["seed"] == 2 and set(digits.layer.values) == {"net.1", "net.3"}
    # the MLP learned: chance is 0.1
    assert float(digits.test_accuracy.isel(step=-1).mean()) > 0.8
    # RankMe is bounded by the layer width and at least 1
    assert np.all((digits.rankme >= 1) & (digits.rankme <= 128))
    theory_ds = storage.load(tmp_path / "linear_theory.nc")
    measured = storage.load(tmp_path / "linear_teacher.nc")
    np.testing.assert_array_equal(theory_ds.step.values, measured.step.values)


def test_analyze_steps_pair_with_paths_in_argument_order(tmp_path, capsys):
    import torch

    for step in (2, 10):
        torch.save({"w": torch.zeros(2)}, tmp_path / f"step{step}.pt")
    args = ["analyze", str(tmp_path / "step10.pt"), str(tmp_path / "step2.pt"),
            "--model", "torch.nn:Identity", "--layers", "x", "--no-progress", "--no-figures"]
    # 2,10 against step10.pt, step2.pt (argument order) contradicts both names: usage error
    assert main([*args, "--steps", "2,10"]) == 2
    err = capsys.readouterr().err
    assert "explicit step 2 for step10.pt" in err and "its name says step 10" in err
    assert "--force-steps" in err


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("name", ["mine.zarr", "mine.nc"])
def test_theory_out_never_replaces_what_it_did_not_write(tmp_path, capsys, name):
    path = tmp_path / name
    if name.endswith(".zarr"):
        (path / "sub").mkdir(parents=True)
        (path / "notes.txt").write_text("my notes")
        (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    else:
        path.write_text("not traindyn's")
    before = _tree(tmp_path)
    args = ["theory", "linear", "--load-ratio", "2", "--points", "3", "--out", str(path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and "--overwrite" in err and "did not write" in err
    assert _tree(tmp_path) == before                       # every file intact
    # its own earlier output is replaced: 3 points, then 5
    own = tmp_path / ("own" + path.suffix)
    for points in ("3", "5"):
        assert main([*args[:4], "--points", points, "--out", str(own)]) == 0
    assert storage.load(own).sizes["time"] == 5
    assert storage.load(own).attrs[storage.OUTPUT_ATTR] == "theory"
    # --overwrite replaces the user's path: the theory's hand value is there
    assert main([*args, "--overwrite", "--t-max", "1e4"]) == 0
    np.testing.assert_allclose(storage.load(path).test_error.isel(time=-1).values, 0.5,
                               rtol=1e-6)


@pytest.mark.parametrize("bad, words", [
    (["--load-ratio", "-1"], "load_ratio"),
    (["--t-min", "0"], "--t-min"),
    (["--t-min", "10", "--t-max", "1"], "--t-min"),
    (["--points", "0"], "--points"),
    (["--points", "-3"], "--points"),
    (["--noise-var", "-1"], "noise_var"),
    (["--out", "result.csv"], ".nc"),
])
def test_theory_errors_are_one_line_and_exit_2(tmp_path, capsys, bad, words):
    assert main(["theory", "linear", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("traindyn theory linear: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err


def test_theory_error_from_the_console_has_no_traceback(tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = subprocess.run([sys.executable, "-m", "traindyn.dynamics.cli", "theory", "linear",
                          "--out", str(tmp_path / "a_file" / "x.nc")], capture_output=True,
                         text=True, cwd=tmp_path, env=child_env())
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "a_file" in out.stderr
