"""check_probe (probes.testing) and check_probe_end_to_end (dynamics.testing) over every
registered probe, and on deliberately broken probes, which they must reject.

The references are inside the checks: each path's values are compared with the plan path
(``probes.evaluation.evaluate``) and with direct calls of the probe's own function on features
recorded by a plain forward pass (clones), to 1e-9 relative in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from traindyn.dynamics.testing import check_probe_end_to_end
from traindyn.probes.registry import Probe, Variable, all_probes
from traindyn.probes.spectral import rankme
from traindyn.probes.testing import ProbeCheckError, check_probe, example_for

KNOWN = {
    "attention_logits": "declares max_attention_logit without dims but returns it over "
                        "'layer' (probes/instability.py)",
}
"""Built-in probes that fail a check today, with the defect the check found."""

NAMES = sorted(all_probes())
PROCESS_IN_DEFAULT = ("rankme", "neural_collapse")


def _param(name: str) -> object:
    if name in KNOWN:
        return pytest.param(name, marks=pytest.mark.xfail(raises=ProbeCheckError,
                                                          reason=KNOWN[name], strict=False))
    return name


@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_every_registered_probe_keeps_the_contract(name):
    report = check_probe(name)
    assert set(report) == {"declaration", "pickle", "variables", "direct_call", "nan_input"}
    assert all(v.startswith(("ok", "skipped")) for v in report.values()), report
    end = check_probe_end_to_end(name, checks=("monitor_sync", "monitor_thread", "analyze"))
    assert set(end) == {"monitor_sync", "monitor_thread", "analyze"}


@pytest.mark.parametrize("name", PROCESS_IN_DEFAULT)
def test_the_process_mode_monitor_agrees_with_the_plan(name):
    assert check_probe_end_to_end(name, checks=("monitor_process",)) == {"monitor_process": "ok"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n not in PROCESS_IN_DEFAULT])
def test_the_process_mode_monitor_agrees_with_the_plan_for_every_probe(name):
    report = check_probe_end_to_end(name, checks=("monitor_process",))
    assert report["monitor_process"].startswith(("ok", "refused as expected")), report


# ------------------------------------------------------------------ deliberately broken probes


def mean_norm(features):
    """The mean row norm (a correct probe: the control); NaN with a warning for NaN input."""
    x = torch.as_tensor(features).double()
    if not bool(torch.isfinite(x).all()):
        warnings.warn("mean_norm: the features are not finite", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(x.norm(dim=1).mean())


def mean_norm_nan_swallowed(features):
    """Replaces NaN by 0 before computing: a number from corrupted data, silently."""
    return mean_norm(torch.nan_to_num(torch.as_tensor(features).double()))


def mean_norm_misnamed(features):
    return {"mean_norm_typo": mean_norm(features)}


def two_values(features):
    return {"mean_norm": mean_norm(features)}   # declares a second variable it never returns


class _Second:
    """A streaming accumulator whose path disagrees with the one-shot function."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def update(self, features):
        self.rows.append(torch.as_tensor(features).double())


def _from_rows(acc):
    return mean_norm(torch.cat(acc.rows)) * (1 + 1e-6)   # off by 1e-6: not the same number


def _broken(name: str) -> Probe:
    variables = {"mean_norm": Variable("mean row norm")}
    if name == "control":
        return Probe("mean_norm", "features", variables, "test", fn=mean_norm)
    if name == "nan_swallowed":
        return Probe("mean_norm", "features", variables, "test", fn=mean_norm_nan_swallowed)
    if name == "wrong_variables":
        return Probe("mean_norm", "features", variables, "test", fn=mean_norm_misnamed)
    if name == "missing_variable":
        return Probe("mean_norm", "features", {**variables, "spread": Variable("spread")},
                     "test", fn=two_values)
    if name == "unpicklable":
        return Probe("mean_norm", "features", variables, "test",
                     fn=lambda f: mean_norm(f))  # noqa: PLW0108 - a lambda does not pickle
    if name == "wrong_dims":
        return Probe("mean_norm", "features",
                     {"mean_norm": Variable("mean row norm", dims=("component",))}, "test",
                     fn=mean_norm)
    if name == "stream_differs":
        from traindyn.probes.registry import ACCUMULATORS, Accumulator, register_accumulator

        if "rows_test" not in ACCUMULATORS:
            register_accumulator(Accumulator("rows_test", _Second))
        return Probe("mean_norm", "features", variables, "test", fn=mean_norm,
                     accumulator="rows_test", from_accumulator=_from_rows)
    raise KeyError(name)


@pytest.fixture()
def _no_test_accumulator():
    yield
    from traindyn.probes.registry import ACCUMULATORS

    ACCUMULATORS.pop("rows_test", None)


@pytest.mark.usefixtures("_no_test_accumulator")
@pytest.mark.parametrize(("broken", "check", "words"), [
    ("nan_swallowed", "nan_input", "expected NaN"),
    ("wrong_variables", "variables", "undeclared variables ['mean_norm_typo']"),
    ("missing_variable", "variables", "returned ['mean_norm'], it declares ['mean_norm', "
                                      "'spread']"),
    ("unpicklable", "pickle", "cannot be pickled"),
    ("wrong_dims", "variables", "it declares ('component',)"),
    ("stream_differs", "direct_call", "differs by 1.00e-06 relative"),
])
def test_check_probe_fails_on_a_broken_probe(broken, check, words):
    assert check_probe(_broken("control")) == {   # the same probe, unbroken, passes
        "declaration": "ok (not registered)", "pickle": "ok", "variables": "ok",
        "direct_call": "ok", "nan_input": "ok"}
    with pytest.raises(ProbeCheckError, match=rf"'mean_norm' fails '{check}'") as info:
        check_probe(_broken(broken))
    assert words in str(info.value)


def test_the_checks_compare_against_an_independent_number():
    # the plan and the direct call agree with RankMe written out here (Garrido et al. 2023,
    # Eq. 1: exp of the entropy of the normalised singular values), on layer "0" features
    example = example_for("rankme")
    model = example.make_model(0).eval()
    with torch.no_grad():
        h = model[0](example.inputs)
    s = torch.linalg.svdvals(h)
    p = s / s.sum() + 1e-7
    by_hand = math.exp(float(-(p * torch.log(p)).sum()))
    assert abs(rankme(h) - by_hand) <= 1e-9 * by_hand
    from traindyn.probes.testing import plan_values

    (first, _) = plan_values(all_probes()["rankme"], example)
    assert abs(first.layer_values["rankme"]["0"] - by_hand) <= 1e-9 * by_hand
