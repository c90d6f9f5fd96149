"""Build the API reference of traindyn from its docstrings (pdoc) into ``docs/api/``.

Every public module is documented: ``traindyn`` and each module or package under ``theory/``,
``probes/`` and ``dynamics/`` whose dotted path has no part starting with ``_``.  Any warning
pdoc raises (a module that fails to import, an annotation or docstring it cannot read) fails
the build, so the reference never silently loses a page.

Usage: ``python docs/build_api.py [OUTPUT_DIR]`` (``make docs``).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("theory", "probes", "dynamics")


def public_modules(root: Path = ROOT) -> list[str]:
    """``traindyn`` and the dotted names of its public modules, sorted."""
    names = ["traindyn"]
    for sub in SUBPACKAGES:
        for path in sorted((root / sub).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p.startswith("_") for p in parts) or any("-" in p for p in parts):
                continue
            names.append("traindyn." + ".".join(parts))
    return sorted(set(names))


def _resolve_lazy_names(module: object) -> None:
    """Bind the names a package exports lazily (PEP 562 ``__getattr__``), so that pdoc, which
    reads a module's ``__dict__``, documents them."""
    for name in getattr(module, "__all__", ()):
        if name not in vars(module):
            try:
                vars(module)[name] = getattr(module, name)
            except AttributeError as err:
                warnings.warn(f"{module.__name__}.__all__ names {name!r}: {err}", stacklevel=2)


def build(output: Path, names: list[str] | None = None) -> list[str]:
    """Write the HTML reference of ``names`` (default: :func:`public_modules`) to ``output``;
    return pdoc's warnings (empty on success)."""
    sys.path.insert(0, str(ROOT))
    import pdoc.doc
    import pdoc.render

    pdoc.render.configure(docformat="numpy", show_source=False, search=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = names if names is not None else public_modules()
        for name in names:
            _resolve_lazy_names(importlib.import_module(name))
        # every public module once (pdoc.pdoc would walk each package's submodules again)
        modules = {name: pdoc.doc.Module.from_name(name) for name in names}
        for module in modules.values():
            page = output / f"{module.fullname.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(pdoc.render.html_module(module, modules), encoding="utf-8")
        (output / "index.html").write_text(pdoc.render.html_index(modules), encoding="utf-8")
        (output / "search.js").write_text(pdoc.render.search_index(modules), encoding="utf-8")
    mine = [w for w in caught if "pdoc" in (w.filename or "") or "traindyn" in str(w.message)
            or str(ROOT) in (w.filename or "")]
    return [f"{w.category.__name__}: {w.message}" for w in mine]


def main() -> int:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "api"
    problems = build(output)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{len(problems)} warning(s): the API reference is incomplete", file=sys.stderr)
        return 1
    print(f"API reference in {output}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
