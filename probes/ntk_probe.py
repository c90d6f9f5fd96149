"""The NTK model probe: kernel–target alignment and kernel motion over training.

The registered probe ``"ntk"`` follows the one probe contract (:mod:`probes.registry`): it
consumes the model on the probe batch and its targets (integer labels, one-hot encoded, or
regression targets), and compares with the first and the previous evaluation
(``reference=("first", "previous")``).  :func:`ntk_values` computes the output-traced NTK
(:func:`probes.ntk.empirical_ntk`) on at most ``max_samples`` probe inputs and returns the values
below that need no reference plus the state to keep (the float64 kernel as a numpy array and its
centred alignment); :func:`ntk_compare` turns this state and the references' states into the
comparisons.  Whoever keeps the states (the Monitor in memory, ``analyze`` on disk) therefore
resumes identically after a kill.

``ntk_alignment``           kernel–target alignment (Cristianini et al. 2001)
``ntk_centered_alignment``  centred alignment (Cortes, Mohri, Rostamizadeh 2012)
``ntk_alignment_gain``      centred alignment minus its value at the first evaluation
``ntk_effective_rank``      entropy effective rank of the NTK (Roy & Vetterli 2007)
``ntk_relative_change``     ``‖K_t − K_0‖_F/‖K_0‖_F``, ``K_0`` the first evaluation's (0 there)
``ntk_distance_previous``   Fort et al. (2020) kernel distance to the previous evaluation (NaN
                            with a warning at the first)
``ntk_trace_mean``          ``tr(K)/n``, the kernel's scale

Kernel velocity is ``ntk_distance_previous / Δtime`` (the contract does not pass times).
:class:`NTKProbe` is the same computation as a stateful callable ``probe(model, inputs,
targets) -> dict`` that keeps its own first and previous states (one instance per run).  The
model runs in the mode it is given (the monitor uses eval mode); gradients are turned on
internally, ``.grad`` and the parameters are not touched.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from traindyn.probes import kernels as _k
from traindyn.probes._arrays import ArrayLike, as_tensor
from traindyn.probes._ntk_common import ParamSpec
from traindyn.probes._ntk_kernel import ntk_kernel, warn_nonfinite
from traindyn.probes.registry import Probe, register

__all__ = ["NTK_PROBE_VARIABLES", "NTKProbe", "ntk_compare", "ntk_values"]


class NTKProbe:
    """Stateful NTK alignment / motion probe: :func:`ntk_values` and :func:`ntk_compare` with
    the first and previous states kept by the instance (module docstring)."""

    def __init__(self, max_samples: int = 256, method: str = "auto", params: ParamSpec = None,
                 chunk_size: int | None = None) -> None:
        self.max_samples = max_samples
        self.method = method
        self.params = params
        self.chunk_size = chunk_size
        self.first_: dict[str, np.ndarray] | None = None
        self.previous_: dict[str, np.ndarray] | None = None

    def __call__(self, model: nn.Module, inputs: ArrayLike, targets: ArrayLike) -> dict[str, float]:
        values, state = ntk_values(model, inputs, targets, max_samples=self.max_samples,
                                   method=self.method, params=self.params,
                                   chunk_size=self.chunk_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NaN distance at the first call is documented
            values |= ntk_compare(state, {"first": self.first_, "previous": self.previous_})
        del values["ntk_velocity"]  # this stateful probe knows no times (the contract's does)
        self.first_ = self.first_ or state
        self.previous_ = state
        return values


NTK_PROBE_VARIABLES: dict[str, tuple[str, str]] = {
    "ntk_alignment": ("NTK–target alignment", "1"),
    "ntk_centered_alignment": ("centred NTK–target alignment", "1"),
    "ntk_alignment_gain": ("gain in centred NTK alignment since the first evaluation", "1"),
    "ntk_effective_rank": ("entropy effective rank of the NTK", "1"),
    "ntk_relative_change": ("relative NTK change ‖K_t − K_0‖/‖K_0‖", "1"),
    "ntk_distance_previous": ("kernel distance to the previous evaluation", "1"),
    "ntk_velocity": ("kernel velocity, distance to the previous evaluation / Δtime",
                     "1/time"),
    "ntk_trace_mean": ("mean NTK diagonal tr(K)/n", "1"),
}


# ----------------------------------------------------------------------------- the contract
def ntk_values(model: nn.Module, inputs: ArrayLike, targets: ArrayLike, *,
               max_samples: int = 256, method: str = "auto", params: ParamSpec = None,
               chunk_size: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One evaluation of the ``"ntk"`` probe (the :mod:`probes.registry` contract).

    Returns the values that need no reference — alignment (Cristianini et al. 2001), centred
    alignment (Cortes, Mohri, Rostamizadeh 2012, Def. 1), entropy effective rank (Roy & Vetterli
    2007), ``tr(K)/n`` — and the state to keep: the float64 output-traced kernel on the first
    ``max_samples`` inputs and its centred alignment, for :func:`ntk_compare`.
    """
    if targets is None:
        raise ValueError("the ntk probe needs targets (labels or regression targets)")
    x = inputs[:max_samples]
    y = as_tensor(targets[:max_samples]).cpu()
    # the kernel comes to the host once (its state is kept there); every summary is computed
    # there, so a kernel on a GPU is read by one copy
    K = ntk_kernel(model, x, output="trace", method=method, params=params,
                   chunk_size=chunk_size).to("cpu", torch.float64)
    warn_nonfinite(K, "empirical_ntk")
    Y = _k.targets_matrix(y, K.shape[0])
    values = {
        "ntk_alignment": _k.kernel_alignment(K, Y),
        "ntk_centered_alignment": _k.centered_alignment(K, Y),
        "ntk_effective_rank": _k.ntk_effective_rank(K),
        "ntk_trace_mean": float(torch.diagonal(K).mean()),
    }
    state = {"kernel": K.numpy(),
             "centered_alignment": np.asarray(values["ntk_centered_alignment"])}
    return values, state


def ntk_compare(state: dict[str, np.ndarray], reference: dict[str, dict | None],
                times: dict[str, float | None] | None = None, **_: object) -> dict[str, float]:
    """Comparisons of one evaluation's kernel with the first and the previous evaluation's.

    ``ntk_relative_change`` ``‖K − K_0‖_F/‖K_0‖_F`` and ``ntk_alignment_gain`` (centred
    alignment minus the first's) are 0 when there is no first evaluation yet (this one is it);
    ``ntk_distance_previous`` is Fort et al.'s (2020, Eq. 3) ``1 − ⟨K', K⟩/(‖K'‖‖K‖)``, NaN with
    a warning at the first evaluation.  ``ntk_velocity`` is that distance over the time step
    (Fort et al. 2020, Sec. 3), from ``times`` (``{"current": t, "previous": t'}``; NaN
    without them or at the first evaluation).
    """
    K = torch.from_numpy(np.asarray(state["kernel"], dtype=np.float64))
    first, previous = reference.get("first"), reference.get("previous")
    out = {"ntk_relative_change": 0.0, "ntk_alignment_gain": 0.0}
    for kind, ref in (("first", first), ("previous", previous)):
        if ref is not None and np.shape(ref["kernel"]) != tuple(K.shape):
            raise ValueError(f"the ntk probe's {kind} evaluation used {np.shape(ref['kernel'])[0]} "
                             f"probe inputs, this one {K.shape[0]}: use the same inputs throughout")
    if first is not None:
        K0 = torch.from_numpy(np.asarray(first["kernel"], dtype=np.float64))
        out["ntk_relative_change"] = _k.relative_kernel_change(K, K0)
        out["ntk_alignment_gain"] = float(state["centered_alignment"]) - float(
            first["centered_alignment"])
    if previous is None:
        warnings.warn("ntk_distance_previous is NaN at the first evaluation (no previous one)",
                      stacklevel=2)
        out["ntk_distance_previous"] = float("nan")
    else:
        Kp = torch.from_numpy(np.asarray(previous["kernel"], dtype=np.float64))
        out["ntk_distance_previous"] = _k.kernel_distance(Kp, K)
    out["ntk_velocity"] = float("nan")
    now, before = (times or {}).get("current"), (times or {}).get("previous")
    if previous is not None and now is not None and before is not None and now > before:
        out["ntk_velocity"] = out["ntk_distance_previous"] / (now - before)
    return out


register(Probe(
    "ntk", "model", NTK_PROBE_VARIABLES,
    "Jacot et al. (2018); Cortes, Mohri, Rostamizadeh (2012); Fort et al. (2020)",
    fn=ntk_values, reference=("first", "previous"), compare=ntk_compare,
))
