#!/usr/bin/env python3
"""docker/requirements.lock: every package of the calibflow image, pinned, with the sha256 hashes of
its wheels. The Dockerfile installs it with ``pip install --require-hashes`` (so two builds of the
image install the same files, and a file that changed on the index is refused), then the project
itself with ``--no-deps``; ``make install`` installs it too, so the tests run on the image's versions.

    python docker/lock.py            # write the lock from this environment (run after `make install`
                                     # or after changing pyproject.toml's dependencies)
    python docker/lock.py --check    # exit 1, saying why, unless the lock covers pyproject.toml

What is pinned:

* the runtime dependencies of ``pyproject.toml`` (not the test extras), recursively, at the versions
  installed in the environment that runs this script (the one the tests ran in), with the markers
  evaluated for the image (Linux, CPython 3.11, the only interpreter this script accepts);
* the build tools: pip (this environment's) and what ``[build-system] requires`` names (setuptools,
  at the newest version that satisfies it), since the image builds the project without isolation.

The hashes are those of the files pip picks for linux/amd64 and linux/arm64 (``pip install
--dry-run --report`` of the pins, once per platform); producing them needs the package index,
checking the lock does not. ``--check`` verifies, offline: every requirement reached from
pyproject.toml (and the build requirements) has a pinned line that satisfies it, nothing else is
pinned, each line has a hash, and the versions installed here are the pinned ones.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "docker" / "requirements.lock"
IMAGE_PYTHON = "3.11"            # docker/Dockerfile's base image (tests/test_docker.py keeps them equal)
# the platforms hashes are gathered for: (label, pip options selecting its wheels)
# (manylinux tags up to glibc 2.36, Debian 12's: pip does not widen a --platform by itself)


def _manylinux(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)] + [f"manylinux2014_{arch}"]
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return [opt for tag in tags for opt in ("--platform", tag)]


PLATFORMS = [("linux/amd64", _manylinux("x86_64")), ("linux/arm64", _manylinux("aarch64"))]
HEADER = """\
# The calibflow image's packages, pinned, with the sha256 of their wheels for linux/amd64 and
# linux/arm64 (CPython {python}). Do not edit: produced by `python docker/lock.py` from the
# environment the tests ran in, checked by `python docker/lock.py --check` (tests/test_docker.py).
# docker/Dockerfile and `make install` install it with `pip install --require-hashes -r`.
"""


class LockError(Exception):
    pass


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def image_environment() -> dict[str, str]:
    """The marker environment of the image: this interpreter's, which must be the image's Python."""
    env = default_environment()
    if env["python_version"] != IMAGE_PYTHON or env["sys_platform"] != "linux" \
            or env["implementation_name"] != "cpython":
        raise LockError(f"run this with CPython {IMAGE_PYTHON} on Linux (the image's Python), not "
                        f"{env['implementation_name']} {env['python_version']} on {env['sys_platform']}")
    return env


def resolve_installed(requirements: list[str], env: dict[str, str]) -> dict[str, tuple[str, str, list[str]]]:
    """Walk ``requirements`` through the installed distributions' metadata:
    {canonical name: (project name with the extras asked of it, installed version, [who requires it])}.
    Raises LockError where a requirement is not installed, or installed at a version that does not
    satisfy it. (The extras are part of the pin: in --require-hashes mode pip wants ``sqlalchemy[asyncio]``
    pinned as such.)"""
    found: dict[str, tuple[str, str, list[str]]] = {}
    extras_seen: dict[str, set[str]] = {}
    queue = [(Requirement(r), "pyproject.toml") for r in requirements]
    while queue:
        req, parent = queue.pop(0)
        key = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise LockError(f"{req} (required by {parent}) is not installed here: run `make install`") from None
        version = dist.version
        if not req.specifier.contains(version, prereleases=True):
            raise LockError(f"{req.name} {version} is installed, but {parent} requires {req}")
        if key in found:
            if parent not in found[key][2]:
                found[key][2].append(parent)
        else:
            found[key] = (dist.metadata["Name"], version, [parent])
        # the first visit takes the base requirements (extra ""), every visit the extras newly asked for
        contexts = set(req.extras) - extras_seen.get(key, set())
        if key not in extras_seen:
            contexts.add("")
        extras_seen.setdefault(key, set()).update(req.extras)
        for line in dist.requires or []:
            sub = Requirement(line)
            if any((sub.marker is None and e == "") or (sub.marker is not None and sub.marker.evaluate({**env, "extra": e}))
                   for e in contexts):
                queue.append((sub, found[key][0]))
    return {key: (name + (f"[{','.join(sorted(extras_seen[key]))}]" if extras_seen[key] else ""), version, parents)
            for key, (name, version, parents) in found.items()}


def _runtime_requirements() -> list[str]:
    return list(pyproject()["project"]["dependencies"])


def _build_requirements() -> list[str]:
    return ["pip", *pyproject()["build-system"]["requires"]]


def compute_pins(resolve_build_tools: bool = True) -> dict[str, tuple[str, str, list[str]]]:
    """Every pin the lock must hold (runtime from this environment; build tools: pip from this
    environment, the build requirements resolved on the index when ``resolve_build_tools``)."""
    env = image_environment()
    pins = resolve_installed(_runtime_requirements(), env)
    pins["pip"] = ("pip", md.version("pip"), ["the image's build"])
    for line in pyproject()["build-system"]["requires"]:
        req = Requirement(line)
        key = canonicalize_name(req.name)
        if key in pins:
            continue
        version = _newest(line) if resolve_build_tools else None
        pins[key] = (req.name, version, ["[build-system] requires"])
    return pins


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _report(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        res = _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *args)
        if res.returncode != 0:
            raise LockError(f"pip {' '.join(args)}:\n{res.stderr[-3000:]}")
        return json.loads(report.read_text())


def _newest(requirement: str) -> str:
    (item,) = _report(["--no-deps", requirement])["install"]
    return item["metadata"]["version"]


def gather_hashes(pins: dict[str, tuple[str, str, list[str]]]) -> dict[str, set[str]]:
    """sha256 hashes of the files pip installs for each pin, on each platform of PLATFORMS."""
    hashes: dict[str, set[str]] = {key: set() for key in pins}
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "pins.txt"
        reqs.write_text("".join(f"{name}=={version}\n" for name, version, _ in pins.values()))
        for label, options in PLATFORMS:
            report = _report(["--no-deps", "--only-binary=:all:", "--python-version", IMAGE_PYTHON,
                              "--implementation", "cp", "--target", str(Path(tmp) / "target"), *options,
                              "-r", str(reqs)])
            got = set()
            for item in report["install"]:
                key = canonicalize_name(item["metadata"]["name"])
                digest = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
                if not digest:
                    raise LockError(f"{label}: pip gave no sha256 for {key}")
                hashes[key].add(digest)
                got.add(key)
            if got != set(pins):
                raise LockError(f"{label}: no file for {', '.join(sorted(set(pins) - got))}")
    return hashes


def render(pins: dict[str, tuple[str, str, list[str]]], hashes: dict[str, set[str]]) -> str:
    out = [HEADER.format(python=IMAGE_PYTHON)]
    for key in sorted(pins):
        name, version, parents = pins[key]
        lines = [f"{name}=={version}"] + [f"    --hash=sha256:{h}" for h in sorted(hashes[key])]
        out.append(" \\\n".join(lines) + "\n")
        out.append(f"    # via {', '.join(sorted(set(parents), key=str.lower))}\n")
    return "".join(out)


_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[A-Za-z0-9._,-]+\])?==(?P<version>\S+)$")


def parse_lock(text: str) -> dict[str, tuple[str, str, list[str]]]:
    """{canonical name: (name, version, [sha256 ...])} of a lock file."""
    entries: dict[str, tuple[str, str, list[str]]] = {}
    logical = re.sub(r"\\\n", " ", text)
    for raw in logical.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        spec, *opts = line.split()
        m = _LINE.match(spec)
        if not m:
            raise LockError(f"not an exact pin: {spec!r}")
        digests = []
        for opt in opts:
            if not opt.startswith("--hash=sha256:") or not re.fullmatch(r"[0-9a-f]{64}", opt.split(":", 1)[1]):
                raise LockError(f"{spec}: unexpected option {opt!r}")
            digests.append(opt.split(":", 1)[1])
        key = canonicalize_name(m["name"])
        if key in entries:
            raise LockError(f"{m['name']} is pinned twice")
        entries[key] = (m["name"] + (m["extras"] or ""), m["version"], digests)
    return entries


def _extras(name: str) -> set[str]:
    return set(name.partition("[")[2].rstrip("]").split(",")) - {""}


def check(lock_text: str) -> list[str]:
    """What is wrong with a lock, offline (empty: nothing)."""
    try:
        entries = parse_lock(lock_text)
        env = image_environment()
    except LockError as exc:
        return [str(exc)]
    problems = []
    # every requirement reached from pyproject.toml's dependencies, walked through the pinned versions'
    # metadata (the installed ones: a pin that differs from what is installed is reported)
    try:
        needed = resolve_installed(_runtime_requirements(), env)
    except LockError as exc:
        return [str(exc)]
    needed["pip"] = ("pip", md.version("pip"), ["the image's build"])
    for key, (name, version, parents) in sorted(needed.items()):
        if key not in entries:
            problems.append(f"{name} (required by {', '.join(parents)}) is not pinned")
        elif Version(entries[key][1]) != Version(version):
            problems.append(f"{name} is pinned at {entries[key][1]} but {version} is installed here "
                            f"(regenerate the lock, or `make install`)")
        elif _extras(entries[key][0]) != _extras(name):
            problems.append(f"{entries[key][0]} is pinned, but {name} is required")
    for line in _build_requirements():
        req = Requirement(line)
        key = canonicalize_name(req.name)
        if key not in entries:
            problems.append(f"build requirement {line} is not pinned")
        elif not req.specifier.contains(entries[key][1], prereleases=True):
            problems.append(f"build requirement {line} is pinned at {entries[key][1]}")
        needed.setdefault(key, (req.name, entries.get(key, ("", "", []))[1], ["[build-system] requires"]))
    for key in sorted(set(entries) - set(needed)):
        problems.append(f"{entries[key][0]}=={entries[key][1]} is pinned but nothing requires it")
    for key, (name, version, digests) in sorted(entries.items()):
        if not digests:
            problems.append(f"{name}=={version} has no --hash")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="check the lock instead of writing it (offline)")
    ap.add_argument("--lock", type=Path, default=LOCK, help=f"lock file (default {LOCK.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.check:
        if not args.lock.is_file():
            print(f"{args.lock}: no lock file; run python docker/lock.py", file=sys.stderr)
            return 1
        problems = check(args.lock.read_text())
        for p in problems:
            print(f"{args.lock.name}: {p}", file=sys.stderr)
        if not problems:
            print(f"{args.lock.name}: {len(parse_lock(args.lock.read_text()))} pins cover pyproject.toml")
        return 1 if problems else 0
    try:
        pins = compute_pins()
        text = render(pins, gather_hashes(pins))
    except LockError as exc:
        print(f"lock: {exc}", file=sys.stderr)
        return 1
    args.lock.write_text(text)
    problems = check(text)
    for p in problems:
        print(f"{args.lock.name}: {p}", file=sys.stderr)
    print(f"wrote {args.lock} ({len(pins)} pins)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
