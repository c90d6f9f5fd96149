"""RankMe and alpha-ReQ in their two forms — the one-shot function and the streaming class fed
in batches or merged from shards — against float64 numpy references written here from the
papers' formulas (Garrido et al. 2023, Eq. 1; Agrawal et al. 2022, Eq. 2)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from traindyn.probes import spectral as S
from traindyn.probes.registry import get_probe

from tests.helpers import assert_rel

EPS = 1e-7
TOL = 1e-10


# ----------------------------------------------------------------------------- references
def ref_spectrum(z: np.ndarray, spectrum: str) -> np.ndarray:
    """Singular values of raw ``z`` (numpy SVD), or the ``d`` eigenvalues of the covariance of
    the column-centred ``z``: the squared singular values of ``z_c`` over ``n``, zeros added
    up to ``d``."""
    z = np.asarray(z, np.float64)
    if spectrum == "singular":
        return np.linalg.svd(z, compute_uv=False)
    sv = np.linalg.svd(z - z.mean(0), compute_uv=False)
    lam = sv**2 / len(z)
    return np.concatenate([lam, np.zeros(z.shape[1] - lam.size)])


def ref_rankme(z: np.ndarray, spectrum: str = "singular", eps: float = EPS) -> float:
    """Garrido, Balestriero, Najman & LeCun (ICML 2023), Eq. 1: ``p_k = s_k/‖s‖₁ + ε``,
    ``RankMe = exp(−Σ p_k ln p_k)``, with ``0 ln 0 = 0`` (its limit) when ``ε = 0``."""
    s = ref_spectrum(z, spectrum)
    p = s / s.sum() + eps
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_alpha_fit(z: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    """Agrawal et al. (NeurIPS 2022), Eq. 2: ``ln λ_r = c − α ln r`` by least squares with
    weights ``1/r`` over ranks ``lo+1..hi`` (``numpy.linalg.lstsq`` on rows scaled by
    ``√w``); returns ``(α, c)``."""
    lam = ref_spectrum(z, "covariance")[lo:hi]
    r = np.arange(lo + 1, hi + 1, dtype=np.float64)
    sw = np.sqrt(1.0 / r)
    design = np.stack([-np.log(r), np.ones_like(r)], 1) * sw[:, None]
    (alpha, c), *_ = np.linalg.lstsq(design, np.log(lam) * sw, rcond=None)
    return float(alpha), float(c)


# ----------------------------------------------------------------------------- inputs
def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(25)
    return {
        "gaussian 300x64": rng.normal(size=(300, 64)),
        "n<d 40x96": rng.normal(size=(40, 96)),
        # integer factors: the product is exact in float32, so its rank is exactly 5 there too
        "low rank 5 of 200x60": (rng.integers(-3, 4, size=(200, 5))
                                 @ rng.integers(-3, 4, size=(5, 60))).astype(np.float64),
        "raw 1e3 scale 400x120": 1e3 * (rng.normal(size=(400, 120)) * np.arange(1, 121) ** -0.6
                                        + 0.5),
    }


INPUTS = _inputs()
CASES = [(name, dtype) for name in INPUTS for dtype in (torch.float32, torch.float64)]


def _features(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """The input in ``dtype`` and, for the reference, the same values in float64."""
    z = torch.tensor(INPUTS[name], dtype=dtype)
    return z, z.double().numpy()


def _batches(z: torch.Tensor) -> list[torch.Tensor]:
    """Uneven batches, one of a single row; the running count crosses ``n = d`` inside one."""
    n = z.shape[0]
    cuts = sorted({min(n, c) for c in (0, 1, 8, z.shape[1] - 3, z.shape[1] + 5, n)})
    return [z[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _streamed(metric, z: torch.Tensor):
    for batch in _batches(z):
        metric.update(batch)
    return metric


def _merged(make, z: torch.Tensor, split: int):
    """A metric that saw ``z[:split]`` (in batches) merged with one that saw ``z[split:]``."""
    first, second = _streamed(make(), z[:split]), _streamed(make(), z[split:])
    return first.merge(second)


def _splits(z: torch.Tensor) -> list[int]:
    """Halves, and splits that leave one shard below ``d`` rows (it keeps its rows) and the
    other above (it keeps moments), in both orders."""
    n, d = z.shape
    return sorted({n // 2, min(d // 2, n - 1), max(1, n - d // 2)})


# ----------------------------------------------------------------------------- RankMe
@pytest.mark.parametrize("spectrum", S.SPECTRA)
@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_rankme_function_class_merge_equal_reference(name, dtype, spectrum):
    z, z64 = _features(name, dtype)
    want = ref_rankme(z64, spectrum)
    where = f"{name} {dtype} {spectrum}"
    assert_rel(S.rankme(z, spectrum=spectrum), want, TOL, f"function {where}")
    assert_rel(_streamed(S.RankMe(spectrum=spectrum), z).compute(), want, TOL,
               f"class in batches {where}")
    for split in _splits(z):
        merged = _merged(lambda: S.RankMe(spectrum=spectrum), z, split)
        assert merged.accumulator.n == z.shape[0]
        assert_rel(merged.compute(), want, TOL, f"merged at {split} {where}")
    spec = torch.from_numpy(ref_spectrum(z64, spectrum))
    assert_rel(S.rankme_from_spectrum(spec), want, TOL, f"from spectrum {where}")


@pytest.mark.parametrize("spectrum", S.SPECTRA)
def test_registered_probes_are_the_function(spectrum):
    """The probes ``rankme`` / ``rankme_covariance`` (direct call and the accumulator reader)
    give the function's value; ``rankme_covariance`` is ``spectrum="covariance"``."""
    z, z64 = _features("raw 1e3 scale 400x120", torch.float32)
    probe = get_probe("rankme" if spectrum == "singular" else "rankme_covariance")
    want = ref_rankme(z64, spectrum)
    assert_rel(probe(z), want, TOL, f"{probe.name} direct call")
    view = S._CachedSpectra(_streamed(S.RankMe(), z).accumulator)
    assert_rel(probe.from_accumulator(view).result(), want, TOL, f"{probe.name} reader")
    if spectrum == "covariance":
        assert S.rankme_covariance(z) == S.rankme(z, spectrum="covariance")


def test_rankme_eps_is_added_after_normalisation():
    z, z64 = _features("low rank 5 of 200x60", torch.float64)
    for eps in (0.0, 1e-3):
        for spectrum in S.SPECTRA:
            want = ref_rankme(z64, spectrum, eps)
            assert_rel(S.rankme(z, eps, spectrum), want, TOL, f"eps={eps} {spectrum}")
            assert_rel(_streamed(S.RankMe(eps, spectrum), z).compute(), want, TOL,
                       f"class eps={eps} {spectrum}")
    # ε = 0: RankMe of rank-5 features is at most 5; ε = 1e-3 lifts every one of the 55 zero
    # singular values to p = 1e-3, adding about 55·1e-3·ln(1e3) ≈ 0.38 nats to the entropy.
    assert S.rankme(z, 0.0) <= 5 + 1e-9
    assert np.log(S.rankme(z, 1e-3)) - np.log(S.rankme(z, 0.0)) > 0.3


# ----------------------------------------------------------------------------- alpha-ReQ
@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_alpha_req_function_class_merge_equal_reference(name, dtype):
    z, z64 = _features(name, dtype)
    lo, hi = 2, 30
    if name.startswith("low rank"):
        lo, hi = 0, 4  # five non-zero eigenvalues
    alpha, intercept = ref_alpha_fit(z64, lo, hi)
    where = f"{name} {dtype}"
    fit = S.alpha_req_fit(z, (lo, hi))
    assert_rel(fit.alpha, alpha, TOL, f"function {where}")
    assert_rel(fit.intercept, intercept, TOL, f"intercept {where}")
    assert S.alpha_req(z, (lo, hi)) == fit.alpha
    streamed = _streamed(S.AlphaReQ((lo, hi)), z)
    assert_rel(streamed.compute(), alpha, TOL, f"class in batches {where}")
    assert_rel(streamed.compute_fit().r2, fit.r2, TOL, f"class r2 {where}")
    for split in _splits(z):
        merged = _merged(lambda: S.AlphaReQ((lo, hi)), z, split)
        assert_rel(merged.compute(), alpha, TOL, f"merged at {split} {where}")
    spec = torch.from_numpy(ref_spectrum(z64, "covariance"))
    assert_rel(S.power_law_fit(spec, (lo, hi)).alpha, alpha, TOL, f"from spectrum {where}")


# ----------------------------------------------------------------------------- the class
@pytest.mark.parametrize("make", [lambda: S.RankMe(spectrum="covariance"),
                                  lambda: S.AlphaReQ((2, 30))],
                         ids=["RankMe", "AlphaReQ"])
def test_streaming_metric_pickles(make):
    z, _ = _features("raw 1e3 scale 400x120", torch.float64)
    empty = pickle.loads(pickle.dumps(make()))
    assert_rel(_streamed(empty, z).compute(), _streamed(make(), z).compute(), TOL, "empty copy")
    for rows in (50, 300):  # the state keeps rows (n < d = 120), then moments
        metric = _streamed(make(), z[:rows])
        copy = pickle.loads(pickle.dumps(metric))
        assert copy.compute() == metric.compute()
        assert copy.update(z[rows:]).compute() == metric.update(z[rows:]).compute()


def test_merge_reset_and_errors():
    z, z64 = _features("gaussian 300x64", torch.float64)
    want = ref_rankme(z64)
    # Every streaming spectral metric keeps the same state: an AlphaReQ's rows merge in.
    metric = S.RankMe().update(z[:100]).merge(S.AlphaReQ().update(z[100:]))
    assert_rel(metric.compute(), want, TOL, "merged from AlphaReQ")
    metric = S.RankMe().merge(S.SpectrumAccumulator().update(z))
    assert_rel(metric.compute(), want, TOL, "merged from an accumulator")
    empty_merge = S.RankMe().update(z).merge(S.RankMe())
    assert_rel(empty_merge.compute(), want, TOL, "merged with an empty metric")
    with pytest.raises(ValueError, match="itself"):
        metric.merge(metric)
    with pytest.raises(TypeError, match="cannot merge"):
        metric.merge(z)
    metric.reset()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()
    assert_rel(metric.update(torch.flip(z, [0])).compute(), want, TOL, "after reset")
    with pytest.raises(ValueError, match="spectrum must be"):
        S.RankMe(spectrum="centred")
    with pytest.raises(ValueError, match="spectrum must be"):
        S.rankme(z, spectrum="centred")
    with pytest.raises(ValueError, match="fit_range"):
        S.AlphaReQ((5, 5))
