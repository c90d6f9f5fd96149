"""Every ```python snippet in README.md runs as written.

A snippet may use a few objects a reader has in their own session (``model``, ``x_probe``,
``lr``, ``loss``, ``measured``); small stand-ins for them are defined here, and only there.
A snippet that uses any other undefined name fails with a NameError naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import load_script

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _snippets() -> list[str]:
    return _BLOCK.findall(README.read_text(encoding="utf-8"))


def _stand_ins() -> dict:
    """The reader's own objects, small: a model with layers ``net.1``/``net.3``, a probe batch,
    a learning rate, a loss value, and a measured linear-teacher Dataset."""
    import torch
    from torch import nn
    from traindyn.dynamics.recipes import simulate_linear_teacher

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                                     nn.Linear(24, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    torch.manual_seed(0)
    lr = 0.05
    return {
        "model": Model(),
        "x_probe": torch.randn(64, 16),
        "lr": lr,
        "loss": 0.5,
        "measured": simulate_linear_teacher(n_features=40, steps=[0, 5, 50], seeds=(0, 1),
                                            learning_rate=lr),
    }


def test_readme_images_exist():
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text(encoding="utf-8"))
    assert links and all((README.parent / link).is_file() for link in links), links


def test_gallery_images_are_the_notebooks_figures():
    """Each gallery image is byte for byte an output of the committed notebook of its name, so
    a notebook re-run without ``scripts/update_gallery.py`` fails here."""
    gallery = load_script(README.parent / "scripts" / "update_gallery.py")
    images = sorted((README.parent / "docs" / "gallery").glob("*.png"))
    assert images
    stale = [image.name for image in images if image.read_bytes() != gallery.gallery_source(image)]
    assert not stale, f"run scripts/update_gallery.py: {stale}"


def test_readme_has_python_snippets():
    assert len(_snippets()) >= 1


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)                  # snippets may write files (run.zarr …)
    code = _snippets()[index]
    namespace = {"__name__": f"readme_snippet_{index}", **_stand_ins()}
    try:
        exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    finally:
        plt.close("all")
    _check_results(namespace, tmp_path)


def _check_results(ns: dict, folder: Path) -> None:
    """What the snippets promise, where they made it: not only that they ran."""
    import numpy as np

    from traindyn import dynamics

    checked = 0
    if "mon" in ns and (folder / "run.zarr").exists():
        # the monitor evaluated exactly at its schedule's steps within the loop
        stream = dynamics.load_stream(folder / "run.zarr")
        schedule = dynamics.schedules.log_spaced(5000, 40)
        expected = [s for s in range(5001) if schedule(s)]
        np.testing.assert_array_equal(stream.step.values, expected)
        assert np.all(np.isfinite(stream["rankme"].values))
        checked += 1
    if "pred" in ns and "measured" in ns:
        # Advani & Saxe at t = 0 from a zero student: σ_ε² + σ_w̄² = 0.25 + 1 (defaults)
        pred, measured = ns["pred"], ns["measured"]
        np.testing.assert_array_equal(pred.time.values, measured.time.values)
        at_zero = pred.test_error.isel(time=0) if "time" in pred.test_error.dims \
            else pred.test_error.isel(step=0)
        np.testing.assert_allclose(at_zero.values, 1.25, rtol=1e-6)
        checked += 1
    if "prediction" in ns:
        # the prediction starts at the model's own cross-entropy and falls under the kernel
        import torch

        model, x, labels = ns["model"], ns["x_probe"], ns["labels"]
        with torch.no_grad():
            start = torch.nn.functional.cross_entropy(model(x[:48]).double(), labels[:48])
        loss = ns["prediction"].train_loss.values
        np.testing.assert_allclose(loss[0], float(start), rtol=1e-6)
        assert np.all(np.diff(loss) < 0), loss
        checked += 1
    if "mean_norm" in ns and "mon" in ns:
        # the user-registered probe, recorded by the Monitor, equals its formula by hand
        import torch
        from traindyn.probes.registry import PROBES

        model, x = ns["model"], ns["x_probe"]
        with torch.no_grad():
            h = torch.relu(model.net[0](x)).double()
        got = ns["mon"].evaluate(0)["mean_norm"].values
        np.testing.assert_allclose(got, [[float(h.norm(dim=1).mean())]], rtol=1e-12)
        PROBES.pop("mean_norm")
        checked += 1
    assert checked, "a README python snippet ran but nothing it promises was checked"
