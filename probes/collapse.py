r"""Neural-collapse metrics of last-layer features, one-shot and streaming.

Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep
learning training", PNAS 117 (2020) 24652 (Figs. 2-7 and the authors' notebook); the class-
distance normalised variance (CDNV) of Galanti, György & Hutter, "On the role of neural
collapse in transfer learning", ICLR 2022 (Def. 1).

Notation: features ``h_i ∈ R^d`` with labels ``y_i``; ``N_c`` samples in class ``c``, ``C``
classes present, ``N = Σ_c N_c``;

.. math::
    \mu_c = \frac{1}{N_c}\sum_{y_i=c} h_i,\qquad
    \tilde M = [\mu_c - \mu_G]_{c} \in \mathbb R^{d\times C},

    \Sigma_W = \frac{1}{N}\sum_c \sum_{y_i=c}(h_i-\mu_c)(h_i-\mu_c)^\top,\qquad
    \Sigma_B = \frac{1}{C}\tilde M\tilde M^\top .

**Global mean convention** (``global_mean=``): ``"class_means"`` (default) takes
``μ_G = (1/C) Σ_c μ_c``, the unweighted mean of class means, as the authors' notebook does;
then ``Σ_c (μ_c − μ_G) = 0`` and ``Σ_B`` has rank at most ``C − 1``, whatever the class
sizes.  ``"samples"`` takes the sample mean ``μ_G = (1/N) Σ_i h_i`` (used by several later
codes).  The two agree for balanced classes; for imbalanced classes they differ and the
choice is recorded in the Dataset's ``parameters``.

**Standard deviations** (equinorm, equiangle) are population standard deviations (``ddof=0``)
over classes or class pairs.  The authors' notebook uses ``torch.std`` (``ddof=1``) for the
equinorm coefficient of variation: multiply ours by ``√(C/(C−1))`` to compare.

Streaming: :class:`CollapseAccumulator` keeps class counts, class means and the pooled
within-class scatter (``d × d``) in float64, merged batch by batch with Chan, Golub & LeVeque's
pairwise update (1979), so the result does not depend on batching and memory does not grow
with ``N``.  :func:`neural_collapse` is the accumulator fed once.

**The classifier in the Monitor and in** ``analyze``.  NC3, NC4 and the ``_classifier``
variants need the last layer's weights (and NC4 the network's predictions), which the
per-layer feature statistics do not see.  Name the classifier module —
``probe_kwargs={"neural_collapse": {"classifier": "fc"}}`` or ``traindyn analyze --classifier
fc`` — and the probe runs as a model probe (:func:`collapse_with_classifier`): one forward pass
over the probe batch captures each layer and the classifier's output; NC4 compares each
layer's nearest class mean with the network's prediction (``argmax`` of the classifier's
output), and NC3 and the classifier variants compare the classifier's rows with the class
means of every layer whose width matches the classifier's input (NaN with a warning for the
others).  Without ``classifier`` those five variables are NaN, and the probe says so.

**Labels** must be integer class indices, except in :func:`neural_collapse` without a
classifier or logits, which also accepts string (or other non-integer) class names and maps
them to ``0 … C−1`` in sorted order (the names are recorded in ``parameters["classes"]``):
with a classifier, a name cannot say which row of the weight is its class.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import xarray as xr
from traindyn.probes._arrays import (
    STAT_DTYPE,
    ArrayLike,
    all_finite,
    as_features,
    as_tensor,
    check_labels,
)
from traindyn.probes._pending import DeviceFlag, Pending
from traindyn.probes._solve import lapack_single_thread, solve_device
from traindyn.probes.registry import (
    Accumulator,
    Probe,
    Variable,
    register,
    register_accumulator,
)

__all__ = ["GLOBAL_MEANS", "NC_VARIABLES", "CLASSIFIER_VARIABLES", "CollapseAccumulator",
           "collapse_with_classifier", "neural_collapse"]

GLOBAL_MEANS: tuple[str, ...] = ("class_means", "samples")

SOURCE = (
    "Papyan, Han, Donoho (2020), Prevalence of neural collapse during the terminal phase of "
    "deep learning training, PNAS 117:24652; CDNV: Galanti, Gyorgy, Hutter (2022), On the "
    "role of neural collapse in transfer learning, ICLR"
)

NC_VARIABLES: dict[str, dict[str, str]] = {
    "nc1": {"long_name": "NC1 within-class variability, Tr(Sigma_W Sigma_B^+)/C", "units": "1"},
    "nc2_equinorm": {"long_name": "NC2 equinorm: std/mean of centred class-mean norms",
                     "units": "1"},
    "nc2_equinorm_classifier": {"long_name": "NC2 equinorm: std/mean of classifier row norms",
                                "units": "1"},
    "nc2_equiangle": {"long_name": "NC2 equiangularity: std of cosines of centred class means",
                      "units": "1"},
    "nc2_equiangle_classifier": {
        "long_name": "NC2 equiangularity: std of cosines of classifier rows", "units": "1"},
    "nc2_coherence": {"long_name": "NC2 maximal angle: mean |cos + 1/(C-1)| of centred means",
                      "units": "1"},
    "nc2_coherence_classifier": {
        "long_name": "NC2 maximal angle: mean |cos + 1/(C-1)| of classifier rows", "units": "1"},
    "nc3": {"long_name": "NC3 self-duality, ||W^T/||W||_F - M/||M||_F||_F^2", "units": "1"},
    "nc4": {"long_name": "NC4 nearest-class-mean vs network prediction mismatch fraction",
            "units": "1"},
    "cdnv": {"long_name": "class-distance normalised variance, mean over class pairs",
             "units": "1"},
}
"""Variables of :func:`neural_collapse` with their attributes (all scalars)."""

CLASSIFIER_VARIABLES = ("nc2_equinorm_classifier", "nc2_equiangle_classifier",
                        "nc2_coherence_classifier", "nc3", "nc4")
"""The variables that need the classifier (weights, or the network's predictions)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _cv(x: np.ndarray, what: str = "class means") -> float:
    """Coefficient of variation std/mean (population std); NaN with a warning if all zero."""
    mean = x.mean()
    if not mean > 0:
        _warn(f"neural collapse: the norms of the {what} are all zero; their equinorm "
              "coefficient of variation is NaN")
        return float("nan")
    return float(x.std() / mean)


def _angle_metrics(gram: np.ndarray, what: str = "centred class means") -> tuple[float, float]:
    """(std of pairwise cosines, mean |cos + 1/(C-1)|) of vectors with Gram matrix ``gram``
    (``C × C``); NaN with a warning when a vector is zero (its angles are undefined)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    if not np.all(norms > 0):
        _warn(f"neural collapse: one of the {what} is zero, so its angles are undefined: the "
              "equiangularity metrics are NaN")
        return float("nan"), float("nan")
    c = gram.shape[0]
    i, j = np.triu_indices(c, k=1)
    cos = gram[i, j] / (norms[i] * norms[j])
    return float(cos.std()), float(np.abs(cos + 1.0 / (c - 1)).mean())


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait (pinned memory, non-blocking
    copy); itself on the CPU."""
    if device.type == "cpu":
        return t
    if device.type != "cuda":  # pinned memory is a CUDA notion: a plain copy elsewhere
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class _Stats:
    labels: list[int]
    counts: torch.Tensor  # (C,) on the host
    means: torch.Tensor  # (C, d)
    within_ss: torch.Tensor  # (C,) Σ_{i∈c} ||h_i - μ_c||²
    scatter: torch.Tensor  # (d, d) Σ_c Σ_{i∈c} (h_i - μ_c)(h_i - μ_c)ᵀ


class CollapseAccumulator:
    r"""Streaming class statistics for neural-collapse metrics.

    Keeps, in float64 on the device of the first batch, the class counts ``N_c``, class means
    ``μ_c``, per-class sums of squared deviations and the pooled within-class scatter
    ``Σ_c Σ_{i∈c}(h_i−μ_c)(h_i−μ_c)ᵀ``.  Each batch is merged by the pairwise update of Chan,
    Golub & LeVeque (1979): for a class with ``n_a`` seen samples of mean ``μ_a`` and ``n_b``
    new ones of mean ``m_b`` and scatter ``S_b``,

    .. math:: S \leftarrow S + S_b + \frac{n_a n_b}{n_a+n_b}(m_b-\mu_a)(m_b-\mu_a)^\top ,

    which avoids the cancellation of ``Σ h hᵀ − N μμᵀ``.  Memory is ``O(d² + C·d)``.

    NC4 needs the final class means, so it takes a second pass: after every ``update``, call
    :meth:`update_predictions` on the same data with the network's logits (or the classifier).

    Examples
    --------
    >>> acc = CollapseAccumulator()
    >>> for x, y in loader:                                  # doctest: +SKIP
    ...     acc.update(penultimate(x), y)
    >>> for x, y in loader:                                  # doctest: +SKIP
    ...     acc.update_predictions(penultimate(x), logits=model(x))
    >>> ds = acc.compute(weight=model.fc.weight)             # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.n = 0
        self.d: int | None = None
        self._nonfinite = DeviceFlag()  # a NaN or Inf was seen (on the device: no host wait)
        self._index: dict[int, int] = {}
        self._counts: torch.Tensor | None = None  # on the host: the labels live there
        self._means: torch.Tensor | None = None
        self._within_ss: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None
        self._mismatch = 0
        self._predicted = 0
        self._pred_nonfinite = False

    # ------------------------------------------------------------------ updates
    @property
    def nonfinite(self) -> bool:
        """Whether a NaN or Inf was seen (reading it waits for the device)."""
        return bool(self._nonfinite)

    def _grow(self, new_labels: list[int], device: torch.device) -> None:
        k = len(new_labels)
        zeros = dict(dtype=STAT_DTYPE, device=device)
        for label in new_labels:
            self._index[label] = len(self._index)
        if self._counts is None:
            self._counts = torch.zeros(k, dtype=STAT_DTYPE)
            self._means = torch.zeros(k, self.d, **zeros)
            self._within_ss = torch.zeros(k, **zeros)
            self._scatter = torch.zeros(self.d, self.d, **zeros)
        else:
            self._counts = torch.cat([self._counts, torch.zeros(k, dtype=STAT_DTYPE)])
            self._means = torch.cat([self._means, torch.zeros(k, self.d, **zeros)])
            self._within_ss = torch.cat([self._within_ss, torch.zeros(k, **zeros)])

    def update(self, features: ArrayLike, labels: ArrayLike) -> CollapseAccumulator:
        """Add a batch: ``features`` of shape ``(b, d)`` (trailing axes flattened), integer
        ``labels`` of shape ``(b,)``.

        The class bookkeeping (which labels, how many of each) is done on the host, where
        labels come from; the features stay on their device and the host never waits for it.
        Labels given on an accelerator are copied to the host first (one wait per batch)."""
        z = as_features(features).to(STAT_DTYPE)
        y = _as_labels(labels, z.shape[0])
        if self.d is None:
            self.d = z.shape[1]
        elif z.shape[1] != self.d:
            raise ValueError(f"batch has {z.shape[1]} features; earlier batches had {self.d}")
        self._nonfinite.mark(~torch.isfinite(z).all())
        uniq, inv = torch.unique(y, return_inverse=True)
        values = [int(u) for u in uniq.tolist()]
        new = [v for v in values if v not in self._index]
        if new:
            self._grow(new, z.device)
        k = len(values)
        rows = torch.tensor([self._index[v] for v in values])
        nb = torch.bincount(inv, minlength=k).to(STAT_DTYPE)
        na = self._counts[rows]
        n = na + nb
        index = _to_device(torch.cat([inv, rows]), z.device)
        inv_d, rows_d = index[:inv.numel()], index[inv.numel():]
        nb_d, w_d, frac_d = _to_device(torch.stack([nb, na * nb / n, nb / n]), z.device)
        sums = torch.zeros(k, self.d, dtype=STAT_DTYPE, device=z.device)
        sums.index_add_(0, inv_d, z)
        mb = sums / nb_d[:, None]
        zc = z - mb[inv_d]
        ss_b = torch.zeros(k, dtype=STAT_DTYPE, device=z.device)
        ss_b.index_add_(0, inv_d, (zc * zc).sum(1))
        delta = mb - self._means[rows_d]
        self._scatter.addmm_(zc.T, zc)
        self._scatter.addmm_((delta * w_d[:, None]).T, delta)
        self._within_ss[rows_d] += ss_b + w_d * (delta * delta).sum(1)
        self._means[rows_d] += delta * frac_d[:, None]
        self._counts[rows] = n
        self.n += z.shape[0]
        return self

    def update_predictions(
        self,
        features: ArrayLike,
        logits: ArrayLike | None = None,
        weight: ArrayLike | None = None,
        bias: ArrayLike | None = None,
    ) -> CollapseAccumulator:
        """Second pass for NC4: count samples whose nearest class mean (of the means
        accumulated so far, which should be final) differs from the network's prediction,
        ``argmax`` of ``logits`` or of ``h Wᵀ + b``."""
        self._check()
        z = as_features(features).to(STAT_DTYPE)
        if logits is None and weight is None:
            raise ValueError("update_predictions needs logits, or the classifier weight")
        pred = _network_prediction(z, logits, weight, bias, max(self._index))
        if pred is None:  # non-finite logits / classifier (warned): NC4 is NaN
            self._pred_nonfinite = True
            self._predicted += z.shape[0]
            return self
        self._mismatch += int((self.ncc_predict(z) != pred).sum())
        self._predicted += z.shape[0]
        return self

    def ncc_predict(self, features: ArrayLike) -> torch.Tensor:
        """Label of the nearest class mean (Euclidean) of each row of ``features``."""
        self._check()
        z = as_features(features).to(STAT_DTYPE)
        means = self._means.to(z.device)
        dist = (means * means).sum(1)[None, :] - 2.0 * z @ means.T
        labels = torch.tensor(list(self._index), device=z.device)
        return labels[dist.argmin(1)]

    # ------------------------------------------------------------------ results
    def _check(self) -> None:
        if self.n == 0:
            raise ValueError("no samples were accumulated: call update(features, labels) first")

    def stats(self) -> _Stats:
        """Accumulated statistics, classes sorted by label (counts on the host)."""
        self._check()
        labels = sorted(self._index)
        order = torch.tensor([self._index[v] for v in labels])
        order_d = _to_device(order, self._means.device)
        return _Stats(labels, self._counts[order], self._means[order_d],
                      self._within_ss[order_d], self._scatter)

    def compute(
        self,
        weight: ArrayLike | None = None,
        bias: ArrayLike | None = None,
        global_mean: str = "class_means",
    ) -> xr.Dataset:
        """Neural-collapse metrics of everything accumulated (see :func:`neural_collapse`).

        ``nc4`` is NaN unless :meth:`update_predictions` was called.  ``bias`` is accepted for
        symmetry with :func:`neural_collapse` and is not used by NC1-NC3.
        """
        del bias
        return self.pending(weight, global_mean).result()

    def pending(self, weight: ArrayLike | None = None, global_mean: str = "class_means"
                ) -> Pending:
        """:meth:`compute` as a :class:`~probes._pending.Pending`: the device reduces the
        ``d``-dimensional statistics to ``C × C`` blocks (:func:`class_blocks`) and the
        metrics are finished on the host from those, after one copy."""
        if global_mean not in GLOBAL_MEANS:
            raise ValueError(f"unknown global_mean {global_mean!r}; choose one of {GLOBAL_MEANS}")
        st = self.stats()
        params = {"global_mean": global_mean, "n_classes": len(st.labels), "n_samples": self.n,
                  "n_features": self.d, "std_ddof": 0,
                  "class_counts": [int(c) for c in st.counts.tolist()],
                  "classes": st.labels}
        mismatch, predicted, pred_bad = self._mismatch, self._predicted, self._pred_nonfinite

        def finish(values: dict[str, float], host: dict[str, np.ndarray]) -> xr.Dataset:
            ok = not (bool(host["nonfinite"]) or pred_bad)
            values["nc4"] = mismatch / predicted if predicted and ok else float("nan")
            return _dataset(values, params)

        return _metrics_pending(st, self.n, weight, global_mean,
                                self._nonfinite.tensor(self._means.device), finish)


def _is_named(labels: ArrayLike) -> bool:
    """Whether ``labels`` are class names (strings, bytes or other objects), not numbers."""
    if isinstance(labels, torch.Tensor):
        return False
    if isinstance(labels, (list, tuple)):
        return any(isinstance(v, (str, bytes)) for v in labels)
    kind = getattr(getattr(labels, "dtype", None), "kind", None)
    return kind in ("U", "S", "O")


def _names_to_indices(labels: ArrayLike) -> tuple[np.ndarray, list]:
    """Class names → indices ``0 … C−1`` in sorted order, and the sorted names."""
    arr = np.asarray(labels, dtype=object).reshape(-1)
    try:
        names = sorted(set(arr.tolist()))
    except TypeError as err:
        raise TypeError(f"labels mix types that cannot be sorted ({err}); give integer class "
                        "indices") from None
    index = {v: i for i, v in enumerate(names)}
    return np.array([index[v] for v in arr.tolist()], dtype=np.int64), names


def _as_labels(labels: ArrayLike, n: int) -> torch.Tensor:
    """Validated labels on the host (copied there once if they live on an accelerator)."""
    if _is_named(labels):
        raise TypeError("labels are class names (strings or objects), not integer class "
                        "indices: map them to 0 … C−1 first (neural_collapse() does that "
                        "itself when no classifier or logits are given)")
    y = as_tensor(labels)
    if y.device.type != "cpu":
        y = y.cpu()
    return check_labels(y, n, "labels")


def _network_prediction(z, logits, weight, bias, max_label: int) -> torch.Tensor | None:
    """argmax of ``logits`` or of ``z Wᵀ + b``; ``None`` (with a warning) if not finite."""
    if logits is not None:
        lg = as_features(logits, "logits").to(z.device)
        if lg.shape[0] != z.shape[0]:
            raise ValueError(f"logits have {lg.shape[0]} rows; features have {z.shape[0]}")
        if max_label >= lg.shape[1]:
            raise ValueError(f"labels must index the columns of logits (0..{lg.shape[1] - 1}); "
                             f"got label {max_label}")
        if not all_finite(lg):
            _warn("neural collapse: logits have non-finite entries (NaN or Inf); NC4 is NaN")
            return None
        return lg.argmax(1)
    w = as_features(weight, "weight").to(device=z.device, dtype=STAT_DTYPE)
    if w.shape[1] != z.shape[1]:
        raise ValueError(f"weight has {w.shape[1]} columns; features have {z.shape[1]}")
    if max_label >= w.shape[0]:
        raise ValueError(f"labels must index the rows of weight (0..{w.shape[0] - 1}); got "
                         f"label {max_label}")
    out = z @ w.T
    if bias is not None:
        b = as_tensor(bias).to(device=z.device, dtype=STAT_DTYPE).reshape(-1)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"bias has {b.shape[0]} entries; weight has {w.shape[0]} rows")
        out = out + b
    if not all_finite(out):
        _warn("neural collapse: the classifier (weight or bias) has non-finite entries; NC4 "
              "is NaN")
        return None
    return out.argmax(1)


def _rank_tolerance(size: int, top: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``M̃ᵀM̃`` (or ``M̃M̃ᵀ``; ``M̃`` is ``d × C``, ``size = max(d, C)``) at or
    below this are round-off of a zero."""
    return size * torch.finfo(STAT_DTYPE).eps * top.clamp(min=0) * 10


def class_blocks(m: torch.Tensor, sigma_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, Q) = (M̃ᵀM̃, M̃ᵀ Σ_W M̃)``: the ``C × C`` blocks every NC1 computation needs."""
    return m.T @ m, m.T @ (sigma_w @ m)


def _nc1_from_blocks(gram: torch.Tensor, quad: torch.Tensor, d: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(NC1, Σ_B ≠ 0)`` from the blocks of :func:`class_blocks` (see
    :func:`nc1_class_space`), on the blocks' device."""
    where = solve_device(gram.shape[0], gram.device)  # a small C × C solve: maybe the CPU
    with lapack_single_thread(where):
        s2, v = torch.linalg.eigh(gram.to(where))
    s2, v = s2.to(gram.device), v.to(gram.device)
    keep = s2 > _rank_tolerance(max(d, gram.shape[0]), s2.max())
    terms = (v * (quad @ v)).sum(0) / s2.clamp(min=torch.finfo(STAT_DTYPE).tiny) ** 2
    return torch.where(keep, terms, torch.zeros_like(terms)).sum(), keep.any()


def nc1_class_space(m: torch.Tensor, sigma_w: torch.Tensor) -> float | None:
    r"""``NC1 = Tr(Σ_W Σ_B^†)/C`` by a ``C × C`` eigenproblem (no ``d × d`` solve).

    With ``Σ_B = M̃M̃ᵀ/C`` (``M̃`` is ``d × C``, rank ``≤ C − 1``) and the thin SVD
    ``M̃ = U S Vᵀ``: ``Σ_B^† = C U S^{-2} Uᵀ``, hence
    ``NC1 = Σ_k u_kᵀ Σ_W u_k / s_k² = Σ_k v_kᵀ (M̃ᵀ Σ_W M̃) v_k / s_k⁴``,
    where ``(s_k², v_k)`` are the eigenpairs of the ``C × C`` matrix ``G = M̃ᵀM̃`` (Papyan, Han &
    Donoho 2020, Fig. 6 for the definition; the reduction is linear algebra).  Only the two
    ``C × C`` blocks ``G`` and ``M̃ᵀ Σ_W M̃`` leave the device.  Cost ``O(dC² + d²C)`` instead
    of the ``O(d³)`` pseudo-inverse.  ``None`` when ``Σ_B = 0``.
    """
    gram, quad = class_blocks(m, sigma_w)
    nc1, nonzero = _nc1_from_blocks(gram, quad, m.shape[0])
    return float(nc1) if bool(nonzero) else None


def nc1_feature_space(m: torch.Tensor, sigma_w: torch.Tensor) -> float | None:
    """``NC1 = Tr(Σ_W Σ_B^†)/C`` the direct way: the ``d × d`` pseudo-inverse of
    ``Σ_B = M̃M̃ᵀ/C`` from its eigendecomposition (the reference route of
    :func:`nc1_class_space`; ``O(d³)``)."""
    c = m.shape[1]
    sigma_b = m @ m.T / c
    with lapack_single_thread(m.device):
        lam, u = torch.linalg.eigh(sigma_b)
    keep = lam > _rank_tolerance(max(m.shape), lam.max()) / c
    if not bool(keep.any()):
        return None
    uk = u[:, keep]
    pinv = (uk / lam[keep]) @ uk.T
    return float(torch.trace(sigma_w @ pinv) / c)


def _metrics_pending(st: _Stats, n: int, weight: ArrayLike | None, global_mean: str,
                     nonfinite: torch.Tensor,
                     finish: Callable[[dict[str, float], dict[str, np.ndarray]], Any]
                     ) -> Pending:
    """NC1–NC3 and CDNV as a :class:`~probes._pending.Pending`: the device forms the
    ``C × C`` blocks (class-mean Gram ``G``, ``Q = M̃ᵀ Σ_W M̃``, squared distances of the class
    means, classifier Gram and NC3) and the host finishes the metrics from them — the
    definitions of Papyan, Han & Donoho (2020) and Galanti et al. (2022), module docstring.
    ``finish(values, host)`` adds what the caller knows (NC4) and returns the result."""
    c = len(st.labels)
    device = st.means.device
    tensors: dict[str, torch.Tensor] = {"nonfinite": nonfinite}
    w = None
    if c >= 2:
        means = st.means
        counts = _to_device(st.counts, device)
        if global_mean == "class_means":
            mu_g = means.mean(0)
        else:
            mu_g = (counts[:, None] * means).sum(0) / counts.sum()
        m = (means - mu_g).T  # d × C, columns μ_c - μ_G
        sigma_w = st.scatter / n
        gram, quad = class_blocks(m, sigma_w)
        diffs = means[:, None, :] - means[None, :, :]
        tensors.update(
            gram=gram, quad=quad, dist2=(diffs * diffs).sum(-1), var=st.within_ss / counts,
            overflow=~(torch.isfinite(sigma_w).all() & torch.isfinite(st.within_ss).all()
                       & torch.isfinite(gram).all()))
        if weight is not None:
            w = as_features(weight, "weight").to(device=device, dtype=STAT_DTYPE)
            if w.shape[1] != means.shape[1]:
                raise ValueError(f"weight has {w.shape[1]} columns; features have "
                                 f"{means.shape[1]}")
            if min(st.labels) < 0 or max(st.labels) >= w.shape[0]:
                raise ValueError(f"labels must index the rows of weight (0..{w.shape[0] - 1}); "
                                 f"got labels {st.labels[0]}..{st.labels[-1]}")
            wc = w[_to_device(torch.tensor(st.labels), device)].T  # d × C, column c = w_c
            wn, mn = wc.norm(), m.norm()
            tensors.update(w_finite=torch.isfinite(w).all(), w_gram=wc.T @ wc,
                           nc3=((wc / wn - m / mn) ** 2).sum(), nc3_ok=(wn > 0) & (mn > 0))
    d = st.means.shape[1]

    def done(host: dict[str, np.ndarray]) -> Any:
        return finish(_metrics_host(st, c, d, w, host), host)

    return Pending(tensors, done)


def _metrics_host(st: _Stats, c: int, d: int, w: torch.Tensor | None,
                  host: dict[str, np.ndarray]) -> dict[str, float]:
    """The host half of :func:`_metrics_pending`: NaN checks, warnings and the ``C × C``
    algebra."""
    nan = float("nan")
    out = dict.fromkeys(NC_VARIABLES, nan)
    if bool(host["nonfinite"]):
        _warn("neural collapse: the features are not finite (NaN or Inf); metrics are NaN")
        return out
    if c < 2:
        _warn(f"neural collapse needs at least 2 classes; got {c} (label {st.labels}); "
              "metrics are NaN")
        return out
    singles = [lab for lab, k in zip(st.labels, st.counts.tolist(), strict=True) if k < 2]
    if singles:
        _warn(f"classes {singles} have a single sample: their within-class variance is 0 by "
              "construction, which biases NC1 and CDNV downwards")
    if bool(host["overflow"]):
        _warn("neural collapse: the second moments of the features overflow float64 (entries "
              "of about 1e154 or more); metrics are NaN: rescale the features")
        return out

    gram = host["gram"]
    nc1, nonzero = _nc1_from_blocks(torch.from_numpy(gram), torch.from_numpy(host["quad"]), d)
    if not bool(nonzero):
        _warn("neural collapse: all class means coincide (Sigma_B = 0); NC1 is undefined")
    else:
        out["nc1"] = float(nc1)

    out["nc2_equinorm"] = _cv(np.sqrt(np.clip(np.diag(gram), 0.0, None)))
    out["nc2_equiangle"], out["nc2_coherence"] = _angle_metrics(gram)

    i, j = np.triu_indices(c, k=1)
    var, dist2 = host["var"], host["dist2"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["cdnv"] = float(((var[i] + var[j]) / (2.0 * dist2[i, j])).mean())
    if not np.isfinite(out["cdnv"]):
        _warn("neural collapse: two class means coincide, so the CDNV of that pair is "
              f"{out['cdnv']} (a variance over a zero distance)")

    if w is not None:
        if not bool(host["w_finite"]):
            _warn("neural collapse: weight has non-finite entries (NaN or Inf); the classifier "
                  "metrics are NaN")
            return out
        if w.shape[0] != c:
            _warn(f"weight has {w.shape[0]} rows but only {c} classes are present; classifier "
                  "metrics use the rows of the present classes")
        w_gram = host["w_gram"]
        out["nc2_equinorm_classifier"] = _cv(np.sqrt(np.clip(np.diag(w_gram), 0.0, None)),
                                             "classifier rows")
        out["nc2_equiangle_classifier"], out["nc2_coherence_classifier"] = _angle_metrics(
            w_gram, "classifier rows")
        if bool(host["nc3_ok"]):
            out["nc3"] = float(host["nc3"])
        else:
            _warn("neural collapse: the classifier or the centred class means are zero: NC3 "
                  "is NaN")
    return out


def _dataset(values: dict[str, float], params: dict) -> xr.Dataset:
    data_vars = {name: ((), np.float64(values[name]), dict(attrs))
                 for name, attrs in NC_VARIABLES.items()}
    return xr.Dataset(
        data_vars,
        attrs={"source": SOURCE, "kind": "probe", "parameters": json.dumps(params,
                                                                            sort_keys=True)},
    )


def neural_collapse(
    features: ArrayLike,
    labels: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    logits: ArrayLike | None = None,
    global_mean: str = "class_means",
) -> xr.Dataset:
    r"""Neural-collapse metrics NC1-NC4 and CDNV of features with class labels.

    Papyan, Han & Donoho (PNAS 2020); CDNV from Galanti et al. (ICLR 2022).  With the notation
    of the module docstring:

    * ``nc1`` = ``Tr(Σ_W Σ_B^†)/C`` (the paper's Fig. 6); ``Σ_B^†`` is the pseudo-inverse over
      the non-zero eigenvalues (``C − 1`` of them under ``global_mean="class_means"``).
    * ``nc2_equinorm`` = std/mean of ``‖μ_c − μ_G‖``; ``nc2_equinorm_classifier`` = std/mean of
      the classifier row norms ``‖w_c‖`` (Fig. 2).
    * ``nc2_equiangle`` = std over pairs ``c < c'`` of ``cos∠(μ_c − μ_G, μ_c' − μ_G)``
      (Fig. 3); ``nc2_coherence`` = mean over pairs of ``|cos + 1/(C−1)|`` (Fig. 4, the
      notebook's coherence); ``_classifier`` versions use the rows ``w_c`` (not centred).
    * ``nc3`` = ``‖Wᵀ/‖W‖_F − M̃/‖M̃‖_F‖_F²`` (Fig. 5).
    * ``nc4`` = fraction of samples whose nearest class mean (Euclidean) differs from the
      network's prediction, ``argmax`` of ``logits`` or of ``h Wᵀ + b`` (Fig. 7).
    * ``cdnv`` = mean over pairs of ``(V_i + V_j) / (2‖μ_i − μ_j‖²)``,
      ``V_c = (1/N_c) Σ_{i∈c} ‖h_i − μ_c‖²`` (Galanti et al. 2022, Def. 1).

    All vanish for features on a simplex equiangular tight frame with no within-class spread
    (and a classifier proportional to it).  Class sizes may differ.

    Parameters
    ----------
    features : array (N, d)
        Penultimate-layer features (torch, numpy or jax; computed in float64 on their device).
    labels : integer array (N,), or class names
        Class labels ``>= 0`` (a negative label, e.g. PyTorch's ``ignore_index = -100``, is a
        ``ValueError``: drop those samples first); with ``weight`` or ``logits`` they index
        rows of ``weight`` / columns of ``logits`` (``ValueError`` otherwise).  Without
        ``weight`` and ``logits``, class names (strings, or any sortable non-numeric values)
        are accepted and mapped to ``0 … C−1`` in sorted order; with them, names are a
        ``TypeError`` (a name does not say which row of the classifier is its class).
    weight : array (K, d), optional
        Last-layer classifier; enables the ``_classifier`` NC2 metrics, NC3 and (with ``bias``)
        NC4.  NaN without it.
    bias : array (K,), optional
    logits : array (N, K), optional
        The network's outputs; NC4 uses ``argmax`` of these when given.
    global_mean : {"class_means", "samples"}
        Convention for ``μ_G`` (module docstring).

    Returns
    -------
    xarray.Dataset
        Scalar variables ``nc1``, ``nc2_equinorm``, ``nc2_equinorm_classifier``,
        ``nc2_equiangle``, ``nc2_equiangle_classifier``, ``nc2_coherence``,
        ``nc2_coherence_classifier``, ``nc3``, ``nc4``, ``cdnv`` with ``long_name``/``units``;
        attributes ``source``, ``kind`` and ``parameters`` (JSON: the convention, class counts).
        Non-finite features (or second moments overflowing float64) or fewer than two classes
        give NaN with a ``RuntimeWarning``; a non-finite classifier or non-finite logits give
        NaN, with a warning, for the metrics that use them.
    """
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"unknown global_mean {global_mean!r}; choose one of {GLOBAL_MEANS}")
    names = None
    if _is_named(labels):
        if weight is not None or logits is not None:
            raise TypeError("labels are class names (strings or objects); with weight or "
                            "logits they must be integer indices of the classifier's rows / "
                            "the logits' columns: map them to integers first")
        labels, names = _names_to_indices(labels)
    acc = CollapseAccumulator().update(features, labels)
    if (logits is not None or weight is not None) and not acc.nonfinite:
        acc.update_predictions(features, logits=logits, weight=weight, bias=bias)
    ds = acc.compute(weight=weight, bias=bias, global_mean=global_mean)
    if names is not None:
        params = json.loads(ds.attrs["parameters"])
        params["classes"] = [str(v) for v in names]
        ds.attrs["parameters"] = json.dumps(params, sort_keys=True)
    return ds


# --------------------------------------------------------------------------- with a classifier
def _weighted_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if name and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.ndim == 2]


def _classifier_module(model: torch.nn.Module, classifier: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    module = modules.get(classifier)
    weight = getattr(module, "weight", None)
    if module is None or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        what = "not found" if module is None else (
            f"is a {type(module).__name__} without a 2-D weight")
        raise ValueError(f"classifier {classifier!r} {what}; modules with a weight matrix "
                         f"(classes × features): {_weighted_modules(model)}")
    return module


def collapse_with_classifier(model: torch.nn.Module, inputs: Any, targets: ArrayLike,
                             layers: Sequence[str], classifier: str,
                             global_mean: str = "class_means", reduce: str = "flatten"
                             ) -> xr.Dataset:
    """Neural collapse of each of ``layers`` with the model's own classifier: every variable
    of :func:`neural_collapse` over ``layer`` (the ``neural_collapse`` probe with
    ``classifier=``; see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Run once on ``inputs`` under ``torch.no_grad`` in its current mode (the Monitor and
        ``analyze`` put model probes in eval mode).
    inputs : tensor or mapping
        The probe batch (a mapping goes as keyword arguments).
    targets : integer array (N,)
        Class labels: indices of the classifier's rows.
    layers : sequence of str
        The layers whose features are measured (module names).
    classifier : str
        Module name of the last linear layer (``weight`` of shape classes × features, optional
        ``bias``); its output on ``inputs`` is the network's prediction for NC4.
    global_mean : {"class_means", "samples"}
    reduce : str
        Token reduction of captured outputs (:mod:`probes.capture`); give the one the
        evaluation uses so that NC1 matches the streamed features.

    Returns
    -------
    xarray.Dataset
        The variables of :data:`NC_VARIABLES` over ``layer``.  NC4 uses ``argmax`` of the
        classifier's output (of ``h Wᵀ + b`` where that output is not ``(N, classes)``, e.g.
        for a token model, and the layer's width is the classifier's input width); NC3 and the
        ``_classifier`` variants are NaN, with a warning, for a layer whose width differs from
        the classifier's input width.
    """
    return _collapse_with_classifier(model, inputs, targets, layers, classifier, global_mean,
                                     reduce).result()


def _collapse_with_classifier(model: torch.nn.Module, inputs: Any, targets: ArrayLike,
                              layers: Sequence[str] | None = None, classifier: str = "",
                              global_mean: str = "class_means", reduce: str = "flatten"
                              ) -> Pending:
    """:func:`collapse_with_classifier` as a :class:`~probes._pending.Pending` (the probe:
    one read for every layer, with the evaluation's other model probes)."""
    from traindyn.probes._pending import gather
    from traindyn.probes.capture import capture

    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"unknown global_mean {global_mean!r}; choose one of {GLOBAL_MEANS}")
    if targets is None:
        raise ValueError("neural_collapse needs the class labels of the probe data "
                         "(probe_labels= in the Monitor and analyze, --probe-labels in the CLI)")
    layers = [layers] if isinstance(layers, str) else list(layers or [])
    if not layers:
        raise ValueError("neural_collapse with classifier= needs the layers to measure "
                         "(layers= of the Monitor or analyze)")
    module = _classifier_module(model, classifier)
    with torch.no_grad():
        w = module.weight.detach().to(STAT_DTYPE)
        b = getattr(module, "bias", None)
        b = b.detach().to(STAT_DTYPE) if isinstance(b, torch.Tensor) else None
        names = list(dict.fromkeys([*layers, classifier]))
        with capture(model, names, reduce=reduce) as cap:
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(inputs)
        feats = {name: cap[name] for name in names}
    n_classes = w.shape[0]
    first = as_features(feats[layers[0]], f"features of {layers[0]!r}")
    y = check_labels(_as_labels(targets, first.shape[0]), first.shape[0], "labels",
                     n_classes=n_classes)
    out = as_features(feats[classifier], f"output of {classifier!r}").to(STAT_DTYPE)
    parts = []
    for layer in layers:
        z = as_features(feats[layer], f"features of {layer!r}").to(STAT_DTYPE)
        acc = CollapseAccumulator().update(z, y)
        matches = z.shape[1] == w.shape[1]
        if not matches:
            _warn(f"neural collapse: the classifier {classifier!r} takes {w.shape[1]} "
                  f"features; layer {layer!r} has {z.shape[1]}: its NC3 and classifier "
                  "metrics are NaN (they compare the classifier's rows with this layer's class "
                  "means)")
        if out.shape == (z.shape[0], n_classes):
            logits = out
        elif matches:
            logits = z.to(w.device) @ w.T + (0 if b is None else b)
        else:
            logits = None
        parts.append(_with_nc4(acc, z, logits, w if matches else None, global_mean, layer,
                               classifier))

    def build(results: list[xr.Dataset]) -> xr.Dataset:
        ds = xr.concat(results, dim="layer", combine_attrs="drop_conflicts")
        ds = ds.assign_coords(layer=("layer", np.array(layers, dtype=object)))
        params = json.loads(results[0].attrs["parameters"])
        for key in ("class_counts", "classes", "n_features", "n_classes", "n_samples"):
            params.pop(key, None)
        params.update(classifier=classifier, reduce=reduce, n_samples=int(y.numel()),
                      n_classes=int(n_classes))
        ds.attrs.update(source=SOURCE, kind="probe", parameters=json.dumps(params,
                                                                           sort_keys=True))
        return ds

    return gather(parts, build)


def _with_nc4(acc: CollapseAccumulator, z: torch.Tensor, logits: torch.Tensor | None,
              weight: torch.Tensor | None, global_mean: str, layer: str, classifier: str
              ) -> Pending:
    """``acc.pending(weight)`` with NC4 computed on the device: the fraction of samples whose
    nearest class mean (of this layer) differs from ``argmax`` of ``logits``."""
    base = acc.pending(weight=weight, global_mean=global_mean)
    if logits is None:
        _warn(f"neural collapse: the output of {classifier!r} is not (samples × classes) and "
              f"layer {layer!r} is not its input: NC4 is NaN")
        return base
    lg = logits.to(z.device)
    tensors = dict(base.tensors)
    tensors["nc4_logits_nonfinite"] = ~torch.isfinite(lg).all()
    # the nearest class mean of each sample of this layer (final means) vs the network's
    tensors["nc4_value"] = (acc.ncc_predict(z) != lg.argmax(1)).to(STAT_DTYPE).mean()

    def finish(host: dict[str, np.ndarray]) -> xr.Dataset:
        ds = base.finish({k: host[k] for k in base.tensors})
        if bool(host["nonfinite"]):
            return ds
        if bool(host["nc4_logits_nonfinite"]):
            _warn(f"neural collapse: the output of {classifier!r} has non-finite entries; NC4 "
                  "is NaN")
            return ds
        ds["nc4"] = ds["nc4"].copy(data=np.float64(host["nc4_value"]))
        return ds

    return Pending(tensors, finish)


# --------------------------------------------------------------------------- registry
def _read_collapse(acc: CollapseAccumulator, global_mean: str = "class_means") -> Pending:
    """``from_accumulator`` of the ``neural_collapse`` probe: NC1, NC2 and CDNV from the shared
    class statistics, pending until the evaluation's values are read.  Without the classifier
    (``classifier=`` turns the probe into :func:`collapse_with_classifier`) NC3, NC4 and the
    ``_classifier`` variants are NaN; their declared ``long_name`` says so."""
    return acc.pending(global_mean=global_mean)


def _collapse_one_shot(features: ArrayLike, labels: ArrayLike, **kwargs) -> xr.Dataset:
    return neural_collapse(features, labels, **kwargs)


_WITHOUT_CLASSIFIER = (" (NaN without the classifier: name its module with probe_kwargs "
                       "{'neural_collapse': {'classifier': ...}} or traindyn analyze "
                       "--classifier)")


@dataclass(frozen=True, eq=False)
class CollapseProbe(Probe):
    """The ``neural_collapse`` declaration: a labelled-features probe over the shared class
    statistics, which becomes a model probe (:func:`collapse_with_classifier`, the same
    variables over ``layer``) when ``classifier=`` names the classifier module."""

    def with_kwargs(self, **kwargs: Any) -> Probe:
        merged = {**self.kwargs, **kwargs}
        classifier = merged.pop("classifier", None)
        if classifier is None:
            return replace(self, kwargs=merged)
        unknown = sorted(set(merged) - {"global_mean", "reduce"})
        if unknown:
            raise TypeError(f"neural_collapse with classifier= takes global_mean and reduce; "
                            f"got {unknown}")
        return Probe(self.name, "model",
                     {k: Variable(v["long_name"], v["units"], ("layer",))
                      for k, v in NC_VARIABLES.items()},
                     self.source, fn=_collapse_with_classifier,
                     kwargs={**merged, "classifier": str(classifier)}, requires_labels=True)


def register_probes() -> None:
    """Register ``neural_collapse`` and its ``"class_stats"`` accumulator (idempotent)."""
    register_accumulator(Accumulator("class_stats", CollapseAccumulator, needs_labels=True))
    register(CollapseProbe(
        "neural_collapse", "labelled_features",
        {k: Variable(v["long_name"] + (_WITHOUT_CLASSIFIER if k in CLASSIFIER_VARIABLES else ""),
                     v["units"]) for k, v in NC_VARIABLES.items()},
        SOURCE, fn=_collapse_one_shot, accumulator="class_stats",
        from_accumulator=_read_collapse))


register_probes()
