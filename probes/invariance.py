r"""Learned invariance and equivariance of representations, per layer.

Transformations ``g(x, θ)`` act on a batch ``x``; the built-in ones act on the trailing axes:

==========================  =================================================================
:func:`cyclic_shift`        integer roll along ``dims`` (an exact group action)
:func:`translate`           sub-pixel periodic translation by a Fourier phase shift
                            (band-limited interpolation; exact group action except the
                            Nyquist bin of even lengths, see the docstring)
:func:`rotate`              rotation of ``(…, H, W)`` images by ``angle`` radians about the
                            centre, bicubic (or bilinear) sampling with zeros outside (plain
                            tensor ops, so forward-mode AD goes through it)
:func:`flip`                reversal along ``dims`` when ``θ`` is true
:func:`permute`             a permutation of tokens or features along ``dim``
:func:`add_noise`           ``x + θ·ε``, ``ε`` standard normal from a seeded generator
==========================  =================================================================

Any callable ``g(x, θ) -> x'`` works in their place.

Scores, from representations ``f(x)`` and ``f(g·x)`` of the same ``n`` inputs:

:func:`invariance_distance`
    Speicher, Wang, Gummadi, Weller & Singla, "Understanding the role of invariance in transfer
    learning", TMLR 2024, Sec. 3 (and their code's README): the mean ℓ₂ distance between the
    representations of an input and of its transformed copy, divided by the mean ℓ₂ distance
    between representations of *different* inputs (here: all pairs ``i ≠ j`` of the untransformed
    batch).  0 = invariant; about 1 = the transformation moves a representation as far as
    changing the input does.
``invariance_cka``
    linear CKA between ``f(X)`` and ``f(g·X)`` (:func:`probes.similarity.linear_cka`).
:func:`equivariance_error`
    Lenc & Vedaldi, "Understanding image representations by measuring their equivariance and
    equivalence", CVPR 2015, Sec. 2: fit an affine map ``f(g·x) ≈ M f(x) + b`` by ridge
    regression on one split, report the held-out relative residual
    ``Σ‖f(g·x) − M f(x) − b‖² / Σ‖f(g·x) − mean f(g·x)‖²`` (= 1 − R² on the other split).
:func:`lie_derivative`, :func:`lie_derivative_error`
    Gruver, Finzi, Goldblum & Wilson, "The Lie derivative for measuring learned equivariance",
    ICLR 2023, Eq. 3: ``L f(x) = d/dθ [ρ_out(g_θ)⁻¹ f(g_θ·x)]`` at ``θ = 0``, by forward-mode
    differentiation (one JVP per batch).  Norm convention: the paper's Eq. 4 (and their
    ``layerwise_lee.py``), the *mean square* over samples and output components; their
    ``e2e_lee.py`` uses the mean absolute value instead (ngruver/lie-deriv issue #6), available
    as ``convention="mean_abs"``.

:class:`GroupAveraged` makes any model exactly invariant (or equivariant) over a finite group by
averaging (Puny, Atzmon, Ben-Hamu, Misra, Grover, Smith & Lipman, "Frame averaging for
invariant and equivariant network design", ICLR 2022, Eq. 1 with the frame = the whole group).

Model mode.  Every function here that runs the model runs it in **eval mode** — a score of
invariance must not measure Dropout's noise (an identity transform would score about 0.7 through
``Dropout(0.5)``), and a probe must not move BatchNorm's running statistics — and restores each
module's ``training`` flag and every buffer (bit for bit) afterwards (:func:`eval_mode`).

Representations are compared in float64 on the input's device.  Every score — and the decision
whether it is NaN, and why — is computed there too: the registered probes answer with a
:class:`probes._pending.Pending`, so that :meth:`probes.evaluation.ProbePlan.model_values`
reads the device once per evaluation for all of them; the public functions read
their pending at once.  The equivariance fit's ridge system is solved by
``torch.linalg.solve_ex`` without its host check (``torch.linalg.lstsq`` checks LAPACK's
``info`` on the host on CUDA); only ``ridge=0`` keeps ``lstsq`` and that wait (unmeasured: no
GPU in this project's tests).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.probes._arrays import STAT_DTYPE, ArrayLike, as_features, nonfinite_flag, on_device
from traindyn.probes._pending import Pending, gather, scalar
from traindyn.probes.capture import capture, resolve_layers
from traindyn.probes.similarity import as_pair, linear_cka_pending

__all__ = [
    "DEFAULT_GENERATORS",
    "DEFAULT_TRANSFORMS",
    "GENERATORS",
    "TRANSFORMS",
    "GroupAveraged",
    "add_noise",
    "cyclic_shift",
    "cyclic_shift_group",
    "equivariance_error",
    "eval_mode",
    "flip",
    "flip_group",
    "invariance_distance",
    "invariance_scores",
    "layer_features",
    "lie_derivative",
    "lie_derivative_error",
    "lie_derivative_probe",
    "lie_derivative_scores",
    "invariance_probe",
    "parse_transform",
    "register_probes",
    "permute",
    "rot90_group",
    "rotate",
    "translate",
]

Transform = Callable[[torch.Tensor, object], torch.Tensor]


# --------------------------------------------------------------------------- transformations
def _dims(dims: int | Sequence[int]) -> tuple[int, ...]:
    return (dims,) if isinstance(dims, int) else tuple(dims)


def cyclic_shift(x: torch.Tensor, shift: int | Sequence[int], dims: int | Sequence[int] = -1
                 ) -> torch.Tensor:
    """Roll ``x`` by integer ``shift`` along ``dims`` (``torch.roll``): ``(g·x)_i = x_{i−s}``."""
    dims = _dims(dims)
    shifts = (int(shift),) * len(dims) if isinstance(shift, (int, np.integer)) else tuple(
        int(s) for s in shift)
    return torch.roll(x, shifts, dims)


def translate(x: torch.Tensor, shift: float | torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Periodic sub-pixel translation along ``dim`` by a Fourier phase shift.

    ``(g_t·x)(m) = Re F⁻¹[e^{−2πi k t/N} F x](m)``: band-limited (trigonometric) interpolation
    of ``x(m − t)``.  Integer ``t`` equals :func:`cyclic_shift`.  The operator is real-linear
    and circulant, so it commutes with every circular convolution; ``g_s g_t = g_{s+t}``
    except on the Nyquist bin of an even length, which is scaled by ``cos(πt)`` (the real part
    of its phase), with zero derivative at ``t = 0``.  ``shift`` may be a (dual) tensor.
    """
    n = x.shape[dim]
    k = torch.fft.fftfreq(n, dtype=STAT_DTYPE if x.dtype == torch.float64 else torch.float32,
                          device=x.device)
    shape = [1] * x.ndim
    shape[dim] = n
    t = torch.as_tensor(shift, dtype=k.dtype, device=x.device) if not isinstance(
        shift, torch.Tensor) else shift.to(k.dtype)
    phase = torch.exp(-2j * math.pi * k.reshape(shape) * t)
    return torch.fft.ifft(torch.fft.fft(x, dim=dim) * phase, dim=dim).real.to(x.dtype)


def _keys_cubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = −1/2; Keys 1981, Eq. 15), C¹, 1 at 0, 0 at ±1, ±2."""
    t = t.abs()
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def rotate(x: torch.Tensor, angle: float | torch.Tensor, interpolation: str = "bicubic"
           ) -> torch.Tensor:
    """Rotate images ``(…, H, W)`` by ``angle`` radians, counter-clockwise as displayed (row 0
    on top), about the image centre, with zeros outside the image.

    Output pixel at centred position ``p`` takes the input at ``R(−angle) p`` (inverse
    mapping, as ``grid_sample(..., align_corners=True)``); ``rotate(x, π/2)`` equals
    ``torch.rot90(x, 1, (-2, -1))``.  Interpolation: ``"bicubic"`` (default; Keys' cubic
    convolution, a = −1/2, which is C¹, so its derivative in ``angle`` at 0 is the central
    difference of the image along the rotation's flow) or ``"bilinear"`` (not differentiable
    at the pixels: at ``angle = 0`` forward-mode AD returns a one-sided difference).  Written
    with elementary ops so forward-mode AD goes through it (``grid_sample`` has no forward-mode
    derivative in PyTorch).
    """
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear'; got {interpolation!r}")
    h, w = x.shape[-2], x.shape[-1]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    a = torch.as_tensor(angle, dtype=dtype, device=x.device) if not isinstance(
        angle, torch.Tensor) else angle.to(dtype)
    rows = torch.arange(h, dtype=dtype, device=x.device) - (h - 1) / 2
    cols = torch.arange(w, dtype=dtype, device=x.device) - (w - 1) / 2
    v, u = torch.meshgrid(-rows, cols, indexing="ij")  # u right, v up
    c, s = torch.cos(a), torch.sin(a)
    su, sv = c * u + s * v, -s * u + c * v  # R(-angle) (u, v)
    sc, sr = su + (w - 1) / 2, -sv + (h - 1) / 2  # back to (column, row)
    c0, r0 = torch.floor(sc.detach()), torch.floor(sr.detach())
    fc, fr = sc - c0, sr - r0
    if interpolation == "bilinear":
        taps = (0, 1)
        wr = {0: 1 - fr, 1: fr}
        wc = {0: 1 - fc, 1: fc}
    else:
        taps = (-1, 0, 1, 2)
        wr = {k: _keys_cubic(fr - k) for k in taps}
        wc = {k: _keys_cubic(fc - k) for k in taps}
    flat = x.reshape(*x.shape[:-2], h * w).to(fc.dtype)
    out = torch.zeros_like(flat)
    for dr in taps:
        for dc in taps:
            rr, cc = (r0 + dr).long(), (c0 + dc).long()
            valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            idx = (rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)).reshape(-1)
            out = out + flat[..., idx] * (wr[dr] * wc[dc] * valid).reshape(-1)
    return out.reshape(x.shape).to(dtype)


def flip(x: torch.Tensor, apply: object = True, dims: int | Sequence[int] = -1) -> torch.Tensor:
    """Reverse ``x`` along ``dims`` when ``apply`` is true (an element of the group Z₂)."""
    return torch.flip(x, _dims(dims)) if bool(apply) else x


def permute(x: torch.Tensor, perm: Sequence[int] | torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Reorder ``x`` along ``dim`` (tokens or features) by the permutation ``perm``."""
    p = torch.as_tensor(perm, dtype=torch.long)  # validated where it was made (the host)
    if sorted(p.tolist()) != list(range(x.shape[dim])):
        raise ValueError(f"perm must be a permutation of range({x.shape[dim]}); got "
                         f"{p.tolist()[:10]}…")
    return torch.index_select(x, dim, on_device(p, x.device))


def add_noise(x: torch.Tensor, sigma: float | torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x + σ ε`` with ``ε ~ N(0, 1)`` from a private generator seeded by ``seed`` (the same
    ε for every ``σ``, so ``σ`` is a continuous parameter)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    return x + sigma * eps


TRANSFORMS: dict[str, Transform] = {
    "cyclic_shift": cyclic_shift,
    "translate": translate,
    "rotate": rotate,
    "flip": flip,
    "permute": permute,
    "noise": add_noise,
}
"""Built-in transformations ``g(x, θ)`` by name."""


# --------------------------------------------------------------------------- scores of features
def _pair64(fx: ArrayLike, fgx: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_features(fx, "f_x").to(STAT_DTYPE), as_features(fgx, "f_gx").to(STAT_DTYPE)
    if a.shape != b.shape:
        raise ValueError(f"f_x and f_gx must have the same shape (the same inputs before and "
                         f"after the transformation); got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, on_device(b, a.device)


def _mean_pair_distance(z: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Mean of ``‖z_i − z_j‖`` over ordered pairs ``i ≠ j``: squared distances from float64
    inner products (``‖a‖² + ‖b‖² − 2a·b``, clamped at 0), in row blocks of ``chunk``."""
    n, total = z.shape[0], z.new_zeros(())
    sq = z.square().sum(1)
    for i in range(0, n, chunk):
        d2 = (sq[i:i + chunk, None] + sq[None, :] - 2.0 * z[i:i + chunk] @ z.T).clamp(min=0)
        total = total + d2.sqrt().sum() - d2.diagonal(offset=i).sqrt().sum()
    return total / (n * (n - 1))


def invariance_distance(fx: ArrayLike, fgx: ArrayLike) -> float:
    r"""Normalised invariance distance of Speicher et al. (TMLR 2024, Sec. 3):

    .. math:: d_{\rm inv} = \frac{\frac1n\sum_i\lVert f(g x_i) - f(x_i)\rVert_2}
              {\frac{1}{n(n-1)}\sum_{i\neq j}\lVert f(x_i) - f(x_j)\rVert_2}

    Parameters
    ----------
    fx, fgx : arrays of shape (n, d)
        Representations of inputs ``x_i`` and of their transformed copies ``g·x_i``.

    Returns
    -------
    float
        0 for an invariant representation.  NaN with a warning when the representation is
        constant over inputs (zero denominator) or not finite.
    """
    a, b = _pair64(fx, fgx)
    return _invariance_distance(a, b).result()


def _invariance_distance(a: torch.Tensor, b: torch.Tensor,
                         spread: torch.Tensor | None = None) -> Pending:
    """:func:`invariance_distance` of float64 ``a``, ``b`` computed on the device (NaN checks
    as device flags), as a :class:`~probes._pending.Pending`; ``spread`` is the mean pair
    distance of ``a`` when already known."""
    if a.shape[0] < 2:
        raise ValueError(f"invariance_distance needs n >= 2 inputs; got {a.shape[0]}")
    spread = _mean_pair_distance(a) if spread is None else spread
    return scalar(torch.linalg.norm(b - a, dim=1).mean() / spread, [
        (nonfinite_flag(a, b), "invariance distance: the representations are not finite"),
        (~(spread > 0), "invariance distance: the representation is constant over inputs")])


def equivariance_error(fx: ArrayLike, fgx: ArrayLike, fit_fraction: float = 0.5,
                       ridge: float = 1e-3, seed: int = 0) -> float:
    r"""Held-out residual of the best affine map ``f(g·x) ≈ M f(x) + b`` (Lenc & Vedaldi 2015).

    ``M, b`` minimise ``Σ_fit ‖f(g x_i) − M f(x_i) − b‖² + λ‖M‖_F²`` on a random
    ``fit_fraction`` of the inputs, with ``λ = ridge × tr(C)/d`` (``C`` the fit split's
    covariance of ``f(x)``: a relative ridge); the score on the other inputs is

    .. math:: e = \frac{\sum_{\rm test}\lVert f(gx_i) - M f(x_i) - b\rVert^2}
              {\sum_{\rm test}\lVert f(gx_i) - \overline{f(gx)}_{\rm test}\rVert^2}

    0 when some linear ``ρ(g)`` represents ``g`` on the layer (``f`` equivariant), about 1
    when ``f(x)`` tells nothing linear about ``f(g·x)``.  NaN with a warning for a constant
    transformed representation or non-finite values.
    """
    a, b = _pair64(fx, fgx)
    return _equivariance_error(a, b, fit_fraction, ridge, seed).result()


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``gram⁻¹ rhs`` for the ridge system ``gram = XᵀX + λI`` (or ``XXᵀ + λI``).

    With ``ridge > 0`` the system is positive definite unless ``X = 0`` (then ``λ = 0`` and
    ``gram = 0``), so an LU solve without a host check serves (``torch.linalg.lstsq`` on CUDA
    checks LAPACK's ``info`` on the host, a wait per transform and layer); where it reports
    ``gram = 0`` singular, the answer is the least-squares one, ``0``.  ``ridge = 0``: least
    squares (``gram`` may be singular)."""
    if ridge > 0:
        sol, info = torch.linalg.solve_ex(gram, rhs, check_errors=False)
        return torch.where(info != 0, torch.zeros((), dtype=sol.dtype, device=sol.device), sol)
    return torch.linalg.lstsq(gram, rhs).solution


def _equivariance_error(a: torch.Tensor, b: torch.Tensor, fit_fraction: float = 0.5,
                        ridge: float = 1e-3, seed: int = 0) -> Pending:
    """:func:`equivariance_error` of float64 ``a``, ``b`` computed on the device (the ridge
    ``λ`` a device scalar; NaN checks as device flags), as a
    :class:`~probes._pending.Pending`.  Non-finite representations are flagged, and the
    system solved is then made finite (its answer is discarded) so that the solver never
    sees NaN."""
    n = a.shape[0]
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1); got {fit_fraction}")
    n_fit = int(round(fit_fraction * n))
    if n_fit < 2 or n - n_fit < 2:
        raise ValueError(f"equivariance_error needs >= 2 inputs in each split; n = {n}")
    bad = nonfinite_flag(a, b)
    perm = on_device(torch.randperm(n, generator=torch.Generator().manual_seed(seed)), a.device)
    fit, test = perm[:n_fit], perm[n_fit:]
    ma, mb = a[fit].mean(0), b[fit].mean(0)
    xa, xb = a[fit] - ma, b[fit] - mb
    d = a.shape[1]
    if d <= n_fit:  # primal: (XᵀX + λI) M = XᵀY, a d × d system
        gram = xa.T @ xa
        lam = ridge * torch.diagonal(gram).sum() / d
        gram.diagonal().add_(lam)
        m = _ridge_solve(_finite_or_zero(gram), _finite_or_zero(xa.T @ xb), ridge)
    else:  # dual, same M: Xᵀ (XXᵀ + λI)⁻¹ Y, an n_fit × n_fit system
        gram = xa @ xa.T
        lam = ridge * torch.diagonal(gram).sum() / d
        gram.diagonal().add_(lam)
        m = xa.T @ _ridge_solve(_finite_or_zero(gram), _finite_or_zero(xb), ridge)
    pred = (a[test] - ma) @ m + mb
    resid = (b[test] - pred).square().sum()
    total = (b[test] - b[test].mean(0)).square().sum()
    return scalar(resid / total, [
        (bad, "equivariance error: the representations are not finite"),
        (~(total > 0), "equivariance error: the transformed representation is constant")])


# --------------------------------------------------------------------------- model helpers
@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block; afterwards every module's ``training``
    flag is what it was and every buffer holds its values from before, bit for bit (copied
    back in place, so references to the buffers stay valid)."""
    flags = [(m, m.training) for m in model.modules()]
    # inference tensors cannot be written outside inference mode, so they cannot change here
    saved = [(b, b.detach().clone()) for b in model.buffers() if not b.is_inference()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for b, value in saved:  # unconditionally: comparing first would wait for the device
                b.copy_(value)


def _model_device(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def layer_features(model: nn.Module, x: torch.Tensor, layers: str | Sequence[str] | None,
                   reduce: str = "flatten") -> dict[str, torch.Tensor]:
    """``{layer: (n, d)}`` outputs of ``layers`` for inputs ``x`` (``None``: the model's
    output, named ``"output"``), under ``torch.no_grad`` in the model's current mode (the
    scores below call it inside :func:`eval_mode`)."""
    with torch.no_grad():
        if layers is None:
            return {"output": model(x).reshape(x.shape[0], -1)}
        with capture(model, layers, reduce=reduce) as cap:
            model(x)
        return {name: cap[name].reshape(cap[name].shape[0], -1) for name in cap.layers}


def _bind(g: Transform, theta: object) -> Callable[[torch.Tensor], torch.Tensor]:
    return partial(_apply, g, theta)


def _apply(g: Transform, theta: object, x: torch.Tensor) -> torch.Tensor:
    return g(x, theta)


def invariance_scores(
    model: nn.Module,
    x: ArrayLike,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    | tuple[Transform, Sequence[object]],
    layers: str | Sequence[str] | None = None,
    dim: str = "transform",
    reduce: str = "flatten",
    equivariance: bool = True,
    fit_fraction: float = 0.5,
    ridge: float = 1e-3,
) -> xr.Dataset:
    """Per-layer invariance and equivariance of ``model`` under several transformations.

    Parameters
    ----------
    model : nn.Module
    x : array (n, …)
        Probe inputs (moved to the model's device).
    transforms : mapping ``{name: x -> g·x}`` or ``(g, thetas)``
        Either named callables of ``x`` alone (e.g. ``{"shift1": partial(cyclic_shift,
        shift=1)}``), giving a ``transform`` dimension, or a family ``g(x, θ)`` with the
        parameters to sweep, giving a dimension named ``dim`` (e.g. ``"angle"``) with the
        values ``θ`` as coordinate.
    layers : str or sequence of str, optional
        Module names or globs (``probes.capture``); ``None``: the model's output.
    reduce : str
        Token reduction of captured outputs (``probes.capture``).
    equivariance : bool
        Also compute :func:`equivariance_error` (a ridge regression per layer and transform).

    Returns
    -------
    xarray.Dataset
        ``invariance_distance``, ``invariance_cka`` and (optionally) ``equivariance_error``
        over ``(dim, layer)``.  The model runs in eval mode; its mode and buffers are restored
        (:func:`eval_mode`).
    """
    return _invariance_scores(model, x, transforms, layers, dim, reduce, equivariance,
                              fit_fraction, ridge).result()


def _invariance_scores(
    model: nn.Module,
    x: ArrayLike,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    | tuple[Transform, Sequence[object]],
    layers: str | Sequence[str] | None = None,
    dim: str = "transform",
    reduce: str = "flatten",
    equivariance: bool = True,
    fit_fraction: float = 0.5,
    ridge: float = 1e-3,
) -> Pending:
    """:func:`invariance_scores` computed on the device: a :class:`~probes._pending.Pending`
    whose ``finish`` decides each NaN (with its warning) and builds the Dataset, so that an
    evaluation reads the device once for every transform, layer and score."""
    device = _model_device(model)
    xt = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if device is not None:
        xt = on_device(xt, device)
    if isinstance(transforms, tuple):
        g, thetas = transforms
        names = list(thetas)
        funcs = [_bind(g, t) for t in thetas]
        coord = np.asarray([float(t) if np.ndim(t) == 0 else str(t) for t in thetas])
    else:
        names = list(transforms)
        funcs = [transforms[k] for k in names]
        coord = np.array(names, dtype=object)
    if not funcs:
        raise ValueError("transforms is empty: give at least one transformation")
    with eval_mode(model):
        clean = {k: v.to(STAT_DTYPE)
                 for k, v in layer_features(model, xt, layers, reduce).items()}
        moved_all = [layer_features(model, fn(xt), layers, reduce) for fn in funcs]
    layer_names = list(clean)
    spreads = {k: _mean_pair_distance(v) for k, v in clean.items()}  # NaN ones are flagged
    shape = (len(funcs), len(layer_names))
    parts: list[Pending] = []  # per (transform, layer): distance, CKA[, equivariance]
    for moved in moved_all:
        for name in layer_names:
            a, b = _pair64(clean[name], moved[name])
            parts.append(_invariance_distance(a, b, spreads[name]))
            parts.append(linear_cka_pending(*as_pair(clean[name], moved[name])))
            if equivariance:
                parts.append(_equivariance_error(a, b, fit_fraction, ridge))
    per_entry = 3 if equivariance else 2
    n_inputs = int(xt.shape[0])

    def build(values: list) -> xr.Dataset:
        table = np.asarray(values, dtype=float).reshape(*shape, per_entry)
        return _invariance_dataset(table, dim, coord, layer_names, n_inputs, reduce,
                                   equivariance, fit_fraction, ridge)

    return gather(parts, build)


def _invariance_dataset(table: np.ndarray, dim: str, coord: np.ndarray, layer_names: list,
                        n: int, reduce: str, equivariance: bool, fit_fraction: float,
                        ridge: float) -> xr.Dataset:
    """The Dataset of :func:`invariance_scores` from its ``(transform, layer, score)`` table."""
    dist, ckas = table[..., 0], table[..., 1]
    equi = table[..., 2] if equivariance else None
    data = {
        "invariance_distance": ((dim, "layer"), dist, {
            "long_name": "invariance distance, mean ||f(gx)-f(x)|| / mean ||f(x)-f(x')||",
            "units": "1"}),
        "invariance_cka": ((dim, "layer"), ckas, {
            "long_name": "linear CKA between f(X) and f(gX)", "units": "1"}),
    }
    if equivariance:
        data["equivariance_error"] = ((dim, "layer"), equi, {
            "long_name": "held-out relative residual of the best affine map f(gx) ~ M f(x) + b",
            "units": "1"})
    params = {"n": n, "reduce": reduce, "fit_fraction": fit_fraction,
              "ridge": ridge}
    return xr.Dataset(
        data, coords={dim: (dim, coord), "layer": ("layer", np.array(layer_names, dtype=object))},
        attrs={"source": "Speicher et al. (TMLR 2024) invariance distance; Kornblith et al. "
                         "(ICML 2019) linear CKA; Lenc & Vedaldi (CVPR 2015) equivariance",
               "parameters": json.dumps(params)})


# --------------------------------------------------------------------------- Lie derivative
def lie_derivative(
    model: nn.Module,
    x: ArrayLike,
    g: Transform,
    layers: str | Sequence[str] | None = None,
    rho_out: Mapping[str, Transform] | Transform | None = None,
    theta0: float = 0.0,
) -> dict[str, torch.Tensor]:
    r"""Lie derivative of each layer along the one-parameter transformation ``g(x, θ)``.

    .. math:: (L f)(x) = \frac{d}{d\theta}\Big[\rho_{\rm out}(g_\theta)^{-1}
              f(g_\theta\cdot x)\Big]_{\theta=\theta_0}

    Gruver, Finzi, Goldblum & Wilson (ICLR 2023), Eq. 3, computed by forward-mode automatic
    differentiation (``torch.autograd.forward_ad``): ``θ`` is made a dual number with tangent
    1 and the tangents of every hooked layer's output are read in one forward pass.

    Parameters
    ----------
    model : nn.Module
        Every op on the path must support forward-mode AD (linear, conv, pooling, pointwise
        activations, FFTs do; ``grid_sample`` does not — use :func:`rotate`).
    x : array (n, …)
    g : callable ``(x, θ) -> g_θ·x``
        With ``g(x, θ₀) = x`` (the identity at ``θ₀``).
    layers : str or sequence of str, optional
        ``None``: the model's output (named ``"output"``).
    rho_out : callable ``(y, θ) -> ρ_out(g_θ)⁻¹ y`` or ``{layer: callable}``, optional
        How the transformation acts back on a layer's output; ``None`` = trivially
        (invariance: ``L f = d f(g_θ x)/dθ``).

    Returns
    -------
    dict
        ``{layer: (n, d_layer) float64 tensor}`` of Lie derivatives, flattened per sample.
        The model runs in eval mode, its mode and buffers restored (:func:`eval_mode`).
        A layer that no tangent reaches — its output was computed outside forward-mode AD
        (``detach()``, a round trip through numpy, ``torch.no_grad`` inside the model, an
        integer op), or ``g`` itself carries no tangent — gets NaN with a ``RuntimeWarning``:
        its derivative is unknown, not zero.
    """
    import torch.autograd.forward_ad as fwad

    device = _model_device(model)
    xt = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()
    if device is not None:
        xt = on_device(xt, device)
    names = ["output"] if layers is None else list(resolve_layers(model, layers))
    modules = {} if layers is None else resolve_layers(model, layers)
    dtype = xt.dtype if xt.is_floating_point() else torch.float32
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: object, output: object) -> None:
            outputs[name] = output if isinstance(output, torch.Tensor) else output[0]
        return fn

    missing: list[str] = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(hook(name)))
        with eval_mode(model), fwad.dual_level():
            theta = fwad.make_dual(torch.tensor(theta0, dtype=dtype, device=xt.device),
                                   torch.tensor(1.0, dtype=dtype, device=xt.device))
            moved = g(xt, theta)
            input_tangent = (isinstance(moved, torch.Tensor)
                             and fwad.unpack_dual(moved).tangent is not None)
            out = model(moved)
            if layers is None:
                outputs["output"] = out
            result = {}
            for name in names:
                y = outputs[name]
                act = rho_out.get(name) if isinstance(rho_out, Mapping) else rho_out
                if act is not None:
                    y = act(y, theta)
                primal, tangent = fwad.unpack_dual(y)
                if tangent is None:  # no tangent reached the layer: its derivative is unknown
                    missing.append(name)
                    tangent = torch.full_like(primal, float("nan"))
                result[name] = tangent.detach().reshape(xt.shape[0], -1).to(STAT_DTYPE)
    finally:
        for h in handles:
            h.remove()
    if missing:
        why = ("the transformed input g(x, θ) carries no tangent: g does not depend on θ "
               "through torch operations (numpy, detach(), or constant in θ)"
               if not input_tangent else
               "their outputs were computed outside forward-mode AD (detach(), a round trip "
               "through numpy, torch.no_grad inside the model, an integer op) or do not "
               "depend on the input")
        warnings.warn(f"Lie derivative: no tangent reached layers {missing}, so their Lie "
                      f"derivative is unknown (not zero) and is NaN: {why}", RuntimeWarning,
                      stacklevel=2)
    return result


def lie_derivative_error(lie: ArrayLike, convention: str = "mean_square") -> float:
    """Summary of Lie derivatives ``(n, d)`` as one number.

    ``"mean_square"`` (default): ``mean_{i,k} (L f)_{ik}²``, Gruver et al. (ICLR 2023), Eq. 4,
    and their ``layerwise_lee.py``.  ``"mean_abs"``: ``mean_{i,k} |(L f)_{ik}|``, their
    ``e2e_lee.py`` (ngruver/lie-deriv issue #6).  ``"rms_norm"``: ``√(mean_i ‖(L f)_i‖²)``,
    per-sample Euclidean norm (not width-normalised).
    """
    return _lie_derivative_error(as_features(lie, "lie").to(STAT_DTYPE), convention).result()


def _lie_derivative_error(t: torch.Tensor, convention: str = "mean_square") -> Pending:
    """:func:`lie_derivative_error` of the float64 ``(n, d)`` tensor ``t``, computed on the
    device, as a :class:`~probes._pending.Pending` (NaN + warning for non-finite values)."""
    if convention == "mean_square":
        value = t.square().mean()
    elif convention == "mean_abs":
        value = t.abs().mean()
    elif convention == "rms_norm":
        value = t.square().sum(1).mean().sqrt()
    else:
        raise ValueError(f"convention must be 'mean_square', 'mean_abs' or 'rms_norm'; "
                         f"got {convention!r}")
    return scalar(value, [(nonfinite_flag(t), "Lie derivative: values are not finite")])


def lie_derivative_scores(
    model: nn.Module, x: ArrayLike, generators: Mapping[str, Transform],
    layers: str | Sequence[str] | None = None, convention: str = "mean_square",
) -> xr.Dataset:
    """:func:`lie_derivative_error` per ``(generator, layer)`` for named one-parameter
    transformations ``{name: g(x, θ)}`` (each the identity at ``θ = 0``)."""
    return _lie_derivative_scores(model, x, generators, layers, convention).result()


def _lie_derivative_scores(
    model: nn.Module, x: ArrayLike, generators: Mapping[str, Transform],
    layers: str | Sequence[str] | None = None, convention: str = "mean_square",
) -> Pending:
    """:func:`lie_derivative_scores` computed on the device: a
    :class:`~probes._pending.Pending` whose ``finish`` builds the Dataset."""
    names = list(generators)
    parts: list[Pending] = []
    layer_names: list[str] = []
    for name in names:
        lie = lie_derivative(model, x, generators[name], layers)
        layer_names = list(lie)
        parts.extend(_lie_derivative_error(as_features(lie[k], "lie").to(STAT_DTYPE), convention)
                     for k in layer_names)

    def build(values: list) -> xr.Dataset:
        return _lie_dataset(np.asarray(values, dtype=float).reshape(len(names), len(layer_names)),
                            names, layer_names, convention)

    return gather(parts, build)


def _lie_dataset(values: np.ndarray, names: list, layer_names: list, convention: str
                 ) -> xr.Dataset:
    """The Dataset of :func:`lie_derivative_scores` from its ``(generator, layer)`` values."""
    return xr.Dataset(
        {"lie_derivative": (("generator", "layer"), values, {
            "long_name": f"Lie derivative error ({convention})", "units": "1"})},
        coords={"generator": ("generator", np.array(names, dtype=object)),
                "layer": ("layer", np.array(layer_names, dtype=object))},
        attrs={"source": "Gruver, Finzi, Goldblum, Wilson (ICLR 2023), Eq. 3-4",
               "parameters": json.dumps({"convention": convention})})


# --------------------------------------------------------------------------- group averaging
class GroupAveraged(nn.Module):
    r"""Average a model over a finite group: exactly invariant (or equivariant) by construction.

    .. math:: \langle f\rangle(x) = \frac{1}{|G|}\sum_{g\in G}\rho_{\rm out}(g)^{-1} f(g\cdot x)

    Puny et al. (ICLR 2022), Eq. 1 with the frame ``F(x) = G`` (group averaging; Yarotsky
    2022).  For any ``h ∈ G``, ``⟨f⟩(h·x) = ⟨f⟩(x)`` when ``ρ_out`` is trivial, since
    ``g ↦ gh`` permutes the group; the only error left is floating-point round-off of the sum.

    Parameters
    ----------
    model : nn.Module
    actions : sequence of callables ``x -> g·x``
        Every element of the group (it must be closed under composition; see
        :func:`cyclic_shift_group`, :func:`rot90_group`, :func:`flip_group`).
    output_actions : sequence of callables ``y -> ρ_out(g)⁻¹ y``, optional
        One per element, for an equivariant average; ``None``: invariant.
    """

    def __init__(self, model: nn.Module, actions: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 output_actions: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None
                 ) -> None:
        super().__init__()
        if not actions:
            raise ValueError("actions is empty: give every element of the group")
        if output_actions is not None and len(output_actions) != len(actions):
            raise ValueError(f"output_actions has {len(output_actions)} elements; actions has "
                             f"{len(actions)}")
        self.model = model
        self.actions = list(actions)
        self.output_actions = None if output_actions is None else list(output_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for i, act in enumerate(self.actions):
            y = self.model(act(x))
            if self.output_actions is not None:
                y = self.output_actions[i](y)
            total = y if total is None else total + y
        return total / len(self.actions)


def cyclic_shift_group(size: int, dims: int | Sequence[int] = -1) -> list[Callable]:
    """All ``size`` cyclic shifts along one axis (or ``size²`` along two axes of equal length)."""
    dims = _dims(dims)
    if len(dims) == 1:
        return [partial(cyclic_shift, shift=k, dims=dims) for k in range(size)]
    return [partial(cyclic_shift, shift=(i, j), dims=dims)
            for i in range(size) for j in range(size)]


def rot90_group(dims: tuple[int, int] = (-2, -1)) -> list[Callable]:
    """The four rotations by multiples of 90° of square images (exact, no interpolation)."""
    return [partial(torch.rot90, k=k, dims=dims) for k in range(4)]


def flip_group(dims: int | Sequence[int] = -1) -> list[Callable]:
    """Identity and reversal along ``dims`` (Z₂)."""
    return [partial(flip, apply=False, dims=dims), partial(flip, apply=True, dims=dims)]


# --------------------------------------------------------------------------- probe contract
def _std(x: torch.Tensor) -> torch.Tensor:
    """The standard deviation of ``x`` as a float64 0-d tensor on ``x``'s device (not read:
    a noise scale made from it stays on the device)."""
    return x.double().std()


def parse_transform(spec: str, x: torch.Tensor | None = None
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transformation ``x -> g·x`` from a short text spec (for probe parameters and the CLI).

    ``"shift:k"`` cyclic shift by ``k`` along the last axis (``"shift_y:k"``: the one before);
    ``"translate:t"`` Fourier sub-pixel translation by ``t`` along the last axis;
    ``"rotate:deg"`` rotation by ``deg`` degrees of the last two axes (bicubic);
    ``"flip"`` reversal of the last axis; ``"permute:seed"`` a random permutation of the last
    axis drawn with ``seed``; ``"noise:s"`` additive Gaussian noise of standard deviation
    ``s × std(x)`` (``x`` the probe inputs; seed 0).
    """
    name, _, arg = spec.partition(":")
    try:
        value = float(arg) if arg else None
    except ValueError:
        raise ValueError(f"transform {spec!r}: {arg!r} is not a number") from None
    if name in ("shift", "shift_y"):
        return partial(cyclic_shift, shift=int(value if value is not None else 1),
                       dims=-1 if name == "shift" else -2)
    if name == "translate":
        return partial(translate, shift=0.5 if value is None else value)
    if name == "rotate":
        return partial(rotate, angle=math.radians(15.0 if value is None else value))
    if name == "flip":
        return partial(flip, apply=True)
    if name == "permute":
        seed = int(value or 0)

        def perm(z: torch.Tensor) -> torch.Tensor:
            p = torch.randperm(z.shape[-1], generator=torch.Generator().manual_seed(seed))
            return permute(z, p)

        return perm
    if name == "noise":
        scale = (0.1 if value is None else value) * (1.0 if x is None else _std(x))
        return partial(add_noise, sigma=scale)
    raise ValueError(f"unknown transform {spec!r}; use shift:k, shift_y:k, translate:t, "
                     "rotate:deg, flip, permute:seed or noise:s")


def _translate_y(x: torch.Tensor, t: object) -> torch.Tensor:
    return translate(x, t, dim=-2)


GENERATORS: dict[str, Transform] = {"translate": translate, "translate_y": _translate_y,
                                    "rotate": rotate, "noise": add_noise}
"""One-parameter transformations (identity at θ = 0) for the ``lie_derivative`` probe."""


DEFAULT_TRANSFORMS = ("shift:1", "noise:0.1")
DEFAULT_GENERATORS = ("translate",)


def invariance_probe(model: nn.Module, inputs: ArrayLike, targets: object = None,
                     layers: Sequence[str] | None = None,
                     transforms: Sequence[str] = DEFAULT_TRANSFORMS, reduce: str = "flatten",
                     equivariance: bool = True) -> xr.Dataset:
    """The ``invariance`` model probe: :func:`invariance_scores` for text-specified transforms
    (:func:`parse_transform`) over ``(transform, layer)``; ``layers=None`` uses the output."""
    return _invariance_probe(model, inputs, targets, layers, transforms, reduce,
                             equivariance).result()


def _invariance_probe(model: nn.Module, inputs: ArrayLike, targets: object = None,
                      layers: Sequence[str] | None = None,
                      transforms: Sequence[str] = DEFAULT_TRANSFORMS, reduce: str = "flatten",
                      equivariance: bool = True) -> Pending:
    """:func:`invariance_probe` as a :class:`~probes._pending.Pending` (the registered probe:
    :meth:`probes.evaluation.ProbePlan.model_values` reads all model probes at once)."""
    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    funcs = {spec: parse_transform(spec, x) for spec in transforms}
    return _invariance_scores(model, x, funcs, layers, reduce=reduce, equivariance=equivariance)


def lie_derivative_probe(model: nn.Module, inputs: ArrayLike, targets: object = None,
                         layers: Sequence[str] | None = None,
                         generators: Sequence[str] = DEFAULT_GENERATORS,
                         convention: str = "mean_square") -> xr.Dataset:
    """The ``lie_derivative`` model probe: :func:`lie_derivative_scores` for generators named
    in :data:`GENERATORS` over ``(generator, layer)``."""
    return _lie_derivative_probe(model, inputs, targets, layers, generators,
                                 convention).result()


def _lie_derivative_probe(model: nn.Module, inputs: ArrayLike, targets: object = None,
                          layers: Sequence[str] | None = None,
                          generators: Sequence[str] = DEFAULT_GENERATORS,
                          convention: str = "mean_square") -> Pending:
    """:func:`lie_derivative_probe` as a :class:`~probes._pending.Pending` (the registered
    probe)."""
    unknown = [g for g in generators if g not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown generators {unknown}; available: {list(GENERATORS)}")
    gens = {g: GENERATORS[g] for g in generators}
    return _lie_derivative_scores(model, inputs, gens, layers, convention)


def register_probes() -> None:
    """Register the ``invariance`` and ``lie_derivative`` model probes (idempotent).

    Both run forward passes of the model on transformed probe inputs and capture ``layers``
    themselves (``probe_kwargs={"invariance": {"layers": [...], "transforms": [...]}}``);
    give them the same ``layers`` as the monitor or analysis so the ``layer`` dims agree.
    """
    from traindyn.probes.registry import Probe, Variable, register

    dims = ("transform", "layer")
    register(Probe(
        "invariance", "model",
        {"invariance_distance": Variable(
            "invariance distance, mean ||f(gx)-f(x)|| / mean ||f(x)-f(x')||", "1", dims),
         "invariance_cka": Variable("linear CKA between f(X) and f(gX)", "1", dims),
         "equivariance_error": Variable(
             "held-out relative residual of the best affine map f(gx) ~ M f(x) + b", "1",
             dims)},
        source="Speicher et al. (TMLR 2024); Kornblith et al. (ICML 2019); Lenc & Vedaldi "
               "(CVPR 2015)", fn=_invariance_probe))
    register(Probe(
        "lie_derivative", "model",
        {"lie_derivative": Variable("Lie derivative error, mean square over samples and units",
                                    "1", ("generator", "layer"))},
        source="Gruver, Finzi, Goldblum, Wilson (ICLR 2023), Eq. 3-4", fn=_lie_derivative_probe))


register_probes()
