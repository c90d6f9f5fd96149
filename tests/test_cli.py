"""The `traindyn` command line and the demo it runs."""

import subprocess
import sys

import numpy as np
import pytest
from traindyn.dynamics import storage
from traindyn.dynamics.cli import build_parser, main


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
