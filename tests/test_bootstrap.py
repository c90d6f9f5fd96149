"""Set-up policy: keep an installed torch; never a CUDA build on a machine without a GPU."""

from pathlib import Path

import pytest

from tests.helpers import ROOT, load_script


@pytest.fixture
def bootstrap(monkeypatch):
    module = load_script(ROOT / "scripts" / "bootstrap.py")
    calls = []
    monkeypatch.setattr(module, "run", lambda cmd, **kw: calls.append(cmd))
    module.calls = calls
    return module


def test_installed_torch_is_kept(bootstrap, monkeypatch):
    monkeypatch.setattr(bootstrap, "has_module", lambda python, name: True)
    bootstrap.ensure_torch(Path("python"))
    assert bootstrap.calls == []


def test_gpu_machine_gets_the_default_build(bootstrap, monkeypatch):
    monkeypatch.setattr(bootstrap, "has_module", lambda python, name: False)
    monkeypatch.setattr(bootstrap, "has_nvidia_gpu", lambda: True)
    bootstrap.ensure_torch(Path("python"))
    assert bootstrap.calls == [["python", "-m", "pip", "install", "torch"]]


def test_cpu_machine_takes_a_local_cpu_wheel(bootstrap, monkeypatch):
    monkeypatch.setattr(bootstrap, "has_module", lambda python, name: False)
    monkeypatch.setattr(bootstrap, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(bootstrap, "resolve_torch", lambda python, spec: {
        "metadata": {"version": "2.13.0+cpu"},
        "download_info": {"url": "file:///opt/wheels/torch-2.13.0+cpu.whl"}})
    bootstrap.ensure_torch(Path("python"))
    assert bootstrap.calls == [["python", "-m", "pip", "install", "torch==2.13.0"]]


def test_cpu_machine_never_resolves_to_a_cuda_build(bootstrap, monkeypatch):
    monkeypatch.setattr(bootstrap, "has_module", lambda python, name: False)
    monkeypatch.setattr(bootstrap, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(bootstrap, "resolve_torch", lambda python, spec: {
        "metadata": {"version": "2.13.0"},
        "download_info": {"url": "https://files.example/torch-2.13.0-manylinux.whl"}})
    bootstrap.ensure_torch(Path("python"))
    (cmd,) = bootstrap.calls
    assert cmd[-2:] == ["--index-url", bootstrap.CPU_INDEX]
