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
``capture``          forward hooks: which modules, token reduction, streaming into accumulators
``registry``         named feature and model probes used by the monitor and ``analyze``
===================  ==========================================================================
"""

from probes import ntk as _ntk  # noqa: F401  (registers the "ntk" model probe)
from probes.capture import (
    REDUCTIONS,
    capture,
    module_names,
    reduce_tokens,
    resolve_layers,
    stream_features,
)
from probes.collapse import CollapseAccumulator, neural_collapse
from probes.inductive_bias import (
    inductive_bias,
    kernel_hypothesis_errors,
    network_hypothesis_errors,
)
from probes.instability import (
    attention_logit_stats,
    log_partition,
    lr_sensitivity,
    max_attention_logit,
)
from probes.kernels import (
    center_kernel,
    centered_alignment,
    cumulative_power,
    kernel_alignment,
    kernel_distance,
    kernel_velocity,
    lazy_rich_summary,
    ntk_effective_rank,
    relative_kernel_change,
)
from probes.ntk import NTKProbe, batch_coupled_modules, conjugate_kernel, empirical_ntk
from probes.phases import geometric_phases, phase_segments
from probes.registry import (
    FEATURE_PROBES,
    MODEL_PROBES,
    get_feature_probe,
    get_model_probe,
    register_feature_probe,
    register_model_probe,
)
from probes.spectral import (
    AlphaReQ,
    EffectiveRank,
    ParticipationRatio,
    PowerLawFit,
    RankMe,
    RankMeCovariance,
    SpectralMetrics,
    SpectrumAccumulator,
    StableRank,
    alpha_req,
    alpha_req_fit,
    covariance_spectrum,
    effective_rank,
    participation_ratio,
    power_law_fit,
    rankme,
    rankme_covariance,
    rankme_from_spectrum,
    singular_values,
    stable_rank,
)
from probes.spectral import register_probes as _register_spectral
from probes.weights import weight_spectra, weight_spectrum

_register_spectral()  # participation_ratio, stable_rank, effective_rank as named feature probes

__all__ = [
    "FEATURE_PROBES",
    "MODEL_PROBES",
    "REDUCTIONS",
    "AlphaReQ",
    "CollapseAccumulator",
    "EffectiveRank",
    "NTKProbe",
    "ParticipationRatio",
    "PowerLawFit",
    "RankMe",
    "RankMeCovariance",
    "SpectralMetrics",
    "SpectrumAccumulator",
    "StableRank",
    "alpha_req",
    "alpha_req_fit",
    "attention_logit_stats",
    "batch_coupled_modules",
    "capture",
    "center_kernel",
    "centered_alignment",
    "conjugate_kernel",
    "covariance_spectrum",
    "cumulative_power",
    "effective_rank",
    "empirical_ntk",
    "geometric_phases",
    "get_feature_probe",
    "get_model_probe",
    "inductive_bias",
    "kernel_alignment",
    "kernel_distance",
    "kernel_hypothesis_errors",
    "kernel_velocity",
    "lazy_rich_summary",
    "log_partition",
    "lr_sensitivity",
    "max_attention_logit",
    "module_names",
    "network_hypothesis_errors",
    "neural_collapse",
    "ntk_effective_rank",
    "participation_ratio",
    "phase_segments",
    "power_law_fit",
    "rankme",
    "rankme_covariance",
    "rankme_from_spectrum",
    "reduce_tokens",
    "register_feature_probe",
    "register_model_probe",
    "relative_kernel_change",
    "resolve_layers",
    "singular_values",
    "stable_rank",
    "stream_features",
    "weight_spectra",
    "weight_spectrum",
]
