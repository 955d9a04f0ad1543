"""Verification of a candidate calib before certification, and screening of inputs before stacking
(docs/algorithms.md#verification-before-certification).

The reference is LSST cp_verify (DMTN-101): a candidate is applied to a frame of its own kind
and the result is tested, per amplifier where the test is per amplifier. Inputs are screened
against the last good master as LCO BANZAI does (a pixel is bad at >= 6 sigma, a frame with more
than 5 % bad pixels is rejected). A candidate is also compared with the incumbent (the certified
product it would replace, as DESI accepts a nightly bias only if it is no worse than the default).

Everything here is a plain function over arrays; no Prefect, no registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import maximum_filter1d, median_filter

from calib_core.configmodel import ClipConfig
from calib_core.io.raw import RawDetector
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats.binned import image_statistic
from calib_core.stats.warnfilters import nanmedian_quiet

__all__ = ["VerifyConfig", "ScreenConfig", "Check", "Verification", "verify_product", "screen_input",
           "TestFrame", "VerifyInputs", "against_own_kind", "flagged_pixels", "sky_bins",
           "detector_scatter_checks", "sky_structure_checks", "summarise_checks", "amp_regions",
           "FAILED_STATUS_HINT"]

#: pixels the statistics never use
_IGNORE = ("BAD", "SAT", "NO_DATA", "CR", "DETECTED", "INTRP")

FAILED_STATUS_HINT = "kept as a candidate: `calibflow certify --force` certifies it anyway"


class ScreenConfig(BaseModel):
    """Input screening before stacking (BANZAI's defaults, docs/algorithms.md#input-screening)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="screen bias, dark and flat inputs before stacking")
    pixel_nsigma: float = Field(6.0, gt=0, description="a pixel is bad at this many sigma from the last good master")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="an input with more bad pixels is excluded")
    max_saturated_fraction: float = Field(0.01, ge=0, le=1, description="an input with more saturated pixels "
                                          "(SAT plane) is excluded")
    pattern_nsigma: float = Field(5.0, gt=0, description="pattern noise: the scatter of the row medians of "
                                  "(input - master) above this many times what white noise gives")


class VerifyConfig(ClipConfig):
    """Thresholds of the verification gate (cp_verify's defaults, docs/algorithms.md#verification-thresholds).

    Not part of a product's identity: changing a threshold re-judges, it does not rebuild."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="verify before certifying; off: every product is certified as built")
    noise_tolerance: float = Field(0.05, ge=0, description="bias/dark NOISE: (noise - read noise) / read noise "
                                   "at most this")
    cr_noise_tolerance: float = Field(0.05, ge=0, description="bias/dark CR_NOISE: |noise - noise after cosmic-ray "
                                      "masking| / the latter at most this")
    overscan_noise_tolerance: float = Field(0.05, ge=0, description="bias/dark OVERSCAN_NOISE: (overscan noise - "
                                            "read noise) / read noise at most this")
    flat_noise_factor: float = Field(1.0, gt=0, description="flat NOISE: noise <= this x sqrt(mean), electrons")
    amp_scatter: float = Field(0.05, ge=0, description="flat AMP_SCATTER: std / mean of a detector's amplifier "
                               "means at most this")
    detector_scatter: float = Field(0.05, ge=0, description="flat DETECTOR_SCATTER: a detector's mean off the "
                                    "median of the detectors by at most this fraction")
    incumbent_margin: float = Field(0.05, ge=0, description="INCUMBENT: the candidate's residual noise on the test "
                                    "frame at most (1 + this) x the incumbent's")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="BAD_FRACTION: flagged or non-finite pixels "
                                    "(bins of a sky frame) at most this fraction")
    sky_min_improvement: float = Field(
        3.0, ge=0, description="sky STRUCTURE: structure above noise without / with the frame at least this, on "
                               "each exposure left out of the frame in turn; 3 (the frame removes at least two "
                               "thirds of it). Good simulated nights reach 14-29 per detector, real ones less; a "
                               "frame of noise or of shuffled bins scores about 1, one of the wrong sign 0.5 "
                               "(docs/algorithms.md#sky-frame-structure-check)")
    sky_scale_tolerance: float = Field(
        0.5, gt=0, description="sky SCALE: the median fitted scale of the held-out exposures within this of 1; "
                               "0.5. The frame is the pattern relative to the sky, so its own night fits it at "
                               "about 1 (0.995-1.003 on simulated nights); a frame of the wrong sign or "
                               "normalisation fits far from it, which STRUCTURE alone would not see")
    screen: ScreenConfig = Field(default_factory=ScreenConfig, description="input screening before stacking")


@dataclass
class Check:
    """One test: ``value`` against ``limit`` (``op`` says how), for an amplifier, a detector or the camera."""

    name: str
    passed: bool
    value: float | None
    limit: float | None
    op: str                      # "<=", ">=", "<"
    amp: str | None = None
    note: str = ""

    def describe(self) -> str:
        where = f" amp {self.amp}" if self.amp else ""
        val = "n/a" if self.value is None else f"{self.value:.4g}"
        lim = "" if self.limit is None else f" (limit {self.op} {self.limit:.4g})"
        return f"{self.name}{where}: {val}{lim}" + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": bool(self.passed), "value": _num(self.value),
                "limit": _num(self.limit), "op": self.op, "amp": self.amp, "note": self.note}


@dataclass
class Verification:
    """The checks of one candidate and its per-amplifier metrics (``{amp: {metric: value}}``; the
    detector as a whole is amp ``"*"``)."""

    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    test_exposure: str | None = None
    incumbent: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [c.to_dict() for c in self.checks],
                "failed": [c.describe() for c in self.checks if not c.passed],
                "test_exposure": self.test_exposure, "incumbent": self.incumbent,
                "metrics": {a: {k: _num(v) for k, v in m.items()} for a, m in self.metrics.items()}}


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def amp_regions(raw: RawDetector) -> dict[str, tuple[slice, slice]]:
    """Where each amplifier's data lands in the assembled detector."""
    return {a.name: a.det_slices for a in raw.amps}


def _good(mi: MaskedImage, values: np.ndarray) -> np.ndarray:
    return np.isfinite(values) & ((mi.mask & MASK_PLANES.bits(_IGNORE)) == 0)


def _clip(values: np.ndarray, cfg: VerifyConfig) -> tuple[float, float]:
    """(clipped mean, clipped standard deviation) of finite values; NaN when there are too few."""
    s = image_statistic("MEANCLIP", values, nsigma=cfg.nsigma, niter=cfg.niter)
    if s.npoint < 10:
        return math.nan, math.nan
    return float(s.mean), float(math.sqrt(max(s.variance, 0.0)))


def _residual(calib_type: str, product: MaskedImage, test: MaskedImage, darktime: float | None) -> np.ndarray:
    """The test frame with the candidate applied: ADU (a dark's back in ADU of its dark time; a
    flat's is the flat-fielded frame)."""
    img, prod = np.asarray(test.image, np.float64), np.asarray(product.image, np.float64)
    if calib_type == "bias":
        return img - prod
    if calib_type == "dark":
        return (img - prod) * float(darktime or 1.0)
    if calib_type == "flat":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(prod > 0, img / prod, np.nan)
    raise ValueError(f"no residual for calib type {calib_type!r}")


def _overscan_noise(amp, cfg: VerifyConfig) -> float:
    """Clipped noise (ADU) of an amplifier's overscan after its per-row (column) level: the row
    median over a few neighbouring rows, so one row's own noise is not taken out with its level."""
    over = amp.overscan
    if over is None or over.size == 0:
        return math.nan
    over = np.asarray(over, np.float64)
    if amp.overscan_axis == 0:
        over = over.T
    margin = min(amp.amp.overscan_margin, max(over.shape[1] - 2, 0))
    over = over[:, margin:]
    level = np.full(over.shape[0], np.nan)
    rows = np.isfinite(over).any(axis=1)            # a wholly NaN row has no level (and no warning)
    level[rows] = np.nanmedian(over[rows], axis=1)
    # smooth the level along the readout (9 rows) so it carries ~1/sqrt(9 * ncols) of one pixel's noise
    # (the running median with the ends repeated; a window holding a wholly NaN row is NaN, as
    # np.median over the window would give: median_filter's ordering of NaN is undefined)
    k = 9
    finite = np.isfinite(level)
    smooth = median_filter(np.where(finite, level, 0.0), size=k, mode="nearest")
    smooth[maximum_filter1d((~finite).astype(np.uint8), size=k, mode="nearest") > 0] = np.nan
    return _clip(over - smooth[:, None], cfg)[1]


def verify_product(calib_type: str, product: MaskedImage, raw: RawDetector, test: MaskedImage,
                   config: VerifyConfig | None = None, *, darktime: float | None = None,
                   incumbent: MaskedImage | None = None, test_exposure: str | None = None,
                   incumbent_id: str | None = None) -> Verification:
    """Test a candidate bias, dark or flat on a frame of its own kind (cp_verify).

    Parameters
    ----------
    calib_type : "bias" | "dark" | "flat"
    product : MaskedImage
        The candidate (a dark in ADU/s, a flat normalised as built).
    raw : RawDetector
        The test exposure's raw detector: amplifier geometry, gains (e-/ADU), read noises (e-) and
        overscan.
    test : MaskedImage
        The test exposure processed as the build's inputs are (post-ISR; a dark's divided by its
        dark time).
    darktime : float
        The test dark's dark time, s (dark only).
    incumbent : MaskedImage, optional
        The certified product the candidate would replace, applied to the same frame.

    Returns
    -------
    Verification
        Checks: bias and dark ``MEAN`` (|mean| < noise), ``NOISE`` ((noise - read noise) / read
        noise <= 5 %), ``CR_NOISE`` and ``OVERSCAN_NOISE`` (within 5 %), per amplifier; flat
        ``NOISE`` (noise <= sqrt(mean), electrons) per amplifier and ``AMP_SCATTER`` (<= 5 %);
        every type ``BAD_FRACTION`` and, with an incumbent, ``INCUMBENT``. Metrics per amplifier
        in electrons (``level`` of the product itself: bias residual level, dark current e-/s, flat
        response).
    """
    cfg = config or VerifyConfig()
    out = Verification(test_exposure=test_exposure, incumbent=incumbent_id)
    resid = _residual(calib_type, product, test, darktime)
    good = _good(test, resid) & _good(product, product.image)
    flagged = ((product.mask & MASK_PLANES.bits(["BAD", "NO_DATA"])) != 0) | ~np.isfinite(product.image)
    bad_fraction = float(flagged.mean())
    out.checks.append(Check("BAD_FRACTION", bad_fraction <= cfg.max_bad_fraction, bad_fraction,
                            cfg.max_bad_fraction, "<="))
    amp_means = {}
    for amp in raw.amps:
        sl = amp.det_slices
        g, rn = float(amp.gain), float(amp.read_noise)
        r = resid[sl][good[sl]]
        mean, noise = _clip(r, cfg)
        level, _ = _clip(np.asarray(product.image[sl], np.float64)[good[sl]], cfg)
        # metric names per type (the trends' vocabulary, docs/algorithms.md#verification-metrics)
        m = {"mean": mean * g, "read_noise_nominal": rn, "gain": g}
        if calib_type == "bias":
            m.update(read_noise=noise * g, residual_level=level * g,
                     bias_level=float(np.median(amp.overscan)) if amp.overscan is not None else math.nan)
        elif calib_type == "dark":
            m.update(read_noise=noise * g, dark_current=level * g)
        else:
            m.update(noise=noise * g, flat_level=level)
        if calib_type in ("bias", "dark"):
            out.checks.append(Check("MEAN", bool(abs(mean) < noise), abs(mean), noise, "<", amp.name,
                                    "ADU, |clipped mean| against clipped noise"))
            out.checks.append(Check("NOISE", bool(noise * g - rn <= cfg.noise_tolerance * rn),
                                    (noise * g - rn) / rn if rn > 0 else math.nan, cfg.noise_tolerance, "<=",
                                    amp.name, f"noise {noise * g:.3g} e- against read noise {rn:.3g} e-"))
            from calib_core.isr.cosmicrays import find_cosmic_rays

            crmi = MaskedImage(np.where(good[sl], resid[sl], 0.0).astype(np.float32),
                               np.where(good[sl], 0, MASK_PLANES.bit("NO_DATA")).astype(np.int32),
                               np.full(resid[sl].shape, (noise if np.isfinite(noise) else 1.0) ** 2, np.float32))
            cr = find_cosmic_rays(crmi)
            _, cr_noise = _clip(resid[sl][good[sl] & ~cr], cfg)
            dev = abs(noise - cr_noise) / cr_noise if cr_noise > 0 else math.nan
            out.checks.append(Check("CR_NOISE", bool(dev <= cfg.cr_noise_tolerance), dev, cfg.cr_noise_tolerance,
                                    "<=", amp.name))
            os_noise = _overscan_noise(amp, cfg) * g
            # one-sided like NOISE: an overscan quieter than the camera file's read noise says the file's
            # nominal gain or read noise is off (a night with gains 3-5 % off held three good biases
            # back), not that the bias is bad
            dev = (os_noise - rn) / rn if rn > 0 else math.nan
            out.checks.append(Check("OVERSCAN_NOISE", bool(dev <= cfg.overscan_noise_tolerance), dev,
                                    cfg.overscan_noise_tolerance, "<=", amp.name,
                                    f"overscan noise {os_noise:.3g} e- against read noise {rn:.3g} e-"))
            m.update(cr_noise=cr_noise * g, overscan_noise=os_noise)
        else:
            limit = cfg.flat_noise_factor * math.sqrt(max(mean * g, 0.0))
            out.checks.append(Check("NOISE", bool(noise * g <= limit), noise * g, limit, "<=", amp.name,
                                    "electrons, against sqrt(mean)"))
            amp_means[amp.name] = mean
        out.metrics[amp.name] = m
    if calib_type == "flat":
        means = np.array([v for v in amp_means.values() if np.isfinite(v)])
        scatter = float(np.std(means) / np.mean(means)) if means.size > 1 and np.mean(means) > 0 else 0.0
        out.checks.append(Check("AMP_SCATTER", scatter <= cfg.amp_scatter, scatter, cfg.amp_scatter, "<="))
    mean, noise = _clip(resid[good], cfg)
    rel = noise / abs(mean) if calib_type == "flat" and mean else noise
    out.metrics["*"] = {"mean": mean, "noise": noise, "residual_rms": rel, "bad_fraction": bad_fraction}
    if incumbent is not None:
        r_inc = _residual(calib_type, incumbent, test, darktime)
        good_i = good & _good(incumbent, incumbent.image)
        mi, ni = _clip(r_inc[good_i], cfg)
        rel_i = ni / abs(mi) if calib_type == "flat" and mi else ni
        ok = bool(rel <= (1 + cfg.incumbent_margin) * rel_i) if np.isfinite(rel_i) else True
        out.checks.append(Check("INCUMBENT", ok, rel / rel_i if rel_i else math.nan, 1 + cfg.incumbent_margin, "<=",
                                note=f"residual rms with the candidate / with {incumbent_id}"))
        out.metrics["*"]["incumbent_residual_rms"] = rel_i
    return out


def verify_binned(frame_values: np.ndarray, config: VerifyConfig | None = None) -> Verification:
    """A binned product (sky frame): the share of bins without a value."""
    cfg = config or VerifyConfig()
    finite = np.isfinite(np.asarray(frame_values, np.float64))
    bad = float(1.0 - finite.mean()) if finite.size else 1.0
    out = Verification()
    out.checks.append(Check("BAD_FRACTION", bad <= cfg.max_bad_fraction, bad, cfg.max_bad_fraction, "<=",
                            note="bins without a value"))
    vals = np.asarray(frame_values, np.float64)[finite]
    out.metrics["*"] = {"level": float(np.median(vals)) if vals.size else math.nan,
                        "rms": float(np.std(vals)) if vals.size else math.nan, "bad_fraction": bad}
    return out


def verify_image(product: MaskedImage, config: VerifyConfig | None = None) -> Verification:
    """A full-resolution product without a test of its own kind (fringe): its flagged pixels."""
    cfg = config or VerifyConfig()
    flagged = ((product.mask & MASK_PLANES.bits(["BAD", "NO_DATA"])) != 0) | ~np.isfinite(product.image)
    bad = float(flagged.mean())
    out = Verification()
    out.checks.append(Check("BAD_FRACTION", bad <= cfg.max_bad_fraction, bad, cfg.max_bad_fraction, "<="))
    good = ~flagged
    out.metrics["*"] = {"level": float(np.median(product.image[good])) if good.any() else math.nan,
                        "bad_fraction": bad}
    return out


def detector_scatter_checks(means: dict[int, float], config: VerifyConfig | None = None) -> dict[int, Check]:
    """cp_verify's detector-to-detector flat scatter, per detector: each detector's mean of the
    flat-fielded test exposure against the median over the detectors (one bad detector then holds
    back only itself); the camera-wide std / mean goes into each check's note."""
    cfg = config or VerifyConfig()
    vals = {d: float(m) for d, m in means.items() if m is not None and math.isfinite(float(m))}
    if len(vals) < 2:
        return {}
    arr = np.array(list(vals.values()))
    med = float(np.median(arr))
    spread = float(np.std(arr) / np.mean(arr)) if np.mean(arr) else math.nan
    return {d: Check("DETECTOR_SCATTER", abs(m / med - 1) <= cfg.detector_scatter, abs(m / med - 1),
                     cfg.detector_scatter, "<=", note=f"camera std/mean {spread:.3g}")
            for d, m in vals.items()}


def sky_structure_checks(camera, residuals, frames, config: VerifyConfig | None = None, sky_config=None
                         ) -> dict[int, tuple[list[Check], dict[str, float]]]:
    """The sky frame's held-out checks, per detector (docs/algorithms.md#sky-frame-structure-check):
    ``STRUCTURE`` (the detector's structure above noise without / with the frame, at least
    ``sky_min_improvement``) and ``SCALE`` (the held-out exposures' median fitted scale within
    ``sky_scale_tolerance`` of 1, the same for every detector: the scale is fitted over the focal
    plane), scored by :func:`calib_core.sky.heldout.leave_one_out_structure` on each of the build's
    exposures left out of the frame in turn.

    Parameters
    ----------
    residuals : {exposure: {detector id: BackgroundModel}}
        The build's binned residuals of the exposures the frame was made from.
    frames : {detector id: BackgroundModel}
        The sky frame as the build wrote it.

    Returns
    -------
    {detector id: ([STRUCTURE, SCALE], metrics)}
        Metrics (fractions of the sky): ``structure_before``, ``structure_after``,
        ``structure_noise``, ``structure_ratio`` of the detector, ``focal_plane_structure_ratio``
        and ``sky_scale`` (the median fitted scale).
    """
    from calib_core.sky.heldout import leave_one_out_structure

    cfg = config or VerifyConfig()
    loo = leave_one_out_structure(camera, residuals, frames, sky_config)
    fp = loo.focal_plane
    scale = float(np.median(list(loo.scales.values())))
    scale_check = Check("SCALE", bool(abs(scale - 1.0) <= cfg.sky_scale_tolerance), scale,
                        cfg.sky_scale_tolerance, "|x-1| <=",
                        note=f"median fitted scale of {len(loo.scales)} held-out exposures (range "
                             f"{min(loo.scales.values()):.3g} to {max(loo.scales.values()):.3g})")
    out = {}
    for d, st in loo.detectors.items():
        ratio = st.ratio
        check = Check("STRUCTURE", bool(ratio >= cfg.sky_min_improvement), ratio, cfg.sky_min_improvement, ">=",
                      note=f"structure above noise {st.before:.3g} -> {st.after:.3g} of the sky (bin noise "
                           f"{st.noise:.3g}) on {len(loo.scales)} exposures, each left out of the frame; "
                           f"focal plane {fp.ratio:.3g}")
        out[d] = ([check, scale_check], {"structure_before": st.before, "structure_after": st.after,
                                         "structure_noise": st.noise, "structure_ratio": ratio,
                                         "focal_plane_structure_ratio": fp.ratio, "sky_scale": scale})
    return out


def summarise_checks(verification: dict | None) -> str:
    """One line: ``passed`` or the failed checks."""
    if not verification:
        return "not verified"
    if verification.get("forced"):
        return "certified by force: " + verification.get("forced")
    failed = verification.get("failed") or []
    return "passed" if not failed else "failed: " + "; ".join(failed)


# ---------------------------------------------------------------------------------------------------
# input screening
# ---------------------------------------------------------------------------------------------------


def screen_input(calib_type: str, image: MaskedImage, master: MaskedImage | None,
                 config: ScreenConfig | None = None) -> str | None:
    """Why an input (post-ISR, as the build stacks it) must not enter the stack, or None.

    * saturated: more than ``max_saturated_fraction`` of its pixels in the SAT plane;
    * outlier (BANZAI): more than ``max_bad_fraction`` of its pixels ``pixel_nsigma`` sigma or more
      from the last good master (a flat's scaled by the median ratio first), sigma from both
      variance planes;
    * pattern noise: the clipped scatter of its row medians of (input - master) above
      ``pattern_nsigma`` times white noise's ``1.2533 sigma / sqrt(ncols)``.

    Without a master only the saturation test runs.
    """
    cfg = config or ScreenConfig()
    if not cfg.enabled or calib_type not in ("bias", "dark", "flat"):
        return None
    sat = float(((image.mask & MASK_PLANES.bit("SAT")) != 0).mean())
    if sat > cfg.max_saturated_fraction:
        return f"saturated: {100 * sat:.1f} % of pixels (limit {100 * cfg.max_saturated_fraction:.3g} %)"
    if master is None:
        return None
    img, ref = np.asarray(image.image, np.float64), np.asarray(master.image, np.float64)
    ignore = MASK_PLANES.bits(["BAD", "NO_DATA", "CR", "SAT"])
    ok = np.isfinite(img) & np.isfinite(ref) & ((image.mask & ignore) == 0) & ((master.mask & ignore) == 0)
    if ok.sum() < 100:
        return None
    scale = 1.0
    if calib_type == "flat":
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = img[ok] / ref[ok]
        scale = float(np.nanmedian(ratio[np.isfinite(ratio)]))
    diff = img - scale * ref
    var = np.asarray(image.variance, np.float64) + scale ** 2 * np.asarray(master.variance, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(diff) / np.sqrt(var)
    if not np.isfinite(z[ok]).any() or not (var[ok] > 0).any():
        return None
    bad = float((z[ok] >= cfg.pixel_nsigma).mean())
    if bad > cfg.max_bad_fraction:
        return (f"outlier against the last good master: {100 * bad:.1f} % of pixels >= {cfg.pixel_nsigma:g} sigma "
                f"(limit {100 * cfg.max_bad_fraction:.3g} %)")
    rows = np.where(ok, diff, np.nan)
    with np.errstate(all="ignore"):
        row_med = nanmedian_quiet(rows, axis=1)
        ncols = np.sum(ok, axis=1)
    sigma = float(np.sqrt(np.nanmedian(var[ok])))
    keep = np.isfinite(row_med) & (ncols > 10)
    if keep.sum() > 10 and sigma > 0:
        white = 1.2533 * sigma / math.sqrt(float(np.median(ncols[keep])))
        # the scatter of the row medians about their own median: a pattern, not a level
        spread = 1.4826 * float(np.median(np.abs(row_med[keep] - np.median(row_med[keep]))))
        if spread > cfg.pattern_nsigma * white:
            return (f"pattern noise: row-to-row scatter {spread:.3g} is {spread / white:.1f} x white noise "
                    f"(limit {cfg.pattern_nsigma:g} x)")
    return None


# ---------------------------------------------------------------------------------------------------
# the per-type verifiers the calib-type table names (calib_core.builds.calibtypes.CalibType.verify)
# ---------------------------------------------------------------------------------------------------


@dataclass
class TestFrame:
    """A frame of the candidate's own kind: processed as the build's inputs are, and its raw."""

    image: MaskedImage
    raw: RawDetector
    darktime: float | None
    exposure_id: str


@dataclass
class VerifyInputs:
    """What a verifier may ask for, loaded only when asked: ``test()`` gives a :class:`TestFrame`
    (or None), ``incumbent()`` gives ``(product image, calib id)`` of the certified product the
    candidate would replace (or None)."""

    config: VerifyConfig
    test: Any = None
    incumbent: Any = None


def against_own_kind(calib_type: str):
    """A verifier that applies the candidate to a test frame of its kind (:func:`verify_product`)."""

    def verify(product: MaskedImage, inputs: VerifyInputs) -> Verification:
        test = inputs.test() if inputs.test else None
        if test is None:
            return verify_image(product, inputs.config)
        inc = inputs.incumbent() if inputs.incumbent else None
        return verify_product(calib_type, product, test.raw, test.image, inputs.config, darktime=test.darktime,
                              incumbent=inc[0] if inc else None, incumbent_id=inc[1] if inc else None,
                              test_exposure=test.exposure_id)

    verify.__name__ = f"verify_{calib_type}"
    return verify


def flagged_pixels(product: MaskedImage, inputs: VerifyInputs) -> Verification:
    """A verifier for a product without a test of its own kind: its flagged pixels."""
    return verify_image(product, inputs.config)


def sky_bins(product, inputs: VerifyInputs) -> Verification:
    """A verifier for a sky frame (a binned model): its bins without a value. The held-out
    ``STRUCTURE`` and ``SCALE`` checks need every detector's frame and the build's residuals, so the
    build adds them once every detector is combined (:func:`sky_structure_checks`)."""
    return verify_binned(product.values, inputs.config)


def checks_from_dicts(items: Sequence[dict[str, Any]]) -> list[Check]:
    return [Check(**{k: d.get(k) for k in ("name", "passed", "value", "limit", "op", "amp", "note")})
            for d in items]
