"""The shipped keck_lrisb and hst_acs_hrc cameras on the real frames in ../shared/realdata: types,
exposure times, filters and dates as the observatories logged them (not as the lying keys say), and
an LRIS-blue master bias equal to an independent reference computed here from the FITS keywords."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calib_core.builds.bias_dark_flat import BiasConfig, combine_bias, process_bias
from calib_core.camera import effective_config, load_camera
from calib_core.io.raw import read_metadata, read_raw
from calib_core.quality.mosaic import camera_mosaic

REALDATA = Path(__file__).parents[1].parent / "shared" / "realdata"
pytestmark = pytest.mark.skipif(not REALDATA.is_dir(),
                                reason=f"real raw frames not available ({REALDATA} is absent)")

UTC = dt.timezone.utc
# (type, exposure time, filter, UTC start): KOAIMTYP/OBJECT, ELAPTIME, BLUFILT, DATE-OBS + UT of each frame
LRISB = {
    "b150910_2033": ("arc", 1.0, "clear", dt.datetime(2015, 9, 10, 3, 52, 37, 950000, UTC)),
    "b150910_2036": ("bias", 0.0, "clear", dt.datetime(2015, 9, 10, 4, 22, 9, 270000, UTC)),
    "b150910_2037": ("bias", 0.0, "clear", dt.datetime(2015, 9, 10, 4, 22, 46, 670000, UTC)),
    "b150910_2038": ("bias", 0.0, "clear", dt.datetime(2015, 9, 10, 4, 23, 23, 920000, UTC)),
    "b150910_2070": ("science", 600.0, "clear", dt.datetime(2015, 9, 10, 5, 33, 36, 730000, UTC)),
    "b150910_2083": ("science", 60.0, "clear", dt.datetime(2015, 9, 10, 10, 2, 39, 260000, UTC)),
}
# the filter is in whichever wheel is not CLEAR (the MANIFEST's FILTER1 column says CLEAR1S for mkq)
ACS_HRC = {
    "j6gp01lzq": ("science", 5.0, "F550M", dt.datetime(2005, 1, 19, 14, 58, 56, tzinfo=UTC)),
    "j6gp01mkq": ("science", 5.0, "F435W", dt.datetime(2005, 1, 19, 15, 35, 49, tzinfo=UTC)),
}


@pytest.mark.parametrize("camera, folder, truth", [("keck_lrisb", "keck_lrisb", LRISB),
                                                    ("hst_acs_hrc", "hst_acs_hrc", ACS_HRC)])
def test_real_frames_metadata(camera, folder, truth):
    cam = load_camera(camera)
    got = {}
    for path in sorted((REALDATA / folder).glob("*.fits.gz")):
        m = read_metadata(path, cam)
        got[m.exposure_id] = (m.obs_type, m.exptime, m.filter, m.date_obs)
    assert got == truth
    if camera == "keck_lrisb":
        # Hawaii, UTC-10: frames of the early UT morning of 10 September belong to the night of the 9th
        assert {read_metadata(p, cam).night for p in (REALDATA / folder).glob("*.fits.gz")} == {dt.date(2015, 9, 9)}


def test_acs_hrc_gain_from_ccdgain_and_ignored_planes():
    cam = load_camera("hst_acs_hrc")
    path = REALDATA / "hst_acs_hrc" / "j6gp01lzq_raw.fits.gz"
    assert fits.getheader(path)["CCDGAIN"] == 4
    raw = read_raw(path, cam)
    amp = raw.detectors[0].amps[0]
    assert (amp.gain, amp.read_noise) == (4.235, 5.3)       # the table's CCDGAIN=4 row
    assert raw.detectors[0].shape == (1024, 1024)


def _fits_section(text: str):
    """1-based inclusive [x1:x2,y1:y2] -> (x1, x2, y1, y2) as written (reversed ranges kept)."""
    return tuple(int(v) for v in re.match(r"\[(\d+):(\d+),(\d+):(\d+)\]", text).groups())


def _meanclip_stack(cube: np.ndarray, nsigma: float = 3.0, niter: int = 3) -> np.ndarray:
    """Per-pixel MEANCLIP along axis 0 (docs/algorithms.md#meanclip), written out independently: pass 0 clips
    about the median with 0.7413 IQR, later passes about the previous clipped mean with its ddof=1
    standard deviation; each pass starts from every value; the result is the last pass's mean."""
    cube = cube.astype(np.float64)
    q1, med, q3 = np.percentile(cube, [25, 50, 75], axis=0)
    centre, width = med, nsigma * 0.741301109252802 * (q3 - q1)
    mean = None
    for _ in range(niter):
        keep = np.abs(cube - centre) <= width
        n = keep.sum(axis=0)
        mean = np.where(keep, cube, 0.0).sum(axis=0) / n
        var = np.where(keep, (cube - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n - 1, 1)
        centre, width = mean, nsigma * np.sqrt(np.maximum(var, 0.0))
    return mean


def _lris_reference_bias(paths) -> np.ndarray:
    """The LRIS-blue master bias built from the FITS keywords alone: per amplifier HDU, subtract the
    median of the overscan (the columns after DATASEC, skipping 2), trim to DATASEC, place by DETSEC
    divided by CCDSUM (a reversed range mirrors the amplifier) in the binned 2048 x 2048 mosaic, then
    MEANCLIP per pixel across the exposures."""
    frames = []
    for path in paths:
        with fits.open(path) as hdul:
            mosaic = np.full((2048, 2048), np.nan)
            for hdu in hdul[1:]:
                data = hdu.data.astype(np.float64)
                dx1, dx2, dy1, dy2 = _fits_section(hdu.header["DATASEC"])
                level = np.median(data[dy1 - 1:dy2, dx2 + 2:])
                trimmed = data[dy1 - 1:dy2, dx1 - 1:dx2] - level
                bx, by = (int(v) for v in hdu.header["CCDSUM"].split())
                x1, x2, y1, y2 = _fits_section(hdu.header["DETSEC"])
                if x1 > x2:
                    trimmed = trimmed[:, ::-1]
                if y1 > y2:
                    trimmed = trimmed[::-1, :]
                c0, r0 = (min(x1, x2) - 1) // bx, (min(y1, y2) - 1) // by
                mosaic[r0:r0 + trimmed.shape[0], c0:c0 + trimmed.shape[1]] = trimmed
            frames.append(mosaic)
    return _meanclip_stack(np.stack(frames))


def test_lrisb_master_bias_matches_independent_reference():
    cam = load_camera("keck_lrisb")
    paths = [p for p in sorted((REALDATA / "keck_lrisb").glob("*.fits.gz"))
             if read_metadata(p, cam).obs_type == "bias"]
    assert len(paths) == 3
    config = effective_config(BiasConfig, cam, None)
    raws = [read_raw(p, cam) for p in paths]
    masters = {d: combine_bias([process_bias(r.detectors[d], config) for r in raws], config).image
               for d in (1, 2)}
    reference = _lris_reference_bias(paths)
    assert not np.isnan(reference).any()            # the four amplifiers tile the mosaic exactly
    # CCD B1 is the left half of the DETSEC mosaic, B2 the right half
    ours = np.hstack([masters[1], masters[2]]).astype(np.float64)
    rms = float(np.sqrt(np.mean((ours - reference) ** 2)))
    print(f"LRIS-blue master bias vs reference: RMS difference {rms:.3g} ADU")
    assert rms < 1e-3, rms
    # the camera mosaic (focal plane, x to the right) is the DETSEC layout, not mirrored
    mosaic = camera_mosaic(cam, masters, binning=1)
    assert mosaic.shape == reference.shape
    assert np.sqrt(np.nanmean((mosaic - reference) ** 2)) < 1e-3
    # and the amplifier seam is real structure: a mirrored amplifier would not match it
    assert np.sqrt(np.mean((ours[:, 512:1024][:, ::-1] - reference[:, 512:1024]) ** 2)) > 0.01


def test_header_geometry_camera_without_sizes_through_the_flow(prefect_api, tmp_path, monkeypatch):
    """keck_lrisb as a user's file without nx/ny (sizes from DETSEC, as the docs allow): a rebuild
    that reuses every intermediate (another calib date) writes its mosaic from the products' shapes
    (it used to fail comparing None sizes), and a rerun whose mosaic is missing writes it again."""
    monkeypatch.setenv("CALIBFLOW_INTERMEDIATES", "keep")     # the rebuild reuses the first build's
    import tasks.calib_tasks as calib_tasks
    from calib_core import camera as camera_module
    from flows.build import build_calib
    from tests._repos import ingested_repo

    text = (Path(camera_module.__file__).parent / "cameras" / "keck_lrisb.yaml").read_text()
    path = tmp_path / "lris_nosize.yaml"
    path.write_text(text.replace("name: keck_lrisb", "name: lris_nosize").replace("    nx: 1024\n    ny: 2048\n", ""))
    cam = load_camera(path)
    assert all(d.nx is None and d.ny is None for d in cam.detectors)
    biases = [p for p in sorted((REALDATA / "keck_lrisb").glob("*.fits.gz")) if read_metadata(p, cam).obs_type == "bias"]
    store, reg = ingested_repo(tmp_path / "repo", biases, str(path))

    def fresh_process():        # what a new `calibflow build` starts from: no camera read yet
        calib_tasks._stored_camera.cache_clear()
        camera_module._camera_from_text.cache_clear()

    first = build_calib("bias", camera=str(path), repo=str(store.root))
    assert first["created"] == 2 and Path(first["mosaic_png"]).exists()
    fresh_process()
    again = build_calib("bias", camera="lris_nosize", repo=str(store.root), calib_date="2015-09-20")
    assert again["created"] == 2 and all(p["reused"] for p in again["processed"])
    png = Path(again["mosaic_png"])
    assert png.exists() and png != Path(first["mosaic_png"])
    png.unlink()
    fresh_process()
    rerun = build_calib("bias", camera="lris_nosize", repo=str(store.root), calib_date="2015-09-20")
    assert rerun["created"] == 0 and Path(rerun["mosaic_png"]) == png and png.exists()
