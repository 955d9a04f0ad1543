"""Binned focal-plane mosaics of per-detector images (pipe_drivers ``makeCameraImage``,
docs/algorithms.md#camera-mosaics).

Each detector's image is binned (mean over b x b blocks, remainder truncated, NaN propagates;
NO_DATA pixels of a MaskedImage become NaN), rotated by the detector's ``orientation`` quarter
turns and placed at its focal-plane position on a grid of ``pixel_size * binning`` mm cells.
Missing detectors stay NaN.

A product mosaic (:func:`write_product_mosaic`, what a build writes beside its products) is a FITS
file astropy's ``CCDData.read`` opens with no arguments (the binned values with ``BUNIT``, ``MASK``,
the variance of each cell in ``UNCERT``; type, filter, dates, calib ids, binning and a linear WCS in
focal-plane mm in the header) and a PNG cropped to the focal plane, with the CCD names sized to
their CCDs, a colour bar with the unit and the calib id and input count in the title.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from calib_core.camera import Camera
from calib_core.io.atomic import private_name
from calib_core.maskedimage import MASK_PLANES, MaskedImage

__all__ = ["bin_image", "camera_mosaic", "mosaic_geometry", "MosaicGeometry", "write_mosaic", "mosaic_figure",
           "mosaic_wcs", "product_planes", "write_product_mosaic"]


def bin_image(image: np.ndarray, binning: int) -> np.ndarray:
    """Mean over ``binning`` x ``binning`` blocks; output shape (ny // b, nx // b); NaN propagates."""
    b = int(binning)
    if b < 1:
        raise ValueError(f"binning must be >= 1, got {binning}")
    a = np.asarray(image, np.float64)
    ny, nx = a.shape[0] // b, a.shape[1] // b
    a = a[: ny * b, : nx * b].reshape(ny, b, nx, b)
    return a.mean(axis=(1, 3)).astype(np.float32)


@dataclass
class MosaicGeometry:
    """Grid of a camera mosaic: shape (ny, nx), origin (x0_mm, y0_mm) of cell (0, 0)'s lower-left
    corner, cell size in mm, and per detector the (row, column) slices it occupies."""

    shape: tuple[int, int]
    x0_mm: float
    y0_mm: float
    cell_mm: float
    slices: dict[int, tuple[slice, slice]]


def mosaic_geometry(camera: Camera, binning: int = 64) -> MosaicGeometry:
    """Where each detector's binned, rotated image lands in the mosaic."""
    cell = camera.pixel_size_mm * binning
    corners = {d.id: camera.detector_corners_mm(d) for d in camera.detectors}
    x0 = min(c[0] for c in corners.values())
    x1 = max(c[1] for c in corners.values())
    y0 = min(c[2] for c in corners.values())
    y1 = max(c[3] for c in corners.values())
    slices = {}
    for d in camera.detectors:
        bx, by = (d.nx or 0) // binning, (d.ny or 0) // binning
        if d.orientation % 2:
            bx, by = by, bx
        # centre the binned block on the detector's centre
        c0 = int(math.floor((d.x_mm - x0) / cell - bx / 2 + 0.5))
        r0 = int(math.floor((d.y_mm - y0) / cell - by / 2 + 0.5))
        slices[d.id] = (slice(max(r0, 0), max(r0, 0) + by), slice(max(c0, 0), max(c0, 0) + bx))
    ny = max([math.ceil((y1 - y0) / cell)] + [s[0].stop for s in slices.values()])
    nx = max([math.ceil((x1 - x0) / cell)] + [s[1].stop for s in slices.values()])
    return MosaicGeometry((ny, nx), x0, y0, cell, slices)


def camera_mosaic(camera: Camera, images: Mapping[int, object], binning: int = 64) -> np.ndarray:
    """A focal-plane image of per-detector images, binned.

    Parameters
    ----------
    camera : Camera
    images : mapping detector id -> 2-D array (ny, nx) or MaskedImage
        Images in detector pixel geometry. Missing detectors are blank (NaN).
    binning : int, default 64

    Returns
    -------
    float32 array
        Row = focal-plane y (increasing), column = focal-plane x; NaN where there is no detector.
    """
    geom = mosaic_geometry(camera, binning)
    out = np.full(geom.shape, np.nan, np.float32)
    nd = MASK_PLANES.bit("NO_DATA")
    for det_id, img in images.items():
        det = camera.detector(det_id)
        if isinstance(img, MaskedImage):
            arr = np.where((img.mask & nd) != 0, np.nan, img.image)
        else:
            arr = np.asarray(img, np.float32)
        if det.nx and det.ny and arr.shape != (det.ny, det.nx):
            raise ValueError(f"detector {det.name}: image shape {arr.shape}, camera says {(det.ny, det.nx)}")
        binned = bin_image(arr, binning)
        # orientation = counter-clockwise quarter turns in (x, y) with y up; with rows = y,
        # numpy's rot90 turns the other way, hence k = -orientation.
        binned = np.rot90(binned, k=-det.orientation)
        rs, cs = geom.slices[det.id]
        out[rs, cs] = binned
    return out


@contextmanager
def _replace_atomically(path, suffix: str):
    """A private temporary name beside ``path``, renamed onto it when the block succeeds (removed if not):
    concurrent writers of the same mosaic never share or clobber a half-written file."""
    path = Path(path)
    tmp = private_name(path, "tmp", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def mosaic_wcs(geom: MosaicGeometry) -> dict[str, object]:
    """Cards of the mosaic grid's linear WCS in focal-plane mm: cell (0, 0)'s centre is at
    ``(x0_mm + cell/2, y0_mm + cell/2)``, one cell per ``cell_mm``. A detector's block is placed to the
    nearest cell, so its pixels are within half a cell of where this WCS puts them."""
    from calib_core.io.productmeta import grid_wcs

    half = geom.cell_mm / 2.0
    return grid_wcs((geom.x0_mm + half, geom.y0_mm + half), (1.0, 1.0), (geom.cell_mm, geom.cell_mm))


def write_mosaic(mosaic: np.ndarray, camera: Camera, binning: int, fits_path=None, png_path=None,
                 title: str = "", header_cards: Mapping[str, object] | None = None, *,
                 unit: str | None = None, variance: np.ndarray | None = None,
                 colorbar_label: str | None = None) -> None:
    """Write a mosaic as FITS and/or a PNG.

    Parameters
    ----------
    mosaic : 2-D float array
        From :func:`camera_mosaic`; NaN where there is no data.
    camera, binning
        As given to :func:`camera_mosaic`.
    fits_path : path, optional
        Primary HDU = the mosaic (float32) with ``header_cards``, the grid (``BINNING``, ``CELL_MM``,
        ``X0_MM``, ``Y0_MM``) and its WCS (:func:`mosaic_wcs`), ``BUNIT`` when ``unit`` is given;
        ``MASK`` (NO_DATA where the mosaic is NaN); ``UNCERT`` (``variance``, as a
        ``VarianceUncertainty``) when ``variance`` is given.
    png_path : path, optional
        The picture (:func:`mosaic_figure`), cropped to what is drawn.
    title, colorbar_label : str
        Title (default: camera name and binning) and colour-bar label (default: the unit).
    """
    geom = mosaic_geometry(camera, binning)
    if fits_path is not None:
        from astropy.io import fits

        from calib_core.io.products import _header_with, variance_hdu

        hdr = _header_with(header_cards)
        if unit is not None:
            hdr["BUNIT"] = (unit, "unit of the pixel values")
        hdr["BINNING"] = (binning, "detector pixels per mosaic cell, each axis")
        hdr["CELL_MM"] = (geom.cell_mm, "mosaic cell size (mm)")
        hdr["X0_MM"] = (geom.x0_mm, "focal-plane x of the grid's left edge (mm)")
        hdr["Y0_MM"] = (geom.y0_mm, "focal-plane y of the grid's bottom edge (mm)")
        wcs = _header_with(mosaic_wcs(geom))
        hdr.extend(wcs, update=True)
        no_data = np.where(np.isfinite(mosaic), 0, MASK_PLANES.bit("NO_DATA")).astype(np.int32)
        mask = fits.ImageHDU(no_data, name="MASK")
        mask.header.extend(_header_with(MASK_PLANES.to_header()), update=True)
        hdus = [fits.PrimaryHDU(np.asarray(mosaic, np.float32), header=hdr), mask]
        if variance is not None:
            hdus.append(variance_hdu(variance, unit))
        for hdu in hdus[1:]:
            hdu.header.extend(wcs, update=True)
        with _replace_atomically(fits_path, ".fits") as tmp:
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
    if png_path is not None:
        from calib_core.io.productmeta import unit_label

        fig = mosaic_figure(mosaic, camera, binning, title,
                            colorbar_label if colorbar_label is not None else unit_label(unit))
        with _replace_atomically(png_path, ".png") as tmp:
            fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight", pad_inches=0.04)


def mosaic_figure(mosaic: np.ndarray, camera: Camera, binning: int, title: str = "",
                  colorbar_label: str = "", width_in: float = 7.0):
    """The mosaic as a matplotlib :class:`~matplotlib.figure.Figure`: the image in focal-plane mm
    (no-data cells grey), detector outlines, each detector's name sized to its detector, a colour bar
    labelled with ``colorbar_label`` and ``title``. Made without pyplot, whose global list of figures is
    not thread-safe (builds run side by side), so there is nothing to close."""
    import matplotlib
    import matplotlib.patheffects as pe
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    geom = mosaic_geometry(camera, binning)
    finite = mosaic[np.isfinite(mosaic)]
    vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
    ny, nx = mosaic.shape
    extent = (geom.x0_mm, geom.x0_mm + nx * geom.cell_mm, geom.y0_mm, geom.y0_mm + ny * geom.cell_mm)
    aspect = ny / max(nx, 1)
    # the image gets width_in less the colour bar; the height follows the focal plane's aspect
    image_w = width_in - 1.4
    fig = Figure(figsize=(width_in, min(max(image_w * aspect, 2.0), 14.0) + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.75")      # no data: grey, not the page's white
    im = ax.imshow(mosaic, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap=cmap,
                   interpolation="nearest")
    # the colour bar as tall as the focal plane, beside it (in axes coordinates, so it follows the axes)
    cbar = fig.colorbar(im, cax=ax.inset_axes([1.03, 0.0, 0.035, 1.0]))
    cbar.set_label(colorbar_label)
    ax.set_xlabel("focal plane x (mm)")
    ax.set_ylabel("focal plane y (mm)")
    ax.set_title(title or f"{camera.name} (binned {binning})", fontsize=10)
    # the layout is settled (the detectors' size on the page is then known) by a draw that renders
    # nothing: the picture is rendered once, by savefig
    fig.draw_without_rendering()
    bbox = ax.get_window_extent()
    pt_per_mm = min(bbox.width / (extent[1] - extent[0]), bbox.height / (extent[3] - extent[2])) * 72 / fig.dpi
    for d in camera.detectors:
        x0, x1, y0, y1 = camera.detector_corners_mm(d)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, color="w"))
        # the name spans at most half the detector's width and a fifth of its height (a character is
        # ~0.6 em wide)
        size = min(0.5 * (x1 - x0) * pt_per_mm / (0.6 * max(len(d.name), 1)), 0.2 * (y1 - y0) * pt_per_mm)
        ax.text(d.x_mm, d.y_mm, d.name, color="w", fontsize=float(np.clip(size, 5.0, 24.0)), ha="center",
                va="center", fontweight="bold", path_effects=[pe.withStroke(linewidth=2, foreground="k")])
    return fig


def product_planes(path, calib_type: str) -> tuple[MaskedImage, bool]:
    """A product's image and variance at detector resolution, for a mosaic.

    Returns
    -------
    (MaskedImage, correlated)
        For a sky frame, the model evaluated at every pixel and, as its variance, the squared error of
        the bin each pixel lies in (``correlated`` True: the pixels of a bin share that error, so
        binning does not reduce it); otherwise the product's planes (``correlated`` False).
    """
    if calib_type == "sky":
        from calib_core.stats.background import BackgroundModel

        model = BackgroundModel.from_fits(path)
        err = np.repeat(np.repeat(model.errors.astype(np.float32), np.diff(model.y_edges), axis=0),
                        np.diff(model.x_edges), axis=1)
        image = model.evaluate()
        return MaskedImage(image, np.zeros(image.shape, np.int32), err * err), True
    from calib_core.io.products import read_product

    return read_product(path)[0], False


def _common_id(ids: list[str]) -> str:
    """What the calib ids of a build's products share (``flat-cam-r-2026-11-20`` of
    ``flat-cam-r-2026-11-20-det000-1a2b3c4d``, ...)."""
    ids = sorted(set(ids))
    if len(ids) == 1:
        return ids[0]
    prefix = os.path.commonprefix(ids)
    return prefix.rsplit("-", 1)[0] if "-" in prefix else prefix


def write_product_mosaic(camera: Camera, calib_type: str, paths: Mapping[int, object], fits_path=None,
                         png_path=None, *, filter: str = "", calib_date: str = "",
                         calib_ids: Mapping[int, str] | None = None, n_inputs: Mapping[int, int] | None = None,
                         binning: int | None = None) -> np.ndarray:
    """The camera mosaic of a build's products (one per detector), as FITS and PNG.

    Parameters
    ----------
    camera : Camera
        Detectors without a size in the camera (header-defined geometry) take their product's.
    calib_type : str
        bias, dark, flat, fringe or sky (sets the unit, :data:`calib_core.io.productmeta.PRODUCT_UNITS`).
    paths : mapping detector id -> product path
    fits_path, png_path : path, optional
        See :func:`write_mosaic`. The FITS header says what the mosaic shows: ``OBSTYPE``, ``FILTER``,
        ``CALIBDATE``, ``DATE-OBS``/``DATE-END`` (span of the products' inputs), ``CALIB_ID`` (what
        the products' ids share) and ``CALIB_ID_<det>`` per detector, ``NCOMBINE``, ``NDETECT``.
        The variance of a cell is the mean of its pixels' variances over the number of pixels (the
        variance of the mean of independent pixels); for a sky frame, whose pixels share their bin's
        error, the mean of its pixels' variances.
    filter, calib_date : str
    calib_ids, n_inputs : mapping detector id -> calib id / inputs used
    binning : int, optional
        Default: the narrowest detector's width / 64.

    Returns
    -------
    float32 array
        The mosaic.
    """
    from astropy.io import fits

    from calib_core.io.productmeta import product_unit, unit_label

    planes = {d: product_planes(p, calib_type) for d, p in paths.items()}
    if any(camera.detector(d).nx is None or camera.detector(d).ny is None for d in planes):
        camera = camera.model_copy(deep=True)
        for d, (mi, _) in planes.items():
            det = camera.detector(d)
            if det.nx is None or det.ny is None:
                det.ny, det.nx = mi.shape
    if binning is None:
        binning = max(1, min(camera.detector(d).nx for d in planes) // 64)
    mosaic = camera_mosaic(camera, {d: mi for d, (mi, _) in planes.items()}, binning)
    variance = camera_mosaic(camera, {d: MaskedImage(mi.variance, mi.mask, mi.variance)
                                      for d, (mi, _) in planes.items()}, binning)
    independent = np.zeros(variance.shape, bool)
    geom = mosaic_geometry(camera, binning)
    for d, (_, correlated) in planes.items():
        if not correlated:
            independent[geom.slices[d]] = True
    variance = np.where(independent, variance / np.float32(binning * binning), variance).astype(np.float32)

    unit = product_unit(calib_type)
    ids = {d: i for d, i in (calib_ids or {}).items() if d in planes}
    counts = sorted({int(n) for d, n in (n_inputs or {}).items() if d in planes and n is not None})
    inputs = "" if not counts else (f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}")
    common = _common_id(list(ids.values())) if ids else ""
    cards: dict[str, object] = {"OBSTYPE": (calib_type, "product type of the mosaicked calibs"),
                                "CAMERA": camera.name, "FILTER": filter, "CALIBDATE": calib_date}
    span: dict[str, list] = {"DATE-OBS": [], "MJD-OBS": [], "DATE-END": [], "MJD-END": []}
    for path in paths.values():
        hdr = fits.getheader(path)
        for key, values in span.items():
            values += [hdr[key]] if key in hdr else []
    if all(len(v) == len(paths) for v in span.values()):
        cards["TIMESYS"] = "UTC"
        cards.update({k: min(v) if k.endswith("OBS") else max(v) for k, v in span.items()})
    if common:
        cards["CALIB_ID"] = (common, "what the products' calib ids share")
    for d in sorted(ids):
        cards[f"CALIB_ID_{d}"] = (ids[d], f"calib id of detector {d}")
    if counts:
        cards["NCOMBINE"] = (counts[-1], "inputs combined per CCD (most)")
    cards["NDETECT"] = (len(planes), "detectors in the mosaic")

    n_det = len(planes)
    title = f"{calib_type} {filter} {calib_date}: {camera.name}, {n_det} CCD{'s' * (n_det != 1)}"
    if inputs:
        title += f", {inputs} input{'s' * (inputs != '1')} each"
    if common:
        title += f"\ncalib id {common}" + ("-det<NNN>-<digest>" if len(set(ids.values())) > 1 else "")
    label = f"{calib_type} ({unit_label(unit)})"
    write_mosaic(mosaic, camera, binning, fits_path, png_path, title=title, header_cards=cards, unit=unit,
                 variance=variance, colorbar_label=label)
    return mosaic
