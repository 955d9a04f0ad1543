"""How calib products describe themselves to astropy and ds9: units, focal-plane WCS, and the sky
frame's extra HDUs (docs/algorithms.md#product-files).

* Units (``BUNIT``, FITS unit strings that astropy parses): a bias is in ``adu``; a dark is a rate,
  ``adu/s`` of dark time (its inputs are divided by their dark time); flats, fringe frames and sky
  frames are ratios to a level (a flat is scaled to its CCD's relative throughput, a fringe frame and
  a sky frame are fractions of the sky level), written ``1`` (astropy: dimensionless). ``1`` rather
  than an empty string: astropy's CCDData reader treats an empty BUNIT as no unit at all.
* A linear WCS from an image's pixels to focal-plane millimetres (``CTYPEi = 'FOCAL_X'/'FOCAL_Y'``,
  ``CUNITi = 'mm'``, ``WCSNAME = 'FOCAL_PLANE'``): for a detector image (one cell = one pixel) and for
  a binned grid over it (the sky frame). Together with ``LTV/LTM`` (IRAF's physical coordinates) ds9
  shows a bin's detector-pixel position as "physical" and its focal-plane position as "WCS".
* A sky frame is a :class:`~calib_core.stats.background.BackgroundModel` (primary = bin values, ``ERRORS``,
  ``NPOINT``); the product adds, without touching that layout, ``MASK`` (NO_DATA where a bin has no
  value) and ``UNCERT`` (a copy of ``ERRORS`` declared ``StdDevUncertainty``), which is what
  ``CCDData.read`` looks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from calib_core.builds.calibtypes import CALIB_TYPES
from calib_core.camera import Camera, Detector
from calib_core.io.products import UNCERT_EXTNAME, _header_with, write_hdulist, write_product
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats.background import BackgroundModel

__all__ = ["PRODUCT_UNITS", "INTERMEDIATE_UNITS", "product_unit", "unit_label", "focal_plane_wcs",
           "grid_wcs", "sky_frame_hdulist", "write_calib_product"]

#: BUNIT of each calib type's product and of its intermediates (:class:`~calib_core.builds.calibtypes.CalibType`)
PRODUCT_UNITS = {n: t.unit for n, t in CALIB_TYPES.items()}
INTERMEDIATE_UNITS = {n: t.intermediate_unit for n, t in CALIB_TYPES.items()}


def product_unit(calib_type: str) -> str:
    """The ``BUNIT`` of a calib type's product."""
    try:
        return PRODUCT_UNITS[calib_type]
    except KeyError:
        raise ValueError(f"unknown calib type {calib_type!r}; known: {', '.join(PRODUCT_UNITS)}") from None


def unit_label(unit: str | None) -> str:
    """A unit as people read it on a plot (``adu/s`` -> ``ADU/s``, ``1`` -> ``dimensionless``)."""
    if not unit:
        return ""
    if unit.strip() == "1":
        return "dimensionless"
    return unit.replace("adu", "ADU")


def _rotation(quarter_turns: int) -> np.ndarray:
    """Counter-clockwise quarter turns as an integer matrix (camera.pixel_to_focal_plane's turn)."""
    r = np.eye(2, dtype=int)
    for _ in range(quarter_turns % 4):
        r = np.array([[0, -1], [1, 0]]) @ r
    return r


def grid_wcs(crval: tuple[float, float], crpix: tuple[float, float], step_mm: tuple[float, float],
             quarter_turns: int = 0) -> dict[str, object]:
    """Cards of a linear focal-plane WCS: FITS pixel ``crpix`` (1-based) is at ``crval`` mm, one pixel
    along image axis j is ``step_mm[j]`` mm, turned ``quarter_turns`` counter-clockwise."""
    rot = _rotation(quarter_turns)
    # world_i = CRVAL_i + CDELT_i * sum_j PC_ij (p_j - CRPIX_j); PC is the signed permutation of the
    # turn, so CDELT_i is the step of the image axis that world axis i runs along
    cdelt = [float(sum(abs(rot[i, j]) * step_mm[j] for j in range(2))) for i in range(2)]
    cards: dict[str, object] = {"WCSAXES": (2, "focal-plane WCS: 2 linear axes"),
                                "WCSNAME": ("FOCAL_PLANE", "world = focal-plane position (mm)")}
    for i, axis in ((1, "X"), (2, "Y")):
        cards[f"CTYPE{i}"] = (f"FOCAL_{axis}", f"focal-plane {axis.lower()}, linear")
        cards[f"CUNIT{i}"] = ("mm", f"unit of focal-plane {axis.lower()}")
        cards[f"CRPIX{i}"] = (round(float(crpix[i - 1]), 10), "reference pixel (1-based)")
        cards[f"CRVAL{i}"] = (round(float(crval[i - 1]), 10), f"focal-plane {axis.lower()} there (mm)")
        cards[f"CDELT{i}"] = (round(cdelt[i - 1], 12), "mm per image pixel")
    for i in (1, 2):
        for j in (1, 2):
            cards[f"PC{i}_{j}"] = (float(rot[i - 1, j - 1]), "detector orientation (quarter turns)")
    return cards


def focal_plane_wcs(camera: Camera, det: Detector, shape: tuple[int, int],
                    region: tuple[int, int, int, int] | None = None) -> dict[str, object]:
    """Cards placing an image of detector ``det`` in the focal plane (mm), as
    :meth:`Camera.pixel_to_focal_plane` does.

    Parameters
    ----------
    camera, det
        The camera and the detector.
    shape : (ny, nx)
        Shape of the image written: the detector's pixels, or a grid of near-equal bins over them.
    region : (x0, y0, width, height), optional
        The detector pixels the image covers (a bbox); default the whole detector.

    Returns
    -------
    dict
        WCS cards, plus for a binned grid ``BINX``/``BINY`` (detector pixels per bin) and
        ``LTV``/``LTM`` (ds9's physical coordinates = 1-based detector pixels). The near-equal
        partition of an axis whose size is not a multiple of its bins puts a bin centre up to half a
        detector pixel from this linear mapping.
    """
    ny, nx = shape
    if region is None:
        region = (0, 0, det.nx or nx, det.ny or ny)
    x0, y0, width, height = region
    dnx, dny = det.nx or width, det.ny or height
    sx, sy = width / nx, height / ny             # detector pixels per image pixel
    p = camera.pixel_size(det)
    # image pixel j (0-based) covers detector pixels [x0 + j*s, x0 + (j+1)*s): its centre is detector
    # pixel x0 + (j + 0.5)*s - 0.5, so the detector's centre, (n-1)/2, is at j = (n/2 - x0)/s - 0.5
    crpix = ((dnx / 2.0 - x0) / sx + 0.5, (dny / 2.0 - y0) / sy + 0.5)
    cards = grid_wcs((det.x_mm, det.y_mm), crpix, (sx * p, sy * p), det.orientation)
    if (sx, sy) != (1.0, 1.0) or (x0, y0) != (0, 0):
        cards["BINX"] = (float(sx), "detector pixels per bin along x (mean)")
        cards["BINY"] = (float(sy), "detector pixels per bin along y (mean)")
        # IRAF: image = LTM * physical + LTV, physical = 1-based detector pixel
        cards["LTM1_1"] = (1.0 / sx, "bins per detector pixel along x")
        cards["LTM2_2"] = (1.0 / sy, "bins per detector pixel along y")
        cards["LTV1"] = (0.5 - (0.5 + x0) / sx, "physical = detector pixel (1-based)")
        cards["LTV2"] = (0.5 - (0.5 + y0) / sy, "physical = detector pixel (1-based)")
    return cards


def sky_frame_hdulist(frame: BackgroundModel, camera: Camera | None = None, det: Detector | None = None):
    """A sky frame's HDUs as a product: :meth:`BackgroundModel.to_hdulist` (layout unchanged) with
    ``BUNIT`` on each image, the focal-plane WCS of the bin grid (when the detector is given), and
    ``MASK`` (NO_DATA where a bin has no value) and ``UNCERT`` (``ERRORS`` as a
    ``StdDevUncertainty``) appended for astropy's CCDData reader."""
    from astropy.io import fits

    unit = PRODUCT_UNITS["sky"]
    hdul = frame.to_hdulist()
    wcs = {}
    if camera is not None and det is not None:
        wcs = focal_plane_wcs(camera, det, frame.values.shape,
                              region=(frame.bbox[0], frame.bbox[1], frame.width, frame.height))
    no_data = np.where(np.isfinite(frame.values), 0, MASK_PLANES.bit("NO_DATA")).astype(np.int32)
    mask = fits.ImageHDU(no_data, name="MASK")
    mask.header.extend(_header_with(MASK_PLANES.to_header()), update=True)
    uncert = fits.ImageHDU(np.ascontiguousarray(frame.errors, np.float32), name=UNCERT_EXTNAME)
    uncert.header["UTYPE"] = ("StdDevUncertainty", "the values are standard deviations (astropy)")
    hdul.append(mask)
    hdul.append(uncert)
    units = {0: (unit, "sky frame F: fraction of the sky level"),
             "ERRORS": (unit, "standard error of each bin"),
             "NPOINT": ("pixel", "pixels admitted in each bin, all inputs"),
             UNCERT_EXTNAME: (unit, "copy of ERRORS, for astropy CCDData")}
    for key, (bunit, comment) in units.items():
        hdul[key].header["BUNIT"] = (bunit, comment)
    for hdu in hdul:
        hdu.header.extend(_header_with(wcs), update=True)
    return hdul


def write_calib_product(path, calib_type: str, product: MaskedImage | BackgroundModel,
                        header_cards: Mapping[str, object] | None = None, camera: Camera | None = None,
                        detector: int | None = None, extra_hdus=()) -> Path:
    """Write a calib product as the build does: a MaskedImage (bias, dark, flat, fringe, defects,
    ptc) as IMAGE/MASK/UNCERT (then ``extra_hdus``: the PTC's tables), a sky frame's
    BackgroundModel as :func:`sky_frame_hdulist`; ``BUNIT`` of its type, and the focal-plane WCS
    when the camera and detector are given."""
    det = camera.detector(detector) if camera is not None and detector is not None else None
    if calib_type == "sky":
        if not isinstance(product, BackgroundModel):
            raise TypeError(f"a sky product is a BackgroundModel, not {type(product).__name__}")
        return write_hdulist(path, sky_frame_hdulist(product, camera, det), header_cards)
    if not isinstance(product, MaskedImage):
        raise TypeError(f"a {calib_type} product is a MaskedImage, not {type(product).__name__}")
    wcs = focal_plane_wcs(camera, det, product.shape) if det is not None else None
    return write_product(path, product, header_cards, unit=product_unit(calib_type), image_cards=wcs,
                         extra_hdus=extra_hdus)
