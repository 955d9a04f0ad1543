"""How long intermediates stay on disk (docs/architecture.md#intermediates-and-disk), and what
``calibflow prune`` may free.

A build writes its per-(exposure, detector) intermediates under ``work/<camera>/<type>/``: the
post-ISR image (``<exposure>-det<NNN>-<key>.fits`` and its ``.json``), side products beside it
(``<stem>-<suffix>.fits``), and for the sky build the binned models of each pass (``-bins<k>-``),
the residuals (``-resid-``), each exposure's surface (``<exposure>-surface-<digest>.pkl``) and the
focal-plane frames (``pass-frame-det<NNN>-``, ``frame-<filter>-det<NNN>-``). They exist for resume:
a build killed or failed half-way reuses every intermediate already written.

Retention (``CALIBFLOW_INTERMEDIATES``):

* ``remove`` (default): a build that registered and verified its products removes the
  intermediates of its own exposures and detectors, unless another build of the same type is
  running (it may be reading the same files); those are left for ``calibflow prune``.
* ``keep``: nothing is removed by a build (debugging, or inspecting the intermediates).

A failed or killed build never removes anything: its intermediates are what its rerun resumes from.
No registry row refers to an intermediate, so removing one never leaves the registry pointing at a
missing file; a product's identity lookup finds an identical build before any intermediate is read.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from calib_core.errors import InputError
from calib_core.io import recycle
from calib_core.io.atomic import is_private, sweep_stale

__all__ = ["RETENTION_ENV", "RETENTION_POLICIES", "retention_policy", "build_files", "remove_files",
           "running_types", "running_builds", "WorkFile", "survey", "PRUNE_CLASSES"]

RETENTION_ENV = "CALIBFLOW_INTERMEDIATES"
RETENTION_POLICIES = ("remove", "keep")

#: what ``calibflow prune`` says of each intermediate, and whether its default policy frees it
PRUNE_CLASSES = {
    "finished": "its exposure is an input of a registered product of this type: no resume needs it",
    "derived": "a focal-plane frame the sky barrier recomputes from the binned models",
    "stale-temporary": "half-written by a process that is gone",
    "unfinished": "left by a failed or killed build: its rerun resumes from it",
    "in-use": "a build of this type is running",
}

_EXPOSURE_FILE = re.compile(r"^(?P<exposure>.+?)-(?:det(?P<detector>\d{3})-|surface-)")
_FRAME_FILE = re.compile(r"^(?:pass-frame|frame-.+?)-det(?P<detector>\d{3})-[0-9a-f]+\.fits$")


def retention_policy() -> str:
    """The retention the environment asks for (``CALIBFLOW_INTERMEDIATES``, default ``remove``);
    an unknown value is an :class:`~calib_core.errors.InputError` naming the variable."""
    value = os.environ.get(RETENTION_ENV, "").strip().lower() or "remove"
    if value not in RETENTION_POLICIES:
        raise InputError(f"{RETENTION_ENV}={value!r}: expected one of {', '.join(RETENTION_POLICIES)}")
    return value


def build_files(work: str | Path, exposure_ids, detectors, frames: bool = True) -> list[Path]:
    """The intermediates under ``work`` (one camera and type's folder) that belong to the given
    exposures and detectors: per-(exposure, detector) files, the exposures' surfaces, and (with
    ``frames``) the frames of those detectors, whatever build made them: their names do not say."""
    work = Path(work)
    if not work.is_dir():
        return []
    exposures = {str(e) for e in exposure_ids}
    dets = {int(d) for d in detectors}
    out = []
    for path in work.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        m = _EXPOSURE_FILE.match(path.name)
        if m and m["exposure"] in exposures and (m["detector"] is None or int(m["detector"]) in dets):
            out.append(path)
            continue
        f = _FRAME_FILE.match(path.name) if frames else None
        if f and int(f["detector"]) in dets:
            out.append(path)
    return sorted(out)


def remove_files(paths) -> tuple[int, int]:
    """Delete ``paths`` (missing ones are skipped; while this process holds a pool of retired files
    open, :mod:`calib_core.io.recycle`, they go into it instead); returns (files removed, bytes freed)."""
    n = freed = 0
    for p in paths:
        size = recycle.discard(Path(p))      # into this process's pool of retired files, when one is open
        if size is not None:
            n += 1
            freed += size
    return n, freed


def running_builds(registry, exclude_run: int | None = None) -> set[tuple[str, str | None]]:
    """(calib type, filter) of each build run the registry records as ``running`` (other than
    ``exclude_run``); the filter is None for an unfiltered type (``NONE``) or a run that did not record
    one. The caller marks the runs of dead processes crashed first (``mark_crashed_runs``)."""
    from calib_core.repository.registry.models import BuildRunRow

    with registry.session() as s:
        rows = s.execute(select(BuildRunRow.id, BuildRunRow.calib_type, BuildRunRow.parameters)
                         .where(BuildRunRow.status == "running")).all()
    filters = {i: (p or {}).get("filter") for i, _, p in rows}
    return {(t, None if filters[i] in (None, "", "NONE") else filters[i]) for i, t, _ in rows if i != exclude_run}


def running_types(registry, exclude_run: int | None = None) -> set[str]:
    """Calib types with a build run the registry records as ``running`` (other than ``exclude_run``)."""
    return {t for t, _ in running_builds(registry, exclude_run)}


@dataclass(frozen=True)
class WorkFile:
    """One file under ``work/`` and what prune makes of it."""

    path: Path
    camera: str
    calib_type: str
    size: int
    age_days: float
    state: str            # a key of PRUNE_CLASSES

    def removable(self, older_than_days: float | None) -> bool:
        """Whether the policy frees it: finished, derived and stale temporaries always; unfinished
        ones only when older than ``older_than_days``; never one a running build may use."""
        if self.state in ("finished", "derived", "stale-temporary"):
            return True
        return self.state == "unfinished" and older_than_days is not None and self.age_days >= older_than_days


def _inputs_with_products(registry) -> set[tuple[str, str, str]]:
    """(camera, calib type, exposure id) of every exposure recorded as an input (used or left out)
    of a registered product."""
    from calib_core.repository.registry.models import CalibInputRow, CalibRow, CameraRow, ExposureRow

    q = (select(CameraRow.name, CalibRow.calib_type, ExposureRow.exposure_id)
         .join(CalibRow, CalibRow.camera_id == CameraRow.id)
         .join(CalibInputRow, CalibInputRow.calib_pk == CalibRow.id)
         .join(ExposureRow, ExposureRow.id == CalibInputRow.exposure_pk).distinct())
    with registry.session() as s:
        return {tuple(r) for r in s.execute(q).all()}


def survey(root: str | Path, registry, running: set[str] | None = None, now: float | None = None) -> list[WorkFile]:
    """Every file under ``<root>/work/<camera>/<type>/``, classified (:data:`PRUNE_CLASSES`), and the
    pools of retired files under ``<root>/work/.recycle`` (type ``recycled``: a live process's are in
    use, a dead one's stale temporaries).

    ``running``: the calib types with a running build (:func:`running_types` by default)."""
    work = Path(root) / "work"
    if not work.is_dir():
        return []
    running = running_types(registry) if running is None else running
    done = _inputs_with_products(registry)
    now = time.time() if now is None else now
    out = []
    pool = work / recycle.POOL_DIRNAME        # retired files a build keeps to write over (recycle.py)
    if pool.is_dir():
        stale = set(sweep_stale(pool, dry_run=True))
        for path in sorted(pool.iterdir()):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if path.is_file():
                out.append(WorkFile(path, "-", "recycled", st.st_size, (now - st.st_mtime) / 86400.0,
                                    "stale-temporary" if path in stale else "in-use"))
    for cam_dir in sorted(p for p in work.iterdir() if p.is_dir() and p.name != recycle.POOL_DIRNAME):
        for type_dir in sorted(p for p in cam_dir.iterdir() if p.is_dir()):
            camera, calib_type = cam_dir.name, type_dir.name
            stale = set(sweep_stale(type_dir, dry_run=True))
            for path in sorted(type_dir.rglob("*")):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                if not path.is_file():
                    continue
                if calib_type in running:
                    state = "in-use"
                elif is_private(path.name):
                    if path not in stale:
                        state = "in-use"     # a live writer's temporary
                    else:
                        state = "stale-temporary"
                elif _FRAME_FILE.match(path.name):
                    state = "derived"
                else:
                    m = _EXPOSURE_FILE.match(path.name)
                    state = ("finished" if m and (camera, calib_type, m["exposure"]) in done else "unfinished")
                out.append(WorkFile(path, camera, calib_type, st.st_size, (now - st.st_mtime) / 86400.0, state))
    return out

