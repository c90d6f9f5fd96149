"""probes._solve (batched eigensolves, CPU/GPU crossover), the spectrum accumulator's
``prepare`` and NC1 in class space, against float64 references.  No GPU needed:
the placement logic is tested with injected timings and a CUDA *device object*."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from traindyn.probes import _solve
from traindyn.probes import collapse as NC
from traindyn.probes import spectral as S
from traindyn.probes.evaluation import ProbePlan

from tests.probes.test_collapse import reference as ref_collapse
from tests.probes.test_spectral import ref_rankme, ref_rankme_cov

CUDA = torch.device("cuda")  # only a device object here: nothing is allocated on it


# ----------------------------------------------------------------------------- crossover rule
@pytest.mark.parametrize("timings, expected", [
    # device slower below 128, faster from 128 on
    ({32: (2e-3, 1e-4), 64: (2e-3, 4e-4), 128: (2e-3, 3e-3), 256: (3e-3, 2e-2)}, 128),
    # device always faster: nothing moves
    ({32: (1e-5, 1e-4), 64: (2e-5, 4e-4)}, 0),
    # device never faster in the measured range: everything measured goes to the CPU
    ({32: (2e-3, 1e-4), 64: (2e-3, 4e-4)}, 65),
    # a noisy win at 64 below a loss at 128 does not count: the device must win from d on
    ({32: (2e-3, 1e-4), 64: (1e-3, 2e-3), 128: (5e-3, 4e-3), 256: (3e-3, 2e-2)}, 256),
    # ties go to the device
    ({32: (1e-3, 1e-3), 64: (1e-3, 2e-3)}, 0),
])
def test_decide_crossover_from_injected_timings(timings, expected):
    assert _solve.decide_crossover(timings) == expected


def test_decide_crossover_rejects_bad_timings():
    with pytest.raises(ValueError, match="timings"):
        _solve.decide_crossover({})
    with pytest.raises(ValueError, match="timings"):
        _solve.decide_crossover({32: (float("nan"), 1.0)})


def test_crossover_precedence_and_cache(monkeypatch):
    monkeypatch.setattr(_solve, "_measured", {})
    monkeypatch.delenv(_solve.CROSSOVER_ENV, raising=False)
    calls = []

    def fake_measure(device):
        calls.append(str(device))
        return {32: (2e-3, 1e-4), 64: (2e-3, 4e-4), 128: (2e-3, 3e-3)}

    assert _solve.crossover("cpu", measure=fake_measure) == 0  # CPU: a no-op, nothing timed
    assert calls == []
    assert _solve.crossover(CUDA, measure=fake_measure) == 128
    assert _solve.crossover(CUDA, measure=fake_measure) == 128
    assert calls == ["cuda"]  # measured once per process and device
    monkeypatch.setenv(_solve.CROSSOVER_ENV, "300")
    assert _solve.crossover(CUDA, measure=fake_measure) == 300  # the environment beats it
    assert _solve.crossover(CUDA, override=7, measure=fake_measure) == 7  # the argument wins
    monkeypatch.setenv(_solve.CROSSOVER_ENV, "many")
    with pytest.raises(ValueError, match=_solve.CROSSOVER_ENV):
        _solve.crossover(CUDA)
    with pytest.raises(ValueError, match="crossover"):
        _solve.crossover(CUDA, override=-1)


def test_solve_device_places_small_cuda_solves_on_the_cpu(monkeypatch):
    monkeypatch.setenv(_solve.CROSSOVER_ENV, "256")
    assert _solve.solve_device(255, CUDA) == torch.device("cpu")
    assert _solve.solve_device(256, CUDA) == CUDA
    assert _solve.solve_device(8, torch.device("cpu")) == torch.device("cpu")
    assert _solve.solve_device(8, CUDA, override=0) == CUDA


def test_measure_timings_runs_on_the_cpu_with_an_injected_clock():
    ticks = iter(range(10_000))
    timings = _solve.measure_timings(torch.device("cpu"), sizes=(4, 8), repeats=3,
                                     timer=lambda: float(next(ticks)))
    assert set(timings) == {4, 8}
    assert all(t == (1.0, 1.0) for t in timings.values())  # one tick per timed call


# ----------------------------------------------------------------------------- float64 solves
def _spd(rng, d, n=None):
    x = rng.normal(size=(n or d + 3, d)) * np.linspace(1, 3, d)
    return x.T @ x


def test_eigvalsh_matches_numpy_float64(rng):
    for d in (1, 5, 40):
        a = _spd(rng, d)
        got = _solve.eigvalsh(torch.as_tensor(a)).numpy()
        want = np.linalg.eigvalsh(a)
        assert np.max(np.abs(got - want)) <= 1e-12 * np.abs(want).max()


def test_batched_eigvalsh_is_bit_identical_to_separate_solves_on_cpu(rng):
    mats = [torch.as_tensor(_spd(rng, d)) for d in (6, 6, 3, 6, 3, 9)]
    batched = _solve.batched_eigvalsh(mats)
    for m, b in zip(mats, batched, strict=True):
        single = _solve.eigvalsh(m)
        assert torch.equal(b, single)  # bit-identical, not merely close
        want = np.linalg.eigvalsh(m.numpy())
        assert np.max(np.abs(b.numpy() - want)) <= 1e-12 * np.abs(want).max()


class _Count:
    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, a, *args, **kw):
        self.shapes.append(tuple(a.shape))
        return self.fn(a, *args, **kw)


def test_prepare_batches_layers_and_gives_identical_values(rng, monkeypatch):
    probes = ["rankme", "rankme_covariance", "alpha_req", "participation_ratio",
              "stable_rank", "effective_rank"]
    kwargs = {"alpha_req": {"fit_range": (1, 5)}}
    feats = {
        "a": rng.normal(size=(40, 12)) * np.arange(1, 13) ** -0.5,
        "b": rng.normal(size=(40, 12)),
        "c": rng.normal(size=(30, 7)) + 1.0,
        "d": rng.normal(size=(5, 12)),  # n < d: the 5 × 5 Gram side
        "e": np.full((40, 12), np.nan),  # not finite: NaN with a note
    }
    plan = ProbePlan(probes, list(feats), probe_kwargs=kwargs)
    count = _Count(torch.linalg.eigvalsh)
    monkeypatch.setattr(torch.linalg, "eigvalsh", count)
    joint = plan.layer_values(plan.accumulate(feats))
    # raw and centred spectra of {a, b, e} (12 × 12, batched), c (7 × 7), d (5 × 5): 6 calls.
    # e's "not finite" flag stays on the device until the values are read, so its matrix is
    # solved as zeros with the others (no host wait to skip it) and its values become NaN
    assert sorted(count.shapes) == sorted([(3, 12, 12), (3, 12, 12), (7, 7), (7, 7),
                                           (5, 5), (5, 5)])
    monkeypatch.setattr(torch.linalg, "eigvalsh", count.fn)
    for layer, x in feats.items():
        single = ProbePlan(probes, [layer], probe_kwargs=kwargs)
        alone = single.layer_values(single.accumulate({layer: x}))
        for var, per_layer in joint.layer_values.items():
            a, b = per_layer[layer], alone.layer_values[var][layer]
            assert (np.isnan(a) and np.isnan(b)) or a == b, (layer, var, a, b)
    assert any("not finite" in note for note in joint.notes)
    for layer in "abcd":  # and the references (float64, independent)
        x = feats[layer]
        assert abs(joint.layer_values["rankme"][layer] - ref_rankme(x)) <= 1e-12 * ref_rankme(x)
        want = ref_rankme_cov(x)
        assert abs(joint.layer_values["rankme_covariance"][layer] - want) <= 1e-12 * want


def test_gram_side_gives_the_spectrum_when_n_below_d(rng):
    x = rng.normal(size=(9, 50))
    acc = S.SpectrumAccumulator().update(x[:4]).update(x[4:])
    assert acc._rows is not None  # still rows: the 9 × 9 Gram side is solved
    got = acc.singular_values().numpy()
    want = np.linalg.svd(x, compute_uv=False)
    assert np.max(np.abs(got - want)) <= 1e-12 * want[0]


# ----------------------------------------------------------------------------- NC1, C × C route
@settings(max_examples=25, deadline=None, derandomize=True)
@given(C=st.integers(2, 12), d=st.integers(2, 14), balanced=st.booleans(),
       seed=st.integers(0, 2**31 - 1), global_mean=st.sampled_from(NC.GLOBAL_MEANS))
def test_nc1_class_space_equals_feature_space(C, d, balanced, seed, global_mean):
    rng = np.random.default_rng(seed)
    sizes = np.full(C, 4) if balanced else rng.integers(2, 9, C)
    y = np.repeat(np.arange(C), sizes)
    h = rng.normal(size=(C, d))[y] * 3 + rng.normal(size=(len(y), d))
    st_ = NC.CollapseAccumulator().update(h, y).stats()
    means = st_.means
    mu_g = means.mean(0) if global_mean == "class_means" else \
        (st_.counts[:, None] * means).sum(0) / st_.counts.sum()
    m = (means - mu_g).T
    sigma_w = st_.scatter / len(y)
    fast, slow = NC.nc1_class_space(m, sigma_w), NC.nc1_feature_space(m, sigma_w)
    assert abs(fast - slow) <= 1e-10 * abs(slow)
    if global_mean == "class_means":  # and the brute-force reference of test_collapse
        want = ref_collapse(h, y)["nc1"]
        assert abs(fast - want) <= 1e-9 * abs(want)


@pytest.mark.parametrize("C, d", [(3, 40), (20, 21), (21, 20), (30, 30)])
def test_nc1_class_space_at_c_close_to_d(C, d, rng):
    y = np.repeat(np.arange(C), 3)
    h = rng.normal(size=(C, d))[y] * 2 + rng.normal(size=(len(y), d))
    st_ = NC.CollapseAccumulator().update(h, y).stats()
    m = (st_.means - st_.means.mean(0)).T
    sigma_w = st_.scatter / len(y)
    fast, slow = NC.nc1_class_space(m, sigma_w), NC.nc1_feature_space(m, sigma_w)
    assert abs(fast - slow) <= 1e-10 * abs(slow)
    assert NC.neural_collapse(h, y)["nc1"].item() == fast  # the route neural_collapse takes
