"""Array policy of the probes, in one place: torch, numpy or jax in; torch on the input's device.

Every probe converts its input with :func:`as_tensor`, so the computation runs on the device the
array already lives on (a CUDA jax array becomes a CUDA torch tensor through DLPack, without a
copy to the host).  Spectral statistics are accumulated in float64 (``STAT_DTYPE``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

STAT_DTYPE = torch.float64
"""dtype in which second-moment statistics are accumulated."""

ArrayLike = Any
"""A torch tensor, a numpy array, a jax array, or anything ``numpy.asarray`` accepts."""


def _is_jax_array(x: object) -> bool:
    return type(x).__module__.split(".")[0] in {"jax", "jaxlib"}


def as_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Convert ``x`` to a torch tensor on the device it already lives on.

    Parameters
    ----------
    x : torch.Tensor, numpy.ndarray, jax.Array or array-like
        Input array.  Torch tensors are detached (no autograd graph is kept).
    dtype : torch.dtype, optional
        Cast to this dtype after conversion.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif _is_jax_array(x):
        try:
            t = torch.from_dlpack(x)
        except (RuntimeError, TypeError, BufferError):  # pragma: no cover - old jax/torch
            t = torch.from_numpy(np.asarray(x).copy())
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(
                f"cannot convert an object array of type {type(x).__name__} to a tensor")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype is not None:
        t = t.to(dtype)
    return t


def as_features(x: ArrayLike, name: str = "features") -> torch.Tensor:
    """Return a 2-D (samples × features) tensor, flattening trailing axes of a batch.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions or no samples.
    """
    t = as_tensor(x)
    if t.ndim < 2:
        raise ValueError(f"{name} must be (n_samples, n_features); got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float32)
    return t


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry of ``t`` is finite (a host read: :func:`nonfinite_flag` keeps the
    answer on the device)."""
    return bool(torch.isfinite(t).all())


def nonfinite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-d boolean tensor on the tensors' device: some entry of ``tensors`` is NaN or
    infinite (not read: no host wait)."""
    finite = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        finite = finite & torch.isfinite(t).all()
    return ~finite


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, without a ``.to`` call when it is there already."""
    return t if t.device == device else t.to(device)


def check_finite(t: torch.Tensor, name: str, what: str = "") -> bool:
    """True when ``t`` is finite; otherwise warn (``RuntimeWarning`` naming ``name``) and
    return False, so that the caller returns NaN for what depends on it."""
    if all_finite(t):
        return True
    warnings.warn(f"{name} has non-finite entries (NaN or Inf){': ' + what if what else ''}",
                  RuntimeWarning, stacklevel=3)
    return False


def require_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` if it is finite, else ``ValueError`` naming ``name`` (for arguments whose
    non-finite values have no NaN answer: sizes, tolerances, targets of a fit)."""
    if not all_finite(t):
        raise ValueError(f"{name} must be finite; it has NaN or Inf entries")
    return t


def check_labels(labels: ArrayLike, n: int | None = None, name: str = "labels",
                 n_classes: int | None = None, device: torch.device | None = None
                 ) -> torch.Tensor:
    """Integer class labels as a 1-D ``torch.long`` tensor, validated.

    Raises ``TypeError`` for non-integer labels and ``ValueError`` (naming ``name``) for a
    shape other than ``(n,)``, for negative labels (PyTorch's ``ignore_index = -100``
    included: drop those samples before probing) and, with ``n_classes``, for labels
    ``>= n_classes``.
    """
    y = as_tensor(labels)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be integers; got dtype {y.dtype}")
    if n is not None and y.ndim > 1 and y.numel() == n and max(y.shape) == n:
        y = y.reshape(-1)
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise ValueError(f"{name} must have shape ({n if n is not None else 'n'},) to match "
                         f"the samples; got {tuple(y.shape)}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise ValueError(f"{name} must be class indices >= 0; got {lo}"
                             + (" (PyTorch's ignore_index: drop those samples first)"
                                if lo == -100 else ""))
        if n_classes is not None and hi >= n_classes:
            raise ValueError(f"{name} must be < {n_classes} (the number of classes / outputs);"
                             f" got {hi}")
    return y.to(device=device if device is not None else y.device, dtype=torch.long)


def warn_nan(reason: str) -> float:
    """Warn with ``reason`` and return NaN: the probes' answer to input they cannot measure."""
    warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return float("nan")
