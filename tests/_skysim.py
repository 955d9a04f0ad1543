"""Post-ISR sky exposures with known truth, for the background / sky tests (no ISR, no files).

Per exposure j and detector d (pixel coordinates x, y; focal-plane mm fx, fy):

    sky = L_j * (1 + g_j(fx, fy) + p_d(x, y))

* ``L_j``: the sky level (e-), uniform in [3000, 6000];
* ``g_j``: large-scale focal-plane structure (gradient + a broad "moonlight" bump), a few %;
* ``p_d``: a fixed small-scale pattern per detector (Gaussian blobs, sigma 18-30 px, +-3%): the
  signal a sky frame must recover;
plus stars (Gaussian PSF sigma 1.6 px, some saturated at 60000 e- and flagged SAT) and galaxies
(sigma 4-8 px), then Gaussian noise of variance sky + objects + read noise^2 (gain 1).
"""

from __future__ import annotations

import numpy as np

from calib_core.camera import load_camera
from calib_core.maskedimage import MaskedImage, mask_bits  # noqa: F401  (used by the tests)

READ_NOISE = 4.5
SATURATION = 60000.0


def camera():
    return load_camera("democam_mini")


def pattern(det, seed=7):
    """The fixed small-scale pattern p_d (float64, shape (ny, nx))."""
    rng = np.random.default_rng(seed * 1000 + det.id)
    yy, xx = np.mgrid[:det.ny, :det.nx].astype(np.float64)
    p = np.zeros((det.ny, det.nx))
    for _ in range(8):
        x0, y0 = rng.uniform(0, det.nx), rng.uniform(0, det.ny)
        s = rng.uniform(80, 130)
        p += rng.choice([-1, 1]) * rng.uniform(0.025, 0.045) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))
    return p


def large_scale(cam, det, params):
    """g_j on a detector's pixels."""
    yy, xx = np.mgrid[:det.ny, :det.nx].astype(np.float64)
    fx, fy = cam.pixel_to_focal_plane(det, xx, yy)
    a, b, mx, my, amp = params
    return a * fx / 15.0 + b * fy / 15.0 + amp * np.exp(-((fx - mx) ** 2 + (fy - my) ** 2) / (2 * 12.0 ** 2))


def add_objects(img, rng, n_stars=10, n_gal=3):
    """Add stars and galaxies (in place); returns a bool array of pixels the objects raise by
    more than 1 e-."""
    ny, nx = img.shape
    obj = np.zeros_like(img)
    for k in range(n_stars + n_gal):
        star = k < n_stars
        x0, y0 = rng.uniform(-5, nx + 5), rng.uniform(-5, ny + 5)
        s = 1.6 if star else rng.uniform(4, 8)
        flux = 10 ** rng.uniform(3.5, 6.5) if star else 10 ** rng.uniform(4.5, 5.8)
        r = int(8 * s + 3)
        if k == 0 and star:
            flux = 1e7  # one very bright, saturated star per image
            r = 60
        ys = slice(max(int(y0) - r, 0), min(int(y0) + r, ny))
        xs = slice(max(int(x0) - r, 0), min(int(x0) + r, nx))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        yy, xx = np.mgrid[ys, xs]
        prof = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
        if star:  # broad wings (3% of the flux in an 8x wider halo)
            w = 8 * s
            prof = 0.97 * prof + 0.03 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * w * w)) / (2 * np.pi * w * w)
        obj[ys, xs] += flux * prof
    img += obj
    return obj > 1.0


def exposure(cam, seed, *, level=None, objects=True, noise=True, pattern_seed=7, lscale=None):
    """One exposure: {detector id: MaskedImage}, plus the truth.

    Returns
    -------
    images : {id: MaskedImage}
    truth : dict with level, large-scale params, {id: object mask}
    """
    rng = np.random.default_rng(seed)
    L = rng.uniform(3000, 6000) if level is None else level
    params = lscale if lscale is not None else (rng.uniform(-0.01, 0.01), rng.uniform(-0.01, 0.01),
                                                rng.uniform(-15, 15), rng.uniform(-15, 15),
                                                rng.uniform(0.0, 0.015))
    images, objmasks = {}, {}
    sat = np.int32(mask_bits(["SAT"]))
    for det in cam.detectors:
        sky = L * (1 + large_scale(cam, det, params) + pattern(det, pattern_seed))
        img = sky.copy()
        om = add_objects(img, rng) if objects else np.zeros(img.shape, bool)
        var = img + READ_NOISE ** 2
        if noise:
            img = img + rng.normal(size=img.shape) * np.sqrt(var)
        mask = np.zeros(img.shape, np.int32)
        s = img >= SATURATION
        img[s] = SATURATION
        mask[s] |= sat
        images[det.id] = MaskedImage(img.astype(np.float32), mask, var.astype(np.float32))
        objmasks[det.id] = om
    return images, {"level": L, "params": params, "objects": objmasks}


def night(cam, n, seed0=100, **kw):
    """n exposures {seed: images}, with truth {seed: truth}."""
    ims, truth = {}, {}
    for j in range(n):
        ims[seed0 + j], truth[seed0 + j] = exposure(cam, seed0 + j, **kw)
    return ims, truth
