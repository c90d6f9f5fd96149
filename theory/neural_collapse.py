r"""Predicted neural-collapse geometry: the simplex ETF and the imbalanced deep-linear optimum.

* Balanced classes, cross-entropy or MSE with a bias: class means (centred) and classifier rows
  form a simplex equiangular tight frame, ``W ∝ M̃ᵀ`` (Papyan, Han & Donoho, PNAS 2020, Def. of
  NC1–NC4; Fig. 1).  Every metric of ``probes.collapse.neural_collapse`` vanishes.
* Bias-free MSE with weight decay in the unconstrained-features / deep linear model of Dang,
  Tran, Osher, Tran-The, Ho & Nguyen, "Neural collapse in deep linear networks: from balanced
  to imbalanced data" (ICML 2023), Sec. 3–4:

  .. math:: \min\; \frac{1}{2N}\|W_M\cdots W_1 H_1 - Y\|_F^2 + \sum_{j=1}^{M}
            \frac{\lambda_{W_j}}{2}\|W_j\|_F^2 + \frac{\lambda_H}{2}\|H_1\|_F^2,

  ``H_1`` free features (one column per training sample), ``Y`` one-hot, class ``k`` with
  ``n_k`` samples, ``N = Σ n_k``.  At a global minimum every class collapses to its mean
  (NC1), class means of the last-layer features ``H_M = W_{M-1}⋯W_1 H_1`` and the classifier
  rows of ``W_M`` are **orthogonal** (not an ETF, even for balanced classes), with lengths set
  by the class sizes, and a class whose size is below a threshold collapses to zero (minority
  collapse).

Derivation used here (a short proof that reproduces Dang et al.'s statements).  With NC1 the
loss depends on the class means through ``Z = W_M⋯W_1 H̄ D^{1/2}`` (``H̄`` the class means,
``D = diag(n_k)``) as ``‖Z − D^{1/2}‖²/(2N)``; the least weight decay of a factorisation of
``Z`` into ``M + 1`` factors is ``((M+1)/2)(Π_j λ_j)^{1/(M+1)} Σ_k σ_k(Z)^{2/(M+1)}``, reached
with balanced factors ``λ_j σ_{j,k}² = (σ_k(Z)² Π_j λ_j)^{1/(M+1)}``.  By von Neumann's trace
inequality the optimal ``Z`` shares the (diagonal) singular vectors of ``D^{1/2}``, so each
class solves the scalar problem

.. math:: z_k = \arg\min_{z\ge0}\; \frac{(z-\sqrt{n_k})^2}{2N} + c\,z^{2/(M+1)},
          \qquad c = \tfrac{M+1}{2}\Big(\prod_j\lambda_j\Big)^{1/(M+1)} .

For ``M = 1`` (the plain unconstrained-features model) this is soft-thresholding,
``z_k = (√n_k − N√(λ_W λ_H))₊``: class ``k`` collapses iff ``n_k ≤ N² λ_W λ_H``.  Then
``‖w_k‖ = σ_{M,k}`` and the class mean of the last-layer features has
``‖h_k‖ = z_k / (σ_{M,k} √n_k)``.

The predicted metrics are computed from this geometry with the definitions of
``probes.collapse`` (same variable names and global-mean conventions, so a theory Dataset and a
measured one line up with ``xr.align``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import xarray as xr
from scipy import optimize
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import (
    count,
    finite_array,
    finite_scalar,
    float_array,
    positive_scalar,
)

__all__ = [
    "NC_VARIABLES",
    "balanced_collapse",
    "class_strengths",
    "collapse_geometry",
    "collapse_metrics",
    "imbalanced_collapse",
    "minority_collapse_threshold",
    "simplex_etf",
]

SOURCE_ETF = ("Papyan, Han & Donoho (2020), Prevalence of neural collapse during the terminal "
              "phase of deep learning training, PNAS 117:24652")
SOURCE_DLN = ("Dang, Tran, Osher, Tran-The, Ho & Nguyen (2023), Neural collapse in deep linear "
              "networks: from balanced to imbalanced data, ICML, Sec. 3-4 (bias-free MSE, "
              "weight decay)")

NC_VARIABLES: dict[str, str] = {
    "nc1": "NC1 within-class variability, Tr(Sigma_W Sigma_B^+)/C",
    "nc2_equinorm": "NC2 equinorm: std/mean of centred class-mean norms",
    "nc2_equinorm_classifier": "NC2 equinorm: std/mean of classifier row norms",
    "nc2_equiangle": "NC2 equiangularity: std of cosines of centred class means",
    "nc2_equiangle_classifier": "NC2 equiangularity: std of cosines of classifier rows",
    "nc2_coherence": "NC2 maximal angle: mean |cos + 1/(C-1)| of centred means",
    "nc2_coherence_classifier": "NC2 maximal angle: mean |cos + 1/(C-1)| of classifier rows",
    "nc3": "NC3 self-duality, ||W^T/||W||_F - M/||M||_F||_F^2",
    "nc4": "NC4 nearest-class-mean vs network prediction mismatch fraction",
    "cdnv": "class-distance normalised variance, mean over class pairs",
}
"""The variable names of ``probes.collapse.neural_collapse`` (all scalars, units 1)."""


def simplex_etf(n_classes: int, dim: int | None = None) -> np.ndarray:
    r"""Columns of a simplex equiangular tight frame: ``√(C/(C−1)) (I − 11ᵀ/C)`` embedded in
    ``R^dim`` (``dim ≥ C``, default ``C``).  Unit norms, pairwise cosines ``−1/(C−1)``, zero sum
    (Papyan et al. 2020, Def. 1 with ``α = 1``, ``U = [I; 0]``)."""
    c = count(n_classes, "n_classes")
    if c < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes (n_classes); got {n_classes}")
    dim = c if dim is None else count(dim, "dim")
    if dim < c:
        raise ValueError(f"dim must be >= n_classes = {c} for this embedding; got {dim}")
    m = np.sqrt(c / (c - 1)) * (np.eye(c) - np.ones((c, c)) / c)
    return np.vstack([m, np.zeros((dim - c, c))])


# --------------------------------------------------------------------------- the scalar problem


def _penalty_constant(decays: Sequence[float]) -> tuple[float, float]:
    factors = len(decays)
    c = factors / 2 * float(np.prod(decays)) ** (1 / factors)
    return c, 2 / factors


def _objective(z: float, n: float, n_total: float, c: float, q: float) -> float:
    return (z - np.sqrt(n)) ** 2 / (2 * n_total) + c * z**q


def _strength(n: float, n_total: float, c: float, q: float) -> float:
    """Global minimiser ``z ≥ 0`` of ``(z − √n)²/(2N) + c z^q`` (``0 < q ≤ 1``)."""
    root_n = np.sqrt(n)
    if np.isclose(q, 1.0):
        return max(root_n - c * n_total, 0.0)
    # g(z) = f'(z)·(−1) = (√n − z)/N − c q z^{q−1} is concave on z > 0: at most two roots, the
    # larger is the local minimum.  Its maximum is at z* = (c q (1−q) N)^{1/(2−q)}.
    zstar = (c * q * (1 - q) * n_total) ** (1 / (2 - q))

    def g(z: float) -> float:
        return (root_n - z) / n_total - c * q * z ** (q - 1)

    if zstar >= root_n or g(zstar) <= 0:
        return 0.0
    z = optimize.brentq(g, zstar, root_n, xtol=1e-15, rtol=1e-14)
    return z if _objective(z, n, n_total, c, q) < _objective(0.0, n, n_total, c, q) else 0.0


def _decays(weight_decay: float | Sequence[float], feature_decay: float, n_layers: int):
    n_layers = count(n_layers, "n_layers")
    if n_layers < 1:
        raise ValueError(f"n_layers (linear layers after the free features) must be >= 1; "
                         f"got {n_layers}")
    wd = finite_array(weight_decay, "weight_decay")
    if wd.ndim > 1 or (wd.ndim == 1 and wd.size not in (1, n_layers)):
        raise ValueError(f"weight_decay must be one value or one per layer (n_layers = "
                         f"{n_layers}); got shape {wd.shape}")
    wd = np.broadcast_to(wd.reshape(-1) if wd.ndim else wd, (n_layers,)).copy()
    decays = np.concatenate([wd, [finite_scalar(feature_decay, "feature_decay")]])
    if np.any(decays <= 0):
        raise ValueError("weight_decay and feature_decay must be positive (with zero decay the "
                         "minimum is not attained)")
    return wd, decays


def _sizes(class_sizes: Sequence[int]) -> np.ndarray:
    sizes = float_array(class_sizes, "class_sizes")
    if sizes.ndim != 1 or len(sizes) < 2 or not np.all(np.isfinite(sizes)) \
            or np.any(sizes <= 0):
        raise ValueError("class_sizes must list at least 2 positive, finite class sizes")
    return sizes


def class_strengths(
    class_sizes: Sequence[int], weight_decay: float | Sequence[float] = 5e-3,
    feature_decay: float = 5e-3, n_layers: int = 1,
) -> np.ndarray:
    r"""Optimal singular values ``z_k`` of ``Z = W_M⋯W_1 H̄ D^{1/2}`` per class (module
    docstring; Dang et al. 2023).  ``weight_decay``: ``λ_{W_M}, …, λ_{W_1}`` (one value for
    all layers, or one per layer, last layer first)."""
    sizes = _sizes(class_sizes)
    _, decays = _decays(weight_decay, feature_decay, n_layers)
    c, q = _penalty_constant(decays)
    n_total = sizes.sum()
    return np.array([_strength(n, n_total, c, q) for n in sizes])


def minority_collapse_threshold(
    n_total: float, weight_decay: float | Sequence[float] = 5e-3, feature_decay: float = 5e-3,
    n_layers: int = 1,
) -> float:
    r"""Class size at or below which a class collapses to zero, for ``N`` samples in all.

    ``M = 1``: ``N² λ_W λ_H`` (soft-thresholding).  Deeper: the ``n`` at which the positive
    local minimum of the scalar problem stops beating ``z = 0`` (bisection).
    """
    n_total = positive_scalar(n_total, "n_total")
    _, decays = _decays(weight_decay, feature_decay, n_layers)
    c, q = _penalty_constant(decays)
    if np.isclose(q, 1.0):
        return float((c * n_total) ** 2)
    lo, hi = 0.0, 1.0
    while _strength(hi, n_total, c, q) == 0.0:
        hi *= 2
        if hi > 1e30:  # pragma: no cover
            raise ValueError("no class size escapes collapse at these decays")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _strength(mid, n_total, c, q) == 0.0 else (lo, mid)
    return hi


def collapse_geometry(
    class_sizes: Sequence[int], weight_decay: float | Sequence[float] = 5e-3,
    feature_decay: float = 5e-3, n_layers: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""One global minimiser of the bias-free MSE deep linear model (Dang et al. 2023).

    Returns ``(means, weight, z)``: ``means`` (``C × C``, row ``k`` the class mean of the
    last-layer features ``h_k = z_k/(σ_{M,k}√n_k) e_k``), ``weight`` (``C × C``, row ``k`` the
    classifier row ``w_k = σ_{M,k} e_k``) and the strengths ``z``, with
    ``σ_{M,k} = ((z_k² Π_j λ_j)^{1/(M+1)} / λ_{W_M})^{1/2}``.  Any rotation ``R`` of the
    feature space (``means R``, ``weight R``) is also a minimiser.
    """
    sizes = _sizes(class_sizes)
    wd, decays = _decays(weight_decay, feature_decay, n_layers)
    z = class_strengths(sizes, weight_decay, feature_decay, n_layers)
    mu = (z**2 * np.prod(decays)) ** (1 / len(decays))
    sigma_last = np.sqrt(mu / wd[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        h_norm = np.where(z > 0, z / (sigma_last * np.sqrt(sizes)), 0.0)
    return np.diag(h_norm), np.diag(sigma_last), z


# --------------------------------------------------------------------------- metrics


def _cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean()) if x.mean() > 0 else float("nan")


def _angles(vectors: np.ndarray) -> tuple[float, float]:
    """(std of pairwise cosines, mean |cos + 1/(C−1)|) of the columns; NaN if one is zero."""
    norms = np.linalg.norm(vectors, axis=0)
    if np.any(norms <= 1e-300):
        return float("nan"), float("nan")
    unit = vectors / norms
    i, j = np.triu_indices(vectors.shape[1], 1)
    cos = (unit.T @ unit)[i, j]
    return float(cos.std()), float(np.abs(cos + 1 / (vectors.shape[1] - 1)).mean())


def collapse_metrics(
    means: np.ndarray, weight: np.ndarray | None = None, class_sizes: Sequence[int] | None = None,
    global_mean: str = "class_means",
) -> dict[str, float]:
    r"""NC metrics of a collapsed geometry (no within-class spread), with the definitions of
    ``probes.collapse.neural_collapse`` (Papyan et al. 2020; Galanti et al. 2022).

    ``means``: ``C × d`` class means; ``weight``: ``C × d`` classifier rows (bias-free
    prediction ``argmax Wh``).  With zero within-class spread ``nc1 = cdnv = 0`` whenever the
    class means are distinct; ``nc4 = 0`` when every class mean is classified as its own class.
    Quantities that the probe leaves undefined (two equal means, a zero classifier row) are NaN,
    with a warning naming them.
    """
    means = finite_array(means, "means")
    if means.ndim != 2 or means.shape[0] < 2 or means.shape[1] < 1:
        raise ValueError(f"means must be a (C, d) matrix with C ≥ 2 classes; got shape "
                         f"{means.shape}")
    c = means.shape[0]
    if class_sizes is None:
        sizes = np.ones(c)
    else:
        sizes = finite_array(class_sizes, "class_sizes")
        if sizes.shape != (c,) or np.any(sizes <= 0):
            raise ValueError(f"class_sizes must hold {c} positive sizes (one per row of means); "
                             f"got {class_sizes!r}")
    if weight is not None:
        weight = finite_array(weight, "weight")
        if weight.shape != means.shape:
            raise ValueError(f"weight must have the shape of means {means.shape}; got "
                             f"{weight.shape}")
    if not isinstance(global_mean, str):
        raise TypeError(f"global_mean must be a string; got {global_mean!r}")
    if global_mean == "class_means":
        mu_g = means.mean(0)
    elif global_mean == "samples":
        mu_g = (sizes[:, None] * means).sum(0) / sizes.sum()
    else:
        raise ValueError(f"unknown global_mean {global_mean!r}; use 'class_means' or 'samples'")
    m = (means - mu_g).T
    i, j = np.triu_indices(c, 1)
    distinct = bool(np.all(np.linalg.norm(means[i] - means[j], axis=1) > 1e-300))
    out = dict.fromkeys(NC_VARIABLES, float("nan"))
    out["nc1"] = 0.0
    out["cdnv"] = 0.0 if distinct else float("nan")
    out["nc2_equinorm"] = _cv(np.linalg.norm(m, axis=0))
    out["nc2_equiangle"], out["nc2_coherence"] = _angles(m)
    if weight is not None:
        w = np.asarray(weight, dtype=float)
        wc = w.T
        out["nc2_equinorm_classifier"] = _cv(np.linalg.norm(wc, axis=0))
        out["nc2_equiangle_classifier"], out["nc2_coherence_classifier"] = _angles(wc)
        if np.linalg.norm(wc) > 0 and np.linalg.norm(m) > 0:
            out["nc3"] = float(((wc / np.linalg.norm(wc) - m / np.linalg.norm(m)) ** 2).sum())
        scores = means @ w.T
        top = np.sort(scores, axis=1)
        unique = bool(np.all(top[:, -1] > top[:, -2] + 1e-12 * np.abs(top[:, -1])))
        if distinct and unique:
            out["nc4"] = 0.0
    # without `weight` the classifier metrics, nc3 and nc4 are not computed (NaN by design)
    needs_weight = {k for k in out if k.endswith("classifier")} | {"nc3", "nc4"}
    undefined = [k for k, v in out.items() if np.isnan(v)
                 and (weight is not None or k not in needs_weight)]
    if undefined:
        warnings.warn(f"collapse_metrics: {', '.join(undefined)} undefined for this geometry "
                      "(equal class means, or a zero class mean or classifier row): NaN",
                      RuntimeWarning, stacklevel=2)
    return out


def _dataset(metrics: dict[str, float], per_class: dict[str, tuple[np.ndarray, str]],
             labels: np.ndarray, scalars: dict[str, tuple[float, str]], attrs: dict) -> xr.Dataset:
    data = {name: ((), np.float64(metrics[name]), {"long_name": long, "units": "1"})
            for name, long in NC_VARIABLES.items()}
    for name, (values, long) in per_class.items():
        data[name] = ("class", np.asarray(values, dtype=float), {"long_name": long, "units": "1"})
    for name, (value, long) in scalars.items():
        data[name] = ((), np.float64(value), {"long_name": long, "units": "1"})
    return xr.Dataset(data, coords={"class": ("class", labels, {"long_name": "class label"})},
                      attrs=attrs)


def balanced_collapse(n_classes: int, global_mean: str = "class_means") -> xr.Dataset:
    r"""The simplex-ETF limit (Papyan et al. 2020): centred class means ``M̃`` on a simplex ETF,
    classifier ``W = M̃ᵀ`` (self-dual), no within-class spread.  Every NC metric is 0; the
    Dataset also gives the predicted pairwise cosine ``−1/(C−1)`` of centred means
    (``class_mean_cosine``)."""
    etf = simplex_etf(n_classes)
    n_classes = etf.shape[1]
    metrics = collapse_metrics(etf.T, etf.T, global_mean=global_mean)
    labels = np.arange(n_classes)
    return _dataset(
        metrics, {}, labels,
        {"class_mean_cosine": (-1 / (n_classes - 1),
                               "cosine between centred class means (simplex ETF)")},
        theory_attrs(SOURCE_ETF, dict(n_classes=n_classes, global_mean=global_mean),
                     geometry="simplex ETF"),
    )


def imbalanced_collapse(
    class_sizes: Sequence[int], weight_decay: float | Sequence[float] = 5e-3,
    feature_decay: float = 5e-3, n_layers: int = 1, global_mean: str = "class_means",
) -> xr.Dataset:
    r"""Predicted collapse of the bias-free MSE deep linear model with weight decay.

    Dang et al. (2023), Sec. 3–4 (module docstring for the model and the derivation).

    Parameters
    ----------
    class_sizes : sequence of int
        ``n_k`` (balanced sizes give the balanced bias-free prediction: an orthogonal frame).
    weight_decay : float or sequence
        ``λ_{W_M}, …, λ_{W_1}`` (last layer first), or one value for all ``M`` layers.
    feature_decay : float
        ``λ_H`` on the free features ``H_1``.
    n_layers : int
        ``M``, the number of linear layers after the free features (``M = 1``: the classifier
        only, the plain unconstrained-features model).
    global_mean : {"class_means", "samples"}
        Convention of ``probes.collapse`` for centring the class means.

    Returns
    -------
    xarray.Dataset
        The scalar NC metrics of ``probes.collapse.neural_collapse`` (same names), and over
        ``class``: ``class_mean_norm`` ``‖h_k‖`` (uncentred), ``classifier_norm`` ``‖w_k‖``,
        ``class_strength`` ``z_k``, ``collapsed`` (1 where ``z_k = 0``); scalar
        ``minority_collapse_threshold`` (the class size below which a class collapses, at this
        ``N``).  Class means and classifier rows are mutually orthogonal.
    """
    sizes = _sizes(class_sizes)
    means, weight, z = collapse_geometry(sizes, weight_decay, feature_decay, n_layers)
    metrics = collapse_metrics(means, weight, sizes, global_mean)
    threshold = minority_collapse_threshold(sizes.sum(), weight_decay, feature_decay, n_layers)
    per_class = {
        "class_mean_norm": (np.diag(means), "norm of the class mean of last-layer features"),
        "classifier_norm": (np.diag(weight), "norm of the classifier row w_k"),
        "class_strength": (z, "singular value z_k of W_M...W_1 H D^(1/2)"),
        "collapsed": ((z == 0).astype(float), "1 where the class collapses to zero"),
    }
    return _dataset(
        metrics, per_class, np.arange(len(sizes)),
        {"minority_collapse_threshold": (threshold, "class size at or below which a class "
                                                    "collapses to zero")},
        theory_attrs(SOURCE_DLN, dict(class_sizes=sizes, weight_decay=weight_decay,
                                      feature_decay=feature_decay, n_layers=n_layers,
                                      global_mean=global_mean),
                     geometry="orthogonal frame, norms set by class sizes"),
    )
