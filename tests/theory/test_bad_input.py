"""Bad input to every public function of ``theory``: a property-based campaign.

For each name in ``theory.__all__`` (and ``theory.dmft``'s public functions where that module is
exported) every argument is spoiled in turn: non-finite entries, empty and single-element
arrays, mismatched lengths, int dtypes, strings and complex numbers, values outside the domain
(negative variances, zero or negative sample sizes, ridge < 0, load ratio ≤ 0, …).  The rule
each call must obey (traindyn's bad-input rule):

* a ``ValueError`` / ``TypeError`` whose message names the spoiled argument, or
* a result holding NaN **and** a warning, or
* for input that is unusual but legal (int dtype, one element, an integral float count) a
  correct value: equal to the float / full-grid call it stands for.

Never a finite value for bad input, never NaN without a warning, never another exception.

Each function is first run through every (argument, kind) case once, deterministically; then
hypothesis draws cases with random positions and magnitudes (``max_examples`` per function:
6 by default, 200 with ``THEORY_HYPOTHESIS_PROFILE=slow``).  Outcomes are tallied;
``THEORY_CAMPAIGN_TABLE=path`` writes the table of cases per function and outcome.
"""

from __future__ import annotations

import collections
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traindyn import theory

PROFILE = os.environ.get("THEORY_HYPOTHESIS_PROFILE", "default")
EXAMPLES = {"default": 6, "slow": 200}.get(PROFILE, 6)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=PROFILE == "default",
                    database=None, suppress_health_check=list(HealthCheck))

TALLY: collections.Counter = collections.Counter()  # (function, outcome) -> cases


# --------------------------------------------------------------------------- argument kinds


@dataclass
class Arg:
    """How an argument may be spoiled.

    ``kind``: ``array`` (1-D), ``matrix`` (2-D), ``scalar``, ``count`` or ``choice``.
    ``domain``: ``real``, ``nonneg``, ``pos``, ``unit`` (open interval (0, 1)), ``above1``.
    ``inf_ok``: +inf is a legal value (not spoiled).  ``match``: arrays in one group must have
    equal lengths.  ``dim``: the output dimension this array spans (single-element checks).
    ``minimum``: of a count.  ``optional``: None is legal.  ``warn_ok``: bad entries may be
    dropped with a warning (the value is the fit of the rest).
    """

    kind: str
    domain: str = "real"
    inf_ok: bool = False
    match: str | None = None
    dim: str | None = None
    minimum: int = 0
    optional: bool = False
    warn_ok: bool = False
    aliases: tuple[str, ...] = ()


BAD, EDGE = "bad", "edge"


def kinds(arg: Arg) -> list[tuple[str, str]]:
    """(kind of spoiling, bad | edge) for an argument."""
    out: list[tuple[str, str]] = []
    if arg.kind in ("array", "matrix"):
        out += [("nan entry", BAD), ("-inf entry", BAD), ("string", BAD), ("complex", BAD)]
        if not arg.inf_ok:
            out.append(("+inf entry", BAD))
        if arg.domain in ("nonneg", "pos", "above1"):
            out.append(("negative entry", BAD))
        if arg.domain in ("pos", "above1"):
            out.append(("zero entry", BAD))
        if arg.match:
            out.append(("mismatched length", BAD))
        out += [("empty", EDGE), ("int dtype", EDGE)]
        if arg.kind == "array":
            out.append(("single element", EDGE))
        else:
            out.append(("ragged", BAD))
    elif arg.kind == "scalar":
        out += [("nan", BAD), ("-inf", BAD), ("string", BAD), ("complex", BAD),
                ("length-2 array", BAD), ("int", EDGE)]
        if not arg.inf_ok:
            out.append(("+inf", BAD))
        if arg.domain in ("nonneg", "pos", "unit", "above1"):
            out.append(("negative", BAD))
        if arg.domain in ("pos", "unit", "above1"):
            out.append(("zero", BAD))
        if arg.domain == "unit":
            out.append(("one", BAD))
        if not arg.optional:
            out.append(("None", BAD))
    elif arg.kind == "count":
        out += [("below minimum", BAD), ("non-integer float", BAD), ("nan", BAD),
                ("string", BAD), ("bool", BAD), ("integral float", EDGE)]
    elif arg.kind == "choice":
        out += [("unknown string", BAD), ("int", BAD)]
    return out


def spoil(value: Any, arg: Arg, kind: str, pos: int, mag: float) -> Any:
    """``value`` spoiled by ``kind``; ``pos`` picks the entry, ``mag`` a positive magnitude."""
    if arg.kind in ("array", "matrix"):
        a = np.array(value, dtype=float, order="C")
        flat = a.reshape(-1)  # a view: setting an entry of `flat` spoils `a`
        i = pos % max(flat.size, 1)
        if kind in ("nan entry", "+inf entry", "-inf entry", "negative entry", "zero entry"):
            flat[i] = {"nan entry": np.nan, "+inf entry": np.inf, "-inf entry": -np.inf,
                       "negative entry": -mag, "zero entry": 0.0}[kind]
            return a
        if kind == "string":
            return a.astype(str)
        if kind == "complex":
            return a + 1j
        if kind == "mismatched length":
            return np.concatenate([a, a[:1]])  # one entry too many (length 1 would broadcast)
        if kind == "empty":
            return np.empty((0,) * a.ndim)
        if kind == "int dtype":  # an inf entry becomes a huge negative int: still bad input
            with np.errstate(invalid="ignore"):
                return np.rint(a).astype(np.int64)
        if kind == "single element":
            return a[:1]
        if kind == "ragged":
            return [list(row) for row in a[:-1]] + [list(a[-1][:-1])]
    if arg.kind == "scalar":
        return {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "string": "1.0",
                "complex": 1 + 1j, "length-2 array": np.array([value, value], dtype=float),
                "int": int(round(value)), "negative": -mag, "zero": 0.0, "one": 1.0,
                "None": None}[kind]
    if arg.kind == "count":
        return {"below minimum": arg.minimum - 1 - int(mag) % 3, "non-integer float": value + 0.5,
                "nan": math.nan, "string": str(value), "bool": True,
                "integral float": float(value)}[kind]
    if arg.kind == "choice":
        return {"unknown string": "no-such-option", "int": 1}[kind]
    raise AssertionError(kind)


# --------------------------------------------------------------------------- functions


@dataclass
class Fn:
    fn: Any
    base: dict[str, Any]
    args: dict[str, Arg]
    skip: set[tuple[str, str]] = field(default_factory=set)  # (arg, kind) legal here


EIG = np.arange(1, 201, dtype=float) ** -1.5
V2 = np.arange(1, 201, dtype=float) ** -1.2
SPEC = theory.power_law_spectrum(200, 1.5, 1.2)
ONES = np.ones(200)
X_FIT = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
Y_FIT = 3.0 * X_FIT**-0.7 * (1 + 0.01 * np.array([1, -1, 1, -1, 1, -1]))
ETF = theory.simplex_etf(4).T
GRAM = (lambda z: z @ z.T / 3)(np.random.default_rng(0).normal(size=(6, 3)))
TARGETS = np.arange(6, dtype=float)

spectrum_args = dict(eigenvalues=Arg("array", "nonneg", match="modes"),
                     target_power=Arg("array", "nonneg", match="modes"))
decay_args = dict(weight_decay=Arg("array", "pos"), feature_decay=Arg("scalar", "pos"),
                  n_layers=Arg("count", minimum=1))

FUNCTIONS: dict[str, Fn] = {
    "Spectrum": Fn(theory.Spectrum, dict(eigenvalues=EIG, target_power=V2, multiplicity=ONES),
                   dict(**spectrum_args, multiplicity=Arg("array", "nonneg", match="modes"))),
    "power_law_spectrum": Fn(theory.power_law_spectrum, dict(n_modes=50, a=1.5, b=1.2),
                             dict(n_modes=Arg("count", minimum=1), a=Arg("scalar"),
                                  b=Arg("scalar"))),
    "solve_kappa": Fn(theory.solve_kappa, dict(spectrum=SPEC, n=np.array([10.0, 30.0]),
                                               ridge=np.array([0.0, 1e-3]), tol=1e-12),
                      dict(n=Arg("array", "pos", match="grid"),
                           ridge=Arg("array", "nonneg", match="grid"),
                           tol=Arg("scalar", "unit"))),
    "krr_learning_curve": Fn(
        theory.krr_learning_curve,
        dict(eigenvalues=EIG, target_power=V2, n=np.array([10.0, 30.0, 300.0]),
             ridge=np.array([0.0, 1e-3]), noise_var=0.1, n_modes_out=5),
        dict(**spectrum_args, n=Arg("array", "pos", dim="n"),
             ridge=Arg("array", "nonneg", dim="ridge"), noise_var=Arg("scalar", "nonneg"),
             n_modes_out=Arg("count"))),
    "rf_learning_curve": Fn(
        theory.rf_learning_curve,
        dict(eigenvalues=EIG, target_power=V2, n=np.array([10.0, 100.0]),
             n_features=np.array([20.0, 300.0]), ridge=np.array([0.0, 1e-2]), noise_var=0.1,
             n_modes_out=5),
        dict(**spectrum_args, n=Arg("array", "pos", inf_ok=True, dim="n"),
             n_features=Arg("array", "pos", inf_ok=True, dim="n_features"),
             ridge=Arg("array", "nonneg", dim="ridge"), noise_var=Arg("scalar", "nonneg"),
             n_modes_out=Arg("count"))),
    "rf_errors": Fn(theory.rf_errors,
                    dict(spectrum=SPEC, n=np.array([10.0, 100.0]),
                         n_features=np.array([20.0, 300.0]), ridge=np.array([0.0, 1e-2]),
                         noise_var=0.1),
                    dict(n=Arg("array", "pos", inf_ok=True, match="grid"),
                         n_features=Arg("array", "pos", inf_ok=True, match="grid"),
                         ridge=Arg("array", "nonneg", match="grid"),
                         noise_var=Arg("scalar", "nonneg"))),
    "optimal_ridge": Fn(
        theory.optimal_ridge,
        dict(eigenvalues=EIG, target_power=V2, n=np.array([20.0, 50.0]),
             n_features=np.array([30.0, np.inf]), noise_var=0.1,
             ridge_grid=np.concatenate([[0.0], np.logspace(-6, 1, 15)]), tol=1e-3),
        dict(**spectrum_args, n=Arg("array", "pos", inf_ok=True, dim="n"),
             n_features=Arg("array", "pos", inf_ok=True, dim="n_features"),
             noise_var=Arg("scalar", "nonneg"), ridge_grid=Arg("array", "nonneg"),
             tol=Arg("scalar", "pos"))),
    "power_law_optimal_fitting_ratio": Fn(
        theory.power_law_optimal_fitting_ratio,
        dict(a=np.array([1.5, 2.0, 3.0]), b=np.array([1.2, 1.8, 2.5])),
        dict(a=Arg("array", "above1", match="ab"), b=Arg("array", "above1", match="ab"))),
    "predicted_exponents": Fn(theory.predicted_exponents, dict(a=1.5, b=1.3),
                              dict(a=Arg("scalar", "above1"),
                                   b=Arg("scalar", "above1", optional=True))),
    "scaling_regimes": Fn(
        theory.scaling_regimes,
        dict(eigenvalues=EIG, target_power=V2, n=np.array([100.0, 150.0]),
             n_features=np.array([100.0, 150.0]), n_fixed=20.0, n_features_fixed=20.0,
             ridge=0.0, noise_var=0.1),
        dict(**spectrum_args, n=Arg("array", "pos", inf_ok=True, dim="n"),
             n_features=Arg("array", "pos", inf_ok=True, dim="n_features"),
             n_fixed=Arg("scalar", "pos"), n_features_fixed=Arg("scalar", "pos"),
             ridge=Arg("scalar", "nonneg"), noise_var=Arg("scalar", "nonneg"))),
    "fit_power_law": Fn(theory.fit_power_law,
                        dict(x=X_FIT, y=Y_FIT, offset=0.0, level=0.9, n_boot=50, seed=0),
                        dict(x=Arg("array", "pos", match="points"),
                             y=Arg("array", match="points", warn_ok=True),
                             offset=Arg("scalar"), level=Arg("scalar", "unit"),
                             n_boot=Arg("count"), seed=Arg("count"))),
    "advani_saxe": Fn(
        theory.advani_saxe,
        dict(time=np.array([0.0, 0.5, 3.0]), load_ratio=np.array([0.5, 2.0]), noise_var=0.2,
             teacher_var=1.0, init_var=0.1, learning_rate=0.1, n_nodes=50),
        dict(time=Arg("array", "nonneg", dim="time"),
             load_ratio=Arg("array", "pos", dim="load_ratio", aliases=("load ratio",)),
             noise_var=Arg("scalar", "nonneg"), teacher_var=Arg("scalar", "nonneg"),
             init_var=Arg("scalar", "nonneg"), learning_rate=Arg("scalar", "pos", optional=True),
             n_nodes=Arg("count", minimum=1))),
    "advani_saxe_asymptote": Fn(
        theory.advani_saxe_asymptote,
        dict(load_ratio=np.array([0.5, 2.0]), noise_var=0.2, teacher_var=1.0, init_var=0.1),
        dict(load_ratio=Arg("array", "pos", dim="load_ratio"),
             noise_var=Arg("scalar", "nonneg"), teacher_var=Arg("scalar", "nonneg"),
             init_var=Arg("scalar", "nonneg"))),
    "marchenko_pastur_density": Fn(theory.marchenko_pastur_density,
                                   dict(lam=np.array([0.5, 1.0, 2.0]), load_ratio=0.7),
                                   dict(lam=Arg("array", inf_ok=True),
                                        load_ratio=Arg("scalar", "pos"))),
    "marchenko_pastur_quadrature": Fn(theory.marchenko_pastur_quadrature,
                                      dict(load_ratio=0.7, n_nodes=20),
                                      dict(load_ratio=Arg("scalar", "pos"),
                                           n_nodes=Arg("count", minimum=1))),
    "half_rise_time": Fn(theory.half_rise_time,
                         dict(singular_value=np.array([3.0, 2.0]),
                              initial_strength=np.array([1e-3, 1e-3]), depth=2, tau=1.0),
                         dict(singular_value=Arg("array", "pos", match="modes"),
                              initial_strength=Arg("array", "pos", match="modes"),
                              depth=Arg("count", minimum=1), tau=Arg("scalar", "pos"))),
    "mode_strength": Fn(theory.mode_strength,
                        dict(time=np.array([0.0, 1.0, 5.0]), singular_value=np.array([2.0]),
                             initial_strength=np.array([1e-3]), depth=2, tau=1.0,
                             backend="numpy"),
                        dict(time=Arg("array", "nonneg", inf_ok=True),
                             singular_value=Arg("array", "pos"),
                             initial_strength=Arg("array", "pos"),
                             depth=Arg("count", minimum=1), tau=Arg("scalar", "pos"),
                             backend=Arg("choice"))),
    "saxe_dynamics": Fn(theory.saxe_dynamics,
                        dict(time=np.array([0.0, 1.0, 5.0]), singular_values=np.array([3.0, 1.0]),
                             initial_strength=1e-3, depth=2, tau=1.0),
                        dict(time=Arg("array", "nonneg", inf_ok=True, dim="time"),
                             singular_values=Arg("array", "pos", dim="mode"),
                             initial_strength=Arg("scalar", "pos"),
                             depth=Arg("count", minimum=1), tau=Arg("scalar", "pos"))),
    "strength_equation": Fn(theory.strength_equation, dict(depth=2),
                            dict(depth=Arg("count", minimum=1))),
    "time_to_strength": Fn(theory.time_to_strength, dict(depth=2),
                           dict(depth=Arg("count", minimum=1))),
    "two_layer_solution": Fn(theory.two_layer_solution, {}, {}),
    "simplex_etf": Fn(theory.simplex_etf, dict(n_classes=4, dim=6),
                      dict(n_classes=Arg("count", minimum=2), dim=Arg("count", minimum=4))),
    "balanced_collapse": Fn(theory.balanced_collapse, dict(n_classes=4, global_mean="samples"),
                            dict(n_classes=Arg("count", minimum=2), global_mean=Arg("choice"))),
    "imbalanced_collapse": Fn(theory.imbalanced_collapse,
                              dict(class_sizes=np.array([50.0, 50.0, 5.0]),
                                   weight_decay=np.array([5e-3]),
                                   feature_decay=5e-3, n_layers=1, global_mean="class_means"),
                              dict(class_sizes=Arg("array", "pos"), **decay_args,
                                   global_mean=Arg("choice"))),
    "minority_collapse_threshold": Fn(theory.minority_collapse_threshold,
                                      dict(n_total=100.0, weight_decay=np.array([5e-3]),
                                           feature_decay=5e-3,
                                           n_layers=1),
                                      dict(n_total=Arg("scalar", "pos"), **decay_args)),
    "collapse_metrics": Fn(theory.collapse_metrics,
                           dict(means=ETF, weight=ETF, class_sizes=np.array([3.0, 4.0, 5.0, 6.0]),
                                global_mean="samples"),
                           dict(means=Arg("matrix", match="rows"),
                                weight=Arg("matrix", match="rows"),
                                class_sizes=Arg("array", "pos", match="rows"),
                                global_mean=Arg("choice"))),
    "empirical_spectrum": Fn(theory.empirical_spectrum, dict(gram=GRAM, targets=TARGETS),
                             dict(gram=Arg("matrix", match="rows"),
                                  targets=Arg("array", match="rows"))),
    "spectrum_from_gram": Fn(theory.spectrum_from_gram, dict(gram=GRAM, targets=TARGETS),
                             dict(gram=Arg("matrix", match="rows"),
                                  targets=Arg("array", match="rows"))),
    "kernel_flow": Fn(theory.kernel_flow,
                      dict(kernel_train=GRAM, targets_train=TARGETS, steps=np.array([0.0, 3.0]),
                           learning_rate=1.0, normalization=6.0, diag_reg=0.1, start_step=0),
                      dict(kernel_train=Arg("matrix", match="rows"),
                           targets_train=Arg("array", match="rows"),
                           steps=Arg("array", "nonneg", dim="step"),
                           learning_rate=Arg("scalar", "pos"),
                           normalization=Arg("scalar", "pos", optional=True),
                           diag_reg=Arg("scalar", "nonneg"), start_step=Arg("count"))),
    "kernel_flow_limit": Fn(theory.kernel_flow_limit,
                            dict(kernel_train=GRAM, targets_train=TARGETS, diag_reg=0.1),
                            dict(kernel_train=Arg("matrix", match="rows"),
                                 targets_train=Arg("array", match="rows"),
                                 diag_reg=Arg("scalar", "nonneg"))),
    "polynomial_network_kernel": Fn(theory.polynomial_network_kernel,
                                    dict(x1=np.random.default_rng(1).normal(size=(6, 3)),
                                         epsilon=0.3),
                                    dict(x1=Arg("matrix"), epsilon=Arg("scalar"))),
    "lazy_grokking": Fn(theory.lazy_grokking,
                        dict(x_train=np.random.default_rng(1).normal(size=(6, 3)),
                             y_train=TARGETS, steps=np.array([0.0, 3.0]), learning_rate=0.5,
                             epsilon=0.3),
                        dict(x_train=Arg("matrix", match="rows"),
                             y_train=Arg("array", match="rows"),
                             steps=Arg("array", "nonneg", dim="step"),
                             learning_rate=Arg("scalar", "pos"), epsilon=Arg("scalar"))),
    "rich_grokking": Fn(theory.rich_grokking,
                        dict(x_train=np.random.default_rng(1).normal(size=(6, 3)),
                             y_train=TARGETS, steps=np.array([0.0, 3.0]), learning_rate=0.5,
                             alpha=np.array([0.5, 2.0]), epsilon=0.3),
                        dict(x_train=Arg("matrix", match="rows"),
                             y_train=Arg("array", match="rows"),
                             steps=Arg("array", "nonneg", dim="step"),
                             learning_rate=Arg("scalar", "pos"),
                             alpha=Arg("array", "pos", dim="alpha"), epsilon=Arg("scalar"))),
}
# legal values that the generic kinds would call bad
FUNCTIONS["saxe_dynamics"].skip.add(("initial_strength", "length-2 array"))  # one per mode
FUNCTIONS["marchenko_pastur_density"].skip.update({("lam", "negative entry"),
                                                   ("lam", "-inf entry")})


def test_every_public_name_is_in_the_campaign():
    names = {n for n in theory.__all__ if n != "__version__"}
    if "dmft" in getattr(theory, "_EXPORTS", {}).values():  # pragma: no cover - when exported
        names -= {n for n, m in theory._EXPORTS.items() if m == "dmft"}
    assert names <= set(FUNCTIONS), sorted(names - set(FUNCTIONS))


# --------------------------------------------------------------------------- the rule


def _numbers(out: Any) -> np.ndarray:
    """Every number in a result, flattened (Datasets, dicts, tuples, arrays, scalars)."""
    if isinstance(out, xr.Dataset):
        parts = [np.asarray(v.values, dtype=float).ravel() for v in out.data_vars.values()]
    elif isinstance(out, xr.DataArray):
        parts = [np.asarray(out.values, dtype=float).ravel()]
    elif isinstance(out, dict):
        parts = [_numbers(v) for v in out.values()]
    elif isinstance(out, (tuple, list)):
        parts = [_numbers(v) for v in out]
    elif isinstance(out, theory.Spectrum):
        parts = [out.eigenvalues, out.target_power, out.multiplicity]
    elif hasattr(out, "free_symbols"):  # a sympy expression
        return np.empty(0)
    else:
        parts = [np.asarray(out, dtype=float).ravel()]
    return np.concatenate(parts) if parts else np.empty(0)


def _names_argument(message: str, name: str, arg: Arg) -> bool:
    for word in (name, *arg.aliases):
        if len(word) > 2 and word in message:
            return True
        if re.search(rf"(^|[\s(`'\"]){re.escape(word)}([\s,:)=`'\"]|$)", message):
            return True
    return False


def _call(fn: Any, kwargs: dict) -> tuple[str, Any, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(**kwargs)
        except (ValueError, TypeError) as err:
            return "error", err, list(caught)
    return "value", out, list(caught)


def _same(a: Any, b: Any) -> bool:
    if hasattr(a, "free_symbols"):
        return a == b
    x, y = _numbers(a), _numbers(b)
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-12, atol=0, equal_nan=True))


def check(name: str, argname: str, kind: str, klass: str, pos: int = 0, mag: float = 1.0):
    """Run one spoiled call and assert the rule; returns the outcome (also tallied)."""
    spec = FUNCTIONS[name]
    arg = spec.args[argname]
    base = spec.base[argname]
    kwargs = {**spec.base, argname: spoil(base, arg, kind, pos, mag)}
    status, out, caught = _call(spec.fn, kwargs)
    where = f"{name}({argname}: {kind})"
    if status == "error":
        assert _names_argument(str(out), argname, arg), f"{where}: error does not name the " \
                                                        f"argument: {out!r}"
        outcome = "error naming the argument"
    else:
        nums = _numbers(out)
        has_nan = bool(np.isnan(nums).any())
        if has_nan:
            assert caught, f"{where}: NaN without a warning"
        if klass == BAD:
            if has_nan:
                outcome = "NaN with a warning"
            else:
                assert arg.warn_ok and caught, f"{where}: a value for bad input: {nums[:6]}"
                outcome = "value with a warning (bad entries dropped)"
        else:
            outcome = _edge_outcome(spec, argname, arg, kind, kwargs, out, where)
    TALLY[(name, outcome)] += 1
    return outcome


def _edge_outcome(spec: Fn, argname: str, arg: Arg, kind: str, kwargs: dict, out: Any,
                  where: str) -> str:
    """Legal-but-unusual input: the value must be the one the ordinary call gives."""
    if kind in ("int dtype", "int", "integral float"):
        ref_kwargs = dict(kwargs)
        ref_kwargs[argname] = (np.asarray(kwargs[argname], dtype=float) if kind == "int dtype"
                               else float(kwargs[argname]) if kind == "int"
                               else int(kwargs[argname]))
        status, ref, _ = _call(spec.fn, ref_kwargs)
        assert status == "value" and _same(out, ref), f"{where}: differs from the float call"
        return "correct value (= float call)"
    if kind == "empty":
        if arg.dim and isinstance(out, xr.Dataset):
            assert out.sizes.get(arg.dim, 0) == 0, f"{where}: values along an empty {arg.dim}"
        else:
            assert _numbers(out).size == 0, f"{where}: values from empty input"
        return "empty result"
    if kind == "single element":
        if arg.dim and isinstance(out, xr.Dataset):
            _, full, _ = _call(spec.fn, spec.base)
            ref = full.isel({arg.dim: [0]})
            got = out if arg.dim in out.dims else out.expand_dims(arg.dim)
            for v in ref.data_vars:
                np.testing.assert_allclose(got[v].transpose(*ref[v].dims).values,
                                           ref[v].values, rtol=1e-12, err_msg=where)
            return "correct value (= first grid point)"
        return "value (one element; NaN only with a warning)"
    raise AssertionError(kind)


CASES = [(name, argname, kind, klass) for name, spec in FUNCTIONS.items()
         for argname, arg in spec.args.items() for kind, klass in kinds(arg)
         if (argname, kind) not in spec.skip]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_case_once(name):
    """Every (argument, kind of bad input) of the function, once."""
    spec = FUNCTIONS[name]
    if not spec.args:
        status, out, caught = _call(spec.fn, {})
        assert status == "value"
        TALLY[(name, "no arguments: value")] += 1
        return
    cases = [c for c in CASES if c[0] == name]
    assert cases
    for _, argname, kind, klass in cases:
        check(name, argname, kind, klass)


@pytest.mark.parametrize("name", sorted(n for n, s in FUNCTIONS.items() if s.args))
def test_random_cases(name):
    """Hypothesis: random cases, positions of the bad entry and magnitudes."""
    cases = [c for c in CASES if c[0] == name]

    @SETTINGS
    @given(case=st.sampled_from(cases), pos=st.integers(0, 10_000),
           mag=st.floats(1e-300, 1e300, allow_nan=False, allow_infinity=False))
    def run(case, pos, mag):
        check(*case, pos=pos, mag=mag)

    run()


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    path = os.environ.get("THEORY_CAMPAIGN_TABLE")
    if path:
        outcomes = sorted({o for _, o in TALLY})
        names = sorted({n for n, _ in TALLY})
        with open(path, "w") as fh:
            fh.write("| function | cases | " + " | ".join(outcomes) + " |\n")
            fh.write("|---|---:|" + "---:|" * len(outcomes) + "\n")
            for n in names:
                row = [TALLY[(n, o)] for o in outcomes]
                fh.write(f"| {n} | {sum(row)} | " + " | ".join(map(str, row)) + " |\n")
