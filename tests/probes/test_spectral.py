"""Spectral probes against float64 references written here from the published formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from traindyn.probes import spectral as S

from tests.helpers import assert_rel

EPS = 1e-7


# ----------------------------------------------------------------------------- references
def ref_rankme(z):
    """Garrido et al. (2023) Eq. 1: raw singular values, ε after normalisation."""
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s / s.sum() + EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_cov_eigs(z):
    z = np.asarray(z, np.float64)
    zc = z - z.mean(0)
    lam = np.linalg.eigvalsh(zc.T @ zc / len(z))[::-1]
    return np.clip(lam, 0, None)


def ref_rankme_cov(z):
    lam = ref_cov_eigs(z)
    p = lam / lam.sum() + EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_alpha(lam, lo=10, hi=100):
    """Stringer et al. (2019) / Agrawal et al. (2022): weighted normal equations, w = 1/r."""
    r = np.arange(lo, hi) + 1.0
    X = np.stack([-np.log(r), np.ones_like(r)], 1)
    W = np.diag(1.0 / r)
    b = np.linalg.solve(X.T @ W @ X, X.T @ W @ np.log(lam[lo:hi]))
    return float(b[0])


def ref_pr(z):
    lam = ref_cov_eigs(z)
    return float(lam.sum() ** 2 / np.sum(lam**2))


def ref_stable_rank(z):
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    return float(np.sum(s**2) / s[0] ** 2)


def ref_erank(z):
    """Roy & Vetterli (2007): exp entropy of σ/‖σ‖₁, no ε."""
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def planted(rng, n, d, a, scale=1.0):
    """Features whose centred covariance has exactly the eigenvalues scale·r^-a."""
    lam = scale * np.arange(1, d + 1, dtype=float) ** -a
    g = rng.normal(size=(n, d))
    g -= g.mean(0)
    u, _ = np.linalg.qr(g)  # n × d orthonormal columns, each orthogonal to the ones vector
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (u * np.sqrt(n * lam)) @ v.T + rng.normal(size=d), lam


def decaying(rng, n, d):
    return rng.normal(size=(n, d)) * np.arange(1, d + 1) ** -0.7 + 0.3


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("shape", [(400, 150), (60, 200)])  # n > d, and the Gram side n < d
def test_rankme_both_variants_match_float64_references(rng, shape):
    z = decaying(rng, *shape)
    assert_rel(S.rankme(z), ref_rankme(z), 1e-9, "rankme")
    assert_rel(S.rankme_covariance(z), ref_rankme_cov(z), 1e-9, "rankme_covariance")


def test_rankme_variants_differ_as_published_on_gaussian_matrix(rng):
    # REFERENCES.md: on a 1000 × 1024 Gaussian matrix about 814 (paper) vs 613 (covariance).
    z = rng.normal(size=(1000, 1024)).astype(np.float32)
    assert S.rankme(z) == pytest.approx(814, rel=0.01)
    assert S.rankme_covariance(z) == pytest.approx(613, rel=0.01)


@pytest.mark.parametrize("fit_range", [(10, 100), (11, 100), (3, 100), (5, 60)])
def test_alpha_req_matches_weighted_normal_equations(rng, fit_range):
    z = decaying(rng, 500, 160)
    fit = S.alpha_req_fit(z, fit_range)
    assert_rel(fit.alpha, ref_alpha(ref_cov_eigs(z), *fit_range), 1e-9, "alpha")
    assert fit.fit_range == fit_range and 0 < fit.r2 <= 1 and 0 < fit.r2_weighted <= 1


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_planted_power_law_spectrum_gives_its_exponent(rng, a):
    z, lam = planted(rng, 300, 150, a)
    assert_rel(S.covariance_spectrum(z).numpy(), lam, 1e-8, "planted spectrum")
    fit = S.alpha_req_fit(z)
    assert_rel(fit.alpha, a, 1e-9, "alpha")
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


def test_sampled_power_law_gives_exponent_approximately(rng):
    d, a = 200, 1.0
    z = rng.normal(size=(20_000, d)) * np.arange(1, d + 1) ** (-a / 2)
    assert S.alpha_req(z, (3, 50)) == pytest.approx(a, abs=0.05)


def test_effective_rank_family_matches_references(rng):
    z = decaying(rng, 300, 80)
    assert_rel(S.participation_ratio(z), ref_pr(z), 1e-9, "participation ratio")
    assert_rel(S.stable_rank(z), ref_stable_rank(z), 1e-9, "stable rank")
    assert_rel(S.effective_rank(z), ref_erank(z), 1e-9, "effective rank")
    lam = ref_cov_eigs(z)
    assert_rel(S.effective_rank(z, 2, "covariance"), ref_pr(z), 1e-9, "erank_2 = PR")
    assert_rel(S.effective_rank(z, np.inf, "covariance"), lam.sum() / lam[0], 1e-9, "erank_inf")
    zc = z - z.mean(0)
    assert_rel(S.stable_rank(z, centered=True), ref_stable_rank(zc), 1e-9, "centred stable rank")
    ranks = [S.effective_rank(z, q) for q in (0.5, 1, 2, 5, np.inf)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(ranks, ranks[1:], strict=False))


def test_identity_like_features_have_full_effective_ranks():
    z = np.concatenate([np.eye(20), -np.eye(20)]) * 3.0  # covariance (9/20)·I, mean 0
    for value in (S.participation_ratio(z), S.stable_rank(z), S.effective_rank(z)):
        assert value == pytest.approx(20, rel=1e-12)


# ----------------------------------------------------------------------------- streaming
def test_streaming_equals_oneshot_equals_reference(rng):
    z = decaying(rng, 500, 120)
    metrics = ("rankme", "rankme_covariance", "alpha_req", "participation_ratio",
               "stable_rank", "effective_rank")
    multi = S.SpectralMetrics(metrics)
    single = {"rankme": S.RankMe(), "rankme_covariance": S.RankMe(spectrum="covariance"),
              "alpha_req": S.AlphaReQ(), "participation_ratio": S.ParticipationRatio(),
              "stable_rank": S.StableRank(), "effective_rank": S.EffectiveRank()}
    cuts = [0, 1, 50, 119, 121, 122, 300, 500]  # crosses n = d inside a batch
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        batch = torch.from_numpy(z[lo:hi])
        multi.update(batch)
        for m in single.values():
            m.update(batch)
    streamed = multi.compute()
    oneshot = {"rankme": S.rankme(z), "rankme_covariance": S.rankme_covariance(z),
               "alpha_req": S.alpha_req(z), "participation_ratio": S.participation_ratio(z),
               "stable_rank": S.stable_rank(z), "effective_rank": S.effective_rank(z)}
    ref = {"rankme": ref_rankme(z), "rankme_covariance": ref_rankme_cov(z),
           "alpha_req": ref_alpha(ref_cov_eigs(z)), "participation_ratio": ref_pr(z),
           "stable_rank": ref_stable_rank(z), "effective_rank": ref_erank(z)}
    for name in metrics:
        assert_rel(streamed[name], oneshot[name], 1e-10, f"multi {name}")
        assert_rel(single[name].compute(), oneshot[name], 1e-10, f"single {name}")
        assert_rel(oneshot[name], ref[name], 1e-9, f"reference {name}")


def test_merging_accumulators_equals_one_accumulator(rng):
    z = decaying(rng, 400, 60)
    whole = S.SpectrumAccumulator().update(z)
    for parts in ([z[:30], z[30:]], [z[:200], z[200:]], [z[:300], z[300:310]]):
        a = S.SpectrumAccumulator().update(parts[0])
        a.merge(S.SpectrumAccumulator().update(parts[1]))
        assert a.n == sum(len(p) for p in parts)
        k = a.n
        sub = S.SpectrumAccumulator().update(z[:k])
        assert_rel(a.covariance_spectrum()[:20].numpy(), sub.covariance_spectrum()[:20].numpy(),
                   1e-10, "merged covariance spectrum")
    assert whole.n == 400


def test_large_mean_offset_does_not_cancel_the_covariance(rng):
    # Regression: the foundation computed ZᵀZ − n z̄z̄ᵀ, which loses ~offset² / variance of
    # the float64 precision; Chan's pairwise update keeps the covariance exact.
    z = rng.normal(size=(600, 40)) * np.linspace(1, 2, 40) + 1e6
    acc = S.SpectrumAccumulator()
    for lo in range(0, 600, 100):
        acc.update(z[lo:lo + 100])
    assert_rel(acc.covariance_spectrum().numpy(), ref_cov_eigs(z), 1e-9, "covariance")


def test_float32_batch_products_stay_close_to_float64(rng):
    z = decaying(rng, 2000, 100).astype(np.float32)
    fast = S.SpectralMetrics(("rankme", "alpha_req"), fit_range=(5, 60), batch_dtype=None)
    exact = S.SpectralMetrics(("rankme", "alpha_req"), fit_range=(5, 60))
    for lo in range(0, 2000, 250):
        fast.update(z[lo:lo + 250])
        exact.update(z[lo:lo + 250])
    f, e = fast.compute(), exact.compute()
    assert_rel(f["rankme"], e["rankme"], 1e-5, "rankme")
    assert_rel(f["alpha_req"], e["alpha_req"], 1e-4, "alpha_req")


def test_jax_and_torch_inputs_agree_with_numpy(rng):
    jnp = pytest.importorskip("jax.numpy")
    z = decaying(rng, 120, 30).astype(np.float32)
    expected = S.rankme(z)
    assert S.rankme(jnp.asarray(z)) == pytest.approx(expected, rel=1e-12)
    assert S.rankme(torch.from_numpy(z)) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_rankme_and_alpha_req_invariant_to_rotation_and_rankme_to_scale(seed, scale):
    rng = np.random.default_rng(seed)
    z = decaying(rng, 80, 24)
    q, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    for fn in (S.rankme, S.rankme_covariance, lambda x: S.alpha_req(x, (2, 16))):
        assert_rel(fn(z @ q), fn(z), 1e-9, "rotation")
    assert_rel(S.rankme(scale * z), S.rankme(z), 1e-9, "scale")
    assert_rel(S.alpha_req(scale * z, (2, 16)), S.alpha_req(z, (2, 16)), 1e-9, "scale alpha")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 6), seed=st.integers(0, 99))
def test_degenerate_shapes_do_not_crash(n, d, seed):
    z = np.random.default_rng(seed).normal(size=(n, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = S.rankme(z)
        values = [S.rankme_covariance(z), S.participation_ratio(z), S.stable_rank(z),
                  S.alpha_req(z, (0, 2))]
    assert 1 - 1e-3 <= r <= min(n, d) + 1e-3
    assert all(np.isnan(v) or np.isfinite(v) for v in values)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_features_give_nan_with_warning(rng, bad):
    z = rng.normal(size=(200, 120))
    z[5, 7] = bad
    for fn in (S.rankme, S.rankme_covariance, S.alpha_req, S.participation_ratio,
               S.stable_rank, S.effective_rank):
        with pytest.warns(RuntimeWarning, match="not finite"):
            assert np.isnan(fn(z))


def test_all_zero_matrix_gives_nan_with_warning():
    z = np.zeros((30, 10))
    for fn in (S.rankme, S.rankme_covariance, S.participation_ratio, S.stable_rank):
        with pytest.warns(RuntimeWarning):
            assert np.isnan(fn(z))


def test_fewer_eigenvalues_than_the_fit_range_gives_nan_with_warning(rng):
    with pytest.warns(RuntimeWarning, match=r"needs 100 positive eigenvalues.*has 49"):
        fit = S.alpha_req_fit(rng.normal(size=(50, 300)))
    assert np.isnan(fit.alpha) and np.isnan(fit.r2)
    with pytest.warns(RuntimeWarning, match="needs 100"):
        assert np.isnan(S.alpha_req(rng.normal(size=(500, 64))))


def test_half_precision_is_upcast_exactly_and_overflow_is_reported(rng):
    z16 = torch.from_numpy(rng.normal(size=(300, 40)) * 100).half()
    assert_rel(S.rankme(z16), ref_rankme(z16.double().numpy()), 1e-9, "float16 rankme")
    big = torch.full((300, 40), 60000.0, dtype=torch.float16) * 2  # overflows to inf
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert np.isnan(S.rankme(big))


def test_clear_errors_for_malformed_input(rng):
    with pytest.raises(ValueError, match=r"\(n_samples, n_features\)"):
        S.rankme(np.ones(5))
    with pytest.raises(ValueError, match="empty"):
        S.rankme(np.ones((0, 4)))
    with pytest.raises(TypeError, match="complex"):
        S.rankme(np.ones((4, 4), dtype=complex))
    acc = S.SpectrumAccumulator().update(np.ones((3, 4)))
    with pytest.raises(ValueError, match="had 4"):
        acc.update(np.ones((3, 5)))
    with pytest.raises(ValueError, match="no samples"):
        S.RankMe().compute()
    with pytest.raises(ValueError, match="fit_range"):
        S.power_law_fit(np.ones(10), (5, 5))
    with pytest.raises(ValueError, match="non-negative"):
        S.rankme_from_spectrum(np.array([1.0, -0.5]))
    with pytest.raises(KeyError, match="available"):
        S.SpectralMetrics(["rankme", "rank_me"])


def test_new_probes_are_registered_by_name(rng):
    from traindyn.probes.registry import get_probe

    S.register_probes()
    z = decaying(rng, 100, 20)
    assert get_probe("participation_ratio")(z) == pytest.approx(ref_pr(z), rel=1e-9)
    assert get_probe("stable_rank")(z) == pytest.approx(ref_stable_rank(z), rel=1e-9)
