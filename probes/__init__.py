"""traindyn.probes — measurements of what a network has learned.

Pure metric functions over arrays (torch, numpy or jax; computed on the array's device), their
streaming accumulators, and the forward-hook capture that feeds them from a model.

===================  ==========================================================================
module               what
===================  ==========================================================================
``spectral``         RankMe (both variants), alpha-ReQ, effective ranks; streaming metrics
``collapse``         neural collapse NC1–NC4 and CDNV; streaming statistics
``weights``          weight-matrix spectra and a guarded heavy-tail exponent
``phases``           geometric phase labels from RankMe / alpha-ReQ trajectories
``ntk``              empirical NTK (jacobian / ntk_vp / structured), conjugate kernel
``ntk_jax``          the empirical NTK of a JAX function ``f(params, x)`` (import it directly)
``kernels``          kernel–target alignment, centred alignment, kernel distance and velocity
``inductive_bias``   exact inductive-bias estimator (bits)
``instability``      attention-logit growth, output-logit divergence, LR sensitivity
``similarity``       CKA (linear, RBF, debiased), Procrustes distance, streaming minibatch CKA
``invariance``       invariance / equivariance per layer, Lie derivative, group averaging
``readout``          linear (ridge, logistic) and kNN readouts, alignment / uniformity, per-class
                     RankMe
``capture``          forward hooks: which modules, token reduction, streaming into accumulators
``registry``         the probe contract: declarations, registration, lookup
``evaluation``       evaluate a set of probes (shared accumulators, references)
===================  ==========================================================================
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS: dict[str, str] = {
    # probes.capture
    "CALLS": "capture",
    "REDUCTIONS": "capture",
    "capture": "capture",
    "module_names": "capture",
    "reduce_tokens": "capture",
    "resolve_layers": "capture",
    "stream_features": "capture",
    # probes.collapse
    "CollapseAccumulator": "collapse",
    "neural_collapse": "collapse",
    # probes.inductive_bias
    "inductive_bias": "inductive_bias",
    "kernel_hypothesis_errors": "inductive_bias",
    "network_hypothesis_errors": "inductive_bias",
    # probes.instability
    "attention_logit_stats": "instability",
    "log_partition": "instability",
    "lr_sensitivity": "instability",
    "max_attention_logit": "instability",
    # probes.kernels
    "center_kernel": "kernels",
    "centered_alignment": "kernels",
    "cumulative_power": "kernels",
    "kernel_alignment": "kernels",
    "kernel_distance": "kernels",
    "kernel_velocity": "kernels",
    "lazy_rich_summary": "kernels",
    "ntk_effective_rank": "kernels",
    "relative_kernel_change": "kernels",
    # probes.ntk
    "NTKProbe": "ntk_probe",
    "batch_coupled_modules": "ntk",
    "conjugate_kernel": "ntk",
    "empirical_ntk": "ntk",
    # probes.phases
    "geometric_phases": "phases",
    "phase_segments": "phases",
    # probes.spectral
    "AlphaReQ": "spectral",
    "EffectiveRank": "spectral",
    "ParticipationRatio": "spectral",
    "PowerLawFit": "spectral",
    "RankMe": "spectral",
    "SpectralMetrics": "spectral",
    "SpectrumAccumulator": "spectral",
    "StableRank": "spectral",
    "alpha_req": "spectral",
    "alpha_req_fit": "spectral",
    "covariance_spectrum": "spectral",
    "effective_rank": "spectral",
    "participation_ratio": "spectral",
    "power_law_fit": "spectral",
    "rankme": "spectral",
    "rankme_covariance": "spectral",
    "rankme_from_spectrum": "spectral",
    "singular_values": "spectral",
    "stable_rank": "spectral",
    # probes.similarity
    "MinibatchCKA": "similarity",
    "checkpoint_cka": "similarity",
    "cka": "similarity",
    "cka_matrix": "similarity",
    "debiased_cka": "similarity",
    "linear_cka": "similarity",
    "minibatch_cka": "similarity",
    "procrustes_distance": "similarity",
    "rbf_cka": "similarity",
    # probes.invariance
    "GroupAveraged": "invariance",
    "equivariance_error": "invariance",
    "invariance_distance": "invariance",
    "invariance_scores": "invariance",
    "lie_derivative": "invariance",
    "lie_derivative_scores": "invariance",
    # probes.readout
    "ReadoutAccumulator": "readout",
    "alignment": "readout",
    "class_rankme": "readout",
    "fit_logistic": "readout",
    "knn_accuracy": "readout",
    "linear_probe": "readout",
    "logistic_probe": "readout",
    "uniformity": "readout",
    # probes.weights
    "weight_spectra": "weights",
    "weight_spectrum": "weights",
    # probes.registry / probes.evaluate
    "Probe": "registry",
    "Variable": "registry",
    "Accumulator": "registry",
    "PROBES": "registry",
    "get_probe": "registry",
    "all_probes": "registry",
    "register": "registry",
    "register_accumulator": "registry",
    "ProbePlan": "evaluation",
    "Measurement": "evaluation",
    "evaluate": "evaluation",
}
"""Public name → the module of ``probes`` that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        try:  # a submodule: probes.spectral, probes.ntk …
            return importlib.import_module(f"traindyn.probes.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'probes' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"traindyn.probes.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``probes`` itself: a submodule named like the function it exports
    (``probes.inductive_bias``, ``probes.capture``) must not replace that function when it is
    imported (the import system sets the submodule as an attribute of the package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name
                and value.__name__ == f"traindyn.probes.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
