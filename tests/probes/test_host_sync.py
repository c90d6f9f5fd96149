"""No host synchronisation inside a probe evaluation until its values are read (issue #16).

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

from probes.evaluation import ProbePlan, evaluate
from probes.spectral import SpectralMetrics, rankme

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
        if module == "probes._solve":
            return None
        if found is None and module.split(".")[0] in ("probes", "dynamics"):
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
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 200), torch.nn.ReLU(),  # n < d: Gram side
                               torch.nn.Linear(200, 10)).double()


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
    assert mode.reads == [("probes._pending", "fetch", "to")], mode.reads
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
    assert mode.reads == [("probes._pending", "fetch", "to")], mode.reads
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
    assert mode.reads == [("probes._pending", "fetch", "to")], mode.reads
    assert values["rankme"] == pytest.approx(rankme(torch.cat(batches)), rel=1e-12)


def test_parameter_probes_read_once(model):
    """Weight spectra of three layers: singular values on the device, one read for all."""
    plan = ProbePlan(["weight_spectra"], ["0", "2", "4"])
    with HostReads() as mode:
        mode.taint(*model.parameters())
        out = plan.parameter_values(model)
    assert mode.reads == [("probes._pending", "fetch", "to")], mode.reads
    from probes.weights import weight_spectrum

    for layer in plan.layers:
        want = weight_spectrum(model[int(layer)].weight.detach())
        assert out.layer_values["weight_stable_rank"][layer] == want["stable_rank"]
        s = np.linalg.svd(model[int(layer)].weight.detach().numpy(), compute_uv=False)
        assert want["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-12)


def test_the_ntk_probe_reads_its_kernel_once(model):
    """The NTK model probe (structured derivatives, an output layer recognised from the
    recording): the kernel comes to the host in one copy, every summary is computed there.
    The first call also verifies its plan (reads once per model and input shape)."""
    from probes import kernels
    from probes.ntk import empirical_ntk

    plan = ProbePlan(["ntk"], [])
    x, y = torch.randn(30, 16, dtype=torch.float64), torch.arange(30) % 10
    plan.model_values(model, x, y)  # plans and verifies
    with HostReads() as mode:
        mode.taint(x, *model.parameters())
        out = plan.model_values(model, x, y)
    assert mode.reads == [("probes.ntk_probe", "ntk_values", "to")], mode.reads
    K = empirical_ntk(model, x, method="jacobian")
    assert out.values["ntk_alignment"] == pytest.approx(kernels.kernel_alignment(K, y), rel=1e-9)
    assert out.values["ntk_trace_mean"] == pytest.approx(float(K.diagonal().mean()), rel=1e-9)


def test_a_monitor_evaluation_reads_once_per_probe_family():
    """The Monitor (synchronous mode) adds no read of its own: one for the feature probes,
    one for the parameter probes."""
    from dynamics.monitor import Monitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    x, y = torch.randn(200, 16), torch.arange(200) % 10
    monitor = Monitor(model, probe_data=x, probe_targets=y, layers=["0", "2"],
                      probes=["rankme", "alpha_req", "neural_collapse", "weight_spectra"],
                      probe_kwargs={"alpha_req": {"fit_range": (1, 8)}},
                      schedule=lambda step: True)
    monitor.step(0)
    with HostReads() as mode:
        mode.taint(x, *model.parameters())
        monitor.step(1)
    assert mode.reads == [("probes._pending", "fetch", "to")] * 2, mode.reads
    ds = monitor.to_dataset()
    assert np.isfinite(ds["rankme"].sel(step=1)).all()
    assert ds["rankme"].sel(step=1, layer="0") == pytest.approx(
        rankme(model[0](x).detach()), rel=1e-12)


def test_a_probe_reading_the_view_never_sees_the_zeroed_matrix():
    """Non-finite features are solved as a zero matrix (no host wait to skip them); a
    third-party probe reading the shared view's spectra directly still gets NaN, not the zero
    matrix's finite spectrum (never silently wrong)."""
    from probes.spectral import SpectrumAccumulator, _CachedSpectra

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
