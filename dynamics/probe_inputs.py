"""Probe inputs for ``traindyn analyze``: the fixed batch every checkpoint sees.

Sources (``load_probe_inputs(source, …)``):

``"digits"``
    scikit-learn's bundled 8×8 digits (1797 × 64, float32), standardised per pixel with the
    statistics of all samples.  No download.
``"stdlib-text"`` (alias ``"text"``)
    Sentences from the docstrings of a fixed list of Python standard-library modules, parsed
    from source with :mod:`ast` (nothing is imported), shuffled with a seed.  Offline, about
    2,000 sentences; the exact set depends on the Python version (recorded in the Dataset).
``*.npz`` / ``*.npy`` / ``*.pt``
    Tensors: one array (or the key ``x``/``inputs``/``features``) is the model input; a file
    with ``input_ids`` is a tokenised batch (every array passed as a keyword, ``attention_mask``
    used for token reduction).  ``.pt`` files are read with ``torch.load(weights_only=True)``,
    ``.npz``/``.npy`` with ``allow_pickle=False``.
any other file
    UTF-8 text, one sample per non-empty line, tokenised with the model's own tokenizer.

Text needs a tokenizer: a Hugging Face tokenizer (the checkpoint folder's own by default, or a
folder), or ``"bytes"`` (UTF-8 bytes as ids 0..255, pad 0, for byte-level models such as
:class:`dynamics.recipes.tiny_lm.TinyLM`).
"""

from __future__ import annotations

import ast
import functools
import os
import pickle
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BUILTIN_INPUTS",
    "STDLIB_TEXT_MODULES",
    "Batch",
    "ProbeInputs",
    "byte_tokenize",
    "digits_inputs",
    "load_probe_inputs",
    "load_tokenizer",
    "stdlib_sentences",
]

BUILTIN_INPUTS = ("digits", "stdlib-text", "text")

STDLIB_TEXT_MODULES = (
    "argparse", "ast", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "difflib", "email/message", "enum", "fractions", "functools", "gettext", "gzip",
    "heapq", "hmac", "http/client", "inspect", "ipaddress", "json", "locale", "logging",
    "mailbox", "pathlib", "pickle", "pprint", "queue", "random", "shutil", "smtplib", "socket",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "turtle", "typing", "unittest/case", "urllib/parse", "uuid", "warnings", "zipfile",
)
"""Standard-library modules whose docstrings make the built-in text sample."""


@dataclass
class Batch:
    """One batch: ``inputs`` go to ``model(inputs)`` (tensor) or ``model(**inputs)`` (dict);
    ``mask`` (``(batch, tokens)``, 1 = real token) is used by the token reduction only."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast)

        inputs = ({k: move(v) for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
                  else move(self.inputs))
        return Batch(inputs, None if self.mask is None else self.mask.to(device), self.labels)

    def __len__(self) -> int:
        first = self.inputs if isinstance(self.inputs, torch.Tensor) else next(
            iter(self.inputs.values()))
        return int(first.shape[0])


@dataclass
class ProbeInputs:
    """Batches of probe inputs and a description for the Dataset's attributes."""

    batches: list[Batch]
    description: str
    texts: list[str] | None = None

    @property
    def n_samples(self) -> int:
        return sum(len(b) for b in self.batches)


# --------------------------------------------------------------------------------------------
# built-in sources


def digits_inputs() -> torch.Tensor:
    """scikit-learn's digits, ``(1797, 64)`` float32, each pixel standardised (std + 1e-6)."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.from_numpy(x.astype(np.float32))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _module_file(stdlib: Path, name: str) -> Path | None:
    for candidate in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, nodes)
            if (doc := ast.get_docstring(node))]


def _is_prose(sentence: str) -> bool:
    if not (30 <= len(sentence) <= 300) or len(sentence.split()) < 5:
        return False
    if not sentence.endswith((".", "!", "?")) or ">>>" in sentence:
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters / len(sentence) > 0.85


@functools.lru_cache(maxsize=4)
def _all_stdlib_sentences(stdlib: str, modules: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for name in modules:
        path = _module_file(Path(stdlib), name)
        if path is None:
            continue
        for doc in _docstrings(path.read_text(encoding="utf-8", errors="replace")):
            for paragraph in re.split(r"\n\s*\n", doc):
                text = " ".join(paragraph.split())
                for sentence in _SENTENCE_END.split(text):
                    if _is_prose(sentence):
                        seen.setdefault(sentence, None)
    return tuple(seen)


def stdlib_sentences(n: int | None = None, seed: int = 0,
                     modules: Sequence[str] = STDLIB_TEXT_MODULES) -> list[str]:
    """English sentences from standard-library docstrings, shuffled with ``seed``.

    Docstrings are read from source with :func:`ast.get_docstring` (no module is imported),
    split into paragraphs and sentences; sentences of 30..300 characters and at least five
    words that read as prose (mostly letters, no doctest) are kept, duplicates dropped.

    Raises
    ------
    ValueError
        When ``n`` is larger than the number of sentences found.
    """
    sentences = _all_stdlib_sentences(sysconfig.get_paths()["stdlib"], tuple(modules))
    order = np.random.default_rng(seed).permutation(len(sentences))
    chosen = [sentences[i] for i in order]
    if n is not None:
        if n > len(chosen):
            raise ValueError(f"asked for {n} sentences; the standard-library docstrings give "
                             f"{len(chosen)}")
        chosen = chosen[:n]
    return chosen


# --------------------------------------------------------------------------------------------
# tokenisation


def byte_tokenize(texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes as token ids (0..255), truncated to ``max_length``, right-padded with 0.

    Returns ``(ids, mask)``, both ``(len(texts), longest)`` int64.
    """
    encoded = [list(t.encode("utf-8"))[:max_length] for t in texts]
    longest = max(len(e) for e in encoded)
    ids = torch.zeros(len(texts), longest, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.int64)
        mask[i, : len(e)] = 1
    return ids, mask


def load_tokenizer(spec: Any) -> Callable[[Sequence[str], int], Batch]:
    """A function ``(texts, max_length) -> Batch`` from ``"bytes"``, a local Hugging Face
    tokenizer folder, or a tokenizer object (called like a ``transformers`` tokenizer)."""
    if spec == "bytes":
        def encode_bytes(texts: Sequence[str], max_length: int) -> Batch:
            ids, mask = byte_tokenize(texts, max_length)
            return Batch(ids, mask)

        return encode_bytes
    if isinstance(spec, (str, os.PathLike)):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from transformers import AutoTokenizer

        folder = Path(spec)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer {spec!r} is neither 'bytes' nor a local folder")
        from traindyn.dynamics.checkpoints.hf_folder import refuse_custom_code

        refuse_custom_code(folder, "tokenizer", error=ValueError)  # never the folder's code
        spec = AutoTokenizer.from_pretrained(str(folder.resolve()), local_files_only=True,
                                             trust_remote_code=False)
    tokenizer = spec

    def encode(texts: Sequence[str], max_length: int) -> Batch:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        return Batch(inputs, inputs.get("attention_mask"))

    return encode


# --------------------------------------------------------------------------------------------
# files and dispatch


def _tensors_from_mapping(data: dict[str, Any], path: Path) -> torch.Tensor | dict:
    data = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
            for k, v in data.items()}
    if "input_ids" in data:
        return data
    if len(data) == 1:
        return next(iter(data.values()))
    for key in ("x", "inputs", "features"):
        if key in data:
            return data[key]
    raise ValueError(f"{path.name} holds {sorted(data)}; name the input array 'x' (or provide "
                     f"'input_ids' for token inputs)")


def _read_tensor_file(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return _tensors_from_mapping({k: data[k] for k in data.files}, path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refused to load probe inputs {path.name}: the pickle holds more than "
                         f"tensors ({str(err).splitlines()[0]}); nothing was executed") from None
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        return _tensors_from_mapping(obj, path)
    raise ValueError(f"{path.name} holds a {type(obj).__name__}; expected a tensor or a dict")


def _split(data: torch.Tensor | dict[str, torch.Tensor], n: int | None,
           batch_size: int) -> list[Batch]:
    if isinstance(data, dict):
        total = int(data["input_ids"].shape[0])
        n = total if n is None else min(n, total)
        return [Batch({k: v[i:min(i + batch_size, n)] for k, v in data.items()},
                      data["attention_mask"][i:min(i + batch_size, n)]
                      if "attention_mask" in data else None) for i in range(0, n, batch_size)]
    n = data.shape[0] if n is None else min(n, data.shape[0])
    return [Batch(data[i:min(i + batch_size, n)]) for i in range(0, n, batch_size)]


def digits_labels() -> torch.Tensor:
    """The class (0–9) of each scikit-learn digits image, int64, in :func:`digits_inputs` order."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().target.astype(np.int64))


def load_labels(source: Any) -> torch.Tensor:
    """Integer labels of the probe inputs: ``"digits"``, a ``.npy`` / ``.pt`` file, a ``.npz``
    file (its array ``labels`` or ``y``, or its only array), or an array."""
    if isinstance(source, str) and source == "digits":
        return digits_labels()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"labels {str(source)!r}: not 'digits' and no such file")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                keys = [k for k in ("labels", "y") if k in data.files] or (
                    data.files if len(data.files) == 1 else [])
                if not keys:
                    raise ValueError(f"{path.name} holds {data.files}; name the label array "
                                     "'labels' or 'y'")
                values = data[keys[0]]
        elif path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = torch.load(path, map_location="cpu", weights_only=True)
    else:
        values = source
    labels = torch.as_tensor(np.asarray(values))
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-D integer array; got dtype {labels.dtype} and "
                         f"shape {tuple(labels.shape)}")
    return labels.long()


def attach_labels(inputs: ProbeInputs, labels: torch.Tensor) -> ProbeInputs:
    """The same batches with their slice of ``labels`` (which must cover every sample)."""
    if labels.shape[0] < inputs.n_samples:
        raise ValueError(f"{labels.shape[0]} labels for {inputs.n_samples} probe inputs")
    batches, start = [], 0
    for b in inputs.batches:
        batches.append(Batch(b.inputs, b.mask, labels[start:start + len(b)]))
        start += len(b)
    return ProbeInputs(batches, inputs.description + ", with labels", inputs.texts)


def load_probe_inputs(
    source: str | os.PathLike,
    n_samples: int | None = None,
    batch_size: int = 256,
    tokenizer: Any = None,
    max_length: int = 128,
    seed: int = 0,
) -> ProbeInputs:
    """Probe inputs from a built-in name or a file (module docstring).

    Parameters
    ----------
    source : str or path
        ``"digits"``, ``"stdlib-text"`` (``"text"``), a ``.npz``/``.npy``/``.pt`` tensor file, or
        a text file (one sample per line).
    n_samples : int, optional
        Use the first ``n_samples`` (text: ``n`` sentences after the seeded shuffle); default
        all (the text built-in: 512 sentences).
    batch_size : int
        Samples per forward pass.
    tokenizer : "bytes", folder, tokenizer object, or None
        Needed for text.
    max_length : int
        Longest tokenised sequence (longer ones are truncated).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be >= 1 (or None for all), got {n_samples}")
    name = str(source)
    texts: list[str] | None = None
    if name == "digits":
        return ProbeInputs(_split(digits_inputs(), n_samples, batch_size),
                           f"scikit-learn digits, standardised (n={n_samples or 1797})")
    if name in ("stdlib-text", "text"):
        texts = stdlib_sentences(n_samples or 512, seed=seed)
        description = f"standard-library docstring sentences (n={len(texts)}, seed={seed})"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"probe inputs {name!r}: not a built-in ({', '.join(BUILTIN_INPUTS)}) and no "
                f"such file")
        if path.suffix in (".npz", ".npy", ".pt", ".pth"):
            return ProbeInputs(_split(_read_tensor_file(path), n_samples, batch_size),
                               f"tensors from {path.name}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [line for line in lines if line][: n_samples or None]
        if not texts:
            raise ValueError(f"text file {path} has no non-empty lines")
        description = f"lines of {path.name} (n={len(texts)})"
    if tokenizer is None:
        raise ValueError("text probe inputs need a tokenizer: Hugging Face checkpoints use their "
                         "own; otherwise pass tokenizer='bytes' or a tokenizer folder")
    encode = load_tokenizer(tokenizer)
    batches = [encode(texts[i:i + batch_size], max_length)
               for i in range(0, len(texts), batch_size)]
    return ProbeInputs(batches, description, texts)
