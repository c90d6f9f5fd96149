"""Neural-collapse metrics against float64 references written here from Papyan et al. (2020)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from traindyn.probes.collapse import CollapseAccumulator, neural_collapse

from tests._tiny_models import mlp
from tests.helpers import assert_rel, load_script


def reference(h, y, W=None, b=None, global_mean="class_means"):
    """Brute force in float64 numpy, straight from the definitions (explicit loops)."""
    h = np.asarray(h, np.float64)
    classes = np.unique(y)
    C, N = len(classes), len(y)
    mu = np.stack([h[y == c].mean(0) for c in classes])
    mu_g = mu.mean(0) if global_mean == "class_means" else h.mean(0)
    Mt = (mu - mu_g).T
    Sw = sum(np.outer(h[i] - mu[np.searchsorted(classes, y[i])],
                      h[i] - mu[np.searchsorted(classes, y[i])]) for i in range(N)) / N
    Sb = Mt @ Mt.T / C
    out = {"nc1": np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-10, hermitian=True)) / C}
    norms = np.linalg.norm(Mt, axis=0)
    out["nc2_equinorm"] = norms.std() / norms.mean()
    pairs = [(i, j) for i in range(C) for j in range(i + 1, C)]
    cos = np.array([Mt[:, i] @ Mt[:, j] / (norms[i] * norms[j]) for i, j in pairs])
    out["nc2_equiangle"] = cos.std()
    out["nc2_coherence"] = np.mean(np.abs(cos + 1 / (C - 1)))
    var = [np.mean(np.sum((h[y == c] - mu[k]) ** 2, 1)) for k, c in enumerate(classes)]
    out["cdnv"] = np.mean([(var[i] + var[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2))
                           for i, j in pairs])
    if W is not None:
        Wc = W[classes].T
        wn = np.linalg.norm(Wc, axis=0)
        out["nc2_equinorm_classifier"] = wn.std() / wn.mean()
        wcos = np.array([Wc[:, i] @ Wc[:, j] / (wn[i] * wn[j]) for i, j in pairs])
        out["nc2_equiangle_classifier"] = wcos.std()
        out["nc3"] = np.sum((Wc / np.linalg.norm(Wc) - Mt / np.linalg.norm(Mt)) ** 2)
        logits = h @ W.T + (0 if b is None else b)
        ncc = classes[np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), 1)]
        out["nc4"] = np.mean(ncc != logits.argmax(1))
    return out


def simplex_etf(C: int, d: int, radius: float, rng) -> np.ndarray:
    """C unit-norm vectors × radius in R^d with pairwise cosine -1/(C-1) (rows)."""
    q, _ = np.linalg.qr(rng.normal(size=(d, C)))
    etf = np.sqrt(C / (C - 1)) * (np.eye(C) - np.ones((C, C)) / C)
    return radius * (q @ etf).T


def blobs(rng, C=4, d=12, sizes=(30, 45, 20, 60)):
    y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    mu = rng.normal(size=(C, d)) * 2.0
    h = mu[y] + rng.normal(size=(len(y), d)) * rng.uniform(0.5, 2.0, size=d)
    W = rng.normal(size=(C, d))
    b = rng.normal(size=C)
    return h, y, W, b


@pytest.mark.parametrize("global_mean", ["class_means", "samples"])
def test_matches_bruteforce_on_imbalanced_classes(rng, global_mean):
    h, y, W, b = blobs(rng)
    ds = neural_collapse(h, y, weight=W, bias=b, global_mean=global_mean)
    ref = reference(h, y, W, b, global_mean)
    for name, value in ref.items():
        assert_rel(float(ds[name]), value, 1e-9, name)
    assert json.loads(ds.attrs["parameters"])["global_mean"] == global_mean


def test_global_mean_conventions_differ_when_imbalanced_and_agree_when_balanced(rng):
    h, y, _, _ = blobs(rng)
    a = neural_collapse(h, y, global_mean="class_means")
    s = neural_collapse(h, y, global_mean="samples")
    assert abs(float(a.nc1) - float(s.nc1)) > 1e-3 * float(a.nc1)
    h, y, _, _ = blobs(rng, sizes=(25, 25, 25, 25))
    a = neural_collapse(h, y, global_mean="class_means")
    s = neural_collapse(h, y, global_mean="samples")
    for name in ("nc1", "nc2_equinorm", "nc2_equiangle", "cdnv"):
        assert_rel(float(a[name]), float(s[name]), 1e-10, name)


def test_streaming_equals_oneshot_equals_reference(rng):
    h, y, W, b = blobs(rng)
    perm = rng.permutation(len(y))
    h, y = h[perm], y[perm]
    acc = CollapseAccumulator()
    cuts = [0, 1, 7, 50, 51, 120, len(y)]  # includes single-sample and single-class batches
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        acc.update(torch.from_numpy(h[lo:hi]), torch.from_numpy(y[lo:hi]))
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        acc.update_predictions(h[lo:hi], weight=W, bias=b)
    streamed = acc.compute(weight=W)
    oneshot = neural_collapse(h, y, weight=W, bias=b)
    ref = reference(h, y, W, b)
    for name, value in ref.items():
        assert_rel(float(streamed[name]), float(oneshot[name]), 1e-10, f"stream {name}")
        assert_rel(float(oneshot[name]), value, 1e-9, f"ref {name}")


def test_simplex_etf_without_spread_is_fully_collapsed(rng):
    C, d = 6, 15
    offset = rng.normal(size=d)  # any global offset
    mu = simplex_etf(C, d, 3.0, rng) + offset
    y = np.repeat(np.arange(C), 5)
    h = mu[y]
    W = 0.7 * (mu - offset)  # self-dual classifier; the bias removes the offset
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = neural_collapse(h, y, weight=W, bias=-W @ offset)
    for name in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc2_coherence",
                 "nc2_equinorm_classifier", "nc2_equiangle_classifier", "nc3", "nc4", "cdnv"):
        assert abs(float(ds[name])) < 1e-10, (name, float(ds[name]))


def test_isotropic_spread_gives_hand_computed_nc1_and_cdnv(rng):
    # Class means on a simplex ETF of radius r; each class gets the 2d points μ_c ± s·e_k, so
    # the within-class covariance is exactly (s²/d)·I.  Σ_B has C−1 eigenvalues r²/(C−1), so
    # NC1 = (s²/d)(C−1)·(C−1)/r² / C, and CDNV = 2s² / (2·2r²C/(C−1)).
    C, d, r, s = 5, 8, 2.5, 0.3
    mu = simplex_etf(C, d, r, rng)
    offsets = np.concatenate([s * np.eye(d), -s * np.eye(d)])
    h = np.concatenate([m + offsets for m in mu])
    y = np.repeat(np.arange(C), 2 * d)
    ds = neural_collapse(h, y)
    assert_rel(float(ds.nc1), (s**2 / d) * (C - 1) ** 2 / (r**2 * C), 1e-10, "nc1")
    assert_rel(float(ds.cdnv), s**2 * (C - 1) / (2 * r**2 * C), 1e-10, "cdnv")


def test_nc4_counts_disagreements_with_given_logits(rng):
    h, y, _, _ = blobs(rng)
    ref_ncc = np.unique(y)[np.argmin(((h[:, None] - np.stack(
        [h[y == c].mean(0) for c in np.unique(y)])[None]) ** 2).sum(-1), 1)]
    pred = ref_ncc.copy()
    flip = rng.choice(len(y), size=17, replace=False)
    pred[flip] = (pred[flip] + 1) % 4
    logits = np.eye(4)[pred] * 5.0
    assert float(neural_collapse(h, y, logits=logits).nc4) == pytest.approx(17 / len(y))
    assert np.isnan(float(neural_collapse(h, y).nc4))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), perm_seed=st.integers(0, 2**16))
def test_invariant_to_permutation_of_class_labels(seed, perm_seed):
    rng = np.random.default_rng(seed)
    h, y, W, b = blobs(rng)
    perm = np.random.default_rng(perm_seed).permutation(4)
    W2, b2 = np.empty_like(W), np.empty_like(b)
    W2[perm], b2[perm] = W, b  # class c is now called perm[c]
    a = neural_collapse(h, y, weight=W, bias=b)
    p = neural_collapse(h, perm[y], weight=W2, bias=b2)
    for name in a.data_vars:
        assert_rel(float(p[name]), float(a[name]), 1e-9, name)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 6), C=st.integers(2, 4), seed=st.integers(0, 99))
def test_degenerate_shapes_do_not_crash(n, d, C, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, size=n)
    y[:2] = [0, 1]  # at least two classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ds = neural_collapse(rng.normal(size=(n, d)), y, weight=rng.normal(size=(C, d)))
    assert set(ds.data_vars) >= {"nc1", "nc2_equinorm", "nc3", "nc4", "cdnv"}
    assert float(ds.nc1) >= 0 and 0 <= float(ds.nc4) <= 1


def test_nonfinite_features_give_nan_with_warning(rng):
    h, y, W, _ = blobs(rng)
    h[3, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        ds = neural_collapse(h, y, weight=W)
    assert all(np.isnan(float(ds[v])) for v in ds.data_vars)


def test_one_class_gives_nan_with_warning(rng):
    with pytest.warns(RuntimeWarning, match="at least 2 classes"):
        ds = neural_collapse(rng.normal(size=(10, 3)), np.zeros(10, dtype=int))
    assert np.isnan(float(ds.nc1))


def test_single_sample_class_warns_and_still_matches_reference(rng):
    h, y, _, _ = blobs(rng, sizes=(30, 1, 20, 25))
    with pytest.warns(RuntimeWarning, match="single sample"):
        ds = neural_collapse(h, y)
    assert_rel(float(ds.nc1), reference(h, y)["nc1"], 1e-9, "nc1")


def test_bad_labels_and_options_raise_clear_errors(rng):
    h, y, W, _ = blobs(rng)
    with pytest.raises(TypeError, match="integers"):
        neural_collapse(h, y.astype(float))
    with pytest.raises(ValueError, match="shape"):
        neural_collapse(h, y[:-1])
    with pytest.raises(ValueError, match="global_mean"):
        neural_collapse(h, y, global_mean="median")
    with pytest.raises(ValueError, match="index the rows of weight"):
        neural_collapse(h, y, weight=W[:2])
    with pytest.raises(ValueError, match="no samples"):
        CollapseAccumulator().compute()


def test_half_precision_features_are_upcast_exactly(rng):
    h, y, W, b = blobs(rng)
    h16 = torch.from_numpy(h).half()
    ds = neural_collapse(h16, torch.from_numpy(y), weight=W, bias=b)
    ref = reference(h16.double().numpy(), y, W, b)
    assert_rel(float(ds.nc1), ref["nc1"], 1e-9, "nc1")


# ----------------------------------------------------------------- the classifier in the probe
CLASSIFIER_VARS = ("nc2_equinorm_classifier", "nc2_equiangle_classifier",
                   "nc2_coherence_classifier", "nc3", "nc4")


def _coherence_classifier(W, classes):
    Wc = W[classes]
    wn = np.linalg.norm(Wc, axis=1)
    C = len(classes)
    cos = [Wc[i] @ Wc[j] / (wn[i] * wn[j]) for i in range(C) for j in range(i + 1, C)]
    return np.mean(np.abs(np.array(cos) + 1 / (C - 1)))


def _check_against_reference(ds, net, x, y, layer_slices):
    """Every NC variable of each layer equals the float64 brute force (Papyan et al. 2020) on
    features from a plain forward pass, with the classifier's weight and bias."""
    W = net[4].weight.detach().numpy()
    b = net[4].bias.detach().numpy()
    with torch.no_grad():
        logits = net(x).numpy()
    for layer, upto in layer_slices.items():
        with torch.no_grad():
            h = net[:upto](x).numpy()
        width_ok = h.shape[1] == W.shape[1]
        ref = reference(h, y, W if width_ok else None, b if width_ok else None)
        classes = np.unique(y)
        mu = np.stack([h[y == c].mean(0) for c in classes])
        ncc = classes[np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), 1)]
        ref["nc4"] = np.mean(ncc != logits.argmax(1))  # the network's own prediction
        if width_ok:
            ref["nc2_coherence_classifier"] = _coherence_classifier(W, classes)
        got = ds.sel(layer=layer)
        for name, value in ref.items():
            assert_rel(float(got[name].values.reshape(-1)[-1]), value, 1e-9, f"{layer} {name}")
        if not width_ok:
            assert np.isnan(float(got["nc3"].values.reshape(-1)[-1]))


def _labels(n: int = 90) -> torch.Tensor:
    return torch.arange(n) % 4


@pytest.mark.parametrize("background", [False, "thread"])
def test_monitor_with_classifier_gives_nc3_nc4_and_classifier_variants(background):
    """With probe_kwargs {"neural_collapse": {"classifier": "4"}} the Monitor gives NC3, NC4
    and the three classifier variants too: all ten variables equal the float64 reference;
    layer "1" (16 wide, the classifier takes 12) gets NC4, and NaN with a warning for the
    metrics comparing its means with the classifier's rows."""
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear
    from traindyn.probes.collapse import collapse_with_classifier

    net = mlp(6, 16, 12, 4, act=("relu", "tanh"), seed=0, double=True)
    x = torch.randn(90, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = _labels()
    with Monitor(net, probes=["rankme", "neural_collapse"], layers=["1", "3"],
                 schedule=linear(1), probe_data=x, probe_labels=y, background=background,
                 probe_kwargs={"neural_collapse": {"classifier": "4"}}) as monitor:
        for step in range(2):
            monitor.step(step)
    ds = monitor.to_dataset()
    assert ds["nc3"].dims == ("step", "layer")
    _check_against_reference(ds, net, x, y.numpy(), {"1": 2, "3": 4})
    with pytest.warns(RuntimeWarning, match="takes 12 features; layer '1' has 16"):
        direct = collapse_with_classifier(net, x, y, ["1", "3"], "4")
    _check_against_reference(direct, net, x, y.numpy(), {"1": 2, "3": 4})


def test_analyze_cli_with_classifier_gives_nc3_nc4(tmp_path):
    """``traindyn analyze --classifier net.4``: NC3, NC4 and the classifier variants of the
    checkpoint equal the float64 reference."""
    import xarray as xr
    from traindyn.dynamics.cli_analyze import main

    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),\n"
        "                                       torch.nn.Linear(16, 12), torch.nn.Tanh(),\n"
        "                                       torch.nn.Linear(12, 4))\n\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n\n"
        "def make():\n"
        "    return Net()\n")
    net = load_script(factory, "nc_factory").make()
    (tmp_path / "ckpts").mkdir()
    torch.save(net.state_dict(), tmp_path / "ckpts" / "step10.pt")
    x = torch.randn(90, 6, generator=torch.Generator().manual_seed(2))
    y = _labels()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    out = tmp_path / "out.nc"
    code = main([str(tmp_path / "ckpts"), "--model", f"{factory}:make", "--layers", "net.3",
                 "--probe-data", str(tmp_path / "x.npy"), "--probe-labels", str(tmp_path / "y.npy"),
                 "--probes", "neural_collapse", "--classifier", "net.4", "--dtype", "float64",
                 "--output", str(out), "--no-progress", "--no-figures"])
    assert code == 0
    ds = xr.load_dataset(out)
    _check_against_reference(ds, net.net.double(), x.double(), y.numpy(), {"net.3": 4})


def test_without_classifier_the_classifier_variables_are_nan_and_say_why():
    """The streamed probe cannot see the classifier: its five classifier variables are NaN
    and their declared long_name says how to get them (the others match the reference)."""
    from traindyn.probes.evaluation import ProbePlan

    h = np.random.default_rng(3).normal(size=(40, 5))
    plan = ProbePlan(["neural_collapse"], ["a"])
    out = plan.layer_values(plan.accumulate({"a": h}, np.arange(40) % 3))
    values = out.per_layer(["a"])
    assert all(np.isnan(values[v][0]) for v in CLASSIFIER_VARS)
    assert_rel(values["nc1"][0], reference(h, np.arange(40) % 3)["nc1"], 1e-9, "nc1")
    declared = plan.variables()
    for name in CLASSIFIER_VARS:
        assert "--classifier" in declared[name][1]["long_name"], name
    assert "classifier" not in declared["nc1"][1]["long_name"]


def test_a_classifier_that_is_not_there_is_a_clear_error():
    from traindyn.dynamics.monitor import Monitor

    net = mlp(6, 16, 12, 4, act=("relu", "tanh"), seed=0, double=True)
    with pytest.raises(ValueError, match=r"classifier 'fc' not found; modules with a weight "
                                         r"matrix .*\['0', '2', '4'\]"):
        with Monitor(net, probes=["neural_collapse"], layers=["3"],
                     probe_data=torch.randn(8, 6, dtype=torch.float64),
                     probe_labels=_labels(8),
                     probe_kwargs={"neural_collapse": {"classifier": "fc"}}) as monitor:
            monitor.step(0)


def test_a_classifier_without_labels_is_refused_before_any_evaluation(tmp_path):
    """With ``classifier=`` neural collapse runs as a model probe that needs the labels: the
    Monitor refuses at construction and ``analyze`` before loading any checkpoint (not one
    failure per checkpoint)."""
    from traindyn.dynamics.analyze import analyze
    from traindyn.dynamics.monitor import Monitor

    net = mlp(6, 16, 12, 4, act=("relu", "tanh"), seed=0, double=True)
    kwargs = {"neural_collapse": {"classifier": "4"}}
    with pytest.raises(ValueError, match=r"\['neural_collapse'\] need labels"):
        Monitor(net, probes=["neural_collapse"], layers=["3"], probe_kwargs=kwargs,
                probe_data=torch.randn(8, 6, dtype=torch.float64))
    (tmp_path / "ckpts").mkdir()
    torch.save(net.state_dict(), tmp_path / "ckpts" / "step0.pt")
    np.save(tmp_path / "x.npy", np.zeros((8, 6)))
    with pytest.raises(ValueError, match=r"\['neural_collapse'\] need labels"):
        analyze(tmp_path / "ckpts", model=lambda: mlp(6, 16, 12, 4, act=("relu", "tanh")),
                layers=["3"], probes=["neural_collapse"], probe_kwargs=kwargs,
                probe_data=tmp_path / "x.npy", output=tmp_path / "out.nc")
    assert not (tmp_path / "out.nc").exists()


def test_string_labels_are_mapped_to_sorted_indices_or_refused_with_a_classifier(rng):
    """Class names: without a classifier they are mapped to
    0 … C−1 in sorted order — the same numbers as those integer labels, names recorded;
    with a weight they are a TypeError (a name does not say which row is its class)."""
    h, y, W, _ = blobs(rng)
    names = np.array(["cat", "dog", "eel", "fox"])[y]
    ds = neural_collapse(h, names)
    ref = reference(h, y)
    for name, value in ref.items():
        assert_rel(float(ds[name]), value, 1e-9, name)
    assert json.loads(ds.attrs["parameters"])["classes"] == ["cat", "dog", "eel", "fox"]
    assert float(neural_collapse(h, list(names)).nc1) == float(ds.nc1)
    with pytest.raises(TypeError, match="class names"):
        neural_collapse(h, names, weight=W)
    with pytest.raises(TypeError, match="class names"):
        CollapseAccumulator().update(h, names)
