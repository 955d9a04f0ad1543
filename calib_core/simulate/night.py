"""A simulated night of raw exposures from a mosaic CCD camera, with the truth it was built from.

:func:`simulate_night` writes raw multi-extension FITS files laid out exactly as the camera file
describes (prescan + data + overscan per amplifier, amplifiers with a reversed ``detector_section``
stored mirrored), and beside them the truth every calibration product should recover. It needs only
numpy and astropy and imports nothing from Prefect.

Files
-----
``out_dir/raw/<EXPID>.fits`` (``.fits.gz`` with ``compress="gzip"``, ``.fits.fz`` with ``"rice"``)
    Primary HDU: OBSTYPE (bias | dark | flat | science), OBJECT, EXPTIME [s], DARKTIME [s], FILTER
    ('NONE' for bias and dark), DATE-OBS (ISO UTC, start of exposure), EXPID, AIRMASS, MOONILL, plus
    INSTRUME, ORIGIN, SIMSEED. Layout ``hdu_per_detector``: one image HDU per detector, EXTNAME = the
    detector's ``hdu``; layout ``hdu_per_amplifier`` (``minimosaic``): one image HDU per amplifier,
    EXTNAME = the amplifier's ``hdu`` (header AMPNAME), holding that amplifier's prescan, data and
    overscan sections. uint16 pixels (stored as int16 with BZERO = 32768).
``out_dir/truth/``
    ``bias_<det>.fits``, ``dark_<det>.fits``, ``flat_<filter>_<det>.fits``, ``qe_<filter>_<det>.fits``,
    ``sky_<filter>_<det>.fits``, ``fringe_<filter>_<det>.fits`` (fringing filters only, see
    :data:`FRINGE_FILTERS`): float32 images of the assembled, trimmed detector (shape ``(ny, nx)``,
    pixel (x, y) = column x, row y, 0-based, the geometry :mod:`calib_core.io.raw` assembles to);
    ``<det>`` is the detector name (``ccd00``). ``static.json`` (instrument parameters),
    ``exposures.json`` (per-exposure truth), ``night.json`` (what :meth:`SimulatedNight.load` reads),
    ``camera.yaml`` (the camera simulated) and ``README.txt`` (this text).

The model, exactly
------------------
Notation: ``(x, y)`` a pixel of the assembled detector; ``a(x, y)`` its amplifier with gain ``g_a``
[e-/ADU], read noise ``rn_a`` [e-] and saturation ``sat_a`` [ADU] from the camera file (with
``gain_error=A``, opt-in, the true ``g_a`` is the file's times ``1 +- A * U(0.75, 1.25)``; ``static.json``
lists ``gains`` (true) and ``nominal_gains``);
``(u, v) = camera.pixel_to_focal_plane(det, x, y)`` in mm; ``rho = sqrt(u**2 + v**2)``;
``R_fp`` [mm] = the largest distance of any detector corner from the focal-plane origin;
``t`` = EXPTIME [s]; ``t_d`` = DARKTIME [s] (0 for bias, EXPTIME otherwise).

Expected detected electrons in the data section, per exposure type::

    bias     E = 0
    dark     E = D(x, y) * t_d                                                 + CR
    flat     E = L_j * Q_f(x, y)                          + D(x, y) * t_d     + CR
    science  E = Q_f(x, y) * [ S_j * G_j(u, v) * P_f(x, y) * M_j(u, v)
                               + S_j * phi_j * F_f(x, y)
                               + S_j * A_j(u, v)
                               + O_j(x, y) ]               + D(x, y) * t_d     + CR

(``M_j = 1`` and ``A_j = 0`` except on bad exposures, see below.)

* ``D`` dark current [e-/s] = ``d0_det`` (uniform in 0.0015..0.0025) plus hot pixels (a fraction
  :data:`HOT_PIXEL_FRACTION` of pixels, rates log-uniform in 0.5..5 e-/s).
* ``Q_f`` quantum-efficiency response [detected e- per incident e-, dimensionless]
  ``= q_{det,f} * V(rho) * (1 + 0.005 * n(x, y)) * C(x, y)`` with ``q_{det,f}`` uniform in 0.95..1.05,
  vignetting ``V = 1 - VIGNETTING * (rho / R_fp)**2``, ``n`` unit Gaussian pixel noise, ``C`` the bad
  column factor (0.2..0.4, or 0 for a dead column, from a start row to the top of the detector; 1
  elsewhere). Bad columns are the same in every filter. With ``pixel_defects=True`` (opt-in), ``C``
  also holds cold pixels (a fraction :data:`COLD_PIXEL_FRACTION`, factor 0.3..0.7) and ``D`` a hot
  column segment per detector (0.3..1 e-/s from a start row to the top).
* ``L_j`` dome lamp level [incident e-] = ``FLAT_LEVEL * flat_exptime / 5 * (1 + U(-0.03, 0.03))``.
* ``S_j`` sky level [incident e- per pixel per exposure], drawn per exposure uniformly in the
  range :data:`SKY_LEVELS` gives for the filter (800..3000 in r, 1500..5000 in z), times
  ``science_exptime / 120``.
* ``G_j`` the large-scale (moonlight) gradient,
  ``G_j = 1 + c1_j * w + c2_j * w**2 + c3_j * w_perp**2`` with
  ``w = (u * cos(theta_j) + v * sin(theta_j)) / R_fp`` and
  ``w_perp = (-u * sin(theta_j) + v * cos(theta_j)) / R_fp`` (so ``w**2 + w_perp**2 <= 1`` on the
  focal plane), ``theta_j`` uniform in 0..2 pi. Default (``gradient_amplitude=None``, the legacy
  ranges): ``c1_j`` in 0..0.08, ``c2_j`` in -0.03..0.03, ``c3_j = 0``. With
  ``gradient_amplitude=A``: a bound ``m_j`` uniform in ``A/2..A``, raw coefficients ``a1`` in 0.3..1,
  ``a2, a3`` in -0.5..0.5, and ``c_i = a_i * m_j / (a1 + max(|a2|, |a3|))``, so that
  ``|G_j - 1| <= c1 + max(|c2|, |c3|) = m_j <= A`` everywhere on the focal plane (the quadratic part
  curves in 2-D: independent curvatures along and across ``theta_j``). ``exposures.json`` records
  ``gradient = {theta, c1, c2, c3, r_fp_mm, max_abs_bound (= m_j), amplitude (A or None), model}``.
* ``P_f`` the small-scale sky pattern (what a sky frame recovers, dimensionless; the same for every
  exposure of a filter; file ``sky_<f>_<det>``)::

      P_f = (1 + sum_k a_k cos(2 pi (k_uk u + k_vk v) + psi_k)                       plane waves
               + A_g exp(-(|(u,v) - c_g| - r_g)**2 / (2 w_g**2))                     ghost ring
               + sum_r b_r cos(2 pi (q_ur u + q_vr v) + chi_r)                       ripples
               + sum_p h_p exp(-|(u,v) - c_p|**2 / (2 s_p**2))                        peaks
               + sum_e e_e exp(-d_e(x, y) / l_e)                                      edge glow
            ) / N_P

  40 plane waves of wavelength 100..600 px (structure on 50..300 px) and rms ~1.5 %; a ghost ring of
  amplitude ``A_g`` = 0.03, radius 150..250 px and width 25 px; 2 ripples of wavelength 2..4 mm
  (133..267 px at 15 um) and amplitude ``b_r`` 0.3..0.6 %; 2 peaks (compact Gaussian blobs) of
  height ``h_p`` 3..6 % and sigma ``s_p`` 30..80 px centred on a detector; edge glow: each of the 4
  edges of each detector (``x0``, ``x1``, ``y0``, ``y1``: the pixel column x = 0, x = nx - 1, row
  y = 0, y = ny - 1) glows with probability 0.4, amplitude ``e_e`` 1..4 %, decaying exponentially
  with the distance ``d_e`` [px] from that edge's pixel centres over ``l_e`` 20..60 px. Waves, ghost,
  ripples and peaks are in focal-plane coordinates, so continuous across chip gaps; the edge glow is
  per detector. ``N_P`` makes the mean over every pixel of the focal plane exactly 1. Every
  parameter is in ``static.json`` under ``sky_pattern[<f>]`` (``ku, kv, amp, phase``, ``ghost_*``,
  ``ripple_ku, ripple_kv, ripple_amp, ripple_phase`` [cycles/mm], ``peaks [{u, v, amplitude,
  sigma_mm}]``, ``edge_glow {det: [{edge, amplitude, scale_px}]}``), ``N_P`` under ``sky_norm[<f>]``.
* ``F_f`` the fringe pattern per unit sky level (dimensionless, mean 0 on each detector): a sum of
  5 plane waves of wavelength 20..60 px times a slow envelope, rms 0.01..0.02 per detector (peaks
  ~3..5 % of the sky). ``phi_j`` is uniform in 0.8..1.2; the fringe amplitude of exposure ``j`` is
  ``S_j * phi_j`` [e-]. ``F_f = 0`` for filters not in :data:`FRINGE_FILTERS`. File ``fringe_<f>_<det>``.
* ``O_j`` stars (Moffat, beta = 3, FWHM 3..4 px per exposure) and exponential-profile galaxies (scale
  1..4 px), incident e-, random positions per exposure; each stamp sums to the listed flux.
* ``CR`` cosmic rays, :data:`CR_RATE` per pixel per 100 s of dark time, tracks 1..4 px long, not
  multiplied by any response.

Bad exposures (``bad_exposures=("cloud", "trail", "glow")``; default none): per filter, one science
exposure per entry (never the filter's first) gets that defect; ``exposures.json`` records
``defect`` ("cloud" | "trail" | "glow", None for good exposures) and ``defect_params`` (lengths in
mm, focal-plane coordinates; :func:`defect_maps` / :meth:`SimulatedNight.defect_maps` evaluate them):

* cloud: ``M_j = 1 + sum_k m_k cos(2 pi (k_uk u + k_vk v) + psi_k)``, 24 plane waves of wavelength
  400..1600 px (patches on 200..800 px), amplitudes scaled so that ``sum m_k**2 / 2 = rms**2`` with
  ``rms`` uniform in 3..8 % (``defect_params = {rms, ku, kv, amp, phase}``). Multiplies the sky
  continuum ``S_j G_j P_f`` only (not the fringes, nor the objects).
* trail: a satellite trail, a straight line through ``(u0, v0)`` (central 60 % of the focal plane)
  at ``angle`` [rad] from the u axis, crossing the whole focal plane: with ``d`` the distance from the
  line, ``A_j = core_peak exp(-d**2 / (2 core_sigma**2)) + wing_peak exp(-d**2 / (2 wing_sigma**2))``,
  core sigma 1.5..2.5 px and peak 0.3..1.0 (in units of ``S_j``, i.e. 10..50 sigma of the sky noise
  per pixel), wings of sigma 40..80 px and peak 0.5..1 %. Evaluated at pixel centres.
* glow: scattered light from a bright star just off or on the focal plane, a Lorentzian
  ``A_j = peak / (1 + |(u,v) - (u0,v0)|**2 / scale**2)``, ``scale`` 300..1000 px, ``peak`` 3..10 %,
  centre uniform in the focal-plane bounding box widened by ``scale / 2`` on each side.

Noise and digitisation: ``e = Poisson(E)`` (for ``E >= poisson_gaussian_above``, default 1000 e-, a
Gaussian of mean ``E`` and variance ``E`` rounded to whole electrons stands in for the Poisson draw:
skewness ``1/sqrt(E) <= 0.032``; pass ``None`` for exact Poisson draws everywhere). Then, in ADU::

    data     ADU = e / g_a + b_a + r_j,a(row) + B(x, y) + N(0, rn_a / g_a)
    overscan, prescan
             ADU = b_a + r_j,a(row) + N(0, rn_a / g_a)

rounded to integers, data pixels clipped at ``sat_a`` (saturated pixels read exactly ``sat_a``; no
bleeding), everything clipped to 0..65535. ``b_a`` is the amplifier's bias level (1000 +- 150 ADU),
``r_j,a(row)`` the per-exposure row drift (an offset N(0, 2) ADU, a random walk and a 0.5 ADU
sinusoid), identical in the data and the overscan of a raw row, so a per-row overscan correction
removes it. ``B`` is the fixed 2-D bias structure [ADU] of the data section (a gradient of up to
+-3 ADU in x and y plus a column pattern of rms 0.7 ADU).

Truth files (all float32, shape (ny, nx) of the assembled detector)
-------------------------------------------------------------------
``bias_<det>``   ``B(x, y)`` [ADU]: the master bias of overscan-corrected biases (level and drift gone).
``dark_<det>``   ``D(x, y) / g_a`` [ADU per second of DARKTIME], hot pixels included.
``defects_<det>`` int16: every injected bad pixel, OR of :data:`DEFECT_BITS` (1 hot pixel, 2 bad
                 column, 4 cold pixel, 8 hot column; 0 = good).
``qe_<f>_<det>`` ``Q_f(x, y) / Qbar_f``: the response in electrons, mean 1 over the focal plane.
``flat_<f>_<det>`` ``R_f(x, y) = (Q_f / g_a) / rbar_f`` [dimensionless], ``rbar_f`` = the mean of
                 ``Q_f / g_a`` over every pixel of the focal plane (header REFRESP, ADU per incident
                 e-), so mean(R_f) = 1 over the focal plane and a bias- and dark-subtracted flat reads
                 ``ADU = L_j * rbar_f * R_f(x, y)``.
``sky_<f>_<det>`` ``P_f(x, y)``.  ``fringe_<f>_<det>`` ``F_f(x, y)``.

Hence a bias-, dark- and flat-corrected (divided by ``R_f``) science exposure reads, in ADU,
``rbar_f * (S_j G_j P_f M_j + S_j phi_j F_f + S_j A_j + O_j)``.

``exposures.json`` holds, per exposure: exposure_id, obs_type, filter, date_obs, exptime, darktime,
path, sky_level (S_j, e-), gradient {theta, c1, c2, c3, r_fp_mm, max_abs_bound, amplitude, model},
defect and defect_params (science only), fringe_scale (phi_j),
fringe_amplitude (S_j phi_j, e-), lamp_level (L_j, e-), fwhm_px, objects [{kind, fx_mm, fy_mm,
detector, x, y, flux (incident e-), saturated}], cosmic_rays {detector: count} and bias_offset
{detector: {amp: mean of r_j,a over rows, ADU}}. Object ``x, y`` are assembled-detector pixel
coordinates (0 = centre of the first pixel), listed for objects centred on a detector that was
written; ``saturated`` is true when the expected (noise-free) peak, E / g_a + b_a, reaches sat_a.

Random numbers
--------------
Every draw comes from ``np.random.Generator(PCG64(SeedSequence(seed, spawn_key=key)))``: the node
``key`` of the ``SeedSequence(seed).spawn`` tree. Instrument truth uses keys that hold a detector id
(never a position in a list), exposures use ``(10, seq)`` for focal-plane quantities (``(10, seq, 1)``
for the ``gradient_amplitude`` gradient, ``(10, seq, 2)`` for defect parameters) and
``(11, seq, detector_id)`` for pixels, so simulating a subset of detectors gives the same pixels;
``(12, first_sequence, filter)`` picks the bad exposures.

Held-out exposures: ``seq`` runs from ``first_sequence + 1`` (exposure id ``<YYYYMMDD><seq:04d>``).
The instrument truth (bias, dark, flat, QE, sky pattern, fringe) depends on the seed only, every
per-exposure draw on ``seq``: a second night with the same seed, another ``night`` and
``first_sequence`` >= the first night's number of exposures (e.g. 1000) has the same instrument and
new gradients, sky levels, objects, noise and bad-exposure choice, with ids that do not collide.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import math
import os
import threading
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from astropy.io import fits

from calib_core.camera import Amplifier, Camera, Detector, Section, load_camera, parse_section

__all__ = [
    "simulate_night",
    "defect_maps",
    "DEFECTS",
    "SimulatedNight",
    "SimulatedExposure",
    "InstrumentTruth",
    "FRINGE_FILTERS",
    "SKY_LEVELS",
]

# --------------------------------------------------------------------------------------------------
# Model constants (units in the comments; the module docstring gives the formulas)
# --------------------------------------------------------------------------------------------------

BIAS_LEVEL = 1000.0            # ADU, mean amplifier bias level
BIAS_LEVEL_SPREAD = 150.0      # ADU, amplifier levels uniform in BIAS_LEVEL +- this
BIAS_GRADIENT = 3.0            # ADU, bias structure gradient amplitude (uniform +- this, per axis)
BIAS_COLUMN_RMS = 0.7          # ADU, column pattern of the bias structure
DRIFT_OFFSET_RMS = 2.0         # ADU, per-exposure per-amplifier offset
DRIFT_WALK_STEP = 0.04         # ADU per row, random-walk step of the row drift
DRIFT_SINE = 0.5               # ADU, amplitude of the sinusoidal row drift
DARK_MEAN = (0.0015, 0.0025)   # e-/s/pixel, range of the per-detector dark current
HOT_PIXEL_FRACTION = 5e-4      # fraction of pixels that are hot
HOT_PIXEL_RATE = (0.5, 5.0)    # e-/s, log-uniform
QE_CCD_SPREAD = 0.05           # CCD-to-CCD QE differences, uniform +- this
QE_PIXEL_RMS = 0.005           # pixel-scale QE noise
VIGNETTING = 0.12              # fractional loss at rho = R_fp
N_BAD_COLUMNS = 2              # per detector
# opt-in (pixel_defects=True): more kinds of bad pixel, from their own random nodes
COLD_PIXEL_FRACTION = 2e-4     # fraction of pixels with a low response
COLD_PIXEL_FACTOR = (0.3, 0.7)  # their QE factor, uniform
N_HOT_COLUMNS = 1              # per detector: a column segment with extra dark current
HOT_COLUMN_RATE = (0.3, 1.0)   # e-/s per pixel, uniform
# opt-in (gain_error=A): true gains differ from the camera file's by A * U(0.75, 1.25), either sign
GAIN_ERROR_SPREAD = (0.75, 1.25)
#: bits of the truth defects map (truth/defects_<det>.fits)
DEFECT_BITS = {"hot_pixel": 1, "bad_column": 2, "cold_pixel": 4, "hot_column": 8}
FLAT_LEVEL = 20000.0           # incident e- per pixel for a 5 s dome flat
FLAT_LAMP_JITTER = 0.03        # lamp level uniform within +- this
SKY_LEVELS = {"u": (200.0, 800.0), "g": (400.0, 1500.0), "r": (800.0, 3000.0), "i": (1200.0, 4000.0),
              "z": (1500.0, 5000.0), "y": (1500.0, 5000.0)}  # incident e- per pixel in 120 s
DEFAULT_SKY_LEVEL = (800.0, 3000.0)
GRADIENT_C1 = (0.0, 0.08)      # legacy draws (gradient_amplitude=None)
GRADIENT_C2 = (-0.03, 0.03)
GRADIENT_FRACTION = (0.5, 1.0)  # with gradient_amplitude A: bound m_j of |G_j - 1| uniform in A * this
GRADIENT_QUAD_SHARE = 0.5       # quadratic raw coefficients uniform in +-this (linear raw one in 0.3..1)
SKY_PATTERN_MODES = 40
SKY_PATTERN_RMS = 0.015
SKY_PATTERN_WAVELENGTH_PX = (100.0, 600.0)
GHOST_AMPLITUDE = 0.03
GHOST_RADIUS_PX = (150.0, 250.0)
GHOST_WIDTH_PX = 25.0
EDGE_GLOW_PROBABILITY = 0.4    # chance that a given edge of a detector glows (per filter)
EDGE_GLOW_AMPLITUDE = (0.01, 0.04)
EDGE_GLOW_SCALE_PX = (20.0, 60.0)
RIPPLE_WAVES = 2
RIPPLE_WAVELENGTH_MM = (2.0, 4.0)
RIPPLE_AMPLITUDE = (0.003, 0.006)
SKY_PEAKS = 2
SKY_PEAK_AMPLITUDE = (0.03, 0.06)
SKY_PEAK_SIGMA_PX = (30.0, 80.0)
DEFECTS = ("cloud", "trail", "glow")
CLOUD_WAVES = 24
CLOUD_WAVELENGTH_PX = (400.0, 1600.0)   # structure (half a wavelength) on 200..800 px
CLOUD_RMS = (0.03, 0.08)
TRAIL_CORE_SIGMA_PX = (1.5, 2.5)
TRAIL_CORE_PEAK = (0.3, 1.0)           # in units of the sky level S_j
TRAIL_WING_SIGMA_PX = (40.0, 80.0)
TRAIL_WING_PEAK = (0.005, 0.01)
GLOW_SCALE_PX = (300.0, 1000.0)
GLOW_PEAK = (0.03, 0.10)
FRINGE_FILTERS = ("z", "y", "Y")
FRINGE_WAVES = 5
FRINGE_WAVELENGTH_PX = (20.0, 60.0)
FRINGE_RMS = (0.01, 0.02)
FRINGE_SCALE = (0.8, 1.2)
STAR_DENSITY = 150.0           # stars per million pixels of focal-plane area
GALAXY_DENSITY = 60.0          # galaxies per million pixels
STAR_FLUX = (300.0, 3.0e5)     # incident e-, N(>F) ~ F**-1.5
GALAXY_FLUX = (500.0, 5.0e4)
SATURATED_STAR_FLUX = (3.0e6, 3.0e7)  # log-uniform
MOFFAT_BETA = 3.0
FWHM_PX = (3.0, 4.0)
GALAXY_SCALE_PX = (1.0, 4.0)
STAR_STAMP_RADIUS = 12
BRIGHT_STAMP_RADIUS = 40
GALAXY_STAMP_RADIUS = 16
CR_RATE = 3e-5                 # cosmic rays per pixel per 100 s
CR_ENERGY_MEDIAN = 2500.0      # e- per track
READOUT_S = 40.0               # s between the end of one exposure and the start of the next
POISSON_GAUSSIAN_ABOVE = 1000.0
MAP_CACHE_BYTES = 1 << 30      # per-filter maps (Q, sky, fringe) the simulator keeps for all filters

_EXP_KEY, _PIX_KEY, _BAD_KEY = 10, 11, 12


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Generator of node ``key`` of the ``SeedSequence(seed).spawn`` tree."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key))))


def _filter_code(name: str) -> int:
    return zlib.crc32(name.encode())


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AmpLayout:
    amp: Amplifier
    gain: float
    rn_adu: float
    data: Section
    det: Section
    overscan: Section | None
    prescan: Section | None
    flip_x: bool
    flip_y: bool
    hdu: int | str = 0          # the HDU holding this amplifier (the detector's, or its own)

    def to_raw(self, sub: np.ndarray) -> np.ndarray:
        """Detector-oriented pixels of this amplifier -> raw (readout) orientation (or back)."""
        if self.flip_x:
            sub = sub[:, ::-1]
        if self.flip_y:
            sub = sub[::-1, :]
        return sub


def _layouts(camera: Camera, det: Detector, gain_factors: dict[str, float] | None = None) -> list[_AmpLayout]:
    if camera.sections_from_header:
        raise ValueError(f"camera {camera.name}: the simulator writes only cameras whose sections are "
                         "listed in the camera file (sections_from_header: false)")
    per_amp = camera.layout == "hdu_per_amplifier"
    out = []
    for amp in det.amplifiers:
        if amp.gain is None or amp.read_noise is None:
            raise ValueError(f"camera {camera.name} detector {det.name} amplifier {amp.name}: the simulator "
                             "needs numeric gain and read_noise in the camera file")
        data, dsec = parse_section(amp.data_section), parse_section(amp.detector_section)
        gain = float(amp.gain) * (gain_factors or {}).get(amp.name, 1.0)     # the true gain
        out.append(_AmpLayout(amp=amp, gain=gain, rn_adu=float(amp.read_noise) / gain,
                              data=data, det=dsec,
                              overscan=parse_section(amp.overscan_section) if amp.overscan_section else None,
                              prescan=parse_section(amp.prescan_section) if amp.prescan_section else None,
                              flip_x=dsec.flip_x != data.flip_x, flip_y=dsec.flip_y != data.flip_y,
                              hdu=amp.hdu if per_amp else det.hdu))
    return out


def _hdu_groups(layouts: list[_AmpLayout]) -> list[tuple[int | str, list[_AmpLayout]]]:
    """The amplifiers grouped by the HDU that holds them, in camera-file order: one group for
    ``hdu_per_detector``, one per amplifier for ``hdu_per_amplifier``."""
    groups: dict[int | str, list[_AmpLayout]] = {}
    for lay in layouts:
        groups.setdefault(lay.hdu, []).append(lay)
    return list(groups.items())


def _raw_shape(layouts: list[_AmpLayout]) -> tuple[int, int]:
    secs = [s for lay in layouts for s in (lay.data, lay.overscan, lay.prescan) if s is not None]
    return max(s.y1 for s in secs), max(s.x1 for s in secs)


def _fp_affine(camera: Camera, det: Detector) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(u0, du/dx, du/dy), (v0, dv/dx, dv/dy): the (exactly affine) pixel -> focal-plane map."""
    u0, v0 = (float(a) for a in camera.pixel_to_focal_plane(det, 0.0, 0.0))
    u1, v1 = (float(a) for a in camera.pixel_to_focal_plane(det, 1.0, 0.0))
    u2, v2 = (float(a) for a in camera.pixel_to_focal_plane(det, 0.0, 1.0))
    return (u0, u1 - u0, u2 - u0), (v0, v1 - v0, v2 - v0)


def _fp_grid(camera: Camera, det: Detector) -> tuple[np.ndarray, np.ndarray]:
    (u0, ux, uy), (v0, vx, vy) = _fp_affine(camera, det)
    x = np.arange(det.nx, dtype=np.float64)[None, :]
    y = np.arange(det.ny, dtype=np.float64)[:, None]
    return u0 + ux * x + uy * y, v0 + vx * x + vy * y


def _plane_waves(nx: int, ny: int, kx: np.ndarray, ky: np.ndarray, phase: np.ndarray,
                 amp: np.ndarray) -> np.ndarray:
    """sum_k amp_k cos(2 pi (kx_k x + ky_k y) + phase_k) on an (ny, nx) grid; k in cycles per pixel.

    Evaluated as the real part of one (ny, K) @ (K, nx) complex product, so the cost is a matrix
    product rather than K full-frame cosines.
    """
    x = np.arange(nx, dtype=np.float64)
    y = np.arange(ny, dtype=np.float64)
    ex = np.exp(2j * np.pi * np.outer(kx, x))                                   # (K, nx)
    ey = (amp * np.exp(1j * phase))[None, :] * np.exp(2j * np.pi * np.outer(y, ky))  # (ny, K)
    return (ey.astype(np.complex64) @ ex.astype(np.complex64)).real


def _fp_bbox(camera: Camera) -> tuple[float, float, float, float]:
    corners = [camera.detector_corners_mm(d) for d in camera.detectors]
    return (min(c[0] for c in corners), max(c[1] for c in corners),
            min(c[2] for c in corners), max(c[3] for c in corners))


# --------------------------------------------------------------------------------------------------
# Instrument truth
# --------------------------------------------------------------------------------------------------


class InstrumentTruth:
    """The fixed (per camera and seed) truth of a simulated instrument.

    Arrays are float32 of the assembled detector, shape ``(det.ny, det.nx)``. Per-filter maps are
    cached for the filter last asked for only, to keep memory at a few maps per detector.

    Parameters
    ----------
    camera
        The camera.
    seed
        Non-negative integer seed.
    gain_error
        None (default): the true gains are the camera file's. ``A``: each amplifier's true gain is
        the file's times ``1 + s * A * U(0.75, 1.25)``, ``s = +-1``, from the node ``(1, det, 4)``.
    pixel_defects
        Also cold pixels and hot columns (nodes ``(1, det, 3)``); default False.
    """

    def __init__(self, camera: Camera, seed: int, gain_error: float | None = None, pixel_defects: bool = False):
        self.camera = camera
        self.seed = int(seed)
        self.gain_error = None if not gain_error else float(gain_error)
        self.pixel_defects = bool(pixel_defects)
        self.gain_factors = {d.id: self._draw_gain_factors(d) for d in camera.detectors} if self.gain_error else {}
        self.layouts = {d.id: _layouts(camera, d, self.gain_factors.get(d.id)) for d in camera.detectors}
        corners = [camera.detector_corners_mm(d) for d in camera.detectors]
        self.r_fp = float(max(math.hypot(x, y) for c in corners for x in c[:2] for y in c[2:]))
        self.bbox = _fp_bbox(camera)
        self._cache: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()
        self._norms: dict[tuple, float] = {}
        self._static = {d.id: self._draw_static(d) for d in camera.detectors}

    # -- per-detector fixed parameters ------------------------------------------------------------

    def _draw_gain_factors(self, det: Detector) -> dict[str, float]:
        rng = _rng(self.seed, 1, det.id, 4)
        out = {}
        for amp in det.amplifiers:
            size = self.gain_error * rng.uniform(*GAIN_ERROR_SPREAD)
            sign = 1.0 if rng.uniform() < 0.5 else -1.0
            out[amp.name] = 1.0 + sign * size
        return out

    def _draw_pixel_defects(self, det: Detector) -> dict[str, Any]:
        rng = _rng(self.seed, 1, det.id, 3)
        npix = det.nx * det.ny
        n_cold = int(round(COLD_PIXEL_FRACTION * npix))
        cold = np.sort(rng.choice(npix, size=n_cold, replace=False))
        factor = rng.uniform(*COLD_PIXEL_FACTOR, n_cold)
        hot_cols = []
        for _ in range(N_HOT_COLUMNS):
            hot_cols.append({"x": int(rng.integers(8, det.nx - 8)), "y_start": int(rng.integers(0, det.ny // 2)),
                             "rate": float(rng.uniform(*HOT_COLUMN_RATE))})
        return {"cold_index": cold, "cold_factor": factor, "hot_columns": hot_cols}

    def _draw_static(self, det: Detector) -> dict[str, Any]:
        rng = _rng(self.seed, 1, det.id, 0)
        levels = {lay.amp.name: float(BIAS_LEVEL + rng.uniform(-BIAS_LEVEL_SPREAD, BIAS_LEVEL_SPREAD))
                  for lay in self.layouts[det.id]}
        gx, gy = rng.uniform(-BIAS_GRADIENT, BIAS_GRADIENT, 2)
        columns = rng.normal(0.0, BIAS_COLUMN_RMS, det.nx)
        rng = _rng(self.seed, 1, det.id, 1)
        d0 = float(rng.uniform(*DARK_MEAN))
        npix = det.nx * det.ny
        n_hot = int(round(HOT_PIXEL_FRACTION * npix))
        hot = np.sort(rng.choice(npix, size=n_hot, replace=False))
        hot_rate = np.exp(rng.uniform(np.log(HOT_PIXEL_RATE[0]), np.log(HOT_PIXEL_RATE[1]), n_hot))
        rng = _rng(self.seed, 1, det.id, 2)
        bad = []
        for _ in range(N_BAD_COLUMNS):
            col = int(rng.integers(8, det.nx - 8))
            start = int(rng.integers(0, det.ny // 2))
            factor = 0.0 if rng.uniform() < 0.5 else float(rng.uniform(0.2, 0.4))
            bad.append({"x": col, "y_start": start, "factor": factor})
        out = {"bias_levels": levels, "bias_gradient": (float(gx), float(gy)), "bias_columns": columns,
               "dark_mean": d0, "hot_index": hot, "hot_rate": hot_rate, "bad_columns": bad}
        if self.pixel_defects:
            out.update(self._draw_pixel_defects(det))
        return out

    def bias_level(self, det: Detector, amp: str) -> float:
        """Bias level b_a [ADU] of an amplifier."""
        return self._static[det.id]["bias_levels"][amp]

    def bias(self, det: Detector) -> np.ndarray:
        """B(x, y) [ADU]: the 2-D bias structure of the data section."""
        s = self._static[det.id]
        gx, gy = s["bias_gradient"]
        x = np.arange(det.nx) / max(det.nx - 1, 1) - 0.5
        y = np.arange(det.ny) / max(det.ny - 1, 1) - 0.5
        row = (gx * x + s["bias_columns"]).astype(np.float32)
        return (gy * y).astype(np.float32)[:, None] + row[None, :]

    def dark_electrons(self, det: Detector) -> np.ndarray:
        """D(x, y) [e-/s]."""
        s = self._static[det.id]
        d = np.full(det.ny * det.nx, s["dark_mean"], dtype=np.float32)
        d[s["hot_index"]] += s["hot_rate"].astype(np.float32)
        d = d.reshape(det.ny, det.nx)
        for h in s.get("hot_columns", ()):
            d[h["y_start"]:, h["x"]] += np.float32(h["rate"])
        return d

    def gain_map(self, det: Detector) -> np.ndarray:
        """g_a(x, y) [e-/ADU] on the assembled detector."""
        g = np.zeros((det.ny, det.nx), dtype=np.float32)
        for lay in self.layouts[det.id]:
            g[lay.det.slices] = lay.gain
        return g

    def dark(self, det: Detector) -> np.ndarray:
        """Truth dark [ADU per second of dark time]."""
        return self.dark_electrons(det) / self.gain_map(det)

    def bad_column_factor(self, det: Detector) -> np.ndarray:
        """C(x, y): the response factor of bad columns (and, with ``pixel_defects``, cold pixels)."""
        s = self._static[det.id]
        c = np.ones((det.ny, det.nx), dtype=np.float32)
        for b in s["bad_columns"]:
            c[b["y_start"]:, b["x"]] = b["factor"]
        if "cold_index" in s:
            c.flat[s["cold_index"]] *= s["cold_factor"].astype(np.float32)
        return c

    def defects(self, det: Detector) -> np.ndarray:
        """The truth defects map (int16, OR of :data:`DEFECT_BITS`): every injected bad pixel."""
        s = self._static[det.id]
        m = np.zeros(det.ny * det.nx, np.int16)
        m[s["hot_index"]] |= DEFECT_BITS["hot_pixel"]
        if "cold_index" in s:
            m[s["cold_index"]] |= DEFECT_BITS["cold_pixel"]
        m = m.reshape(det.ny, det.nx)
        for b in s["bad_columns"]:
            m[b["y_start"]:, b["x"]] |= DEFECT_BITS["bad_column"]
        for h in s.get("hot_columns", ()):
            m[h["y_start"]:, h["x"]] |= DEFECT_BITS["hot_column"]
        return m

    # -- per-filter maps ----------------------------------------------------------------------------

    def _cached(self, key: tuple, make: Callable[[], np.ndarray], filt: str) -> np.ndarray:
        # the maps of every filter are kept while they fit in MAP_CACHE_BYTES (the truth is written
        # filter by filter, then the flats and the science exposures go through the filters again:
        # each map is made once instead of three times); past that, the other filters' maps make room.
        # Detectors are simulated on threads: lookups and inserts under the lock, the map made outside
        # it (two threads may make the same map; it is the same either way)
        key = (*key, filt)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            hit = make()
            with self._lock:
                if sum(a.nbytes for a in self._cache.values()) + hit.nbytes > MAP_CACHE_BYTES:
                    for k in [k for k in self._cache if k[-1] != filt]:
                        del self._cache[k]
                self._cache[key] = hit
        return hit

    def _qe_raw(self, det: Detector, filt: str) -> np.ndarray:
        rng = _rng(self.seed, 2, _filter_code(filt) % 2**32, det.id)
        q = 1.0 + rng.uniform(-QE_CCD_SPREAD, QE_CCD_SPREAD)
        noise = rng.standard_normal((det.ny, det.nx), dtype=np.float32)
        u, v = _fp_grid(self.camera, det)
        vign = 1.0 - VIGNETTING * (u * u + v * v) / self.r_fp ** 2
        return (q * vign * (1.0 + QE_PIXEL_RMS * noise) * self.bad_column_factor(det)).astype(np.float32)

    def qe(self, det: Detector, filt: str) -> np.ndarray:
        """Q_f(x, y): detected per incident electron (not normalised)."""
        return self._cached(("qe", det.id), lambda: self._qe_raw(det, filt), filt)

    def _focal_plane_mean(self, what: str, filt: str, per_det: Callable[[Detector], np.ndarray],
                          pool: ThreadPoolExecutor | None = None) -> float:
        key = (what, filt)
        if key not in self._norms:
            def part(d: Detector) -> tuple[float, int]:
                arr = per_det(d)
                return float(np.sum(arr, dtype=np.float64)), arr.size

            # the detectors' maps on the pool's threads when one is given (the truth's writer, before
            # any detector needs the mean); the sums are added in detector order either way
            dets = self.camera.detectors
            parts = list(pool.map(part, dets)) if pool is not None else [part(d) for d in dets]
            total, count = 0.0, 0
            for part_sum, size in parts:
                total += part_sum
                count += size
            self._norms[key] = total / count
        return self._norms[key]

    def qe_mean(self, filt: str, pool: ThreadPoolExecutor | None = None) -> float:
        """Qbar_f: mean of Q_f over every pixel of the focal plane."""
        return self._focal_plane_mean("qe", filt, lambda d: self.qe(d, filt), pool)

    def flat_reference(self, filt: str, pool: ThreadPoolExecutor | None = None) -> float:
        """rbar_f [ADU per incident e-]: mean of Q_f / g_a over every pixel of the focal plane."""
        return self._focal_plane_mean("rbar", filt, lambda d: self.qe(d, filt) / self.gain_map(d), pool)

    def flat(self, det: Detector, filt: str) -> np.ndarray:
        """R_f(x, y) = (Q_f / g_a) / rbar_f (mean 1 over the focal plane)."""
        return (self.qe(det, filt) / self.gain_map(det) / self.flat_reference(filt)).astype(np.float32)

    def sky_pattern_params(self, filt: str) -> dict[str, Any]:
        rng = _rng(self.seed, 3, _filter_code(filt) % 2**32)
        p = self.camera.pixel_size_mm
        k = SKY_PATTERN_MODES
        lam = np.exp(rng.uniform(*np.log(SKY_PATTERN_WAVELENGTH_PX), k)) * p          # mm
        ang = rng.uniform(0, 2 * np.pi, k)
        amp = SKY_PATTERN_RMS / math.sqrt(k / 2) * rng.uniform(0.5, 1.5, k)
        phase = rng.uniform(0, 2 * np.pi, k)
        xmin, xmax, ymin, ymax = self.bbox
        gx = float(rng.uniform(xmin + 0.2 * (xmax - xmin), xmax - 0.2 * (xmax - xmin)))
        gy = float(rng.uniform(ymin + 0.2 * (ymax - ymin), ymax - 0.2 * (ymax - ymin)))
        r_g = float(rng.uniform(*GHOST_RADIUS_PX)) * p
        out = {"ku": np.cos(ang) / lam, "kv": np.sin(ang) / lam, "amp": amp, "phase": phase,
               "ghost_u": gx, "ghost_v": gy, "ghost_radius_mm": r_g, "ghost_width_mm": GHOST_WIDTH_PX * p,
               "ghost_amplitude": GHOST_AMPLITUDE}
        # the multi-scale terms come from their own nodes, so the waves and ghost above are unchanged
        rng = _rng(self.seed, 3, _filter_code(filt) % 2**32, 1)
        lam_r = rng.uniform(*RIPPLE_WAVELENGTH_MM, RIPPLE_WAVES)                       # mm
        ang_r = rng.uniform(0, 2 * np.pi, RIPPLE_WAVES)
        out.update({"ripple_ku": np.cos(ang_r) / lam_r, "ripple_kv": np.sin(ang_r) / lam_r,
                    "ripple_amp": rng.uniform(*RIPPLE_AMPLITUDE, RIPPLE_WAVES),
                    "ripple_phase": rng.uniform(0, 2 * np.pi, RIPPLE_WAVES)})
        peaks = []
        for _ in range(SKY_PEAKS):
            d = self.camera.detectors[int(rng.integers(0, len(self.camera.detectors)))]
            x, y = rng.uniform(0.1, 0.9) * (d.nx - 1), rng.uniform(0.1, 0.9) * (d.ny - 1)
            pu, pv = self.camera.pixel_to_focal_plane(d, x, y)
            peaks.append({"u": float(pu), "v": float(pv), "amplitude": float(rng.uniform(*SKY_PEAK_AMPLITUDE)),
                          "sigma_mm": float(rng.uniform(*SKY_PEAK_SIGMA_PX)) * p})
        out["peaks"] = peaks
        glow = {}
        for d in self.camera.detectors:
            rng = _rng(self.seed, 3, _filter_code(filt) % 2**32, 2, d.id)
            edges = []
            for edge in ("x0", "x1", "y0", "y1"):
                on, amp_e, scale = rng.uniform() < EDGE_GLOW_PROBABILITY, rng.uniform(*EDGE_GLOW_AMPLITUDE), \
                    rng.uniform(*EDGE_GLOW_SCALE_PX)
                if on:
                    edges.append({"edge": edge, "amplitude": float(amp_e), "scale_px": float(scale)})
            glow[d.name] = edges
        out["edge_glow"] = glow
        return out

    def _sky_raw(self, det: Detector, filt: str) -> np.ndarray:
        par = self.sky_pattern_params(filt)
        (u0, ux, uy), (v0, vx, vy) = _fp_affine(self.camera, det)
        ku, kv = par["ku"], par["kv"]
        # cos(2 pi (ku u + kv v) + psi) with u, v affine in (x, y): a plane wave in pixel coordinates
        kx, ky = ku * ux + kv * vx, ku * uy + kv * vy
        phase = par["phase"] + 2 * np.pi * (ku * u0 + kv * v0)
        out = 1.0 + _plane_waves(det.nx, det.ny, kx, ky, phase, par["amp"])
        xmin, xmax, ymin, ymax = self.camera.detector_corners_mm(det)
        reach = par["ghost_radius_mm"] + 6 * par["ghost_width_mm"]
        if (xmin - reach < par["ghost_u"] < xmax + reach) and (ymin - reach < par["ghost_v"] < ymax + reach):
            u, v = _fp_grid(self.camera, det)
            rho = np.hypot(u - par["ghost_u"], v - par["ghost_v"])
            out += par["ghost_amplitude"] * np.exp(-0.5 * ((rho - par["ghost_radius_mm"]) / par["ghost_width_mm"]) ** 2)
        ku, kv = par["ripple_ku"], par["ripple_kv"]
        out += _plane_waves(det.nx, det.ny, ku * ux + kv * vx, ku * uy + kv * vy,
                            par["ripple_phase"] + 2 * np.pi * (ku * u0 + kv * v0), par["ripple_amp"])
        for pk in par["peaks"]:
            reach = 7 * pk["sigma_mm"]
            if (xmin - reach < pk["u"] < xmax + reach) and (ymin - reach < pk["v"] < ymax + reach):
                u, v = _fp_grid(self.camera, det)
                out += pk["amplitude"] * np.exp(-0.5 * ((u - pk["u"]) ** 2 + (v - pk["v"]) ** 2) / pk["sigma_mm"] ** 2)
        for g in par["edge_glow"][det.name]:
            n = det.nx if g["edge"][0] == "x" else det.ny
            d = np.arange(n, dtype=np.float64)
            if g["edge"][1] == "1":
                d = d[::-1]
            prof = g["amplitude"] * np.exp(-d / g["scale_px"])
            out += prof[None, :] if g["edge"][0] == "x" else prof[:, None]
        return out.astype(np.float32)

    def sky_norm(self, filt: str, pool: ThreadPoolExecutor | None = None) -> float:
        """N_P: the focal-plane mean of the unnormalised sky pattern.

        The unnormalised maps made for it are kept, while they fit in :data:`MAP_CACHE_BYTES`, and
        become the normalised maps :meth:`sky` returns (divided as it divides them), instead of being
        made a second time."""
        kept: dict[int, np.ndarray] = {}

        def raw(d: Detector) -> np.ndarray:
            arr = self._sky_raw(d, filt)
            with self._lock:
                if sum(a.nbytes for a in kept.values()) + arr.nbytes <= MAP_CACHE_BYTES:
                    kept[d.id] = arr
            return arr

        norm = self._focal_plane_mean("sky", filt, raw, pool)
        for d in self.camera.detectors:
            if d.id in kept:
                arr = kept.pop(d.id)
                arr /= np.float32(norm)
                self._cached(("sky", d.id), lambda arr=arr: arr, filt)
        return norm

    def sky(self, det: Detector, filt: str) -> np.ndarray:
        """P_f(x, y): the small-scale sky pattern (mean 1 over the focal plane)."""
        def make():
            norm = np.float32(self.sky_norm(filt))
            raw = self._sky_raw(det, filt)
            raw /= norm
            return raw
        return self._cached(("sky", det.id), make, filt)

    def fringe(self, det: Detector, filt: str) -> np.ndarray:
        """F_f(x, y): the fringe pattern per unit sky level (zeros for non-fringing filters)."""
        if filt not in FRINGE_FILTERS:
            return np.zeros((det.ny, det.nx), dtype=np.float32)

        def make():
            rng = _rng(self.seed, 4, _filter_code(filt) % 2**32, det.id)
            k = FRINGE_WAVES
            lam = rng.uniform(*FRINGE_WAVELENGTH_PX, k)
            ang = rng.uniform(0, 2 * np.pi, k)
            waves = _plane_waves(det.nx, det.ny, np.cos(ang) / lam, np.sin(ang) / lam,
                                 rng.uniform(0, 2 * np.pi, k), np.ones(k))
            lam_e = rng.uniform(400.0, 1000.0)
            ang_e = rng.uniform(0, 2 * np.pi)
            env = 1.0 + 0.5 * _plane_waves(det.nx, det.ny, np.array([np.cos(ang_e) / lam_e]),
                                           np.array([np.sin(ang_e) / lam_e]), rng.uniform(0, 2 * np.pi, 1),
                                           np.ones(1))
            f = waves * env
            f -= f.mean(dtype=np.float64)
            f *= rng.uniform(*FRINGE_RMS) / f.std(dtype=np.float64)
            return f.astype(np.float32)
        return self._cached(("fringe", det.id), make, filt)

    def summary(self, filters: Sequence[str]) -> dict[str, Any]:
        """JSON-ready description of the fixed instrument parameters."""
        dets = {}
        for d in self.camera.detectors:
            s = self._static[d.id]
            dets[d.name] = {
                "id": d.id, "bias_levels_adu": s["bias_levels"], "bias_gradient_adu": list(s["bias_gradient"]),
                "dark_mean_e_per_s": s["dark_mean"], "n_hot_pixels": int(len(s["hot_index"])),
                "bad_columns": s["bad_columns"],
                "gains": {lay.amp.name: lay.gain for lay in self.layouts[d.id]},
                "nominal_gains": {lay.amp.name: float(lay.amp.gain) for lay in self.layouts[d.id]},
                "read_noise_e": {lay.amp.name: float(lay.amp.read_noise) for lay in self.layouts[d.id]},
            }
            if "cold_index" in s:
                dets[d.name]["n_cold_pixels"] = int(len(s["cold_index"]))
                dets[d.name]["hot_columns"] = s["hot_columns"]
        sky = {}
        for f in filters:
            par = self.sky_pattern_params(f)
            sky[f] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in par.items()}
            sky[f]["model"] = ("P = (1 + waves(amp, ku, kv, phase) + ghost + ripples(ripple_*) + peaks "
                               "+ edge_glow) / sky_norm")
        return {"camera": self.camera.name, "seed": self.seed, "gain_error": self.gain_error,
                "pixel_defects": self.pixel_defects, "defect_bits": DEFECT_BITS, "r_fp_mm": self.r_fp,
                "vignetting": VIGNETTING,
                "focal_plane_bbox_mm": list(self.bbox), "detectors": dets, "sky_pattern": sky,
                "fringe_filters": [f for f in filters if f in FRINGE_FILTERS]}


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatedExposure:
    """One raw file written by :func:`simulate_night`."""

    exposure_id: str
    obs_type: str
    filter: str
    exptime: float
    darktime: float
    date_obs: str
    path: Path


@dataclass
class SimulatedNight:
    """What :func:`simulate_night` wrote: the raw files and accessors for the truth.

    Attributes
    ----------
    out_dir
        The output folder (``raw/`` and ``truth/`` inside).
    camera
        The camera simulated.
    seed, night
        The seed and the observing night.
    exposures
        One :class:`SimulatedExposure` per raw file, in time order.
    detectors
        Names of the detectors written.
    filters
        Filters of the flats and science exposures.
    """

    out_dir: Path
    camera: Camera
    seed: int
    night: dt.date
    exposures: list[SimulatedExposure]
    detectors: list[str]
    filters: list[str]
    _exposure_truth: dict[str, dict] | None = field(default=None, repr=False)
    first_sequence: int = 0

    @property
    def summary(self) -> dict[str, int]:
        """Number of raw files per observation type (and ``total``)."""
        counts = Counter(e.obs_type for e in self.exposures)
        return {**{k: counts.get(k, 0) for k in ("bias", "dark", "flat", "science")}, "total": len(self.exposures)}

    @property
    def truth_dir(self) -> Path:
        return self.out_dir / "truth"

    def paths(self, obs_type: str | None = None, filter: str | None = None) -> list[Path]:
        """Raw paths, optionally of one type and/or filter."""
        return [e.path for e in self.select(obs_type, filter)]

    def select(self, obs_type: str | None = None, filter: str | None = None) -> list[SimulatedExposure]:
        return [e for e in self.exposures
                if (obs_type is None or e.obs_type == obs_type) and (filter is None or e.filter == filter)]

    def _det_name(self, detector: int | str | Detector) -> str:
        if isinstance(detector, Detector):
            return detector.name
        return self.camera.detector(detector).name

    def truth_path(self, kind: str, detector: int | str | Detector, filter: str | None = None) -> Path:
        """Path of a truth image: kind in bias, dark, flat, qe, sky, fringe."""
        name = self._det_name(detector)
        if kind in ("bias", "dark"):
            return self.truth_dir / f"{kind}_{name}.fits"
        if filter is None:
            raise ValueError(f"truth {kind!r} needs a filter")
        return self.truth_dir / f"{kind}_{filter}_{name}.fits"

    def _load(self, kind: str, detector, filter: str | None = None) -> np.ndarray:
        path = self.truth_path(kind, detector, filter)
        if kind == "fringe" and not path.exists():
            det = self.camera.detector(self._det_name(detector))
            return np.zeros((det.ny, det.nx), dtype=np.float32)
        return fits.getdata(path).astype(np.float32)

    def truth_defects(self, detector) -> np.ndarray:
        """Injected bad pixels (int16, OR of :data:`DEFECT_BITS`; 0 = good)."""
        return fits.getdata(self.truth_dir / f"defects_{self._det_name(detector)}.fits").astype(np.int16)

    def true_gains(self, detector) -> dict[str, float]:
        """{amplifier: true gain (e-/ADU)} (the camera file's unless ``gain_error``)."""
        return dict(self.static_truth["detectors"][self._det_name(detector)]["gains"])

    def truth_bias(self, detector) -> np.ndarray:
        """B [ADU], shape (ny, nx)."""
        return self._load("bias", detector)

    def truth_dark(self, detector) -> np.ndarray:
        """Dark rate [ADU per second of DARKTIME]."""
        return self._load("dark", detector)

    def truth_flat(self, filter: str, detector) -> np.ndarray:
        """R_f (mean 1 over the focal plane); a flat reads ADU = lamp_level * flat_reference * R_f."""
        return self._load("flat", detector, filter)

    def truth_qe(self, filter: str, detector) -> np.ndarray:
        """Q_f / Qbar_f: the response in electrons, mean 1 over the focal plane."""
        return self._load("qe", detector, filter)

    def truth_sky(self, filter: str, detector) -> np.ndarray:
        """P_f, the small-scale sky pattern (mean 1 over the focal plane)."""
        return self._load("sky", detector, filter)

    def truth_fringe(self, filter: str, detector) -> np.ndarray:
        """F_f per unit sky level (zeros for non-fringing filters)."""
        return self._load("fringe", detector, filter)

    def flat_reference(self, filter: str) -> float:
        """rbar_f [ADU per incident e-]."""
        return float(self.static_truth["flat_reference"][filter])

    @property
    def static_truth(self) -> dict[str, Any]:
        with open(self.truth_dir / "static.json") as fh:
            return json.load(fh)

    def exposure_truth(self, exposure_id: str) -> dict[str, Any]:
        """The entry of ``exposures.json`` for one exposure."""
        if self._exposure_truth is None:
            with open(self.truth_dir / "exposures.json") as fh:
                self._exposure_truth = {e["exposure_id"]: e for e in json.load(fh)}
        return self._exposure_truth[exposure_id]

    def gradient(self, exposure_id: str, detector) -> np.ndarray:
        """G_j(u, v) of a science exposure on one detector (dimensionless, float32)."""
        g = self.exposure_truth(exposure_id)["gradient"]
        det = self.camera.detector(self._det_name(detector))
        u, v = _fp_grid(self.camera, det)
        c, s = math.cos(g["theta"]), math.sin(g["theta"])
        w = (u * c + v * s) / g["r_fp_mm"]
        wp = (-u * s + v * c) / g["r_fp_mm"]
        return (1.0 + g["c1"] * w + g["c2"] * w * w + g.get("c3", 0.0) * wp * wp).astype(np.float32)

    def defect(self, exposure_id: str) -> str | None:
        """``"cloud"``, ``"trail"``, ``"glow"`` for a bad science exposure, None otherwise."""
        return self.exposure_truth(exposure_id).get("defect")

    def defect_maps(self, exposure_id: str, detector) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(M_j, A_j) of a science exposure on one detector: the multiplicative sky factor of a
        cloud, the additive light (in units of S_j) of a trail or glow; None where absent."""
        t = self.exposure_truth(exposure_id)
        det = self.camera.detector(self._det_name(detector))
        return defect_maps(self.camera, det, t.get("defect"), t.get("defect_params"))

    def sky_model(self, exposure_id: str, detector, fringe: bool = True, defects: bool = True) -> np.ndarray:
        """Incident sky of a science exposure [e- per pixel]: S_j (G_j P_f M_j + phi_j F_f + A_j)
        (M_j = 1, A_j = 0 for good exposures or ``defects=False``).

        Multiply by ``flat_reference(filter) * truth_flat(filter, det)`` for ADU in the raw data.
        """
        t = self.exposure_truth(exposure_id)
        sky = self.gradient(exposure_id, detector) * self.truth_sky(t["filter"], detector)
        if defects and t.get("defect"):
            mult, add = self.defect_maps(exposure_id, detector)
            if mult is not None:
                sky *= mult
            if add is not None:
                sky += add
        if fringe and t.get("fringe_scale"):
            sky += t["fringe_scale"] * self.truth_fringe(t["filter"], detector)
        return (t["sky_level"] * sky).astype(np.float32)

    def bias_level(self, detector, amp: str) -> float:
        """b_a [ADU] of an amplifier."""
        return float(self.static_truth["detectors"][self._det_name(detector)]["bias_levels_adu"][amp])

    @classmethod
    def load(cls, out_dir: str | Path) -> "SimulatedNight":
        """Reopen a night written earlier (reads ``truth/night.json``)."""
        out_dir = Path(out_dir)
        with open(out_dir / "truth" / "night.json") as fh:
            d = json.load(fh)
        copy = out_dir / "truth" / "camera.yaml"
        camera = load_camera(copy) if copy.exists() else load_camera(d["camera"])
        exps = [SimulatedExposure(exposure_id=e["exposure_id"], obs_type=e["obs_type"], filter=e["filter"],
                                  exptime=e["exptime"], darktime=e["darktime"], date_obs=e["date_obs"],
                                  path=out_dir / e["path"]) for e in d["exposures"]]
        return cls(out_dir=out_dir, camera=camera, seed=d["seed"], night=dt.date.fromisoformat(d["night"]),
                   exposures=exps, detectors=d["detectors"], filters=d["filters"],
                   first_sequence=d.get("first_sequence", 0))

    def __str__(self) -> str:
        s = self.summary
        return (f"{self.camera.name} night {self.night} (seed {self.seed}) in {self.out_dir}: "
                f"{s['bias']} bias, {s['dark']} dark, {s['flat']} flat, {s['science']} science "
                f"({len(self.detectors)} detectors, filters {', '.join(self.filters)})")


# --------------------------------------------------------------------------------------------------
# Exposure plan
# --------------------------------------------------------------------------------------------------


@dataclass
class _Planned:
    seq: int
    exposure_id: str
    obs_type: str
    filter: str
    exptime: float
    darktime: float
    start: dt.datetime       # UTC


def _plan(night: dt.date, utc_offset: float, n_bias: int, n_dark: int, n_flat: int, n_science: int,
          filters: Sequence[str], dark_exptime: float, flat_exptime: float,
          science_exptime: float, first_sequence: int = 0, ptc_exptimes: Sequence[float] = ()) -> list[_Planned]:
    """Calibrations from 14:30 local time, science from 19:00 to 05:30 local time; sequence numbers
    ``first_sequence + 1, first_sequence + 2, ...``."""
    tz_local = dt.timedelta(hours=utc_offset)
    t = dt.datetime.combine(night, dt.time(14, 30), tzinfo=dt.timezone.utc) - tz_local
    items: list[tuple[str, str, float]] = []
    items += [("bias", "NONE", 0.0)] * n_bias
    items += [("dark", "NONE", dark_exptime)] * n_dark
    for f in filters:
        items += [("flat", f, flat_exptime)] * n_flat
    for t_ptc in ptc_exptimes:                # PTC pairs: two flats of each exposure time, first filter
        items += [("flat", filters[0], float(t_ptc))] * 2
    science = [("science", f, science_exptime) for f in filters for _ in range(n_science)]
    out: list[_Planned] = []
    seq = int(first_sequence)

    def add(kind, filt, exptime, start):
        nonlocal seq
        seq += 1
        out.append(_Planned(seq=seq, exposure_id=f"{night:%Y%m%d}{seq:04d}", obs_type=kind, filter=filt,
                            exptime=float(exptime), darktime=0.0 if kind == "bias" else float(exptime),
                            start=start))

    for kind, filt, exptime in items:
        add(kind, filt, exptime, t)
        t = t + dt.timedelta(seconds=exptime + READOUT_S)
    if science:
        t0 = dt.datetime.combine(night, dt.time(19, 0), tzinfo=dt.timezone.utc) - tz_local
        window = 10.5 * 3600.0
        step = max(window / len(science), science_exptime + READOUT_S)
        if step * len(science) > 16.5 * 3600.0:
            raise ValueError(f"{len(science)} science exposures of {science_exptime} s do not fit in one night")
        for i, (kind, filt, exptime) in enumerate(science):
            add(kind, filt, exptime, t0 + dt.timedelta(seconds=round(i * step)))
    return out


# --------------------------------------------------------------------------------------------------
# Per-exposure focal-plane draws (objects, sky, gradient)
# --------------------------------------------------------------------------------------------------


def _choose_defects(plan: list[_Planned], filters: Sequence[str], bad: Sequence[str], seed: int,
                    first_sequence: int) -> dict[int, str]:
    """Sequence number -> defect: per filter, one science exposure per entry of ``bad``, drawn
    without replacement from all but the filter's first."""
    out: dict[int, str] = {}
    if not bad:
        return out
    for f in filters:
        seqs = [p.seq for p in plan if p.obs_type == "science" and p.filter == f]
        rng = _rng(seed, _BAD_KEY, first_sequence, _filter_code(f) % 2**32)
        picks = rng.choice(np.arange(1, len(seqs)), size=len(bad), replace=False)
        for kind, k in zip(bad, picks):
            out[seqs[int(k)]] = kind
    return out


def _power_law(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float = 1.5) -> np.ndarray:
    """Fluxes with N(>F) ~ F**-slope between lo and hi."""
    u = rng.uniform(size=n)
    return lo * (1.0 - u * (1.0 - (lo / hi) ** slope)) ** (-1.0 / slope)


def _gradient_draw(rng: np.random.Generator, rng2: np.random.Generator, amplitude: float | None,
                   r_fp: float) -> dict[str, Any]:
    """The gradient record of one science exposure (see the module docstring)."""
    # the legacy draws are always made, so the rest of the exposure's stream does not depend on amplitude
    theta = float(rng.uniform(0, 2 * np.pi))
    c1, c2, c3 = float(rng.uniform(*GRADIENT_C1)), float(rng.uniform(*GRADIENT_C2)), 0.0
    if amplitude is not None:
        theta = float(rng2.uniform(0, 2 * np.pi))
        bound = float(amplitude * rng2.uniform(*GRADIENT_FRACTION))
        a1 = rng2.uniform(0.3, 1.0)
        a2, a3 = rng2.uniform(-GRADIENT_QUAD_SHARE, GRADIENT_QUAD_SHARE, 2)
        k = bound / (a1 + max(abs(a2), abs(a3)))
        c1, c2, c3 = float(k * a1), float(k * a2), float(k * a3)
    return {"theta": theta, "c1": c1, "c2": c2, "c3": c3, "r_fp_mm": r_fp,
            "max_abs_bound": c1 + max(abs(c2), abs(c3)), "amplitude": amplitude,
            "model": "G = 1 + c1*w + c2*w**2 + c3*w_perp**2, w = (u cos(theta) + v sin(theta))/r_fp_mm, "
                     "w_perp = (-u sin(theta) + v cos(theta))/r_fp_mm"}


def _defect_draw(rng: np.random.Generator, inst: InstrumentTruth, kind: str) -> dict[str, Any]:
    """Parameters of a bad exposure's defect (see the module docstring); every length in mm."""
    camera = inst.camera
    pix = camera.pixel_size_mm
    xmin, xmax, ymin, ymax = inst.bbox
    if kind == "cloud":
        lam = np.exp(rng.uniform(*np.log(CLOUD_WAVELENGTH_PX), CLOUD_WAVES)) * pix
        ang = rng.uniform(0, 2 * np.pi, CLOUD_WAVES)
        w = rng.uniform(0.5, 1.5, CLOUD_WAVES)
        rms = float(rng.uniform(*CLOUD_RMS))
        amp = rms * w / np.sqrt(np.sum(w * w) / 2.0)         # sum amp**2 / 2 = rms**2
        return {"rms": rms, "ku": (np.cos(ang) / lam).tolist(), "kv": (np.sin(ang) / lam).tolist(),
                "amp": amp.tolist(), "phase": rng.uniform(0, 2 * np.pi, CLOUD_WAVES).tolist()}
    if kind == "trail":
        u0 = float(rng.uniform(xmin + 0.2 * (xmax - xmin), xmax - 0.2 * (xmax - xmin)))
        v0 = float(rng.uniform(ymin + 0.2 * (ymax - ymin), ymax - 0.2 * (ymax - ymin)))
        return {"u0": u0, "v0": v0, "angle": float(rng.uniform(0, np.pi)),
                "core_sigma_mm": float(rng.uniform(*TRAIL_CORE_SIGMA_PX)) * pix,
                "core_peak": float(rng.uniform(*TRAIL_CORE_PEAK)),
                "wing_sigma_mm": float(rng.uniform(*TRAIL_WING_SIGMA_PX)) * pix,
                "wing_peak": float(rng.uniform(*TRAIL_WING_PEAK))}
    if kind == "glow":
        scale = float(rng.uniform(*GLOW_SCALE_PX)) * pix
        return {"u0": float(rng.uniform(xmin - scale / 2, xmax + scale / 2)),
                "v0": float(rng.uniform(ymin - scale / 2, ymax + scale / 2)),
                "scale_mm": scale, "peak": float(rng.uniform(*GLOW_PEAK))}
    raise ValueError(f"unknown defect {kind!r}; expected one of {DEFECTS}")


def defect_maps(camera: Camera, det: Detector, defect: str | None,
                params: dict[str, Any] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(M_j, A_j) of a science exposure on one detector: the multiplicative sky factor (cloud) and
    the additive light in units of the sky level S_j (trail, glow); None where the exposure has none.
    float32, shape (ny, nx); ``defect``/``params`` are the ``defect``/``defect_params`` of its record."""
    if defect is None:
        return None, None
    if defect == "cloud":
        (u0, ux, uy), (v0, vx, vy) = _fp_affine(camera, det)
        ku, kv = np.asarray(params["ku"]), np.asarray(params["kv"])
        phase = np.asarray(params["phase"]) + 2 * np.pi * (ku * u0 + kv * v0)
        m = 1.0 + _plane_waves(det.nx, det.ny, ku * ux + kv * vx, ku * uy + kv * vy, phase, np.asarray(params["amp"]))
        return m.astype(np.float32), None
    u, v = _fp_grid(camera, det)
    if defect == "trail":
        a = params["angle"]
        d = -(u - params["u0"]) * math.sin(a) + (v - params["v0"]) * math.cos(a)
        add = (params["core_peak"] * np.exp(-0.5 * (d / params["core_sigma_mm"]) ** 2)
               + params["wing_peak"] * np.exp(-0.5 * (d / params["wing_sigma_mm"]) ** 2))
        return None, add.astype(np.float32)
    if defect == "glow":
        r2 = ((u - params["u0"]) ** 2 + (v - params["v0"]) ** 2) / params["scale_mm"] ** 2
        return None, (params["peak"] / (1.0 + r2)).astype(np.float32)
    raise ValueError(f"unknown defect {defect!r}")


def _exposure_draws(inst: InstrumentTruth, p: _Planned, seed: int, flat_exptime: float,
                    science_exptime: float, gradient_amplitude: float | None = None,
                    defect: str | None = None) -> dict[str, Any]:
    rng = _rng(seed, _EXP_KEY, p.seq)
    camera = inst.camera
    out: dict[str, Any] = {}
    if p.obs_type == "flat":
        # the lamp level follows the flat's own exposure time (PTC pairs differ from flat_exptime)
        out["lamp_level"] = float(FLAT_LEVEL * p.exptime / 5.0 * (1 + rng.uniform(-FLAT_LAMP_JITTER, FLAT_LAMP_JITTER)))
    if p.obs_type != "science":
        return out
    lo, hi = SKY_LEVELS.get(p.filter, DEFAULT_SKY_LEVEL)
    out["sky_level"] = float(rng.uniform(lo, hi) * science_exptime / 120.0)
    out["fringe_scale"] = float(rng.uniform(*FRINGE_SCALE)) if p.filter in FRINGE_FILTERS else 0.0
    out["fringe_amplitude"] = out["sky_level"] * out["fringe_scale"]
    # new draws come from child nodes of the exposure's, so the legacy stream (objects...) is unchanged
    out["gradient"] = _gradient_draw(rng, _rng(seed, _EXP_KEY, p.seq, 1), gradient_amplitude, inst.r_fp)
    out["defect"] = defect
    out["defect_params"] = None if defect is None else _defect_draw(_rng(seed, _EXP_KEY, p.seq, 2), inst, defect)
    out["fwhm_px"] = float(rng.uniform(*FWHM_PX))
    out["airmass"] = float(rng.uniform(1.0, 1.8))
    xmin, xmax, ymin, ymax = inst.bbox
    pix = camera.pixel_size_mm
    area_mpx = (xmax - xmin) * (ymax - ymin) / pix ** 2 / 1e6
    n_star = int(rng.poisson(STAR_DENSITY * area_mpx))
    n_gal = int(rng.poisson(GALAXY_DENSITY * area_mpx))
    stars = {"kind": "star", "u": rng.uniform(xmin, xmax, n_star), "v": rng.uniform(ymin, ymax, n_star),
             "flux": _power_law(rng, n_star, *STAR_FLUX)}
    gals = {"kind": "galaxy", "u": rng.uniform(xmin, xmax, n_gal), "v": rng.uniform(ymin, ymax, n_gal),
            "flux": _power_law(rng, n_gal, *GALAXY_FLUX), "scale": rng.uniform(*GALAXY_SCALE_PX, n_gal),
            "q": rng.uniform(0.3, 1.0, n_gal), "angle": rng.uniform(0, np.pi, n_gal)}
    n_sat = int(2 + rng.integers(0, 4))
    su, sv = [], []
    for _ in range(n_sat):
        d = camera.detectors[int(rng.integers(0, len(camera.detectors)))]
        x, y = rng.uniform(20, d.nx - 20), rng.uniform(20, d.ny - 20)
        uu, vv = camera.pixel_to_focal_plane(d, x, y)
        su.append(float(uu))
        sv.append(float(vv))
    bright = {"kind": "star", "u": np.array(su), "v": np.array(sv),
              "flux": np.exp(rng.uniform(*np.log(SATURATED_STAR_FLUX), n_sat))}
    out["objects"] = [stars, gals, bright]
    return out


def _stamps(kind: str, dx: np.ndarray, dy: np.ndarray, r: int, fwhm: float,
            group: dict[str, np.ndarray], sel: np.ndarray) -> np.ndarray:
    """Unit-sum stamps (K, 2r+1, 2r+1); dx, dy are the sub-pixel offsets of the centres."""
    g = np.arange(-r, r + 1, dtype=np.float64)
    xx = g[None, None, :] - dx[:, None, None]
    yy = g[None, :, None] - dy[:, None, None]
    if kind == "star":
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / MOFFAT_BETA) - 1.0))
        img = (1.0 + (xx * xx + yy * yy) / alpha ** 2) ** (-MOFFAT_BETA)
    else:
        c, s = np.cos(group["angle"][sel]), np.sin(group["angle"][sel])
        a = xx * c[:, None, None] + yy * s[:, None, None]
        b = (-xx * s[:, None, None] + yy * c[:, None, None]) / group["q"][sel][:, None, None]
        img = np.exp(-np.sqrt(a * a + b * b) / group["scale"][sel][:, None, None])
    img /= img.sum(axis=(1, 2), keepdims=True)
    return img


def _render_objects(camera: Camera, det: Detector, draws: dict[str, Any]) -> tuple[np.ndarray, list[dict]]:
    """Incident electrons of the exposure's stars and galaxies on one detector, and their listing."""
    img = np.zeros((det.ny, det.nx), dtype=np.float32)
    listing: list[dict] = []
    for gi, group in enumerate(draws["objects"]):
        if len(group["u"]) == 0:
            continue
        x, y = camera.focal_plane_to_pixel(det, group["u"], group["v"])
        r = GALAXY_STAMP_RADIUS if group["kind"] == "galaxy" else (BRIGHT_STAMP_RADIUS if gi == 2 else STAR_STAMP_RADIUS)
        sel = np.nonzero((x > -r) & (x < det.nx - 1 + r) & (y > -r) & (y < det.ny - 1 + r))[0]
        if sel.size == 0:
            continue
        ix, iy = np.rint(x[sel]).astype(int), np.rint(y[sel]).astype(int)
        st = _stamps(group["kind"], x[sel] - ix, y[sel] - iy, r, draws["fwhm_px"], group, sel)
        st *= group["flux"][sel][:, None, None]
        for k in range(sel.size):
            x0, y0 = ix[k] - r, iy[k] - r
            xa, ya = max(x0, 0), max(y0, 0)
            xb, yb = min(x0 + 2 * r + 1, det.nx), min(y0 + 2 * r + 1, det.ny)
            if xa >= xb or ya >= yb:
                continue
            img[ya:yb, xa:xb] += st[k, ya - y0:yb - y0, xa - x0:xb - x0]
            on = (-0.5 <= x[sel[k]] < det.nx - 0.5) and (-0.5 <= y[sel[k]] < det.ny - 0.5)
            if on:
                listing.append({"kind": group["kind"], "fx_mm": round(float(group["u"][sel[k]]), 5),
                                "fy_mm": round(float(group["v"][sel[k]]), 5), "detector": det.name,
                                "x": round(float(x[sel[k]]), 3), "y": round(float(y[sel[k]]), 3),
                                "flux": round(float(group["flux"][sel[k]]), 2), "saturated": None,
                                "_ix": int(ix[k]), "_iy": int(iy[k])})
    return img, listing


def _cosmic_rays(rng: np.random.Generator, det: Detector, darktime: float, electrons: np.ndarray) -> int:
    n = int(rng.poisson(CR_RATE * det.nx * det.ny * darktime / 100.0))
    if n == 0:
        return 0
    x0, y0 = rng.uniform(0, det.nx, n), rng.uniform(0, det.ny, n)
    length = rng.integers(1, 5, n)
    ang = rng.uniform(0, np.pi, n)
    energy = CR_ENERGY_MEDIAN * np.exp(rng.normal(0.0, 0.5, n))
    for step in range(4):
        m = length > step
        xs = np.clip(np.floor(x0[m] + step * np.cos(ang[m])).astype(int), 0, det.nx - 1)
        ys = np.clip(np.floor(y0[m] + step * np.sin(ang[m])).astype(int), 0, det.ny - 1)
        np.add.at(electrons, (ys, xs), (energy[m] / length[m]).astype(np.float32))
    return n


def _noisy_electrons(rng: np.random.Generator, lam: np.ndarray, gauss_above: float | None) -> np.ndarray:
    """Poisson draws of expected counts ``lam`` (a rounded Gaussian where ``lam >= gauss_above``)."""
    lam = np.maximum(lam, 0, dtype=np.float32)
    if gauss_above is None:
        return rng.poisson(lam).astype(np.float32)
    low = np.flatnonzero(lam < gauss_above)
    if low.size > lam.size // 2:
        out = rng.poisson(lam).astype(np.float32)
        high = np.flatnonzero(lam >= gauss_above)
        out.flat[high] = np.rint(lam.flat[high] + np.sqrt(lam.flat[high]) * rng.standard_normal(high.size, dtype=np.float32))
        return out
    out = rng.standard_normal(lam.shape, dtype=np.float32)
    out *= np.sqrt(lam)
    out += lam
    np.rint(out, out=out)
    out.flat[low] = rng.poisson(lam.flat[low])
    return out


def _row_drift(rng: np.random.Generator, ny_raw: int) -> np.ndarray:
    walk = np.cumsum(rng.normal(0.0, DRIFT_WALK_STEP, ny_raw))
    walk -= walk.mean()
    period = rng.uniform(100.0, 400.0)
    sine = DRIFT_SINE * np.sin(2 * np.pi * np.arange(ny_raw) / period + rng.uniform(0, 2 * np.pi))
    return (rng.normal(0.0, DRIFT_OFFSET_RMS) + walk + sine).astype(np.float32)


def _uncovered(layouts: list[_AmpLayout]) -> bool:
    """Whether some raw pixels belong to no amplifier section (they are written as 0)."""
    ny, nx = _raw_shape(layouts)
    area = sum(sec.nx * sec.ny for lay in layouts for sec in (lay.data, lay.overscan, lay.prescan) if sec is not None)
    return area != nx * ny


def _simulate_detector(inst: InstrumentTruth, det: Detector, p: _Planned, draws: dict[str, Any], seed: int,
                       gauss_above: float | None) -> tuple[list[tuple[int | str, np.ndarray]], dict[str, Any]]:
    """Raw uint16 pixels of one detector of one exposure, as ``[(hdu, pixels)]`` (one entry per HDU:
    the detector's, or one per amplifier), and its truth record."""
    camera = inst.camera
    rng = _rng(seed, _PIX_KEY, p.seq, det.id)
    rec: dict[str, Any] = {}
    listing: list[dict] = []
    if p.obs_type == "bias":
        lam = None
    else:
        lam = inst.dark_electrons(det) * np.float32(p.darktime)
        if p.obs_type == "flat":
            lam += np.float32(draws["lamp_level"]) * inst.qe(det, p.filter)
        elif p.obs_type == "science":
            g = draws["gradient"]
            (u0, ux, uy), (v0, vx, vy) = _fp_affine(camera, det)
            c, s = math.cos(g["theta"]), math.sin(g["theta"])
            wx = (ux * c + vx * s) * np.arange(det.nx, dtype=np.float32) / inst.r_fp
            wy = ((u0 * c + v0 * s) + (uy * c + vy * s) * np.arange(det.ny, dtype=np.float32)) / inst.r_fp
            w = wy[:, None] + wx[None, :]
            gmap = 1.0 + w * (g["c1"] + g["c2"] * w)
            if g.get("c3"):
                px = (-ux * s + vx * c) * np.arange(det.nx, dtype=np.float32) / inst.r_fp
                py = ((-u0 * s + v0 * c) + (-uy * s + vy * c) * np.arange(det.ny, dtype=np.float32)) / inst.r_fp
                wp = py[:, None] + px[None, :]
                gmap += np.float32(g["c3"]) * wp * wp
            incident = gmap * inst.sky(det, p.filter)
            mult, add = defect_maps(camera, det, draws.get("defect"), draws.get("defect_params"))
            if mult is not None:
                incident *= mult
            if add is not None:
                incident += add
            incident *= np.float32(draws["sky_level"])
            if draws["fringe_amplitude"]:
                incident += np.float32(draws["fringe_amplitude"]) * inst.fringe(det, p.filter)
            objects, listing = _render_objects(camera, det, draws)
            incident += objects
            lam += incident * inst.qe(det, p.filter)
        rec["cosmic_rays"] = _cosmic_rays(rng, det, p.darktime, lam) if p.darktime > 0 else 0
    electrons = None if lam is None else _noisy_electrons(rng, lam, gauss_above)

    layouts = inst.layouts[det.id]
    bias2d = inst.bias(det)
    offsets = {}
    hdus: list[tuple[int | str, np.ndarray]] = []
    for hdu, group in _hdu_groups(layouts):
        ny_raw, nx_raw = _raw_shape(group)
        # raw starts as unit read noise and is scaled and offset region by region, in place
        raw = rng.standard_normal((ny_raw, nx_raw), dtype=np.float32)
        covered = np.zeros((ny_raw, nx_raw), dtype=bool) if _uncovered(group) else None
        for lay in group:
            level = np.float32(inst.bias_level(det, lay.amp.name))
            drift = _row_drift(rng, ny_raw)
            offsets[lay.amp.name] = round(float(drift[lay.data.y0:lay.data.y1].mean()), 4)
            for sec in (lay.prescan, lay.overscan, lay.data):
                if sec is not None:
                    ys, xs = sec.slices
                    block = raw[ys, xs]
                    block *= np.float32(lay.rn_adu)
                    block += (drift[ys] + level)[:, None]
                    if covered is not None:
                        covered[ys, xs] = True
            ys, xs = lay.data.slices
            block = raw[ys, xs]
            block += lay.to_raw(bias2d[lay.det.slices])
            if electrons is not None:
                block += lay.to_raw(electrons[lay.det.slices]) * np.float32(1.0 / lay.gain)
            np.rint(block, out=block)
            np.minimum(block, np.float32(lay.amp.saturation), out=block)
        if covered is not None:
            raw[~covered] = 0.0
        hdus.append((hdu, raw))
    rec["bias_offset"] = offsets
    if listing:
        for obj in listing:
            ix, iy = obj.pop("_ix"), obj.pop("_iy")
            if not (0 <= ix < det.nx and 0 <= iy < det.ny):
                continue
            lay = next(lay for lay in layouts if lay.det.x0 <= ix < lay.det.x1 and lay.det.y0 <= iy < lay.det.y1)
            peak = float(lam[max(iy - 1, 0):iy + 2, max(ix - 1, 0):ix + 2].max()) / lay.gain
            obj["saturated"] = bool(peak + inst.bias_level(det, lay.amp.name) >= lay.amp.saturation)
        rec["objects"] = listing
    out = []
    for hdu, raw in hdus:
        np.rint(raw, out=raw)
        np.clip(raw, 0, 65535, out=raw)
        out.append((hdu, raw.astype(np.uint16)))
    return out, rec


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _primary_header(camera: Camera, p: _Planned, draws: dict[str, Any], seed: int, moon: float) -> fits.Header:
    h = fits.Header()
    obj = {"bias": "bias", "dark": "dark", "flat": "dome flat"}.get(p.obs_type, f"field{(p.seq % 7) + 1:02d}")
    h["INSTRUME"] = (camera.name, "camera")
    h["TELESCOP"] = (camera.telescope or "simulated", "telescope")
    h["ORIGIN"] = ("calibflow.simulate", "simulated raw exposure")
    h["OBSTYPE"] = (p.obs_type, "observation type")
    h["OBJECT"] = (obj, "target")
    h["EXPTIME"] = (p.exptime, "[s] exposure time")
    h["DARKTIME"] = (p.darktime, "[s] dark time")
    h["FILTER"] = (p.filter, "filter")
    h["DATE-OBS"] = (p.start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], "UTC start of exposure")
    h["EXPID"] = (p.exposure_id, "exposure id")
    h["AIRMASS"] = (round(draws.get("airmass", 1.0), 4), "airmass")
    h["MOONILL"] = (round(moon, 3), "moon illuminated fraction")
    h["SIMSEED"] = (seed, "simulator seed")
    return h


def _write(hdul: fits.HDUList, path: Path, compress: str | None) -> None:
    tmp = path.with_name(path.name + ".part")
    if compress == "gzip":
        buf = io.BytesIO()
        hdul.writeto(buf)
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1,
                                                   mtime=0) as gz:
            gz.write(buf.getvalue())
    else:
        hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _image_hdu(data: np.ndarray, det: Detector, compress: str | None, name: int | str | None = None,
               amps: Sequence[str] = ()) -> fits.ImageHDU | fits.CompImageHDU:
    header = fits.Header()
    header["CCDNAME"] = (det.name, "detector name")
    header["DETID"] = (det.id, "detector id")
    if len(amps) == 1:
        header["AMPNAME"] = (amps[0], "amplifier name")
    name = str(det.hdu if name is None else name)
    if compress == "rice":
        return fits.CompImageHDU(data=data, header=header, name=name, compression_type="RICE_1")
    return fits.ImageHDU(data=data, header=header, name=name)


def _write_truth(inst: InstrumentTruth, dets: list[Detector], filters: Sequence[str], truth_dir: Path) -> dict:
    truth_dir.mkdir(parents=True, exist_ok=True)

    def put(name: str, arr: np.ndarray, det: Detector, unit: str, what: str, dtype=np.float32, **keys) -> None:
        h = fits.Header()
        h["DETNAME"] = det.name
        h["DETID"] = det.id
        h["BUNIT"] = unit
        h["TRUTH"] = what
        for k, v in keys.items():
            h[k] = v
        path = truth_dir / name
        fits.PrimaryHDU(data=np.asarray(arr, dtype=dtype), header=h).writeto(path.with_suffix(".part"), overwrite=True)
        os.replace(path.with_suffix(".part"), path)

    def static_maps(det: Detector) -> None:
        put(f"bias_{det.name}.fits", inst.bias(det), det, "adu", "bias structure B")
        put(f"dark_{det.name}.fits", inst.dark(det), det, "adu/s", "dark rate D/g")
        put(f"defects_{det.name}.fits", inst.defects(det), det, "", "injected bad pixels (DEFECT_BITS)",
            dtype=np.int16)

    def filter_maps(det: Detector, f: str) -> None:
        put(f"flat_{f}_{det.name}.fits", inst.flat(det, f), det, "", "relative response R", FILTER=f,
            REFRESP=(refs[f], "ADU per incident e-; flat = lamp*REFRESP*R"))
        put(f"qe_{f}_{det.name}.fits", inst.qe(det, f) / np.float32(qmeans[f]), det, "", "Q/Qbar", FILTER=f,
            QEMEAN=(qmeans[f], "focal-plane mean of Q"))
        put(f"sky_{f}_{det.name}.fits", inst.sky(det, f), det, "", "sky pattern P", FILTER=f)
        if f in FRINGE_FILTERS:
            put(f"fringe_{f}_{det.name}.fits", inst.fringe(det, f), det, "", "fringe per unit sky F", FILTER=f)

    refs, qmeans, sky_norms = {}, {}, {}
    # the detectors' maps on threads, as the exposures' pixels (simulate_night)
    with ThreadPoolExecutor(max(1, min(len(dets), os.cpu_count() or 1)), thread_name_prefix="truth") as pool:
        list(pool.map(static_maps, dets))
        for f in filters:
            refs[f], qmeans[f] = inst.flat_reference(f, pool), inst.qe_mean(f, pool)
            sky_norms[f] = inst.sky_norm(f, pool)
            list(pool.map(lambda det: filter_maps(det, f), dets))
    static = inst.summary(filters)
    static["flat_reference"] = refs
    static["qe_mean"] = qmeans
    static["sky_norm"] = sky_norms
    return static


def _remove_previous(out_dir: Path) -> None:
    """Delete the raw files of a night simulated earlier into ``out_dir`` (listed in its night.json),
    so that ``raw/`` never mixes two simulations."""
    listing = out_dir / "truth" / "night.json"
    if not listing.exists():
        return
    try:
        with open(listing) as fh:
            old = json.load(fh)
        paths = [out_dir / e["path"] for e in old.get("exposures", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for path in paths:
        if path.parent == out_dir / "raw" and path.exists():
            path.unlink()
    listing.unlink()


def _json_dump(obj: Any, path: Path, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=indent)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def simulate_night(camera: Camera | str, out_dir: str | Path, seed: int = 0, *, night: str | dt.date = "2026-11-20",
                   n_bias: int = 5, n_dark: int = 5, n_flat: int = 5, n_science: int = 12,
                   filters: Sequence[str] = ("r", "z"), dark_exptime: float = 300.0, flat_exptime: float = 5.0,
                   science_exptime: float = 120.0, detectors: Iterable[int | str] | None = None,
                   compress: str | None = None, progress: Callable[[int, int], Any] | None = None,
                   poisson_gaussian_above: float | None = POISSON_GAUSSIAN_ABOVE,
                   gradient_amplitude: float | None = None, bad_exposures: Sequence[str] | str = (),
                   first_sequence: int = 0, gain_error: float | None = None, pixel_defects: bool = False,
                   ptc_exptimes: Sequence[float] = ()) -> SimulatedNight:
    """Simulate one night of raw exposures of a camera, and write them with their truth.

    Parameters
    ----------
    camera
        A :class:`~calib_core.camera.Camera` or the name/path of one (``"democam"``,
        ``"minimosaic"``). Layout ``hdu_per_detector`` or ``hdu_per_amplifier``, with sections, gains
        and read noises listed in the camera file.
    out_dir
        Output folder; ``raw/`` and ``truth/`` are created inside. Existing files are replaced.
    seed
        Non-negative integer. The same seed gives byte-identical pixels.
    night
        The observing night (local date of the evening), ``date`` or ISO string.
    n_bias, n_dark
        Number of bias and dark exposures.
    n_flat, n_science
        Number of dome flats and science exposures **per filter**.
    filters
        Filters of the flats and science exposures.
    dark_exptime, flat_exptime, science_exptime
        Exposure times [s].
    detectors
        Detector ids or names to write (default: all). The pixels of a detector do not depend on
        which others are written.
    compress
        None (``.fits``), ``"gzip"`` (``.fits.gz``) or ``"rice"`` (``.fits.fz``, lossless tile
        compression of the integer pixels).
    progress
        Called as ``progress(done, total)`` after each exposure is written.
    poisson_gaussian_above
        Expected electron count above which a rounded Gaussian stands in for the Poisson draw
        (default 1000 e-); None draws Poisson everywhere (about 3x slower on flats and science).
    gradient_amplitude
        Bound ``A`` on the large-scale gradient: ``max |G_j - 1| <= A`` over the focal plane, with
        linear and 2-D quadratic terms (module docstring). None (default): the legacy ranges
        (``c1`` in 0..0.08, ``c2`` in -0.03..0.03, ``c3 = 0``; ``|G_j - 1| <= 0.11``), pixels as before.
        Must lie in 0..0.5.
    bad_exposures
        Defects, e.g. ``("cloud", "trail", "glow")`` (or ``"cloud,trail,glow"``): for EACH filter, that
        many science exposures (one per entry, never the filter's first; chosen from the seed and
        ``first_sequence``) get the defect; ``exposures.json`` records ``defect`` (None for good
        exposures) and ``defect_params``. Needs ``n_science > len(bad_exposures)``. Default: none.
    first_sequence
        Sequence number before the first exposure (ids ``<night><first_sequence + 1:04d>``, ...).
        Every per-exposure draw (gradients, objects, noise, defects and which exposures get them)
        is keyed by the sequence number, the instrument truth (bias, dark, flat, sky pattern,
        fringe) by the seed only: a second call with the same seed, another ``out_dir``, another
        ``night`` and a ``first_sequence`` at least the first call's number of exposures (e.g. 1000)
        gives held-out exposures of the same instrument.
    gain_error
        None (default): the camera file's gains are the true gains. ``A`` (e.g. 0.04): each
        amplifier's true gain differs from the file's by ``A * U(0.75, 1.25)`` of either sign (3-5 %
        for 0.04); the raw pixels follow the true gains, the camera file written to the truth keeps
        the nominal ones, ``static.json`` lists both (``gains``, ``nominal_gains``).
    pixel_defects
        False (default): bad pixels are the hot pixels and bad columns above. True: also cold
        pixels (a fraction :data:`COLD_PIXEL_FRACTION`, response 0.3..0.7) and a hot column segment
        per detector (0.3..1 e-/s). Every injected bad pixel is in ``truth/defects_<det>.fits``
        (:data:`DEFECT_BITS`) either way.
    ptc_exptimes
        Exposure times of extra flat pairs for a photon transfer curve: two flats of each, in the
        first filter, after the other flats (default none). The lamp level scales with exposure time.

    Returns
    -------
    SimulatedNight
        The written exposures (ids, types, paths), truth accessors and ``summary`` (counts per type).

    Raises
    ------
    ValueError
        On bad arguments (unknown compression, negative counts, a camera the simulator cannot write).
    """
    camera = camera if isinstance(camera, Camera) else load_camera(camera)
    if compress not in (None, "gzip", "rice"):
        raise ValueError(f"compress must be None, 'gzip' or 'rice', got {compress!r}")
    if int(seed) < 0:
        raise ValueError("seed must be a non-negative integer")
    for name, n in (("n_bias", n_bias), ("n_dark", n_dark), ("n_flat", n_flat), ("n_science", n_science)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    filters = list(filters)
    if (n_flat or n_science) and not filters:
        raise ValueError("flats and science exposures need at least one filter")
    if gradient_amplitude is not None and not 0.0 <= float(gradient_amplitude) <= 0.5:
        raise ValueError(f"gradient_amplitude must lie in 0..0.5, got {gradient_amplitude}")
    gradient_amplitude = None if gradient_amplitude is None else float(gradient_amplitude)
    if isinstance(bad_exposures, str):
        bad_exposures = [b.strip() for b in bad_exposures.split(",") if b.strip()]
    bad_exposures = list(bad_exposures)
    unknown = [b for b in bad_exposures if b not in DEFECTS]
    if unknown:
        raise ValueError(f"unknown bad_exposures {unknown}; expected some of {DEFECTS}")
    if bad_exposures and n_science <= len(bad_exposures):
        raise ValueError(f"bad_exposures={bad_exposures} needs n_science > {len(bad_exposures)} "
                         f"(the first exposure of each filter stays good), got {n_science}")
    if int(first_sequence) < 0:
        raise ValueError(f"first_sequence must be >= 0, got {first_sequence}")
    first_sequence = int(first_sequence)
    if gain_error is not None and not 0.0 <= float(gain_error) <= 0.3:
        raise ValueError(f"gain_error must lie in 0..0.3, got {gain_error}")
    ptc_exptimes = [float(t) for t in ptc_exptimes]
    if any(t <= 0 for t in ptc_exptimes):
        raise ValueError(f"ptc_exptimes must be positive, got {ptc_exptimes}")
    if ptc_exptimes and not filters:
        raise ValueError("PTC flat pairs need at least one filter")
    night = dt.date.fromisoformat(night) if isinstance(night, str) else night
    seed = int(seed)
    dets = camera.detectors if detectors is None else [camera.detector(d) for d in detectors]
    out_dir = Path(out_dir)
    raw_dir, truth_dir = out_dir / "raw", out_dir / "truth"
    raw_dir.mkdir(parents=True, exist_ok=True)
    suffix = {None: ".fits", "gzip": ".fits.gz", "rice": ".fits.fz"}[compress]

    _remove_previous(out_dir)
    inst = InstrumentTruth(camera, seed, gain_error=gain_error, pixel_defects=pixel_defects)
    static = _write_truth(inst, dets, filters, truth_dir)
    (truth_dir / "camera.yaml").write_text(camera.to_yaml())
    (truth_dir / "README.txt").write_text(__doc__ or "")
    plan = _plan(night, camera.utc_offset_hours, n_bias, n_dark, n_flat, n_science, filters, dark_exptime,
                 flat_exptime, science_exptime, first_sequence, ptc_exptimes)
    defects = _choose_defects(plan, filters, bad_exposures, seed, first_sequence)
    moon = float(_rng(seed, 5).uniform(0.0, 1.0))
    exposures: list[SimulatedExposure] = []
    records: list[dict] = []
    workers = max(1, min(len(dets), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="simulate") as pool:
        def submit(p: _Planned) -> tuple[_Planned, dict[str, Any], list[Any]]:
            draws = _exposure_draws(inst, p, seed, flat_exptime, science_exptime, gradient_amplitude,
                                    defects.get(p.seq))
            # the detectors of an exposure on threads (numpy's draws and array arithmetic release the
            # GIL); each detector's draws come from its own node of the seed tree, so the pixels do not
            # depend on the order the threads run in
            return p, draws, [pool.submit(_simulate_detector, inst, det, p, draws, seed, poisson_gaussian_above)
                              for det in dets]

        def overlaps(a: _Planned, b: _Planned) -> bool:
            # the instrument keeps one filter's maps: two filters at once would make them over and over
            return a.filter is None or b.filter is None or a.filter == b.filter

        # the next exposure's detectors are queued before this one is written, so the threads wait
        # neither for the write nor, at an exposure's end, for one another
        queued = submit(plan[0]) if plan else None
        for i in range(len(plan)):
            p, draws, futures = queued
            following = plan[i + 1] if i + 1 < len(plan) else None
            early = following is not None and overlaps(p, following)
            if early:
                queued = submit(following)
            hdus: list[Any] = [fits.PrimaryHDU(header=_primary_header(camera, p, draws, seed, moon))]
            rec: dict[str, Any] = {"exposure_id": p.exposure_id, "obs_type": p.obs_type, "filter": p.filter,
                                   "date_obs": p.start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], "exptime": p.exptime,
                                   "darktime": p.darktime, "path": f"raw/{p.exposure_id}{suffix}",
                                   "cosmic_rays": {}, "bias_offset": {}}
            for key in ("sky_level", "gradient", "fringe_scale", "fringe_amplitude", "lamp_level", "fwhm_px",
                        "defect", "defect_params"):
                if key in draws:
                    rec[key] = draws[key]
            objects: list[dict] = []
            for det, future in zip(dets, futures):
                pixels, drec = future.result()
                for hdu, arr in pixels:
                    amps = [lay.amp.name for lay in inst.layouts[det.id] if lay.hdu == hdu]
                    hdus.append(_image_hdu(arr, det, compress, hdu, amps if len(pixels) > 1 else ()))
                rec["cosmic_rays"][det.name] = drec.get("cosmic_rays", 0)
                rec["bias_offset"][det.name] = drec["bias_offset"]
                objects += drec.get("objects", [])
            if following is not None and not early:
                queued = submit(following)
            if p.obs_type == "science":
                rec["objects"] = objects
            path = raw_dir / f"{p.exposure_id}{suffix}"
            _write(fits.HDUList(hdus), path, compress)
            records.append(rec)
            exposures.append(SimulatedExposure(exposure_id=p.exposure_id, obs_type=p.obs_type, filter=p.filter,
                                               exptime=p.exptime, darktime=p.darktime, date_obs=rec["date_obs"],
                                               path=path))
            if progress is not None:
                progress(i + 1, len(plan))
    _json_dump(static, truth_dir / "static.json")
    _json_dump(records, truth_dir / "exposures.json", indent=None)
    _json_dump({"camera": camera.name, "seed": seed, "night": night.isoformat(), "filters": filters,
                "detectors": [d.name for d in dets], "compress": compress, "first_sequence": first_sequence,
                "gradient_amplitude": gradient_amplitude, "bad_exposures": bad_exposures,
                "gain_error": inst.gain_error, "pixel_defects": inst.pixel_defects, "ptc_exptimes": ptc_exptimes,
                "exposures": [{k: r[k] for k in ("exposure_id", "obs_type", "filter", "exptime", "darktime",
                                                  "date_obs", "path")} for r in records]},
               truth_dir / "night.json")
    return SimulatedNight(out_dir=out_dir, camera=camera, seed=seed, night=night, exposures=exposures,
                          detectors=[d.name for d in dets], filters=filters, first_sequence=first_sequence)


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m calib_core.simulate.night CAMERA OUT_DIR [--seed N] ...``: simulate and print the summary."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m calib_core.simulate.night", description=simulate_night.__doc__.split("\n")[0])
    ap.add_argument("camera")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--night", default="2026-11-20")
    for name, default in (("n-bias", 5), ("n-dark", 5), ("n-flat", 5), ("n-science", 12)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--filters", default="r,z", help="comma-separated")
    ap.add_argument("--detectors", default=None, help="comma-separated ids or names (default: all)")
    ap.add_argument("--compress", choices=("gzip", "rice"), default=None)
    ap.add_argument("--gradient-amplitude", type=float, default=None)
    ap.add_argument("--bad-exposures", default="", help="comma-separated: cloud,trail,glow")
    ap.add_argument("--first-sequence", type=int, default=0)
    ap.add_argument("--gain-error", type=float, default=None)
    ap.add_argument("--pixel-defects", action="store_true")
    ap.add_argument("--ptc-exptimes", default="", help="comma-separated exposure times of PTC flat pairs")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} exposures", end="", flush=True)

    night = simulate_night(a.camera, a.out_dir, a.seed, night=a.night, n_bias=a.n_bias, n_dark=a.n_dark,
                           n_flat=a.n_flat, n_science=a.n_science, filters=[f for f in a.filters.split(",") if f],
                           detectors=a.detectors.split(",") if a.detectors else None, compress=a.compress,
                           progress=progress, gradient_amplitude=a.gradient_amplitude,
                           bad_exposures=a.bad_exposures, first_sequence=a.first_sequence,
                           gain_error=a.gain_error, pixel_defects=a.pixel_defects,
                           ptc_exptimes=[float(t) for t in a.ptc_exptimes.split(",") if t])
    print(f"\n{night} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    _main()
