"""Post-ISR sky exposures with known truth, for the background / sky tests (no ISR, no files).

Per exposure j and detector d (pixel coordinates x, y; focal-plane mm u, v):

    sky = L_j * G_j(u, v) * (1 + p(u, v))

* ``L_j``: the sky level (e-), uniform in [3000, 6000];
* ``G_j = 1 + a u' + b v' + c u'^2 + d u'v' + e v'^2`` with ``(u', v') = (u, v) / 14 mm`` (the
  focal plane's half-size): a moonlight gradient, linear and quadratic, reaching up to +-10 %;
* ``p``: the fixed small-scale pattern (the signal a sky frame must recover), continuous over the
  focal plane: a ghost ring (3 %), compact blobs (+-3 %, sigma 1-2 mm) and plane waves (0.5 %,
  wavelength 3-8 mm);
plus stars (Gaussian PSF sigma 1.6 px with a broad halo, one saturated at 60000 e- and flagged SAT)
and galaxies (sigma 4-8 px), then Gaussian noise of variance sky + objects + read noise^2 (gain 1).
"""

from __future__ import annotations

import numpy as np

from calib_core.camera import load_camera
from calib_core.maskedimage import MaskedImage, mask_bits  # noqa: F401  (used by the tests)

READ_NOISE = 4.5
SATURATION = 60000.0
HALF_FP_MM = 14.0


def camera():
    return load_camera("democam_mini")


def _fp(cam, det):
    yy, xx = np.mgrid[:det.ny, :det.nx].astype(np.float64)
    u, v = cam.pixel_to_focal_plane(det, xx, yy)
    return np.asarray(u), np.asarray(v)


def pattern(det, seed=7, cam=None):
    """The fixed small-scale pattern p on a detector's pixels (float64, shape (ny, nx))."""
    cam = cam or camera()
    u, v = _fp(cam, det)
    rng = np.random.default_rng(seed)
    p = 0.03 * np.exp(-0.5 * ((np.hypot(u - 1.5, v + 2.0) - 5.0) / 0.6) ** 2)
    for _ in range(10):
        u0, v0, s = rng.uniform(-7, 7), rng.uniform(-13, 13), rng.uniform(1.0, 2.0)
        p += rng.choice([-1, 1]) * rng.uniform(0.015, 0.03) * np.exp(-((u - u0) ** 2 + (v - v0) ** 2) / (2 * s * s))
    for _ in range(4):
        lam, ang, ph = rng.uniform(3, 8), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        p += 0.005 * np.cos(2 * np.pi * (u * np.cos(ang) + v * np.sin(ang)) / lam + ph)
    return p


def large_scale(cam, det, params):
    """G_j - 1 on a detector's pixels."""
    u, v = _fp(cam, det)
    a, b, c, d, e = params
    uu, vv = u / HALF_FP_MM, v / HALF_FP_MM
    return a * uu + b * vv + c * uu * uu + d * uu * vv + e * vv * vv


def random_gradient(rng, amplitude=0.10):
    """Coefficients of G - 1 whose largest value over the focal plane is about ``amplitude``."""
    c = rng.uniform(-1, 1, 5)
    return tuple(amplitude * c / np.abs(c).sum())


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
    params = lscale if lscale is not None else random_gradient(rng)
    images, objmasks = {}, {}
    sat = np.int32(mask_bits(["SAT"]))
    for det in cam.detectors:
        sky = L * (1 + large_scale(cam, det, params)) * (1 + pattern(det, pattern_seed, cam))
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
