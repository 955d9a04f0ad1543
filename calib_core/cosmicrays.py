"""Cosmic-ray detection for calibration frames (darks): a small L.A.Cosmic-like detector.

The reference (docs/algorithms.md#cosmic-rays) runs meas_algorithms ``findCosmicRays`` (minSigma 6, min_DN 150)
and grows the CR mask by ``cr_grow = 2`` px. This module does the same job with a simpler, robust
recipe that needs no PSF model:

1. ``background`` = 5x5 median filter of the image (a CR track 1..4 px long does not survive it);
   ``residual = image - background``.
2. Candidates: ``residual > nsigma * sqrt(variance)`` and ``residual > min_dn``. Where the variance
   plane is not usable (<= 0 or non-finite) the noise is the MAD of the residual.
3. Sharpness (L.A.Cosmic "fine structure" test): ``(image - median3) / max(median3 - median7, noise)
   > sharpness``. CRs are sharper than anything the optics deliver; in a dark there is nothing else.
4. Neighbours of candidates whose residual exceeds ``neighbour_nsigma`` sigma join the track
   (``niter`` times), as findCosmicRays' cond3 iterations do.
5. Pixels in ``exclude`` (known hot/bad pixels, see :func:`persistent_pixels`) are never CRs: a hot
   pixel is as sharp as a CR but is in every exposure, and masking it in every input would leave
   the dark with NO_DATA exactly where it matters.
6. Grow by ``grow`` px with a disk (isotropic, like the reference's SpanSet dilation).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .maskedimage import MASK_PLANES, MaskedImage

__all__ = ["find_cosmic_rays", "mask_cosmic_rays", "persistent_pixels", "disk"]


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of the given radius (px)."""
    r = int(radius)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def find_cosmic_rays(mi: MaskedImage, nsigma: float = 6.0, min_dn: float = 50.0, sharpness: float = 2.0,
                     neighbour_nsigma: float = 3.0, niter: int = 3, grow: int = 2,
                     exclude: np.ndarray | None = None, ignore_bits: int | None = None) -> np.ndarray:
    """Boolean map of cosmic-ray pixels (grown).

    Parameters
    ----------
    mi : MaskedImage
        Post-ISR image (ADU) with its variance (ADU**2).
    nsigma : float, default 6.0
        Detection threshold in sigma of the variance plane (reference minSigma 6).
    min_dn : float, default 50.0
        Minimum excess above the local background, ADU (HSC uses min_DN 50).
    sharpness : float, default 2.0
        Fine-structure contrast a CR must exceed.
    neighbour_nsigma : float, default 3.0
        Threshold for neighbours to join a track.
    niter : int, default 3
        Neighbour-growth iterations.
    grow : int, default 2
        Final isotropic growth radius, px (reference cr_grow 2); 0 disables.
    exclude : bool array, optional
        Pixels that are never CRs (hot/bad pixels).
    ignore_bits : int, optional
        Mask bits of pixels that cannot be CR candidates (default SAT|BAD|NO_DATA).

    Returns
    -------
    bool array, shape of the image
    """
    img = np.asarray(mi.image, np.float64)
    finite = np.isfinite(img)
    fill = np.median(img[finite]) if finite.any() else 0.0
    img = np.where(finite, img, fill)
    bkg = ndimage.median_filter(img, size=5, mode="nearest")
    resid = img - bkg
    var = np.asarray(mi.variance, np.float64)
    mad = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    noise = np.where(np.isfinite(var) & (var > 0), np.sqrt(np.abs(var)), max(mad, 1e-12))
    if ignore_bits is None:
        ignore_bits = MASK_PLANES.bits(["SAT", "BAD", "NO_DATA"])
    usable = finite & ((mi.mask & ignore_bits) == 0)
    if exclude is not None:
        usable &= ~np.asarray(exclude, bool)
    m3 = ndimage.median_filter(img, size=3, mode="nearest")
    m7 = ndimage.median_filter(m3, size=7, mode="nearest")
    fine = np.maximum(m3 - m7, noise)
    cand = usable & (resid > nsigma * noise) & (resid > min_dn) & ((img - m3) / fine > sharpness)
    if not cand.any():
        return cand
    weak = usable & (resid > neighbour_nsigma * noise)
    eight = np.ones((3, 3), bool)
    for _ in range(int(niter)):
        grown = ndimage.binary_dilation(cand, structure=eight) & weak
        grown |= cand
        if np.array_equal(grown, cand):
            break
        cand = grown
    if grow > 0:
        cand = ndimage.binary_dilation(cand, structure=disk(grow))
    return cand


def mask_cosmic_rays(mi: MaskedImage, **kwargs) -> int:
    """Find cosmic rays (:func:`find_cosmic_rays`) and OR the CR plane into ``mi.mask``.

    Returns the number of pixels flagged. The pixels are not interpolated (cp_pipe copies only
    the CR mask back, docs/algorithms.md#cosmic-rays); the stack ignores CR pixels instead.
    """
    cr = find_cosmic_rays(mi, **kwargs)
    mi.mask[cr] |= np.int32(MASK_PLANES.bit("CR"))
    return int(cr.sum())


def persistent_pixels(images, nsigma: float = 6.0, min_dn: float = 0.0) -> np.ndarray:
    """Pixels that stand out of their neighbourhood in the per-pixel median of several exposures.

    Cosmic rays do not repeat at the same pixel, so in the median of >= 3 exposures only hot
    pixels (and other fixed defects) remain sharp. Pass the result as ``exclude`` to
    :func:`find_cosmic_rays`.

    Parameters
    ----------
    images : sequence of MaskedImage or 2-D arrays (>= 3)
    nsigma : float, default 6.0
        Threshold in units of the robust (MAD) scatter of the median image about its 5x5 median.
    min_dn : float, default 0.0
        Also require this excess, ADU.
    """
    arrays = [im.image if isinstance(im, MaskedImage) else np.asarray(im) for im in images]
    if len(arrays) < 3:
        raise ValueError(f"persistent_pixels needs >= 3 exposures, got {len(arrays)}")
    med = np.nanmedian(np.stack(arrays).astype(np.float32), axis=0)
    med = np.where(np.isfinite(med), med, np.nanmedian(med))
    resid = med - ndimage.median_filter(med, size=5, mode="nearest")
    sigma = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    return (resid > nsigma * max(sigma, 1e-12)) & (resid > min_dn)
