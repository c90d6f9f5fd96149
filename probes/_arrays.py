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
    if t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float32)
    return t


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry of ``t`` is finite."""
    return bool(torch.isfinite(t).all())


def warn_nan(reason: str) -> float:
    """Warn with ``reason`` and return NaN: the probes' answer to input they cannot measure."""
    warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return float("nan")
