"""ISR with registered calibs, and sky-frame subtraction of a science exposure (no Prefect).

The calib builds and ``calibflow apply-sky`` share :func:`isr_with_calibs`: it takes the calibs
that :func:`calib_core.repository.registry.calibs.lookup` found for an (exposure, detector) and runs ISR with
them, so a later build or a science reduction applies exactly what was certified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from calib_core.builds.calibtypes import ISR_STEP, OPTIONAL_IN_ISR, isr_with_calibs
from calib_core.camera import Camera
from calib_core.errors import InputError
from calib_core.io.products import write_product
from calib_core.io.raw import read_raw
from calib_core.isr.process import IsrConfig
from calib_core.records import CalibProduct, Exposure
from calib_core.repository import Registry, lookup
from calib_core.sky.frames import SkyBuildConfig, apply_sky_frame
from calib_core.stats.background import BackgroundModel

__all__ = ["ISR_STEP", "find_isr_calibs", "readout_keys", "isr_with_calibs", "read_sky_frame", "SkyApplication",
           "apply_sky"]


class MissingCalib(InputError):
    """No certified calib applies where ISR needs one."""


def readout_keys(camera: Camera) -> tuple[str, ...]:
    """The readout settings a calib must share with an exposure it applies to: the camera's
    binning key and the header keys its gain and read-noise tables are chosen by, as far as the
    registry records them (``extra_keys``) (docs/architecture.md#lookup-rules)."""
    keys = {camera.binning_key} if camera.binning_key else set()
    for det in camera.detectors:
        for amp in det.amplifiers:
            for table in (amp.gain_table, amp.read_noise_table):
                if table is not None:
                    keys.add(table.key)
    return tuple(sorted(k for k in keys if k in camera.extra_keys))


def find_isr_calibs(registry: Registry, camera: str, exposure_id: str, detector: int, isr: IsrConfig,
                    types=tuple(ISR_STEP), purpose: str = "ISR", readout: tuple[str, ...] = ()) -> dict[str, CalibProduct]:
    """The certified calib of each type ISR switches on, for one (exposure, detector).

    Raises
    ------
    MissingCalib
        A required type (not fringe) has no certified product valid for the exposure.
    """
    found = {}
    for calib_type in types:
        if not getattr(isr, ISR_STEP[calib_type]):
            continue
        hit = lookup(registry, camera=camera, exposure_id=exposure_id, calib_type=calib_type, detector=detector,
                     readout_keys=readout)
        if hit:
            found[calib_type] = hit[0]
        elif calib_type not in OPTIONAL_IN_ISR:
            raise MissingCalib(f"{purpose}: no certified {calib_type} applies to exposure {exposure_id} "
                               f"detector {detector}; build and certify one first (calibflow build {calib_type})")
    return found


def read_sky_frame(path) -> BackgroundModel:
    """A sky-frame product (a binned :class:`BackgroundModel` with provenance cards)."""
    return BackgroundModel.from_fits(path)


@dataclass
class SkyApplication:
    """Result of :func:`apply_sky` for one exposure."""

    exposure_id: str
    sky_level: float
    scale: float
    error: float
    n_used: int
    n_total: int
    sky_calibs: dict[int, str]
    outputs: dict[int, Path] = field(default_factory=dict)


def apply_sky(registry: Registry, camera: Camera, exposure: Exposure, out_dir: Path | None,
              config: SkyBuildConfig | None = None) -> SkyApplication:
    """Sky correction of one science exposure (pipe_drivers ``SkyCorrectionTask``): ISR with the
    certified calibs, object masking, then the exposure's large-scale surface and the certified sky
    frame's scale fitted together over all detectors (:func:`calib_core.sky.frames.apply_sky_frame`) and
    ``L * (1 + s * F)`` subtracted. The output images are sky-free (objects and noise).

    Parameters
    ----------
    exposure : Exposure
        The exposure's registry record (:meth:`Registry.query_exposures`).
    out_dir : Path or None
        Where the corrected detector images go (``<exposure>-det<NNN>-skysub.fits``); None writes
        nothing.
    """
    cfg = config or SkyBuildConfig()
    eid = exposure.exposure_id
    raw = read_raw(exposure.path, camera)
    images, frames, ids = {}, {}, {}
    for det_id, rd in sorted(raw.detectors.items()):
        sky = lookup(registry, camera=camera.name, exposure_id=eid, calib_type="sky", detector=det_id,
                     readout_keys=readout_keys(camera))
        if not sky:
            raise MissingCalib(f"apply-sky: no certified sky frame applies to exposure {eid} detector {det_id} "
                               f"(filter {exposure.filter}); build one first (calibflow build sky)")
        calibs = find_isr_calibs(registry, camera.name, eid, det_id, cfg.isr, purpose="apply-sky",
                                 readout=readout_keys(camera))
        images[det_id] = isr_with_calibs(rd, cfg.isr, calibs, exposure.darktime, path=exposure.path)
        frames[det_id] = read_sky_frame(sky[0].path)
        ids[det_id] = sky[0].calib_id
    # the exposure's large-scale surface and the sky-frame scale, fitted together; both subtracted
    surface, sol = apply_sky_frame(camera, images, frames, cfg)
    sky_level = surface.level
    result = SkyApplication(eid, sky_level, sol.scale, sol.error, sol.n_used, sol.n_total, ids)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for det_id, mi in images.items():
            target = out_dir / f"{eid}-det{det_id:03d}-skysub.fits"
            write_product(target, mi, {"EXPID": eid, "DETECTOR": det_id, "FILTER": exposure.filter,
                                       "SKYCALIB": ids[det_id], "SKYSCALE": (sol.scale, "fitted sky-frame scale"),
                                       "SKYSCERR": (sol.error, "its standard error"),
                                       "SKYLEVEL": (sky_level, "sky level at the focal-plane centre, ADU")},
                          unit="adu")
            result.outputs[det_id] = target
    return result
