"""Imports stay light: each package loads only what it needs (checked in fresh interpreters)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "scipy", "sympy", "xarray", "jax")


def _loaded_after(code: str) -> set[str]:
    """Top-level modules of HEAVY that a fresh interpreter has loaded after running ``code``."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_control_the_check_sees_a_heavy_import():
    assert _loaded_after("import json; import xarray") == {"xarray"}


def test_import_theory_does_not_import_torch():
    assert "torch" not in _loaded_after("import traindyn.theory")


def test_import_probes_does_not_import_sympy():
    assert "sympy" not in _loaded_after("import traindyn.probes")


def test_import_dynamics_is_lazy():
    assert _loaded_after("import traindyn.dynamics") == set()
    # first use imports what a name needs (every name: test_every_public_name_…)
    assert _loaded_after("from traindyn import dynamics; dynamics.records") == {"xarray"}


def test_traindyn_help_imports_none_of_the_heavy_packages():
    code = ("import sys, contextlib, io\nsys.argv = ['traindyn', '--help']\n"
            "from dynamics.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main()\n    except SystemExit:\n        pass")
    assert _loaded_after(code) == set()
    for command in ("demo", "analyze", "theory"):
        code_sub = code.replace("'--help'", f"{command!r}, '--help'")
        assert _loaded_after(code_sub) == set(), command


@pytest.mark.parametrize("name", ["Monitor", "analyze", "sweep", "load_stream", "local_client",
                                  "records", "save", "load", "schedules", "checkpoints",
                                  "probe_inputs", "plot", "recipes"])
def test_every_public_name_of_dynamics_resolves(name):
    import types

    from traindyn import dynamics

    assert name in dynamics.__all__
    value = getattr(dynamics, name)
    if name == "sweep":  # the function, even once its module has been imported
        import traindyn.dynamics.sweep  # noqa: F401

        assert callable(dynamics.sweep) and not isinstance(dynamics.sweep, types.ModuleType)
    elif name in ("analyze", "records", "schedules", "checkpoints", "probe_inputs", "plot",
                  "recipes"):
        assert isinstance(value, types.ModuleType) and value.__name__ == f"traindyn.dynamics.{name}"
    else:
        assert callable(value)
