"""traindyn.theory — closed-form, random-feature, kernel and mean-field predictions.

Pure functions: numpy / scipy / jax / sympy in, ``xarray.Dataset`` out, named like the
measurements they are compared with.  No torch, no I/O.
"""

__version__ = "0.1.0"

from theory.linear import (  # noqa: E402
    advani_saxe,
    advani_saxe_asymptote,
    marchenko_pastur_density,
    marchenko_pastur_quadrature,
)

__all__ = [
    "__version__",
    "advani_saxe",
    "advani_saxe_asymptote",
    "marchenko_pastur_density",
    "marchenko_pastur_quadrature",
]
