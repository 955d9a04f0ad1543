"""The simulator's sky-frame truth terms, recomputed in the test from the records it writes: the
large-scale gradient G_j (up to gradient_amplitude, 2-D quadratic), the multi-scale sky pattern P_f,
the bad exposures (cloud, trail, glow) and held-out exposures (first_sequence)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits

from calib_core.io.raw import read_raw
from calib_core.simulate.night import simulate_night
from tests._raw import corrected

CAMERA = "democam_mini"


def fp_grid(camera, det):
    x, y = np.meshgrid(np.arange(det.nx, dtype=float), np.arange(det.ny, dtype=float))
    return camera.pixel_to_focal_plane(det, x, y)


def gradient_brute(camera, det, g):
    u, v = fp_grid(camera, det)
    w = (u * math.cos(g["theta"]) + v * math.sin(g["theta"])) / g["r_fp_mm"]
    wp = (-u * math.sin(g["theta"]) + v * math.cos(g["theta"])) / g["r_fp_mm"]
    return 1 + g["c1"] * w + g["c2"] * w ** 2 + g["c3"] * wp ** 2


def defect_brute(camera, det, kind, par):
    """(multiplicative, additive) maps written out from the docstring's formulas."""
    u, v = fp_grid(camera, det)
    one, zero = np.ones(u.shape), np.zeros(u.shape)
    if kind == "cloud":
        c = sum(a * np.cos(2 * np.pi * (ku * u + kv * v) + ph)
                for a, ku, kv, ph in zip(par["amp"], par["ku"], par["kv"], par["phase"]))
        return 1 + c, zero
    if kind == "trail":
        d = -(u - par["u0"]) * math.sin(par["angle"]) + (v - par["v0"]) * math.cos(par["angle"])
        return one, (par["core_peak"] * np.exp(-d ** 2 / (2 * par["core_sigma_mm"] ** 2))
                     + par["wing_peak"] * np.exp(-d ** 2 / (2 * par["wing_sigma_mm"] ** 2)))
    assert kind == "glow"
    r2 = (u - par["u0"]) ** 2 + (v - par["v0"]) ** 2
    return one, par["peak"] / (1 + r2 / par["scale_mm"] ** 2)


def residual_blocks(night, e, det, raw, model_in_sky_units):
    """Flat-fielded data / S_j - model, median of 8x8 blocks, and the noise of such a block."""
    tr = night.exposure_truth(e.exposure_id)
    rbar = night.flat_reference(e.filter)
    flat = night.truth_flat(e.filter, det.id)
    img = corrected(raw.detectors[det.id]) - night.truth_bias(det.id) - night.truth_dark(det.id) * e.darktime
    good = flat > 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        resid = img / (rbar * flat) / tr["sky_level"] - model_in_sky_units
    resid[~good] = np.nan
    blocks = np.nanmedian(resid.reshape(det.ny // 8, 8, det.nx // 8, 8), axis=(1, 3))
    noise = 1.2533 / np.sqrt(64 * tr["sky_level"] * rbar * 1.6)
    return blocks, noise


def robust_spread(a):
    return 1.4826 * np.nanmedian(np.abs(a - np.nanmedian(a)))


# --------------------------------------------------------------------------------------------------
# gradient
# --------------------------------------------------------------------------------------------------


def test_gradient_up_to_the_amplitude_in_two_dimensions(tmp_path):
    kw = dict(n_bias=0, n_dark=0, n_flat=0, n_science=8, filters=("r",))
    night = simulate_night(CAMERA, tmp_path / "a", seed=8, gradient_amplitude=0.10, **kw)
    cam = night.camera
    worst = []
    for e in night.select("science"):
        g = night.exposure_truth(e.exposure_id)["gradient"]
        assert set(g) >= {"theta", "c1", "c2", "c3", "r_fp_mm", "max_abs_bound", "amplitude"}
        assert g["amplitude"] == 0.10 and g["c3"] != 0.0
        assert g["max_abs_bound"] == pytest.approx(g["c1"] + max(abs(g["c2"]), abs(g["c3"])))
        assert 0.05 - 1e-12 <= g["max_abs_bound"] <= 0.10 + 1e-12
        dev = 0.0
        for det in cam.detectors:
            brute = gradient_brute(cam, det, g)
            np.testing.assert_allclose(night.gradient(e.exposure_id, det.id), brute, atol=1e-6)
            dev = max(dev, np.abs(brute - 1).max())
        assert dev <= g["max_abs_bound"] + 1e-9
        worst.append(dev)
    assert max(worst) > 0.04         # the gradients are of the size asked for, not negligible

    # the raw pixels carry G (c3 included): flat-fielded data / S - G P - phi F is noise, and leaving
    # the perpendicular quadratic term out of G is not (checked on the exposure where it is largest)
    e = max(night.select("science"), key=lambda x: abs(night.exposure_truth(x.exposure_id)["gradient"]["c3"]))
    g = night.exposure_truth(e.exposure_id)["gradient"]
    assert abs(g["c3"]) > 0.01
    raw = read_raw(e.path, cam)
    off = []
    for det in cam.detectors:
        model = gradient_brute(cam, det, g) * night.truth_sky("r", det.id)
        blocks, noise = residual_blocks(night, e, det, raw, model)
        assert abs(np.nanmedian(blocks)) < 0.003 and robust_spread(blocks) < 1.3 * noise + 0.001, det.name
        wrong = gradient_brute(cam, det, dict(g, c3=0.0)) * night.truth_sky("r", det.id)
        b2, _ = residual_blocks(night, e, det, raw, wrong)
        off.append(abs(np.nanmedian(b2)))
    assert max(off) > 0.005

    # the default keeps the legacy ranges, and the objects do not depend on the gradient option
    legacy = simulate_night(CAMERA, tmp_path / "b", seed=8, detectors=[0], **kw)
    for e, el in zip(night.select("science"), legacy.select("science")):
        gl = legacy.exposure_truth(el.exposure_id)["gradient"]
        assert gl["c3"] == 0.0 and 0 <= gl["c1"] <= 0.08 and abs(gl["c2"]) <= 0.03 and gl["amplitude"] is None
        objs = [o for o in night.exposure_truth(e.exposure_id)["objects"] if o["detector"] == "ccd00"]
        assert [o["flux"] for o in legacy.exposure_truth(el.exposure_id)["objects"]] == [o["flux"] for o in objs]
    with pytest.raises(ValueError, match="gradient_amplitude"):
        simulate_night(CAMERA, tmp_path / "c", gradient_amplitude=0.7, **kw)


# --------------------------------------------------------------------------------------------------
# sky pattern
# --------------------------------------------------------------------------------------------------


def test_sky_pattern_recomputed_from_its_parameters(tmp_path):
    """P_f from static.json's parameters and the docstring's formula (waves, ghost ring, ripples,
    peaks, edge glow, / N_P) equals the truth file, and each term is of the documented size."""
    night = simulate_night("minimosaic", tmp_path, seed=6, n_bias=0, n_dark=0, n_flat=0, n_science=0,
                           filters=("r",))
    cam = night.camera
    static = night.static_truth
    par = static["sky_pattern"]["r"]
    norm = static["sky_norm"]["r"]
    assert len(par["ripple_amp"]) == 2 and len(par["peaks"]) == 2
    for ku, kv, a in zip(par["ripple_ku"], par["ripple_kv"], par["ripple_amp"]):
        assert 2.0 <= 1 / math.hypot(ku, kv) <= 4.0 and 0.003 <= a <= 0.006
    for pk in par["peaks"]:
        assert 0.03 <= pk["amplitude"] <= 0.06 and 30 <= pk["sigma_mm"] / 0.015 <= 80
    n_glow = sum(len(v) for v in par["edge_glow"].values())
    assert n_glow >= 2
    total, count = 0.0, 0
    for det in cam.detectors:
        u, v = fp_grid(cam, det)
        p = 1 + sum(a * np.cos(2 * np.pi * (ku * u + kv * v) + ph)
                    for a, ku, kv, ph in zip(par["amp"], par["ku"], par["kv"], par["phase"]))
        rho = np.hypot(u - par["ghost_u"], v - par["ghost_v"])
        p += par["ghost_amplitude"] * np.exp(-(rho - par["ghost_radius_mm"]) ** 2 / (2 * par["ghost_width_mm"] ** 2))
        p += sum(a * np.cos(2 * np.pi * (ku * u + kv * v) + ph) for a, ku, kv, ph in
                 zip(par["ripple_amp"], par["ripple_ku"], par["ripple_kv"], par["ripple_phase"]))
        for pk in par["peaks"]:
            p += pk["amplitude"] * np.exp(-((u - pk["u"]) ** 2 + (v - pk["v"]) ** 2) / (2 * pk["sigma_mm"] ** 2))
        yy, xx = np.mgrid[:det.ny, :det.nx]
        dist = {"x0": xx, "x1": det.nx - 1 - xx, "y0": yy, "y1": det.ny - 1 - yy}
        for gl in par["edge_glow"][det.name]:
            assert 0.01 <= gl["amplitude"] <= 0.04 and 20 <= gl["scale_px"] <= 60
            p += gl["amplitude"] * np.exp(-dist[gl["edge"]] / gl["scale_px"])
        truth = night.truth_sky("r", det.id)
        np.testing.assert_allclose(truth, p / norm, atol=2e-5, err_msg=det.name)
        total += truth.sum(dtype=np.float64)
        count += truth.size
        # edge glow: the edge rows/columns named glow above the ones 200 px in by ~ its amplitude
        for gl in par["edge_glow"][det.name]:
            axis = 1 if gl["edge"][0] == "x" else 0
            prof = truth.mean(axis=1 - axis)
            edge, inner = (prof[0], prof[200]) if gl["edge"][1] == "0" else (prof[-1], prof[-201])
            assert edge - inner > 0.5 * gl["amplitude"] - 0.01
    assert total / count == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# bad exposures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_night(tmp_path_factory):
    return simulate_night(CAMERA, tmp_path_factory.mktemp("bad"), seed=9, n_bias=0, n_dark=0, n_flat=0,
                          n_science=5, filters=("r", "z"), bad_exposures=("cloud", "trail", "glow"),
                          gradient_amplitude=0.08)


def test_bad_exposures_are_chosen_and_recorded(bad_night):
    records = json.loads((bad_night.truth_dir / "exposures.json").read_text())
    for f in ("r", "z"):
        sci = [r for r in records if r["obs_type"] == "science" and r["filter"] == f]
        kinds = [r["defect"] for r in sci]
        assert sorted(k for k in kinds if k) == ["cloud", "glow", "trail"]
        assert kinds[0] is None and kinds.count(None) == 2
        for r in sci:
            assert (r["defect_params"] is None) == (r["defect"] is None)
            assert bad_night.defect(r["exposure_id"]) == r["defect"]
    night_json = json.loads((bad_night.truth_dir / "night.json").read_text())
    assert night_json["bad_exposures"] == ["cloud", "trail", "glow"]
    with pytest.raises(ValueError, match="n_science"):
        simulate_night(CAMERA, bad_night.out_dir.parent / "x", n_science=3, bad_exposures="cloud,trail,glow")
    with pytest.raises(ValueError, match="unknown bad_exposures"):
        simulate_night(CAMERA, bad_night.out_dir.parent / "x", n_science=3, bad_exposures=("fog",))


def test_bad_exposure_pixels_match_their_defect(bad_night):
    """Per bad exposure: the defect maps from its parameters (written out here) match the accessor;
    flat-fielded pixels / S_j minus the full model are noise, and minus the model without the defect
    they are not; the defect has the documented size."""
    cam = bad_night.camera
    checked = set()
    for e in bad_night.select("science", "r"):
        tr = bad_night.exposure_truth(e.exposure_id)
        kind, par = tr["defect"], tr["defect_params"]
        if kind is None:
            continue
        raw = read_raw(e.path, cam)
        realised = []
        for det in cam.detectors:
            mult, add = defect_brute(cam, det, kind, par)
            m_acc, a_acc = bad_night.defect_maps(e.exposure_id, det.id)
            np.testing.assert_allclose(mult, 1 if m_acc is None else m_acc, atol=2e-6)
            np.testing.assert_allclose(add, 0 if a_acc is None else a_acc, atol=2e-6)
            base = gradient_brute(cam, det, tr["gradient"]) * bad_night.truth_sky("r", det.id)
            blocks, noise = residual_blocks(bad_night, e, det, raw, base * mult + add)
            assert abs(np.nanmedian(blocks)) < 0.003 and robust_spread(blocks) < 1.3 * noise + 0.001, \
                (kind, det.name)
            sky = bad_night.sky_model(e.exposure_id, det.id) / tr["sky_level"]
            np.testing.assert_allclose(sky, base * mult + add, atol=1e-5)
            realised.append(mult - 1 if kind == "cloud" else add)
        realised = np.concatenate([r.ravel() for r in realised])
        if kind == "cloud":
            assert 0.025 < realised.std() < 0.10 and 0.03 <= par["rms"] <= 0.08
        elif kind == "trail":
            assert 0.3 <= realised.max() <= 1.0 + 0.01       # the core crosses the focal plane
            assert 1.5 <= par["core_sigma_mm"] / 0.015 <= 2.5 and 40 <= par["wing_sigma_mm"] / 0.015 <= 80
            assert 0.005 <= par["wing_peak"] <= 0.01
            # the wings: over 20..60 px from the line
            assert ((realised > 0.003) & (realised < 0.011)).mean() > 0.01
        else:
            assert 0.03 <= par["peak"] <= 0.10 and 300 <= par["scale_mm"] / 0.015 <= 1000
            assert realised.max() >= 0.8 * par["peak"] - 1e-6 and realised.max() - realised.min() > 0.01
        checked.add(kind)
        # the defect is seen: leaving it out of the model leaves structure well above the noise
        big = max(cam.detectors, key=lambda d: np.ptp(realised.reshape(len(cam.detectors), -1)[cam.detectors.index(d)]))
        base = gradient_brute(cam, big, tr["gradient"]) * bad_night.truth_sky("r", big.id)
        blocks, noise = residual_blocks(bad_night, e, big, raw, base)
        assert np.nanmax(np.abs(blocks - np.nanmedian(blocks))) > 8 * noise, kind
    assert checked == {"cloud", "trail", "glow"}


# --------------------------------------------------------------------------------------------------
# held-out exposures
# --------------------------------------------------------------------------------------------------


def test_held_out_exposures_share_the_instrument_not_the_draws(tmp_path):
    kw = dict(seed=12, n_bias=1, n_dark=0, n_flat=1, n_science=4, filters=("r",), detectors=[0, 4],
              gradient_amplitude=0.1, bad_exposures=("glow",))
    first = simulate_night(CAMERA, tmp_path / "a", night="2026-11-20", **kw)
    held = simulate_night(CAMERA, tmp_path / "b", night="2026-11-21", first_sequence=1000, **kw)
    assert held.first_sequence == 1000
    assert [e.exposure_id for e in held.exposures][:2] == ["202611211001", "202611211002"]
    assert not {e.exposure_id for e in first.exposures} & {e.exposure_id for e in held.exposures}
    for det in (0, 4):
        for kind, f in (("bias", None), ("dark", None), ("flat", "r"), ("qe", "r"), ("sky", "r")):
            a = fits.getdata(first.truth_path(kind, det, f))
            b = fits.getdata(held.truth_path(kind, det, f))
            assert np.array_equal(a, b), (kind, det)
    sa, sb = first.select("science"), held.select("science")
    ga = [first.exposure_truth(e.exposure_id)["gradient"]["c1"] for e in sa]
    gb = [held.exposure_truth(e.exposure_id)["gradient"]["c1"] for e in sb]
    assert not set(ga) & set(gb)
    la = [first.exposure_truth(e.exposure_id)["sky_level"] for e in sa]
    lb = [held.exposure_truth(e.exposure_id)["sky_level"] for e in sb]
    assert not set(la) & set(lb)
    for ea, eb in zip(first.exposures, held.exposures):
        with fits.open(ea.path) as ha, fits.open(eb.path) as hb:
            assert not np.array_equal(ha[1].data, hb[1].data)
    assert SimulatedNightLoad(held.out_dir).first_sequence == 1000
    # same call again: the same bytes
    again = simulate_night(CAMERA, tmp_path / "c", night="2026-11-21", first_sequence=1000, **kw)
    for eb, ec in zip(held.exposures, again.exposures):
        assert eb.path.read_bytes() == ec.path.read_bytes()


def SimulatedNightLoad(path):
    from calib_core.simulate.night import SimulatedNight

    return SimulatedNight.load(path)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def test_cli_simulate_gradient_bad_exposures_first_sequence(tmp_path):
    from typer.testing import CliRunner

    from calibflow.cli import app

    runner = CliRunner()
    args = ["simulate", "--camera", CAMERA, "--out", str(tmp_path / "sim"), "--seed", "3", "--n-bias", "0",
            "--n-dark", "0", "--n-flat", "0", "--n-science", "3", "--filters", "r"]
    res = runner.invoke(app, args + ["--gradient-amplitude", "0.1", "--bad-exposures", "cloud,trail",
                                     "--first-sequence", "50"])
    assert res.exit_code == 0, res.output
    records = json.loads((tmp_path / "sim" / "truth" / "exposures.json").read_text())
    assert [r["exposure_id"] for r in records] == ["202611200051", "202611200052", "202611200053"]
    assert records[0]["defect"] is None and sorted(r["defect"] for r in records[1:]) == ["cloud", "trail"]
    assert all(r["gradient"]["amplitude"] == 0.1 and r["gradient"]["max_abs_bound"] <= 0.1 for r in records)
    res = runner.invoke(app, args + ["--bad-exposures", "fog"])
    assert res.exit_code == 1 and "unknown bad_exposures" in res.output
