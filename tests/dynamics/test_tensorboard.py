"""Live scalars: the Monitor's evaluations as TensorBoard scalars.  The event file is read back
with TensorBoard's own reader and compared with the Monitor's Dataset (float32, as TensorBoard
stores scalars)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import linear
from traindyn.dynamics.tensorboard import scalar_series

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(
    not HAS_TENSORBOARD,
    reason="the tensorboard package is not installed (pip install tensorboard, or "
           "traindyn[tensorboard]); torch.utils.tensorboard cannot write without it")


def test_scalar_series_tags_and_values():
    ds = xr.Dataset(
        {"rankme": (("step", "layer"), [[1.0, 2.0], [3.0, np.nan]]),
         "train_loss": ("step", [0.5, 0.25]),
         "acc": (("seed", "step"), [[0.1, 0.2], [0.3, 0.4]]),
         "spectrum": (("step", "rank"), np.ones((2, 3))),
         "status": ("step", ["ok", "ok"])},
        coords={"step": [0, 10], "layer": ["enc.0", "enc.1"], "seed": [3, 4]})
    got = list(scalar_series(ds))
    expected = [("rankme/enc.0", 0, 1.0), ("rankme/enc.0", 10, 3.0),
                ("rankme/enc.1", 0, 2.0), ("rankme/enc.1", 10, np.nan),
                ("train_loss", 0, 0.5), ("train_loss", 10, 0.25),
                ("acc/seed3", 0, 0.1), ("acc/seed3", 10, 0.2),
                ("acc/seed4", 0, 0.3), ("acc/seed4", 10, 0.4)]
    assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in expected]
    np.testing.assert_array_equal([v for *_, v in got], [v for *_, v in expected])


def _train(background, **options):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU())
    heard: list[xr.Dataset] = []
    monitor = Monitor(model, probes=["rankme", "alpha_req"], layers=["1", "3"],
                      schedule=linear(2), probe_data=torch.randn(50, 5), learning_rate=0.05,
                      background=background, probe_kwargs={"alpha_req": {"fit_range": (1, 8)}},
                      **options)
    monitor.on_record.append(heard.append)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 5), torch.randn(64, 12)
    with monitor:
        for step in range(7):
            loss = nn.functional.mse_loss(model(x), y)
            monitor.step(step, train_loss=loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return monitor.to_dataset(), heard


@pytest.mark.parametrize("background", [False, "thread", "process"])
def test_on_record_hears_every_evaluation(background):
    ds, heard = _train(background)
    assert [int(h["step"].item()) for h in heard] == [0, 2, 4, 6]
    for h in heard:
        step = int(h["step"].item())
        for name in ("rankme", "alpha_req", "train_loss"):
            np.testing.assert_array_equal(h[name].squeeze("step").values,
                                          ds[name].sel(step=step).values)


@needs_tensorboard
@pytest.mark.parametrize("background", [False, "thread"])
def test_tensorboard_event_file_equals_the_dataset(tmp_path, background):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ds, _ = _train(background, tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"rankme/1", "rankme/3", "alpha_req/1", "alpha_req/3", "alpha_req_r2/1",
                    "alpha_req_r2/3", "train_loss"}
    for tag in tags:
        name, *layer = tag.split("/")
        expected = ds[name] if not layer else ds[name].sel(layer=layer[0])
        read = events.Scalars(tag)
        assert [e.step for e in read] == [0, 2, 4, 6]
        np.testing.assert_array_equal(np.array([e.value for e in read], dtype=np.float32),
                                      expected.values.astype(np.float32))


def test_tensorboard_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Monitor(nn.Linear(2, 2), probes=[], tensorboard=tmp_path / "tb")
