"""The nightly flow end to end on a simulated democam_mini night (bias, dark, flats and sky frames in
r and z, a fringe frame in z) under the session's Prefect API: dependency order, products against the
simulator's truth, provenance, idempotence, ``calibs --json`` and ``apply-sky``."""

import json

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import uniform_filter
from typer.testing import CliRunner

from calib_core.background import BackgroundModel
from calib_core.camera import load_camera
from calib_core.fringe import FringeConfig, prepare_fringe
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.products import read_product
from calib_core.registry.calibs import calib_inputs, list_calibs
from calib_core.simulate import simulate_night
from calib_core.skyquality import detrend
from tests._repos import ingested_repo

NIGHT = "2026-11-22"
CAMERA = "democam_mini"


@pytest.fixture(scope="module")
def night(tmp_path_factory, prefect_api):
    from flows.nightly import nightly

    root = tmp_path_factory.mktemp("night")
    cam = load_camera(CAMERA)
    sim = simulate_night(cam, root / "sim", seed=5, night=NIGHT, n_bias=5, n_dark=4, n_flat=4, n_science=8,
                         filters=("r", "z"))
    store, reg = ingested_repo(root / "repo", root / "sim" / "raw", CAMERA)
    summary = nightly(night=NIGHT, camera=CAMERA, repo=str(store.root))
    return sim, store, reg, summary


def test_nightly_builds_everything_in_dependency_order(night):
    sim, store, reg, summary = night
    steps = [(s["type"], s["filter"], s["action"]) for s in summary["steps"]]
    assert steps == [("bias", None, "built"), ("dark", None, "built"), ("flat", "r", "built"), ("flat", "z", "built"),
                     ("fringe", "z", "built"), ("sky", "r", "built"), ("sky", "z", "built")]
    assert summary["created"] == 7 * 9
    # each build's ISR used the products certified before it (the registry lookup)
    flat_meta = json.loads(next(store.root.glob("work/democam_mini/flat/*-det004-*.json")).read_text())
    assert set(flat_meta["isr_calibs"]) == {"bias", "dark"}
    dark_ids = {c["calib_id"] for c in list_calibs(reg, calib_type="dark")}
    assert flat_meta["isr_calibs"]["dark"] in dark_ids
    z_sky = [json.loads(p.read_text()) for p in store.root.glob("work/democam_mini/sky/*-det004-*.json")]
    z_sky = [m for m in z_sky if "fringe" in m["isr_calibs"]]
    assert len(z_sky) == 8          # the z exposures were defringed with the night's fringe frame, r ones not
    assert all(m["isr_calibs"]["flat"].startswith("flat-democam_mini-z-") for m in z_sky)


def test_second_run_builds_nothing(night):
    from flows.nightly import nightly

    sim, store, reg, _ = night
    before = list_calibs(reg)
    again = nightly(night=NIGHT, camera=CAMERA, repo=str(store.root))
    assert again["created"] == 0
    assert {s["action"] for s in again["steps"]} == {"existing"}
    assert list_calibs(reg) == before


def test_fringe_frame_matches_noiseless_expectation_within_noise(night):
    """The fringe frame against what the same preparation gives on the simulator's noiseless sky.

    The expectation: for each z exposure j, the incident sky S_j (G_j P + phi_j F) without noise or
    objects (flat-fielded data are proportional to it), prepared exactly as the build does (level,
    128-px background, normalisation), averaged over j. It is not F alone: the 128-px background
    leaves the sky pattern's shorter waves (50-300 px) in the frame, as it would in the reference.
    Tolerance: the difference must be white noise at the level the error budget predicts. Per pixel
    it has the stack's noise (the product's variance plane, ~sqrt(1/S)/sqrt(N) ~ 0.6 %) and the
    z flat's (its variance plane, ~0.35 %: the same flat divides every input, so that part does not
    average down); their quadrature sum is ~0.7 % and the RMS must stay within 1.3x of it (the
    spread-based variance of a clipped mean of 8 values runs ~5 % low, bias and dark add a little).
    No structure: smoothed over 16 px the difference must be below 15 % of the fringe RMS (measured
    5-11 %; white noise alone gives ~4 %).
    """
    sim, store, reg, _ = night
    z = [e for e in sim.exposures if e.obs_type == "science" and e.filter == "z"]
    cfg = FringeConfig()
    for product in list_calibs(reg, calib_type="fringe"):
        det = product["detector"]
        mi, header = read_product(product["path"])
        assert header["OBSTYPE"] == "fringe" and header["NCOMBINE"] == 8
        expected = []
        for e in z:
            clean = sim.sky_model(e.exposure_id, det).astype(np.float32)
            m = MaskedImage(clean, np.zeros(clean.shape, np.int32), clean.copy())
            expected.append(prepare_fringe(m, cfg)[0].image)
        expected = np.mean(expected, axis=0)
        flat = read_product(list_calibs(reg, calib_type="flat", filter="z", detector=det)[0]["path"])[0]
        good = (mi.mask & mask_bits(["BAD", "SAT", "DETECTED", "NO_DATA"])) == 0
        diff = (mi.image - expected)[good]
        noise = float(np.hypot(np.median(np.sqrt(mi.variance[good])),
                               np.median(np.sqrt(flat.variance[good]) / flat.image[good])))
        assert abs(diff.mean()) < 0.1 * noise
        assert diff.std() < 1.3 * noise, (det, diff.std(), noise)
        truth = sim.truth_fringe("z", det)
        smooth = uniform_filter(np.where(good, mi.image - expected, 0.0), 16)
        assert smooth[good].std() < 0.15 * truth.std(), (det, smooth[good].std())
        # and the fringes are there: the frame correlates with the injected pattern F
        assert np.corrcoef(mi.image[good], truth[good])[0, 1] > 0.5


def _binned_truth(model: BackgroundModel, image: np.ndarray) -> np.ndarray:
    xe, ye = model.x_edges, model.y_edges
    return np.array([[image[ye[j]:ye[j + 1], xe[i]:xe[i + 1]].mean() for i in range(len(xe) - 1)]
                     for j in range(len(ye) - 1)])


def test_sky_frame_r_matches_injected_pattern(night):
    """The r-band sky frame (no fringes) against the injected pattern P, both binned to the frame's
    32-px bins and detrended per detector (the focal-plane model removes structure on the scale
    of a cell, as large as a detector here). The in-memory build reaches the noise floor
    (tests/test_sky.py); through ISR, masking and the focal-plane model of a simulated night the
    residual is set by what the focal-plane cells absorb, not by noise (bin errors ~0.1 % against
    a 1-2 % pattern): measured over detectors, correlation 0.91-0.999 (median 0.99) and residual
    RMS 4-42 % (median 12 %) of the pattern's; the worst is the central detector, whose ghost ring
    (radius 150-250 px) the cells partly take. Tolerances: median correlation > 0.97 and residual
    median < 20 %, every detector correlation > 0.85 and residual < 50 %.
    """
    sim, store, reg, _ = night
    products = list_calibs(reg, calib_type="sky", filter="r")
    assert len(products) == 9
    corr, resid = [], []
    for product in products:
        frame = BackgroundModel.from_fits(product["path"])
        hdr = fits.getheader(product["path"])
        assert hdr["OBSTYPE"] == "sky" and hdr["NCOMBINE"] >= 5 and "CALIB_INPUT_SCALE_0" in hdr
        a = detrend(frame.values)
        b = detrend(_binned_truth(frame, sim.truth_sky("r", product["detector"])))
        ok = np.isfinite(a)
        assert ok.mean() > 0.95
        corr.append(np.corrcoef(a[ok], b[ok])[0, 1])
        resid.append(np.std((a - b)[ok]) / np.std(b[ok]))
    assert np.median(corr) > 0.97 and np.median(resid) < 0.2, (corr, resid)
    assert min(corr) > 0.85 and max(resid) < 0.5, (corr, resid)


def test_provenance_in_registry_and_headers(night):
    sim, store, reg, _ = night
    for product in list_calibs(reg):
        inputs = calib_inputs(reg, product["calib_id"])
        used = [i for i in inputs if i["used"]]
        assert len(used) == product["n_inputs"] > 0
        assert all(i["reason"] for i in inputs if not i["used"])     # every rejection says why
        assert product["config_hash"] and product["software_version"] and product["checksum"]
        if product["type"] == "sky":
            header = fits.getheader(product["path"])
        else:
            header = read_product(product["path"])[1]
        assert product["calib_id"] in header["CALIB_ID"]
        names = sorted(header[k] for k in header if k.startswith("CALIB_INPUT_") and "SCALE" not in k)
        assert names == sorted(i["exposure_id"] for i in used)
        assert header["CFG_HASH"] == product["config_hash"]
        if product["type"] in ("flat", "sky"):        # every input's scale is recorded
            assert all(i["scale"] and i["scale"] > 0 for i in used)


def test_calibs_json_and_apply_sky(night):
    from calibflow.cli import app

    sim, store, reg, _ = night
    runner = CliRunner()
    env = {"CALIBFLOW_REPO": str(store.root), "CALIBFLOW_REGISTRY_URL": ""}
    res = runner.invoke(app, ["calibs", "--json", "--type", "sky"], env=env)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 18
    for key in ("calib_id", "type", "filter", "detector", "calib_date", "valid_begin", "valid_end", "path",
                "n_inputs", "checksum"):
        assert all(key in r for r in rows), key

    exp = next(e for e in sim.exposures if e.obs_type == "science" and e.filter == "r")
    out = store.root.parent / "skysub"
    res = runner.invoke(app, ["apply-sky", exp.exposure_id, "--out", str(out), "--json"], env=env)
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    # the frame is in units of the exposure's sky: its fitted scale is the sky level
    assert got["scale"] == pytest.approx(got["sky_level"], rel=0.1)
    assert got["error"] < 0.05 * got["scale"]
    frames = {r["detector"]: BackgroundModel.from_fits(r["path"]) for r in rows if r["filter"] == "r"}
    before, after = [], []
    for det, path in got["outputs"].items():
        mi, header = read_product(path)
        assert header["SKYSCALE"] == pytest.approx(got["scale"])
        sky = frames[int(det)].evaluate()
        good = np.where((mi.mask & mask_bits(["BAD", "SAT", "DETECTED", "NO_DATA"])) == 0, 1.0, np.nan)
        for img, acc in ((mi.image + got["scale"] * sky, before), (mi.image, after)):
            ny, nx = img.shape
            b = np.nanmedian((img * good).reshape(ny // 32, 32, nx // 32, 32).swapaxes(1, 2).reshape(
                ny // 32, nx // 32, -1), axis=2)
            acc.append(detrend(b))
    rms_before = np.sqrt(np.nanmean(np.concatenate([b.ravel() for b in before]) ** 2))
    rms_after = np.sqrt(np.nanmean(np.concatenate([a.ravel() for a in after]) ** 2))
    assert rms_after < rms_before / 3, (rms_before, rms_after)

    bad = runner.invoke(app, ["apply-sky", sim.select("bias")[0].exposure_id], env=env)
    assert bad.exit_code == 1 and "not a science exposure" in bad.output
