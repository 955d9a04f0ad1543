"""The records that cross calibflow's layers (docs/architecture.md#records).

Registry rows and task results used to be plain dicts whose keys every reader had to know; a
typo'd key was a ``KeyError`` deep in a flow, or worse a silent ``None`` from ``.get``. These frozen
models name every field once, with its type and meaning:

* :class:`Exposure`: one ingested raw exposure (the registry makes it, :meth:`Registry.query_exposures`;
  build planning, the tasks, the nightly plan, science reduction and the CLI read it);
* :class:`ProcessedInput`: one (exposure, detector) after a build's process step (the tasks make it;
  the build flow, its barriers and the combine task read it);
* :class:`SkyResidual`: one (exposure, detector) of a sky build after the focal-plane barrier (the
  flow makes it; the combine task and the sky verification read it);
* :class:`CalibProduct`: one registered calib product (the registry makes it: ``list_calibs``,
  ``lookup``, ``certify``, ...; ISR, the build flow, the night report, science reduction and the
  CLI read it), and :class:`BuiltProduct`, the same as a build returns it, with whether this build
  registered it (``created``).

Records are frozen (a changed record is a new one: ``record.model_copy(update={...})``) and refuse
unknown fields. Their JSON form (``record.model_dump(mode="json")``) is what the resume files, the
CLI's ``--json`` output and Prefect artifacts carry. Pixels never travel in a record, only paths.

No Prefect and no database here: plain pydantic.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Exposure", "ProcessedInput", "SkyResidual", "CalibProduct", "BuiltProduct", "AmpBox"]

#: an amplifier's box in the assembled detector: (name, y0, y1, x0, x1), end-exclusive
AmpBox = tuple[str, int, int, int, int]


class _Record(BaseModel):
    # NaN stays NaN in the record's own JSON (a PTC amplifier without overscan has a NaN noise),
    # as json.dumps writes it, so a resume file reads back as written; the CLI's strict JSON
    # output turns NaN into null itself (calibflow.common.dumps_json)
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class Exposure(_Record):
    """One ingested raw exposure, as the registry holds it (the ``exposure`` table,
    docs/architecture.md#tables). Times are ISO 8601 strings in UTC, as the CLI prints them."""

    exposure_id: str = Field(description="the exposure's id (unique per camera)")
    camera: str = Field(description="the camera's name in the registry")
    obs_type: str = Field(description="observation type: bias, dark, flat, science, ...")
    filter: str = Field(description="the filter in the beam (``NONE`` for frames without one)")
    exptime: float = Field(description="exposure time, seconds")
    darktime: float = Field(description="dark time (shutter open to readout), seconds")
    date_obs: str = Field(description="start of the exposure, ISO 8601 UTC")
    night: str = Field(description="the observing night YYYY-MM-DD (the local date of the evening)")
    object: str = Field(description="the OBJECT header card, empty when none")
    n_detectors: int = Field(description="detectors the raw file holds")
    path: str = Field(description="where the raw file is now (the datastore, or where it was left)")
    checksum: str = Field(description="sha256 of the raw file's bytes at ingest: the raw's identity")
    size_bytes: int = Field(description="the raw file's size at ingest (a cheap check before hashing)")
    ingested_at: str = Field(description="when it was ingested, ISO 8601 UTC")
    extra: dict[str, Any] = Field(default_factory=dict,
                                  description="further header values kept at ingest (readout settings, ...)")


class ProcessedInput(_Record):
    """One (exposure, detector) after the process step of a build.

    The identity, the intermediate in the work area and the ISR calibs it was made with, whether it
    was reused from an earlier run, left out as unreadable (``error``) or screened out against the
    last good master (``screened``); then the scalars the calib type's processing measures (each
    type sets only its own, :mod:`calib_core.builds.calibtypes`; the others stay None) and the paths of
    side products written next to the intermediate. The same fields, less ``reused`` and
    ``screened``, are the ``.json`` written beside each intermediate, from which a resumed build
    reads them back.
    """

    exposure_id: str = Field(description="the exposure's id in the registry")
    detector: int = Field(description="the detector's number")
    path: str | None = Field(None, description="the intermediate (post-ISR, prepared) FITS file; None when "
                                               "the raw could not be read (``error``)")
    isr_calibs: dict[str, str] = Field(default_factory=dict,
                                       description="the calib id ISR applied, by calib type")
    pid: int | None = Field(None, description="the process that made the intermediate (which worker ran it)")
    reused: bool = Field(False, description="the intermediate of an earlier run was found and the work skipped")
    error: str | None = Field(None, description="why the raw could not be processed (bad input, left out "
                                                "with ``on_bad_input='exclude'``); None when it was")
    screened: str | None = Field(None, description="why the input fails the screening against the last good "
                                                   "master (docs/algorithms.md#input-screening); None when it "
                                                   "passes or is not screened")
    # the type's scalars (calib_core.builds.calibtypes: Processed.scalars)
    level: float | None = Field(None, description="background level of the processed image (flat, fringe, "
                                                  "defects; ADU)")
    npoint: int | None = Field(None, description="pixels the flat's level was measured on (weights the flat "
                                                 "scale solve)")
    exptime: float | None = Field(None, description="exposure time in seconds (PTC: pairs are matched on it)")
    filter: str | None = Field(None, description="the exposure's filter (PTC: pairs are matched on it)")
    amps: list[AmpBox] | None = Field(None, description="the amplifiers' boxes in the detector (defects, PTC)")
    overscan_noise: dict[str, float] | None = Field(None, description="overscan noise per amplifier, ADU (PTC)")
    bias_path: str | None = Field(None, description="the master bias ISR applied (defects tests it)")
    dark_path: str | None = Field(None, description="the master dark ISR applied (defects tests it)")
    variance_median: float | None = Field(None, description="sky: the median variance of the object "
                                                            "masking's noise (detection_variance_median), "
                                                            "kept instead of the intermediate's variance plane")
    # side products (calib_core.builds.calibtypes: Processed.sidecars)
    bins: str | None = Field(None, description="sky: the binned model of the masked image "
                                               "(a BackgroundModel FITS file) of the latest pass")


class SkyResidual(_Record):
    """One (exposure, detector) of a sky build after the focal-plane barrier
    (:func:`calib_core.sky.frames.solve_sky_frames`): what the combine task writes and registers, and what the
    sky frame's verification scores it on (docs/architecture.md#the-sky-build-step-by-step)."""

    exposure_id: str = Field(description="the exposure's id in the registry")
    detector: int = Field(description="the detector's number")
    path: str = Field(description="the post-ISR intermediate (the verification's test frame)")
    isr_calibs: dict[str, str] = Field(default_factory=dict,
                                       description="the calib id ISR applied, by calib type")
    bins: str = Field(description="the binned model of the last pass (BackgroundModel FITS file)")
    residual: str = Field(description="the binned residual of this exposure and detector after its "
                                      "surface and the frame (BackgroundModel FITS file)")
    scale: float = Field(description="the exposure's sky level, divided out of its bins; recorded as the "
                                     "input's scale")
    frame: str = Field(description="the detector's sky frame as the barrier solved it (BackgroundModel FITS "
                                   "file), which the combine task writes and registers")
    warning: str | None = Field(None, description="the barrier's warning for this build (e.g. few exposures "
                                                  "left), None when all went as configured")


class CalibProduct(_Record):
    """One registered calib product, as the registry holds it (the ``calib`` table,
    docs/architecture.md#tables). Dates and times are ISO 8601 strings, times in UTC, as the CLI
    prints them. Its ``status`` is explained in docs/architecture.md#verification-and-certification."""

    calib_id: str = Field(description="the product's id: type, camera, filter, calib date, detector and the "
                                      "first 8 characters of its digest")
    type: str = Field(description="the calib type: bias, dark, defects, ptc, flat, fringe, sky")
    camera: str = Field(description="the camera's name in the registry")
    filter: str = Field(description="the filter it applies to (``NONE`` for the filterless types)")
    detector: int = Field(description="the detector's number")
    calib_date: str = Field(description="the calib date YYYY-MM-DD (the night it was built for)")
    valid_begin: str | None = Field(description="start of its validity, ISO 8601 UTC; None: not valid anywhere")
    valid_end: str | None = Field(description="end of its validity (exclusive), ISO 8601 UTC; None: open-ended")
    path: str = Field(description="the product's FITS file in the datastore")
    n_inputs: int = Field(description="input exposures stacked into it (those left out are not counted)")
    checksum: str = Field(description="sha256 of the product file's bytes")
    status: Literal["candidate", "certified", "decertified"] = Field(
        description="candidate (registered, not used by lookup), certified (lookup may choose it), or "
                    "decertified (withdrawn by a person)")
    config_hash: str = Field(description="sha256 of the effective config's canonical JSON it was built with")
    software_version: str = Field(description="calibflow's version that built it")
    stats: dict[str, Any] = Field(description="the build's statistics of the product (level, noise, n_used, "
                                              "n_rejected, isr_calibs, readout, ...; the type adds its own)")
    camera_checksum: str | None = Field(description="sha256 of the camera definition it was built with; None for "
                                                    "products registered before it was recorded")
    verification: dict[str, Any] | None = Field(description="the verification gate's result (passed, checks, "
                                                            "failed, metrics); None: not verified")
    status_note: str = Field(description="why the status is what it is (a person's note, a forced "
                                         "certification, a withdrawal's reason); empty when none")
    created_at: str = Field(description="when it was registered, ISO 8601 UTC")
    status_changed_at: str | None = Field(description="when it was last certified or decertified, ISO 8601 UTC; "
                                                      "None while a candidate never certified")


class BuiltProduct(CalibProduct):
    """A product as a build returns it: the registry's record and whether this build registered it
    (False: an identical earlier or concurrent build had, and this one found it)."""

    created: bool = Field(description="this build registered the product (False: it was found already built)")

    @classmethod
    def of(cls, product: CalibProduct, created: bool) -> BuiltProduct:
        """``product`` as the build that registered it (``created``) or found it returns it."""
        return cls(**dict(product), created=created)
