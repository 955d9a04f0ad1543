"""End to end against injected truth: raws through ``calibflow nightly`` with its defaults, then
``calibflow apply-sky`` on held-out exposures, on two camera geometries (democam_mini: one HDU per
detector, amplifiers side by side; minimosaic: one HDU per amplifier, amplifiers read from opposite
ends, a smaller focal plane). Every number is computed by bench/sky_accuracy.py from the products
and the simulator's truth files, in units of noise floors derived there from the truth; nothing is
compared with the pipeline run another way.

The night has moonlight gradients of up to +-10 % (linear and quadratic), a sky pattern with a
ghost ring, edge glow, mm ripples and compact peaks, row-drifting overscans, bad columns, and three
bad exposures per filter (a cloud, a satellite trail with broad wings, the glow of a bright star).
"""

import pytest

from bench.sky_accuracy import evaluate, run_night


@pytest.fixture(scope="module", params=["democam_mini", "minimosaic"])
def result(request, tmp_path_factory, prefect_api):
    run = run_night(request.param, tmp_path_factory.mktemp(request.param), seed=11, n_build=12, n_held=3,
                    filters=("r",), api_url=prefect_api, log=lambda s: None)
    return evaluate(run)


# Measured by bench/sky_accuracy.py (README): these hold now and guard the gains of the new sky model
# (held-out structure reduced 14-17x where the cell model gave 2.7-7.5x; no good exposure rejected
# where the 0.5 % cut rejected most of a night; the masters at their floors).

def test_held_out_structure_reduced_tenfold(result):
    for h in result["held_out"]["r"]:
        assert h["reduction"] >= 10, h


def test_cloud_and_glow_rejected_and_no_good_exposure(result):
    acc = result["sky"]["r"]
    assert acc["good_rejected"] == [], acc
    assert {"cloud", "glow"} <= {result["bad"][e] for e in acc["bad_rejected"]}, acc


def test_bias_dark_and_flat_at_their_floors(result):
    """1.00 each (the dark was 1.22-1.24 while its floor averaged the master bias's noise down with
    the darks; that noise is the same in every dark: bench/sky_accuracy.py, Bias, dark, flat)."""
    m = result["masters"]
    for key in ("bias", "dark", "flat_r"):
        assert m[key]["ratio"] < 1.2, (key, m[key])


def test_sky_frame_at_its_noise_floor(result):
    """Issue 10's target, 1.5 x the floor (one scale and a quadratic surface allowed). Measured
    1.13-1.19 with masking at 5 sigma of the noise; 1.86-1.87 when masking at 2.5 sigma."""
    acc = result["sky"]["r"]
    assert acc["ratio"] < 1.5, acc
    assert abs(acc["a"] - 1) < 0.02, acc


def test_fitted_scales_within_three_percent(result):
    """Measured 0.984-0.999 of the truth (0.953-0.967 when masking at 2.5 sigma)."""
    for h in result["held_out"]["r"]:
        assert h["scale_vs_truth"] == pytest.approx(1.0, abs=0.03), h


def test_every_bad_exposure_rejected(result):
    """Cloud, glow and the satellite trail (the trail by the streak rule, calib_core/streaks.py)."""
    acc = result["sky"]["r"]
    assert acc["bad_missed"] == [], acc
    assert {"cloud", "glow", "trail"} == {result["bad"][e] for e in acc["bad_rejected"]}, acc
