"""neural-tangents side of ``benchmarks/ntk.py``: time ``nt.empirical_ntk_fn`` (all three methods).

Runs in its own virtual environment (neural-tangents 0.6.5 needs an old JAX; with current JAX
its structured-derivatives path fails)::

    python3 -m venv /tmp/nt-env
    /tmp/nt-env/bin/pip install neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 'numpy<2'

Protocol (``benchmarks/ntk.py`` drives it): reads an ``.npz`` written by the torch side with the
inputs ``x``, the model ``kind`` (``"mlp"``, ``"cnn"`` or ``"transformer"``), the requested
``output`` and the torch parameters ``p0, p1, …`` (``named_parameters`` order, torch layout,
names in ``names``).  It rebuilds the same function in neural-tangents' *own* layout, the one
``stax`` uses and its structured derivatives are written for: dense weights stored ``(in,
out)`` and applied as ``x @ W``, convolutions in ``NHWC`` with ``HWIO`` kernels, the attention
projections as three ``(d, d)`` matrices.  The conversion is done once, before timing; the
kernel in function space does not depend on how the parameters are laid out, so the kernels
of both sides are compared entry by entry.  (Keeping torch's ``(out, in)`` layout and writing
``x @ W.T`` would be unfair to neural-tangents: its structured rules do not see through the
transpose, which makes its structured method 100× slower than it is.)

Writes a JSON list of ``{"method", "seconds" (median), "best", "cpu" (best process CPU time),
"kernel_file"}`` over repeats (at least ``repeats``, up to 60 within ~2 s in all, as many as
the torch side's two passes) after one warm-up call that compiles; failures are reported per
method, not hidden::

    /tmp/nt-env/bin/python benchmarks/ntk_reference.py case.npz out.json [repeats]
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    import neural_tangents as nt
except ImportError:  # --smoke says so; a real run needs it
    nt = None

jax.config.update("jax_platform_name", "cpu")


# ----------------------------------------------------------------------------- models
def mlp(params, x):
    """ReLU MLP; ``params = [(W, b), …]`` with ``W`` stored ``(in, out)``."""
    h = x
    for i, (W, b) in enumerate(params):
        h = h @ W + b
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def cnn(params, x):
    """Conv(3×3, pad 1) → ReLU → Conv(3×3, stride 2) → ReLU → flatten → Linear, in NHWC/HWIO."""
    (k1, b1), (k2, b2), (W, b) = params
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, k1, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    h = jax.nn.relu(h + b1)
    h = jax.lax.conv_general_dilated(h, k2, (2, 2), ((0, 0), (0, 0)), dimension_numbers=dn)
    h = jax.nn.relu(h + b2)
    return h.reshape(h.shape[0], -1) @ W + b


def _layer_norm(h, g, b, eps=1e-5):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + eps) * g + b


def transformer(params, x, heads):
    """Linear embedding → post-norm encoder layer (``nn.TransformerEncoderLayer``, ReLU, no
    dropout) → mean over tokens → linear head; every dense weight ``(in, out)``."""
    p = params
    h = x @ p["emb_W"] + p["emb_b"]  # (n, T, d)
    n, T, d = h.shape
    hd = d // heads

    def split(z):
        return z.reshape(n, T, heads, hd).transpose(0, 2, 1, 3)

    q = split(h @ p["Wq"] + p["bq"])
    k = split(h @ p["Wk"] + p["bk"])
    v = split(h @ p["Wv"] + p["bv"])
    w = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), axis=-1)
    a = (w @ v).transpose(0, 2, 1, 3).reshape(n, T, d)
    h = _layer_norm(h + a @ p["Wo"] + p["bo"], p["ln1_g"], p["ln1_b"])
    ff = jax.nn.relu(h @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
    h = _layer_norm(h + ff, p["ln2_g"], p["ln2_b"])
    return h.mean(1) @ p["head_W"] + p["head_b"]


# ----------------------------------------------------------------------------- layouts
def to_nt(kind: str, named: dict[str, np.ndarray], x: np.ndarray, heads: int):
    """Torch parameters and inputs → neural-tangents' layout (module docstring)."""
    vals = list(named.values())
    if kind == "mlp":
        params = [(jnp.asarray(W.T), jnp.asarray(b)) for W, b in zip(vals[::2], vals[1::2],
                                                                      strict=True)]
        return mlp, params, jnp.asarray(x)
    if kind == "cnn":
        (k1, b1, k2, b2, W, b) = vals
        c = k2.shape[0]
        side = int(round((W.shape[1] / c) ** 0.5))
        # torch flattens (C, H, W); NHWC flattens (H, W, C): permute the dense weight's rows
        W = W.reshape(W.shape[0], c, side, side).transpose(2, 3, 1, 0).reshape(-1, W.shape[0])
        params = [(jnp.asarray(k1.transpose(2, 3, 1, 0)), jnp.asarray(b1)),
                  (jnp.asarray(k2.transpose(2, 3, 1, 0)), jnp.asarray(b2)),
                  (jnp.asarray(W), jnp.asarray(b))]
        return cnn, params, jnp.asarray(x.transpose(0, 2, 3, 1))
    if kind == "transformer":
        g = {k.split(".", 1)[-1] if k.startswith("layer.") else k: v for k, v in named.items()}
        d = g["emb.weight"].shape[0]
        Wq, Wk, Wv = np.split(g["self_attn.in_proj_weight"], 3)
        bq, bk, bv = np.split(g["self_attn.in_proj_bias"], 3)
        params = {
            "emb_W": g["emb.weight"].T, "emb_b": g["emb.bias"],
            "Wq": Wq.T, "Wk": Wk.T, "Wv": Wv.T, "bq": bq, "bk": bk, "bv": bv,
            "Wo": g["self_attn.out_proj.weight"].T, "bo": g["self_attn.out_proj.bias"],
            "W1": g["linear1.weight"].T, "b1": g["linear1.bias"],
            "W2": g["linear2.weight"].T, "b2": g["linear2.bias"],
            "ln1_g": g["norm1.weight"], "ln1_b": g["norm1.bias"],
            "ln2_g": g["norm2.weight"], "ln2_b": g["norm2.bias"],
            "head_W": g["head.weight"].T, "head_b": g["head.bias"],
        }
        assert params["Wq"].shape == (d, d)
        params = {k: jnp.asarray(np.ascontiguousarray(v)) for k, v in params.items()}
        return (lambda p, z: transformer(p, z, heads)), params, jnp.asarray(x)
    raise ValueError(f"unknown kind {kind!r}")


def main() -> None:
    if "--smoke" in sys.argv[1:]:  # this script is ntk.py's child: check that it can start
        print(f"ntk_reference: jax {jax.__version__}, neural-tangents "
              f"{nt.__version__ if nt is not None else 'not installed (ntk.py skips it)'}")
        return
    if nt is None:
        raise SystemExit("ntk_reference.py needs neural-tangents (pip install neural-tangents)")
    case, out = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    data = np.load(case)
    kind = str(data["kind"])
    output = str(data["output"]) if "output" in data.files else "full"
    heads = int(data["heads"]) if "heads" in data.files else 1
    names = [str(s) for s in data["names"]]
    named = {nm: np.asarray(data[f"p{i}"]) for i, nm in enumerate(names)}
    fn, params, x = to_nt(kind, named, np.asarray(data["x"]), heads)
    methods = {
        "jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION,
        "ntk_vp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
        "structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
    }
    skip = set(str(data["skip"]).split(",")) if "skip" in data.files else set()
    trace_axes = () if output == "full" else (-1,)  # (-1,): the mean over outputs
    results = []
    for name, impl in methods.items():
        if name in skip:
            continue
        kfn = jax.jit(nt.empirical_ntk_fn(fn, trace_axes=trace_axes, vmap_axes=0,
                                          implementation=impl))
        try:
            kfn(x, None, params).block_until_ready()  # compile
            times, cpu = [], []
            for _ in range(max(repeats, 60)):
                t, c = time.perf_counter(), time.process_time()
                kfn(x, None, params).block_until_ready()
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                if sum(times) > 2.0 and len(times) >= repeats:
                    break
            K = np.asarray(kfn(x, None, params))
            path = f"{out}.{name}.npy"
            np.save(path, K)
            results.append({"method": name, "seconds": float(np.median(times)),
                            "best": float(np.min(times)), "cpu": float(np.min(cpu)),
                            "kernel_file": path})
        except Exception as e:  # noqa: BLE001 - report, do not hide
            results.append({"method": name, "error": f"{type(e).__name__}: {e}"[:300]})
    versions = {"neural_tangents": nt.__version__, "jax": jax.__version__}
    with open(out, "w") as fh:
        json.dump({"results": results, "versions": versions}, fh)


if __name__ == "__main__":
    main()
