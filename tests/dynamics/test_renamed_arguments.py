"""The probe batch is ``probe_data`` and its labels ``probe_labels`` in the Monitor, ``analyze``,
the Lightning callback and the CLI; the other spellings still work for one release, give the
same Dataset, and warn with a ``DeprecationWarning`` naming the new spelling."""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics._renamed import rename_kwargs, renamed_kwargs
from traindyn.dynamics.analyze import TIMING_VARIABLES, analyze
from traindyn.dynamics.cli_analyze import add_parser
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import linear

from tests._tiny_models import mlp


def test_rename_kwargs_moves_the_old_keyword_and_warns():
    @renamed_kwargs(old="new")
    def f(*, new=None, other=0):
        return new, other

    with pytest.warns(DeprecationWarning, match=r"old= is deprecated; use new="):
        assert f(old=3, other=1) == (3, 1)
    assert f(new=4) == (4, 0)
    with pytest.raises(TypeError, match="new= only"):
        f(old=1, new=2)
    assert list(inspect.signature(f).parameters) == ["new", "other"]
    kwargs = {"a": 1}
    assert rename_kwargs(kwargs, {"b": "c"}, "g") == {"a": 1}  # nothing to rename: no warning


def _monitored(**probe_kwargs) -> xr.Dataset:
    model = mlp(6, 8, 3, seed=0)
    torch.manual_seed(1)
    x, y = torch.randn(30, 6), torch.arange(30) % 3
    with Monitor(model, probes=["rankme", "neural_collapse"], layers=["0", "2"],
                 schedule=linear(2), probe_data=x, learning_rate=0.1,
                 **{k: y for k in probe_kwargs}) as monitor:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(step, train_loss=loss.item())
            opt.step()
    with pytest.warns(DeprecationWarning, match="use Monitor.probe_labels"):
        assert monitor.probe_targets is monitor.probe_labels
    return monitor.to_dataset()


def test_monitor_probe_targets_is_probe_labels_with_a_warning():
    new = _monitored(probe_labels=None)
    with pytest.warns(DeprecationWarning, match="Monitor: probe_targets= is deprecated; "
                                                "use probe_labels="):
        old = _monitored(probe_targets=None)
    assert "nc1" in new and new["nc1"].notnull().all()   # the labels reached the probe
    xr.testing.assert_identical(old.drop_attrs(), new.drop_attrs())


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("renamed")
    model = _make()
    for step in (1, 2):
        torch.manual_seed(step)
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        torch.save(model.state_dict(), folder / f"step{step}.pt")
    return folder


def _make() -> nn.Module:
    """The model factory handed to ``analyze``: 64 → 16 → 10 ReLU MLP."""
    return mlp(64, 16, 10)


def _analyzed(folder, **kw) -> xr.Dataset:
    ds = analyze(folder, model=_make, layers=["0", "2"], probes=["rankme", "neural_collapse"],
                 n_samples=120, batch_size=60, progress=False, **kw)
    return ds.drop_vars(list(TIMING_VARIABLES))


def test_analyze_inputs_and_labels_are_probe_data_and_probe_labels_with_warnings(series):
    new = _analyzed(series, probe_data="digits", probe_labels="digits")
    with pytest.warns(DeprecationWarning) as caught:
        old = _analyzed(series, inputs="digits", labels="digits")
    messages = sorted(str(w.message) for w in caught if w.category is DeprecationWarning)
    assert messages == ["analyze: inputs= is deprecated; use probe_data=",
                        "analyze: labels= is deprecated; use probe_labels="]
    assert (new["status"] == "ok").all() and new["nc1"].notnull().all()
    xr.testing.assert_identical(old, new)
    with pytest.raises(TypeError, match="probe_labels= only"):
        _analyzed(series, labels="digits", probe_labels="digits")


def test_analyze_options_are_keywords_in_groups():
    params = inspect.signature(analyze).parameters
    assert "inputs" not in params and "labels" not in params
    assert {"probe_data", "probe_labels"} <= set(params)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in params.items()
               if name != "checkpoints")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="traindyn")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["analyze", "ckpt", "--layers", "0", *argv])


def test_cli_old_options_fill_the_new_ones_with_a_warning(capsys):
    default = _parse([])
    assert (default.probe_data, default.probe_labels) == ("digits", None)
    new = _parse(["--probe-data", "x.npy", "--probe-labels", "y.npy"])
    with pytest.warns(DeprecationWarning) as caught:
        old = _parse(["--inputs", "x.npy", "--labels", "y.npy"])
    assert sorted(str(w.message) for w in caught) == [
        "traindyn analyze: --inputs is deprecated; use --probe-data",
        "traindyn analyze: --labels is deprecated; use --probe-labels"]
    assert vars(old) == vars(new)
    assert (new.probe_data, new.probe_labels) == ("x.npy", "y.npy")
    with pytest.raises(SystemExit):
        _parse(["--help"])
    out = capsys.readouterr().out
    assert "--probe-data" in out and "--probe-labels" in out and "--inputs" not in out


def test_lightning_callback_takes_probe_labels_and_the_old_spelling():
    pytest.importorskip("lightning")
    from traindyn.dynamics.lightning import MonitorCallback

    y = torch.arange(4)
    with pytest.warns(DeprecationWarning, match="MonitorCallback: probe_targets= is "
                                                "deprecated; use probe_labels="):
        old = MonitorCallback(probes=["neural_collapse"], probe_targets=y)
    assert old.monitor_kwargs["probe_labels"] is y and "probe_targets" not in old.monitor_kwargs
