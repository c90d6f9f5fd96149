"""CKA family, Procrustes distance and minibatch CKA against float64 formulas written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from traindyn.probes import similarity as sim

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------- independent references
def ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), Eq. 5, in float64 numpy."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def ref_hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Unbiased HSIC as the U-statistic it is: the mean over ordered 4-tuples of distinct indices
    of ``k_ij l_ij + k_ij l_qr − 2 k_ij l_iq`` (Song et al. 2012, Theorem 3 / Gretton 2005)."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


def ref_rbf(x: np.ndarray, frac: float) -> np.ndarray:
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    med = np.median(sq[np.triu_indices(len(x), 1)])
    return np.exp(-sq / (2 * frac**2 * med))


def ref_biased_cka(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = len(k)
    h = np.eye(n) - 1.0 / n

    def hs(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hs(k, l) / np.sqrt(hs(k, k) * hs(l, l))


# ----------------------------------------------------------------- one-shot values
@pytest.mark.parametrize("shape", [((50, 6), (50, 9)), ((12, 40), (12, 30))])
def test_linear_cka_equals_float64_formula(shape):
    x = RNG.standard_normal(shape[0]) + 3.0
    y = x[:, :1] * RNG.standard_normal((1, shape[1][1])) + RNG.standard_normal(shape[1])
    got = sim.linear_cka(torch.tensor(x), y)
    assert got == pytest.approx(ref_linear_cka(x, y), rel=1e-12)


def test_linear_cka_invariances():
    x = RNG.standard_normal((80, 10))
    y = np.tanh(x @ RNG.standard_normal((10, 7)))
    base = sim.linear_cka(x, y)
    q, _ = np.linalg.qr(RNG.standard_normal((10, 10)))
    assert sim.linear_cka(x @ q, y) == pytest.approx(base, rel=1e-12)
    assert sim.linear_cka(3.7 * x + 2.0, y) == pytest.approx(base, rel=1e-12)
    a = RNG.standard_normal((10, 10)) + np.diag(np.linspace(0.1, 5, 10))  # invertible, not ⊥
    assert abs(sim.linear_cka(x @ a, y) - base) > 1e-2
    assert sim.debiased_cka(x @ q, y) == pytest.approx(sim.debiased_cka(x, y), rel=1e-10)


def test_cka_of_a_representation_with_itself_is_one():
    x = RNG.standard_normal((30, 20))
    assert sim.linear_cka(x, x) == pytest.approx(1.0, abs=1e-14)
    assert sim.debiased_cka(x, x) == pytest.approx(1.0, abs=1e-13)
    assert sim.rbf_cka(x, x, 0.5) == pytest.approx(1.0, abs=1e-14)
    q, _ = np.linalg.qr(RNG.standard_normal((20, 20)))
    assert sim.procrustes_distance(x, 2.0 * x @ q + 1.0) == pytest.approx(0.0, abs=1e-12)


def test_unbiased_hsic_equals_u_statistic_brute_force():
    n = 7
    x, y = RNG.standard_normal((n, 3)), RNG.standard_normal((n, 2))
    y[:, 0] += x[:, 0]
    k, l = x @ x.T, y @ y.T  # noqa: E741
    got = float(sim.hsic_unbiased(torch.tensor(k), torch.tensor(l)))
    assert got == pytest.approx(ref_hsic_u_statistic(k, l), rel=1e-12)


def test_biased_and_rbf_cka_equal_trace_formula():
    x, y = RNG.standard_normal((25, 4)), RNG.standard_normal((25, 3))
    y[:, 0] += np.sin(x[:, 0])
    for frac in (0.2, 0.8):
        got = sim.rbf_cka(x, y, bandwidth=frac)
        assert got == pytest.approx(ref_biased_cka(ref_rbf(x, frac), ref_rbf(y, frac)), rel=1e-12)
    assert sim.cka(x @ x.T, y @ y.T) == pytest.approx(ref_linear_cka(x, y), rel=1e-12)


def test_debiased_cka_of_independent_features_is_near_zero_where_biased_is_not():
    n, d = 64, 1024
    x, y = RNG.standard_normal((n, d)), RNG.standard_normal((n, d))
    biased, debiased = sim.linear_cka(x, y), sim.debiased_cka(x, y)
    # biased CKA of independent wide features tends to ~ d/(d + n) ≈ 0.94 (Davari et al. 2023)
    assert biased > 0.8
    assert abs(debiased) < 0.05
    assert abs(sim.rbf_cka(x, y, debiased=True)) < 0.05


def test_procrustes_equals_scipy_orthogonal_procrustes():
    from scipy.linalg import orthogonal_procrustes

    x, y = RNG.standard_normal((40, 6)), RNG.standard_normal((40, 6))
    y += 0.5 * x
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    r, _ = orthogonal_procrustes(yc, xc)
    expected = np.linalg.norm(xc - yc @ r) ** 2
    assert sim.procrustes_distance(x, y) == pytest.approx(expected, rel=1e-12)


def test_numpy_torch_and_jax_inputs_agree():
    x, y = RNG.standard_normal((20, 5)), RNG.standard_normal((20, 4))
    ref = sim.linear_cka(x, y)
    assert sim.linear_cka(torch.tensor(x), torch.tensor(y)) == ref
    jnp = pytest.importorskip("jax.numpy")
    import jax

    jax.config.update("jax_enable_x64", True)
    assert sim.linear_cka(jnp.asarray(x), jnp.asarray(y)) == pytest.approx(ref, rel=1e-14)


# ----------------------------------------------------------------- bad input
def test_bad_input_errors_and_nan_warnings():
    x = RNG.standard_normal((10, 3))
    with pytest.raises(ValueError, match="n = 10 rows, y has n = 9"):
        sim.linear_cka(x, x[:9])
    with pytest.raises(ValueError, match="n >= 4"):
        sim.debiased_cka(x[:3], x[:3])
    with pytest.raises(ValueError, match=">= 4 samples"):
        sim.MinibatchCKA().update([x[:3]])
    const = np.ones((10, 3))
    for fn in (sim.linear_cka, sim.debiased_cka, sim.rbf_cka, sim.procrustes_distance):
        with pytest.warns(RuntimeWarning, match="constant"):
            assert np.isnan(fn(x, const))
    bad = x.copy()
    bad[2, 1] = np.nan
    for fn in (sim.linear_cka, sim.debiased_cka, sim.rbf_cka, sim.procrustes_distance):
        with pytest.warns(RuntimeWarning, match="not finite"):
            assert np.isnan(fn(bad, x))
    with pytest.warns(RuntimeWarning, match="undefined"):
        m = sim.cka_matrix({"a": x, "b": const}).cka.values
    assert np.isnan(m[1]).all() and m[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference"):
        sim.checkpoint_cka({0: {"a": x}}, reference="best")


# ----------------------------------------------------------------- matrices
def test_cka_matrix_entries_equal_pairwise_calls():
    base = RNG.standard_normal((30, 5))
    feats = {"l0": base, "l1": np.tanh(base @ RNG.standard_normal((5, 8))),
             "l2": RNG.standard_normal((30, 4))}
    other = {"m0": base[:, :2], "m1": np.maximum(base, 0)}
    for debiased in (False, True):
        ds = sim.cka_matrix(feats, other, debiased=debiased)
        assert ds.cka.dims == ("layer", "layer2")
        for a, b in itertools.product(feats, other):
            expect = sim.linear_cka(feats[a], other[b], debiased=debiased)
            assert float(ds.cka.sel(layer=a, layer2=b)) == pytest.approx(expect, rel=1e-11)
    ds = sim.cka_matrix(feats, kernel="rbf", bandwidth=0.4)
    assert float(ds.cka.sel(layer="l0", layer2="l1")) == pytest.approx(
        sim.rbf_cka(feats["l0"], feats["l1"], 0.4), rel=1e-11)
    np.testing.assert_allclose(np.diag(ds.cka.values), 1.0, atol=1e-14)


def test_checkpoint_cka_matrix_and_references():
    base = RNG.standard_normal((20, 4))
    series = {s: {"a": base + 0.3 * s * RNG.standard_normal((20, 4)),
                  "b": np.tanh(base * (1 + s))} for s in (0, 5, 10, 20)}
    full = sim.checkpoint_cka(series, learning_rate=0.1)
    assert full.cka.dims == ("step", "checkpoint2", "layer")
    assert float(full.cka.sel(step=5, checkpoint2=20, layer="a")) == pytest.approx(
        sim.linear_cka(series[5]["a"], series[20]["a"]), rel=1e-11)
    np.testing.assert_allclose(full.time.values, [0, 0.5, 1.0, 2.0])
    for ref, col in (("first", 0), ("final", 20)):
        ds = sim.checkpoint_cka(series, reference=ref, debiased=True)
        for s in series:
            assert float(ds[f"cka_{ref}"].sel(step=s, layer="b")) == pytest.approx(
                sim.debiased_cka(series[s]["b"], series[col]["b"]), rel=1e-11)
    prev = sim.checkpoint_cka(series, reference="previous")
    assert np.isnan(prev.cka_previous.sel(step=0)).all()
    assert float(prev.cka_previous.sel(step=10, layer="a")) == pytest.approx(
        float(full.cka.sel(step=10, checkpoint2=5, layer="a")), rel=1e-12)


# ----------------------------------------------------------------- streaming
def test_minibatch_single_batch_equals_debiased_cka_and_merge_equals_sequential():
    x = RNG.standard_normal((48, 6))
    y = x @ RNG.standard_normal((6, 3)) + RNG.standard_normal((48, 3))
    one = sim.MinibatchCKA().update({"x": x}, {"y": y})
    assert one.compute()[0, 0] == pytest.approx(sim.debiased_cka(x, y), rel=1e-12)
    seq = sim.MinibatchCKA()
    a, b = sim.MinibatchCKA(), sim.MinibatchCKA()
    for i in range(0, 48, 12):
        seq.update([x[i:i + 12], y[i:i + 12]])
        (a if i < 24 else b).update([x[i:i + 12], y[i:i + 12]])
    np.testing.assert_allclose(a.merge(b).compute(), seq.compute(), rtol=1e-13)
    # the numerator is the mean of per-batch unbiased HSICs (Nguyen et al. 2021, Eq. 3)
    mean_hsic = np.mean([float(sim.hsic_unbiased(torch.tensor(x[i:i + 12] @ x[i:i + 12].T),
                                                 torch.tensor(y[i:i + 12] @ y[i:i + 12].T)))
                         for i in range(0, 48, 12)])
    assert float(seq.hsic()[0][0, 1]) == pytest.approx(mean_hsic, rel=1e-12)


def test_minibatch_hsic_is_unbiased_for_the_full_batch_estimate():
    """E over shuffles of the minibatch mean HSIC = the full-data unbiased HSIC (U-statistic)."""
    n, b, shuffles = 120, 20, 150
    x = RNG.standard_normal((n, 5))
    y = np.tanh(x[:, :3]) + 0.5 * RNG.standard_normal((n, 3))
    k, l = torch.tensor(x @ x.T), torch.tensor(y @ y.T)  # noqa: E741
    full_xy, full_xx = float(sim.hsic_unbiased(k, l)), float(sim.hsic_unbiased(k, k))
    gen = torch.Generator().manual_seed(0)
    xy, xx, ckas = [], [], []
    for _ in range(shuffles):
        acc = sim.MinibatchCKA()
        perm = torch.randperm(n, generator=gen).numpy()
        for i in range(0, n, b):
            acc.update({"x": x[perm[i:i + b]]}, {"y": y[perm[i:i + b]]})
        m_xy, m_xx, _ = acc.hsic()
        xy.append(float(m_xy[0, 0]))
        xx.append(float(m_xx[0]))
        ckas.append(acc.compute()[0, 0])
    for est, full in ((np.array(xy), full_xy), (np.array(xx), full_xx)):
        se = est.std(ddof=1) / np.sqrt(shuffles)
        assert abs(est.mean() - full) < 4 * se + 1e-12, (est.mean(), full, se)
    assert np.mean(ckas) == pytest.approx(sim.debiased_cka(x, y), abs=0.02)
    biased_mb = sim.minibatch_cka({"x": x}, {"y": y}, batch_size=b, unbiased=False)
    assert float(biased_mb.cka[0, 0]) > np.mean(ckas)  # biased HSIC inflates small batches


def test_minibatch_cka_dataset_and_layer_matrix():
    x = RNG.standard_normal((64, 5))
    feats = {"a": x, "b": np.maximum(x @ RNG.standard_normal((5, 7)), 0)}
    ds = sim.minibatch_cka(feats, batch_size=64)
    full = sim.cka_matrix(feats, debiased=True)
    np.testing.assert_allclose(ds.cka.values, full.cka.values, rtol=1e-12)
    assert ds.cka.dims == ("layer", "layer2")


# ----------------------------------------------------------------- scale and offset
def ref_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), Eq. 5, in float64 numpy (zero-diagonal kernels)."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))  # noqa: E741
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def ref_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return ref_hsic_unbiased(k, l) / np.sqrt(ref_hsic_unbiased(k, k) * ref_hsic_unbiased(l, l))


def _pair_xy(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    x = RNG.standard_normal((n, 7))
    return x, np.tanh(x @ RNG.standard_normal((7, 5))) + 0.3 * RNG.standard_normal((n, 5))


SCALES = [1e-150, 1e-40, 1e-4, 1e4, 1e38, 1e150]


@pytest.mark.parametrize("c", SCALES)
def test_cka_is_scale_invariant_in_floating_point(c):
    """CKA(c·X, Y) = CKA(X, Y) to 1e-12 for c from 1e-150 to 1e150: the references are the
    float64 formulas (Kornblith et al. 2019, Eq. 5; Song et al. 2012, Eq. 5) on the unscaled
    X, where nothing overflows."""
    x, y = _pair_xy()
    assert sim.linear_cka(c * x, y) == pytest.approx(ref_linear_cka(x, y), rel=1e-12)
    assert sim.linear_cka(c * x, c * y) == pytest.approx(ref_linear_cka(x, y), rel=1e-12)
    assert sim.debiased_cka(c * x, y) == pytest.approx(ref_debiased_cka(x, y), rel=1e-12)
    assert sim.rbf_cka(c * x, y) == pytest.approx(
        ref_biased_cka(ref_rbf(x, 0.5), ref_rbf(y, 0.5)), rel=1e-12)
    assert sim.cka(c * (x @ x.T), y @ y.T) == pytest.approx(ref_linear_cka(x, y), rel=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_layers_of_very_different_scales_in_one_matrix(debiased):
    """Raw pixels (~1e2) beside logits (~1e-2) and a layer at 1e200: every entry of the
    layer × layer matrix, of checkpoint CKA and of minibatch CKA equals the float64 formula
    on the unscaled features; none is reported constant."""
    x, y = _pair_xy(48)
    z = RNG.standard_normal((48, 3))
    feats = {"pixels": 1e2 * x, "logits": 1e-2 * y, "huge": 1e200 * z}
    unscaled = [x, y, z]
    ref = ref_debiased_cka if debiased else ref_linear_cka
    want = np.array([[ref(a, b) for b in unscaled] for a in unscaled])
    np.testing.assert_allclose(sim.cka_matrix(feats, debiased=debiased).cka.values, want,
                               rtol=1e-12)
    ds = sim.checkpoint_cka({0: {"l": 1e-3 * x}, 5: {"l": 1e3 * y}}, reference="first",
                            debiased=debiased)
    assert float(ds.cka_first.sel(step=5)[0]) == pytest.approx(ref(x, y), rel=1e-12)
    if debiased:
        mb = sim.minibatch_cka(feats, batch_size=48).cka.values
        np.testing.assert_allclose(mb, want, rtol=1e-12)


def test_minibatch_merge_of_accumulators_that_started_at_different_scales():
    """Each accumulator keeps its layers at the scale of its first batch; merging brings the
    other's sums to this one's: equal to one sequential pass, and hsic() in the input's units
    equals the mean of per-batch float64 unbiased HSICs (Nguyen et al. 2021, Eq. 3)."""
    x, y = _pair_xy(48)
    scale = [1.0, 1.0, 1e5, 1e5]  # the second accumulator's first batch is 1e5 times larger
    seq, a, b = sim.MinibatchCKA(), sim.MinibatchCKA(), sim.MinibatchCKA()
    for j, i in enumerate(range(0, 48, 12)):
        batch = [scale[j] * x[i:i + 12], y[i:i + 12]]
        seq.update(batch)
        (a if i < 24 else b).update(batch)
    np.testing.assert_allclose(a.merge(b).compute(), seq.compute(), rtol=1e-12)
    mean_xy = np.mean([ref_hsic_unbiased(scale[j] ** 2 * x[i:i + 12] @ x[i:i + 12].T,
                                         y[i:i + 12] @ y[i:i + 12].T)
                       for j, i in enumerate(range(0, 48, 12))])
    assert float(seq.hsic()[0][0, 1]) == pytest.approx(mean_xy, rel=1e-12)


def test_debiased_cka_with_a_large_offset_keeps_its_accuracy():
    """The unbiased HSIC is invariant to shifting the features; centring before it keeps that
    true in floating point (without centring, an offset of 3e3 costs about 16 %)."""
    x, y = _pair_xy(60)
    want = ref_debiased_cka(x - x.mean(0), y - y.mean(0))
    for offset in (255.0, 3e3, 1e6):
        assert sim.debiased_cka(x + offset, y) == pytest.approx(want, rel=1e-10)
        assert sim.rbf_cka(x + offset, y - offset, debiased=True) == pytest.approx(
            sim.rbf_cka(x, y, debiased=True), rel=1e-10)


def test_procrustes_distance_at_extreme_scales():
    """2 − 2‖X̂ᵀŶ‖_* (Ding et al. 2021) for features whose squares overflow or underflow:
    0 for X against itself, and the scipy reference on the unscaled features otherwise."""
    from scipy.linalg import orthogonal_procrustes

    x, y = _pair_xy()
    y = y[:, :5]
    xc, yc = x[:, :5] - x[:, :5].mean(0), y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    r, _ = orthogonal_procrustes(yc, xc)
    expected = np.linalg.norm(xc - yc @ r) ** 2
    for c in (1e-160, 1e160, 1e300):
        assert sim.procrustes_distance(c * x, c * x) == pytest.approx(0.0, abs=1e-12)
        assert sim.procrustes_distance(c * x[:, :5], y) == pytest.approx(expected, rel=1e-12)


def test_constant_is_judged_against_the_representations_own_scale():
    """A representation whose rows are equal (1/3, not a float: its mean has a rounding
    error) is constant at any scale, beside a non-constant one of any scale; one whose rows
    differ by 1e-9 of its size is not, even beside a layer 1e12 times larger."""
    x, _ = _pair_xy(20)
    for c in (1e-200, 1.0, 1e200):
        const = np.full((20, 4), c / 3.0)
        for fn in (sim.linear_cka, sim.debiased_cka, sim.rbf_cka, sim.procrustes_distance):
            with pytest.warns(RuntimeWarning, match="constant"):
                assert np.isnan(fn(1e6 * x, const))
    small = 1.0 + 1e-9 * x[:, :3]
    want = ref_linear_cka(small - 1.0, x)
    assert sim.linear_cka(small, 1e12 * x) == pytest.approx(want, rel=1e-6)
    with pytest.warns(RuntimeWarning, match="undefined"):
        m = sim.cka_matrix({"small": 1e-12 * x, "big": 1e12 * x,
                            "const": np.full((20, 2), 7.1)}).cka.values
    np.testing.assert_allclose(m[:2, :2], 1.0, rtol=1e-12)
    assert np.isnan(m[2]).all() and np.isnan(m[:, 2]).all()


# ----------------------------------------------------------------- minibatch statistics
def ref_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """``tr(K H L H) / (n − 1)²`` (Kornblith et al. 2019, Eq. 3) in float64 numpy."""
    n = len(k)
    h = np.eye(n) - 1.0 / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def ref_minibatch_cka(layers: list[np.ndarray], batches: list[np.ndarray],
                      unbiased: bool) -> np.ndarray:
    """Nguyen, Raghu & Kornblith (2021), Eq. 3: each batch's HSIC of every pair of layers
    (linear kernels), averaged over batches with equal weights, then the CKA ratio."""
    hsic = ref_hsic_unbiased if unbiased else ref_hsic_biased
    total = np.zeros((len(layers), len(layers)))
    for idx in batches:
        ks = [f[idx] @ f[idx].T for f in layers]
        total += np.array([[hsic(a, b) for b in ks] for a in ks])
    mean = total / len(batches)
    d = np.sqrt(np.diag(mean))
    return mean / np.outer(d, d)


@pytest.mark.parametrize("unbiased", [True, False])
def test_minibatch_cka_uses_every_row_in_near_equal_batches(unbiased):
    """103 shuffled rows at batch_size 25 are 5 batches of 21, 21, 21, 20, 20 rows (not 4 × 25
    plus a short batch weighted like a full one): the layer × layer matrix equals the float64
    Eq. 3 on that split of the same permutation."""
    n, b = 103, 25
    x = RNG.standard_normal((n, 6))
    layers = [x, np.tanh(x @ RNG.standard_normal((6, 9))), x[:, :2] ** 2]
    got = sim.minibatch_cka(layers, batch_size=b, unbiased=unbiased,
                            generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).numpy()
    batches = np.array_split(perm, 5)
    assert [len(i) for i in batches] == [21, 21, 21, 20, 20]
    np.testing.assert_allclose(got.cka.values, ref_minibatch_cka(layers, batches, unbiased),
                               rtol=1e-12)
    assert got.attrs["parameters"].count('"batches": 5') == 1
    in_order = sim.minibatch_cka(layers, batch_size=b, unbiased=unbiased)
    np.testing.assert_allclose(
        in_order.cka.values,
        ref_minibatch_cka(layers, np.array_split(np.arange(n), 5), unbiased), rtol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        sim.minibatch_cka(layers, batch_size=1)


def _gaussian_cka(maps: list[np.ndarray], noise: list[float], batch: int | None = None
                  ) -> np.ndarray:
    """Population linear CKA of the layers ``g M_j + σ_j e_j`` (``g``, ``e_j`` independent
    standard Gaussians): ``‖Σ_ij‖²_F / (‖Σ_ii‖_F ‖Σ_jj‖_F)`` with ``Σ_ij = M_iᵀM_j (+σ_i² I)``.
    With ``batch = b``, the limit over many batches of the *biased* minibatch estimator: the
    Wishart moments ``E[S_ac S_bd] = Σ_ac Σ_bd + (Σ_ab Σ_cd + Σ_ad Σ_bc)/(b − 1)`` of the
    sample covariance ``S`` give ``E HSIC₀ = (b ‖Σ_ij‖² + tr Σ_ii tr Σ_jj)/(b − 1)``."""
    def cov(i: int, j: int) -> np.ndarray:
        c = maps[i].T @ maps[j]
        return c + noise[i] ** 2 * np.eye(len(c)) if i == j else c

    size = len(maps)
    h = np.array([[np.sum(cov(i, j) ** 2) for j in range(size)] for i in range(size)])
    if batch is not None:
        tr = np.array([np.trace(cov(i, i)) for i in range(size)])
        h = batch * h + np.outer(tr, tr)
    d = np.sqrt(np.diag(h))
    return h / np.outer(d, d)


def ref_debiased_cka_features(layers: list[np.ndarray]) -> np.ndarray:
    """Full-data debiased CKA matrix from Song et al. (2012), Eq. 5 for linear kernels written
    in feature space (O(n d²), for n too large for n × n kernels): with ``k_i = ‖x_i‖²``,
    ``tr(K̃L̃) = ‖XᵀY‖² − Σ k_i l_i``, ``K̃1 = X Xᵀ1 − k``, ``1ᵀK̃1 = ‖Xᵀ1‖² − Σ k_i``."""
    def hsic(x: np.ndarray, y: np.ndarray) -> float:
        n = len(x)
        x, y = x - x.mean(0), y - y.mean(0)
        kx, ky = (x * x).sum(1), (y * y).sum(1)
        k1, l1 = x @ x.sum(0) - kx, y @ y.sum(0) - ky
        return (np.sum((x.T @ y) ** 2) - kx @ ky + k1.sum() * l1.sum() / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))

    h = np.array([[hsic(a, b) for b in layers] for a in layers])
    d = np.sqrt(np.diag(h))
    return h / np.outer(d, d)


def test_minibatch_cka_converges_to_population_cka_biased_minibatch_keeps_its_bias():
    """Four Gaussian layers of different effective ranks, n = 20000, batches of 32 (625 of
    them).  Minibatch CKA (unbiased HSIC per batch) is within 0.01 of the full-data debiased
    CKA (feature-space float64 reference) and within 0.015 of the population CKA; averaging
    biased HSICs instead converges to the closed-form biased limit at b = 32 (0.015), which
    is off the population value by up to 0.27 — upwards for weakly related layers, downwards
    (−0.019) for the high-CKA pair whose effective ranks differ."""
    rng = np.random.default_rng(1)
    m, n, b = 24, 20_000, 32
    base = np.diag(1.0 / np.sqrt(np.arange(1, m + 1)))
    maps = [base, base @ rng.standard_normal((m, m)) / np.sqrt(m),
            base[:, :4] * np.array([3.0, 2.0, 1.0, 0.5]), rng.standard_normal((m, 40)) / np.sqrt(m)]
    noise = [0.1, 0.3, 0.05, 1.0]
    g = rng.standard_normal((n, m))
    layers = [g @ a + s * rng.standard_normal((n, a.shape[1]))
              for a, s in zip(maps, noise, strict=True)]
    # the feature-space reference equals the kernel-form Eq. 5 on a subset
    small = [f[:40] for f in layers]
    np.testing.assert_allclose(ref_debiased_cka_features(small)[0, 3],
                               ref_debiased_cka(small[0], small[3]), rtol=1e-10)
    population, limit = _gaussian_cka(maps, noise), _gaussian_cka(maps, noise, batch=b)
    full = ref_debiased_cka_features(layers)
    mb = sim.minibatch_cka(layers, batch_size=b, generator=torch.Generator().manual_seed(0))
    mb_biased = sim.minibatch_cka(layers, batch_size=b, unbiased=False,
                                  generator=torch.Generator().manual_seed(0))
    mb, mb_biased = mb.cka.values, mb_biased.cka.values
    off = ~np.eye(4, dtype=bool)
    assert np.abs(full - population).max() < 0.01
    assert np.abs(mb - full).max() < 0.01
    assert np.abs(mb - population).max() < 0.015
    assert np.abs(mb_biased - limit).max() < 0.015
    bias = (limit - population)[off]
    assert bias.max() > 0.25 and bias.min() < -0.015  # both signs occur in this matrix
    assert (np.sign(mb_biased - population)[off] == np.sign(bias)).all()
    assert (np.abs(mb_biased - population)[off] > np.abs(mb - population)[off]).all()
