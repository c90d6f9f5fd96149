"""CKA reference probes and invariance / Lie-derivative model probes through the probe contract:
``dynamics.Monitor`` during training and ``dynamics.analyze`` over a checkpoint series give the
numbers of direct calls of ``probes.similarity`` / ``probes.invariance``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.dynamics.analyze import analyze
from traindyn.dynamics.monitor import Monitor
from traindyn.probes import invariance as inv
from traindyn.probes import similarity as sim
from traindyn.probes.capture import capture

from tests.helpers import assert_rel

LAYERS = ["net.1", "net.3"]
INV_KW = {"layers": LAYERS, "transforms": ["shift:1", "noise:0.2"]}
LIE_KW = {"layers": LAYERS, "generators": ["translate", "noise"]}
FACTORY = '''
from torch import nn


class MLP(nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


def make_mlp(width=24):
    return MLP(width)
'''


def _features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), capture(model, LAYERS) as cap:
        model(x)
    return {name: cap[name] for name in LAYERS}


def _make(width: int = 24) -> nn.Module:
    namespace: dict = {}
    exec(FACTORY, namespace)  # noqa: S102 - the same factory analyze loads from its file
    torch.manual_seed(0)
    return namespace["make_mlp"](width)


def _drift(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("mode", [False, "thread", "process"])
def test_monitor_cka_references_and_invariance_equal_direct_calls(mode):
    """In every Monitor mode (process mode: the CKA references live in the worker)."""
    x = torch.randn(60, 64, generator=torch.Generator().manual_seed(5))
    model = _make()
    monitor = Monitor(model, probes=["rankme", "cka_first", "cka_previous", "invariance",
                                     "lie_derivative"],
                      layers=LAYERS, probe_data=x, schedule=lambda s: True, background=mode,
                      probe_kwargs={"invariance": INV_KW, "lie_derivative": LIE_KW,
                                    "cka_previous": {"debiased": True}})
    feats, direct_inv, direct_lie = [], [], []
    with monitor:
        for step in range(3):
            feats.append(_features(model, x))
            direct_inv.append(inv.invariance_probe(model, x, **INV_KW))
            direct_lie.append(inv.lie_derivative_probe(model, x, **LIE_KW))
            monitor.step(step)
            _drift(model, step)
    ds = monitor.to_dataset()
    for i in range(3):
        for j, layer in enumerate(LAYERS):
            first = sim.linear_cka(feats[0][layer], feats[i][layer])
            assert_rel(ds.cka_first.values[i, j], first, 1e-12, f"cka_first step {i}")
            if i == 0:
                assert np.isnan(ds.cka_previous.values[0, j])
            else:
                prev = sim.debiased_cka(feats[i - 1][layer], feats[i][layer])
                assert_rel(ds.cka_previous.values[i, j], prev, 1e-12, f"cka_previous {i}")
        for var in ("invariance_distance", "invariance_cka", "equivariance_error"):
            got = ds[var].isel(step=i).sel(transform=direct_inv[i].transform).transpose(
                "transform", "layer").values
            assert_rel(got, direct_inv[i][var].values, 1e-12, f"{var} step {i}")
        got = ds.lie_derivative.isel(step=i).sel(generator=direct_lie[i].generator).transpose(
            "generator", "layer").values
        assert_rel(got, direct_lie[i].lie_derivative.values, 1e-12, f"lie step {i}")
    assert ds.cka_first.values[0] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert float(ds.cka_first.values[2].max()) < 0.99  # the drift moved the representation
    assert ds.invariance_distance.dims[0] == "step"
    with pytest.raises(ValueError, match="final"):
        Monitor(_make(), probes=["cka_final"], layers=LAYERS, probe_data=x)


def test_analyze_checkpoint_series_equals_direct_checkpoint_cka(tmp_path):
    factory = tmp_path / "mlp_factory.py"
    factory.write_text(FACTORY)
    folder = tmp_path / "series"
    folder.mkdir()
    steps = [0, 5, 50]
    models = {}
    for step in steps:
        model = _make()
        if step:
            _drift(model, step)
        models[step] = model
        torch.save(model.state_dict(), folder / f"step{step}.pt")
    ds = analyze(folder, model=f"{factory}:make_mlp", layers=LAYERS, probe_data="digits",
                 n_samples=80, batch_size=80, progress=False,
                 probes=["cka_first", "cka_previous", "cka_final", "invariance"],
                 probe_kwargs={"invariance": INV_KW, "cka_final": {"debiased": True}})
    from traindyn.dynamics.probe_inputs import load_probe_inputs

    x = torch.cat([b.inputs for b in load_probe_inputs("digits", n_samples=80,
                                                       batch_size=80).batches])
    feats = {s: _features(models[s], x) for s in steps}
    for ref in ("first", "previous"):
        expected = sim.checkpoint_cka(feats, reference=ref)[f"cka_{ref}"]
        np.testing.assert_array_equal(np.isnan(ds[f"cka_{ref}"].values),
                                      np.isnan(expected.values))
        finite = ~np.isnan(expected.values)
        assert_rel(ds[f"cka_{ref}"].values[finite], expected.values[finite], 1e-10, ref)
    final = sim.checkpoint_cka(feats, reference="final", debiased=True).cka_final
    assert_rel(ds.cka_final.values, final.values, 1e-10, "final")
    direct = inv.invariance_probe(models[50], x, **INV_KW)
    got = ds.invariance_distance.sel(step=50, transform=direct.transform)
    assert_rel(got.transpose("transform", "layer").values,
               direct.invariance_distance.values, 1e-10, "invariance at step 50")
