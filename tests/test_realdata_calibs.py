"""Master biases and a flat from real raw frames (Keck HIRES, Lick Kast blue).

Noise expectations are measured from the data (difference of two raw frames), not taken from the
nominal gains in the camera files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from calib_core.builds.bias_dark_flat import (BiasConfig, FlatConfig, background_level, combine_bias, combine_flat,
                                              process_bias, process_flat, solve_flat_scales)
from calib_core.camera import load_camera
from calib_core.io.raw import read_raw
from calib_core.isr.process import IsrConfig
from calib_core.stats.clipped import clipped_mean

REALDATA = Path(__file__).parents[1].parent / "shared" / "realdata"
pytestmark = pytest.mark.skipif(not REALDATA.is_dir(),
                                reason=f"real raw frames not available ({REALDATA} is absent)")


def robust_std(a):
    """sqrt of the MEANCLIP variance: hot pixels and columns do not inflate it."""
    return math.sqrt(clipped_mean(np.asarray(a).ravel()).variance)


def raw_read_noise(raw1, raw2, det_id):
    """Read noise in ADU per amplifier data region: std of the difference of two raw biases / sqrt 2."""
    out = []
    for a1, a2 in zip(raw1.detectors[det_id].amps, raw2.detectors[det_id].amps):
        out.append(robust_std(a1.data.astype(np.float64) - a2.data) / math.sqrt(2))
    return out


def check_master_bias(raws, det_id, config):
    n = len(raws)
    posts = [process_bias(r.detectors[det_id], config) for r in raws]
    master = combine_bias(posts, config)
    half_a = combine_bias(posts[: n // 2], config)
    half_b = combine_bias(posts[n // 2:], config)
    rn = np.mean(raw_read_noise(raws[0], raws[1], det_id))
    # overscan-corrected: the level (~950-1000 ADU raw) is gone
    level = clipped_mean(master.image).mean
    assert abs(level) < 1.5, f"master bias level {level:.2f} ADU"
    # random noise of the master from two independent half-masters:
    # var(A - B) = rn^2 (1/nA + 1/nB) -> the full master's noise is rn/sqrt(n)
    na, nb = n // 2, n - n // 2
    sigma_full = robust_std(half_a.image - half_b.image) / math.sqrt(1 / na + 1 / nb) / math.sqrt(n)
    expected = rn / math.sqrt(n)
    # MEANCLIP of a few Gaussian values is 5-15 % noisier than a mean
    assert 0.9 < sigma_full / expected < 1.3, (sigma_full, expected)
    # the variance plane agrees (spread for n >= 5, input variances otherwise)
    med_sigma = math.sqrt(float(np.median(master.variance)))
    assert 0.7 < med_sigma / expected < 1.5, (med_sigma, expected)
    return master, rn


def test_kast_blue_master_bias_from_10_biases():
    cam = load_camera("lick_kast_blue")
    paths = sorted(REALDATA.glob("lick_kast_blue/b*.fits.gz"))
    raws = [r for r in (read_raw(p, cam) for p in paths) if r.metadata.obs_type == "bias"]
    assert len(raws) == 10
    master, rn = check_master_bias(raws, 0, BiasConfig())
    assert 1.0 < rn < 10.0   # a CCD read noise of a few ADU
    assert master.shape == raws[0].detectors[0].shape


def test_keck_hires_master_bias_from_5_biases():
    cam = load_camera("keck_hires")
    paths = sorted(REALDATA.glob("keck_hires/hires30*.fits.gz"))
    raws = [read_raw(p, cam) for p in paths]
    assert len(raws) == 5 and all(r.metadata.obs_type == "bias" for r in raws)
    for det_id in sorted(raws[0].detectors):
        _, rn = check_master_bias(raws, det_id, BiasConfig())
        assert 1.0 < rn < 10.0


def test_kast_blue_flat_from_11_dome_flats():
    """11 dome flats of 15 s: background levels ~12000 ADU; the single-CCD scale solve gives C = 1,
    so the master flat's clipped level is 1. Its pixel noise must match photon + read noise of 11
    frames: the single-frame noise is measured from the difference of two level-normalised flats,
    and a half-split of the stack must show it reduced by sqrt(n)."""
    cam = load_camera("lick_kast_blue")
    all_raws = [read_raw(p, cam) for p in sorted(REALDATA.glob("lick_kast_blue/b*.fits.gz"))]
    biases = [r for r in all_raws if r.metadata.obs_type == "bias"]
    flats = [r for r in all_raws if r.metadata.obs_type == "flat" and r.metadata.exptime == 15.0]
    assert len(flats) == 11
    bias = combine_bias([process_bias(r.detectors[0]) for r in biases])
    cfg = FlatConfig(isr=IsrConfig(do_dark=False, do_flat=False))
    posts, levels = [], []
    for r in flats:
        mi, level = process_flat(r.detectors[0], bias, config=cfg)
        posts.append(mi)
        levels.append(level.mean)
    # a broad spectral lamp profile (60..34000 ADU): the clipped mean keeps it all, ~12000 ADU
    assert all(3000 < b < 30000 for b in levels)
    assert np.std(levels) / np.mean(levels) < 0.02        # a stable lamp
    sol = solve_flat_scales(np.array([levels]))
    assert sol.ccd_scales[0] == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(sol.exp_scales, levels, rtol=1e-9)

    master = combine_flat(posts, sol.exp_scales, sol.ccd_scales[0], cfg)
    assert background_level(master, cfg.stats).mean == pytest.approx(1.0, rel=1e-5)

    # single-frame relative noise where the lamp is bright (ratio of normalised flats)
    f0 = posts[0].image / levels[0]
    f1 = posts[1].image / levels[1]
    bright = (posts[0].image > 15000) & (posts[0].image < 30000)
    assert bright.sum() > 10000
    # relative differences (scale-free: the master's level excludes the unilluminated, BAD-flagged
    # part of this spectrograph detector, the per-frame levels do not)
    single = robust_std((f0 - f1)[bright] / ((f0 + f1) / 2)[bright]) / math.sqrt(2)
    # photon noise alone at ~20000 ADU is ~0.5 %: a single frame must be in that regime
    assert 0.002 < single < 0.02
    half_a = combine_flat(posts[:5], sol.exp_scales[:5], 1.0, cfg)
    half_b = combine_flat(posts[5:], sol.exp_scales[5:], 1.0, cfg)
    split = robust_std((half_a.image - half_b.image)[bright] / ((half_a.image + half_b.image) / 2)[bright])
    expected_split = single * math.sqrt(1 / 5 + 1 / 6)
    assert 0.9 < split / expected_split < 1.3, (split, expected_split)
