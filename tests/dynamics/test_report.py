"""`traindyn report`: one self-contained HTML page from an analyze Dataset and from a monitor's
Zarr store while it is being written.  The page is parsed back: every figure embedded as a PNG,
every variable and layer present, the table's numbers equal to the Dataset's, the NaN reasons
in full, and nothing referenced outside the file."""

from __future__ import annotations

import base64
import html
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.dynamics import storage
from traindyn.dynamics.cli import main as cli_main
from traindyn.dynamics.report import build_report, load_run, write_report

from tests.helpers import ROOT, load_script

FACTORY = '''
from torch import nn


def make_mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))
'''


class _Page(HTMLParser):
    """Every element's attributes, the images' sources and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.headers: list[str] = []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            self.attrs.append((tag, key, value or ""))
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_th:
            self.headers.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _self_contained(parsed: _Page, page: str) -> None:
    """No attribute loads or links anything outside the page; every image is an embedded
    PNG."""
    for tag, key, value in parsed.attrs:
        if key in ("src", "href", "srcset", "action", "poster", "data"):
            assert value.startswith(("data:", "#")), (tag, key, value[:80])
    assert "url(" not in page and "@import" not in page
    assert parsed.images
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """A three-checkpoint series (one unreadable file) analysed with rankme, alpha-ReQ (NaN
    for the 10-wide output layer: fewer eigenvalues than its fit range) and weight spectra."""
    from traindyn.dynamics.analyze import analyze

    folder = tmp_path_factory.mktemp("report")
    (folder / "fac.py").write_text(FACTORY)
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    ns: dict = {}
    exec(FACTORY, ns)
    for step in (0, 10, 100):
        torch.manual_seed(step)
        torch.save(ns["make_mlp"]().state_dict(), ckpt / f"step{step}.pt")
    (ckpt / "step1000.pt").write_bytes(b"not a checkpoint")
    torch.set_num_threads(1)
    ds = analyze(ckpt, model=f"{folder / 'fac.py'}:make_mlp", layers=["0", "2", "4"],
                 probes=["rankme", "alpha_req"], n_samples=200, learning_rate=0.5,
                 output=folder / "run.nc", progress=False, figures=False)
    return folder / "run.nc", ds


def test_report_of_an_analyze_run(analyzed, tmp_path):
    path, ds = analyzed
    out = write_report(path, tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    parsed = _parse(page)
    _self_contained(parsed, page)
    text = html.unescape("".join(parsed.text))
    # every numeric variable and every layer appears
    for name, da in ds.data_vars.items():
        if da.dtype.kind in "fiu" and "step" in da.dims:
            assert f"{name}" in text, name
    for layer in ds["layer"].values:
        assert str(layer) in parsed.headers
    # the last evaluation is the last checkpoint that loaded (step 100, not the failed 1000)
    assert "Last evaluation: step 100, time = learning rate × step = 50" in text
    last = ds.sel(step=100)
    for layer in ("0", "2"):
        assert f"{float(last['rankme'].sel(layer=layer)):.5g}" in text
    # the output layer's alpha-ReQ is NaN: the table points to its reason, given in full
    assert np.isnan(float(last["alpha_req"].sel(layer="4")))
    reason = str(last["layer_notes"].sel(layer="4").values)
    assert "alpha-ReQ" in reason and reason in text
    key = re.search(r'<td class="nan">NaN <a href="#nan-(\d+)">', page).group(1)
    assert f'id="nan-{key}"' in page
    # the failed checkpoint's reason in full, and the provenance
    failure = str(ds["reason"].sel(step=1000).values)
    assert failure and f"checkpoint failed: {failure}" in text
    for digest in ds["checkpoint_hash"].values:
        assert str(digest) in text
    assert "Garrido" in text                         # rankme's source paper
    assert re.search(r'<td class="name">learning_rate</td><td class="text">0.5</td>', page)
    assert len(parsed.images) == 1                   # the overview (no phase plot: 3 steps
    # of which alpha-ReQ is finite only at the hidden layers, the last layer is NaN)


def test_cli_report_writes_next_to_the_run(analyzed, tmp_path):
    path, _ = analyzed
    copy = tmp_path / "copy.nc"
    copy.write_bytes(path.read_bytes())
    assert cli_main(["report", str(copy)]) == 0
    assert (tmp_path / "copy.html").read_text().startswith("<!DOCTYPE html>")
    assert cli_main(["report", str(tmp_path / "missing.nc")]) == 2


def test_report_of_a_live_monitor_store(tmp_path):
    """A report written while the monitor is still appending shows the evaluations committed
    so far; seeds are absent, so no band is claimed."""
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU())
    store = tmp_path / "run.zarr"
    data = torch.randn(64, 8)
    with Monitor(model, probes=["rankme", "alpha_req"], layers=["1", "3"], schedule=linear(2),
                 probe_data=data, learning_rate=0.1, store=store,
                 probe_kwargs={"alpha_req": {"fit_range": (1, 10)}}) as monitor:
        for step in range(9):
            with torch.no_grad():
                model[0].weight.mul_(1.05)
            monitor.step(step, train_loss=1.0 / (1 + step))
            if step == 6:
                live = load_run(store)
                page = build_report(live, origin=str(store))
    assert list(live["step"].values) == [0, 2, 4, 6]
    parsed = _parse(page)
    _self_contained(parsed, page)
    text = html.unescape("".join(parsed.text))
    assert "4 evaluations" in text and "Last evaluation: step 6" in text
    for name in ("rankme", "alpha_req", "train_loss"):
        assert name in text
    assert f"{float(live['train_loss'].sel(step=6)):.5g}" in text
    assert f"{float(live['rankme'].sel(step=6, layer='3')):.5g}" in text
    assert "±" not in text
    assert len(parsed.images) == 2     # overview and the phase trajectory (4 steps)
    final = storage.load(store)
    assert list(final["step"].values) == [0, 2, 4, 6, 8]


def test_report_of_a_seeded_run_gives_mean_and_sem(tmp_path):
    import xarray as xr

    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 1.0, (4, 3, 2))
    ds = xr.Dataset({"rankme": (("seed", "step", "layer"), values,
                                {"long_name": "RankMe", "units": "1"})},
                    coords={"seed": np.arange(4), "step": [0, 1, 2], "layer": ["a", "b"]})
    page = build_report(ds)
    last = values[:, -1, 0]
    mean, sem = last.mean(), last.std(ddof=1) / 2.0
    decimals = 1 - int(np.floor(np.log10(sem)))      # the SEM to two significant digits
    assert f"{mean:.{decimals}f} ± {sem:.{decimals}f}" in html.unescape(page)
    assert "mean ± SEM over seeds" in html.unescape(page)


def test_write_report_of_a_dataset_needs_an_output(tmp_path):
    import xarray as xr

    with pytest.raises(ValueError, match="output="):
        write_report(xr.Dataset(coords={"step": [0]}))
    assert Path(write_report(xr.Dataset(coords={"step": [0]}), tmp_path / "a.html")).is_file()


def test_analyze_report_flag_writes_the_page_beside_the_output(analyzed, tmp_path):
    path, ds = analyzed
    folder = path.parent
    output = tmp_path / "again.nc"
    code = cli_main(["analyze", str(folder / "ckpt"), "--model", f"{folder / 'fac.py'}:make_mlp",
                     "--layers", "0,2,4", "--probes", "rankme", "--n-samples", "200",
                     "--output", str(output), "--no-progress", "--no-figures", "--report"])
    assert code == 1    # the unreadable checkpoint
    page = (tmp_path / "again.html").read_text()
    parsed = _parse(page)
    _self_contained(parsed, page)
    text = html.unescape("".join(parsed.text))
    assert f"{float(ds['rankme'].sel(step=100, layer='2')):.5g}" in text


def test_report_tables_any_category_dimension(tmp_path):
    """A recipe run over (load_ratio, seed, step): one table per load ratio column, with mean ±
    SEM; tiny values in powers of ten; the theory Dataset drawn in the overview."""
    import xarray as xr

    rng = np.random.default_rng(2)
    err = 1e-8 * (1 + rng.random((2, 5, 3)))
    ds = xr.Dataset({"train_error": (("load_ratio", "seed", "step"), err,
                                     {"long_name": "training error", "units": "1"})},
                    coords={"load_ratio": [0.5, 2.0], "seed": np.arange(5),
                            "step": [0, 10, 100]})
    page = html.unescape(build_report(ds))
    assert "Per load_ratio" in page and "load_ratio = 2.0" in page
    last = err[1, :, -1]
    mean, sem = last.mean(), last.std(ddof=1) / np.sqrt(5)
    exp = int(np.floor(np.log10(mean)))
    decimals = 1 - int(np.floor(np.log10(sem / 10.0**exp)))
    assert (f"({mean / 10.0**exp:.{decimals}f} ± {sem / 10.0**exp:.{decimals}f})e{exp:+03d}"
            in page)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(analyzed, tmp_path):
    """The page, opened offline in a real browser (scripts/report_screenshot.py), renders: a
    screenshot of the window size with content (not a blank page)."""
    import shutil

    if not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    from PIL import Image

    tool = load_script(ROOT / "scripts" / "report_screenshot.py")
    page = write_report(analyzed[0], tmp_path / "r.html")
    png = tool.screenshot(page, tmp_path / "r.png", width=1000, height=1500)
    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert image.shape == (1500, 1000)
    assert image.std() > 10          # text, tables and the figure, not an empty page
