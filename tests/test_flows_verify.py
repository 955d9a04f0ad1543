"""Verification before certification, explainable lookup, trends and the night report, on three
simulated democam_mini nights run by the nightly flow (docs/architecture.md#verification-and-certification).

Night 1 builds bias, dark and r flat: all pass and are certified. Night 2 has a bias frame with a
40-ADU step over half of one detector (the test writes it into the raw) and a flat combine that
puts a 25 % step between the amplifiers of detector 4 (the test swaps the flat's combine): the
frame is excluded with its reason, the bad flat is held back with its failed checks, every other
product is certified, and lookup explains why night 1's flat still applies to detector 4. Night 3
(bias only) gives the trend its third point.
"""

import dataclasses
import json
import re
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from calib_core.builds.calibtypes import CALIB_TYPES
from calib_core.camera import load_camera
from calib_core.repository import calib_inputs, calib_metrics, explain_lookup, ingest_files, list_calibs, lookup
from calib_core.simulate.night import simulate_night
from tests._repos import ingested_repo

CAMERA = "democam_mini"
NIGHTS = ("2026-11-20", "2026-11-21", "2026-11-22")
BAD_DET = 4


def _simulate(root, night, seq, **counts):
    return simulate_night(load_camera(CAMERA), root / f"sim-{night}", seed=3, night=night, n_science=0,
                          filters=("r",), first_sequence=seq, **counts)


def _spoil_bias(path, detector_hdu="CCD04"):
    """+40 ADU (~13 sigma of the read noise) on the data of the lower half of one detector; the
    overscan is left alone, so ISR keeps the step."""
    with fits.open(path, mode="update") as hdul:
        data = hdul[detector_hdu].data.astype(np.float32)
        for x0, x1 in ((4, 132), (152, 280)):          # the two amplifiers' data sections
            data[:256, x0:x1] += 40.0
        hdul[detector_hdu].data = data


def _bad_flat_combine(original):
    def combine(paths, cfg, exp_scales=None, ccd_scale=None):
        out = original(paths, cfg, exp_scales, ccd_scale)
        if f"-det{BAD_DET:03d}-" in str(paths[0]):
            out.image.image[:, 128:] *= 1.25             # amplifier B of detector 4
        return out
    return combine


@pytest.fixture(scope="module")
def nights(tmp_path_factory, prefect_api):
    from flows.nightly import NightlyPolicy, nightly

    root = tmp_path_factory.mktemp("verify")
    cam = load_camera(CAMERA)
    _simulate(root, NIGHTS[0], 0, n_bias=4, n_dark=3, n_flat=3)
    store, reg = ingested_repo(root / "repo", root / f"sim-{NIGHTS[0]}" / "raw", CAMERA)
    sim2 = _simulate(root, NIGHTS[1], 100, n_bias=4, n_dark=3, n_flat=3)
    bad_bias = [e for e in sim2.exposures if e.obs_type == "bias"][1]
    _spoil_bias(bad_bias.path)
    _simulate(root, NIGHTS[2], 200, n_bias=4, n_dark=0, n_flat=0)
    for n in NIGHTS[1:]:
        rep = ingest_files(sorted((root / f"sim-{n}" / "raw").glob("*.fits")), cam, reg, store, transfer="symlink")
        assert rep.ok, rep.failed
    summaries = {NIGHTS[0]: nightly(night=NIGHTS[0], camera=CAMERA, repo=str(store.root),
                                    policy=NightlyPolicy(types=["bias", "dark", "flat"]))}
    with pytest.MonkeyPatch.context() as mp:
        flat = CALIB_TYPES["flat"]
        mp.setitem(CALIB_TYPES, "flat", dataclasses.replace(flat, combine=_bad_flat_combine(flat.combine)))
        summaries[NIGHTS[1]] = nightly(night=NIGHTS[1], camera=CAMERA, repo=str(store.root),
                                       policy=NightlyPolicy(types=["bias", "dark", "flat"]))
    summaries[NIGHTS[2]] = nightly(night=NIGHTS[2], camera=CAMERA, repo=str(store.root),
                                   policy=NightlyPolicy(types=["bias"]))
    return store, reg, summaries, bad_bias.exposure_id


def _step(summary, calib_type):
    return next(s for s in summary["steps"] if s["type"] == calib_type)


def _cli(store, *args):
    from calibflow.cli import app

    res = CliRunner().invoke(app, [*args, "--repo", str(store.root)], env={"COLUMNS": "250"})
    return res


def test_good_products_are_certified_with_their_checks(nights):
    store, reg, summaries, _ = nights
    for night in NIGHTS[:2]:
        for t in ("bias", "dark"):
            rows = [r for r in list_calibs(reg, calib_type=t) if r.calib_date == night]
            assert len(rows) == 9 and all(r.status == "certified" for r in rows), (night, t)
            ver = rows[0].verification
            names = {c["name"] for c in ver["checks"]}
            assert ver["passed"] and names >= {"MEAN", "NOISE", "CR_NOISE", "OVERSCAN_NOISE", "BAD_FRACTION"}
    # against truth: the residual noise of a bias frame is the camera's read noise (a frame of a
    # 4-frame stack: sqrt(1 - 1/4) of it); the overscan noise is the read noise itself
    cam = load_camera(CAMERA)
    rows = [r for r in calib_metrics(reg, calib_type="bias") if r["calib_date"] == NIGHTS[0]]
    for det in cam.detectors:
        for amp in det.amplifiers:
            got = {r["metric"]: r["value"] for r in rows if r["detector"] == det.id and r["amp"] == amp.name}
            assert got["read_noise"] == pytest.approx(amp.read_noise * np.sqrt(1 - 1 / 4), rel=0.06)
            assert got["overscan_noise"] == pytest.approx(amp.read_noise, rel=0.05)
    # night 2's bias and dark were compared with night 1's (the incumbent) and were at least as good
    n2 = [r for r in list_calibs(reg, calib_type="dark") if r.calib_date == NIGHTS[1]]
    inc = next(c for c in n2[0].verification["checks"] if c["name"] == "INCUMBENT")
    assert inc["passed"] and n2[0].verification["incumbent"].startswith(f"dark-{CAMERA}-NONE-{NIGHTS[0]}")


def test_a_bad_input_frame_is_excluded_with_its_reason(nights):
    store, reg, summaries, bad = nights
    step = _step(summaries[NIGHTS[1]], "bias")
    why = step["dropped"][bad]
    assert why.startswith(f"screened out: detector {BAD_DET}: outlier against the last good master: ")
    assert re.search(r"(4\d|5\d)\.\d % of pixels >= 6 sigma \(limit 5 %\) \(master bias-democam_mini-NONE-"
                     + NIGHTS[0], why), why
    product = next(r for r in list_calibs(reg, calib_type="bias") if r.calib_date == NIGHTS[1])
    assert product.n_inputs == 3
    rec = {i["exposure_id"]: i for i in calib_inputs(reg, product.calib_id)}
    assert rec[bad]["used"] is False and rec[bad]["reason"] == why
    # the nightly's terminal summary gives the reason too, not only the id
    from calibflow.cli import _print_night
    from calibflow.common import console

    with console.capture() as cap:
        _print_night(summaries[NIGHTS[1]])
    assert f"bias: excluded {bad}: screened out: detector {BAD_DET}: outlier" in cap.get().replace("\n", " ")


def test_a_bad_flat_is_held_back_with_its_failed_checks(nights):
    store, reg, summaries, _ = nights
    flats = {r.detector: r for r in list_calibs(reg, calib_type="flat") if r.calib_date == NIGHTS[1]}
    assert len(flats) == 9
    assert {d for d, r in flats.items() if r.status != "certified"} == {BAD_DET}
    bad = flats[BAD_DET]
    assert bad.status == "candidate"
    failed = {c["name"] for c in bad.verification["checks"] if not c["passed"]}
    assert failed == {"AMP_SCATTER", "DETECTOR_SCATTER", "INCUMBENT"}
    step = _step(summaries[NIGHTS[1]], "flat")
    assert step["certified"] == 8 and [h["detector"] for h in step["held"]] == [BAD_DET]
    assert summaries[NIGHTS[1]]["state"] == "completed with 1 product(s) held back"
    res = _cli(store, "calibs", "--type", "flat", "--status", "candidate", "--json")
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["calib_id"] == bad.calib_id and row["verified"].startswith("failed: AMP_SCATTER: 0.1")
    # the night-1 and night-2 flats of the other detectors overlap in validity: `calibs` says so
    res = _cli(store, "calibs", "--type", "flat", "--detector", "0", "--json")
    rows = {r["calib_date"]: r for r in json.loads(res.stdout)}
    assert rows[NIGHTS[0]]["overlaps"] == [rows[NIGHTS[1]]["calib_id"]]


def test_lookup_explains_why_the_incumbent_flat_still_applies(nights):
    store, reg, summaries, _ = nights
    exp = next(e for e in reg.query_exposures(obs_type="flat", night=NIGHTS[1])).exposure_id
    old = next(r for r in list_calibs(reg, calib_type="flat", detector=BAD_DET) if r.calib_date == NIGHTS[0])
    new = next(r for r in list_calibs(reg, calib_type="flat", detector=BAD_DET) if r.calib_date == NIGHTS[1])
    assert lookup(reg, camera=CAMERA, exposure_id=exp, calib_type="flat", detector=BAD_DET)[0].calib_id == \
        old.calib_id
    rows = explain_lookup(reg, camera=CAMERA, exposure_id=exp, calib_type="flat", detector=BAD_DET)
    assert [r["calib_id"] for r in rows if r["chosen"]] == [old.calib_id]
    res = _cli(store, "lookup", "--exposure", exp, "--type", "flat", "--detector", str(BAD_DET), "--explain")
    assert res.exit_code == 0, res.output
    text = res.stdout.replace("\n", " ")
    assert re.search(rf"chosen +{old.calib_id} \[certified\]: certified, valid, calib date 1 d from the night",
                     text), text
    assert re.search(rf"no +{new.calib_id} \[candidate\]: not certified: candidate \(failed verification: "
                     r"AMP_SCATTER", text), text
    # on another detector the new flat wins over the old one, which the explanation says is shadowed
    res = _cli(store, "lookup", "--exposure", exp, "--type", "flat", "--detector", "0", "--explain", "--json")
    listing = json.loads(res.stdout)
    assert [r["calib_date"] for r in listing if r["chosen"]] == [NIGHTS[1]]
    assert any("shadowed by" in r["reasons"][0] and r["eligible"] for r in listing if not r["chosen"])


def test_certify_force_and_decertify(nights):
    store, reg, summaries, _ = nights
    bad = next(r for r in list_calibs(reg, calib_type="flat", detector=BAD_DET) if r.calib_date == NIGHTS[1])
    res = _cli(store, "certify", bad.calib_id)
    assert res.exit_code == 1 and "failed verification (AMP_SCATTER" in res.output and "--force" in res.output
    res = _cli(store, "certify", bad.calib_id, "--force", "--note", "test")
    assert res.exit_code == 0 and "certified by force: test (was candidate)" in res.stdout
    # the night report shows the person's decision with the checks the product failed
    page = store.root / "reports" / CAMERA / NIGHTS[1] / "index.html"
    assert f"night report updated: {page}" in res.stdout.replace("\n", "")
    text = page.read_text()
    assert re.search(rf"<li class='forced'><code>{bad.calib_id}</code>: certified by force: test \(was "
                     r"candidate\); failed: AMP_SCATTER", text), text
    exp = next(e for e in reg.query_exposures(obs_type="flat", night=NIGHTS[1])).exposure_id
    assert lookup(reg, camera=CAMERA, exposure_id=exp, calib_type="flat", detector=BAD_DET)[0].calib_id == \
        bad.calib_id
    res = _cli(store, "decertify", bad.calib_id, "--reason", "amplifier step")
    assert res.exit_code == 0 and "decertified: amplifier step" in res.stdout
    assert re.search(rf"<li class='held'><code>{bad.calib_id}</code> \(decertified\): decertified: amplifier "
                     r"step; verification failed: AMP_SCATTER", page.read_text())
    assert lookup(reg, camera=CAMERA, exposure_id=exp, calib_type="flat", detector=BAD_DET)[0].calib_date == \
        NIGHTS[0]
    res = _cli(store, "certify", bad.calib_id)
    assert res.exit_code == 1 and "was decertified (amplifier step)" in res.output
    # back to where the gate left it, for the other tests of this module
    from calib_core.repository import certify

    certify(reg, bad.calib_id, force=True)
    with reg.session() as s:
        from calib_core.repository.registry import CalibRow

        row = s.query(CalibRow).filter_by(calib_id=bad.calib_id).one()
        row.status, row.status_note = "candidate", ""
    from calib_core.quality.report import rewrite_reports_of

    assert rewrite_reports_of(reg, store.root, load_camera(CAMERA), bad.calib_id) == [page]


def test_trend_over_three_nights(nights, tmp_path):
    store, reg, summaries, _ = nights
    out = tmp_path / "trend.png"
    res = _cli(store, "trend", "--type", "bias", "--metric", "read_noise", "--detector", "4", "--out", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.with_suffix(".json").read_text())
    assert sorted({p["calib_date"] for p in data["points"]}) == list(NIGHTS)
    assert {p["amp"] for p in data["points"]} == {"A", "B"}
    # the verification limits: read noise + 5 %, per amplifier
    cam = load_camera(CAMERA)
    assert sorted(lim["value"] for lim in data["limits"]) == pytest.approx(
        sorted(a.read_noise * 1.05 for a in cam.detector(4).amplifiers))
    assert out.read_bytes()[:4] == b"\x89PNG"
    res = _cli(store, "trend", "--type", "bias", "--metric", "nosuch")
    assert res.exit_code == 1 and "metrics recorded:" in res.output and "read_noise" in res.output


def test_night_report_and_artifacts(nights):
    store, reg, summaries, bad = nights
    page = store.root / "reports" / CAMERA / NIGHTS[1] / "index.html"
    assert summaries[NIGHTS[1]]["report"] == str(page)
    text = page.read_text()
    assert bad in text and "outlier against the last good master" in text
    assert "AMP_SCATTER" in text and "Held back" in text
    for src in re.findall(r"<img [^>]*src='([^']+)'", text):
        assert (page.parent / src).resolve().exists(), src
    assert len(re.findall(r"class='mosaic'", text)) == 3 and "trend-bias-read_noise.png" in text
    index = (store.root / "reports" / CAMERA / "index.html").read_text()
    assert all(f"{n}/index.html" in index for n in NIGHTS)
    res = _cli(store, "report", "--night", NIGHTS[1])
    assert res.exit_code == 0 and res.stdout.strip() == str(page)
    res = _cli(store, "report", "--night", "2027-01-01")
    assert res.exit_code == 1 and "nights with a report: " + ", ".join(NIGHTS) in res.output


def test_artifact_keys_carry_the_filter_and_embed_the_mosaic(nights, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            like_=f"flat-r-{CAMERA.replace('_', '-')}-{NIGHTS[1]}")))
    kinds = {a.key: a for a in arts}
    mosaic = kinds[f"flat-r-{CAMERA.replace('_', '-')}-{NIGHTS[1]}-mosaic"]
    assert "![mosaic of flat r](data:image/png;base64,iVBORw0KGgo" in mosaic.data
    assert "held back: detector 4" in mosaic.data and "file://" not in mosaic.data
    table = kinds[f"flat-r-{CAMERA.replace('_', '-')}-{NIGHTS[1]}"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["status"] for r in rows} == {"certified", "candidate"}
    assert all(r["noise"] is not None and r["clipped fraction"] is not None for r in rows)
    # the nightly's artifact: the exclusion with its reason, what was held back and why, the report's place
    store, _, _, bad = nights
    with get_client(sync_client=True) as client:
        (night,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"nightly-{CAMERA.replace('_', '-')}-{NIGHTS[1]}"])))
    assert f"excluded {bad}: screened out: detector {BAD_DET}: outlier against the last good master" in night.data
    assert f"held back det {BAD_DET}: AMP_SCATTER" in night.data
    assert f"Night report: `{store.root / 'reports' / CAMERA / NIGHTS[1] / 'index.html'}`" in night.data


def test_the_night_report_in_a_real_browser(nights, tmp_path):
    """The report served on 127.0.0.1 (as `calibflow report --serve` does), in headless Chromium:
    every picture - the three mosaics, the focal-plane maps and the trends over three nights - has
    loaded (natural width > 0)."""
    import functools
    import http.server
    import threading

    from tests.test_deployments_server import _browser, _loaded_images

    store, reg, summaries, _ = nights
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(store.root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    driver = _browser()
    try:
        driver.get(f"http://127.0.0.1:{httpd.server_address[1]}/reports/{CAMERA}/{NIGHTS[2]}/index.html")
        imgs = _loaded_images(driver, timeout=60)
        driver.save_screenshot(str(tmp_path / "night3.png"))
        driver.get(f"http://127.0.0.1:{httpd.server_address[1]}/reports/{CAMERA}/{NIGHTS[1]}/index.html")
        imgs2 = _loaded_images(driver, timeout=60)
        driver.save_screenshot(str(tmp_path / "night2.png"))
    finally:
        driver.quit()
        httpd.shutdown()
    assert len(imgs) == 3 and all(w > 0 for _, w in imgs), imgs          # bias: mosaic, map, trend
    assert len(imgs2) == 9 and all(w > 0 for _, w in imgs2), imgs2       # bias, dark, flat: 3 each
    trend = json.loads((store.root / "reports" / CAMERA / NIGHTS[2] / "trend-bias-read_noise.json").read_text())
    assert sorted({p["calib_date"] for p in trend["points"]}) == list(NIGHTS)


def test_an_empty_night_or_unknown_camera_is_not_a_success(nights):
    """The nightly flow as a schedule runs it (not through the CLI, which refuses before starting it): a
    night with nothing ingested and an unknown camera end Failed with a message that says why; with
    ``allow_empty`` (cameras that do not observe every night) an empty night completes and says so."""
    from flows.nightly import NightlyPolicy, nightly

    store, reg, _, _ = nights
    state = nightly(night="2026-10-01", camera=CAMERA, repo=str(store.root), return_state=True)
    assert state.is_failed() and "night 2026-10-01: no exposures of camera democam_mini" in state.message, state
    state = nightly(night=NIGHTS[0], camera="nosuchcam", repo=str(store.root), return_state=True)
    assert state.is_failed() and "nosuchcam" in state.message, state
    summary = nightly(night="2026-10-01", camera=CAMERA, repo=str(store.root), policy=NightlyPolicy(allow_empty=True))
    assert summary["state"] == "empty night (accepted)" and summary["steps"] == []
