"""neural-tangents side of ``benchmarks/ntk.py``: time ``nt.empirical_ntk_fn`` (all three methods).

Runs in its own virtual environment (neural-tangents 0.6.5 needs an old JAX; with current JAX
its structured-derivatives path fails)::

    python3 -m venv /tmp/nt-env
    /tmp/nt-env/bin/pip install neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 'numpy<2'

Protocol (``benchmarks/ntk.py`` drives it): reads an ``.npz`` written by the torch side with the
inputs ``x`` and the weights of a ReLU MLP (``W0, b0, W1, b1, …``, torch layout ``(out, in)``)
or a small CNN, rebuilds the same function ``f(params, x)`` in plain ``jax.numpy``, and writes a
JSON list of ``{"method", "seconds", "kernel_file"}`` (median of repeats after one warm-up call
that compiles), saving each kernel for the accuracy check.

    /tmp/nt-env/bin/python benchmarks/ntk_reference.py case.npz out.json [repeats]
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import neural_tangents as nt
import numpy as np

jax.config.update("jax_platform_name", "cpu")


def mlp(params, x):
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = h @ params[2 * i].T + params[2 * i + 1]
        if i < n_layers - 1:
            h = jax.nn.relu(h)
    return h


def cnn(params, x):
    """Conv(3×3, pad 1) → ReLU → Conv(3×3, stride 2) → ReLU → flatten → Linear (torch NCHW)."""
    h = x
    convs = (len(params) - 2) // 2
    strides = [1, 2, 2, 2][:convs]
    pads = [((1, 1), (1, 1))] + [((0, 0), (0, 0))] * (convs - 1)
    for i in range(convs):
        h = jax.lax.conv_general_dilated(h, params[2 * i], (strides[i],) * 2, pads[i],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jax.nn.relu(h + params[2 * i + 1][None, :, None, None])
    h = h.reshape(h.shape[0], -1)
    return h @ params[-2].T + params[-1]


def main() -> None:
    case, out = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    data = np.load(case)
    kind = str(data["kind"])
    x = jnp.asarray(data["x"])
    names = sorted((k for k in data.files if k.startswith("p")), key=lambda s: int(s[1:]))
    params = [jnp.asarray(data[k]) for k in names]
    fn = mlp if kind == "mlp" else cnn
    methods = {
        "jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION,
        "ntk_vp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
        "structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
    }
    skip = set(str(data["skip"]).split(",")) if "skip" in data.files else set()
    results = []
    for name, impl in methods.items():
        if name in skip:
            continue
        kfn = jax.jit(nt.empirical_ntk_fn(fn, trace_axes=(), vmap_axes=0, implementation=impl))
        try:
            kfn(x, None, params).block_until_ready()  # compile
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                kfn(x, None, params).block_until_ready()
                times.append(time.perf_counter() - t)
            K = np.asarray(kfn(x, None, params))
            path = f"{out}.{name}.npy"
            np.save(path, K)
            results.append({"method": name, "seconds": float(np.median(times)),
                            "best": float(np.min(times)), "kernel_file": path})
        except Exception as e:  # noqa: BLE001 - report, do not hide
            results.append({"method": name, "error": f"{type(e).__name__}: {e}"[:300]})
    versions = {"neural_tangents": nt.__version__, "jax": jax.__version__}
    with open(out, "w") as fh:
        json.dump({"results": results, "versions": versions}, fh)


if __name__ == "__main__":
    main()
