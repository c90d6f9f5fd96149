"""The NTK model probe: kernel–target alignment and kernel motion over training.

``probe = get_model_probe("ntk").factory()`` returns a stateful callable
``probe(model, inputs, targets) -> dict[str, float]``: the output-traced NTK
(:func:`probes.ntk.empirical_ntk`) on (at most ``max_samples``) probe inputs, compared with the
targets (integer labels one-hot encoded) and with the kernels of earlier calls of the *same*
instance:

``ntk_alignment``           kernel–target alignment (Cristianini et al. 2001)
``ntk_centered_alignment``  centred alignment (Cortes, Mohri, Rostamizadeh 2012)
``ntk_alignment_gain``      centred alignment minus its value at the first call
``ntk_effective_rank``      entropy effective rank of the NTK (Roy & Vetterli 2007)
``ntk_relative_change``     ``‖K_t − K_0‖_F/‖K_0‖_F``, ``K_0`` the first call's kernel (0 there)
``ntk_distance_previous``   Fort et al. (2020) kernel distance to the previous call (NaN at first)
``ntk_trace_mean``          ``tr(K)/n``, the kernel's scale

Make one instance per run, call it at increasing steps on the same inputs; kernel velocity is
``ntk_distance_previous / Δtime`` (the caller knows the times).  The probe runs the model in the
mode it is given (the monitor uses eval mode), turns gradients on internally, and does not touch
``.grad`` or the parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from probes import kernels as _k
from probes._arrays import ArrayLike
from probes._ntk_common import ParamSpec
from probes.registry import register_model_probe

__all__ = ["NTK_PROBE_VARIABLES", "NTKProbe"]


class NTKProbe:
    """Stateful NTK alignment / motion probe (contract in the module docstring)."""

    def __init__(self, max_samples: int = 256, method: str = "auto", params: ParamSpec = None,
                 chunk_size: int | None = None) -> None:
        self.max_samples = max_samples
        self.method = method
        self.params = params
        self.chunk_size = chunk_size
        self.K0_: torch.Tensor | None = None
        self.K_prev_: torch.Tensor | None = None
        self.centered0_: float | None = None

    def __call__(self, model: nn.Module, inputs: ArrayLike, targets: ArrayLike) -> dict[str, float]:
        from probes.ntk import empirical_ntk  # probes.ntk imports this module

        x = inputs[: self.max_samples]
        y = targets[: self.max_samples]
        K = empirical_ntk(model, x, output="trace", method=self.method, params=self.params,
                          chunk_size=self.chunk_size).detach().to(torch.float64)
        Y = _k.targets_matrix(y, K.shape[0])
        out = {
            "ntk_alignment": _k.kernel_alignment(K, Y),
            "ntk_centered_alignment": _k.centered_alignment(K, Y),
            "ntk_effective_rank": _k.ntk_effective_rank(K),
            "ntk_trace_mean": float(torch.diagonal(K).mean()),
        }
        if self.K0_ is None:
            self.K0_ = K
            self.centered0_ = out["ntk_centered_alignment"]
        elif self.K0_.shape != K.shape:
            raise ValueError("the NTK probe must see the same probe inputs at every call")
        out["ntk_alignment_gain"] = out["ntk_centered_alignment"] - self.centered0_
        out["ntk_relative_change"] = _k.relative_kernel_change(K, self.K0_)
        out["ntk_distance_previous"] = (float("nan") if self.K_prev_ is None
                                        else _k.kernel_distance(self.K_prev_, K))
        self.K_prev_ = K
        return out


NTK_PROBE_VARIABLES: dict[str, tuple[str, str]] = {
    "ntk_alignment": ("NTK–target alignment", "1"),
    "ntk_centered_alignment": ("centred NTK–target alignment", "1"),
    "ntk_alignment_gain": ("gain in centred NTK alignment since the first evaluation", "1"),
    "ntk_effective_rank": ("entropy effective rank of the NTK", "1"),
    "ntk_relative_change": ("relative NTK change ‖K_t − K_0‖/‖K_0‖", "1"),
    "ntk_distance_previous": ("kernel distance to the previous evaluation", "1"),
    "ntk_trace_mean": ("mean NTK diagonal tr(K)/n", "1"),
}

register_model_probe(
    "ntk", NTKProbe, NTK_PROBE_VARIABLES,
    "Jacot et al. (2018); Cortes, Mohri, Rostamizadeh (2012); Fort et al. (2020)",
)
