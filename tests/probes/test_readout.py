"""Readout probes (probes.readout) against independent references.

References: scikit-learn's RidgeClassifier, LogisticRegression and KNeighborsClassifier on the
same split; ``numpy.linalg.solve`` of the ridge normal equations; brute-force leave-one-out
refitting and an explicit ``n × n`` hat matrix for the ridge choice; the formulas of Wang &
Isola (2020) written in numpy float64; the closed-form uniformity of points uniform on S²;
direct calls of the plain functions for the Monitor (three modes) and ``analyze``.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.probes import readout as R
from traindyn.probes.spectral import rankme

from tests.helpers import assert_rel

LAYERS = ["net.0", "net.2"]


def _blobs(n: int = 240, d: int = 12, c: int = 4, spread: float = 1.5, seed: int = 0,
           offset: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.standard_normal((c, d))[y] + spread * rng.standard_normal((n, d)) + offset
    return x, y


def _train_held(x, y, held_out=0.25, seed=0):
    held = R.held_out_mask(np.arange(len(y)), held_out, seed)
    return x[~held], y[~held], x[held], y[held]


# ------------------------------------------------------------------------ the split
def test_split_is_by_sample_index_independent_of_batching_and_seeded():
    idx = np.arange(20000)
    a = R.held_out_mask(idx, 0.25, 0)
    assert abs(a.mean() - 0.25) < 0.01  # binomial sd ≈ 0.003
    assert not np.array_equal(a, R.held_out_mask(idx, 0.25, 1))
    np.testing.assert_array_equal(a[5000:6000], R.held_out_mask(idx[5000:6000], 0.25, 0))
    with pytest.raises(ValueError, match="held_out"):
        R.held_out_mask(idx, 1.0)


# ------------------------------------------------------------------------ ridge
@pytest.mark.parametrize("lam", [0.3, 25.0])
def test_ridge_matches_sklearn_ridge_classifier_and_a_direct_solve(lam):
    from sklearn.linear_model import RidgeClassifier

    x, y = _blobs()
    xt, yt, xh, yh = _train_held(x, y)
    fit = R.ReadoutAccumulator().update(x, y).fit_ridge(ridge=lam)
    # numpy: centred normal equations on one-hot targets, intercept = ȳ − x̄ᵀW
    onehot = np.eye(4)[yt]
    xm, ym = xt.mean(0), onehot.mean(0)
    w_np = np.linalg.solve((xt - xm).T @ (xt - xm) + lam * np.eye(x.shape[1]),
                           (xt - xm).T @ (onehot - ym))
    assert_rel(fit.weight.numpy(), w_np, 1e-8, "weights vs numpy.linalg.solve")
    assert_rel(fit.intercept.numpy(), ym - xm @ w_np, 1e-8, "intercept vs numpy")
    # sklearn codes targets as ±1, i.e. 2·onehot − 1: weights exactly twice ours
    sk = RidgeClassifier(alpha=lam).fit(xt, yt)
    assert_rel(2 * fit.weight.numpy(), sk.coef_.T, 1e-8, "weights vs RidgeClassifier")
    np.testing.assert_array_equal(fit.predict(torch.as_tensor(xh)).numpy(), sk.predict(xh))
    values = R.ReadoutAccumulator().update(x, y).compute(ridge=lam)
    assert values["linear_probe_accuracy"] == float(np.mean(sk.predict(xh) == yh))
    assert values["linear_probe_train_accuracy"] == float(np.mean(sk.predict(xt) == yt))
    out = xh @ w_np + (ym - xm @ w_np)
    assert_rel(values["linear_probe_loss"], np.mean(((out - np.eye(4)[yh]) ** 2).sum(1)),
               1e-10, "held-out MSE")
    assert values["linear_probe_ridge"] == lam


def _brute_press(xt, yt, lam, c):
    """Leave each training sample out, refit (re-centring), predict it: Σ squared errors."""
    y = np.eye(c)[yt]
    total = 0.0
    for i in range(len(yt)):
        keep = np.arange(len(yt)) != i
        xk, yk = xt[keep], y[keep]
        xm, ym = xk.mean(0), yk.mean(0)
        w = np.linalg.solve((xk - xm).T @ (xk - xm) + lam * np.eye(xt.shape[1]),
                            (xk - xm).T @ (yk - ym))
        total += float(((y[i] - ((xt[i] - xm) @ w + ym)) ** 2).sum())
    return total


def _brute_gcv(xt, yt, lam, c):
    """GCV from the explicit n × n hat matrix (intercept + ridge)."""
    y = np.eye(c)[yt]
    n = len(yt)
    xc = xt - xt.mean(0)
    hat = np.ones((n, n)) / n + xc @ np.linalg.solve(xc.T @ xc + lam * np.eye(xt.shape[1]),
                                                     xc.T)
    resid = y - hat @ y
    return n * float((resid ** 2).sum()) / (n - np.trace(hat)) ** 2


@pytest.mark.parametrize("d", [8, 40])
def test_ridge_choice_equals_brute_force_loo_and_gcv(d):
    x, y = _blobs(n=120, d=d, c=3, spread=2.5, seed=d)
    xt, yt, _, _ = _train_held(x, y)
    ridges = np.logspace(-4, 3, 15)
    acc = R.ReadoutAccumulator().update(x, y)
    loo = acc.fit_ridge(ridges=ridges, criterion="loo")
    press = np.array([_brute_press(xt, yt, lam, 3) for lam in loo.ridges])
    assert_rel(loo.scores, press, 1e-8, "PRESS")
    assert loo.ridge == loo.ridges[int(np.argmin(press))]
    gcv = acc.fit_ridge(ridges=ridges, criterion="gcv")
    brute = np.array([_brute_gcv(xt, yt, lam, 3) for lam in gcv.ridges])
    finite = np.isfinite(brute) & (brute < 1e12)
    assert_rel(gcv.scores[finite], brute[finite], 1e-6, "GCV")
    assert gcv.ridge == gcv.ridges[int(np.argmin(np.where(finite, brute, np.inf)))]


def test_streamed_statistics_equal_all_at_once():
    x, y = _blobs(n=300, d=16, c=5)
    once = R.ReadoutAccumulator().update(x, y)
    streamed = R.ReadoutAccumulator()
    for lo, hi in [(0, 7), (7, 90), (90, 91), (91, 300)]:  # a first batch smaller than d
        streamed.update(x[lo:hi], y[lo:hi])
    a, b = once.fit_ridge(), streamed.fit_ridge()
    assert a.ridge == b.ridge
    assert_rel(b.weight.numpy(), a.weight.numpy(), 1e-10, "weights")
    va, vb = once.scores(a), streamed.scores(b)
    for k in va:
        assert_rel(vb[k], va[k], 1e-10, k)


@pytest.mark.parametrize("n,d", [(300, 16), (40, 60)])  # moments, and rows kept (n < d)
def test_shared_spectrum_moments_give_the_training_scatter(n, d):
    from traindyn.probes.spectral import SpectrumAccumulator

    x, y = _blobs(n=n, d=d, c=3, offset=50.0)  # a large mean: cancellation would show
    xt, yt, xh, yh = _train_held(x, y)
    spectrum = SpectrumAccumulator()
    shared = R.ReadoutAccumulator(shared=spectrum)
    for lo, hi in [(0, 7), (7, 23), (23, n)]:
        spectrum.update(x[lo:hi])
        shared.update(x[lo:hi], y[lo:hi])
    assert shared.train is None  # no scatter of its own
    mean, scatter = shared._train_moments()
    xm = xt.mean(0)
    assert_rel(mean.numpy(), xm, 1e-12, "training mean")
    assert_rel(scatter.numpy(), (xt - xm).T @ (xt - xm), 1e-10, "training scatter")
    lam = 0.7
    fit = shared.fit_ridge(ridge=lam)
    onehot = np.eye(3)[yt]
    w_np = np.linalg.solve((xt - xm).T @ (xt - xm) + lam * np.eye(d),
                           (xt - xm).T @ (onehot - onehot.mean(0)))
    assert_rel(fit.weight.numpy(), w_np, 1e-8, "weights vs numpy.linalg.solve")
    own = R.ReadoutAccumulator().update(x, y)
    a, b = own.fit_ridge(), shared.fit_ridge()  # the grid scales with tr(X_cᵀX_c)/d
    assert np.argmin(a.scores) == np.argmin(b.scores)
    assert_rel(b.ridge, a.ridge, 1e-12, "ridge")
    for k, v in own.compute().items():
        assert_rel(shared.compute()[k], v, 1e-10, k)
    spectrum.update(x[:5])  # the two no longer saw the same rows
    with pytest.raises(ValueError, match="same batches"):
        shared.compute()
    with pytest.raises(ValueError, match="float64"):
        R.ReadoutAccumulator(shared=SpectrumAccumulator(batch_dtype=None))


def test_plan_hands_the_spectrum_accumulator_to_the_readout():
    from traindyn.probes.evaluation import ProbePlan

    x, y = _blobs(n=200, d=10, c=4)
    alone = ProbePlan(["linear_probe"], ["a"])
    with_spectra = ProbePlan(["linear_probe", "rankme"], ["a"])
    st = with_spectra.start()["a"].accumulators
    assert st["readout"].shared is st["spectrum"]
    assert alone.start()["a"].accumulators["readout"].shared is None
    direct = R.linear_probe(x, y)
    a = alone.layer_values(alone.accumulate({"a": x}, y)).layer_values
    state = with_spectra.start()
    for lo in range(0, 200, 30):
        with_spectra.update(state, "a", x[lo:lo + 30], y[lo:lo + 30])
    b = with_spectra.layer_values(state).layer_values
    for k, v in direct.items():
        assert_rel(a[k]["a"], v, 1e-10, k)
        assert_rel(b[k]["a"], v, 1e-10, k)
    assert_rel(b["rankme"]["a"], rankme(x), 1e-10, "rankme")
    bad = x.copy()
    bad[3, 2] = np.nan  # a training row: only the shared accumulator sees it
    assert not R.held_out_mask(np.arange(4), 0.25, 0)[3]
    out = with_spectra.layer_values(with_spectra.accumulate({"a": bad}, y))
    assert math.isnan(out.layer_values["linear_probe_accuracy"]["a"])
    assert any("not finite" in note for note in out.layer_notes["a"])


# ------------------------------------------------------------------------ logistic
def test_logistic_matches_sklearn_with_matched_regularisation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    x, y = _blobs(n=200, d=10, c=3, spread=2.0, offset=0.5)
    xt, yt, xh, yh = _train_held(x, y)
    l2 = 1e-2
    got = R.logistic_probe(x, y, l2=l2)
    sk = LogisticRegression(C=1.0 / (len(yt) * l2), tol=1e-12, max_iter=10000).fit(xt, yt)
    assert got["logistic_probe_accuracy"] == float(np.mean(sk.predict(xh) == yh))
    assert got["logistic_probe_train_accuracy"] == float(np.mean(sk.predict(xt) == yt))
    ref = log_loss(yh, sk.predict_proba(xh), labels=sk.classes_)
    assert abs(got["logistic_probe_loss"] - ref) < 1e-4
    # a warm start from the optimum stays there
    fit = R.fit_logistic(xt, yt, l2)
    again = R.fit_logistic(xt, yt, l2, init=(fit.weight, fit.bias))
    assert abs(again.objective - fit.objective) < 1e-12
    assert again.n_iter <= 2


# ------------------------------------------------------------------------ kNN
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_predictions_equal_sklearn(metric):
    from sklearn.neighbors import KNeighborsClassifier

    x, y = _blobs(n=200, d=6, c=4, spread=2.0, offset=0.0)
    xt, yt, xh, yh = _train_held(x, y)
    for k in (1, 5, 20):
        sk = KNeighborsClassifier(k, metric=metric, algorithm="brute").fit(xt, yt)
        pred = R.knn_predict(xt, yt, xh, k, metric, chunk=13).numpy()  # several chunks
        np.testing.assert_array_equal(pred, sk.predict(xh))
        assert R.knn_accuracy(x, y, k, metric) == float(np.mean(sk.predict(xh) == yh))
    # leave-one-out: sklearn's kneighbors() without X leaves each point out of its own list
    k = 5
    nn_ = KNeighborsClassifier(k, metric=metric, algorithm="brute").fit(x, y)
    idx = nn_.kneighbors(return_distance=False)
    votes = np.array([np.bincount(y[row], minlength=4) for row in idx])
    expected = votes.argmax(1)  # ties: the smallest label, as KNeighborsClassifier
    assert R.knn_accuracy(x, y, k, metric, split="loo") == float(np.mean(expected == y))


def test_knn_vote_ties_go_to_the_smallest_label():
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    pred = R.knn_predict(train, np.array([3, 1]), np.array([[1.0, 1.0]]), k=2)
    assert int(pred[0]) == 1


# ------------------------------------------------------------------------ alignment, uniformity
def _np_unit(z):
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_alignment_and_uniformity_equal_the_float64_formulas():
    rng = np.random.default_rng(3)
    z1 = rng.standard_normal((50, 7)) * 5 + 1
    z2 = z1 + rng.standard_normal((50, 7))
    a, b = _np_unit(z1), _np_unit(z2)
    assert_rel(R.alignment(z1, z2), np.mean(np.sum((a - b) ** 2, 1)), 1e-10, "alignment")
    assert_rel(R.alignment(z1, z2, alpha=1.0), np.mean(np.linalg.norm(a - b, axis=1)), 1e-10,
               "alignment alpha=1")
    i, j = np.triu_indices(50, 1)
    sq = np.sum((a[i] - a[j]) ** 2, 1)
    assert_rel(R.uniformity(z1, chunk=7), np.log(np.mean(np.exp(-2 * sq))), 1e-10, "uniformity")
    # finite at the smallest batch, and scale-free (normalised)
    two = R.uniformity(z1[:2])
    assert_rel(two, -2 * sq[0], 1e-10, "n = 2")
    assert_rel(R.uniformity(1e3 * z1), R.uniformity(z1), 1e-12, "scale")
    # identical points: the upper bound 0, never -inf below
    assert R.uniformity(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-15)
    far = np.array([[1.0, 0.0], [-1.0, 0.0]])  # antipodal: exp(-8) exactly
    assert_rel(R.uniformity(far), -8.0, 1e-12, "antipodal")


def test_uniformity_of_uniform_points_on_the_sphere_approaches_its_limit():
    t = 2.0
    limit = -2 * t + math.log(math.sinh(2 * t) / (2 * t))  # S²: cos θ uniform on [-1, 1]
    rng = np.random.default_rng(0)
    errors = []
    for n in (20, 200, 2000):
        vals = [R.uniformity(rng.standard_normal((n, 3))) for _ in range(4)]
        errors.append(abs(np.mean(vals) - limit))
    assert errors[-1] < 0.01
    assert errors[-1] < errors[0]
    # the documented batch-size bias: log of an unbiased pair mean reads low at small n
    small = np.mean([R.uniformity(rng.standard_normal((5, 3))) for _ in range(300)])
    assert small - limit < -0.1


# ------------------------------------------------------------------------ per-class RankMe
def test_class_rankme_is_rankme_of_each_class():
    x, y = _blobs(n=90, d=6, c=3)
    out = R.class_rankme(x, y)
    for c in range(3):
        assert_rel(float(out["class_rankme"].sel({"class": c})), rankme(x[y == c]), 1e-12,
                   f"class {c}")
    assert_rel(out["class_rankme_mean"], np.mean([rankme(x[y == c]) for c in range(3)]),
               1e-12, "mean")


# ------------------------------------------------------------------------ bad input
def test_bad_input_gives_a_clear_error_or_nan_with_a_warning():
    x, y = _blobs(n=60, d=5, c=3)
    with pytest.warns(RuntimeWarning, match="single class"):
        v = R.linear_probe(x, np.zeros(60, dtype=int))
    assert all(math.isnan(val) for val in v.values())
    with pytest.warns(RuntimeWarning, match="single class"):
        assert math.isnan(R.logistic_probe(x, np.zeros(60, dtype=int))
                          ["logistic_probe_accuracy"])
    seed = next(s for s in range(200) if R.held_out_mask(np.arange(3), 0.5, s).sum() == 2)
    with pytest.warns(RuntimeWarning, match="training split has 1 sample"):
        R.linear_probe(x[:3], np.arange(3), held_out=0.5, seed=seed)
    with pytest.warns(RuntimeWarning, match="training split has 1 sample"):
        R.logistic_probe(x[:3], np.arange(3), held_out=0.5, seed=seed)
    bad = x.copy()
    bad[3, 2] = np.nan
    for fn in (R.linear_probe, R.logistic_probe, R.knn_accuracy):
        with pytest.warns(RuntimeWarning, match="not finite"):
            out = fn(bad, y)
        assert all(math.isnan(v) for v in (out.values() if isinstance(out, dict) else [out]))
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert math.isnan(R.uniformity(bad))
    with pytest.raises(TypeError, match="labels must be integers"):
        R.linear_probe(x, y.astype(float))
    with pytest.raises(TypeError, match="labels must be integers"):
        R.knn_accuracy(x, y + 0.5)
    # a class only in the held-out split: counted as an error, with a warning
    y2 = y.copy()
    held = R.held_out_mask(np.arange(60))
    y2[np.flatnonzero(held)[0]] = 7
    with pytest.warns(RuntimeWarning, match=r"classes \[7\].*absent from the training"):
        v = R.linear_probe(x, y2, ridge=1.0)
    ref = R.ReadoutAccumulator().update(x, y2).fit_ridge(ridge=1.0)
    assert 7 not in ref.classes and math.isfinite(v["linear_probe_accuracy"])
    with pytest.raises(ValueError, match="criterion='loo' needs every training row"):
        R.ReadoutAccumulator(max_train_rows=3).update(x, y).fit_ridge(criterion="loo")
    with pytest.raises(ValueError, match="ridge must be > 0"):
        R.linear_probe(x, y, ridge=0.0)


# ------------------------------------------------------------------------ through the Monitor
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(),
                                 nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


PROBE_SET = ["linear_probe", "logistic_probe", "knn_accuracy", "class_rankme",
             "alignment_uniformity"]
KWARGS = {"knn_accuracy": {"k": 5}}  # alignment_uniformity gets the Monitor's layers


def _direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    from traindyn.probes.invariance import parse_transform

    net = model.net
    x2 = parse_transform("noise:0.1", x)(x)
    out: dict[str, list] = {}
    with torch.no_grad():
        feats = [net[0](x), net[2](net[1](net[0](x)))]
        feats2 = [net[0](x2), net[2](net[1](net[0](x2)))]
    for h, h2 in zip(feats, feats2, strict=True):
        row = {**R.linear_probe(h, y), **R.logistic_probe(h, y),
               "knn_accuracy": R.knn_accuracy(h, y, k=5),
               "class_rankme_mean": R.class_rankme(h, y)["class_rankme_mean"],
               "alignment": R.alignment(h, h2), "uniformity": R.uniformity(h)}
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return {k: np.array(v, dtype=float) for k, v in out.items()}


@pytest.mark.parametrize("mode", [False, "thread", pytest.param("process",
                                                                  marks=pytest.mark.slow)])
def test_monitor_modes_equal_direct_calls(mode):
    from traindyn.dynamics.monitor import Monitor

    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 10, generator=g)
    y = torch.arange(120) % 3
    torch.manual_seed(0)
    model = Net()
    before = _direct(model, x, y)
    batches, labels = list(x.split(50)), list(y.split(50))  # streamed in three batches
    monitor = Monitor(model, probes=PROBE_SET, layers=LAYERS, probe_data=batches,
                      probe_labels=labels, schedule=lambda s: True, background=mode,
                      probe_kwargs=KWARGS)
    with monitor:
        monitor.step(0)
        with torch.no_grad():
            model.net[0].weight.mul_(1.5)
        monitor.step(1)
    ds = monitor.to_dataset()
    after = _direct(model, x, y)
    assert ds["linear_probe_ridge"].attrs["units"] == "feature_units^2"
    assert ds["class_rankme"].dims == ("step", "layer", "class")
    bound = json.loads(ds.attrs["parameters"])["probe_kwargs"]
    assert bound["linear_probe"]["held_out"] == 0.25 and bound["knn_accuracy"]["k"] == 5
    assert bound["alignment_uniformity"]["normalisation"].startswith("l2")
    for step, direct in enumerate((before, after)):
        for name, expected in direct.items():
            assert_rel(ds[name].values[step], expected, 1e-10, f"{mode} step {step} {name}")


def test_monitor_files_the_warning_under_the_layer():
    from traindyn.probes.evaluation import ProbePlan

    x, y = _blobs(n=40, d=4, c=2)
    plan = ProbePlan(["linear_probe"], ["a", "b"])
    bad = x.copy()
    bad[0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = plan.layer_values(plan.accumulate({"a": x, "b": bad}, y))
    assert "b" in out.layer_notes and "a" not in out.layer_notes
    assert any("not finite" in t for t in out.layer_notes["b"])
    assert math.isnan(out.layer_values["linear_probe_accuracy"]["b"])
    assert math.isfinite(out.layer_values["linear_probe_accuracy"]["a"])


def test_another_split_streams_through_its_own_accumulator():
    from traindyn.probes.evaluation import ProbePlan

    x, y = _blobs(n=80, d=5, c=3)
    probe = R.linear_probe_with_split(held_out=0.5, seed=4)
    plan = ProbePlan([probe], ["a"])
    out = plan.layer_values(plan.accumulate({"a": x}, y))
    direct = R.linear_probe(x, y, held_out=0.5, seed=4)
    for k, v in direct.items():
        assert_rel(out.layer_values[k]["a"], v, 1e-12, k)
    # it travels by value: unpickled where its accumulator was never registered
    import pickle

    from traindyn.probes.registry import ACCUMULATORS

    ACCUMULATORS.pop(probe.accumulator)
    clone = pickle.loads(pickle.dumps(probe))
    assert clone.accumulator in ACCUMULATORS
    plan = ProbePlan([clone], ["a"])
    again = plan.layer_values(plan.accumulate({"a": x}, y))
    assert again.layer_values == out.layer_values
    with pytest.raises(ValueError, match="linear_probe_with_split"):
        ProbePlan(["linear_probe"], ["a"], {"linear_probe": {"held_out": 0.5}}).layer_values(
            ProbePlan(["linear_probe"], ["a"]).accumulate({"a": x}, y))


# ------------------------------------------------------------------------ through analyze
def test_analyze_equals_direct_calls(tmp_path):
    from traindyn.dynamics.analyze import analyze
    from traindyn.dynamics.probe_inputs import digits_inputs, digits_labels

    from tests.dynamics.test_analyze import FACTORY, _load_factory, _trained_state

    path = tmp_path / "mlp_factory.py"
    path.write_text(FACTORY)
    factory = f"{path}:make_mlp"
    make = _load_factory(factory)
    folder = tmp_path / "series"
    folder.mkdir()
    for step in (0, 100):
        torch.save(_trained_state(make, step), folder / f"step{step}.pt")
    ds = analyze(folder, model=factory, layers=["net.0", "net.2"], probe_data="digits",
                 batch_size=500, probe_labels="digits", probes=["linear_probe", "knn_accuracy"],
                 probe_kwargs={"knn_accuracy": {"k": 10}}, progress=False)
    x, y = digits_inputs(), digits_labels()
    for i, step in enumerate((0, 100)):
        model = make()
        model.load_state_dict(_trained_state(make, step))
        net = model.net
        with torch.no_grad():
            feats = [net[0](x), net[2](torch.relu(net[0](x)))]
        for j, h in enumerate(feats):
            direct = R.linear_probe(h, y)
            for k, v in direct.items():
                assert_rel(ds[k].values[i, j], v, 1e-10, f"step {step} layer {j} {k}")
            assert_rel(ds["knn_accuracy"].values[i, j], R.knn_accuracy(h, y, k=10), 1e-10, "knn")


@pytest.mark.slow
def test_benchmark_runs_at_smoke_size():
    import subprocess
    import sys

    from tests.helpers import ROOT, child_env

    out = subprocess.run([sys.executable, "benchmarks/readout.py", "--smoke"], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, check=True).stdout
    assert "rankme + alpha_req (baseline)" in out and "load after" in out


def test_uniformity_of_rows_at_1e200_equals_the_unit_scale_value():
    """Rows at 1e200: l2 normalisation must not overflow (their norm squared is inf)."""
    from traindyn.probes.readout import uniformity

    z = np.random.default_rng(3).standard_normal((40, 6))
    assert uniformity(z * 1e200) == pytest.approx(uniformity(z), rel=1e-12)


def test_readouts_refuse_class_names_with_a_clear_error():
    from traindyn.probes.readout import class_rankme

    z = np.random.default_rng(4).standard_normal((12, 5))
    with pytest.raises(TypeError, match="integer class indices"):
        class_rankme(z, np.array(["cat", "dog"] * 6))
