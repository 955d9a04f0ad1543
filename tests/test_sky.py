"""Sky frames (docs/algorithms.md#sky-frames) on simulated post-ISR democam_mini exposures
(tests/_skysim.py), against the injected pattern only: the frame at its noise floor, gradients of
+-10 % followed, held-out structure removed tenfold with the right scale, bad exposures rejected
and a night that would lose most exposures refused.

The noise floor of a frame bin (fraction of the sky), derived from the truth (gain 1): each used
exposure j contributes the relative variance ``v_j = (S + rn^2) / S^2`` of its pixels (``S`` the
injected sky there) over the ``n_b = NPOINT_b / N`` unmasked pixels it has in the bin; per-pixel
MEANCLIP costs a factor ``eta`` and the clipped mean over N exposures ``c_N`` (both by Monte Carlo
with astropy's sigma_clip, in bench/sky_accuracy.py); ``floor_b^2 = c_N eta sum_j <v_j>_b / n_b /
N^2``. The comparison allows one scale and one quadratic focal-plane surface
(:func:`bench.sky_accuracy.frame_vs_truth`)."""

import numpy as np
import pytest

from bench.sky_accuracy import clip_variance_ratio, frame_vs_truth
from calib_core.maskedimage import MaskedImage
from calib_core.sky.frames import (ExposureRejectionConfig, LargeScaleConfig, SkyConfig, SkyRejectionError,
                                   average_backgrounds, bin_coordinates, build_sky_frames, find_outlier_exposures,
                                   fit_surface, measure_scale, measure_sky_background, solve_scales, subtract_sky_frame)
from calib_core.sky.heldout import sky_frame_quality
from calib_core.stats.background import BackgroundModel
from tests import _skysim as S

N_EXP = 12
CAM = S.camera()
CFG = SkyConfig()            # the defaults: what the flows run


def _bins(img, f):
    xe, ye = f.x_edges, f.y_edges
    return np.array([[img[ye[j]:ye[j + 1], xe[i]:xe[i + 1]].mean() for i in range(len(xe) - 1)]
                     for j in range(len(ye) - 1)])


def _accuracy(result, truth):
    """(RMS residual / floor, a) of the frames against the injected pattern."""
    used = result.used
    n = len(used)
    rows = []
    for d, f in result.frames.items():
        det = CAM.detector(d)
        p = S.pattern(det, cam=CAM)
        vs = np.zeros(f.values.shape)
        for e in used:
            sky = truth[e]["level"] * (1 + S.large_scale(CAM, det, truth[e]["params"])) * (1 + p)
            vb = _bins((sky + S.READ_NOISE ** 2) / sky ** 2, f)
            vs += vb
        u, v = bin_coordinates(CAM, det, f)
        rows.append((f.values, f.npoint, vs, _bins(p, f), u, v))
    F, NP, VS, P, U, V = (np.concatenate([np.ravel(r[k]) for r in rows]) for k in range(6))
    nbar = NP / n
    eta = clip_variance_ratio(int(np.median(nbar)), trials=1000)
    c_n = clip_variance_ratio(n, trials=2000)
    floor = np.sqrt(c_n * eta * VS / nbar / n ** 2)
    ok = np.isfinite(F) & (nbar > 0)
    ratio, a, _ = frame_vs_truth(F[ok], P[ok], U[ok], V[ok], floor[ok])
    return ratio, a


@pytest.fixture(scope="module")
def night():
    return S.night(CAM, N_EXP)


@pytest.fixture(scope="module")
def build(night):
    ims, truth = night
    return build_sky_frames(CAM, ims, CFG)


def test_sky_frame_close_to_injected_pattern(build, night):
    """Issue 10's target: within 1.5 x the noise floor of the injected pattern. Measured 1.45 with the
    defaults (1.03 when nothing is masked on an object-free night, so the floor and the comparison
    are right; the second pass's guide and the masked objects cost the rest). Masking at the
    reference's 2.5 sigma instead gave 1.72: its noise peaks bias the bins."""
    ratio, a = _accuracy(build, night[1])
    assert not build.rejected, build.rejected
    assert ratio < 1.5, ratio
    assert abs(a - 1) < 0.03, a


def test_unmasked_objects_print_through(build, night):
    """Without object masking the frame is further from the truth."""
    cfg = CFG.model_copy(update={"do_mask_objects": False, "n_passes": 1,
                                 "rejection": ExposureRejectionConfig(enabled=False)})
    unmasked = build_sky_frames(CAM, night[0], cfg)
    # with rejection on, the cut would take every exposure (each carries its objects' light): it is
    # not applied, and the result says so
    few = {e: night[0][e] for e in list(night[0])[:6]}
    warned = build_sky_frames(CAM, few, CFG.model_copy(update={"do_mask_objects": False, "n_passes": 1}))
    assert warned.rejected == {} and "would reject" in warned.warning
    with pytest.raises(SkyRejectionError, match="would reject"):
        strict = CFG.model_copy(deep=True, update={"do_mask_objects": False, "n_passes": 1})
        strict.rejection.on_mass_rejection = "fail"
        build_sky_frames(CAM, few, strict)
    # the per-bin clipped mean across exposures already drops most of the objects' light (1.86 x
    # the floor unmasked, measured); masking takes the rest
    assert _accuracy(unmasked, night[1])[0] > _accuracy(build, night[1])[0]


def test_surface_follows_linear_and_quadratic_gradients():
    """A noiseless +-10 % gradient over the focal plane is followed to 1e-5 (the former detector-sized
    cells left 1.35 % RMS on this focal plane); truth: the injected gradient."""
    rng = np.random.default_rng(3)
    for _ in range(3):
        params = S.random_gradient(rng, 0.10)
        models = {}
        for det in CAM.detectors:
            img = (2000.0 * (1 + S.large_scale(CAM, det, params))).astype(np.float32)
            models[det.id] = measure_sky_background(MaskedImage.from_image(img))
        surf = fit_surface(CAM, models, LargeScaleConfig())
        for det in CAM.detectors:
            truth = 2000.0 * (1 + S.large_scale(CAM, det, params))
            assert np.max(np.abs(surf.on_detector(CAM, det) / truth - 1)) < 1e-5


def test_weighted_least_squares_is_numpys_svd_solution():
    """The surface fit's solver (normal equations) against numpy.linalg.lstsq (an SVD) of the
    sqrt-weighted system, written out here: a 40-CCD-sized order-2 system with weights 0 for the
    clipped bins agrees to 1e-12 of the largest coefficient; an order-6 system on a narrow strip
    (condition number far above 1e8) and bins on one line (rank deficient) are left to the SVD."""
    from calib_core.sky.frames import _terms, weighted_lstsq

    rng = np.random.default_rng(7)
    n = 318_000
    a, b = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    w = rng.uniform(500, 1024, n) * (rng.random(n) > 0.05)            # 5 % clipped: weight 0
    for order, bb in [(2, b), (6, 0.01 * b), (2, 0.5 * a)]:
        A = _terms(order, a, bb)
        y = A @ rng.normal(0, 1, A.shape[1]) * 1000 + rng.normal(0, 1, n)
        ok = w > 0
        sw = np.sqrt(w[ok])
        want = np.linalg.lstsq(A[ok] * sw[:, None], y[ok] * sw, rcond=None)[0]
        got = weighted_lstsq(A, y, w)
        if order == 2 and bb is b:
            assert np.max(np.abs(got - want)) < 1e-12 * np.max(np.abs(want))
        else:   # ill conditioned: the SVD itself
            assert np.array_equal(got, want)


@pytest.mark.parametrize("orientation", [0, 1, 2, 3])
def test_surface_on_detector_is_the_design_matrix_evaluation(orientation):
    """The separable evaluation of a surface on a detector's pixels (or given columns and rows)
    gives the (pixels x terms) design-matrix evaluation it replaced, kept here as the reference, to
    float32 rounding, for every quarter-turn orientation; an order-3 surface."""
    from calib_core.sky.frames import SkySurface, _terms

    rng = np.random.default_rng(orientation)
    det = CAM.detectors[4].model_copy(update={"orientation": orientation, "x_mm": 3.0, "y_mm": -2.0})
    surf = SkySurface(rng.normal(0, 1, 10) * [2000, 50, 40, 9, 8, 7, 3, 2, 2, 1], 3, (0.5, -0.25), 20.0)
    for x, y in [(None, None), (np.array([0.0, 7.5, 100.0]), np.arange(0.0, det.ny, 37.0))]:
        xs = np.arange(det.nx, dtype=np.float64) if x is None else x
        ys = np.arange(det.ny, dtype=np.float64) if y is None else y
        gx, gy = np.meshgrid(xs, ys)
        u, v = CAM.pixel_to_focal_plane(det, gx, gy)
        a, b = (u - surf.centre[0]) / surf.half_size, (v - surf.centre[1]) / surf.half_size
        ref = (_terms(3, a, b) @ surf.coeffs).astype(np.float32)
        out = surf.on_detector(CAM, det, x, y)
        assert out.shape == ref.shape == (ys.size, xs.size)
        np.testing.assert_allclose(out, ref, rtol=1.2e-7, atol=0)


def test_held_out_structure_drops_tenfold_with_right_scale(build):
    held, _ = S.night(CAM, 3, seed0=900)
    q = sky_frame_quality(CAM, held, build.frames, CFG)
    assert q.rms_before > 5e-3
    assert q.improvement >= 10, q
    # truth of the scale: the frame carries the pattern at a (one scale), so the right one is 1/a
    for e, (before, after, scale, err) in q.per_exposure.items():
        assert after < before / 10
        assert scale == pytest.approx(1.0, abs=0.03)


def _with_defect(night, kind):
    """The night with one exposure spoiled: a cloud (patchy, 4 % RMS), a trail with broad wings, or
    the glow of a bright star near the focal plane."""
    ims, truth = night
    e = list(ims)[kind[1]]
    out = {k: v for k, v in ims.items()}
    out[e] = {}
    rng = np.random.default_rng(5)
    for det in CAM.detectors:
        mi = ims[e][det.id].copy()
        u, v = S._fp(CAM, det)
        if kind[0] == "cloud":
            f = np.zeros(u.shape)
            for _ in range(6):
                u0, v0, s = rng.uniform(-7, 7), rng.uniform(-13, 13), rng.uniform(3, 6)
                f += rng.uniform(-0.04, 0.04) * np.exp(-((u - u0) ** 2 + (v - v0) ** 2) / (2 * s * s))
            mi.image *= (1 + f).astype(np.float32)
        elif kind[0] == "trail":
            dist = np.abs(0.6 * u - 0.8 * v - 1.0)
            mi.image += (truth[e]["level"] * (0.5 * np.exp(-0.5 * (dist / 0.03) ** 2)
                                              + 0.008 * np.exp(-0.5 * (dist / 0.9) ** 2))).astype(np.float32)
        else:
            mi.image += (truth[e]["level"] * 0.06 * np.exp(-0.5 * (np.hypot(u - 9, v - 6) / 5.0) ** 2)).astype(np.float32)
        out[e][det.id] = mi
    return out, e


@pytest.mark.parametrize("kind", [("cloud", 2), ("glow", 8)])
def test_bad_exposure_rejected_and_good_ones_kept(night, kind):
    ims, bad = _with_defect(night, kind)
    res = build_sky_frames(CAM, ims, CFG)
    assert set(res.rejected) == {bad}, res.rejected
    assert res.rejected[bad]


def test_night_that_would_lose_most_exposures_is_refused():
    rng = np.random.default_rng(1)
    bbox = (0, 0, 255, 511)
    pattern = rng.normal(0, 0.01, (16, 8))
    models = {}
    for e in range(6):
        models[e] = {d: BackgroundModel((pattern + rng.normal(0, 3e-4, pattern.shape)
                                         + (rng.normal(0, 0.01, pattern.shape) if e < 4 else 0)).astype(np.float32),
                                        np.full(pattern.shape, 3e-4), np.full(pattern.shape, 1000.0), bbox)
                     for d in range(3)}
    with pytest.raises(SkyRejectionError, match="would reject [4-6] of 6 exposures"):
        find_outlier_exposures(models, ExposureRejectionConfig())
    assert find_outlier_exposures(models, ExposureRejectionConfig(enabled=False)) == {}
    assert find_outlier_exposures({e: models[e] for e in (0, 1)}, ExposureRejectionConfig()) == {}


def test_average_backgrounds_rules():
    bbox = (0, 0, 99, 63)
    rng = np.random.default_rng(0)
    vals = [rng.normal(1.0, 0.01, (2, 3)).astype(np.float32) for _ in range(7)]
    vals[0][0, 0] = 50.0          # clipped across exposures
    for v in vals:
        v[1, 2] = np.nan          # empty everywhere -> median of the other bins
    vals[3][0, 1] = np.nan        # ignored in that exposure only
    models = [BackgroundModel(v, np.full(v.shape, 0.01), np.full(v.shape, 100.0), bbox, "NATURAL_SPLINE")
              for v in vals]
    out = average_backgrounds(models)
    stack = np.array(vals, np.float64)
    assert out.values[0, 0] == pytest.approx(np.mean(stack[1:, 0, 0]), abs=1e-6)
    from bench.sky_accuracy import meanclip_rows

    col = stack[:, 0, 1][np.isfinite(stack[:, 0, 1])]
    assert out.values[0, 1] == pytest.approx(meanclip_rows(col[None, :])[0], abs=1e-6)  # NaN ignored
    assert out.values[1, 2] == pytest.approx(np.median(np.delete(out.values.ravel(), 5)), abs=1e-6)
    assert out.errors[0, 2] == pytest.approx(0.01 / np.sqrt(7), rel=1e-5)
    assert out.bbox == bbox and out.algorithm == "NATURAL_SPLINE" and out.meta["NCOMBINE"] == 7
    with pytest.raises(ValueError):
        average_backgrounds([models[0], BackgroundModel(vals[1], None, None, (0, 0, 99, 64))])


def test_measure_scale_boxes_order_and_limits():
    h, w = 10, 9
    img = np.zeros((h, w), np.float32)
    xl = np.linspace(0, w, 5).astype(int)
    yl = np.linspace(0, h, 5).astype(int)
    for i in range(4):
        for j in range(4):
            img[yl[j]:yl[j + 1], xl[i]:xl[i + 1]] = 10 * i + j
    samples, sky = measure_scale(MaskedImage.from_image(img), img)
    assert list(samples) == [10 * i + j for i in range(4) for j in range(4)]  # x outer, y inner
    assert np.array_equal(samples, sky)


def test_scale_recovered_within_error(build):
    """An image = s * frame + noise: the pooled least-squares scale recovers s within its error."""
    rng = np.random.default_rng(11)
    s_true, sigma = 4321.0, np.sqrt(4321.0 + S.READ_NOISE ** 2)
    samples = []
    for k, frame in build.frames.items():
        sky = frame.evaluate()
        img = s_true * sky + rng.normal(0, sigma, sky.shape)
        if k == 4:
            img[10:40, 10:40] += 3000.0   # an unmasked object: its sample is rejected
        samples.append(measure_scale(MaskedImage.from_image(img.astype(np.float32)), sky))
    sol = solve_scales(samples)
    assert abs(sol.scale - s_true) < 3 * sol.error
    assert sol.n_used < sol.n_total == 16 * len(build.frames)
    mi = MaskedImage.from_image(np.ones((4, 4)))
    subtract_sky_frame(mi, np.full((4, 4), 0.5), 2.0)
    assert np.allclose(mi.image, 0.0)


def test_sky_frame_fits_round_trip(build, tmp_path):
    frame = build.frames[4]
    frame.to_fits(tmp_path / "sky.fits")
    back = BackgroundModel.from_fits(tmp_path / "sky.fits")
    assert back.algorithm == "NATURAL_SPLINE" and back.bbox == (0, 0, 255, 511)
    assert back.values.shape == (16, 8)
    assert np.array_equal(back.evaluate(), frame.evaluate())
