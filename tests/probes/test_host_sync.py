"""No host synchronisation inside a probe evaluation until its values are read.

On an accelerator, every read of a device tensor's value by Python (``float``, ``bool``,
``.item()``, ``.tolist()``, ``.numpy()``, a copy to the CPU, an op with a data-dependent shape)
makes the host wait for the device.  Without a GPU, the test simulates one: the probe input is
*tainted* as "device" data, every tensor computed from it inherits the taint (including state
created with ``device=`` of a tainted tensor), and each host read of a tainted tensor is
recorded with the probes' function that made it.  Tensors the host makes itself (labels,
class counts) stay host tensors, as they would next to a GPU.

The evaluation may read the device once: :func:`probes._pending.fetch`.  Eigensolves
(:mod:`probes._solve`) are exempt — torch checks LAPACK's ``info`` on the host after a CUDA
``eigvalsh`` (a C++ wait no Python code can avoid), and a solve placed on the CPU copies its
matrix there; both happen once per batch of same-shaped matrices.
"""

from __future__ import annotations

import sys
import weakref

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from traindyn.probes.evaluation import ProbePlan, evaluate
from traindyn.probes.spectral import SpectralMetrics, rankme

from tests._tiny_models import mlp

READS = {"__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy", "cpu",
         "unique", "unique_consecutive", "nonzero", "argwhere", "bincount", "masked_select",
         "repeat_interleave", "__array__", "equal"}
"""Tensor operations that make the host wait for a device tensor's value."""

FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "eye", "linspace"}


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _to_cpu(args, kwargs) -> bool:
    targets = [*args[1:], kwargs.get("device")]
    return any((isinstance(t, str) and t.startswith("cpu"))
               or (isinstance(t, torch.device) and t.type == "cpu") for t in targets)


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    return any(t.dtype == torch.bool for t in _tensors(index, []))


def _caller() -> tuple[str, str] | None:
    """(module, function) of the innermost traindyn frame; ``None`` inside probes._solve."""
    frame = sys._getframe(2)
    found = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == "traindyn.probes._solve":
            return None
        if found is None and module.split(".")[:2] in (["traindyn", "probes"],
                                                       ["traindyn", "dynamics"]):
            found = (module, frame.f_code.co_name)
        frame = frame.f_back
    return found or ("test", "?")


class HostReads(TorchFunctionMode):
    """Record host reads of "device" (tainted) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self._device: dict[int, weakref.ref] = {}
        self.reads: list[tuple[str, str, str]] = []

    def taint(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._device[id(t)] = weakref.ref(t)

    def on_device(self, t: torch.Tensor) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        on_device = any(self.on_device(t) for t in inputs)
        device_kw = kwargs.get("device")
        if not on_device and name in FACTORIES and isinstance(device_kw, torch.device):
            on_device = True  # state made "on the features' device" (device=z.device)
        is_read = on_device and (name in READS or (name == "to" and _to_cpu(args, kwargs))
                                 or (name == "__getitem__" and _bool_index(args)))
        if is_read:
            where = _caller()
            if where is None:  # inside an eigensolve (exempt): its result is still on the device
                is_read = False
            else:
                self.reads.append((*where, name))
        result = func(*args, **kwargs)
        if on_device and not is_read:
            self.taint(*_tensors(result, []))
        elif is_read:  # what a copy to the host returns is a host tensor (on the CPU, to("cpu")
            for t in _tensors(result, []):  # returns its input itself)
                self._device.pop(id(t), None)
        return result


PROBES = ["rankme", "rankme_covariance", "alpha_req", "participation_ratio", "stable_rank",
          "effective_rank", "neural_collapse"]
KWARGS = {"alpha_req": {"fit_range": (2, 20)}}


@pytest.fixture
def model():
    return mlp(16, 64, 200, 10, seed=0, double=True)  # 200 features, n < d: Gram side


def test_the_recorder_sees_reads_it_should():
    """The check can fail: each way of reading a device value is recorded."""
    x = torch.randn(8, 3)
    with HostReads() as mode:
        mode.taint(x)
        y = (x * 2).sum(0)
        float(y[0])
        bool((y > 0).any())
        y.tolist()
        y[y > 0]
        torch.zeros(3, device=x.device) + 1  # a factory on the device, then...
        (torch.zeros(3, device=x.device) + 1).cpu()  # ...a copy to the host
        torch.tensor([1, 2]).tolist()  # a host tensor: not a read
        torch.equal(y, y)
    assert [r[2] for r in mode.reads] == ["__float__", "__bool__", "tolist", "__getitem__",
                                          "cpu", "equal"]


def test_an_evaluation_reads_the_device_once(model):
    """Forward pass with hooks, streaming accumulators over 3 batches, every spectral probe
    and neural collapse on 3 layers (one on the n × n Gram side): one read, in fetch."""
    plan = ProbePlan(PROBES, ["0", "2", "4"], probe_kwargs=KWARGS)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(40, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    labels = [torch.arange(40) % 10 for _ in range(3)]  # host labels, as the Monitor keeps them
    with HostReads() as mode:
        mode.taint(*batches)
        out = evaluate(plan, model, batches, labels=labels)
    assert mode.reads == [("traindyn.probes._pending", "fetch", "to")], mode.reads
    # the values are the probes' own (read the ordinary way, outside the recorder)
    feats = {}
    hooks = [model[int(k)].register_forward_hook(
        lambda mod, i, o, k=k: feats.setdefault(k, []).append(o)) for k in plan.layers]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    for layer, xs in feats.items():
        x = torch.cat(xs)
        assert out.layer_values["rankme"][layer] == pytest.approx(rankme(x), rel=1e-12)
    assert np.isfinite(out.layer_values["nc1"]["4"])


def test_nan_checks_are_read_with_the_values():
    """Non-finite features give NaN and the warning, still with one read."""
    gen = torch.Generator().manual_seed(2)
    feats = {"ok": torch.randn(60, 12, generator=gen, dtype=torch.float64),
             "bad": torch.randn(60, 12, generator=gen, dtype=torch.float64)}
    feats["bad"][3, 4] = float("nan")
    labels = torch.arange(60) % 3
    plan = ProbePlan(PROBES, list(feats), probe_kwargs={"alpha_req": {"fit_range": (1, 8)}})
    with HostReads() as mode:
        mode.taint(*feats.values())
        out = plan.layer_values(plan.accumulate(feats, labels))
    assert mode.reads == [("traindyn.probes._pending", "fetch", "to")], mode.reads
    assert np.isnan(out.layer_values["rankme"]["bad"])
    assert np.isnan(out.layer_values["nc1"]["bad"])
    assert np.isfinite(out.layer_values["rankme"]["ok"])
    assert any("not finite" in n for n in out.layer_notes["bad"])
    assert "ok" not in out.layer_notes


def test_streaming_metrics_read_once():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(50, 30, generator=gen, dtype=torch.float64) for _ in range(4)]
    metrics = SpectralMetrics(["rankme", "alpha_req", "participation_ratio", "stable_rank"],
                              fit_range=(1, 20))
    with HostReads() as mode:
        mode.taint(*batches)
        for b in batches:
            metrics.update(b)
        values = metrics.compute()
    assert mode.reads == [("traindyn.probes._pending", "fetch", "to")], mode.reads
    assert values["rankme"] == pytest.approx(rankme(torch.cat(batches)), rel=1e-12)


def test_parameter_probes_read_once(model):
    """Weight spectra of three layers: singular values on the device, one read for all."""
    plan = ProbePlan(["weight_spectra"], ["0", "2", "4"])
    with HostReads() as mode:
        mode.taint(*model.parameters())
        out = plan.parameter_values(model)
    assert mode.reads == [("traindyn.probes._pending", "fetch", "to")], mode.reads
    from traindyn.probes.weights import weight_spectrum

    for layer in plan.layers:
        want = weight_spectrum(model[int(layer)].weight.detach())
        assert out.layer_values["weight_stable_rank"][layer] == want["stable_rank"]
        s = np.linalg.svd(model[int(layer)].weight.detach().numpy(), compute_uv=False)
        assert want["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-12)


def test_the_ntk_probe_reads_its_kernel_once(model):
    """The NTK model probe (structured derivatives, an output layer recognised from the
    recording): the kernel comes to the host in one copy, every summary is computed there.
    The first call also verifies its plan (reads once per model and input shape)."""
    from traindyn.probes import kernels
    from traindyn.probes.ntk import empirical_ntk

    plan = ProbePlan(["ntk"], [])
    x, y = torch.randn(30, 16, dtype=torch.float64), torch.arange(30) % 10
    plan.model_values(model, x, y)  # plans and verifies
    with HostReads() as mode:
        mode.taint(x, *model.parameters())
        out = plan.model_values(model, x, y)
    assert mode.reads == [("traindyn.probes.ntk_probe", "ntk_values", "to")], mode.reads
    K = empirical_ntk(model, x, method="jacobian")
    assert out.values["ntk_alignment"] == pytest.approx(kernels.kernel_alignment(K, y), rel=1e-9)
    assert out.values["ntk_trace_mean"] == pytest.approx(float(K.diagonal().mean()), rel=1e-9)


def test_a_monitor_evaluation_reads_once_per_probe_family():
    """The Monitor (synchronous mode) adds no read of its own: one for the feature probes,
    one for the parameter probes."""
    from traindyn.dynamics.monitor import Monitor

    model = mlp(16, 64, 10, seed=0)
    x, y = torch.randn(200, 16), torch.arange(200) % 10
    monitor = Monitor(model, probe_data=x, probe_labels=y, layers=["0", "2"],
                      probes=["rankme", "alpha_req", "neural_collapse", "weight_spectra"],
                      probe_kwargs={"alpha_req": {"fit_range": (1, 8)}},
                      schedule=lambda step: True)
    monitor.step(0)
    with HostReads() as mode:
        mode.taint(x, *model.parameters())
        monitor.step(1)
    assert mode.reads == [("traindyn.probes._pending", "fetch", "to")] * 2, mode.reads
    ds = monitor.to_dataset()
    assert np.isfinite(ds["rankme"].sel(step=1)).all()
    assert ds["rankme"].sel(step=1, layer="0") == pytest.approx(
        rankme(model[0](x).detach()), rel=1e-12)


def test_a_probe_reading_the_view_never_sees_the_zeroed_matrix():
    """Non-finite features are solved as a zero matrix (no host wait to skip them); a
    third-party probe reading the shared view's spectra directly still gets NaN, not the zero
    matrix's finite spectrum (never silently wrong)."""
    from traindyn.probes.spectral import SpectrumAccumulator, _CachedSpectra

    x = torch.randn(50, 8, dtype=torch.float64)
    x[3, 2] = float("inf")
    view = _CachedSpectra(SpectrumAccumulator().update(x))
    for spectrum in (view.eigenvalues(False), view.eigenvalues(True), view.singular_values(),
                     view.covariance_spectrum()):
        assert torch.isnan(spectrum).all()
    few = _CachedSpectra(SpectrumAccumulator().update(x[:5]))  # n < d: padded spectrum
    assert few.covariance_spectrum().shape == (8,)
    assert torch.isnan(few.covariance_spectrum()).all()
    ok = _CachedSpectra(SpectrumAccumulator().update(x[4:]))
    want = np.linalg.eigvalsh(np.cov(x[4:].numpy().T, bias=True))[::-1]
    assert np.allclose(ok.covariance_spectrum().numpy(), want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- reference and model probes
FETCH = ("traindyn.probes._pending", "fetch", "to")


def _mlp(width: int = 64) -> torch.nn.Sequential:
    return mlp(16, width, 10, seed=0, double=True)


def _features(model: torch.nn.Sequential, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Layers "0" and "2" of ``model`` on ``x``, by plain forward calls (no hooks, no probes)."""
    with torch.no_grad():
        h = model[0](x)
        return {"0": h.numpy(), "2": model[2](torch.relu(h)).numpy()}


def _linear_cka_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """Kornblith et al. (ICML 2019), Eq. 5: ‖B_cᵀA_c‖²_F / (‖A_cᵀA_c‖_F ‖B_cᵀB_c‖_F)."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float(np.linalg.norm(b.T @ a) ** 2
                 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def _monitor_step_reads(model, x, probes, steps=2, between=None):
    """Run a synchronous Monitor for ``steps`` evaluations (``between()`` after each but the
    last) and return (the host reads of the last one, the monitor)."""
    from traindyn.dynamics.monitor import Monitor

    monitor = Monitor(model, probe_data=x, probe_labels=torch.arange(len(x)) % 10,
                      layers=["0", "2"], probes=probes, schedule=lambda step: True)
    for step in range(steps - 1):
        monitor.step(step)
        if between is not None:
            between()
    with HostReads() as mode:
        mode.taint(x, *model.parameters())
        monitor.step(steps - 1)
    return mode.reads, monitor


def test_cka_reference_states_come_to_the_host_in_the_one_fetch():
    """cka_first + cka_previous on two layers — layer "0" wider than the 200 probe inputs (its
    state is the n × n kernel), layer "2" narrower (its state is the features): all four
    states come in the one copy of the feature probes.  (Before: one ``.cpu()`` per probe and
    layer in ``_cka_state``, 4 reads.)  Values: the hand formula on plainly computed
    features of the first, previous and current weights."""
    model = _mlp(width=256)
    x = torch.randn(200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    snapshots = [_features(model, x)]
    gen = torch.Generator().manual_seed(6)

    def train():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        snapshots.append(_features(model, x))

    reads, monitor = _monitor_step_reads(model, x, ["cka_first", "cka_previous"], steps=3,
                                         between=train)
    assert reads == [FETCH], reads
    ds = monitor.to_dataset()
    first, previous, now = snapshots
    for layer in ("0", "2"):
        want_first = _linear_cka_by_hand(first[layer], now[layer])
        want_previous = _linear_cka_by_hand(previous[layer], now[layer])
        assert want_first < 0.99  # the weights did move: a comparison that can be wrong
        assert float(ds["cka_first"].sel(step=2, layer=layer)) == pytest.approx(
            want_first, rel=1e-12)
        assert float(ds["cka_previous"].sel(step=2, layer=layer)) == pytest.approx(
            want_previous, rel=1e-12)


def test_rbf_cka_state_is_computed_on_the_device():
    """The RBF kernel state (σ² = bandwidth² × median squared distance, Kornblith et al. 2019,
    Sec. 3) is built without an ``if`` on σ² on the host: one read for two layers (before:
    a ``__bool__`` in ``gram_rbf`` and a ``.cpu()`` per layer).  Its kernel equals the hand
    formula, and a constant layer gets the all-ones kernel (σ² = 0) as before."""
    gen = torch.Generator().manual_seed(7)
    feats = {"a": torch.randn(30, 5, dtype=torch.float64, generator=gen),
             "const": torch.ones(30, 5, dtype=torch.float64)}
    plan = ProbePlan(["cka_first"], list(feats), probe_kwargs={"cka_first": {"kernel": "rbf"}})
    with HostReads() as mode:
        mode.taint(*feats.values())
        out = plan.layer_values(plan.accumulate(feats))
    assert mode.reads == [FETCH], mode.reads
    z = feats["a"].numpy()
    sq = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    sigma2 = 0.5**2 * np.median(sq[np.triu_indices(30, 1)])
    got = out.states[("cka_first", "a")]["kernel"]
    assert np.allclose(got, np.exp(-sq / (2 * sigma2)), rtol=1e-12, atol=1e-14)
    assert np.array_equal(out.states[("cka_first", "const")]["kernel"], np.ones((30, 30)))


def test_invariance_probe_reads_once_in_a_monitor_step():
    """The ``invariance`` model probe (default transforms shift:1 and noise:0.1, two layers):
    distances, CKAs, equivariance fits and their NaN checks on the device, one read.  (Before:
    64 reads — finiteness checks, ``float`` of each score and of the noise scale.)  Values:
    Speicher et al.'s distance and linear CKA by hand, the equivariance error of the one-shot
    function, all on features of plainly transformed inputs."""
    from scipy.spatial.distance import pdist
    from traindyn.probes.invariance import equivariance_error

    model = _mlp()
    x = torch.randn(200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    reads, monitor = _monitor_step_reads(model, x, ["invariance"])
    assert reads == [FETCH], reads
    ds = monitor.to_dataset().sel(step=1)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    moved = {"shift:1": torch.roll(x, 1, -1), "noise:0.1": x + 0.1 * float(x.std()) * eps}
    clean = _features(model, x)
    for spec, gx in moved.items():
        after = _features(model, gx)
        for layer in ("0", "2"):
            f, fg = clean[layer], after[layer]
            distance = np.linalg.norm(fg - f, axis=1).mean() / pdist(f).mean()
            got = ds.sel(transform=spec, layer=layer)
            assert float(got["invariance_distance"]) == pytest.approx(distance, rel=1e-12)
            assert float(got["invariance_cka"]) == pytest.approx(_linear_cka_by_hand(f, fg),
                                                                 rel=1e-12)
            assert float(got["equivariance_error"]) == pytest.approx(
                equivariance_error(f, fg), rel=1e-12)
    assert float(ds["invariance_distance"].sel(transform="noise:0.1", layer="0")) > 0.01


def test_lie_derivative_probe_reads_once_in_a_monitor_step():
    """The ``lie_derivative`` model probe (generator: Fourier translation of the last axis,
    mean-square convention of Gruver et al. 2023, Eq. 4): one read.  (Before: 5 — a
    finiteness check and a ``float`` per layer, a no-op ``.to``.)  Values by hand: with
    ``∂g = Re F⁻¹[−2πik F x]`` the derivative of the translation at 0, the Lie derivative of
    ``h = W₀x + b₀`` is ``∂g W₀ᵀ`` and of ``W₂ relu(h) + b₂`` is ``(1[h > 0] ⊙ ∂g W₀ᵀ) W₂ᵀ``.
    (The first forward-mode evaluation in a process imports ``torch._dynamo``: ~3 s once.)"""
    model = _mlp()
    x = torch.randn(200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    reads, monitor = _monitor_step_reads(model, x, ["lie_derivative"])
    assert reads == [FETCH], reads
    ds = monitor.to_dataset().sel(step=1, generator="translate")
    k = np.fft.fftfreq(16)
    dg = np.real(np.fft.ifft(np.fft.fft(x.numpy(), axis=-1) * (-2j * np.pi * k), axis=-1))
    w0, w2 = model[0].weight.detach().numpy(), model[2].weight.detach().numpy()
    lie0 = dg @ w0.T
    lie2 = ((_features(model, x)["0"] > 0) * lie0) @ w2.T
    for layer, lie in (("0", lie0), ("2", lie2)):
        assert float(ds["lie_derivative"].sel(layer=layer)) == pytest.approx(
            float(np.mean(lie**2)), rel=1e-12)


def test_model_probes_share_one_read_and_keep_their_nan_warnings():
    """``ProbePlan.model_values`` fetches the pendings of all its model probes together: the
    invariance and Lie-derivative probes read once between them.  Non-finite inputs and a
    dead (constant) layer still give NaN with the reason (never a finite wrong value), and
    the Lie derivative of a constant layer is exactly 0."""
    model = _mlp()
    with torch.no_grad():
        model[0].weight.zero_()  # layer "0" constant over inputs, and so layer "2"
    x = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    plan = ProbePlan(["invariance", "lie_derivative"], ["0", "2"])
    with HostReads() as mode:
        mode.taint(x, *model.parameters())
        out = plan.model_values(model, x)
    assert mode.reads == [FETCH], mode.reads
    for name in ("invariance_distance", "invariance_cka", "equivariance_error"):
        assert np.isnan(out.values[name].values).all(), name
    assert (out.values["lie_derivative"].values == 0).all()
    for reason in ("invariance distance: the representation is constant over inputs",
                   "linear CKA: a representation is constant",
                   "equivariance error: the transformed representation is constant"):
        assert any(n.startswith(reason) for n in out.notes), (reason, out.notes)

    bad = x.clone()
    bad[3, 4] = float("nan")
    with HostReads() as mode:
        mode.taint(bad, *_mlp().parameters())
        out = ProbePlan(["invariance", "lie_derivative"], ["0", "2"]).model_values(_mlp(), bad)
    for name in ("invariance_distance", "invariance_cka", "equivariance_error",
                 "lie_derivative"):
        assert np.isnan(out.values[name].values).all(), name
    for reason in ("invariance distance: the representations are not finite",
                   "linear CKA: the representations are not finite",
                   "equivariance error: the representations are not finite",
                   "Lie derivative: values are not finite"):
        assert reason in out.notes, (reason, out.notes)


def test_a_reference_probe_may_leave_only_its_state_pending():
    """A reference probe answering ``(values, Pending state)`` (not one Pending for both): the
    plan brings the state in its one fetch, for feature and for model probes alike, and files
    the finished state (here the mean feature vector, checked against numpy)."""
    from traindyn.probes._pending import Pending
    from traindyn.probes.registry import Probe

    def mean_state(z: torch.Tensor) -> Pending:
        return Pending({"mean": z.double().mean(0)}, lambda host: host["mean"].copy())

    def drift(state, reference):
        ref = reference.get("previous")
        return {"toy_drift": np.nan if ref is None else float(np.abs(state - ref).sum())}

    feature_probe = Probe("toy_feature_state", "features", {"toy_drift": ("drift", "1")},
                          source="test", fn=lambda z: ({}, mean_state(z)),
                          reference=("previous",), compare=drift)
    model_probe = Probe("toy_model_state", "model", {"toy_drift": ("drift", "1")},
                        source="test", reference=("previous",), compare=drift,
                        fn=lambda model, x, targets=None: ({}, mean_state(model(x))))
    model = _mlp()
    x = torch.randn(30, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    feats = _features(model, x)
    plan = ProbePlan([feature_probe], ["0", "2"])
    with HostReads() as mode:
        mode.taint(x, *model.parameters())
        with torch.no_grad():
            h = model[0](x)
            device_feats = {"0": h, "2": model[2](torch.relu(h))}
        out = plan.layer_values(plan.accumulate(device_feats))
        out_model = ProbePlan([model_probe]).model_values(model, x)
    assert mode.reads == [FETCH, FETCH], mode.reads
    for layer in ("0", "2"):
        assert np.allclose(out.states[("toy_feature_state", layer)], feats[layer].mean(0),
                           rtol=1e-13, atol=0)
    with torch.no_grad():
        want = model(x).numpy().mean(0)
    assert np.allclose(out_model.states[("toy_model_state", None)], want, rtol=1e-13, atol=0)


def test_fetch_copies_a_shared_tensor_once_and_gather_keeps_order():
    """Two pendings reading the same tensor (two reference probes' state of one layer) get it
    from one copy; ``gather`` finishes its parts in order, their warnings in that order."""
    import warnings

    from traindyn.probes._pending import Pending, fetch, gather

    t, u = torch.arange(6.0).reshape(2, 3), torch.tensor([7.0])
    copied = []
    real_cat = torch.cat

    def counting_cat(parts, *args, **kwargs):
        copied.append(sum(p.numel() for p in parts))
        return real_cat(parts, *args, **kwargs)

    first, second = Pending({"a": t, "u": u}, dict), Pending({"b": t}, dict)
    torch.cat = counting_cat
    try:
        host = fetch([first, second])
    finally:
        torch.cat = real_cat
    assert copied == [7]  # t (6) and u (1), not t twice
    np.testing.assert_array_equal(host[0]["a"], t.numpy())
    np.testing.assert_array_equal(host[1]["b"], t.numpy())
    assert host[0]["u"].tolist() == [7.0]

    def part(i):
        def finish(h):
            warnings.warn(f"part {i}", RuntimeWarning, stacklevel=1)
            return float(h["x"].sum())
        return Pending({"x": torch.full((2,), float(i))}, finish)

    both = gather([part(1), part(2)], lambda results: results)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert both.result() == [2.0, 4.0]
    assert [str(w.message) for w in caught] == ["part 1", "part 2"]


def test_streaming_minibatch_cka_reads_once_at_compute():
    """Minibatch CKA (Nguyen et al. 2021, Eq. 3): no read while batches stream in (a non-finite
    batch is flagged on the device), one read in compute(); the matrix equals the hand formula
    from per-batch unbiased HSICs, and a NaN batch gives NaN with a warning."""
    from traindyn.probes._hsic import hsic_unbiased
    from traindyn.probes.similarity import MinibatchCKA

    gen = torch.Generator().manual_seed(7)
    batches = [{"a": torch.randn(16, 5, generator=gen, dtype=torch.float64),
                "b": torch.randn(16, 9, generator=gen, dtype=torch.float64)} for _ in range(3)]
    acc = MinibatchCKA()
    with HostReads() as mode:
        for x in batches:
            mode.taint(*x.values())
            acc.update(x)
        assert mode.reads == [], mode.reads
        got = acc.compute()
    assert len(mode.reads) == 1, mode.reads

    def mean_hsic(u, v):
        return np.mean([float(hsic_unbiased(x[u] @ x[u].T, x[v] @ x[v].T)) for x in batches])

    for i, u in enumerate("ab"):
        for j, v in enumerate("ab"):
            want = mean_hsic(u, v) / np.sqrt(mean_hsic(u, u) * mean_hsic(v, v))
            assert got[i, j] == pytest.approx(want, rel=1e-12)
    bad = {k: t.clone() for k, t in batches[0].items()}
    bad["b"][3, 1] = float("nan")
    acc.update(bad)
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert np.isnan(acc.compute()).all()
