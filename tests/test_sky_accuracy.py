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

import numpy as np
import pytest

from bench.sky_accuracy import evaluate, run_night


@pytest.fixture(scope="module", params=["democam_mini", "minimosaic"])
def result(request, tmp_path_factory, prefect_api):
    run = run_night(request.param, tmp_path_factory.mktemp(request.param), seed=11, n_build=12, n_held=3,
                    filters=("r",), api_url=prefect_api, log=lambda s: None)
    return evaluate(run)


def test_sky_frame_at_noise_floor(result):
    acc = result["sky"]["r"]
    assert acc["ratio"] < 1.5, acc


def test_bad_exposures_rejected_and_no_good_one(result):
    acc = result["sky"]["r"]
    assert acc["bad_missed"] == [] and len(acc["bad_rejected"]) == 3, acc
    assert acc["good_rejected"] == [], acc


def test_held_out_structure_reduced_tenfold_with_right_scale(result):
    for h in result["held_out"]["r"]:
        assert h["reduction"] >= 10, h
        assert h["scale_vs_truth"] == pytest.approx(1.0, abs=0.03), h


def test_masters_at_their_floors(result):
    m = result["masters"]
    for key in ("bias", "dark", "flat_r"):
        assert m[key]["ratio"] < 1.2, (key, m[key])
    assert np.isfinite(m["bias"]["mean_sigma"])
