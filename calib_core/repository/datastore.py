"""The repository folder: raw files, products and intermediates on disk, beside the registry.

Layout under the repository root::

    registry.sqlite3                       the default registry (unless a URL is given)
    raw/<camera>/<night>/<exposure>/<file> ingested raws (copy, symlink, hardlink or move); the
                                           exposure folder keeps two exposures with one file name apart
    calib/<camera>/<type>/...              products
    work/...                               per-(exposure, detector) intermediates

Nothing is written in place: files land under a temporary name in the target folder and are
renamed into place (atomic on one file system). Every path the datastore hands out for writing is
checked to lie inside the repository (:meth:`Datastore.inside`): identifiers that come from raw
headers become file names, and none of them may lead a write outside.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from pathlib import Path

from calib_core.errors import InputError
from calib_core.io.atomic import create_private

__all__ = ["Datastore", "DatastoreError", "TRANSFER_MODES", "sha256_file", "DEFAULT_REPO", "check_identifier",
           "verify_raw", "RAW_MTIME_MARGIN_S"]

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


# a raw whose mtime is later than (ingest time - this) is hashed again before a build reads it
RAW_MTIME_MARGIN_S = 60.0


def verify_raw(path: str | Path, checksum: str, size: int | None = None, ingested_at=None,
               always: bool = False) -> None:
    """Check that a registered raw is still the file that was ingested; ``RawReadError`` if not.

    Cheap first: a different size is a mismatch at once; a file not modified since it was ingested
    (mtime earlier than the ingest time, less a margin for the ingest itself) is trusted. Otherwise,
    or with ``always``, the sha256 is computed (once per process for an unchanged file) and compared.
    """
    from calib_core.io.raw import RawReadError

    try:
        st = os.stat(path)
    except OSError as exc:
        raise RawReadError(path, f"cannot read the registered raw: {exc.strerror}") from None
    if size is not None and st.st_size != int(size):
        raise RawReadError(path, f"changed since ingest: {st.st_size} bytes, {int(size)} when ingested "
                                 "(re-ingest it, or restore the original)")
    if not always and ingested_at is not None:
        import datetime as dt

        when = ingested_at if isinstance(ingested_at, dt.datetime) else dt.datetime.fromisoformat(str(ingested_at))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        if st.st_mtime < when.timestamp() - RAW_MTIME_MARGIN_S:
            return
    actual = _cached_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if actual != checksum:
        raise RawReadError(path, f"changed since ingest: sha256 {actual[:12]}, {checksum[:12]} when ingested "
                                 "(re-ingest it, or restore the original)")


@functools.lru_cache(maxsize=4096)
def _cached_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_file(path)


class DatastoreError(InputError):
    """A path the repository would write lies outside it, or an identifier cannot be a file name."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_identifier(value: str, what: str = "identifier") -> str:
    """``value`` if it can be one component of a file name, else :class:`DatastoreError` saying why.

    Exposure ids, camera names and filters come from raw headers and become parts of paths in the
    repository; a separator or ``..`` in one would lead a write elsewhere.
    """
    text = str(value)
    problem = None
    if not text.strip():
        problem = "is empty"
    elif "/" in text or "\\" in text:
        problem = "contains a path separator"
    elif text.startswith(".") or ".." in text:
        problem = "starts with '.' or contains '..'"
    elif _CONTROL.search(text):
        problem = "contains control characters"
    elif len(text) > 128:
        problem = f"is {len(text)} characters long (at most 128)"
    if problem:
        raise DatastoreError(f"{what} {text!r} {problem}: it would become a path in the repository")
    return text


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

    def inside(self, path: str | Path) -> Path:
        """``path`` (absolute), after checking that it lies inside the repository once ``..`` and
        symbolic links are resolved; :class:`DatastoreError` otherwise."""
        path = Path(path)
        if not path.is_absolute():
            path = self.root / path
        resolved = Path(os.path.realpath(path))
        root = Path(os.path.realpath(self.root))
        if resolved != root and root not in resolved.parents:
            raise DatastoreError(f"{path}: refusing to write outside the repository {self.root}")
        return path

    def raw_target(self, camera: str, night: str, source: Path, exposure_id: str | None = None) -> Path:
        parts = [check_identifier(camera, "camera name"), check_identifier(night, "night")]
        if exposure_id is not None:
            parts.append(check_identifier(exposure_id, "exposure id"))
        return self.inside(self.root.joinpath("raw", *parts, Path(source).name))

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
        target = self.inside(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_private(target)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
