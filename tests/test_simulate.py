"""Tests of the night simulator: the raw files it writes read back through rawio, and they agree with
the truth it writes beside them, within the noise the model predicts."""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pytest
from astropy.io import fits

from calib_core.camera import load_camera
from calib_core.io.raw import night_of, read_raw
from calib_core.simulate import night as simulate
from calib_core.simulate.night import SimulatedNight, simulate_night
from tests._raw import corrected

CAMERA = "democam_mini"
N_BIAS = 8


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> SimulatedNight:
    out = tmp_path_factory.mktemp("night")
    return simulate_night(CAMERA, out, seed=3, n_bias=N_BIAS, n_dark=3, n_flat=2, n_science=2,
                          filters=("r", "z"))


def gain_map(rd) -> np.ndarray:
    g = np.empty(rd.shape)
    for a in rd.amps:
        g[a.det_slices] = a.gain
    return g


def pixel_hash(paths, camera) -> str:
    h = hashlib.sha256()
    for p in paths:
        with fits.open(p) as hdul:
            for hdu in hdul[1:]:
                h.update(np.ascontiguousarray(hdu.data).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# files and metadata
# --------------------------------------------------------------------------------------------------


def test_files_read_back_with_their_metadata(night):
    camera = night.camera
    assert night.summary == {"bias": N_BIAS, "dark": 3, "flat": 4, "science": 4, "total": N_BIAS + 11}
    seen, starts = set(), []
    for e in night.exposures:
        assert e.path.name == f"{e.exposure_id}.fits" and e.path.parent.name == "raw"
        raw = read_raw(e.path, camera)
        m = raw.metadata
        assert m.exposure_id == e.exposure_id and m.exposure_id.startswith("20261120")
        assert m.obs_type == e.obs_type
        assert m.night == dt.date(2026, 11, 20) == night_of(m.date_obs, camera.utc_offset_hours)
        assert len(raw.detectors) == len(camera.detectors) == 9
        expected = {"bias": (0.0, 0.0, "NONE"), "dark": (300.0, 300.0, "NONE"),
                    "flat": (5.0, 5.0, e.filter), "science": (120.0, 120.0, e.filter)}[e.obs_type]
        assert (m.exptime, m.darktime, m.filter) == expected
        if e.obs_type == "flat":
            assert m.object == "dome flat"
        assert raw.primary_header["OBSTYPE"] == e.obs_type
        for rd in raw.detectors.values():
            assert rd.shape == (512, 256)
        seen.add(m.exposure_id)
        starts.append(m.date_obs)
    assert len(seen) == len(night.exposures)
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    # calibrations in the local afternoon, science after dark
    local = [s + dt.timedelta(hours=camera.utc_offset_hours) for s in starts]
    kinds = [e.obs_type for e in night.exposures]
    assert all(12 <= t.hour < 18 for t, k in zip(local, kinds) if k != "science")
    assert all(t.hour >= 18 or t.hour < 7 for t, k in zip(local, kinds) if k == "science")
    ids = [e.exposure_id for e in night.exposures]
    assert ids == sorted(ids)


def test_pixels_are_uint16_with_bzero(night):
    with fits.open(night.exposures[0].path, do_not_scale_image_data=True) as hdul:
        assert [h.name for h in hdul[1:]] == [d.hdu for d in night.camera.detectors]
        h = hdul["CCD04"].header
        assert h["BITPIX"] == 16 and h["BZERO"] == 32768
        assert hdul["CCD04"].data.shape == (512, 296)
        assert "DATE" not in hdul[0].header


def test_reload_gives_the_same_night(night):
    again = SimulatedNight.load(night.out_dir)
    assert again.exposures == night.exposures
    assert again.summary == night.summary and again.filters == ["r", "z"]
    assert again.camera == night.camera


def test_rerun_into_the_same_folder_replaces_the_raw_files(tmp_path):
    first = simulate_night(CAMERA, tmp_path, seed=1, n_bias=3, n_dark=0, n_flat=0, n_science=0, filters=(),
                           detectors=[0])
    assert len(list((tmp_path / "raw").iterdir())) == 3
    second = simulate_night(CAMERA, tmp_path, seed=1, n_bias=1, n_dark=1, n_flat=0, n_science=0, filters=(),
                            detectors=[0], compress="gzip")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(p.name for p in second.paths())
    assert first.paths()[0].name != second.paths()[0].name


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="compress"):
        simulate_night(CAMERA, tmp_path, compress="zip")
    with pytest.raises(ValueError, match="n_flat"):
        simulate_night(CAMERA, tmp_path, n_flat=-1)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------


def _small(tmp, seed, **kw):
    args = dict(n_bias=1, n_dark=1, n_flat=1, n_science=1, filters=("z",))
    args.update(kw)
    return simulate_night(CAMERA, tmp, seed=seed, **args)


def test_same_seed_same_pixels_and_subsets_agree(tmp_path):
    a = _small(tmp_path / "a", 11, detectors=[0, 4, 8])
    b = _small(tmp_path / "b", 11, detectors=[0, 4, 8])
    c = _small(tmp_path / "c", 12, detectors=[0, 4, 8])
    assert pixel_hash(a.paths(), a.camera) == pixel_hash(b.paths(), b.camera)
    assert pixel_hash(a.paths(), a.camera) != pixel_hash(c.paths(), c.camera)
    for pa, pb in zip(a.paths(), b.paths()):
        assert pa.read_bytes() == pb.read_bytes()
    # a single detector simulated alone has exactly the pixels it has in a larger run
    d = _small(tmp_path / "d", 11, detectors=["ccd04"])
    for pa, pd in zip(a.paths(), d.paths()):
        with fits.open(pa) as ha, fits.open(pd) as hd:
            assert len(hd) == 2
            assert np.array_equal(ha["CCD04"].data, hd["CCD04"].data)
    assert np.array_equal(a.truth_sky("z", 4), d.truth_sky("z", 4))
    assert np.array_equal(a.truth_flat("z", 4), d.truth_flat("z", 4))


def test_map_cache_makes_each_filter_map_once_and_never_changes_the_pixels(tmp_path, monkeypatch):
    """The truth is written filter by filter and the flats and science exposures then go through the
    filters again: with room for every filter's maps each (filter, detector) Q map is made once, and
    each sky pattern map once (the focal-plane mean's maps become the normalised ones); with no room
    (each insert drops the other filters' maps, the old behaviour) they are made again, and the files
    written are the same bytes either way."""
    made, skies = [], []
    qe_raw, sky_raw = simulate.InstrumentTruth._qe_raw, simulate.InstrumentTruth._sky_raw
    monkeypatch.setattr(simulate.InstrumentTruth, "_qe_raw",
                        lambda self, det, filt: made.append((filt, det.id)) or qe_raw(self, det, filt))
    monkeypatch.setattr(simulate.InstrumentTruth, "_sky_raw",
                        lambda self, det, filt: skies.append((filt, det.id)) or sky_raw(self, det, filt))
    kw = dict(n_bias=0, n_dark=0, n_flat=1, n_science=1, filters=("r", "z"), detectors=[0, 4])
    roomy = simulate_night(CAMERA, tmp_path / "roomy", seed=7, **kw)
    # (the focal-plane means behind the truth's normalisation visit every detector of the camera)
    assert len(made) == len(set(made)) and {f for f, _ in made} == {"r", "z"} and {("r", 4), ("z", 4)} <= set(made)
    assert len(skies) == len(set(skies)) and {("r", 4), ("z", 4)} <= set(skies)
    made.clear()
    skies.clear()
    monkeypatch.setattr(simulate, "MAP_CACHE_BYTES", 0)
    tight = simulate_night(CAMERA, tmp_path / "tight", seed=7, **kw)
    assert len(made) > len(set(made)) and len(skies) > len(set(skies))
    names = sorted(p.relative_to(roomy.out_dir) for p in roomy.out_dir.rglob("*.fits"))
    assert names and names == sorted(p.relative_to(tight.out_dir) for p in tight.out_dir.rglob("*.fits"))
    for name in names:
        assert (roomy.out_dir / name).read_bytes() == (tight.out_dir / name).read_bytes(), name


def test_compressed_files_read_back_identical(tmp_path):
    kw = dict(n_bias=1, n_dark=1, n_flat=0, n_science=1, filters=("z",), detectors=[1, 7])
    calls = []
    plain = simulate_night(CAMERA, tmp_path / "plain", seed=5, progress=lambda d, t: calls.append((d, t)), **kw)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert "S_j" in (tmp_path / "plain" / "truth" / "README.txt").read_text()
    for compress, suffix in (("gzip", ".fits.gz"), ("rice", ".fits.fz")):
        other = simulate_night(CAMERA, tmp_path / compress, seed=5, compress=compress, **kw)
        for ep, eo in zip(plain.exposures, other.exposures):
            assert eo.path.name.endswith(suffix)
            rp, ro = read_raw(ep.path, plain.camera, [1, 7]), read_raw(eo.path, other.camera, [1, 7])
            assert rp.metadata.to_dict() == ro.metadata.to_dict()
            for det in (1, 7):
                assert np.array_equal(rp.detectors[det].amps[0].raw, ro.detectors[det].amps[0].raw)
    gz = tmp_path / "gzip" / "raw"
    assert all(p.read_bytes()[:2] == b"\x1f\x8b" for p in gz.iterdir())


# --------------------------------------------------------------------------------------------------
# geometry: amplifier B is stored mirrored
# --------------------------------------------------------------------------------------------------


def test_amp_b_mirroring_of_an_injected_feature(tmp_path, monkeypatch):
    camera = load_camera(CAMERA)
    det = camera.detector(4)
    spot = (200, 300)   # (x, y) in amplifier B (detector columns 128..255)
    original = simulate.InstrumentTruth.bias

    def bias_with_spot(self, d):
        b = original(self, d)
        if d.id == det.id:
            b[spot[1], spot[0]] += 5000.0
        return b

    monkeypatch.setattr(simulate.InstrumentTruth, "bias", bias_with_spot)
    n = simulate_night(camera, tmp_path, seed=2, n_bias=1, n_dark=0, n_flat=0, n_science=0, filters=(),
                       detectors=[4])
    assert n.truth_bias(4)[spot[1], spot[0]] > 4000
    raw = read_raw(n.paths("bias")[0], camera, [4])
    rd = raw.detectors[4]
    amp_b = next(a for a in rd.amps if a.name == "B")
    assert amp_b.flip_x
    # in the raw HDU: data of B starts at column 152 (0-based) and runs from detector x=255 down
    hot_raw = np.argwhere(amp_b.raw > 5000)
    assert hot_raw.tolist() == [[300, 152 + (255 - spot[0])]]
    img = corrected(rd)
    assert np.argwhere(img > 4000).tolist() == [[spot[1], spot[0]]]


def test_assembled_flat_follows_the_truth_orientation(night):
    """Pixel-scale QE noise and bad columns of the truth flat line up with the assembled flat."""
    e = night.select("flat", "r")[0]
    raw = read_raw(e.path, night.camera)
    for det in night.camera.detectors:
        rd = raw.detectors[det.id]
        img = corrected(rd) - night.truth_bias(det.id)
        truth = night.truth_flat("r", det.id)
        for a in rd.amps:
            ys, xs = a.det_slices
            # x-differences: the pixel-scale QE noise stays, the smooth vignetting goes
            o, t = np.diff(img[ys, xs], axis=1).ravel(), np.diff(truth[ys, xs], axis=1).ravel()
            m = np.diff(img[ys, xs][:, ::-1], axis=1).ravel()
            good = np.abs(t) < 0.05
            corr = np.corrcoef(o[good], t[good])[0, 1]
            mirrored = np.corrcoef(m[good], t[good])[0, 1]
            assert corr > 0.3 > abs(mirrored) + 0.15, (det.name, a.name, corr, mirrored)
        static = night.static_truth["detectors"][det.name]
        for bad in static["bad_columns"]:
            col = img[bad["y_start"] + 5:, bad["x"]]
            ref = img[bad["y_start"] + 5:, bad["x"] + 3]
            assert np.median(col) == pytest.approx(bad["factor"] * np.median(ref), abs=0.02 * np.median(ref) + 20)


# --------------------------------------------------------------------------------------------------
# consistency with the truth
# --------------------------------------------------------------------------------------------------


def test_overscan_level_per_amp_matches_the_bias_level(night):
    camera = night.camera
    for e in night.select("bias")[:3]:
        raw = read_raw(e.path, camera)
        truth = night.exposure_truth(e.exposure_id)
        for det in camera.detectors:
            levels = []
            for a in raw.detectors[det.id].amps:
                expected = night.bias_level(det.id, a.name) + truth["bias_offset"][det.name][a.name]
                # mean (the median of integers is an integer) of 14 x 512 values with sigma ~3 ADU:
                # statistical error ~0.04 ADU
                assert np.mean(a.overscan[:, 2:]) == pytest.approx(expected, abs=0.2)
                assert abs(night.bias_level(det.id, a.name) - 1000.0) <= 150.0
                levels.append(expected)
            assert abs(levels[0] - levels[1]) > 0.1


def test_stacked_overscan_corrected_bias_recovers_the_truth(night):
    """Mean of N overscan-corrected biases = B within noise.

    Per pixel the residual (mean - B) has variance (sigma^2 + 1/12 + s_med^2) / N with sigma = rn/g the
    read noise in ADU, 1/12 the rounding to integers and s_med^2 ~ (pi/2) (sigma^2 + 1/12) / n_over the
    variance of the per-row overscan median. Its standard deviation over an amplifier must match
    this to 10 % (a wrong B, or B in the wrong place, adds ~1 ADU rms: ~40 % more), and its mean
    must be within 5 standard errors of zero.
    """
    camera = night.camera
    paths = night.paths("bias")
    assert len(paths) == N_BIAS
    stacks = {det.id: [] for det in camera.detectors}
    for p in paths:
        raw = read_raw(p, camera)
        for det in camera.detectors:
            stacks[det.id].append(corrected(raw.detectors[det.id]))
    for det in camera.detectors:
        mean = np.mean(stacks[det.id], axis=0)
        truth = night.truth_bias(det.id)
        assert truth.std() > 0.5
        rd = read_raw(paths[0], camera, [det.id]).detectors[det.id]
        for a in rd.amps:
            resid = (mean - truth)[a.det_slices]
            sigma2 = (a.read_noise / a.gain) ** 2 + 1 / 12
            n_over = a.overscan.shape[1] - a.amp.overscan_margin
            s_med2 = np.pi / 2 * sigma2 / n_over
            expected = np.sqrt((sigma2 + s_med2) / N_BIAS)
            assert resid.std() == pytest.approx(expected, rel=0.10), (det.name, a.name)
            # the per-row median error is common to a row: it dominates the error of the mean
            err_mean = np.sqrt(s_med2 / (N_BIAS * resid.shape[0]) + sigma2 / (N_BIAS * resid.size))
            assert abs(resid.mean()) < 5 * err_mean + 0.02, (det.name, a.name, resid.mean(), err_mean)


def test_flat_ratio_between_detectors_matches_the_truth(night):
    """Ratio of two detectors' flats, pixel by pixel, = ratio of truth flats within Poisson noise."""
    camera = night.camera
    e = night.select("flat", "z")[1]
    lamp = night.exposure_truth(e.exposure_id)["lamp_level"]
    rbar = night.flat_reference("z")
    raw = read_raw(e.path, camera)

    def flat_adu(det_id):
        rd = raw.detectors[det_id]
        img = corrected(rd) - night.truth_bias(det_id) - night.truth_dark(det_id) * e.darktime
        return img, gain_map(rd)

    (fa, ga), (fb, gb) = flat_adu(0), flat_adu(7)
    ta, tb = night.truth_flat("z", 0), night.truth_flat("z", 7)
    # expected ADU and its variance: Poisson electrons (E/g^2) plus read noise
    ea, eb = lamp * rbar * ta, lamp * rbar * tb
    good = (ta > 0.5) & (tb > 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):     # dead columns
        q = (fa / fb) / (ta / tb)
        var_q = (ea / ga + 20) / ea ** 2 + (eb / gb + 20) / eb ** 2    # relative variances, 20 ADU^2 read noise
    pulls = (q[good] - 1) / np.sqrt(var_q[good])
    assert abs(pulls.mean()) < 5 / np.sqrt(good.sum())
    assert pulls.std() == pytest.approx(1.0, abs=0.05)
    # and the whole-detector ratio
    assert np.mean(fa[good]) / np.mean(fb[good]) == pytest.approx(np.mean(ea[good]) / np.mean(eb[good]), rel=2e-4)


def test_truth_flat_and_sky_are_normalised_over_the_focal_plane(night):
    for f in ("r", "z"):
        flats = [night.truth_flat(f, d.id) for d in night.camera.detectors]
        skies = [night.truth_sky(f, d.id) for d in night.camera.detectors]
        assert np.mean(flats, dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
        assert np.mean(skies, dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
        assert np.mean([night.truth_qe(f, d.id) for d in night.camera.detectors], dtype=np.float64) == \
            pytest.approx(1.0, abs=1e-5)
        # the sky pattern is small-scale structure of a few per cent
        assert 0.005 < np.std(skies) < 0.04
    for d in night.camera.detectors:
        fr = night.truth_fringe("z", d.id)
        assert abs(fr.mean()) < 1e-4 and 0.009 < fr.std() < 0.021
        assert not night.truth_fringe("r", d.id).any()


def test_dark_hot_pixels_are_where_the_truth_says(night):
    camera = night.camera
    darks = night.select("dark")
    for det in camera.detectors[:4]:
        imgs = [corrected(read_raw(e.path, camera, [det.id]).detectors[det.id]) - night.truth_bias(det.id)
                for e in darks]
        low = np.min(imgs, axis=0)     # the minimum of three rejects cosmic rays
        rate = night.truth_dark(det.id)
        t = darks[0].darktime
        bright = rate * t > 60          # > 60 ADU: well above the ~3 ADU read noise
        found = low > 30
        assert bright.sum() > 20
        assert (found & bright).sum() >= 0.98 * bright.sum()
        assert np.all(rate[found] * t > 10)         # nothing is found where the truth has no hot pixel
        # the mean dark current (hot pixels excluded) matches d0/g
        # cosmic rays excluded (any frame 20 ADU above the median of the three); the error of the mean
        # is dominated by the per-row overscan medians, ~1 ADU / sqrt(3 x 512 rows) / t: ~6 %
        cold = (rate * t < 5) & ~np.any(imgs - np.median(imgs, axis=0) > 20, axis=0)
        assert np.mean(np.mean(imgs, axis=0)[cold]) / t == pytest.approx(np.mean(rate[cold]), rel=0.3)
    for e in darks:
        crs = night.exposure_truth(e.exposure_id)["cosmic_rays"]
        assert sum(crs.values()) > 0
    for e in night.select("bias"):
        assert sum(night.exposure_truth(e.exposure_id)["cosmic_rays"].values()) == 0


def test_science_sky_level_matches_truth(night):
    """Overscan/bias/dark-corrected science pixels / (rbar R P G) have median S_j (objects and fringes
    shift the median by well under 1 %), on every detector."""
    camera = night.camera
    for e in night.select("science"):
        tr = night.exposure_truth(e.exposure_id)
        g = tr["gradient"]
        rbar = night.flat_reference(e.filter)
        raw = read_raw(e.path, camera)
        for det in camera.detectors:
            img = (corrected(raw.detectors[det.id]) - night.truth_bias(det.id)
                   - night.truth_dark(det.id) * e.darktime)
            u, v = camera.pixel_to_focal_plane(det, *np.meshgrid(np.arange(det.nx), np.arange(det.ny)))
            w = (u * np.cos(g["theta"]) + v * np.sin(g["theta"])) / g["r_fp_mm"]
            model = rbar * night.truth_flat(e.filter, det.id) * night.truth_sky(e.filter, det.id) * \
                (1 + g["c1"] * w + g["c2"] * w * w)
            assert np.allclose(night.gradient(e.exposure_id, det.id), 1 + g["c1"] * w + g["c2"] * w * w, atol=1e-6)
            good = night.truth_flat(e.filter, det.id) > 0.5
            level = np.median(img[good] / model[good])
            assert level == pytest.approx(tr["sky_level"], rel=0.01), (e.exposure_id, det.name)
            # pixel by pixel: flat-fielded image - S (G P + phi F), in units of S, median of 8x8 blocks.
            # Per block the noise is ~1/sqrt(64 S) < 0.5 %; the pattern P and the fringes F are ~1.5 %
            # rms each, so leaving either out of the model fails this.
            flat = night.truth_flat(e.filter, det.id)
            with np.errstate(divide="ignore", invalid="ignore"):    # dead columns
                ff = img / (rbar * flat)
                resid = ff - tr["sky_level"] * (model / (rbar * flat)
                                                 + tr.get("fringe_scale", 0.0) * night.truth_fringe(e.filter, det.id))
            resid[~good] = np.nan
            # the accessor gives the same model
            assert np.allclose(ff[good] - night.sky_model(e.exposure_id, det.id)[good], resid[good], atol=0.05)
            blocks = np.nanmedian(resid.reshape(det.ny // 8, 8, det.nx // 8, 8), axis=(1, 3)) / tr["sky_level"]
            noise = 1.2533 / np.sqrt(64 * tr["sky_level"] * rbar * 1.6)
            spread = 1.4826 * np.nanmedian(np.abs(blocks - np.nanmedian(blocks)))   # robust: stars are outliers
            assert abs(np.nanmedian(blocks)) < 0.003 and spread < 1.3 * noise + 0.001, \
                (e.exposure_id, det.name, spread, noise)
        assert (e.filter == "z") == (tr["fringe_amplitude"] > 0)


def test_saturated_stars_are_clipped_at_saturation(night):
    camera = night.camera
    n_sat = n_star = 0
    for e in night.select("science"):
        tr = night.exposure_truth(e.exposure_id)
        sats = [o for o in tr["objects"] if o["saturated"]]
        n_sat += len(sats)
        raw = read_raw(e.path, camera)
        for o in sats:
            rd = raw.detectors[camera.detector(o["detector"]).id]
            x, y = int(round(o["x"])), int(round(o["y"]))
            for a in rd.amps:
                ys, xs = a.det_slices
                if ys.start <= y < ys.stop and xs.start <= x < xs.stop:
                    data = a.data[:, ::-1] if a.flip_x else a.data
                    assert data[y - ys.start, x - xs.start] == a.saturation
        # unsaturated stars are really there, with the expected peak: flux x Moffat peak fraction x
        # rbar R (ADU per incident e-); the sub-pixel offset lowers the sampled peak by up to ~30 %
        beta = simulate.MOFFAT_BETA
        alpha = tr["fwhm_px"] / (2 * np.sqrt(2 ** (1 / beta) - 1))
        frac = (beta - 1) / (np.pi * alpha ** 2)
        rbar = night.flat_reference(e.filter)
        for o in (o for o in tr["objects"] if o["kind"] == "star" and not o["saturated"]):
            det = camera.detector(o["detector"])
            x, y = int(round(o["x"])), int(round(o["y"]))
            if not (3 <= x < det.nx - 3 and 3 <= y < det.ny - 3):
                continue
            flat = night.truth_flat(e.filter, det.id)[y, x]
            expected = o["flux"] * frac * rbar * flat
            img = corrected(raw.detectors[det.id])
            local = np.median(img[y - 3:y + 4, x - 20:x - 10] if x >= 20 else img[y - 3:y + 4, x + 10:x + 20])
            noise = np.sqrt(max(local, 1.0) / 1.6 + 10)
            if expected < 8 * noise:
                continue
            peak = img[y - 1:y + 2, x - 1:x + 2].max() - local
            assert 0.6 * expected - 4 * noise < peak < 1.1 * expected + 4 * noise, (e.exposure_id, o, peak, expected)
            n_star += 1
    print(f"{n_sat} saturated and {n_star} unsaturated stars checked")
    assert n_sat >= 1 and n_star >= 3
