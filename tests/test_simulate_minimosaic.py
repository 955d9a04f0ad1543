"""The ``minimosaic`` camera (3x2 CCDs of 512x1024, one HDU per amplifier, amplifiers reading from
opposite sides) as the simulator writes it: raw files assemble, through rawio and ISR, to exactly the
truth geometry, and a nightly-style ingest registers them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from calib_core.camera import load_camera
from calib_core.io.raw import read_raw
from calib_core.isr.process import IsrConfig, run_isr
from calib_core.simulate.night import simulate_night
from tests._raw import corrected

CAMERA = "minimosaic"


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("minimosaic")
    return simulate_night(CAMERA, out, seed=4, n_bias=4, n_dark=0, n_flat=1, n_science=0, filters=("r",))


def test_camera_geometry():
    cam = load_camera(CAMERA)
    demo = load_camera("democam")
    assert cam.layout == "hdu_per_amplifier" and len(cam.detectors) == 6
    xs = sorted({d.x_mm for d in cam.detectors})
    ys = sorted({d.y_mm for d in cam.detectors})
    assert len(xs) == 3 and len(ys) == 2
    gains, noises = [], []
    for d in cam.detectors:
        assert (d.nx, d.ny) == (512, 1024)
        assert d.orientation == (2 if d.y_mm > 0 else 0)
        a, b = d.amplifiers
        assert a.detector_section == "[1:512,1:512]" and b.detector_section == "[1:512,1024:513]"
        assert a.hdu != b.hdu and a.overscan_section and b.overscan_section
        gains += [a.gain, b.gain]
        noises += [a.read_noise, b.read_noise]
    assert all(1.4 <= g <= 1.9 for g in gains) and len(set(gains)) == len(gains)
    assert all(3.5 <= r <= 6.0 for r in noises)
    # ~0.5 mm gaps between neighbouring detectors
    c = {d.name: cam.detector_corners_mm(d) for d in cam.detectors}
    assert c["ccd01"][0] - c["ccd00"][1] == pytest.approx(0.5, abs=0.01)
    assert c["ccd03"][2] - c["ccd00"][3] == pytest.approx(0.5, abs=0.01)

    def area(camera):
        corners = [camera.detector_corners_mm(d) for d in camera.detectors]
        return (max(k[1] for k in corners) - min(k[0] for k in corners)) * \
               (max(k[3] for k in corners) - min(k[2] for k in corners))

    assert area(cam) < area(demo) / 4


def test_one_hdu_per_amplifier_named_as_the_camera_says(night):
    cam = night.camera
    with fits.open(night.paths("bias")[0], do_not_scale_image_data=True) as hdul:
        names = [h.name for h in hdul[1:]]
        assert names == [a.hdu for d in cam.detectors for a in d.amplifiers]
        h = hdul["CCD03B"]
        assert h.data.shape == (512, 542) and h.header["BZERO"] == 32768
        assert h.header["AMPNAME"] == "B" and h.header["CCDNAME"] == "ccd03"


def test_amp_b_reads_from_the_top(tmp_path, monkeypatch):
    """A spot injected near the top of the detector lands in the FIRST raw rows of amplifier B's HDU
    (it is read out first), and assembles back to where it was injected."""
    from calib_core.simulate import night as simulate
    cam = load_camera(CAMERA)
    spot = (100, 1000)       # (x, y): near the top edge, in amplifier B
    original = simulate.InstrumentTruth.bias

    def bias_with_spot(self, d):
        b = original(self, d)
        if d.id == 2:
            b[spot[1], spot[0]] += 5000.0
        return b

    monkeypatch.setattr(simulate.InstrumentTruth, "bias", bias_with_spot)
    n = simulate_night(cam, tmp_path, seed=2, n_bias=1, n_dark=0, n_flat=0, n_science=0, filters=(),
                       detectors=[2])
    with fits.open(n.paths("bias")[0]) as hdul:
        assert [h.name for h in hdul[1:]] == ["CCD02A", "CCD02B"]
        hot = np.argwhere(hdul["CCD02B"].data > 5000).tolist()
        assert hot == [[1023 - spot[1], 6 + spot[0]]]
        assert not (hdul["CCD02A"].data > 5000).any()
    rd = read_raw(n.paths("bias")[0], cam, [2]).detectors[2]
    img = corrected(rd)
    assert np.argwhere(img > 4000).tolist() == [[spot[1], spot[0]]]


def test_bias_and_flat_assemble_to_the_truth(night):
    """Bias: the mean of overscan-corrected biases minus the truth B is white read noise of the
    predicted size on every amplifier. Flat: ISR-assembled (overscan, bias) flat / (lamp rbar R) is 1
    to within Poisson + read noise, on each half of every detector; a mirrored or swapped half
    (vignetting, the pixel-scale QE noise, bad columns and the gain step in the wrong place) fails."""
    cam = night.camera
    biases = [read_raw(p, cam) for p in night.paths("bias")]
    for det in cam.detectors:
        mean = np.mean([corrected(r.detectors[det.id]) for r in biases], axis=0)
        truth = night.truth_bias(det.id)
        assert truth.std() > 0.5
        for a in biases[0].detectors[det.id].amps:
            resid = (mean - truth)[a.det_slices]
            sigma2 = (a.read_noise / a.gain) ** 2 + 1 / 12
            s_med2 = np.pi / 2 * sigma2 / (a.overscan.shape[1] - a.amp.overscan_margin)
            assert resid.std() == pytest.approx(np.sqrt((sigma2 + s_med2) / len(biases)), rel=0.1), (det.name, a.name)

    e = night.select("flat", "r")[0]
    lamp = night.exposure_truth(e.exposure_id)["lamp_level"]
    rbar = night.flat_reference("r")
    raw = read_raw(e.path, cam)
    cfg = IsrConfig(do_dark=False, do_flat=False, overscan_fit_type="MEDIAN_PER_ROW")
    for det in cam.detectors:
        rd = raw.detectors[det.id]
        mi = run_isr(rd, cfg, bias=night.truth_bias(det.id))
        # ISR assembles what the hand-written assembly above gives (the per-row overscan medians may
        # differ by a fraction of an ADU: ISR takes every overscan column, the helper skips the margin)
        assert np.abs(mi.image - (corrected(rd) - night.truth_bias(det.id))).max() < 2.0
        truth = night.truth_flat("r", det.id)
        good = truth > 0.5
        expected = lamp * rbar * truth
        with np.errstate(divide="ignore", invalid="ignore"):     # dead columns
            ratio = mi.image / expected
        for a in rd.amps:
            ys, xs = a.det_slices
            sel = good[ys, xs]
            r = ratio[ys, xs][sel]
            e_adu = expected[ys, xs][sel]
            noise = np.sqrt(np.mean((e_adu / a.gain + (a.read_noise / a.gain) ** 2) / e_adu ** 2))
            assert abs(r.mean() - 1) < 5 * noise / np.sqrt(r.size) + 2e-4, (det.name, a.name, r.mean())
            assert r.std() == pytest.approx(noise, rel=0.06), (det.name, a.name, r.std(), noise)
            # mirrored in y: the ratio is no longer flat
            with np.errstate(divide="ignore", invalid="ignore"):
                mirrored = (mi.image[ys, xs][::-1] / expected[ys, xs])[sel & good[ys, xs][::-1]]
            assert mirrored.std() > 1.3 * noise
        # swapped halves: the other half's truth does not fit
        lo, hi = slice(0, 512), slice(512, 1024)
        with np.errstate(divide="ignore", invalid="ignore"):
            swapped = mi.image[hi] / expected[lo]
        assert np.std(swapped[good[hi] & good[lo]]) > 1.3 * noise
        # the bad columns are where the truth has them
        for bad in night.static_truth["detectors"][det.name]["bad_columns"]:
            col = np.median(mi.image[bad["y_start"] + 5:, bad["x"]])
            ref = float(np.median(mi.image[bad["y_start"] + 5:, bad["x"] + 3]))
            assert col == pytest.approx(bad["factor"] * ref, abs=0.02 * ref + 20), (det.name, bad)
            if bad["y_start"] > 10:         # and only from their start row up
                below = float(np.median(mi.image[:bad["y_start"] - 5, bad["x"]]))
                assert below == pytest.approx(float(np.median(mi.image[:bad["y_start"] - 5, bad["x"] + 3])), rel=0.02)


def test_row_drift_is_in_data_and_overscan_alike(night):
    """The per-exposure row drift r_j,a(row) is present (the per-row overscan level varies well beyond
    its noise), follows the readout rows of each amplifier (B's are flipped in y), and the per-row
    overscan correction removes it (checked by the bias test above)."""
    cam = night.camera
    e = night.select("bias")[0]
    raw = read_raw(e.path, cam)
    tr = night.exposure_truth(e.exposure_id)
    for det in cam.detectors:
        for a in raw.detectors[det.id].amps:
            over = a.overscan[:, a.amp.overscan_margin:]
            rows = over.mean(axis=1)
            # 16-row blocks: the read noise averages down to ~0.15 ADU, the drift (~0.6 ADU rms) stays
            blocks = rows.reshape(-1, 16).mean(axis=1)
            noise = (a.read_noise / a.gain) / np.sqrt(over.size / blocks.size)
            assert blocks.std() > 2.5 * noise, (det.name, a.name, blocks.std(), noise)
            # the data rows (bias B subtracted) follow the overscan rows, in readout order
            bias = night.truth_bias(det.id)[a.det_slices]
            data = a.data - (bias[::-1] if a.flip_y else bias)
            dblocks = data.mean(axis=1).reshape(-1, 16).mean(axis=1)
            assert np.corrcoef(dblocks, blocks)[0, 1] > 0.8, (det.name, a.name)
            assert rows.mean() == pytest.approx(night.bias_level(det.id, a.name)
                                                + tr["bias_offset"][det.name][a.name], abs=0.2)


def test_nightly_style_ingest(night, tmp_path):
    from calibflow.cli import app

    runner = CliRunner()
    repo = tmp_path / "repo"
    env = {"CALIBFLOW_REPO": str(repo)}
    res = runner.invoke(app, ["init", "--repo", str(repo)], env=env)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ingest", str(night.out_dir / "raw"), "--camera", CAMERA, "--repo", str(repo),
                              "--transfer", "symlink"], env=env)
    assert res.exit_code == 0, res.output
    assert f"ingested {len(night.exposures)}," in res.output
    res = runner.invoke(app, ["exposures", "--json", "--repo", str(repo), "--camera", CAMERA], env=env)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert sorted(r["exposure_id"] for r in rows) == sorted(e.exposure_id for e in night.exposures)
    assert {r["obs_type"] for r in rows} == {"bias", "flat"}
    assert all(r["night"] == night.night.isoformat() for r in rows)
    # again: a no-op
    res = runner.invoke(app, ["ingest", str(night.out_dir / "raw"), "--camera", CAMERA, "--repo", str(repo),
                              "--transfer", "symlink"], env=env)
    assert res.exit_code == 0 and "ingested 0," in res.output, res.output


def test_bad_columns_in_the_raw_readout_geometry(night):
    """A bad column runs from its start row to the top of the detector: in amplifier B's HDU (read
    from the top) it occupies the first raw rows, in A's the last ones, at raw column 6 + x."""
    cam = night.camera
    e = night.select("flat", "r")[0]
    with fits.open(e.path) as hdul:
        for det in cam.detectors:
            for bad in night.static_truth["detectors"][det.name]["bad_columns"]:
                x, y0 = bad["x"], bad["y_start"]
                b = hdul[f"{det.name.upper()}B"].data.astype(float)
                col, ref = b[:, 6 + x], b[:, 6 + x + 3]
                n_b = 1024 - max(y0, 512)            # bad rows in B: detector rows max(y0, 512)..1023
                assert np.median(col[:n_b]) < 0.5 * np.median(ref[:n_b]), (det.name, bad)
                if n_b < 500:
                    assert np.median(col[n_b + 5:]) == pytest.approx(np.median(ref[n_b + 5:]), rel=0.05)
                if y0 < 512:
                    a = hdul[f"{det.name.upper()}A"].data.astype(float)
                    assert np.median(a[y0 + 2:, 6 + x]) < 0.5 * np.median(a[y0 + 2:, 6 + x + 3]), (det.name, bad)
