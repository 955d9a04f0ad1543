"""Builds under failure and on other runners: a corrupt raw (fail fast naming it, or excluded and
recorded), a build killed mid-way and rerun, and the same build on a Dask LocalCluster of 2 worker
processes giving products identical to the thread runner's."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from calib_core.camera import load_camera
from calib_core.io.products import read_product
from calib_core.repository import calib_inputs, list_calibs
from calib_core.repository.registry import BuildRunRow
from calib_core.simulate.night import simulate_night
from tests._repos import ingested_repo

NIGHT = "2026-11-23"
CAMERA = "democam_mini"


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    simulate_night(load_camera(CAMERA), root / "sim", seed=21, night=NIGHT, n_bias=6, n_dark=0, n_flat=0,
                   n_science=0, filters=("r",))
    return sorted((root / "sim" / "raw").glob("*.fits"))


def _repo(path, raws):
    return ingested_repo(path, raws, CAMERA, transfer="copy")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, raws, prefect_api):
    """An uninterrupted thread-runner build: what every other run must reproduce."""
    from flows.build import build_calib

    store, reg = _repo(tmp_path_factory.mktemp("reference") / "repo", raws)
    result = build_calib("bias", camera=CAMERA, night=NIGHT, repo=str(store.root))
    assert result["created"] == 9
    return {p.calib_id: read_product(p.path)[0] for p in result["products"]}


def _same_products(reg, reference):
    got = list_calibs(reg, calib_type="bias")
    assert sorted(p.calib_id for p in got) == sorted(reference)
    for p in got:
        mi = read_product(p.path)[0]
        ref = reference[p.calib_id]
        np.testing.assert_array_equal(mi.image, ref.image)
        np.testing.assert_array_equal(mi.mask, ref.mask)
        np.testing.assert_array_equal(mi.variance, ref.variance)


def test_corrupt_raw_fails_naming_it_and_registers_nothing(tmp_path, raws, prefect_api):
    from flows.build import build_calib

    store, reg = _repo(tmp_path / "repo", raws)
    bad = sorted(store.root.glob("raw/**/*.fits"))[2]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])         # truncated on disk after ingest
    with pytest.raises(ValueError, match=bad.name):
        build_calib("bias", camera=CAMERA, night=NIGHT, repo=str(store.root))
    assert list_calibs(reg) == []
    assert not list(store.root.glob("calib/**/*.fits"))
    with reg.session() as s:
        runs = s.query(BuildRunRow).all()
        assert [r.status for r in runs] == ["failed"] and bad.name in runs[0].message
    # retention: the failed build keeps what it processed (the 5 good exposures x 9 detectors), for resume
    work = store.root / "work" / CAMERA / "bias"
    kept = {(m["exposure_id"], m["detector"]) for m in map(json.loads, (p.read_text() for p in work.glob("*.json")))}
    assert len(kept) == 5 * 9 and all(p.with_suffix(".fits").exists() for p in work.glob("*.json"))

    # per policy, the unreadable exposure is left out and the reason recorded with every product
    result = build_calib("bias", camera=CAMERA, night=NIGHT, repo=str(store.root), on_bad_input="exclude")
    assert result["created"] == 9
    # it resumed from every kept intermediate, and once its products were registered and verified
    # removed them (docs/architecture.md#intermediates-and-disk): nothing is left under work/
    assert {(p["exposure_id"], p["detector"]) for p in result["processed"] if p["reused"]} == kept
    assert [p for p in work.iterdir()] == []
    assert not (store.root / "work" / ".recycle").exists()     # the pool of retired files ends with the build
    (bad_id,) = result["dropped"]
    assert "unreadable raw" in result["dropped"][bad_id] and bad.name in result["dropped"][bad_id]
    for product in list_calibs(reg):
        assert product.n_inputs == 5
        rows = {i["exposure_id"]: i for i in calib_inputs(reg, product.calib_id)}
        assert not rows[bad_id]["used"] and bad.name in rows[bad_id]["reason"]


def test_killed_build_reruns_to_the_same_result(tmp_path, raws, prefect_api, reference):
    from flows.build import build_calib

    store, reg = _repo(tmp_path / "repo", raws)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "CALIBFLOW_REPO": str(store.root),
           "CALIBFLOW_REGISTRY_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "calibflow", "build", "bias", "--camera", CAMERA, "--night",
                             NIGHT], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    work = store.root / "work" / CAMERA / "bias"
    try:
        deadline = time.monotonic() + 300
        while len(list(work.glob("*.json"))) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in work.glob("*.fits") if p.with_suffix(".json").exists()}
    assert 12 <= len(done_before) < 54
    assert list_calibs(reg) == []                    # nothing half-registered
    # whether or not the kill landed mid-write, make sure there is a leftover of the killed process
    from calib_core.io.atomic import private_name
    planted = private_name(work / "202611230002-det003-planted.fits").name.split("~")
    planted[2] = str(proc.pid)
    (work / "~".join(planted)).write_bytes(b"SIMPLE  = ")

    done_ids = {(m["exposure_id"], m["detector"])
                for m in (json.loads(p.with_suffix(".json").read_text()) for p in done_before)}
    result = build_calib("bias", camera=CAMERA, night=NIGHT, repo=str(store.root))
    assert result["created"] == 9
    _same_products(reg, reference)
    # the finished intermediates were reused, not redone (and removed once the products were registered)
    assert done_ids <= {(p["exposure_id"], p["detector"]) for p in result["processed"] if p["reused"]}
    assert not any(p.exists() for p in done_before)
    # the killed writer's half-written temporaries were swept, not left to pile up
    assert [p for p in store.root.rglob(".*") if p.is_file()] == []


def test_dask_local_cluster_gives_identical_products(tmp_path, raws, prefect_api, reference):
    from flows.build import build_calib

    store, reg = _repo(tmp_path / "repo", raws)
    result = build_calib("bias", camera=CAMERA, night=NIGHT, repo=str(store.root), runner="dask", dask_workers=2)
    assert result["created"] == 9
    pids = {p["pid"] for p in result["processed"]}
    assert len(pids) == 2 and os.getpid() not in pids      # the work ran in the 2 worker processes
    _same_products(reg, reference)


def test_deployment_entry_flow_on_an_existing_dask_cluster(tmp_path, raws, prefect_api, reference):
    """Scaling out: the bias deployment's own entry flow, pointed at an already running
    dask.distributed scheduler (here a LocalCluster of 2 worker processes started beforehand, as a
    site would start one with dask-jobqueue), runs its tasks on that cluster's workers; pixels go
    through the shared datastore (tasks return paths and small dicts), and the products are
    identical to the thread runner's."""
    from distributed import Client, LocalCluster

    from deployments.build import build_bias

    store, reg = _repo(tmp_path / "repo", raws)
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = prefect_api      # the workers report their task runs here
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                worker_pids = set(client.run(os.getpid).values())
            result = build_bias(night=NIGHT, camera=CAMERA, repo=str(store.root), runner="dask",
                                dask_address=cluster.scheduler_address)
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
    assert result["created"] == 9
    assert {p["pid"] for p in result["processed"]} == worker_pids and len(worker_pids) == 2
    _same_products(reg, reference)
