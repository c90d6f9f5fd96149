"""traindyn installs under one namespace: ``traindyn.probes``, ``traindyn.theory``,
``traindyn.dynamics``; nothing named ``probes``, ``theory`` or ``dynamics`` lands at the top
level, so a researcher's own files of those names never shadow traindyn."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parents[1]

SHADOWS = {
    name: f"raise ImportError('the user file {name}.py was imported instead of traindyn')\n"
    for name in ("probes", "theory", "dynamics")
}


def _user_folder(folder: Path) -> Path:
    """A working directory holding the user's own probes.py, theory.py and dynamics.py."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in SHADOWS.items():
        (folder / f"{name}.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (setuptools writes build/ beside them)."""
    import shutil

    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for folder in ("traindyn", "theory", "probes", "dynamics"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True,
                   timeout=300)
    (path,) = out.glob("traindyn-*.whl")
    return path


def test_the_wheel_installs_only_the_traindyn_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"traindyn"}, top
    for module in ("traindyn/__init__.py", "traindyn/probes/spectral.py",
                   "traindyn/theory/dmft.py", "traindyn/dynamics/monitor.py",
                   "traindyn/dynamics/recipes/__init__.py"):
        assert module in names, module
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "traindyn = traindyn.dynamics.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_an_installed_wheel_imports_beside_user_files_of_the_same_names(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    work = _user_folder(tmp_path / "work")
    code = textwrap.dedent("""
        import sys, traindyn
        assert traindyn.__file__.startswith(sys.argv[1]), traindyn.__file__
        import traindyn.theory
        assert "torch" not in sys.modules, "import traindyn.theory loaded torch"
        import numpy as np
        x = np.random.default_rng(0).standard_normal((50, 8))
        value = traindyn.probes.rankme(x)
        assert 1.0 < value <= 8.0, value
        assert traindyn.dynamics.Monitor.__module__ == "traindyn.dynamics.monitor"
        assert "probes" not in sys.modules and "dynamics" not in sys.modules
        print("ok")
    """)
    env = child_env()
    env["PYTHONPATH"] = str(site)        # the installed copy, not the source tree
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_source_tree_imports_beside_user_files_of_the_same_names(tmp_path):
    work = _user_folder(tmp_path / "work")
    code = ("import sys; from traindyn import probes, theory, dynamics; "
            "print(probes.__name__, theory.__name__, dynamics.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["traindyn.probes", "traindyn.theory", "traindyn.dynamics"], \
        out.stderr


USER_PROBES = textwrap.dedent('''
    import torch
    from traindyn.probes.registry import Probe, Variable, register


    def mean_norm(features):
        return float(torch.as_tensor(features).double().norm(dim=1).mean())


    register(Probe("mean_norm", "features", {"mean_norm": Variable("mean feature norm")},
                   source="my lab (2026)", fn=mean_norm))
''')

FACTORY = textwrap.dedent('''
    from torch import nn


    def make_mlp():
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
''')


def test_import_of_a_user_file_named_probes_py_runs(tmp_path):
    """``traindyn analyze … --probes mean_norm,rankme --import mylab/probes.py``: the user's
    ``probes.py`` registers its probe and traindyn's own probes stay available."""
    work = _user_folder(tmp_path / "work")
    (work / "mylab").mkdir()
    (work / "mylab" / "probes.py").write_text(USER_PROBES)
    (work / "mylab" / "models.py").write_text(FACTORY)
    ckpt = work / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    states = {}
    for step in (0, 10):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
        states[step] = {k: v.float() for k, v in model.state_dict().items()}
        torch.save(states[step], ckpt / f"step{step}.pt")
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    np.save(work / "inputs.npy", x.numpy())
    cmd = [sys.executable, "-m", "traindyn.dynamics.cli_analyze", "ckpt",
           "--model", "mylab/models.py:make_mlp", "--layers", "0", "--probe-data", "inputs.npy",
           "--probes", "mean_norm,rankme", "--import", "mylab/probes.py",
           "--output", "geometry.nc", "--no-progress", "--no-figures"]
    out = subprocess.run(cmd, cwd=work, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    import xarray as xr

    with xr.open_dataset(work / "geometry.nc") as ds:
        got = ds["mean_norm"].sel(layer="0").values
    for i, step in enumerate((0, 10)):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
        model.load_state_dict({k: v.double() for k, v in states[step].items()})
        with torch.no_grad():
            want = model[0](x.double()).norm(dim=1).mean().item()
        assert abs(got[i] - want) <= 1e-5 * want, (step, got[i], want)
