"""Trying to break calibflow (issue 11): hostile headers, altered raws, excluded-then-repaired inputs,
user errors. Every case runs on democam_mini; each one failed before its fix.

The README's "Reliability" table lists these cases and their outcome.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calib_core.camera import load_camera
from calib_core.repository import Datastore, Registry, calib_inputs, ingest_files, list_calibs
from calib_core.simulate.night import simulate_night
from tests._repos import ingested_repo

CAMERA = "democam_mini"
NIGHT = "2026-11-20"


@pytest.fixture(scope="module")
def raws(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("hostile")
    simulate_night(load_camera(CAMERA), root / "sim", seed=5, night=NIGHT, n_bias=5, n_dark=0, n_flat=0,
                   n_science=0, filters=("r",))
    return sorted((root / "sim" / "raw").glob("*.fits"))


def _edited(src: Path, dst: Path, header: dict | None = None, hdu_data: dict | None = None,
            delete: tuple = ()) -> Path:
    """A copy of a raw with primary-header cards set or deleted, or some HDUs' pixels replaced
    (the other pixels are copied unscaled, bit for bit)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with fits.open(src, do_not_scale_image_data=True) as hdul:
        for key, value in (header or {}).items():
            hdul[0].header[key] = value
        for key in delete:
            del hdul[0].header[key]
        for name, data in (hdu_data or {}).items():
            hdr = hdul[name].header.copy()
            for k in ("BSCALE", "BZERO"):
                hdr.remove(k, ignore_missing=True)
            hdul[name] = fits.ImageHDU(data, header=hdr, name=name)
        hdul.writeto(dst)
    return dst


def _patched(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """A copy with one header card's bytes replaced (same length: the file stays valid FITS)."""
    assert len(old) == len(new)
    data = src.read_bytes()
    assert old in data
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data.replace(old, new, 1))
    return dst


def _repo(root: Path) -> tuple[Datastore, Registry]:
    store = Datastore(root)
    reg = Registry.open(store.default_registry_url)
    reg.upgrade()
    store.ensure()
    return store, reg


def _files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


# --------------------------------------------------------------------------------------------------
# 1. identifiers that become paths
# --------------------------------------------------------------------------------------------------


def test_path_traversal_exposure_id_is_refused_at_ingest(tmp_path, raws):
    evil = _edited(raws[0], tmp_path / "in" / "evil.fits", header={"EXPID": "../../../../ESCAPED/pwn"})
    store, reg = _repo(tmp_path / "a" / "b" / "c" / "repo")
    before, files = reg.snapshot(), _files_under(store.root)
    rep = ingest_files([evil, raws[1]], load_camera(CAMERA), reg, store, transfer="copy")
    assert rep.ingested == [raws[1].stem]                     # the rest of the batch goes on
    ((path, why),) = rep.failed
    assert path == str(evil) and "exposure id '../../../../ESCAPED/pwn'" in why and "EXPID" in why
    assert "\n" not in why
    after = reg.snapshot()
    assert after["exposure"] == before["exposure"] + 1
    assert not (tmp_path / "ESCAPED").exists() and not list(tmp_path.rglob("pwn*"))
    assert _files_under(store.root) - files <= {p for p in _files_under(store.root) if raws[1].name in p
                                                or p.startswith("raw")}


def test_every_build_write_is_checked_to_lie_inside_the_repository(tmp_path, raws):
    """A registry row written before ids were checked (or by hand) still cannot lead a write out."""
    from sqlalchemy import update

    from calib_core.buildplan import config_hash
    from calib_core.builds.bias_dark_flat import BiasConfig
    from calib_core.repository import DatastoreError
    from calib_core.repository.registry import ExposureRow
    from tasks.calib_tasks import BuildContext, process_exposure_detector

    store, reg = ingested_repo(tmp_path / "x" / "y" / "repo", raws[:1], CAMERA, transfer="copy")
    with reg.session() as s:
        s.execute(update(ExposureRow).values(exposure_id="../../../../ESCAPED/pwn"))
    (exposure,) = reg.query_exposures()
    ctx = BuildContext(repo=str(store.root), registry_url=store.default_registry_url, camera=CAMERA,
                       calib_type="bias", config={}, config_hash=config_hash(BiasConfig()), calib_date=NIGHT,
                       filter="NONE", software_version="test")
    with pytest.raises(DatastoreError, match="outside the repository"):
        process_exposure_detector(ctx, exposure, 0)
    assert not (tmp_path / "ESCAPED").exists() and not list(tmp_path.rglob("pwn*"))
    with pytest.raises(DatastoreError):
        store.inside(store.root / "calib" / ".." / ".." / "elsewhere.fits")
    assert store.inside(store.root / "calib" / "x.fits") == store.root / "calib" / "x.fits"


# --------------------------------------------------------------------------------------------------
# 10. two exposures, one file name
# --------------------------------------------------------------------------------------------------


def test_two_exposures_with_the_same_file_name_are_kept_apart(tmp_path, raws):
    a = _edited(raws[0], tmp_path / "nightA" / "frame.fits", header={"EXPID": "202611209001"})
    b = _edited(raws[1], tmp_path / "nightB" / "frame.fits", header={"EXPID": "202611209002"})
    store, reg = _repo(tmp_path / "repo")
    rep = ingest_files([a, b], load_camera(CAMERA), reg, store, transfer="copy")
    assert rep.ok, rep.failed
    assert sorted(rep.ingested) == ["202611209001", "202611209002"]
    rows = {r.exposure_id: r for r in reg.query_exposures()}
    assert rows["202611209001"].path != rows["202611209002"].path
    for eid, src in (("202611209001", a), ("202611209002", b)):
        assert Path(rows[eid].path).read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------------------------------
# 8. impossible metadata
# --------------------------------------------------------------------------------------------------


def _impossible(raws: list[Path], d: Path) -> dict[Path, tuple[str, ...]]:
    """Hostile variants of a good raw -> words its one-line error must contain."""
    src = raws[0]
    nan = np.full((512, 296), np.nan, np.float32)
    gz = d / "corrupt.fits.gz"
    gz.parent.mkdir(parents=True, exist_ok=True)
    packed = gzip.compress(src.read_bytes())
    gz.write_bytes(packed[: len(packed) // 2] + bytes(64) + packed[len(packed) // 2 + 64:])
    return {
        _edited(src, d / "noobstype.fits", header={"EXPID": "x1"}, delete=("OBSTYPE",)): ("OBSTYPE",
                                                                                          "observation type"),
        _edited(src, d / "allnan.fits", header={"EXPID": "x2"}, hdu_data={"CCD00": nan}): ("ccd00", "NaN"),
        _edited(src, d / "hugeexp.fits", header={"EXPID": "x3", "EXPTIME": 1e30}): ("EXPTIME", "1e+30"),
        _edited(src, d / "negexp.fits", header={"EXPID": "x4", "EXPTIME": -5.0}): ("EXPTIME",),
        _edited(src, d / "future.fits", header={"EXPID": "x5", "DATE-OBS": "9999-12-31T00:00:00"}): ("DATE-OBS",
                                                                                                     "9999"),
        _edited(src, d / "ancient.fits", header={"EXPID": "x6", "DATE-OBS": "0001-01-01T00:00:00"}): ("0001-01-01",),
        _patched(_edited(src, d / "tmp_bscale.fits", header={"EXPID": "x7"}), d / "bscale0.fits",
                 b"BSCALE  =                    1", b"BSCALE  =                    0"): ("BSCALE = 0",),
        gz: ("gzip",),
    }


def test_impossible_metadata_is_refused_naming_file_and_key(tmp_path, raws):
    cases = _impossible(raws, tmp_path / "bad")
    (tmp_path / "bad" / "tmp_bscale.fits").unlink()
    store, reg = _repo(tmp_path / "repo")
    before = reg.snapshot()
    rep = ingest_files([*cases, raws[2]], load_camera(CAMERA), reg, store, transfer="copy")
    assert rep.ingested == [raws[2].stem], rep.failed           # the good file after them still ingests
    failed = dict(rep.failed)
    assert set(failed) == {str(p) for p in cases}
    for path, words in cases.items():
        why = failed[str(path)]
        assert "\n" not in why, why
        for w in words:
            assert w in why, (path.name, why)
    assert "END card" not in failed[str(tmp_path / "bad" / "corrupt.fits.gz")]
    assert reg.snapshot()["exposure"] == before["exposure"] + 1
    assert [p.name for p in store.root.glob("raw/**/*.fits*")] == [raws[2].name]


def test_bad_pixels_met_by_a_build_are_named_and_excluded_by_policy(tmp_path, raws, prefect_api):
    """A raw registered before ingest checked pixels (here: the registry row forged to match an
    all-NaN file) fails ISR; the error names the file and the exposure, and ``exclude`` excludes it."""
    from sqlalchemy import update

    from calib_core.repository import sha256_file
    from calib_core.repository.registry import ExposureRow

    store, reg = ingested_repo(tmp_path / "repo", raws, CAMERA, transfer="copy")
    target = sorted(store.root.glob("raw/**/*.fits"))[0]
    nan = np.full((512, 296), np.nan, np.float32)
    _edited(target, tmp_path / "nan.fits", hdu_data={"CCD00": nan})
    shutil.copyfile(tmp_path / "nan.fits", target)
    with reg.session() as s:
        s.execute(update(ExposureRow).where(ExposureRow.exposure_id == target.stem)
                  .values(checksum=sha256_file(target), size_bytes=target.stat().st_size))
    with pytest.raises(ValueError) as info:
        _bias(store, detectors=[0])
    assert str(target) in str(info.value) and f"exposure {target.stem} detector 0" in str(info.value)
    assert list_calibs(reg) == []
    result = _bias(store, detectors=[0], on_bad_input="exclude")
    assert list(result["dropped"]) == [target.stem] and str(target) in result["dropped"][target.stem]
    assert result["products"][0].n_inputs == 4


def test_camera_mapping_a_type_is_not_refused(tmp_path, raws):
    cam = load_camera(CAMERA).model_copy(deep=True)
    cam.metadata.obs_type_default = "bias"
    noobs = _edited(raws[0], tmp_path / "noobstype.fits", delete=("OBSTYPE",))
    store, reg = _repo(tmp_path / "repo")
    rep = ingest_files([noobs], cam, reg, store, transfer="copy")
    assert rep.ok, rep.failed
    assert reg.query_exposures()[0].obs_type == "bias"


# --------------------------------------------------------------------------------------------------
# 2, 3, 7. product identity, altered raws, missing mosaics (builds under a real Prefect API)
# --------------------------------------------------------------------------------------------------


def _bias(store, **kw):
    from flows.build import build_calib

    return build_calib("bias", camera=CAMERA, night=NIGHT, repo=str(store.root), **kw)


def test_exclude_then_repair_makes_the_full_product(tmp_path, raws, prefect_api):
    store, reg = ingested_repo(tmp_path / "repo", raws, CAMERA, transfer="copy")
    bad = sorted(store.root.glob("raw/**/*.fits"))[1]
    original = bad.read_bytes()
    bad.write_bytes(original[: len(original) // 3])           # damaged on disk after ingest

    partial = _bias(store, on_bad_input="exclude")
    assert partial["created"] == 9 and len(partial["dropped"]) == 1
    partial_ids = {p.calib_id for p in partial["products"]}
    assert all(p.n_inputs == 4 for p in list_calibs(reg))

    bad.write_bytes(original)                                   # repaired
    full = _bias(store, on_bad_input="exclude")
    assert full["created"] == 9 and not full["dropped"]       # was: "all 9 already built", the 4-input product
    full_ids = {p.calib_id for p in full["products"]}
    assert not full_ids & partial_ids                          # one calib id never names two sets of pixels
    for cid in full_ids:
        inputs = calib_inputs(reg, cid)
        assert len(inputs) == 5 and all(i["used"] for i in inputs)

    # 7: a mosaic that went missing (a build killed after registering) is written by the next run
    png = Path(full["mosaic_png"])
    png.unlink()
    png.with_suffix(".fits").unlink()
    again = _bias(store)
    assert again["created"] == 0 and again["mosaic_png"] == str(png)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".fits").exists()


def test_raw_altered_after_ingest_is_bad_input(tmp_path, raws, prefect_api):
    store, reg = ingested_repo(tmp_path / "repo", raws, CAMERA, transfer="copy")
    target = sorted(store.root.glob("raw/**/*.fits"))[3]
    with fits.open(target, mode="update") as hdul:       # a valid FITS file, +300 ADU in one block
        hdul["CCD04"].data[100:200, 40:120] += 300
    before = reg.snapshot()
    with pytest.raises(ValueError, match="changed since ingest") as info:
        _bias(store)
    assert str(target) in str(info.value)
    assert list_calibs(reg) == [] and reg.snapshot()["calib"] == before["calib"]
    assert not list(store.root.glob("calib/**/*.fits"))

    result = _bias(store, on_bad_input="exclude")
    (eid,) = result["dropped"]
    assert eid == target.stem and "changed since ingest" in result["dropped"][eid]
    assert all(p.n_inputs == 4 for p in list_calibs(reg))


def test_verify_raw_cheap_and_on_request(tmp_path, raws):
    import datetime as dt

    from calib_core.io.raw import RawReadError
    from calib_core.repository import sha256_file, verify_raw

    f = tmp_path / "r.fits"
    shutil.copy2(raws[0], f)
    good = sha256_file(f)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    verify_raw(f, good, f.stat().st_size, later)
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    st = f.stat()
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))       # same size, same mtime: the cheap check trusts it
    verify_raw(f, good, st.st_size, later)
    with pytest.raises(RawReadError, match="changed since ingest: sha256"):
        verify_raw(f, good, st.st_size, later, always=True)
    with pytest.raises(RawReadError, match="changed since ingest: sha256"):
        verify_raw(f, good, st.st_size, dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
    with pytest.raises(RawReadError, match="bytes"):
        verify_raw(f, good, st.st_size + 1, later)


# --------------------------------------------------------------------------------------------------
# 9. user errors: one line, fast, the option named, non-zero
# --------------------------------------------------------------------------------------------------


def _one_line_error(res, *words):
    text = res.output.strip()
    assert res.exit_code != 0, text
    assert "Traceback" not in text and "\n" not in text, text
    assert text.startswith("error:"), text
    for w in words:
        assert w in text, text


def test_user_errors_are_one_line_fast_and_before_prefect(tmp_path, raws, monkeypatch):
    from typer.testing import CliRunner

    import flows.build
    import flows.nightly
    from calibflow.cli import app

    store, reg = ingested_repo(tmp_path / "repo", raws, CAMERA, transfer="copy")

    def no_flow(*a, **k):
        raise AssertionError("a flow was started for a user error")

    # the selection is checked before any flow (and so any Prefect server) starts
    monkeypatch.setattr(flows.build, "build_calib", no_flow)
    monkeypatch.setattr(flows.nightly, "nightly", no_flow)
    runner = CliRunner()
    env = {"CALIBFLOW_REPO": str(store.root), "CALIBFLOW_REGISTRY_URL": ""}
    cases = [
        (["build", "bias", "--camera", CAMERA, "--set", "combine=5", "--set", "combine.nsigma=3"],
         ("--set combine.nsigma=3", "combine is already set to 5")),
        (["build", "bias", "--camera", CAMERA, "--night", "2026-13-01"], ("--night", "2026-13-01")),
        (["build", "bias", "--camera", CAMERA, "--calib-date", "2026-02-30"], ("--calib-date",)),
        (["build", "bias", "--camera", "nosuchcam"], ("nosuchcam",)),
        (["build", "bias", "--camera", CAMERA, "--night", "2020-01-01"], ("no bias exposures", "2020-01-01")),
        (["build", "flat", "--camera", CAMERA, "--night", NIGHT], ("no flat exposures",)),
        (["build", "bias", "--camera", CAMERA, "--exposure", "nope"], ("nope",)),
        (["build", "bias", "--camera", CAMERA, "--set", "combine.statistic=MODE"], ("invalid bias config",
                                                                                 "statistic")),
        (["nightly", "--camera", CAMERA, "--night", "2020-01-01"], ("2020-01-01", "no exposures")),
        (["nightly", "--camera", "nosuchcam", "--night", NIGHT], ("nosuchcam",)),
        (["nightly", "--camera", CAMERA, "--night", "2026-11-31"], ("--night", "day is out of range")),
    ]
    for args, words in cases:
        t0 = time.perf_counter()
        res = runner.invoke(app, args, env=env)
        took = time.perf_counter() - t0
        _one_line_error(res, *words)
        assert took < 10, (args, took)       # (about 1 s each when measured as a command)
    assert list_calibs(reg) == []


def test_a_failed_build_ends_with_one_line_and_no_traceback(tmp_path, raws, prefect_api):
    import subprocess
    import sys

    store, reg = ingested_repo(tmp_path / "repo", raws, CAMERA, transfer="copy")
    bad = sorted(store.root.glob("raw/**/*.fits"))[2]
    bad.write_bytes(bad.read_bytes()[:20000])
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "CALIBFLOW_REPO": str(store.root),
           "CALIBFLOW_REGISTRY_URL": "", "PREFECT_LOGGING_LEVEL": "INFO"}
    res = subprocess.run([sys.executable, "-m", "calibflow", "build", "bias", "--camera", CAMERA, "--night", NIGHT,
                          "--detector", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(bad) in last, res.stderr
    assert list_calibs(reg) == []


def test_wrong_camera_is_suggested(tmp_path, raws):
    store, reg = _repo(tmp_path / "repo")
    rep = ingest_files(raws[:2], load_camera("democam"), reg, store, transfer="copy")
    assert rep.ingested == [] and len(rep.failed) == 2
    for path, why in rep.failed:
        assert "camera democam_mini: wrong --camera?" in why and "\n" not in why, why
    assert reg.snapshot()["exposure"] == 0


# --------------------------------------------------------------------------------------------------
# 4. secrets
# --------------------------------------------------------------------------------------------------

SECRET = "hunter2-s3cret"


def test_registry_password_is_masked_in_errors(tmp_path):
    from typer.testing import CliRunner

    from calib_core.repository import RegistryError
    from calibflow.cli import app

    with pytest.raises(RegistryError) as info:
        Registry.open(f"postgresqlx://calib:{SECRET}@db.example/calibs")
    assert SECRET not in str(info.value) and "calib:***@db.example" in str(info.value)
    res = CliRunner().invoke(app, ["exposures", "--registry-url", f"postgresqlx://calib:{SECRET}@h/db",
                                   "--repo", str(tmp_path)])
    _one_line_error(res, "--registry-url", "postgresqlx")
    assert SECRET not in res.output


def test_trigger_refuses_a_password_in_parameters():
    from typer.testing import CliRunner

    from calibflow.cli import app

    res = CliRunner().invoke(app, ["trigger", "build-calib/bias", "-p",
                                   f"registry_url=postgresql://calib:{SECRET}@db.example/calibs"])
    _one_line_error(res, "--param registry_url", "env:NAME", "secret:BLOCK")
    assert SECRET not in res.output


def test_deployments_carry_the_registry_url_by_reference(tmp_path):
    import json

    from deployments.definitions import DeploymentSettings, make_deployments

    url = f"postgresql+psycopg://calib:{SECRET}@db.example/calibs"
    deps = make_deployments(DeploymentSettings(repo=tmp_path, camera=CAMERA, registry_url=url))
    for d in deps:
        assert SECRET not in json.dumps(d.parameters)
        assert d.parameters["registry_url"] == "env:CALIBFLOW_REGISTRY_URL"


# --------------------------------------------------------------------------------------------------
# 5. nothing left running after a killed build
# --------------------------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_lifeline_ends_an_orphan_and_prints_nothing_at_exit(tmp_path):
    """A process that starts the watcher and a long-lived child, runs 5 s, then exits normally with every
    warning shown: nothing on stderr (a Popen'd watcher printed "ResourceWarning: subprocess ... is
    still running" at the end of `calibflow demo`), and the orphaned child is ended by the watcher."""
    import subprocess
    import sys

    from calibflow.lifeline import process_start_time

    # 5 s: the watcher has seen the child; c.returncode = 0 keeps the test's own child's Popen warning out
    code = ("import subprocess, sys; from calibflow import lifeline; w = lifeline.start(); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(w, c.pid); import time; time.sleep(5); c.returncode = 0")
    env = {k: v for k, v in os.environ.items() if k != "CALIBFLOW_NO_LIFELINE"}
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stderr == "", out.stderr
    watcher, child = (int(x) for x in out.stdout.split())
    started = process_start_time(child)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (process_start_time(child) == started or process_start_time(watcher)):
        time.sleep(0.2)
    assert process_start_time(child) != started, "the orphan outlived its parent"
    assert process_start_time(watcher) is None, "the watcher did not exit"


@contextlib.contextmanager
def _running_build(tmp_path, raws, *options, stderr=None):
    """``calibflow build bias`` in its own process group (as a terminal's job) on its own embedded
    server, as a user gets; yields (store, registry, process, its descendants {pid: start time}) once
    its first intermediate exists, and SIGKILLs whatever of it is still there at the end."""
    import signal
    import subprocess
    import sys

    from calibflow.lifeline import descendants, process_start_time

    store, reg = ingested_repo(tmp_path / "repo", raws, CAMERA, transfer="copy")
    env = {k: v for k, v in os.environ.items() if k not in ("CALIBFLOW_NO_LIFELINE", "PREFECT_API_URL")}
    env.update(CALIBFLOW_REPO=str(store.root), CALIBFLOW_REGISTRY_URL="", PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.Popen([sys.executable, "-m", "calibflow", "build", "bias", "--camera", CAMERA, "--night", NIGHT,
                             *options], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL if stderr is None else stderr, text=True, start_new_session=True)
    work = store.root / "work" / CAMERA / "bias"
    children: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 300
        while not list(work.glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
            children.update(descendants(proc.pid))
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be stopped"
        children.update(descendants(proc.pid))
        yield store, reg, proc, children
    finally:
        for p, s in children.items():
            if process_start_time(p) == s:
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_all_gone(children: dict[int, int], within: float = 30) -> None:
    """Every one of ``children`` ({pid: start time}) ends within ``within`` seconds."""
    from calibflow.lifeline import process_start_time

    deadline = time.monotonic() + within
    alive = children
    while time.monotonic() < deadline:
        alive = {p: s for p, s in children.items() if process_start_time(p) == s}
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, {p: _cmdline(p) for p in alive}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_leaves_no_process_behind_and_the_run_is_marked_crashed(tmp_path, raws, prefect_api):
    import signal

    from calib_core.repository.registry import BuildRunRow

    with _running_build(tmp_path, raws, "--runner", "processes") as (store, reg, proc, children):
        kinds = " ".join(_cmdline(p) for p in children)
        assert "uvicorn" in kinds and "multiprocessing" in kinds, kinds   # the server and the pool workers
        os.kill(proc.pid, signal.SIGKILL)                                  # the build only, not its group
        proc.wait()
        _assert_all_gone(children)
        files = {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
        time.sleep(1.0)
        assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()} == files

    with reg.session() as s:
        (killed,) = s.query(BuildRunRow).all()
        assert killed.status == "running"
    _bias(store, detectors=[0])                    # the next build notices the killed one
    with reg.session() as s:
        runs = s.query(BuildRunRow).order_by(BuildRunRow.id).all()
        assert [r.status for r in runs] == ["crashed", "completed"], [(r.status, r.message) for r in runs]
        assert str(proc.pid) in runs[0].message


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_build_at_once_and_the_next_build_resumes(tmp_path, raws, prefect_api, signame):
    """Ctrl-C in a terminal: SIGINT to the whole process group, the embedded server included. The
    server stopped at once and the build went on for minutes against the dead API (seen with
    ``calibflow demo``: still running 150 s after Ctrl-C). SIGTERM to the group (``timeout``,
    systemd's stop) did the same, Prefect's own SIGTERM handler waiting for every queued task (a
    ``timeout 30 calibflow demo`` was still running minutes later). Now the command ends within
    seconds with one line and status 130 (SIGINT) or 143 (SIGTERM), nothing of it is left running,
    and the next build completes."""
    import signal
    import subprocess

    from calib_core.repository.registry import BuildRunRow
    from calibflow.lifeline import INTERRUPTED, TERMINATED

    line, status = {"SIGINT": (INTERRUPTED, 130), "SIGTERM": (TERMINATED, 143)}[signame]
    with _running_build(tmp_path, raws, stderr=subprocess.PIPE) as (store, reg, proc, children):
        assert "uvicorn" in " ".join(_cmdline(p) for p in children)
        os.killpg(proc.pid, getattr(signal, signame))          # what Ctrl-C, or timeout, does
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == status, (proc.returncode, err[-2000:])
        assert took < 15, took
        assert err.rstrip().splitlines()[-1] == line, err[-2000:]
        _assert_all_gone(children)

    _bias(store, detectors=[0])                    # the next build notices the stopped one
    with reg.session() as s:
        runs = s.query(BuildRunRow).order_by(BuildRunRow.id).all()
        assert [r.status for r in runs] == ["crashed", "completed"], [(r.status, r.message) for r in runs]


# --------------------------------------------------------------------------------------------------
# 6. transient faults: a PostgreSQL restart in the middle of a build
# --------------------------------------------------------------------------------------------------


def test_postgres_restart_mid_build_is_survived(tmp_path, raws, prefect_api, postgres_server):
    import threading

    from calib_core.repository import registry as registry_module
    from calib_core.repository.registry import BuildRunRow

    url = postgres_server.create_database(f"hostile_restart_{os.getpid()}_{int(time.time())}")
    store, reg = Datastore(tmp_path / "repo"), Registry.open(url)
    reg.upgrade()
    assert ingest_files(raws, load_camera(CAMERA), reg, store, transfer="copy").ok
    retries_before = registry_module.transient_retries
    outcome: dict = {}

    def build():
        try:
            outcome["result"] = _bias(store, registry_url=url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=build)
    thread.start()
    # down while the combine tasks look up and register products (their folder appears first)
    calib_dir = store.root / "calib" / CAMERA / "bias"
    deadline = time.monotonic() + 300
    while thread.is_alive() and not calib_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert thread.is_alive(), outcome
    t0 = time.monotonic()
    postgres_server.restart(down_s=5.0)
    outage = time.monotonic() - t0
    thread.join(300)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert outcome["result"]["created"] == 9 and outage >= 5.0
    assert registry_module.transient_retries > retries_before      # the outage was met, and ridden out
    with reg.session() as s:
        assert [r.status for r in s.query(BuildRunRow).all()] == ["completed"]
    assert len(list_calibs(reg, calib_type="bias")) == 9
    reg.engine.dispose()


def test_deterministic_database_errors_fail_fast(postgres_server):
    from calib_core.repository import RegistryError

    wrong_db = postgres_server.url("no_such_database_here")
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match="no_such_database_here"):
        Registry.open(wrong_db).check_ready(retry=True)
    assert time.monotonic() - t0 < 2.0


def test_password_never_reaches_prefect_or_the_output(tmp_path, raws, prefect_api, postgres_server):
    """The probe: a URL with a password through init, ingest, build and serve; then every flow run's
    and deployment's parameters on the Prefect API, and all that was printed."""
    import json
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from calibflow.cli import app

    plain = postgres_server.create_database(f"hostile_secret_{os.getpid()}_{int(time.time())}")
    url = plain.replace("://postgres@", f"://postgres:{SECRET}@")       # trust auth: any password works
    assert SECRET in url
    repo = tmp_path / "repo"
    env = {"CALIBFLOW_REPO": str(repo), "CALIBFLOW_REGISTRY_URL": url}
    runner = CliRunner()
    printed = []
    for args in (["init"], ["ingest", str(raws[0].parent), "--camera", CAMERA],
                 ["build", "bias", "--camera", CAMERA, "--night", NIGHT, "--detector", "0"],
                 ["exposures"], ["calibs"]):
        res = runner.invoke(app, args, env=env)
        assert res.exit_code == 0, res.output
        printed.append(res.output)
    assert "postgres:***@" in printed[0]

    from calib_core.builds.calibtypes import CALIB_TYPES

    n_deployments = len(CALIB_TYPES) + 1        # one per calib type, and the nightly
    serve = subprocess.Popen([sys.executable, "-m", "calibflow", "serve", "--camera", CAMERA],
                             env={**os.environ, **env, "PREFECT_API_URL": prefect_api}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            if not line:
                break
            printed.append(line)
            if "nightly-calibs/nightly" in line:        # the last line serve prints before serving
                break
        with get_client(sync_client=True) as client:       # serve registers them after printing
            while time.monotonic() < deadline:
                deployments = [d for d in client.read_deployments() if d.parameters.get("repo") == str(repo)]
                if len(deployments) == n_deployments or serve.poll() is not None:
                    break
                time.sleep(0.5)
            runs = client.read_flow_runs()
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, 9)
            serve.wait()
    assert any(f"serving {n_deployments} deployments" in line for line in printed), printed
    assert len(deployments) == n_deployments
    assert all(d.parameters["registry_url"] == "env:CALIBFLOW_REGISTRY_URL" for d in deployments)
    ours = [r for r in runs if r.parameters.get("repo") == str(repo.absolute())]
    assert ours and all(r.parameters.get("registry_url") == "env:CALIBFLOW_REGISTRY_URL" for r in ours)
    everything = "".join(printed) + json.dumps([d.parameters for d in deployments]) + \
        json.dumps([r.parameters for r in runs], default=str)
    assert SECRET not in everything
