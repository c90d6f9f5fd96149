"""Bad-input campaign over every public probe function.

The rule each case asserts (traindyn's bad-input rule): a probe given an input
returns **a correct value** (checked against an independent float64 reference written here or
in the sibling test files), **a clear ``ValueError``/``TypeError`` naming the argument**, or
**NaN with a warning** — never a finite wrong value, never NaN without a warning, never a raw
traceback (``IndexError``, ``RuntimeError``, ``LinAlgError`` …).

Inputs are drawn by hypothesis: shapes (including empty and single-sample), dtypes (int,
float16, bfloat16, float32, float64, numpy and torch), a defect (NaN / ±Inf at a random entry of
any array argument, labels outside ``0..C−1`` including PyTorch's ``ignore_index = -100``,
mismatched lengths, float labels, constant or zero features, float64 overflow).  Values are
multiples of 1/4 in ``[-2, 2]``, exact in every dtype, so half-precision and integer features
must give the float64 reference's value (to ``RTOL``).

Profiles: the default suite draws ``EXAMPLES`` examples per family (the whole file runs in well
under a minute on one thread); ``TRAINDYN_HYPOTHESIS=slow`` (or the ``slow``-marked twin
tests) draws ``SLOW_EXAMPLES``.  ``python -m tests.probes.test_bad_input`` prints the table of
outcomes per public function.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from traindyn.probes import collapse as NC
from traindyn.probes import instability as INS
from traindyn.probes import kernels as KER
from traindyn.probes import phases as PH
from traindyn.probes import spectral as S
from traindyn.probes import weights as WS

from tests.probes.test_collapse import reference as ref_collapse
from tests.probes.test_spectral import ref_erank, ref_pr, ref_rankme, ref_stable_rank
from traindyn import probes

CAP = importlib.import_module("traindyn.probes.capture")  # `probes.capture` is the function
IB = importlib.import_module("traindyn.probes.inductive_bias")  # likewise

EXAMPLES = 12
SLOW_EXAMPLES = 300
SLOW = os.environ.get("TRAINDYN_HYPOTHESIS", "") == "slow"
RTOL = 1e-9
INVALID = "invalid"
"""Expectation of an input that has no correct value: a named error or NaN with a warning."""

OUTCOMES = ("ok", "silent-wrong", "nan-no-warning", "raw-traceback", "unnamed-error",
            "rejected-valid", "nan-with-warning-on-valid")
BAD = ("silent-wrong", "nan-no-warning", "raw-traceback", "unnamed-error", "rejected-valid")
"""Outcomes that break the rule (``nan-with-warning-on-valid`` is allowed by it: reported)."""


@dataclass
class Case:
    """One call of a public function and what it must give."""

    func: str
    thunk: Callable[[], Any]
    expect: Any  # INVALID, a reference (number / array / dict), or check(result, warned) -> str
    names: tuple[str, ...]  # argument names an error message may name
    keys: tuple[str, ...] | None = None  # of a dict / Dataset result: the ones to judge
    rtol: float = RTOL
    atol: float = 0.0
    what: str = ""


# ----------------------------------------------------------------------------- judging
def _arrays(result: Any, keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    if isinstance(result, xr.Dataset):
        result = {k: result[k].values for k in result.data_vars}
    if isinstance(result, (S.PowerLawFit,)):
        result = {"alpha": result.alpha, "r2": result.r2}
    if isinstance(result, dict):
        items = {k: v for k, v in result.items() if keys is None or k in keys}
    else:
        items = {"value": result}
    out = {}
    for k, v in items.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().double().numpy()
        try:
            out[k] = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):  # labels, names …
            continue
    return out


def judge(case: Case) -> tuple[str, str]:
    """Run ``case``; return ``(outcome, detail)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.thunk()
        except (ValueError, TypeError, KeyError) as err:
            msg = str(err)
            if case.expect is not INVALID and not callable(case.expect):
                return "rejected-valid", f"{type(err).__name__}: {msg}"
            if callable(case.expect):
                verdict = case.expect(err, False)
                if verdict != "error-ok":
                    return verdict, f"{type(err).__name__}: {msg}"
            named = any(n in msg or n.replace("_", " ") in msg for n in case.names)
            return ("ok", "") if named else ("unnamed-error", f"{type(err).__name__}: {msg}")
        except Exception as err:  # noqa: BLE001 - that is what is being counted
            return "raw-traceback", f"{type(err).__name__}: {err}"
    warned = bool(caught)
    if callable(case.expect):
        return case.expect(result, warned), ""
    got = _arrays(result, case.keys)
    if case.expect is INVALID:
        finite = [k for k, v in got.items() if np.isfinite(v).any()]
        if finite:
            return "silent-wrong", f"finite {finite} for invalid input"
        return ("ok", "") if warned else ("nan-no-warning", "")
    ref = case.expect if isinstance(case.expect, dict) else {"value": case.expect}
    if "value" in ref and "value" not in got and len(ref) == 1:  # NaN reference of a mapping
        ref = dict.fromkeys(got, ref["value"])
    spurious = False
    for k, r in ref.items():
        r = np.asarray(r, dtype=np.float64)
        v = got.get(k)
        if v is None or v.shape != r.shape:
            return "silent-wrong", f"{k}: shape {None if v is None else v.shape} vs {r.shape}"
        undefined = ~np.isfinite(r) & ~np.isinf(r)
        if np.any(np.isfinite(v) & undefined):
            return "silent-wrong", f"{k}: finite where the reference is undefined"
        if np.any(np.isnan(v)) and not warned:
            return "nan-no-warning", k
        defined = ~undefined
        if np.any(np.isnan(v) & defined):
            spurious = True
            continue
        both = defined & np.isfinite(v)
        err = np.abs(v[both] - r[both])
        if np.any(err > case.atol + case.rtol * np.abs(r[both])) or np.any(
                np.isinf(r[defined]) != np.isinf(v[defined])):
            return "silent-wrong", f"{k}: {v} vs reference {r}"
    return ("nan-with-warning-on-valid", "") if spurious else ("ok", "")


# ----------------------------------------------------------------------------- inputs
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "np.float64", "np.float32",
          "np.int32")
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def make(values: np.ndarray, dtype: str):
    """``values`` (float64, exact in every dtype) as an array of ``dtype``."""
    if dtype.startswith("np."):
        return values.astype(dtype[3:])
    return torch.as_tensor(values).to(getattr(torch, dtype))


def quarter_values(rng: np.random.Generator, shape, integer: bool = False) -> np.ndarray:
    v = rng.integers(-8, 9, size=shape).astype(np.float64)
    return v if integer else v / 4


@st.composite
def feature_spec(draw):
    return {
        "n": draw(st.sampled_from([0, 1, 2, 3, 5, 9, 14])),
        "d": draw(st.sampled_from([1, 2, 4, 7, 10])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "defect": draw(st.sampled_from(["none", "none", "nonfinite", "constant", "zero",
                                        "one_dim", "three_dim", "huge", "overflow"])),
        "bad": draw(st.sampled_from(NONFINITE)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _features(p):
    rng = np.random.default_rng(p["seed"])
    n, d, dtype = p["n"], p["d"], p["dtype"]
    x = quarter_values(rng, (n, d), integer="int" in dtype)
    defect = p["defect"]
    if defect == "constant":
        x[:] = x[:1] if n else x
    elif defect == "zero":
        x[:] = 0
    elif defect in ("huge", "overflow"):
        dtype = "float64"
        x = x * (1e150 if defect == "huge" else 1e170)  # squares 1e300 / overflow
    if defect == "nonfinite" and n * d:
        if "int" in dtype:
            dtype = "float32"
        x[rng.integers(n), rng.integers(d)] = p["bad"]
    ref_x = x
    if defect == "one_dim":
        x = x.reshape(-1)
        ref_x = None
    elif defect == "three_dim" and d % 2 == 0:
        x = x.reshape(n, 2, d // 2)
    if n == 0 or d == 0 or (defect == "nonfinite" and n * d):
        ref_x = None
    return make(x, dtype), ref_x


def _undefined_if(x: np.ndarray | None, fn: Callable[[np.ndarray], Any]):
    if x is None:
        return INVALID
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = fn(x)
        except (ValueError, np.linalg.LinAlgError, ZeroDivisionError):
            return float("nan")
    return value


def _cov_eigs(x):
    x = np.asarray(x, np.float64)
    xc = x - x.mean(0)
    lam = np.clip(np.linalg.eigvalsh(xc.T @ xc / len(x))[::-1], 0, None)
    tol = max(x.shape) * np.finfo(float).eps * lam[0] * 10
    return np.where(lam > tol, lam, 0.0)


def _rankme_cov(x):
    lam = _cov_eigs(x)
    p = lam / lam.sum() + S.DEFAULT_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def _alpha(x, lo=0, hi=3):
    lam = _cov_eigs(x)
    if hi > lam.size or np.any(lam[lo:hi] <= 0):
        return float("nan")
    r = np.arange(lo, hi) + 1.0
    X = np.stack([-np.log(r), np.ones_like(r)], 1)
    W = np.diag(1.0 / r)
    return float(np.linalg.solve(X.T @ W @ X, X.T @ W @ np.log(lam[lo:hi]))[0])


def _svals(x):
    s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    return np.where(s > max(x.shape) * 1e-7 * s[0], s, 0.0) if s[0] > 0 else s


def _two_batches(cls, x, *args):
    m = cls(*args)
    k = max(1, x.shape[0] // 2) if x.ndim >= 1 and x.shape[0] > 1 else None
    if k is None:
        m.update(x)
    else:
        m.update(x[:k])
        m.update(x[k:])
    return m.compute()


FEATURE_FUNCTIONS: dict[str, tuple[Callable, Callable, dict]] = {
    "rankme": (S.rankme, ref_rankme, {}),
    "rankme_covariance": (S.rankme_covariance, _rankme_cov, {}),
    "participation_ratio": (S.participation_ratio, ref_pr, {}),
    "stable_rank": (S.stable_rank, ref_stable_rank, {}),
    "effective_rank": (S.effective_rank, ref_erank, {}),
    "alpha_req": (lambda x: S.alpha_req(x, (0, 3)), _alpha, {}),
    "alpha_req_fit": (lambda x: S.alpha_req_fit(x, (0, 3)), lambda x: {"alpha": _alpha(x)},
                      {"keys": ("alpha",)}),
    "singular_values": (S.singular_values, _svals, {"atol_scale": 1e-6}),
    "covariance_spectrum": (S.covariance_spectrum, _cov_eigs, {"atol_scale": 1e-9}),
    "RankMe": (lambda x: _two_batches(S.RankMe, x), ref_rankme, {}),
    "RankMe covariance": (lambda x: _two_batches(S.RankMe, x, S.DEFAULT_EPS, "covariance"),
                          _rankme_cov, {}),
    "AlphaReQ": (lambda x: _two_batches(S.AlphaReQ, x, (0, 3)), _alpha, {}),
    "ParticipationRatio": (lambda x: _two_batches(S.ParticipationRatio, x), ref_pr, {}),
    "StableRank": (lambda x: _two_batches(S.StableRank, x), ref_stable_rank, {}),
    "EffectiveRank": (lambda x: _two_batches(S.EffectiveRank, x), ref_erank, {}),
    "SpectralMetrics": (
        lambda x: _two_batches(S.SpectralMetrics, x, ("rankme", "rankme_covariance")),
        lambda x: {"rankme": ref_rankme(x), "rankme_covariance": _rankme_cov(x)}, {}),
    "SpectrumAccumulator": (lambda x: S.SpectrumAccumulator().update(x).covariance_spectrum(),
                            _cov_eigs, {"atol_scale": 1e-9}),
}


def feature_cases(p) -> list[Case]:
    x, ref_x = _features(p)
    cases = []
    for name, (fn, ref, opts) in FEATURE_FUNCTIONS.items():
        expect = _undefined_if(ref_x, lambda z, ref=ref: ref(z.reshape(z.shape[0], -1)))
        atol = 0.0
        if p["defect"] == "overflow" and "atol_scale" in opts and expect is not INVALID:
            # the spectrum itself may be beyond float64 (about 1e340): scale it back
            with np.errstate(all="ignore"):
                expect = ref(ref_x.reshape(ref_x.shape[0], -1) / 1e170) * 1e170
                if name != "singular_values":
                    expect = expect * 1e170
            if not np.all(np.isfinite(expect)):
                expect = INVALID
        if "atol_scale" in opts and expect is not INVALID:
            finite = np.abs(np.asarray(expect, float))
            finite = finite[np.isfinite(finite)]
            scale = float(finite.max()) if finite.size else 0.0
            atol = opts["atol_scale"] * scale
        cases.append(Case(name, lambda fn=fn: fn(x), expect, ("features", "batch"),
                          keys=opts.get("keys"), atol=atol, rtol=1e-7 if atol else RTOL,
                          what=str({k: p[k] for k in ("n", "d", "dtype", "defect")})))
    return cases


# --- spectra given directly ---------------------------------------------------------------
@st.composite
def spectrum_spec(draw):
    return {"k": draw(st.sampled_from([0, 1, 3, 6])),
            "defect": draw(st.sampled_from(["none", "nonfinite", "negative", "zero"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1)),
            "dtype": draw(st.sampled_from(["float64", "float32", "float16", "np.float64"]))}


def spectrum_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    s = np.sort(rng.integers(1, 9, p["k"]).astype(float) / 4)[::-1].copy()
    valid = p["k"] > 0
    if p["defect"] == "nonfinite" and p["k"]:
        s[rng.integers(p["k"])] = p["bad"]
        valid = False
    elif p["defect"] == "negative" and p["k"]:
        s[-1] = -0.25
        valid = False
    elif p["defect"] == "zero":
        s[:] = 0
    arr = make(s, p["dtype"])

    def rm(z):
        q = z / z.sum() + S.DEFAULT_EPS
        return float(np.exp(-np.sum(q * np.log(q))))

    def fit(z):
        lam = z
        if lam.size < 3 or np.any(lam[:3] <= 0):
            return float("nan")
        r = np.arange(3) + 1.0
        X = np.stack([-np.log(r), np.ones_like(r)], 1)
        W = np.diag(1.0 / r)
        return float(np.linalg.solve(X.T @ W @ X, X.T @ W @ np.log(lam[:3]))[0])

    ref = s if valid else None
    return [
        Case("rankme_from_spectrum", lambda: S.rankme_from_spectrum(arr),
             _undefined_if(ref, rm), ("spectrum",)),
        Case("power_law_fit", lambda: S.power_law_fit(arr, (0, 3)),
             _undefined_if(ref, lambda z: {"alpha": fit(z)}), ("eigenvalues", "spectrum"),
             keys=("alpha",)),
    ]


# --- weights ------------------------------------------------------------------------------
@st.composite
def weight_spec(draw):
    return {"m": draw(st.sampled_from([0, 1, 3, 8])), "n": draw(st.sampled_from([1, 4, 6])),
            "dtype": draw(st.sampled_from(DTYPES)),
            "defect": draw(st.sampled_from(["none", "nonfinite", "zero", "one_dim", "conv"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


def _ref_weight(w):
    s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
    out = {"spectral_norm": s[0], "frobenius_norm": np.sqrt(np.sum(s**2))}
    with np.errstate(all="ignore"):
        out["stable_rank"] = np.sum(s**2) / s[0] ** 2
        p = s[s > 1e-12 * s[0]] / s.sum() if s[0] > 0 else np.array([np.nan])
        out["effective_rank"] = float(np.exp(-np.sum(p * np.log(p))))
    out["lambda_max"] = s[0] ** 2 / max(w.reshape(w.shape[0], -1).shape)
    return out


def weight_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    dtype = p["dtype"]
    w = quarter_values(rng, (p["m"], p["n"]), integer="int" in dtype)
    if p["defect"] == "conv":
        w = quarter_values(rng, (p["m"], p["n"], 2), integer="int" in dtype)
    valid = p["m"] > 0
    if p["defect"] == "nonfinite" and w.size:
        dtype = "float32" if "int" in dtype else dtype
        w.reshape(-1)[rng.integers(w.size)] = p["bad"]
        valid = False
    elif p["defect"] == "zero":
        w[:] = 0
    arr = make(w, dtype)
    if p["defect"] == "one_dim":
        arr = arr.reshape(-1)
        valid = False
    ref = _undefined_if(w if valid else None, _ref_weight)
    keys = tuple(ref) if isinstance(ref, dict) else tuple(_ref_weight(np.ones((2, 2))))
    cases = [Case("weight_spectrum", lambda: WS.weight_spectrum(arr), ref, ("weight",),
                  keys=keys, rtol=1e-7)]
    spectra_ref = ref if not isinstance(ref, dict) else {k: np.array([v]) for k, v in
                                                        ref.items()}
    if p["defect"] != "one_dim":
        cases.append(Case("weight_spectra", lambda: WS.weight_spectra({"w": arr}), spectra_ref,
                          ("weight", "model"), keys=keys, rtol=1e-7))
    return cases


# --- neural collapse ----------------------------------------------------------------------
@st.composite
def collapse_spec(draw):
    return {"C": draw(st.sampled_from([1, 2, 3, 5])), "d": draw(st.sampled_from([1, 2, 6])),
            "per": draw(st.sampled_from([1, 2, 4])),
            "dtype": draw(st.sampled_from(DTYPES)),
            "defect": draw(st.sampled_from([
                "none", "none", "ignore_index", "label_too_big", "float_labels",
                "short_labels", "nan_features", "nan_weight", "nan_bias", "nan_logits",
                "narrow_logits", "weight_wrong_d", "empty", "labels_2d"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1)),
            "with": draw(st.sampled_from(["none", "weight", "logits"]))}


NC_KEYS = ("nc1", "nc2_equinorm", "nc2_equiangle", "nc2_coherence", "cdnv")
NC_CLASSIFIER = ("nc2_equinorm_classifier", "nc2_equiangle_classifier", "nc3", "nc4")


def collapse_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    C, d, per, dtype = p["C"], p["d"], p["per"], p["dtype"]
    y = np.repeat(np.arange(C), per)
    n = y.size
    mu = quarter_values(rng, (C, d), integer=True) * 4 if C else np.zeros((0, d))
    h = mu[y] + quarter_values(rng, (n, d), integer="int" in dtype)
    W = quarter_values(rng, (C, d))
    b = quarter_values(rng, (C,))
    logits = h @ W.T + b
    use = p["with"]
    labels: Any = y.copy()
    valid, keys = True, NC_KEYS
    names: tuple[str, ...] = ("labels",)
    defect = p["defect"]
    if defect == "ignore_index":
        labels[rng.integers(n)] = -100
        valid = False
    elif defect == "label_too_big" and use != "none":
        labels[rng.integers(n)] = C + 2
        valid = False
    elif defect == "float_labels":
        labels = labels.astype(np.float32)
        valid = False
    elif defect == "short_labels":
        labels = labels[:-1]
        valid = False
    elif defect == "labels_2d":
        labels = np.stack([labels, labels], 1)
        valid = False
    elif defect == "nan_features":
        dtype = "float32" if "int" in dtype else dtype
        h[rng.integers(n), rng.integers(d)] = p["bad"]
        valid, names = False, ("features",)
    elif defect == "empty":
        h, labels = h[:0], labels[:0]
        valid, names = False, ("features", "labels")
    elif defect == "nan_weight" and use == "weight":
        W[rng.integers(C), rng.integers(d)] = p["bad"]
        valid, keys, names = False, NC_CLASSIFIER, ("weight",)
    elif defect == "nan_bias" and use == "weight":
        b[rng.integers(C)] = p["bad"]
        valid, keys, names = False, ("nc4",), ("bias",)
    elif defect == "nan_logits" and use == "logits":
        logits[rng.integers(n), rng.integers(C)] = p["bad"]
        valid, keys, names = False, ("nc4",), ("logits",)
    elif defect == "narrow_logits" and use == "logits" and C > 1:
        logits = logits[:, :-1]
        valid, keys, names = False, ("nc4",), ("logits", "labels")
    elif defect == "weight_wrong_d" and use == "weight":
        W = np.concatenate([W, W[:, :1]], 1)
        valid, keys, names = False, NC_CLASSIFIER, ("weight",)
    if defect == "label_too_big":
        names = ("labels",)
    x = make(h, dtype)
    kw: dict[str, Any] = {}
    if use == "weight":
        kw = {"weight": make(W, "float64"), "bias": make(b, "float64")}
    elif use == "logits":
        kw = {"logits": make(logits, "float64")}

    if valid:
        def reference(hh):
            if C < 2:  # one class: only NC4 is defined (every prediction is that class)
                out = dict.fromkeys(NC_KEYS + NC_CLASSIFIER, float("nan"))
                if use != "none":
                    out["nc4"] = float(np.mean(logits.argmax(1) != y))
                return out
            r = ref_collapse(hh, y, W=W if use != "none" else None, b=b)
            out = {k: r.get(k, float("nan")) for k in NC_KEYS}
            if use == "weight":
                out.update({k: r[k] for k in NC_CLASSIFIER})
            elif use == "logits":
                out["nc4"] = r["nc4"]
            return out

        expect = _undefined_if(h, reference)
        if use == "none":
            keys = NC_KEYS
        elif use == "logits":
            keys = NC_KEYS + ("nc4",)
        else:
            keys = NC_KEYS + NC_CLASSIFIER
        expect = {k: expect[k] for k in keys}
        if C >= 2 and per == 1:  # zero within-class spread: NC1 = 0 exactly, CDNV = 0
            pass
    else:
        expect = INVALID

    def streaming():
        acc = NC.CollapseAccumulator()
        acc.update(x, labels)
        if use == "logits":
            acc.update_predictions(x, logits=kw["logits"])
        elif use == "weight":
            acc.update_predictions(x, weight=kw["weight"], bias=kw["bias"])
        return acc.compute(weight=kw.get("weight"))

    # single-sample classes and near-coincident means make NC1 sensitive: state a looser rtol
    return [Case("neural_collapse", lambda: NC.neural_collapse(x, labels, **kw), expect,
                 names, keys=keys, rtol=1e-7, atol=1e-9),
            Case("CollapseAccumulator", streaming, expect, names, keys=keys, rtol=1e-7,
                 atol=1e-9)]


# --- kernels ------------------------------------------------------------------------------
@st.composite
def kernel_spec(draw):
    return {"n": draw(st.sampled_from([0, 1, 2, 5])), "k": draw(st.sampled_from([0, 2])),
            "dtype": draw(st.sampled_from(["float64", "float32", "float16", "np.float64",
                                           "int64"])),
            "defect": draw(st.sampled_from(["none", "none", "nan_K", "nan_y", "ignore_index",
                                            "short_y", "zero_K", "not_square", "label_too_big",
                                            "nan_dt"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


def _np_flat(K):
    if K.ndim == 2:
        return K
    n, _, k, _ = K.shape
    return K.transpose(0, 2, 1, 3).reshape(n * k, n * k)


def kernel_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    n, k, dtype = p["n"], p["k"], p["dtype"]
    f = quarter_values(rng, (n * max(k, 1), 3), integer="int" in dtype)
    Kf = f @ f.T
    K = Kf if k == 0 else Kf.reshape(n, k, n, k).transpose(0, 2, 1, 3).copy()
    ncls = k if k else 3
    y = rng.integers(0, ncls, n)
    K2 = K + np.ones_like(K) * 0.25 * (4 if "int" in dtype else 1)
    dt = 0.5
    valid_K = valid_y = n > 0
    defect = p["defect"]
    if defect == "nan_K" and n:
        dtype = "float32" if "int" in dtype else dtype
        K.reshape(-1)[rng.integers(K.size)] = p["bad"]
        valid_K = False
    elif defect == "zero_K":
        K = np.zeros_like(K)
    elif defect == "not_square":
        K = K[:, :-1] if n else np.zeros((1, 0))
        valid_K = False
    y_arr: Any = y
    if defect == "nan_y":
        y_arr = y.astype(float)
        if n:
            y_arr[rng.integers(n)] = p["bad"]
            valid_y = False
        if k:
            valid_y = False  # real targets of a full NTK must be (n, k)
    elif defect == "ignore_index" and n:
        y_arr = y.copy()
        y_arr[rng.integers(n)] = -100
        valid_y = False
    elif defect == "short_y" and n:
        y_arr = y[:-1]
        valid_y = False
    elif defect == "label_too_big" and n and k:
        y_arr = y.copy()
        y_arr[0] = k + 1
        valid_y = False
    elif defect == "nan_dt":
        dt = float("nan")
    Kt = make(K, dtype)
    K2t = make(K2, "float64")
    Kr = K.astype(np.float64)

    def onehot(yy):
        yy = np.asarray(yy)
        if yy.dtype.kind in "iu":
            return np.eye(k if k else int(yy.max()) + 1)[yy]
        return yy[:, None]

    def align(KK, yy):
        Km, Y = _np_flat(KK), onehot(yy)
        Y = Y.reshape(-1, 1) if KK.ndim == 4 else Y
        T = Y @ Y.T
        return float(np.sum(Km * T) / (np.linalg.norm(Km) * np.linalg.norm(T)))

    def calign(KK, yy):
        m = KK.shape[0]
        H = np.eye(m) - 1.0 / m
        Y = onehot(yy)
        if KK.ndim == 4:
            Kc = np.einsum("ia,abkl,bj->ijkl", H, KK, H)
            Yc = (H @ Y).reshape(-1, 1)
            Km = _np_flat(Kc)
        else:
            Km = H @ KK @ H
            Yc = H @ Y
        T = Yc @ Yc.T
        return float(np.sum(Km * T) / (np.linalg.norm(Km) * np.linalg.norm(T)))

    def cumpow(KK, yy):
        Km, Y = _np_flat(KK), onehot(yy)
        Y = Y.reshape(-1, 1) if KK.ndim == 4 else Y
        lam, U = np.linalg.eigh((Km + Km.T) / 2)
        U = U[:, np.argsort(-lam)]
        return np.cumsum(np.sum((U.T @ Y) ** 2, 1)) / np.sum(Y**2)

    def erank(KK):
        lam = np.clip(np.linalg.eigvalsh(_np_flat(KK)), 0, None)
        q = lam[lam > 1e-12 * lam.max()] / lam.sum()
        return float(np.exp(-np.sum(q * np.log(q))))

    def dist(A, B):
        return 1 - float(np.sum(A * B) / (np.linalg.norm(A) * np.linalg.norm(B)))

    def centred_nan(KK):  # where a non-finite entry of K leaves the centred kernel NaN
        with np.errstate(all="ignore"):
            kc = KK - KK.mean(0, keepdims=True)
            return kc - kc.mean(1, keepdims=True)

    rK = Kr if valid_K else None
    both = Kr if valid_K and valid_y else None
    kn = ("K",)
    ky = ("K", "y", "targets")
    # a trajectory: a bad first kernel gives NaN (with a warning) at its step and in every
    # comparison with it; the second kernel's alignment stays a correct value
    summary_keys: tuple[str, ...] = ("ntk_alignment", "ntk_relative_change")
    if not valid_y or n == 0:
        summary_expect: Any = INVALID
        summary_keys = ("ntk_alignment",)
    elif defect == "nan_K":
        summary_expect = {"ntk_alignment": np.array([np.nan, align(K2, y_arr)]),
                          "ntk_relative_change": np.array([np.nan, np.nan])}
    elif not valid_K:
        summary_expect = INVALID
    else:
        summary_expect = _undefined_if(Kr, lambda KK: {
            "ntk_alignment": np.array([align(KK, y_arr), align(K2, y_arr)]),
            "ntk_relative_change": np.array([0.0, np.linalg.norm(K2 - KK) /
                                             np.linalg.norm(KK)])})
    # C(k) is basis-dependent inside a block of equal eigenvalues: only compare kernels with
    # a simple spectrum (the degenerate ones are still run for the bad-input cases)
    cum_ok = valid_K and valid_y and n and not (Kr.size and np.any(np.abs(np.diff(np.sort(
        np.linalg.eigvalsh(_np_flat(Kr))))) < 1e-9))
    cases = [
        Case("center_kernel", lambda: KER.center_kernel(Kt),
             centred_nan(Kr) if defect == "nan_K" and n else INVALID if not valid_K else (
                 (np.eye(n) - 1 / n) @ Kr @ (np.eye(n) - 1 / n) if k == 0 else
                 np.einsum("ia,abkl,bj->ijkl", np.eye(n) - 1 / n, Kr, np.eye(n) - 1 / n)),
             kn, atol=1e-12),
        Case("kernel_alignment", lambda: KER.kernel_alignment(Kt, y_arr),
             _undefined_if(both, lambda KK: align(KK, y_arr)), ky),
        Case("centered_alignment", lambda: KER.centered_alignment(Kt, y_arr),
             _undefined_if(both, lambda KK: calign(KK, y_arr)), ky, rtol=1e-7, atol=1e-12),
        Case("ntk_effective_rank", lambda: KER.ntk_effective_rank(Kt),
             _undefined_if(rK, erank), kn, rtol=1e-7),
        Case("kernel_distance", lambda: KER.kernel_distance(Kt, K2t),
             _undefined_if(rK, lambda KK: dist(KK, K2)), ("K1", "K2"), atol=1e-12),
        Case("kernel_velocity", lambda: KER.kernel_velocity(Kt, K2t, dt),
             _undefined_if(rK if math.isfinite(dt) else None, lambda KK: dist(KK, K2) / dt),
             ("K1", "K2", "dt"), atol=1e-12),
        Case("relative_kernel_change", lambda: KER.relative_kernel_change(K2t, Kt),
             _undefined_if(rK, lambda KK: np.linalg.norm(K2 - KK) / np.linalg.norm(KK)),
             ("K_t", "K_0")),
        Case("lazy_rich_summary", lambda: KER.lazy_rich_summary([Kt, K2t], y_arr),
             summary_expect, ("kernels", "K", "y", "targets"), keys=summary_keys, atol=1e-12),
    ]
    if cum_ok or not (valid_K and valid_y and n):
        cases.append(Case("cumulative_power", lambda: KER.cumulative_power(Kt, y_arr),
                          _undefined_if(both, lambda KK: cumpow(KK, y_arr)), ky, atol=1e-9))
    return cases


# --- instability --------------------------------------------------------------------------
@st.composite
def instability_spec(draw):
    return {"b": draw(st.sampled_from([0, 1, 2])), "t": draw(st.sampled_from([0, 1, 4])),
            "dh": draw(st.sampled_from([1, 4])),
            "dtype": draw(st.sampled_from(["float64", "float32", "float16", "bfloat16",
                                           "np.float32"])),
            "defect": draw(st.sampled_from(["none", "nan_q", "nan_k", "mismatch", "nan_logits",
                                            "neg_inf_logits", "empty_vocab", "nan_losses",
                                            "nan_initial", "nan_best", "no_losses"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


def instability_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    b, t, dh, dtype = p["b"], p["t"], p["dh"], p["dtype"]
    q = quarter_values(rng, (b, t, dh))
    k = quarter_values(rng, (b, t, dh))
    logits = quarter_values(rng, (b, 3))
    losses = np.abs(quarter_values(rng, (4,))) + 0.25
    initial, best = 3.0, None
    valid_qk = b * t > 0
    defect = p["defect"]
    if defect == "nan_q" and q.size:
        q.reshape(-1)[rng.integers(q.size)] = p["bad"]
        valid_qk = False
    elif defect == "nan_k" and k.size:
        k.reshape(-1)[rng.integers(k.size)] = p["bad"]
        valid_qk = False
    elif defect == "mismatch":
        k = k[..., :-1] if dh > 1 else np.zeros((b, t, 2))
        valid_qk = False
    elif defect == "nan_logits" and logits.size:
        logits.reshape(-1)[rng.integers(logits.size)] = (
            p["bad"] if p["bad"] != float("-inf") else float("nan"))
    elif defect == "neg_inf_logits" and logits.size:
        logits[:, 0] = float("-inf")  # a masked vocabulary entry: a valid input
    elif defect == "empty_vocab":
        logits = logits[:, :0]
    elif defect == "nan_losses":
        losses[0] = p["bad"]  # a diverged run: counts as the initial loss (valid)
    elif defect == "nan_initial":
        initial = p["bad"]
    elif defect == "nan_best":
        best = p["bad"]
    elif defect == "no_losses":
        losses = losses[:0]
    qa, ka, la = make(q, dtype), make(k, dtype), make(logits, dtype)

    def ref_max(qq, kk):
        z = np.abs(np.einsum("bid,bjd->bij", qq, kk)) / np.sqrt(dh)
        return float(np.max(np.tril(z)))

    def ref_lr():
        v = np.where(np.isfinite(losses), np.minimum(losses, initial), initial)
        bb = min(losses[np.isfinite(losses)].min(), initial) if best is None else best
        return float(np.mean(v - bb))

    lr_valid = losses.size and math.isfinite(initial) and (best is None or math.isfinite(best))
    def lse(row):  # per row: NaN / +Inf entries make that row's log Z NaN / +Inf
        if np.isnan(row).any():
            return np.nan
        if np.isposinf(row).any():
            return np.inf
        top = row.max()
        return top + np.log(np.sum(np.exp(row - top))) if np.isfinite(top) else top

    with np.errstate(all="ignore"):
        ref_lz = (np.array([lse(r) for r in logits]) if logits.shape[-1] else None)
    return [
        Case("max_attention_logit", lambda: INS.max_attention_logit(qa, ka),
             _undefined_if(q if valid_qk else None, lambda qq: ref_max(qq, k)), ("q", "k"),
             rtol=1e-7),
        Case("log_partition", lambda: INS.log_partition(la),
             INVALID if ref_lz is None else ref_lz, ("logits",), rtol=1e-7,
             what=defect),
        Case("lr_sensitivity", lambda: INS.lr_sensitivity(losses, initial, best),
             ref_lr() if lr_valid else INVALID, ("losses", "initial_loss", "best_loss")),
    ]


class _Attention(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.q_out, self.k_out = nn.Identity(), nn.Identity()

    def forward(self, x):
        return self.q_out(self.q(x)).unsqueeze(1), self.k_out(self.k(x)).unsqueeze(1)



class _TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()

    def forward(self, x):
        q, k = self.attn(x)
        return (q @ k.transpose(-2, -1)).squeeze(1)


def attention_cases(p) -> list[Case]:
    torch.manual_seed(p["seed"] % 1000)
    model = _TinyAttention().double()
    x = torch.as_tensor(quarter_values(np.random.default_rng(p["seed"]), (2, 3, 4)))
    valid = True
    if p["defect"] in ("nan_q", "nan_k", "nan_logits"):
        x[0, 1, 2] = p["bad"]
        valid = False
    with torch.no_grad():
        qq, kk = model.attn(x)
    ref = np.array([float(np.max(np.tril(np.abs((qq @ kk.transpose(-2, -1)).numpy()[:, 0])) /
                                 2.0))]) if valid else INVALID
    return [Case("attention_logit_stats",
                 lambda: {"max_attention_logit": INS.attention_logit_stats(model, x, n_heads=1)[
                     "max_attention_logit"]},
                 ref if ref is INVALID else {"max_attention_logit": ref}, ("inputs",),
                 keys=("max_attention_logit",), rtol=1e-7)]


# --- phases -------------------------------------------------------------------------------
@st.composite
def phase_spec(draw):
    return {"T": draw(st.sampled_from([0, 2, 12])),
            "defect": draw(st.sampled_from(["none", "nan_rankme", "nan_alpha", "nan_step",
                                            "mismatch", "unsorted", "neg_rankme"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


def phase_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    T = p["T"]
    steps = np.unique(np.round(np.geomspace(1, 10_000, T))).astype(float) if T else np.zeros(0)
    T = steps.size
    x = np.log1p(steps)
    # known phases: RankMe rises and alpha falls until the middle, then the reverse
    mid = x.mean() if T else 0.0
    r = np.exp(-np.abs(x - mid)) * 50 + 1
    a = 1 + 0.3 * np.abs(x - mid)
    defect = p["defect"]
    names = ("step", "rankme", "alpha")
    bad_idx = int(rng.integers(T)) if T else 0
    if defect == "nan_rankme" and T:
        r[bad_idx] = p["bad"]
    elif defect == "neg_rankme" and T:
        r[bad_idx] = -1.0
    elif defect == "nan_alpha" and T:
        a[bad_idx] = p["bad"]
    elif defect == "nan_step" and T:
        steps[bad_idx] = p["bad"]
    elif defect == "mismatch":
        r = r[:-1] if T else np.ones(1)
    elif defect == "unsorted" and T > 1:
        steps = steps[::-1].copy()

    def check(result, warned):
        if isinstance(result, Exception):
            ok_error = (T < 3 or defect in ("mismatch", "nan_step", "unsorted")
                        or (defect == "nan_step" and T))
            return "error-ok" if ok_error else "rejected-valid"
        if T < 3 or defect in ("mismatch", "unsorted") or (defect == "nan_step" and T):
            return "silent-wrong"
        if defect in ("nan_rankme", "nan_alpha", "neg_rankme"):
            if result[bad_idx] != "undetermined":
                return "silent-wrong"
            return "ok" if warned else "nan-no-warning"
        # no defect: before the middle entropy-seeking, after it compression-seeking
        inner = (x > x[0] + 0.15 * (x[-1] - x[0])) & (x < x[-1] - 0.15 * (x[-1] - x[0]))
        early = inner & (x < mid - 0.1 * (x[-1] - x[0]))
        late = inner & (x > mid + 0.1 * (x[-1] - x[0]))
        good = (np.all(result[early] == "entropy_seeking")
                and np.all(result[late] == "compression_seeking"))
        return "ok" if good else "silent-wrong"

    labels = np.array(["warmup"] * T)

    def seg_check(result, warned):
        if isinstance(result, Exception):
            return "error-ok" if (defect == "nan_step" and T) or defect == "mismatch" else \
                "rejected-valid"
        if (defect == "nan_step" and T) or defect == "mismatch":
            return "silent-wrong"
        want = [(int(steps[0]), int(steps[-1]), "warmup")] if T else []
        return "ok" if result == want else "silent-wrong"

    seg_labels = labels if defect != "mismatch" else labels[:-1] if T else np.array(["a"])
    return [Case("geometric_phases", lambda: PH.geometric_phases(steps, r, a), check, names),
            Case("phase_segments", lambda: PH.phase_segments(steps, seg_labels), seg_check,
                 ("step", "labels"))]


# --- inductive bias -----------------------------------------------------------------------
@st.composite
def bias_spec(draw):
    return {"S": draw(st.sampled_from([0, 2, 40])),
            "defect": draw(st.sampled_from(["none", "nan_errors", "nan_epsilon", "nan_x",
                                            "nan_y", "short_y", "nan_test_error",
                                            "nan_tolerance", "no_seeds", "nan_confidence"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


def bias_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    defect = p["defect"]
    e = rng.chisquare(3, p["S"]) * 0.1
    eps = np.array([0.05, 0.2])
    conf = 0.9
    if defect == "nan_errors" and e.size:
        e[rng.integers(e.size)] = p["bad"]
    elif defect == "nan_epsilon":
        eps[1] = p["bad"]
    elif defect == "nan_confidence":
        conf = float("nan")
    valid = e.size >= 3 and defect not in ("nan_errors", "nan_epsilon", "nan_confidence")

    def ib_check(result, warned):
        if isinstance(result, Exception):
            return "error-ok" if not valid else "rejected-valid"
        if not valid:
            return "silent-wrong"
        emp = -np.log2(np.mean(e[None, :] <= eps[:, None], 1))
        got = result["empirical_inductive_bias"].values
        same = np.allclose(got, emp, rtol=1e-12) or np.array_equal(got, emp)
        bits = result["inductive_bias"].values
        return "ok" if same and np.all(np.isfinite(bits) & (bits >= 0)) else "silent-wrong"

    xtr = quarter_values(rng, (4, 6))
    ytr = quarter_values(rng, (4,))
    xte = quarter_values(rng, (3, 6))
    yte = quarter_values(rng, (3,))
    k_valid = True
    if defect == "nan_x":
        xtr[1, 2] = p["bad"]
        k_valid = False
    elif defect == "nan_y":
        ytr[1] = p["bad"]
        k_valid = False
    elif defect == "short_y":
        ytr = ytr[:-1]
        k_valid = False

    def gp_reference():
        # exact posterior of the linear kernel x·x'/d (Rasmussen & Williams 2006, Eq. 2.19)
        kern = lambda a, b: a @ b.T / 6  # noqa: E731
        knn, ksn, kss = kern(xtr, xtr), kern(xte, xtr), kern(xte, xte)
        mean = ksn @ np.linalg.solve(knn, ytr)
        cov = kss - ksn @ np.linalg.solve(knn, ksn.T)
        return (np.sum((mean - yte) ** 2) + np.trace(cov)) / 3, cov

    def gp_check(result, warned):
        if isinstance(result, Exception):
            return "error-ok" if not k_valid else "rejected-valid"
        r = result.numpy()
        if not k_valid:
            if np.isfinite(r).any():
                return "silent-wrong"
            return "ok" if warned else "nan-no-warning"
        want, _ = gp_reference()
        return "ok" if abs(r.mean() - want) <= 6 * r.std() / np.sqrt(r.size) else \
            "silent-wrong"

    test_errors = [0.1, 0.2, 0.3]
    tol: float | None = None
    seeds = [0, 1, 2]
    if defect == "nan_test_error":
        test_errors[1] = p["bad"]
    elif defect == "nan_tolerance":
        tol = p["bad"]
    elif defect == "no_seeds":
        seeds = []

    def train_fn(seed):
        return (test_errors[seed], 0.0)

    net_invalid = defect == "no_seeds" or (tol is not None and not tol >= 0)

    def net_check(result, warned):
        if isinstance(result, Exception):
            return "error-ok" if net_invalid else "rejected-valid"
        if net_invalid:
            return "silent-wrong"
        if defect == "nan_test_error":
            if not warned:
                return "nan-no-warning"
        want = np.array(test_errors)
        return "ok" if np.array_equal(result, want, equal_nan=True) else "silent-wrong"

    return [
        Case("inductive_bias", lambda: IB.inductive_bias(e, eps, n_bootstrap=3,
                                                         confidence=conf), ib_check,
             ("errors", "epsilon", "confidence")),
        Case("kernel_hypothesis_errors",
             lambda: IB.kernel_hypothesis_errors(xtr, ytr, xte, yte, kernel="linear",
                                                 n_hypotheses=2000), gp_check,
             ("x_train", "y_train", "x_test", "y_test")),
        Case("network_hypothesis_errors",
             lambda: IB.network_hypothesis_errors(train_fn, seeds, fit_tolerance=tol),
             net_check, ("seeds", "fit_tolerance", "train_fn")),
    ]


# --- capture ------------------------------------------------------------------------------
@st.composite
def capture_spec(draw):
    return {"b": draw(st.sampled_from([1, 3])), "t": draw(st.sampled_from([1, 4])),
            "reduce": draw(st.sampled_from(CAP.REDUCTIONS)),
            "defect": draw(st.sampled_from(["none", "nan_x", "empty_row_mask", "bad_mask",
                                            "unknown_layer", "short_labels"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(x)


def capture_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    b, t, red, defect = p["b"], p["t"], p["reduce"], p["defect"]
    x = torch.as_tensor(quarter_values(rng, (b, t, 3)))
    mask = torch.ones(b, t, dtype=torch.long)
    if t > 1:
        mask[:, -1] = 0
    if defect == "nan_x":
        x[0, 0, 0] = p["bad"]
    elif defect == "empty_row_mask":
        mask[0] = 0
    elif defect == "bad_mask":
        mask = mask[:, :0] if t else mask
    xn = x.numpy()
    mn = mask.numpy().astype(bool)

    def ref_reduce():
        if red == "none":
            return xn
        if red == "flatten":
            return xn.reshape(b, -1)
        if red == "cls":
            return xn[:, 0]
        if red == "tokens":
            return xn[mn]
        rows = []
        for i in range(b):
            keep = np.flatnonzero(mn[i])
            if keep.size == 0:
                return None  # a sequence with no token has no mean / last token
            rows.append(xn[i, keep].mean(0) if red == "mean" else xn[i, keep[-1]])
        return np.stack(rows)

    mask_used = red in ("mean", "last", "tokens")
    ref: Any = ref_reduce()
    if defect == "bad_mask" and mask_used:
        ref = None
    if ref is None:
        ref = INVALID

    def pass_through(result, warned):
        """NaN activations pass through a reduction unchanged (it measures nothing)."""
        if isinstance(result, Exception):
            return "error-ok" if ref is INVALID or defect == "bad_mask" else "rejected-valid"
        if ref is INVALID:
            return "silent-wrong"
        r = result.numpy()
        return "ok" if r.shape == ref.shape and np.array_equal(r, ref, equal_nan=True) else \
            "silent-wrong"

    model = _Seq()
    layers = "nope" if defect == "unknown_layer" else "lin"
    with torch.no_grad():
        out = model(x).numpy()

    def run_capture():
        with CAP.capture(model, layers, reduce="none") as cap:
            model(x)
        return cap["lin"]

    def cap_check(result, warned):
        if isinstance(result, Exception):
            return "error-ok" if defect == "unknown_layer" else "rejected-valid"
        if defect == "unknown_layer":
            return "silent-wrong"
        return "ok" if np.array_equal(result.numpy(), out, equal_nan=True) else "silent-wrong"

    labels = torch.arange(b)
    if defect == "short_labels":
        labels = labels[:-1] if b > 1 else torch.zeros(0, dtype=torch.long)

    def run_stream():
        accs = CAP.stream_features(model, [(x.reshape(b, -1)[:, :3], labels)], layers,
                                   NC.CollapseAccumulator, labels=True)
        return accs

    def stream_check(result, warned):
        if isinstance(result, Exception):
            return "error-ok" if defect in ("unknown_layer", "short_labels") else \
                "rejected-valid"
        if defect in ("unknown_layer", "short_labels"):
            return "silent-wrong"
        acc = result["lin"]
        with torch.no_grad():
            want = model(x.reshape(b, -1)[:, :3]).numpy()
        got = acc.stats().means.numpy()
        return "ok" if np.allclose(got, want, equal_nan=True, rtol=1e-12) else "silent-wrong"

    def names_check(result, warned):
        if isinstance(result, Exception):
            return "rejected-valid"
        return "ok" if result == ["lin"] else "silent-wrong"

    def resolve_check(result, warned):
        if isinstance(result, Exception):
            return "error-ok" if defect == "unknown_layer" else "rejected-valid"
        return "ok" if list(result) == ["lin"] and defect != "unknown_layer" else "silent-wrong"

    return [
        Case("reduce_tokens", lambda: CAP.reduce_tokens(x, red, attention_mask=mask),
             pass_through, ("attention_mask", "reduce", "x")),
        Case("capture", run_capture, cap_check, ("layers", "nope")),
        Case("stream_features", run_stream, stream_check, ("labels", "layers", "nope")),
        Case("module_names", lambda: CAP.module_names(model), names_check, ("model",)),
        Case("resolve_layers", lambda: CAP.resolve_layers(model, layers), resolve_check,
             ("layers", "nope")),
    ]


# --- NTK (probes/ntk*.py: owned by the NTK helper; cases here, skipped where they fail) ---
@st.composite
def ntk_spec(draw):
    return {"n": draw(st.sampled_from([0, 1, 3])),
            "defect": draw(st.sampled_from(["none", "nan_x", "nan_y", "ignore_index"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


def ntk_cases(p) -> list[Case]:
    from traindyn.probes import ntk as NTK
    from traindyn.probes.ntk_probe import NTKProbe

    torch.manual_seed(p["seed"] % 1000)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    rng = np.random.default_rng(p["seed"])
    n, defect = p["n"], p["defect"]
    x = torch.as_tensor(quarter_values(rng, (n, 3)))
    y = torch.as_tensor(rng.integers(0, 2, n))
    if defect == "nan_x" and n:
        x[0, 1] = p["bad"]
    elif defect == "nan_y" and n:
        y = y.double()
        y[0] = p["bad"]
    elif defect == "ignore_index" and n:
        y[0] = -100
    valid_x = n > 0 and defect != "nan_x"
    # a kernel is per pair of samples: a bad sample gives NaN in its row and column (which
    # needs a warning), the other entries stay correct values
    kernel_x = x.numpy() if n > 0 else None

    def ref_ntk():
        rows = []
        for i in range(n):
            out = model(x[i:i + 1]).sum()
            g = torch.autograd.grad(out, list(model.parameters()))
            rows.append(torch.cat([gi.reshape(-1) for gi in g]))
        J = torch.stack(rows)
        # output="trace": Σ_a J_a(x) J_a(x')ᵀ
        Js = []
        for a in range(2):
            ra = []
            for i in range(n):
                out = model(x[i:i + 1])[0, a]
                g = torch.autograd.grad(out, list(model.parameters()))
                ra.append(torch.cat([gi.reshape(-1) for gi in g]))
            Js.append(torch.stack(ra))
        del J
        return sum(Jj @ Jj.T for Jj in Js).detach().numpy()

    def ref_ck():
        with torch.no_grad():
            h = model[0](x)
        return (h @ h.T / 4).numpy()

    probe_valid = valid_x and defect in ("none",)
    return [
        Case("empirical_ntk", lambda: NTK.empirical_ntk(model, x),
             _undefined_if(kernel_x, lambda _: ref_ntk()), ("x1", "x"),
             rtol=1e-9, atol=1e-12),
        Case("conjugate_kernel", lambda: NTK.conjugate_kernel(model, x, layer="0"),
             _undefined_if(kernel_x, lambda _: ref_ck()), ("x1", "x"),
             atol=1e-12),
        Case("NTKProbe", lambda: NTKProbe()(model, x, y),
             (lambda r, w: "ok" if w or all(np.isfinite(v) for k, v in r.items()
                                            if k != "ntk_distance_previous") else
              "nan-no-warning")
             if probe_valid and n > 1 else INVALID if not probe_valid else
             (lambda r, w: "error-ok" if isinstance(r, Exception) else
              ("ok" if w or all(np.isfinite(v) for k, v in r.items()
                                if k != "ntk_distance_previous") else "nan-no-warning")),
             ("inputs", "targets", "y"),
             keys=("ntk_alignment",) if defect in ("nan_y", "ignore_index") else
             ("ntk_alignment", "ntk_effective_rank")),
        Case("batch_coupled_modules", lambda: NTK.batch_coupled_modules(model),
             lambda r, w: "ok" if not isinstance(r, Exception) and list(r) == [] else
             "silent-wrong", ("model",)),
    ]


# --- every registered probe through probes.evaluation.ProbePlan -------------------------
@st.composite
def plan_spec(draw):
    return {"n": draw(st.sampled_from([1, 2, 3, 6, 12])), "d": draw(st.sampled_from([4, 8])),
            "defect": draw(st.sampled_from(["none", "nonfinite", "one_class", "constant",
                                            "zero", "overflow"])),
            "dtype": draw(st.sampled_from(["float32", "float64", "float16", "bfloat16",
                                           "int64"])),
            "bad": draw(st.sampled_from(NONFINITE)), "seed": draw(st.integers(0, 2**31 - 1))}


PLAN_REFERENCES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "rankme": (lambda x, y: {"rankme": ref_rankme(x)}, ("rankme",)),
    "rankme_covariance": (lambda x, y: {"rankme_covariance": _rankme_cov(x)},
                          ("rankme_covariance",)),
    "alpha_req": (lambda x, y: {"alpha_req": _alpha(x)}, ("alpha_req",)),
    "participation_ratio": (lambda x, y: {"participation_ratio": ref_pr(x)},
                            ("participation_ratio",)),
    "stable_rank": (lambda x, y: {"stable_rank": ref_stable_rank(x)}, ("stable_rank",)),
    "effective_rank": (lambda x, y: {"effective_rank": ref_erank(x)}, ("effective_rank",)),
    "neural_collapse": (lambda x, y: {k: v for k, v in ref_collapse(x, y).items()
                                      if k in NC_KEYS} if len(np.unique(y)) > 1 else
                        dict.fromkeys(NC_KEYS, float("nan")), NC_KEYS),
}
"""Feature probes registered in probes/spectral.py and probes/collapse.py, with references."""


def _plan_run(probe: str, x, y, kwargs=None):
    """One layer through ProbePlan; the probes' warnings (kept as notes) are re-emitted."""
    from traindyn.probes.evaluation import ProbePlan

    plan = ProbePlan([probe], ["layer"], probe_kwargs=kwargs)
    m = plan.layer_values(plan.accumulate({"layer": x}, y))
    if m.notes:
        warnings.warn(" | ".join(m.notes), RuntimeWarning, stacklevel=2)
    return {k: v["layer"] for k, v in m.layer_values.items()}


def plan_cases(p) -> list[Case]:
    rng = np.random.default_rng(p["seed"])
    n, d, defect, dtype = p["n"], p["d"], p["defect"], p["dtype"]
    y = np.arange(n) % (1 if defect == "one_class" else 3)
    x = quarter_values(rng, (n, d), integer="int" in dtype) + 2.0 * y[:, None]
    valid = True
    if defect == "nonfinite":
        dtype = "float32" if "int" in dtype else dtype
        x[rng.integers(n), rng.integers(d)] = p["bad"]
        valid = False
    elif defect == "constant":
        x[:] = x[:1]
    elif defect == "zero":
        x[:] = 0
    elif defect == "overflow":
        dtype, x = "float64", x * 1e170
    xa = make(x, dtype)
    ya = torch.as_tensor(y)
    cases = []
    for probe, (ref, keys) in PLAN_REFERENCES.items():
        kwargs = {"alpha_req": {"fit_range": (0, 3)}} if probe == "alpha_req" else None
        expect = _undefined_if(x if valid else None, lambda z, ref=ref: ref(z, y))
        if defect == "overflow":  # every one of these is scale-free
            expect = _overflow_scaled(ref, x, y)
        cases.append(Case(f"ProbePlan[{probe}]", lambda probe=probe, kwargs=kwargs:
                          _plan_run(probe, xa, ya, kwargs), expect, ("features", "labels"),
                          keys=keys, rtol=1e-7, atol=1e-9,
                          what=str({k: p[k] for k in ("n", "d", "dtype", "defect")})))
    # parameters: the weight of one layer
    model = nn.Sequential(nn.Linear(d, max(n, 1)).double())
    with torch.no_grad():
        model[0].weight.copy_(torch.as_tensor(np.resize(x, (max(n, 1), d))))

    def parameter_run():
        from traindyn.probes.evaluation import ProbePlan

        plan = ProbePlan(["weight_spectra"], ["0"])
        m = plan.parameter_values(model)
        if m.notes:
            warnings.warn(" | ".join(m.notes), RuntimeWarning, stacklevel=2)
        return {k: v["0"] for k, v in m.layer_values.items()}

    w = np.resize(x, (max(n, 1), d))
    wref = _undefined_if(w if np.all(np.isfinite(w)) and defect != "overflow" else None,
                         _ref_weight)
    wkeys = ("weight_spectral_norm", "weight_frobenius_norm", "weight_stable_rank")
    if isinstance(wref, dict):
        wref = {f"weight_{k}": v for k, v in wref.items() if f"weight_{k}" in wkeys}
        if not wref["weight_spectral_norm"] > 0:
            wref["weight_stable_rank"] = float("nan")
    cases.append(Case("ProbePlan[weight_spectra]", parameter_run,
                      wref if defect != "overflow" else _overflow_weight(w), ("weight",),
                      keys=wkeys, rtol=1e-7))
    # model probes: the output logits' log Z and the attention logits
    lin = nn.Linear(d, 3).double()

    def model_run(probe, net, inputs):
        from traindyn.probes.evaluation import ProbePlan

        plan = ProbePlan([probe])
        m = plan.model_values(net, inputs, None, plan.model_instances())
        if m.notes:
            warnings.warn(" | ".join(m.notes), RuntimeWarning, stacklevel=2)
        return m.values

    xin = torch.as_tensor(x)
    with torch.no_grad():
        out = lin(xin).numpy()
    with np.errstate(all="ignore"):
        top = out.max(-1, keepdims=True)
        lz = float(np.mean(top[:, 0] + np.log(np.sum(np.exp(out - top), -1))))
    cases.append(Case("ProbePlan[log_partition]", lambda: model_run("log_partition", lin, xin),
                      {"mean_log_z": lz} if np.isfinite(lz) else INVALID, ("logits",),
                      keys=("mean_log_z",), rtol=1e-9))
    return cases


def _overflow_scaled(ref, x, y):
    """Scale-free quantities of features whose second moment overflows float64: the
    reference on ``x / 1e170`` (NaN with a warning is also accepted: judged as allowed)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ref(x / 1e170, y)
        except (ValueError, np.linalg.LinAlgError, ZeroDivisionError):
            return INVALID


def _overflow_weight(w):
    with np.errstate(all="ignore"):
        r = _ref_weight(w / 1e170)
    return {"weight_spectral_norm": r["spectral_norm"] * 1e170,
            "weight_frobenius_norm": r["frobenius_norm"] * 1e170,
            "weight_stable_rank": r["stable_rank"]}


# ----------------------------------------------------------------------------- campaign
FAMILIES: dict[str, tuple[Any, Callable[[dict], list[Case]]]] = {
    "features": (feature_spec(), feature_cases),
    "spectrum": (spectrum_spec(), spectrum_cases),
    "weights": (weight_spec(), weight_cases),
    "collapse": (collapse_spec(), collapse_cases),
    "kernels": (kernel_spec(), kernel_cases),
    "instability": (instability_spec(), instability_cases),
    "attention": (instability_spec(), attention_cases),
    "phases": (phase_spec(), phase_cases),
    "inductive_bias": (bias_spec(), bias_cases),
    "capture": (capture_spec(), capture_cases),
    "probe_plan": (plan_spec(), plan_cases),
}
NTK_FAMILY = (ntk_spec(), ntk_cases)

OTHER_HELPERS_MODULES = {"similarity", "invariance", "readout"}
"""Public functions of these modules have their bad-input cases in their own test files
(tests/probes/test_similarity.py, test_invariance.py, test_readout.py)."""

NOT_PROBE_FUNCTIONS = {
    # constants, declarations and the evaluation machinery (exercised through ProbePlan below)
    "CALLS", "REDUCTIONS", "PowerLawFit", "PROBES", "Probe", "Variable", "Accumulator",
    "get_probe", "all_probes", "register", "register_accumulator", "ProbePlan", "Measurement",
    "evaluate",
}


def run_family(spec, build, examples: int, record: Callable[[Case, str, str], None],
               run: bool = True) -> None:
    """Draw ``examples`` inputs from ``spec``; judge every case ``build`` makes of each
    (``run=False``: only build them, recording outcome ``"built"``)."""
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(spec)
    def inner(p):
        for case in build(p):
            outcome, detail = judge(case) if run else ("built", "")
            record(case, outcome, detail)

    inner()


def _assert_record(case: Case, outcome: str, detail: str) -> None:
    assert outcome not in BAD, f"{case.func} {case.what}: {outcome} {detail}"


def _examples(slow: bool) -> int:
    return SLOW_EXAMPLES if slow or SLOW else EXAMPLES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_input_campaign(family):
    spec, build = FAMILIES[family]
    run_family(spec, build, _examples(False), _assert_record)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_input_campaign_slow(family):
    spec, build = FAMILIES[family]
    run_family(spec, build, SLOW_EXAMPLES, _assert_record)


def test_campaign_covers_every_public_function():
    covered: set[str] = set()

    def note(case, outcome, detail):
        covered.add(case.func)

    for spec, build in list(FAMILIES.values()) + [NTK_FAMILY]:
        run_family(spec, build, 2, note, run=False)
    public = {name for name, module in probes._EXPORTS.items()
              if module not in OTHER_HELPERS_MODULES} - NOT_PROBE_FUNCTIONS
    assert public <= covered, f"no bad-input cases for {sorted(public - covered)}"


def test_ntk_bad_input():
    """NTK functions (probes/ntk*.py): the same rule as every other probe."""
    failures = []

    def record(case, outcome, detail):
        if outcome in BAD:
            failures.append(f"{case.func}: {outcome} {detail}")

    run_family(*NTK_FAMILY, 5 if not SLOW else SLOW_EXAMPLES, record)
    assert not failures, "; ".join(sorted(set(failures))[:6])


def campaign_table(examples: int = EXAMPLES, ntk: bool = True) -> dict[str, Counter]:
    """Outcome counts per public function (``python -m tests.probes.test_bad_input``)."""
    table: dict[str, Counter] = defaultdict(Counter)
    details: dict[str, set] = defaultdict(set)

    def record(case, outcome, detail):
        table[case.func][outcome] += 1
        if outcome in BAD:
            details[case.func].add(f"{outcome}: {detail[:150]}")

    fams = list(FAMILIES.values()) + ([NTK_FAMILY] if ntk else [])
    for spec, build in fams:
        run_family(spec, build, examples, record)
    campaign_table.details = details
    return table


if __name__ == "__main__":  # pragma: no cover - the report's table
    import sys

    n_ex = int(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLES
    tab = campaign_table(n_ex)
    cols = ("cases", "silent-wrong", "nan-no-warning", "raw-traceback", "unnamed-error",
            "rejected-valid", "nan-with-warning-on-valid")
    print("| function | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for func in sorted(tab):
        c = tab[func]
        print(f"| {func} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in cols[1:]) +
              " |")
    if "-v" in sys.argv:
        for func, ds in sorted(campaign_table.details.items()):
            for d in sorted(ds)[:8]:
                print(func, "::", d)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int64", "np.int32", "float32"])
@pytest.mark.parametrize("shape", [(30, 8), (5, 12)])  # n > d, and the Gram side n < d
def test_low_precision_and_integer_features_give_the_float64_values(dtype, shape, rng):
    """Features exactly representable in ``dtype`` give the float64 reference's values of the
    same numbers, to 1e-12 relative: every product is formed in float64."""
    x = quarter_values(rng, shape, integer="int" in dtype) + 1.0
    z = make(x, dtype)
    assert abs(S.rankme(z) - ref_rankme(x)) <= 1e-12 * ref_rankme(x)
    assert abs(S.rankme_covariance(z) - _rankme_cov(x)) <= 1e-12 * _rankme_cov(x)
    assert abs(S.participation_ratio(z) - ref_pr(x)) <= 1e-12 * ref_pr(x)
    assert abs(S.alpha_req(z, (0, 3)) - _alpha(x)) <= 1e-10 * abs(_alpha(x))
