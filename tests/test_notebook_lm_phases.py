"""Execute notebooks/lm_geometry_phases.ipynb at small size and check what it wrote.

The notebook trains a tiny LM with log-spaced checkpoints, runs ``traindyn analyze`` on them
and labels geometric phases.  Here the last checkpoint's last-token RankMe is recomputed by
hand (manual forward through the blocks, float64 SVD) and the phase labels are recomputed from
the saved Dataset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from traindyn.dynamics import storage
from traindyn.dynamics.probe_inputs import stdlib_sentences
from traindyn.dynamics.schedules import log_steps

from tests.helpers import assert_rel, run_notebook

pytest.importorskip("nbclient")


def _rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_lm_phases_notebook_runs_and_its_numbers_are_right(tmp_path):
    from traindyn.dynamics.recipes.tiny_lm import load_tiny_lm
    from traindyn.probes.phases import PHASES, geometric_phases

    run_notebook("lm_geometry_phases.ipynb", tmp_path)
    assert (tmp_path / "lm_geometry_phases.png").stat().st_size > 0
    geo = storage.load(tmp_path / "geometry.nc")
    assert list(geo["step"].values) == list(log_steps(60, 8))
    assert set(geo["status"].values) == {"ok"}
    assert list(geo["layer"].values) == ["blocks.0", "blocks.1"]

    # last-token residual stream after the last block, recomputed without hooks
    model = load_tiny_lm(tmp_path / "ckpt" / "step000060.safetensors").eval()
    texts = stdlib_sentences(128)
    context = model.config.context
    feats = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([list(text.encode("utf-8"))[:context]])
            x = model.embed(ids) + model.pos_embed(torch.arange(ids.shape[1]))
            for block in model.blocks:
                x = block(x)
            feats.append(x[0, -1].numpy())
    assert_rel(geo["rankme"].sel(step=60, layer="blocks.1").values, _rankme(np.stack(feats)),
               1e-5, "last-token RankMe of blocks.1 at step 60")

    phases = json.loads((tmp_path / "phases.json").read_text())
    expected = geometric_phases(geo["step"].values,
                                geo["rankme_covariance"].sel(layer="blocks.1").values,
                                geo["alpha_req"].sel(layer="blocks.1").values)
    assert phases["labels"] == expected.tolist()
    with_warmup = geometric_phases(geo["step"].values,
                                   geo["rankme_covariance"].sel(layer="blocks.1").values,
                                   geo["alpha_req"].sel(layer="blocks.1").values,
                                   warmup_end=6)
    assert phases["lr_warmup"] == 6 and phases["labels_lr_warmup"] == with_warmup.tolist()
    assert set(phases["labels"]) <= set(PHASES)
