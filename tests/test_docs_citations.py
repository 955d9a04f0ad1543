"""Citations of the design documents resolve, and nothing cites documents outside the repository.

The code, tests, configuration and markdown cite the design in one form: ``docs/<file>.md`` with an
optional GitHub heading anchor (``docs/algorithms.md#clipped-statistics``). Every such citation in
a .py, .toml, .yaml/.yml or .md file of the repository must name a file that exists and, with an
anchor, a heading of that file. Inside markdown files, relative links to markdown files and
``#anchor`` links are checked the same way. The design documents that once lived outside the
repository may no longer be mentioned at all (a fresh clone cannot follow them). Hidden files and
folders (.git, .venv, tool caches), build outputs and the benchmarks' scratch folder are not part of
the repository's text and are not scanned.

Also: every ``[tool.setuptools.package-data]`` pattern of pyproject.toml matches a file, so the
wheel ships what it says it ships.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SUFFIXES = {".py", ".toml", ".yaml", ".yml", ".md"}
#: folder names never scanned, wherever they are (besides every hidden one)
SKIP_NAMES = {"__pycache__", "build", "dist", "node_modules"}
#: folders (relative to the root) never scanned: build outputs and scratch space of the tools
SKIP_PATHS = {"bench/work", "demo", "calibrepo"}

# the names are split so that this file does not mention them itself
_OUTSIDE = ("ALGORITHMS", "ARCHITECTURE", "PREFECT_NOTES", "PEERS")
OUTSIDE_RE = re.compile(r"\b(?:" + "|".join(_OUTSIDE) + r")\.md\b")
#: docs/<path>.md, optionally #anchor; not part of a longer path (foo/docs/x.md)
CITATION_RE = re.compile(r"(?<![\w./-])docs/((?:[\w-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")
#: markdown link targets: [text](target) and [text](target "title")
LINK_RE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING_RE = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE_RE = re.compile(r"^ {0,3}(```|~~~)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (markup and link targets dropped), lower case,
    every character that is not a letter, digit, underscore, hyphen or space removed, and each
    space turned into a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)                              # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """The heading anchors of a markdown file (ATX headings outside fenced code; a repeated heading
    gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fence = None
    for line in markdown.read_text(encoding="utf-8").splitlines():
        m = FENCE_RE.match(line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence:
            continue
        m = HEADING_RE.match(line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def source_files(root: Path) -> list[Path]:
    """The repository's text files that may cite the design, sorted."""
    out = []
    stack = [root]
    while stack:
        folder = stack.pop()
        for entry in folder.iterdir():
            if entry.name.startswith("."):
                continue
            rel = entry.relative_to(root).as_posix()
            if entry.is_dir():
                if entry.name in SKIP_NAMES or entry.name.endswith(".egg-info") or rel in SKIP_PATHS:
                    continue
                stack.append(entry)
            elif entry.suffix in SUFFIXES and entry.is_file():
                out.append(entry)
    return sorted(out)


def scan(root: Path) -> list[str]:
    """Every problem found under ``root``, one ``path:line: message`` each (empty when all is well)."""
    root = Path(root)
    cache: dict[Path, set[str] | None] = {}

    def heading_anchors(path: Path) -> set[str] | None:
        if path not in cache:
            cache[path] = anchors(path) if path.is_file() else None
        return cache[path]

    def check(where: str, target: Path, anchor: str | None, shown: str) -> str | None:
        found = heading_anchors(target)
        if found is None:
            return f"{where}: {shown}: no such file"
        if anchor and anchor not in found:
            return f"{where}: {shown}: no heading with anchor #{anchor} in {target.relative_to(root).as_posix()}"
        return None

    problems = []
    for path in source_files(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{rel}:{lineno}"
            for m in OUTSIDE_RE.finditer(line):
                problems.append(f"{where}: {m.group(0)} is outside the repository; cite docs/ instead")
            for m in CITATION_RE.finditer(line):
                problem = check(where, root / "docs" / m.group(1), m.group(2), m.group(0))
                if problem:
                    problems.append(problem)
            if path.suffix != ".md":
                continue
            for m in LINK_RE.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-zA-Z][\w+.-]*:", target) or target.startswith("/"):
                    continue            # a URL (http:, mailto:) or an absolute path
                file_part, _, anchor = target.partition("#")
                if file_part and not file_part.endswith(".md"):
                    continue            # a link to a non-markdown file: not a citation
                dest = (path.parent / file_part).resolve() if file_part else path
                if root.resolve() not in dest.parents and dest != root.resolve():
                    continue            # outside the repository (../shared/...): not ours to check
                dest = root / dest.relative_to(root.resolve())
                problem = check(where, dest, anchor or None, target)
                if problem:
                    problems.append(problem)
    return problems


def package_data_problems(root: Path) -> list[str]:
    """Patterns of ``[tool.setuptools.package-data]`` that match no file of their package."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - calibflow needs 3.11
        import tomli as tomllib
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = data.get("tool", {}).get("setuptools", {}).get("package-data", {})
    problems = []
    for package, patterns in package_data.items():
        folder = root.joinpath(*package.split("."))
        for pattern in patterns:
            if not any(p.is_file() for p in folder.glob(pattern)):
                problems.append(f"pyproject.toml: package-data {package!r}: {pattern!r} matches no file "
                                f"under {folder.relative_to(root).as_posix()}/")
    return problems


# ------------------------------------------------------------------------------------------------
# the repository
# ------------------------------------------------------------------------------------------------


def test_every_citation_resolves_and_none_points_outside():
    problems = scan(ROOT)
    assert not problems, "unresolved or outside citations:\n" + "\n".join(problems)


def test_the_scan_covers_the_code_and_the_docs():
    """The scan is not vacuous: it reads the modules that cite the design, and they cite it."""
    files = {p.relative_to(ROOT).as_posix() for p in source_files(ROOT)}
    assert {"calib_core/stats/clipped.py", "docs/algorithms.md", "pyproject.toml", "docker/compose.yaml",
            "tests/conftest.py"} <= files
    assert not any(f.startswith((".venv/", ".git/")) for f in files)
    text = (ROOT / "calib_core" / "stats" / "clipped.py").read_text()
    assert any(m.group(2) for m in CITATION_RE.finditer(text))


def test_package_data_ships_existing_files():
    problems = package_data_problems(ROOT)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# the checker itself, on a small tree
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heading, anchor", [
    ("Clipped statistics", "clipped-statistics"),
    ("Focal-plane background (legacy)", "focal-plane-background-legacy"),
    ("Departures from the reference, and why", "departures-from-the-reference-and-why"),
    ("Bad pixels in ISR (`calib_core/isr/process.py`)", "bad-pixels-in-isr-calib_coreisrprocesspy"),
    ("MEAN, MEDIAN, SIGMACLIP and MINMAX", "mean-median-sigmaclip-and-minmax"),
    ("See [the README](../README.md)", "see-the-readme"),
    ("Stack & combine", "stack--combine"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


#: built up so that the examples below are not citations of this repository themselves
D = "do" + "cs/"


def _tree(tmp_path: Path, code: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Clipped statistics\n\n```yaml\n# not a heading\n```\n\n## Notes\n\n## Notes\n\n"
        "See [the top](#guide), [statistics](#clipped-statistics), [the second notes](#notes-1) and\n"
        "[a comment in code](#not-a-heading).\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(code)
    (tmp_path / ".venv").mkdir()       # hidden folders are not scanned
    (tmp_path / ".venv" / "x.py").write_text(f'"{D}missing.md"\n')
    return tmp_path


def test_scan_accepts_good_citations(tmp_path):
    root = _tree(tmp_path, f'"""Clipped means ({D}guide.md#clipped-statistics; {D}guide.md#notes-1)."""\n'
                           f"# see {D}guide.md\n")
    problems = scan(root)
    # the one bad link of the guide: a "# ..." line inside a code fence is no heading
    assert problems == [f"{D}guide.md:14: #not-a-heading: no heading with anchor #not-a-heading in {D}guide.md"]


def test_scan_fails_on_bad_citations(tmp_path):
    old = "ALGORITHMS" + ".md"
    root = _tree(tmp_path, f'"""Means ({old} 1.1).\n\nSee {D}guide.md#clipped-stats and\n'
                           f'{D}missing.md#x; not a citation: my{D}guide.md#nope, nor # not-a-heading."""\n')
    problems = scan(root)
    assert f"pkg/mod.py:1: {old} is outside the repository; cite docs/ instead" in problems
    assert (f"pkg/mod.py:3: {D}guide.md#clipped-stats: no heading with anchor #clipped-stats in {D}guide.md"
            in problems)
    assert f"pkg/mod.py:4: {D}missing.md#x: no such file" in problems
    assert not any("pkg/mod.py" in p and ("not-a-heading" in p or "nope" in p) for p in problems)
    assert not any(".venv" in p for p in problems)
    assert len(problems) == 4          # the three above and the bad link of the guide


def test_package_data_check_fails_on_a_missing_file(tmp_path):
    (tmp_path / "pkg" / "data").mkdir(parents=True)
    (tmp_path / "pkg" / "data" / "a.yaml").write_text("a: 1\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-data]\npkg = ["data/*.yaml", "registry/alembic.ini"]\n')
    assert package_data_problems(tmp_path) == [
        "pyproject.toml: package-data 'pkg': 'registry/alembic.ini' matches no file under pkg/"]
