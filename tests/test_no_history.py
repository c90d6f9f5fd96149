"""Documents speak of the product, not of how it was developed.

Code, docstrings, comments, tests, notebooks (cell sources), benchmarks, scripts, the README and
the build files are searched for phrases that narrate development history — work sessions,
issue numbers of this project, superseded or earlier versions, other engineers, names kept for
old callers.  History belongs in commit messages.

The patterns are deliberately precise: a Python or Jupyter *session*, pytest's
``scope="session"``, a GPU *device session*, numpy's *legacy global state* or another
project's issue (``owner/repo issue #6``) are what they say and are allowed.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.helpers import ROOT

PATTERNS: dict[str, str] = {
    "work session": r"\bsessions?\b|\bsession[- ]start\b",
    "issue number": r"\bissues?\s*#\s*\d+",
    "superseded": r"\bsuperseded\b|\bsupersedes\b",
    "earlier version": r"\b(?:earlier|previous|older|old)\s+(?:version|registry|implementation|"
                       r"api|code|behaviou?r|release)s?\b",
    "previously": r"\bpreviously\b|\bformerly\b|\bthe former (?:eager|name|api|default|code)\b",
    "legacy": r"\blegacy\b",
    "another engineer": r"\banother (?:engineer|agent)s?\b|\bengineer'?s\b|"
                        r"\bthe lead (?:engineer|developer)\b",
    "old names": r"\bold names?\b|\bunder (?:its|their) old\b",
    "written without": r"\bwritten without (?:a|the) GPU\b|\bat hand\b",
    "this PR": r"\b(?:this|the) (?:PR|pull request|patch series)\b",
    "was renamed": r"\b(?:was|were|has been|have been) (?:renamed|replaced|removed|moved|"
                   r"rewritten)\b",
    "audit": r"\bhostile (?:audit|pass)\b|\bprevious audit\b",
}
"""Phrases of development history (case-insensitive regular expressions)."""

ALLOWED: tuple[str, ...] = (
    r"scope\s*=\s*[\"']session[\"']",                       # pytest fixture scope
    r"\b(?:python|jupyter|ipython|interactive|kernel|notebook|their own|your own|a user's|"
    r"device|shell|ssh|login|http|requests?)\s+sessions?\b",  # sessions that are product terms
    r"gpu_session",                                          # benchmarks/gpu_session.sh
    r"\brequest\.session\b",                                 # pytest's request object
    r"\blegacy global state\b",                              # numpy's own name for it
    r"[\w.-]+/[\w.-]+(?:'s)?\s+issues?\s*#\s*\d+",           # another project's issue tracker
)
"""Contexts in which a pattern's words are the product's (removed before matching)."""

FOLDERS = ("theory", "probes", "dynamics", "traindyn", "tests", "notebooks", "benchmarks",
           "scripts", "docs")
SUFFIXES = (".py", ".ipynb", ".md", ".sh", ".toml", ".cff", ".txt", ".cfg", ".yaml", ".yml")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml", "CITATION.cff")
SELF = "tests/test_no_history.py"



def _files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", *FOLDERS, *TOP_FILES], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return sorted(f for f in listed if f != SELF and (f.endswith(SUFFIXES) or f in TOP_FILES)
                  and (ROOT / f).is_file())


def _lines(path: str) -> list[tuple[int, str]]:
    text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
    if path.endswith(".ipynb"):  # cell sources only: outputs are what the code printed
        cells = json.loads(text).get("cells", [])
        return [(i, line) for i, cell in enumerate(cells, 1)
                for line in "".join(cell.get("source", [])).splitlines()]
    return list(enumerate(text.splitlines(), 1))


def find_history(line: str) -> list[str]:
    """The names of the patterns a line matches, after the allowed contexts are removed."""
    for allowed in ALLOWED:
        line = re.sub(allowed, " ", line, flags=re.IGNORECASE)
    return [name for name, pattern in PATTERNS.items()
            if re.search(pattern, line, flags=re.IGNORECASE)]


def offenders() -> dict[str, list[str]]:
    """``{file: ["line: pattern names: text", …]}`` of every file with history."""
    out: dict[str, list[str]] = {}
    for path in _files():
        for number, line in _lines(path):
            found = find_history(line)
            if found:
                out.setdefault(path, []).append(f"{number}: {', '.join(found)}: "
                                                f"{line.strip()[:120]}")
    return out


@pytest.mark.parametrize(("line", "names"), [
    ("README: since the fifth session neural-tangents runs", ["work session"]),
    ("(the session-start code: 42 s)", ["work session"]),
    ("Expected (issue #16): one read", ["issue number"]),
    ("Superseded by the table below", ["superseded"]),
    ("(An earlier version kept torch's order)", ["earlier version"]),
    ("backward-compatible names of the earlier registry", ["earlier version"]),
    ("previously this returned a float", ["previously"]),
    ("as with the former eager import", ["previously"]),
    ("a legacy shim", ["legacy"]),
    ("another engineer's benchmarks running", ["another engineer"]),
    ("under their old names here", ["old names"]),
    ("written without a GPU at hand", ["written without"]),
    ("this PR moves the helpers", ["this PR"]),
    ("the function was renamed", ["was renamed"]),
    # product words that must not be flagged
    ('@pytest.fixture(scope="session", autouse=True)', []),
    ("objects a reader has in their own session (model, x_probe)", []),
    ("runs the checks in one device session", []),
    ("np.random.get_state()  # noqa: NPY002 - the legacy global state", []),
    ("uses the mean absolute value instead (ngruver/lie-deriv issue #6)", []),
    ("the fourth field of /proc/loadavg", []),
    ("a re-run resumes; checkpoints that failed in an earlier run are retried", []),
    ("the model can no longer predict them", []),
    ("committed and renamed into place", []),
    ("the former is exact, the latter approximate", []),
    ("NC4 needs the final class means, so it takes a second pass", []),
    ("~0 on a helper worker", []),
])
def test_the_patterns_flag_history_and_only_history(line, names):
    assert find_history(line) == names


def test_no_history_anywhere():
    found = offenders()
    assert not found, "development history in:\n" + "\n".join(
        f"{path}:{line}" for path, lines in found.items() for line in lines)
