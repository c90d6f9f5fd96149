"""Cost model behind ``empirical_ntk(method="auto")``: shapes, parameter counts, device.

Each engine's time is modelled as ``flops / rate + launches · latency`` with per-device constants
(:data:`DEVICES`); ``"auto"`` takes the cheapest.  FLOP counts follow Novak, Sohl-Dickstein,
Schoenholz (ICML 2022), Table 1, written for this implementation (``N`` samples differentiated,
``n₁n₂`` kernel entries, ``k`` outputs, ``k_eff = k²`` for the full kernel and ``k`` for a trace,
``F`` forward FLOPs of one sample, ``P`` parameters, ``O`` intercepted torch calls in a forward):

``jacobian``    ``3FNk`` (one vmapped VJP per output) ``+ 2n₁n₂k_eff·P`` (the contraction);
                launches ``~ c_vmap·O`` (vmap of jacrev dispatches every op batched).
``ntk_vp``      ``3F·n₂k·n₁`` (a JVP over the ``n₁`` batch per column) ``+ 2F·n₂k·m`` (the VJPs,
                ``m`` columns per chunk); launches ``~ c_vmap·O`` per chunk of columns.
``structured``  ``NF + 2FNk`` (forward, one batched backward) plus, per intercepted layer with
                ``T`` tokens, ``p`` inputs and ``q`` outputs, the cheaper of the Gram form
                ``2n₁n₂T²(p + k_eff·q)`` and the materialised form ``2NkTpq + 2n₁n₂k_eff·pq``;
                the parameters it cannot structure cost what ``jacobian`` costs for them.

The CPU constants were fitted on a 2-core VM (``benchmarks/ntk.py``); the CUDA constants (a
launch-bound latency of ~10 µs per op and a much higher rate) are an estimate that has not been
measured against timings.  :func:`choose` is pure (no timing), so its choice on given shapes
is testable without the hardware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Device:
    rate: float  # sustained flop/s on these small products
    latency: float  # seconds per dispatched op (Python + dispatcher + launch)
    vmap_latency: float  # seconds per op under vmap/jacrev/jvp (functorch's extra layers)


DEVICES: dict[str, Device] = {
    "cpu": Device(rate=2.0e10, latency=2.0e-5, vmap_latency=1.5e-4),
    "cuda": Device(rate=2.0e13, latency=1.5e-5, vmap_latency=1.0e-4),  # unmeasured estimate
}


@dataclass(frozen=True)
class Layer:
    kind: str  # "linear", "conv" or "norm"
    T: int  # tokens / positions per sample
    p: int  # input features (with the bias column)
    q: int  # output features


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a model on one sample."""

    k: int  # outputs per sample
    P: int  # chosen parameters
    flops: float  # forward FLOPs of one sample
    ops: int  # torch calls in one forward (dispatch count)
    layers: tuple[Layer, ...] = field(default_factory=tuple)  # structured layers
    P_fallback: int = 0  # chosen parameters the structured engine leaves to the Jacobian


def describe(model, x, chosen, plan, recorded, k: int) -> ModelShape:
    """:class:`ModelShape` from a structured plan and its recording (no extra forward pass)."""
    P = sum(p.numel() for p in chosen.values())
    if plan is None or recorded is None:
        return ModelShape(k=k, P=P, flops=2.0 * P, ops=max(1, len(list(model.modules()))),
                          P_fallback=P)
    n = max(1, recorded.f.shape[0])
    layers = []
    for grp in plan.groups:
        a, g = recorded.factors(grp)
        layers.append(Layer(grp.kind, int(a.shape[1]), int(a.shape[2]), int(g.shape[3])))
    flops = 0.0
    for c in recorded.calls:
        T, p = c.a.shape[1], c.a.shape[2]
        q = c.y.numel() // (n * T) if c.kind != "norm" else 1
        flops += 2.0 * T * p * q
    P_fb = sum(p.numel() for p in plan.fallback.values())
    flops += 2.0 * P_fb
    return ModelShape(k=k, P=P, flops=max(flops, 1.0), ops=max(1, plan.ops), layers=tuple(layers),
                      P_fallback=P_fb)


def costs(s: ModelShape, n1: int, n2: int, same: bool, output: str,
          device: torch.device | str = "cpu") -> dict[str, float]:
    """Modelled seconds of each explicit method (module docstring)."""
    dev = DEVICES["cuda" if torch.device(device).type == "cuda" else "cpu"]
    k, F, O = s.k, s.flops, s.ops
    k_eff = k * k if output == "full" else k
    N = n1 if same else n1 + n2
    pairs = n1 * n2 * (2 / 3 if same and n1 >= 512 else 1)  # symmetric panels skip 1/3
    out = {}
    # jacobian
    fl = 3 * F * N * k + 2 * pairs * k_eff * s.P + 2.0 * N * k * s.P
    out["jacobian"] = fl / dev.rate + O * dev.vmap_latency * math.ceil(N / n1)
    # ntk_vp (one chunk of rows, columns in chunks of m = n1 // k)
    m = max(1, n1 // max(1, k))
    chunks = math.ceil(n2 / m)
    fl = 3 * F * n2 * k * n1 + 2 * F * n2 * k * m
    out["ntk_vp"] = fl / dev.rate + chunks * O * 2 * dev.vmap_latency
    # structured
    fl = N * F + 2 * F * N * k
    launches = O * dev.latency + 4 * O * dev.latency  # recorded forward and batched backward
    for L in s.layers:
        if L.kind == "norm":
            fl += 2 * N * k * L.T * L.p * 2 + 2 * pairs * k_eff * L.p * 2
        else:
            gram = 2 * pairs * L.T ** 2 * (L.p + k_eff * L.q)
            mat = 2 * N * k * L.T * L.p * L.q + 2 * pairs * k_eff * L.p * L.q
            fl += mat if (L.T > 1 and (output == "full" or mat < gram)) else gram
        launches += 6 * dev.latency
    if s.P_fallback:
        fl += 3 * F * N * k + 2 * pairs * k_eff * s.P_fallback
        launches += O * dev.vmap_latency
    out["structured"] = fl / dev.rate + launches
    return out


def choose(s: ModelShape, n1: int, n2: int, same: bool, output: str,
           device: torch.device | str = "cpu") -> str:
    """The method with the least modelled time; ``"structured"`` needs a structured layer."""
    c = costs(s, n1, n2, same, output, device)
    if not s.layers:
        c.pop("structured")
    return min(c, key=c.get)
