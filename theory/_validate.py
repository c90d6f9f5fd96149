"""Input checks shared by the public theory functions.

Every public function checks its arguments at the top with these helpers, so that bad input
gives a ``ValueError`` / ``TypeError`` whose message names the argument, never a finite wrong
value and never a silent NaN (traindyn's rule).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def float_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a float64 array; ``TypeError`` naming ``name`` if it is not real numbers.

    Booleans, integers and floats are accepted (converted exactly to float64 where
    representable); complex numbers, strings, objects and ``None`` are not.
    """
    if value is None:
        raise TypeError(f"{name} must be a real number or array of real numbers; got None")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nested sequences
        raise ValueError(f"{name} must be a rectangular array of real numbers ({err})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    return arr.astype(np.float64)


def real_scalar(value: Any, name: str) -> float:
    """``value`` as a Python float; ``TypeError`` naming ``name`` unless a real scalar."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number; got a bool")
    arr = float_array(value, name)
    if arr.ndim != 0:
        raise TypeError(f"{name} must be a scalar; got shape {arr.shape}")
    return float(arr)


def finite_scalar(value: Any, name: str) -> float:
    v = real_scalar(value, name)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v}")
    return v


def nonnegative_scalar(value: Any, name: str) -> float:
    v = finite_scalar(value, name)
    if v < 0:
        raise ValueError(f"{name} must be non-negative; got {v}")
    return v


def positive_scalar(value: Any, name: str) -> float:
    v = finite_scalar(value, name)
    if v <= 0:
        raise ValueError(f"{name} must be positive; got {v}")
    return v


def count(value: Any, name: str, minimum: int = 0) -> int:
    """An integer ``≥ minimum`` (Python or numpy integer, or an integral float)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer; got a bool")
    if isinstance(value, (numbers.Integral, np.integer)):
        v = int(value)
    elif isinstance(value, (numbers.Real, np.floating)) and np.isfinite(value) \
            and float(value).is_integer():
        v = int(value)
    else:
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if v < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {v}")
    return v


def finite_array(value: Any, name: str) -> np.ndarray:
    arr = float_array(value, name)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (it has NaN or inf entries)")
    return arr


def nonempty(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    return arr
