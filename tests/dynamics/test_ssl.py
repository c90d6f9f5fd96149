"""The self-supervised recipe (dynamics.recipes.ssl).

References: NT-Xent written out term by term in float64 numpy; the recorded probes against
direct calls on the saved checkpoints' features; the augmentations against their definitions
(a zero shift/angle/noise view is the image itself).
"""

from __future__ import annotations

import numpy as np
import torch
from traindyn.dynamics.recipes import ssl
from traindyn.probes import readout as R
from traindyn.probes.spectral import rankme

from tests.helpers import assert_rel


def test_nt_xent_equals_the_formula_written_out():
    rng = np.random.default_rng(0)
    z1, z2 = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    tau = 0.3
    got = float(ssl.nt_xent(torch.tensor(z1), torch.tensor(z2), tau))
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / tau
    n = 5
    terms = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        terms.append(-s[i, j] + np.log(np.sum(np.exp(s[i, others]))))
    assert_rel(got, np.mean(terms), 1e-12, "NT-Xent")


def test_augment_with_zero_strength_is_the_identity_and_otherwise_moves_the_image():
    x, _, _, _ = ssl.load_digits_images()
    batch = x[:16].double()
    gen = torch.Generator().manual_seed(0)
    same = ssl.augment(batch, gen, max_shift=0.0, max_angle=0.0, noise=0.0)
    np.testing.assert_allclose(same.numpy(), batch.numpy(), rtol=0, atol=1e-12)  # FFT trip
    moved = ssl.augment(batch, torch.Generator().manual_seed(0))
    assert float((moved - batch).abs().mean()) > 0.01


def test_recipe_records_the_probes_and_its_checkpoints_reproduce_them(tmp_path):
    from traindyn.dynamics import records

    ds = ssl.train_ssl(steps=6, n_evals=3, batch_size=32, hidden=32, representation=16,
                       projector_width=16, embedding=8, fit_range=(2, 7),
                       checkpoint_dir=tmp_path)
    records.validate(ds)
    steps = [int(s) for s in ds.step.values]
    assert steps[0] == 0 and steps[-1] == 6
    assert sorted(p.name for p in tmp_path.glob("step*.pt")) == sorted(
        f"step{s}.pt" for s in steps)
    _, _, x_te, y_te = ssl.load_digits_images()
    x_tr, _, _, _ = ssl.load_digits_images()
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
    probe_x = ((x_te - mean) / std).reshape(len(y_te), -1)
    for i, step in enumerate(steps):
        model = ssl.SSLNet(32, 16, 16, 8)
        model.load_state_dict(torch.load(tmp_path / f"step{step}.pt", weights_only=True))
        model.eval()
        with torch.no_grad():
            h = model.encoder(probe_x)
            z = model.projector(h)
        for j, feats in enumerate((h, z)):
            assert_rel(ds["rankme"].values[i, j], rankme(feats), 1e-9, f"rankme {step} {j}")
            direct = R.linear_probe(feats, y_te, held_out=0.5, seed=0)
            assert_rel(ds["linear_probe_accuracy"].values[i, j],
                       direct["linear_probe_accuracy"], 1e-12, f"probe {step} {j}")
    assert np.isnan(ds["ssl_loss"].values[0]) and np.all(np.isfinite(ds["ssl_loss"].values[1:]))


def test_grid_has_one_dimension_per_hyperparameter():
    ds = ssl.ssl_grid(learning_rates=[1e-3], projector_widths=[8, 16], temperatures=[0.5],
                      steps=2, n_evals=2, batch_size=16, hidden=16, representation=8,
                      embedding=4, fit_range=(1, 3), probes=["rankme"])
    assert ds["rankme"].dims[:4] == ("learning_rate", "projector_width", "temperature", "seed")
    assert list(ds.projector_width.values) == [8, 16]
    assert np.all(np.isfinite(ds["rankme"].values))
