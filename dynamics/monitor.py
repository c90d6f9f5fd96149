"""Probes on a schedule inside a training loop, recorded in traindyn's data model.

::

    monitor = Monitor(model, probes=["rankme", "alpha_req"], layers=["net.1", "net.3"],
                      schedule=log_spaced(5000, 40), probe_data=x_probe, learning_rate=lr)
    for step in range(5001):
        ...                                   # the user's own training step
        monitor.step(step, train_loss=loss)   # evaluates only when schedule(step) is True
    ds = monitor.to_dataset()                 # (step × layer) probes, (step) scalars

An evaluation runs the probe batch through the model in eval mode under ``torch.no_grad``,
captures the chosen layers through forward hooks (removed afterwards), and restores the
model's train/eval mode and the global random state, so the training run is not disturbed.
"""

from __future__ import annotations

import time as _time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from dynamics import records
from dynamics.schedules import Schedule, log_spaced
from probes import capture, get_feature_probe
from probes.registry import FeatureProbe

__all__ = ["Monitor"]


class _preserved_state:  # noqa: N801
    """Restore train/eval mode of every module and the torch RNG state on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.model.modules()}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes.items():
            module.training = mode
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


class Monitor:
    """Evaluate feature probes on chosen layers at scheduled steps and record the results.

    Parameters
    ----------
    model : nn.Module
    probes : sequence of str or FeatureProbe
        Names from ``probes.FEATURE_PROBES`` (``"rankme"``, ``"alpha_req"`` …) or probe objects.
    layers : sequence of str
        Module names or glob patterns (unknown names raise ``KeyError`` listing the modules).
    schedule : callable ``step -> bool``
        When to evaluate (default: 30 log-spaced steps up to 10,000).
    probe_data : tensor or sequence of tensors
        A fixed probe batch (or batches), passed to ``model(...)``.
    learning_rate : float, optional
        Gives the ``time = learning_rate × step`` coordinate.
    reduce : str
        Token reduction of captured outputs (``probes.capture``).
    seed : int, optional
        Stored as a scalar ``seed`` coordinate, so runs concatenate along ``seed``.
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[str | FeatureProbe] = ("rankme", "alpha_req"),
        layers: Sequence[str] = (),
        schedule: Schedule | None = None,
        probe_data: torch.Tensor | Sequence[torch.Tensor] | None = None,
        learning_rate: float | None = None,
        reduce: str = "flatten",
        seed: int | None = None,
        source: str = "traindyn Monitor",
    ) -> None:
        self.model = model
        self.probes = [p if isinstance(p, FeatureProbe) else get_feature_probe(p) for p in probes]
        self.layers = list(capture(model, layers).layers) if layers else []
        if self.probes and self.layers and probe_data is None:
            raise ValueError("probe_data is required to evaluate probes on layers")
        self.schedule = schedule or log_spaced(10_000, 30)
        self.probe_data = probe_data
        self.learning_rate = learning_rate
        self.reduce = reduce
        self.seed = seed
        self.source = source
        self._steps: list[int] = []
        self._probe_values: list[np.ndarray] = []  # each (layer, probe)
        self._scalars: list[dict[str, float]] = []
        self.seconds_spent = 0.0

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _batches(self) -> Iterable[torch.Tensor]:
        data = self.probe_data
        if isinstance(data, torch.Tensor):
            return [data]
        return list(data)

    def measure(self) -> np.ndarray:
        """Probe values now, shape ``(len(layers), len(probes))``, without recording them."""
        out = np.full((len(self.layers), len(self.probes)), np.nan)
        if not self.layers or not self.probes:
            return out
        with _preserved_state(self.model), torch.no_grad():
            self.model.eval()
            with capture(self.model, self.layers, reduce=self.reduce) as cap:
                for batch in self._batches():
                    self.model(batch)
            feats = cap.activations()
        for i, layer in enumerate(self.layers):
            for j, probe in enumerate(self.probes):
                out[i, j] = probe(feats[layer])
        return out

    def step(self, step: int, **scalars: float) -> bool:
        """Evaluate and record if ``schedule(step)``; returns whether it did."""
        if not self.schedule(step):
            return False
        start = _time.perf_counter()
        values = self.measure()
        self._steps.append(int(step))
        self._probe_values.append(values)
        self._scalars.append({k: float(v) for k, v in scalars.items()})
        self.seconds_spent += _time.perf_counter() - start
        return True

    def to_dataset(self, attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
        """Everything recorded so far as a Dataset over ``step`` (and ``layer``)."""
        coords: dict[str, Any] = records.step_coords(self._steps, self.learning_rate)
        data_vars: dict[str, Any] = {}
        if self.layers and self.probes:
            coords["layer"] = ("layer", np.array(self.layers, dtype=object))
            values = np.stack(self._probe_values) if self._probe_values else np.empty(
                (0, len(self.layers), len(self.probes)))
            for j, probe in enumerate(self.probes):
                data_vars[probe.name] = (("step", "layer"), values[:, :, j],
                                         {"long_name": probe.long_name, "units": probe.units,
                                          "source": probe.source})
        names = sorted({k for row in self._scalars for k in row})
        for name in names:
            data_vars[name] = ("step", np.array([row.get(name, np.nan) for row in self._scalars]),
                               records.variable_attrs(name))
        if self.seed is not None:
            coords["seed"] = self.seed
        ds = xr.Dataset(data_vars, coords=coords)
        ds.attrs.update(
            source=self.source,
            parameters=records.params_attr(
                dict(probes=[p.name for p in self.probes], layers=self.layers,
                     reduce=self.reduce, learning_rate=self.learning_rate)),
            monitor_seconds=self.seconds_spent,
            **(attrs or {}),
        )
        return ds
