"""ISR on hand-built raw detectors whose truth is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from calib_core.camera import Amplifier, Detector
from calib_core.io.raw import RawAmp, RawDetector
from calib_core.isr.process import IsrConfig, IsrError, fit_fringe_scale, overscan_correction, run_isr
from calib_core.maskedimage import MaskedImage, mask_bits

SAT, BAD, NO_DATA = mask_bits(["SAT"]), mask_bits(["BAD"]), mask_bits(["NO_DATA"])
NY, NXA, NOS = 20, 10, 6
GAINS, RNS, LEVELS = (1.5, 2.0), (4.0, 6.0), (1000.0, 1200.0)


def make_raw(truth, drift=None, overscan_rows=False, noise_rng=None):
    """Two amplifiers side by side; amp B is read out from the right (stored mirrored).

    truth: (NY, 2*NXA) signal in ADU. drift: per-row (or per-column, for overscan rows) offset
    common to data and overscan of each amplifier."""
    det = Detector(id=0, name="ccd", nx=2 * NXA, ny=NY, amplifiers=[
        Amplifier(name="A", gain=GAINS[0], read_noise=RNS[0], saturation=60000),
        Amplifier(name="B", gain=GAINS[1], read_noise=RNS[1], saturation=60000)])
    if not overscan_rows:
        raw = np.zeros((NY, 2 * (NXA + NOS)), np.float32)
        d = np.zeros(NY) if drift is None else np.asarray(drift)
        # A: data 0:10, overscan 10:16 ; B: overscan 16:22, data 22:32 (mirrored)
        raw[:, 0:NXA] = truth[:, :NXA] + LEVELS[0] + d[:, None]
        raw[:, NXA:NXA + NOS] = LEVELS[0] + d[:, None]
        raw[:, NXA + NOS:NXA + 2 * NOS] = LEVELS[1] + d[:, None]
        raw[:, NXA + 2 * NOS:] = truth[:, NXA:][:, ::-1] + LEVELS[1] + d[:, None]
        amps = [
            RawAmp(det.amplifiers[0], raw, (slice(0, NY), slice(0, NXA)), (slice(0, NY), slice(NXA, NXA + NOS)), 1,
                   (slice(0, NY), slice(0, NXA)), False, False, GAINS[0], RNS[0], 60000.0),
            RawAmp(det.amplifiers[1], raw, (slice(0, NY), slice(NXA + 2 * NOS, 2 * NXA + 2 * NOS)),
                   (slice(0, NY), slice(NXA + NOS, NXA + 2 * NOS)), 1,
                   (slice(0, NY), slice(NXA, 2 * NXA)), True, False, GAINS[1], RNS[1], 60000.0),
        ]
    else:
        # overscan rows below the data of each amplifier: one level per column
        raw = np.zeros((NY + NOS, 2 * NXA), np.float32)
        d = np.zeros(2 * NXA) if drift is None else np.asarray(drift)
        raw[:NY, :NXA] = truth[:, :NXA] + LEVELS[0] + d[None, :NXA]
        raw[NY:, :NXA] = LEVELS[0] + d[None, :NXA]
        raw[:NY, NXA:] = truth[:, NXA:] + LEVELS[1] + d[None, NXA:]
        raw[NY:, NXA:] = LEVELS[1] + d[None, NXA:]
        amps = [
            RawAmp(det.amplifiers[0], raw, (slice(0, NY), slice(0, NXA)), (slice(NY, NY + NOS), slice(0, NXA)), 0,
                   (slice(0, NY), slice(0, NXA)), False, False, GAINS[0], RNS[0], 60000.0),
            RawAmp(det.amplifiers[1], raw, (slice(0, NY), slice(NXA, 2 * NXA)), (slice(NY, NY + NOS), slice(NXA, 2 * NXA)), 0,
                   (slice(0, NY), slice(NXA, 2 * NXA)), False, False, GAINS[1], RNS[1], 60000.0),
        ]
    if noise_rng is not None:
        raw += noise_rng.normal(0, 3, raw.shape).astype(np.float32)
    return RawDetector(detector=det, amps=amps, shape=(NY, 2 * NXA), header=fits.Header())


def truth_image(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 500, (NY, 2 * NXA)).astype(np.float32)


ONLY_OVERSCAN = dict(do_bias=False, do_dark=False, do_flat=False, do_variance=False)


@pytest.mark.parametrize("fit", ["MEDIAN", "MEAN", "MEANCLIP"])
def test_scalar_overscan_and_assembly_with_flip(fit):
    truth = truth_image()
    mi = run_isr(make_raw(truth), IsrConfig(overscan_fit_type=fit, **ONLY_OVERSCAN))
    np.testing.assert_allclose(mi.image, truth, atol=1e-3)
    assert mi.image.dtype == np.float32 and mi.mask.dtype == np.int32 and not mi.mask.any()


@pytest.mark.parametrize("fit", ["MEDIAN_PER_ROW", "MEAN_PER_ROW"])
def test_per_row_overscan_removes_row_drift(fit):
    truth = truth_image(1)
    drift = 5 * np.sin(np.arange(NY) / 3.0)
    mi = run_isr(make_raw(truth, drift), IsrConfig(overscan_fit_type=fit, **ONLY_OVERSCAN))
    np.testing.assert_allclose(mi.image, truth, atol=1e-3)
    # a scalar fit leaves the drift in
    flat = run_isr(make_raw(truth, drift), IsrConfig(overscan_fit_type="MEDIAN", **ONLY_OVERSCAN))
    assert np.abs(flat.image - truth).max() > 1.0


def test_poly_overscan_follows_a_linear_drift():
    truth = truth_image(2)
    drift = 0.7 * np.arange(NY) - 3.0
    mi = run_isr(make_raw(truth, drift), IsrConfig(overscan_fit_type="POLY", overscan_order=1, **ONLY_OVERSCAN))
    np.testing.assert_allclose(mi.image, truth, atol=1e-3)


def test_overscan_rows_give_per_column_levels():
    truth = truth_image(3)
    drift = np.linspace(-4, 4, 2 * NXA)
    mi = run_isr(make_raw(truth, drift, overscan_rows=True),
                 IsrConfig(overscan_fit_type="MEDIAN_PER_ROW", **ONLY_OVERSCAN))
    np.testing.assert_allclose(mi.image, truth, atol=1e-3)


def test_meanclip_overscan_ignores_a_hot_column():
    truth = truth_image(4)
    raw = make_raw(truth, noise_rng=np.random.default_rng(0))
    raw.amps[0].raw[:, NXA] += 500.0   # a bad overscan column of amp A
    med = overscan_correction(raw.amps[0], IsrConfig(overscan_fit_type="MEANCLIP"))
    mean = overscan_correction(raw.amps[0], IsrConfig(overscan_fit_type="MEAN"))
    assert abs(float(np.mean(med - truth[:, :NXA]))) < 1.5
    assert float(np.mean(mean - truth[:, :NXA])) < -50


def test_saturation_is_flagged_from_raw_adu():
    truth = truth_image(5)
    raw = make_raw(truth)
    raw.amps[1].raw[3, NXA + 2 * NOS + 0] = 60000.0   # first stored column of B = last detector column
    mi = run_isr(raw, IsrConfig(**ONLY_OVERSCAN))
    assert mi.mask[3, 2 * NXA - 1] == SAT
    assert (mi.mask != 0).sum() == 1


def test_variance_per_amplifier():
    truth = truth_image(6)
    truth[0, 0] = -20.0   # negative signal: Poisson term clipped at 0
    mi = run_isr(make_raw(truth), IsrConfig(do_bias=False, do_dark=False, do_flat=False))
    g = np.where(np.arange(2 * NXA) < NXA, GAINS[0], GAINS[1])[None, :]
    rn = np.where(np.arange(2 * NXA) < NXA, RNS[0], RNS[1])[None, :]
    expected = np.maximum(truth, 0) / g + (rn / g) ** 2
    np.testing.assert_allclose(mi.variance, expected, rtol=1e-4)


def test_bias_dark_flat_fringe_chain_and_propagation():
    rng = np.random.default_rng(7)
    truth = truth_image(7) + 1000
    shape = truth.shape
    bias = MaskedImage(rng.normal(0, 2, shape), np.zeros(shape, np.int32), np.full(shape, 0.5))
    bias.mask[1, 1] = BAD
    dark = MaskedImage(rng.uniform(0, 0.1, shape), np.zeros(shape, np.int32), np.full(shape, 1e-4))
    flat = MaskedImage(rng.uniform(0.8, 1.2, shape), np.zeros(shape, np.int32), np.full(shape, 1e-6))
    fringe = MaskedImage(rng.normal(0, 1, shape), np.zeros(shape, np.int32), np.zeros(shape))
    darktime, fscale = 30.0, 4.0
    raw_signal = truth + bias.image + darktime * dark.image + fscale * fringe.image
    config = IsrConfig(do_fringe=True, fringe_after_flat=False)
    mi = run_isr(make_raw(raw_signal.astype(np.float32)), config, bias=bias, dark=dark, flat=flat,
                 fringe=fringe, darktime=darktime, fringe_scale=fscale)
    np.testing.assert_allclose(mi.image, truth / flat.image, rtol=1e-5)
    assert mi.mask[1, 1] == BAD
    # variance: poisson+read on the bias-subtracted signal, + bias, + darktime^2 dark var, then / flat^2
    g = np.where(np.arange(2 * NXA) < NXA, GAINS[0], GAINS[1])[None, :]
    rn = np.where(np.arange(2 * NXA) < NXA, RNS[0], RNS[1])[None, :]
    after_bias = raw_signal - bias.image
    v = np.maximum(after_bias, 0) / g + (rn / g) ** 2 + 0.5 + darktime ** 2 * 1e-4
    a = truth
    expected = (v + a ** 2 * 1e-6 / flat.image ** 2) / flat.image ** 2
    np.testing.assert_allclose(mi.variance, expected, rtol=1e-4)
    # the fringe scale is fitted when not given (on a flat sky, so nothing else correlates with it)
    sky = np.full(shape, 1500.0)
    raw_sky = sky + bias.image + darktime * dark.image + fscale * fringe.image
    mi2 = run_isr(make_raw(raw_sky.astype(np.float32)), config, bias=bias, dark=dark, flat=flat,
                  fringe=fringe, darktime=darktime)
    np.testing.assert_allclose(mi2.image, sky / flat.image, rtol=1e-4)
    # the default (ip_isr fringe_after_flat): the fringe frame is in flat-fielded units
    raw_after = (sky + fscale * fringe.image) * flat.image + bias.image + darktime * dark.image
    mi3 = run_isr(make_raw(raw_after.astype(np.float32)), IsrConfig(do_fringe=True), bias=bias, dark=dark,
                  flat=flat, fringe=fringe, darktime=darktime)
    np.testing.assert_allclose(mi3.image, sky, rtol=1e-4)


def test_fit_fringe_scale_with_sky_offset_and_masks():
    rng = np.random.default_rng(8)
    f = rng.normal(0, 1, (50, 50)).astype(np.float32) + 0.3
    img = MaskedImage.from_image(500 + 2.5 * f + rng.normal(0, 0.01, f.shape))
    img.image[0, :] = 1e6
    img.mask[0, :] = BAD
    assert fit_fringe_scale(img, f, BAD) == pytest.approx(2.5, abs=1e-3)


def test_dark_scaling_uses_dark_darktime():
    truth = truth_image(9)
    dark = MaskedImage.from_image(np.ones(truth.shape, np.float32))
    raw = make_raw(truth + 60.0)
    mi = run_isr(raw, IsrConfig(do_bias=False, do_flat=False, do_variance=False), dark=dark, darktime=120.0,
                 dark_darktime=2.0)
    np.testing.assert_allclose(mi.image, truth, atol=1e-3)


def test_missing_calibrations_and_bad_shapes_are_clear_errors():
    raw = make_raw(truth_image())
    with pytest.raises(IsrError, match="do_bias is set but no bias"):
        run_isr(raw, IsrConfig(do_dark=False, do_flat=False))
    with pytest.raises(IsrError, match="bias has shape"):
        run_isr(raw, IsrConfig(do_dark=False, do_flat=False), bias=np.zeros((3, 3)), path="raw1.fits")
    with pytest.raises(IsrError, match="dark time"):
        run_isr(raw, IsrConfig(do_bias=False, do_flat=False), dark=np.zeros(raw.shape))
    with pytest.raises(IsrError, match="no flat"):
        run_isr(raw, IsrConfig(do_bias=False, do_dark=False))
    with pytest.raises(IsrError, match="defect mask"):
        run_isr(raw, IsrConfig(**ONLY_OVERSCAN), defects=np.zeros((2, 2)))
    with pytest.raises(ValueError):
        IsrConfig(overscan_fit_type="SPLINE")


def test_defects_and_unassembled_output():
    truth = truth_image(10)
    defects = np.zeros(truth.shape, bool)
    defects[4, 5] = True
    mi = run_isr(make_raw(truth), IsrConfig(**ONLY_OVERSCAN), defects=defects)
    assert mi.mask[4, 5] == BAD
    raw = make_raw(truth)
    un = run_isr(raw, IsrConfig(do_assemble=False, **ONLY_OVERSCAN))
    assert un.shape == raw.amps[0].raw.shape
    np.testing.assert_allclose(un.image[:, :NXA], truth[:, :NXA], atol=1e-3)


def _fringe_scene(seed=21):
    """A 256-px image with 30-50 px fringes, a 5 % sky bump, a gradient and 12 unmasked bright
    stars: (image, frame, true scale, the fit's statistical error)."""
    rng = np.random.default_rng(seed)
    ny = nx = 256
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    fr = sum(np.cos(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / lam + ph)
             for a, lam, ph in zip(rng.uniform(0, np.pi, 4), rng.uniform(30, 50, 4), rng.uniform(0, 6.3, 4)))
    fr = (fr - fr.mean()) / fr.std() * 0.015                          # rms 1.5 % of the sky
    sky = 2000.0
    pattern = 0.05 * np.exp(-((x - 90) ** 2 + (y - 160) ** 2) / (2 * 35.0 ** 2))   # a 5 % bump
    true_scale = sky * 1.1
    img = sky * (1 + pattern + 0.02 * x / nx) + true_scale * fr
    for _ in range(12):                                               # bright stars, sigma 1.5 px
        cx, cy = rng.uniform(10, nx - 10, 2)
        img += rng.uniform(2e4, 2e5) / (2 * np.pi * 1.5 ** 2) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 4.5)
    noise_sigma = np.sqrt(sky)
    mi = MaskedImage.from_image((img + rng.normal(0, noise_sigma, img.shape)).astype(np.float32))
    mi.variance[:] = np.float32(sky)
    error = noise_sigma / np.sqrt(np.sum((fr - fr.mean()) ** 2))     # the fit's statistical error
    return mi, fr.astype(np.float32), true_scale, error


def test_fit_fringe_scale_ignores_stars_and_the_sky_pattern():
    """Against the injected amplitude, within 4 sigma of the fit's statistical error: a 256-px image
    with 30-50 px fringes, a sky pattern whose bumps share the fringes' scales, and unmasked bright
    stars (ISR runs before object detection)."""
    mi, fr, true_scale, error = _fringe_scene()
    s = fit_fringe_scale(mi, fr, BAD)
    assert abs(s - true_scale) < 4 * error, (s, true_scale, error)


def _fit_fringe_scale_numpy(image, f, ignore_bits, clip=3.0, n_iter=10):
    """fit_fringe_scale as it was before its numba kernels (commit 256320a), the reference."""
    from calib_core.stats.background import BackgroundConfig, measure_background

    good = np.isfinite(image.image) & np.isfinite(f) & ((image.mask & ignore_bits) == 0)
    work = image.copy()
    work.mask[~good] |= np.int32(BAD)
    work.image[~np.isfinite(work.image)] = 0.0
    model = measure_background(work, BackgroundConfig())
    y = (image.image[good] - model.evaluate()[good]).astype(np.float64)
    x = f[good].astype(np.float64)
    var = image.variance[good].astype(np.float64)
    w = np.where(np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    if not np.any(w > 0):
        w = np.ones_like(x)
    keep = w > 0
    s = np.nan
    for _ in range(max(n_iter, 1)):
        ww = w[keep]
        sw = ww.sum()
        xm, ym = np.dot(ww, x[keep]) / sw, np.dot(ww, y[keep]) / sw
        sxx = np.dot(ww, (x[keep] - xm) ** 2)
        s = float(np.dot(ww, (x[keep] - xm) * (y[keep] - ym)) / sxx)
        r = (y - ym - s * (x - xm)) * np.sqrt(w)
        sigma = 1.4826 * float(np.median(np.abs(r[keep])))
        if not (np.isfinite(clip) and sigma > 0):
            break
        new = (w > 0) & (np.abs(r) <= clip * sigma)
        if np.array_equal(new, keep) or new.sum() < 3:
            break
        keep = new
    return s


@pytest.mark.parametrize("case", ["stars", "holes", "one pass", "unclipped", "odd", "no variance"])
def test_fit_fringe_scale_matches_the_numpy_formulation(case):
    """The numba passes give the NumPy formulation's scale to float64 rounding (only the order of
    the sums differs), with NaN pixels, masked pixels and zero / NaN variances, one pass, no clip,
    an odd number of pixels (the median's two cases), and no variance plane."""
    mi, fr, _, _ = _fringe_scene(5)
    kw = {}
    if case == "holes":
        rng = np.random.default_rng(1)
        mi.image[rng.random(mi.shape) < 0.01] = np.nan
        fr[rng.random(fr.shape) < 0.01] = np.nan
        mi.mask[rng.random(mi.shape) < 0.05] |= BAD
        mi.variance[rng.random(mi.shape) < 0.01] = 0.0
        mi.variance[rng.random(mi.shape) < 0.01] = np.nan
    elif case == "one pass":
        kw = {"n_iter": 1}
    elif case == "unclipped":
        kw = {"clip": np.inf}
    elif case == "odd":
        mi.mask[0, :3] |= BAD                     # 65533 pixels
    elif case == "no variance":
        mi.variance[:] = 0.0                      # every weight 1
    ref = _fit_fringe_scale_numpy(mi, fr, BAD, **kw)
    assert fit_fringe_scale(mi, fr, BAD, **kw) == pytest.approx(ref, rel=1e-10, abs=0)


@pytest.mark.parametrize("guess", [np.nan, 0.5, 1.0, 3.0, 1e-9])
def test_fringe_fit_pass_median_is_numpys_whatever_the_guess(guess):
    """The pass's bracketed median is numpy.median of the kept residuals bit for bit, whether the
    guess brackets the middle ranks, misses them (the sampled bracket) or is absent; even and odd
    numbers kept; its residuals are the NumPy expression's."""
    from calib_core.stats._kernels import fringe_fit_pass

    rng = np.random.default_rng(3)
    for n in (20001, 20000, 17):
        x = rng.normal(size=n)
        y = 3.0 * x + rng.standard_cauchy(n)              # heavy tails, as stars give
        w = rng.uniform(0.5, 2.0, n)
        keep = rng.random(n) < 0.9
        absr, buf = np.empty(n), np.empty(n)
        go_on, sxx, s, med = fringe_fit_pass(x, y, w, np.sqrt(w), keep, absr, buf, np.nan, guess)
        xm = np.dot(w[keep], x[keep]) / w[keep].sum()
        ym = np.dot(w[keep], y[keep]) / w[keep].sum()
        assert go_on and s == pytest.approx(np.dot(w[keep], (x[keep] - xm) * (y[keep] - ym))
                                            / np.dot(w[keep], (x[keep] - xm) ** 2), rel=1e-12)
        r = np.abs((y - ym - s * (x - xm)) * np.sqrt(w))
        np.testing.assert_allclose(absr, r, rtol=1e-12, atol=1e-12 * np.abs(y).max())   # y - ym cancels
        assert med == np.median(absr[keep])


def _bridge_rows_numpy(image, variance, bad, target):
    """The row bridge as interpolate_over did it before its numba kernel: one ``np.interp`` per row
    and plane, between the row's good pixels (the reference bridge_rows is held to)."""
    x = np.arange(bad.shape[1])
    for y in np.flatnonzero(target.any(axis=1)):
        good = ~bad[y]
        if not good.any():
            continue
        t = target[y]
        for plane in (image, variance):
            plane[y, t] = np.interp(x[t], x[good], plane[y, good])


@pytest.mark.parametrize("case", ["columns", "edges", "one-good", "random", "all-bad-row", "inf-neighbours"])
def test_bridge_rows_equals_numpys_interp(case):
    from calib_core.stats._kernels import bridge_rows

    rng = np.random.default_rng(sum(map(ord, case)))
    ny, nx = 60, 45
    image = rng.normal(1000, 30, (ny, nx)).astype(np.float32)
    variance = rng.uniform(10, 20, (ny, nx)).astype(np.float32)
    bad = np.zeros((ny, nx), bool)
    if case == "columns":
        bad[:, [3, 4, 20]] = True
    elif case == "edges":
        bad[:, :3] = bad[:, -2:] = True                  # beyond the last good pixel: end values
    elif case == "one-good":
        bad[:, :] = True
        bad[:, 17] = False
    elif case == "random":
        bad = rng.random((ny, nx)) < 0.3
    elif case == "all-bad-row":
        bad[7, :] = True
        bad[:, 9] = True
    else:
        bad[:, 10] = True
        image[:, 9] = 3e38                               # huge neighbours: slope overflow paths
        image[:, 11] = -3e38
    target = bad & (rng.random((ny, nx)) < 0.8)
    ref_i, ref_v = image.copy(), variance.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        _bridge_rows_numpy(ref_i, ref_v, bad, target)
    bridge_rows(image, variance, bad, target)
    np.testing.assert_array_equal(image, ref_i)
    np.testing.assert_array_equal(variance, ref_v)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("shape", ["scalar", "per-row", "per-column"])
def test_subtract_level_equals_the_numpy_expression(dtype, shape):
    """Overscan subtraction's kernel against what ISR computed before it:
    ``(float64(data) - level).astype(float32)``, bit for bit, on a strided view of the raw."""
    from calib_core.stats._kernels import subtract_level

    rng = np.random.default_rng(5)
    raw = (rng.normal(1000, 300, (70, 90)) if dtype == np.float32 else rng.integers(0, 65535, (70, 90))).astype(dtype)
    data = raw[3:60, 5:81]                           # a view, as an amplifier's data section is
    level = {"scalar": np.array(1000.123456789), "per-row": rng.normal(1000, 5, (57, 1)),
             "per-column": rng.normal(1000, 5, (1, 76))}[shape]
    out = np.empty(data.shape, np.float32)
    subtract_level(data, level.reshape(1, 1) if level.ndim == 0 else level, out)
    np.testing.assert_array_equal(out, (np.asarray(data, np.float64) - level).astype(np.float32))


def _plane(rng, shape, level, sd, special=True):
    a = rng.normal(level, sd, shape).astype(np.float32)
    if special:
        a[::7, ::5] = np.nan
        a[1, :6] = [0.0, -0.0, np.inf, -np.inf, 1e38, -1e38]
    return a


@pytest.mark.parametrize("steps", ["bias variance dark flat", "bias", "bias variance", "bias dark",
                                   "variance dark flat", "flat", "dark flat", ""])
@pytest.mark.parametrize("read_only", [False, True])
def test_calibrate_equals_the_numpy_steps_one_after_another(steps, read_only):
    """ISR's one-sweep calibration against what ISR computed before it, step by step with NumPy, written
    out here: ``image -= b; var += b_var; mask |= b_mask``, then ``var += maximum(image, 0)/gain +
    (rn/gain)**2``, then ``c = float32(c); image -= c*d; var += c*c*d_var``, then the quotient with the
    flat. Bit for bit, with NaN, +-0, +-inf, huge values and zero and negative flat pixels."""
    from calib_core.isr.process import calibrate

    rng = np.random.default_rng(7)
    shape = (64, 48)
    image = _plane(rng, shape, 300, 400)
    mask = rng.integers(0, 4, shape).astype(np.int32)
    var0 = rng.uniform(0, 3, shape).astype(np.float32)
    gain = np.where(np.arange(48) < 24, 1.7, 2.3).astype(np.float32)[None, :].repeat(64, 0)
    rn = np.where(np.arange(48) < 24, 4.5, 5.1).astype(np.float32)[None, :].repeat(64, 0)

    def calib(level, sd):
        return MaskedImage(_plane(rng, shape, level, sd), rng.integers(0, 64, shape).astype(np.int32) * 16,
                           rng.uniform(0, 0.1, shape).astype(np.float32))

    bias, dark, flat = calib(5, 3), calib(0.02, 0.01), calib(1.0, 0.3)
    flat.image[2, :3] = [0.0, -0.0, -0.5]
    for c in (bias, dark, flat):           # as the calib cache hands them out
        for a in (c.image, c.mask, c.variance):
            a.flags.writeable = not read_only
    c = 37.3 / 1.0
    want = set(steps.split())
    ref_i, ref_m, ref_v = image.copy(), mask.copy(), var0.copy()
    with np.errstate(all="ignore"):
        if "bias" in want:
            ref_i -= bias.image
            ref_v += bias.variance
            ref_m |= bias.mask
        if "variance" in want:
            ref_v += np.maximum(ref_i, 0) / gain + (rn / gain) ** 2
        if "dark" in want:
            cf = np.float32(c)
            ref_i -= cf * dark.image
            ref_v += cf * cf * dark.variance
            ref_m |= dark.mask
        if "flat" in want:
            a2, b2 = ref_i * ref_i, flat.image * flat.image
            ref_v = ((ref_v + a2 * flat.variance / b2) / b2).astype(np.float32)
            ref_i = (ref_i / flat.image).astype(np.float32)
            ref_m |= flat.mask
    mi = MaskedImage(image.copy(), mask.copy(), var0.copy())
    calibrate(mi, gain, rn, bias=bias if "bias" in want else None, variance="variance" in want,
              dark=dark if "dark" in want else None, dark_scale=c, flat=flat if "flat" in want else None)
    for got, ref in ((mi.image, ref_i), (mi.variance, ref_v)):      # the bits: -0.0 is not 0.0
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(mi.mask, ref_m)
