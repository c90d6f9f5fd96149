"""Benchmark of ``probes.ntk.empirical_ntk``: ``method="auto"`` against each explicit method and
against neural-tangents' ``empirical_ntk_fn`` (all three implementations), same weights.

Run::

    .venv/bin/python benchmarks/ntk.py                 # all shapes, neural-tangents if found
    .venv/bin/python benchmarks/ntk.py --no-nt         # traindyn only
    .venv/bin/python benchmarks/ntk.py --peak 4096     # peak memory of an n = 4096 NTK
    .venv/bin/python benchmarks/ntk.py --threads 1 --quick --only 2,5   # some shapes, 1 thread
    .venv/bin/python benchmarks/ntk.py --threads 1 --conv-routes   # cut convolutions' routes
    python3 benchmarks/ntk.py --device cuda --no-nt --quick   # on a GPU (no neural-tangents)

neural-tangents lives in its own environment (see ``benchmarks/ntk_reference.py`` for the two
commands that create ``/tmp/nt-env``); point ``--nt-python`` (or ``$NT_PYTHON``) at its python.
It runs the same weights in its own layout (dense weights ``(in, out)``, NHWC convolutions), so
its structured derivatives are at their best.  Shapes: four MLPs, a small CNN and a transformer
block (linear embedding, ``nn.TransformerEncoderLayer``, mean over tokens, linear head).
Timings are the best of interleaved repeats after warm-up calls (neural-tangents: after jit
compilation; traindyn: after the first call has planned and verified its structured
derivatives, which later calls on the same model reuse), on whatever the machine is doing at
the time: on a shared machine they are noisy, so the script prints ratios measured in the same
run, and process CPU times beside wall times.  neural-tangents runs ``--nt-rounds`` times (3),
each run followed by a pass of traindyn's ``auto`` and fastest explicit method (at most 60
calls each side per round); the ratio to neural-tangents compares the best of those paired
passes with neural-tangents' best over its runs, so both minima come from the same stretches
of the machine's load (one stretch against another moved a millisecond ratio by ±30 % on the
2-core VM).  With ``--threads 1`` both sides run one thread
(torch's threads; XLA's through ``XLA_FLAGS``; on Linux both pinned to the same core), the fair
setting on a loaded machine, where torch's spinning worker threads lose most of their time.
The last lines are a table of every shape: traindyn's best explicit method, ``auto`` and its
choice, and neural-tangents' best.  With
``--device cuda`` models and inputs live on the GPU, every timed call is bracketed by
``torch.cuda.synchronize()``, the neural-tangents comparison is skipped (it runs on the CPU), and
the peak-memory line reports the peak CUDA allocation above what was allocated before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traindyn.probes._ntk_engines import auto_method  # noqa: E402
from traindyn.probes.ntk import empirical_ntk  # noqa: E402

METHODS = ("auto", "structured", "ntk_vp", "jacobian")
CPU = torch.device("cpu")


def mlp(d_in: int, width: int, depth: int, k: int) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, k))


def cnn(channels: int, k: int, side: int) -> nn.Sequential:
    """Conv(3×3, pad 1) → ReLU → Conv(3×3, stride 2) → ReLU → flatten → Linear."""
    out = (side - 3) // 2 + 1
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(channels * out * out, k))


class Transformer(nn.Module):
    """Linear embedding → ``nn.TransformerEncoderLayer`` (post-norm, ReLU, no dropout) → mean
    over tokens → linear head."""

    def __init__(self, d_in: int, d: int, heads: int, ff: int, k: int) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Linear(d_in, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(x)).mean(1))


def kind_of(model: nn.Module) -> str:
    if isinstance(model, Transformer):
        return "transformer"
    return "mlp" if isinstance(model[0], nn.Linear) else "cnn"


def cases(quick: bool = False) -> list[tuple]:
    """``(name, model, x, output, methods, neural-tangents methods to skip)`` of every shape.

    The same list is read by ``tests/probes/test_ntk_cost_model.py``, which checks the cost
    model's choice on these shapes against a table (timings stay here).
    """
    torch.manual_seed(0)
    head = METHODS[:2] if quick else METHODS
    nt_slow = "jacobian,ntk_vp" if quick else "jacobian"  # minutes at n = 128 on 2 cores
    return [
        ("MLP 64-512-512-10 (headline)", mlp(64, 512, 2, 10), torch.randn(128, 64), "full",
         head, nt_slow),
        ("MLP 64-512-512-10", mlp(64, 512, 2, 10), torch.randn(128, 64), "trace", head,
         nt_slow),
        ("MLP 32-128x3-5", mlp(32, 128, 3, 5), torch.randn(64, 32), "full", METHODS, ""),
        ("MLP 16-256-1", mlp(16, 256, 1, 1), torch.randn(256, 16), "full", METHODS, ""),
        ("CNN 3x8x8, 16 channels, 10 outputs", cnn(16, 10, 8), torch.randn(32, 3, 8, 8),
         "full", METHODS, ""),
        ("Transformer block: 8 tokens, d 32, 4 heads, ff 64, 10 outputs",
         Transformer(16, 32, 4, 64, 10), torch.randn(32, 8, 16), "full", METHODS, ""),
    ]


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work so a wall-clock interval covers the kernels it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit_interleaved(fns: dict, repeats: int, device: torch.device = CPU,
                       cpu: dict | None = None) -> dict:
    """Best wall time of each function over rounds that alternate between them (after warm-up).

    Alternating rounds and taking the minimum keep a shared machine's load bursts from landing
    on one method only; the order is shuffled every round (seeded), so each method is timed
    after each of the others (a fast method timed right after a slow one finds caches and the
    allocator in the state the slow one left, which on its own costs it 20-40 % at millisecond
    sizes: in a fixed cyclic order ``auto`` always followed the Jacobian method).
    Functions faster than 0.1 s get more rounds (up to 30, about 1 s in all), so millisecond
    timings are minima over many calls; ones slower than 3 s get one.  The round count comes
    from a second warm-up call (the first one plans).  On CUDA each call is bracketed by a
    synchronisation.  ``cpu``, if given, receives the best process CPU time of each (all
    threads; steadier than wall time on a loaded machine).
    """
    best, reps = {}, {}
    cpu = {} if cpu is None else cpu
    for name, fn in fns.items():
        for _ in range(2):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            warm = time.perf_counter() - t
            if warm > 3:
                break
        best[name] = float("inf")
        reps[name] = 1 if warm > 3 else max(repeats, min(30, int(1.0 / max(warm, 1e-4))))
    names, order = list(fns), random.Random(0)
    for r in range(max(reps.values())):
        order.shuffle(names)
        for name in names:
            if r < reps[name]:
                fn = fns[name]
                _sync(device)
                t, c = time.perf_counter(), time.process_time()
                fn()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - t)
                cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - c)
    return best


def nt_case(model: nn.Module, x: torch.Tensor, kind: str, output: str, path: str,
            skip: str) -> None:
    named = dict(model.named_parameters())
    arrays = {"kind": kind, "x": x.cpu().numpy(), "skip": skip, "output": output,
              "names": np.array(list(named)), "heads": getattr(model, "heads", 1)}
    for i, p in enumerate(named.values()):
        arrays[f"p{i}"] = p.detach().cpu().numpy()
    np.savez(path, **arrays)


def run_nt(nt_python: str, model, x, kind, output, repeats, skip) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        case, out = os.path.join(tmp, "case.npz"), os.path.join(tmp, "out.json")
        nt_case(model, x, kind, output, case, skip)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
        pin = None
        if torch.get_num_threads() == 1:  # the same one thread on both sides
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            if hasattr(os, "sched_setaffinity"):
                # the flags leave XLA some work on other threads (its CPU time exceeded its
                # wall time by up to 1.9x on an idle machine): pin it to one core as well
                core = min(os.sched_getaffinity(0))

                def pin() -> None:
                    os.sched_setaffinity(0, {core})
        proc = subprocess.run([nt_python, str(ROOT / "benchmarks" / "ntk_reference.py"), case,
                               out, str(repeats)], capture_output=True, text=True, env=env,
                              preexec_fn=pin)
        if proc.returncode != 0:
            print("  neural-tangents failed:", proc.stderr.strip().splitlines()[-1:])
            return None
        res = json.load(open(out))
        for r in res["results"]:
            if "kernel_file" in r:
                r["kernel"] = np.load(r.pop("kernel_file"))
        return res


def merge_nt(rounds: list[dict]) -> dict | None:
    """neural-tangents' results over several rounds: per method the best time and CPU time of
    all rounds, the median of the rounds' medians, the first round's kernel."""
    if not rounds:
        return None
    merged = []
    for i, first in enumerate(rounds[0]["results"]):
        runs = [r["results"][i] for r in rounds if "error" not in r["results"][i]]
        if not runs:
            merged.append(first)
            continue
        merged.append({**runs[0], "best": min(r["best"] for r in runs),
                       "cpu": min(r["cpu"] for r in runs),
                       "seconds": float(np.median([r["seconds"] for r in runs])),
                       "rounds": len(runs)})
    return {"results": merged, "versions": rounds[0]["versions"]}


def bench_case(name, model, x, output, repeats, methods, nt_python, nt_skip,
               device: torch.device = CPU, nt_rounds: int = 3) -> dict:
    print(f"\n== {name}: n = {x.shape[0]}, output = {output!r}, device {device}")
    model.eval()
    if device.type != "cpu":  # neural-tangents reads CPU copies; timings use the device ones
        nt_python = None
    model, x = model.to(device), x.to(device)
    fns = {m: (lambda m=m: empirical_ntk(model, x, output=output, method=m)) for m in methods}
    cpu: dict = {}
    with torch.no_grad():
        times = timeit_interleaved(fns, repeats, device, cpu)
    res = None
    paired = [float("inf"), float("inf")]  # auto's best wall / CPU time in the paired passes
    if nt_python:
        # neural-tangents' runs alternate with passes of traindyn's auto and fastest explicit
        # method (nt, traindyn, nt, traindyn, ...): each side's minimum then comes from
        # ``nt_rounds`` stretches of the machine's load, the same number for both (on this VM
        # one stretch against another moves a millisecond ratio by up to ±30 %); the ratio to
        # neural-tangents uses only these paired passes (each takes at most 60 calls in ~2 s)
        fast = min((m for m in methods if m != "auto"), key=times.get)
        rounds = []
        for _ in range(nt_rounds):
            one = run_nt(nt_python, model, x, kind_of(model), output, repeats, nt_skip)
            if one is None:
                break
            rounds.append(one)
            cpu2: dict = {}
            with torch.no_grad():
                again = timeit_interleaved({m: fns[m] for m in ("auto", fast)}, repeats,
                                           device, cpu2)
            paired = [min(paired[0], again["auto"]), min(paired[1], cpu2["auto"])]
            for m, t in again.items():
                times[m], cpu[m] = min(times[m], t), min(cpu[m], cpu2[m])
        res = merge_nt(rounds)
    kernels = {m: fn() for m, fn in fns.items()}
    chosen = auto_method(model, x, output=output)
    for m in methods:
        note = f"  (chose {chosen})" if m == "auto" else ""
        print(f"  traindyn {m:<11s} {times[m]:9.4f} s  (CPU time {cpu[m]:.4f} s){note}")
    explicit = {m: t for m, t in times.items() if m != "auto"}
    best_m = min(explicit, key=explicit.get)
    ref = kernels["jacobian"] if "jacobian" in kernels else kernels["structured"]
    err = max(float((K - ref).abs().max() / ref.abs().max()) for K in kernels.values())
    print(f"  auto / best explicit ({best_m}) = {times['auto'] / explicit[best_m]:.3f}   "
          f"(max relative difference between methods {err:.1e})")
    row = {"name": name, "n": x.shape[0], "output": output, "best_m": best_m,
           "best": explicit[best_m], "auto": times["auto"], "chosen": chosen,
           "auto_cpu": cpu["auto"], "best_cpu": cpu[best_m]}
    if nt_python:
        if res:
            print(f"  neural-tangents {res['versions']}")
            k = int(model(x[:1]).numel())
            ours = (kernels["auto"] if output == "full" else kernels["auto"] / k).cpu()
            nt_best = {}
            for r in res["results"]:
                if "error" in r:
                    print(f"  nt {r['method']:<11s} failed: {r['error']}")
                    continue
                K = torch.from_numpy(np.ascontiguousarray(r["kernel"])).to(ours.dtype)
                e = float((K - ours).abs().max() / K.abs().max())
                nt_best[r["method"]] = (r["best"], r["cpu"])
                print(f"  nt {r['method']:<11s} {r['best']:9.4f} s (median {r['seconds']:.4f}, "
                      f"CPU time {r['cpu']:.4f} s; {r.get('rounds', 1)} rounds)  traindyn "
                      f"auto (paired passes {paired[0]:.4f} s) / nt = "
                      f"{paired[0] / r['best']:.3f}, by CPU time "
                      f"{paired[1] / r['cpu']:.3f}   (kernels differ by {e:.1e})")
            if nt_best:
                row["nt_m"] = min(nt_best, key=lambda m: nt_best[m][0])
                row["nt"], row["nt_cpu"] = nt_best[row["nt_m"]]
                row["auto_paired"], row["auto_paired_cpu"] = paired
    return row


def summary(rows: list[dict]) -> None:
    """One table of every shape: best explicit, auto, neural-tangents' best, ratios."""
    print("\nwall s [CPU s]; ratios as wall; CPU time (CPU time is steadier on a loaded machine); "
          "auto / nt best: auto's best in the passes paired with neural-tangents' runs")
    print("| shape | n | output | traindyn best explicit | auto (chose) | auto / best "
          "| neural-tangents best | auto / nt best |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        nt = ((f"{r['nt']:.4f} [{r['nt_cpu']:.4f}] ({r['nt_m']})",
               f"{r['auto_paired'] / r['nt']:.2f}; {r['auto_paired_cpu'] / r['nt_cpu']:.2f}")
              if "nt" in r else ("not measured", "–"))
        print(f"| {r['name']} | {r['n']} | {r['output']} | {r['best']:.4f} [{r['best_cpu']:.4f}]"
              f" ({r['best_m']}) | {r['auto']:.4f} [{r['auto_cpu']:.4f}] ({r['chosen']}) "
              f"| {r['auto'] / r['best']:.2f}; {r['auto_cpu'] / r['best_cpu']:.2f} | {nt[0]} "
              f"| {nt[1]} |")


def peak(n: int, device: torch.device = CPU) -> None:
    """Peak resident memory of an n-sample traced NTK of the headline MLP (fresh process); on
    CUDA, the peak allocation above what was allocated before the call."""
    torch.manual_seed(0)
    model = mlp(64, 512, 2, 10)
    x = torch.randn(n, 64)
    if device.type == "cuda":
        _peak_cuda(model.to(device), x.to(device), device)
        return
    before = _rss_gib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    with torch.no_grad():
        K = empirical_ntk(model, x, output="trace")
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    full_gib = n * n * 100 * 4 / 2**30
    print(f"n = {n}: traced NTK {tuple(K.shape)} in {dt:.1f} s; peak RSS {after:.2f} GiB "
          f"(resident before the call {before:.2f} GiB, peak before {peak_before:.2f} GiB); "
          f"the full (n, n, 10, 10) float32 kernel alone would take {full_gib:.1f} GiB")


def _peak_cuda(model: nn.Module, x: torch.Tensor, device: torch.device) -> None:
    n = x.shape[0]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    with torch.no_grad():
        K = empirical_ntk(model, x, output="trace")
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t
    extra = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    full_gib = n * n * 100 * 4 / 2**30
    print(f"n = {n}: traced NTK {tuple(K.shape)} on {torch.cuda.get_device_name(device)} in "
          f"{dt:.2f} s; peak CUDA allocation {extra:.2f} GiB above the {base / 2**30:.2f} GiB "
          f"allocated before the call; the full (n, n, 10, 10) float32 kernel alone would take "
          f"{full_gib:.1f} GiB")


class ConvStack(nn.Module):
    """``depth`` 3×3 convolutions (stride 1, padding 1, ReLU) → mean over positions → linear
    head: every convolution after the first needs signals at its input."""

    def __init__(self, channels: int, depth: int, k: int) -> None:
        super().__init__()
        convs, c = [], 3
        for _ in range(depth):
            convs += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
            c = channels
        self.body = nn.Sequential(*convs)
        self.head = nn.Linear(channels, k)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def conv_routes(repeats: int, device: torch.device) -> None:
    """The two routes of a cut convolution's transposed product (``probes._ntk_structured.
    _conv_input_grad``: GEMM + scatter, or one transposed convolution) and ``auto`` (timed
    once per geometry), on the benchmark CNN and on stride-1 CNNs, full kernel, interleaved."""
    from traindyn.probes import _ntk_structured as st

    print("\n== transposed product of cut convolutions (env "
          f"{st.CONV_INPUT_GRAD_ENV}), full kernel, device {device}")
    torch.manual_seed(0)
    shapes = [("CNN 3x8x8 (benchmark shape 4)", cnn(16, 10, 8), torch.randn(32, 3, 8, 8)),
              ("3 convs 16 ch, 3x16x16, 10 outputs", ConvStack(16, 3, 10),
               torch.randn(16, 3, 16, 16)),
              ("3 convs 32 ch, 3x16x16, 10 outputs", ConvStack(32, 3, 10),
               torch.randn(16, 3, 16, 16))]
    saved = os.environ.get(st.CONV_INPUT_GRAD_ENV)

    def run(model, x, route):
        def f():
            os.environ[st.CONV_INPUT_GRAD_ENV] = route
            empirical_ntk(model, x, output="full", method="structured")
        return f

    try:
        for name, model, x in shapes:
            model, x = model.to(device).eval(), x.to(device)
            st._CONV_ROUTES.clear()
            best = timeit_interleaved({r: run(model, x, r) for r in ("scatter", "transpose",
                                                                     "auto")}, repeats, device)
            chose = (sorted(set(st._CONV_ROUTES.values())) if device.type == "cpu"
                     else "transpose, untimed off the CPU")
            print(f"  {name}: scatter {best['scatter']:.4f} s, transpose "
                  f"{best['transpose']:.4f} s, auto {best['auto']:.4f} s (chose {chose}); "
                  f"transpose / scatter = {best['transpose'] / best['scatter']:.2f}, "
                  f"auto / best = {best['auto'] / min(best['scatter'], best['transpose']):.2f}")
    finally:
        if saved is None:
            os.environ.pop(st.CONV_INPUT_GRAD_ENV, None)
        else:
            os.environ[st.CONV_INPUT_GRAD_ENV] = saved


def _rss_gib() -> float:
    """Current resident set size (Linux ``/proc``), in GiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="least rounds per method")
    ap.add_argument("--nt-rounds", type=int, default=3,
                    help="neural-tangents runs, each followed by a traindyn pass (default 3)")
    ap.add_argument("--no-nt", action="store_true")
    ap.add_argument("--nt-python", default=os.environ.get("NT_PYTHON", "/tmp/nt-env/bin/python"))
    ap.add_argument("--peak", type=int, default=0, help="only measure peak memory at this n")
    ap.add_argument("--only", default="", help="comma-separated case indices (default: all)")
    ap.add_argument("--quick", action="store_true", help="skip the slow explicit methods at n=128")
    ap.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--conv-routes", action="store_true",
                    help="only time the two routes of cut convolutions' transposed product")
    ap.add_argument("--device", default="cpu",
                    help="torch device of models and inputs (default cpu; e.g. cuda)")
    args = ap.parse_args()
    if args.smoke:  # the first case, one round, no neural-tangents, no peak-memory child
        args.quick, args.no_nt, args.repeats, args.only = True, True, 1, args.only or "0"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
        # one core for both sides (neural-tangents' subprocess is pinned to the same one)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.peak:
        peak(args.peak, device)
        return
    if args.conv_routes:
        conv_routes(args.repeats, device)
        return
    nt_python = None if args.no_nt or not Path(args.nt_python).exists() else args.nt_python
    if device.type != "cpu":
        nt_python = None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device} "
          f"({where}); neural-tangents python: {nt_python}")
    todo = cases(args.quick)
    if args.only:
        todo = [todo[int(i)] for i in args.only.split(",")]
    rows = [bench_case(name, model, x, output, args.repeats, methods, nt_python, skip, device,
                       args.nt_rounds)
            for name, model, x, output, methods, skip in todo]
    summary(rows)
    if args.smoke:
        return
    print("\npeak memory (fresh process):")
    subprocess.run([sys.executable, __file__, "--peak", "4096", "--device", args.device,
                    *(["--threads", str(args.threads)] if args.threads else [])], check=False)


if __name__ == "__main__":
    main()
