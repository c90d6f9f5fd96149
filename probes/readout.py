r"""Readout probes: what a representation is good for, per layer and step.

A readout is trained on one split of the probe batch and scored on the other (Alain & Bengio,
"Understanding intermediate layers using linear classifier probes", ICLR workshop 2017):

:func:`linear_probe` (registered ``linear_probe``)
    Closed-form ridge regression on one-hot targets with an unpenalised intercept (features
    and targets are centred with the *training split's* means), from streamed sufficient
    statistics (:class:`ReadoutAccumulator`): the float64 centred scatter ``X_cᵀX_c`` of the
    training split (a :class:`~probes.spectral.SpectrumAccumulator`, the same statistic the
    spectral probes read), per-class sums of the features (``XᵀY``) and per-class counts.
    ``W = (X_cᵀX_c + λI)⁻¹ X_cᵀY_c``, ``b = ȳ − x̄ᵀW``; a sample is assigned to the class of
    largest output (ties: the smallest label).  The ridge ``λ`` is chosen from a grid by
    generalized cross-validation (Golub, Heath & Wahba, Technometrics 1979, their ``V(λ)``;
    statistics only) or by exact leave-one-out (Allen's PRESS, Technometrics 1974, via the
    hat-matrix diagonal ``e_i/(1 − h_ii)``, Hastie, Tibshirani & Friedman 2009, Sec. 7.10.1 —
    needs the training rows), both from *one* eigendecomposition of
    ``X_cᵀX_c``.
:func:`logistic_probe` (registered ``logistic_probe``)
    Multinomial logistic regression, mean cross-entropy + ``(l2/2)‖W‖²_F`` (intercept not
    penalised) — scikit-learn's ``LogisticRegression(C=1/(n_train·l2))`` — minimised by L-BFGS
    with a strong-Wolfe line search in float64 on the features' device.
:func:`knn_accuracy` (registered ``knn_accuracy``)
    k-nearest-neighbour majority vote (Wu, Xiong, Yu & Lin 2018; Caron et al. 2021 use ``k =
    20``), cosine similarity on l2-normalised features (default) or Euclidean distance.
:func:`alignment`, :func:`uniformity` (registered model probe ``alignment_uniformity``)
    Wang & Isola, "Understanding contrastive representation learning through alignment and
    uniformity on the hypersphere", ICML 2020, Eqs. 4-5, on **l2-normalised** features.
:func:`class_rankme` (registered ``class_rankme``)
    RankMe (Garrido et al. 2023, Eq. 1) of the features of each class separately.

**The split** (:func:`held_out_mask`): sample ``i`` (its position in the probe data, counted
across batches) is held out when ``u_i < held_out``, where ``u_i ∈ [0, 1)`` is a splitmix64
hash (Steele, Lea & Flood 2014) of ``i`` and ``seed``: the same samples are held out at every
step, in every mode, whatever the batching; the held-out fraction is ``held_out`` on average
(not exactly).  The streamed probe's split is that of its accumulator (``held_out=0.25,
seed=0`` for the registered ``linear_probe``; :func:`linear_probe_with_split` makes one with
another split).

**Memory** of the streamed ridge readout: ``O(d² + C·d)`` for the statistics, plus the
held-out rows (needed to score the readout: ``≈ held_out·n·d``) and at most ``max_train_rows``
training rows (for the training accuracy and the exact leave-one-out choice).

**Cost**: the ``"readout"`` accumulator ``shares`` the ``"spectrum"`` accumulator
(:class:`~probes.registry.Accumulator`): in a plan with RankMe, alpha-ReQ or another spectral
probe, it reads the float64 moments of all samples
(:meth:`probes.spectral.SpectrumAccumulator.moments`) and removes the held-out rows' share,
forming only their scatter (``≈ held_out`` of the spectral probes' ``n·d²``) besides its class
sums; alone, it forms the training split's scatter itself (``benchmarks/readout.py`` measures
both).

**Warm start** of the logistic readout: :func:`fit_logistic` takes ``init=(W, b)``; the
registered probe starts from zero at each evaluation, because the probe plumbing keeps no
per-run state for a probe other than reference states — the optimum of this strictly convex
problem does not depend on the start.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from traindyn.probes._arrays import STAT_DTYPE, ArrayLike, as_features, as_tensor, check_labels
from traindyn.probes._pending import DeviceFlag
from traindyn.probes.spectral import DEFAULT_EPS, SpectrumAccumulator, rankme

__all__ = [
    "CRITERIA",
    "DEFAULT_RIDGES",
    "LogisticFit",
    "ReadoutAccumulator",
    "RidgeFit",
    "alignment",
    "class_rankme",
    "fit_logistic",
    "held_out_mask",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "linear_probe_with_split",
    "logistic_probe",
    "uniformity",
]

DEFAULT_RIDGES = tuple(float(r) for r in np.logspace(-6, 3, 19))
"""Candidate ridges *relative to* ``tr(X_cᵀX_c)/d`` (the mean eigenvalue of the training
scatter), so that the grid follows the features' scale: ``λ = r · tr(X_cᵀX_c)/d``."""

CRITERIA = ("gcv", "loo")
"""How the ridge is chosen: generalized cross-validation (statistics only) or exact
leave-one-out on the training rows."""

SOURCE = ("Alain & Bengio (2017), Understanding intermediate layers using linear classifier "
          "probes; ridge choice: Golub, Heath & Wahba (1979) GCV / PRESS (Allen 1974)")


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- the split
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele, Lea & Flood, OOPSLA 2014) on uint64, wrapping."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def held_out_mask(index: ArrayLike, held_out: float = 0.25, seed: int = 0) -> np.ndarray:
    """Whether each sample index is held out: ``u_i < held_out`` with ``u_i`` a splitmix64
    hash of ``(seed, i)`` mapped to ``[0, 1)`` (53 bits).  Deterministic, independent of
    batching; ``held_out`` in ``(0, 1)`` (a fraction on average)."""
    if not 0.0 < float(held_out) < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1); got {held_out}")
    idx = np.asarray(index, dtype=np.int64).astype(np.uint64)
    key = _splitmix64(np.array([int(seed) & (2**64 - 1)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _splitmix64(idx ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) / float(2**53)
    return u < float(held_out)


def _labels_host(labels: ArrayLike, n: int) -> torch.Tensor:
    if isinstance(labels, (list, tuple, np.ndarray)) and np.asarray(labels).dtype.kind in "USO":
        raise TypeError("labels must be integer class indices; got class names "
                        f"({np.asarray(labels).dtype}): map them to 0…C−1 first, e.g. with "
                        "numpy.unique(labels, return_inverse=True)")
    y = as_tensor(labels)
    if y.device.type != "cpu":
        y = y.cpu()
    return check_labels(y, n, "labels")


def _split(features: ArrayLike, labels: ArrayLike, held_out: float, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_held, y_held)`` in float64 on the features' device."""
    x = as_features(features).to(STAT_DTYPE)
    y = _labels_host(labels, x.shape[0])
    held = torch.from_numpy(held_out_mask(np.arange(x.shape[0]), held_out, seed))
    held_d = held.to(x.device)
    return x[~held_d], y[~held], x[held_d], y[held]


def _class_columns(labels: torch.Tensor, classes: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: the samples whose label is one of ``classes`` (ascending) and the
    column of their label in ``classes`` — one comparison of the host labels with every class,
    without a Python loop over the samples; a label not in ``classes`` has no entry."""
    hits = labels[:, None] == torch.as_tensor(classes, dtype=labels.dtype)[None, :]
    rows, cols = hits.nonzero(as_tuple=True)
    return rows, cols


# --------------------------------------------------------------------------- ridge
@dataclass
class RidgeFit:
    """A fitted ridge readout: outputs ``x @ weight + intercept``.

    ``weight`` is ``(d, C)`` and ``intercept`` ``(C,)`` with predictions ``x @ weight +
    intercept``; ``classes`` the training split's labels (column order); ``ridge`` the
    absolute ``λ`` used; ``ridges`` and ``scores`` the candidates and their criterion values
    (empty when ``λ`` was given)."""

    weight: torch.Tensor
    intercept: torch.Tensor
    classes: list[int]
    ridge: float
    ridges: np.ndarray
    scores: np.ndarray
    criterion: str

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class labels (argmax of the outputs; ties: the smallest label)."""
        out = x.to(self.weight) @ self.weight + self.intercept
        labels = torch.tensor(self.classes, device=out.device)
        return labels[out.argmax(1)]

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight + self.intercept


class ReadoutAccumulator:
    r"""Streamed statistics of a labelled probe batch for the ridge readout.

    For the training split (samples with ``held_out_mask(i) == False``): the float64 mean and
    centred scatter ``X_cᵀX_c`` (a :class:`~probes.spectral.SpectrumAccumulator`, merged batch
    by batch with Chan, Golub & LeVeque's pairwise update), the per-class sums of
    ``x − shift`` (``shift`` = the first batch's mean, which keeps ``Σ_c − n_c x̄`` free of
    cancellation) and the class counts.  The held-out rows are kept (to score the readout) and
    the first ``max_train_rows`` training rows (training accuracy, exact leave-one-out).

    Parameters
    ----------
    held_out : float
        Expected fraction of samples held out (:func:`held_out_mask`).
    seed : int
        Seed of the split.
    max_train_rows : int
        How many training rows to keep (0: none; the training accuracy is then NaN).
    shared : SpectrumAccumulator, optional
        A float64 accumulator fed the *same* batches (all samples, both splits) by its owner
        — in a :class:`~probes.evaluation.ProbePlan`, the ``"spectrum"`` accumulator of the
        spectral probes.  The training split's statistics are then read from it instead of
        being formed again: with ``n``, ``z̄``, ``M₂`` of all samples and the held-out rows
        (``n_h``, mean ``h̄``, centred scatter ``S_h``), the training split has ``n_t = n −
        n_h``, ``x̄ = z̄ + (n_h/n_t)(z̄ − h̄)`` and, inverting Chan, Golub & LeVeque's (1979)
        pairwise merge,

        .. math:: X_c^\top X_c = M_2 - S_h - \frac{n_t n_h}{n}(\bar x - \bar h)
                  (\bar x - \bar h)^\top,

        so only the held-out rows' scatter (``≈ held_out`` of the cost) is formed here.
    """

    def __init__(self, held_out: float = 0.25, seed: int = 0, max_train_rows: int = 4096,
                 shared: SpectrumAccumulator | None = None) -> None:
        held_out_mask(np.zeros(1), held_out, seed)  # validates held_out
        self.held_out, self.seed, self.max_train_rows = float(held_out), int(seed), \
            int(max_train_rows)
        if shared is not None and shared.batch_dtype != STAT_DTYPE:
            raise ValueError("the shared accumulator must form its products in float64 "
                             f"(batch_dtype=torch.float64); it uses {shared.batch_dtype}")
        self.shared = shared
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far (a shared accumulator is its owner's to reset)."""
        self.n_seen = 0
        self.train = SpectrumAccumulator() if self.shared is None else None
        self.d: int | None = None
        self._shift: torch.Tensor | None = None
        self._index: dict[int, int] = {}  # label → row of _sums
        self._sums: torch.Tensor | None = None  # (classes, d): Σ_{i∈c} (x_i − shift)
        self._counts: dict[int, int] = {}  # on the host, where the labels are
        self._held_x: list[torch.Tensor] = []
        self._held_y: list[torch.Tensor] = []
        self._train_x: list[torch.Tensor] = []
        self._train_y: list[torch.Tensor] = []
        self._kept = 0
        self._nonfinite = DeviceFlag()

    def update(self, features: ArrayLike, labels: ArrayLike) -> ReadoutAccumulator:
        """Add a batch: ``(b, d)`` features (trailing axes flattened) and ``(b,)`` integer
        labels, in the order of the probe data."""
        x = as_features(features)
        y = _labels_host(labels, x.shape[0])
        if self.d is None:
            self.d = x.shape[1]
        elif x.shape[1] != self.d:
            raise ValueError(f"batch has {x.shape[1]} features; earlier batches had {self.d}")
        x = x.to(STAT_DTYPE)
        b = x.shape[0]
        held = torch.from_numpy(held_out_mask(np.arange(self.n_seen, self.n_seen + b),
                                              self.held_out, self.seed))
        self.n_seen += b
        held_d = held.to(x.device)
        if self.shared is None:  # a shared accumulator checks every row it is fed
            self._nonfinite.mark(~torch.isfinite(x).all())  # read once, at compute
        if bool(held.any()):
            self._held_x.append(x[held_d])
            self._held_y.append(y[held])
        xt, yt = x[~held_d], y[~held]
        if xt.shape[0] == 0:
            return self
        if self.train is not None:
            self.train.update(xt)
        if self._shift is None:
            self._shift = xt.mean(0)
        uniq, inv = torch.unique(yt, return_inverse=True)
        values = [int(u) for u in uniq.tolist()]
        for v in values:
            if v not in self._index:
                self._index[v] = len(self._index)
                self._counts[v] = 0
        rows = torch.tensor([self._index[v] for v in values])
        sums = torch.zeros(len(values), self.d, dtype=STAT_DTYPE, device=x.device)
        sums.index_add_(0, inv.to(x.device), xt - self._shift)
        grow = len(self._index) - (0 if self._sums is None else self._sums.shape[0])
        if grow > 0:
            pad = torch.zeros(grow, self.d, dtype=STAT_DTYPE, device=x.device)
            self._sums = pad if self._sums is None else torch.cat([self._sums, pad])
        self._sums.index_add_(0, rows.to(x.device), sums)
        for v, count in zip(values, torch.bincount(inv, minlength=len(values)).tolist(),
                            strict=True):
            self._counts[v] += int(count)
        room = self.max_train_rows - self._kept
        if room > 0:
            self._train_x.append(xt[:room])
            self._train_y.append(yt[:room])
            self._kept += min(room, xt.shape[0])
        return self

    # ------------------------------------------------------------------ statistics
    @property
    def n_train(self) -> int:
        return int(sum(self._counts.values()))

    def held(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self._held_x:
            return None, None
        return torch.cat(self._held_x), torch.cat(self._held_y)

    def train_rows(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self._train_x:
            return None, None
        return torch.cat(self._train_x), torch.cat(self._train_y)

    def _problem(self) -> tuple[str | None, Any]:
        """``(reason, None)`` when no readout can be fitted, else ``(None, statistics)``."""
        if self.n_seen == 0:
            raise ValueError("no samples were accumulated: call update(features, labels) first")
        if self.shared is not None:
            self._nonfinite.mark(self.shared._nonfinite)
        if bool(self._nonfinite):
            return "features are not finite (NaN or Inf): the readout is NaN", None
        n = self.n_train
        if n < 2:
            return (f"the training split has {n} sample(s) (need at least 2; "
                    f"held_out={self.held_out} of {self.n_seen}): the readout is NaN"), None
        classes = sorted(self._counts)
        if len(classes) < 2:
            return (f"the training split has a single class ({classes[0]}): a readout needs "
                    "at least two; the readout is NaN"), None
        if not self._held_x:
            return (f"no sample was held out (held_out={self.held_out}, {self.n_seen} "
                    "samples): the held-out scores are NaN"), None
        mean, scatter = self._train_moments()
        counts = torch.tensor([self._counts[c] for c in classes], dtype=STAT_DTYPE,
                              device=mean.device)
        # X_cᵀY_c[:, c] = Σ_{i∈c} x_i − n_c x̄ = Σ_{i∈c}(x_i − shift) − n_c (x̄ − shift)
        order = torch.tensor([self._index[c] for c in classes], device=mean.device)
        sums = self._sums[order].T
        xty = sums - (mean - self._shift)[:, None] * counts[None, :]
        ybar = counts / n
        yty = float((counts - counts * counts / n).sum())  # tr(Y_cᵀY_c)
        return None, (classes, n, mean, scatter, xty, ybar, yty)

    def _train_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split's float64 mean and centred scatter ``X_cᵀX_c``: from its own
        accumulator, or from the shared moments of all samples less the held-out rows'."""
        if self.shared is None:
            return self.train.moments()[1:]
        n, mean_all, m2 = self.shared.moments()
        if n != self.n_seen:
            raise ValueError(f"the shared accumulator has seen {n} samples and the readout "
                             f"{self.n_seen}: both must be fed the same batches")
        h = torch.cat(self._held_x).to(m2.device)
        n_h = h.shape[0]
        n_t = n - n_h
        h_mean = h.mean(0)
        hc = h - h_mean
        mean = mean_all + (mean_all - h_mean) * (n_h / n_t)
        delta = mean - h_mean
        scatter = m2 - hc.T @ hc
        scatter.add_(torch.outer(delta, delta), alpha=-n_t * n_h / n)
        return mean, (scatter + scatter.T) / 2

    def fit_ridge(self, ridge: float | None = None,
                  ridges: Sequence[float] = DEFAULT_RIDGES, criterion: str = "gcv"
                  ) -> RidgeFit | None:
        """The ridge readout (``None``, with a ``RuntimeWarning`` saying why, when none can be
        fitted).  ``ridge``: a fixed absolute ``λ > 0``; otherwise the candidate
        ``r · tr(X_cᵀX_c)/d`` (``r`` in ``ridges``) of least ``criterion`` is used (ties: the
        smallest)."""
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; use one of {CRITERIA}")
        if ridge is not None and not float(ridge) > 0:
            raise ValueError(f"ridge must be > 0; got {ridge}")
        reason, stats = self._problem()
        if reason is not None and stats is None:
            _warn(f"linear probe: {reason}")
            return None
        classes, n, mean, scatter, xty, ybar, yty = stats
        s, v = torch.linalg.eigh(scatter)
        s = s.clamp(min=0)
        proj = v.T @ xty  # (d, C): Vᵀ X_cᵀY_c
        if ridge is not None:
            lam = float(ridge)
            cand, scores = np.array([lam]), np.array([np.nan])
        else:
            scale = float(s.sum()) / s.numel()
            cand = np.asarray(ridges, dtype=float) * (scale if scale > 0 else 1.0)
            if criterion == "gcv":
                scores = _gcv_scores(s, proj, yty, n, cand)
            else:
                scores = self._loo_scores(classes, mean, s, v, proj, ybar, cand)
            lam = float(cand[int(np.nanargmin(np.where(np.isfinite(scores), scores, np.inf)))])
        weight = v @ (proj / (s + lam)[:, None])
        intercept = ybar - mean @ weight
        return RidgeFit(weight, intercept, classes, lam, cand, scores,
                        "fixed" if ridge is not None else criterion)

    def _loo_scores(self, classes, mean, s, v, proj, ybar, cand) -> np.ndarray:
        """PRESS = Σ_i ‖e_i‖² / (1 − h_ii)² for each candidate (exact leave-one-out for a
        linear smoother; ``h_ii = 1/n + Σ_k P_ik²/(s_k + λ)``, ``P = X_c V``)."""
        xr_, yr = self.train_rows()
        if xr_ is None or xr_.shape[0] != self.n_train:
            raise ValueError(f"criterion='loo' needs every training row: the training split "
                             f"has {self.n_train} samples and max_train_rows="
                             f"{self.max_train_rows}; raise max_train_rows or use 'gcv'")
        n = xr_.shape[0]
        p = (xr_ - mean) @ v
        y = torch.zeros(n, len(classes), dtype=STAT_DTYPE, device=p.device)
        rows, cols = _class_columns(yr, classes)  # every training label is a class
        y[rows.to(p.device), cols.to(p.device)] = 1.0
        yc = y - ybar
        out = []
        for lam in cand:
            inv = 1.0 / (s + lam)
            e = yc - p @ (proj * inv[:, None])
            h = 1.0 / n + (p * p) @ inv
            out.append(float((((e * e).sum(1)) / (1.0 - h) ** 2).sum()))
        return np.array(out)

    def scores(self, fit: RidgeFit | None) -> dict[str, float]:
        """Held-out accuracy and mean squared error (one-hot targets over the training
        classes), training accuracy (on the kept training rows) and the ridge."""
        nan = float("nan")
        if fit is None:
            return {"linear_probe_accuracy": nan, "linear_probe_loss": nan,
                    "linear_probe_ridge": nan, "linear_probe_train_accuracy": nan}
        xh, yh = self.held()
        absent = sorted(set(yh.tolist()) - set(fit.classes))
        if absent:
            _warn(f"linear probe: classes {absent} of the held-out split are absent from the "
                  "training split; their held-out samples count as errors")
        out = fit.outputs(xh)
        target = torch.zeros_like(out)  # one-hot; zero rows for classes absent from training
        rows, cols = _class_columns(yh, fit.classes)
        target[rows.to(out.device), cols.to(out.device)] = 1.0
        loss = float(((out - target) ** 2).sum(1).mean())
        labels = torch.tensor(fit.classes, device=out.device)
        acc = float((labels[out.argmax(1)].cpu() == yh).double().mean())
        xt, yt = self.train_rows()
        train_acc = (nan if xt is None
                     else float((fit.predict(xt).cpu() == yt).double().mean()))
        return {"linear_probe_accuracy": acc, "linear_probe_loss": loss,
                "linear_probe_ridge": fit.ridge, "linear_probe_train_accuracy": train_acc}

    def compute(self, ridge: float | None = None, ridges: Sequence[float] = DEFAULT_RIDGES,
                criterion: str = "gcv") -> dict[str, float]:
        """:func:`linear_probe`'s values from everything accumulated."""
        return self.scores(self.fit_ridge(ridge, ridges, criterion))


def _gcv_scores(s: torch.Tensor, proj: torch.Tensor, yty: float, n: int,
                cand: np.ndarray) -> np.ndarray:
    """GCV(λ) = n·RSS(λ) / (n − df(λ))² (Golub, Heath & Wahba 1979, ``V(λ)``) with
    ``RSS = tr(Y_cᵀY_c) − Σ_k (s_k+2λ)/(s_k+λ)² ‖(VᵀX_cᵀY_c)_k‖²`` and
    ``df = 1 + Σ_k s_k/(s_k+λ)`` (the intercept counts one); ``inf`` where ``df ≥ n``."""
    b2 = (proj * proj).sum(1)
    out = []
    for lam in cand:
        rss = max(yty - float(((s + 2 * lam) / (s + lam) ** 2 * b2).sum()), 0.0)
        df = 1.0 + float((s / (s + lam)).sum())
        out.append(n * rss / (n - df) ** 2 if n - df > 0 else math.inf)
    return np.array(out)


def linear_probe(features: ArrayLike, labels: ArrayLike, held_out: float = 0.25, seed: int = 0,
                 ridge: float | None = None, ridges: Sequence[float] = DEFAULT_RIDGES,
                 criterion: str = "gcv", max_train_rows: int = 4096) -> dict[str, float]:
    r"""Ridge readout of one layer: trained on one split, scored on the held-out split.

    :class:`ReadoutAccumulator` fed once (the streamed probe gives the same values).

    Parameters
    ----------
    features : array (n, d)
        Features of the probe batch.
    labels : array (n,)
        Integer class labels.
    held_out, seed : float, int
        The split (:func:`held_out_mask`).
    ridge : float, optional
        Fixed absolute ``λ``; by default chosen among ``ridges`` (relative to
        ``tr(X_cᵀX_c)/d``) by ``criterion`` (``"gcv"`` or ``"loo"``).

    Returns
    -------
    dict
        ``linear_probe_accuracy`` (held out), ``linear_probe_loss`` (held-out mean squared
        error on one-hot targets), ``linear_probe_ridge`` (the ``λ`` used) and
        ``linear_probe_train_accuracy``; NaN with a ``RuntimeWarning`` when the split has fewer
        than two training samples or classes, or the features are not finite.
    """
    acc = ReadoutAccumulator(held_out, seed, max_train_rows).update(features, labels)
    return acc.compute(ridge, ridges, criterion)


# --------------------------------------------------------------------------- logistic
@dataclass
class LogisticFit:
    """A fitted multinomial logistic readout (``weight`` ``(d, C)``, ``bias`` ``(C,)``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    classes: list[int]
    l2: float
    objective: float
    n_iter: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.tensor(self.classes, device=self.weight.device)
        return labels[self.logits(x).argmax(1)]


def fit_logistic(x: ArrayLike, y: ArrayLike, l2: float = 1e-3, max_iter: int = 1000,
                 tol: float = 1e-10, init: tuple[ArrayLike, ArrayLike] | None = None
                 ) -> LogisticFit:
    r"""Multinomial logistic regression by L-BFGS (strong-Wolfe line search) in float64 on
    ``x``'s device.

    Minimises ``(1/n) Σ_i −log softmax(x_i W + b)_{y_i} + (l2/2)‖W‖²_F`` over the classes
    present in ``y`` (``b`` not penalised): scikit-learn's ``LogisticRegression(C=1/(n·l2))``
    objective divided by ``n·C``.  ``init=(W, b)`` warm-starts (same classes)."""
    if not float(l2) > 0:
        raise ValueError(f"l2 must be > 0; got {l2}")
    xt = as_features(x).to(STAT_DTYPE)
    yt = _labels_host(y, xt.shape[0])
    classes = torch.unique(yt).tolist()  # sorted
    target = _class_columns(yt, classes)[1].to(xt.device)
    d, c = xt.shape[1], len(classes)
    if init is not None:
        w = as_tensor(init[0]).to(xt).clone().reshape(d, c).requires_grad_(True)
        b = as_tensor(init[1]).to(xt).clone().reshape(c).requires_grad_(True)
    else:
        w = torch.zeros(d, c, dtype=STAT_DTYPE, device=xt.device, requires_grad=True)
        b = torch.zeros(c, dtype=STAT_DTYPE, device=xt.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=tol, tolerance_change=1e-15, history_size=50,
                            line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, target) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
        final = float(objective().detach())
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    return LogisticFit(w.detach(), b.detach(), classes, float(l2), final, n_iter)


def _cross_entropy(fit: LogisticFit, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean held-out cross-entropy (nats); a class unseen in training has probability 0
    (infinite loss): those samples are left out of the mean (the caller warns)."""
    rows, cols = _class_columns(y, fit.classes)
    if rows.numel() == 0:
        return float("nan")
    logp = torch.log_softmax(fit.logits(x), 1)
    return float(-logp[rows.to(logp.device), cols.to(logp.device)].mean())


def logistic_probe(features: ArrayLike, labels: ArrayLike, held_out: float = 0.25,
                   seed: int = 0, l2: float = 1e-3, max_iter: int = 1000, tol: float = 1e-10
                   ) -> dict[str, float]:
    """Multinomial logistic readout (:func:`fit_logistic`) trained on the training split and
    scored on the held-out split (:func:`held_out_mask`).

    Returns ``logistic_probe_accuracy``, ``logistic_probe_loss`` (held-out mean
    cross-entropy in nats, over held-out samples of training classes) and
    ``logistic_probe_train_accuracy``; NaN with a ``RuntimeWarning`` as :func:`linear_probe`.
    """
    nan = float("nan")
    empty = {"logistic_probe_accuracy": nan, "logistic_probe_loss": nan,
             "logistic_probe_train_accuracy": nan}
    xt, yt, xh, yh = _split(features, labels, held_out, seed)
    reason = _split_problem(xt, yt, xh)
    if reason:
        _warn(f"logistic probe: {reason}")
        return empty
    fit = fit_logistic(xt, yt, l2, max_iter, tol)
    absent = sorted(set(yh.tolist()) - set(fit.classes))
    if absent:
        _warn(f"logistic probe: classes {absent} of the held-out split are absent from the "
              "training split; they count as errors and are left out of the held-out loss")
    return {"logistic_probe_accuracy": float((fit.predict(xh).cpu() == yh).double().mean()),
            "logistic_probe_loss": _cross_entropy(fit, xh, yh),
            "logistic_probe_train_accuracy": float((fit.predict(xt).cpu() == yt).double().mean())}


def _split_problem(xt: torch.Tensor, yt: torch.Tensor, xh: torch.Tensor) -> str:
    if not bool(torch.isfinite(xt).all()) or not bool(torch.isfinite(xh).all()):
        return "features are not finite (NaN or Inf): the readout is NaN"
    if xt.shape[0] < 2:
        return f"the training split has {xt.shape[0]} sample(s) (need at least 2): NaN"
    if len(set(yt.tolist())) < 2:
        return "the training split has a single class: a readout needs at least two; NaN"
    if xh.shape[0] == 0:
        return "no sample was held out: the held-out scores are NaN"
    return ""


# --------------------------------------------------------------------------- kNN
METRICS = ("cosine", "euclidean")


def knn_predict(train_x: ArrayLike, train_y: ArrayLike, query_x: ArrayLike, k: int = 20,
                metric: str = "cosine", chunk: int = 1024, exclude_self: bool = False
                ) -> torch.Tensor:
    """Majority-vote k-nearest-neighbour labels of ``query_x`` (float64, on its device).

    ``metric="cosine"``: largest cosine similarity (l2-normalised rows); ``"euclidean"``:
    smallest distance.  Ties: among equally near neighbours the lower training index comes
    first (stable sort); among classes with equal votes the smallest label wins (as
    scikit-learn's ``KNeighborsClassifier``).  ``exclude_self``: query ``i`` is training row
    ``i`` and is not its own neighbour (leave-one-out).  Queries go in chunks of ``chunk``
    rows: memory ``O(chunk × n_train)``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    xt = as_features(train_x, "train_x").to(STAT_DTYPE)
    q = as_features(query_x, "query_x").to(STAT_DTYPE).to(xt.device)
    yt = _labels_host(train_y, xt.shape[0]).to(xt.device)
    k = int(k)
    n = xt.shape[0] - (1 if exclude_self else 0)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of candidate neighbours ({n}); "
                         f"got {k}")
    if metric == "cosine":
        xt = torch.nn.functional.normalize(xt, dim=1)
        q = torch.nn.functional.normalize(q, dim=1)
    else:
        sq = (xt * xt).sum(1)
    n_classes = int(yt.max()) + 1
    out = []
    for start in range(0, q.shape[0], chunk):
        qc = q[start:start + chunk]
        if metric == "cosine":
            dist = -(qc @ xt.T)
        else:
            dist = (qc * qc).sum(1)[:, None] - 2.0 * qc @ xt.T + sq[None, :]
        if exclude_self:
            rows = torch.arange(qc.shape[0], device=dist.device)
            dist[rows, rows + start] = math.inf
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        votes = torch.zeros(qc.shape[0], n_classes, dtype=torch.long, device=dist.device)
        votes.scatter_add_(1, yt[order], torch.ones_like(order))
        out.append(votes.argmax(1))
    return torch.cat(out)


def knn_accuracy(features: ArrayLike, labels: ArrayLike, k: int = 20, metric: str = "cosine",
                 split: str = "held_out", held_out: float = 0.25, seed: int = 0,
                 chunk: int = 1024) -> float:
    """k-NN accuracy (majority vote, :func:`knn_predict`) of one layer.

    ``split="held_out"``: neighbours from the training split, accuracy on the held-out split
    (:func:`held_out_mask`); ``split="loo"``: every sample classified by its ``k`` nearest
    *other* samples.  NaN with a ``RuntimeWarning`` for non-finite features or fewer than
    ``k`` candidate neighbours."""
    if split == "loo":
        x = as_features(features).to(STAT_DTYPE)
        y = _labels_host(labels, x.shape[0])
        if not bool(torch.isfinite(x).all()):
            _warn("knn accuracy: features are not finite (NaN or Inf): NaN")
            return float("nan")
        if x.shape[0] - 1 < k:
            _warn(f"knn accuracy: {x.shape[0]} samples leave fewer than k={k} neighbours: NaN")
            return float("nan")
        pred = knn_predict(x, y, x, k, metric, chunk, exclude_self=True)
        return float((pred.cpu() == y).double().mean())
    if split != "held_out":
        raise ValueError(f"unknown split {split!r}; use 'held_out' or 'loo'")
    xt, yt, xh, yh = _split(features, labels, held_out, seed)
    if not bool(torch.isfinite(xt).all()) or not bool(torch.isfinite(xh).all()):
        _warn("knn accuracy: features are not finite (NaN or Inf): NaN")
        return float("nan")
    if xt.shape[0] < k or xh.shape[0] == 0:
        _warn(f"knn accuracy: the training split has {xt.shape[0]} samples (k={k}) and the "
              f"held-out split {xh.shape[0]}: NaN")
        return float("nan")
    pred = knn_predict(xt, yt, xh, k, metric, chunk)
    return float((pred.cpu() == yh).double().mean())


# --------------------------------------------------------------------------- alignment
def _unit(z: ArrayLike, name: str) -> torch.Tensor | None:
    t = as_features(z, name).to(STAT_DTYPE)
    if not bool(torch.isfinite(t).all()):
        _warn(f"{name} are not finite (NaN or Inf): NaN")
        return None
    # each row scaled by its largest entry first: its norm then neither overflows (rows at
    # 1e200) nor underflows, and the direction is unchanged
    peak = t.abs().amax(dim=1, keepdim=True)
    if bool((peak == 0).any()):
        _warn(f"{name} have an all-zero row, which has no direction on the sphere: NaN")
        return None
    t = t / peak
    return t / t.norm(dim=1, keepdim=True)


def alignment(z1: ArrayLike, z2: ArrayLike, alpha: float = 2.0) -> float:
    r"""Alignment of positive pairs (Wang & Isola, ICML 2020, Eq. 4), **on l2-normalised
    features**: ``L_align = (1/n) Σ_i ‖f(x_i) − f(x_i⁺)‖₂^α`` with ``f = z/‖z‖`` and row ``i``
    of ``z1`` and ``z2`` a positive pair (two views of one input).  ``α = 2`` (their default):
    values in ``[0, 4]``, 0 = the two views coincide.  Unnormalised features give numbers
    that depend on the feature scale and mean nothing (a pitfall reported by users of the
    authors' code, SsnL/align_uniform).  It is a
    plain mean over pairs: unbiased at any batch size."""
    a, b = _unit(z1, "z1"), _unit(z2, "z2")
    if a is None or b is None:
        return float("nan")
    if a.shape != b.shape:
        raise ValueError(f"z1 and z2 must pair row by row; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError("alignment needs at least one pair; got 0 rows")
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(z: ArrayLike, t: float = 2.0, chunk: int = 1024) -> float:
    r"""Uniformity (Wang & Isola, ICML 2020, Eq. 5), **on l2-normalised features**:
    ``L_uniform = log[ (2/(n(n−1))) Σ_{i<j} exp(−t‖f(z_i) − f(z_j)‖²) ]`` over the distinct
    pairs of the batch (their ``torch.pdist`` code), ``t = 2`` (their default), ``f =
    z/‖z‖``.

    Computed as a logsumexp in float64, chunked (memory ``O(chunk × n)``), so it is finite at
    any batch size ``n ≥ 2`` (no ``log 0 = −inf``).  It lies in ``[−4t, 0]``: 0 when all points
    coincide, lower when they spread.  **Batch-size dependence**: the mean over pairs is
    unbiased, but its log is not: the estimate from a batch is biased *downward* (Jensen) by
    about ``Var(m̂)/(2m²)`` of the pair mean ``m̂`` — small batches read more uniform (for
    uniform points on S², about −0.17 at ``n = 5`` and −0.01 at ``n = 20`` below the limit);
    compare values at equal ``n``.  For
    points uniform on the sphere ``S^{d−1}`` it tends to ``log E exp(−2t(1−cos θ))``, e.g.
    ``−2t + log(sinh(2t)/(2t))`` on ``S²``.
    """
    u = _unit(z, "features")
    if u is None:
        return float("nan")
    n = u.shape[0]
    if n < 2:
        _warn(f"uniformity needs at least 2 samples (distinct pairs); got {n}: NaN")
        return float("nan")
    parts = []
    for start in range(0, n, chunk):
        block = u[start:start + chunk]
        sq = (2.0 - 2.0 * (block @ u.T)).clamp(min=0.0)
        rows = torch.arange(block.shape[0], device=u.device)[:, None] + start
        cols = torch.arange(n, device=u.device)[None, :]
        upper = cols > rows
        if bool(upper.any()):
            parts.append(torch.logsumexp((-t * sq)[upper], 0))
    total = torch.logsumexp(torch.stack(parts), 0)
    return float(total - math.log(n * (n - 1) / 2))


def _alignment_uniformity_probe(model: torch.nn.Module, inputs: ArrayLike, targets: object = None,
                                layers: Sequence[str] | None = None,
                                transform: str = "noise:0.1", pairs: Any = None,
                                reduce: str = "flatten", alpha: float = 2.0, t: float = 2.0,
                                normalisation: str = "") -> xr.Dataset:
    """The ``alignment_uniformity`` model probe: per layer, alignment of ``(f(x), f(g·x))``
    with ``g`` a transform of :func:`probes.invariance.parse_transform` (or ``pairs``, the
    inputs of the second views, given by the user) and uniformity of ``f(x)``."""
    from traindyn.probes.invariance import layer_features, parse_transform

    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    if pairs is None:
        x2 = parse_transform(transform, x)(x)
    else:
        x2 = pairs if isinstance(pairs, torch.Tensor) else torch.as_tensor(np.asarray(pairs))
        if x2.shape != x.shape:
            raise ValueError(f"pairs must have the shape of the inputs {tuple(x.shape)}; got "
                             f"{tuple(x2.shape)}")
    f1 = layer_features(model, x, layers, reduce)
    f2 = layer_features(model, x2.to(x.device, x.dtype), layers, reduce)
    names = list(f1)
    al = [alignment(f1[k], f2[k], alpha) for k in names]
    un = [uniformity(f1[k], t) for k in names]
    coords = {"layer": np.array(names, dtype=object)}
    return xr.Dataset({"alignment": ("layer", np.array(al)),
                       "uniformity": ("layer", np.array(un))}, coords=coords)


# --------------------------------------------------------------------------- per-class RankMe
def class_rankme(features: ArrayLike, labels: ArrayLike, eps: float = DEFAULT_EPS
                 ) -> dict[str, Any]:
    """RankMe (Garrido et al. 2023, Eq. 1: raw, uncentred singular values) of the features of
    each class, and their mean over classes.

    Returns ``{"class_rankme": DataArray over "class", "class_rankme_mean": float}``.
    Non-finite features make every value NaN, with a warning (as for every probe: one
    corrupted sample says the layer's representation is not to be trusted)."""
    x = as_features(features).to(STAT_DTYPE)
    y = _labels_host(labels, x.shape[0])
    classes = sorted(set(y.tolist()))
    if not classes:
        raise ValueError("class_rankme needs at least one sample")
    if not bool(torch.isfinite(x).all()):
        warnings.warn("class_rankme: the features hold non-finite values; every class is NaN",
                      RuntimeWarning, stacklevel=2)
        arr = xr.DataArray(np.full(len(classes), np.nan), dims=("class",),
                           coords={"class": np.array(classes)})
        return {"class_rankme": arr, "class_rankme_mean": float("nan")}
    values = []
    for c in classes:
        values.append(rankme(x[(y == c).to(x.device)], eps))
    arr = xr.DataArray(np.array(values, dtype=float), dims=("class",),
                       coords={"class": np.array(classes)})
    return {"class_rankme": arr, "class_rankme_mean": float(np.mean(values))}


# --------------------------------------------------------------------------- registry
LINEAR_VARIABLES = {
    "linear_probe_accuracy": ("held-out accuracy of the ridge readout", "1"),
    "linear_probe_loss": ("held-out mean squared error of the ridge readout (one-hot)", "1"),
    "linear_probe_ridge": ("ridge chosen for the linear readout (absolute lambda)",
                           "feature_units^2"),
    "linear_probe_train_accuracy": ("training-split accuracy of the ridge readout", "1"),
}


def _read_linear(acc: ReadoutAccumulator, held_out: float = 0.25, seed: int = 0,
                 ridge: float | None = None, ridges: Sequence[float] = DEFAULT_RIDGES,
                 criterion: str = "gcv", max_train_rows: int = 4096, split: str = ""
                 ) -> dict[str, float]:
    if (float(held_out), int(seed), int(max_train_rows)) != (acc.held_out, acc.seed,
                                                             acc.max_train_rows):
        raise ValueError(
            f"the streamed linear_probe uses its accumulator's split (held_out={acc.held_out}, "
            f"seed={acc.seed}, max_train_rows={acc.max_train_rows}); for held_out={held_out}, "
            f"seed={seed}, max_train_rows={max_train_rows} pass "
            "probes.readout.linear_probe_with_split(...) as the probe")
    return acc.compute(ridge, ridges, criterion)


def _linear_one_shot(features: ArrayLike, labels: ArrayLike, split: str = "",
                     **kw: Any) -> dict[str, float]:
    return linear_probe(features, labels, **kw)


class _SplitReader:
    """``from_accumulator`` of a ``linear_probe`` with its own split: registers the split's
    accumulator where it is made *and* where it is unpickled (a Monitor's worker process, a
    dask worker), so the probe object travels by value."""

    def __init__(self, held_out: float, seed: int, max_train_rows: int) -> None:
        self.held_out, self.seed, self.max_train_rows = float(held_out), int(seed), \
            int(max_train_rows)
        self._register()

    @property
    def name(self) -> str:
        return f"readout_{self.held_out}_{self.seed}_{self.max_train_rows}"

    def _register(self) -> None:
        from functools import partial

        from traindyn.probes.registry import Accumulator, register_accumulator

        register_accumulator(Accumulator(self.name, partial(
            ReadoutAccumulator, self.held_out, self.seed, self.max_train_rows),
            needs_labels=True, shares="spectrum"))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register()

    def __call__(self, acc: ReadoutAccumulator, **kwargs: Any) -> dict[str, float]:
        return _read_linear(acc, **kwargs)


def linear_probe_with_split(held_out: float = 0.25, seed: int = 0, max_train_rows: int = 4096,
                            **kwargs: Any):
    """The ``linear_probe`` probe streaming with another split: registers an accumulator
    ``readout_<held_out>_<seed>_<max_train_rows>`` and returns a
    :class:`~probes.registry.Probe` to list in a Monitor (any mode), ``analyze`` or a sweep;
    ``kwargs`` (``ridge``, ``ridges``, ``criterion``) are bound to it."""
    from traindyn.probes.registry import Probe, Variable

    reader = _SplitReader(held_out, seed, max_train_rows)
    kw = dict(held_out=held_out, seed=seed, max_train_rows=max_train_rows,
              split="by sample index, splitmix64 hash", **kwargs)
    return Probe("linear_probe", "labelled_features",
                 {k: Variable(*v) for k, v in LINEAR_VARIABLES.items()}, SOURCE,
                 fn=_linear_one_shot, accumulator=reader.name, from_accumulator=reader,
                 kwargs=kw)


def register_probes() -> None:
    """Register the readout probes and the ``"readout"`` accumulator (idempotent)."""
    from traindyn.probes.registry import (
        Accumulator,
        Probe,
        Variable,
        register,
        register_accumulator,
    )

    register_accumulator(Accumulator("readout", ReadoutAccumulator, needs_labels=True,
                                     shares="spectrum"))
    # the defaults are bound, so that every Dataset states them (attribute ``parameters``)
    register(Probe("linear_probe", "labelled_features",
                   {k: Variable(*v) for k, v in LINEAR_VARIABLES.items()}, SOURCE,
                   fn=_linear_one_shot, accumulator="readout", from_accumulator=_read_linear,
                   kwargs={"held_out": 0.25, "seed": 0, "criterion": "gcv",
                           "split": "by sample index, splitmix64 hash"}))
    register(Probe(
        "logistic_probe", "labelled_features",
        {"logistic_probe_accuracy": Variable("held-out accuracy of the logistic readout"),
         "logistic_probe_loss": Variable("held-out cross-entropy of the logistic readout",
                                         "nat"),
         "logistic_probe_train_accuracy": Variable(
             "training-split accuracy of the logistic readout")},
        "Alain & Bengio (2017); multinomial logistic regression, L-BFGS (Liu & Nocedal 1989)",
        fn=logistic_probe, kwargs={"held_out": 0.25, "seed": 0, "l2": 1e-3}))
    register(Probe(
        "knn_accuracy", "labelled_features",
        {"knn_accuracy": Variable("held-out k-NN accuracy (majority vote, k=20 cosine by "
                                  "default)")},
        "Wu, Xiong, Yu, Lin (CVPR 2018); Caron et al. (ICCV 2021, DINO)", fn=knn_accuracy,
        kwargs={"k": 20, "metric": "cosine", "split": "held_out", "held_out": 0.25, "seed": 0}))
    register(Probe(
        "class_rankme", "labelled_features",
        {"class_rankme": Variable("RankMe within each class", "1", ("class",)),
         "class_rankme_mean": Variable("mean over classes of the within-class RankMe")},
        "Garrido, Balestriero, Najman, LeCun (ICML 2023), Eq. 1, per class", fn=class_rankme))
    register(Probe(
        "alignment_uniformity", "model",
        {"alignment": Variable("alignment of positive pairs, mean ||f(x)-f(x+)||^2 on "
                               "l2-normalised features", "1", ("layer",)),
         "uniformity": Variable("uniformity, log mean exp(-2||f(x)-f(y)||^2) over distinct "
                                "pairs, l2-normalised features", "1", ("layer",))},
        "Wang & Isola (ICML 2020), Eqs. 4-5 (alpha=2, t=2)",
        fn=_alignment_uniformity_probe,
        kwargs={"transform": "noise:0.1", "alpha": 2.0, "t": 2.0,
                "normalisation": "l2 per sample, before both losses"}))


register_probes()
