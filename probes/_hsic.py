r"""Kernels and HSIC estimators behind :mod:`probes.similarity` (float64, on the input's device).

Notation: ``X`` is ``n × p``, ``K`` an ``n × n`` kernel (Gram) matrix, ``H = I − 11ᵀ/n`` the
centring matrix, ``K̃`` the kernel with its diagonal set to zero.

* Biased HSIC (Gretton et al. 2005, Eq. 4, with the ``(n−1)⁻²`` normalisation of Kornblith et
  al. 2019, Eq. 3): ``HSIC₀(K, L) = tr(K H L H) / (n − 1)²``.
* Unbiased HSIC (Song, Smola, Gretton, Bedo & Borgwardt 2012, JMLR 13, Eq. 5), ``n ≥ 4``:

  .. math:: \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)}\Big[\operatorname{tr}(\tilde K\tilde L)
            + \frac{\mathbf 1^\top\tilde K\mathbf 1\,\mathbf 1^\top\tilde L\mathbf 1}{(n-1)(n-2)}
            - \frac{2}{n-2}\,\mathbf 1^\top\tilde K\tilde L\mathbf 1\Big]

Scale.  Every CKA and Procrustes quantity is invariant to scaling each representation, and the
centred ones to shifting it, while their float64 products are not: features at ``10³⁸`` overflow
``‖K‖²``, features at ``10⁻¹⁵⁰`` underflow it, and a layer ``10⁴`` times larger than another makes
the smaller one's HSIC look like rounding noise.  :func:`unit_centred` therefore brings each
representation to a common scale before any product (column-centred, unit Frobenius norm, a
power-of-two prescaling so that the centring itself cannot overflow), and decides whether it is
constant against *its own* size.  Centring before the unbiased estimator changes nothing
mathematically (it is invariant to shifts of the features) but removes the cancellation of a
large constant offset.

Everything an HSIC needs from one kernel is kept in a :class:`KernelStats` (the zero-diagonal
kernel, its row sums and total), so a layer × layer matrix of HSICs is one matrix product of
flattened kernels: ``tr(K̃_a L̃_b) = vec(K̃_a) · vec(L̃_b)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from traindyn.probes._arrays import STAT_DTYPE, ArrayLike, as_features

DEFAULT_BANDWIDTH = 0.5
"""RBF bandwidth σ as a fraction of the median pairwise distance (Kornblith et al. use 0.2–0.8)."""


def features64(x: ArrayLike, name: str) -> torch.Tensor:
    """``(n, d)`` float64 features on the input's device (trailing axes flattened)."""
    t = as_features(x, name)
    if t.is_complex():
        raise TypeError(f"{name}: complex features are not supported")
    return t.to(STAT_DTYPE)


EPS64 = float(torch.finfo(torch.float64).eps)


def constant_tolerance(n: int) -> float:
    """Relative size below which centred features count as constant: ``8 ε (1 + log₂ n)``, a
    bound on the rounding error of centring ``n`` rows in float64 (ε the unit roundoff)."""
    import math

    return 8.0 * EPS64 * (1.0 + math.log2(max(n, 1)))


def pow2_factors(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two powers of two whose product ``2⁻ᵉ`` brings ``max |z|`` into ``[0.5, 1)`` (``e`` from
    ``frexp``), split in two so that neither overflows for subnormal inputs; ``(1, 1)`` for an
    all-zero or non-finite ``z``.  Multiplying by them is exact (decided on the device)."""
    m = z.abs().amax()
    _, e = torch.frexp(m)
    e = torch.where(torch.isfinite(m) & (m > 0), e, torch.zeros_like(e)).to(z.dtype)
    e1 = torch.floor(e / 2)
    return torch.exp2(-e1), torch.exp2(-(e - e1))


def _centre_rows(z: torch.Tensor) -> torch.Tensor:
    """Column-centred ``z``, the mean subtracted twice (the second pass removes the rounding
    error of the first, which matters for a large offset)."""
    zc = z - z.mean(0)
    return zc - zc.mean(0)


def unit_centred(z: torch.Tensor, factors: tuple[torch.Tensor, ...] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Column-centred ``z`` at a common scale, whether it is constant, and the scale used.

    Parameters
    ----------
    z : (n, d) float64 tensor
    factors : tuple of 0-d tensors, optional
        Multiply by these instead of choosing the scale from ``z`` (a streaming accumulator
        keeps the scale of a layer's first batch, so that the HSICs it averages share one
        scale).

    Returns
    -------
    zc : tensor
        ``(z − 1μᵀ)/‖z − 1μᵀ‖_F`` (without ``factors``; ``z`` itself is first scaled by a power
        of two so that its largest entry lies in ``[0.5, 1)``).  A constant ``z`` gives the
        centred residue at the power-of-two scale only (all zero or rounding-level).
    constant : 0-d bool tensor
        ``‖z − 1μᵀ‖_F ≤ 8 ε (1 + log₂ n) ‖z‖_F``: the rows differ by no more than the rounding
        error of centring them, judged against ``z``'s own size (not against another
        representation's).  False for non-finite ``z`` (that is reported separately).
    factors : tuple of 0-d tensors
        The multipliers applied, in order.
    """
    n = z.shape[0]
    if factors is None:
        p1, p2 = pow2_factors(z)
        zs = z * p1 * p2
        zc = _centre_rows(zs)
        nc = torch.linalg.vector_norm(zc)
        constant = nc <= constant_tolerance(n) * torch.linalg.vector_norm(zs)
        # a constant z keeps the power-of-two scale: 1/‖rounding residue‖ would be a
        # meaningless (huge) scale for the later batches of a streaming accumulator
        inv = torch.where((nc > 0) & ~constant, 1.0 / nc, torch.ones_like(nc))
        inv = torch.where(torch.isfinite(inv), inv, torch.ones_like(inv))
        factors = (p1, p2, inv)
        return zc * inv, constant, factors
    zs = z
    for f in factors:
        zs = zs * f
    zc = _centre_rows(zs)
    constant = (torch.linalg.vector_norm(zc)
                <= constant_tolerance(n) * torch.linalg.vector_norm(zs))
    return zc, constant, factors


def unit_centred_kernel(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``HKH/‖HKH‖_F`` for an ``n × n`` kernel (power-of-two prescaled, so that nothing
    overflows), and whether ``HKH`` vanishes against ``‖K‖_F`` (a kernel of constant
    features).  Both HSIC estimators are unchanged by ``K → HKH`` (the biased one by its
    definition, the unbiased one because it is invariant to shifts of the features)."""
    p1, p2 = pow2_factors(k)
    ks = k * p1 * p2
    kc = center(center(ks))
    nc = torch.linalg.vector_norm(kc)
    constant = nc <= constant_tolerance(k.shape[0]) * torch.linalg.vector_norm(ks)
    inv = torch.where(nc > 0, 1.0 / nc, torch.ones_like(nc))
    inv = torch.where(torch.isfinite(inv), inv, torch.ones_like(inv))
    return kc * inv, constant


def gram_linear(x: ArrayLike) -> torch.Tensor:
    """Linear kernel ``K = X Xᵀ`` (float64, ``n × n``)."""
    z = features64(x, "x")
    return z @ z.T


def _median(v: torch.Tensor) -> torch.Tensor:
    """Median of a 1-D tensor, the mean of the two middle values when the count is even (as
    ``numpy.median``; ``torch.median`` returns the lower one)."""
    m = v.numel()
    hi = torch.kthvalue(v, m // 2 + 1).values
    return hi if m % 2 else 0.5 * (hi + torch.kthvalue(v, m // 2).values)


def median_sq_distance(z: torch.Tensor, sq: torch.Tensor | None = None) -> torch.Tensor:
    """Median of the squared distances ``‖x_i − x_j‖²`` over the pairs ``i < j``."""
    sq = squared_distances(z) if sq is None else sq
    if z.shape[0] < 2:
        return sq.new_tensor(0.0)
    iu = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
    return _median(sq[iu[0], iu[1]])


def squared_distances(z: torch.Tensor) -> torch.Tensor:
    """``‖x_i − x_j‖²`` from the Gram matrix, clamped at zero, exact zeros on the diagonal."""
    g = z @ z.T
    d = torch.diagonal(g)
    sq = (d[:, None] + d[None, :] - 2.0 * g).clamp(min=0)
    sq.fill_diagonal_(0.0)
    return sq


def gram_rbf(x: ArrayLike, bandwidth: float = DEFAULT_BANDWIDTH) -> torch.Tensor:
    r"""RBF kernel ``K_ij = exp(−‖x_i − x_j‖² / (2σ²))`` with ``σ = bandwidth × median distance``.

    Kornblith, Norouzi, Lee & Hinton, "Similarity of neural network representations revisited",
    ICML 2019, Sec. 3 ("RBF CKA"), where σ is a fraction of the median distance between
    examples.  Convention here: σ² = bandwidth² × the median of the squared distances over the
    ``n(n−1)/2`` distinct pairs ``i < j`` (the mean of the two middle values for an even count;
    for an odd count this is exactly (bandwidth × median distance)²).  Kornblith et al.'s
    released code takes the median of the full ``n × n`` matrix of squared distances, zero
    diagonal included, which gives a slightly smaller σ.
    """
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be a positive fraction of the median distance; "
                         f"got {bandwidth}")
    z = features64(x, "x")
    p1, p2 = pow2_factors(z)
    # the kernel is unchanged by shifting or scaling z (σ follows the median distance): centre
    # and prescale so that the distances from the Gram matrix neither cancel nor overflow
    z = _centre_rows(z * p1 * p2)
    sq = squared_distances(z)
    sigma2 = bandwidth**2 * median_sq_distance(z, sq)
    # all points coincide (or nearly all), σ² = 0: every kernel entry is 1 — decided on the
    # features' device (an ``if`` here would make the host wait for it)
    return torch.where(sigma2 > 0, torch.exp(-sq / (2.0 * sigma2)), torch.ones_like(sq))


def kernel(x: ArrayLike, kind: str = "linear", bandwidth: float = DEFAULT_BANDWIDTH):
    """The ``n × n`` kernel of features ``x``: ``kind`` is ``"linear"`` or ``"rbf"``."""
    if kind == "linear":
        return gram_linear(x)
    if kind == "rbf":
        return gram_rbf(x, bandwidth)
    raise ValueError(f"kernel must be 'linear' or 'rbf'; got {kind!r}")


def center(k: torch.Tensor) -> torch.Tensor:
    """``H K H``: subtract row and column means, add back the grand mean."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """``tr(K H L H) / (n − 1)²`` (Gretton et al. 2005; Kornblith et al. 2019, Eq. 3)."""
    n = k.shape[0]
    return (center(k) * center(l)).sum() / (n - 1) ** 2


@dataclass
class KernelStats:
    """Zero-diagonal kernel ``K̃`` (flattened), its row sums ``K̃1`` and total ``1ᵀK̃1``."""

    flat: torch.Tensor
    rows: torch.Tensor
    total: torch.Tensor
    n: int

    @classmethod
    def of(cls, k: torch.Tensor) -> KernelStats:
        kt = k.clone()
        kt.fill_diagonal_(0.0)
        rows = kt.sum(1)
        return cls(kt.reshape(-1), rows, rows.sum(), k.shape[0])


def hsic_unbiased_stats(a: list[KernelStats], b: list[KernelStats]) -> torch.Tensor:
    """Matrix of unbiased HSICs (Song et al. 2012, Eq. 5) between every kernel of ``a`` and of
    ``b`` (same ``n ≥ 4``): one ``len(a) × len(b)`` float64 tensor."""
    n = a[0].n
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs n >= 4 samples; got n = {n}")
    fa, fb = torch.stack([s.flat for s in a]), torch.stack([s.flat for s in b])
    ra, rb = torch.stack([s.rows for s in a]), torch.stack([s.rows for s in b])
    ta, tb = torch.stack([s.total for s in a]), torch.stack([s.total for s in b])
    trace = fa @ fb.T
    return (trace + torch.outer(ta, tb) / ((n - 1) * (n - 2)) - 2.0 * (ra @ rb.T) / (n - 2)) / (
        n * (n - 3))


def hsic_biased_stats(ka: list[torch.Tensor], kb: list[torch.Tensor]) -> torch.Tensor:
    """Matrix of biased HSICs between the kernels of ``ka`` and ``kb`` (one product)."""
    n = ka[0].shape[0]
    ca = torch.stack([center(k).reshape(-1) for k in ka])
    cb = ca if kb is ka else torch.stack([center(k).reshape(-1) for k in kb])
    return (ca @ cb.T) / (n - 1) ** 2


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC of two ``n × n`` kernels (Song et al. 2012, Eq. 5), ``n ≥ 4``."""
    return hsic_unbiased_stats([KernelStats.of(k)], [KernelStats.of(l)])[0, 0]
