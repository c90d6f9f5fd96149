"""An adversarial campaign over traindyn on real models and real folders.

Each case builds a real structure (the zoo of ``tests/_zoo.py``: torchvision's ResNet-18 and
VGG-11, a ViT, GPT-2 / BERT from ``transformers`` configurations, an MLP with in-place ReLUs
and Dropout, a module called twice), a real folder (checkpoints beside foreign files,
symlinks, read-only folders, a Monitor's store, Trainer ``checkpoint-*`` folders, Lightning
``.ckpt`` files with EMA weights, safetensors with odd dtypes, Hugging Face folders) or
raw-scale data, measures it with traindyn and checks the value against a reference computed
independently in float64 (a plain forward pass whose hooks clone, numpy formulas, sklearn,
brute force).  Each case returns one class:

``correct``             the value agrees with the reference (or the right thing happened)
``clear error``         refused with a message saying what and why (no traceback at the CLI)
``NaN + warning``       NaN, and a warning says why
``NaN without warning`` NaN and no word
``silent wrong``        a number that disagrees with the reference, no word
``data lost``           a file traindyn did not write is gone or overwritten
``raw traceback``       a Python traceback or a library-internal error reaches the user
``security``            code from a checkpoint or folder ran

Run: ``python scripts/hostile_pass.py`` (about 2.5 minutes on two idle CPU cores); ``-k NAME``
runs the cases whose name contains NAME.  Exit status 1 when a case is in one of the last
five classes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests._zoo import ZOO  # noqa: E402

GOOD = ("correct", "clear error", "NaN + warning")
BAD = ("NaN without warning", "silent wrong", "data lost", "raw traceback", "security")
CLEAR_TYPES = (ValueError, KeyError, RuntimeError, TypeError, FileNotFoundError,
               FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
PYTHON = sys.executable
TRAINDYN = [PYTHON, "-m", "traindyn.dynamics.cli"]


@dataclass
class Result:
    cls: str
    measured: str = ""
    reference: str = ""
    note: str = ""


@dataclass
class Case:
    name: str
    structure: str
    path: str
    fn: Callable[[Path], Result]


CASES: list[Case] = []


def case(structure: str, path: str) -> Callable:
    def wrap(fn: Callable[[Path], Result]) -> Callable[[Path], Result]:
        CASES.append(Case(fn.__name__.removeprefix("case_"), structure, path, fn))
        return fn
    return wrap


# --------------------------------------------------------------------------- judging
def fmt(x: Any) -> str:
    if isinstance(x, float | np.floating):
        return f"{float(x):.6g}"
    return str(x)


def judge(measured: float, reference: float, warned: list, rtol: float = 1e-6,
          atol: float = 0.0, note: str = "") -> Result:
    """Classify a number against its float64 reference."""
    m, r = float(measured), float(reference)
    if math.isnan(m):
        if math.isnan(r):
            return Result("correct" if warned else "NaN without warning", fmt(m), fmt(r), note)
        return Result("NaN + warning" if warned else "NaN without warning", fmt(m), fmt(r),
                      note + (f" warning: {warned[0]}" if warned else ""))
    ok = abs(m - r) <= atol + rtol * abs(r)
    return Result("correct" if ok else "silent wrong", fmt(m), fmt(r), note)


def judge_error(fn: Callable[[], Any], words: tuple[str, ...] = ()) -> Result:
    """A call that must be refused: clear error when a traindyn-level exception names it."""
    try:
        value = fn()
    except CLEAR_TYPES as e:
        msg = str(e)
        internal = any(w in msg for w in ("must match the size", "mat1 and mat2",
                                          "expected scalar type", "index out of range"))
        if internal or (words and not any(w.lower() in msg.lower() for w in words)):
            return Result("raw traceback", f"{type(e).__name__}: {msg[:90]}", "a clear refusal")
        return Result("clear error", f"{type(e).__name__}: {msg[:90]}", "refusal")
    except Exception as e:  # noqa: BLE001 - classifying is the point
        return Result("raw traceback", f"{type(e).__name__}: {str(e)[:90]}", "a clear refusal")
    return Result("silent wrong", f"accepted: {fmt(value)[:60]}", "a refusal")


def cli(args: list[str], cwd: Path | None = None, stdin: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRAINDYN_NO_PROGRESS="1")
    return subprocess.run(TRAINDYN + args, cwd=cwd or ROOT, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def judge_cli_error(p: subprocess.CompletedProcess, words: tuple[str, ...] = ()) -> Result:
    text = p.stdout + p.stderr
    last = (p.stderr.strip().splitlines() or [""])[-1][:100]
    if "Traceback (most recent call last)" in text:
        return Result("raw traceback", f"rc={p.returncode} {last}", "rc!=0, a message")
    if p.returncode == 0:
        return Result("silent wrong", "rc=0", "rc!=0, a message")
    if words and not any(w.lower() in text.lower() for w in words):
        return Result("silent wrong", f"rc={p.returncode} {last}", f"a message naming {words}")
    return Result("clear error", f"rc={p.returncode} {last}", "rc!=0, a message")


# --------------------------------------------------------------------------- references
def ref_features(model: nn.Module, x: Any, layers: list[str], call: int = 0,
                 reduce: str = "flatten", mask: torch.Tensor | None = None
                 ) -> dict[str, np.ndarray]:
    """Each layer's output by value (a clone inside the hook), float64, eval mode."""
    out: dict[str, list] = {n: [] for n in layers}
    mods = dict(model.named_modules())
    handles = []
    for name in layers:
        def hook(_m, _i, o, name=name):
            o = o[0] if isinstance(o, tuple) else o
            out[name].append(o.detach().clone().double())
        handles.append(mods[name].register_forward_hook(hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(**x) if isinstance(x, dict) else model(x)
    model.train(was)
    for h in handles:
        h.remove()
    feats = {}
    for name, calls in out.items():
        t = calls[call]
        if reduce == "flatten":
            t = t.reshape(t.shape[0], -1)
        elif reduce == "cls":
            t = t[:, 0]
        elif reduce == "mean":
            if mask is None:
                t = t.mean(1)
            else:
                m = mask.double()[..., None]
                t = (t * m).sum(1) / m.sum(1)
        feats[name] = t.numpy()
    return feats


def np_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def np_pr(z: np.ndarray) -> float:
    zc = z - z.mean(0)
    g = zc @ zc.T  # the n × n Gram: tr C = tr G / n, ‖C‖_F = ‖G‖_F / n
    return float(np.trace(g) ** 2 / (g ** 2).sum())


def np_stable_rank(z: np.ndarray) -> float:
    s = np.linalg.svd(z, compute_uv=False)
    return float((s ** 2).sum() / s[0] ** 2)


def np_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x / np.abs(x).max()
    y = y / np.abs(y).max()
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def np_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), Eq. 5: diagonals zeroed."""
    n = len(k)
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def np_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return np_unbiased_hsic(k, l) / math.sqrt(np_unbiased_hsic(k, k) * np_unbiased_hsic(l, l))


def np_unit(z: np.ndarray) -> np.ndarray:
    z = z / np.abs(z).max(1, keepdims=True)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def caught(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        value = fn()
    kinds = RuntimeWarning | UserWarning
    return value, [str(x.message) for x in w if issubclass(x.category, kinds)]


def zoo(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    e = ZOO[name]
    return e.build(seed), e.inputs(48 if name not in ("resnet18", "vgg11") else 12, seed)


def captured(model: nn.Module, x: Any, layers: list[str], **kw: Any) -> dict[str, np.ndarray]:
    from traindyn.probes.capture import capture

    was = model.training
    model.eval()
    with capture(model, layers, **kw) as cap, torch.no_grad():
        if isinstance(x, dict):
            cap.attention_mask = x.get("attention_mask")
            model(**x)
        else:
            model(x)
    model.train(was)
    return {n: cap[n].double().numpy() for n in layers}


# =========================================================================== capture, zoo
@case("ResNet-18 (torchvision)", "capture → rankme, layer1.0.bn1 (then relu in place)")
def case_resnet_bn_before_inplace_relu(tmp: Path) -> Result:
    from traindyn.probes.spectral import rankme

    model, x = zoo("resnet18")
    layer = "layer1.0.bn1"
    ref = np_rankme(ref_features(model, x, [layer])[layer])
    got, w = caught(lambda: rankme(captured(model, x, [layer])[layer]))
    return judge(got, ref, w)


@case("ResNet-18 (torchvision)", "capture, layer1.0.relu called twice")
def case_resnet_shared_relu_refused(tmp: Path) -> Result:
    model, x = zoo("resnet18")
    return judge_error(lambda: captured(model, x, ["layer1.0.relu"]), ("relu", "called"))


@case("ResNet-18 (torchvision)", "capture calls='last', layer1.0.relu → participation ratio")
def case_resnet_shared_relu_last(tmp: Path) -> Result:
    from traindyn.probes.spectral import participation_ratio

    model, x = zoo("resnet18")
    layer = "layer1.0.relu"
    ref = np_pr(ref_features(model, x, [layer], call=1)[layer])
    got, w = caught(lambda: participation_ratio(captured(model, x, [layer], calls="last")[layer]))
    return judge(got, ref, w)


@case("ResNet-18 (torchvision)", "capture calls='first', layer1.0.relu → stable rank")
def case_resnet_shared_relu_first(tmp: Path) -> Result:
    from traindyn.probes.spectral import stable_rank

    model, x = zoo("resnet18")
    layer = "layer1.0.relu"
    ref = np_stable_rank(ref_features(model, x, [layer], call=0)[layer])
    got, w = caught(lambda: stable_rank(captured(model, x, [layer], calls="first")[layer]))
    return judge(got, ref, w)


@case("ResNet-18 (torchvision)", "capture layer1.0.bn2 (out += identity in place) → rankme")
def case_resnet_bn2_residual_inplace(tmp: Path) -> Result:
    from traindyn.probes.spectral import rankme

    model, x = zoo("resnet18")
    layer = "layer1.0.bn2"
    ref = np_rankme(ref_features(model, x, [layer])[layer])
    got, w = caught(lambda: rankme(captured(model, x, [layer])[layer]))
    return judge(got, ref, w)


@case("VGG-11 (torchvision)", "capture features.0 (conv, then ReLU in place) → rankme")
def case_vgg_conv_before_inplace(tmp: Path) -> Result:
    from traindyn.probes.spectral import rankme

    model, x = zoo("vgg11")
    layer = "features.0"
    ref = np_rankme(ref_features(model, x, [layer])[layer])
    got, w = caught(lambda: rankme(captured(model, x, [layer])[layer]))
    return judge(got, ref, w)


@case("VGG-11 (torchvision)", "capture classifier.0 (Linear → ReLU(True) → Dropout), train mode")
def case_vgg_classifier_train_mode_capture(tmp: Path) -> Result:
    """Capture in train mode is what the user asked for: the reference is the same train-mode
    pass (Dropout after the layer does not touch it, the in-place ReLU would)."""
    from traindyn.probes.capture import capture

    model, x = zoo("vgg11")
    layer = "classifier.0"
    store = []
    h = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: store.append(o.detach().clone()))
    torch.manual_seed(1)
    with capture(model, [layer]) as cap, torch.no_grad():
        model(x)
    h.remove()
    got = cap[layer].double().numpy()
    return judge(float(np.abs(got - store[0].numpy()).max()), 0.0, [], atol=0.0,
                 note="max |captured − clone| in the same pass")


@case("ViT (transformers)", "capture layers.0 reduce=cls → rankme")
def case_vit_cls(tmp: Path) -> Result:
    from traindyn.probes.spectral import rankme

    model, x = zoo("vit")
    layer = "layers.0"
    ref = np_rankme(ref_features(model, x, [layer], reduce="cls")[layer])
    got, w = caught(lambda: rankme(captured(model, x, [layer], reduce="cls")[layer]))
    return judge(got, ref, w)


@case("GPT-2 (transformers)", "capture h.0 (tuple output) reduce=mean → participation ratio")
def case_gpt2_mean(tmp: Path) -> Result:
    from traindyn.probes.spectral import participation_ratio

    model, x = zoo("gpt2")
    layer = "h.0"
    ref = np_pr(ref_features(model, x, [layer], reduce="mean")[layer])
    got, w = caught(lambda: participation_ratio(captured(model, x, [layer],
                                                         reduce="mean")[layer]))
    return judge(got, ref, w)


@case("BERT (transformers), padded", "capture encoder.layer.1 masked mean → rankme")
def case_bert_masked_mean(tmp: Path) -> Result:
    from traindyn.probes.spectral import rankme

    model, x = zoo("bert")
    layer = "encoder.layer.1"
    ref = np_rankme(ref_features(model, x, [layer], reduce="mean",
                                 mask=x["attention_mask"])[layer])
    got, w = caught(lambda: rankme(captured(model, x, [layer], reduce="mean")[layer]))
    return judge(got, ref, w)


@case("BERT (transformers), padded", "capture.run over a loader of dict batches, masked mean")
def case_bert_run_loader(tmp: Path) -> Result:
    from traindyn.probes.capture import capture
    from traindyn.probes.spectral import rankme

    model, x = zoo("bert")
    layer = "encoder.layer.0"
    ref = np_rankme(ref_features(model, x, [layer], reduce="mean",
                                 mask=x["attention_mask"])[layer])
    batches = [{k: v[i:i + 16] for k, v in x.items()} for i in range(0, 48, 16)]
    model.eval()
    with capture(model, [layer], reduce="mean") as cap:
        cap.run(batches)
    got, w = caught(lambda: rankme(cap[layer]))
    return judge(got, ref, w)


@case("MLP, ReLU(inplace) + Dropout", "capture '0' on uint8-scale inputs (0..255) → rankme")
def case_mlp_uint8_scale(tmp: Path) -> Result:
    from traindyn.probes.spectral import rankme

    model, _ = zoo("mlp")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (64, 16), generator=g).double()
    ref = np_rankme(ref_features(model, x, ["0"])[layer := "0"])
    got, w = caught(lambda: rankme(captured(model, x, [layer])[layer]))
    return judge(got, ref, w)


@case("MLP, ReLU(inplace) + Dropout", "capture float32 model, dtype=float64 → rankme")
def case_mlp_float32_capture(tmp: Path) -> Result:
    from traindyn.probes.spectral import rankme

    model, x = zoo("mlp")
    m32 = model.float()
    ref = np_rankme(ref_features(m32, x.float(), ["3"])["3"])
    got, w = caught(lambda: rankme(captured(m32, x.float(), ["3"], dtype=torch.float64)["3"]))
    return judge(got, ref, w, rtol=1e-6)


@case("module called twice", "capture the shared ReLU 'act' with defaults")
def case_shared_refused(tmp: Path) -> Result:
    model, x = zoo("shared")
    return judge_error(lambda: captured(model, x, ["act"]), ("act",))


@case("module called twice", "capture with a glob matching nothing ('blocks.*')")
def case_glob_matches_nothing(tmp: Path) -> Result:
    model, x = zoo("shared")
    return judge_error(lambda: captured(model, x, ["blocks.*"]), ("blocks",))


# =========================================================================== similarity
@case("VGG-11 raw pixels vs logits", "linear_cka(uint8-scale input, classifier.6 logits)")
def case_cka_pixels_vs_logits(tmp: Path) -> Result:
    from traindyn.probes.similarity import linear_cka

    model, x = zoo("vgg11")
    pix = (x.reshape(len(x), -1) * 60 + 128).numpy()
    logits = ref_features(model, x, ["classifier.6"])["classifier.6"] * 1e-3
    got, w = caught(lambda: linear_cka(pix, logits))
    return judge(got, np_cka(pix, logits), w, rtol=1e-8)


@case("MLP on 1e4-scale features", "linear_cka(layer '0', layer '5'), inputs ×1e4")
def case_cka_1e4_scale(tmp: Path) -> Result:
    from traindyn.probes.similarity import linear_cka

    model, x = zoo("mlp")
    f = ref_features(model, x * 1e4, ["0", "5"])
    got, w = caught(lambda: linear_cka(f["0"], f["5"]))
    return judge(got, np_cka(f["0"], f["5"]), w, rtol=1e-8)


@case("GPT-2 h.0 vs h.1 features ×1e-150", "linear_cka at tiny scale")
def case_cka_tiny_scale(tmp: Path) -> Result:
    from traindyn.probes.similarity import linear_cka

    model, x = zoo("gpt2")
    f = ref_features(model, x, ["h.0", "h.1"], reduce="mean")
    a, b = f["h.0"] * 1e-150, f["h.1"] * 1e-150
    got, w = caught(lambda: linear_cka(a, b))
    return judge(got, np_cka(f["h.0"], f["h.1"]), w, rtol=1e-8)


@case("ResNet-18 avgpool vs fc, offset 3e3", "debiased_cka with a constant offset")
def case_debiased_cka_offset(tmp: Path) -> Result:
    from traindyn.probes.similarity import debiased_cka

    model, x = zoo("resnet18")
    x = torch.cat([x, zoo("resnet18", 1)[1], zoo("resnet18", 2)[1]])
    f = ref_features(model, x, ["avgpool", "fc"])
    a, b = f["avgpool"] + 3e3, f["fc"]
    ref = np_debiased_cka(f["avgpool"] - f["avgpool"].mean(0), b - b.mean(0))
    got, w = caught(lambda: debiased_cka(a, b))
    return judge(got, ref, w, rtol=1e-6)


@case("ViT layers.1 features, rotated", "procrustes_distance(X, X·Q) with orthogonal Q, ×1e5")
def case_procrustes_rotation(tmp: Path) -> Result:
    from traindyn.probes.similarity import procrustes_distance

    model, x = zoo("vit")
    f = ref_features(model, x, ["layers.1"], reduce="cls")["layers.1"] * 1e5
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(f.shape[1], f.shape[1])))
    got, w = caught(lambda: procrustes_distance(f, f @ q))
    return judge(got, 0.0, w, atol=1e-6, note="rotation invariance: reference 0")


@case("MLP layers '0' vs '3'", "rbf_cka equals itself on permuted samples (same order both)")
def case_rbf_cka_permutation(tmp: Path) -> Result:
    from traindyn.probes.similarity import rbf_cka

    model, x = zoo("mlp")
    f = ref_features(model, x, ["0", "3"])
    perm = np.random.default_rng(1).permutation(len(x))
    ref = rbf_cka(f["0"], f["3"])
    got, w = caught(lambda: rbf_cka(f["0"][perm], f["3"][perm]))
    return judge(got, ref, w, rtol=1e-9, note="reference: rbf_cka on the unpermuted samples")


@case("two nets, different batches", "linear_cka of 48 vs 40 samples")
def case_cka_row_mismatch(tmp: Path) -> Result:
    from traindyn.probes.similarity import linear_cka

    r = np.random.default_rng(0)
    return judge_error(lambda: linear_cka(r.normal(size=(48, 8)), r.normal(size=(40, 8))),
                       ("48", "40", "rows", "samples"))


# =========================================================================== readout
def _blobs(n: int = 120, d: int = 10, c: int = 3, scale: float = 1.0, seed: int = 0):
    r = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = r.normal(size=(c, d)) * 2.0
    return (centres[y] + r.normal(size=(n, d))) * scale, y


@case("features ×1e4 (raw-scale)", "linear_probe(ridge=λ fixed) accuracy vs sklearn Ridge")
def case_linear_probe_sklearn(tmp: Path) -> Result:
    from sklearn.linear_model import Ridge
    from traindyn.probes.readout import held_out_mask, linear_probe

    x, y = _blobs(scale=1e4, c=3)
    x[:, 0] += 5e4
    lam = 1e8 * 3.0
    held = held_out_mask(np.arange(len(y)), 0.25, 0)
    onehot = np.eye(3)[y]
    model = Ridge(alpha=lam, fit_intercept=True).fit(x[~held], onehot[~held])
    ref = float((model.predict(x[held]).argmax(1) == y[held]).mean())
    got, w = caught(lambda: linear_probe(x, y, ridge=lam)["linear_probe_accuracy"])
    return judge(got, ref, w, rtol=0, atol=1e-12)


@case("uint8-scale features", "knn_accuracy(k=5, cosine, held out) vs sklearn")
def case_knn_sklearn(tmp: Path) -> Result:
    from sklearn.neighbors import KNeighborsClassifier
    from traindyn.probes.readout import held_out_mask, knn_accuracy

    x, y = _blobs(n=150, c=2, seed=2)
    x = np.clip(np.round(x * 30 + 128), 0, 255)
    held = held_out_mask(np.arange(len(y)), 0.25, 0)
    knn = KNeighborsClassifier(5, metric="cosine", algorithm="brute").fit(x[~held], y[~held])
    ref = float((knn.predict(x[held]) == y[held]).mean())
    got, w = caught(lambda: knn_accuracy(x, y, k=5))
    return judge(got, ref, w, rtol=0, atol=1e-12)


@case("uint8-scale features", "knn_accuracy(split='loo', euclidean) vs brute force")
def case_knn_loo(tmp: Path) -> Result:
    from traindyn.probes.readout import knn_accuracy

    x, y = _blobs(n=90, c=3, seed=4)
    x = np.clip(np.round(x * 30 + 128), 0, 255)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn_idx = np.argsort(d, 1, kind="stable")[:, :7]
    votes = np.array([np.bincount(y[i], minlength=3) for i in nn_idx])
    ref = float((votes.argmax(1) == y).mean())
    got, w = caught(lambda: knn_accuracy(x, y, k=7, split="loo", metric="euclidean"))
    return judge(got, ref, w, rtol=0, atol=1e-12, note="ties possible in the vote")


@case("two views, features ×1e4", "alignment(z1, z2) vs numpy")
def case_alignment_scale(tmp: Path) -> Result:
    from traindyn.probes.readout import alignment

    r = np.random.default_rng(5)
    z1 = r.normal(size=(64, 16)) * 1e4
    z2 = z1 + r.normal(size=z1.shape) * 3e3
    ref = float((np.linalg.norm(np_unit(z1) - np_unit(z2), axis=1) ** 2).mean())
    got, w = caught(lambda: alignment(z1, z2))
    return judge(got, ref, w, rtol=1e-10)


@case("features ×1e200", "uniformity(z) vs numpy on unit rows")
def case_uniformity_huge(tmp: Path) -> Result:
    from traindyn.probes.readout import uniformity

    r = np.random.default_rng(6)
    z = r.normal(size=(50, 3))
    u = np_unit(z)
    sq = ((u[:, None] - u[None]) ** 2).sum(-1)[np.triu_indices(50, 1)]
    ref = float(np.log(np.exp(-2 * sq).mean()))
    got, w = caught(lambda: uniformity(z * 1e200))
    return judge(got, ref, w, rtol=1e-10)


@case("near-duplicate views (cos ≈ 1 − 1e-12)", "uniformity of tightly clustered points")
def case_uniformity_cluster(tmp: Path) -> Result:
    from traindyn.probes.readout import uniformity

    r = np.random.default_rng(7)
    base = r.normal(size=(1, 8))
    z = base + r.normal(size=(40, 8)) * 1e-3
    u = np_unit(z)
    sq = ((u[:, None] - u[None]) ** 2).sum(-1)[np.triu_indices(40, 1)]
    ref = float(np.log(np.exp(-2 * sq).mean()))
    got, w = caught(lambda: uniformity(z))
    return judge(got, ref, w, rtol=1e-6, note="2 − 2cos loses digits: ~1e-6 relative allowed")


@case("string class names", "class_rankme refuses names it cannot order, saying to map them")
def case_class_rankme_strings(tmp: Path) -> Result:
    from traindyn.probes.readout import class_rankme

    x, y = _blobs(n=61, c=3, seed=8)
    names = np.array(["cat", "dog", "emu"])[y]
    return judge_error(lambda: class_rankme(x, names), ("class names", "map them"))


# =========================================================================== collapse, weights
@case("module called twice (head = classifier)", "collapse_with_classifier fc2 → nc1 vs numpy")
def case_collapse_nc1(tmp: Path) -> Result:
    from traindyn.probes.collapse import collapse_with_classifier

    model, x = zoo("shared")
    y = np.arange(len(x)) % 4
    model.eval()
    ds, w = caught(lambda: collapse_with_classifier(model, x, y, ["fc2"], "head"))
    h = ref_features(model, x, ["fc2"])["fc2"]
    mu = np.stack([h[y == c].mean(0) for c in range(4)])
    sw = sum(((h[y == c] - mu[c]).T @ (h[y == c] - mu[c])) for c in range(4)) / len(h)
    mt = mu - mu.mean(0)
    sb = mt.T @ mt / 4
    ref = float(np.trace(sw @ np.linalg.pinv(sb)) / 4)
    got = float(ds["nc1"].sel(layer="fc2")) if "layer" in ds["nc1"].dims else float(ds["nc1"])
    nan3 = [v for v in ("nc3", "nc4") if np.isnan(np.asarray(ds[v])).all()]
    res = judge(got, ref, w, rtol=1e-6)
    if nan3 and res.cls == "correct":
        return Result("NaN without warning" if not w else "NaN + warning", res.measured,
                      res.reference, f"{nan3} NaN with classifier= given")
    return res


@case("ResNet-18 (torchvision)", "weight_spectra on 'relu' (no weights)")
def case_weight_spectra_relu(tmp: Path) -> Result:
    from traindyn.probes.weights import weight_spectra

    model, _ = zoo("resnet18")
    return judge_error(lambda: weight_spectra(model, ["relu"]), ("relu",))


@case("ResNet-18 (torchvision)", "weight_spectra 'fc' → top singular value² vs numpy")
def case_weight_spectra_fc(tmp: Path) -> Result:
    from traindyn.probes.weights import weight_spectra

    model, _ = zoo("resnet18")
    ds, w = caught(lambda: weight_spectra(model, ["fc"]))
    s = np.linalg.svd(model.fc.weight.detach().numpy(), compute_uv=False)
    names = [v for v in ds.data_vars if "stable" in v]
    if not names:
        return Result("silent wrong", str(list(ds.data_vars))[:80], "a stable-rank variable")
    got = float(np.asarray(ds[names[0]]).ravel()[0])
    return judge(got, float((s ** 2).sum() / s[0] ** 2), w, rtol=1e-8,
                 note=f"variable {names[0]}")


# =========================================================================== NTK, invariance
def _brute_ntk(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    rows = []
    for i in range(len(x)):
        out = model(x[i:i + 1])[0]
        for k in range(out.shape[0]):
            g = torch.autograd.grad(out[k], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    jac = torch.stack(rows).reshape(len(x), -1, rows[0].numel())
    return torch.einsum("akp,bkp->ab", jac, jac).detach().numpy()


@case("MLP, ReLU(inplace) + Dropout, train mode", "empirical_ntk on the train-mode model")
def case_ntk_mlp_train_mode(tmp: Path) -> Result:
    from traindyn.probes.ntk import empirical_ntk

    model, x = zoo("mlp")
    return judge_error(lambda: empirical_ntk(model, x[:5]), ("dropout", "eval"))


@case("MLP, ReLU(inplace) + Dropout, eval mode", "empirical_ntk vs brute-force Jacobians")
def case_ntk_mlp_eval(tmp: Path) -> Result:
    from traindyn.probes.ntk import empirical_ntk

    model, x = zoo("mlp")
    model.eval()
    x = x[:5] * 255.0
    ref = _brute_ntk(model, x)
    K, w = caught(lambda: empirical_ntk(model, x))
    err = float(np.abs(K.detach().numpy() - ref).max() / np.abs(ref).max())
    return judge(err, 0.0, w, atol=1e-10, note="max relative |K − K_ref|, inputs ×255")


@case("ResNet-18 head (avgpool → fc), eval", "empirical_ntk params='fc' vs brute force")
def case_ntk_resnet_fc(tmp: Path) -> Result:
    from traindyn.probes.ntk import empirical_ntk

    model, x = zoo("resnet18")
    model.eval()
    x = x[:3]
    feats = torch.from_numpy(ref_features(model, x, ["avgpool"])["avgpool"])
    # the fc NTK: Θ(a, b) = k (1 + h_a · h_b) with k outputs (weight and bias Jacobians)
    ref = (model.fc.out_features * (1.0 + feats @ feats.T)).numpy()
    K, w = caught(lambda: empirical_ntk(model, x, params="fc"))
    err = float(np.abs(K.detach().numpy() - ref).max() / np.abs(ref).max())
    return judge(err, 0.0, w, atol=1e-10, note="closed form of a last-layer NTK")


@case("BERT with attention mask", "empirical_ntk on a dict batch")
def case_ntk_dict_batch(tmp: Path) -> Result:
    from traindyn.probes.ntk import empirical_ntk

    model, x = zoo("bert")
    return judge_error(lambda: empirical_ntk(model, {k: v[:3] for k, v in x.items()}),
                       ("dict", "mapping", "tensor", "input"))


@case("MLP in train mode (Dropout)", "invariance_scores identity transform → 0, state kept")
def case_invariance_identity(tmp: Path) -> Result:
    from traindyn.probes.invariance import invariance_scores

    model, x = zoo("mlp")
    ds, w = caught(lambda: invariance_scores(model, x, {"id": lambda t: t}, layers=["3"]))
    var = [v for v in ds.data_vars if "invariance" in v or "distance" in v]
    got = float(np.nanmax(np.abs(np.asarray(ds[var[0]])))) if var else float("nan")
    if not model.training:
        return Result("silent wrong", "model left in eval mode", "train mode restored")
    return judge(got, 0.0, w, atol=1e-12, note=f"variable {var[0] if var else None}")


@case("ResNet-18 in train mode (BatchNorm)", "invariance_scores keeps running statistics")
def case_invariance_bn_stats(tmp: Path) -> Result:
    from traindyn.probes.invariance import invariance_scores

    model, x = zoo("resnet18")
    before = model.bn1.running_mean.clone()
    caught(lambda: invariance_scores(model, x[:4], {"flip": lambda t: t.flip(-1)},
                                     layers=["avgpool"]))
    return judge(float((model.bn1.running_mean - before).abs().max()), 0.0, [], atol=0.0,
                 note="max change of bn1.running_mean")


# =========================================================================== Monitor
def _monitor_value(mode: Any, probe: str, layer: str, tmp: Path | None = None,
                   **kw: Any) -> tuple[float, float, list]:
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear

    model, x = zoo("mlp")
    ref_fn = {"rankme": np_rankme, "participation_ratio": np_pr,
              "stable_rank": np_stable_rank}[probe]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Monitor(model, probes=[probe], layers=[layer], schedule=linear(1), probe_data=x,
                     learning_rate=0.1, background=mode, **kw) as mon:
            mon.step(0)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.1)
            mon.step(1)
        ds = mon.to_dataset()
    got = float(ds[probe].sel(layer=layer).isel(step=-1).squeeze())
    ref = ref_fn(ref_features(model, x, [layer])[layer])
    return got, ref, [str(m.message) for m in w]


@case("MLP, ReLU(inplace) + Dropout, train mode", "Monitor sync, rankme of '0' at step 1")
def case_monitor_sync(tmp: Path) -> Result:
    return judge(*_monitor_value(False, "rankme", "0"), rtol=1e-7)


@case("MLP, ReLU(inplace) + Dropout, train mode", "Monitor thread, participation ratio '3'")
def case_monitor_thread(tmp: Path) -> Result:
    return judge(*_monitor_value("thread", "participation_ratio", "3"), rtol=1e-7)


@case("MLP, ReLU(inplace) + Dropout, train mode", "Monitor process, stable rank of '0'")
def case_monitor_process(tmp: Path) -> Result:
    return judge(*_monitor_value("process", "stable_rank", "0"), rtol=1e-7)


@case("MLP", "Monitor.step(s, rankme=…) colliding with the probe")
def case_monitor_scalar_collision(tmp: Path) -> Result:
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear

    model, x = zoo("mlp")

    def go() -> Any:
        with Monitor(model, probes=["rankme"], layers=["0"], schedule=linear(1),
                     probe_data=x) as mon:
            mon.step(0, rankme=3.0)
        return mon.to_dataset()["rankme"].values
    return judge_error(go, ("rankme",))


_THREAD_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests._zoo import ZOO
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import linear
e = ZOO["mlp"]; model = e.build(); x = e.inputs(256, 0)
mon = Monitor(model, probes=["rankme", "participation_ratio"], layers=["0", "3"],
              schedule=linear(1), probe_data=x, background="thread", store={store!r})
for s in range(18):
    mon.step(s)
print("loop done")
"""


@case("MLP, thread Monitor with a store", "loop ends without close() (README-tour style)")
def case_monitor_thread_no_close(tmp: Path) -> Result:
    import xarray as xr

    store = tmp / "run.zarr"
    code = _THREAD_SCRIPT.format(root=str(ROOT), store=str(store))
    p = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp)
    if "Traceback" in p.stderr:
        return Result("raw traceback", p.stderr.strip().splitlines()[-1][:90], "18 steps")
    try:
        n = xr.open_zarr(store)["step"].size
    except Exception as e:  # noqa: BLE001
        return Result("data lost", f"store unreadable: {type(e).__name__}", "18 steps")
    return Result("correct" if n == 18 else "data lost", f"{n} steps", "18 steps")


@case("MLP, Monitor store on a user's folder", "store= an existing folder of foreign files")
def case_monitor_store_foreign(tmp: Path) -> Result:
    from traindyn.dynamics.monitor import Monitor

    folder = tmp / "results.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    model, x = zoo("mlp")

    def go() -> Any:
        with Monitor(model, probes=["rankme"], layers=["0"], probe_data=x, store=folder) as m:
            m.step(0)
    res = judge_error(go, ("results.zarr", "overwrite", "not"))
    if not (folder / "notes.txt").exists():
        return Result("data lost", "notes.txt removed", "notes.txt kept")
    return res


@case("MLP, Monitor resume=True", "resume a store with another learning rate")
def case_monitor_resume_lr(tmp: Path) -> Result:
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear

    store = tmp / "run.zarr"
    model, x = zoo("mlp")
    with Monitor(model, probes=["rankme"], layers=["0"], probe_data=x, store=store,
                 schedule=linear(1), learning_rate=0.1) as m:
        m.step(0)

    def go() -> Any:
        with Monitor(model, probes=["rankme"], layers=["0"], probe_data=x, store=store,
                     schedule=linear(1), learning_rate=0.5, resume=True) as m2:
            m2.step(1)
    return judge_error(go, ("learning", "0.5", "0.1"))


@case("MLP, netcdf= a path under a regular file", "Monitor netcdf='notes.txt/run.nc'")
def case_monitor_netcdf_under_file(tmp: Path) -> Result:
    from traindyn.dynamics.monitor import Monitor

    (tmp / "notes.txt").write_text("mine")
    model, x = zoo("mlp")

    def go() -> Any:
        with Monitor(model, probes=["rankme"], layers=["0"], probe_data=x,
                     netcdf=tmp / "notes.txt" / "run.nc") as m:
            m.step(0)
    res = judge_error(go, ("notes.txt", "directory", "folder"))
    if (tmp / "notes.txt").read_text() != "mine":
        return Result("data lost", "notes.txt replaced", "kept")
    return res


# =========================================================================== kernel_flow, predict
def _kernel_problem(n: int = 12, k: int = 3, seed: int = 0):
    r = np.random.default_rng(seed)
    j = r.normal(size=(n, 40))
    theta = j @ j.T / 40
    y = np.eye(k)[np.arange(n) % k]
    f0 = r.normal(size=(n, k)) * 0.3
    return theta, y, f0


@case("NTK of a wide layer (Gram of random features)", "kernel_flow mse gd vs brute-force loop")
def case_kernel_flow_mse_gd(tmp: Path) -> Result:
    from traindyn.theory.kernel_flow import kernel_flow

    theta, y, f0 = _kernel_problem()
    eta, c = 0.5, 12.0
    f = f0.copy()
    for _ in range(37):
        f = f - eta / c * theta @ (f - y)
    ds, w = caught(lambda: kernel_flow(theta, y, [37], eta, f0_train=f0, normalization=c))
    var = ["f_train"]
    got = np.asarray(ds[var[0]]).reshape(f.shape)
    return judge(float(np.abs(got - f).max()), 0.0, w, atol=1e-10,
                 note=f"max |f − f_ref| ({var[0]})")


@case("NTK of a wide layer", "kernel_flow cross_entropy gd vs brute-force loop")
def case_kernel_flow_ce_gd(tmp: Path) -> Result:
    from traindyn.theory.kernel_flow import kernel_flow

    theta, y, f0 = _kernel_problem(seed=1)
    eta, c = 2.0, 12.0
    f = f0.copy()
    for _ in range(25):
        p = np.exp(f - f.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        f = f - eta / c * theta @ (p - y)
    ds, w = caught(lambda: kernel_flow(theta, y, [25], eta, f0_train=f0, normalization=c,
                                       loss="cross_entropy"))
    var = ["f_train"]
    got = np.asarray(ds[var[0]]).reshape(f.shape)
    return judge(float(np.abs(got - f).max()), 0.0, w, atol=1e-9,
                 note=f"max |f − f_ref| ({var[0]})")


@case("NTK with a negative eigenvalue (float32 round-off ×1e3)", "kernel_flow non-PSD kernel")
def case_kernel_flow_not_psd(tmp: Path) -> Result:
    from traindyn.theory.kernel_flow import kernel_flow

    theta, y, f0 = _kernel_problem()
    lam, u = np.linalg.eigh(theta)
    lam[0] = -0.5 * lam[-1]
    bad = (u * lam) @ u.T
    return judge_error(lambda: kernel_flow(bad, y, [10], 0.5, f0_train=f0),
                       ("semi", "psd", "eigen", "negative"))


@case("MLP, ReLU(inplace) + Dropout, train mode", "predict_from_model: step-0 outputs = eval f₀")
def case_predict_f0_eval(tmp: Path) -> Result:
    from traindyn.dynamics.predict import predict_from_model

    model, x = zoo("mlp")
    x, y = x[:10], np.eye(4)[np.arange(10) % 4]
    model.eval()
    with torch.no_grad():
        f0 = model(x).numpy()
    model.train()
    ds, w = caught(lambda: predict_from_model(model, x, y, [0], 0.1, loss="mse"))
    var = ["f_train"]
    got = np.asarray(ds[var[0]]).reshape(f0.shape)
    return judge(float(np.abs(got - f0).max()), 0.0, w, atol=1e-10,
                 note=f"max |f − f_eval| ({var[0]})")


@case("MLP, one real SGD step (lr 1e-4)", "predict_from_model step 1 vs the trained network")
def case_predict_one_step(tmp: Path) -> Result:
    from traindyn.dynamics.predict import predict_from_model

    model, x = zoo("mlp")
    model.eval()
    x, y = x[:10], np.eye(4)[np.arange(10) % 4]
    with torch.no_grad():
        f0 = model(x).numpy()
    ds, w = caught(lambda: predict_from_model(model, x, y, [1], 1e-4, loss="mse",
                                              normalization=10.0))
    got = np.asarray(ds["f_train"]).reshape(10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss = 0.5 * ((model(x) - torch.from_numpy(y)) ** 2).sum() / 10.0
    loss.backward()
    opt.step()
    with torch.no_grad():
        f1 = model(x).numpy()
    rel = float(np.abs((got - f0) - (f1 - f0)).max() / np.abs(f1 - f0).max())
    return judge(rel, 0.0, w, atol=1e-3,
                 note="relative error of the one-step change; O(lr) = 1e-4 expected")


# =========================================================================== CLI
FACTORY = '''
import torch
from torch import nn
{extra}
def make():
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(inplace=True), nn.Dropout(0.2),
                         nn.Linear(24, 24), nn.ReLU(inplace=True), nn.Linear(24, 4))
'''


def _series(tmp: Path, steps: tuple[int, ...] = (10, 20), extra: str = "",
            fmt: str = "pt") -> tuple[Path, str, Path, dict[int, dict]]:
    """A folder of state dicts, its factory file and a uint8-scale input file."""
    folder = tmp / "ckpts"
    folder.mkdir(exist_ok=True)
    fac = tmp / "factory.py"
    fac.write_text(FACTORY.format(extra=extra))
    states = {}
    for s in steps:
        torch.manual_seed(s)
        m = ZOO["mlp"].make()
        states[s] = {k: v.clone() for k, v in m.state_dict().items()}
        if fmt == "pt":
            torch.save(states[s], folder / f"step{s}.pt")
        else:
            from safetensors.torch import save_file
            save_file(states[s], str(folder / f"checkpoint-{s}.safetensors"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 16), generator=g).double().numpy()
    np.save(tmp / "x.npy", x)
    return folder, f"{fac}:make", tmp / "x.npy", states


def _ref_rankme(state: dict, x: np.ndarray, layer: str = "0") -> float:
    m = ZOO["mlp"].make().double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    return np_rankme(ref_features(m, torch.from_numpy(x), [layer])[layer])


def _analyze(folder: Path, fac: str, xfile: Path, out: Path, *more: str
             ) -> subprocess.CompletedProcess:
    return cli(["analyze", str(folder), "--model", fac, "--inputs", str(xfile), "--layers", "0",
                "--probes", "rankme", "--dtype", "float64", "--no-figures", "--no-progress",
                "-o", str(out), *more])


def _read_rankme(out: Path, step: int, layer: str = "0") -> float:
    import xarray as xr

    with xr.open_dataset(out) as ds:
        return float(ds["rankme"].sel(step=step, layer=layer).squeeze())


@case("folder of state dicts + factory", "traindyn analyze, uint8-scale .npy inputs → rankme")
def case_cli_analyze_values(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp)
    out = tmp / "geo.nc"
    p = _analyze(folder, fac, xfile, out)
    if p.returncode != 0:
        return judge_cli_error(p)
    return judge(_read_rankme(out, 20), _ref_rankme(states[20], np.load(xfile)), [], rtol=1e-7)


@case("Trainer-style checkpoint-N.safetensors", "traindyn analyze on safetensors names")
def case_cli_analyze_safetensors(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp, fmt="safetensors")
    out = tmp / "geo.nc"
    p = _analyze(folder, fac, xfile, out)
    if p.returncode != 0:
        return judge_cli_error(p)
    return judge(_read_rankme(out, 10), _ref_rankme(states[10], np.load(xfile)), [], rtol=1e-7)


@case("safetensors with an int64 tensor in a float weight", "traindyn analyze dtype kinds")
def case_cli_safetensors_int_weight(tmp: Path) -> Result:
    from safetensors.torch import save_file

    folder, fac, xfile, states = _series(tmp, steps=(10,))
    (folder / "step10.pt").unlink()
    bad = dict(states[10])
    bad["0.weight"] = (bad["0.weight"] * 100).long()
    save_file(bad, str(folder / "checkpoint-10.safetensors"))
    return judge_cli_error(_analyze(folder, fac, xfile, tmp / "o.nc"), ("dtype", "int64"))


@case("output path = a foreign file", "traindyn analyze -o notes.nc (not written by traindyn)")
def case_cli_output_foreign_file(tmp: Path) -> Result:
    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    out = tmp / "notes.nc"
    out.write_text("my notes")
    res = judge_cli_error(_analyze(folder, fac, xfile, out), ("overwrite",))
    if not out.exists() or out.read_text() != "my notes":
        return Result("data lost", "notes.nc replaced", "kept")
    return res


@case("output path = symlink to a foreign folder", "traindyn analyze -o link.zarr")
def case_cli_output_symlink(tmp: Path) -> Result:
    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    target = tmp / "precious"
    target.mkdir()
    (target / "data.bin").write_bytes(b"\x00" * 10)
    link = tmp / "link.zarr"
    link.symlink_to(target)
    res = judge_cli_error(_analyze(folder, fac, xfile, link), ("overwrite",))
    if not (target / "data.bin").exists():
        return Result("data lost", "data.bin removed", "kept")
    return res


@case("output = a Monitor's .zarr store", "traindyn analyze -o run.zarr (Monitor recording)")
def case_cli_output_monitor_store(tmp: Path) -> Result:
    from traindyn.dynamics.monitor import Monitor

    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    store = tmp / "run.zarr"
    model, x = zoo("mlp")
    with Monitor(model, probes=["rankme"], layers=["0"], probe_data=x, store=store) as m:
        m.step(0)
    res = judge_cli_error(_analyze(folder, fac, xfile, store), ("overwrite", "Monitor"))
    import xarray as xr
    try:
        xr.open_zarr(store)["rankme"].load()
    except Exception:  # noqa: BLE001
        return Result("data lost", "Monitor store unreadable", "kept")
    return res


@case("output under a regular file", "traindyn analyze -o notes.txt/geo.nc")
def case_cli_output_under_file(tmp: Path) -> Result:
    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    (tmp / "notes.txt").write_text("mine")
    res = judge_cli_error(_analyze(folder, fac, xfile, tmp / "notes.txt" / "geo.nc"),
                          ("notes.txt", "directory", "folder"))
    if (tmp / "notes.txt").read_text() != "mine":
        return Result("data lost", "notes.txt replaced", "kept")
    return res


@case("folder with foreign files beside checkpoints", "analyze ignores notes.txt / .DS_Store")
def case_cli_foreign_files_in_folder(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp)
    (folder / "notes.txt").write_text("lr=0.1")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "optimizer.pt").write_bytes(b"junk")
    out = tmp / "geo.nc"
    p = _analyze(folder, fac, xfile, out)
    if "Traceback" in p.stderr:
        return judge_cli_error(p)
    if not out.exists():
        return judge_cli_error(p)
    res = judge(_read_rankme(out, 20), _ref_rankme(states[20], np.load(xfile)), [], rtol=1e-7)
    res.note = f"rc={p.returncode}"
    return res


@case("checkpoint that is a symlink into another run", "analyze a folder with a symlinked .pt")
def case_cli_symlinked_checkpoint(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp)
    other = tmp / "other"
    other.mkdir()
    (folder / "step20.pt").rename(other / "w.pt")
    (folder / "step20.pt").symlink_to(other / "w.pt")
    out = tmp / "geo.nc"
    p = _analyze(folder, fac, xfile, out)
    if p.returncode != 0:
        return judge_cli_error(p)
    return judge(_read_rankme(out, 20), _ref_rankme(states[20], np.load(xfile)), [], rtol=1e-7)


@case("resume after a module the factory imports changed", "analyze twice, helper edited")
def case_cli_resume_helper_changed(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp, steps=(10,))
    (tmp / "helper.py").write_text("OFFSET = 0.0\n")
    fpath = Path(fac.split(":")[0])
    fpath.write_text(fpath.read_text() + textwrap.dedent("""
        import sys, pathlib
        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        import helper
        def make_offset():
            m = make()
            m[0].register_forward_hook(lambda mod, i, o: o + helper.OFFSET)
            return m
        """))
    fac = f"{fpath}:make_offset"
    out = tmp / "geo.nc"
    p1 = _analyze(folder, fac, xfile, out)
    (tmp / "helper.py").write_text("OFFSET = 50.0\n")
    p2 = _analyze(folder, fac, xfile, out)
    if p1.returncode != 0 or p2.returncode != 0:
        return judge_cli_error(p1 if p1.returncode else p2)
    m = ZOO["mlp"].make().double()
    m.load_state_dict(states[10])
    m[0].register_forward_hook(lambda mod, i, o: o + 50.0)
    ref = np_rankme(ref_features(m, torch.from_numpy(np.load(xfile)), ["0"])["0"])
    return judge(_read_rankme(out, 10), ref, [], rtol=1e-7,
                 note="reference: the edited helper (offset 50)")


def _hf_folder(path: Path, auto_map: bool = False) -> Path:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=260)
    GPT2Model(cfg).save_pretrained(path)
    if auto_map:
        conf = json.loads((path / "config.json").read_text())
        conf["auto_map"] = {"AutoModel": "evil.EvilModel"}
        (path / "config.json").write_text(json.dumps(conf))
        (path / "evil.py").write_text(
            f"open({str(path / 'PWNED')!r}, 'w').write('ran')\n"
            "from transformers import GPT2Model as EvilModel\n")
    return path


@case("HF folder with auto_map + its own .py", "yes | traindyn analyze <folder>")
def case_cli_hf_auto_map(tmp: Path) -> Result:
    folder = _hf_folder(tmp / "checkpoint-5", auto_map=True)
    p = cli(["analyze", str(folder), "--layers", "h.0", "--inputs", "stdlib-text",
             "--tokenizer", "bytes", "--n-samples", "16", "--no-figures", "--no-progress",
             "-o", str(tmp / "o.nc")], stdin="y\n" * 20)
    if (folder / "PWNED").exists():
        return Result("security", "the folder's code ran", "never run")
    return judge_cli_error(p, ("auto_map", "code"))


def _trainer_run(tmp: Path) -> tuple[Path, Path, list[str]]:
    run = tmp / "run"
    run.mkdir()
    for s in (5, 10):
        _hf_folder(run / f"checkpoint-{s}")
    (run / "runs").mkdir()
    (run / "trainer_state.json").write_text("{}")
    texts = [f"sample {i}: " + "the quick brown fox " * (1 + i % 3) + "jumps" for i in range(12)]
    (tmp / "texts.txt").write_text("\n".join(texts) + "\n")
    return run, tmp / "texts.txt", texts


def _text_args(run: Path, textfile: Path, out: Path, *more: str) -> list[str]:
    return ["analyze", *(str(run / f"checkpoint-{s}") for s in (5, 10)), "--layers", "h.0",
            "--inputs", str(textfile), "--tokenizer", "bytes", "--dtype", "float64",
            "--probes", "rankme", "--no-figures", "--no-progress", "-o", str(out), *more]


@case("Trainer output: checkpoint-N HF folders (GPT-2, 32 positions)", "analyze, 128 tokens")
def case_cli_trainer_too_long(tmp: Path) -> Result:
    import xarray as xr

    run, textfile, _ = _trainer_run(tmp)
    out = tmp / "lm.nc"
    p = cli(_text_args(run, textfile, out, "--max-length", "128"))
    res = judge_cli_error(p)
    if res.cls == "clear error" and out.exists():
        with xr.open_dataset(out) as ds:
            reason = str(ds["reason"].values.ravel()[0])
        ok = "max-length" in reason
        return Result("clear error" if ok else "raw traceback", reason[:110],
                      "a reason naming the position limit")
    return res


@case("Trainer output: checkpoint-N HF folders (GPT-2)", "analyze text file, bytes, masked mean")
def case_cli_trainer_values(tmp: Path) -> Result:
    from transformers import GPT2Model

    run, textfile, texts = _trainer_run(tmp)
    out = tmp / "lm.nc"
    p = cli(_text_args(run, textfile, out, "--max-length", "32"))
    if p.returncode != 0:
        return judge_cli_error(p)
    enc = [list(t.encode())[:32] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    model = GPT2Model.from_pretrained(run / "checkpoint-10").double()
    f = ref_features(model, {"input_ids": ids, "attention_mask": mask}, ["h.0"], reduce="mean",
                     mask=mask)["h.0"]
    return judge(_read_rankme(out, 10, "h.0"), np_rankme(f), [], rtol=1e-7)


def _lightning(path: Path, model_state: dict, ema_state: dict) -> None:
    sd = {**{f"model.{k}": v for k, v in model_state.items()},
          **{f"ema.{k}": v for k, v in ema_state.items()}}
    torch.save({"epoch": 0, "global_step": 30, "pytorch-lightning_version": "2.4.0",
                "state_dict": sd, "hyper_parameters": {"lr": 0.1}}, path)


@case("Lightning .ckpt with model.* and ema.*", "traindyn analyze without --prefix")
def case_cli_lightning_ema_ambiguous(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp, steps=(10, 20))
    lf = tmp / "lt"
    lf.mkdir()
    _lightning(lf / "epoch=0-step=30.ckpt", states[10], states[20])
    out = tmp / "o.nc"
    p = _analyze(lf, fac, xfile, out)
    res = judge_cli_error(p)
    if res.cls == "clear error" and out.exists():
        import xarray as xr
        with xr.open_dataset(out) as ds:
            reason = str(ds["reason"].values.ravel()[0])
        ok = "ema" in reason and "prefix" in reason
        return Result("clear error" if ok else "silent wrong", reason[:110],
                      "a reason naming both prefixes and --prefix")
    return res


@case("Lightning .ckpt with model.* and ema.*", "traindyn analyze --prefix ema. → ema's rankme")
def case_cli_lightning_ema_prefix(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp, steps=(10, 20))
    lf = tmp / "lt"
    lf.mkdir()
    _lightning(lf / "epoch=0-step=30.ckpt", states[10], states[20])
    out = tmp / "o.nc"
    p = _analyze(lf, fac, xfile, out, "--prefix", "ema.")
    if p.returncode != 0:
        return judge_cli_error(p)
    return judge(_read_rankme(out, 30), _ref_rankme(states[20], np.load(xfile)), [], rtol=1e-7)


@case("CLI", "traindyn analyze on a path that does not exist")
def case_cli_missing_path(tmp: Path) -> Result:
    return judge_cli_error(cli(["analyze", str(tmp / "nope"), "--layers", "0"]), ("nope",))


@case("CLI", "traindyn analyze --layers naming no module")
def case_cli_unknown_layer(tmp: Path) -> Result:
    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    p = cli(["analyze", str(folder), "--model", fac, "--inputs", str(xfile), "--layers",
             "blocks.*", "--no-figures", "--no-progress", "-o", str(tmp / "o.nc")])
    return judge_cli_error(p, ("blocks",))


@case("CLI", "traindyn analyze --probe-kwargs with invalid JSON")
def case_cli_bad_json(tmp: Path) -> Result:
    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    return judge_cli_error(_analyze(folder, fac, xfile, tmp / "o.nc", "--probe-kwargs",
                                    "{rankme: 1}"), ("json",))


@case("CLI", "traindyn theory linear with a negative noise")
def case_cli_theory_bad(tmp: Path) -> Result:
    help_text = cli(["theory", "linear", "--help"]).stdout
    opt = next((o for o in ("--noise", "--sigma", "--snr", "--alpha") if o in help_text), None)
    if opt is None:
        return Result("correct", "skipped: no noise option", "")
    return judge_cli_error(cli(["theory", "linear", opt, "-3"]), (opt.strip("-"),))


@case("CLI", "traindyn theory linear --out a user's folder")
def case_cli_theory_out_foreign(tmp: Path) -> Result:
    target = tmp / "mine.zarr"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    help_text = cli(["theory", "linear", "--help"]).stdout
    opt = "--out" if "--out" in help_text else "--output"
    res = judge_cli_error(cli(["theory", "linear", opt, str(target)]), ("overwrite",))
    if not (target / "keep.txt").exists():
        return Result("data lost", "keep.txt removed", "kept")
    return res


@case("CLI", "traindyn report of a NetCDF traindyn did not write (random variables)")
def case_cli_report_foreign_nc(tmp: Path) -> Result:
    import xarray as xr

    nc = tmp / "foreign.nc"
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_netcdf(nc)
    p = cli(["report", str(nc), "-o", str(tmp / "r.html")])
    if p.returncode == 0 and (tmp / "r.html").exists():
        return Result("correct", "rc=0, a page", "a page or a clear refusal")
    return judge_cli_error(p)


@case("CLI", "traindyn report of an analyze result → values in the page")
def case_cli_report_values(tmp: Path) -> Result:
    folder, fac, xfile, states = _series(tmp)
    out = tmp / "geo.nc"
    p = _analyze(folder, fac, xfile, out)
    if p.returncode != 0:
        return judge_cli_error(p)
    html = tmp / "geo.html"
    p = cli(["report", str(out), "-o", str(html)])
    if p.returncode != 0:
        return judge_cli_error(p)
    ref = _ref_rankme(states[20], np.load(xfile))
    text = html.read_text()
    shown = [f"{ref:.4g}", f"{ref:.3g}", f"{ref:.3f}", f"{ref:.2f}"]
    hit = next((s for s in shown if s in text), None)
    return Result("correct" if hit else "silent wrong", hit or "value absent",
                  f"rankme {ref:.6g} shown")


@case("CLI", "traindyn report -o over a user's existing HTML")
def case_cli_report_overwrites_foreign(tmp: Path) -> Result:
    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    out = tmp / "geo.nc"
    _analyze(folder, fac, xfile, out)
    html = tmp / "index.html"
    html.write_text("<html>my homepage</html>")
    p = cli(["report", str(out), "-o", str(html)])
    if "my homepage" not in html.read_text():
        return Result("data lost", f"rc={p.returncode}, index.html replaced", "kept")
    return judge_cli_error(p, ("overwrite",))


@case("CLI", "traindyn predict on a folder of state dicts without --model")
def case_cli_predict_no_model(tmp: Path) -> Result:
    folder, fac, xfile, _ = _series(tmp, steps=(10,))
    return judge_cli_error(cli(["predict", str(folder / "step10.pt")]), ("model",))


@case("CLI", "traindyn info")
def case_cli_info(tmp: Path) -> Result:
    p = cli(["info"])
    ok = p.returncode == 0 and "rankme" in p.stdout and "Traceback" not in p.stderr
    return Result("correct" if ok else "raw traceback", f"rc={p.returncode}", "rc=0, probes listed")


# =========================================================================== runner
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="run only cases whose name contains this")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import GPT2Config, GPT2Model  # noqa: F401 - imported once, not in threads
    t0 = time.perf_counter()
    chosen = [c for c in CASES if args.k in c.name]
    done: dict[str, tuple[Result, float]] = {}

    def run_one(c: Case) -> None:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hostile-") as d:
            try:
                r = c.fn(Path(d))
            except Exception as e:  # noqa: BLE001 - an uncaught error is a finding
                tb = traceback.format_exc().strip().splitlines()
                r = Result("raw traceback", f"{type(e).__name__}: {str(e)[:100]}", "",
                           tb[-3] if len(tb) > 2 else "")
        done[c.name] = (r, time.perf_counter() - start)
        print(f"{len(done):3d} {r.cls:20s} {c.name} ({done[c.name][1]:.1f} s)",
              file=sys.stderr, flush=True)

    # command-line cases wait on subprocesses: three at a time beside the in-process cases
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run_one, c) for c in chosen if c.name.startswith("cli_")]
        for c in chosen:
            if not c.name.startswith("cli_"):
                run_one(c)
        for f in futures:
            f.result()
    rows = [(c, *done[c.name]) for c in chosen]
    print("\n| # | case | structure | path | class | measured | reference |")
    print("|---|---|---|---|---|---|---|")
    for i, (c, r, _) in enumerate(rows, 1):
        meas = r.measured + (f" ({r.note})" if r.note else "")
        print(f"| {i} | {c.name} | {c.structure} | {c.path} | {r.cls} | {meas} | "
              f"{r.reference} |")
    counts: dict[str, int] = {}
    for _, r, _ in rows:
        counts[r.cls] = counts.get(r.cls, 0) + 1
    print("\ncounts:", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
          f"— {len(rows)} cases, {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"case": c.name, "structure": c.structure, "path": c.path, "class": r.cls,
              "measured": r.measured, "reference": r.reference, "note": r.note}
             for c, r, _ in rows], indent=1))
    return int(any(r.cls in BAD for _, r, _ in rows))


if __name__ == "__main__":
    sys.exit(main())
