"""The repository folder: raw files, products and intermediates on disk, beside the registry.

Layout under the repository root::

    registry.sqlite3                       the default registry (unless a URL is given)
    raw/<camera>/<night>/<file>            ingested raws (copy, symlink, hardlink or move)
    calib/<camera>/<type>/...              products
    work/...                               per-(exposure, detector) intermediates

Nothing is written in place: files land under a temporary name in the target folder and are
renamed into place (atomic on one file system).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .atomic import create_private

__all__ = ["Datastore", "TRANSFER_MODES", "sha256_file", "DEFAULT_REPO"]

TRANSFER_MODES = ("copy", "symlink", "hardlink", "move", "direct")
DEFAULT_REPO = "calibrepo"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class Datastore:
    """Files of one repository."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    @property
    def default_registry_url(self) -> str:
        return f"sqlite:///{self.root / 'registry.sqlite3'}"

    def ensure(self) -> None:
        for sub in ("raw", "calib", "work"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def raw_target(self, camera: str, night: str, source: Path) -> Path:
        return self.root / "raw" / camera / night / source.name

    def transfer(self, source: Path, target: Path, mode: str) -> Path:
        """Bring ``source`` into the datastore at ``target``; returns where the file now is.

        ``direct`` leaves the file where it is. The raw file is never modified: copies are made
        to a temporary name and renamed, links point at the original, ``move`` renames.
        """
        if mode not in TRANSFER_MODES:
            raise ValueError(f"unknown transfer mode {mode!r}; choose one of {', '.join(TRANSFER_MODES)}")
        source = Path(source).absolute()
        if mode == "direct":
            return source
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{target}: already exists in the datastore")
        if mode == "copy":
            tmp = create_private(target)
            try:
                shutil.copy2(source, tmp)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        elif mode == "symlink":
            os.symlink(source, target)
        elif mode == "hardlink":
            os.link(source, target)
        elif mode == "move":
            shutil.move(str(source), str(target))
        return target

    def undo_transfer(self, source: Path, target: Path, mode: str) -> None:
        """Reverse :meth:`transfer` (used when registration fails after the file was placed)."""
        if mode == "direct":
            return
        if mode == "move":
            if target.exists() and not Path(source).exists():
                shutil.move(str(target), str(source))
            return
        if target.exists() or target.is_symlink():
            target.unlink()

    def atomic_write_bytes(self, target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_private(target)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
