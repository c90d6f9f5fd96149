"""traindyn.probes — measurements of what a network has learned.

Pure metric functions over arrays (torch, numpy or jax; computed on the array's device), their
streaming accumulators, and the forward-hook capture that feeds them from a model.
"""

from probes.capture import REDUCTIONS, capture, module_names, reduce_tokens, resolve_layers
from probes.registry import FEATURE_PROBES, get_feature_probe, register_feature_probe
from probes.spectral import (
    PowerLawFit,
    SpectrumAccumulator,
    alpha_req,
    alpha_req_fit,
    covariance_spectrum,
    power_law_fit,
    rankme,
    rankme_covariance,
    rankme_from_spectrum,
    singular_values,
)

__all__ = [
    "FEATURE_PROBES",
    "REDUCTIONS",
    "PowerLawFit",
    "SpectrumAccumulator",
    "alpha_req",
    "alpha_req_fit",
    "capture",
    "covariance_spectrum",
    "get_feature_probe",
    "module_names",
    "power_law_fit",
    "rankme",
    "rankme_covariance",
    "rankme_from_spectrum",
    "reduce_tokens",
    "register_feature_probe",
    "resolve_layers",
    "singular_values",
]
