"""Two identical builds started at the same instant, on SQLite and on PostgreSQL.

What must hold (issue 6, item 5): both runs end cleanly, the registry holds exactly one product per
detector, each product's file is there with the registered checksum, no temporary or losing copy
is left behind, every input is recorded once, and a run that did not register a product says that
an identical product already exists (built by the concurrent run).

Two layers are raced:

* the registry itself (``record_calib``): threads, each with its own database connection, meet at
  a barrier and register the same product at once, each publishing a file of different content;
* the whole build: two ``calibflow build bias`` processes sharing one Prefect API
  (``tests/_race_build.py`` starts them at one instant). In the second round every detector's
  registration is made to collide (each process waits for the other just before ``record_calib``,
  after both have combined and written their own copy): the case the registry layer must settle.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from calib_core.camera import load_camera
from calib_core.io.products import read_product
from calib_core.repository import (CalibInput, Datastore, calib_digest, calib_inputs, ingest_files, list_calibs,
                                   record_calib, sha256_file)
from calib_core.repository.registry import BuildRunRow, CalibInputRow, CalibRow, Registry
from calib_core.simulate.night import simulate_night

REPO_ROOT = Path(__file__).resolve().parents[1]
NIGHT = "2026-11-20"
N_BIAS = 4


# -- the registry layer ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bias_night(tmp_path_factory) -> Path:
    """Raw bias exposures of a simulated democam_mini night (9 small CCDs)."""
    out = tmp_path_factory.mktemp("race-sim")
    simulate_night(load_camera("democam_mini"), out, seed=5, night=NIGHT, n_bias=N_BIAS, n_dark=0, n_flat=0,
                   n_science=0, filters=("r",))
    return out / "raw"


def _ingest(reg: Registry, raw: Path, store: Datastore) -> list[str]:
    rep = ingest_files(sorted(raw.glob("*.fits")), load_camera("democam_mini"), reg, store, transfer="symlink")
    assert rep.ok, rep.failed
    return [e.exposure_id for e in reg.query_exposures(obs_type="bias")]


@pytest.mark.postgres
def test_record_calib_race_one_winner(registry, bias_night, tmp_path):
    """8 threads register the same product at once: one creates it and publishes its file; the other
    7 get the winner's record with created=False, never publish, and nothing is duplicated."""
    exposures = _ingest(registry, bias_night, Datastore(tmp_path / "repo"))
    date = dt.date.fromisoformat(NIGHT)
    digest = calib_digest([(e, "x") for e in exposures], "cfg")
    final = tmp_path / "product.fits"
    parties = 8
    barrier = threading.Barrier(parties)
    published, results, errors = [], [None] * parties, []

    def contender(i: int) -> None:
        def publish():
            final.write_text(f"copy {i}")      # what the winner's rename would put in place
            published.append(i)

        try:
            barrier.wait()
            results[i] = record_calib(registry, camera="democam_mini", calib_type="bias", filter="NONE",
                                      detector=0, calib_date=date, path=str(final),
                                      checksum=hashlib.sha256(f"copy {i}".encode()).hexdigest(),
                                      config_hash="cfg", digest=digest, software_version="test",
                                      inputs=[CalibInput(e) for e in exposures], publish=publish)
        except BaseException as exc:  # noqa: BLE001  (reported below with the thread's number)
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(parties)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    winners = [i for i, (_, created) in enumerate(results) if created]
    assert len(winners) == 1 and published == winners
    records = [r for r, _ in results]
    assert len({r.calib_id for r in records}) == 1
    assert all(r.checksum == hashlib.sha256(f"copy {winners[0]}".encode()).hexdigest() for r in records)
    assert final.read_text() == f"copy {winners[0]}"      # the file is the registered one
    assert registry.count(CalibRow) == 1
    assert registry.count(CalibInputRow) == len(exposures)


@pytest.mark.postgres
def test_record_calib_publish_failure_records_nothing(registry, bias_night, tmp_path):
    """A product whose file cannot be put in place is not registered, and the next attempt can be."""
    exposures = _ingest(registry, bias_night, Datastore(tmp_path / "repo"))
    kwargs = dict(camera="democam_mini", calib_type="bias", filter="NONE", detector=0,
                  calib_date=dt.date.fromisoformat(NIGHT), path=str(tmp_path / "p.fits"), checksum="c",
                  config_hash="cfg", digest=calib_digest([(e, "x") for e in exposures], "cfg"),
                  software_version="test", inputs=[CalibInput(e) for e in exposures])

    def broken():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        record_calib(registry, publish=broken, **kwargs)
    assert registry.count(CalibRow) == 0 and registry.count(CalibInputRow) == 0
    row, created = record_calib(registry, publish=lambda: None, **kwargs)
    assert created and registry.count(CalibRow) == 1


# -- two whole builds ------------------------------------------------------------------------------

def test_concurrent_ingest_of_a_new_camera(registry_url, bias_night, tmp_path):
    """Two ingests of the same files into an empty registry at once (the camera is new to both):
    every exposure ends up registered exactly once, each file is ingested by one and skipped by the
    other, nothing fails, and no placed file is removed by the loser."""
    import threading

    from calib_core.repository import sha256_file

    files = sorted(bias_night.glob("*.fits"))
    for round_ in range(3):
        store = Datastore(tmp_path / f"repo-{round_}")
        url = registry_url if round_ == 0 else registry_url.replace(".sqlite3", f"-{round_}.sqlite3")
        if url.startswith("postgresql") and round_:
            break                               # one fresh PostgreSQL database is enough
        first = Registry.open(url)
        first.upgrade()
        barrier = threading.Barrier(2)
        reports = [None, None]

        def ingest(i):
            reg = Registry.open(url)
            barrier.wait()
            reports[i] = ingest_files(files, load_camera("democam_mini"), reg, store, transfer="copy")

        threads = [threading.Thread(target=ingest, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert all(r is not None for r in reports)
        assert [r.failed for r in reports] == [[], []]
        ingested = sorted(e for r in reports for e in r.ingested)
        exposures = first.query_exposures(camera="democam_mini")
        assert ingested == sorted(e.exposure_id for e in exposures) and len(ingested) == len(files)
        assert sum(len(r.skipped) for r in reports) == len(files)
        for e in exposures:
            assert sha256_file(e.path) == e.checksum
        first.engine.dispose()


@pytest.fixture(scope="module")
def prefect_api_url():
    """One Prefect API shared by the racing processes (a real server, as at an observatory)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def _race(tmp_path: Path, name: str, mode: str, env: dict, cli_args: list[str]) -> list[subprocess.CompletedProcess]:
    barrier = tmp_path / f"barrier-{name}"
    barrier.mkdir()
    cmd = [sys.executable, str(REPO_ROOT / "tests" / "_race_build.py"), str(barrier), "2", mode, "--", *cli_args]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=840)[0] for p in procs]
    return [subprocess.CompletedProcess(cmd, p.returncode, out, "") for p, out in zip(procs, outs)]


_SUMMARY = re.compile(r"(\d+) new, (\d+) already built")
_LOST = re.compile(r"detector (\d+): an identical bias was registered by a concurrent build")


def _check_round(reg: Registry, store: Datastore, runs, calib_date: str, n_det: int, forced: bool) -> list[int]:
    for run in runs:
        assert run.returncode == 0, run.stdout
    # exactly one product per detector for this calib date, each file intact and the registered one
    products = [c for c in list_calibs(reg, calib_type="bias") if c.calib_date == calib_date]
    assert sorted(c.detector for c in products) == list(range(n_det))
    for c in products:
        assert Path(c.path).is_file(), c.path
        assert sha256_file(c.path) == c.checksum, f"{c.path} is not the registered file"
        mi, header = read_product(c.path)
        assert header["NCOMBINE"] == N_BIAS and mi.image.shape == (512, 256)
        assert [i["used"] for i in calib_inputs(reg, c.calib_id)] == [True] * N_BIAS
    # every input recorded once, for these products only (the unique constraint forbids a repeat;
    # the count shows no second set was attached to a second row either)
    with reg.session() as s:
        per_calib = Counter(s.execute(select(CalibInputRow.calib_pk)).scalars())
        ids = set(s.execute(select(CalibRow.id).where(CalibRow.calib_date == dt.date.fromisoformat(calib_date)))
                  .scalars())
    assert {k: v for k, v in per_calib.items() if k in ids} == {k: N_BIAS for k in ids}
    # the calib folder holds the registered products, the mosaics and nothing else (no loser's copy),
    # and no temporary or pending file is left anywhere in the repository
    folder = store.root / "calib" / "democam_mini" / "bias"
    registered = {Path(c.path).name for c in list_calibs(reg, calib_type="bias")}
    stray = [p.name for p in folder.iterdir()
             if p.name not in registered and not re.fullmatch(r"bias-democam_mini-NONE-[\d-]+-mosaic\.(fits|png)", p.name)]
    assert stray == []
    assert [p for p in store.root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name] == []
    # what each run said: together they created every product once; each names what it did not create
    summaries = []
    for run in runs:
        m = _SUMMARY.findall(run.stdout)
        assert len(m) == 1, run.stdout
        new, existing = map(int, m[0])
        assert new + existing == n_det
        lost = sorted(int(d) for d in _LOST.findall(run.stdout))
        assert len(lost) == len(set(lost)) <= existing
        if forced:
            assert len(re.findall(r"RENDEZVOUS det\d+", run.stdout)) == n_det   # the instrument ran
            assert len(lost) == existing          # every product it did not create, it lost in the race
        summaries.append(new)
    assert sum(summaries) == n_det
    return summaries


@pytest.mark.postgres
def test_two_identical_builds_at_once(registry_url, prefect_api_url, bias_night, tmp_path):
    cam = load_camera("democam_mini")
    store = Datastore(tmp_path / "repo")
    store.ensure()
    reg = Registry.open(registry_url)
    reg.upgrade()
    _ingest(reg, bias_night, store)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "CALIBFLOW_REPO": str(store.root),
           "CALIBFLOW_REGISTRY_URL": registry_url, "PYTHONPATH": str(REPO_ROOT),
           "PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "200"}
    args = ["build", "bias", "--camera", "democam_mini", "--night", NIGHT]
    n_det = len(cam.detectors)

    # round 1: both start at the same instant and race through the whole flow
    natural = _race(tmp_path, "natural", "start", env, args)
    _check_round(reg, store, natural, NIGHT, n_det, forced=False)

    # round 2: a new calib date (a new product identity; the intermediates are reprocessed where round 1
    # removed them, reused where a racing build kept them), and every
    # registration collides: both processes have written their own copy when they register
    forced = _race(tmp_path, "forced", "record", env, [*args, "--calib-date", "2026-11-21"])
    _check_round(reg, store, forced, "2026-11-21", n_det, forced=True)

    assert reg.count(CalibRow) == 2 * n_det
    with reg.session() as s:
        statuses = Counter(s.execute(select(BuildRunRow.status)).scalars())
    assert statuses == {"completed": 4}
    reg.engine.dispose()
