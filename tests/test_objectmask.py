"""Object masking (docs/algorithms.md#object-masking): detection completeness, false positives, the binned fast path
against the full-resolution reference, and the replacement of masked pixels."""

import numpy as np
import pytest
from scipy import ndimage

from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.sky.objectmask import (DetectionConfig, MaskObjectsConfig, _grow, auto_binning, detect_sources,
                                       find_objects, mask_objects)

SKY, NOISE = 1000.0, np.sqrt(1000.0)


def _scene(seed, shape=(1024, 768), n_star=40, n_gal=10):
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    img = np.full(shape, SKY) + 0.02 * xx  # a mild gradient the 1024-px background follows
    objs = []
    for k in range(n_star + n_gal):
        star = k < n_star
        x0, y0 = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
        s = 1.5 if star else rng.uniform(4, 7)
        flux = 10 ** rng.uniform(3.3, 5.5) if star else 10 ** rng.uniform(4.0, 5.0)
        r = int(6 * s) + 2
        sl = (slice(int(y0) - r, int(y0) + r), slice(int(x0) - r, int(x0) + r))
        img[sl] += flux / (2 * np.pi * s * s) * np.exp(-((xx[sl] - x0) ** 2 + (yy[sl] - y0) ** 2) / (2 * s * s))
        objs.append((x0, y0, flux, s))
    img += rng.normal(0, NOISE, shape)
    return img.astype(np.float32), objs


def _found(det, objs):
    return np.array([det[int(round(y)), int(round(x))] for x, y, _, _ in objs])


def test_completeness_on_stars_and_galaxies():
    img, objs = _scene(1)
    det = find_objects(MaskedImage.from_image(img))
    found = _found(det, objs)
    # every object whose smoothed peak is well above threshold is found
    snr = np.array([f / (4 * np.pi * (s * s + 25)) / (NOISE / (2 * np.sqrt(np.pi) * 5)) for _, _, f, s in objs])
    assert found[snr > 5].all()
    assert found.mean() > 0.9
    # growth: a pixel 8 px from a bright star centre is masked
    x0, y0, _, _ = objs[int(np.argmax([o[2] for o in objs[:40]]))]
    assert det[int(y0), min(int(x0) + 8, img.shape[1] - 1)]


def test_false_positive_rate_on_pure_noise():
    """Detections on pure noise against Gaussian-random-field theory (independent of the code): the
    white noise smoothed by a sigma=5 px Gaussian has derivative variance 1/(2 sigma^2) of its own, so
    the expected number of regions above u sigma (the Euler characteristic, u >~ 2) is
    A / (2 sigma^2) / (2 pi)^1.5 * u exp(-u^2 / 2): ~145 at 2.5 sigma on 1024^2 px, ~0.02 at 5."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    noise = rng.normal(SKY, NOISE, (1024, 1024)).astype(np.float32)
    var = np.full(noise.shape, NOISE ** 2, np.float32)

    def expected(u, s=5.0):
        return noise.size / (2 * s * s) / (2 * np.pi) ** 1.5 * u * np.exp(-u * u / 2)

    # the reference's 2.5 sigma (no growth, to count regions): the noise calibration is right ...
    ref = DetectionConfig(threshold=2.5, n_sigma_to_grow=0.0)
    det = detect_sources(noise - SKY, None, ref, variance=var)
    n = ndimage.label(det)[1]
    assert abs(n - expected(2.5)) < 4 * np.sqrt(expected(2.5)), (n, expected(2.5))
    # ... and grown by 12 px those regions mask ~8 % of a blank sky: why the sky build does not use it
    grown = find_objects(MaskedImage(noise, np.zeros(noise.shape, np.int32), var),
                         MaskObjectsConfig(detection=DetectionConfig(threshold=2.5))).mean()
    assert 0.03 < grown < 0.2
    # the sky build's default (5 sigma) masks essentially nothing of pure noise
    assert find_objects(MaskedImage(noise, np.zeros(noise.shape, np.int32), var)).mean() < 0.002


def test_binned_detection_matches_full_resolution():
    """The 4x4-binned fast path against detection at full resolution on the same image: object
    masks agree (both directions >= 90% of the pixels near objects) and the pure-noise
    false-positive area is at most that of full resolution."""
    assert auto_binning(5.0) == 4 and auto_binning(1.0) == 1
    img, objs = _scene(2)
    full_cfg = DetectionConfig(binning=1)
    fast_cfg = DetectionConfig()
    from calib_core.stats.background import BackgroundConfig, measure_background

    mi = MaskedImage.from_image(img)
    bg = measure_background(mi, BackgroundConfig(bin_size=1024, use_approx=False))
    a = detect_sources(img, None, full_cfg, background=bg)
    b = detect_sources(img, None, fast_cfg, background=bg)
    # near objects (within 25 px of an injected centre) the masks are the same within noise;
    # elsewhere both only hold noise peaks, compared by area below
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    near = np.zeros(img.shape, bool)
    for x0, y0, _, _ in objs:
        near |= (xx - x0) ** 2 + (yy - y0) ** 2 < 25 ** 2
    a_n, b_n = a & near, b & near
    assert (a_n & b_n).sum() / a_n.sum() > 0.9 and (a_n & b_n).sum() / b_n.sum() > 0.9
    assert abs(a.mean() - b.mean()) < 0.15 * a.mean()
    assert np.array_equal(_found(a, objs), _found(b, objs)) or abs(_found(a, objs).mean() - _found(b, objs).mean()) < 0.05
    rng = np.random.default_rng(5)
    noise = rng.normal(0, NOISE, (1024, 1024)).astype(np.float32)
    fa, fb = detect_sources(noise, None, full_cfg).mean(), detect_sources(noise, None, fast_cfg).mean()
    # sampling the smoothed noise field on a 4-px grid misses some of its narrowest peaks: the
    # fast path flags ~20% less pure-noise area (fewer false positives), never more
    assert 0.6 * fa < fb < 1.05 * fa


def test_mask_objects_replaces_and_clears_detected():
    img, objs = _scene(4)
    mi = MaskedImage.from_image(img)
    sat = mask_bits(["SAT"])
    mi.mask[100:104, 100:104] |= sat
    det = mask_objects(mi)
    assert det.any()
    assert not (mi.mask & mask_bits(["DETECTED"])).any()      # cleared
    assert (mi.mask[100:104, 100:104] & sat).all()             # other planes remain
    # replaced pixels are smooth background: no object light left
    assert np.abs(mi.image[det] - SKY - 0.02 * np.nonzero(det)[1]).max() < 30
    # without interpolation: median of the good pixels, DETECTED kept
    mi2 = MaskedImage.from_image(img)
    det2 = mask_objects(mi2, MaskObjectsConfig(do_interpolate=False))
    assert (mi2.mask[det2] & mask_bits(["DETECTED"])).all()
    assert np.allclose(mi2.image[det2], np.median(img[~det2]), atol=1e-3)


def test_negative_polarity_option():
    rng = np.random.default_rng(6)
    img = rng.normal(SKY, NOISE, (512, 512)).astype(np.float32)
    img[200:260, 200:260] -= 200   # a hole
    mi = MaskedImage.from_image(img)
    find_objects(mi, MaskObjectsConfig(detection=DetectionConfig(polarity="both")))
    neg = (mi.mask & mask_bits(["DETECTED_NEGATIVE"])) != 0
    assert neg[230, 230] and not (mi.mask[230, 230] & mask_bits(["DETECTED"]))


@pytest.mark.parametrize("radius", [1.0, 2.9, 3.0, 4.5, 12.0])
def test_growth_equals_distance_transform(radius):
    """The footprint growth is the distance transform thresholded at the radius, pixel for pixel,
    at the image edges too."""
    rng = np.random.default_rng(7)
    det = rng.random((97, 131)) < 0.004
    det[0, 5] = det[96, 130] = det[50, 0] = True
    assert np.array_equal(_grow(det, radius), ndimage.distance_transform_edt(~det) <= radius)


@pytest.mark.parametrize("case", ["plain", "odd", "no-mask", "holes", "all-flagged", "tiny"])
def test_binned_noise_from_the_variance_is_numpys_median(case):
    """The detection noise from the variance plane: sqrt(median of the finite, positive, unflagged
    variances) / b, the median as numpy computes it in float64 (the kernel's selection is exact);
    with no such variance it falls back to the binned image's MAD."""
    from calib_core.sky.objectmask import _binned_noise

    rng = np.random.default_rng(7)
    shape = {"tiny": (9, 11), "odd": (301, 257)}.get(case, (400, 300))
    var = rng.uniform(50, 150, shape).astype(np.float32)
    mask = np.where(rng.random(shape) < 0.2, 4, 0).astype(np.int32)
    if case == "holes":
        var[rng.random(shape) < 0.05] = np.nan
        var[rng.random(shape) < 0.05] = 0.0
        var[rng.random(shape) < 0.05] = -3.0
    if case == "all-flagged":
        mask[:] = 4
    if case == "no-mask":
        mask = None
    binned = rng.normal(0, 2.0, (40, 30))
    bmask = np.zeros(binned.shape, np.int32)
    got = _binned_noise(binned, bmask, var, mask, 4, 4)
    v = var.astype(np.float64)
    sel = np.isfinite(v) & (v > 0) & (((mask & 4) == 0) if mask is not None else True)
    if sel.any():
        assert got == np.sqrt(np.median(v[sel])) / 4
    else:
        d = np.diff(binned, axis=1).ravel()
        assert got == pytest.approx(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0), rel=1e-12)


@pytest.mark.parametrize("stats_planes", [["BAD", "SAT", "EDGE", "NO_DATA"], ["BAD", "DETECTED"]])
def test_find_objects_thresholds_every_pass_at_the_unflagged_median_variance(stats_planes, monkeypatch):
    """Each detection pass of find_objects thresholds at sqrt(median variance over the pixels without
    the stats planes) / b. The median is measured once when the passes' own planes (DETECTED) are not
    among the stats planes, and before each pass when they are, since the passes change that set of
    pixels: checked against numpy's median of the pixels each pass may use."""
    from calib_core.sky import objectmask

    img, _ = _scene(3)
    rng = np.random.default_rng(4)
    var = rng.uniform(0.8, 1.2, img.shape).astype(np.float32) * SKY
    mask = np.where(rng.random(img.shape) < 0.05, np.int32(mask_bits(["BAD"])), 0).astype(np.int32)
    mi = MaskedImage(img, mask.copy(), var)
    cfg = MaskObjectsConfig(detection=DetectionConfig(stats_mask_planes=stats_planes))
    bits = mask_bits(stats_planes)
    seen = []
    real = objectmask._binned_noise

    def spy(binned, bmask, variance, m, b_bits, b, variance_median=None):
        sd = real(binned, bmask, variance, m, b_bits, b, variance_median)
        v = np.asarray(variance, np.float64)
        ok = ((m & bits) == 0) & np.isfinite(v) & (v > 0)
        seen.append((sd, float(np.sqrt(np.median(v[ok])) / b), variance_median is not None))
        return sd

    monkeypatch.setattr(objectmask, "_binned_noise", spy)
    find_objects(mi, cfg)
    assert len(seen) == cfg.n_iter
    for sd, ref, given in seen:
        assert sd == ref
        assert given == ("DETECTED" not in stats_planes)
    if "DETECTED" in stats_planes:
        assert len({ref for _, ref, _ in seen}) > 1       # the passes' detections moved the median
        assert objectmask.detection_variance_median(mi, cfg) is None     # so no one number stands for the plane
        return
    # the sky build's later passes: the plane is gone (zeros, as read from an intermediate without it)
    # and the recorded median stands for it; each pass still thresholds at the true variance's median
    vm = objectmask.detection_variance_median(MaskedImage(img, mask.copy(), var), cfg)
    refs = [ref for _, ref, _ in seen]
    seen.clear()
    bare = MaskedImage(img, mask.copy(), np.zeros(img.shape, np.float32))
    find_objects(bare, cfg, variance_median=vm)
    assert [sd for sd, _, _ in seen] == refs
    assert np.array_equal(bare.mask, mi.mask)
