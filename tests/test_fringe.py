"""Fringe preparation (docs/algorithms.md#fringe-preparation)."""

import numpy as np
import pytest

from calib_core.fringe import FringeConfig, prepare_fringe
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.stats import clipped_mean


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
