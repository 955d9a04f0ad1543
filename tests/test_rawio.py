"""Reading raw files: every real frame, compressed and scaled integer data, and clear errors."""

import gzip
import shutil

import numpy as np
import pytest
from astropy.io import fits

from calib_core.camera import load_camera
from calib_core.io.raw import RawFile, RawReadError, night_of, read_raw

# (camera, folder, expected counts per obs type) for ../shared/realdata (MANIFEST.md)
REAL = [
    ("keck_hires", "keck_hires", {"bias": 5}),
    ("lick_kast_blue", "lick_kast_blue", {"bias": 10, "flat": 12, "arc": 1, "science": 4}),
    ("wht_isis_blue", "wht_isis_blue", {"bias": 2, "flat": 4, "arc": 1, "science": 3}),
]


@pytest.mark.realdata
@pytest.mark.parametrize("camera, folder, expected", REAL)
def test_every_real_frame_reads(realdata, camera, folder, expected):
    cam = load_camera(camera)
    counts = {}
    for path in sorted((realdata / folder).glob("*.fit*")):
        raw = read_raw(path, cam)
        counts[raw.metadata.obs_type] = counts.get(raw.metadata.obs_type, 0) + 1
        assert set(raw.detectors) == set(cam.detector_ids)
        for det in raw.detectors.values():
            covered = np.zeros(det.shape, dtype=int)
            for amp in det.amps:
                assert amp.data.shape == (amp.det_slices[0].stop - amp.det_slices[0].start,
                                          amp.det_slices[1].stop - amp.det_slices[1].start)
                assert amp.overscan is not None and amp.overscan.size > 0
                covered[amp.det_slices] += 1
                # overscan is bias: close to the median of a bias frame, below an exposed frame
                bias = float(np.median(amp.overscan))
                assert 100 < bias < 5000
            assert (covered == 1).all(), "amplifiers must tile the detector exactly once"
    assert counts == expected


@pytest.mark.realdata
def test_header_pitfalls(realdata):
    kast = load_camera("lick_kast_blue")
    bias = read_raw(realdata / "lick_kast_blue" / "b14.fits.gz", kast).metadata
    assert bias.obs_type == "bias"            # OBSTYPE says DARK: the real type is in OBJECT
    assert bias.filter == "600/4310"          # no FILTER key: grism
    assert bias.night.isoformat() == "2015-05-19"
    assert bias.exposure_id == "20150519_b14"
    sci = read_raw(realdata / "lick_kast_blue" / "b27.fits.gz", kast).metadata
    assert sci.obs_type == "science" and sci.exptime == 1200
    hires = load_camera("keck_hires")
    raw = read_raw(realdata / "keck_hires" / "hires3027.fits.gz", hires)
    assert raw.metadata.filter == "clear"     # no FILTER key: FIL1NAME
    assert raw.metadata.date_obs.hour == 2    # date-only DATE-OBS completed from UTC
    assert all(d.amps[0].flip_x for d in raw.detectors.values())   # DETSEC runs backwards
    assert raw.detectors[1].amps[0].overscan.shape[1] == 38       # DATASEC leaves 40 columns, 2 skipped
    isis = read_raw(realdata / "wht_isis_blue" / "r2324594.fit.gz", load_camera("wht_isis_blue"))
    amp = isis.detectors[0].amps[0]
    assert amp.overscan_axis == 0 and amp.gain == pytest.approx(1.2) and amp.read_noise == pytest.approx(5.0)


def test_msfc_frames(msfc_data):
    cam = load_camera("msfc_esis")
    seen, lit = {}, 0
    for path in sorted(msfc_data.rglob("*.fit*")):
        raw = read_raw(path, cam)
        seen.setdefault(raw.metadata.obs_type, []).append(raw.metadata.exptime)
        det = raw.detectors[0]
        assert det.shape == (1024, 2048) and len(det.amps) == 4
        for amp in det.amps:
            if raw.metadata.obs_type == "dark":
                # blank columns carry the bias: a short dark's data sit within a few % of them
                assert abs(np.median(amp.overscan) - np.median(amp.data)) < 0.05 * np.median(amp.overscan)
        levels = [float(np.median(a.overscan)) for a in det.amps]
        # four taps, four amplifiers: their bias levels differ by far more than the read noise (~4 DN)
        assert max(levels) - min(levels) > 50
        if raw.metadata.obs_type == "flat":
            lit += all(np.median(a.data) > np.median(a.overscan) + 1000 for a in det.amps)
    assert set(seen) == {"dark", "flat", "other"}
    assert lit == 2   # two of the four LED frames were taken with the LED off (real lab data)
    # IMG_EXP is in ms: the dark-current series spans seconds, not thousands of seconds
    assert max(seen["dark"]) < 100 and min(seen["dark"]) > 0


def test_night_rule():
    import datetime as dt

    t = dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.timezone.utc)
    assert night_of(t, -4.7).isoformat() == "2026-11-20"   # 22:18 local: the evening of the 20th
    assert night_of(t, 10.0).isoformat() == "2026-11-21"   # 13:00 local next day: the night of the 21st


# -- synthetic files exercising the reader's formats and failure modes ------------------------------------

def _tiny_camera(tmp_path, layout="hdu_per_detector"):
    text = f"""
name: tiny
layout: {layout}
detectors:
  - id: 0
    name: d0
    {"hdu: SCI" if layout == "hdu_per_detector" else ""}
    amplifiers:
      - {{name: A, {"hdu: AMP1," if layout != "hdu_per_detector" else ""} data_section: '[1:8,1:6]',
         overscan_section: '[9:12,1:6]', detector_section: '[1:8,1:6]', gain: 2.0, read_noise: 5.0}}
      - {{name: B, {"hdu: AMP2," if layout != "hdu_per_detector" else ""}
         data_section: '{"[13:20,1:6]" if layout == "hdu_per_detector" else "[1:8,1:6]"}',
         overscan_section: '{"[21:24,1:6]" if layout == "hdu_per_detector" else "[9:12,1:6]"}',
         detector_section: '[16:9,1:6]', gain: 2.0, read_noise: 5.0}}
metadata:
  obs_type: [{{key: OBSTYPE, pattern: bias, value: bias}}]
  exposure_id: {{keys: [EXPID], required: true}}
"""
    p = tmp_path / "tiny.yaml"
    p.write_text(text)
    return load_camera(p)


def _primary(**extra):
    h = fits.Header()
    h.update({"OBSTYPE": "bias", "EXPTIME": 0.0, "DATE-OBS": "2026-11-21T03:00:00", "EXPID": "e1", **extra})
    return fits.PrimaryHDU(header=h)


def _write_tiny(path, layout="hdu_per_detector", compress=None, drop_key=None, dtype=np.uint16):
    rng = np.random.default_rng(1)
    primary = _primary()
    if drop_key:
        del primary.header[drop_key]
    hdus = [primary]
    if layout == "hdu_per_detector":
        data = (1000 + np.arange(6 * 24).reshape(6, 24)).astype(dtype)
        hdus.append(fits.ImageHDU(data, name="SCI"))
    else:
        for name in ("AMP1", "AMP2"):
            hdus.append(fits.ImageHDU((1000 + rng.integers(0, 50, (6, 12))).astype(dtype), name=name))
    if compress == "rice":
        hdus = [hdus[0]] + [fits.CompImageHDU(h.data, header=h.header, compression_type="RICE_1", name=h.name)
                            for h in hdus[1:]]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    if compress == "gzip":
        with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
        return path.with_name(path.name + ".gz")
    return path


@pytest.mark.parametrize("compress", [None, "gzip", "rice"])
def test_compressed_and_scaled_integers(tmp_path, compress):
    cam = _tiny_camera(tmp_path)
    path = _write_tiny(tmp_path / "a.fits", compress=compress)
    raw = read_raw(path, cam)
    det = raw.detectors[0]
    expected = (1000 + np.arange(6 * 24).reshape(6, 24)).astype(np.float32)
    np.testing.assert_array_equal(det.amps[0].raw, expected)       # BZERO=32768 uint16 decoded exactly
    assert det.amps[0].raw.dtype == np.float32
    assert det.shape == (6, 16) and det.amps[1].flip_x and not det.amps[0].flip_x
    with RawFile(path, cam) as rf:      # opened once for a task's detectors: the same pixels, twice over
        for _ in range(2):
            again = rf.detector(0)
            np.testing.assert_array_equal(again.amps[0].raw, expected)
            assert again.shape == det.shape and again.amps[1].flip_x
        assert rf.metadata.exptime == 0.0


def test_hdu_per_amplifier(tmp_path):
    cam = _tiny_camera(tmp_path, layout="hdu_per_amplifier")
    path = _write_tiny(tmp_path / "b.fits", layout="hdu_per_amplifier")
    raw = read_raw(path, cam)
    det = raw.detectors[0]
    assert det.amps[0].raw is not det.amps[1].raw and det.shape == (6, 16)
    with fits.open(path) as hdul:
        written = {name: hdul[name].data.astype(np.float32) for name in ("AMP1", "AMP2")}
    with RawFile(path, cam) as rf:
        got = rf.detector(0)
        for amp, name in zip(got.amps, ("AMP1", "AMP2")):
            np.testing.assert_array_equal(amp.raw, written[name])
        # the pixels are the caller's: the open file keeps no decoded copy of them
        assert not any("data" in h.__dict__ for h in rf._hdul)


def test_errors_name_the_file(tmp_path):
    cam = _tiny_camera(tmp_path)
    good = _write_tiny(tmp_path / "good.fits")
    # not FITS at all
    notfits = tmp_path / "notes.fits"
    notfits.write_text("hello, I am a text file\n")
    # truncated: cut the pixel data in half
    truncated = tmp_path / "trunc.fits"
    truncated.write_bytes(good.read_bytes()[: 2880 * 2 + 100])
    # missing key
    nodate = _write_tiny(tmp_path / "nodate.fits", drop_key="DATE-OBS")
    # wrong HDU
    wronghdu = tmp_path / "wronghdu.fits"
    fits.HDUList([_primary(), fits.ImageHDU(np.zeros((6, 24), np.uint16), name="OTHER")]).writeto(wronghdu)
    # shape that does not fit the sections
    small = tmp_path / "small.fits"
    fits.HDUList([_primary(), fits.ImageHDU(np.zeros((6, 10), np.uint16), name="SCI")]).writeto(small)
    cases = {notfits: "not a FITS file", truncated: "truncated", nodate: "observation date",
             wronghdu: "HDU 'SCI' not found", small: "outside HDU"}
    for path, words in cases.items():
        with pytest.raises(RawReadError) as info:
            read_raw(path, cam)
        assert str(path) in str(info.value), info.value
        assert words in str(info.value), info.value
        # a file opened once for several detectors fails as clearly: on opening or on the detector
        with pytest.raises(RawReadError) as info:
            with RawFile(path, cam) as rf:
                rf.detector(0)
        assert str(path) in str(info.value) and words in str(info.value), info.value
    with pytest.raises(RawReadError, match="file not found"):
        read_raw(tmp_path / "missing.fits", cam)
