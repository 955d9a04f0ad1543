"""Private temporary names for atomic writes, and the sweep that removes those a killed writer left.

Every file calibflow writes goes first to a private name in the destination folder and is renamed
into place (``os.replace``), so readers never see half a file. A writer killed between the two
(SIGKILL, OOM, a node lost) leaves its temporary behind. The name says who wrote it::

    .<final name>.~<host>~<pid>~<random>.<tag>

so a later build can tell a leftover (same host, process gone; or, from another host, older than
``max_age``) from a file that a concurrent writer is still producing, and remove only the former.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

__all__ = ["private_name", "create_private", "is_private", "sweep_stale", "STALE_AGE_S"]

STALE_AGE_S = 24 * 3600.0     # a temporary from another host is presumed dead after a day
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_PATTERN = re.compile(r"^\..+\.~(?P<host>[A-Za-z0-9_-]+)~(?P<pid>\d+)~[0-9a-f]{16}\.(?:tmp|pending)(?:\.\w+)?$")


def private_name(path, tag: str = "tmp", suffix: str = "") -> Path:
    """A fresh private name beside ``path`` (``tag`` is ``tmp`` or ``pending``; ``suffix`` such as
    ``.png`` keeps writers that go by the extension happy)."""
    if tag not in ("tmp", "pending"):
        raise ValueError(f"tag must be 'tmp' or 'pending', not {tag!r}")
    path = Path(path)
    return path.with_name(f".{path.name}.~{_HOST}~{os.getpid()}~{os.urandom(8).hex()}.{tag}{suffix}")


def create_private(path, tag: str = "tmp", mode: int = 0o644) -> Path:
    """Create (exclusively, empty) and return a private name beside ``path``."""
    tmp = private_name(path, tag)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.close(fd)
    os.chmod(tmp, mode)           # whatever the umask: products are for everyone at the site to read
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    return True


def is_private(name: str) -> bool:
    """Whether a file name is one :func:`private_name` makes (a temporary, live or left behind)."""
    return _PATTERN.match(name) is not None


def sweep_stale(folder, max_age: float = STALE_AGE_S, dry_run: bool = False) -> list[Path]:
    """Remove the temporaries under ``folder`` (recursively) whose writer is gone: written on this host
    by a process that no longer exists, or on another host more than ``max_age`` seconds ago.
    Files of live writers, and anything not named by :func:`private_name`, are left alone.
    Returns what was removed (with ``dry_run``: what would be, and nothing is)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now = [], time.time()
    for path in folder.rglob(".*~*~*~*"):
        m = _PATTERN.match(path.name)
        if m is None or not path.is_file():
            continue
        if m["host"] == _HOST:
            stale = not _alive(int(m["pid"]))
        else:
            try:
                stale = now - path.stat().st_mtime > max_age
            except FileNotFoundError:
                continue
        if stale:
            if not dry_run:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
