"""``dynamics.predict``: a network's kernel prediction of its own training, and the lazy→rich gap.

The lazy limit (Lee et al. 2019, Thm 2.1; Jacot et al. 2018): a two-layer network in NTK
parameterisation, trained by full-batch gradient descent on ``F.mse_loss`` with a learning rate
of order one, follows the prediction from its step-0 NTK ever more closely as the width grows.
Measured here (200 steps, n = 16 train and 16 test points, k = 2 outputs, float64): the largest
deviation of the measured train/test loss curve from the prediction, relative to the initial
loss, averaged over six seeds, is 0.101, 0.074, 0.033, 0.0115 at widths 128, 512, 2048, 8192:
log-log slope −0.52, the ``1/√width`` of the lazy limit (the slow test).  The default test uses
three seeds and three widths (0.104, 0.076, 0.041; slope −0.33).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics import records, storage
from traindyn.dynamics.predict import (
    lazy_rich_gap,
    model_outputs,
    predict_from_checkpoint,
    predict_from_model,
)


class TwoLayer(nn.Module):
    """f(x) = α · W₂ tanh(W₁ x / √d) / √m, standard Gaussian weights (NTK parameterisation);
    α < 1 with learning rate ∝ 1/α² is the rich (small output scale) regime."""

    def __init__(self, d: int, width: int, k: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(width, d, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(k, width, generator=g, dtype=torch.float64))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w1.T / math.sqrt(self.w1.shape[1]))
        return self.scale * h @ self.w2.T / math.sqrt(self.w2.shape[1])


def task(n: int = 16, m: int = 16, d: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + m, d, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(2 * x[:, 0]), x[:, 1] * x[:, 2]], 1)
    return x[:n], y[:n], x[n:], y[n:]


def train(model: nn.Module, eta: float, steps: list[int], keep: bool = False):
    """Full-batch GD on F.mse_loss; losses (and copies of the model) at ``steps``."""
    xtr, ytr, xte, yte = task()
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    losses, models = {}, {}
    for s in range(max(steps) + 1):
        if s in steps:
            with torch.no_grad():
                losses[s] = (nn.functional.mse_loss(model(xtr), ytr).item(),
                             nn.functional.mse_loss(model(xte), yte).item())
            if keep:
                models[s] = copy.deepcopy(model)
        if s == max(steps):
            break
        opt.zero_grad()
        nn.functional.mse_loss(model(xtr), ytr).backward()
        opt.step()
    return losses, models


STEPS = [0, 5, 10, 20, 50, 100, 200]


def lazy_error(width: int, seed: int) -> float:
    xtr, ytr, xte, yte = task()
    model = TwoLayer(4, width, 2, seed=seed)
    pred = predict_from_model(model, xtr, ytr, STEPS, 1.0, x_test=xte, y_test=yte, loss="mse")
    losses, _ = train(model, 1.0, STEPS)
    measured = np.array([losses[s] for s in STEPS])
    predicted = np.stack([pred.train_loss.values, pred.test_loss.values], 1)
    return float((np.abs(measured - predicted) / measured[0]).max())


def _slope(widths, seeds):
    errors = np.array([[lazy_error(w, s) for s in seeds] for w in widths]).mean(1)
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    print(f"lazy limit: widths {widths}, max relative loss-curve error {errors.round(4)}, "
          f"log-log slope {slope:.2f}")
    return errors, slope


def test_step0_prediction_tracks_the_network_closer_as_width_grows():
    errors, slope = _slope([128, 512, 2048], seeds=(0, 1, 2))
    assert errors[-1] < 0.05, errors          # within 5 % of the initial loss at width 2048
    assert errors[-1] < errors[0] / 2, errors
    assert slope < -0.25, slope


@pytest.mark.slow
def test_step0_prediction_error_slope_over_four_widths():
    errors, slope = _slope([128, 512, 2048, 8192], seeds=tuple(range(6)))
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 0.02, errors
    assert -0.8 < slope < -0.35, slope


def test_prediction_aligns_with_measurement_and_leaves_the_model_untouched():
    xtr, ytr, xte, yte = task()
    model = TwoLayer(4, 64, 2)
    losses, _ = train(model, 0.5, [0, 30])           # a model in the middle of a run, at s = 30
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    grads = [p.grad.clone() for p in model.parameters()]   # the last step's gradients
    steps = [0, 10, 20, 30, 40, 60]
    measured = xr.Dataset(
        {"train_loss": ("step", np.arange(6.0), records.variable_attrs("train_loss"))},
        coords=records.step_coords(steps, 0.5), attrs={"source": "test"})
    later = measured.step.values[measured.step.values >= 30]
    pred = predict_from_model(model, xtr, ytr, later, 0.5, step=30, x_test=xte, y_test=yte,
                              loss="mse")
    records.validate(pred)
    a, b = xr.align(pred, measured)
    assert list(a.step.values) == [30, 40, 60]
    from traindyn.dynamics import plot

    ax = plot.compare(pred, measured, "train_loss")       # one call, shared time axis
    assert len(ax.lines) >= 1
    np.testing.assert_array_equal(a.time.values, b.time.values)
    # the prediction starts at the model's own outputs and loss
    np.testing.assert_allclose(pred.f_train.sel(step=30).values, model_outputs(model, xtr),
                               rtol=1e-12)
    assert float(pred.train_loss.sel(step=30)) == pytest.approx(losses[30][0], rel=1e-12)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_prediction_from_a_checkpoint_equals_the_live_model(tmp_path):
    xtr, ytr, xte, yte = task()
    model = TwoLayer(4, 32, 2, seed=3)
    train(model, 0.5, [0, 7])
    torch.save(model.state_dict(), tmp_path / "step7.pt")
    live = predict_from_model(model, xtr, ytr, [7, 20], 0.5, step=7, x_test=xte, y_test=yte,
                              loss="mse")
    saved = predict_from_checkpoint(tmp_path / "step7.pt", lambda: TwoLayer(4, 32, 2, seed=9),
                                    xtr, ytr, [7, 20], 0.5, x_test=xte, y_test=yte, loss="mse")
    assert saved.attrs["predicted_from_step"] == 7
    np.testing.assert_allclose(saved.f_test.values, live.f_test.values, rtol=1e-12)


def test_cross_entropy_prediction_follows_a_wide_network_for_a_few_steps():
    """CE, the default loss: a wide network's first steps follow its step-0 kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = TwoLayer(4, 4096, 3)
    pred = predict_from_model(model, x, labels, [0, 5, 20], 2.0)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), labels).item()
    assert pred.train_loss.values[-1] < pred.train_loss.values[0] - 0.1
    assert pred.train_loss.values[-1] == pytest.approx(final, rel=0.02)


def test_lazy_rich_gap_is_larger_for_a_rich_run(tmp_path):
    """Lazy: width 2048, output scale 1, η = 1.  Rich: width 128, output scale α = 0.05,
    η = 1/α² (small output scale, Chizat, Oyallon & Bach 2019).  Measured relative gap
    (mean over s): ≈ 0.04 lazy, ≈ 1 or more rich."""
    xtr, ytr, xte, yte = task()
    steps = [0, 10, 20, 40, 80, 160]
    gaps = {}
    for name, width, scale in (("lazy", 2048, 1.0), ("rich", 128, 0.05)):
        eta = 1.0 / scale**2
        _, models = train(TwoLayer(4, width, 2, scale=scale), eta, steps, keep=True)
        gaps[name] = lazy_rich_gap(models, xtr, ytr, eta, x_test=xte, y_test=yte, loss="mse")
    lazy, rich = (float(gaps[k].relative_gap_train.mean()) for k in ("lazy", "rich"))
    print(f"relative gap: lazy {lazy:.3f}, rich {rich:.3f}")
    assert lazy < 0.1
    assert rich > 5 * lazy
    assert list(gaps["rich"].step.values) == steps[:-1]
    np.testing.assert_array_equal(gaps["rich"].delta_steps.values, np.diff(steps))
    assert (np.abs(gaps["rich"].gap_test_loss) > np.abs(gaps["lazy"].gap_test_loss)).sum() >= 3

    # the same run from a checkpoint folder, with a fixed Δ, equals the in-memory models
    scale = 0.05
    _, models = train(TwoLayer(4, 128, 2, scale=scale), 1 / scale**2, steps, keep=True)
    for s, m in models.items():
        torch.save(m.state_dict(), tmp_path / f"step{s}.pt")
    from_disk = lazy_rich_gap(tmp_path, xtr, ytr, 1 / scale**2, delta=20,
                              model=lambda: TwoLayer(4, 128, 2, scale=scale), loss="mse")
    in_memory = lazy_rich_gap(models, xtr, ytr, 1 / scale**2, delta=20, loss="mse")
    assert list(from_disk.step.values) == [0, 20]           # s with s + 20 recorded
    xr.testing.assert_allclose(from_disk, in_memory)
    states = {s: m.state_dict() for s, m in models.items()}
    from_states = lazy_rich_gap(states, xtr, ytr, 1 / scale**2, delta=20, loss="mse",
                                model=TwoLayer(4, 128, 2, scale=scale, seed=5))
    xr.testing.assert_allclose(from_states, in_memory)


def test_cli_predict_from_a_checkpoint_and_the_gap(tmp_path, capsys):
    """``traindyn predict`` on a folder of digits-MLP checkpoints equals the library call."""
    from traindyn.dynamics.cli import main
    from traindyn.dynamics.recipes.digits import DigitsMLP, load_digits_split

    (tmp_path / "factory.py").write_text(
        "import torch\nfrom traindyn.dynamics.recipes.digits import DigitsMLP\n"
        "def make_model(width=16):\n    torch.manual_seed(0)\n"
        "    return DigitsMLP((width,))\n")
    torch.manual_seed(0)
    model = DigitsMLP((16,))
    xtr, ytr, xte, yte = load_digits_split()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for s in range(11):
        if s % 5 == 0:
            torch.save(model.state_dict(), folder / f"step{s}.pt")
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr[:30]), ytr[:30]).backward()
        opt.step()
    out = tmp_path / "pred.nc"
    code = main(["predict", str(folder), "--model", f"{tmp_path / 'factory.py'}:make_model",
                 "--from-step", "5", "--learning-rate", "0.1", "--n-train", "30",
                 "--n-test", "20", "--to", "10", "--points", "3", "--output", str(out)])
    assert code == 0, capsys.readouterr().err

    saved = storage.load(out)
    ref = predict_from_checkpoint(folder / "step5.pt",
                                  lambda: DigitsMLP((16,)).double(), xtr[:30], ytr[:30],
                                  [5, 8, 10], 0.1, x_test=xte[:20], y_test=yte[:20])
    np.testing.assert_allclose(saved.test_loss.values, ref.test_loss.values, rtol=1e-10)
    assert "train_loss" in capsys.readouterr().out
    gap = tmp_path / "gap.nc"
    assert main(["predict", str(folder), "--model", f"{tmp_path / 'factory.py'}:make_model",
                 "--learning-rate", "0.1", "--n-train", "30", "--n-test", "0", "--gap",
                 "--output", str(gap)]) == 0
    assert list(storage.load(gap).step.values) == [0, 5]
    assert main(["predict", str(folder), "--model", f"{tmp_path / 'factory.py'}:make_model",
                 "--from-step", "3", "--learning-rate", "0.1"]) == 2
