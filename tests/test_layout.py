"""calib_core's package layout holds (docs/architecture.md#package-layout).

Read from the source with ``ast`` (every import, including the lazy ones inside functions), so a
rule broken in a branch no test runs is still found:

* the repository is a boundary: outside ``calib_core/repository/`` no shipped module imports
  SQLAlchemy, alembic or a module of the repository package; they use what ``calib_core.repository``
  exports;
* the numeric packages import neither the repository nor Prefect, and no ``calib_core`` module
  imports Prefect;
* no two modules or packages of ``calib_core`` share a name;
* every ``calib_core/...py`` path and every ``calib_core.<module>[.<attribute>]`` name written in the
  code, the tests, the docs or the camera files exists (after a move, a stale reference fails here).
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("calib_core", "tasks", "flows", "deployments", "calibflow")
NUMERIC = ("io", "stats", "isr", "builds", "sky", "simulate")
SKIP_PARTS = {"__pycache__", "migrations"}


def _modules(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py")
                  if not SKIP_PARTS & set(p.relative_to(ROOT).parts))


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from a import b`` gives ``a.b``
    too, since ``b`` may be a module."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _violations(paths, forbidden) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line}: imports {name}"
            for p in paths for line, name in _imports(p) if forbidden(name)]


def test_only_the_repository_package_touches_the_database():
    outside = [p for p in _modules(*SHIPPED) if "repository" not in p.relative_to(ROOT).parts[:2]]
    assert len(outside) > 40

    def forbidden(name: str) -> bool:
        top = name.split(".")[0]
        return top in ("sqlalchemy", "alembic") or name.startswith("calib_core.repository.")

    # a name the facade exports (``from calib_core.repository import Registry``) is allowed: it
    # shows up as "calib_core.repository.Registry", which is not a module of the package
    def module_of_repository(name: str) -> bool:
        if not forbidden(name):
            return False
        if name.split(".")[0] in ("sqlalchemy", "alembic"):
            return True
        try:
            importlib.import_module(name)
        except ImportError:
            return False            # an attribute of calib_core.repository, not a module
        return True

    assert _violations(outside, module_of_repository) == []


def test_the_numeric_packages_import_neither_the_repository_nor_prefect():
    numeric = _modules(*(f"calib_core/{p}" for p in NUMERIC))
    assert len(numeric) >= 20

    def forbidden(name: str) -> bool:
        return name == "calib_core.repository" or name.startswith(("calib_core.repository.", "calib_core.buildplan",
                                                                   "calib_core.science"))
    assert _violations(numeric, forbidden) == []
    assert _violations(_modules("calib_core"), lambda n: n.split(".")[0] == "prefect") == []


def test_the_boundary_test_finds_a_violation():
    """The scan itself: a module that imports the registry directly is reported."""
    fake = ROOT / "tasks" / "_layout_probe.py"
    fake.write_text("def f():\n    from calib_core.repository.registry.calibs import lookup\n    import sqlalchemy\n")
    try:
        found = _imports(fake)
    finally:
        fake.unlink()
    assert (2, "calib_core.repository.registry.calibs") in found and (3, "sqlalchemy") in found


def test_no_two_calib_core_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for p in _modules("calib_core"):
        stem = p.parent.name if p.name == "__init__.py" else p.stem
        if p.parent == ROOT / "calib_core" and p.name == "__init__.py":
            continue
        names.setdefault(stem, []).append(str(p.relative_to(ROOT)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_calib_core_has_no_flat_modules_left_beyond_the_shared_ones():
    top = sorted(p.stem for p in (ROOT / "calib_core").glob("*.py") if p.stem != "__init__")
    assert top == ["buildplan", "camera", "configmodel", "errors", "maskedimage", "records", "science"] or \
        top == ["buildplan", "camera", "configmodel", "errors", "maskedimage", "science"]


# ---------------------------------------------------------------------------------------------------
# every calib_core path and dotted name written anywhere exists
# ---------------------------------------------------------------------------------------------------

TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml"}
SKIP_DIRS = {"bench/work", "bench/results", "demo", "calibrepo"}
PATH_RE = re.compile(r"(?<![\w/.-])calib_core/((?:\w+/)*\w+\.py)\b")
DOTTED_RE = re.compile(r"(?<![\w.])calib_core((?:\.\w+)+)(?![\w*])")   # a name, or a family (``name_*``) by its module


def _texts():
    for p in sorted(ROOT.rglob("*")):
        rel = p.relative_to(ROOT)
        if (p.suffix not in TEXT_SUFFIXES or not p.is_file() or any(s.startswith(".") for s in rel.parts)
                or "__pycache__" in rel.parts or any(str(rel).startswith(d) for d in SKIP_DIRS)):
            continue
        yield rel, p.read_text(errors="replace")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        if not Path(getattr(obj, "__file__", None) or "/").resolve().is_relative_to(ROOT):
            return False         # found in another checkout (an editable install elsewhere)
        for attr in parts[i:]:
            fields = getattr(obj, "model_fields", {})     # a pydantic model's field
            if not hasattr(obj, attr) and attr not in fields:
                return False
            obj = getattr(obj, attr, None)
        return True
    return False


def _legacy_names() -> dict[Path, set[str]]:
    """The old module names benchmarks keep on purpose, to measure a baseline tree from before the
    subpackages: the values of each bench script's ``LEGACY_MODULES``."""
    out = {}
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "LEGACY_MODULES":
                out[path.relative_to(ROOT)] = {v.value for v in node.value.values}
    return out


def test_every_calib_core_path_and_name_written_exists():
    legacy = _legacy_names()
    assert "calib_core.rawio" in legacy[Path("bench/bench_night.py")]
    missing = []
    for rel, text in _texts():
        if rel == Path("tests/test_layout.py"):
            continue
        for m in PATH_RE.finditer(text):
            if not (ROOT / "calib_core" / m.group(1)).exists():
                missing.append(f"{rel}: calib_core/{m.group(1)}")
        for m in DOTTED_RE.finditer(text):
            name = "calib_core" + m.group(1).rstrip(".")
            if not _resolves(name) and name not in legacy.get(rel, ()):
                missing.append(f"{rel}: {name}")
    assert missing == []


@pytest.mark.parametrize("bad", ["calib_core/sky.py", "calib_core.registry.calibs", "calib_core.stats.nope"])
def test_a_stale_reference_is_found(bad):
    text = f"see {bad} for details"
    hits = [m.group(0) for m in PATH_RE.finditer(text)] + ["calib_core" + m.group(1) for m in DOTTED_RE.finditer(text)]
    assert hits and not all((ROOT / h).exists() if h.endswith(".py") else _resolves(h) for h in hits)


def _guarded(tree: ast.AST) -> set[int]:
    """Ids of import nodes in the handler of an ``except ImportError`` (fallbacks for other trees)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            out |= {id(n) for h in node.handlers for stmt in h.body for n in ast.walk(stmt)}
    return out


def test_every_name_imported_from_calib_core_exists():
    """Imports inside functions run only when the function does: a moved name must fail here, not
    in the one code path that imports it lazily."""
    bad = []
    for path in _modules(*SHIPPED, "tests", "bench"):
        tree = ast.parse(path.read_text(), str(path))
        skip = _guarded(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("calib_core")
                    and id(node) not in skip):
                for alias in node.names:
                    if alias.name != "*" and not _resolves(f"{node.module}.{alias.name}"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}")
    assert bad == [], "\n".join(bad)
