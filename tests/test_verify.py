"""The verification gate's checks and the input screening on images whose truth is known: a good
candidate passes, each kind of bad one fails the check named for it (docs/algorithms.md#verification-before-certification)."""

import numpy as np
import pytest

from calib_core.camera import load_camera
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.rawio import RawAmp, RawDetector
from calib_core.verify import (ScreenConfig, VerifyConfig, detector_scatter_checks, screen_input, verify_product)

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
