"""Invariance, equivariance and Lie derivatives against exact symmetries and hand-worked values."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.probes import invariance as inv

from tests import _tiny_models as tiny
from tests._tiny_models import circular_cnn

N = 16
F64 = torch.float64


def mlp(seed: int = 0, n_in: int = N) -> nn.Module:
    """Flat → Linear(n_in, 32) → Tanh → Linear(32, 3), float64: no symmetry built in."""
    return tiny.mlp(n_in, 32, 3, act="tanh", flatten=True, seed=seed, double=True)


def signals(n: int = 200, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, N, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------- transformations
def test_transformations_match_exact_references():
    x = torch.randn(3, 8, 8, dtype=F64)
    assert torch.equal(inv.rotate(x, 0.0), x)
    torch.testing.assert_close(inv.rotate(x, math.pi / 2), torch.rot90(x, 1, (-2, -1)),
                               atol=1e-13, rtol=0)
    y = torch.randn(4, 9, dtype=F64)
    torch.testing.assert_close(inv.translate(y, 2.0), inv.cyclic_shift(y, 2), atol=1e-13,
                               rtol=0)
    torch.testing.assert_close(inv.translate(inv.translate(y, 0.3), 0.45), inv.translate(y, 0.75),
                               atol=1e-13, rtol=0)  # odd length: an exact group action
    # a sampled cosine moves by exactly t samples under the band-limited translation
    m = torch.arange(N, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * 3 * m / N)
    torch.testing.assert_close(inv.translate(wave, 0.4), torch.cos(2 * math.pi * 3 * (m - 0.4) / N),
                               atol=1e-13, rtol=0)
    assert torch.equal(inv.permute(y, [1, 0, *range(2, 9)])[:, 0], y[:, 1])
    assert torch.equal(inv.flip(inv.flip(y, True), True), y)
    noisy = inv.add_noise(y, 0.5, seed=3) - y
    torch.testing.assert_close(inv.add_noise(y, 1.0, seed=3) - y, 2 * noisy)
    with pytest.raises(ValueError, match="permutation"):
        inv.permute(y, [0, 0, 1, 2, 3, 4, 5, 6, 7])


# ----------------------------------------------------------------- scores of features
def test_invariance_distance_equals_numpy_formula():
    rng = np.random.default_rng(0)
    fx, fgx = rng.standard_normal((30, 5)), rng.standard_normal((30, 5))
    num = np.linalg.norm(fgx - fx, axis=1).mean()
    pair = np.linalg.norm(fx[:, None] - fx[None], axis=-1)
    den = pair.sum() / (30 * 29)
    assert inv.invariance_distance(fx, fgx) == pytest.approx(num / den, rel=1e-12)


def test_equivariance_error_zero_for_linear_action_and_near_one_for_unrelated():
    rng = np.random.default_rng(1)
    fx = rng.standard_normal((400, 10))
    rho = rng.standard_normal((10, 10))
    assert inv.equivariance_error(fx, fx @ rho.T + 2.0, ridge=0.0) < 1e-20
    err = inv.equivariance_error(fx, rng.standard_normal((400, 10)))
    assert 0.9 < err < 1.2  # nothing linear to fit: held-out residual ≈ variance (+ fit noise)


def test_bad_feature_input():
    fx = np.random.default_rng(2).standard_normal((10, 3))
    with pytest.raises(ValueError, match="same shape"):
        inv.invariance_distance(fx, fx[:9])
    with pytest.warns(RuntimeWarning, match="constant"):
        assert np.isnan(inv.invariance_distance(np.ones((10, 3)), fx))
    bad = fx.copy()
    bad[0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert np.isnan(inv.invariance_distance(fx, bad))
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert np.isnan(inv.equivariance_error(fx, bad))
    with pytest.warns(RuntimeWarning, match="constant"):
        assert np.isnan(inv.equivariance_error(fx, np.ones((10, 3))))
    with pytest.raises(ValueError, match="convention"):
        inv.lie_derivative_error(fx, "l1")


# ----------------------------------------------------------------- exact symmetries of models
def test_circular_cnn_with_global_pooling_is_shift_invariant_and_mlp_is_not():
    x = signals()
    shifts = (inv.cyclic_shift, [1, 3, 8])
    cnn = inv.invariance_scores(circular_cnn(), x, shifts, layers=["1", "3", "4", "5"],
                                dim="shift")
    assert cnn.invariance_distance.dims == ("shift", "layer")
    # pooled and output layers: invariant to round-off
    assert float(cnn.invariance_distance.sel(layer=["4", "5"]).max()) < 1e-14
    np.testing.assert_allclose(cnn.invariance_cka.sel(layer="5"), 1.0, atol=1e-12)
    # convolutional feature maps move (equivariant, not invariant), by a permutation:
    assert float(cnn.invariance_distance.sel(layer="3").min()) > 0.1
    assert float(cnn.equivariance_error.sel(layer=["1", "3"]).max()) < 1e-3  # ridge bias only
    exact = inv.invariance_scores(circular_cnn(), x, shifts, layers=["3"], ridge=1e-12)
    assert float(exact.equivariance_error.max()) < 1e-12
    dense = inv.invariance_scores(mlp(), x, shifts, layers=["3"], dim="shift")
    assert float(dense.invariance_distance.min()) > 0.1


def test_group_averaged_model_is_invariant_to_round_off():
    x = signals(50)
    averaged = inv.GroupAveraged(mlp(), inv.cyclic_shift_group(N))
    base = averaged(x)
    for k in (1, 5, 11):
        torch.testing.assert_close(averaged(inv.cyclic_shift(x, k)), base, atol=1e-14, rtol=0)
    ds = inv.invariance_scores(averaged, x, (inv.cyclic_shift, [2, 7]))
    assert float(ds.invariance_distance.max()) < 1e-14
    images = torch.randn(20, 1, 6, 6, dtype=F64)
    rot_avg = inv.GroupAveraged(mlp(n_in=36), inv.rot90_group())
    torch.testing.assert_close(rot_avg(torch.rot90(images, 1, (-2, -1))), rot_avg(images),
                               atol=1e-14, rtol=0)
    # equivariant average: shift the output back, the result commutes with the shift
    shift_back = [partial(inv.cyclic_shift, shift=-k) for k in range(N)]
    equi = inv.GroupAveraged(nn.Sequential(nn.Conv1d(1, 1, 5, padding=2), nn.Tanh()).double(),
                             inv.cyclic_shift_group(N), shift_back)
    torch.testing.assert_close(equi(inv.cyclic_shift(x, 3)), inv.cyclic_shift(equi(x), 3),
                               atol=1e-14, rtol=0)


# ----------------------------------------------------------------- Lie derivative
def test_lie_derivative_of_exactly_equivariant_models_is_zero():
    x = signals(20)
    torch.manual_seed(0)
    conv = nn.Conv1d(1, 3, 5, padding=2, padding_mode="circular", bias=False).double()
    back = partial(_translate_back)
    lie = inv.lie_derivative(conv, x, inv.translate, rho_out=back)["output"]
    assert float(lie.abs().max()) < 1e-12
    # not zero without undoing the output action: the feature map does move
    assert float(inv.lie_derivative(conv, x, inv.translate)["output"].abs().max()) > 0.1

    class PowerSpectrum(nn.Module):
        def forward(self, s):
            return torch.fft.rfft(s, dim=-1).abs().square()

    lie = inv.lie_derivative(PowerSpectrum(), x[:, 0, :15], inv.translate)["output"]
    assert float(lie.abs().max()) < 1e-10
    pts = torch.randn(10, 2, dtype=F64)
    lie = inv.lie_derivative(_RadialScale(), pts, _rotate_points, rho_out=_unrotate_points)
    assert float(lie["output"].abs().max()) < 1e-14


def _translate_back(y, t):
    return inv.translate(y, -t)


def _rotate_points(p, t):
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], 1)


def _unrotate_points(y, t):
    return _rotate_points(y, -t)


class _RadialScale(nn.Module):
    def forward(self, p):
        return p * p.square().sum(1, keepdim=True)


class _Pick(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[:, self.index][:, None]


def test_lie_derivative_of_non_equivariant_functions_matches_hand_values():
    # f(p) = p_x under rotation: d/dθ (p_x cos θ − p_y sin θ) at 0 = −p_y
    pts = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=F64)
    lie = inv.lie_derivative(_Pick(0), pts, _rotate_points)
    torch.testing.assert_close(lie["output"][:, 0], torch.tensor([-2.0, -0.5], dtype=F64),
                               atol=1e-15,
                               rtol=0)
    # f(x) = x_j under translation of cos(2πkm/N): d/dt cos(2πk(j−t)/N) = (2πk/N) sin(2πkj/N)
    k, j = 3, 2
    wave = torch.cos(2 * math.pi * k * torch.arange(N, dtype=F64) / N)[None]
    lie = inv.lie_derivative(_Pick(j), wave, inv.translate)["output"]
    hand = 2 * math.pi * k / N * math.sin(2 * math.pi * k * j / N)
    assert float(lie[0, 0]) == pytest.approx(hand, rel=1e-12)
    assert inv.lie_derivative_error(lie) == pytest.approx(float(lie[0, 0]) ** 2, rel=1e-14)


def test_lie_derivative_of_rotation_equals_finite_difference_per_layer():
    images = torch.randn(6, 1, 8, 8, dtype=F64)
    model = mlp(n_in=64)
    lie = inv.lie_derivative(model, images, inv.rotate, layers=["1", "2"])
    h = 1e-7
    for name in ("1", "2"):
        f0 = inv.layer_features(model, images, [name])[name]
        f1 = inv.layer_features(model, inv.rotate(images, h), [name])[name]
        torch.testing.assert_close(lie[name], (f1 - f0) / h, atol=1e-5, rtol=1e-5)
    ds = inv.lie_derivative_scores(model, images, {"rotate": inv.rotate}, layers=["1", "2"])
    assert ds.lie_derivative.dims == ("generator", "layer")
    assert float(ds.lie_derivative.sel(generator="rotate", layer="2")) == pytest.approx(
        float(lie["2"].square().mean()), rel=1e-12)


@pytest.mark.parametrize("d", [5, 60])  # primal (d < n_fit) and dual (d > n_fit) solves
def test_equivariance_error_equals_numpy_ridge_reference(d):
    rng = np.random.default_rng(3)
    fx = rng.standard_normal((40, d))
    fgx = np.tanh(fx[:, ::-1] + 0.3 * rng.standard_normal((40, d)))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0)).numpy()
    fit, test = perm[:20], perm[20:]
    xa, xb = fx[fit] - fx[fit].mean(0), fgx[fit] - fgx[fit].mean(0)
    lam = 0.1 * np.trace(xa.T @ xa) / d
    m = np.linalg.solve(xa.T @ xa + lam * np.eye(d), xa.T @ xb)
    pred = (fx[test] - fx[fit].mean(0)) @ m + fgx[fit].mean(0)
    ref = ((fgx[test] - pred) ** 2).sum() / ((fgx[test] - fgx[test].mean(0)) ** 2).sum()
    assert inv.equivariance_error(fx, fgx, ridge=0.1) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("d", [5, 60])
def test_equivariance_error_of_a_constant_representation_is_the_least_squares_answer(d):
    """f(x) constant: XᵀX = 0 and λ = 0, so the ridge system is singular; the LU solve (no
    host check) must answer the least-squares M = 0, i.e. e = Σ‖f(gx) − mean_fit‖² /
    Σ‖f(gx) − mean_test‖² over the test split (hand formula), not NaN or a pivot's garbage."""
    rng = np.random.default_rng(4)
    fx = np.ones((40, d))
    fgx = rng.standard_normal((40, d))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0)).numpy()
    fit, test = perm[:20], perm[20:]
    ref = (((fgx[test] - fgx[fit].mean(0)) ** 2).sum()
           / ((fgx[test] - fgx[test].mean(0)) ** 2).sum())
    assert inv.equivariance_error(fx, fgx, ridge=0.1) == pytest.approx(ref, rel=1e-12)


# ----------------------------------------------------------------- model mode and tangents
def _train_mode_net(seed: int = 0) -> nn.Module:
    """Linear → BatchNorm → ReLU → Dropout(0.5) → Linear, left in train mode, with one
    submodule deliberately in eval mode (the restored flags must be per module)."""
    net = tiny.mlp(N, 32, 3, batchnorm=True, dropout=0.5, flatten=True, seed=seed, double=True)
    net.train()
    net[3].eval()
    return net


def _state(net: nn.Module) -> tuple[dict, list]:
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [m.training for m in net.modules()])


def _assert_same_state(net: nn.Module, before: tuple[dict, list]) -> None:
    values, flags = before
    for k, v in net.state_dict().items():
        assert torch.equal(v, values[k]), k  # running stats and counters bit for bit
    assert [m.training for m in net.modules()] == flags


def test_invariance_scores_run_in_eval_mode_and_restore_the_model():
    """A model in train mode (Dropout, BatchNorm) is measured in eval mode: the identity
    transform gives distance exactly 0, CKA 1, equivariance error 0 (Dropout noise would give
    about 0.7); a real transform's distance equals the Speicher et al. formula on the outputs of
    a plain eval-mode forward pass of a copy; state and per-module flags restored."""
    import copy

    net = _train_mode_net()
    x = torch.randn(40, 1, N, dtype=F64, generator=torch.Generator().manual_seed(1))
    before = _state(net)
    ds = inv.invariance_scores(net, x, {"identity": lambda z: z,
                                        "noise": partial(inv.add_noise, sigma=0.3)},
                               layers=["5"])
    _assert_same_state(net, before)
    assert float(ds.invariance_distance.sel(transform="identity")[0]) == 0.0
    assert float(ds.invariance_cka.sel(transform="identity")[0]) == pytest.approx(1.0, abs=1e-14)
    # the identity map fitted by ridge (λ = 1e-3): only the shrinkage is left
    assert 0 <= float(ds.equivariance_error.sel(transform="identity")[0]) < 1e-4
    ref = copy.deepcopy(net).eval()
    with torch.no_grad():
        fx = ref(x).numpy()
        fgx = ref(inv.add_noise(x, 0.3)).numpy()
    num = np.linalg.norm(fgx - fx, axis=1).mean()
    den = np.linalg.norm(fx[:, None] - fx[None], axis=-1).sum() / (40 * 39)
    assert float(ds.invariance_distance.sel(transform="noise")[0]) == pytest.approx(
        num / den, rel=1e-12)


def test_lie_derivative_runs_in_eval_mode_and_restores_the_model():
    """The Lie derivative of a train-mode model equals the one of its eval-mode copy (itself
    checked against a central finite difference of eval-mode outputs), and the model's
    running statistics and flags are unchanged afterwards."""
    import copy

    net = _train_mode_net(2)
    x = torch.randn(24, 1, N, dtype=F64, generator=torch.Generator().manual_seed(3))
    before = _state(net)
    lie = inv.lie_derivative(net, x, inv.translate, layers=["2", "5"])
    _assert_same_state(net, before)
    ref = copy.deepcopy(net).eval()
    h = 1e-6
    for name in ("2", "5"):
        plus = inv.layer_features(ref, inv.translate(x, h), [name])[name]
        minus = inv.layer_features(ref, inv.translate(x, -h), [name])[name]
        torch.testing.assert_close(lie[name], (plus - minus) / (2 * h), atol=1e-6, rtol=1e-6)
    scores = inv.lie_derivative_scores(net, x, {"translate": inv.translate}, layers=["5"])
    _assert_same_state(net, before)
    assert float(scores.lie_derivative[0, 0]) == pytest.approx(
        float(lie["5"].square().mean()), rel=1e-12)


class _Detached(nn.Module):
    """``b(tanh(a(x)).detach())``: forward-mode AD cannot see through the detach."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Linear(N, 8).double(), nn.Linear(8, 3).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.reshape(x.shape[0], -1))).detach())


def test_a_layer_no_tangent_reaches_is_nan_with_a_warning_not_zero():
    """Through ``detach()`` no tangent reaches a layer, whose true derivative (finite
    differences) is far from 0: that layer is NaN with a warning naming it, not 0; the layer
    before the detach keeps its value (central difference reference).  A transformation
    written in numpy carries no tangent at all: every layer NaN, and the warning says why."""
    model = _Detached()
    x = torch.randn(12, 1, N, dtype=F64, generator=torch.Generator().manual_seed(5))
    with pytest.warns(RuntimeWarning, match=r"no tangent reached layers \['b'\]"):
        lie = inv.lie_derivative(model, x, inv.translate, layers=["a", "b"])
    assert torch.isnan(lie["b"]).all()
    h = 1e-6
    fd = {n: (inv.layer_features(model, inv.translate(x, h), [n])[n]
              - inv.layer_features(model, inv.translate(x, -h), [n])[n]) / (2 * h)
          for n in ("a", "b")}
    torch.testing.assert_close(lie["a"], fd["a"], atol=1e-6, rtol=1e-6)
    assert float(fd["b"].square().mean()) > 1e-3  # the true derivative is not zero

    def numpy_shift(z, t):
        return torch.as_tensor(np.roll(z.detach().numpy(), 1, -1) * float(t) + z.detach().numpy())

    with pytest.warns(RuntimeWarning, match="carries no tangent"):
        lie = inv.lie_derivative(model, x, numpy_shift, layers=["a", "b"])
    assert all(torch.isnan(v).all() for v in lie.values())
    with pytest.warns(RuntimeWarning, match="no tangent reached"):
        ds = inv.lie_derivative_scores(model, x, {"translate": inv.translate}, layers=["a", "b"])
    assert np.isnan(float(ds.lie_derivative.sel(layer="b")[0]))
    assert float(ds.lie_derivative.sel(layer="a")[0]) == pytest.approx(
        float(fd["a"].square().mean()), rel=1e-6)
