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

# democam_mini also observes z (fringes): its night is built once and serves both fixtures
_FILTERS = {"democam_mini": ("r", "z"), "minimosaic": ("r",)}
_NIGHTS: dict = {}


def _night(camera, tmp_path_factory, prefect_api):
    if camera not in _NIGHTS:
        run = run_night(camera, tmp_path_factory.mktemp(camera), seed=11, n_build=12, n_held=3,
                        filters=_FILTERS[camera], api_url=prefect_api, log=lambda s: None)
        _NIGHTS[camera] = evaluate(run)
    return _NIGHTS[camera]


@pytest.fixture(scope="module", params=["democam_mini", "minimosaic"])
def result(request, tmp_path_factory, prefect_api):
    return _night(request.param, tmp_path_factory, prefect_api)


@pytest.fixture(scope="module")
def z_result(tmp_path_factory, prefect_api):
    return _night("democam_mini", tmp_path_factory, prefect_api)


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
    """Cloud, glow and the satellite trail (the trail by the streak rule, calib_core/sky/streaks.py)."""
    acc = result["sky"]["r"]
    assert acc["bad_missed"] == [], acc
    assert {"cloud", "glow", "trail"} == {result["bad"][e] for e in acc["bad_rejected"]}, acc


# z band (democam_mini): the exposures are defringed with the night's own fringe frame first

def test_z_scales_within_three_percent_and_right_rejections(z_result):
    """Fitted scales within 3 % of the truth, every bad exposure rejected and no good one (measured
    0.978-0.982 in the benchmark; the scales were 4-5 % low while the fringe frame's continuum was
    interpolated through bin centres, and two good exposures were rejected while the fringe amplitude
    was fitted without clipping)."""
    for h in z_result["held_out"]["z"]:
        assert h["scale_vs_truth"] == pytest.approx(1.0, abs=0.03), h
    acc = z_result["sky"]["z"]
    assert acc["good_rejected"] == [] and acc["bad_missed"] == [], acc


def test_z_held_out_structure_reduced(z_result):
    """Issue 10 asks >= 10x; in z that is NOT met on every exposure: 8.5x on this test night's
    exposure with the largest fringe amplitude (10.3-17.5x in the benchmark's night). What is left is
    the fringe frame's error on 32-px bins (docs/algorithms.md#continuum-removal). This guards the
    present level (>= 8x; 6.9x before the clipped fringe fit) until that is solved."""
    red = [h["reduction"] for h in z_result["held_out"]["z"]]
    assert min(red) >= 8, red


def test_z_fringe_frame_at_its_floor(z_result):
    """Against the injected fringe pattern (bench/sky_accuracy.py, "Fringe frame"): measured 1.08."""
    assert z_result["fringe"]["z"]["ratio"] < 1.2, z_result["fringe"]["z"]


def test_z_sky_frame_carries_the_pattern_and_reaches_the_separation_bound(z_result):
    """Not issue 10's 1.5x-the-floor target, which the z frame does not meet (10.3x): on the sky
    frame's bins the fringes can only be told from the pattern by the spread of the fringe
    amplitudes, and that bound (bench/sky_accuracy.py, "Fringing filters") is 8.45x the floor on this
    night. Checked here: the frame carries the whole pattern (one scale within 2 %; measured 0.98) and
    is within 1.5x of that bound (measured 1.22x)."""
    acc = z_result["sky"]["z"]
    assert abs(acc["a"] - 1) < 0.02, acc
    assert acc["ratio_vs_separation"] < 1.5, acc
