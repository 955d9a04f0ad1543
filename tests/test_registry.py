"""Registry schema and ingest, on SQLite and on a throwaway PostgreSQL server."""

import datetime as dt
import hashlib
import json
import os

import numpy as np
import pytest
from astropy.io import fits
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from calib_core.camera import load_camera
from calib_core.repository import Datastore, ingest_files
from calib_core.repository.registry import HEAD_REVISION, ExposureRow, RawRow, Registry


def test_migrations_match_models(registry):
    """The Alembic head creates exactly the schema the ORM models describe."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from calib_core.repository.registry.models import Base

    assert registry.current_revision() == HEAD_REVISION
    with registry.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_check_ready(registry_url):
    reg = Registry.open(registry_url)
    from calib_core.repository import RegistryError

    with pytest.raises(RegistryError, match="not initialised"):
        reg.check_ready()
    reg.upgrade()
    reg.upgrade()
    reg.check_ready()
    reg.engine.dispose()


def test_unique_constraints(registry):
    cam = load_camera("democam_mini")
    now = dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)
    with registry.session() as s:
        row = registry.ensure_camera(s, cam)
        registry.ensure_camera(s, cam)   # idempotent
    kwargs = dict(camera_id=row.id, exposure_id="x1", obs_type="bias", filter="NONE", exptime=0.0, darktime=0.0,
                  date_obs=now, night=now.date(), object="", path="/a", original_path="/a", transfer="copy",
                  checksum="0" * 64, size_bytes=1, n_detectors=9, extra={}, ingested_at=now)
    with registry.session() as s:
        s.add(ExposureRow(**kwargs))
    with pytest.raises(IntegrityError):
        with registry.session() as s:
            s.add(ExposureRow(**kwargs))
    assert registry.snapshot()["exposure"] == 1
    assert registry.snapshot()["detector"] == len(cam.detectors)


# -- ingest -----------------------------------------------------------------------------------------------

def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _file_state(paths):
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


@pytest.mark.realdata
def test_kast_ingest_done_criteria(registry_url, tmp_path, realdata):
    """Issue 2's 'done when': 10 biases, 12 dome flats (11 of 15 s, one of 30 s), 1 arc, 4 science frames."""
    from calibflow.cli import app

    runner = CliRunner()
    env = {"CALIBFLOW_REPO": str(tmp_path / "repo"), "CALIBFLOW_REGISTRY_URL": registry_url}
    before = _file_state(sorted((realdata / "lick_kast_blue").glob("*.fits.gz")))
    assert runner.invoke(app, ["init"], env=env).exit_code == 0
    res = runner.invoke(app, ["ingest", str(realdata / "lick_kast_blue"), "--camera", "lick_kast_blue"], env=env)
    assert res.exit_code == 0, res.output
    out = runner.invoke(app, ["exposures", "--json"], env=env)
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    by_type = {}
    for r in rows:
        by_type.setdefault(r["obs_type"], []).append(r)
        for key in ("exposure_id", "obs_type", "filter", "exptime", "date_obs", "night", "camera", "n_detectors"):
            assert key in r
        assert r["camera"] == "lick_kast_blue" and r["n_detectors"] == 1 and r["night"] == "2015-05-19"
    assert {t: len(v) for t, v in by_type.items()} == {"bias": 10, "flat": 12, "arc": 1, "science": 4}
    assert sorted(r["exptime"] for r in by_type["flat"]) == [15.0] * 11 + [30.0]
    assert {r["exposure_id"] for r in by_type["arc"]} == {"20150519_b1"}
    # filters and nights select
    flats = json.loads(runner.invoke(app, ["exposures", "--json", "--type", "flat", "--night", "2015-05-19"],
                                     env=env).stdout)
    assert len(flats) == 12
    assert json.loads(runner.invoke(app, ["exposures", "--json", "--filter", "nope"], env=env).stdout) == []
    # a second ingest of the same files is a no-op
    again = runner.invoke(app, ["ingest", str(realdata / "lick_kast_blue"), "--camera", "lick_kast_blue"], env=env)
    assert again.exit_code == 0 and "ingested 0, already present 27" in again.output
    assert len(json.loads(runner.invoke(app, ["exposures", "--json"], env=env).stdout)) == 27
    # the raw files were not modified
    assert _file_state(sorted((realdata / "lick_kast_blue").glob("*.fits.gz"))) == before


def _mini_file(path, expid="20261120001", value=1000, n_ext=None, drop=None, truncate=False):
    """A small democam_mini-shaped raw written directly (independent of the simulator)."""
    cam = load_camera("democam_mini")
    h = fits.Header({"OBSTYPE": "bias", "EXPTIME": 0.0, "DARKTIME": 0.0, "FILTER": "NONE",
                     "DATE-OBS": "2026-11-21T02:00:00", "EXPID": expid})
    if drop:
        del h[drop]
    hdus = [fits.PrimaryHDU(header=h)]
    dets = cam.detectors if n_ext is None else cam.detectors[:n_ext]
    for det in dets:
        hdus.append(fits.ImageHDU(np.full((det.ny, 2 * (4 + 128 + 16)), value, np.uint16), name=det.hdu))
    if n_ext is not None and n_ext > len(cam.detectors):
        hdus.append(fits.ImageHDU(np.zeros((4, 4), np.uint16), name="EXTRA"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def test_ingest_idempotent_conflict_and_bad_input(registry, tmp_path):
    cam = load_camera("democam_mini")
    store = Datastore(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    good = _mini_file(src / "good.fits")
    rep = ingest_files([good], cam, registry, store)
    assert rep.ingested == ["20261120001"] and rep.ok
    with registry.session() as s:
        assert len(s.scalars(select(RawRow)).all()) == 9
    snap, tree = registry.snapshot(), _tree(store.root)

    # the same file again: a no-op
    rep = ingest_files([good], cam, registry, store)
    assert rep.ingested == [] and len(rep.skipped) == 1 and rep.ok
    # a different file claiming the same exposure: a clear error naming both
    other = _mini_file(src / "other.fits", value=1001)
    rep = ingest_files([other], cam, registry, store)
    assert len(rep.failed) == 1 and "already registered" in rep.failed[0][1] and "good.fits" in rep.failed[0][1]

    bad = {
        "truncated": _mini_file(src / "trunc.fits", expid="b1", truncate=True),
        "wrong HDU count (missing)": _mini_file(src / "missing.fits", expid="b2", n_ext=8),
        "wrong HDU count (extra)": _mini_file(src / "extra.fits", expid="b3", n_ext=10),
        "missing key": _mini_file(src / "nokey.fits", expid="b4", drop="EXPTIME"),
    }
    notfits = src / "readme.fits"
    notfits.write_text("not a fits file")
    bad["not FITS"] = notfits
    rep = ingest_files(list(bad.values()), cam, registry, store)
    assert not rep.ingested and len(rep.failed) == len(bad)
    reasons = dict(rep.failed)
    assert "truncated" in reasons[str(bad["truncated"])]
    assert "CCD08" in reasons[str(bad["wrong HDU count (missing)"])]
    assert "10 image HDUs" in reasons[str(bad["wrong HDU count (extra)"])]
    assert "EXPTIME" in reasons[str(bad["missing key"])]
    assert "not a FITS file" in reasons[str(notfits)]
    # nothing changed: registry rows and datastore files
    assert registry.snapshot() == snap and _tree(store.root) == tree


def test_batch_registers_good_files_and_reports_bad(registry, tmp_path):
    cam = load_camera("democam_mini")
    store = Datastore(tmp_path / "repo")
    files = [_mini_file(tmp_path / f"f{i}.fits", expid=f"e{i}") for i in range(3)]
    files.insert(1, _mini_file(tmp_path / "broken.fits", expid="bad", truncate=True))
    rep = ingest_files(files, cam, registry, store)
    assert sorted(rep.ingested) == ["e0", "e1", "e2"] and [p for p, _ in rep.failed] == [str(files[1])]
    rows = registry.query_exposures()
    assert [r.exposure_id for r in rows] == ["e0", "e1", "e2"] and all(r.n_detectors == 9 for r in rows)


@pytest.mark.parametrize("mode", ["copy", "symlink", "hardlink", "move", "direct"])
def test_transfer_modes(tmp_path, mode):
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    reg.upgrade()
    cam = load_camera("democam_mini")
    store = Datastore(tmp_path / "repo")
    src = _mini_file(tmp_path / "in.fits", expid="t1")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    rep = ingest_files([src], cam, reg, store, transfer=mode)
    assert rep.ok, rep.failed
    row = reg.query_exposures()[0]
    placed = os.path.realpath(row.path)
    assert hashlib.sha256(open(placed, "rb").read()).hexdigest() == digest == row.checksum
    if mode == "direct":
        assert row.path == str(src)
    else:
        assert row.path.startswith(str(store.root / "raw" / "democam_mini" / "2026-11-20"))
    assert src.exists() == (mode != "move")
    if mode == "symlink":
        assert os.path.islink(row.path)


def test_cli_errors_are_clear(tmp_path):
    from calibflow.cli import app

    runner = CliRunner()
    env = {"CALIBFLOW_REPO": str(tmp_path / "nowhere"), "CALIBFLOW_REGISTRY_URL": ""}
    res = runner.invoke(app, ["exposures"], env=env)
    assert res.exit_code == 1 and "calibflow init" in res.output
    res = runner.invoke(app, ["ingest", str(tmp_path), "--camera", "nosuchcam"], env=env)
    assert res.exit_code == 1 and "unknown camera" in res.output
    assert runner.invoke(app, ["init"], env=env).exit_code == 0
    res = runner.invoke(app, ["exposures", "--night", "21-11-2026"], env=env)
    assert res.exit_code == 1 and "YYYY-MM-DD" in res.output
    bad = _mini_file(tmp_path / "bad.fits", truncate=True)
    res = runner.invoke(app, ["ingest", str(bad), "--camera", "democam_mini"], env=env)
    assert res.exit_code == 1 and "bad.fits" in res.output
