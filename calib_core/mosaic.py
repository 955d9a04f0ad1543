"""Binned focal-plane mosaics of per-detector images (pipe_drivers ``makeCameraImage``,
docs/algorithms.md#camera-mosaics).

Each detector's image is binned (mean over b x b blocks, remainder truncated, NaN propagates;
NO_DATA pixels of a MaskedImage become NaN), rotated by the detector's ``orientation`` quarter
turns and placed at its focal-plane position on a grid of ``pixel_size * binning`` mm cells.
Missing detectors stay NaN.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .atomic import private_name
from .camera import Camera
from .maskedimage import MASK_PLANES, MaskedImage

__all__ = ["bin_image", "camera_mosaic", "mosaic_geometry", "MosaicGeometry", "write_mosaic"]


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


def write_mosaic(mosaic: np.ndarray, camera: Camera, binning: int, fits_path=None, png_path=None,
                 title: str = "", header_cards: Mapping[str, object] | None = None) -> None:
    """Write a mosaic as FITS (float32, with the grid origin and cell size in the header) and/or a
    PNG (matplotlib Agg: image, colour bar, detector outlines and names)."""
    geom = mosaic_geometry(camera, binning)
    if fits_path is not None:
        from astropy.io import fits

        from .products import _header_with

        hdr = _header_with(header_cards)
        hdr["BINNING"] = binning
        hdr["CELL_MM"] = geom.cell_mm
        hdr["X0_MM"] = geom.x0_mm
        hdr["Y0_MM"] = geom.y0_mm
        with _replace_atomically(fits_path, ".fits") as tmp:
            fits.PrimaryHDU(np.asarray(mosaic, np.float32), header=hdr).writeto(tmp, overwrite=True)
    if png_path is not None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        finite = mosaic[np.isfinite(mosaic)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
        ny, nx = mosaic.shape
        extent = (geom.x0_mm, geom.x0_mm + nx * geom.cell_mm, geom.y0_mm, geom.y0_mm + ny * geom.cell_mm)
        fig, ax = plt.subplots(figsize=(7, 7 * ny / max(nx, 1) + 0.5))
        im = ax.imshow(mosaic, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap="viridis",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        for d in camera.detectors:
            x0, x1, y0, y1 = camera.detector_corners_mm(d)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, color="w"))
            ax.text(d.x_mm, d.y_mm, d.name, color="w", fontsize=7, ha="center", va="center")
        ax.set_xlabel("focal plane x (mm)")
        ax.set_ylabel("focal plane y (mm)")
        ax.set_title(title or f"{camera.name} (binned {binning})")
        try:
            with _replace_atomically(png_path, ".png") as tmp:
                fig.savefig(tmp, dpi=100)
        finally:
            plt.close(fig)
