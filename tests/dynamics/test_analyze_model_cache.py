"""analyze keeps one built model between checkpoints; a different factory must never get it,
even when that factory takes over the address (``id``) of one that was garbage-collected."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from traindyn.dynamics import analyze as analyze_module
from traindyn.dynamics.analyze import analyze


def _run(folder, make, tag):
    run = folder / tag
    run.mkdir()
    torch.manual_seed(0)
    torch.save(make().state_dict(), run / "step0.pt")
    return analyze(run, model=lambda: make(), probe_data=folder / "x.pt", probes=["rankme"],
                   layers=["0"], dtype="float64", progress=False)


def test_a_new_factory_at_a_reused_address_builds_its_own_model(tmp_path, monkeypatch):
    # every object has the same "address": what a factory freed and reused would look like
    monkeypatch.setattr(analyze_module, "id", lambda obj: 0, raising=False)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.save(x, tmp_path / "x.pt")
    narrow = _run(tmp_path, lambda: nn.Sequential(nn.Linear(4, 3)).double(), "narrow")
    wide = _run(tmp_path, lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh()).double(), "wide")
    assert list(narrow["status"].values) == ["ok"] and list(wide["status"].values) == ["ok"], \
        wide["reason"].values
    # the wide layer's RankMe from its own weights (float64 SVD, Garrido et al. 2023, Eq. 1)
    torch.manual_seed(0)
    layer = nn.Linear(4, 6).double()
    z = (x @ layer.weight.T + layer.bias).detach().numpy()
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    np.testing.assert_allclose(wide["rankme"].values[0, 0], np.exp(-(p * np.log(p)).sum()),
                               rtol=1e-9)
