"""traindyn.theory — closed-form, random-feature, kernel and mean-field predictions.

Pure functions: numpy / scipy / jax / sympy in, ``xarray.Dataset`` out, named like the
measurements they are compared with.  No torch, no I/O.

===================  ==========================================================================
module               what
===================  ==========================================================================
``linear``           Marchenko–Pastur; Advani & Saxe (2017) train/test error over time
``kernels``          kernel ridge regression learning curves (eigenlearning)
``random_features``  random-feature ridge regression ("More is Better", 2023)
``scaling``          scaling regimes (Bahri et al. 2021) and exponent fits
``spectra``          empirical kernel spectra and target coefficients from data
``deep_linear``      Saxe, McClelland & Ganguli (2014) mode dynamics, derived with sympy
``neural_collapse``  simplex ETF and imbalanced (Dang et al. 2023) collapse geometry
``dmft``             two-layer DMFT solver, lazy → rich (Bordelon & Pehlevan 2022; jax)
``kernel_flow``      training under a fixed (measured) kernel: GD / flow, MSE / cross-entropy
===================  ==========================================================================

The kernel, random-feature, scaling and Advani–Saxe predictions also run on a jax device
(``backend="jax"`` and/or ``device="gpu"``; float64, equal to numpy to ~1e-14 relative; see
``theory._backend``).  Every public function checks its arguments: bad input raises a
``ValueError`` / ``TypeError`` naming the argument, or gives NaN with a warning.

``import theory`` is light: the submodules are imported on first use of one of their names
(PEP 562 module ``__getattr__``), so ``import theory`` loads neither sympy nor jax, and never
torch.  ``from theory import X`` and ``theory.X`` work for every name in ``__all__``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "half_rise_time": "deep_linear",
    "mode_strength": "deep_linear",
    "saxe_dynamics": "deep_linear",
    "strength_equation": "deep_linear",
    "time_to_strength": "deep_linear",
    "two_layer_solution": "deep_linear",
    "Spectrum": "kernels",
    "krr_learning_curve": "kernels",
    "power_law_spectrum": "kernels",
    "solve_kappa": "kernels",
    "advani_saxe": "linear",
    "advani_saxe_asymptote": "linear",
    "marchenko_pastur_density": "linear",
    "marchenko_pastur_quadrature": "linear",
    "balanced_collapse": "neural_collapse",
    "collapse_metrics": "neural_collapse",
    "imbalanced_collapse": "neural_collapse",
    "minority_collapse_threshold": "neural_collapse",
    "simplex_etf": "neural_collapse",
    "optimal_ridge": "random_features",
    "power_law_optimal_fitting_ratio": "random_features",
    "rf_errors": "random_features",
    "rf_learning_curve": "random_features",
    "fit_power_law": "scaling",
    "predicted_exponents": "scaling",
    "scaling_regimes": "scaling",
    "empirical_spectrum": "spectra",
    "spectrum_from_gram": "spectra",
    "dmft_two_layer": "dmft",
    "initial_kernels": "dmft",
    "DMFTConvergenceWarning": "dmft",
    "DMFTStepWarning": "dmft",
    "kernel_flow": "kernel_flow",
    "kernel_flow_limit": "kernel_flow",
    "lazy_grokking": "grokking",
    "polynomial_network_kernel": "grokking",
    "rich_grokking": "grokking",
}

_SUBMODULES = ("deep_linear", "dmft", "grokking", "kernel_flow", "kernels", "linear",
               "neural_collapse", "random_features", "scaling", "spectra")

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from traindyn.theory.deep_linear import (
        half_rise_time,
        mode_strength,
        saxe_dynamics,
        strength_equation,
        time_to_strength,
        two_layer_solution,
    )
    from traindyn.theory.dmft import (
        DMFTConvergenceWarning,
        DMFTStepWarning,
        dmft_two_layer,
        initial_kernels,
    )
    from traindyn.theory.grokking import lazy_grokking, polynomial_network_kernel, rich_grokking
    from traindyn.theory.kernel_flow import kernel_flow, kernel_flow_limit
    from traindyn.theory.kernels import (
        Spectrum,
        krr_learning_curve,
        power_law_spectrum,
        solve_kappa,
    )
    from traindyn.theory.linear import (
        advani_saxe,
        advani_saxe_asymptote,
        marchenko_pastur_density,
        marchenko_pastur_quadrature,
    )
    from traindyn.theory.neural_collapse import (
        balanced_collapse,
        collapse_metrics,
        imbalanced_collapse,
        minority_collapse_threshold,
        simplex_etf,
    )
    from traindyn.theory.random_features import (
        optimal_ridge,
        power_law_optimal_fitting_ratio,
        rf_errors,
        rf_learning_curve,
    )
    from traindyn.theory.scaling import fit_power_law, predicted_exponents, scaling_regimes
    from traindyn.theory.spectra import empirical_spectrum, spectrum_from_gram


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"traindyn.theory.{module}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        try:
            return importlib.import_module(f"traindyn.theory.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"traindyn.theory.{name}":
                raise
    raise AttributeError(f"module 'theory' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "DMFTConvergenceWarning",
    "DMFTStepWarning",
    "dmft_two_layer",
    "initial_kernels",
    "Spectrum",
    "__version__",
    "advani_saxe",
    "advani_saxe_asymptote",
    "balanced_collapse",
    "collapse_metrics",
    "empirical_spectrum",
    "fit_power_law",
    "half_rise_time",
    "imbalanced_collapse",
    "kernel_flow",
    "kernel_flow_limit",
    "krr_learning_curve",
    "lazy_grokking",
    "marchenko_pastur_density",
    "marchenko_pastur_quadrature",
    "minority_collapse_threshold",
    "mode_strength",
    "optimal_ridge",
    "polynomial_network_kernel",
    "rich_grokking",
    "power_law_optimal_fitting_ratio",
    "power_law_spectrum",
    "predicted_exponents",
    "rf_errors",
    "rf_learning_curve",
    "saxe_dynamics",
    "scaling_regimes",
    "simplex_etf",
    "solve_kappa",
    "spectrum_from_gram",
    "strength_equation",
    "time_to_strength",
    "two_layer_solution",
]


class _Package(types.ModuleType):
    """``theory`` itself: a submodule named like the function it exports
    (``theory.kernel_flow``) must not replace that function when it is imported (the import
    system sets the submodule as an attribute of the package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name
                and value.__name__ == f"traindyn.theory.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
