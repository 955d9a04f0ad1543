"""The build flow under a real Prefect API (prefect_test_harness): bias -> dark -> flat on a simulated
democam_mini night, checked against the simulator's truth, with provenance, resume and no duplicates."""

import json
import os
import time

import numpy as np
import pytest
from astropy.io import fits

from calib_core.camera import load_camera
from calib_core.io.products import read_product
from calib_core.repository import calib_inputs, list_calibs, lookup
from calib_core.simulate.night import simulate_night
from tests._repos import ingested_repo

NIGHT = "2026-11-20"


@pytest.fixture(scope="module")
def night_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows")
    cam = load_camera("democam_mini")
    sim = simulate_night(cam, root / "sim", seed=11, night=NIGHT, n_bias=5, n_dark=4, n_flat=4, n_science=0,
                         filters=("r",))
    store, reg = ingested_repo(root / "repo", root / "sim" / "raw", "democam_mini")
    # these tests read what the process step recorded in the intermediates: the builds keep them
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIBFLOW_INTERMEDIATES", "keep")
        yield sim, store, reg


def _truth(sim, name):
    return fits.getdata(sim.out_dir / "truth" / f"{name}.fits").astype(np.float64)


def test_bias_dark_flat_builds(prefect_api, night_repo):
    from flows.build import build_calib

    sim, store, reg = night_repo
    common = dict(camera="democam_mini", night=NIGHT, repo=str(store.root))

    # dark before bias: ISR cannot find a certified bias -> a clear error, nothing registered
    with pytest.raises(ValueError, match="no certified bias"):
        build_calib("dark", **common)
    assert list_calibs(reg) == []

    bias = build_calib("bias", **common)
    assert bias["created"] == 9 and len(list_calibs(reg, calib_type="bias")) == 9
    cam = load_camera("democam_mini")
    for det in cam.detectors:
        product = next(p for p in bias["products"] if p.detector == det.id)
        mi, header = read_product(product.path)
        truth = _truth(sim, f"bias_{det.name}")
        # Tolerance: each input pixel has read noise rn/g ~ 2.5-3.5 ADU; a 5-frame clipped mean
        # has sigma ~ 3.5/sqrt(5) * 1.1 ~ 1.7 ADU per pixel, so the mean over ~1.3e5 pixels of
        # (product - truth) is zero to < 0.05 ADU plus the overscan-estimate error of each frame
        # (median of 16 x 512 pixels: ~0.05 ADU); the per-pixel RMS stays below ~2.2 ADU.
        diff = mi.image - truth
        assert abs(np.mean(diff)) < 0.3
        assert np.std(diff) < 2.2
        # provenance in the header
        assert header["OBSTYPE"] == "bias" and header["NCOMBINE"] == 5 and header["EXPTIME"] == 0.0
        assert header["CALIB_INPUT_0"] and "DATE-OBS" in header and "DATE-AVG" in header and "DATE-END" in header
    inputs = calib_inputs(reg, bias["products"][0].calib_id)
    assert len(inputs) == 5 and all(i["used"] for i in inputs)

    dark = build_calib("dark", **common)
    assert dark["created"] == 9
    for det in cam.detectors[:3]:
        product = next(p for p in dark["products"] if p.detector == det.id)
        mi, header = read_product(product.path)
        truth = _truth(sim, f"dark_{det.name}")
        assert header["EXPTIME"] == 1.0 and header["DARKTIME"] == 1.0
        hot = truth > 0.3          # hot pixels, ADU/s: 4 x 300 s darks measure them to a few %
        assert hot.sum() > 10
        np.testing.assert_allclose(mi.image[hot], truth[hot], rtol=0.15)
        # the dark ISR used exactly the certified bias of that detector
    dark_raw = json.loads(next(store.root.glob("work/democam_mini/dark/*-det000-*.json")).read_text())
    assert dark_raw["isr_calibs"]["bias"] == next(p.calib_id for p in bias["products"] if p.detector == 0)

    flat = build_calib("flat", filter="r", **common)
    assert flat["created"] == 9 and flat["filter"] == "r"
    levels = []
    for det in cam.detectors:
        product = next(p for p in flat["products"] if p.detector == det.id)
        mi, header = read_product(product.path)
        truth = _truth(sim, f"flat_r_{det.name}")
        good = (truth > 0.5) & (mi.mask == 0)
        # the flat's shape matches the truth response up to one constant per CCD (its scale)
        ratio = mi.image[good] / truth[good]
        assert np.std(ratio) / np.mean(ratio) < 0.01     # 4 flats x ~2e4 e-: ~0.4 % per pixel
        levels.append(np.mean(ratio))
        assert header["CCDSCALE"] > 0
    # relative CCD throughputs preserved: all CCDs on one common scale within ~0.5 %
    assert np.std(levels) / np.mean(levels) < 0.005
    png = flat["mosaic_png"]
    assert png.endswith(".png") and open(png, "rb").read(4) == b"\x89PNG"

    # certified products are what later lookups return
    exp = reg.query_exposures(obs_type="flat")[0].exposure_id
    assert lookup(reg, camera="democam_mini", exposure_id=exp, calib_type="dark", detector=4)[0].calib_id == \
        next(p.calib_id for p in dark["products"] if p.detector == 4)


def test_rebuild_is_a_no_op(prefect_api, night_repo):
    from sqlalchemy import func, select

    from calib_core.repository.registry import BuildRunRow
    from flows.build import build_calib

    sim, store, reg = night_repo
    if not list_calibs(reg, calib_type="bias"):          # when run on its own
        build_calib("bias", camera="democam_mini", night=NIGHT, repo=str(store.root))
    before = list_calibs(reg, calib_type="bias")

    def n_runs():
        with reg.session() as s:
            return s.scalar(select(func.count()).select_from(BuildRunRow))

    runs = n_runs()
    work = {p: p.stat().st_mtime_ns for p in store.root.glob("work/democam_mini/bias/*")}
    again = build_calib("bias", camera="democam_mini", night=NIGHT, repo=str(store.root))
    assert again["created"] == 0 and len(again["products"]) == 9
    assert list_calibs(reg, calib_type="bias") == before
    # the identical rebuild stopped before any processing: no intermediate touched, and its run says so
    assert n_runs() == runs + 1
    with reg.session() as s:
        last = s.scalars(select(BuildRunRow).order_by(BuildRunRow.id.desc())).first()
        assert last.status == "completed" and last.message.startswith("0 new products: all 9 already built")
    assert {p: p.stat().st_mtime_ns for p in store.root.glob("work/democam_mini/bias/*")} == work


def test_cli_build_and_bad_config(prefect_api, night_repo):
    from typer.testing import CliRunner

    from calibflow.cli import app

    sim, store, reg = night_repo
    runner = CliRunner()
    env = {"CALIBFLOW_REPO": str(store.root), "CALIBFLOW_REGISTRY_URL": ""}
    res = runner.invoke(app, ["build", "bias", "--camera", "democam_mini", "--night", NIGHT], env=env)
    assert res.exit_code == 0, res.output
    assert "bias NONE" in res.output and "mosaic:" in res.output
    bad = runner.invoke(app, ["build", "bias", "--camera", "democam_mini", "--set", "combine.statistic=MODE"], env=env)
    assert bad.exit_code == 1 and "invalid bias config" in bad.output and "statistic" in bad.output
    none = runner.invoke(app, ["build", "bias", "--camera", "democam_mini", "--night", "2020-01-01"], env=env)
    assert none.exit_code == 1 and "no bias exposures" in none.output


def test_detector_batches():
    from flows.build import detector_batches

    dets = list(range(9))
    # ~4 tasks per worker: 5 exposures x 2 workers -> 2 groups per exposure, split evenly
    assert detector_batches(dets, 5, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert detector_batches(dets, 1, 2) == [[0, 1], [2], [3], [4], [5], [6], [7], [8]]
    assert detector_batches(dets, 40, 2) == [dets]              # plenty of tasks already: one per exposure
    assert detector_batches(dets, 3, 64) == [[d] for d in dets]  # a big cluster: one per detector
    assert detector_batches(dets, 5, 2, per_task=1) == [[d] for d in dets]
    assert detector_batches(dets, 5, 2, per_task=4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert detector_batches(dets, 5, 2, per_task=100) == [dets]
    assert detector_batches([], 5, 2) == []
    for n_exp, par in [(1, 1), (3, 2), (7, 5), (100, 200)]:
        groups = detector_batches(dets, n_exp, par)
        assert [d for g in groups for d in g] == dets and max(map(len, groups)) - min(map(len, groups)) <= 1


def test_task_granularity_changes_tasks_not_products(prefect_api, night_repo, tmp_path):
    """Grouping detectors into fewer process tasks is bookkeeping: same products, fewer task runs,
    each named after its exposure and detector span."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.build import build_calib, detector_batches

    sim, store, reg = night_repo
    results = {}
    for per_task in (None, 1):
        fresh, _ = ingested_repo(tmp_path / f"repo-{per_task}", sim.out_dir / "raw", "democam_mini")
        state = build_calib("bias", camera="democam_mini", night=NIGHT, repo=str(fresh.root),
                            detectors_per_task=per_task, return_state=True)
        out = state.result()
        # the server fills in task runs from events, asynchronously: wait until all are in, named
        expected = 5 * len(detector_batches(list(range(9)), 5, os.cpu_count() or 2, per_task))
        deadline = time.monotonic() + 120
        while True:
            with get_client(sync_client=True) as client:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            names = sorted(r.name for r in runs if r.name.startswith("process-2"))
            done = [r for r in runs if r.name.startswith("process-2") and r.state_type == "COMPLETED"]
            if len(done) == expected or time.monotonic() > deadline:
                break
            time.sleep(1)
        pixels = {p.detector: read_product(p.path)[0] for p in out["products"]}
        results[per_task] = (out, names, pixels)
    (auto, auto_names, auto_px), (single, single_names, single_px) = results[None], results[1]
    assert len(single_names) == 5 * 9 and all(n.rsplit("-", 1)[-1].startswith("det") for n in single_names)
    assert len(auto_names) == 5 * len(detector_batches(list(range(9)), 5, os.cpu_count() or 2))
    assert len(auto_names) < len(single_names)
    spans = [f"det{b[0]}" if len(b) == 1 else f"det{b[0]}-{b[-1]}"
             for b in detector_batches(list(range(9)), 5, os.cpu_count() or 2)]
    bias_ids = [e.exposure_id for e in reg.query_exposures(obs_type="bias")]
    assert auto_names == sorted(f"process-{e}-{span}" for e in bias_ids for span in spans)
    assert [p.calib_id for p in auto["products"]] == [p.calib_id for p in single["products"]]
    for d, mi in auto_px.items():
        np.testing.assert_array_equal(mi.image, single_px[d].image)
        np.testing.assert_array_equal(mi.mask, single_px[d].mask)

    with pytest.raises(ValueError, match="detectors_per_task"):
        build_calib("bias", camera="democam_mini", night=NIGHT, repo=str(store.root), detectors_per_task=0)


def test_new_bias_makes_a_new_dark(prefect_api, night_repo):
    """A product's identity includes the calibs its inputs' ISR used: after a different bias is
    certified, rebuilding the dark from the same raws and config is a new product, not a no-op."""
    from flows.build import build_calib

    sim, store, reg = night_repo
    common = dict(camera="democam_mini", night=NIGHT, repo=str(store.root))
    if not list_calibs(reg, calib_type="bias"):          # when run on its own
        build_calib("bias", **common)
    first = build_calib("dark", detectors=[0, 1], **common)
    assert build_calib("dark", detectors=[0, 1], **common)["created"] == 0     # same bias: nothing new

    newer_bias = build_calib("bias", config={"combine": {"statistic": "MEDIAN"}}, **common)
    assert newer_bias["created"] == 9
    second = build_calib("dark", detectors=[0, 1], **common)
    assert second["created"] == 2
    old_ids = {p.calib_id for p in first["products"]}
    assert not old_ids & {p.calib_id for p in second["products"]}
    for p in second["products"]:
        bias_id = next(b.calib_id for b in newer_bias["products"] if b.detector == p.detector)
        header = read_product(p.path)[1]
        assert header["CALIB_ISR_0"] == bias_id and "CALIB_ISR_1" not in header
        assert p.stats["isr_calibs"] == [bias_id]
        # and the lookup now gives the new dark
        exp = reg.query_exposures(obs_type="flat")[0].exposure_id
        assert lookup(reg, camera="democam_mini", exposure_id=exp, calib_type="dark",
                      detector=p.detector)[0].calib_id == p.calib_id


def test_failed_combine_leaves_nothing_behind(prefect_api, night_repo, monkeypatch):
    """An error after the product was written under its private name (here: its statistics) removes
    that file and registers nothing."""
    import tasks.calib_tasks as calib_tasks
    from flows.build import build_calib

    sim, store, reg = night_repo

    def broken(*args, **kwargs):
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(calib_tasks, "background_level", broken)
    before = list_calibs(reg)
    with pytest.raises(RuntimeError, match="statistics exploded"):
        build_calib("bias", camera="democam_mini", night=NIGHT, repo=str(store.root), detectors=[3],
                    config={"combine": {"nsigma": 2.75}})
    assert list_calibs(reg) == before
    assert [p for p in (store.root / "calib").rglob(".*") if p.is_file()] == []


def test_cli_build_is_quiet_with_a_bar_per_stage(prefect_api, tmp_path):
    """`calibflow build` prints a progress bar per stage and the summary, not Prefect's INFO log
    (about 45 lines for this small build, ~340 for a democam night), even where Prefect logs at
    INFO; `-v` brings that log back. A subprocess: Prefect's console handler is set up at import."""
    import re
    import subprocess
    import sys

    cam = load_camera("democam_mini")
    simulate_night(cam, tmp_path / "sim", seed=4, night=NIGHT, n_bias=3, n_dark=0, n_flat=0, n_science=0,
                   filters=("r",))
    store, _ = ingested_repo(tmp_path / "repo", tmp_path / "sim" / "raw", "democam_mini")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "INFO",
           "CALIBFLOW_REPO": str(store.root), "COLUMNS": "120"}
    env.pop("CALIBFLOW_REGISTRY_URL", None)
    args = [sys.executable, "-m", "calibflow", "build", "bias", "--camera", "democam_mini", "--night", NIGHT]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "INFO" not in res.stderr and "Finished in state" not in res.stderr, res.stderr
    assert re.search(r"^bias process +━+ \d+/\d+", res.stderr, re.M), res.stderr
    assert re.search(r"^bias combine +━+ 9/9", res.stderr, re.M), res.stderr
    assert "bias NONE 2026-11-20: 9 new, 0 already built" in res.stdout
    lines = (res.stdout + res.stderr).splitlines()
    assert len(lines) <= 30, "\n".join(lines)            # one screen
    verbose = subprocess.run(args + ["-v"], env=env, capture_output=True, text=True, timeout=600,
                             stdin=subprocess.DEVNULL)
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert "INFO" in verbose.stderr and "Beginning flow run" in verbose.stderr, verbose.stderr
    assert "0 new, 9 already built" in verbose.stdout


def test_a_build_looks_up_each_inputs_isr_calibs_once(monkeypatch):
    """Planning (product identity), process and combine ask the registry the same question for each
    (exposure, detector): within one build (its lookup token) it is asked once; the next build, or a
    task run outside a build, asks again (a calib certified in between is found)."""
    import tasks.calib_tasks as T

    calls = []

    def find(registry, camera, exposure_id, detector, isr, types, readout, purpose):
        calls.append((exposure_id, detector))
        return {"bias": f"bias-{len(calls)}"}

    monkeypatch.setattr(T, "find_isr_calibs", find)
    monkeypatch.setattr(T, "readout_keys", lambda cam: ())
    monkeypatch.setattr(T, "build_camera", lambda ctx: None)
    ctx = T.BuildContext(repo="/nowhere", registry_url="sqlite://", camera="c", calib_type="dark", config={},
                         config_hash="h", calib_date=NIGHT, filter="NONE", software_version="t",
                         lookup_token="build-1")
    first = T._isr_calibs(ctx, None, "e1", 0)
    assert T._isr_calibs(ctx, None, "e1", 0) is first and len(calls) == 1
    T._isr_calibs(ctx, None, "e1", 1)
    T._isr_calibs(ctx, None, "e2", 0)
    assert calls == [("e1", 0), ("e1", 1), ("e2", 0)]
    later = ctx.model_copy(update={"lookup_token": "build-2"})
    assert T._isr_calibs(later, None, "e1", 0) == {"bias": "bias-4"}
    bare = ctx.model_copy(update={"lookup_token": ""})
    T._isr_calibs(bare, None, "e1", 0)
    T._isr_calibs(bare, None, "e1", 0)
    assert len(calls) == 6
