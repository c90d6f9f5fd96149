r"""Representation similarity: the CKA family and the orthogonal Procrustes distance, one-shot
and streaming, for pairs of layers, layer × layer, model × model and checkpoint × checkpoint.

Conventions:

``linear_cka(X, Y)``
    Kornblith, Norouzi, Lee & Hinton, ICML 2019, Eq. 5 (feature space) / Eq. 3 + 4 (HSIC form):
    ``‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)`` for column-centred ``X_c, Y_c``, i.e.
    ``HSIC₀(K,L)/√(HSIC₀(K,K) HSIC₀(L,L))`` with the *biased* HSIC ``tr(KHLH)/(n−1)²``.
``linear_cka(X, Y, debiased=True)`` (= :func:`debiased_cka`)
    the same ratio of *unbiased* HSICs (Song et al. 2012, Eq. 5; used for CKA by Nguyen,
    Raghu & Kornblith, ICLR 2021, Eq. 3, and shown by Davari et al., ICLR 2023, to remove the
    inflation of biased CKA at small ``n`` / large width).  The features are centred first: the
    unbiased estimator is invariant to constant shifts mathematically, but not numerically (a
    large offset cancels in its three terms).  Needs ``n ≥ 4``; may be slightly negative for
    independent features.
``rbf_cka(X, Y, bandwidth)``
    CKA with RBF kernels, ``σ = bandwidth × median pairwise distance`` (pairs ``i < j``;
    Kornblith et al. 2019, Sec. 3), biased by default, ``debiased=True`` for the unbiased HSIC.
``procrustes_distance(X, Y)``
    Ding, Denain & Steinhardt, "Grounding representation similarity with statistical
    testing", NeurIPS 2021, Sec. 2: ``2 − 2‖X̂ᵀŶ‖_*`` with column-centred ``X̂, Ŷ`` scaled to
    unit Frobenius norm (0 for equal representations up to rotation and scale, at most 2).
:class:`MinibatchCKA`
    Nguyen, Raghu & Kornblith (ICLR 2021), Sec. 3.1, Eq. 3: the unbiased HSIC of each minibatch
    is averaged over batches for each pair of layers, and CKA is formed from the averages, so
    memory is ``O(layers × batch²)`` whatever the number of samples.  Its expectation over the
    batch split equals the full-data unbiased HSIC ratio's numerator and denominators (each is
    an unbiased U-statistic), not the full-data CKA itself.

Every value is computed in float64 on the input's device, after each representation is
brought to a common scale (:func:`probes._hsic.unit_centred`: centred, unit Frobenius norm), so
that ``CKA(c·X, Y) = CKA(X, Y)`` holds in floating point too — for layers of very different
scales (raw pixels beside logits) and for features whose products would overflow or underflow
float64.  The CKA reference probes
(``cka_first`` / ``cka_previous`` / ``cka_final``) answer with a :class:`probes._pending.Pending`
state, which :meth:`probes.evaluation.ProbePlan.layer_values` brings to the host with every
other probe's numbers in one copy; the comparisons run on those host states.
Bad input: different numbers of samples raise ``ValueError``; the unbiased estimator with
``n < 4`` raises ``ValueError``; a constant (zero-variance) representation or non-finite values
give NaN with a ``RuntimeWarning``.  A representation is *constant* when its centred rows are
at the rounding level of its own size (``‖X − 1μᵀ‖_F ≤ 8ε(1 + log₂ n)‖X‖_F``), whatever the
other representation's scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from traindyn.probes._arrays import ArrayLike, all_finite, nonfinite_flag, on_device, warn_nan
from traindyn.probes._hsic import (
    DEFAULT_BANDWIDTH,
    KernelStats,
    features64,
    gram_linear,
    gram_rbf,
    hsic_biased,
    hsic_biased_stats,
    hsic_unbiased,
    hsic_unbiased_stats,
    kernel,
    unit_centred,
    unit_centred_kernel,
)
from traindyn.probes._pending import DeviceFlag, Pending, first_failure

__all__ = [
    "DEFAULT_BANDWIDTH",
    "REFERENCES",
    "MinibatchCKA",
    "checkpoint_cka",
    "cka",
    "cka_matrix",
    "debiased_cka",
    "gram_linear",
    "gram_rbf",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "minibatch_cka",
    "procrustes_distance",
    "rbf_cka",
    "register_probes",
]

REFERENCES = ("first", "previous", "final")
"""Reference checkpoints a checkpoint's representation can be compared with."""

_SOURCE = ("Kornblith, Norouzi, Lee, Hinton (ICML 2019), Eq. 3-5; unbiased HSIC: Song et al. "
           "(JMLR 2012), Eq. 5; minibatch CKA: Nguyen, Raghu, Kornblith (ICLR 2021), Eq. 3")


def as_pair(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = features64(x, "x"), features64(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must hold the same samples: x has n = {a.shape[0]} rows, "
                         f"y has n = {b.shape[0]}")
    return a, on_device(b, a.device)


def _constant_checks(what: str, cx: torch.Tensor, cy: torch.Tensor
                     ) -> list[tuple[torch.Tensor, str]]:
    return [(cx, f"{what}: a representation is constant (x: its rows are equal up to "
                 "rounding), so CKA is undefined"),
            (cy, f"{what}: a representation is constant (y: its rows are equal up to "
                 "rounding), so CKA is undefined")]


def _ratio_pending(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, what: str,
                   checks: Sequence[tuple[torch.Tensor | bool, str]] = ()) -> Pending:
    """``xy / √(xx·yy)`` computed on the device, as a :class:`~probes._pending.Pending`: NaN +
    warning when one of ``checks`` holds (in order: non-finite input, a constant
    representation), then for non-finite HSICs, then for a non-positive ``xx`` or ``yy`` (the
    unbiased HSIC of a representation with itself can be ``≤ 0`` for tiny or degenerate
    samples).  The HSICs are those of representations brought to unit scale, so ``xx`` and
    ``yy`` are compared with zero, not with each other."""
    values = torch.stack([xy, xx, yy])
    flags, failure = first_failure([
        *checks, (~torch.isfinite(values).all(), f"{what}: the representations are not finite")])
    tensors = {**flags, "xx": xx, "yy": yy,
               "value": xy / torch.sqrt(xx.clamp(min=0) * yy.clamp(min=0)),
               "nonpositive": ~((xx > 0) & (yy > 0))}

    def finish(h: dict[str, np.ndarray]) -> float:
        reason = failure(h)
        if reason is None and bool(h["nonpositive"]):
            reason = (f"{what}: the HSIC of a representation with itself is "
                      f"{min(float(h['xx']), float(h['yy'])):.3g}, not positive, so CKA is "
                      "undefined")
        if reason is not None:
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
            return float("nan")
        return float(h["value"])

    return Pending(tensors, finish)


def _check_n(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise ValueError(f"the unbiased HSIC (debiased=True) needs n >= 4 samples; got n = {n}")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples; got n = {n}")


def cka(k: ArrayLike, l: ArrayLike, debiased: bool = False) -> float:  # noqa: E741
    r"""CKA of two precomputed ``n × n`` kernel matrices.

    .. math:: \mathrm{CKA}(K, L) = \frac{\mathrm{HSIC}(K, L)}
              {\sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}}

    Kornblith et al. (ICML 2019), Eq. 4, with the biased HSIC ``tr(KHLH)/(n−1)²`` (Eq. 3) or,
    with ``debiased=True``, the unbiased HSIC of Song et al. (JMLR 2012, Eq. 5).
    """
    kk = features64(k, "k")
    ll = on_device(features64(l, "l"), kk.device)
    if kk.shape[0] != kk.shape[1] or ll.shape != kk.shape:
        raise ValueError(f"k and l must be square kernels of the same size; got "
                         f"{tuple(kk.shape)} and {tuple(ll.shape)}")
    _check_n(kk.shape[0], debiased)
    return _kernel_cka_pending(kk, ll, debiased).result()


def _kernel_cka_pending(kk: torch.Tensor, ll: torch.Tensor, debiased: bool) -> Pending:
    """:func:`cka` of two float64 kernels on one device, as a pending: each kernel is centred
    (``HKH``, which neither HSIC estimator sees) and scaled to unit Frobenius norm first."""
    checks = [(nonfinite_flag(kk, ll), "CKA: the kernels are not finite")]
    kk, cx = unit_centred_kernel(kk)
    ll, cy = unit_centred_kernel(ll)
    hsic = hsic_unbiased if debiased else hsic_biased
    return _ratio_pending(hsic(kk, ll), hsic(kk, kk), hsic(ll, ll), "CKA",
                          [*checks, *_constant_checks("CKA", cx, cy)])


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    r"""Linear CKA between representations ``x`` (``n × p``) and ``y`` (``n × q``).

    .. math:: \mathrm{CKA}_{\rm lin}(X, Y) = \frac{\lVert Y_c^\top X_c\rVert_F^2}
              {\lVert X_c^\top X_c\rVert_F\,\lVert Y_c^\top Y_c\rVert_F}

    Kornblith, Norouzi, Lee & Hinton, ICML 2019, Eq. 5 (biased HSIC, column-centred features).
    With ``debiased=True``, the ratio of unbiased HSICs of the linear kernels ``XXᵀ``, ``YYᵀ``
    (Song et al. 2012, Eq. 5; Nguyen et al. 2021, Eq. 3; Davari et al. 2023), ``n ≥ 4``.

    Parameters
    ----------
    x, y : arrays of shape (n, p) and (n, q)
        torch, numpy or jax; trailing axes are flattened; float64 on ``x``'s device.
    debiased : bool
        Use the unbiased HSIC (default: the biased one of Kornblith et al.).

    Returns
    -------
    float
        In ``[0, 1]`` for the biased form (1 when ``y = xQ·c + b`` with orthogonal ``Q``);
        the debiased form can be slightly negative.  NaN with a ``RuntimeWarning`` for a
        constant or non-finite representation.
    """
    a, b = as_pair(x, y)
    return linear_cka_pending(a, b, debiased).result()


def linear_cka_pending(a: torch.Tensor, b: torch.Tensor, debiased: bool = False) -> Pending:
    """:func:`linear_cka` of float64 ``a``, ``b`` (same rows, same device) computed on the
    device, as a :class:`~probes._pending.Pending` (its checks are device flags too)."""
    _check_n(a.shape[0], debiased)
    what = "debiased linear CKA" if debiased else "linear CKA"
    checks = [(nonfinite_flag(a, b), "linear CKA: the representations are not finite")]
    ac, cx, _ = unit_centred(a)
    bc, cy, _ = unit_centred(b)
    checks += _constant_checks(what, cx, cy)
    if debiased:
        ka, kb = ac @ ac.T, bc @ bc.T
        return _ratio_pending(hsic_unbiased(ka, kb), hsic_unbiased(ka, ka),
                              hsic_unbiased(kb, kb), what, checks)
    n, p, q = a.shape[0], a.shape[1], b.shape[1]
    if p * q + p * p + q * q <= 3 * n * n:  # feature space (Eq. 5): cheaper when p, q < n
        xy = (bc.T @ ac).square().sum()
        xx = (ac.T @ ac).square().sum().sqrt()
        yy = (bc.T @ bc).square().sum().sqrt()
        return _ratio_pending(xy, xx.square(), yy.square(), what, checks)
    ka, kb = ac @ ac.T, bc @ bc.T
    return _ratio_pending((ka * kb).sum(), (ka * ka).sum(), (kb * kb).sum(), what, checks)


def debiased_cka(x: ArrayLike, y: ArrayLike) -> float:
    """Linear CKA from the unbiased HSIC: ``linear_cka(x, y, debiased=True)``."""
    return linear_cka(x, y, debiased=True)


def rbf_cka(x: ArrayLike, y: ArrayLike, bandwidth: float = DEFAULT_BANDWIDTH,
            debiased: bool = False) -> float:
    r"""CKA with RBF kernels ``exp(−‖x_i − x_j‖²/(2σ²))``, ``σ = bandwidth × median distance``.

    Kornblith et al. (ICML 2019), Sec. 3; the median is over pairs ``i < j`` of each
    representation separately (:func:`probes._hsic.gram_rbf`).  ``debiased=True`` uses the
    unbiased HSIC (Song et al. 2012, Eq. 5).
    """
    a, b = as_pair(x, y)
    _check_n(a.shape[0], debiased)
    if not (all_finite(a) and all_finite(b)):
        return warn_nan("RBF CKA: the representations are not finite")
    a, ca, _ = unit_centred(a)
    b, cb, _ = unit_centred(b)
    if bool(ca) or bool(cb):
        return warn_nan("RBF CKA: a representation is constant (its rows are equal up to "
                        "rounding), so CKA is undefined")
    return cka(gram_rbf(a, bandwidth), gram_rbf(b, bandwidth), debiased)


def procrustes_distance(x: ArrayLike, y: ArrayLike) -> float:
    r"""Orthogonal Procrustes distance ``2 − 2‖X̂ᵀŶ‖_*``.

    Ding, Denain & Steinhardt, NeurIPS 2021, Sec. 2 (after Schönemann 1966): ``X̂``, ``Ŷ`` are
    the column-centred representations scaled to unit Frobenius norm and ``‖·‖_*`` is the
    nuclear norm; equal to ``min_Q ‖X̂ − ŶQ‖_F²`` over orthogonal ``Q`` (with zero columns
    appended to the narrower one).  0 for ``y = xQ·c + b``; at most 2.
    """
    a, b = as_pair(x, y)
    if not (all_finite(a) and all_finite(b)):
        return warn_nan("Procrustes distance: the representations are not finite")
    # centred and scaled to unit Frobenius norm without forming ‖X‖² (which overflows float64
    # for entries beyond about 1e154)
    ac, ca, _ = unit_centred(a)
    bc, cb, _ = unit_centred(b)
    if bool(ca) or bool(cb):
        return warn_nan("Procrustes distance: a representation is constant (its rows are "
                        "equal up to rounding)")
    nuclear = torch.linalg.svdvals(ac.T @ bc).sum()
    return float((2.0 - 2.0 * nuclear).clamp(min=0.0))


# --------------------------------------------------------------------------- layer × layer
def _as_layers(features: Mapping[str, ArrayLike] | Sequence[ArrayLike], what: str
               ) -> dict[str, torch.Tensor]:
    if isinstance(features, Mapping):
        items = list(features.items())
    elif isinstance(features, (list, tuple)):
        items = [(str(i), f) for i, f in enumerate(features)]
    else:
        raise TypeError(f"{what} must be a mapping {{layer: features}} or a sequence of feature "
                        f"arrays; got {type(features).__name__}")
    if not items:
        raise ValueError(f"{what} is empty: give at least one layer")
    out = {str(name): features64(f, f"{what}[{name!r}]") for name, f in items}
    ns = {name: f.shape[0] for name, f in out.items()}
    if len(set(ns.values())) > 1:
        raise ValueError(f"every layer of {what} must hold the same samples; numbers of rows: "
                         f"{ns}")
    device = next(iter(out.values())).device
    return {name: on_device(f, device) for name, f in out.items()}


def _kernels(layers: dict[str, torch.Tensor], kind: str, bandwidth: float,
             factors: list[tuple[torch.Tensor, ...]] | None = None):
    """The kernels of ``layers`` after :func:`probes._hsic.unit_centred` (each layer centred
    and at unit scale, or at the given per-layer ``factors``), one 0-d "constant" flag per
    layer (stacked), and the factors used."""
    grams, flags, used = [], [], []
    for i, z in enumerate(layers.values()):
        zc, constant, f = unit_centred(z, None if factors is None else factors[i])
        grams.append(kernel(zc, kind, bandwidth))
        flags.append(constant)
        used.append(f)
    return grams, torch.stack(flags), used


def _hsic_matrices(ka, kb, debiased: bool):
    """(xy, xx, yy) HSIC arrays for kernel lists ``ka`` (rows) and ``kb`` (columns)."""
    if debiased:
        sa = [KernelStats.of(k) for k in ka]
        sb = sa if kb is ka else [KernelStats.of(k) for k in kb]
        xy = hsic_unbiased_stats(sa, sb)
        xx = torch.stack([hsic_unbiased_stats([s], [s])[0, 0] for s in sa])
        yy = xx if kb is ka else torch.stack([hsic_unbiased_stats([s], [s])[0, 0] for s in sb])
        return xy, xx, yy
    xy = hsic_biased_stats(ka, kb)
    xx = torch.stack([hsic_biased(k, k) for k in ka])
    yy = xx if kb is ka else torch.stack([hsic_biased(k, k) for k in kb])
    return xy, xx, yy


def _normalise(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, what: str,
               const_x: torch.Tensor, const_y: torch.Tensor) -> np.ndarray:
    """Elementwise CKA ``xy / √(xx ⊗ yy)``; NaN (with one warning) where undefined: a layer
    that is constant (``const_x`` / ``const_y``, judged against its own scale) or whose HSIC
    with itself is not finite or not positive."""
    xy, xx, yy, const_x, const_y = (t.detach().cpu().double()
                                    for t in (xy, xx, yy, const_x, const_y))
    bad_x = ~(torch.isfinite(xx) & (xx > 0)) | (const_x != 0)
    bad_y = ~(torch.isfinite(yy) & (yy > 0)) | (const_y != 0)
    out = xy / torch.sqrt(torch.outer(xx.clamp(min=1e-300), yy.clamp(min=1e-300)))
    bad = bad_x[:, None] | bad_y[None, :] | ~torch.isfinite(xy)
    if bool(bad.any()):
        warn_nan(f"{what}: {int(bad.sum())} entries undefined (a constant or non-finite "
                 "representation); they are NaN")
        out[bad] = float("nan")
    return out.numpy()


def _method_name(kind: str, debiased: bool) -> str:
    return f"{kind} CKA ({'unbiased' if debiased else 'biased'} HSIC)"


def cka_matrix(
    features: Mapping[str, ArrayLike] | Sequence[ArrayLike],
    other: Mapping[str, ArrayLike] | Sequence[ArrayLike] | None = None,
    kernel: str = "linear",
    debiased: bool = False,
    bandwidth: float = DEFAULT_BANDWIDTH,
) -> xr.Dataset:
    """CKA between every layer of ``features`` and every layer of ``other`` (default: itself).

    Parameters
    ----------
    features, other : mapping ``{layer: (n, d_layer) array}`` or sequence of arrays
        Representations of the same ``n`` inputs (one model, or two models).
    kernel : {"linear", "rbf"}
    debiased : bool
        Unbiased HSIC (Song et al. 2012, Eq. 5) instead of the biased one.
    bandwidth : float
        RBF σ as a fraction of the median pairwise distance.

    Returns
    -------
    xarray.Dataset
        ``cka`` over ``(layer, layer2)``; ``layer`` indexes ``features``, ``layer2``
        ``other``.  Each kernel is built once; all pairs come from one matrix product.
    """
    xa = _as_layers(features, "features")
    xb = xa if other is None else _as_layers(other, "other")
    n = next(iter(xa.values())).shape[0]
    if next(iter(xb.values())).shape[0] != n:
        raise ValueError(f"features and other must hold the same samples: n = {n} vs "
                         f"n = {next(iter(xb.values())).shape[0]}")
    _check_n(n, debiased)
    device = next(iter(xa.values())).device
    xb = {k: v.to(device) for k, v in xb.items()}
    ka, ca, _ = _kernels(xa, kernel, bandwidth)
    kb, cb, _ = (ka, ca, None) if other is None else _kernels(xb, kernel, bandwidth)
    values = _normalise(*_hsic_matrices(ka, kb, debiased), _method_name(kernel, debiased),
                        ca, cb)
    return _matrix_dataset(values, list(xa), list(xb), kernel, debiased, bandwidth, n)


def _matrix_dataset(values, names_a, names_b, kernel, debiased, bandwidth, n,
                    extra: dict | None = None) -> xr.Dataset:
    import json

    params = {"kernel": kernel, "debiased": debiased, "n": int(n), **(extra or {})}
    if kernel == "rbf":
        params["bandwidth"] = bandwidth
    return xr.Dataset(
        {"cka": (("layer", "layer2"), values,
                 {"long_name": _method_name(kernel, debiased), "units": "1"})},
        coords={"layer": ("layer", np.array(names_a, dtype=object)),
                "layer2": ("layer2", np.array(names_b, dtype=object))},
        attrs={"source": _SOURCE, "parameters": json.dumps(params, sort_keys=True)},
    )


# --------------------------------------------------------------------------- streaming
class MinibatchCKA:
    r"""Minibatch CKA of Nguyen, Raghu & Kornblith (ICLR 2021, Sec. 3.1, Eq. 3), streaming.

    .. math:: \mathrm{CKA}_{\rm mb}(X, Y) = \frac{\frac1k\sum_i \mathrm{HSIC}_1(K_i, L_i)}
              {\sqrt{\frac1k\sum_i \mathrm{HSIC}_1(K_i, K_i)\;
              \frac1k\sum_i\mathrm{HSIC}_1(L_i,L_i)}}

    over minibatches ``i`` (``K_i``, ``L_i`` the batch kernels; ``HSIC₁`` the unbiased
    estimator of Song et al. 2012, Eq. 5).  ``update(xs)`` takes one batch of every layer
    (a mapping ``{layer: (b, d)}`` or a sequence) and, for two models, ``update(xs, ys)``;
    ``compute()`` returns the ``len(xs) × len(ys)`` matrix.  Memory: the running sums
    (``layers²`` numbers) plus one batch's kernels; it does not grow with the number of samples.

    Parameters
    ----------
    kernel : {"linear", "rbf"}
    unbiased : bool
        ``True`` (default, the paper's estimator); ``False`` averages biased HSICs instead,
        which keeps the bias of biased HSIC at the batch size ``b``: more batches do not
        remove it.  For Gaussian features its limit is ``(b‖Σ_xy‖² + tr Σ_x tr Σ_y) /
        √((b‖Σ_x‖² + (tr Σ_x)²)(b‖Σ_y‖² + (tr Σ_y)²))`` (from the Wishart moments of the
        sample covariance), which lies above the population CKA for weakly related,
        high-rank representations and can lie below it for a pair of CKA near 1 whose
        effective ranks differ.
    bandwidth : float
        RBF σ as a fraction of each batch's median pairwise distance.
    """

    def __init__(self, kernel: str = "linear", unbiased: bool = True,
                 bandwidth: float = DEFAULT_BANDWIDTH) -> None:
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf'; got {kernel!r}")
        self.kernel, self.unbiased, self.bandwidth = kernel, unbiased, bandwidth
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self.batches = 0
        self.n = 0
        self.names_x: list[str] | None = None
        self.names_y: list[str] | None = None
        self._nonfinite = DeviceFlag()  # a NaN or Inf was seen (on the device: no host wait)
        self._xy: torch.Tensor | None = None
        self._xx: torch.Tensor | None = None
        self._yy: torch.Tensor | None = None
        # per layer: the scale of its first batch (every later batch of the layer is brought to
        # it, so the averaged HSICs share one scale), and whether some batch was not constant
        self._factors_x: list[tuple[torch.Tensor, ...]] | None = None
        self._factors_y: list[tuple[torch.Tensor, ...]] | None = None
        self._varied_x: torch.Tensor | None = None
        self._varied_y: torch.Tensor | None = None
        self.cross = False

    def update(self, xs: Mapping[str, ArrayLike] | Sequence[ArrayLike],
               ys: Mapping[str, ArrayLike] | Sequence[ArrayLike] | None = None) -> MinibatchCKA:
        """Add one minibatch: the same ``b`` inputs' features at every layer (of two models)."""
        la = _as_layers(xs, "xs")
        lb = la if ys is None else _as_layers(ys, "ys")
        b = next(iter(la.values())).shape[0]
        if next(iter(lb.values())).shape[0] != b:
            raise ValueError(f"xs and ys must hold the same batch: {b} vs "
                             f"{next(iter(lb.values())).shape[0]} rows")
        if self.unbiased and b < 4:
            raise ValueError(f"a minibatch for the unbiased HSIC needs >= 4 samples; got {b}")
        if b < 2:
            raise ValueError(f"a minibatch needs >= 2 samples; got {b}")
        if self.names_x is None:
            self.names_x, self.names_y, self.cross = list(la), list(lb), ys is not None
        elif list(la) != self.names_x or list(lb) != self.names_y or self.cross != (
                ys is not None):
            raise ValueError(f"layers changed between batches: {self.names_x} / "
                             f"{self.names_y} before, {list(la)} / {list(lb)} now")
        device = next(iter(la.values())).device
        lb = {k: on_device(v, device) for k, v in lb.items()}
        # a non-finite batch is flagged on the device, not skipped after a host wait: its NaN
        # reaches the sums, and compute() answers NaN with a warning
        self._nonfinite.mark(nonfinite_flag(*la.values(), *(lb.values() if ys is not None else ())))
        ka, ca, self._factors_x = _kernels(la, self.kernel, self.bandwidth, self._factors_x)
        if ys is None:
            kb, cb = ka, ca
        else:
            kb, cb, self._factors_y = _kernels(lb, self.kernel, self.bandwidth, self._factors_y)
        xy, xx, yy = _hsic_matrices(ka, kb, self.unbiased)
        if self._xy is None:
            self._xy, self._xx, self._yy = xy, xx, yy
            self._varied_x, self._varied_y = ~ca, ~cb
        else:
            self._xy, self._xx, self._yy = self._xy + xy, self._xx + xx, self._yy + yy
            self._varied_x, self._varied_y = self._varied_x | ~ca, self._varied_y | ~cb
        self.batches += 1
        self.n += b
        return self

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add the batches ``other`` has seen (same layers)."""
        if other.batches == 0:
            return self
        if self.batches == 0:
            self.names_x, self.names_y, self.cross = other.names_x, other.names_y, other.cross
            self._xy, self._xx, self._yy = (t.clone() for t in (other._xy, other._xx, other._yy))
            self._factors_x, self._factors_y = other._factors_x, other._factors_y
            self._varied_x, self._varied_y = other._varied_x.clone(), other._varied_y.clone()
        else:
            if ((other.names_x, other.names_y, other.cross)
                    != (self.names_x, self.names_y, self.cross)):
                raise ValueError("cannot merge minibatch CKA over different layers")
            dev = self._xy.device
            # other's sums are at the scale of its own first batches: bring them to ours (a
            # linear kernel scales as s², an HSIC of two as s_x² s_y²; RBF kernels do not scale)
            rx = _scale_ratio(self._factors_x, other._factors_x, self.kernel, dev)
            ry = rx if not self.cross else _scale_ratio(self._factors_y, other._factors_y,
                                                         self.kernel, dev)
            self._xy = self._xy + other._xy.to(dev) * torch.outer(rx, ry)
            self._xx = self._xx + other._xx.to(dev) * rx.square()
            self._yy = self._yy + other._yy.to(dev) * ry.square()
            self._varied_x = self._varied_x | other._varied_x.to(dev)
            self._varied_y = self._varied_y | other._varied_y.to(dev)
        self.batches += other.batches
        self.n += other.n
        self._nonfinite.mark(other._nonfinite)
        return self

    @property
    def nonfinite(self) -> bool:
        """Whether a NaN or Inf was seen (reading it waits for the device)."""
        return bool(self._nonfinite)

    def hsic(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean HSIC over batches: ``(xy, xx, yy)`` (float64 tensors), in the units of the
        features given (the sums are kept at each layer's first-batch scale; this undoes it,
        and overflows only where the HSIC itself is beyond float64)."""
        if self.batches == 0:
            raise ValueError("no minibatch was accumulated: call update() first")
        k = self.batches
        dev = self._xy.device
        ones = [tuple(torch.ones((), dtype=torch.float64) for _ in f) for f in self._factors_x]
        ux = _scale_ratio(ones, self._factors_x, self.kernel, dev)
        uy = ux if not self.cross else _scale_ratio(
            [tuple(torch.ones((), dtype=torch.float64) for _ in f) for f in self._factors_y],
            self._factors_y, self.kernel, dev)
        return (self._xy * torch.outer(ux, uy) / k, self._xx * ux.square() / k,
                self._yy * uy.square() / k)

    def compute(self) -> np.ndarray:
        """The ``layers × layers2`` minibatch CKA matrix (float64 numpy); the sums and the
        non-finite flag come to the host in one copy."""
        if self.batches == 0:
            raise ValueError("no minibatch was accumulated: call update() first")
        xy, xx, yy = self._xy, self._xx, self._yy  # at unit scale: the ratio needs no unscaling
        nx, ny = xy.shape
        flag = self._nonfinite.tensor(xy.device).to(xy.dtype).reshape(1)
        host = torch.cat([flag, xy.reshape(-1), xx, yy, ~self._varied_x, ~self._varied_y]).cpu()
        if host[0] != 0:
            warn_nan("minibatch CKA: some features were not finite")
            return np.full((nx, ny), np.nan)
        cut = 1 + nx * ny
        parts = torch.split(host[cut:], [nx, ny, nx, ny])
        return _normalise(host[1:cut].reshape(nx, ny), parts[0], parts[1],
                          "minibatch " + _method_name(self.kernel, self.unbiased),
                          parts[2], parts[3])

    def to_dataset(self) -> xr.Dataset:
        """:meth:`compute` as a Dataset, ``cka`` over ``(layer, layer2)``."""
        return _matrix_dataset(self.compute(), self.names_x, self.names_y, self.kernel,
                               self.unbiased, self.bandwidth, self.n,
                               {"minibatch": True, "batches": self.batches})


def _scale_ratio(mine: list[tuple[torch.Tensor, ...]], theirs: list[tuple[torch.Tensor, ...]],
                 kind: str, device: torch.device) -> torch.Tensor:
    """Per layer, the factor ``(s_mine / s_theirs)²`` that brings a linear kernel at scale
    ``s_theirs`` to ``s_mine`` (the scales as products of factors, divided factor by factor so
    that no product overflows); ones for RBF kernels, which do not depend on the scale."""
    if kind != "linear":
        return torch.ones(len(mine), dtype=torch.float64, device=device)
    out = []
    for a, b in zip(mine, theirs, strict=True):
        r = torch.ones((), dtype=torch.float64, device=device)
        for fa, fb in zip(a, b, strict=True):
            r = r * (fa.to(device) / fb.to(device))
        out.append(r.square())
    return torch.stack(out)


def minibatch_cka(
    features: Mapping[str, ArrayLike] | Sequence[ArrayLike],
    other: Mapping[str, ArrayLike] | Sequence[ArrayLike] | None = None,
    batch_size: int = 256,
    kernel: str = "linear",
    unbiased: bool = True,
    generator: torch.Generator | None = None,
) -> xr.Dataset:
    """:class:`MinibatchCKA` over ``features`` held in memory, every row used once.

    The ``n`` rows (shuffled with ``generator`` when given, in order otherwise) are cut into
    ``k = ⌈n / batch_size⌉`` batches of near-equal size (sizes differ by at most one row, none
    exceeds ``batch_size``).  Nguyen, Raghu & Kornblith (ICLR 2021, Eq. 3) weight every batch
    equally, which assumes batches of one size: a short last batch given the weight of a full
    one would add its larger sampling noise (and, for the biased HSIC, its larger bias) to the
    average.  When near-equal batches would fall under the estimator's minimum (4 rows for the
    unbiased HSIC, 2 for the biased one), fewer and slightly larger batches are used.  For data
    that do not fit in memory, feed the class batch by batch.
    """
    xa = _as_layers(features, "features")
    xb = None if other is None else _as_layers(other, "other")
    n = next(iter(xa.values())).shape[0]
    least = 4 if unbiased else 2
    if batch_size < least:
        raise ValueError(f"batch_size must be >= {least} for the "
                         f"{'unbiased' if unbiased else 'biased'} HSIC; got {batch_size}")
    if n < least:
        raise ValueError(f"minibatch CKA needs >= {least} samples; got n = {n}")
    if xb is not None and next(iter(xb.values())).shape[0] != n:
        raise ValueError(f"features and other must hold the same samples: n = {n} vs "
                         f"n = {next(iter(xb.values())).shape[0]}")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    k = min(-(-n // batch_size), n // least)
    acc = MinibatchCKA(kernel, unbiased)
    for idx in torch.tensor_split(order, k):
        sel_a = {name: v[idx.to(v.device)] for name, v in xa.items()}
        sel_b = None if xb is None else {name: v[idx.to(v.device)] for name, v in xb.items()}
        acc.update(sel_a, sel_b)
    return acc.to_dataset()


# --------------------------------------------------------------------------- checkpoints
def _step_coords(steps: np.ndarray, learning_rate: float | None) -> dict:
    """``step`` and ``time`` coordinates as :func:`dynamics.records.step_coords` makes them
    (probes cannot import dynamics)."""
    lr = 1.0 if learning_rate is None else float(learning_rate)
    time_attrs = {"long_name": "training time, learning rate × step", "units": "1"}
    if learning_rate is None:
        time_attrs["note"] = "no learning rate given: time = step"
    return {"step": ("step", steps, {"long_name": "optimisation step", "units": "1"}),
            "time": ("step", steps * lr, time_attrs)}


def checkpoint_cka(
    features: Mapping[int, Mapping[str, ArrayLike]],
    reference: str | None = None,
    kernel: str = "linear",
    debiased: bool = False,
    bandwidth: float = DEFAULT_BANDWIDTH,
    learning_rate: float | None = None,
) -> xr.Dataset:
    """CKA of each layer's representation across checkpoints (the same inputs at every step).

    Parameters
    ----------
    features : mapping ``{step: {layer: (n, d) array}}``
        One entry per checkpoint, every checkpoint with the same layers and inputs.
    reference : {None, "first", "previous", "final"}
        ``None``: the full checkpoint × checkpoint matrix, ``cka`` over
        ``(step, checkpoint2, layer)`` (``checkpoint2`` holds the same steps).  Otherwise one
        number per step and layer, ``cka_<reference>`` over ``(step, layer)``: each checkpoint
        against the first, the previous (NaN at the first step, which has none) or the final
        one.
    kernel, debiased, bandwidth
        As for :func:`cka_matrix`.
    learning_rate : float, optional
        Sets the ``time`` coordinate (``learning_rate × step``); without it ``time = step``.

    Returns
    -------
    xarray.Dataset
    """
    import json

    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"reference must be None or one of {REFERENCES}; got {reference!r}")
    if not features:
        raise ValueError("features is empty: give at least one checkpoint")
    steps = sorted(int(s) for s in features)
    by_step = {int(s): _as_layers(f, f"features[{s}]") for s, f in features.items()}
    layers = list(by_step[steps[0]])
    for s in steps:
        if list(by_step[s]) != layers:
            raise ValueError(f"checkpoint {s} has layers {list(by_step[s])}; the first has "
                             f"{layers}")
    n = next(iter(by_step[steps[0]].values())).shape[0]
    _check_n(n, debiased)
    device = next(iter(by_step[steps[0]].values())).device
    kernels = {}
    for s in steps:
        if next(iter(by_step[s].values())).shape[0] != n:
            raise ValueError(f"checkpoint {s} has a different number of samples than the "
                             f"first ({n})")
        layer_feats = {k: v.to(device) for k, v in by_step[s].items()}
        kernels[s] = _kernels(layer_feats, kernel, bandwidth)
    what = _method_name(kernel, debiased)
    t = len(steps)
    if reference is None:
        out = np.empty((t, t, len(layers)))
        for j in range(len(layers)):
            col = [kernels[s][0][j] for s in steps]
            const = torch.stack([kernels[s][1][j] for s in steps])
            out[:, :, j] = _normalise(*_hsic_matrices(col, col, debiased), what, const, const)
        dims, name = ("step", "checkpoint2", "layer"), "cka"
    else:
        out = np.empty((t, len(layers)))
        for i, s in enumerate(steps):
            ref = {"first": steps[0], "final": steps[-1],
                   "previous": steps[i - 1] if i else None}[reference]
            for j in range(len(layers)):
                if ref is None:
                    out[i, j] = np.nan
                    continue
                xy, xx, yy = _hsic_matrices([kernels[s][0][j]], [kernels[ref][0][j]], debiased)
                out[i, j] = _normalise(xy, xx, yy, what, kernels[s][1][j:j + 1],
                                       kernels[ref][1][j:j + 1])[0, 0]
        dims, name = ("step", "layer"), f"cka_{reference}"
    steps_arr = np.asarray(steps, dtype=np.int64)
    coords = {**_step_coords(steps_arr, learning_rate),
              "layer": ("layer", np.array(layers, dtype=object))}
    if reference is None:
        coords["checkpoint2"] = ("checkpoint2", steps_arr,
                                 {"long_name": "step of the compared checkpoint", "units": "1"})
    long = what + ("" if reference is None else f" against the {reference} checkpoint")
    params = {"kernel": kernel, "debiased": debiased, "n": int(n), "reference": reference}
    if kernel == "rbf":
        params["bandwidth"] = bandwidth
    return xr.Dataset({name: (dims, out, {"long_name": long, "units": "1"})}, coords=coords,
                      attrs={"source": _SOURCE, "parameters": json.dumps(params)})



# --------------------------------------------------------------------------- probe contract
def _cka_state(features: ArrayLike, kernel: str = "linear", debiased: bool = False,
               bandwidth: float = DEFAULT_BANDWIDTH) -> Pending:
    """What a CKA reference probe keeps of one evaluation: the features themselves when they
    are narrower than the number of samples (``d ≤ n``), else the ``n × n`` kernel — whichever
    is smaller (float64 numpy, on the host: later evaluations compare with it there).

    Answers with a :class:`~probes._pending.Pending` finishing to ``({}, state)``, so that
    :meth:`probes.evaluation.ProbePlan.layer_values` brings the states of every layer (and
    every CKA probe) to the host in its one copy."""
    z = features64(features, "features")
    n, d = z.shape
    if kernel == "linear" and d <= n:
        key, value = "features", z  # as given: the comparison brings it to unit scale itself
    else:
        # the kernel of the centred features at unit scale (CKA depends on neither shift nor
        # scale), so that a layer at 1e200 gives a finite kernel; a constant layer gives the
        # zero kernel (all ones for RBF), which the comparison recognises as constant again
        zc, constant, _ = unit_centred(z)
        zc = torch.where(constant, torch.zeros_like(zc), zc)
        key, value = "kernel", _kernel_of(zc, kernel, bandwidth)
    # a copy of its own (not a view of the evaluation's shared host buffer, which a reference
    # state would otherwise keep alive)
    return Pending({key: value}, lambda host: ({}, {key: host[key].copy()}))


def _kernel_of(z: torch.Tensor, kind: str, bandwidth: float) -> torch.Tensor:
    """The kernel :func:`cka_matrix` uses for ``kind`` (linear: ``ZZᵀ``, uncentred; RBF:
    :func:`probes._hsic.gram_rbf`, whose σ² = 0 case is decided on the device)."""
    return kernel(z, kind, bandwidth)


def _state_kernel(state: Mapping[str, np.ndarray]) -> torch.Tensor:
    if "kernel" in state:
        return torch.as_tensor(np.asarray(state["kernel"]), dtype=torch.float64)
    z = torch.as_tensor(np.asarray(state["features"]), dtype=torch.float64)
    return z @ z.T


def _cka_compare(state: Mapping[str, np.ndarray], reference: Mapping[str, object], kind: str,
                 kernel: str = "linear", debiased: bool = False,
                 bandwidth: float = DEFAULT_BANDWIDTH) -> dict[str, float]:
    """CKA between this evaluation's state and the ``kind`` reference's (same layer)."""
    ref = reference.get(kind)
    name = f"cka_{kind}"
    if ref is None and kind in ("first", "final"):
        ref = state  # no other evaluation recorded yet: this one is the first (or the final)
    if ref is None:
        return {name: warn_nan(f"{name}: there is no {kind} evaluation to compare with yet")}
    if "features" in state and "features" in ref:
        return {name: linear_cka(np.asarray(ref["features"]), np.asarray(state["features"]),
                                 debiased)}
    k, l = _state_kernel(state), _state_kernel(ref)  # noqa: E741
    if k.shape != l.shape:
        raise ValueError(f"{name}: this evaluation has n = {k.shape[0]} probe samples, the "
                         f"{kind} one n = {l.shape[0]}; CKA needs the same inputs")
    return {name: cka(l, k, debiased)}


def register_probes() -> None:
    """Register ``cka_first``, ``cka_previous`` and ``cka_final`` (idempotent): per layer, the
    CKA between this checkpoint's features and the reference checkpoint's features of the same
    layer on the same probe inputs.  Parameters (``probe_kwargs``): ``kernel`` ("linear" or
    "rbf"), ``debiased`` (unbiased HSIC), ``bandwidth``.  ``cka_final`` needs the whole series
    (``dynamics.analyze``); the Monitor runs ``cka_first`` and ``cka_previous``."""
    from functools import partial

    from traindyn.probes.registry import Probe, Variable, register

    for kind in REFERENCES:
        register(Probe(
            f"cka_{kind}", "features",
            {f"cka_{kind}": Variable(f"CKA with the {kind} checkpoint's features of the layer "
                                     "(linear, biased HSIC unless debiased=True)", "1")},
            source=_SOURCE, fn=_cka_state, reference=(kind,),
            compare=partial(_cka_compare, kind=kind)))


register_probes()
