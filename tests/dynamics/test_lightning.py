"""The Lightning callback sends every recorded evaluation to the trainer's loggers: a CSVLogger's
metrics.csv, read back, holds the Monitor's Dataset values at their own steps."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.dynamics.schedules import linear

lightning = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from traindyn.dynamics.lightning import MonitorCallback  # noqa: E402
from traindyn.dynamics.monitor import Monitor  # noqa: E402

from tests._tiny_models import mlp  # noqa: E402


class _Module(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(6, 16, 16, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callback_of, tmp_path, max_steps: int = 9):
    torch.set_num_threads(1)
    lightning.seed_everything(0, verbose=False)
    module = _Module()
    callback = callback_of(module)
    data = torch.utils.data.TensorDataset(torch.randn(96, 6), torch.randint(0, 3, (96,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = lightning.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[callback],
                                log_every_n_steps=1)
    trainer.fit(module, loader)
    return callback, trainer, tmp_path / "logs" / "version_0" / "metrics.csv"


def _read(path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value != "":
                    rows.setdefault(step, {})[key] = float(value)
    return rows


@pytest.mark.parametrize("background", [False, "thread"])
def test_callback_values_reach_a_csv_logger(tmp_path, background):
    x_probe = torch.randn(40, 6)
    callback, trainer, path = _fit(
        lambda module: MonitorCallback(probes=["rankme", "alpha_req"], layers=["net.1", "net.3"],
                                       schedule=linear(3), probe_data=x_probe,
                                       probe_kwargs={"alpha_req": {"fit_range": (1, 10)}},
                                       background=background), tmp_path)
    ds = callback.to_dataset()
    assert list(ds["step"].values) == [0, 3, 6, 9]
    logged = _read(path)
    for step in ds["step"].values:
        row = logged[int(step)]
        for var in ("rankme", "alpha_req"):
            for layer in ("net.1", "net.3"):
                np.testing.assert_allclose(row[f"{var}/{layer}"],
                                           ds[var].sel(step=step, layer=layer).item(), rtol=1e-12)
        loss = ds["train_loss"].sel(step=step).item()
        if np.isnan(loss):
            assert step == 0 and np.isnan(row.get("train_loss", np.nan))
        else:
            np.testing.assert_allclose(row["train_loss"], loss, rtol=1e-12)
    assert trainer.callback_metrics["rankme/net.3"].item() == pytest.approx(
        ds["rankme"].sel(step=9, layer="net.3").item(), rel=1e-6)


def test_callback_takes_a_monitor(tmp_path):
    x_probe = torch.randn(30, 6)
    made = {}

    def build(module):
        made["monitor"] = Monitor(module, probes=["rankme"], layers=["net.3"],
                                  schedule=linear(4), probe_data=x_probe, learning_rate=0.1)
        return MonitorCallback(made["monitor"])

    callback, _, path = _fit(build, tmp_path, max_steps=8)
    assert callback.monitor is made["monitor"]
    ds = callback.to_dataset()
    logged = _read(path)
    assert sorted(k for k in logged if "rankme/net.3" in logged[k]) == [0, 4, 8]
    np.testing.assert_allclose([logged[s]["rankme/net.3"] for s in (0, 4, 8)],
                               ds["rankme"].sel(layer="net.3").values, rtol=1e-12)


def test_callback_refuses_positional_probes_and_a_model():
    with pytest.raises(TypeError, match="takes a Monitor or Monitor's keyword arguments"):
        MonitorCallback(["rankme"])
    with pytest.raises(TypeError, match="do not pass model="):
        MonitorCallback(model=nn.Linear(2, 2))
