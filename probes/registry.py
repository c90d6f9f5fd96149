"""Named feature probes: the vocabulary the monitor, ``traindyn analyze`` and the CLI share.

A *feature probe* maps a ``(n, d)`` feature matrix of one layer to one number.  Each entry
carries the variable's long name, units and source, which end up as attributes of the Dataset
variable of the same name.  Other modules add probes with :func:`register_feature_probe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from probes import spectral

__all__ = [
    "FEATURE_PROBES",
    "MODEL_PROBES",
    "FeatureProbe",
    "ModelProbe",
    "get_feature_probe",
    "get_model_probe",
    "register_feature_probe",
    "register_model_probe",
]


@dataclass(frozen=True)
class FeatureProbe:
    """A named scalar metric of a feature matrix."""

    name: str
    fn: Callable[..., float]
    long_name: str
    units: str
    source: str

    def __call__(self, features, **kwargs) -> float:
        return self.fn(features, **kwargs)


FEATURE_PROBES: dict[str, FeatureProbe] = {}


def register_feature_probe(
    name: str, fn: Callable[..., float], long_name: str, units: str, source: str
) -> FeatureProbe:
    """Add (or replace) a named feature probe and return it."""
    probe = FeatureProbe(name, fn, long_name, units, source)
    FEATURE_PROBES[name] = probe
    return probe


def get_feature_probe(name: str) -> FeatureProbe:
    """Look a probe up by name; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return FEATURE_PROBES[name]
    except KeyError:
        raise KeyError(
            f"unknown probe {name!r}; available: {', '.join(sorted(FEATURE_PROBES))}"
        ) from None


@dataclass(frozen=True)
class ModelProbe:
    """A named metric of a whole model on probe inputs (and targets), e.g. NTK alignment.

    ``factory()`` returns a fresh callable ``probe(model, inputs, targets) -> {var: value}``;
    the callable may keep state between calls (kernel at initialisation, previous kernel), so
    one instance is made per run.  ``variables`` maps each returned name to its
    ``(long_name, units)``.
    """

    name: str
    factory: Callable[[], Callable[..., dict[str, float]]]
    variables: dict[str, tuple[str, str]]
    source: str


MODEL_PROBES: dict[str, ModelProbe] = {}


def register_model_probe(
    name: str,
    factory: Callable[[], Callable[..., dict[str, float]]],
    variables: dict[str, tuple[str, str]],
    source: str,
) -> ModelProbe:
    """Add (or replace) a named model probe and return it."""
    probe = ModelProbe(name, factory, variables, source)
    MODEL_PROBES[name] = probe
    return probe


def get_model_probe(name: str) -> ModelProbe:
    """Look a model probe up by name; unknown names raise ``KeyError`` listing the known ones."""
    try:
        return MODEL_PROBES[name]
    except KeyError:
        raise KeyError(
            f"unknown model probe {name!r}; available: {', '.join(sorted(MODEL_PROBES))}"
        ) from None


register_feature_probe(
    "rankme", spectral.rankme, "RankMe effective rank (raw singular values)", "1",
    "Garrido, Balestriero, Najman, LeCun (ICML 2023), Eq. 1",
)
register_feature_probe(
    "rankme_covariance", spectral.rankme_covariance,
    "RankMe of centred-covariance eigenvalues", "1",
    "Agrawal et al. (NeurIPS 2022); Li et al. (NeurIPS 2025)",
)
register_feature_probe(
    "alpha_req", spectral.alpha_req, "alpha-ReQ eigenspectrum decay exponent", "1",
    "Agrawal, Mondal, Ghosh, Richards (NeurIPS 2022), Eq. 2",
)
