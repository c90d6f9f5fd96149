"""The API reference (``make docs``: pdoc over every public module) builds without a warning,
and LICENSE / CITATION.cff are well-formed."""

from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT, load_script


def _builder():
    return load_script(ROOT / "docs" / "build_api.py", "traindyn_build_api")


def test_the_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("pdoc")
    builder = _builder()
    names = builder.public_modules()
    # the list is every module file without a private part, counted independently here
    files = [p for sub in ("theory", "probes", "dynamics") for p in (ROOT / sub).rglob("*.py")
             if not any(part.startswith("_") for part in
                        p.relative_to(ROOT).with_suffix("").parts if part != "__init__")]
    assert len(names) == len(files) + 1                       # + traindyn itself
    assert builder.build(tmp_path, names) == []
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    assert {f"{n.replace('.', '/')}.html" for n in names} <= pages
    # lazily exported names are documented on their package's page
    probes_page = (tmp_path / "traindyn" / "probes.html").read_text()
    assert 'id="rankme"' in probes_page and "Garrido" in probes_page
    readers = (tmp_path / "traindyn" / "dynamics" / "checkpoints" / "base.html").read_text()
    assert 'id="CheckpointReader.can_open"' in readers


def test_the_build_reports_a_name_it_cannot_document(tmp_path, monkeypatch):
    pytest.importorskip("pdoc")
    from traindyn.dynamics import schedules

    monkeypatch.setattr(schedules, "__all__", [*schedules.__all__, "no_such_schedule"])
    problems = _builder().build(tmp_path, ["traindyn.dynamics.schedules"])
    assert len(problems) == 1 and "no_such_schedule" in problems[0]


def test_license_and_citation_are_well_formed():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the traindyn authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):                 # required by CFF 1.2.0
        assert cff[key], key
    assert all(("name" in a) or ("family-names" in a) for a in cff["authors"])
    assert cff["license"] == "MIT" and cff["type"] in ("software", "dataset")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(cff["date-released"]))
    allowed = {"cff-version", "message", "title", "abstract", "type", "authors", "version",
               "date-released", "license", "keywords", "repository-code", "url", "doi",
               "identifiers", "preferred-citation", "references", "contact", "commit"}
    assert set(cff) <= allowed, set(cff) - allowed             # CFF 1.2.0 keys only
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert str(cff["version"]) == version.group(1)
