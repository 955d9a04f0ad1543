"""The verification gate's checks and the input screening on images whose truth is known: a good
candidate passes, each kind of bad one fails the check named for it (docs/algorithms.md#verification-before-certification)."""

import numpy as np
import pytest

from calib_core.camera import load_camera
from calib_core.io.raw import RawAmp, RawDetector
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.quality.verify import (ScreenConfig, VerifyConfig, detector_scatter_checks, screen_input,
                                       sky_structure_checks, verify_product)
from calib_core.stats.background import BackgroundModel

RNG = np.random.default_rng(5)
SHAPE = (200, 120)
GAIN, RN = 1.5, 4.5          # e-/ADU, e-
SIGMA = RN / GAIN            # ADU


def _raw():
    """A two-amplifier detector (left and right halves) with a white-noise overscan at the read noise."""
    cam = load_camera("democam_mini")
    det = cam.detectors[0]
    amps = []
    for i, amp in enumerate(det.amplifiers):
        raw = RNG.normal(1000.0, SIGMA, (SHAPE[0], 80)).astype(np.float32)
        amps.append(RawAmp(amp=amp, raw=raw, data_slices=(slice(0, SHAPE[0]), slice(0, 60)),
                           overscan_slices=(slice(0, SHAPE[0]), slice(60, 80)), overscan_axis=1,
                           det_slices=(slice(0, SHAPE[0]), slice(60 * i, 60 * (i + 1))), flip_x=False,
                           flip_y=False, gain=GAIN, read_noise=RN, saturation=60000.0))
    return RawDetector(detector=det, amps=amps, shape=SHAPE, header=None)


def _mi(values, var):
    return MaskedImage(values.astype(np.float32), np.zeros(SHAPE, np.int32), np.full(SHAPE, var, np.float32))


def _bias_stack(n=8, structure=None):
    structure = RNG.normal(0, 2.0, SHAPE) if structure is None else structure
    frames = [structure + RNG.normal(0, SIGMA, SHAPE) for _ in range(n)]
    return structure, frames


def test_a_good_bias_passes_and_the_noise_is_the_read_noise():
    structure, frames = _bias_stack()
    master = _mi(np.mean(frames, axis=0), SIGMA ** 2 / 8)
    v = verify_product("bias", master, _raw(), _mi(frames[0], SIGMA ** 2))
    assert v.passed, v.to_dict()["failed"]
    # the test frame is one of the 8 stacked: its residual noise is sigma * sqrt(1 - 1/8), in electrons
    for amp in ("A", "B"):
        assert v.metrics[amp]["read_noise"] == pytest.approx(RN * np.sqrt(1 - 1 / 8), rel=0.03)
        assert v.metrics[amp]["overscan_noise"] == pytest.approx(RN, rel=0.05)


def test_a_bias_with_an_offset_fails_mean_and_a_noisy_one_fails_noise():
    structure, frames = _bias_stack()
    master = np.mean(frames, axis=0)
    offset = verify_product("bias", _mi(master + 3 * SIGMA, 0.1), _raw(), _mi(frames[0], SIGMA ** 2))
    assert {c.name for c in offset.checks if not c.passed} == {"MEAN"}
    noisy = verify_product("bias", _mi(master + RNG.normal(0, SIGMA, SHAPE), 0.1), _raw(), _mi(frames[0], SIGMA ** 2))
    assert {c.name for c in noisy.checks if not c.passed} >= {"NOISE"}
    # ... and the incumbent (the good master) is better on the test frame
    worse = verify_product("bias", _mi(master + RNG.normal(0, SIGMA, SHAPE), 0.1), _raw(), _mi(frames[0], SIGMA ** 2),
                           incumbent=_mi(master, 0.1), incumbent_id="bias-old")
    assert not next(c for c in worse.checks if c.name == "INCUMBENT").passed


def test_an_overscan_noisier_than_the_read_noise_fails():
    structure, frames = _bias_stack()
    raw = _raw()
    raw.amps[1].raw[:, 60:] += RNG.normal(0, SIGMA, (SHAPE[0], 20)).astype(np.float32)
    v = verify_product("bias", _mi(np.mean(frames, axis=0), 0.1), raw, _mi(frames[0], SIGMA ** 2))
    assert [(c.name, c.amp) for c in v.checks if not c.passed] == [("OVERSCAN_NOISE", "B")]


def _overscan_noise_by_hand(over, margin, nsigma, niter):
    """The overscan noise written out: each row's median, a 9-row running median of those with the
    end rows repeated (np.median over each window), then the clipped standard deviation of what is
    left (3-sigma clipping about the median, then the mean, niter passes)."""
    over = np.asarray(over, np.float64)[:, margin:]
    level = np.array([np.median(row[np.isfinite(row)]) if np.isfinite(row).any() else np.nan for row in over])
    padded = np.concatenate([[level[0]] * 4, level, [level[-1]] * 4])
    smooth = np.array([np.median(padded[i:i + 9]) for i in range(level.size)])
    x = (over - smooth[:, None]).ravel()
    x = x[np.isfinite(x)]
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    keep = np.abs(x - med) <= nsigma * 0.741301109 * (q3 - q1)
    for _ in range(niter - 1):
        m, s = x[keep].mean(), x[keep].std(ddof=1)
        keep = np.abs(x - m) <= nsigma * s
    return x[keep].std(ddof=1)


@pytest.mark.parametrize("nan_row", [False, True])
def test_overscan_noise_is_the_running_median_written_out(nan_row):
    from calib_core.quality.verify import _overscan_noise

    raw = _raw()
    amp = raw.amps[0]
    rows = np.arange(SHAPE[0])
    # a row-to-row level pattern (a slow drift and steps) on top of the read noise
    amp.raw[:, 60:] += (5.0 * np.sin(rows / 15.0) + 3.0 * (rows > 120))[:, None].astype(np.float32)
    if nan_row:
        amp.raw[37, 60:] = np.nan
    cfg = VerifyConfig()
    margin = min(amp.amp.overscan_margin, 18)
    want = _overscan_noise_by_hand(amp.overscan, margin, cfg.nsigma, cfg.niter)
    assert _overscan_noise(amp, cfg) == pytest.approx(want, rel=1e-9)
    # and the level pattern is gone: what is left is the read noise
    assert abs(want - SIGMA) < 5 * SIGMA / np.sqrt(2 * SHAPE[0] * (20 - margin))


def _flat_frames(n=4, level=20000.0):
    response = 1 + 0.03 * RNG.standard_normal(SHAPE)
    frames = [RNG.poisson(level * GAIN * response) / GAIN for _ in range(n)]
    return response, frames


def test_a_good_flat_passes_and_a_flat_with_a_step_between_amplifiers_fails():
    response, frames = _flat_frames()
    flat = np.mean(frames, axis=0) / np.mean(frames)
    test = _mi(frames[0], 20000.0 / GAIN)
    good = verify_product("flat", _mi(flat, 1e-6), _raw(), test)
    assert good.passed, good.to_dict()["failed"]
    bad = flat.copy()
    bad[:, 60:] *= 1.2
    v = verify_product("flat", _mi(bad, 1e-6), _raw(), test, incumbent=_mi(flat, 1e-6), incumbent_id="flat-old")
    assert {c.name for c in v.checks if not c.passed} == {"AMP_SCATTER", "INCUMBENT"}
    # a flat from too few photons leaves more than shot noise in the flat-fielded frame
    noisy = verify_product("flat", _mi(flat * (1 + 0.02 * RNG.standard_normal(SHAPE)), 1e-6), _raw(), test)
    assert {c.name for c in noisy.checks if not c.passed} == {"NOISE"}


def test_detector_scatter_flags_only_the_odd_detector():
    checks = detector_scatter_checks({0: 1.0, 1: 1.01, 2: 0.99, 3: 1.12}, VerifyConfig())
    assert [d for d, c in checks.items() if not c.passed] == [3]


def test_screening_names_the_reason():
    structure, frames = _bias_stack()
    master = _mi(np.mean(frames[1:], axis=0), SIGMA ** 2 / 7)
    good = _mi(frames[0], SIGMA ** 2)
    assert screen_input("bias", good, master) is None
    half = _mi(frames[0] + np.where(np.arange(SHAPE[0])[:, None] < 100, 12 * SIGMA, 0.0), SIGMA ** 2)
    assert screen_input("bias", half, master).startswith("outlier against the last good master: 50.0 % of pixels")
    rows = _mi(frames[0] + (np.arange(SHAPE[0]) % 5)[:, None] * 0.8 * SIGMA, SIGMA ** 2)
    assert screen_input("bias", rows, master).startswith("pattern noise")
    sat = _mi(frames[0], SIGMA ** 2)
    sat.mask[:10] |= MASK_PLANES.bit("SAT")
    assert screen_input("bias", sat, None).startswith("saturated: 5.0 % of pixels")
    assert screen_input("bias", sat, None, ScreenConfig(enabled=False)) is None
    # without a master only saturation is tested; science inputs are not screened
    assert screen_input("bias", half, None) is None and screen_input("sky", sat, None) is None


# --- the sky frame's held-out checks (docs/algorithms.md#sky-frame-structure-check) ---------------------

N_SKY, SKY_NOISE, SKY_AMP = 6, 0.001, 0.01


def _sky_night(noise=SKY_NOISE):
    """Binned residuals of N_SKY exposures of democam_mini: an injected pattern P (a 1 % ripple a few bins
    across, nothing a focal-plane quadratic can take) plus white noise of ``noise`` per bin, each bin's
    error given as ``noise``. Returns (camera, residuals, P)."""
    cam = load_camera("democam_mini")
    rng = np.random.default_rng(21)
    pattern, residuals = {}, {e: {} for e in range(N_SKY)}
    for det in cam.detectors:
        nbx, nby = max(int(det.nx / 32 + 0.5), 1), max(int(det.ny / 32 + 0.5), 1)
        j, i = np.mgrid[:nby, :nbx]
        pattern[det.id] = SKY_AMP * np.sin(2 * np.pi * i / 3.7 + det.id) * np.cos(2 * np.pi * j / 4.3)
        for e in range(N_SKY):
            residuals[e][det.id] = BackgroundModel(pattern[det.id] + rng.normal(0, noise, (nby, nbx)),
                                                   np.full((nby, nbx), noise), np.full((nby, nbx), 1024.0),
                                                   (0, 0, det.nx - 1, det.ny - 1))
    return cam, residuals, pattern


def _frames(residuals, values):
    out = {}
    for d, v in values.items():
        f = residuals[0][d].copy()
        f.values = np.asarray(v, np.float32)
        out[d] = f
    return out


def test_sky_structure_before_is_the_injected_pattern_above_the_noise():
    """With noisy exposures and the injected pattern as the frame: the structure above noise before
    the frame is the pattern's RMS (the bins' noise taken out), the noise is the bins' stated error,
    the frame fits at scale 1 and both checks pass."""
    cam, residuals, pattern = _sky_night()
    out = sky_structure_checks(cam, residuals, _frames(residuals, pattern), VerifyConfig())
    for d, (checks, m) in out.items():
        assert m["structure_before"] == pytest.approx(np.sqrt(np.mean(pattern[d] ** 2)), rel=0.03)
        assert m["structure_noise"] == pytest.approx(SKY_NOISE, rel=1e-5)
        assert m["structure_after"] < SKY_NOISE          # what is left is the held-out frames' noise
        assert m["sky_scale"] == pytest.approx(1.0, abs=0.01)
        assert [c.name for c in checks if c.passed] == ["STRUCTURE", "SCALE"], [c.describe() for c in checks]


def test_sky_structure_after_is_what_a_known_frame_error_leaves():
    """Noise-free exposures of the pattern P and a frame P + E with a known error E: every held-out
    frame is the product itself (the exposures are identical), so the structure left is the RMS of
    ``P - s (P + E)`` with ``s`` the least-squares scale over every bin, computed here directly."""
    cam, residuals, pattern = _sky_night(noise=0.0)
    error = {}
    for d, p in pattern.items():
        j, i = np.mgrid[:p.shape[0], :p.shape[1]]
        error[d] = 0.3 * SKY_AMP * np.cos(2 * np.pi * i / 2.9) * np.sin(2 * np.pi * j / 5.1 + d)
    frame = {d: (pattern[d] + error[d]).astype(np.float32) for d in pattern}
    P = np.concatenate([pattern[d].ravel() for d in sorted(pattern)]).astype(np.float32).astype(np.float64)
    F = np.concatenate([frame[d].ravel() for d in sorted(pattern)]).astype(np.float64)
    s = float(P @ F / (F @ F))
    out = sky_structure_checks(cam, residuals, _frames(residuals, frame), VerifyConfig())
    assert out[0][1]["sky_scale"] == pytest.approx(s, rel=1e-4)
    for d, (checks, m) in out.items():
        left = pattern[d].astype(np.float32) - s * frame[d]
        assert m["structure_after"] == pytest.approx(np.sqrt(np.mean(left ** 2)), rel=1e-3)
        assert m["structure_before"] == pytest.approx(np.sqrt(np.mean(pattern[d].astype(np.float32) ** 2)), rel=1e-4)


def test_a_wrong_sky_frame_fails_structure_or_scale():
    cam, residuals, pattern = _sky_night()
    rng = np.random.default_rng(3)
    shuffled = {d: rng.permutation(p.ravel()).reshape(p.shape) for d, p in pattern.items()}
    out = sky_structure_checks(cam, residuals, _frames(residuals, shuffled), VerifyConfig())
    assert all(not checks[0].passed and checks[0].value < 1.5 for checks, _ in out.values())
    # one detector of the wrong sign: it fails (twice the structure it should remove), the others pass
    flipped = {d: -p if d == 4 else p for d, p in pattern.items()}
    out = sky_structure_checks(cam, residuals, _frames(residuals, flipped), VerifyConfig())
    assert [d for d, (checks, _) in out.items() if not checks[0].passed] == [4]
    assert out[4][1]["structure_ratio"] == pytest.approx(0.5, rel=0.05)
    # every detector of the wrong sign: the fitted scale absorbs it (STRUCTURE cannot see it), SCALE does
    out = sky_structure_checks(cam, residuals, _frames(residuals, {d: -p for d, p in pattern.items()}),
                               VerifyConfig())
    assert {c.name for checks, _ in out.values() for c in checks if not c.passed} == {"SCALE"}
    assert out[0][1]["sky_scale"] == pytest.approx(-1.0, abs=0.02)
