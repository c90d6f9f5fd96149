"""The shape of the code, read from the syntax trees of every module (nothing is imported):

* dependencies point down: ``traindyn.probes`` and ``traindyn.theory`` never import each other
  nor ``traindyn.dynamics``;
* nothing imports the bare names ``probes``, ``theory`` or ``dynamics`` (only ``traindyn.*``);
* no import circle between modules (package ``__init__`` files, which export lazily, aside);
* no module imports another module's private name (``_x``), and ``dynamics`` uses only the
  public modules of ``probes`` and ``theory``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("traindyn", "theory", "probes", "dynamics")


def _modules() -> dict[str, Path]:
    """Dotted name under ``traindyn`` → source file."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[0] != "traindyn":
                parts.insert(0, "traindyn")
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, alias.name, node.lineno) for alias in node.names]
    return found


def _edges() -> dict[str, set[tuple[str, str | None, int]]]:
    return {name: set(_imports(name, path)) for name, path in MODULES.items()}


EDGES = _edges()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "traindyn" else parts[0]


def _target(module: str, imported: str | None) -> str:
    """The traindyn module an import reaches: ``from a.b import c`` is module a.b.c if it is one."""
    if imported is not None and f"{module}.{imported}" in MODULES:
        return f"{module}.{imported}"
    return module


def test_the_walk_sees_every_package_and_the_imports():
    assert {_package(m) for m in MODULES} == {"traindyn", "theory", "probes", "dynamics"}
    spectral = {t for t, _, _ in EDGES["traindyn.probes.spectral"]}
    assert "traindyn.probes._arrays" in spectral or "traindyn.probes" in spectral


@pytest.mark.parametrize(("low", "forbidden"), [("probes", {"theory", "dynamics"}),
                                                ("theory", {"probes", "dynamics"})])
def test_dependencies_point_down(low, forbidden):
    bad = [(m, t, line) for m, edges in EDGES.items() if _package(m) == low
           for t, _, line in edges
           if t.startswith("traindyn.") and _package(t) in forbidden]
    assert not bad, bad


def test_nothing_imports_the_bare_folder_names():
    bad = [(m, t, line) for m, edges in EDGES.items() for t, _, line in edges
           if t.split(".")[0] in ("probes", "theory", "dynamics")]
    assert not bad, bad


def test_no_import_circle_between_modules():
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, edges in EDGES.items():
        if module in packages:
            continue
        for target, imported, _ in edges:
            reached = _target(target, imported)
            if reached in MODULES and reached not in packages and reached != module:
                graph[module].add(reached)
    cycles: set[tuple[str, ...]] = set()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.add(tuple(stack[stack.index(nxt):]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, sorted(cycles)


def test_no_module_imports_another_modules_private_name():
    bad = [(m, f"{t}.{name}", line) for m, edges in EDGES.items() for t, name, line in edges
           if t.startswith("traindyn") and name and name.startswith("_")
           and not name.startswith("__") and f"{t}.{name}" not in MODULES]
    assert not bad, bad


def test_dynamics_uses_only_public_modules_of_probes_and_theory():
    bad = [(m, t, line) for m, edges in EDGES.items() if _package(m) == "dynamics"
           for t, imported, line in edges
           if _package(t) in ("probes", "theory")
           and any(part.startswith("_") for part in _target(t, imported).split(".")[2:])]
    assert not bad, bad
