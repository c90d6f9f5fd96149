"""End-to-end conformance of a probe: :func:`check_probe_end_to_end`.

:func:`traindyn.probes.testing.check_probe` checks a probe against its contract through the
plan alone (``probes`` never imports ``dynamics``); this module runs the same example through
every consumer and compares each with that plan path:

``monitor_sync``, ``monitor_thread``, ``monitor_process``
    :class:`~traindyn.dynamics.monitor.Monitor` with ``background=False``, ``"thread"`` and
    ``"process"``, two evaluations (the example's model at seed 0, then its weights replaced by
    seed 1's, as training would move them).  A probe comparing with the final evaluation
    must be refused by the Monitor with a message pointing to ``analyze``.
``analyze``
    :func:`~traindyn.dynamics.analyze.analyze` over the same two weights saved as the
    checkpoints ``step0.pt`` and ``step1.pt``.  A stateful probe (``factory``) must fail its
    checkpoints with a reason instead of giving numbers that a resumed run could not repeat.

:func:`check_probe_all` runs both.  Every check raises
:class:`~traindyn.probes.testing.ProbeCheckError` naming the probe, the path and the
difference.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from traindyn.probes.registry import Probe, get_probe
from traindyn.probes.testing import (
    CHECKS,
    Example,
    ProbeCheckError,
    assert_same,
    check_probe,
    example_for,
    measurement_variables,
    plan_values,
)

__all__ = ["END_TO_END_CHECKS", "MODES", "check_probe_all", "check_probe_end_to_end"]

MODES = {"sync": False, "thread": "thread", "process": "process"}
"""The Monitor's modes by check name suffix, and their ``background=`` values."""

END_TO_END_CHECKS = ("monitor_sync", "monitor_thread", "monitor_process", "analyze")
"""The checks :func:`check_probe_end_to_end` runs, in order."""


def _dataset_values(ds: Any, probe: Probe, step_index: int) -> dict[str, dict[str | None, Any]]:
    """The probe's variables at one step of a Dataset, as the plan path gives them."""
    out: dict[str, dict[str | None, Any]] = {}
    for name in probe.variables:
        if name not in ds:
            continue
        value = ds[name].isel(step=step_index)
        if probe.per_layer:
            out[name] = {str(layer): value.sel(layer=layer) for layer in value["layer"].values}
        else:
            out[name] = {None: value}
    return out


def _aligned(got: dict[str, dict[str | None, Any]], expected: dict[str, dict[str | None, Any]]
             ) -> dict[str, dict[str | None, Any]]:
    """``got``'s DataArrays put in the dims and coordinate order of ``expected``'s."""
    out: dict[str, dict[str | None, Any]] = {}
    for name, per_layer in got.items():
        out[name] = {}
        for layer, value in per_layer.items():
            want = expected.get(name, {}).get(layer)
            dims = tuple(getattr(want, "dims", ()))
            if dims and hasattr(value, "dims") and set(dims) <= set(value.dims):
                selection = {d: want[d].values for d in dims if d in want.coords
                             and d in value.coords}
                value = value.sel(selection).transpose(*dims)
            out[name][layer] = value
    return out


def _compare(probe: Probe, check: str, ds: Any, expected: Sequence[Any], rtol: float) -> None:
    declared = set(probe.variables)
    missing = declared - set(ds.data_vars)
    if missing:
        raise ProbeCheckError(f"probe {probe.name!r} fails {check!r}: the Dataset lacks "
                              f"{sorted(missing)}")
    for i, measurement in enumerate(expected):
        want = measurement_variables(measurement)
        got = _aligned(_dataset_values(ds, probe, i), want)
        assert_same(probe, check, got, want, rtol, f"step {i}, {check} vs plan: ")


def _monitor(probe: Probe, example: Example, mode: str) -> Any:
    from traindyn.dynamics.monitor import Monitor

    model = example.make_model(0)
    later = example.make_model(1).state_dict()
    monitor = Monitor(model, probes=[probe], layers=list(example.layers),
                      probe_data=example.inputs, probe_labels=example.labels,
                      schedule=lambda step: True, background=MODES[mode],
                      probe_kwargs={probe.name: dict(example.probe_kwargs)}
                      if example.probe_kwargs else None)
    with monitor:
        monitor.step(0)
        model.load_state_dict(later)  # "training" moved the weights
        monitor.step(1)
    return monitor.to_dataset()


def _analyze(probe: Probe, example: Example, folder: Path) -> Any:
    from traindyn.dynamics.analyze import analyze

    run = folder / "run"
    run.mkdir()
    for seed in (0, 1):
        torch.save(example.make_model(seed).state_dict(), run / f"step{seed}.pt")
    torch.save(example.inputs, folder / "inputs.pt")
    np.save(folder / "labels.npy", example.labels.numpy())
    return analyze(run, model=lambda: example.make_model(0), probe_data=folder / "inputs.pt",
                   probe_labels=folder / "labels.npy", probes=[probe],
                   probe_kwargs={probe.name: dict(example.probe_kwargs)}
                   if example.probe_kwargs else None,
                   layers=list(example.layers), dtype="float64", progress=False)


def check_probe_end_to_end(probe: Probe | str, example: Example | None = None, *,
                           checks: Sequence[str] = END_TO_END_CHECKS,
                           rtol: float = 1e-9) -> dict[str, str]:
    """Run a probe through the Monitor (each mode) and ``analyze`` and compare each Dataset
    with the plan path of :func:`~traindyn.probes.testing.plan_values`.

    Parameters
    ----------
    probe : Probe or str
        The probe, or the name of a registered one.
    example : Example, optional
        Default: :func:`~traindyn.probes.testing.example_for`.
    checks : sequence of str
        A subset of :data:`END_TO_END_CHECKS` (the process mode costs a worker start, ~2 s).
    rtol : float
        Relative tolerance (every path computes in float64).

    Returns
    -------
    dict
        ``{check: "ok" | "refused as expected (why)"}``.

    Raises
    ------
    ProbeCheckError
        A path gave other variables or values than the plan, or did not refuse a probe it
        cannot run.
    """
    probe = get_probe(probe)
    example = example if example is not None else example_for(probe)
    unknown = [c for c in checks if c not in END_TO_END_CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {END_TO_END_CHECKS}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = plan_values(probe, example)
    report: dict[str, str] = {}
    for check in END_TO_END_CHECKS:
        if check not in checks:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if check.startswith("monitor_"):
                if "final" in probe.reference:
                    try:
                        _monitor(probe, example, check.removeprefix("monitor_"))
                    except ValueError as err:
                        if "analyze" not in str(err):
                            raise
                        report[check] = f"refused as expected ({err})"
                        continue
                    raise ProbeCheckError(f"probe {probe.name!r} fails {check!r}: the Monitor "
                                          f"ran a probe that needs the final evaluation")
                ds = _monitor(probe, example, check.removeprefix("monitor_"))
            else:
                with tempfile.TemporaryDirectory(prefix="traindyn_check_") as folder:
                    ds = _analyze(probe, example, Path(folder))
                status = [str(s) for s in ds["status"].values]
                if probe.factory is not None:
                    reasons = [str(r) for r in ds["reason"].values]
                    if status != ["failed", "failed"] or not all(reasons):
                        raise ProbeCheckError(f"probe {probe.name!r} fails 'analyze': a "
                                              f"stateful probe gave {status}")
                    report[check] = f"refused as expected ({reasons[0]})"
                    continue
                if status != ["ok", "ok"]:
                    raise ProbeCheckError(f"probe {probe.name!r} fails 'analyze': status "
                                          f"{status}, reason {list(ds['reason'].values)}")
        _compare(probe, check, ds, expected, rtol)
        report[check] = "ok"
    return report


def check_probe_all(probe: Probe | str, example: Example | None = None, *,
                    checks: Sequence[str] = CHECKS + END_TO_END_CHECKS,
                    rtol: float = 1e-9) -> dict[str, str]:
    """:func:`~traindyn.probes.testing.check_probe` and :func:`check_probe_end_to_end`."""
    report = check_probe(probe, example, rtol=rtol, checks=[c for c in checks if c in CHECKS])
    report |= check_probe_end_to_end(probe, example, rtol=rtol,
                                     checks=[c for c in checks if c in END_TO_END_CHECKS])
    return report
