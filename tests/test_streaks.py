"""The satellite-trail rule of the sky build (calib_core/sky/streaks.py; docs/algorithms.md, "Sky frames").

Unit tests build the barrier's binned residuals of a night by hand on democam_mini's focal plane
(3 x 3 detectors of 8 x 16 bins of 32 px): every bin loses a random part of its pixels to objects
and carries noise, and one exposure gets a known feature, placed by its own focal-plane geometry
(bin centres computed here from the pixel grid): a masked band along a straight line at a known
angle across the whole focal plane is found at that angle and rejected; a fully masked bleed
column the height of a detector, blobs masked the size of big galaxies, and a trail-strength strip
a quarter of the focal plane long are not. The last test runs the simulator (calib_core.simulate.night),
ISR with its truth calibrations and the build's two passes, and checks the rejections against the
truth it wrote (exposures.json ``defect``).
"""

import math

import numpy as np
import pytest

from calib_core.camera import load_camera
from calib_core.sky.frames import ExposureRejectionConfig, find_outlier_exposures
from calib_core.sky.streaks import StreakConfig, find_streaks
from calib_core.stats.background import BackgroundModel

CAM = load_camera("democam_mini")
BIN = 32
N_EXP = 10
BAD = 3                     # the exposure that gets the feature


def _centres(det):
    """Focal-plane mm of the centres of the 32-px bins of a detector, (ny_bins, nx_bins)."""
    xs = np.arange(det.nx // BIN) * BIN + (BIN - 1) / 2.0
    ys = np.arange(det.ny // BIN) * BIN + (BIN - 1) / 2.0
    gx, gy = np.meshgrid(xs, ys)
    u, v = CAM.pixel_to_focal_plane(det, gx, gy)
    return np.asarray(u), np.asarray(v)


def _night(extra_masked=None, extra_light=None, seed=1):
    """{exposure: {detector: BackgroundModel}} of residuals ``I/L - 1``: per bin a static masked
    fraction (the same in every exposure), objects (an exponential fraction, mean 4 %, and a few
    galaxies masking 30-90 % of a bin), noise of 0.1 % of the sky per full bin. ``extra_masked``
    and ``extra_light`` map (u, v) -> masked fraction / residual added to exposure BAD."""
    rng = np.random.default_rng(seed)
    static = {d.id: rng.uniform(0, 0.05, (d.ny // BIN, d.nx // BIN)) for d in CAM.detectors}
    out = {}
    for e in range(N_EXP):
        out[e] = {}
        for det in CAM.detectors:
            shape = static[det.id].shape
            f = static[det.id] + rng.exponential(0.04, shape)
            gal = rng.random(shape) < 0.03
            f[gal] += rng.uniform(0.3, 0.9, gal.sum())
            light = np.zeros(shape)
            if e == BAD:
                u, v = _centres(det)
                if extra_masked is not None:
                    f = f + extra_masked(u, v)
                if extra_light is not None:
                    light = extra_light(u, v)
            npoint = np.round(BIN * BIN * (1 - np.clip(f, 0, 1)))
            with np.errstate(divide="ignore", invalid="ignore"):
                err = 1e-3 * np.sqrt(BIN * BIN / npoint)
                val = np.where(npoint > 0, rng.normal(0, 1, shape) * err + light, np.nan)
            out[e][det.id] = BackgroundModel(val, err, npoint, (0, 0, det.nx - 1, det.ny - 1))
    return out


def _distance(u, v, angle_deg, u0=0.0, v0=0.0):
    a = math.radians(angle_deg)
    return -(u - u0) * math.sin(a) + (v - v0) * math.cos(a)


def _along(u, v, angle_deg, u0=0.0, v0=0.0):
    a = math.radians(angle_deg)
    return (u - u0) * math.cos(a) + (v - v0) * math.sin(a)


def _trail(angle_deg, u0=0.0, v0=0.0, masked=0.7, half_width_mm=1.0):
    """A band ``2 * half_width_mm`` wide along the line, masked by ``masked`` of each bin, and its
    faint wings (0.1 % of the sky, sigma 1.5 mm) beside it."""
    def m(u, v):
        return np.where(np.abs(_distance(u, v, angle_deg, u0, v0)) < half_width_mm, masked, 0.0)

    def light(u, v):
        return 1e-3 * np.exp(-0.5 * (_distance(u, v, angle_deg, u0, v0) / 1.5) ** 2)
    return m, light


def _angle_error(a, b):
    return abs((a - b + 90.0) % 180.0 - 90.0)


@pytest.mark.parametrize("angle, u0, v0", [(17.0, 1.0, -3.0), (72.0, -2.0, 4.0), (135.0, 0.5, 0.5),
                                           (90.0, 3.5, 0.0)])
def test_line_across_the_focal_plane_found_at_its_angle_and_rejected(angle, u0, v0):
    m, light = _trail(angle, u0, v0)
    night = _night(m, light)
    streaks = find_streaks(CAM, night)
    s = streaks[BAD]
    assert s.qualifies, s
    assert _angle_error(s.angle_deg, angle) < 3.0, s
    # where the line was: its signed distance from the focal-plane origin, within half a band
    assert abs(s.offset_mm - _distance(u0, v0, s.angle_deg)) < 1.0, s
    assert not any(streaks[e].qualifies for e in night if e != BAD), {e: streaks[e] for e in night}
    rejected = find_outlier_exposures(night, ExposureRejectionConfig(), camera=CAM)
    assert list(rejected) == [BAD], rejected
    assert "satellite trail" in rejected[BAD] and f"{s.angle_deg:.1f} deg" in rejected[BAD], rejected
    # the other rules alone do not see this trail (half-masked bins stay usable, the wings are
    # within the noise): the streak rule is what rejects it, and only given the camera
    assert find_outlier_exposures(night, ExposureRejectionConfig()) == {}
    off = ExposureRejectionConfig(streak=StreakConfig(enabled=False))
    assert find_outlier_exposures(night, off, camera=CAM) == {}


def test_exposures_searched_side_by_side_give_the_lines_searched_in_turn():
    """The search runs one thread per core across exposures: each exposure's line (and each
    non-line) is the one the serial search finds."""
    night = _night(*_trail(72.0, -2.0, 4.0))
    serial, threaded = find_streaks(CAM, night, workers=1), find_streaks(CAM, night, workers=3)
    assert list(threaded) == list(serial) and serial[BAD].qualifies
    assert {e: repr(s) for e, s in threaded.items()} == {e: repr(s) for e, s in serial.items()}

def test_trail_seen_only_in_the_residual_is_found():
    """A trail that object masking missed: no bin loses pixels, the residual rises along the line."""
    night = _night(None, lambda u, v: np.where(np.abs(_distance(u, v, 40.0)) < 0.5, 4e-3, 0.0))
    s = find_streaks(CAM, night)[BAD]
    assert s.qualifies and not s.masked, s
    assert _angle_error(s.angle_deg, 40.0) < 3.0, s


def test_bleed_column_the_height_of_a_detector_is_not_a_trail():
    """A saturated star's bleed: one column of bins masked from the bottom to the top of the centre
    detector, and light beside it."""
    det = CAM.detector(4)
    x_mm = _centres(det)[0][0, 3]

    def m(u, v):
        return np.where((np.abs(u - x_mm) < 0.2) & (np.abs(v - det.y_mm) < det.ny * 0.015 / 2), 1.0, 0.0)
    night = _night(m, lambda u, v: np.where(np.abs(u - x_mm - 0.48) < 0.2, 5e-3, 0.0)
                   * (np.abs(v - det.y_mm) < 3.8))
    s = find_streaks(CAM, night)[BAD]
    assert not s.qualifies, s
    assert find_outlier_exposures(night, ExposureRejectionConfig(max_lost_bins=0.5), camera=CAM) == {}


def test_big_masked_blobs_are_not_a_trail():
    """Six galaxies, each masking every bin within 1.2 mm (5 x 5 bins), scattered over the plane."""
    centres = [(-5.0, -10.0), (4.5, -6.0), (-1.0, -1.5), (5.0, 2.5), (-4.5, 7.0), (1.5, 11.0)]

    def m(u, v):
        return sum(np.where(np.hypot(u - a, v - b) < 1.2, 1.0, 0.0) for a, b in centres)
    s = find_streaks(CAM, _night(m))[BAD]
    assert not s.qualifies, s


def test_short_strip_across_a_chip_gap_is_not_a_trail():
    """A trail-strength band a quarter of the focal plane's height long, over two detectors."""
    m, light = _trail(80.0, 0.0, 4.6)

    def short(f):
        return lambda u, v: f(u, v) * (np.abs(_along(u, v, 80.0, 0.0, 4.6)) < 3.0)
    s = find_streaks(CAM, _night(short(m), short(light)))[BAD]
    assert not s.qualifies, s
    # the same band across the whole focal plane is a trail
    assert find_streaks(CAM, _night(m, light))[BAD].qualifies


def test_config_refuses_unknown_fields_and_documents_defaults():
    with pytest.raises(ValueError):
        StreakConfig(min_scor=5)
    for name, f in StreakConfig.model_fields.items():
        assert f.description, name
    assert isinstance(ExposureRejectionConfig().streak, StreakConfig)


# ---------------------------------------------------------------------------------------------------
# simulated night, against the simulator's truth
# ---------------------------------------------------------------------------------------------------

SEED, N_SIM = 0, 8


def test_simulated_trail_rejected_and_no_good_exposure(tmp_path):
    """democam_mini, 8 r-band exposures with a cloud, a trail and a glow, moonlight gradients of up
    to +-10 %; ISR with the truth calibrations, the build's two passes (bench/streak_rejection.py).
    Seed 0 is a night where the rules that were there before reject no good exposure."""
    from bench.streak_rejection import night_binned
    from calib_core.camera import effective_config
    from calib_core.sky.frames import SkyConfig, solve_sky_frames

    nb = night_binned("democam_mini", SEED, tmp_path, log=lambda s: None, n_science=N_SIM)
    cfg = effective_config(SkyConfig, CAM, None)
    res = solve_sky_frames(CAM, nb["binned"], cfg, nb["guide"])
    kind = {e: nb["defect"][e] or "good" for e in nb["binned"]}
    assert sorted(k for k in kind.values() if k != "good") == ["cloud", "glow", "trail"]
    trail = next(e for e, k in kind.items() if k == "trail")
    assert res.rejected.get(trail, "").endswith("a satellite trail"), res.rejected
    truth = math.degrees(nb["defect_params"][trail]["angle"]) % 180.0
    found = float(res.rejected[trail].split(" at angle ")[1].split(" deg")[0])
    assert _angle_error(found, truth) < 5.0, (found, truth)
    assert not [e for e in res.rejected if kind[e] == "good"], {e: (kind[e], r) for e, r in res.rejected.items()}
    assert {kind[e] for e in res.rejected} == {"cloud", "trail", "glow"}, res.rejected


def _strip_scores_numpy(u, v, q, det, th, radius, cell, seg, n_rho, n_seg, n_det, g, cfg):
    """_find_line's steps 3-4 as NumPy did them before the numba kernel (commit 256320a), all
    angles of a chunk at once: (score, n_sig, piece significances with NaN where a piece does
    not count), the reference for calib_core.stats._kernels.strip_scores."""
    n_a = len(th)
    c, s = np.cos(th)[:, None], np.sin(th)[:, None]
    i = np.floor((-u * s + v * c + radius) / cell).astype(np.int64)
    k = np.floor((u * c + v * s + radius) / seg).astype(np.int64)
    row = np.arange(n_a)[:, None] * n_rho + i
    key = (row * n_seg + k).ravel()
    sq = np.bincount(key, weights=np.broadcast_to(q, i.shape).ravel(),
                     minlength=n_a * n_rho * n_seg).reshape(n_a, n_rho, n_seg)
    nn = np.bincount(key, minlength=n_a * n_rho * n_seg).reshape(n_a, n_rho, n_seg).astype(np.float64)
    sq, nn = sq[:, :-1] + sq[:, 1:], nn[:, :-1] + nn[:, 1:]
    use = nn > 0
    if g:
        ps, pn = (np.pad(a, ((0, 0), (g, g), (0, 0))) for a in (sq, nn))
        with np.errstate(invalid="ignore", divide="ignore"):
            ml, mr = ps[:, :-2 * g] / pn[:, :-2 * g], ps[:, 2 * g:] / pn[:, 2 * g:]
        left = ml >= mr
        use &= (pn[:, :-2 * g] > 0) & (pn[:, 2 * g:] > 0)
        fn = np.where(left, pn[:, :-2 * g], pn[:, 2 * g:])
        with np.errstate(invalid="ignore", divide="ignore"):
            sq = sq - nn * np.where(use, np.where(left, ml, mr), 0.0)
            var = nn * (1.0 + np.where(use, nn / fn, 0.0))
    else:
        var = nn
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.where(use, sq / np.sqrt(var), np.inf)
    n_piece = np.sum(use, axis=2)
    m = np.maximum(np.floor(cfg.coherent_fraction * n_piece + 1e-9).astype(np.int64), 1)
    srt = np.sort(sig, axis=2)
    csum = np.cumsum(np.where(np.isfinite(srt), srt, 0.0), axis=2)
    score = np.take_along_axis(csum, (m - 1)[:, :, None], axis=2)[:, :, 0] / np.sqrt(m)
    score = np.where(n_piece >= 2, score, -np.inf)
    kd = (row * n_det + det).ravel()
    dq = np.bincount(kd, weights=np.broadcast_to(q, i.shape).ravel(),
                     minlength=n_a * n_rho * n_det).reshape(n_a, n_rho, n_det)
    dn = np.bincount(kd, minlength=n_a * n_rho * n_det).reshape(n_a, n_rho, n_det).astype(np.float64)
    dq, dn = dq[:, :-1] + dq[:, 1:], dn[:, :-1] + dn[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        dsig = np.where(dn > 0, dq / np.sqrt(dn), 0.0)
    n_sig = np.sum(dsig >= cfg.min_detector_score, axis=2)
    return score, n_sig, np.where(use, sig, np.nan)


@pytest.mark.parametrize("width_bins, flank_bins", [(2.0, 8.0), (4.0, 8.0), (2.0, None)])
def test_strip_scores_kernel_is_the_numpy_formulation_to_the_bit(width_bins, flank_bins):
    """The numba kernel's scores, detector counts and piece significances equal the NumPy
    formulation's exactly, on a night with a trail (angles every 9 degrees; with and without flanks)."""
    from calib_core.stats._kernels import strip_scores
    from calib_core.sky.streaks import _NO_SIG, bin_anomalies

    m, light = _trail(33.0, 1.0, -2.0)
    cfg = StreakConfig(flank_bins=flank_bins)
    fp = bin_anomalies(CAM, _night(m, light), cfg)[BAD]
    u, v, q, det = fp.u, fp.v, fp.q, fp.det
    n_det = int(det.max()) + 1
    radius = float(np.max(np.hypot(u, v))) + fp.pitch
    cell, seg = width_bins * fp.pitch / 2.0, cfg.segment_bins * fp.pitch
    g = max(int(round(flank_bins * fp.pitch / cell)), 2) if flank_bins else 0
    n_rho, n_seg = int(math.ceil(2 * radius / cell)) + 2, int(math.ceil(2 * radius / seg)) + 1
    th = np.radians(np.arange(0.0, 180.0, 9.0))
    ref_score, ref_n, ref_sig = _strip_scores_numpy(u, v, q, det, th, radius, cell, seg, n_rho, n_seg, n_det, g, cfg)
    score, n_sig = strip_scores(u, v, q, det, np.cos(th), np.sin(th), radius, cell, seg, n_rho, n_seg, n_det, g,
                                cfg.coherent_fraction, cfg.min_detector_score, _NO_SIG)
    assert np.array_equal(score, ref_score) and np.array_equal(n_sig, ref_n)
    assert np.isfinite(score).sum() > score.size // 2 and n_sig.max() >= 2      # a test with something in it
    a = int(np.argmax(np.max(score, axis=1)))
    sig = np.empty((n_rho - 1, n_seg))
    strip_scores(u, v, q, det, np.cos(th[a:a + 1]), np.sin(th[a:a + 1]), radius, cell, seg, n_rho, n_seg, n_det, g,
                 cfg.coherent_fraction, cfg.min_detector_score, sig)
    assert np.array_equal(sig, ref_sig[a], equal_nan=True)


def test_refine_scores_kernel_is_the_numpy_expression_to_the_bit():
    """_refine's per-(offset, angle) scores from the numba kernel equal the NumPy expression it
    replaced (kept here), exactly: its sums are NumPy's pairwise summation, checked on its own
    against numpy.sum for lengths around every branch of it; offsets with no bin give -inf."""
    from calib_core.stats._kernels import pairwise_sum, refine_scores
    from calib_core.sky.streaks import bin_anomalies

    rng = np.random.default_rng(2)
    for n in (0, 1, 7, 8, 9, 127, 128, 129, 255, 1000, 18433):
        a = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)
        assert pairwise_sum(a, 0, n) == np.sum(a)
    m, light = _trail(52.0, -1.0, 2.0)
    fp = bin_anomalies(CAM, _night(m, light))[BAD]
    thetas = math.radians(52.0) + np.linspace(-0.05, 0.05, 33)
    width = 4 * fp.pitch
    offsets = 1.0 + np.linspace(-width, width, 17)
    offsets[0] = 1e3                                       # beyond the focal plane: no bin
    d = -fp.u[None, :] * np.sin(thetas)[:, None] + fp.v[None, :] * np.cos(thetas)[:, None]
    ref = []
    for r in offsets:
        on = np.abs(d - r) <= width / 2
        n = on.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ref.append(np.where(n > 0, (on * fp.q).sum(axis=1) / np.sqrt(n), -np.inf))
    got = refine_scores(fp.u, fp.v, fp.q, np.sin(thetas), np.cos(thetas), offsets, width / 2)
    assert np.array_equal(got, np.array(ref))
    assert np.all(got[0] == -np.inf) and np.isfinite(got[1:]).all()
