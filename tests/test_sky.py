"""Sky frames (ALGORITHMS.md 4.5, 5.1) on a simulated night of post-ISR democam_mini exposures
(tests/_skysim.py): recovery of the injected pattern at the noise floor, print-through of
unmasked objects, exposure rejection, the scale fit, and the held-out quality score."""

import numpy as np
import pytest

from tests import _skysim as S
from calib_core.background import BackgroundModel
from calib_core.focalplane import FocalPlaneBackgroundConfig
from calib_core.maskedimage import MaskedImage
from calib_core.sky import (ExposureRejectionConfig, SkyConfig, average_backgrounds, build_sky_frames,
                            find_outlier_exposures, fit_and_subtract_sky, mask_detector, measure_scale,
                            solve_scales, subtract_sky_frame)
from calib_core.skyquality import detrend, sky_frame_quality

N_EXP = 12
CAM = S.camera()
# cells of 512 px (7.68 mm): as with HSC's 8192-px cells, the focal-plane model is coarser than a
# detector, so the detector-scale pattern is left for the sky frame
CFG = SkyConfig(large_scale=FocalPlaneBackgroundConfig(x_size=7.68, y_size=7.68))


def _no_reject(cfg):
    return cfg.model_copy(update={"rejection": ExposureRejectionConfig(enabled=False)})


@pytest.fixture(scope="module")
def night():
    """The noisy night (objects masked once, here, with the build's own masking step), the same
    exposures without noise and objects but with the same masks, and the raw noisy images."""
    raw, truth = S.night(CAM, N_EXP)
    clean, _ = S.night(CAM, N_EXP, objects=False, noise=False)
    masked = {}
    for e, dets in raw.items():
        masked[e] = {}
        for d, mi in dets.items():
            m = mi.copy()
            mask_detector(m, CFG)
            masked[e][d] = m
            clean[e][d].mask[:] = m.mask
    return raw, masked, clean, truth


@pytest.fixture(scope="module")
def builds(night):
    raw, masked, clean, _ = night
    off = CFG.model_copy(update={"do_mask_objects": False})
    result = build_sky_frames(CAM, masked, off)
    # the truth: the same build on noiseless, object-free images with the same masks; plain means
    # (clipping noiseless in-bin structure would bias the truth, not the estimate)
    tcfg = _no_reject(off).model_copy(deep=True)
    tcfg.large_scale.statistic = "MEAN"
    tcfg.sky.background.statistic = "MEAN"
    truth = build_sky_frames(CAM, clean, tcfg)
    unmasked = build_sky_frames(CAM, raw, _no_reject(off))
    return result, truth, unmasked


def _rms_vs_truth(result, truth):
    d = np.concatenate([detrend(result.frames[k].values - truth.frames[k].values).ravel()
                        for k in result.frames])
    return float(np.sqrt(np.nanmean(d ** 2)))


def _floor(result):
    """Data-derived noise floor of the averaged bins (see the test docstring)."""
    var = [np.sum([result.residuals[e][k].errors.astype(np.float64) ** 2 for e in result.used], axis=0)
           / len(result.used) ** 2 for k in result.frames]
    return float(np.sqrt(np.nanmean(np.concatenate([v.ravel() for v in var]))))


def test_sky_frame_matches_injected_pattern_at_noise_floor(builds, night):
    """Residual of the recovered frame against the injected pattern, within 1.5x the noise floor.

    Noise floor: a 32x32-px bin of exposure j holds n_j ~ 1024 (1 - f_masked) usable pixels of
    noise sqrt(S_j + rn^2) e- on a sky S_j ~ L_j, so after the division by the exposure's scale
    (~L_j) its MEANCLIP has a relative error e_j ~ sqrt(L_j + rn^2) / L_j / sqrt(n_j) (the 3-sigma
    clip costs ~1-3% in efficiency). The frame is a per-bin (clipped) mean over N exposures, so its
    error is sqrt(sum_j e_j^2) / N. For L in [3000, 6000], N = 12: ~1.7e-4. The test uses the
    per-bin errors the build itself reports (so masking losses are included) and checks them
    against this analytic value. Structure the focal-plane model absorbs (a plane per detector)
    is removed from the difference first (:func:`calib_core.skyquality.detrend`).
    """
    result, truth, _ = builds
    floor = _floor(result)
    levels = np.array([night[3][e]["level"] for e in result.used])
    analytic = np.sqrt(np.sum((levels + S.READ_NOISE ** 2) / levels ** 2 / 1024.0)) / len(levels)
    assert analytic < floor < 1.4 * analytic
    rms = _rms_vs_truth(result, truth)
    assert rms < 1.5 * floor, (rms, floor)
    assert result.rejected == {}
    # the truth is the injected pattern (seen through the same pipeline): strongly correlated
    for k in (0, 4, 8):
        det = CAM.detector(k)
        p = S.pattern(det)
        fr = truth.frames[k]
        binned = np.array([[p[fr.y_edges[j]:fr.y_edges[j + 1], fr.x_edges[i]:fr.x_edges[i + 1]].mean()
                            for i in range(fr.values.shape[1])] for j in range(fr.values.shape[0])])
        c = np.corrcoef(detrend(binned).ravel(), detrend(fr.values).ravel())[0, 1]
        assert c > 0.95
        # and so is the recovered frame, at full resolution too
        full = result.frames[k].evaluate()
        assert np.corrcoef(full.ravel(), p.ravel())[0, 1] > 0.9


def test_unmasked_objects_print_through(builds):
    """The same build without object masking is clearly worse (stars and galaxy wings print
    through the per-bin clipped means)."""
    result, truth, unmasked = builds
    good = _rms_vs_truth(result, truth)
    bad = _rms_vs_truth(unmasked, truth)
    assert bad > 1.3 * good, (bad, good)
    assert bad > 1.5 * _floor(result)


def test_in_build_masking_equals_premasked(night):
    raw, masked, _, _ = night
    few = list(raw)[:3]
    a = build_sky_frames(CAM, {e: raw[e] for e in few}, _no_reject(CFG))
    b = build_sky_frames(CAM, {e: masked[e] for e in few},
                         _no_reject(CFG).model_copy(update={"do_mask_objects": False}))
    for k in a.frames:
        assert np.array_equal(a.frames[k].values, b.frames[k].values)
    assert a.scales == b.scales
    # inputs untouched
    assert not np.any(raw[few[0]][0].mask & ~np.int32(S.mask_bits(["SAT"])))


def test_two_pass_build_runs_and_agrees(night):
    raw, _, _, _ = night
    few = {e: raw[e] for e in list(raw)[:4]}
    one = build_sky_frames(CAM, few, _no_reject(CFG))
    two = build_sky_frames(CAM, few, _no_reject(CFG).model_copy(update={"n_passes": 2}))
    d = np.concatenate([detrend(two.frames[k].values - one.frames[k].values).ravel() for k in one.frames])
    sig = np.concatenate([detrend(one.frames[k].values).ravel() for k in one.frames])
    assert 0 < np.sqrt(np.nanmean(d ** 2)) < 0.2 * np.sqrt(np.nanmean(sig ** 2))


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
    from calib_core.stats import clipped_mean

    assert out.values[0, 1] == pytest.approx(clipped_mean(stack[:, 0, 1]).mean, abs=1e-6)  # NaN ignored
    assert out.values[1, 2] == pytest.approx(np.median(np.delete(out.values.ravel(), 5)), abs=1e-6)
    assert out.bbox == bbox and out.algorithm == "NATURAL_SPLINE" and out.meta["NCOMBINE"] == 7
    with pytest.raises(ValueError):
        average_backgrounds([models[0], BackgroundModel(vals[1], None, None, (0, 0, 99, 64))])


def test_outlier_exposures_rejected_with_reason():
    rng = np.random.default_rng(1)
    bbox = (0, 0, 255, 511)
    pattern = rng.normal(0, 0.01, (16, 8))
    models = {}
    for e in range(10):
        models[e] = {d: BackgroundModel((pattern + rng.normal(0, 3e-4, pattern.shape)).astype(np.float32),
                                        None, None, bbox) for d in range(3)}
    # exposure 7: stray light on one detector, 0.3% RMS (below the absolute cut)
    models[7][1].values += (0.006 * np.sin(np.arange(16) / 2.0))[:, None].astype(np.float32)
    # exposure 9: 1% RMS structure everywhere (above the absolute cut)
    for d in range(3):
        models[9][d].values += rng.normal(0, 0.01, pattern.shape).astype(np.float32)
    rej = find_outlier_exposures(models, ExposureRejectionConfig())
    assert set(rej) == {7, 9}
    assert "max_rms" in rej[9] and "robust sigma" in rej[7]
    assert find_outlier_exposures(models, ExposureRejectionConfig(enabled=False)) == {}
    assert find_outlier_exposures({e: models[e] for e in (0, 1)}, ExposureRejectionConfig()) == {}


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


def test_scale_recovered_within_error(builds):
    """An image = s * frame + noise: the pooled least-squares scale recovers s within its error."""
    result = builds[0]
    rng = np.random.default_rng(11)
    s_true, sigma = 4321.0, np.sqrt(4321.0 + S.READ_NOISE ** 2)
    images, samples = {}, []
    for k, frame in result.frames.items():
        sky = frame.evaluate()
        img = s_true * sky + rng.normal(0, sigma, sky.shape)
        if k == 4:
            img[10:40, 10:40] += 3000.0   # an unmasked object: its sample is rejected
        images[k] = MaskedImage.from_image(img.astype(np.float32))
        samples.append(measure_scale(images[k], sky))
    sol = solve_scales(samples)
    assert abs(sol.scale - s_true) < 3 * sol.error
    assert sol.error < 0.02 * s_true
    assert sol.n_used < sol.n_total == 16 * len(result.frames)
    sol2 = fit_and_subtract_sky(images, result.frames)
    assert sol2.scale == pytest.approx(sol.scale)
    assert abs(float(np.mean(images[0].image))) < 20 * sigma / np.sqrt(images[0].image.size) + 5
    mi = MaskedImage.from_image(np.ones((4, 4)))
    subtract_sky_frame(mi, np.full((4, 4), 0.5), 2.0)
    assert np.allclose(mi.image, 0.0)


def test_held_out_structure_drops_tenfold(builds):
    result = builds[0]
    held_out, _ = S.night(CAM, 3, seed0=900)
    q = sky_frame_quality(CAM, held_out, result.frames, CFG)
    assert q.improvement >= 10, q
    assert q.rms_before > 5e-3
    for e, (before, after, scale, err) in q.per_exposure.items():
        assert after < before / 5
        assert scale > 0 and err < 0.05 * scale


def test_sky_frame_fits_round_trip(builds, tmp_path):
    frame = builds[0].frames[4]
    frame.to_fits(tmp_path / "sky.fits")
    back = BackgroundModel.from_fits(tmp_path / "sky.fits")
    assert back.algorithm == "NATURAL_SPLINE" and back.bbox == (0, 0, 255, 511)
    assert back.values.shape == (16, 8)
    assert np.array_equal(back.evaluate(), frame.evaluate())
