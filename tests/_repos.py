"""A fresh datastore + SQLite registry with raw files ingested: the setup most flow tests start from."""

from __future__ import annotations

from pathlib import Path

from calib_core.camera import load_camera
from calib_core.repository import Datastore, Registry, ingest_files


def ingested_repo(root, raws, camera: str, transfer: str = "symlink") -> tuple[Datastore, Registry]:
    """A new repository at ``root`` (registry migrated) holding ``raws`` (files, or a folder of FITS
    files) of ``camera``; fails the test if any file does not ingest."""
    store = Datastore(root)
    reg = Registry.open(store.default_registry_url)
    reg.upgrade()
    if isinstance(raws, (str, Path)) and Path(raws).is_dir():
        raws = sorted(Path(raws).glob("*.fits"))
    rep = ingest_files(raws, load_camera(camera), reg, store, transfer=transfer)
    assert rep.ok, rep.failed
    return store, reg
