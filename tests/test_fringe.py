"""Fringe preparation (docs/algorithms.md#fringe-preparation)."""

import numpy as np
import pytest

from calib_core.builds.fringe import FringeConfig, prepare_fringe
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.stats.clipped import clipped_mean


def _image(seed=0, h=512, w=384, level=1500.0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    fringe = 0.01 * np.sin(xx / 7.0 + yy / 11.0)
    smooth = 0.04 * level * (xx / w) - 0.02 * level * (yy / h) ** 2
    img = level * (1 + fringe) + smooth
    stars = [(rng.uniform(20, w - 20), rng.uniform(20, h - 20)) for _ in range(15)]
    for x0, y0 in stars:
        img += 2e4 / (2 * np.pi * 1.5 ** 2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 1.5 ** 2))
    var = img + 16.0
    img = img + rng.normal(size=img.shape) * np.sqrt(var)
    return MaskedImage(img.astype(np.float32), np.zeros(img.shape, np.int32), var.astype(np.float32)), fringe, stars


def test_prepare_fringe_normalises_and_removes_background():
    mi, fringe, stars = _image()
    before = mi.copy()
    out, level = prepare_fringe(mi)
    assert np.array_equal(mi.image, before.image) and np.array_equal(mi.mask, before.mask)
    ref = clipped_mean(mi.image, mi.mask, mask_bits(["DETECTED", "BAD", "NO_DATA"])).mean
    assert level == pytest.approx(ref, rel=1e-9)
    det = (out.mask & mask_bits(["DETECTED"])) != 0
    for x0, y0 in stars:
        assert det[int(round(y0)), int(round(x0))]
    assert det.mean() < 0.1                    # fringes themselves are far below 5 sigma
    good = ~det
    resid = out.image[good] - fringe[good]
    assert abs(np.mean(resid)) < 5e-4           # background gone, normalised to the level
    assert np.corrcoef(out.image[good], fringe[good])[0, 1] > 0.25
    # variance scaled by level^2
    assert np.allclose(out.variance, mi.variance / np.float32(level) ** 2, rtol=1e-5)


def test_prepare_fringe_rejects_empty_image():
    mi = MaskedImage.from_image(np.zeros((64, 64)))
    mi.mask[:] = mask_bits(["BAD"])
    with pytest.raises(ValueError, match="level"):
        prepare_fringe(mi)


def test_fringe_config_defaults():
    cfg = FringeConfig()
    assert cfg.subtract_background.bin_size == 128 and cfg.subtract_background.use_approx
    assert cfg.subtract_background.algorithm == "AKIMA_SPLINE"
    assert (cfg.detection.sigma, cfg.detection.threshold, cfg.detection.n_sigma_to_grow) == (1.0, 5.0, 2.4)


def _fringe_night(n=10, spread=0.2, seed=3, h=256, w=256, sigma=0.02):
    """Prepared inputs y_j = c_j F + K + noise: fringes F (waves of 20-60 px, rms 1.5 %) whose
    amplitude c_j varies by ``spread`` (uniform, relative) about 1, and a continuum pattern K common to
    every input (waves of 100-300 px and a ring 25 px wide, rms ~2 %), the noise ``sigma`` (2 %) per pixel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)

    def waves(k, lo, hi):
        out = np.zeros((h, w))
        for lam, ang, ph in zip(rng.uniform(lo, hi, k), rng.uniform(0, np.pi, k), rng.uniform(0, 2 * np.pi, k)):
            out += np.cos(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / lam + ph)
        return out / out.std()

    F = 0.015 * waves(5, 20, 60)
    K = 0.015 * waves(6, 100, 300) + 0.03 * np.exp(-(np.hypot(xx - 100, yy - 140) - 60) ** 2 / (2 * 25 ** 2))
    c = 1 + spread * rng.uniform(-1, 1, n)
    inputs = [MaskedImage((cj * F + K + sigma * rng.standard_normal((h, w))).astype(np.float32),
                          np.zeros((h, w), np.int32), np.full((h, w), sigma ** 2, np.float32)) for cj in c]
    return inputs, F, K, c, sigma


def test_remove_continuum_takes_the_pattern_out_and_keeps_the_fringes():
    from calib_core.builds.bias_dark_flat import combine_calib
    from calib_core.builds.fringe import remove_continuum

    inputs, F, K, c, sigma = _fringe_night()
    frame = combine_calib(inputs)[0]
    out, info = remove_continuum(frame, inputs)
    assert info["applied"] and info["n_inputs"] == 10 and 0.9 < info["shrink"] <= 1
    noise = sigma / np.sqrt(len(inputs))
    before = (frame.image - c.mean() * F).std()
    after = out.image - c.mean() * F
    after = (after - after.mean()).std()
    # measured 2.5 -> 1.16 x the stack's noise (the rest: the ring below the 32-px bins and the
    # correction's own noise, which the spread of the amplitudes, 9 %, sets)
    assert before > 2 * noise                     # the stack carries the continuum's pattern
    assert after < 1.25 * noise, (before / noise, after / noise)
    # the fringes keep their amplitude: one scale fits, at 1 within 1.5 %
    a = np.sum(out.image * F) / np.sum(F * F)
    assert a == pytest.approx(c.mean(), rel=0.015)
    assert np.all(out.variance >= frame.variance)  # the correction's noise is accounted for


def test_remove_continuum_leaves_no_continuum_on_the_sky_frame_bins():
    """What the z sky frame sees of the fringe frame: its 32-px bin means. Against the injected
    pattern, with noise 10x lower than the night above so that only the method's own error is left:
    the continuum the frame keeps there is below 2 % of the continuum's RMS and not correlated with it
    (a spline through the bin means at the bin centres kept 8 % of it, 5.7 % correlated)."""
    from calib_core.builds.bias_dark_flat import combine_calib
    from calib_core.builds.fringe import remove_continuum

    inputs, F, K, c, _ = _fringe_night(sigma=0.002)
    out, _ = remove_continuum(combine_calib(inputs)[0], inputs)

    def bins(a, b=32):
        h, w = a.shape
        m = a.reshape(h // b, b, w // b, b).mean(axis=(1, 3))
        return m - m.mean()

    err, kb = bins(out.image - c.mean() * F), bins(K)
    assert err.std() < 0.02 * kb.std(), (err.std(), kb.std())
    assert abs(np.sum(err * kb) / np.sum(kb * kb)) < 0.01


def test_remove_continuum_keeps_the_reference_frame_when_it_cannot_separate():
    from calib_core.builds.bias_dark_flat import combine_calib
    from calib_core.builds.fringe import FringeContinuumConfig, remove_continuum

    inputs, *_ = _fringe_night(spread=0.0)          # fringes follow the continuum exactly
    frame = combine_calib(inputs)[0]
    out, info = remove_continuum(frame, inputs)
    assert not info["applied"] and "do not vary" in info["reason"]
    assert np.array_equal(out.image, frame.image)
    out, info = remove_continuum(frame, inputs[:4])
    assert not info["applied"] and "fewer than 5" in info["reason"]
    out, info = remove_continuum(frame, inputs, FringeContinuumConfig(enabled=False))
    assert not info["applied"] and info["reason"] == "disabled"


def _input_amplitudes_numpy(inputs, shape, bits, lab, nb):
    """remove_continuum's step 1 as NumPy did it before its numba kernels (commit 256320a): the
    reference for calib_core.builds.fringe._input_amplitudes."""
    n = len(inputs)

    def bsum(values, where):
        return np.bincount(lab, np.where(where, values, 0.0).ravel(), nb)

    def usable(mi):
        return ((mi.mask & bits) == 0) & np.isfinite(mi.image) & np.isfinite(mi.variance)

    total, count = np.zeros(shape), np.zeros(shape)
    for mi in inputs:
        ok = usable(mi)
        total += np.where(ok, mi.image, 0.0)
        count += ok
    amp, amp_var, ybin, vbin = np.zeros(n), np.zeros(n), np.full((n, nb), np.nan), np.full((n, nb), np.nan)
    for j, mi in enumerate(inputs):
        ok = usable(mi)
        y = np.where(ok, mi.image, 0.0).astype(np.float64)
        k = bsum(np.ones(shape), ok)
        with np.errstate(invalid="ignore", divide="ignore"):
            ybin[j] = np.where(k > 0, bsum(y, ok) / k, np.nan)
            vbin[j] = np.where(k > 0, bsum(mi.variance.astype(np.float64), ok) / k ** 2, np.nan)
        others = count - ok
        both = ok & (others > 0)
        ref = np.where(both, (total - y) / np.maximum(others, 1), 0.0)
        kb = np.maximum(bsum(np.ones(shape), both), 1)
        dref = np.where(both, ref - (bsum(ref, both) / kb)[lab].reshape(shape), 0.0)
        dy = np.where(both, y - (bsum(y, both) / kb)[lab].reshape(shape), 0.0)
        norm = float(np.sum(dref * dref))
        amp[j] = float(np.sum(dy * dref)) / norm
        amp_var[j] = float(np.sum(np.where(both, mi.variance, 0.0) * dref * dref)) / norm ** 2
    return amp, amp_var, ybin, vbin


def test_input_amplitudes_are_the_numpy_formulation_to_the_bit():
    """The numba kernels of remove_continuum's step 1 give the NumPy formulation's amplitudes, their
    variances and the inputs' bin means and variances bit for bit, with masked, NaN and zero-variance
    pixels, a whole bin masked in one input and pixels only one input has."""
    from calib_core.builds.fringe import FringeContinuumConfig, _bin_labels, _input_amplitudes

    inputs, _, _, _, _ = _fringe_night(n=6, h=200, w=136)
    rng = np.random.default_rng(9)
    bad = mask_bits(["BAD"])
    for j, mi in enumerate(inputs):
        mi.mask[rng.random(mi.shape) < 0.03] |= bad
        mi.image[rng.random(mi.shape) < 0.01] = np.nan
        mi.variance[rng.random(mi.shape) < 0.01] = np.inf
        mi.variance[rng.random(mi.shape) < 0.01] *= rng.uniform(0.5, 2.0)
    inputs[2].mask[:40, :40] |= bad                      # a bin (and more) masked in one input
    for mi in inputs[1:]:
        mi.mask[150:152, 100:110] |= bad                 # pixels only input 0 has
    cfg = FringeContinuumConfig()
    bits = mask_bits(cfg.mask)
    lab, xe, ye = _bin_labels(inputs[0].shape, cfg.bin_size)
    nb = (len(xe) - 1) * (len(ye) - 1)
    ref = _input_amplitudes_numpy(inputs, inputs[0].shape, bits, lab, nb)
    got = _input_amplitudes(inputs, inputs[0].shape, bits, lab, nb)
    for r, g in zip(ref, got):
        assert np.array_equal(r, g, equal_nan=True)
    assert np.isnan(got[2][2]).any() and np.isfinite(got[2]).sum() > got[2].size // 2
