"""Products open where astronomers open them (issue 17, items 1 and 2).

Real products of every type are made from a small simulated democam_mini night with calib_core's own
steps (ISR, combine, fringe preparation, sky bins and their average) and written with the writer the
build uses (:func:`calib_core.io.productmeta.write_calib_product`, and
:func:`calib_core.quality.mosaic.write_product_mosaic` for the camera mosaic). Each is read back with
``astropy.nddata.CCDData.read(path)`` and no arguments: unit, mask and uncertainty must be there and
be what calibflow stored, checked where possible against values computed independently (the
simulator's truth, the inputs' errors, a binning done here). The WCS of the sky frame and of the
mosaic is checked against the camera geometry (:meth:`Camera.pixel_to_focal_plane`), and the mosaic
picture for its margin, title, labels and colour bar.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
import warnings

import astropy.units as u
import matplotlib.image as mpimg
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty, VarianceUncertainty
from astropy.wcs import WCS
from matplotlib.backends.backend_agg import FigureCanvasAgg

from calib_core.builds.bias_dark_flat import (BiasConfig, DarkConfig, FlatConfig, background_level, combine_bias,
                                              combine_calib, combine_dark, combine_flat, process_bias, process_dark,
                                              process_flat, solve_flat_scales)
from calib_core.builds.fringe import FringeConfig, prepare_fringe
from calib_core.io.productmeta import INTERMEDIATE_UNITS, PRODUCT_UNITS, write_calib_product
from calib_core.io.products import CARD_COMMENTS, provenance_cards, read_product, write_product
from calib_core.io.raw import read_raw
from calib_core.isr.persistent import clear_persistent_cr
from calib_core.isr.process import IsrConfig
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.quality import mosaic as mosaic_mod
from calib_core.quality.mosaic import bin_image, mosaic_geometry, write_product_mosaic
from calib_core.simulate.night import simulate_night
from calib_core.sky.frames import average_backgrounds, measure_sky_background
from calib_core.stats.background import BackgroundModel, bin_centres

NIGHT = "2026-11-20"
ISR_ROWS = dict(overscan_fit_type="MEDIAN_PER_ROW")     # the simulator's per-row drift (test_calibs)


def _cards(calib_type, det_id, exposures, extra=None):
    """The build's primary cards (tasks.calib_tasks.combine_detector), for these inputs."""
    calib_id = f"{calib_type}-democam_mini-r-{NIGHT}-det{det_id:03d}-0123abcd"
    dates = [dt.datetime.fromisoformat(e.date_obs.replace("Z", "+00:00")) for e in exposures]
    cards = provenance_cards(calib_type, {"calib_id": calib_id, "detector": det_id, "filter": "r",
                                          "calibDate": NIGHT}, [e.exposure_id for e in exposures], dates,
                             [e.exptime for e in exposures], exptime=0.0 if calib_type == "bias" else 1.0)
    cards.update({"CAMERA": "democam_mini", "DETECTOR": det_id, "FILTER": "r", "CALIBDATE": NIGHT,
                  "CFG_HASH": "f" * 64, "CF_VERS": "0.0.test"})
    cards.update(extra or {})
    return calib_id, cards


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """One product of each type (bias and flat for every detector: the flat mosaic), with what went
    into them."""
    with warnings.catch_warnings():
        # a comment astropy would cut is an error here
        warnings.filterwarnings("error", message=".*comment will be truncated", category=fits.verify.VerifyWarning)
        return _make_products(tmp_path_factory.mktemp("products"))


def _make_products(root):
    night = simulate_night("democam_mini", root / "sim", seed=5, night=NIGHT, n_bias=3, n_dark=3, n_flat=3,
                           n_science=0, filters=("r",))
    cam = night.camera
    raws = {k: [(e, read_raw(e.path, cam)) for e in night.select(k)] for k in ("bias", "dark", "flat")}
    out = root / "calib"
    out.mkdir()
    made = {"night": night, "camera": cam, "dir": root, "paths": {}, "data": {}}

    bias_cfg = BiasConfig(isr=IsrConfig(do_bias=False, do_dark=False, do_flat=False, **ISR_ROWS))
    biases = {d.id: combine_bias([process_bias(r.detectors[d.id], bias_cfg) for _, r in raws["bias"]], bias_cfg)
              for d in cam.detectors}
    bias_ids = {}
    for d in cam.detectors:
        bias_ids[d.id], cards = _cards("bias", d.id, [e for e, _ in raws["bias"]])
        made["paths"][("bias", d.id)] = write_calib_product(out / f"{bias_ids[d.id]}.fits", "bias", biases[d.id],
                                                            cards, cam, d.id)
    made["data"]["bias"] = biases[0]

    # dark: as the build, through intermediate files whose hot pixels lose their CR flag before the combine
    dark_cfg = DarkConfig(isr=IsrConfig(do_dark=False, do_flat=False, **ISR_ROWS))
    work = root / "work"
    work.mkdir()
    inputs = [write_product(work / f"dark{k}.fits", process_dark(r.detectors[0], biases[0], e.darktime, dark_cfg),
                            {"OBSTYPE": "postisr"}, unit=INTERMEDIATE_UNITS["dark"])
              for k, (e, r) in enumerate(raws["dark"])]
    assert clear_persistent_cr(inputs) > 0
    made["dark_inputs"] = inputs
    dark = combine_dark(inputs, dark_cfg)
    _, cards = _cards("dark", 0, [e for e, _ in raws["dark"]], {"CALIB_ISR_0": bias_ids[0]})
    made["paths"][("dark", 0)] = write_calib_product(out / "dark.fits", "dark", dark, cards, cam, 0)
    made["data"]["dark"] = dark

    flat_cfg = FlatConfig(isr=IsrConfig(do_dark=False, do_flat=False, **ISR_ROWS))
    post = {d.id: [process_flat(r.detectors[d.id], biases[d.id], config=flat_cfg) for _, r in raws["flat"]]
            for d in cam.detectors}
    sol = solve_flat_scales(np.array([[lv.mean for _, lv in post[d.id]] for d in cam.detectors]))
    flat_exposures = [e for e, _ in raws["flat"]]
    made["flat_ids"], made["flats"] = {}, {}
    for i, d in enumerate(cam.detectors):
        flat = combine_flat([mi for mi, _ in post[d.id]], sol.exp_scales, sol.ccd_scales[i], flat_cfg)
        scales = {f"CALIB_INPUT_SCALE_{n}": (float(s), f"scale of CALIB_INPUT_{n}")
                  for n, s in enumerate(sol.exp_scales)}
        made["flat_ids"][d.id], cards = _cards("flat", d.id, flat_exposures,
                                               {"CALIB_ISR_0": bias_ids[d.id], **scales, "CCDSCALE": sol.ccd_scales[i]})
        made["paths"][("flat", d.id)] = write_calib_product(out / f"{made['flat_ids'][d.id]}.fits", "flat", flat,
                                                            cards, cam, d.id)
        made["flats"][d.id] = flat
    made["data"]["flat"] = made["flats"][0]

    # fringe: the fringe preparation and combine, run on detector 0's post-ISR flats (cheap; the
    # point is the product the fringe path writes)
    fringe_cfg = FringeConfig()
    fringe = combine_calib([prepare_fringe(mi.copy(), fringe_cfg)[0] for mi, _ in post[0]])[0]
    _, cards = _cards("fringe", 0, flat_exposures, {"CALIB_ISR_0": bias_ids[0]})
    made["paths"][("fringe", 0)] = write_calib_product(out / "fringe.fits", "fringe", fringe, cards, cam, 0)
    made["data"]["fringe"] = fringe

    # sky: the binned models of the inputs divided by their level, averaged as the sky build does
    # (F = mean of I/L - 1), on detector 6 (turned half a turn in the camera)
    models = []
    for mi, _ in post[6]:
        norm = mi.copy()
        level = background_level(norm).mean
        norm /= level
        norm.image -= 1.0
        models.append(measure_sky_background(norm))
    frame = average_backgrounds(models)
    _, cards = _cards("sky", 6, flat_exposures)
    made["paths"][("sky", 6)] = write_calib_product(out / "sky.fits", "sky", frame, cards, cam, 6)
    made["data"]["sky"] = frame
    made["sky_inputs"] = models
    return made


# ------------------------------------------------------------------------------------------------
# CCDData.read with no arguments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("calib_type, det_id", [("bias", 0), ("dark", 0), ("flat", 0), ("fringe", 0)])
def test_ccddata_reads_image_products(products, calib_type, det_id):
    path = products["paths"][(calib_type, det_id)]
    mi = products["data"][calib_type]
    ccd = CCDData.read(path)
    assert ccd.unit == u.Unit(PRODUCT_UNITS[calib_type])
    assert ccd.unit == {"bias": u.adu, "dark": u.adu / u.s}.get(calib_type, u.dimensionless_unscaled)
    np.testing.assert_array_equal(ccd.data, mi.image)
    np.testing.assert_array_equal(ccd.mask, mi.mask != 0)
    assert isinstance(ccd.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(ccd.uncertainty.array, mi.variance)
    assert ccd.uncertainty.unit == ccd.unit ** 2
    # provenance comes with the data (the primary header is merged into the IMAGE header)
    assert ccd.meta["OBSTYPE"] == calib_type and ccd.meta["CALIB_INPUT_0"]
    # calibflow's own reader reads the same planes
    back, header = read_product(path)
    np.testing.assert_array_equal(back.variance, mi.variance)
    np.testing.assert_array_equal(back.mask, mi.mask)
    assert header["OBSTYPE"] == calib_type
    with fits.open(path) as hdul:
        hdul.verify("exception")                      # standard FITS, whatever astropy had to make of it
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "UNCERT"]
        assert hdul["UNCERT"].header["UTYPE"] == "VarianceUncertainty"
        assert u.Unit(hdul["UNCERT"].header["BUNIT"]) == ccd.unit ** 2


def _sigma_ratio(resid, variance):
    """std(resid / sigma) over pixels with a positive variance: 1 when the stored variance is right."""
    good = variance > 0
    return float(np.std(resid[good] / np.sqrt(variance[good])))


def test_bias_uncertainty_is_its_real_error(products):
    """The master bias minus the simulator's true bias, in units of the stored sigma, has unit scatter:
    the variance the product stores is its actual noise. Tolerance: 3 inputs of ~2.6e5 pixels give the
    scatter to < 1 %; the per-row overscan median adds ~(1.25 rn/g / 4)**2 / 3 per pixel that the
    variance plane does not hold (~+5 % on the scatter). And the stored variance is the ISR's, computed
    here from the truth and the camera's amplifiers: (max(bias, 0) / g + (rn / g)**2) / 3, to 10 %
    (the ISR takes max(0, .) of the noisy image, not of the truth: a few per cent more)."""
    ccd = CCDData.read(products["paths"][("bias", 0)])
    truth = products["night"].truth_bias(0)
    ratio = _sigma_ratio(ccd.data - truth, ccd.uncertainty.array)
    assert 0.95 < ratio < 1.1, ratio
    det = products["camera"].detector(0)
    assert ccd.uncertainty.represent_as(StdDevUncertainty).unit == u.adu
    for amp, cols in zip(det.amplifiers, (slice(0, 128), slice(128, 256))):
        expected = (np.maximum(truth[:, cols], 0) / amp.gain + (amp.read_noise / amp.gain) ** 2) / 3
        r = float(np.median(ccd.uncertainty.array[:, cols] / expected))
        assert r == pytest.approx(1.0, abs=0.1), (amp.name, r)


def test_dark_is_a_rate_per_second(products):
    """BUNIT adu/s is what the dark holds: hot pixels equal the simulator's dark current in ADU/s
    (a 300 s dark in ADU would be 300x larger), and the stored sigma is their actual error."""
    ccd = CCDData.read(products["paths"][("dark", 0)])
    truth = products["night"].truth_dark(0)
    hot = truth > 0.2
    assert hot.sum() > 5
    np.testing.assert_allclose(ccd.data[hot], truth[hot], rtol=0.15)
    assert (ccd.data[hot] * ccd.unit).to(u.adu / u.min)[0].value == pytest.approx(ccd.data[hot][0] * 60)
    # the inputs, rewritten when their hot pixels' CR flags were cleared, kept their unit
    assert all(CCDData.read(p).unit == u.adu / u.s for p in products["dark_inputs"])
    # The stored variance is the inputs' mean variance / N, each input's holding the master bias's
    # variance; but that bias was subtracted from every input, so its noise does not average down.
    # With the bias's variance ~ rn**2 / 3 (3 biases) and N = 3 darks, the actual scatter over the
    # stored sigma is sqrt((1/3 + 1/3) / ((1 + 1/3) / 3)) = 1.22 (the reference does the same).
    normal = (truth < 0.01) & ~ccd.mask
    expected = math.sqrt((1 / 3 + 1 / 3) / ((1 + 1 / 3) / 3))
    assert _sigma_ratio((ccd.data - truth)[normal], ccd.uncertainty.array[normal]) == pytest.approx(expected, rel=0.05)


def test_flat_is_dimensionless_and_its_uncertainty_real(products):
    ccd = CCDData.read(products["paths"][("flat", 4)])
    truth = products["night"].truth_flat("r", 4)
    good = (truth > 0.5) & ~ccd.mask
    c = np.median(ccd.data[good] / truth[good])        # the CCD's scale: the flat is truth x a constant
    assert ccd.unit == u.dimensionless_unscaled
    assert 0.85 < _sigma_ratio((ccd.data - c * truth)[good], ccd.uncertainty.array[good]) < 1.2


def test_ccddata_reads_the_sky_frame(products):
    path = products["paths"][("sky", 6)]
    frame = products["data"]["sky"]
    ccd = CCDData.read(path)
    assert ccd.unit == u.dimensionless_unscaled
    np.testing.assert_array_equal(ccd.data, frame.values)
    assert isinstance(ccd.uncertainty, StdDevUncertainty)
    np.testing.assert_array_equal(ccd.uncertainty.array, frame.errors)
    # independently: the error of an average of N inputs is sqrt(sum of their squared errors) / N
    inputs = products["sky_inputs"]
    expected = np.sqrt(np.sum([m.errors.astype(np.float64) ** 2 for m in inputs], axis=0)) / len(inputs)
    np.testing.assert_allclose(ccd.uncertainty.array, expected, rtol=1e-5)
    np.testing.assert_array_equal(ccd.mask, ~np.isfinite(frame.values))
    with fits.open(path) as hdul:
        hdul.verify("exception")
        # the BackgroundModel layout is kept; MASK and UNCERT are added after it
        assert [h.name for h in hdul] == ["PRIMARY", "ERRORS", "NPOINT", "MASK", "UNCERT"]
        np.testing.assert_array_equal(hdul["UNCERT"].data, hdul["ERRORS"].data)
        assert hdul["UNCERT"].header["UTYPE"] == "StdDevUncertainty"
        assert all("BUNIT" in h.header for h in hdul if h.name != "MASK")
    back = BackgroundModel.from_fits(path)
    np.testing.assert_array_equal(back.values, frame.values)
    np.testing.assert_array_equal(back.errors, frame.errors)
    np.testing.assert_array_equal(back.npoint, frame.npoint)
    assert back.bbox == frame.bbox
    mi, header = read_product(path)                    # calibflow's reader: the variance is ERRORS**2
    np.testing.assert_allclose(mi.variance, frame.errors.astype(np.float64) ** 2, rtol=1e-6)
    assert header["OBSTYPE"] == "sky" and header["FILTER"] == "r" and header["CALIBDATE"] == NIGHT


def test_product_headers_keep_every_comment(products):
    """No card loses its comment to the 80-column limit: a comment that cannot sit beside its value
    (a long calib id) is given once per key family as ``COMMENT KEY_n: text``."""
    for (calib_type, det_id), path in products["paths"].items():
        header = fits.getheader(path)
        comments = [str(c) for c in header.get("COMMENT", [])]
        for card in header.cards:
            key = card.keyword
            family = re.sub(r"_\d+$", "_n", key)
            expected = CARD_COMMENTS.get(key) or CARD_COMMENTS.get(family)
            if key.startswith("CALIB_INPUT_SCALE_"):              # the index of its input, in full
                assert card.comment == f"scale of CALIB_INPUT_{key.rsplit('_', 1)[1]}", (path.name, key)
            elif expected and key != "BUNIT":                       # a sky frame's says what F is
                assert card.comment == expected or f"{family}: {expected}" in comments, (path.name, key)
        if calib_type == "flat":
            assert "CALIB_INPUT_SCALE_2" in header
            assert "CALIB_ISR_n: calib applied in the inputs' ISR" in comments
            assert header["CALIB_ISR_0"] == f"bias-democam_mini-r-{NIGHT}-det{det_id:03d}-0123abcd"
        if any(len(str(c)) > 80 for c in header.cards):       # CONTINUE cards: the convention is declared
            assert header["LONGSTRN"] == "OGIP 1.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error", fits.verify.VerifyWarning)
        write_product(products["dir"] / "w.fits", MaskedImage.empty((4, 4)),
                      {"CALIB_ISR_0": "bias-a_very_long_camera_name-NONE-2026-11-20-det000-0123abcd",
                       "HIERARCH A_LONG_KEY_NAME": (1.25, "a comment far too long to sit beside this value in "
                                                          "eighty columns")})
    header = fits.getheader(products["dir"] / "w.fits")          # a long COMMENT runs on the next one
    assert "A_LONG_KEY_NAME: a comment far too long to sit beside this value in eighty columns" == \
        "".join(str(c) for c in header["COMMENT"])


def test_variance_files_written_before_and_stddev_uncert_are_read(tmp_path):
    """Products written before the variance was called UNCERT (a VARIANCE extension) still read, and
    an UNCERT holding standard deviations becomes a variance."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 5)).astype(np.float32)
    var = rng.uniform(1, 2, (6, 5)).astype(np.float32)
    old = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE"),
                        fits.ImageHDU(np.zeros((6, 5), np.int32), name="MASK"),
                        fits.ImageHDU(var, name="VARIANCE")])
    old.writeto(tmp_path / "old.fits")
    np.testing.assert_array_equal(read_product(tmp_path / "old.fits")[0].variance, var)
    sd = fits.ImageHDU(np.sqrt(var), name="UNCERT")
    sd.header["UTYPE"] = "StdDevUncertainty"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE"), sd]).writeto(tmp_path / "sd.fits")
    np.testing.assert_allclose(read_product(tmp_path / "sd.fits")[0].variance, var, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# WCS in focal-plane mm
# ------------------------------------------------------------------------------------------------


def test_sky_frame_wcs_places_bins_in_the_focal_plane(products):
    cam = products["camera"]
    det = cam.detector(6)
    frame = products["data"]["sky"]
    path = products["paths"][("sky", 6)]
    wcs = WCS(fits.getheader(path))
    assert wcs.wcs.ctype[0] == "FOCAL_X" and [str(c) for c in wcs.wcs.cunit] == ["mm", "mm"]
    assert not wcs.has_celestial
    xc, yc = bin_centres(frame.x_edges), bin_centres(frame.y_edges)
    jj, ii = np.meshgrid(np.arange(xc.size), np.arange(yc.size))
    fx, fy = wcs.pixel_to_world_values(jj, ii)
    ex, ey = cam.pixel_to_focal_plane(det, xc[jj], yc[ii])
    np.testing.assert_allclose(fx, ex, atol=1e-9)          # 256 x 512 in 32-px bins: exact
    np.testing.assert_allclose(fy, ey, atol=1e-9)
    ccd = CCDData.read(path)
    np.testing.assert_allclose(ccd.wcs.pixel_to_world_values(jj, ii), (ex, ey), atol=1e-9)
    header = fits.getheader(path)
    assert header["BINX"] == 32 and header["BINY"] == 32
    # ds9's physical coordinates (image = LTM * physical + LTV) are 1-based detector pixels
    assert ((jj + 1 - header["LTV1"]) / header["LTM1_1"]) == pytest.approx(xc[jj] + 1)


@pytest.mark.parametrize("orientation", [1, 3])
def test_sky_frame_wcs_turned_detector_uneven_bins(products, orientation, tmp_path):
    """A detector turned a quarter, 250 x 500 pixels (32-px bins do not divide it: the near-equal
    partition puts centres up to half a pixel off a linear grid)."""
    cam = products["camera"].model_copy(deep=True)
    det = cam.detector(3)
    det.orientation, det.nx, det.ny = orientation, 250, 500
    rng = np.random.default_rng(1)
    frame = measure_sky_background(MaskedImage(rng.normal(0, 0.01, (500, 250)).astype(np.float32),
                                               np.zeros((500, 250), np.int32), np.ones((500, 250), np.float32)))
    path = write_calib_product(tmp_path / "sky.fits", "sky", frame, {"OBSTYPE": "sky"}, cam, 3)
    wcs = CCDData.read(path).wcs
    xc, yc = bin_centres(frame.x_edges), bin_centres(frame.y_edges)
    jj, ii = np.meshgrid(np.arange(xc.size), np.arange(yc.size))
    fx, fy = wcs.pixel_to_world_values(jj, ii)
    ex, ey = cam.pixel_to_focal_plane(det, xc[jj], yc[ii])
    half_pixel = 0.5 * cam.pixel_size(det)
    assert np.abs(fx - ex).max() <= half_pixel + 1e-9 and np.abs(fy - ey).max() <= half_pixel + 1e-9
    # the turn is there: along image x the focal-plane y changes (and not x)
    (x0, y0), (x1, y1) = np.transpose(wcs.pixel_to_world_values([0, 1], [0, 0]))
    assert abs(x1 - x0) < 1e-12 and abs(y1 - y0) > 0.4


def test_image_products_carry_the_detector_wcs(products):
    cam = products["camera"]
    for det_id in (0, 7):                          # orientation 0 and 2
        ccd = CCDData.read(products["paths"][("flat", det_id)])
        x, y = np.array([0, 100, 255]), np.array([0, 300, 511])
        np.testing.assert_allclose(ccd.wcs.pixel_to_world_values(x, y),
                                   cam.pixel_to_focal_plane(cam.detector(det_id), x, y), atol=1e-9)


# ------------------------------------------------------------------------------------------------
# the camera mosaic: FITS and picture
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _figures_drawn():
    """The figures :func:`calib_core.quality.mosaic.mosaic_figure` makes meanwhile (the PNGs are drawn from
    them), to read their text through matplotlib."""
    figures = []
    original = mosaic_mod.mosaic_figure

    def keep(*args, **kw):
        figures.append(original(*args, **kw))
        return figures[-1]

    mosaic_mod.mosaic_figure = keep
    try:
        yield figures
    finally:
        mosaic_mod.mosaic_figure = original


@pytest.fixture(scope="module")
def flat_mosaic(products):
    """The flat mosaic as the build writes it, and the figure its PNG was drawn from."""
    cam = products["camera"]
    out = products["dir"] / "mosaic"
    out.mkdir()
    paths = {d.id: products["paths"][("flat", d.id)] for d in cam.detectors}
    with _figures_drawn() as figures:
        write_product_mosaic(cam, "flat", paths, out / "m.fits", out / "m.png", filter="r", calib_date=NIGHT,
                             calib_ids=products["flat_ids"], n_inputs={d: 3 for d in paths})
    return {"fits": out / "m.fits", "png": out / "m.png", "figure": figures[0]}


def test_ccddata_reads_the_mosaic(products, flat_mosaic):
    cam = products["camera"]
    ccd = CCDData.read(flat_mosaic["fits"])
    with fits.open(flat_mosaic["fits"]) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "MASK", "UNCERT"]
    assert ccd.unit == u.dimensionless_unscaled
    assert isinstance(ccd.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(ccd.mask, ~np.isfinite(ccd.data))
    b = fits.getheader(flat_mosaic["fits"])["BINNING"]
    assert b == 4                                              # 256-px detectors / 64
    geom = mosaic_geometry(cam, b)
    for det_id in (0, 4, 7):                                   # orientation 0, 0, 2
        flat = products["flats"][det_id]
        turns = -cam.detector(det_id).orientation
        # computed here: the mean of each b x b block, and the variance of that mean
        expected = np.rot90(bin_image(flat.image, b), k=turns)
        expected_var = np.rot90(bin_image(flat.variance, b), k=turns) / b ** 2
        rs, cs = geom.slices[det_id]
        np.testing.assert_allclose(ccd.data[rs, cs], expected, rtol=1e-6)
        np.testing.assert_allclose(ccd.uncertainty.array[rs, cs], expected_var, rtol=1e-5)
    meta = ccd.meta
    assert meta["OBSTYPE"] == "flat" and meta["FILTER"] == "r" and meta["CALIBDATE"] == NIGHT
    assert meta["CALIB_ID"] == f"flat-democam_mini-r-{NIGHT}"
    assert meta["CALIB_ID_4"] == products["flat_ids"][4] and meta["NCOMBINE"] == 3
    header = fits.getheader(flat_mosaic["fits"])     # (CCDData moves the dates it reads into ccd.wcs)
    firsts = [fits.getheader(products["paths"][("flat", d.id)])["DATE-OBS"] for d in cam.detectors]
    assert header["DATE-OBS"] == min(firsts) < header["DATE-END"]


def test_mosaic_wcs_matches_the_camera(products, flat_mosaic):
    """The centre of each detector's mosaic cell lies where the camera puts the detector pixels the
    cell averages (within half a cell: a detector's block is placed to the nearest cell)."""
    cam = products["camera"]
    wcs = WCS(fits.getheader(flat_mosaic["fits"]))
    assert [str(c) for c in wcs.wcs.cunit] == ["mm", "mm"]
    b = fits.getheader(flat_mosaic["fits"])["BINNING"]
    geom = mosaic_geometry(cam, b)
    for det in cam.detectors:
        rs, cs = geom.slices[det.id]
        nby, nbx = rs.stop - rs.start, cs.stop - cs.start
        for i, j in ((0, 0), (nby - 1, nbx - 1), (nby // 2, nbx // 3)):
            # block (i, j) of the detector after the half turn (orientation 2) is detector block
            # (nby-1-i, nbx-1-j); its centre in detector pixels is ((jd + 0.5) b - 0.5, ...)
            idt, jdt = (i, j) if det.orientation == 0 else (nby - 1 - i, nbx - 1 - j)
            ex, ey = cam.pixel_to_focal_plane(det, (jdt + 0.5) * b - 0.5, (idt + 0.5) * b - 0.5)
            fx, fy = wcs.pixel_to_world_values(cs.start + j, rs.start + i)
            assert abs(fx - ex) <= geom.cell_mm / 2 + 1e-9 and abs(fy - ey) <= geom.cell_mm / 2 + 1e-9


def _margin(png) -> float:
    """Fraction of the picture's rows and columns, at its borders, that are only background colour
    (the larger of the two)."""
    a = mpimg.imread(png)[..., :3]
    fg = np.any(np.abs(a - a[0, 0]) > 1e-6, axis=2)
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    empty_rows = fg.shape[0] - (rows[-1] - rows[0] + 1)
    empty_cols = fg.shape[1] - (cols[-1] - cols[0] + 1)
    return max(empty_rows / fg.shape[0], empty_cols / fg.shape[1])


def test_mosaic_picture_is_tight_and_labelled(products, flat_mosaic):
    assert _margin(flat_mosaic["png"]) < 0.10                  # was ~0.35 of the rows
    fig = flat_mosaic["figure"]
    ax = fig.axes[0]
    cax = ax.images[0].colorbar.ax
    title = ax.get_title()
    assert f"flat-democam_mini-r-{NIGHT}" in title and "3 inputs" in title and "9 CCDs" in title
    assert "dimensionless" in cax.get_ylabel()
    cam = products["camera"]
    labels = {t.get_text(): t for t in ax.texts}
    FigureCanvasAgg(fig).draw()                  # the figure was closed once saved: draw it again
    renderer = fig.canvas.get_renderer()
    for det in cam.detectors:
        text = labels[det.name]
        x0, x1, _, _ = cam.detector_corners_mm(det)
        width_px = abs(ax.transData.transform((x1, 0))[0] - ax.transData.transform((x0, 0))[0])
        # legible and sized to its CCD: between a third and 90 % of the CCD's width on the page
        assert text.get_fontsize() >= 8
        assert 0.3 < text.get_window_extent(renderer).width / width_px < 0.9, det.name


def test_mosaic_picture_units_of_a_dark(products, tmp_path):
    """The colour bar says the unit of the calib type (a dark: ADU/s)."""
    with _figures_drawn() as figures:
        write_product_mosaic(products["camera"], "dark", {0: products["paths"][("dark", 0)]}, tmp_path / "d.fits",
                             tmp_path / "d.png", filter="NONE", calib_date=NIGHT)
    assert "ADU/s" in figures[0].axes[0].images[0].colorbar.ax.get_ylabel()
    assert CCDData.read(tmp_path / "d.fits").unit == u.adu / u.s
    assert MASK_PLANES.bit("NO_DATA") in np.unique(fits.getdata(tmp_path / "d.fits", "MASK"))
