"""Regressions found by the adversarial campaign (``scripts/hostile_pass.py``) on real structures,
each against an independent reference."""

from __future__ import annotations

import subprocess
import sys


def test_theory_kernel_flow_is_the_function_after_its_submodule_is_imported():
    """``from traindyn.theory.kernel_flow import …`` (the submodule) before
    ``theory.kernel_flow(…)`` (the function, as ``dynamics.predict`` calls it): the attribute
    stays the function.  Reference: the closed form ``f_s = y + (I − ηΘ/c)^s (f₀ − y)``."""
    code = (
        "import numpy as np\n"
        "from traindyn.theory.kernel_flow import kernel_flow_limit\n"
        "from traindyn import theory\n"
        "r = np.random.default_rng(0); j = r.normal(size=(6, 9)); K = j @ j.T / 9\n"
        "y = np.eye(2)[np.arange(6) % 2]; f0 = r.normal(size=(6, 2))\n"
        "ds = theory.kernel_flow(K, y, [7], 0.5, f0_train=f0, normalization=6.0)\n"
        "ref = y + np.linalg.matrix_power(np.eye(6) - 0.5 * K / 6.0, 7) @ (f0 - y)\n"
        "v = 'f_train'\n"
        "print(float(np.abs(np.asarray(ds[v]).reshape(6, 2) - ref).max()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert float(out) < 1e-12


def test_report_never_replaces_a_page_it_did_not_write(tmp_path):
    """``write_report(run, "index.html")`` over a user's own page: refused, the page kept
    byte for byte; over its own page, or with ``overwrite=True``: written (the new page holds
    the run's value, read back from the HTML)."""
    import pytest
    import xarray as xr
    from traindyn.dynamics.report import write_report

    ds = xr.Dataset({"rankme": (("step", "layer"), [[3.25], [7.125]])},
                    coords={"step": [0, 10], "layer": ["fc"], "time": ("step", [0.0, 1.0])})
    html = tmp_path / "index.html"
    html.write_text("<html>my homepage</html>")
    with pytest.raises(FileExistsError, match="did not write"):
        write_report(ds, html)
    assert html.read_text() == "<html>my homepage</html>"
    write_report(ds, html, overwrite=True)
    assert "7.125" in html.read_text()
    write_report(ds.assign(rankme=ds["rankme"] * 2), html)  # its own page: replaced
    assert "14.25" in html.read_text()


def test_empirical_ntk_refuses_active_dropout_and_matches_brute_force_in_eval_mode():
    """Linear → ReLU(inplace) → Dropout → Linear in train mode: the kernel mixed Jacobians of
    different random masks (44 % off the eval-mode NTK, no word).  Refused now, naming the
    module; in eval mode it equals the brute-force ``Σ_k J_k J_kᵀ`` (one autograd call per
    output entry)."""
    import pytest
    import torch
    from torch import nn
    from traindyn.probes.ntk import empirical_ntk

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Dropout(0.3),
                          nn.Linear(16, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\['2'\].*Dropout.*model.eval"):
        empirical_ntk(model, x)
    model.eval()
    rows = []
    for i in range(4):
        out = model(x[i:i + 1])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            out[k], list(model.parameters()), retain_graph=True)]) for k in range(3)]))
    jac = torch.stack(rows)
    ref = torch.einsum("akp,bkp->ab", jac, jac)
    torch.testing.assert_close(empirical_ntk(model, x), ref, rtol=1e-10, atol=0)


def test_analyze_refuses_sequences_longer_than_the_position_table():
    """A GPT-2 with ``n_positions=8`` on 12-token probe texts: the model itself fails with
    ``IndexError: index out of range in self`` (recorded as the checkpoint's reason, no
    cause given).  ``check_positions`` names the limit and ``--max-length``; 8 tokens pass and
    run."""
    import pytest
    import torch
    from traindyn.dynamics.analyze import check_positions
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=8, vocab_size=50))
    long = {"input_ids": torch.ones(2, 12, dtype=torch.long)}
    with pytest.raises(IndexError):
        model(**long)
    with pytest.raises(ValueError, match=r"12 tokens.*most 8 positions \(config.*length 8"):
        check_positions(model, long)
    with pytest.raises(ValueError, match="12 tokens"):  # byte ids: a plain tensor batch
        check_positions(model, long["input_ids"])
    short = {"input_ids": torch.ones(2, 8, dtype=torch.long)}
    check_positions(model, short)
    assert model(**short).last_hidden_state.shape == (2, 8, 8)
