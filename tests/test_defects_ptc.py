"""Defects and PTC (calib_core/builds/defects.py, calib_core/builds/ptc.py; docs/algorithms.md#defects,
docs/algorithms.md#photon-transfer-curve): the numerics against brute-force references and
synthetic truth, then the builds on a simulated democam_mini night with gains 3-5 % off the camera
file and injected bad pixels, against the simulator's truth."""

import datetime as dt
import math

import numpy as np
import pytest

from calib_core.builds.defects import (ORIGINS, DefectsConfig, ManualDefect, complete_columns, find_outliers,
                                       load_manual_defects, measure_defects)
from calib_core.builds.ptc import PairStats, PtcConfig, fit_ptc, make_pairs, overscan_noise, pair_stats
from calib_core.isr.process import interpolate_over
from calib_core.maskedimage import MASK_PLANES, MaskedImage

AMPS = [("A", 0, 200, 0, 100), ("B", 0, 200, 100, 200)]


def _mi(image):
    image = np.asarray(image, np.float32)
    return MaskedImage(image, np.zeros(image.shape, np.int32), np.zeros(image.shape, np.float32))


# ---------------------------------------------------------------------------------------------------
# defects: numerics
# ---------------------------------------------------------------------------------------------------


def test_outliers_per_amplifier_match_a_brute_force_threshold():
    """Each amp is cut at its own clipped mean +4.8 / -5.0 clipped sigma: amp B, twice as noisy,
    keeps a pixel that would be an outlier in amp A."""
    rng = np.random.default_rng(1)
    img = np.empty((200, 200))
    img[:, :100] = rng.normal(100, 1.0, (200, 100))
    img[:, 100:] = rng.normal(300, 2.0, (200, 100))
    img[10, 10], img[20, 20] = 110, 90          # A: +10 sigma, -10 sigma
    img[30, 150] = 308                          # B: +4 sigma of B (not flagged), +8 of A's scale
    img[40, 160] = 330                          # B: +15 sigma
    hot, cold = find_outliers(img, AMPS, 4.8, -5.0)
    # brute force: a numpy clip loop, as afw MEANCLIP (3 passes of 3 sigma), per amp
    expect_hot = np.zeros_like(hot)
    expect_cold = np.zeros_like(cold)
    for _, y0, y1, x0, x1 in AMPS:
        sub = img[y0:y1, x0:x1].ravel()
        keep = np.ones(sub.size, bool)
        med = np.median(sub)
        iqr = np.subtract(*np.percentile(sub, [75, 25]))
        centre, sd = med, 0.741 * iqr
        for _ in range(3):
            keep = np.abs(sub - centre) < 3 * sd
            centre, sd = sub[keep].mean(), sub[keep].std(ddof=1)
        expect_hot[y0:y1, x0:x1] = img[y0:y1, x0:x1] > centre + 4.8 * sd
        expect_cold[y0:y1, x0:x1] = img[y0:y1, x0:x1] < centre - 5.0 * sd
    assert hot[10, 10] and cold[20, 20] and hot[40, 160] and not hot[30, 150]
    assert (hot != expect_hot).sum() <= 1 and (cold != expect_cold).sum() <= 1


def test_column_completion_fills_between_bad_pixels_but_not_across_long_gaps():
    bad = np.zeros((300, 20), bool)
    bad[10:200:3, 5] = True          # 64 on-and-off pixels, gaps of 2 rows: filled 10..199
    bad[250:290, 5] = True           # after a 50-row gap (>= 30): a separate block
    bad[0:300:10, 9] = True          # only 30 bad pixels: below the 50-pixel threshold
    add = complete_columns(bad, threshold=50, gap=30)
    full = bad | add
    assert full[10:199, 5].all() and not full[200:250, 5].any() and full[250:290, 5].all()
    assert not add[:, 9].any() and add.sum() == (199 - 10 + 1) - 64


def test_measure_defects_keeps_every_origin_and_applies_manual_boxes_by_date(tmp_path):
    rng = np.random.default_rng(2)
    bias = _mi(rng.normal(0, 2, (200, 200)))
    dark = _mi(rng.normal(0.01, 0.001, (200, 200)))
    flat = _mi(rng.normal(1, 0.01, (200, 200)))
    bias.image[5, 5] = 40
    dark.image[6, 6] = 0.5
    flat.image[7, 7] = 0.5
    flat.image[100:, 50] = 0.0               # a dead column segment
    box = tmp_path / "manual.yaml"
    box.write_text("defects:\n- {detector: 3, x0: 150, y0: 150, width: 4, height: 2, "
                   "valid_from: 2026-01-01, valid_to: 2026-12-31, reason: scratch}\n"
                   "- {x0: 0, y0: 199, width: 200, height: 1, valid_to: 2025-12-31}\n")
    manual = load_manual_defects(box)
    cfg = DefectsConfig(edge_columns=1)
    origin = measure_defects(AMPS, bias=bias, dark=dark, flat=flat, config=cfg, detector=3,
                             calib_date=dt.date(2026, 6, 1), manual=manual)
    assert origin[5, 5] & ORIGINS["BIAS"] and origin[6, 6] & ORIGINS["DARK"]
    assert origin[7, 7] & ORIGINS["FLAT_COLD"] and (origin[100:, 50] & ORIGINS["FLAT_COLD"]).all()
    assert (origin[150:152, 150:154] & ORIGINS["MANUAL"]).all()
    assert not (origin[199, 60:90] & ORIGINS["MANUAL"]).any()      # expired box
    assert (origin[:, [0, 99, 100, 199]] & ORIGINS["EDGE"]).all() and not (origin[:, 1] & ORIGINS["EDGE"]).any()
    other = measure_defects(AMPS, flat=flat, config=DefectsConfig(), detector=4, calib_date=dt.date(2026, 6, 1),
                            manual=manual)
    assert not (other & ORIGINS["MANUAL"]).any()                   # another detector's box
    assert ManualDefect(x0=1, y0=1).applies(0, None)
    # a file-wide validity applies to the boxes that have none of their own
    box.write_text('{"valid_to": "2026-01-31", "defects": [{"x0": 3, "y0": 3}, {"x0": 4, "y0": 4, '
                   '"valid_to": "2026-12-31"}]}')
    whole = load_manual_defects(box.rename(tmp_path / "manual.json"))
    assert [b.applies(0, dt.date(2026, 6, 1)) for b in whole] == [False, True]


def test_interpolation_bridges_a_bad_row_along_columns_when_asked():
    y, x = np.mgrid[0:40, 0:40].astype(np.float32)
    truth = 3 * x + 5 * y
    bad_bit = MASK_PLANES.bit("BAD")
    for along, row_ok in (("row", False), ("shorter", True), ("column", True)):
        mi = _mi(truth.copy())
        mi.image[20, :] = -1e6
        mi.image[5:15, 7] = -1e6                  # a bad column segment
        mi.mask[20, :] |= bad_bit
        mi.mask[5:15, 7] |= bad_bit
        interpolate_over(mi, bad_bit, along)
        # a linear ramp is bridged exactly along either axis; a fully bad row only along columns
        assert np.allclose(mi.image[5:15, 7], truth[5:15, 7], atol=1e-3)
        assert np.allclose(mi.image[20], truth[20], atol=1e-3) == row_ok


# ---------------------------------------------------------------------------------------------------
# PTC: numerics against synthetic flats of known gain
# ---------------------------------------------------------------------------------------------------


def _flat_pair(rng, level_e, gain, rn_e, response):
    out = []
    for _ in range(2):
        e = rng.poisson(level_e * response).astype(np.float64)
        out.append(_mi((e + rng.normal(0, rn_e, e.shape)) / gain))
    return out


def _pair_stats_numpy(im1, im2, amps, config):
    """pair_stats' (mu1, mu2, var, n_used) per amp as computed before its numba MEANCLIP (commit
    256320a): calib_core.stats.clipped.clipped_mean, the NumPy reference, on the good pixels."""
    from calib_core.stats.clipped import clipped_mean

    ignore = np.int32(MASK_PLANES.bits(config.mask_planes))
    out = []
    for _, y0, y1, x0, x1 in amps:
        a = im1.image[y0:y1, x0:x1].astype(np.float64)
        b = im2.image[y0:y1, x0:x1].astype(np.float64)
        m = im1.mask[y0:y1, x0:x1] | im2.mask[y0:y1, x0:x1]
        good = ((m & ignore) == 0) & np.isfinite(a) & np.isfinite(b)
        kw = {"nsigma": config.nsigma, "niter": config.niter}
        mu1 = clipped_mean(a[good], **kw).mean
        mu2 = clipped_mean(b[good], **kw).mean
        mu = 0.5 * (mu1 + mu2)
        st = clipped_mean((mu2 * a[good] - mu1 * b[good]) / mu, **kw)
        out.append((mu1, mu2, 0.5 * st.variance, st.n_used))
    return out


@pytest.mark.parametrize("nsigma, niter", [(5.5, 3), (3.0, 1), (2.5, 5)])
def test_pair_stats_match_the_numpy_reference(nsigma, niter):
    """pair_stats' numba MEANCLIP gives the NumPy reference's means, variance and count to float64
    rounding (1e-12), on flats with cosmic rays, hot pixels, NaNs and masked pixels, for several clips."""
    rng = np.random.default_rng(4)
    ims = []
    for lev in (15000.0, 15150.0):
        img = rng.poisson(lev * (1 + 0.01 * rng.standard_normal((200, 200)))) + rng.normal(0, 5, (200, 200))
        hit = rng.random(img.shape) < 0.002
        img[hit] += rng.uniform(500, 20000, hit.sum())            # cosmic rays, hot pixels
        img[rng.random(img.shape) < 0.001] = np.nan
        mi = _mi(img)
        mi.mask[rng.random(img.shape) < 0.01] |= MASK_PLANES.bit("BAD")
        ims.append(mi)
    cfg = PtcConfig(nsigma=nsigma, niter=niter, min_good_pixels=100)
    ref = _pair_stats_numpy(ims[0], ims[1], AMPS, cfg)
    got = pair_stats(ims[0], ims[1], AMPS, 1.0, cfg)
    for st, (mu1, mu2, var, n_used) in zip(got, ref):
        assert st.mu1 == pytest.approx(mu1, rel=1e-12) and st.mu2 == pytest.approx(mu2, rel=1e-12)
        assert st.var == pytest.approx(var, rel=1e-12) and st.npix == n_used


@pytest.mark.parametrize("levels", [(20000.0,), (5000.0, 40000.0), (3000.0, 8000.0, 15000.0, 30000.0, 60000.0)])
def test_ptc_gain_within_its_error_of_the_truth(levels):
    """Synthetic flats: Poisson electrons over a 1 % response pattern, read noise, gain 1.6 (amp A)
    and 2.3 (amp B). The fitted gain lies within 3.5 of its own errors of the truth, and that error
    is the size the pixel count implies (sqrt(2 / npix) per pair)."""
    rng = np.random.default_rng(7)
    response = 1 + 0.01 * rng.standard_normal((200, 200))
    gains = {"A": 1.6, "B": 2.3}
    gmap = np.where(np.arange(200)[None, :] < 100, gains["A"], gains["B"]) * np.ones((200, 1))
    rn_e = 5.0
    points = {"A": [], "B": []}
    for lev in levels:
        for _ in range(2):                       # two pairs per level
            im = []
            for _ in range(2):
                e = rng.poisson(lev * response)
                im.append(_mi((e + rng.normal(0, rn_e, e.shape)) / gmap))
            for st in pair_stats(im[0], im[1], AMPS, lev / 1000, PtcConfig()):
                points[st.amp].append(st)
    for amp, g in gains.items():
        fit = fit_ptc(points[amp], rn_e / g, PtcConfig())
        assert fit.fit_type == {1: "SINGLE", 2: "LINEAR", 5: "EXPAPPROXIMATION"}[len(levels)]
        expected_err = g / math.sqrt(2 * len(levels)) * math.sqrt(2 / 20000) * (1.5 if len(levels) == 5 else 1.0)
        assert fit.gain_err < 3 * expected_err
        assert abs(fit.gain - g) < 3.5 * fit.gain_err, (amp, fit.gain, fit.gain_err)
        # the overscan noise (ADU, given) in electrons by the measured gain
        assert fit.noise_overscan == pytest.approx(rn_e / g * fit.gain, rel=1e-9)
        if len(levels) > 1:
            assert abs(fit.noise_var_fit - rn_e ** 2) < 3.5 * fit.noise_var_fit_err


def test_ptc_turnoff_leaves_out_saturated_levels():
    rng = np.random.default_rng(3)
    pts = []
    for mu in (2000, 5000, 10000, 20000, 30000, 40000):
        pts.append(PairStats("A", mu / 1000, mu, mu, mu / 1.5 + 9 + rng.normal(0, mu / 1.5 * 0.005), 20000))
    for mu in (45000, 47000):                   # past full well: the variance collapses
        pts.append(PairStats("A", mu / 1000, mu, mu, 3000.0, 20000, saturated=0.2))
    fit = fit_ptc(pts, 3.0, PtcConfig())
    assert fit.turnoff == 40000 and fit.n_used == 6 and fit.used == [True] * 6 + [False] * 2
    assert abs(fit.gain - 1.5) < 4 * fit.gain_err


def test_pairs_are_matched_by_exposure_time_and_filter():
    items = [{"exptime": 5, "filter": "r"}, {"exptime": 5, "filter": "z"}, {"exptime": 5, "filter": "r"},
             {"exptime": 10, "filter": "r"}, {"exptime": 5, "filter": "r"}, {"exptime": 10, "filter": "r"}]
    assert make_pairs(items) == [(0, 2), (3, 5)]


def test_overscan_noise_removes_row_offsets():
    rng = np.random.default_rng(4)
    over = rng.normal(0, 3.0, (2000, 16)) + rng.normal(0, 20, (2000, 1))
    assert abs(overscan_noise(over, axis=1) - 3.0) < 4 * 3.0 / math.sqrt(2 * 2000 * 15)


# ---------------------------------------------------------------------------------------------------
# the builds on a simulated night: gains 3-5 % off the camera file, injected bad pixels
# ---------------------------------------------------------------------------------------------------

NIGHT = "2026-11-20"
DETS = tuple(range(9))


@pytest.fixture(scope="module")
def built(tmp_path_factory, prefect_api):
    """The nightly flow (default policy) on the night of the issue: gains 3-5 % off the camera file,
    every kind of injected bad pixel, four 5 s flats plus PTC pairs at 2 and 12 s, six r exposures."""
    from calib_core.repository import list_calibs
    from calib_core.simulate.night import simulate_night
    from flows.nightly import nightly
    from tests._repos import ingested_repo

    root = tmp_path_factory.mktemp("defects")
    sim = simulate_night("democam_mini", root / "sim", seed=11, night=NIGHT, n_bias=5, n_dark=4, n_flat=4,
                         n_science=6, filters=("r",), gain_error=0.04, pixel_defects=True,
                         ptc_exptimes=(2.0, 12.0))
    store, reg = ingested_repo(root / "repo", root / "sim" / "raw", "democam_mini")
    summary = nightly(night=NIGHT, camera="democam_mini", repo=str(store.root))
    out = {}
    for row in list_calibs(reg):
        out.setdefault(row.type, {})[row.detector] = row
    return sim, store, reg, out, summary


def _product(rows, det):
    from calib_core.io.products import read_product

    return (*read_product(rows[det].path), rows[det])


def test_nightly_builds_defects_and_gains_before_the_flats(built):
    sim, store, reg, out, summary = built
    steps = [(s["type"], s["action"]) for s in summary["steps"]]
    assert steps == [("bias", "built"), ("dark", "built"), ("defects", "built"), ("ptc", "built"),
                     ("flat", "built"), ("sky", "built")]


def test_defects_recover_the_injected_bad_pixels(built):
    """At least 99 % of the injected bad pixels (hot pixels 0.5-5 e-/s, hot and dead/low columns,
    cold pixels at 30-70 % response) are masked, and fewer than 0.1 % of the good pixels."""
    sim, store, reg, out, _ = built
    found_total = injected_total = false_total = good_total = 0
    for det in DETS:
        mi, header, row = _product(out["defects"], det)
        truth = sim.truth_defects(det) != 0
        mask = (mi.mask & MASK_PLANES.bit("BAD")) != 0
        assert np.array_equal(mask, mi.image != 0)                  # IMAGE = origin bits, MASK = BAD
        found_total += int((mask & truth).sum())
        injected_total += int(truth.sum())
        false_total += int((mask & ~truth).sum())
        good_total += int((~truth).sum())
        origin = mi.image.astype(np.int32)
        bits = sim.static_truth["defect_bits"]
        t = sim.truth_defects(det)
        # each kind was found by the test that should find it
        assert (origin[(t & bits["hot_pixel"]) != 0] & ORIGINS["DARK"]).mean() > 0.99
        assert (origin[(t & bits["cold_pixel"]) != 0] & ORIGINS["FLAT_COLD"]).mean() > 0.99
        assert (origin[(t & bits["hot_column"]) != 0] & (ORIGINS["DARK"] | ORIGINS["COLUMN"])).all()
        assert header["OBSTYPE"] == "defects" and row.stats["defects"]["total"] == int(mask.sum())
        assert {i.split("-")[0] for i in row.stats["isr_calibs"]} == {"bias", "dark"}
    completeness = found_total / injected_total
    false_rate = false_total / good_total
    print(f"defects: {found_total}/{injected_total} injected found ({completeness:.4%}), "
          f"{false_total} false of {good_total} ({false_rate:.5%})")
    assert injected_total > 500
    assert completeness >= 0.99
    assert false_rate < 0.001


def test_ptc_gains_within_their_errors_of_the_truth(built):
    """Gains 3-5 % off the camera file's are recovered within 3.5 of their errors, each, and with
    an rms of the 18 pulls below 1.6. The errors are 0.5-0.9 %: each pair measures the variance of
    ~6.5e4 pixels to sqrt(2/6.5e4) = 0.55 %, four pairs, and the LINEAR fit's free intercept."""
    from calib_core.builds.ptc import read_ptc

    sim, store, reg, out, _ = built
    pulls = []
    for det in DETS:
        mi, header, row = _product(out["ptc"], det)
        measured = read_ptc(row.path)
        true, nominal = sim.true_gains(det), sim.static_truth["detectors"][sim.camera.detector(det).name]["nominal_gains"]
        for amp, g in true.items():
            m = measured[amp]
            assert abs(g / nominal[amp] - 1) > 0.025                  # the camera file is off by 3-5 %
            assert m["gain_err"] < 0.01 * g
            pulls.append((m["gain"] - g) / m["gain_err"])
            print(f"det {det} amp {amp}: true {g:.4f} nominal {nominal[amp]:.4f} measured {m['gain']:.4f} "
                  f"+- {m['gain_err']:.4f} ({m['fit_type']}), read noise {m['read_noise']:.2f} e-")
            rn = sim.static_truth["detectors"][sim.camera.detector(det).name]["read_noise_e"][amp]
            assert abs(m["read_noise"] - rn) < 0.03 * rn
            assert abs(m["gain"] - g) < 3.5 * m["gain_err"]
            assert m["fit_type"] == "LINEAR" and m["n_used"] == 4     # 2 s, 5 s (2 pairs), 12 s
        # the gain map and the curve's picture
        assert np.isfinite(mi.image).all() and header["OBSTYPE"] == "ptc"
        # the PTC's flats had the certified defects masked (dead columns would bias the gain high)
        assert {i.split("-")[0] for i in row.stats["isr_calibs"]} == {"bias", "defects"}
        png = row.stats["ptc_png"]
        assert open(png, "rb").read(4) == b"\x89PNG"
    print(f"gains: measured - true = rms {np.sqrt(np.mean(np.square(pulls))):.2f} sigma over {len(pulls)} amps")
    assert np.sqrt(np.mean(np.square(pulls))) < 1.6          # 18 amps: unbiased, errors the right size


def test_flat_isr_used_the_certified_defects_and_gains(built):
    """The flat build ran after defects and PTC and applied both: the flat's mask has BAD at
    every defect, and the variance plane of an ISR'd flat follows the measured gains (the
    variance of a flat pair's difference matches it; the camera file's gains would be 3-5 % off)."""
    from calib_core.builds.bias_dark_flat import FlatConfig
    from calib_core.builds.calibtypes import isr_with_calibs
    from calib_core.camera import load_camera
    from calib_core.io.raw import read_raw
    from calib_core.science import find_isr_calibs

    sim, store, reg, out, _ = built
    for det in DETS:
        flat, _, row = _product(out["flat"], det)
        ids = row.stats["isr_calibs"]
        assert any(i.startswith("defects-") for i in ids) and any(i.startswith("ptc-") for i in ids)
        defects, _, _ = _product(out["defects"], det)
        assert ((flat.mask[defects.image != 0] & MASK_PLANES.bit("BAD")) != 0).all()
    cam = load_camera("democam_mini")
    flats = [e for e in reg.query_exposures(obs_type="flat") if e.exptime == 5.0][:2]
    cfg = FlatConfig()
    ims = []
    for e in flats:
        calibs = find_isr_calibs(reg, "democam_mini", e.exposure_id, 0, cfg.isr)
        assert {"bias", "dark", "defects", "ptc"} == set(calibs)
        raw = read_raw(e.path, cam, [0]).detectors[0]
        ims.append(isr_with_calibs(raw, cfg.isr, calibs, e.darktime))
    true = sim.true_gains(0)
    for name, y0, y1, x0, x1 in [("A", 0, 512, 0, 128), ("B", 0, 512, 128, 256)]:
        a, b = (m.image[y0:y1, x0:x1] for m in ims)
        ok = ((ims[0].mask | ims[1].mask)[y0:y1, x0:x1] == 0)
        mu1, mu2 = a[ok].mean(), b[ok].mean()
        diff = (mu2 * a[ok] - mu1 * b[ok]) / (0.5 * (mu1 + mu2))
        measured = 0.5 * diff.var()
        predicted = 0.5 * (ims[0].variance[y0:y1, x0:x1][ok].mean() + ims[1].variance[y0:y1, x0:x1][ok].mean())
        err = measured * math.sqrt(2 / ok.sum())
        # the bias's own variance enters the plane but cancels in the difference: small next to shot noise
        assert abs(measured - predicted) < 4 * err + 0.003 * predicted, (name, measured, predicted)
        nominal = float(next(a_.gain for a_ in cam.detector(0).amplifiers if a_.name == name))
        assert abs(nominal / true[name] - 1) * predicted > 5 * err     # the camera file's gain would fail


def test_flat_and_sky_frame_show_no_amplifier_step(built):
    """Across each detector's amplifier boundary, the step of flat / truth flat and of the sky
    frame's (1 + F) / P (less the mean of the steps beside it: a slope is no step) is within 4 of its
    noise (bench/defects_ptc.py; measured at most 1.4 and 2.1). The flat is in ADU, so it carries
    each amplifier's true gain whatever the camera file says."""
    from bench.defects_ptc import _flat_steps, _sky_steps

    sim, store, reg, out, _ = built
    flat, sky = _flat_steps(sim, reg), _sky_steps(sim, reg)
    print(f"amplifier steps (sigma): flat {np.round(flat, 1)}, sky frame {np.round(sky, 1)}")
    assert len(flat) == len(sky) == 9
    assert max(map(abs, flat)) < 4 and max(map(abs, sky)) < 4


# ---------------------------------------------------------------------------------------------------
# real frames: Lick Kast blue flats and biases
# ---------------------------------------------------------------------------------------------------

KAST = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "lick_kast_blue"


@pytest.fixture(scope="module")
def kast_ptc():
    """The PTC of the 15 s Kast-blue dome flats b3..b12 (5 pairs) over the master bias of b14..b23.
    The flats are spectra: the lamp light falls by 80x along the dispersion (columns), so each
    amplifier is cut into 16 boxes of 64 columns x rows 30-319 (the lit slit), each box a point of
    the curve (one pair gives a whole curve). Returns (fits by amp, points by amp, overscan noise)."""
    if not KAST.is_dir():
        pytest.skip(f"real Kast frames not found at {KAST} (../shared/realdata is absent on a fresh clone)")
    from calib_core.builds.bias_dark_flat import combine_bias, process_bias
    from calib_core.camera import load_camera
    from calib_core.io.raw import read_raw
    from calib_core.isr.process import IsrConfig, run_isr

    cam = load_camera("lick_kast_blue")
    master = combine_bias([process_bias(read_raw(KAST / f"b{i}.fits.gz", cam).detectors[0]) for i in range(14, 24)])
    isr = IsrConfig(do_dark=False, do_flat=False, do_defect=False, use_ptc_gains=False)
    flats, noise = {}, {"A": [], "B": []}
    for i in range(3, 13):
        rd = read_raw(KAST / f"b{i}.fits.gz", cam).detectors[0]
        flats[i] = run_isr(rd, isr, bias=master)
        for a in rd.amps:
            noise[a.name].append(overscan_noise(a.overscan, a.overscan_axis))
    boxes = [(name, 30, 320, x0 + 64 * k, x0 + 64 * (k + 1)) for name, x0 in (("A", 0), ("B", 1024)) for k in range(16)]
    points = {"A": [], "B": []}
    for i in (3, 5, 7, 9, 11):
        for st in pair_stats(flats[i], flats[i + 1], boxes, 15.0, PtcConfig(), (f"b{i}", f"b{i + 1}")):
            points[st.amp].append(st)
    os_noise = {a: float(np.median(v)) for a, v in noise.items()}
    fits_ = {a: fit_ptc(points[a], os_noise[a], PtcConfig(ptc_fit_type="LINEAR")) for a in points}
    return fits_, points, os_noise, flats


def test_kast_blue_gain_and_read_noise(kast_ptc):
    """Measured (README, "Gains of the real Kast blue CCD"): amp A 1.209 +- 0.002, amp B
    1.250 +- 0.005 e-/ADU; the header's GAIN = 1 is a setting, not e-/ADU; PypeIt's Kast-blue
    definition (the camera file's source) says 1.2 e-/ADU and 3.7 e- for both amplifiers."""
    fits_, points, os_noise, flats = kast_ptc
    for amp, f in fits_.items():
        print(f"Kast blue amp {amp}: gain {f.gain:.4f} +- {f.gain_err:.4f} e-/ADU, read noise {f.noise_overscan:.2f} e- "
              f"(overscan), fit {f.noise_fit:.2f} +- {f.noise_fit_err:.2f} e-, chi2/dof {f.chi2_dof:.2f}, "
              f"{f.n_used} points, turnoff {f.turnoff:.0f} ADU")
        assert f.n_used == f.n_points == 80                  # nothing near full well at <= 34000 ADU
        assert f.gain_err < 0.01 and 0.5 < f.chi2_dof < 2.0
        assert abs(f.gain - 1.2) < 0.06                      # PypeIt's one-decimal value
        assert 3.0 < f.noise_overscan < 4.0                  # PypeIt: 3.7 e-
    # the two amplifiers differ by more than their errors: one gain per amp is needed
    assert abs(fits_["A"].gain - fits_["B"].gain) > 5 * math.hypot(fits_["A"].gain_err, fits_["B"].gain_err)


def test_kast_gain_agrees_with_a_brute_force_estimate(kast_ptc):
    """An independent estimate on one bright box of amp B with plain numpy (no clipping, no fit):
    g = mean / (var(im1 - k im2) / 2 - rn**2), averaged over the 5 pairs; it agrees with the PTC
    fit within 3 combined errors (the brute force one from its pairs' scatter)."""
    fits_, points, os_noise, flats = kast_ptc
    est = []
    for i in (3, 5, 7, 9, 11):
        a, b = (flats[j].image[30:320, 1024 + 640:1024 + 704].astype(np.float64) for j in (i, i + 1))
        k = a.mean() / b.mean()
        est.append(0.5 * (a.mean() + k * b.mean()) / (np.var(a - k * b) / (1 + k * k) - os_noise["B"] ** 2))
    est = np.array(est)
    err = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - fits_["B"].gain) < 3 * math.hypot(err, fits_["B"].gain_err), (est, fits_["B"].gain)


def test_nightly_skips_a_ptc_without_pairs(tmp_path):
    """A night whose flats all differ in exposure time plans no PTC (the build could not pair them)
    and still plans the defects and flats."""
    from flows.nightly import NightlyPolicy, plan_night

    from calib_core.records import Exposure

    def row(obs_type, filter, exptime, exposure_id):
        return Exposure(exposure_id=exposure_id, camera="cam", obs_type=obs_type, filter=filter, exptime=exptime,
                        darktime=exptime, date_obs="2026-11-21T03:00:00+00:00", night="2026-11-20", object="",
                        n_detectors=1, path=f"/raw/{exposure_id}.fits", checksum="0" * 64, size_bytes=1,
                        ingested_at="2026-11-21T12:00:00+00:00")

    class Rows:
        def query_exposures(self, camera, night):
            flats = [row("flat", "r", t, str(t)) for t in (1, 2, 3)]
            return [row("bias", "NONE", 0.0, f"b{i}") for i in range(5)] + flats

    steps = {s["type"]: s for s in plan_night(Rows(), "cam", "2026-11-20", NightlyPolicy())}
    assert steps["ptc"]["action"] == "skip" and "share an exposure time" in steps["ptc"]["reason"]
    assert steps["defects"]["action"] == "build" and steps["flat"]["action"] == "build"


def test_defects_and_ptc_products_open_with_ccddata(built):
    """Like every other product (tests/test_products_ecosystem.py): astropy's CCDData.read opens the
    defects mask and the gain map with no arguments, with their unit, uncertainty and mask."""
    from astropy.nddata import CCDData, VarianceUncertainty

    sim, store, reg, out, _ = built
    for kind, unit in (("defects", "1"), ("ptc", "electron / adu")):
        mi, header, row = _product(out[kind], DETS[0])
        ccd = CCDData.read(row.path)
        assert ccd.unit.to_string() in {unit, ""} or str(ccd.unit) == unit, (kind, ccd.unit)
        assert isinstance(ccd.uncertainty, VarianceUncertainty), kind
        assert ccd.mask is not None and ccd.mask.shape == mi.shape, kind
        np.testing.assert_array_equal(np.asarray(ccd.data), mi.image)
        np.testing.assert_array_equal(np.asarray(ccd.uncertainty.array), mi.variance)


def test_read_ptc_parses_a_product_once_and_again_when_it_is_replaced(tmp_path, monkeypatch):
    """ISR reads the certified PTC's table for every exposure of a detector: the file is parsed once
    per process; each caller gets its own rows; a product rewritten under the same name is read anew."""
    from astropy.io import fits

    from calib_core.builds import ptc
    from calib_core.io.products import write_hdulist

    def amp(name, gain):
        return ptc.AmpPtc(amp=name, gain=gain, gain_err=0.01, noise_fit=4.0, noise_fit_err=0.1, noise_var_fit=16.0,
                          noise_var_fit_err=0.5, noise_overscan=4.2, turnoff=4.0e4, a00=0.0, fit_type="LINEAR",
                          n_points=4, n_used=4, chi2_dof=1.0)

    path = tmp_path / "ptc.fits"
    write_hdulist(path, fits.HDUList([fits.PrimaryHDU(), *ptc.ptc_table_hdus({"A": amp("A", 1.6), "B": amp("B", 2.3)})]))
    parsed = []
    real = ptc._read_ptc_table
    monkeypatch.setattr(ptc, "_read_ptc_table", lambda p: parsed.append(p) or real(p))
    monkeypatch.setattr(ptc, "_PTC_TABLES", {})
    first = ptc.read_ptc(path)
    assert first["A"]["gain"] == 1.6 and first["B"]["gain"] == 2.3 and first["A"]["read_noise"] == 4.2
    first["A"]["gain"] = 99.0                      # the caller's copy
    assert ptc.read_ptc(str(path))["A"]["gain"] == 1.6 and len(parsed) == 1
    write_hdulist(path, fits.HDUList([fits.PrimaryHDU(), *ptc.ptc_table_hdus({"A": amp("A", 1.7), "B": amp("B", 2.3)})]))
    assert ptc.read_ptc(path)["A"]["gain"] == 1.7 and len(parsed) == 2
    with pytest.raises(FileNotFoundError):
        ptc.read_ptc(tmp_path / "missing.fits")
