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
5. Pixels in ``exclude`` (known hot/bad pixels, for instance a defect mask) are never CRs: a hot
   pixel is as sharp as a CR but is in every exposure, and masking it in every input would leave
   the dark with NO_DATA exactly where it matters.
6. Grow by ``grow`` px with a disk (isotropic, like the reference's SpanSet dilation).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from scipy import ndimage

from calib_core.maskedimage import MASK_PLANES, MaskedImage

__all__ = ["find_cosmic_rays", "mask_cosmic_rays", "disk"]


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

    Notes
    -----
    The median filters are evaluated only where they can change the answer
    (docs/algorithms.md#cosmic-ray-speed): the 5x5 median is at least the 5x5 minimum, so a pixel
    whose excess over the minimum of its 5x5 window is below both thresholds cannot be a candidate.
    The minimum is one cheap pass; the medians (5x5, 3x3 and the 7x7 median of 3x3 medians) are
    then computed exactly at the few pixels left and at the neighbours a track grows into. The
    result is the same map as full-image median filters give (``mode="nearest"`` edges).
    """
    img = np.asarray(mi.image, np.float64)
    finite = np.isfinite(img)
    if not finite.all():
        fill = np.median(img[finite]) if finite.any() else 0.0
        img = np.where(finite, img, fill)
    img = np.ascontiguousarray(img)
    var = np.ascontiguousarray(mi.variance, np.float64)
    if ignore_bits is None:
        ignore_bits = MASK_PLANES.bits(["SAT", "BAD", "NO_DATA"])
    usable = finite & ((mi.mask & ignore_bits) == 0)
    if exclude is not None:
        usable &= ~np.asarray(exclude, bool)
    var_ok = np.isfinite(var) & (var > 0)
    mad = 1e-12
    if (usable & ~var_ok).any():
        # the noise of pixels without a usable variance: the MAD of the whole residual image
        resid = img - ndimage.median_filter(img, size=5, mode="nearest")
        mad = max(1.4826 * np.median(np.abs(resid - np.median(resid))), 1e-12)
    return _find(img, var, usable, float(mad), float(nsigma), float(min_dn), float(sharpness),
                 float(neighbour_nsigma), int(niter), disk(grow) if grow > 0 else np.ones((1, 1), bool))


# ---------------------------------------------------------------------------------------------------
# numba kernels of find_cosmic_rays (medians with scipy's mode="nearest": indices clamped to the image)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _clamp(i, n):
    return 0 if i < 0 else (n - 1 if i >= n else i)


@njit(cache=True, nogil=True)
def _median_at(img, y, x, r, buf):
    """Median of the (2r+1)^2 window around (y, x), edges clamped; ``buf`` holds (2r+1)^2 values."""
    ny, nx = img.shape
    k = 0
    for dy in range(-r, r + 1):
        yy = _clamp(y + dy, ny)
        for dx in range(-r, r + 1):
            buf[k] = img[yy, _clamp(x + dx, nx)]
            k += 1
    return np.median(buf[:k])


@njit(cache=True, nogil=True, inline="always")
def _noise(var, y, x, mad):
    v = var[y, x]
    return math.sqrt(abs(v)) if (math.isfinite(v) and v > 0) else mad


@njit(cache=True, nogil=True)
def _find(img, var, usable, mad, nsigma, min_dn, sharpness, neighbour_nsigma, niter, grow_disk):
    ny, nx = img.shape
    out = np.zeros((ny, nx), np.bool_)
    # 5x5 minimum, rows then columns (edges clamped)
    rowmin = np.empty((ny, nx))
    for y in range(ny):
        for x in range(nx):
            m = img[y, x]
            for dx in range(-2, 3):
                v = img[y, _clamp(x + dx, nx)]
                if v < m:
                    m = v
            rowmin[y, x] = m
    buf = np.empty(81)
    m3buf = np.empty(49)
    ys = []
    xs = []
    for y in range(ny):
        for x in range(nx):
            if not usable[y, x]:
                continue
            lo = rowmin[y, x]
            for dy in range(-2, 3):
                v = rowmin[_clamp(y + dy, ny), x]
                if v < lo:
                    lo = v
            excess = img[y, x] - lo          # >= img - median5: an upper bound of the residual
            if not (excess > min_dn):
                continue
            noise = _noise(var, y, x, mad)
            if not (excess > nsigma * noise):
                continue
            resid = img[y, x] - _median_at(img, y, x, 2, buf)
            if not (resid > nsigma * noise and resid > min_dn):
                continue
            m3 = _median_at(img, y, x, 1, buf)
            k = 0
            for dy in range(-3, 4):
                yy = _clamp(y + dy, ny)
                for dx in range(-3, 4):
                    m3buf[k] = _median_at(img, yy, _clamp(x + dx, nx), 1, buf)
                    k += 1
            m7 = np.median(m3buf)
            fine = max(m3 - m7, noise)
            if (img[y, x] - m3) / fine > sharpness:
                out[y, x] = True
                ys.append(y)
                xs.append(x)
    if len(ys) == 0:
        return out
    # neighbours above neighbour_nsigma join the track (8-connected), niter times
    for _ in range(niter):
        add_y = []
        add_x = []
        for i in range(len(ys)):
            for dy in range(-1, 2):
                yy = ys[i] + dy
                if yy < 0 or yy >= ny:
                    continue
                for dx in range(-1, 2):
                    xx = xs[i] + dx
                    if xx < 0 or xx >= nx or out[yy, xx] or not usable[yy, xx]:
                        continue
                    resid = img[yy, xx] - _median_at(img, yy, xx, 2, buf)
                    if resid > neighbour_nsigma * _noise(var, yy, xx, mad):
                        out[yy, xx] = True
                        add_y.append(yy)
                        add_x.append(xx)
        if len(add_y) == 0:
            break
        ys.extend(add_y)
        xs.extend(add_x)
    # grow by the disk
    r = grow_disk.shape[0] // 2
    if r == 0:
        return out
    grown = out.copy()
    for i in range(len(ys)):
        for dy in range(-r, r + 1):
            yy = ys[i] + dy
            if yy < 0 or yy >= ny:
                continue
            for dx in range(-r, r + 1):
                xx = xs[i] + dx
                if 0 <= xx < nx and grow_disk[dy + r, dx + r]:
                    grown[yy, xx] = True
    return grown


def mask_cosmic_rays(mi: MaskedImage, **kwargs) -> int:
    """Find cosmic rays (:func:`find_cosmic_rays`) and OR the CR plane into ``mi.mask``.

    Returns the number of pixels flagged. The pixels are not interpolated (cp_pipe copies only
    the CR mask back, docs/algorithms.md#cosmic-rays); the stack ignores CR pixels instead.
    """
    cr = find_cosmic_rays(mi, **kwargs)
    mi.mask[cr] |= np.int32(MASK_PLANES.bit("CR"))
    return int(cr.sum())
