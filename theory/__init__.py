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
===================  ==========================================================================
"""

__version__ = "0.1.0"

from theory.deep_linear import (  # noqa: E402
    half_rise_time,
    mode_strength,
    saxe_dynamics,
    strength_equation,
    time_to_strength,
    two_layer_solution,
)
from theory.kernels import Spectrum, krr_learning_curve, power_law_spectrum, solve_kappa  # noqa: E402
from theory.linear import (  # noqa: E402
    advani_saxe,
    advani_saxe_asymptote,
    marchenko_pastur_density,
    marchenko_pastur_quadrature,
)
from theory.neural_collapse import (  # noqa: E402
    balanced_collapse,
    collapse_metrics,
    imbalanced_collapse,
    minority_collapse_threshold,
    simplex_etf,
)
from theory.random_features import (  # noqa: E402
    optimal_ridge,
    power_law_optimal_fitting_ratio,
    rf_errors,
    rf_learning_curve,
)
from theory.scaling import fit_power_law, predicted_exponents, scaling_regimes  # noqa: E402
from theory.spectra import empirical_spectrum, spectrum_from_gram  # noqa: E402

__all__ = [
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
    "krr_learning_curve",
    "marchenko_pastur_density",
    "marchenko_pastur_quadrature",
    "minority_collapse_threshold",
    "mode_strength",
    "optimal_ridge",
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
